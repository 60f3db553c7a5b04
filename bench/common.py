"""What every benchmark shares: the result header and writer, the timers, the roofline ceilings, random
models at real shapes, and profiler-trace summaries.

Every result JSON starts with `header()`: what ran (argv), where (device kind and count, platform),
with what (python, jax, jaxlib, flax), from which code (git commit and whether the tree was dirty)
and when (UTC). Floors are max(bytes / bandwidth, FLOPs / matmul rate) with both rates measured by
`ceilings()` in the same process.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import glob
import gzip
import json
import os
import platform
import re
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


def log(*parts) -> None:
    print(*parts, flush=True)


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code the benchmark runs: $BENCH_GIT_COMMIT when set (a copy of the tree
    shipped to another machine, whose own history may not hold that commit; dirty is then None),
    else the checkout's."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"], None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def portable_argv(argv: list[str]) -> list[str]:
    """The command line with each absolute path after a flag named by that flag ("--checkpoint
    /data/ck" -> "--checkpoint CHECKPOINT"): a result file records the command, not the machine."""
    flagged = lambda i, a: os.path.isabs(a) and i and argv[i - 1].startswith("--")  # noqa: E731
    return [argv[i - 1][2:].upper().replace("-", "_") if flagged(i, a) else a for i, a in enumerate(argv)]


def header(suite: str, workload: str | None, argv: list[str], device_kind: str | None = None,
           device_count: int | None = None) -> dict:
    """The fields every result file starts with; `argv` is the whole command line, e.g. ["python",
    "-m", "bench", "kernels", ...]. Pass `device_kind` / `device_count` from a process that must not
    start JAX's GPU client (the PyTorch baseline); otherwise JAX's devices are asked."""
    import flax
    import jaxlib

    platform_name = None
    if device_kind is None:
        dev = jax.devices()[0]
        platform_name = dev.platform
        device_kind = dev.device_kind
        if dev.platform == "cpu":
            device_kind = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        device_count = jax.device_count()
    commit, dirty = git_state()
    return {"suite": suite, "workload": workload, "device": device_kind, "device_count": device_count,
            "platform": platform_name, "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "git_commit": commit, "git_dirty": dirty,
            "argv": portable_argv(argv),
            "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def device_slug(count: int = 1, kind: str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA H200' on two GPUs -> 'h200x2'; CPUs -> 'cpu'."""
    if kind is None:
        dev = jax.devices()[0]
        kind = "cpu" if dev.platform == "cpu" else dev.device_kind
    m = re.search(r"\b([A-Z]{1,2}\d{2,3})\b", kind)
    slug = m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    return slug + (f"x{count}" if count > 1 else "")


def result_path(out: str, suite: str, workload: str, device: str | None = None) -> str:
    """<out>/<device>/<suite>_<workload>.json, device defaulting to `device_slug()` (`out` ending in
    .json is used as is)."""
    if out.endswith(".json"):
        return out
    return os.path.join(out, device or device_slug(), f"{suite}_{workload}.json")


def write_json(path: str, record: dict) -> None:
    """Write atomically (temporary file, then rename): a killed run never leaves half a file.
    Benchmarks call it after every measured point, so a time-limited run keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def timeit(fn, *args, reps: int = 5, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median seconds of `fn(*args)` (jitted; timed to `block_until_ready`) over `reps` repetitions,
    after `warmup` untimed calls (the first compiles). With `min_time`, each repetition makes enough
    back-to-back calls to last about that long and reports the mean per call: dispatch then overlaps
    device work, as in a decode loop, and microsecond kernels are not timed against the host clock."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    inner = 1
    if min_time > 0:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def time_carry(fn, state, reps: int = 5, warmup: int = 2):
    """(median seconds, final state) of `state = fn(state)`, for a `fn` that donates its input (a
    decode loop updating its caches in place: no copy of them per call)."""
    for _ in range(warmup):
        state = fn(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Rates measured on this device. `bandwidth_Bps` is the largest of the three memory rates: a
    decode step reads weights and cache and writes almost nothing, and on an H200 XLA's copy stays
    below what a decode step reads, so the read-only rates are the tighter ceiling."""

    copy_Bps: float  # in-place negation: bytes read + written
    read_Bps: float  # row reduction: bytes read
    gemv_Bps: float  # matrix-vector product: bytes read
    matmul_flops: float  # square matmul in the benchmark's dtype

    @property
    def bandwidth_Bps(self) -> float:
        return max(self.copy_Bps, self.read_Bps, self.gemv_Bps)

    def floor_s(self, nbytes: float, flops: float = 0.0) -> float:
        return max(nbytes / self.bandwidth_Bps, flops / self.matmul_flops)


@functools.cache
def ceilings(dtype: str = "bfloat16") -> Ceilings:
    """Measure the memory and matmul ceilings once per process (per dtype): 2 GiB buffers and an 8192^3
    matmul on a GPU, 128 MiB and 2048^3 on a CPU; median of 10 timings (3 on a CPU)."""
    dt = jnp.dtype(dtype)
    cpu = jax.default_backend() == "cpu"
    n = (1 << 27 if cpu else 1 << 31) // dt.itemsize
    reps = 3 if cpu else 10
    x = jax.random.normal(jax.random.key(0), (n,), dt)
    # Negation, not a scale near 1: bf16 rounds 1.0001 to 1 and XLA then removes the whole copy.
    # Donated, so the copy is in place (a fresh buffer per call would time page faults on CPUs).
    t, x = time_carry(jax.jit(jnp.negative, donate_argnums=0), x, reps=reps)
    copy = 2 * x.nbytes / t
    read = x.nbytes / timeit(jax.jit(lambda v: jnp.sum(v.reshape(4096, -1), axis=1, dtype=jnp.float32)), x, reps=reps)
    vec = jax.random.normal(jax.random.key(1), (8192,), dt)
    gemv = x.nbytes / timeit(jax.jit(lambda v, u: v.reshape(-1, 8192) @ u), x, vec, reps=reps)
    del x
    m = 2048 if cpu else 8192
    a, b = (jax.random.normal(jax.random.key(k), (m, m), dt) for k in (2, 3))
    mm = 2 * m ** 3 / timeit(jax.jit(lambda p, q: p @ q), a, b, reps=reps)
    return Ceilings(copy_Bps=copy, read_Bps=read, gemv_Bps=gemv, matmul_flops=mm)


def random_models(cfg, dcfg, impl: str, dtype=jnp.bfloat16, seed: int = 0, mesh=None):
    """A random target and draft (`longspec_jax.init`: parameters and compute in `dtype`, drawn on the
    device by one compiled function; with a `mesh`, each parameter in its tensor-parallel sharding,
    so a model larger than one device's memory never sits whole on one device)."""
    from longspec_jax import init, sharding

    if mesh is not None:
        sharding.check_tensor_parallel(cfg, mesh.shape["tensor"], what="the target")
    kw = dict(dtype=dtype, attention_impl=impl, mesh=mesh)
    return init.random_target(cfg, seed=seed, **kw), init.random_draft(dcfg, cfg.rope, seed=seed + 1, **kw)


def random_cache(cfg, capacity: int, key, dtype=jnp.bfloat16):
    """A target KV cache of `capacity` slots filled with random values (never time on zeros)."""
    from longspec_jax import kv_cache as kvc

    ks = jax.random.split(key, 2 * cfg.num_layers)
    make = jax.jit(lambda k: jax.random.normal(k, (1, capacity, cfg.num_kv_heads, cfg.head_dim), dtype))
    return kvc.KVCache(k=tuple(make(ks[2 * i]) for i in range(cfg.num_layers)),
                       v=tuple(make(ks[2 * i + 1]) for i in range(cfg.num_layers)))


def param_bytes(module, skip_embedding: bool = True) -> int:
    """Parameter bytes of `module`; without the embedding table (a decode step gathers one row of it)
    unless `skip_embedding` is False."""
    from flax import nnx

    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param)):
        name = jax.tree_util.keystr(path)
        if skip_embedding and "embedder" in name and "lm_head" not in name:
            continue
        total += leaf.size * leaf.dtype.itemsize
    return total


PHASES = re.compile(r"/(draft_level\d+|verify|accept|commit)/")


def hlo_phases(compiled_text: str) -> dict:
    """{instruction name: phase} from a compiled executable's HLO text, the phase being the decode
    loop's named scope in the instruction's op_name metadata (draft_level<l>, verify, accept,
    commit). Instructions the compiler made without metadata (copies, some dots) take the phase of
    the instruction before them in the schedule."""
    out, current = {}, None
    for line in compiled_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            current = None  # a computation header or closing brace
            continue
        meta = re.search(r'op_name="([^"]*)"', line)
        ph = PHASES.search(meta.group(1) + "/") if meta else None
        if ph:
            current = ph.group(1)
        if current:
            out[m.group(1)] = current
    return out


def summarize_trace(profile_dir: str, iterations: int, top: int = 25, compiled_text: str | None = None) -> dict:
    """Device time per op name in ms per iteration, and device ops per iteration (at small model
    sizes launches, not bytes, set the time); with the loop's compiled HLO text, time and op count
    per phase of the iteration (`hlo_phases`)."""
    files = sorted(glob.glob(os.path.join(profile_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return {"error": f"no trace file under {profile_dir}"}
    with gzip.open(files[-1]) as f:  # the newest trace
        trace = json.load(f)
    path, events = files[-1], trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {p for p, n in pids.items() if "GPU" in n}
    phase_of = hlo_phases(compiled_text) if compiled_text else {}
    n_it = max(iterations, 1)
    per, n_of, phases, ph_ops, count = {}, {}, {}, {}, 0
    for e in events:
        if e.get("ph") != "X" or (gpu_pids and e.get("pid") not in gpu_pids):
            continue
        if not gpu_pids and "hlo_op" not in e.get("args", {}):  # CPU trace: XLA ops only, not host events
            continue
        name, dur = e.get("name", "?"), float(e.get("dur", 0.0))
        per[name] = per.get(name, 0.0) + dur
        n_of[name] = n_of.get(name, 0) + 1
        count += 1
        if phase_of:
            ph = phase_of.get(e.get("args", {}).get("hlo_op", name), phase_of.get(name, "other"))
            t, n = phases.get(ph, (0.0, 0))
            phases[ph] = (t + dur, n + 1)
            ops = ph_ops.setdefault(ph, {})
            ops[name] = ops.get(name, 0.0) + dur
    total = sum(per.values())
    out = {"file": os.path.relpath(path, profile_dir), "device_ms_per_iteration": total / 1e3 / n_it,
           "ops_per_iteration": count / n_it,
           "ops": [{"name": n[:120], "ms_per_iteration": d / 1e3 / n_it, "per_iteration": n_of[n] / n_it,
                    "share": d / max(total, 1e-9)} for n, d in sorted(per.items(), key=lambda kv: -kv[1])[:top]]}
    if phases:
        out["phases"] = {ph: {"ms_per_iteration": t / 1e3 / n_it, "ops_per_iteration": n / n_it,
                              "top_ops": [{"name": k[:80], "us_per_iteration": d / n_it}
                                          for k, d in sorted(ph_ops[ph].items(), key=lambda kv: -kv[1])[:8]]}
                         for ph, (t, n) in sorted(phases.items())}
    return out
