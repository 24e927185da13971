"""What device_check runs: the sections and their parts with their nominal times, and the two plans
(the GPU's real shapes; --smoke's tiny ones). Data only, so that every side (the parent, the workers,
the report) reads the same numbers."""
from __future__ import annotations

SECTIONS = ("environment", "correctness", "kernels", "train", "torch")
SECTION_FILE = {name: f"{i}_{name}.json" for i, name in enumerate(SECTIONS, 1)}
LOG_FILE, SUMMARY_FILE = "device_check.log", "summary.txt"

# (part, section, nominal seconds on a GPU, nominal seconds with --smoke or None: not run there).
# A part's share of the time left is its nominal over the nominals of the parts still to run.
PARTS = [
    ("env", "environment", 15, 6),
    ("kernels", "correctness", 65, 14),
    ("model", "correctness", 65, 24),
    ("bench", "kernels", 40, 10),
    ("train-d12-b16", "train", 90, 16),        # the d12 parts share one process: the device's
    ("train-d12-b32", "train", 25, None),      # running peak-memory counter is exact for a row that
    ("train-d12-b8", "train", 15, None),       # raised it, an upper bound for the others
    ("train-llama", "train", 30, 8),
    ("train-fp8", "train", 45, 8),
    ("train-d48", "train", 45, 8),
    ("torch", "torch", 70, 12),
]

# ---------------------------------------------------------------------------------------------
# What each part runs: the GPU plan, and the smoke plan (tiny shapes, fewest compiles).

# kernel correctness cases: (kernel, label, shape, dtype). attention shape (B, T, NH, NKV, HS); the
# norms (N rows, C); matmul_gelu (N, C, OC). Most valuable first: the budget may cut the tail.
GPU_KERNEL_CASES = [
    ("canary", "half-written output", (4096, 256), "float32"),
    ("attention", "gpt2-124M", (4, 1024, 12, 12, 64), "bfloat16"),
    ("attention", "llama3.2-1B", (2, 1024, 32, 8, 64), "bfloat16"),
    ("layernorm", "gpt2-124M", (8192, 768), "bfloat16"),
    ("residual_layernorm", "gpt2-124M", (8192, 768), "bfloat16"),
    ("matmul_gelu", "gpt2-124M", (8192, 768, 3072), "bfloat16"),
    ("rmsnorm", "llama3.2-1B", (4096, 2048), "bfloat16"),
    ("residual_rmsnorm", "llama3.2-1B", (4096, 2048), "bfloat16"),
    ("attention", "gpt2-1.6B", (2, 1024, 25, 25, 64), "bfloat16"),
    ("attention", "llama3.1-8B", (1, 1024, 32, 8, 128), "bfloat16"),
    ("layernorm", "gpt2-1.6B", (4096, 1600), "bfloat16"),
    ("residual_layernorm", "gpt2-1.6B", (4096, 1600), "bfloat16"),
    ("matmul_gelu", "gpt2-1.6B", (4096, 1600, 6400), "bfloat16"),
    ("rmsnorm", "llama3.1-8B", (2048, 4096), "bfloat16"),
    ("residual_rmsnorm", "llama3.1-8B", (2048, 4096), "bfloat16"),
    ("attention", "gpt2-124M ragged T=1000", (2, 1000, 12, 12, 64), "bfloat16"),
    ("attention", "llama3.2-1B ragged T=1000", (1, 1000, 32, 8, 64), "bfloat16"),
    ("layernorm", "gpt2-124M ragged N=3001", (3001, 768), "bfloat16"),
    ("rmsnorm", "llama3.2-1B ragged N=3001", (3001, 2048), "bfloat16"),
    ("matmul_gelu", "gpt2-124M ragged N=3001", (3001, 768, 3072), "bfloat16"),
    # fp32 activations under jax.default_matmul_precision("highest"), held to the tests' 1e-5: a
    # failure of the dot kernels here says Triton ran their float32 dots in TF32.
    ("attention", "gpt2-124M fp32", (2, 1024, 12, 12, 64), "float32"),
    ("layernorm", "gpt2-124M fp32", (8192, 768), "float32"),
    ("rmsnorm", "llama3.2-1B fp32", (4096, 2048), "float32"),
    ("matmul_gelu", "gpt2-124M fp32", (8192, 768, 3072), "float32"),
]
SMOKE_KERNEL_CASES = [
    ("canary", "half-written output", (64, 128), "float32"),
    ("attention", "tiny GQA ragged T=40", (1, 40, 4, 2, 16), "bfloat16"),
    ("layernorm", "tiny ragged", (37, 96), "bfloat16"),
    ("residual_layernorm", "tiny ragged", (37, 96), "bfloat16"),
    ("rmsnorm", "tiny ragged", (37, 96), "bfloat16"),
    ("residual_rmsnorm", "tiny ragged", (37, 96), "bfloat16"),
    ("matmul_gelu", "tiny ragged", (37, 64, 256), "bfloat16"),
]

PLANS = {
    "gpu": {
        "matmul_n": 8192, "copy_bytes": 2 ** 30, "ceiling_reps": 15, "ceiling_inner": 10,
        "kernel_cases": GPU_KERNEL_CASES,
        # model gradients: bf16 variants vs fp32 XLA, then gradcheck's main (manual vs autodiff)
        "model_models": ["d12", "llama3:d12"], "model_B": 2, "model_T": 256,
        "model_variants": ["pallas", "cudnn", "xla"], "gradcheck_main": ["d12", "llama3:d12"],
        "gradcheck_kernels": "pallas",
        "bench_shapes": "gpt2", "bench_iters": 20, "bench_variants": None, "bench_ops": None,
        "bench_modes": ("fwd", "fwd+bwd"),
        "train_T": 1024, "train_kernels": ["xla", "cudnn", "pallas"], "train_recompute": [1, 0],
        "train_steps": 20, "train_warmup": 3,
        "train_parts": {"train-d12-b16": ("d12", 16), "train-d12-b32": ("d12", 32), "train-d12-b8": ("d12", 8)},
        "d48": "d48", "d48_batches": [64, 48, 32, 24, 16, 12, 8, 6, 4, 2, 1], "d48_steps": 10, "d48_warmup": 2,
        "llama": [("llama3.2:1B", 4), ("llama3:d12", 8)], "llama_kernels": ["cudnn", "pallas", "xla"],
        "llama_steps": 10, "llama_warmup": 2,
        "fp8_train": ("d12", 16), "fp8_vs_cpu": ("d6", 2, 64, 4),   # the CPU side must fit the part
        "torch_batches": [16, 32, 8], "torch_steps": 20, "torch_warmup": 3,
        "default_est_s": {"kernels": 8, "model": 25, "gradcheck": 35, "bench": 3, "train": 30},
    },
    "smoke": {
        "matmul_n": 256, "copy_bytes": 2 ** 22, "ceiling_reps": 3, "ceiling_inner": 2,
        "kernel_cases": SMOKE_KERNEL_CASES,
        # one of each thing the script does (the kernels' and models' own CPU tests cover the rest)
        "model_models": ["tiny"], "model_B": 2, "model_T": 32,
        "model_variants": ["pallas", "cudnn"], "gradcheck_main": ["llama3:tiny"], "gradcheck_kernels": "xla",
        "bench_shapes": "tiny", "bench_iters": 1, "bench_variants": ("pallas", "xla"),
        "bench_ops": ("attention", "matmul_gelu"), "bench_modes": ("fwd+bwd",),
        "train_T": 32, "train_kernels": ["xla", "cudnn"], "train_recompute": [1],
        "train_steps": 2, "train_warmup": 0,
        "train_parts": {"train-d12-b16": ("tiny", 2)},
        # d48's descent on the tiny model: -b 8 is over SMOKE_MEMORY_LIMIT, -b 2 fits
        "d48": "tiny", "d48_batches": [8, 2], "d48_steps": 1, "d48_warmup": 0,
        "llama": [("llama3:tiny", 2)], "llama_kernels": ["xla", "cudnn"],
        "llama_steps": 1, "llama_warmup": 0,
        "fp8_train": ("tiny", 2), "fp8_vs_cpu": ("tiny", 2, 32, 2),
        "torch_batches": [None], "torch_steps": None, "torch_warmup": None,
        "default_est_s": {"kernels": 3, "model": 6, "gradcheck": 8, "bench": 1, "train": 6},
    },
}
# --smoke has no device memory statistics: the d48 descent treats this as the device's free memory
# (the tiny model's step at T=32 needs ~5.6 MB at -b 8 and ~3.0 MB at -b 2 on XLA:CPU, jax 0.10.2).
SMOKE_MEMORY_LIMIT = 9 * 2 ** 19

EXIT_NOT_GPU = 3     # a worker's status when jax found no GPU on a run without --smoke
