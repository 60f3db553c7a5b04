"""Draft vocabulary cut (EAGLE-3 / FR-Spec style) and the context-dependent default tree shape.

Greedy output stays exactly the AR output with a draft vocabulary, including when the target's
choice lies outside it (acceptance just stops at that node); drafted tokens all come from the
subset; bad vocabularies are refused; `generate_tree(tree_shape=None)` uses
`defaults.tree_for_context`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longspec_jax.infer import decoder as spec
from longspec_jax.infer import defaults
from longspec_jax.infer.state import DecodeState
from longspec_jax import draft_vocab
from longspec_jax import tree as tree_lib
from longspec_jax.configs import tiny_config
from longspec_jax.draft_vocab import cut_logits, head_columns
from longspec_jax.transformer import Transformer
from tests.test_speculative import (CHAIN, WIDE, _ar, _prompts, agreeing_models, random_models)

N_NEW = 24


def _spec(target, draft, prompts, n, shape=CHAIN, draft_vocab=None):
    return spec.generate_tree(target, draft, prompts, tree_shape=shape, max_new_tokens=n, eos_ids=(),
                              cache_capacity=128, draft_vocab=draft_vocab)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cut_logits_equal_full_logits_columns(tied):
    if tied:  # the head is the transposed embedding table
        target = Transformer(tiny_config(vocab_size=96, hidden_size=32, intermediate_size=64, num_heads=4,
                                         num_kv_heads=2, head_dim=8, tie_word_embeddings=True),
                             rngs=nnx.Rngs(2), dtype=jnp.float32, param_dtype=jnp.float32)
    else:
        target, _ = random_models(0)
    ids = np.sort(np.random.default_rng(0).choice(96, 30, replace=False)).astype(np.int32)
    h = jax.random.normal(jax.random.key(1), (2, 3, 32))
    got = cut_logits(target, h, head_columns(target, ids))
    assert got.shape == (2, 3, 30) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(target.logits(h))[..., ids], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [CHAIN, WIDE], ids=["chain", "wide"])
def test_greedy_matches_ar_with_draft_vocab(shape):
    for seed in range(2):
        target, draft = random_models(seed)
        prompts = _prompts(seed, (5, 11, 16))
        want = _ar(target, prompts, N_NEW)
        # a random half of the vocabulary: the target's argmax is often outside it
        ids = np.random.default_rng(seed).choice(96, 48, replace=False)
        res = _spec(target, draft, prompts, N_NEW, shape, draft_vocab=ids)
        assert res.tokens == want, seed
        assert res.spec.draft_vocab_size == 48
        outside = sum(t not in set(ids.tolist()) for row in want for t in row)
        assert outside > 0  # the case "target choice outside the subset" really occurs


def test_target_choices_outside_subset_are_never_accepted_as_drafts():
    """Full-acceptance models, but the subset excludes the tokens the target emits: every
    iteration accepts 0 drafts (tau == 1) and the output is still exactly AR."""
    target, draft = agreeing_models(0)
    prompts = _prompts(0, (9,))
    want = _ar(target, prompts, N_NEW)
    emitted = set(want[0])
    ids = np.array([t for t in range(96) if t not in emitted])
    res = _spec(target, draft, prompts, N_NEW, draft_vocab=ids)
    assert res.tokens == want
    assert res.spec.accepted_by_depth == [0] * len(CHAIN)
    # ... while with the full vocabulary (or a subset holding them) the same models accept drafts
    res_in = _spec(target, draft, prompts, N_NEW, draft_vocab=np.array(sorted(emitted | {0, 1, 2})))
    assert res_in.tokens == want and res_in.spec.accepted_by_depth[0] > 0


def test_drafted_tokens_are_inside_the_subset():
    target, draft = random_models(3)
    ids = np.random.default_rng(3).choice(96, 20, replace=False)
    dec = spec.Decoder(target, draft, tree_shape=WIDE, draft_vocab=ids)
    assert dec.draft_vocab.tolist() == sorted(ids.tolist())
    from longspec_jax.kv_cache import KVCache

    loop = dec.loop_for(8, 4)
    state = DecodeState.initial(target.cfg, batch=2, capacity=64, out_size=8, max_accept=loop.max_accept,
                                ring_slots=dec.ring_slots(loop.max_accept), draft_cfg=draft.cfg, dtype=jnp.float32)
    # fill the target cache with random K/V so cross-attention is not degenerate
    state = state.replace(cache=KVCache(k=tuple(jax.random.normal(jax.random.key(i), c.shape) for i, c in
                                                enumerate(state.cache.k)), v=state.cache.v),
                          committed=jnp.array([10, 30], jnp.int32), root=jnp.array([5, 77], jnp.int32))
    tree, *_ = loop.draft_tree(target, draft, state, dec.vocab)
    drafted = np.asarray(tree.tokens[:, 1:])
    assert set(drafted.ravel().tolist()) <= set(ids.tolist())
    # without the cut the same drafts use tokens outside it (the test would catch a no-op cut)
    full, *_ = loop.draft_tree(target, draft, state, None)
    assert not set(np.asarray(full.tokens[:, 1:]).ravel().tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("bad,message", [
    ([0, 5, 96], "outside the target vocabulary"),
    ([-1, 3], "outside the target vocabulary"),
    ([3, 4, 3], "duplicate"),
    ([], "non-empty"),
    ([[1, 2]], "1-D"),
    ([1.5, 2.0], "integer"),
])
def test_bad_draft_vocab_is_refused(bad, message):
    target, draft = random_models(0)
    with pytest.raises(ValueError, match=message):
        draft_vocab.validate(np.array(bad), 96)
    with pytest.raises(ValueError, match=message):
        spec.Decoder(target, draft, tree_shape=CHAIN, draft_vocab=np.array(bad))


def test_validate_sorts_to_int32():
    got = draft_vocab.validate(np.array([9, 2, 5], np.int64), 10)
    assert got.dtype == np.int32 and got.tolist() == [2, 5, 9]


@pytest.mark.parametrize("name,content,message", [
    ("v.json", '{"tokens": [1, 2]}', 'JSON object without an "ids" list'),
    ("v.json", '"1 2 3"', "holds a JSON str"),
    ("v.json", "[[1, 2], [3]]", "not a flat list"),
    ("v.json", "[1, 2", "cannot read the draft vocabulary"),
    ("v.npy", "not a numpy file", "cannot read the draft vocabulary"),
    ("v.txt", "1 2 3", ".npy or .json"),
])
def test_read_refuses_malformed_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        draft_vocab.read(path)
    assert str(path) in str(e.value)  # the message names the file


def test_tree_shape_too_wide_for_draft_vocab_is_refused():
    target, draft = random_models(0)
    with pytest.raises(ValueError, match="tokens exist"):
        spec.Decoder(target, draft, tree_shape=(4, 16), draft_vocab=np.arange(3))


# ---------------------------------------------------------------------------------------------
# tree shape by context


def test_default_tree_for_context_table():
    f = defaults.tree_for_context
    assert f(0).widths == f(1000).widths == f(32768).widths == (4, 16, 16, 16, 16)
    assert f(32769).widths == f(65536).widths == (4, 8, 8, 8, 8)
    assert f(65537).widths == f(131072).widths == f(10**7).widths == (2, 4, 4, 4, 4)
    sizes = [f(c).num_nodes for c in (1, 40_000, 200_000)]
    assert sizes == sorted(sizes, reverse=True)  # never a bigger tree at a longer context
    with pytest.raises(ValueError, match=">= 0"):
        f(-1)
    # CPUs: verification is compute-bound, a short chain at every length
    assert f(100, "cpu").widths == f(10**6, "cpu").widths == defaults.CPU_TREE == (1, 1, 1, 1, 1)
    assert f(100, "gpu").widths == (4, 16, 16, 16, 16)
    # T > 0 with sampled drafts: rejection sampling accepts more than matching a beam tree
    assert f(100, "gpu", 0.7).widths == f(10**6, "gpu", 1.0).widths == defaults.SAMPLED_TREE
    assert f(100, "cpu", 0.7).widths == defaults.CPU_SAMPLED_TREE
    assert f(100, "gpu", 0.7, sampled_drafts=False).widths == (4, 16, 16, 16, 16)  # beam drafts: the T = 0 table
    # Small (launch-bound) targets get the short chain on GPUs too; large or unknown sizes the table.
    small, big = defaults.LAUNCH_BOUND_BYTES - 1, defaults.LAUNCH_BOUND_BYTES
    assert f(8192, "gpu", target_bytes=small).widths == f(10**6, "gpu", target_bytes=small).widths == defaults.CPU_TREE
    assert f(8192, "gpu", 1.0, target_bytes=small).widths == defaults.CPU_TREE  # measured: the chain of 5 there
    assert f(8192, "gpu", target_bytes=big).widths == f(8192, "gpu", target_bytes=None).widths == (4, 16, 16, 16, 16)
    assert f(10**6, "gpu", target_bytes=16 * 2**30).widths == (2, 4, 4, 4, 4)


def test_load_tables_shrink_speculation_as_rows_grow():
    for table in (defaults.GPU_LOAD_TABLE, defaults.GPU_SAMPLED_LOAD_TABLE, defaults.CPU_LOAD_TABLE,
                  defaults.LAUNCH_BOUND_GPU_LOAD_TABLE):
        nodes = [0 if s is None else s.num_nodes for s in (defaults.tree_for_load(n, table) for n in range(1, 65))]
        assert nodes == sorted(nodes, reverse=True) and nodes[-1] == 0  # plain AR under heavy load
    assert defaults.load_table("cpu", None) is defaults.CPU_LOAD_TABLE
    assert defaults.load_table("cpu", None, sampled=True) is defaults.CPU_LOAD_TABLE
    small = defaults.LAUNCH_BOUND_BYTES - 1
    assert defaults.load_table("gpu", small) is defaults.load_table("gpu", small, True) is \
        defaults.LAUNCH_BOUND_GPU_LOAD_TABLE
    assert defaults.load_table("gpu", 16 * 2**30) is defaults.GPU_LOAD_TABLE
    assert defaults.load_table("gpu", 16 * 2**30, sampled=True) is defaults.GPU_SAMPLED_LOAD_TABLE
    # one request alone gets the single-request T > 0 shape
    assert defaults.tree_for_load(1, defaults.GPU_SAMPLED_LOAD_TABLE) == defaults.tree_for_context(
        32768, "gpu", temperature=1.0, target_bytes=16 * 2**30)


def test_decode_calls_run_a_bucket_of_rows_where_idle_rows_cost():
    """The (shape, rows) of each load: on a GPU with a large target the whole batch while its rows x
    nodes stay memory-bound, else the running rows' bucket; on a CPU always the bucket. Every call a
    GPU runs stays within `MEMORY_BOUND_ROWS` verification rows, and only the calls the tables reach
    are compiled (5 on 8 GPU slots, not 7 loops x 4 buckets)."""
    assert defaults.row_buckets(8) == (1, 2, 4, 8) and defaults.row_buckets(6) == (1, 2, 4, 6)
    assert defaults.row_buckets(1) == (1,)
    tables = {s: defaults.load_table("gpu", 16 * 2**30, s) for s in (False, True)}
    plan = defaults.decode_calls(tables, 8, every_row_costs=False)
    assert [plan[False, r] for r in (1, 2, 3, 5, 8)] == [
        ((4, 16, 16, 16, 16), 1), ((4, 16, 16, 16, 16), 2), ((2, 4, 4, 4, 4), 8), ((2, 4, 4, 4, 4), 8),
        ((2, 4, 4, 4, 4), 8)]
    assert all(b * (1 + sum(w)) <= defaults.MEMORY_BOUND_ROWS for w, b in plan.values() if w is not None)
    assert len({(w, s, b) for (s, _), (w, b) in plan.items()}) == 5
    ar = defaults.decode_calls({False: ((None, None),)}, 8, every_row_costs=False)
    assert set(ar.values()) == {(None, 8)}  # AR on a GPU: the whole batch, no copies
    cpu = defaults.decode_calls({False: defaults.CPU_LOAD_TABLE}, 8, every_row_costs=True)
    assert [cpu[False, r] for r in (1, 2, 3, 5)] == [((1,) * 5, 1), ((1,) * 5, 2), ((1,) * 5, 4), (None, 8)]


def test_generate_tree_picks_context_default_when_shape_is_none(monkeypatch):
    target, draft = random_models(1)
    prompts = _prompts(1, (7,))
    seen = []

    def fake_default(context_len, platform=None, temperature=0.0, sampled_drafts=True, target_bytes=None):
        seen.append((context_len, target_bytes))
        return tree_lib.TreeShape((2, 2))

    monkeypatch.setattr(defaults, "tree_for_context", fake_default)
    res = spec.generate_tree(target, draft, prompts, max_new_tokens=12, eos_ids=(), cache_capacity=128)
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(target, nnx.Param)))
    assert seen and seen[0] == (7 + 12, n_bytes)  # longest prompt + max_new_tokens, the target's size
    assert res.spec.tree_shape == [2, 2]
    assert res.tokens == _ar(target, prompts, 12)
    # an explicit shape still wins
    res = spec.generate_tree(target, draft, prompts, tree_shape=CHAIN, max_new_tokens=12, eos_ids=(),
                             cache_capacity=128)
    assert res.spec.tree_shape == list(CHAIN)
    # without the monkeypatch: this tiny target is launch-bound on any device, so the short chain
    monkeypatch.undo()
    dec = spec.Decoder(target, draft)
    assert n_bytes < defaults.LAUNCH_BOUND_BYTES
    assert dec.shape is None and dec.tree_shape_for(7, 12).widths == defaults.CPU_TREE
    assert dec.tree_shape_for(100_000, 1000).widths == defaults.CPU_TREE
    assert dec.tree_shape_for(7, 12, sampled=True).widths == defaults.CPU_SAMPLED_TREE
    loop = dec.loop_for(7, 12, sampled=True)
    assert loop.sampled and loop.verification == "block" and loop.num_nodes == 1 + len(defaults.CPU_SAMPLED_TREE)
    assert not dec.loop_for(7, 12).sampled  # greedy: beam drafts
    assert not spec.Decoder(target, draft, sample_drafts=False).loop_for(7, 12, sampled=True).sampled
    assert spec.Decoder(target, draft, verification="token").loop_for(7, 12, sampled=True).verification == "token"
    with pytest.raises(ValueError, match="verification must be one of"):
        spec.Decoder(target, draft, verification="tree")


# ---------------------------------------------------------------------------------------------
# scripts/draft_vocab.py and --draft-vocab


def _script():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "draft_vocab.py")
    s = importlib.util.spec_from_file_location("draft_vocab_script", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def test_top_ids_by_frequency_with_always_ids():
    dv = _script()
    counts = np.array([5, 0, 9, 9, 1, 7, 0, 2])
    assert dv.top_ids(counts, 3).tolist() == [2, 3, 5]
    assert dv.top_ids(counts, 3, always=[6]).tolist() == [2, 3, 6]  # ties 9/9 -> lower id first
    with pytest.raises(ValueError, match="--size"):
        dv.top_ids(counts, 9)


def test_script_end_to_end(tmp_path):
    import json
    import os

    dv = _script()
    tok_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "longspec_jax", "demo",
                           "tokenizer")
    corpus = tmp_path / "c.jsonl"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "numpy", "class", "for", "in", "range", "x"]
    corpus.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) for _ in range(20)))
    (tmp_path / "d.txt").write_text("print('hello world')\n")
    out = str(tmp_path / "sub" / "vocab")
    assert dv.main([str(corpus), str(tmp_path / "d.txt"), "--tokenizer", tok_dir, "--size", "64", "--out", out]) == 0
    ids = np.load(out + ".npy")
    meta = json.load(open(out + ".json"))
    assert ids.dtype == np.int32 and ids.size == 64 and np.all(np.diff(ids) > 0)
    assert meta["ids"] == ids.tolist() and 0.9 < meta["coverage"] <= 1.0  # 64 ids cover a 10-word corpus
    assert set(meta["always"]) <= set(ids.tolist())
    assert draft_vocab.read(out + ".npy").tolist() == ids.tolist()
    assert draft_vocab.read(out + ".json").tolist() == ids.tolist()
    # --draft-dir: the vocabulary a draft directory ships (draft_vocab.FILE)
    draft_dir = tmp_path / "draft"
    draft_dir.mkdir()
    assert draft_vocab.find(draft_dir) is None
    assert dv.main([str(corpus), str(tmp_path / "d.txt"), "--tokenizer", tok_dir, "--size", "64",
                    "--draft-dir", str(draft_dir)]) == 0
    assert sorted(os.listdir(draft_dir)) == [draft_vocab.FILE]
    found = draft_vocab.find(draft_dir)
    assert found == str(draft_dir / draft_vocab.FILE)
    assert draft_vocab.find(draft_dir / "model.safetensors") == found  # beside a weight file
    assert draft_vocab.read(found).tolist() == ids.tolist()
    with pytest.raises(SystemExit):  # nowhere to write
        dv.main([str(corpus), "--tokenizer", tok_dir])
    with pytest.raises(SystemExit):  # --draft-dir must be an existing (draft) directory
        dv.main([str(corpus), "--tokenizer", tok_dir, "--draft-dir", str(tmp_path / "missing")])


@pytest.mark.parametrize("name,content,message", [
    ("v.npy", None, r"^error: --draft-vocab: draft_vocab has 1 ids outside the target vocabulary \[0, 256\)"),
    ("v.json", '{"vocab": [1, 2]}', '^error: --draft-vocab: draft vocabulary .* is a JSON object without an "ids"'),
    ("v.txt", "1 2", "^error: --draft-vocab: draft vocabulary .* must be a .npy or .json file"),
    ("missing.npy", "", "^error: --draft-vocab: cannot read the draft vocabulary .*No such file"),
])
def test_cli_refuses_a_bad_draft_vocab_before_loading(tmp_path, capsys, monkeypatch, name, content, message):
    import re

    from longspec_jax.infer import generate, tiny_random

    path = tmp_path / name
    if content is None:
        np.save(path, np.array([1, 2, 10**6], np.int32))
    elif name != "missing.npy":
        path.write_text(content)
    monkeypatch.setattr(tiny_random, "build", _must_not_load)
    argv = ["--model", "tiny-random", "--method", "tree", "--max-new-tokens", "2", "--draft-vocab", str(path)]
    assert generate.main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    args = generate.build_parser().parse_args(["--method", "tree"])
    assert args.tree_shape is None and args.draft_vocab is None  # auto tree shape by default


def _must_not_load(*args, **kwargs):
    raise AssertionError("the weights were loaded before the bad input was refused")


def test_cli_uses_the_vocabulary_a_draft_directory_ships(tmp_path, capsys):
    """`--draft DIR` picks DIR/draft_vocab.json by default; --draft-vocab none and a draft
    directory without one score the full vocabulary."""
    import json
    import shutil

    from longspec_jax.infer import generate
    from longspec_jax import demo

    if not demo.available():
        pytest.skip("the demo pair is missing")
    plain, own = tmp_path / "plain", tmp_path / "own"
    for d in (plain, own):
        d.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(f"{demo.DRAFT_DIR}/{name}", d / name)
    ids = json.load(open(draft_vocab.find(demo.DRAFT_DIR)))["ids"][::2]  # 1024 of the shipped 2048
    (own / draft_vocab.FILE).write_text(json.dumps({"ids": ids}))
    base = ["--prompt-tokens", "96", "--max-new-tokens", "6", "--tree-shape", "1", "1"]
    assert generate.main(base + ["--draft", str(own)]) == 0
    out = capsys.readouterr().out
    assert "1024 ids shipped with the draft" in out and "draft vocab 1024" in out
    assert generate.main(base + ["--draft", str(own), "--draft-vocab", "none"]) == 0
    assert "draft vocab 8192" in capsys.readouterr().out
    assert generate.main(base + ["--draft", str(plain)]) == 0
    assert "draft vocab 8192" in capsys.readouterr().out
