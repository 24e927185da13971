"""Device mesh and ZeRO shardings for the training state (single process, several local devices).

One mesh with a `data` axis (AxisType.Auto, so `with_sharding_constraint` works and XLA's GSPMD
partitioner can insert the collectives; every sharded train and validation step writes its own in
shard_map, train_step._sharded_gradients). `-z` chooses what is sharded over `data`:

    0  everything replicated (plain data parallel: gradients all-reduced)
    1  + AdamW m and v sharded, gradients reduce-scattered once per step (llm.c's ZeRO-1), and
         fp32 master weights the forward reads a bf16 copy of sharded too (gathered in bf16 at
         the step's start: llm.c keeps its bf16 params whole and shards its master weights)
    2  + gradients reduce-scattered after every micro-step into a sharded sum
    3  + parameters sharded too (FSDP: each layer's shards gathered as the layer scan reaches
         it, its gradient reduce-scattered back; nn/layer_gather.py)

Every sharded leaf is split along the dimension `shard_dim` picks (the first one divisible by the
data-axis size, never the stacked layer axis of the per-layer tensors, so that at -z 3 the scan
over layers gathers one layer at a time rather than the whole stack); leaves with none, and
scalars, stay replicated. The same choice is used for m, v,
gradients and params at every stage, so a stage only decides *which* leaves get that spec.
The batch (A, B, T) is sharded on B: device r holds rows r*B/D ... (r+1)*B/D - 1 of every micro-step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Collection, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
ZERO_STAGES = (0, 1, 2, 3)


def make_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ("data",) over the first `num_devices` devices (all by default).

    AxisType.Auto: jax.make_mesh's default is Explicit, under which with_sharding_constraint is
    refused. A "tensor" axis can be added later as a second mesh dimension; the specs below only
    name DATA_AXIS."""
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devs):
        raise ValueError(f"make_mesh: asked for {n} devices, but {len(devs)} are available")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devs[:n])


def data_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def shard_dim(shape: Sequence[int], n: int, first: int = 0) -> int | None:
    """The dimension a leaf of `shape` is split along over n devices: the first one from `first` on
    divisible by n (None: replicate; always None for n == 1 and for scalars)."""
    if n <= 1:
        return None
    for i, d in enumerate(shape):
        if i >= first and d >= n and d % n == 0:
            return i
    return None


def leaf_spec(shape: Sequence[int], n: int, first: int = 0) -> P:
    dim = shard_dim(shape, n, first)
    if dim is None:
        return P()
    return P(*([None] * dim + [DATA_AXIS]))


def split_dim(spec: P) -> int | None:
    """The dimension a leaf_spec splits over DATA_AXIS, or None (replicated)."""
    dims = [i for i, axis in enumerate(spec) if axis == DATA_AXIS]
    return dims[0] if dims else None


def _is_layer_stack(path, layer_params: Collection[str]) -> bool:
    """A per-layer tensor (L, ...) of the params dict (or of m, v, gradients: the same keys)."""
    return bool(path) and isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key in layer_params


def sharded_like(tree: Any, mesh: Mesh, layer_params: Collection[str]) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs), split as `shard_dim` says;
    the per-layer tensors (the model family's LAYER_PARAMS) from their second axis on."""
    n = data_size(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, leaf_spec(np.shape(x), n, 1 if _is_layer_stack(path, layer_params) else 0)),
        tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """x/y of shape (A, B, T): B split over `data`."""
    return NamedSharding(mesh, P(None, DATA_AXIS, None))


def _check_stage(zero_stage: int) -> int:
    z = int(zero_stage)
    if z not in ZERO_STAGES:
        raise ValueError(f"zero stage (-z) must be one of {ZERO_STAGES}, got {zero_stage!r}")
    return z


def state_shardings(state: Any, mesh: Mesh, zero_stage: int, layer_params: Collection[str],
                    compute_dtype: Any = None) -> Any:
    """NamedShardings for a train_step.TrainState (same pytree structure).

    z>=1: AdamW mu and nu split per leaf, and the params whose dtype is not compute_dtype (master
    weights: the forward reads a copy); z==3: every param; everything else (step count, learning
    rate, outlier detectors, FP8 metas) replicated."""
    z = _check_stage(zero_stage)
    rep = replicated(mesh)
    all_rep = lambda tree: jax.tree.map(lambda _: rep, tree)
    split = sharded_like(state.params, mesh, layer_params)
    is_master = lambda p: compute_dtype is not None and np.dtype(p.dtype) != np.dtype(compute_dtype)
    params = jax.tree.map(lambda p, sh: sh if z >= 3 or (z >= 1 and is_master(p)) else rep, state.params, split)
    opt = state.opt_state
    if z >= 1:
        if not (hasattr(opt, "mu") and hasattr(opt, "nu")):
            raise TypeError(f"state_shardings: -z {z} needs an AdamW state with mu and nu, got {type(opt).__name__}")
        opt_sh = all_rep(opt)._replace(mu=sharded_like(opt.mu, mesh, layer_params),
                                           nu=sharded_like(opt.nu, mesh, layer_params))
    else:
        opt_sh = all_rep(opt)
    # the FP8 metas (tiny, needed whole by every device's forward) replicated at every stage:
    # sharded_like's rules would split their history axis for nothing
    return type(state)(params, opt_sh, all_rep(state.loss_detector), all_rep(state.norm_detector),
                       all_rep(getattr(state, "fp8", None)))


@dataclasses.dataclass(frozen=True, eq=False)
class Shardings:
    """What train_step.make_train_step needs to compile a sharded step."""

    mesh: Mesh
    zero_stage: int
    state: Any                  # TrainState of NamedSharding
    batch: NamedSharding        # for x, y (A, B, T)
    replicated: NamedSharding   # lr, step, metrics
    grads: Any                  # per-param NamedSharding of the reduced gradients: the m/v sharding from
                                # -z 1 on (reduce-scatter), replicated at -z 0 (all-reduce)

    @property
    def num_devices(self) -> int:
        return data_size(self.mesh)


def make_shardings(state: Any, mesh: Mesh, zero_stage: int, layer_params: Collection[str],
                   compute_dtype: Any = None) -> Shardings:
    """layer_params: the model family's per-layer tensor names (never split on their L axis);
    compute_dtype: the dtype the forward computes in (params of another dtype are master weights)."""
    z = _check_stage(zero_stage)
    return Shardings(mesh=mesh, zero_stage=z, state=state_shardings(state, mesh, z, layer_params, compute_dtype),
                     batch=batch_sharding(mesh), replicated=replicated(mesh),
                     grads=(sharded_like(state.params, mesh, layer_params) if z >= 1 else
                            jax.tree.map(lambda _: replicated(mesh), state.params)))


def shard_state(state: Any, shardings: Any) -> Any:
    """device_put the state onto its shardings (a Shardings or a pytree of shardings)."""
    sh = shardings.state if isinstance(shardings, Shardings) else shardings
    return jax.device_put(state, sh)


def shard_batch(x: Any, shardings: Shardings) -> jax.Array:
    """Put a host (A, B, T) batch onto the mesh, B split over `data` (B must divide by the device count)."""
    n = shardings.num_devices
    if np.shape(x)[1] % n:
        raise ValueError(f"batch of {np.shape(x)[1]} rows cannot be split over {n} devices")
    return jax.device_put(x, shardings.batch)


# ----------------------------------------------------------------------------------------------
# host -> global batch assembly (several processes: each gives the rows of its own device ranks)

def local_ranks(mesh: Mesh | None, D: int) -> list[int]:
    """The data ranks (positions on the mesh's data axis) of this process's devices, in order.

    One process: all of 0..D-1. Several: they must be contiguous, as
    jax.make_array_from_process_local_data lays a process's rows out on one contiguous block."""
    if jax.process_count() == 1:
        return list(range(D))
    me = jax.process_index()
    ranks = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]
    if not ranks or ranks != list(range(ranks[0], ranks[0] + len(ranks))):
        raise RuntimeError(f"process {me}: its devices sit at data ranks {ranks} of the mesh, "
                           "not one contiguous block")
    return ranks


def global_rows(local: np.ndarray, mesh: Mesh, D: int, axis: int = 0) -> jax.Array:
    """The global array whose rows (along `axis`) this process holds part of: `local` are the rows
    of this process's ranks, in rank order; the global batch has D/len(ranks) times as many."""
    spec = batch_sharding(mesh) if axis == 1 else NamedSharding(mesh, P(DATA_AXIS))
    shape = list(np.shape(local))
    shape[axis] = shape[axis] * D // jax.local_device_count()
    return jax.make_array_from_process_local_data(spec, local, tuple(shape))


def next_batches(loaders: Sequence[Any], grad_accum: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B*D, T) inputs and targets: per micro-step, each device rank's B rows in rank order."""
    xs, ys = [], []
    for _ in range(grad_accum):
        rows = [loader.next_batch() for loader in loaders]
        xs.append(np.concatenate([r[0] for r in rows]))
        ys.append(np.concatenate([r[1] for r in rows]))
    return np.stack(xs), np.stack(ys)


def gather_params(params: dict) -> dict:
    """Params this process can use on its own (sampling, HellaSwag, the llm.c model export): the
    arrays themselves with one process; with several, gathered from every process (a collective:
    every process must call it)."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)
