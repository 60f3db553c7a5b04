"""Data pipeline: formats, the three templates (spec 5.2), packing, deterministic resumable order,
and the errors a user can act on."""

import json
import os

import numpy as np
import pytest

from longspec_jax.train.config import from_dict
from longspec_jax.train.data import DataError, check_tokenizer, encode_record, load_documents, load_tokenizer
from longspec_jax.train.loader import DataLoader

TOK = load_tokenizer("bytes", None)


def decode(ids, skip_special_tokens=True):
    return TOK.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def data_cfg(**kw):
    return from_dict({"data": kw}).data


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_formats_jsonl_parquet_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    pq.write_table(pa.Table.from_pylist([{"text": "gamma"}]), d / "b.parquet")
    (d / "c.txt").write_text("delta")
    (d / "ignored.bin").write_bytes(b"\0")
    docs = load_documents(data_cfg(paths=[str(d)], add_bos=False), TOK)
    assert [decode(doc.ids) for doc in docs] == ["alpha", "beta", "gamma", "delta"]
    assert all(doc.ids[-1] == TOK.eos_token_id for doc in docs)


def test_chat_template_masks_prompt_and_truncates_it():
    cfg = data_cfg(template="chat", chat_format="qwen", seq_len=150, answer_reserve=30, system_prompt="")
    doc = encode_record({"prompt": "x" * 500, "answer": "the answer"}, cfg, TOK, "r")
    text = decode(doc.ids)
    assert text.startswith("<|im_start|>user\nxxx") and text.endswith("the answer<|im_end|>\n")
    masked = decode(doc.ids[doc.mask == 1])
    assert masked == "the answer<|im_end|>\n"  # loss only on the answer (and its EOS)
    assert doc.mask[-1] == 1 and doc.ids[-1] == TOK.eos_token_id
    assert int((doc.mask == 0).sum()) == 150 - 30  # prompt cut to seq_len - answer_reserve


def test_long_template_nomask_and_raw_text():
    cfg = data_cfg(template="long", chat_format="llama_pseudo", add_bos=False)  # the template's own "<s>" only
    chat = encode_record({"prompt": "Summarize: doc", "answer": "sum"}, cfg, TOK, "r")
    assert decode(chat.ids, skip_special_tokens=False).startswith(
        "<s>system\nYou are a helpful assistant.</s>\n<s>user\nSummarize")
    assert chat.mask.all()  # "nomask": every token counts
    raw = encode_record({"text": "book text"}, cfg, TOK, "r")
    assert decode(raw.ids) == "book text" and raw.mask.all()


def test_packing_is_exact_concatenation_and_resumable(tmp_path):
    recs = [{"text": f"document number {i} " * (i % 5 + 1)} for i in range(30)]
    cfg = data_cfg(paths=[write_jsonl(tmp_path / "d.jsonl", recs)], seq_len=16, packing=True, seed=3)
    docs = load_documents(cfg, TOK)
    loader = DataLoader(docs, cfg, pad_id=0, rows_per_step=4)
    perm = np.random.default_rng([3, 0]).permutation(len(docs))
    stream = np.concatenate([docs[i].ids for i in perm])
    rows = np.concatenate([loader.row(0, i)[0] for i in range(loader.rows_per_epoch)])
    np.testing.assert_array_equal(rows, stream[: len(rows)])
    # Resuming at a saved position gives exactly the batches an uninterrupted loader gives.
    a = DataLoader(docs, cfg, pad_id=0, rows_per_step=4)
    seq = [a.batch(*a.next_step(2)) for _ in range(loader.steps_per_epoch + 3)]
    b = DataLoader(docs, cfg, pad_id=0, rows_per_step=4)
    for _ in range(5):
        b.next_step(2)
    pos = b.position()
    c = DataLoader(docs, cfg, pad_id=0, rows_per_step=4)
    c.restore(pos)
    for want in seq[5:]:
        got = c.batch(*c.next_step(2))
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert c.epoch == 1  # crossed into the second epoch, with a different order
    epoch = lambda e: np.stack([loader.row(e, i)[0] for i in range(loader.rows_per_epoch)])  # noqa: E731
    assert not np.array_equal(epoch(0), epoch(1))


def test_padding_truncation_and_hosts(tmp_path):
    recs = [{"text": "short"}, {"text": "a much longer document than sixteen tokens"}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    cfg = data_cfg(paths=[path], seq_len=16, packing=False, shuffle=False, add_bos=False)
    loader = DataLoader(load_documents(cfg, TOK), cfg, pad_id=0, rows_per_step=2)
    toks, mask = loader.row(0, 0)
    assert decode(toks[mask == 1]) == "short" and (toks[mask == 0] == 0).all()
    assert mask.sum() == 6  # 5 bytes + EOS
    toks, mask = loader.row(0, 1)
    assert mask.all() and decode(toks) == "a much longer do"
    epoch, ids = loader.next_step(1)
    np.testing.assert_array_equal(ids, [[0, 1]])
    np.testing.assert_array_equal(loader.batch(epoch, ids)["tokens"][0, 1], toks)


def test_device_batch_reads_only_the_rows_of_local_devices(tmp_path):
    """On a mesh, the global batch is assembled from the rows each device holds (a host of a pod
    reads only those); it equals the host batch, and the rows read are those of the local shards."""
    import jax

    from longspec_jax import sharding
    from longspec_jax.train.build import batch_sharding

    recs = [{"text": f"record {i} " * (i % 3 + 1)} for i in range(40)]
    cfg = data_cfg(paths=[write_jsonl(tmp_path / "d.jsonl", recs)], seq_len=8, packing=True)
    loader = DataLoader(load_documents(cfg, TOK), cfg, pad_id=0, rows_per_step=16)
    loader.next_step(2)
    epoch, ids = loader.next_step(2)  # the second step: rows 16..31 as [2, 8]
    mesh = sharding.make_mesh(4, 1, 2)  # batch over 4 devices, each row on 2 (tensor)
    batch, rows = loader.device_batch(epoch, ids, batch_sharding(mesh))
    assert rows == list(range(16, 32))  # one process holds every device here
    want = loader.batch(epoch, ids)
    for k in ("tokens", "loss_mask"):
        assert batch[k].shape == (2, 8, 8) and batch[k].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(batch[k]), want[k])
    assert batch["tokens"].sharding == batch_sharding(mesh)
    shard = batch["tokens"].addressable_shards[0]
    np.testing.assert_array_equal(np.asarray(shard.data), want["tokens"][shard.index])
    assert jax.device_count() == 8


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(data_cfg(paths=[str(tmp_path / "missing")]), TOK)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_documents(data_cfg(paths=[str(tmp_path / "empty")]), TOK)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="empty"):
        load_documents(data_cfg(paths=[blank], add_eos=False, add_bos=False), TOK)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"content": "x"}])
    with pytest.raises(DataError, match="no field 'text'.*data.text_field"):
        load_documents(data_cfg(paths=[wrong]), TOK)
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "y" * 100}])
    cfg = data_cfg(paths=[long], seq_len=16, packing=False, truncate=False, add_bos=False)
    with pytest.raises(DataError, match=r"long.jsonl:1: 101 tokens > data.seq_len=16"):
        DataLoader(load_documents(cfg, TOK), cfg, pad_id=0, rows_per_step=1)
    cfg = data_cfg(paths=[long], seq_len=16, packing=True)
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        DataLoader(load_documents(cfg, TOK), cfg, pad_id=0, rows_per_step=64)
    with pytest.raises(DataError, match="vocab_size is 100"):
        check_tokenizer(TOK, 100)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-tokenizer"), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: invalid JSON"):
        load_documents(data_cfg(paths=[str(bad)]), TOK)


def test_hf_tokenizer_from_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "</s>": 1, "<s>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>", pad_token="[PAD]",
                                   unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"), None)
    doc = encode_record({"text": "hello world"}, data_cfg(), tok, "r")
    assert doc.ids.tolist() == [2, 3, 4, 1]
    check_tokenizer(tok, 6)
    with pytest.raises(DataError, match="not the target's tokenizer"):
        check_tokenizer(tok, 5)


def test_batched_encoding_and_token_cache(tmp_path):
    """The demo tokenizer: batched "raw" encoding == record-by-record encoding; the cache returns the
    same documents, is reused, and is rebuilt when the data or the settings change."""
    tok = load_tokenizer(os.path.join(os.path.dirname(__file__), "..", "longspec_jax", "demo", "tokenizer"), None)
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "    ", "\n", "x", "=", "(", ")", ":", "import", "numpy", "é", "λ"]
    recs = [{"text": "".join(rng.choice(words, size=int(rng.integers(5, 60))))} for _ in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    cache = tmp_path / "cache"
    cfg = data_cfg(paths=[path], cache_dir=str(cache))
    one_by_one = [encode_record(r, data_cfg(paths=[path]), tok, "r") for r in recs]
    first = load_documents(cfg, tok)
    files = sorted(os.listdir(cache))
    assert len(files) == 1 and files[0].endswith(".npz")
    second = load_documents(cfg, tok)
    for a, b, c in zip(one_by_one, first, second):
        assert a.ids.tolist() == b.ids.tolist() == c.ids.tolist()
        assert a.mask.tolist() == b.mask.tolist() == c.mask.tolist()
    assert [d.where for d in second] == [d.where for d in first]
    load_documents(data_cfg(paths=[path], cache_dir=str(cache), add_bos=False), tok)
    assert len(os.listdir(cache)) == 2  # other settings: another entry
    write_jsonl(tmp_path / "a.jsonl", recs[:5])
    assert len(load_documents(cfg, tok)) == 5  # the file changed: not served from the old entry
