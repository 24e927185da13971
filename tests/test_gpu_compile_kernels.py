"""Every Pallas kernel, forward and backward, with its default block sizes, warps and stages,
compiled by XLA's GPU compiler (Triton to PTX, ptxas; the SM's shared memory and registers) for an
H100 and an H200 at each shape the model presets use (GPT-2 d12..d48, Llama 3.2-1B/3B, 3.1-8B, T up
to 8192), on this CPU-only machine. A kernel over the SM's shared memory fails here, as on the GPU
("RESOURCE_EXHAUSTED: Shared memory size limit exceeded")."""
import jax
import jax.numpy as jnp
import pytest

from tests.cuda_lowering import TRITON_CALL, compile_for_gpu

BF16 = jnp.bfloat16
S = jax.ShapeDtypeStruct

# (label, B, T, NH, NKV, HS): the presets' attention shapes at their longest T (NH only scales the grid)
ATTENTION = [("gpt2 d12..d48", 1, 1024, 25, 25, 64), ("llama3.2-1B", 1, 8192, 32, 8, 64),
             ("llama3.2-3B", 1, 8192, 24, 8, 128), ("llama3.1-8B", 1, 8192, 32, 8, 128)]
LAYERNORM_C = [768, 1024, 1280, 1600]          # GPT-2 d12, d24, d36, d48
RMSNORM_C = [2048, 3072, 4096]                 # Llama 3.2-1B, 3B, 3.1-8B
ROWS = 8192                                    # B*T rows of the norms and the MLP
GPUS = ["h100x1", "h200x1"]


def _grad_compiles(fn, *args, target):
    """fn's forward and its backward (the gradient of every input) compile; returns the Triton calls."""
    def loss(*a):
        out = fn(*a)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in (out if isinstance(out, tuple) else (out,)))
    text = compile_for_gpu(jax.grad(loss, argnums=tuple(range(len(args)))), *args, target=target).as_text()
    return text.count(TRITON_CALL)


@pytest.mark.parametrize("target", GPUS)
@pytest.mark.parametrize("case", ATTENTION, ids=[c[0] for c in ATTENTION])
def test_flash_attention_compiles(case, target):
    from pallas_kernels.flash_attention import flash_attention
    _, B, T, NH, NKV, HS = case
    q, kv = S((B, T, NH, HS), BF16), S((B, T, NKV, HS), BF16)
    assert _grad_compiles(lambda q, k, v: flash_attention(q, k, v), q, kv, kv, target=target) >= 3


@pytest.mark.parametrize("target", GPUS)
@pytest.mark.parametrize("C", LAYERNORM_C)
def test_layernorm_kernels_compile(C, target):
    from pallas_kernels.layernorm import layernorm, residual_layernorm
    x, w = S((ROWS, C), BF16), S((C,), jnp.float32)
    assert _grad_compiles(layernorm, x, w, w, target=target) >= 2
    assert _grad_compiles(residual_layernorm, x, x, w, w, target=target) >= 2


@pytest.mark.parametrize("target", GPUS)
@pytest.mark.parametrize("C", RMSNORM_C)
def test_rmsnorm_kernels_compile(C, target):
    from pallas_kernels.rmsnorm import residual_rmsnorm, rmsnorm
    x, w = S((ROWS, C), BF16), S((C,), jnp.float32)
    assert _grad_compiles(lambda x, w: rmsnorm(x, w, 1e-5), x, w, target=target) >= 2
    assert _grad_compiles(lambda x, r, w: residual_rmsnorm(x, r, w, 1e-5), x, x, w, target=target) >= 2


@pytest.mark.parametrize("target", GPUS)
@pytest.mark.parametrize("C", LAYERNORM_C)
def test_matmul_gelu_compiles(C, target):
    from pallas_kernels.matmul_gelu import matmul_gelu
    x, w, b = S((ROWS, C), BF16), S((4 * C, C), BF16), S((4 * C,), BF16)     # w: (OC, C), as llm.c
    assert _grad_compiles(matmul_gelu, x, w, b, target=target) >= 1


def test_tiles_over_shared_memory_are_refused():
    """The check above can fail: 256-row tiles at head size 256 with 4 stages ask Triton for ~1.1 MB of
    shared memory, over the 227 KiB an H100 block may opt into."""
    from pallas_kernels.flash_attention import BlockSizes, flash_attention
    big = BlockSizes(256, 256, 256, 256, 256, 256)
    q = S((1, 1024, 4, 256), BF16)
    with pytest.raises(Exception, match="(?i)shared memory"):
        compile_for_gpu(lambda q, k, v: flash_attention(q, k, v, block_sizes=big, num_warps=8, num_stages=4),
                        q, q, q)
