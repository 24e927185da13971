"""Every GPU path of the trainer compiles for GPUs that are not here (XLA's deviceless compilation)
and does what it is meant to on them: ZeRO stages on 8 GPUs and 2 hosts x 8, -r 0/1/2, the xla,
Pallas and cuDNN attention, FP8, both families, the sampler's prefill and decode. The references
are the model's own sizes (parameter counts, layers) and the definitions of the stages."""
import pytest

from llmc_jax.planning import plan
from tests.gpu_plan import fp8_gemms, report, train_step_hlo

GPT2 = "-e d6 -b 2 -t 256"          # L=6 C=384: every tensor divides by 8
LLAMA = "-e llama3:tiny -b 2 -t 64"


def _n_params(r):
    return r["num_parameters"]


def _n_layer_params(model: str) -> int:
    """The parameters of the per-layer tensors (the ones ZeRO-3 gathers layer by layer)."""
    import math
    from llmc_jax.models.family import family_of, model_config
    cfg = model_config(model)
    return sum(math.prod(s) for k, s in cfg.param_shapes().items() if k in family_of(cfg).LAYER_PARAMS)


@pytest.mark.parametrize("z", [0, 1, 2, 3])
def test_zero_stages_on_8_gpus(z):
    r = report(f"{GPT2} -z {z}")
    n, b = _n_params(r), r["breakdown"]
    coll = r["collectives"]
    # d6's padded vocabulary (Vp) counts in the parameters the model holds. A bf16 run with fp32
    # master weights (the default): from -z 1 on they are split like m and v (llm.c's ZeRO-1), and
    # what the forward gathers is their bf16 copy
    held = b["parameters"] / 4
    assert held == pytest.approx(n if z == 0 else n / 8, rel=0.02)
    assert b["optimizer state"] / 8 == pytest.approx(n if z == 0 else n / 8, rel=0.02)    # m and v, fp32
    if 1 <= z < 3:
        assert coll["all-gather"]["bytes"] == pytest.approx(2 * n, rel=0.02)     # the bf16 copy, once
    grads = coll.get("all-reduce", {}).get("bytes", 0) + coll.get("reduce-scatter", {}).get("bytes", 0)
    assert grads == pytest.approx(2 * n, rel=0.02)    # every gradient combined over the GPUs once, in bf16
    if z == 0:    # one all-reduce of the replicated gradients
        assert "reduce-scatter" not in coll
    elif z < 3:   # reduce-scattered into the m/v shards, never once per classifier chunk
        assert coll["reduce-scatter"]["bytes"] == pytest.approx(2 * n, rel=0.02)
    if z == 3:    # the layer scan gathers each layer's weights as it reaches them, forward and backward
        assert coll["all-gather"]["count"] >= 2 * 6       # (the rest once): held whole by no GPU
        assert coll["all-gather"]["bytes"] == pytest.approx(2 * (n + _n_layer_params("d6")), rel=0.02)


def test_validation_at_zero3_gathers_layer_by_layer():
    """At -z 3 the validation step reads the params as the train step does, split, each layer gathered
    as the scan reaches it: it holds less than at -z 1 (whole bf16 copy) by the bf16 layers but one."""
    ev = {z: report(f"{GPT2} -z {z}", eval_step=True)["breakdown"]["validation step"] for z in (1, 3)}
    assert ev[1] - ev[3] >= 2 * _n_layer_params("d6") * 5 / 6, ev


def test_pallas_kernels_at_zero3_gather_layer_by_layer():
    """Pallas kernels at -z 3 (per GPU inside shard_map, as every kernel set): the params stay split,
    each layer's bf16 copy is all_gathered as the scan reaches it (XLA combines a layer's 12 tensors
    into one gather: at least one per layer, not one whole-model gather) and each gradient
    reduce-scattered once in bf16 by the gather's transpose: 2 bytes per parameter each way. At -r 0
    too the backward gathers each layer again rather than keep every layer's gathered weights."""
    r = report(f"{GPT2} -z 3 --kernels pallas -r 0")
    n, coll = _n_params(r), r["collectives"]
    assert r["breakdown"]["parameters"] / 4 == pytest.approx(n / 8, rel=0.02)
    assert coll["all-gather"]["count"] >= 2 * 6         # inside the layer scan: L=6 layers, twice
    assert coll["all-gather"]["bytes"] == pytest.approx(2 * (n + _n_layer_params("d6")), rel=0.02)
    assert coll["reduce-scatter"]["bytes"] == pytest.approx(2 * n, rel=0.02)


def test_two_hosts_of_8():
    r = report(f"{GPT2} -z 1", target="h100x8x2")
    assert r["devices"] == 16 and r["hosts"] == 2 and r["fits"]
    assert r["breakdown"]["optimizer state"] / 8 == pytest.approx(_n_params(r) / 16, rel=0.03)


def test_recompute_saves_activations():
    temps = [report(f"{GPT2} -b 8 -r {r}", target="h100x1")["breakdown"]
             [plan.ACTIVATIONS] for r in (0, 1, 2)]
    assert temps[0] > temps[1] > temps[2], temps


@pytest.mark.parametrize("family", [GPT2, LLAMA], ids=["gpt2", "llama3"])
@pytest.mark.parametrize("kernels", ["--kernels xla", "--kernels pallas -r 0", "--attention cudnn"])
def test_kernels_on_the_gpu(family, kernels):
    r = report(f"{family} -z 1 {kernels}", eval_step=True)
    k, L = r["kernels"], (6 if family == GPT2 else 2)
    assert ("pallas (Triton)" in k) == ("pallas" in kernels)
    assert ("cuDNN attention" in k) == ("cudnn" in kernels)
    if "cudnn" in kernels:    # per layer one forward and one backward call: at -r 1 (the default) the
        assert k["cuDNN attention"] == 2 * L      # backward reads the kept statistics, no second forward
    assert r["compile_seconds"]["validation"] is not None


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_matmuls_become_fp8_gemms(recipe):
    """Each FP8 layer matmul is 3 FP8 GEMMs a layer (forward, dX, dW; llm.c's 3 matmuls by default),
    as Triton fusions and, with XLA's Triton GEMMs off, as cuBLASLt FP8 GEMMs: XLA's GEMM rewriter
    finds cuBLASLt's scaled-FP8 pattern in every one of them."""
    assert fp8_gemms(report(f"{GPT2} -z 1")["kernels"]) == 0
    r = report(f"{GPT2} -z 1 --fp8 {recipe}", fp8_cublas=True)
    assert fp8_gemms(r["kernels"]) == 3 * 6 * 3
    assert r["fp8_gemms"]["expected"] == r["fp8_gemms"]["cublaslt_fp8"] == 3 * 6 * 3
    r = report(f"{LLAMA} -z 3 --fp8 {recipe} --fp8-matmuls qkv,attproj,fc,fcproj", fp8_cublas=True)
    assert fp8_gemms(r["kernels"]) == 3 * 2 * 4
    assert r["fp8_gemms"]["cublaslt_fp8"] == 3 * 2 * 4


@pytest.mark.parametrize("recompute", [0, 1])
def test_saved_attention_tensors_are_not_transposed_between_the_loops(recompute):
    """XLA's attention keeps each layer's qkv for the backward in the layout its dots read and its
    output (atty) row-major, so the stacked (L, B, T, 3C) and (L, B, T, C) residuals are written once
    by the forward scan and read as they are by the backward: no whole-stack transpose between the
    loops (it was 7.03 GiB for qkv and 2.34 GiB for atty at d48 -b 16 -r 0, beside the originals)."""
    import re
    from llmc_jax.planning import hlo_stats
    run, hlo = train_step_hlo(f"{GPT2} -r {recompute}")
    comps, entry = hlo_stats.computations(hlo)
    m = run.model
    stacks = [sorted((m.L, run.B, run.T, 3 * m.C)), sorted((m.L, run.B, run.T, m.C))]
    moves = [line for line in comps[entry] if re.search(r"transpose|\scopy\(", line)]
    shapes = [sorted(int(d) for d in dims.split(",")) for line in moves
              for dims in re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = bf16\[([\d,]+)\]", line)]
    assert shapes      # the parse finds the entry's transposes (the weights' bf16 copies)
    assert not [s for s in shapes if s in stacks]


def test_determinism_flag_rewrites_the_embedding_scatter():
    """Compiled with xla_gpu_exclude_nondeterministic_ops, the embedding backward's scatter-add gets
    its indices sorted first (deterministic); without it the same step has no sort."""
    import jax.numpy as jnp
    from llmc_jax.models.family import model_config
    from llmc_jax.nn import ops
    from tests.cuda_lowering import compile_for_gpu
    import jax
    cfg = model_config("d6")
    S = jax.ShapeDtypeStruct
    wte, wpe, idx, dx = S((cfg.Vp, cfg.C), jnp.float32), S((cfg.maxT, cfg.C), jnp.float32), S((4, 256), jnp.int32), \
        S((4, 256, cfg.C), jnp.bfloat16)
    def bwd(wte, wpe, idx, dx):
        _, vjp = jax.vjp(lambda a, b: ops.encoder(a, b, idx, jnp.zeros((), jnp.bfloat16)), wte, wpe)
        return vjp(dx)
    plain = compile_for_gpu(bwd, wte, wpe, idx, dx).as_text()
    r = report(f"{GPT2} -z 0", target="h100x1")
    assert plain.count(" scatter(") >= 1 and plain.count(" sort(") == 0
    assert r["determinism"]["scatters"] >= 1 and r["determinism"]["sorts"] >= r["determinism"]["scatters"]


@pytest.mark.parametrize("init", ["d6", "llama3:tiny"])
def test_sampler_prefill_and_decode_compile(init):
    import jax
    import jax.numpy as jnp
    from llmc_jax.evals import generate
    from llmc_jax.models.family import family_of, model_config
    from llmc_jax.nn.kernels import Kernels, ModelOptions
    from tests.cuda_lowering import TRITON_CALL, compile_for_gpu
    cfg = model_config(init)
    params = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in cfg.param_shapes().values()]
    names = list(cfg.param_shapes())
    opts = ModelOptions(dtype=jnp.bfloat16, kernels=Kernels.resolve("pallas"))
    B, S = 2, min(cfg.maxT, 64)

    def prefill(tokens, *leaves):
        return generate._prefill_jit(dict(zip(names, leaves)), tokens, 7, config=cfg, opts=opts)
    text = compile_for_gpu(prefill, jax.ShapeDtypeStruct((B, S), jnp.int32), *params).as_text()
    assert text.count(TRITON_CALL) >= 1                     # the prompt runs the chosen (Pallas) attention
    cache = jax.eval_shape(lambda: family_of(cfg).empty_cache(cfg, B, S, jnp.bfloat16))

    def decode(token, pos, k, v, *leaves):
        return generate._decode_jit(dict(zip(names, leaves)), type(cache)(k, v), token, pos, config=cfg)
    text = compile_for_gpu(decode, jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                           cache.k, cache.v, *params).as_text()
    assert text.count(TRITON_CALL) == 0                     # a decoded token: the cache's own XLA attention
