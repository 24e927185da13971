"""The jitted training and evaluation steps: the one function the trainer and the benchmarks run.

One step = a `lax.scan` over grad-accumulation micro-batches (fp32 gradient sum, mean loss),
the global grad norm, llm.c's outlier z-scores, clipping, and AdamW on the master weights; an
update whose loss or grad-norm z-score is over its threshold is skipped (the step still counts).

With --fp8 (StepConfig.fp8 != "off") the state also holds the FP8 layer matmuls' metas (TrainState.fp8);
their "gradients" (observed amaxes, nn/fp8.py) are combined over micro-batches (and devices) with max,
never enter AdamW, the grad norm or clipping, and update the metas after the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from llmc_jax.training import optim, rounding
from llmc_jax.models.family import family_of, reference_of
from llmc_jax.nn import fp8 as fp8_ops
from llmc_jax.nn import ops
from llmc_jax.nn.kernels import XLA, Kernels, ModelOptions
from llmc_jax.nn.layer_gather import LayerGather

FP8_RECIPES = ("off", *fp8_ops.RECIPES)
# llm.c is bitwise deterministic; on a GPU XLA is too when told to be: it then makes the scatter-adds
# (the embedding backward's) deterministic by sorting their indices first. CPU compiles ignore it.
DETERMINISTIC = {"xla_gpu_exclude_nondeterministic_ops": True}


class TrainState(NamedTuple):
    params: dict
    opt_state: Any
    loss_detector: optim.DetectorState
    norm_detector: optim.DetectorState
    fp8: dict | None = None     # {matmul: fp8.MatmulMetas stacked on L} under --fp8; None (no leaves) when off


class StepMetrics(NamedTuple):
    loss: jax.Array
    norm: jax.Array
    loss_z: jax.Array
    norm_z: jax.Array
    skipped: jax.Array
    finite: jax.Array   # loss and grad norm both finite: computed in the step, so the host's stop costs no sync


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything that changes the compiled step (so it is hashable and static)."""

    model: Any                    # a model family's config (GPTConfig)
    dtype: str = "float32"
    kernels: Kernels = XLA
    backward: str = "manual"      # or "autodiff": jax.grad of the plain-jnp reference model
    recompute: int = 0
    grad_clip: float = 1.0
    skip_loss_z: float = 0.0
    skip_grad_z: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    fp8: str = "off"              # off, delayed or current: the fp8_matmuls in FP8 (nn/fp8.py)
    fp8_history: int = fp8_ops.DEFAULT_HISTORY
    fp8_margin: float = 0.0
    fp8_matmuls: tuple[str, ...] = fp8_ops.LAYER_MATMULS
    param_rounding: str = "stochastic"   # how AdamW writes bf16 params (-w 0): stochastic (llm.c) or nearest
    copy_rounding: str = "nearest"       # -w 1 in bf16: the forward's bf16 copy of the fp32 master weights

    @property
    def fp8_options(self) -> fp8_ops.Fp8Options | None:
        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"fp8 must be one of {', '.join(FP8_RECIPES)}, got {self.fp8!r}")
        return None if self.fp8 == "off" else fp8_ops.Fp8Options(self.fp8, float(self.fp8_margin),
                                                                   tuple(self.fp8_matmuls))

    def optimizer(self) -> optax.GradientTransformation:
        return optim.make_optimizer(beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                    weight_decay=self.weight_decay)

    def model_options(self, layer_sharding=None) -> ModelOptions:
        return ModelOptions(dtype=jnp.dtype(self.dtype), kernels=self.kernels, recompute=self.recompute,
                            layer_sharding=layer_sharding, fp8=self.fp8_options)

    def value_and_grad(self, layer_sharding=None):
        """(params, x, y) -> (loss, grads); under FP8 (params, metas, x, y) -> (loss, (grads, meta grads))."""
        if self.fp8_options is not None and self.backward != "manual":
            raise ValueError(f"--fp8 {self.fp8} needs --backward manual; got --backward {self.backward}")
        if self.backward == "manual":
            return family_of(self.model).value_and_grad(self.model, self.model_options(layer_sharding))
        if self.backward == "autodiff":
            return reference_of(self.model).value_and_grad(self.model, dtype=jnp.dtype(self.dtype))
        raise ValueError(f"backward must be 'manual' or 'autodiff', got {self.backward!r}")


def init_train_state(params: dict, sc: StepConfig) -> TrainState:
    """Fresh optimizer and detector state; under --fp8 fresh metas (scale 1, empty history) per layer."""
    opts = sc.fp8_options
    metas = None if opts is None else fp8_ops.init_layer_metas(sc.model.L, sc.fp8_history, opts.matmuls)
    return TrainState(params, sc.optimizer().init(params), optim.detector_init(), optim.detector_init(), metas)


def _skip(z, threshold: float):
    # llm.c: skip only where the threshold is set and the z-score is finite and above it
    if threshold <= 0:
        return jnp.bool_(False)
    return jnp.isfinite(z) & (z > threshold)


def _with_meta_grads(value_and_grad, fp8_on: bool):
    """A uniform (params, metas, x, y) -> (loss, grads, meta grads or None) over both signatures."""
    if fp8_on:
        def vg(params, metas, x_BT, y_BT):
            loss, (grads, meta_grads) = value_and_grad(params, metas, x_BT, y_BT)
            return loss, grads, meta_grads
        return vg
    return lambda params, metas, x_BT, y_BT: (*value_and_grad(params, x_BT, y_BT), None)


def _mean_over_devices(grads: dict, specs: dict, D: int, summed: frozenset = frozenset()):
    """Inside shard_map: each device's gradients -> their mean over the devices, as fp32, in the layout
    `specs` gives (per leaf: split on the dimension it names DATA_AXIS on, else whole). Reduced in the
    dtype they come in (bf16 in a bf16 run: llm.c's reduce-scatter), divided by D after, in fp32.
    summed: the names whose split gradients come summed already (the transpose of -z 3's all_gather)."""
    from llmc_jax.training.parallel import DATA_AXIS, split_dim

    def reduce(name, g):
        dim = split_dim(specs[name])
        if dim is None:
            total = jax.lax.psum(g, DATA_AXIS)
        else:
            total = g if name in summed else jax.lax.psum_scatter(g, DATA_AXIS, scatter_dimension=dim, tiled=True)
        return total.astype(jnp.float32) / D
    return {name: reduce(name, g) for name, g in grads.items()}


def _gather_outside_layers(params: dict, dims: dict, in_scan: frozenset) -> dict:
    """Inside shard_map at -z 3: the split tensors the layer scan does not gather (embeddings, final
    norm; dims: each one's split dimension or None) all_gathered whole before the forward."""
    from llmc_jax.training.parallel import DATA_AXIS
    return {k: v if k in in_scan or dims[k] is None else jax.lax.all_gather(v, DATA_AXIS, axis=dims[k], tiled=True)
            for k, v in params.items()}


def _sharded_gradients(value_and_grad, mesh, grad_shardings, reduce_each_micro_step: bool,
                       gathered_in_scan: frozenset | None = None):
    """(params, metas, x_ABT, y_ABT) -> (mean loss, mean fp32 grads laid out as grad_shardings, meta
    grads): each device runs the forward and backward on its own rows inside shard_map, and the
    collectives are the ones written here, as llm.c's: one reduction per tensor after the last
    micro-step (accumulated locally in fp32 before), or with reduce_each_micro_step (-z 2) one per
    micro-step into a sharded fp32 sum. Left to XLA's partitioner, the sharding of the AdamW state
    reached into the chunked classifier's scan and reduce-scattered dwte once per chunk; and XLA
    cannot partition a Pallas kernel (an opaque custom call) at all.

    gathered_in_scan (-z 3): the params arrive split as grad_shardings (the AdamW state's layout);
    these names (the per-layer tensors) are all_gathered by the model one layer at a time inside its
    scan (nn/layer_gather.py), the others here, whole, before the forward; the transposes of the
    gathers reduce-scatter the gradients.

    The FP8 metas' gradients (observed amaxes) are combined with max over micro-steps and devices:
    each device saw only its rows, the scale needs the max. check_vma=False: Pallas' interpret mode
    fails the varying-axes check."""
    from llmc_jax.training.parallel import DATA_AXIS, split_dim
    D = mesh.shape[DATA_AXIS]
    specs = jax.tree.map(lambda sh: sh.spec, grad_shardings)
    dims = {k: split_dim(spec) for k, spec in specs.items()}
    split_params = gathered_in_scan is not None
    summed = frozenset(k for k in specs if split_params and k in gathered_in_scan and dims[k] is not None)
    mean = lambda grads: _mean_over_devices(grads, specs, D, summed)

    def accumulator(k, p):
        """fp32 zeros for a micro-step sum: each gradient's shard when reduced every micro-step."""
        shape = list(p.shape)
        if reduce_each_micro_step and dims[k] is not None and k not in summed:
            shape[dims[k]] //= D
        return jnp.zeros(shape, jnp.float32)

    def local(params, metas, x_ABT, y_ABT):
        A = x_ABT.shape[0]
        if split_params:
            params = _gather_outside_layers(params, dims, summed)
        if A == 1:
            loss, grads, meta_grads = value_and_grad(params, metas, x_ABT[0], y_ABT[0])
            grads = mean(grads)
        else:
            def micro(acc, xy):
                loss, grads, meta_grads = value_and_grad(params, metas, xy[0], xy[1])
                grads = (mean(grads) if reduce_each_micro_step else
                         jax.tree.map(lambda g: g.astype(jnp.float32), grads))
                acc_loss, acc_grads, acc_meta = acc
                acc_meta = None if metas is None else fp8_ops.combine_amax_grads(acc_meta, meta_grads)
                return (acc_loss + loss.astype(jnp.float32), jax.tree.map(jnp.add, acc_grads, grads), acc_meta), None
            zeros = {k: accumulator(k, p) for k, p in params.items()}
            meta_zeros = None if metas is None else jax.tree.map(jnp.zeros_like, metas)   # amaxes are >= 0
            (loss, grads, meta_grads), _ = jax.lax.scan(micro, (jnp.float32(0.0), zeros, meta_zeros),
                                                        (x_ABT, y_ABT))
            if not reduce_each_micro_step:
                grads = mean(grads)
            loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)   # mean over B*T*A, as llm.c
        meta_grads = None if meta_grads is None else jax.lax.pmax(meta_grads, DATA_AXIS)
        return jax.lax.pmean(loss.astype(jnp.float32), DATA_AXIS), grads, meta_grads
    batch = P(None, DATA_AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs if split_params else P(), P(), batch, batch),
                         out_specs=(P(), specs, P()), check_vma=False)


def accumulate_gradients(sc: StepConfig, grad_shardings=None, mesh=None, zero_stage: int = 0):
    """(params, x_ABT, y_ABT) -> (mean loss, mean fp32 grads) over A micro-batches of (B, T).

    grad_shardings (a pytree like params, Shardings.grads): the layout of the gradients, reduced
    (replicated: all-reduce; split like the AdamW state: reduce-scatter); mesh: the device mesh of a
    sharded step. Every device computes on its rows inside shard_map with the collectives written out
    (_sharded_gradients); at ZeRO-3 the model all_gathers each layer's params as its scan reaches the
    layer, and the gather's transpose reduce-scatters the layer's gradients in the compute dtype
    (left to XLA's partitioner, they were reduce-scattered in fp32: twice the bytes)."""
    sharded = mesh is not None and mesh.size > 1 and grad_shardings is not None
    layer_gather = _layer_gather(sc, grad_shardings) if sharded and zero_stage >= 3 else None
    fp8_on = sc.fp8_options is not None
    value_and_grad = _with_meta_grads(sc.value_and_grad(layer_gather), fp8_on)
    if sharded:
        per_device = _sharded_gradients(value_and_grad, mesh, grad_shardings, zero_stage >= 2,
                                        None if layer_gather is None else layer_gather.names)
        return lambda params, x_ABT, y_ABT, metas=None: _drop_meta(per_device(params, metas, x_ABT, y_ABT), metas)
    constrain = ((lambda g: g) if grad_shardings is None else
                 (lambda g: jax.lax.with_sharding_constraint(g, grad_shardings)))

    def fn(params, x_ABT, y_ABT, metas=None):
        """(mean loss, mean grads), plus the max-combined meta grads when `metas` (FP8) are given."""
        def micro(acc, xy):
            loss, grads, meta_grads = value_and_grad(params, metas, xy[0], xy[1])
            acc_loss, acc_grads, acc_meta = acc
            acc_grads = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads))
            acc_meta = None if metas is None else fp8_ops.combine_amax_grads(acc_meta, meta_grads)
            return (acc_loss + loss.astype(jnp.float32), acc_grads, acc_meta), None

        A = x_ABT.shape[0]
        if A == 1:   # no accumulation: no zero-filled buffer and no extra pass over the gradients
            loss, grads, meta_grads = value_and_grad(params, metas, x_ABT[0], y_ABT[0])
            out = loss.astype(jnp.float32), constrain(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
            return _drop_meta((*out, meta_grads), metas)
        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        meta_zeros = None if metas is None else jax.tree.map(jnp.zeros_like, metas)   # amaxes are >= 0
        (loss_sum, grad_sum, meta_grads), _ = jax.lax.scan(micro, (jnp.float32(0.0), zeros, meta_zeros),
                                                           (x_ABT, y_ABT))
        return _drop_meta((loss_sum / A, jax.tree.map(lambda g: g / A, grad_sum), meta_grads), metas)
    return fn


def _layer_gather(sc: StepConfig, grad_shardings) -> LayerGather | None:
    """ZeRO-3 inside shard_map: each per-layer tensor's layer slice all_gathered over DATA_AXIS along
    the dimension its stack is split on, less the L axis. None for --backward autodiff: the reference
    models read whole params (gathered at shard_map's boundary; the state and gradients stay split)."""
    if sc.backward != "manual":
        return None
    from llmc_jax.training.parallel import DATA_AXIS, split_dim
    dims = {name: split_dim(grad_shardings[name].spec) for name in sorted(family_of(sc.model).LAYER_PARAMS)}
    return LayerGather(axis_name=DATA_AXIS, dims=tuple((name, d - 1) for name, d in dims.items() if d is not None))


def _drop_meta(out, metas):
    """(loss, grads) without FP8 metas, (loss, grads, meta grads) with them."""
    return out if metas is not None else out[:2]


def make_update(sc: StepConfig):
    """(params, opt_state, clipped fp32 grads, lr, step) -> (params, opt_state): AdamW at llm.c's
    t = step + 1, each param written back in its dtype (bf16 ones by sc.param_rounding).

    Elementwise only (no reduction), so XLA fuses it into one pass per tensor, and a sharded update
    gives the bits one device gives (tests/parallel_worker.py checks it at -z 0..3)."""
    opt = sc.optimizer()

    def update(params, opt_state, grads, lr, step):
        opt_state = optim.set_step(optim.set_learning_rate(opt_state, lr), step)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        return rounding.apply_updates(params, updates, sc.param_rounding, step), new_opt_state
    return update


def _forward_copy(sc: StepConfig, params: dict, step) -> dict:
    """The params the forward reads, in the compute dtype: llm.c's bf16 copy of its fp32 master
    weights (round to nearest; stochastically with copy_rounding "stochastic", a measurement).
    Made here rather than inside the model so that the gradients come back in the compute dtype
    (bf16 ones reduced over the devices in bf16, as llm.c's) and, where the master weights are
    sharded (-z 1/2, parallel.state_shardings), so that what is gathered is the bf16 copy."""
    if sc.copy_rounding not in rounding.ROUNDINGS:
        raise ValueError(f"copy rounding must be one of {', '.join(rounding.ROUNDINGS)}, got {sc.copy_rounding!r}")
    if sc.copy_rounding == "nearest" or sc.dtype != "bfloat16":
        return ops.compute_copy(params, sc.dtype)
    names = sorted(params)
    salt = len(names)      # the copy's seeds follow the params' own (tensor i -> i + salt)
    return {name: (rounding.stochastic_round_bf16(p, rounding.tensor_seed(step, i + salt))
                   if p.dtype == jnp.float32 else p) for i, (name, p) in enumerate((n, params[n]) for n in names)}


def make_train_step(sc: StepConfig, shardings=None, deterministic: bool = False):
    """(state, x_ABT, y_ABT, lr, step) -> (state, metrics); A micro-batches of (B, T) each.

    The state is donated: params and AdamW moments are updated in place. `shardings` (a
    parallel.Shardings) compiles the step for a device mesh with explicit in/out shardings; its
    ZeRO stage >= 2 also constrains the gradients to the optimizer-state sharding. `deterministic`:
    compile for a GPU with DETERMINISTIC (the trainer's GPU runs and every plan do)."""
    grad_fn = (accumulate_gradients(sc) if shardings is None else
               accumulate_gradients(sc, shardings.grads, shardings.mesh, shardings.zero_stage))
    update = make_update(sc)

    def step_fn(state: TrainState, x_ABT, y_ABT, lr, step):
        params = state.params
        forward_params = _forward_copy(sc, params, step)
        if shardings is not None:   # the copy made where the params lie: sharded master weights gather it, in bf16
            forward_params = jax.lax.with_sharding_constraint(forward_params, shardings.state.params)
        if state.fp8 is None:
            loss, grads = grad_fn(forward_params, x_ABT, y_ABT)
            new_fp8 = None
        else:     # the meta grads (amaxes) only update the metas: not in the norm, clipping or AdamW
            loss, grads, meta_grads = grad_fn(forward_params, x_ABT, y_ABT, state.fp8)
            new_fp8 = fp8_ops.update_layer_metas(state.fp8, meta_grads, sc.fp8_margin)
        norm = optim.global_norm(grads)
        loss_det, loss_z = optim.detector_update(state.loss_detector, loss)
        norm_det, norm_z = optim.detector_update(state.norm_detector, norm)
        skipped = _skip(loss_z, sc.skip_loss_z) | _skip(norm_z, sc.skip_grad_z)

        grads = optim.clip_by_global_norm(grads, norm, sc.grad_clip)
        new_params, new_opt_state = update(params, state.opt_state, grads, lr, step)
        if sc.skip_loss_z > 0 or sc.skip_grad_z > 0:   # only then pay for the select
            # a skipped update keeps the old metas too: a bad batch's amax never enters the window
            new_params, new_opt_state, new_fp8 = jax.lax.cond(
                skipped, lambda: (params, state.opt_state, state.fp8), lambda: (new_params, new_opt_state, new_fp8))
        new_state = TrainState(new_params, new_opt_state, loss_det, norm_det, new_fp8)
        finite = jnp.isfinite(loss) & jnp.isfinite(norm)
        return new_state, StepMetrics(loss, norm, loss_z, norm_z, skipped, finite)

    options = DETERMINISTIC if deterministic else None
    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0,), compiler_options=options)
    rep = shardings.replicated
    return jax.jit(step_fn, donate_argnums=(0,), compiler_options=options,
                   in_shardings=(shardings.state, shardings.batch, shardings.batch, rep, rep),
                   out_shardings=(shardings.state, StepMetrics(*[rep] * len(StepMetrics._fields))))


def make_eval_step(sc: StepConfig, deterministic: bool = False, shardings=None):
    """(params, x_BT, y_BT, fp8_metas=None) -> mean loss, the forward pass only.

    Under --fp8 the loop passes the train state's metas: validation runs the forward the model trains
    with (llm.c's FP8 validates through its one forward too), quantizing with the current scales and
    observing nothing (the metas only change in the train step). Sharded (shardings: the train
    step's parallel.Shardings, over several devices) each device runs the forward on its own rows of
    the batch inside shard_map, reading the params' compute-dtype copy as the train step does:
    gathered whole in bf16 where the master weights are sharded, at -z 3 one layer at a time."""
    layer_gather = None
    if shardings is not None and shardings.mesh.size > 1 and shardings.zero_stage >= 3:
        layer_gather = _layer_gather(sc, shardings.grads)
    if sc.backward == "autodiff":
        loss = lambda p, x, y, metas=None: reference_of(sc.model).loss(p, x, y, sc.model, dtype=jnp.dtype(sc.dtype))
    else:
        opts = sc.model_options(layer_gather)
        loss = lambda p, x, y, metas=None: family_of(sc.model).loss(p, x, y, sc.model, opts, metas)
    fn = loss
    if shardings is not None and shardings.mesh.size > 1:
        from llmc_jax.training.parallel import DATA_AXIS, split_dim
        specs = P()
        if layer_gather is not None:     # the params stay split as the AdamW state, as in the train step
            specs = jax.tree.map(lambda sh: sh.spec, shardings.grads)
            dims = {k: split_dim(spec) for k, spec in specs.items()}
            in_scan = layer_gather.names
            loss_whole = loss
            loss = lambda p, x, y, metas: loss_whole(_gather_outside_layers(p, dims, in_scan), x, y, metas)
        local = lambda p, x, y, metas: jax.lax.pmean(loss(p, x, y, metas).astype(jnp.float32), DATA_AXIS)
        per_device = jax.shard_map(local, mesh=shardings.mesh, in_specs=(specs, P(DATA_AXIS), P(DATA_AXIS), P()),
                                   out_specs=P(), check_vma=False)
        fn = lambda p, x, y, metas=None: per_device(ops.compute_copy(p, sc.dtype), x, y, metas)
    return jax.jit(fn, compiler_options=DETERMINISTIC if deterministic else None)
