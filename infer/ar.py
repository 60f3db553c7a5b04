"""Autoregressive (one token per target forward) decoding: the baseline LongSpec is measured against.

This is "Vanilla FA" of the LongSpec paper (spec section 3.6), written to be as fast as plain
decoding can be in JAX, so speculative speedups are measured against an honest baseline:

* Prefill: the prompt is right-padded to a length bucket (powers of two up to `prefill_chunk`,
  then multiples of it) and run in chunks of at most `prefill_chunk` tokens, so attention scores
  are at most `[chunk, S]` at once, never `[P, P]` for the whole prompt. Padding cannot change the
  result: pad tokens sit after the real ones (the causal mask hides them from real tokens) and the
  committed `lengths` stop at the real prompt, so their K/V slots are never read and get
  overwritten by decoding. Only the last real token's hidden state goes through the LM head.
* Decode: one jit-compiled `lax.while_loop` (state: `infer.state.ARState`) runs to
  `max_new_tokens` or until every row has produced one of the EOS ids. Each step runs the model on
  one token per row, the LM head on that token only, and samples with `longspec_jax.sampling` (the
  same functions the lossless verifier uses), the PRNG key travelling in the loop state. There is
  no host round trip per token; the call runs under `jax.transfer_guard("disallow")`.
* Compilation: the model is split once per call (`nnx.split`), `(graphdef, state)` enter each
  jitted function and are merged inside. Executables are compiled ahead of time (so compile time
  is reported apart from run time) and cached by every static shape: batch, prompt bucket, chunk,
  cache capacity bucket, output bucket, sampling settings and EOS ids. Two prompts in one bucket,
  or two `max_new_tokens` in one output bucket, reuse the same executables. The cache and loop
  state are donated, so XLA updates the KV buffers in place.
* Streaming: the same compiled loop is called in slices (the step limit is a run-time argument),
  and each slice's tokens are copied out while the next slice runs; slices grow to about
  `stream_interval_s` seconds so the per-slice cost stays negligible (measurements beside
  `STREAMING_NOTE`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from infer.state import ARState, step_key
from longspec_jax import sharding as shd
from longspec_jax.kv_cache import KVCache
from longspec_jax.sampling import SamplingParams, sample

__all__ = ["ARResult", "ARTimings", "generate_ar", "prompt_bucket", "capacity_bucket", "output_bucket",
           "TRACE_COUNTS", "COMPILE_COUNTS", "clear_compiled", "DEFAULT_PREFILL_CHUNK", "STREAMING_NOTE"]

DEFAULT_PREFILL_CHUNK = 512
MIN_BUCKET = 16

# Streaming has a fixed host cost per slice (executable launch, snapshot copy, Python): +4% to +23%
# ms/token on a CPU with adaptive slices, +103% with fixed 8-token slices (docs/perf_notes.md,
# "Streaming cost"). So it is OFF by default in `python -m infer.generate` (`--stream` turns it on);
# if `python -m bench.bench_ar --stream-every 8` shows ~0% on a GPU, flip STREAM_BY_DEFAULT.
STREAMING_NOTE = (
    "streaming: first slice of `stream_every` tokens, then slices of ~`stream_interval_s` seconds; "
    "measured on a loaded 2-core CPU with the tiny model: +4% to +23% ms/token (fixed 8-token "
    "slices: +103%), so it is opt-in (--stream)"
)

# Python-side counters, incremented when a function is traced / an executable compiled. Tests use
# them to check that generation compiles once per shape bucket.
TRACE_COUNTS: Counter = Counter()
COMPILE_COUNTS: Counter = Counter()
_EXECUTABLES: dict = {}


def clear_compiled() -> None:
    """Forget every cached executable (tests; freeing device memory held by executables)."""
    _EXECUTABLES.clear()


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
# Results


@dataclasses.dataclass(frozen=True)
class ARTimings:
    """Wall-clock timings of one `generate_ar` call, each taken after `block_until_ready`.

    Attributes:
      compile_s: lowering + compiling executables that were not cached yet (0 on a cache hit).
      prefill_s: prompt forward (all chunks) plus sampling the first new token.
      decode_s: the decode loop, i.e. every new token after the first.
      prefill_tokens: real (unpadded) prompt tokens over all rows.
      decode_tokens: tokens produced by the decode loop over all rows (EOS included, pad excluded).
      decode_steps: loop iterations (target forwards of one token per row).
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
class ARResult:
    """Output of `generate_ar`.

    Attributes:
      tokens: [B, max_new_tokens] int32 new tokens; entries at or after `num_tokens[b]` are
        `pad_id`.
      num_tokens: [B] int32 new tokens per row, EOS included.
      stopped_on_eos: [B] bool, the row ended with one of the EOS ids.
      prompt_lengths: [B] int32.
      timings: see `ARTimings`.
      shapes: the static shapes used (padded prompt, chunk, cache capacity, output buffer).
    """

    tokens: np.ndarray
    num_tokens: np.ndarray
    stopped_on_eos: np.ndarray
    prompt_lengths: np.ndarray
    timings: ARTimings
    shapes: dict

    def sequences(self) -> list[list[int]]:
        """New tokens of each row without padding."""
        return [self.tokens[b, : self.num_tokens[b]].tolist() for b in range(self.tokens.shape[0])]


# --------------------------------------------------------------------------------------------
# Jitted pieces (graphdef is static and hashable; the cache / loop state are donated)


def _prefill_chunk(graphdef, params, cache, tokens, start, last_index, hidden_last):
    """Run one prompt chunk; keep the hidden state of each row's last real prompt token.

    Args: cache (donated); tokens [B, C] int32; start [] int32 (slot / position of tokens[:, 0]);
    last_index [B] int32 (position of the last real prompt token); hidden_last [B, D] float32
    (donated; carried between chunks).
    """
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, params)
    B, C = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
    h, cache = model(tokens, positions, cache, jnp.full((B,), start, jnp.int32))  # h [B, C, D]
    idx = last_index - start
    sel = jnp.take_along_axis(h, jnp.clip(idx, 0, C - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    in_chunk = (idx >= 0) & (idx < C)
    return cache, jnp.where(in_chunk[:, None], sel.astype(hidden_last.dtype), hidden_last)


def _is_eos(tokens, eos_ids):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)


def _start(graphdef, params, cache, hidden_last, prompt_lengths, key, *, sampling, eos_ids, out_len, pad_id):
    """Sample the first new token from the prefill's last hidden state; build the loop state."""
    TRACE_COUNTS["start"] += 1
    model = nnx.merge(graphdef, params)
    B = hidden_last.shape[0]
    logits = model.logits(hidden_last[:, None, :])[:, 0]  # [B, V] float32, LM head on one row each
    first = sample(step_key(key, 0), logits, sampling)
    return ARState(
        tokens=jnp.full((B, out_len), pad_id, jnp.int32).at[:, 0].set(first),
        num_tokens=jnp.ones((B,), jnp.int32),
        step=jnp.int32(1),
        limit=jnp.int32(1),
        last_token=first,
        lengths=prompt_lengths.astype(jnp.int32),
        done=_is_eos(first, eos_ids),
        key=key,
        cache=cache,
    )


def _decode(graphdef, params, state: ARState, limit, *, sampling, eos_ids, pad_id) -> ARState:
    """The decode loop: up to `limit` total new tokens (a run-time value <= N_out)."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, params)
    state = state.replace(limit=jnp.minimum(limit, state.tokens.shape[1]).astype(jnp.int32))

    def cond(s: ARState):
        # Stop when the requested number of tokens exists (max_new_tokens, or the end of a
        # streaming slice), or when every row has produced an EOS id.
        return (s.step < s.limit) & ~jnp.all(s.done)

    def body(s: ARState) -> ARState:
        active = ~s.done
        h, cache = model(s.last_token[:, None], s.lengths[:, None], s.cache, s.lengths)  # h [B, 1, D]
        logits = model.logits(h)[:, 0]  # [B, V]
        tok = jnp.where(active, sample(step_key(s.key, s.step), logits, sampling), pad_id)
        return s.replace(
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (jnp.int32(0), s.step)),
            num_tokens=s.num_tokens + active,
            step=s.step + 1,
            last_token=tok,
            # last_token is now in the cache; a finished row stays put so its junk writes stay in bounds.
            lengths=s.lengths + active,
            done=s.done | (active & _is_eos(tok, eos_ids)),
            cache=cache,
        )

    return jax.lax.while_loop(cond, body, state)


def _snapshot(state: ARState):
    """Copies of what streaming reads, so the loop state itself can be donated to the next slice."""
    return state.tokens + 0, state.num_tokens + 0, state.done | False


_prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnums=0, donate_argnums=(2, 6))
_start_jit = jax.jit(_start, static_argnums=0, static_argnames=("sampling", "eos_ids", "out_len", "pad_id"),
                     donate_argnums=(2,))
_decode_jit = jax.jit(_decode, static_argnums=0, static_argnames=("sampling", "eos_ids", "pad_id"),
                      donate_argnums=(2,))
_snapshot_jit = jax.jit(_snapshot)


def _spec(tree):
    """Hashable abstract signature of a pytree: structure plus (shape, dtype, sharding) per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


class _Compiler:
    """Ahead-of-time compile with a cache keyed by static shapes; accumulates compile seconds."""

    def __init__(self):
        self.seconds = 0.0

    def get(self, name, jitted, graphdef, args, statics: dict):
        """The executable of `jitted(graphdef, *args, **statics)` (graphdef None: no model)."""
        key = (name, graphdef, _spec(args), tuple(sorted(statics.items())))
        exe = _EXECUTABLES.get(key)
        if exe is None:
            t0 = time.perf_counter()
            lower_args = args if graphdef is None else (graphdef, *args)
            exe = jitted.lower(*lower_args, **statics).compile()
            self.seconds += time.perf_counter() - t0
            COMPILE_COUNTS[name] += 1
            _EXECUTABLES[key] = exe
        return exe


# --------------------------------------------------------------------------------------------
# Public entry point


def _as_rows(prompt_ids) -> list[np.ndarray]:
    if isinstance(prompt_ids, np.ndarray) or isinstance(prompt_ids, jax.Array):
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


def generate_ar(
    model,
    prompt_ids,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    cache_capacity: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    cache_dtype=None,
    cache_sharding=None,
    mesh=None,
    pad_id: int | None = None,
    stream_callback: Callable[[np.ndarray, np.ndarray], None] | None = None,
    stream_every: int = 8,
    stream_interval_s: float = 0.25,
) -> ARResult:
    """Generate up to `max_new_tokens` tokens per row with the target model alone.

    Args:
      model: a `longspec_jax.transformer.Transformer` (any NNX module with the DESIGN.md
        `__call__(tokens, positions, cache, lengths)` and `logits(h)` contract, and a `cfg`).
      prompt_ids: token ids: one sequence `[P]`, a list of B sequences (lengths may differ), or a
        `[B, P]` array.
      max_new_tokens: new tokens per row (>= 1), EOS included; rows stop early at an EOS id.
      sampling: temperature / top-k / top-p (`SamplingParams()` = greedy).
      eos_ids: every token id that ends a row (several allowed; empty = never stop early).
      seed: PRNG seed for sampling (the same seed and inputs give the same tokens).
      cache_capacity: KV slots per row. Default: `capacity_bucket(longest prompt +
        max_new_tokens)`. It is raised, if needed, to the padded prompt length so the last prefill
        chunk fits.
      prefill_chunk: maximum prompt tokens per prefill forward (bounds attention memory).
      cache_dtype: KV cache dtype; default the model's compute dtype.
      cache_sharding: optional sharding of every cache buffer (`sharding.cache_sharding(mesh)`).
      mesh: optional `jax.sharding.Mesh` (e.g. `sharding.tensor_parallel_mesh(n)`): a copy of the
        model's parameters is placed on it by the logical-axis rules (heads and MLP split over
        "tensor"), the cache is sharded over kv heads (unless `cache_sharding` is given), the small
        inputs are replicated on it, and every executable runs SPMD over its devices.
      pad_id: value of output entries after a row's end; default the first EOS id, else 0.
      stream_callback: if given, called as `callback(tokens [B, n], num_tokens [B])` (numpy) with
        every token produced so far: after the first token, then after each slice of the loop.
      stream_every: steps in the first streaming slice, and the minimum per slice.
      stream_interval_s: later slices grow to about this many seconds of decoding, which keeps
        the per-slice cost negligible; 0 keeps every slice at `stream_every` steps.

    Returns:
      An `ARResult` (tokens, counts, timings).

    Raises:
      ValueError: empty prompt, `max_new_tokens < 1`, token ids outside the vocabulary, or a
        prompt (plus new tokens) that does not fit in `cache_capacity`.
    """
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if stream_callback is not None and stream_every < 1:
        raise ValueError(f"stream_every must be >= 1, got {stream_every}")
    rows = _as_rows(prompt_ids)
    if not rows:
        raise ValueError("prompt_ids is empty; pass at least one prompt of at least one token")
    for b, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"prompt row {b} is empty; every prompt needs at least one token "
                             "(e.g. the BOS token)")
        if r.min() < 0 or r.max() >= cfg.vocab_size:
            raise ValueError(f"prompt row {b} has token ids outside [0, {cfg.vocab_size}) "
                             f"(min {r.min()}, max {r.max()}); was it tokenized for another model?")
    eos_ids = tuple(int(e) for e in eos_ids)
    pad_id = int(pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0))
    B = len(rows)
    lens = np.array([r.size for r in rows], np.int32)
    longest = int(lens.max())
    needed = longest + max_new_tokens
    if cache_capacity is not None and needed > cache_capacity:
        raise ValueError(
            f"the prompt ({longest} tokens) plus --max-new-tokens ({max_new_tokens}) needs {needed} KV "
            f"cache slots but --cache-capacity is {cache_capacity}; raise --cache-capacity to at least "
            f"{needed} or lower --max-new-tokens")
    padded, chunk = prompt_bucket(longest, prefill_chunk)
    capacity = max(cache_capacity if cache_capacity is not None else capacity_bucket(needed), padded)
    out_len = output_bucket(max_new_tokens)

    rep = None  # where small inputs go: the default device, or replicated over the mesh
    if mesh is not None:
        model = shd.place_for_inference(model, mesh)
        rep = NamedSharding(mesh, PartitionSpec())
        if cache_sharding is None:
            cache_sharding = shd.cache_sharding(mesh, shape=(B, capacity, cfg.num_kv_heads, cfg.head_dim))
    graphdef, params = nnx.split(model)
    dtype = cache_dtype if cache_dtype is not None else getattr(model, "dtype", jnp.float32)
    compiler = _Compiler()

    tokens = np.zeros((B, padded), np.int32)  # right padding (id 0): hidden by the causal mask
    for b, r in enumerate(rows):
        tokens[b, : r.size] = r
    cache = KVCache.init(cfg, B, capacity, dtype, sharding=cache_sharding)
    hidden_last = jnp.zeros((B, cfg.hidden_size), jnp.float32)
    chunks = [jax.device_put(tokens[:, s:s + chunk], rep) for s in range(0, padded, chunk)]
    starts = [jax.device_put(np.int32(s), rep) for s in range(0, padded, chunk)]
    last_index = jax.device_put(lens - 1, rep)
    dev_lens = jax.device_put(lens, rep)
    key = jax.random.key(seed)
    if mesh is not None:
        hidden_last, key = jax.device_put((hidden_last, key), rep)
    start_statics = dict(sampling=sampling, eos_ids=eos_ids, out_len=out_len, pad_id=pad_id)

    # Compile before timing anything (the arrays only provide abstract shapes here).
    chunk_exe = compiler.get("prefill", _prefill_chunk_jit, graphdef,
                             (params, cache, chunks[0], starts[0], last_index, hidden_last), {})
    start_exe = compiler.get("start", _start_jit, graphdef, (params, cache, hidden_last, dev_lens, key), start_statics)

    t0 = time.perf_counter()
    for chunk_tokens, start in zip(chunks, starts):
        cache, hidden_last = chunk_exe(params, cache, chunk_tokens, start, last_index, hidden_last)
    state = start_exe(params, cache, hidden_last, dev_lens, key)
    jax.block_until_ready(state)
    prefill_s = time.perf_counter() - t0

    decode_statics = dict(sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)
    limit_full = jax.device_put(np.int32(max_new_tokens), rep)
    decode_exe = compiler.get("decode", _decode_jit, graphdef, (params, state, limit_full), decode_statics)
    if stream_callback is not None:
        snapshot_exe = compiler.get("snapshot", _snapshot_jit, None, (state,), {})
        first = jax.device_get(snapshot_exe(state))
        stream_callback(first[0][:, :1], first[1])

    t0 = time.perf_counter()
    # No implicit host <-> device transfer may happen while decoding: everything the loop needs is
    # already on the device, so a per-token round trip would be a bug.
    with jax.transfer_guard("disallow"):
        if stream_callback is None:
            state = decode_exe(params, state, limit_full)
        else:
            state = _decode_streaming(decode_exe, snapshot_exe, params, state, max_new_tokens, stream_callback,
                                      stream_every, stream_interval_s, rep)
        jax.block_until_ready(state)
    decode_s = time.perf_counter() - t0

    out_tokens, num_tokens, done, step = jax.device_get((state.tokens, state.num_tokens, state.done, state.step))
    num_tokens = np.asarray(num_tokens)
    timings = ARTimings(
        compile_s=compiler.seconds, prefill_s=prefill_s, decode_s=decode_s,
        prefill_tokens=int(lens.sum()), decode_tokens=int((num_tokens - 1).sum()),
        decode_steps=int(step) - 1)
    return ARResult(
        tokens=np.asarray(out_tokens)[:, :max_new_tokens], num_tokens=num_tokens,
        stopped_on_eos=np.asarray(done), prompt_lengths=lens, timings=timings,
        shapes=dict(batch=B, padded_prompt=padded, prefill_chunk=chunk, cache_capacity=capacity,
                    output_buffer=out_len))


def _decode_streaming(decode_exe, snapshot_exe, params, state, max_new_tokens, callback, every, interval_s,
                      rep=None):
    """Run the decode loop in slices, handing each slice's tokens to `callback`.

    Slice i+1 is dispatched before slice i's tokens are read (from a copy, since the state itself
    is donated to the next slice), so the device stays busy while the host decodes text. Each slice
    costs one executable launch and one small device-to-host copy; with `interval_s > 0` the slice
    length grows to about `interval_s` seconds of decoding so that this fixed cost stays negligible
    (measured in bench/bench_ar.py; see STREAMING_NOTE).
    """
    limit, shown, pending = 1, 1, None
    t_prev, steps_prev = time.perf_counter(), 1
    while limit < max_new_tokens:
        limit = min(limit + every, max_new_tokens)
        state = decode_exe(params, state, jax.device_put(np.int32(limit), rep))  # explicit put: allowed by the guard
        if pending is not None:
            shown, all_done = _emit(callback, pending, shown)
            if all_done:
                return state
            if interval_s > 0:  # seconds per step so far, over the slice just read
                now = time.perf_counter()
                per_step = (now - t_prev) / max(shown - steps_prev, 1)
                t_prev, steps_prev = now, shown
                every = max(every, int(interval_s / max(per_step, 1e-6)))
        pending = snapshot_exe(state)
    if pending is not None:
        _emit(callback, pending, shown)
    return state


def _emit(callback, pending, shown: int) -> tuple[int, bool]:
    """Fetch a snapshot and pass it on if it holds new tokens; returns (tokens shown, all rows done)."""
    tokens, num, done = jax.device_get(pending)
    n = int(np.max(num))
    if n > shown:
        with jax.transfer_guard("allow"):  # the user's callback is not part of the decode loop
            callback(np.asarray(tokens)[:, :n], np.asarray(num))
    return max(n, shown), bool(np.all(done))
