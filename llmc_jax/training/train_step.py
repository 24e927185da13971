"""The jitted training and evaluation steps: the one function the trainer and the benchmarks run.

One step = a `lax.scan` over grad-accumulation micro-batches (fp32 gradient sum, mean loss),
the global grad norm, llm.c's outlier z-scores, clipping, and AdamW on the master weights; an
update whose loss or grad-norm z-score is over its threshold is skipped (the step still counts).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from llmc_jax.training import optim
from llmc_jax.models.family import family_of, reference_of
from llmc_jax.nn.kernels import XLA, Kernels, ModelOptions


class TrainState(NamedTuple):
    params: dict
    opt_state: Any
    loss_detector: optim.DetectorState
    norm_detector: optim.DetectorState


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

    def optimizer(self) -> optax.GradientTransformation:
        return optim.make_optimizer(beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                    weight_decay=self.weight_decay)

    def model_options(self, layer_sharding=None) -> ModelOptions:
        return ModelOptions(dtype=jnp.dtype(self.dtype), kernels=self.kernels, recompute=self.recompute,
                            layer_sharding=layer_sharding)

    def value_and_grad(self, layer_sharding=None):
        if self.backward == "manual":
            return family_of(self.model).value_and_grad(self.model, self.model_options(layer_sharding))
        if self.backward == "autodiff":
            return reference_of(self.model).value_and_grad(self.model, dtype=jnp.dtype(self.dtype))
        raise ValueError(f"backward must be 'manual' or 'autodiff', got {self.backward!r}")


def init_train_state(params: dict, sc: StepConfig) -> TrainState:
    return TrainState(params, sc.optimizer().init(params), optim.detector_init(), optim.detector_init())


def _skip(z, threshold: float):
    # llm.c: skip only where the threshold is set and the z-score is finite and above it
    if threshold <= 0:
        return jnp.bool_(False)
    return jnp.isfinite(z) & (z > threshold)


def _per_device(value_and_grad, mesh):
    """value_and_grad computed by each device on its own rows inside shard_map, then averaged.

    XLA cannot partition a Pallas kernel (an opaque custom call): under plain jit on a batch-sharded
    input it would gather the whole batch onto every device. Inside shard_map each device runs the
    kernels on its B/D rows; the mean over devices of the per-device mean loss and gradients is the
    mean over all rows (every device holds as many). check_vma=False: Pallas' interpret mode fails
    the varying-axes check."""
    from llmc_jax.training.parallel import DATA_AXIS

    def local(params, x_BT, y_BT):
        loss, grads = value_and_grad(params, x_BT, y_BT)
        return jax.lax.pmean(loss, DATA_AXIS), jax.lax.pmean(grads, DATA_AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)), out_specs=(P(), P()),
                         check_vma=False)


def accumulate_gradients(sc: StepConfig, grad_shardings=None, mesh=None, zero_stage: int = 0):
    """(params, x_ABT, y_ABT) -> (mean loss, mean fp32 grads) over A micro-batches of (B, T).

    grad_shardings (ZeRO-2/3, a pytree like params): the gradients and the accumulator are
    constrained to it, so each micro-step's gradient is reduce-scattered into a sharded sum.
    mesh: the device mesh of a sharded step; with Pallas kernels the forward and backward then run
    per device inside shard_map (XLA partitions the xla op set by itself)."""
    per_device = mesh is not None and mesh.size > 1 and sc.backward == "manual" and sc.kernels.uses_pallas
    # ZeRO-3 (params sharded, so gradients are too): each layer gathered as the scan reaches it
    gather_layers = mesh is not None and grad_shardings is not None and zero_stage >= 3 and not per_device
    value_and_grad = sc.value_and_grad(NamedSharding(mesh, P()) if gather_layers else None)
    if per_device:
        value_and_grad = _per_device(value_and_grad, mesh)
    if grad_shardings is None:
        constrain = lambda g: g
    else:
        constrain = lambda g: jax.lax.with_sharding_constraint(g, grad_shardings)

    def fn(params, x_ABT, y_ABT):
        def micro(acc, xy):
            loss, grads = value_and_grad(params, xy[0], xy[1])
            acc_loss, acc_grads = acc
            acc_grads = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads))
            return (acc_loss + loss.astype(jnp.float32), acc_grads), None

        A = x_ABT.shape[0]
        if A == 1:   # no accumulation: no zero-filled buffer and no extra pass over the gradients
            loss, grads = value_and_grad(params, x_ABT[0], y_ABT[0])
            return loss.astype(jnp.float32), constrain(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (loss_sum, grad_sum), _ = jax.lax.scan(micro, (jnp.float32(0.0), zeros), (x_ABT, y_ABT))
        return loss_sum / A, jax.tree.map(lambda g: g / A, grad_sum)   # mean over B*T*A, as llm.c
    return fn


def make_train_step(sc: StepConfig, shardings=None):
    """(state, x_ABT, y_ABT, lr, step) -> (state, metrics); A micro-batches of (B, T) each.

    The state is donated: params and AdamW moments are updated in place. `shardings` (a
    parallel.Shardings) compiles the step for a device mesh with explicit in/out shardings; its
    ZeRO stage >= 2 also constrains the gradients to the optimizer-state sharding."""
    grad_fn = (accumulate_gradients(sc) if shardings is None else
               accumulate_gradients(sc, shardings.grads, shardings.mesh, shardings.zero_stage))
    opt = sc.optimizer()

    def step_fn(state: TrainState, x_ABT, y_ABT, lr, step):
        params = state.params
        loss, grads = grad_fn(params, x_ABT, y_ABT)
        norm = optim.global_norm(grads)
        loss_det, loss_z = optim.detector_update(state.loss_detector, loss)
        norm_det, norm_z = optim.detector_update(state.norm_detector, norm)
        skipped = _skip(loss_z, sc.skip_loss_z) | _skip(norm_z, sc.skip_grad_z)

        grads = optim.clip_by_global_norm(grads, norm, sc.grad_clip)
        opt_state = optim.set_step(optim.set_learning_rate(state.opt_state, lr), step)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if sc.skip_loss_z > 0 or sc.skip_grad_z > 0:   # only then pay for the select
            new_params, new_opt_state = jax.lax.cond(
                skipped, lambda: (params, state.opt_state), lambda: (new_params, new_opt_state))
        new_state = TrainState(new_params, new_opt_state, loss_det, norm_det)
        finite = jnp.isfinite(loss) & jnp.isfinite(norm)
        return new_state, StepMetrics(loss, norm, loss_z, norm_z, skipped, finite)

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    rep = shardings.replicated
    return jax.jit(step_fn, donate_argnums=(0,),
                   in_shardings=(shardings.state, shardings.batch, shardings.batch, rep, rep),
                   out_shardings=(shardings.state, StepMetrics(*[rep] * len(StepMetrics._fields))))


def make_eval_step(sc: StepConfig):
    """(params, x_BT, y_BT) -> mean loss, the forward pass only."""
    if sc.backward == "autodiff":
        fn = lambda p, x, y: reference_of(sc.model).loss(p, x, y, sc.model, dtype=jnp.dtype(sc.dtype))
    else:
        fn = lambda p, x, y: family_of(sc.model).loss(p, x, y, sc.model, sc.model_options())
    return jax.jit(fn)
