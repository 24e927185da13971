"""Section 2, correctness: every Pallas kernel compiled for the device, forward and backward, against
float64 NumPy on fresh random inputs, with the device's free memory filled with NaN before each run
(a canary kernel that writes half its output proves the fill shows); then the model's gradients in
bf16 with the GPU kernels against the fp32 XLA path, and llmc_jax.gradcheck's own main."""
from __future__ import annotations

import contextlib
import io
import time

import numpy as np

from llmc_jax.errors import UsageError

from .common import Skip, highest_precision, memory_stats, platform, random_params
from .recorder import Recorder
from .reference import kernel_problem

_FILLS: dict = {}


def poison_free_memory() -> str:
    """Fill the device's free memory with NaN and free it again, so that buffers the next program
    allocates (its outputs and temporaries) start as NaN: an element a kernel never writes then
    fails the check (NaN never passes). XLA's allocator hands out freed memory, so filling what is
    free in descending chunk sizes and dropping it covers every free chunk down to 256 KiB. On a
    CPU the kernels run in Pallas' interpret mode, which starts every output as NaN itself."""
    import jax
    import jax.numpy as jnp
    stats = memory_stats()
    if platform() == "cpu" or not stats or "bytes_limit" not in stats:
        return "interpret mode: outputs start as NaN"
    held, filled = [], 0
    margin = 64 * 2 ** 20
    for size in (2 ** 30, 2 ** 26, 2 ** 22, 2 ** 18):
        if size not in _FILLS:
            _FILLS[size] = jax.jit(lambda n=size: jnp.full((n // 4,), jnp.nan, jnp.float32))
        while True:
            stats = memory_stats() or {}
            if stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0) - margin < size:
                break
            try:
                held.append(_FILLS[size]())
            except Exception:   # noqa: BLE001  (fragmented: try the next, smaller size)
                break
            filled += size
    jax.block_until_ready(held)
    del held
    return f"{filled / 2 ** 30:.1f} GiB of free device memory filled with NaN"


def _canary_case(shape: tuple) -> dict:
    """A Pallas kernel that writes only the first half of its output's row blocks: a harness whose
    NaN fill works sees NaN in every element of the second half."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.common import compiler_params, pl, resolve_interpret
    N, C = shape
    block = 16

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def half(x):
        return pl.pallas_call(kernel, grid=(N // block // 2,),
                              in_specs=[pl.BlockSpec((block, C), lambda i: (i, 0))],
                              out_specs=pl.BlockSpec((block, C), lambda i: (i, 0)),
                              out_shape=jax.ShapeDtypeStruct((N, C), x.dtype),
                              compiler_params=compiler_params(num_warps=4, num_stages=1),
                              interpret=resolve_interpret(None), name="device_check_canary")(x)

    x = np.random.default_rng().normal(0, 1, (N, C)).astype(np.float32)
    compiled = jax.jit(half).lower(jnp.asarray(x)).compile()
    xd = jnp.asarray(x)
    how = poison_free_memory()
    out = np.asarray(compiled(xd))
    written_ok = bool(np.allclose(out[:N // 2], 2 * x[:N // 2]))
    nan_rows = int(np.isnan(out[N // 2:]).all(axis=1).sum())
    detected = nan_rows == N // 2
    return {"poison": how, "first_half_correct": written_ok, "unwritten_rows_nan": nan_rows, "unwritten_rows": N // 2,
            "status": "ok" if written_ok and detected else "fail",
            **({} if detected else {"reason": "NaN fill ineffective: unwritten output elements read finite values, "
                                              "so the kernel rows below cannot prove every element is written"})}


def kernel_case(kernel: str, label: str, shape: tuple, dtype: str) -> dict:
    """One kernel at one shape and dtype, compiled, run on NaN-filled memory and held to float64: per
    output its relative error, non-finite count, dtype and shape; the worst against its tolerance."""
    import jax
    if kernel == "canary":
        return _canary_case(shape)
    rng = np.random.default_rng()                # fresh inputs every run
    precision = highest_precision() if dtype == "float32" else contextlib.nullcontext()
    with precision:
        fn, args, cts, truth, out_dtypes = kernel_problem(kernel, shape, dtype, rng)

        def run(*a):
            out, vjp = jax.vjp(fn, *a)
            return (*(out if isinstance(out, tuple) else (out,)), *vjp(cts))
        t0 = time.time()
        compiled = jax.jit(run).lower(*args).compile()
        compile_s = time.time() - t0
        how = poison_free_memory()
        got = jax.block_until_ready(compiled(*args))
    checks, ok = [], True
    for (name, ref, tol), g, want_dtype in zip(truth, got, out_dtypes):
        g64 = np.asarray(g.astype("float32"), np.float64)
        bad = int(g64.size - np.count_nonzero(np.isfinite(g64)))
        rel = float(np.max(np.abs(g64 - ref)) / max(float(np.max(np.abs(ref))), 1e-30)) if not bad else float("nan")
        good = bad == 0 and rel < tol and g.dtype == want_dtype and g.shape == ref.shape
        ok &= good
        checks.append({"name": name, "rel_error": rel, "tol": tol, "nonfinite": bad, "dtype": str(g.dtype),
                       "shape": list(g.shape), "ok": good})
    worst = max(checks, key=lambda c: (not c["ok"], c["rel_error"] / c["tol"] if c["rel_error"] == c["rel_error"]
                                       else float("inf")))
    return {"status": "ok" if ok else "fail", "compile_s": compile_s, "poison": how, "checks": checks,
            "worst": f"{worst['name']} {worst['rel_error']:.2e} / tol {worst['tol']:.1e}",
            "worst_ratio": worst["rel_error"] / worst["tol"] if worst["rel_error"] == worst["rel_error"] else None}


def part_kernels(rec: Recorder, plan: dict, ctx: dict) -> None:
    """The plan's kernel cases, most valuable first (the budget may cut the tail)."""
    est = plan["default_est_s"]["kernels"]
    for kernel, label, shape, dtype in plan["kernel_cases"]:
        rec.item(f"{kernel} {label} {dtype}", "kernel", est,
                 lambda k=kernel, lb=label, s=shape, d=dtype: kernel_case(k, lb, s, d),
                 kernel=kernel, label=label, shape=list(shape), dtype=dtype)


def _variant_kernels(variant: str, recompute: int = 0):
    import bench_train
    return bench_train.resolve_kernels(variant, recompute)


def _grads_vs_fp32(rec: Recorder, plan: dict) -> None:
    """Each kernel choice's bf16 gradients on each model against the fp32 XLA path's (exact fp32
    matmuls), within gradcheck's bf16 tolerance; the fp32 reference is computed once per model."""
    import jax
    import jax.numpy as jnp
    from llmc_jax import gradcheck
    from llmc_jax.models.family import family_of, from_descriptor
    from llmc_jax.nn.kernels import XLA, ModelOptions
    tol = gradcheck.TOLERANCE["bfloat16"]
    B, T = plan["model_B"], plan["model_T"]
    refs: dict = {}
    on_gpu = platform() == "gpu"

    def reference(model):
        if model not in refs:
            cfg = from_descriptor(model)
            params = random_params(cfg)
            tok = np.random.default_rng(0).integers(0, cfg.V, (B, T + 1)).astype(np.int32)
            x, y = jnp.asarray(tok[:, :-1]), jnp.asarray(tok[:, 1:])
            with highest_precision():                           # exact fp32 matmuls (no TF32)
                loss, grads = jax.jit(family_of(cfg).value_and_grad(cfg, ModelOptions(jnp.float32, XLA)))(params, x, y)
            refs[model] = cfg, params, x, y, float(loss), {k: np.asarray(v) for k, v in grads.items()}
        return refs[model]

    def compare(model, variant):
        if variant == "cudnn" and not on_gpu:
            raise Skip("cuDNN attention needs an NVIDIA GPU")
        cfg, params, x, y, loss32, g32 = reference(model)
        kernels = _variant_kernels(variant)
        opts = ModelOptions(jnp.bfloat16, kernels)
        loss, grads = jax.jit(family_of(cfg).value_and_grad(cfg, opts))(params, x, y)
        errs = {k: gradcheck.relative_error(np.asarray(grads[k], np.float32), g32[k])[1] for k in g32}
        bad = sorted(k for k, e in errs.items() if not e <= tol)
        worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
        return {"status": "fail" if bad else "ok", "kernels": str(kernels), "loss_bf16": float(loss),
                "loss_fp32": loss32, "tol": tol, "worst": f"{worst} {errs[worst]:.2e}", "worst_rel": errs[worst],
                "failed_tensors": bad, "rel_errors": errs}

    est = plan["default_est_s"]["model"]
    for variant in plan["model_variants"]:          # each kernel choice on both models before the next
        for model in plan["model_models"]:
            rec.item(f"{model} bf16 {variant} vs fp32 xla", "model", est,
                     lambda m=model, v=variant: compare(m, v), model=model, variant=variant, B=B, T=T,
                     check="grads vs fp32 XLA")
    refs.clear()


def _gradcheck_main(model: str, plan: dict) -> dict:
    """llmc_jax.gradcheck's own main (manual backward vs autodiff) on `model`, its output kept."""
    from llmc_jax import gradcheck
    B, T = plan["model_B"], plan["model_T"]
    argv = ["-e", model, "-b", str(B), "-t", str(T), "--dtype", "bfloat16", "--kernels", plan["gradcheck_kernels"]]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = gradcheck.main(argv)
        except UsageError as e:
            rc = f"usage: {e.message}"
    text = buf.getvalue()
    print(text, flush=True)
    failing = [ln.strip() for ln in text.splitlines() if "NOT OK" in ln]
    return {"status": "ok" if rc == 0 else "fail", "rc": rc, "argv": " ".join(argv),
            "worst": "all OK" if rc == 0 else f"exit {rc}; NOT OK: {', '.join(ln.split()[0] for ln in failing)}",
            "not_ok_rows": failing[:20]}


def part_model(rec: Recorder, plan: dict, ctx: dict) -> None:
    """The model's gradients: bf16 with each kernel choice vs fp32 XLA, then gradcheck's main."""
    _grads_vs_fp32(rec, plan)
    for model in plan["gradcheck_main"]:
        rec.item(f"gradcheck {model} bf16 --kernels {plan['gradcheck_kernels']} (manual vs autodiff)", "gradcheck",
                 plan["default_est_s"]["gradcheck"], lambda m=model: _gradcheck_main(m, plan), model=model,
                 check="llmc_jax.gradcheck main")
