"""Our model beside Hugging Face transformers' on the same weights: the largest logits difference.

    python scripts/compare_hf.py -e out/model_00000300.bin        # exports to a temp dir, loads it there
    python scripts/compare_hf.py -e path/to/hf-checkpoint-dir     # loads the directory in both

A model file or descriptor is exported with `llmc_jax.export --format hf` first; transformers then
loads the directory with from_pretrained (fp32, CPU) and both compute logits for the same random
tokens. Needs torch and transformers (the dev extra).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--init", required=True, help="an llm.c .bin, an HF directory or a descriptor")
    p.add_argument("-b", "--batch-size", type=int, default=2)
    p.add_argument("-t", "--seq-len", type=int, default=32)
    args = p.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"compare_hf: {e.name} is not installed (pip install -e '.[dev]')")
    import jax.numpy as jnp

    from llmc_jax.formats import hf_checkpoint
    from llmc_jax.models.family import family_of, load_model

    config, params = load_model(args.init)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.init
        if not hf_checkpoint.is_hf_dir(args.init):
            hf_dir = os.path.join(tmp, "hf")
            hf_checkpoint.write_model(hf_dir, config, params)
            print(f"exported {args.init} -> {hf_dir}")
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        print(f"transformers {transformers.__version__} loaded {type(model).__name__} "
              f"({sum(p.numel() for p in model.parameters()):,} parameters)")
        T = min(args.seq_len, config.maxT)
        x = np.random.default_rng(0).integers(0, config.V, (args.batch_size, T))
        with torch.no_grad():
            ref = model(torch.tensor(x)).logits.numpy()
    ours = np.asarray(family_of(config).logits({k: jnp.asarray(v) for k, v in params.items()},
                                               jnp.asarray(x, jnp.int32), config))[..., :config.V]
    diff = np.abs(ours - ref)
    print(f"{config.describe()}\nlogits B={args.batch_size} T={T}: max |ours - transformers| = {diff.max():.3e} "
          f"(max |logit| {np.abs(ref).max():.3f}); argmax agrees on {np.mean(ours.argmax(-1) == ref.argmax(-1)):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
