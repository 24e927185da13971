"""The PyTorch peer of scripts/bench_train.py: GPT-2 training speed as llm.c's train_gpt2.py gets it
at its fastest settings, timed the way bench_train.py times our JAX step.

    python scripts/bench_torch_gpt2.py --model d12 -b 16 -t 1024 --steps 20 --json torch.json
    python scripts/bench_torch_gpt2.py --smoke          # tiny model, CPU, a few seconds

Model: llm.c's GPT-2 (L, NH, C from --model; vocabulary V=50257 padded to Vp=50304, maxT=1024),
tied token embedding and classifier, tanh GELU, LayerNorm eps 1e-5, attention through
F.scaled_dot_product_attention(is_causal=True) (FlashAttention on a GPU, --sdpa to choose), the
loss a softmax over the first V of the Vp logits, as llm.c's CUDA trainer and our JAX model compute
it. Init as llm.c: N(0, 0.02) drawn in llm.c's order from a generator seeded 42, the residual
projections' std 0.02/sqrt(2L); padded vocabulary rows and biases 0, LayerNorm weights 1.

Step: bf16 autocast (--dtype), torch.compile of the model (--compile, default on a GPU), AdamW lr 6e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the 2-D tensors only, fused on CUDA; gradients
clipped at norm 1.0; TF32 matmuls allowed; -a micro-batches per step.

Timing: fresh random tokens for every step, generated on the device beforehand; the first step
(compilation included) timed on its own, --warmup untimed steps, then --steps timed ones, each ended
by torch.cuda.synchronize(). Reported: median and min ms/step, tokens/s, GFLOP/s and MFU by llm.c's
formula (6N + 6LCT per token; llmc_jax.training.mfu's peak for the device), peak device memory, the
first and last step's loss, versions. If torch.compile fails, the run says why and times the eager
model instead (compile_error in the JSON). `--json FILE` writes everything; its layout follows
bench_train.py's: device, versions, config, and `variants` with this run's one entry.
Without PyTorch the script says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc_jax.errors import ArgumentParser, UsageError, describe, run_command, user_files  # noqa: E402
from llmc_jax.models.config import GPTConfig, from_descriptor  # noqa: E402
from llmc_jax.training import mfu  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    _TORCH_ERROR = None
except (ImportError, OSError) as e:     # reported by main() in one line; --help still works
    torch = F = nn = None
    _TORCH_ERROR = describe(e, 200)

MODELS = ("d12", "d24", "d36", "d48", "tiny")
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP, INIT_SEED, DATA_SEED = 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0, 42, 0
SDPA = ("flash", "cudnn", "efficient", "math")          # --sdpa: enable only this backend
# --smoke: the tiny preset (L=2, NH=4, C=64, V=256) on the CPU, uncompiled, a few steps
SMOKE = {"model": "tiny", "batch_size": 2, "seq_len": 32, "steps": 3, "warmup": 1, "device": "cpu", "compile": 0}
DEFAULTS = {"model": "d12", "batch_size": 4, "seq_len": 64, "steps": 10, "warmup": 2, "device": "auto"}

_Module = nn.Module if nn is not None else object


# ------------------------------------------------------------------ the model

class Block(_Module):
    """One pre-LayerNorm transformer block; its Linear weights are llm.c's (out, in) tensors as they are."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.C
        self.NH = cfg.NH
        self.ln1 = nn.LayerNorm(C, eps=1e-5)
        self.qkv = nn.Linear(C, 3 * C)
        self.attproj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C, eps=1e-5)
        self.fc = nn.Linear(C, 4 * C)
        self.fcproj = nn.Linear(4 * C, C)

    def forward(self, x_BTC):
        B, T, C = x_BTC.shape
        # qkv's 3C outputs are q, k, v in turn, each head after head: (3, B, NH, T, HS)
        q, k, v = self.qkv(self.ln1(x_BTC)).view(B, T, 3, self.NH, C // self.NH).permute(2, 0, 3, 1, 4)
        y_BNTH = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BTC = x_BTC + self.attproj(y_BNTH.transpose(1, 2).reshape(B, T, C))
        return x_BTC + self.fcproj(F.gelu(self.fc(self.ln2(x_BTC)), approximate="tanh"))


class GPT(_Module):
    """llm.c's GPT-2; forward(idx, targets) is the mean cross-entropy over the B*T positions."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.Vp, cfg.C)          # also the classifier (tied)
        self.wpe = nn.Embedding(cfg.maxT, cfg.C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.L))
        self.lnf = nn.LayerNorm(cfg.C, eps=1e-5)

    def forward(self, idx_BT, targets_BT):
        T = idx_BT.shape[1]
        x = self.wte(idx_BT) + self.wpe.weight[:T]
        for block in self.blocks:
            x = block(x)
        logits_BTV = F.linear(self.lnf(x), self.wte.weight)[..., :self.cfg.V]   # the padded columns are not classes
        return F.cross_entropy(logits_BTV.reshape(-1, self.cfg.V).float(), targets_BT.reshape(-1))


def init_llmc(model: GPT, seed: int = INIT_SEED) -> None:
    """llm.c's init, drawn in train_gpt2.py's module order from a CPU generator seeded `seed`: wte's
    first V rows, wpe, then per layer qkvw, attprojw, fcw, fcprojw (std 0.02/sqrt(2L) for the two
    residual projections); padded wte rows and biases 0, LayerNorm weights 1."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    resid_std = 0.02 / math.sqrt(2 * cfg.L)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
        model.wte.weight.zero_()
        model.wte.weight[:cfg.V].normal_(0.0, 0.02, generator=g)
        model.wpe.weight.normal_(0.0, 0.02, generator=g)
        for b in model.blocks:
            for lin, std in ((b.qkv, 0.02), (b.attproj, resid_std), (b.fc, 0.02), (b.fcproj, resid_std)):
                lin.weight.normal_(0.0, std, generator=g)


# per block: (submodule, llm.c's weight name, llm.c's bias name); these tensors are stacked on a leading L axis
_LAYER_TENSORS = (("ln1", "ln1w", "ln1b"), ("qkv", "qkvw", "qkvb"), ("attproj", "attprojw", "attprojb"),
                  ("ln2", "ln2w", "ln2b"), ("fc", "fcw", "fcb"), ("fcproj", "fcprojw", "fcprojb"))


def llmc_tensors(model: GPT) -> dict[str, list]:
    """The parameters under llm.c's 16 names (our JAX params' names): one tensor per layer for the
    per-layer ones, a list of one tensor for the others."""
    out = {"wte": [model.wte.weight], "wpe": [model.wpe.weight], "lnfw": [model.lnf.weight], "lnfb": [model.lnf.bias]}
    for mod, w, b in _LAYER_TENSORS:
        out[w] = [getattr(block, mod).weight for block in model.blocks]
        out[b] = [getattr(block, mod).bias for block in model.blocks]
    return out


def load_llmc_params(model: GPT, params: dict) -> None:
    """Copy llm.c's 16 tensors (our JAX names and shapes: per-layer ones stacked on L) into the model."""
    layered = {name for _, w, b in _LAYER_TENSORS for name in (w, b)}
    with torch.no_grad():
        for name, tensors in llmc_tensors(model).items():
            value = torch.as_tensor(params[name], dtype=torch.float32)
            parts = value.unbind(0) if name in layered else [value]
            if len(parts) != len(tensors) or any(tuple(v.shape) != tuple(t.shape) for v, t in zip(parts, tensors)):
                raise ValueError(f"param {name} has shape {tuple(value.shape)}, which does not fit this model")
            for t, v in zip(tensors, parts):
                t.copy_(v)


def make_optimizer(model: GPT, fused: bool):
    """llm.c's AdamW: weight decay on the 2-D tensors (embeddings, matmul weights) only."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True if fused else None)


def train_step(forward, model: GPT, optimizer, xs, ys, autocast):
    """One optimizer step over the micro-batches xs, ys; returns (mean loss, pre-clip grad norm) as
    device tensors, so that nothing waits for the device here."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in zip(xs, ys):
        with autocast():
            loss = forward(x, y) / len(xs)
        loss.backward()
        total = total + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return total, norm


# ------------------------------------------------------------------ flags

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=None, help="llm.c depth (default d12; tiny: the test preset)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="micro-batch size (default 4)")
    p.add_argument("-t", "--seq-len", type=int, default=None, help="sequence length (default 64)")
    p.add_argument("-a", "--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autocast dtype; default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="default auto: cuda where torch sees a GPU")
    p.add_argument("--compile", type=int, choices=(0, 1), default=None,
                   help="torch.compile the model (default 1 on a GPU, 0 on the CPU)")
    p.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"), default="default")
    p.add_argument("--sdpa", choices=("auto",) + SDPA, default="auto",
                   help="attention backend (default auto: PyTorch's choice, FlashAttention on H100)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on the CPU (one thread), uncompiled: --model tiny -b 2 -t 32 --steps 3 "
                        "--warmup 1 unless given")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, key, least in (("-b", "batch_size", 1), ("-t", "seq_len", 1), ("-a", "grad_accum", 1),
                             ("--steps", "steps", 1), ("--warmup", "warmup", 0)):
        if getattr(args, key) < least:
            raise UsageError(f"{flag} {getattr(args, key)}: must be >= {least}")
    maxT = from_descriptor(args.model).maxT
    if args.seq_len > maxT:
        raise UsageError(f"-t {args.seq_len}: must be <= the model's maxT {maxT}")
    return args


# ------------------------------------------------------------------ the run

def versions(device) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "triton": None,
           "python": platform.python_version()}
    if device.type == "cuda":
        out["cudnn"] = torch.backends.cudnn.version()
        try:
            import triton
            out["triton"] = triton.__version__
        except Exception:       # noqa: BLE001  (a version report, not a requirement)
            pass
    return out


def choose_sdpa(args, cfg: GPTConfig, device, dtype) -> str:
    """Restrict SDPA to --sdpa's backend, and name the backend it picks for the model's attention."""
    if args.sdpa != "auto":
        for name, setter in (("flash", torch.backends.cuda.enable_flash_sdp),
                             ("cudnn", torch.backends.cuda.enable_cudnn_sdp),
                             ("efficient", torch.backends.cuda.enable_mem_efficient_sdp),
                             ("math", torch.backends.cuda.enable_math_sdp)):
            setter(name == args.sdpa)
    q = torch.zeros(args.batch_size, cfg.NH, args.seq_len, cfg.HS, device=device, dtype=dtype)
    try:
        from torch.nn.attention import SDPBackend
        choice = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    except Exception as e:      # noqa: BLE001  (a private helper: the report is best effort)
        if args.sdpa != "auto":
            raise RuntimeError(f"--sdpa {args.sdpa}: {describe(e, 300)}; use --sdpa auto") from None
        return "unknown"
    if choice == "ERROR":
        raise RuntimeError(f"--sdpa {args.sdpa}: this PyTorch cannot run that attention backend for "
                           f"B={args.batch_size} NH={cfg.NH} T={args.seq_len} HS={cfg.HS} in {dtype}; "
                           "use --sdpa auto")
    return choice


def _compile(model: GPT, mode: str):
    return torch.compile(model, mode=mode)


class Runner:
    """The model, its optimizer and the pre-generated batches; step(i) runs step i and waits for it."""

    def __init__(self, args, cfg: GPTConfig, device, dtype):
        self.model = GPT(cfg)
        init_llmc(self.model)
        self.model.to(device)
        self.optimizer = make_optimizer(self.model, fused=device.type == "cuda")
        self.forward = self.model
        self.device = device
        enabled = dtype != torch.float32
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=enabled)
        g = torch.Generator(device=device).manual_seed(DATA_SEED)
        n = 1 + args.warmup + args.steps
        # one tensor per micro-batch, each its own allocation: the compiled model sees the same layout every call
        self.batches = []
        for _ in range(n):
            tok = torch.randint(0, cfg.V, (args.grad_accum, args.batch_size, args.seq_len + 1),
                                device=device, generator=g)
            self.batches.append(([t[:, :-1].contiguous() for t in tok], [t[:, 1:].contiguous() for t in tok]))
        self.losses: list = []
        self.norm = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, i: int) -> float:
        """Run step i to completion; its wall seconds."""
        self.sync()
        t0 = time.perf_counter()
        loss, self.norm = train_step(self.forward, self.model, self.optimizer, *self.batches[i], self.autocast)
        self.sync()
        dt = time.perf_counter() - t0
        self.losses.append(loss)
        return dt


def first_step(runner: Runner, args) -> tuple[float, str | None]:
    """The first step, compiled where asked; if compilation fails, the eager model's first step and why."""
    if not args.compile:
        return runner.step(0), None
    runner.forward = _compile(runner.model, args.compile_mode)
    try:
        return runner.step(0), None
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:      # noqa: BLE001  (reported, and the run goes on uncompiled)
        error = f"{type(e).__name__}: {describe(e, 300)}"
        print(f"torch.compile failed ({error}); timing the eager model instead", flush=True)
        torch._dynamo.reset()
        runner.forward, runner.losses = runner.model, []
        runner.optimizer.zero_grad(set_to_none=True)
        return runner.step(0), error


def run(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this PyTorch sees no CUDA device "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.compile is None:
        args.compile = int(device.type == "cuda")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    cfg = from_descriptor(args.model)
    torch.set_float32_matmul_precision("high")         # TF32 for whatever runs in fp32
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sdpa = choose_sdpa(args, cfg, device, dtype)
    B, T, A = args.batch_size, args.seq_len, args.grad_accum
    where = f"cuda {kind}" if device.type == "cuda" else "cpu"
    print(f"device {where}, torch {torch.__version__} (CUDA {torch.version.cuda}), model {args.model} "
          f"({cfg.num_parameters:,} params), B={B} T={T} A={A} {args.dtype} compile={args.compile} "
          f"sdpa={sdpa}", flush=True)

    runner = Runner(args, cfg, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_s, compile_error = first_step(runner, args)
    for i in range(1, 1 + args.warmup):
        runner.step(i)
    times = [runner.step(i) for i in range(1 + args.warmup, 1 + args.warmup + args.steps)]

    tokens = A * B * T
    med = statistics.median(times)
    flops = cfg.flops_per_token(T) * tokens
    compiled = args.compile and compile_error is None
    result = {"first_step_s": first_s, "step_ms_median": 1000 * med, "step_ms_min": 1000 * min(times),
              "step_ms_all": [1000 * t for t in times], "tok_per_s": tokens / med, "gflops": flops / med / 1e9,
              "mfu": mfu.mfu(flops, med, 1, kind), "peak_flops": mfu.device_peak_flops(kind),
              "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
              "first_loss": float(runner.losses[0]), "last_loss": float(runner.losses[-1]),
              "last_grad_norm": float(runner.norm), "compiled": bool(compiled), "compile_error": compile_error,
              "sdpa_backend": sdpa, "fused_adamw": device.type == "cuda"}
    name = f"torch-{'compile' if compiled else 'eager'}"
    return {"device": where, "device_kind": kind, **versions(device),
            "model": {"name": args.model, "L": cfg.L, "NH": cfg.NH, "C": cfg.C, "maxT": cfg.maxT, "V": cfg.V,
                      "Vp": cfg.Vp, "num_parameters": cfg.num_parameters, "flops_per_token": cfg.flops_per_token(T)},
            "optimizer": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
                          "grad_clip": GRAD_CLIP},
            "config": vars(args), "variants": {name: result}}


def print_table(out: dict) -> None:
    (name, r), = out["variants"].items()
    mem = "n/a" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
    util = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{'variant':>13} | {'first s':>7} | {'median ms':>9} | {'min ms':>8} | {'tok/s':>9} | {'GFLOP/s':>8} | "
          f"{'MFU':>6} | {'peak MB':>8} | {'loss first -> last':>18}")
    print(f"{name:>13} | {r['first_step_s']:7.2f} | {r['step_ms_median']:9.2f} | {r['step_ms_min']:8.2f} | "
          f"{r['tok_per_s']:9.0f} | {r['gflops']:8.1f} | {util:>6} | {mem:>8} | "
          f"{r['first_loss']:8.4f} -> {r['last_loss']:7.4f}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch is None:
        raise UsageError(f"PyTorch is not installed in this Python ({_TORCH_ERROR}); the PyTorch peer needs it")
    if args.json:               # a bad path fails now, not after the run
        with user_files(), open(args.json, "w"):
            pass
    threads = torch.get_num_threads()
    if args.smoke:              # on a busy CPU, torch's spinning worker threads stall tiny ops 100-fold
        torch.set_num_threads(1)
    try:
        out = run(args)
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(f"out of device memory ({describe(e, 200)}); lower -b or -t, or use -a") from None
    finally:
        torch.set_num_threads(threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print_table(out)
    return 0


if __name__ == "__main__":
    run_command(main, "lower -b or -t, or use -a")
