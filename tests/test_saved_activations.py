"""What the backward keeps per layer, against llm.c's own activation buffers for the same -r.

The reference is train_gpt2.cu's fill_in_activation_sizes (llmc_jax/planning/llmc_alloc.py, with
cuDNN): per layer and token, 16 bf16 channels at -r 0 (ln1, atty, residual2, ln2, fch, fch_gelu,
residual3, qkvr), 12 at -r 1 (no fch_gelu), 10 at -r 2 (no ln1, ln2), and at every -r the fp32
layernorm mean and rstd and one attention statistic per head. Ours is what jax.vjp keeps from the
layer scan (the stacked residuals), taken from the traced shapes: equal bytes means the same
tensors are kept (each attention output once, not once per consumer) and nothing is recomputed
that llm.c keeps (the attention forward, the projection's matmul)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_CONFIG
from llmc_jax.models import gpt2
from llmc_jax.nn.kernels import Kernels, ModelOptions
from llmc_jax.planning import llmc_alloc

CFG = TEST_CONFIG
B, T = 3, 32        # B differs from every weight dimension, so the per-layer activations are the (L, B, ...) stacks


def _saved_bytes_per_layer(opts: ModelOptions) -> int:
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in CFG.param_shapes().items()}
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def residuals(p, x, y):
        return jax.vjp(lambda p: gpt2.loss(p, x, y, CFG, opts), p)[1]
    leaves = {id(x): x for x in jax.tree_util.tree_leaves(jax.eval_shape(residuals, params, tokens, tokens))}
    stacked = [x for x in leaves.values() if len(x.shape) >= 3 and x.shape[:2] == (CFG.L, B)]
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in stacked) // CFG.L


def _llmc_bytes_per_layer(recompute: int) -> int:
    one, two = (llmc_alloc.activation_bytes(dataclasses.replace(CFG, L=n), B, T, recompute) for n in (1, 2))
    return two - one


@pytest.mark.parametrize("recompute", [0, 1, 2])
@pytest.mark.parametrize("attention", ["xla", "pallas", "cudnn"])
def test_saved_activations_per_layer_equal_llmc(attention, recompute):
    opts = ModelOptions(dtype=jnp.bfloat16, kernels=Kernels(attention=attention), recompute=recompute)
    if attention == "cudnn":      # traced as for a GPU (cuDNN's checks look at the target); nothing runs
        from llmc_jax.planning import targets
        from pallas_kernels.common import compiling_for
        targets.prepare_jax()
        with compiling_for("gpu"):
            ours = _saved_bytes_per_layer(opts)
    else:
        ours = _saved_bytes_per_layer(opts)
    assert ours == _llmc_bytes_per_layer(recompute)
