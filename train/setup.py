"""Building blocks of a training run: multi-host init, the mesh, models placed on it, the tokenizer.

Models are initialised *directly in their shardings* (`init_sharded`: the constructor runs under
`jax.jit` with `out_shardings` from the logical-axis rules), so an 8B random target never exists
unsharded on one device.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longspec_jax import configs, sharding
from longspec_jax.draft import Draft
from longspec_jax.transformer import Transformer
from train.config import TrainConfig, TrainConfigError

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def maybe_initialize_distributed(flag: bool | str) -> bool:
    """Call `jax.distributed.initialize()` for multi-process launches.

    flag: True (always), False (never) or "auto": when the environment shows a multi-process launch
    (SLURM / Open MPI with more than one task, a TPU pod, or JAX_COORDINATOR_ADDRESS set). Returns
    whether it initialised. Must run before any other JAX call touches the devices.
    """
    env = os.environ
    detected = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if flag is False or flag == "false" or (flag == "auto" and not detected):
        return False
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # Explicit launch: every process sets the same coordinator plus its own id.
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
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


def init_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh, rules=None) -> nnx.Module:
    """Run the module constructor under jit with its parameters created in their mesh shardings."""
    abstract = nnx.eval_shape(ctor)
    for _, var in sharding.iter_params(abstract):
        var.set_value(sharding.variable_sharding(var, mesh, rules))
    graphdef, shardings = nnx.split(abstract)
    state = jax.jit(lambda: nnx.split(ctor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


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
    seed = cfg.train.seed
    model = init_sharded(lambda: Transformer(tcfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=impl), mesh)
    return model, tcfg, None


def build_draft(cfg: TrainConfig, tcfg: configs.ModelConfig, mesh: Mesh) -> Draft:
    """A fresh float32 draft for `tcfg` (or the exported draft in model.draft_init)."""
    dcfg = configs.DraftConfig.from_target(tcfg, intermediate_size=cfg.model.draft_intermediate_size,
                                           window=cfg.model.window)
    dtype = DTYPES[cfg.model.compute_dtype]
    if cfg.model.draft_init:
        from longspec_jax import draft_weights

        # float32 master weights computing in model.compute_dtype, like a fresh draft (computing in
        # float32 would send train.attention=flash to a dense [T, T] fallback). The HF-format config
        # does not record the window, so it comes from model.window.
        draft = draft_weights.load_draft(cfg.model.draft_init, tcfg, dtype=dtype, param_dtype=jnp.float32,
                                         attention_impl=cfg.model.attention_impl, window=cfg.model.window)
        return sharding.shard_model(draft, mesh)
    seed = cfg.train.seed + 1
    return init_sharded(lambda: Draft(dcfg, tcfg.rope, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=jnp.float32,
                                      attention_impl=cfg.model.attention_impl), mesh)


def shardings_of(tree):
    """The sharding of every array leaf (what jit's in/out_shardings want)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def place_replicated(tree, mesh: Mesh):
    """Put leaves that are not yet on the mesh (e.g. optax's scalar count) replicated on it."""
    rep = replicated(mesh)
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else jax.device_put(x, rep), tree)
