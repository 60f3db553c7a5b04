"""Generate for a batch of prompts, autoregressively or with the LongSpec draft: the host driver of
`longspec_jax/infer/loop.py` (prefill, first token, then one jitted loop of decode steps to the end).

    decoder = Decoder(target, draft)                      # draft=None: autoregressive
    result = decoder.generate(prompt_ids, max_new_tokens=256)
    result.tokens[0], result.timings.decode_tokens_per_s, result.spec.tau

The serving engine (`longspec_jax/infer/engine.py`) runs the same `DecodeLoop` step over its slots; this driver
is the one-shot case (every row starts together, the loop runs until every row is done).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels
from longspec_jax.infer import defaults, runtime
from longspec_jax.infer.loop import MAX_ITERS, VERIFICATION, DecodeLoop, run_jit, start_jit
from longspec_jax.infer.state import STOP_NAMES, DecodeState, eos_array
from longspec_jax import kv_cache as kvc
from longspec_jax import draft_vocab as dv
from longspec_jax import sharding as shd
from longspec_jax.draft import Draft, ring_capacity
from longspec_jax.draft_vocab import head_columns
from longspec_jax.sampling import RowSampling, SamplingParams
from longspec_jax.transformer import fuse_projections
from longspec_jax.tree import TreeShape

StreamFn = Callable[[np.ndarray, np.ndarray], None]  # (tokens [B, n], emitted per row [B])


class Decoder:
    """Split the models once, reuse compiled executables across `generate` calls.

    The models are fused in place for inference (`transformer.fuse_projections`: one matmul for
    q|k|v and one for gate|up per layer); they compute the same function, but their parameters take
    the fused layout, which `unfuse_projections` undoes (e.g. before `weights.save_target`). With a
    `mesh`, the placed copies are fused and the models passed in are left as they are.

    Args:
      target: `Transformer` (the verifier; its embedding and LM head are shared with the draft).
      draft: `Draft` matching the target, or None for autoregressive decoding.
      tree_shape: nodes per depth, e.g. (4, 16, 16, 16, 16); (1, 1, 1, 1) is a chain. None (the
        default): chosen per call by `defaults.tree_for_context` (context length, device, temperature,
        target size). Needs a draft.
      draft_vocab: None, or int32 ids [V'] the draft scores (its LM head cost shrinks by V / V');
        lossless: verification uses the full vocabulary.
      sample_drafts: at temperature > 0 every node's children are drawn from the draft distribution
        (`DecodeLoop(draft_sampling="sampled")`) and verified by rejection sampling; False keeps
        the beam search's drafts and sample-and-match acceptance. Both are exact.
      verification: with sampled drafts, "block" (whole-path; accepts at least as much) or "token".
      cache_dtype: KV cache and draft ring dtype (default: the target's compute dtype).
      prefill_chunk: most prompt tokens per prefill forward (bounds attention memory; default
        `runtime.default_prefill_chunk()`: 2048 on a GPU, 512 elsewhere).
      mesh: optional `jax.sharding.Mesh` (`sharding.tensor_parallel_mesh(n)`): copies of the models
        are placed on it by the logical-axis rules, the cache is sharded over kv heads, small inputs
        are replicated and the executables run SPMD.
      compiler: a `runtime.Compiler` (default: the process-wide one).
    """

    def __init__(self, target, draft: Draft | None = None, *, tree_shape: Sequence[int] | str | TreeShape | None = None,
                 draft_vocab=None, sample_drafts: bool = True, verification: str = "block", cache_dtype=None,
                 prefill_chunk: int | None = None, mesh=None, compiler: runtime.Compiler | None = None):
        prefill_chunk = runtime.default_prefill_chunk() if prefill_chunk is None else prefill_chunk
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk (--prefill-chunk) must be >= 1, got {prefill_chunk}")
        if draft is None and (tree_shape is not None or draft_vocab is not None):
            raise ValueError("tree_shape and draft_vocab need a draft model; pass draft=...")
        self.target, self.draft = target, draft
        tcfg = target.cfg
        if draft is not None:
            draft.cfg.check_matches(tcfg)
        self.sample_drafts = bool(sample_drafts)
        if verification not in VERIFICATION:
            raise ValueError(f"verification must be one of {VERIFICATION}, got {verification!r}")
        self.verification = verification
        self.draft_vocab = None if draft_vocab is None else dv.validate(draft_vocab, tcfg.vocab_size)
        self.draft_vocab_size = tcfg.vocab_size if self.draft_vocab is None else self.draft_vocab.size
        self.shape = None if tree_shape is None else TreeShape.parse(tree_shape)
        if self.shape is not None:
            self.shape.check_vocab(self.draft_vocab_size)
        self.cache_dtype = cache_dtype if cache_dtype is not None else getattr(target, "dtype", jnp.float32)
        self.prefill_chunk = int(prefill_chunk)
        self.compiler = compiler or runtime.default_compiler()
        self.mesh, self._rep = mesh, None  # _rep: where small inputs go (None: the default device)
        if mesh is not None:
            target = self.target = shd.place_for_inference(target, mesh, what="target")
            if draft is not None:
                draft = self.draft = shd.place_for_inference(draft, mesh, what="draft")
            self._rep = NamedSharding(mesh, PartitionSpec())
        fuse_projections(target)  # after placement: each fused parameter takes its sharding on the mesh
        if draft is not None:
            fuse_projections(draft)
        self.platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        # Weights as plain nested dicts of arrays, which jitted calls flatten in C++; an nnx.State's
        # Variables flatten through Python (0.18 ms a call for an 8B target's 291 leaves on a CPU host).
        self.t_graph, self.t_state = _split(target)
        self.d_graph, self.d_state = _split(draft) if draft is not None else (None, None)
        self.target_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(target, nnx.Param)))
        # The Pallas prefix kernel reads the ring in 128-slot blocks; the XLA path takes any size, and
        # the smallest ring (window + G rounded to 8) keeps CPU runs and tests wrapping often.
        impl = None if draft is None else draft.attention_impl
        impl = pallas_kernels.default_implementation() if impl == "auto" else impl
        self.ring_multiple = 8 if impl == "xla" else 128
        # (ids [V'], head [D, V']): a run-time argument of the loop, gathered once here.
        self.vocab = None
        if self.draft_vocab is not None:
            self.vocab = (jnp.asarray(self.draft_vocab), head_columns(target, self.draft_vocab))
            if mesh is not None:
                self.vocab = jax.device_put(self.vocab, self._rep)

    # ---------------------------------------------------------------------------------------

    def put(self, x):
        """Host array -> the default device, or replicated over the mesh."""
        return jax.device_put(x, self._rep)

    def ring_slots(self, max_accept: int) -> int | None:
        """Draft ring slots for steps of up to `max_accept` tokens (None without a draft)."""
        return None if self.draft is None else ring_capacity(self.draft.cfg.window, max_accept, self.ring_multiple)

    def tree_shape_for(self, prompt_len: int, max_new_tokens: int, sampled: bool = False) -> TreeShape | None:
        """The fixed tree shape, the default for a decode up to prompt_len + max_new_tokens tokens
        (`sampled`: some row has temperature > 0), or None without a draft."""
        if self.draft is None:
            return None
        if self.shape is not None:
            return self.shape
        shape = defaults.tree_for_context(prompt_len + max_new_tokens, self.platform, 1.0 if sampled else 0.0,
                                          self.sample_drafts, target_bytes=self.target_bytes)
        shape.check_vocab(self.draft_vocab_size)
        return shape

    def loop_for(self, prompt_len: int, max_new_tokens: int, sampled: bool = False) -> DecodeLoop:
        """The `DecodeLoop` a `generate` call with these sizes runs."""
        shape = self.tree_shape_for(prompt_len, max_new_tokens, sampled)
        draft_sampling = "sampled" if shape is not None and self.sample_drafts and sampled else "beam"
        return DecodeLoop(shape, draft_sampling=draft_sampling, verification=self.verification)

    def mesh_context(self):
        """The ambient mesh for compiling and running (`jax.set_mesh`): the kernels and the embedding
        read it to split heads and vocabulary over the devices; a no-op without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def generate(self, prompt_ids, *, max_new_tokens: int, sampling: SamplingParams | Sequence[SamplingParams] = None,
                 eos_ids: Sequence[int] | None = None, seed: int | Sequence[int] = 0, cache_capacity: int | None = None,
                 stream_callback: StreamFn | None = None, stream_every: int = 8, stream_interval_s: float = 0.25,
                 progress: runtime.ProgressFn | None = None) -> runtime.GenerationResult:
        """Generate for one prompt or a batch.

        Args:
          prompt_ids: token ids: one sequence, a list of B sequences (lengths may differ), or [B, P].
          max_new_tokens: most tokens generated per row (>= 1), stop ids included.
          sampling: `SamplingParams` for every row, or one per row (default greedy).
          eos_ids: ids that end a row (default: the target config's eos_token_ids); () disables.
          seed: PRNG seed; row b draws with key `seed + b` (or `seed[b]`), so a row's tokens depend
            on its own prompt, settings and seed only.
          cache_capacity: target KV slots per row (default: `runtime.capacity_bucket` of prompt +
            max_new_tokens + one step's nodes). A smaller value is allowed: a row that cannot fit
            another step stops with stop_reason "cache_full" and a warning naming the capacity.
          stream_callback: if given, called as `callback(tokens [B, n], emitted [B])` (numpy) with every
            token emitted so far, after the first token and then after each slice of the loop; slices
            start at `stream_every` steps and grow to about `stream_interval_s` seconds each.
          progress: called as `progress(tokens done, total, seconds)` after each prefill chunk.
        """
        with self.mesh_context():  # the ambient mesh (tensor parallelism) for compiling and running
            cfg = self.target.cfg
            rows = runtime.as_rows(prompt_ids)
            runtime.check_prompts(rows, cfg, max_new_tokens)
            if stream_callback is not None and stream_every < 1:
                raise ValueError(f"stream_every must be >= 1, got {stream_every}")
            B = len(rows)
            row_sampling = RowSampling.rows(sampling or SamplingParams(), B)
            sampled = bool(np.any(row_sampling.temperature > 0))
            eos = tuple(int(e) for e in (cfg.eos_token_ids if eos_ids is None else eos_ids))
            seeds = [int(seed) + b for b in range(B)] if np.ndim(seed) == 0 else [int(s) for s in seed]
            if len(seeds) != B:
                raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
            lens = np.array([r.size for r in rows], np.int32)
            longest = int(lens.max())
            padded, chunk = runtime.prompt_bucket(longest, self.prefill_chunk)
            loop = self.loop_for(longest, max_new_tokens, sampled)
            needed = longest + max_new_tokens + loop.num_nodes
            capacity = cache_capacity if cache_capacity is not None else max(runtime.capacity_bucket(needed), padded)
            min_cap = max(padded, longest + loop.num_nodes)
            if capacity < min_cap:
                raise ValueError(
                    f"cache_capacity (--cache-capacity) {capacity} cannot hold the padded prompt ({padded} slots) and "
                    f"one step after the prompt ({longest} + {loop.num_nodes}); pass at least {min_cap} (at least "
                    f"{needed} to never stop early), or leave it unset.")
            out_size, G = runtime.output_bucket(max_new_tokens), loop.max_accept
            ring_slots = self.ring_slots(G)
            put = self.put
            cache_sharding = None if self.mesh is None else shd.cache_sharding(
                self.mesh, shape=(B, capacity, cfg.num_kv_heads, cfg.head_dim))
            cache = kvc.KVCache.init(cfg, B, capacity, self.cache_dtype, sharding=cache_sharding)
            compile_before = self.compiler.seconds
            graphs = dict(t_graph=self.t_graph, d_graph=self.d_graph)
            start_args = (self.t_state, self.d_state, cache, put(np.zeros((B, cfg.hidden_size), np.float32)),
                          put(runtime.tail_tokens(rows, ring_slots or 1)), put(lens),
                          put(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))), put(np.full(B, max_new_tokens,
                                                                                                 np.int32)),
                          put(np.tile(eos_array(eos), (B, 1))), jax.tree.map(put, row_sampling))
            start_exe = self.compiler.get("start", start_jit, start_args, dict(
                graphs, loop=loop, out_size=out_size, max_accept=G, ring_slots=ring_slots))
            # Compile the prefill too before the clock starts (the arrays only provide shapes).
            tokens = runtime.padded_tokens(rows, padded)

            compiled_before_prefill = self.compiler.seconds
            t0 = time.perf_counter()
            cache, hidden = runtime.prefill(self.compiler, self.t_graph, self.t_state, cache, tokens, lens, chunk,
                                            hidden_size=cfg.hidden_size, put=put, progress=progress)
            compiled_in_prefill = self.compiler.seconds - compiled_before_prefill
            state = start_exe(self.t_state, self.d_state, cache, hidden, *start_args[4:])
            jax.block_until_ready(state)
            prefill_s = time.perf_counter() - t0 - compiled_in_prefill

            run_args = (self.t_state, self.d_state, state, self.vocab, put(np.int32(MAX_ITERS)), put(np.bool_(False)))
            run_exe = self.compiler.get("run", run_jit, run_args, dict(graphs, loop=loop))
            t0 = time.perf_counter()
            # Everything the loop reads is on the device: a host round trip inside it would be a bug.
            with jax.transfer_guard("disallow"):
                if stream_callback is None:
                    state = run_exe(*run_args[:2], state, *run_args[3:])
                else:
                    state = self._run_streaming(run_exe, state, max_new_tokens, stream_callback, stream_every,
                                                stream_interval_s)
                jax.block_until_ready(state)
            decode_s = time.perf_counter() - t0
            return self._result(state, loop, lens, capacity, ring_slots, dict(
                compile_s=self.compiler.seconds - compile_before, prefill_s=prefill_s, decode_s=decode_s),
                shapes=dict(batch=B, padded_prompt=padded, prefill_chunk=chunk, cache_capacity=capacity,
                            output_buffer=out_size))

    # ---------------------------------------------------------------------------------------

    def _run_streaming(self, run_exe, state, max_new_tokens, callback, every, interval_s):
        """Run the loop in slices, handing each slice's tokens to `callback`.

        Slice i+1 is dispatched before slice i's tokens are read (from a copy, since the state itself
        is donated to the next slice), so the device stays busy while the host decodes text. Each
        slice costs one executable launch and one small device-to-host copy; with `interval_s > 0`
        slices grow to about `interval_s` seconds of decoding so that this fixed cost stays small.
        """
        snap = self.compiler.get("snapshot", _snapshot_jit, (state,), {})
        with jax.transfer_guard("allow"):
            first = jax.device_get(snap(state))
            callback(first[0][:, :1], np.minimum(first[1], 1))
        shown, pending = 1, None
        t_prev, shown_prev = time.perf_counter(), 1
        while True:
            state = run_exe(self.t_state, self.d_state, state, self.vocab, self.put(np.int32(every)),
                            self.put(np.bool_(False)))
            if pending is not None:
                shown, all_done = _emit(callback, pending, shown)
                if all_done:
                    return state
                if interval_s > 0:  # grow the slice to ~interval_s seconds at the rate seen so far
                    now = time.perf_counter()
                    per_token = (now - t_prev) / max(shown - shown_prev, 1)
                    t_prev, shown_prev = now, shown
                    every = max(every, int(interval_s / max(per_token, 1e-6)))
            pending = snap(state)
            if shown >= max_new_tokens:
                break
        _emit(callback, pending, shown)
        return state

    def _result(self, state: DecodeState, loop: DecodeLoop, lens, capacity, ring_slots, times, shapes):
        out, out_len, reasons, iters, hist = jax.device_get(
            (state.out, state.out_len, state.stop_reason, state.iters, state.accept_hist))
        B = out.shape[0]
        reasons = [STOP_NAMES[int(r)] for r in reasons]
        tokens = [out[b, :out_len[b]].tolist() for b in range(B)]
        for b, r in enumerate(reasons):
            if r == "cache_full":
                warnings.warn(f"row {b}: stopped after {out_len[b]} of {int(state.max_new[b])} tokens because the "
                              f"target KV cache ({capacity} slots) cannot hold another step of {loop.num_nodes} "
                              "nodes; pass a larger cache_capacity (or leave it unset for the safe default).",
                              stacklevel=3)
        timings = runtime.Timings(prefill_tokens=int(lens.sum()), decode_tokens=int((out_len - 1).sum()),
                                  decode_steps=int(iters.max()), **times)
        spec = None
        if loop.tree is not None:
            totals = hist[:, :loop.max_accept].sum(axis=0)
            spec = runtime.SpecStats(
                tau=float(out_len.sum() / (iters.sum() + B)),
                tau_per_row=[float(out_len[b] / (iters[b] + 1)) for b in range(B)],
                accept_hist=totals.tolist(),
                accepted_by_depth=[int(totals[d:].sum()) for d in range(1, loop.tree.depth + 1)],
                tree_shape=list(loop.tree.widths), ring_capacity=ring_slots, draft_vocab_size=self.draft_vocab_size)
        return runtime.GenerationResult(tokens=tokens, stop_reason=reasons, timings=timings, spec=spec, shapes=shapes)


def _split(module):
    """(graphdef, weights as a nested dict of arrays); `nnx.merge` takes the dict back."""
    graphdef, state = nnx.split(module)
    return graphdef, state.to_pure_dict()


def _snapshot(state: DecodeState):
    """Copies of what streaming reads, so the state itself can be donated to the next slice."""
    return state.out + 0, state.out_len + 0, state.done | False


_snapshot_jit = jax.jit(_snapshot)


def _emit(callback, pending, shown: int) -> tuple[int, bool]:
    """Fetch a snapshot and pass it on if it holds new tokens; returns (tokens shown, all rows done)."""
    with jax.transfer_guard("allow"):  # the user's callback is not part of the decode loop
        tokens, num, done = jax.device_get(pending)
        n = int(np.max(num))
        if n > shown:
            callback(np.asarray(tokens)[:, :n], np.asarray(num))
    return max(n, shown), bool(np.all(done))


def generate_ar(model, prompt_ids, *, max_new_tokens: int, **kwargs) -> runtime.GenerationResult:
    """Autoregressive generation with the target alone (the baseline speculation is measured
    against): `Decoder(model).generate(...)`. Keyword arguments: `Decoder`'s `cache_dtype`,
    `prefill_chunk`, `mesh`, `compiler`, and `generate`'s."""
    ctor = {k: kwargs.pop(k) for k in ("cache_dtype", "prefill_chunk", "mesh", "compiler") if k in kwargs}
    return Decoder(model, **ctor).generate(prompt_ids, max_new_tokens=max_new_tokens, **kwargs)


def generate_tree(target, draft: Draft, prompt_ids, *, max_new_tokens: int, **kwargs) -> runtime.GenerationResult:
    """One-shot speculative generation: `Decoder(target, draft, ...).generate(...)` (build a `Decoder`
    to reuse it). Keyword arguments: `Decoder`'s and `generate`'s."""
    ctor = {k: kwargs.pop(k) for k in ("tree_shape", "draft_vocab", "sample_drafts", "verification", "cache_dtype",
                                       "prefill_chunk", "mesh", "compiler") if k in kwargs}
    return Decoder(target, draft, **ctor).generate(prompt_ids, max_new_tokens=max_new_tokens, **kwargs)
