"""Building blocks of a training run: multi-process start, the mesh, the models placed on it.

Random models come from `longspec_jax.init`, which draws each parameter directly in its mesh
sharding (logical-axis rules of `longspec_jax.sharding`), so an 8B random target never exists
unsharded on one device, and every process of a multi-host run builds the same values.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longspec_jax import configs, init, sharding
from longspec_jax.draft import Draft
from longspec_jax.transformer import Transformer
from longspec_jax.train.config import TrainConfig, TrainConfigError

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(mode: bool | str, *, heartbeat_timeout_s: int = 100) -> bool:
    """Start JAX's multi-process runtime (`jax.distributed.initialize`) for a multi-host launch.

    mode: False (never), True (always) or "auto" (when a launch is found). Two kinds of launch:
      - an explicit coordinator: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
        and JAX_PROCESS_ID set in every process (a plain multi-node launch);
      - a cluster JAX detects itself (SLURM `srun`, Open MPI `mpirun`, TPU pods, ...): with nothing
        set, "auto" asks `jax.distributed.initialize()` and runs single-process when it finds none.
    heartbeat_timeout_s: how long the processes wait for a dead peer before JAX stops them.
    Returns whether the runtime runs. It must start before any JAX call touches the devices: the CLI
    calls this first; an in-process caller that already used JAX gets a single-process run in "auto".
    """
    if mode is False:
        return False
    if jax.distributed.is_initialized():
        return True
    env = {k: os.environ.get(k, "") for k in COORDINATOR_ENV}
    if env["JAX_COORDINATOR_ADDRESS"]:
        try:
            count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise TrainConfigError(
                f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} is set, so JAX_NUM_PROCESSES (the "
                "number of processes) and JAX_PROCESS_ID (this process, 0 .. count - 1) must be integers; got "
                f"{env['JAX_NUM_PROCESSES']!r} and {env['JAX_PROCESS_ID']!r}") from None
        if not 0 <= index < count:
            raise TrainConfigError(f"JAX_PROCESS_ID={index} must be in 0 .. JAX_NUM_PROCESSES - 1 = {count - 1}")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=count,
                                   process_id=index, heartbeat_timeout_seconds=heartbeat_timeout_s)
        return True
    if mode == "auto":
        try:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
        except ValueError:
            # No cluster was detected, so there is no coordinator to join: a single-process run.
            return False
        except RuntimeError:
            # JAX's backend already runs in this process (an in-process caller): too late to join.
            return False
        return True
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


def build_mesh(cfg: TrainConfig) -> Mesh:
    """The (data, fsdp, tensor) mesh; one size may be -1 (all remaining devices)."""
    n = jax.device_count()
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise TrainConfigError(f"{n} devices cannot be split into mesh sizes {sizes}; "
                                   "make mesh.fsdp x mesh.tensor divide the device count")
        sizes[sizes.index(-1)] = n // known
    used = int(np.prod(sizes))
    # A single host may run on a subset of its devices (explicit sizes); a multi-host run must use all.
    if used > n or (used != n and jax.process_count() > 1):
        raise TrainConfigError(f"mesh data x fsdp x tensor = {sizes} uses {used} devices but "
                               f"{n} are present; set one of mesh.data / mesh.fsdp / mesh.tensor to -1")
    return sharding.make_mesh(*sizes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [A, B, T]: B over the (data, fsdp) axes, A and T unsharded."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def target_config(cfg: TrainConfig) -> tuple[configs.ModelConfig, str | None]:
    """(ModelConfig, checkpoint dir or None) for model.target = tiny | preset name | config.json | directory."""
    name = cfg.model.target
    if name == "tiny":
        try:
            return configs.tiny_config(**dict(cfg.model.tiny)), None
        except TypeError as e:
            raise TrainConfigError(f"model.tiny has a field tiny_config does not know: {e}") from None
    if name in configs.PRESETS:
        return configs.get_preset(name).config, None
    if os.path.isdir(name):
        return configs.from_hf_config(name), name
    if os.path.isfile(name) and name.endswith(".json"):
        # A bare Hugging Face config.json: random weights of that shape (to train from scratch).
        if cfg.train.objective != "lm":
            raise TrainConfigError(
                f"model.target={name!r} is a config file without weights; the draft objective needs a trained "
                "target checkpoint directory (a config file is only for train.objective=lm from scratch)")
        return configs.from_hf_config(name), None
    raise TrainConfigError(
        f"model.target={name!r} is neither 'tiny', a preset ({', '.join(sorted(configs.PRESETS))}), a "
        "config.json (random init, for train.objective=lm) nor an existing checkpoint directory")


def build_target(cfg: TrainConfig, mesh: Mesh) -> tuple[Transformer, configs.ModelConfig, str | None]:
    """The target: frozen (target_dtype) for "draft"; float32 master weights for "lm"."""
    tcfg, path = target_config(cfg)
    lm = cfg.train.objective == "lm"
    param_dtype = jnp.float32 if lm else DTYPES[cfg.model.target_dtype]
    dtype = DTYPES[cfg.model.compute_dtype] if lm else DTYPES[cfg.model.target_dtype]
    impl = cfg.model.attention_impl
    if path is not None:
        from longspec_jax import weights

        # load_target uses one dtype for storage and compute: float32 for "lm" (master weights).
        model, tcfg, _ = weights.load_target(path, dtype=param_dtype, mesh=mesh, attention_impl=impl,
                                             with_tokenizer=False)
        return model, tcfg, path
    model = init.random_target(tcfg, seed=cfg.train.seed, dtype=dtype, param_dtype=param_dtype,
                               attention_impl=impl, mesh=mesh)
    return model, tcfg, None


def build_draft(cfg: TrainConfig, tcfg: configs.ModelConfig, mesh: Mesh) -> Draft:
    """A fresh float32 draft for `tcfg` (or the exported draft in model.draft_init)."""
    dcfg = configs.DraftConfig.from_target(tcfg, intermediate_size=cfg.model.draft_intermediate_size,
                                           window=cfg.model.window)
    dtype = DTYPES[cfg.model.compute_dtype]
    if cfg.model.draft_init:
        from longspec_jax import draft_weights

        # float32 master weights computing in model.compute_dtype, like a fresh draft (computing in
        # float32 would send train.attention=flash to its query-chunked fallback on a GPU). The
        # HF-format config does not record the window, so it comes from model.window.
        draft = draft_weights.load_draft(cfg.model.draft_init, tcfg, dtype=dtype, param_dtype=jnp.float32,
                                         attention_impl=cfg.model.attention_impl, window=cfg.model.window)
        return sharding.shard_model(draft, mesh)
    return init.random_draft(dcfg, tcfg.rope, seed=cfg.train.seed + 1, dtype=dtype, param_dtype=jnp.float32,
                             attention_impl=cfg.model.attention_impl, mesh=mesh)


def shardings_of(tree):
    """The sharding of every array leaf (what jit's in/out_shardings want)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def place_replicated(tree, mesh: Mesh):
    """Put leaves that are not yet on the mesh (e.g. optax's scalar count) replicated on it."""
    rep = replicated(mesh)
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else jax.device_put(x, rep), tree)
