"""Host-side machinery every decoder shares: shape buckets, ahead-of-time compilation, prompt
checks, the chunked prefill, and one result type.

* Buckets: prompts are right-padded to a length bucket (powers of two up to the prefill chunk,
  then multiples of it), caches to a capacity bucket, outputs to an output bucket, so a few shapes
  compile and two prompts of one bucket reuse the same executables.
* `Compiler`: lowers and compiles executables ahead of time, cached by every static shape, so
  compile time is reported apart from run time. One process-wide instance is the default
  (`default_compiler()`); pass your own to count or isolate compilations.
* Prefill: the prompt runs in chunks of at most `chunk` tokens, so attention scores are at most
  `[chunk, S]`, never `[P, P]`. Padding cannot change the result: pad tokens sit after the real ones
  (the causal mask hides them from real tokens) and the committed lengths stop at the real prompt,
  so their K/V slots are never read and get overwritten by decoding. Only the last real token's
  hidden state is kept (its LM head runs in `DecodeLoop.first_state`).
* `GenerationResult` and `Timings`: one definition of every rate. Decode tokens are the tokens the
  decode loop emitted: every emitted token after each row's first, which the prefill produced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CPU_PREFILL_CHUNK, GPU_PREFILL_CHUNK = 512, 2048
MIN_BUCKET = 16
TAIL_MIN = 64  # the narrowest last chunk of a serving prefill (`tail_bucket`)
COMPILE_CACHE_ENV = "LONGSPEC_COMPILE_CACHE"


def default_prefill_chunk(platform: str | None = None) -> int:
    """Prompt tokens per prefill forward by default: 2048 on a GPU, where a chunk's attention runs on
    cuDNN and wider chunks come nearer the compute floor (`docs/perf_notes.md` "Prefill chunk
    width"), 512 elsewhere."""
    platform = platform or jax.devices()[0].platform
    return GPU_PREFILL_CHUNK if platform == "gpu" else CPU_PREFILL_CHUNK


# --------------------------------------------------------------------------------------------
# Shape buckets


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prompt_bucket(length: int, chunk: int) -> tuple[int, int]:
    """(padded prompt length, chunk size) for a prompt of `length` tokens.

    Up to `chunk` tokens: one chunk of the next power of two (at least 16, at most `chunk`).
    Longer: a multiple of `chunk`, run as `padded / chunk` chunks of `chunk` tokens, so every long
    prompt uses the same compiled chunk function.
    """
    if length <= chunk:
        padded = min(max(_next_pow2(length), min(MIN_BUCKET, chunk)), chunk)
        return padded, padded
    return -(-length // chunk) * chunk, chunk


def tail_bucket(n: int, chunk: int) -> int:
    """Width of the last prefill chunk of a suffix whose last chunk holds `n` (1..chunk) tokens: the
    next power of two, at least `TAIL_MIN`, at most `chunk` (few executables; a short suffix, such
    as a reused turn's new tokens, costs a short forward)."""
    return min(chunk, max(TAIL_MIN, _next_pow2(n)))


def output_bucket(max_new_tokens: int) -> int:
    """Size of the output token buffer: next power of two >= max_new_tokens (at least 16)."""
    return max(_next_pow2(max_new_tokens), MIN_BUCKET)


def capacity_bucket(needed: int) -> int:
    """Default KV capacity for `needed` slots: powers of two up to 128, then steps of a quarter
    octave rounded to multiples of 128 (256, 384, 512, 640, ..., 1280, 1536, ...), so capacity wastes
    < 25% (plus < 128 slots), few shapes compile, and the Pallas prefix kernel (128-slot blocks)
    can read every cache."""
    if needed <= 128:
        return max(_next_pow2(needed), MIN_BUCKET)
    octave = _next_pow2(needed) // 2  # needed in (octave, 2 * octave]
    step = max(octave // 4, 128)
    return -(-needed // step) * step


# --------------------------------------------------------------------------------------------
# Compilation


def _spec(tree):
    """Hashable abstract signature of a pytree: structure plus (shape, dtype, sharding) per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


class Compiler:
    """Ahead-of-time compilation with a cache keyed by every static input.

    Attributes:
      seconds: compile time spent by this instance since `reset_seconds` (cache hits cost 0).
      compiles: Counter of executables compiled, by name (tests check compile-once per bucket).
    """

    def __init__(self):
        self._executables: dict = {}
        self.seconds = 0.0
        self.compiles: Counter = Counter()

    def get(self, name: str, jitted, args: tuple, statics: dict):
        """The executable of `jitted(*args, **statics)`; `args` only provide abstract shapes."""
        return self.get_many({name: (name, jitted, args, statics)})[name]

    def get_many(self, jobs: dict, workers: int | None = None) -> dict:
        """`get` for several executables at once: `jobs` maps the caller's keys to (name, jitted, args,
        statics); returns the same keys to executables. Lowering traces Python, one job at a time on
        this thread (under its mesh); XLA's compile releases the GIL, so the compiles run on up to
        `workers` threads (default: one per core). What that saves depends on how well XLA already
        spreads one compile over cores: nothing for the demo pair on an H100, about half of the
        serving engine's startup compile at Llama-3-8B shapes (docs/perf_notes.md, "Startup compile")."""
        keys = {k: (name, _spec(args), tuple(sorted(statics.items(), key=lambda kv: kv[0])))
                for k, (name, _, args, statics) in jobs.items()}
        t0, todo = time.perf_counter(), {}
        for k, (name, jitted, args, statics) in jobs.items():
            if keys[k] not in self._executables and keys[k] not in todo:
                todo[keys[k]] = jitted.lower(*args, **statics)
        if todo:
            with concurrent.futures.ThreadPoolExecutor(min(len(todo), workers or os.cpu_count() or 1),
                                                       thread_name_prefix="compile") as pool:
                done = dict(zip(todo, pool.map(lambda lowered: lowered.compile(), todo.values())))
            self.seconds += time.perf_counter() - t0
            for key, exe in done.items():
                self.compiles[key[0]] += 1
                self._executables[key] = exe
        return {k: self._executables[key] for k, key in keys.items()}

    def executables(self, name: str) -> list:
        """The compiled executables of one name (tests read their HLO)."""
        return [exe for key, exe in self._executables.items() if key[0] == name]

    def clear(self) -> None:
        """Forget every executable (frees the device memory they hold)."""
        self._executables.clear()


_DEFAULT_COMPILER = Compiler()


def default_compiler() -> Compiler:
    """The process-wide compiler that decoders use unless given their own."""
    return _DEFAULT_COMPILER


def enable_compile_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache, so a second launch reuses the first one's
    executables instead of recompiling (minutes for large models on a GPU).

    `path`: the cache directory; None reads `$LONGSPEC_COMPILE_CACHE`, else
    `~/.cache/longspec_jax/xla`; "none" (or an empty value) disables it. Returns the directory used,
    or None when disabled.
    """
    path = os.environ.get(COMPILE_CACHE_ENV) if path is None else path
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".cache", "longspec_jax", "xla")
    if not path or path.lower() == "none":
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every executable: the decode loop's are few and each costs seconds to build.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# --------------------------------------------------------------------------------------------
# Prompts


def as_rows(prompt_ids) -> list[np.ndarray]:
    """Token ids as a list of 1-D int64 rows: one sequence `[P]`, a list of B sequences (lengths may
    differ), or a `[B, P]` array."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompt_ids must be [P] or [B, P] token ids, got shape {arr.shape}")
        return [r.astype(np.int64) for r in arr]
    rows = list(prompt_ids)
    if rows and all(isinstance(t, (int, np.integer)) for t in rows):
        rows = [rows]
    return [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]


def check_prompts(rows: Sequence[np.ndarray], cfg, max_new_tokens: int) -> None:
    """Refuse what a decode cannot run: no prompt, an empty row, ids outside the vocabulary, a
    token budget < 1, or prompt + budget beyond the model's position limit."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}")
    if not rows:
        raise ValueError("prompt_ids is empty; pass at least one prompt of at least one token")
    limit = cfg.max_position_embeddings
    for b, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"prompt row {b} is empty; every prompt needs at least one token (e.g. the BOS token)")
        if r.min() < 0 or r.max() >= cfg.vocab_size:
            raise ValueError(f"prompt row {b} has token ids outside [0, {cfg.vocab_size}) (min {r.min()}, max "
                             f"{r.max()}); was it tokenized for another model?")
        if limit and r.size + max_new_tokens > limit:
            raise ValueError(
                f"prompt row {b} has {r.size} tokens; with max_new_tokens (--max-new-tokens) {max_new_tokens} it "
                f"needs {r.size + max_new_tokens} positions but the model's limit (max_position_embeddings) is "
                f"{limit}: shorten the prompt to at most {limit - max_new_tokens} tokens or lower max_new_tokens")


def padded_tokens(rows: Sequence[np.ndarray], padded: int) -> np.ndarray:
    """int32 [B, padded]: the rows right-padded with id 0 (hidden by the causal mask and lengths)."""
    tokens = np.zeros((len(rows), padded), np.int32)
    for b, r in enumerate(rows):
        tokens[b, :r.size] = r
    return tokens


def tail_tokens(rows: Sequence[np.ndarray], size: int) -> np.ndarray:
    """int32 [B, size]: the last `size` tokens of each row, left-padded with 0 (the draft ring's
    input; entries before a short prompt's start are ignored by position)."""
    tail = np.zeros((len(rows), size), np.int32)
    for b, r in enumerate(rows):
        n = min(size, r.size)
        tail[b, size - n:] = r[r.size - n:]
    return tail


# --------------------------------------------------------------------------------------------
# Chunked prefill


def _prefill_chunk(graphdef, params, cache, tokens, start, last_index, hidden_last):
    """Run one prompt chunk; keep the hidden state of each row's last real prompt token.

    Args: cache (donated); tokens [B, C] int32; start [] int32 (slot / position of tokens[:, 0]);
    last_index [B] int32 (position of the last real prompt token); hidden_last [B, D] float32
    (donated; carried between chunks).
    """
    model = nnx.merge(graphdef, params)
    B, C = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
    h, cache = model(tokens, positions, cache, jnp.full((B,), start, jnp.int32))  # h [B, C, D]
    idx = last_index - start
    sel = jnp.take_along_axis(h, jnp.clip(idx, 0, C - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    in_chunk = (idx >= 0) & (idx < C)
    return cache, jnp.where(in_chunk[:, None], sel.astype(hidden_last.dtype), hidden_last)


prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnums=0, donate_argnums=(2, 6))

ProgressFn = Callable[[int, int, float], None]  # (prompt tokens done, total, seconds so far)


def prefill(compiler: Compiler, graphdef, params, cache, tokens: np.ndarray, lengths: np.ndarray, chunk: int, *,
            hidden_size: int, start: int = 0, put=None, progress: ProgressFn | None = None):
    """Prefill `tokens` [B, P] (P a multiple of `chunk`) into `cache` from slot `start`.

    Returns (cache, hidden_last float32 [B, D]: the final hidden state at each row's last real token,
    position start + lengths - 1). `put` places host arrays (the default device, or replicated over a
    mesh). With `progress`, each chunk is waited for and reported (a small cost per chunk: the host
    cannot queue the next chunk before the previous one finishes).
    """
    put = put or jax.device_put
    B, P = tokens.shape
    hidden = put(np.zeros((B, hidden_size), np.float32))
    last_index = put((start + lengths - 1).astype(np.int32))
    chunks = [(put(tokens[:, s:s + chunk]), put(np.int32(start + s))) for s in range(0, P, chunk)]
    exe = compiler.get("prefill", prefill_chunk_jit, (graphdef, params, cache, chunks[0][0], chunks[0][1],
                                                      last_index, hidden), {})
    t0 = time.perf_counter()
    total = int(lengths.sum())
    for i, (chunk_tokens, chunk_start) in enumerate(chunks):
        cache, hidden = exe(params, cache, chunk_tokens, chunk_start, last_index, hidden)
        if progress is not None:
            jax.block_until_ready(hidden)
            done = int(np.minimum(lengths, (i + 1) * chunk).sum())
            progress(min(done, total), total, time.perf_counter() - t0)
    return cache, hidden


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one generate call, each taken after `block_until_ready`.

    Attributes:
      compile_s: lowering + compiling executables not cached yet (0 on a cache hit).
      prefill_s: prompt forward (all chunks), the first token's draw and the draft ring.
      decode_s: the decode loop.
      prefill_tokens: real (unpadded) prompt tokens over all rows.
      decode_tokens: tokens the decode loop emitted over all rows (each row's first token, which
        the prefill produced, excluded; stop ids included).
      decode_steps: decode steps: iterations of the loop (all rows step together), i.e. target
        forwards after the prefill of the longest-running row.
    """

    compile_s: float
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


@dataclasses.dataclass(frozen=True)
class SpecStats:
    """Acceptance statistics of a speculative generate call (all rows).

    Attributes:
      tau: emitted tokens / target forwards, the prefill's forward and token included (the paper's
        (sum count + sum num) / sum num; 1.0 for autoregressive decoding).
      tau_per_row: the same per row.
      accept_hist: accept_hist[k] = steps that accepted exactly k draft tokens.
      accepted_by_depth: accepted_by_depth[d - 1] = steps in which a draft at depth d was accepted.
      tree_shape: nodes per depth; ring_capacity: draft ring slots; draft_vocab_size: V' (or V).
    """

    tau: float
    tau_per_row: list
    accept_hist: list
    accepted_by_depth: list
    tree_shape: list
    ring_capacity: int
    draft_vocab_size: int


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Output of a generate call.

    Attributes:
      tokens: B lists of new token ids (prompt excluded), truncated right after a stop id and to
        max_new_tokens.
      stop_reason: B strings: "eos", "max_new_tokens" or "cache_full".
      timings: `Timings`.
      spec: `SpecStats` for tree decoding, None for autoregressive.
      shapes: the static shapes used (batch, padded prompt, chunk, cache capacity, output buffer).
    """

    tokens: list
    stop_reason: list
    timings: Timings
    spec: SpecStats | None
    shapes: dict
