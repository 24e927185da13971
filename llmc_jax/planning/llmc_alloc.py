"""llm.c's own device allocation for a GPT-2 run, as train_gpt2.cu computes it, to put beside ours.

From train_gpt2.cu (master): fill_in_parameter_sizes (bf16 parameters, Vp-padded wte), the same
again for the bf16 gradients, fill_in_activation_sizes (its 21 activation tensors, built with
cuDNN: fp32 layernorm statistics and attention statistics, bf16 everything else; -r 1 keeps one
layer's GELU output, -r 2 also drops the saved layernorm outputs), gpt2_allocate_state (fp32 AdamW
m and v and, with -w 1, fp32 master weights, each sharded over the GPUs at -z 1; inputs and targets)
and the 32 MiB cuBLASLt workspace (llmc/cublas_common.h). cuDNN's own workspace, allocated as
needed (up to 256 MiB), is not counted.
"""
from __future__ import annotations

import math

CUBLASLT_WORKSPACE = 32 * 1024 * 1024
BF16, F32 = 2, 4


def activation_bytes(config, B: int, T: int, recompute: int) -> int:
    """fill_in_activation_sizes with ENABLE_CUDNN, in bytes."""
    L, NH, C, Vp = config.L, config.NH, config.C, config.Vp
    bf16 = [B * T * C,                                        # encoded
            L * B * T * C if recompute < 2 else 0,            # ln1
            L * B * T * C,                                    # atty
            L * B * T * C,                                    # residual2
            L * B * T * C if recompute < 2 else 0,            # ln2
            L * B * T * 4 * C,                                # fch
            L * B * T * 4 * C if recompute < 1 else B * T * 4 * C,   # fch_gelu
            L * B * T * C,                                    # residual3
            B * T * C,                                        # lnf
            L * B * T * 3 * C,                                # qkvr
            B * T * max(3 * C, NH * T, Vp),                   # output (logits / scratch)
            B * T * 4 * C,                                    # scratch_bt4c
            B * T * C]                                        # scratch_btc
    f32 = [L * B * T, L * B * T,                              # ln1 mean, rstd
           L * B * NH * T,                                    # att: cuDNN's softmax statistics
           L * B * T, L * B * T,                              # ln2 mean, rstd
           B * T, B * T, B * T]                               # lnf mean, rstd; losses
    return BF16 * sum(bf16) + F32 * sum(f32)


def allocation(config, B: int, T: int, recompute: int, gpus: int, zero_stage: int,
               master_weights: bool = True) -> dict[str, int]:
    """Bytes per GPU by llm.c's buffers; "total" is their sum. ZeRO-1 (llm.c's only sharding) for -z >= 1."""
    n = sum(math.prod(s) for s in config.param_shapes().values())
    shard = math.ceil(n / gpus) if zero_stage >= 1 else n
    parts = {"parameters (bf16)": BF16 * n, "gradients (bf16)": BF16 * n, "AdamW m, v (fp32)": 2 * F32 * shard,
             "master weights (fp32)": F32 * shard if master_weights else 0,
             "activations": activation_bytes(config, B, T, recompute),
             "inputs, targets, cuBLASLt workspace": 2 * 4 * B * T + CUBLASLT_WORKSPACE}
    parts["total"] = sum(parts.values())
    return parts


def largest_batch(config, T: int, recompute: int, gpus: int, zero_stage: int, capacity: int,
                  master_weights: bool = True) -> int:
    """The largest B whose allocation fits `capacity` bytes (0 if none)."""
    fixed = allocation(config, 0, T, recompute, gpus, zero_stage, master_weights)["total"]
    per_row = allocation(config, 1, T, recompute, gpus, zero_stage, master_weights)["total"] - fixed
    return max(0, (capacity - fixed) // per_row)
