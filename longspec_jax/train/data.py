"""Training data: read files, apply a template (spec 5.2), tokenize, build fixed-shape rows.

Pipeline:
  files (jsonl / json / parquet / plain text; directories searched, sorted)
    -> records (dicts)                                   `read_records`
    -> documents: token ids + loss mask per token        `encode_record` (template raw / long / chat)
    -> rows [T] (packed: concatenated with EOS and cut; or truncated / right-padded)
    -> batches [A, B, T] (A = gradient-accumulation micro-batches)      `loader.DataLoader`

Loss-mask convention (longspec_jax/train/loss.py): `loss_mask[t] = 1` iff token t is a prediction target.
Padding and chat prompts are 0. Unlike the released collator (which masks every id equal to the pad
id, hence also EOS for Qwen), EOS stays a target: the draft must learn to propose it.

Tokenizers: transformers.AutoTokenizer from the target checkpoint directory, or the byte tokenizer of
`longspec_jax.init` for the tiny random target used on CPU.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from longspec_jax.train.config import DataSection


class DataError(ValueError):
    """Data that cannot be used for training; the message names the file / record and the fix."""


# --------------------------------------------------------------------------------------------
# Tokenizers


class HFTokenizer:
    """A transformers tokenizer as the pipeline uses it: encode without implicit special tokens (the
    templates add BOS / EOS themselves, `data.add_bos` / `data.add_eos`)."""

    def __init__(self, tok, where: str):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        if self.eos_token_id is None:
            raise DataError(f"the tokenizer {where} has no eos_token; set it in tokenizer_config.json")

    def __len__(self):
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once: the Rust tokenizer spreads them over the CPU cores."""
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def fingerprint(self) -> str:
        """Identity of the tokenizer for the token cache (its full serialized form)."""
        import hashlib

        backend = getattr(self.tok, "backend_tokenizer", None)
        blob = backend.to_str() if backend is not None else repr(sorted(self.tok.get_vocab().items()))
        return hashlib.sha256(blob.encode()).hexdigest()


def load_tokenizer(spec: str, target_path: str | None) -> HFTokenizer:
    """`spec`: "auto" (the target directory's tokenizer; bytes for a tiny / preset / config-file
    target), "bytes" (`longspec_jax.init.byte_tokenizer`, the ids of `tiny_config()`), or a directory."""
    if spec == "bytes" or (spec == "auto" and not (target_path and os.path.isdir(target_path))):
        from longspec_jax import init

        return HFTokenizer(init.byte_tokenizer(), "bytes")
    path = target_path if spec == "auto" else spec
    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory {path!r} does not exist; set model.tokenizer to the "
                        "target checkpoint directory (it must hold tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here
        raise DataError(f"could not load a tokenizer from {path!r}: {e}. The target checkpoint directory "
                        "must hold the tokenizer files (tokenizer.json / tokenizer_config.json).") from e
    return HFTokenizer(tok, f"in {path!r}")


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids do not fit the target's embedding table."""
    n = len(tokenizer)
    if n > vocab_size:
        raise DataError(
            f"the tokenizer has {n} tokens but the target's vocab_size is {vocab_size}: it is not the "
            "target's tokenizer. Set model.tokenizer to the target checkpoint directory.")


# --------------------------------------------------------------------------------------------
# Files -> records

_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text",
             ".md": "text"}


def list_files(paths: Sequence[str], fmt: str) -> list[tuple[str, str]]:
    """Expand files / directories / globs into a sorted list of (path, format)."""
    if not paths:
        raise DataError("data.paths is empty; give at least one file or directory of training data")
    out = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DataError(f"data path {p!r} does not exist (data.paths); check the path or mount")
        for m in matches:
            if os.path.isdir(m):
                for root, _, names in sorted(os.walk(m)):
                    for n in sorted(names):
                        suffix = os.path.splitext(n)[1].lower()
                        if suffix in _SUFFIXES and (fmt == "auto" or _SUFFIXES[suffix] == fmt):
                            out.append((os.path.join(root, n), _SUFFIXES[suffix]))
            else:
                suffix = os.path.splitext(m)[1].lower()
                kind = fmt if fmt != "auto" else _SUFFIXES.get(suffix)
                if kind is None:
                    raise DataError(f"cannot tell the format of {m!r} from its suffix; set data.format to "
                                    "jsonl, parquet or text")
                out.append((m, kind))
    if not out:
        raise DataError(f"no data files (*.jsonl, *.json, *.parquet, *.txt) found under {list(paths)}")
    return out


def read_records(path: str, kind: str, text_field: str) -> list[dict[str, Any]]:
    """All records of one file as dicts (a plain-text file is one record {text_field: contents})."""
    if kind == "text":
        with open(path, encoding="utf-8") as f:
            return [{text_field: f.read()}]
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading parquet needs pyarrow; pip install pyarrow") from e
        return pq.read_table(path).to_pylist()
    records = []
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        f.seek(0)
        if head == "[":  # a JSON array file
            data = json.load(f)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of objects")
            return data
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e})") from None
    return records


# --------------------------------------------------------------------------------------------
# Templates (spec 5.2)

_CHAT_FORMATS = {
    # (prompt prefix with {system} and the user header, prompt suffix = user end + assistant header,
    #  answer template)
    "qwen": ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n",
             "<|im_end|>\n<|im_start|>assistant\n", "{answer}<|im_end|>\n"),
    "llama_pseudo": ("<s>system\n{system}</s>\n<s>user\n", "</s>\n<s>assistant\n", "{answer}</s>\n"),
}


def _chat_parts(cfg: DataSection) -> tuple[str, str, str]:
    if cfg.chat_format == "custom":
        if "{prompt}" not in cfg.prompt_template or "{answer}" not in cfg.answer_template:
            raise DataError("data.chat_format=custom needs data.prompt_template containing {prompt} and "
                            "data.answer_template containing {answer}")
        pre, post = cfg.prompt_template.split("{prompt}", 1)
        return pre, post, cfg.answer_template
    pre, post, ans = _CHAT_FORMATS[cfg.chat_format]
    if not cfg.system_prompt:
        pre = pre.split("\n", 2)[-1] if cfg.chat_format == "qwen" else pre.split("</s>\n", 1)[-1]
    return pre, post, ans


def _field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: record has no field {name!r} (fields: {sorted(record)}); set "
                        "data.text_field / data.prompt_field / data.answer_field")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


@dataclasses.dataclass
class Document:
    ids: np.ndarray    # [n] int32
    mask: np.ndarray   # [n] uint8, 1 = loss target
    where: str         # file:record, for error messages


def _specials(cfg: DataSection, tok) -> tuple[list[int], list[int]]:
    """(BOS ids, EOS ids) the settings add around a document."""
    bos = [tok.bos_token_id] if cfg.add_bos and tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if cfg.add_eos else []
    return bos, eos


def _text_document(text_ids, cfg: DataSection, tok, where: str) -> Document:
    """A plain-text document: BOS + ids + EOS, loss on every token."""
    bos, eos = _specials(cfg, tok)
    ids = bos + list(text_ids) + eos
    return Document(np.asarray(ids, np.int32), np.ones(len(ids), np.uint8), where)


def encode_record(record: dict, cfg: DataSection, tok, where: str) -> Document:
    """Apply the template to one record -> token ids and per-token loss mask."""
    use_text = cfg.template == "raw" or (cfg.template == "long" and cfg.text_field in record)
    if use_text:
        return _text_document(tok.encode(_field(record, cfg.text_field, where)), cfg, tok, where)
    bos, eos = _specials(cfg, tok)
    pre, post, ans_t = _chat_parts(cfg)
    prompt = _field(record, cfg.prompt_field, where)
    answer = _field(record, cfg.answer_field, where)
    head = bos + tok.encode(pre.format(system=cfg.system_prompt))
    body = tok.encode(prompt)
    tail = tok.encode(post)
    ans = tok.encode(ans_t.format(answer=answer)) + eos
    if cfg.template == "chat":
        # Spec 5.2: the prompt is truncated to seq_len - answer_reserve so the answer keeps room.
        budget = cfg.seq_len - cfg.answer_reserve - len(head) - len(tail)
        if len(body) > budget:
            if not cfg.truncate:
                raise DataError(f"{where}: prompt of {len(body)} tokens exceeds data.seq_len - "
                                f"data.answer_reserve ({budget} left after the template); enable "
                                "data.truncate or raise data.seq_len")
            body = body[:max(budget, 0)]
        prompt_ids = head + body + tail
        ids = prompt_ids + ans
        mask = [0] * len(prompt_ids) + [1] * len(ans)
    else:  # "long" with prompt/answer: loss on every token ("nomask" collator)
        ids = head + body + tail + ans
        mask = [1] * len(ids)
    return Document(np.asarray(ids, np.int32), np.asarray(mask, np.uint8), where)


def load_documents(cfg: DataSection, tok) -> list[Document]:
    """Read every file and encode every record, in a deterministic (sorted file) order.

    With the "raw" template the texts are encoded in batches (the Rust tokenizer uses every core).
    With `data.cache_dir` set, the encoded documents are stored there under a key made of the files
    (path, size, modification time), the tokenizer and the encoding settings, and later runs (the
    draft stages after the target, a resumed job) read them back instead of tokenizing again.
    """
    files = list_files(cfg.paths, cfg.format)
    cache = _cache_path(cfg, tok, files) if cfg.cache_dir else None
    if cache is not None and os.path.exists(cache):
        return _read_cache(cache)
    docs = []
    for path, kind in files:
        records = read_records(path, kind, cfg.text_field)
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i + 1}: each record must be a JSON object, got {type(rec).__name__}")
        if cfg.template == "raw":
            texts = [_field(rec, cfg.text_field, f"{path}:{i + 1}") for i, rec in enumerate(records)]
            for start in range(0, len(texts), 256):
                for j, ids in enumerate(tok.encode_batch(texts[start:start + 256])):
                    doc = _text_document(ids, cfg, tok, f"{path}:{start + j + 1}")
                    if len(doc.ids):
                        docs.append(doc)
            continue
        for i, rec in enumerate(records):
            doc = encode_record(rec, cfg, tok, f"{path}:{i + 1}")
            if len(doc.ids):
                docs.append(doc)
    if not docs:
        raise DataError(f"the dataset {list(cfg.paths)} is empty (no non-empty records); check data.paths "
                        "and data.text_field")
    if cache is not None:
        _write_cache(cache, docs)
    return docs


_CACHE_FIELDS = ("format", "template", "text_field", "prompt_field", "answer_field", "chat_format",
                 "prompt_template", "answer_template", "system_prompt", "seq_len", "truncate", "answer_reserve",
                 "add_eos", "add_bos")


def _cache_path(cfg: DataSection, tok, files: list[tuple[str, str]]) -> str:
    import hashlib

    key = {
        "version": 1,
        "tokenizer": tok.fingerprint(),
        # seq_len / truncate / answer_reserve shape only chat prompts: "raw" entries serve every length.
        "settings": {f: getattr(cfg, f) for f in _CACHE_FIELDS
                     if cfg.template == "chat" or f not in ("seq_len", "truncate", "answer_reserve")},
        "files": [(os.path.abspath(p), k, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p, k in files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return os.path.join(cfg.cache_dir, f"tokens-{digest}.npz")


def _write_cache(path: str, docs: list[Document]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lengths = np.asarray([len(d.ids) for d in docs], np.int64)
    # Written to a temporary file of its own, then renamed: an interrupted write never leaves a half
    # cache, and the processes of a pod, which all encode the data, never write into one file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, ids=np.concatenate([d.ids for d in docs]), mask=np.concatenate([d.mask for d in docs]),
                 lengths=lengths, where=np.asarray([d.where for d in docs]))
    os.replace(tmp, path)


def _read_cache(path: str) -> list[Document]:
    with np.load(path) as z:
        ids, mask, lengths, where = z["ids"], z["mask"], z["lengths"], z["where"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [Document(ids[a:b], mask[a:b], str(w)) for a, b, w in zip(bounds[:-1], bounds[1:], where)]


# --------------------------------------------------------------------------------------------
# Rows and batches
