"""Train the demo's byte-level BPE tokenizer on the training split of the code corpus.

The tokenizer is byte-level (every byte sequence encodes, and decoding returns the exact input
text), pre-split with the GPT-4 (cl100k) regex, with two special tokens:

    id 0 `<|endoftext|>`  EOS, also used as padding; training separates documents with it
    id 1 `<|bos|>`        optional beginning of sequence; never added automatically

Nothing is added automatically on encode (no BOS/EOS post-processor): data pipelines append the
ids themselves. `split_special_tokens=True` is saved in the config so that a literal
"<|endoftext|>" inside source code (transformers' own code has several) encodes as text, not as
the EOS id; and `clean_up_tokenization_spaces=False` keeps `decode(encode(text)) == text`.

Why 8192 by default: the embedded demo pair must stay under ~60 MB. The vocabulary costs V*D
parameters per embedding or head matrix; at D=512 a 8192 vocabulary is 4.2 M parameters (8.4 MB in
bf16) per matrix, a 32k vocabulary would be 16.8 M (34 MB) -- more than half the budget before a
single layer. A small vocabulary also keeps the draft's LM head cheap. The price is more tokens
per byte (see the compression numbers written to training_info.json), which for a long-context
demo is welcome: the held-out repositories give longer prompts in tokens.

Usage:
    python scripts/train_tokenizer.py                       # data/corpus/train -> longspec_jax/demo/tokenizer
    python scripts/train_tokenizer.py --vocab-size 16384 --out /tmp/tok16k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO_ROOT, "data", "corpus")
DEFAULT_OUT = os.path.join(REPO_ROOT, "longspec_jax", "demo", "tokenizer")
DEFAULT_MANIFEST = os.path.join(REPO_ROOT, "data", "corpus_manifest.json")

EOS = "<|endoftext|>"
BOS = "<|bos|>"
SPECIAL_TOKENS = (EOS, BOS)  # ids 0 and 1, in this order
# GPT-4 (cl100k) pre-tokenization: letters with one leading non-letter, digits in groups of <= 3,
# punctuation runs, newlines, and whitespace runs that leave the last space to the next word.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHUNK_CHARS = 1 << 20
LONG_DOC_TOKENS = 16384


class TokenizerError(RuntimeError):
    """A refusal the user can act on."""


def iter_documents(corpus_dir: str, split: str) -> Iterator[tuple[str, str]]:
    """(name, text) of every document of a split, from <split>/*.txt or else <split>.jsonl, sorted."""
    d = os.path.join(corpus_dir, split)
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith(".txt"):
                with open(os.path.join(d, f), encoding="utf-8", newline="") as fh:
                    yield f[:-4], fh.read()
        return
    path = os.path.join(corpus_dir, split + ".jsonl")
    if not os.path.exists(path):
        raise TokenizerError(f"no {d}/ or {path}; build the corpus first: python scripts/collect_corpus.py collect")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            yield rec.get("name", "?"), rec["text"]


def iter_chunks(corpus_dir: str, split: str, max_bytes: int | None) -> Iterator[str]:
    """Documents cut at line boundaries into ~1 MB pieces (BPE statistics do not cross words)."""
    seen = 0
    for _, text in iter_documents(corpus_dir, split):
        start = 0
        while start < len(text):
            end = text.find("\n", start + CHUNK_CHARS)
            end = len(text) if end < 0 else end + 1
            piece = text[start:end]
            start = end
            if max_bytes is not None and seen + len(piece) > max_bytes:
                return
            seen += len(piece)
            yield piece


def build_tokenizer(vocab_size: int, min_frequency: int, chunks: Iterator[str]):
    """Train a byte-level BPE `tokenizers.Tokenizer` on an iterator of strings."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = bos_post_processor()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(chunks, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise TokenizerError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def bos_post_processor():
    """Byte-level offsets, and BOS before every encoded text (add_special_tokens=True), as the
    models are trained (train.data adds BOS explicitly) and as Llama tokenizers behave."""
    from tokenizers import processors

    return processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]),
    ])


def save_hf(tok, out_dir: str) -> None:
    """Save in Hugging Face format so `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=BOS,
        clean_up_tokenization_spaces=False, split_special_tokens=True)
    hf.save_pretrained(out_dir)
    # transformers 5 names its own class here; "PreTrainedTokenizerFast" loads in 4.x and 5.x.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    # transformers 5 no longer writes this file; 4.x readers and other tools still look for it.
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, f, indent=2)
        f.write("\n")


def evaluate(out_dir: str, corpus_dir: str) -> dict:
    """Compression on the held-out split, through the saved files (what users will load)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out_dir)
    per_doc, n_bytes, n_tokens = {}, 0, 0
    for name, text in iter_documents(corpus_dir, "heldout"):
        ids = hf(text, add_special_tokens=False)["input_ids"]
        if hf.decode(ids) != text:
            raise TokenizerError(f"held-out document {name} does not round-trip through {out_dir}")
        b = len(text.encode("utf-8"))
        per_doc[name] = {"bytes": b, "tokens": len(ids), "bytes_per_token": round(b / len(ids), 3)}
        n_bytes += b
        n_tokens += len(ids)
    if not per_doc:
        raise TokenizerError(f"no held-out documents under {corpus_dir}")
    return {
        "heldout_documents": len(per_doc),
        "heldout_bytes": n_bytes,
        "heldout_tokens": n_tokens,
        "heldout_bytes_per_token": round(n_bytes / n_tokens, 3),
        f"heldout_documents_ge_{LONG_DOC_TOKENS}_tokens": sum(d["tokens"] >= LONG_DOC_TOKENS for d in per_doc.values()),
        "per_document": per_doc,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="corpus dir with train/ (or train.jsonl) and heldout/")
    p.add_argument("--out", default=DEFAULT_OUT, help="output dir (default longspec_jax/demo/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary incl. 256 bytes and 2 specials")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-train-bytes", type=int, help="train on a prefix of the split (for quick trials)")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST, help="corpus manifest, hashed into training_info.json")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out compression report")
    a = p.parse_args(argv)
    if a.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        print(f"error: --vocab-size {a.vocab_size} is below the 256 byte tokens + specials", file=sys.stderr)
        return 2

    tmp = a.out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.time()
        n_chars = [0]

        def counted():
            for c in iter_chunks(a.corpus, "train", a.max_train_bytes):
                n_chars[0] += len(c)
                yield c

        tok = build_tokenizer(a.vocab_size, a.min_frequency, counted())
        train_s = time.time() - t0
        save_hf(tok, tmp)
        info = {
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
            "min_frequency": a.min_frequency,
            "split_pattern": SPLIT_PATTERN,
            "train_chars": n_chars[0],
            "train_seconds": round(train_s, 1),
        }
        if os.path.exists(a.manifest):
            with open(a.manifest, "rb") as f:
                info["corpus_manifest_sha256"] = hashlib.sha256(f.read()).hexdigest()
        if not a.no_eval:
            info.update(evaluate(tmp, a.corpus))
    except TokenizerError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(tmp, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(json.dumps({k: v for k, v in info.items() if k != "per_document"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
