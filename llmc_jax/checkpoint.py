"""Training checkpoints in the output dir, laid out as llm.c's: model_%08d.bin (an llm.c model,
loadable with -e by llm.c and by us), state_%08d.npz (everything else needed to resume exactly),
and DONE_%08d, written last. A step without its DONE file is incomplete and never resumed from,
so a run killed while writing loses nothing that was already checkpointed.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmc_jax import llmc_format
from llmc_jax.config import GPTConfig


def paths(out_dir: str, step: int) -> dict[str, str]:
    return {"model": os.path.join(out_dir, f"model_{step:08d}.bin"),
            "state": os.path.join(out_dir, f"state_{step:08d}.npz"),
            "done": os.path.join(out_dir, f"DONE_{step:08d}")}


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    """Leaves by path; bfloat16 stored as its uint16 bits (np.savez cannot hold bfloat16)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in leaves:
        a = np.asarray(leaf)
        out[jax.tree_util.keystr(path)] = a.view(np.uint16) if a.dtype == jnp.bfloat16 else a
    return out


def save(out_dir: str, step: int, config: GPTConfig, train_state: Any, meta: dict,
         model_version: int = 3) -> None:
    """Write one complete checkpoint for `step`; `meta` must be JSON-able (loader state, flags, ...)."""
    p = paths(out_dir, step)
    llmc_format.write_model(p["model"], config, train_state.params, version=model_version)
    arrays = _flatten(train_state)
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    tmp = p["state"] + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p["state"])
    with open(p["done"], "w"):
        pass


def complete_steps(out_dir: str) -> list[int]:
    """Steps with a DONE marker and both files present, ascending."""
    if not os.path.isdir(out_dir):
        return []
    steps = []
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"DONE_(\d{8})", name)
        if m:
            p = paths(out_dir, int(m.group(1)))
            if os.path.isfile(p["model"]) and os.path.isfile(p["state"]):
                steps.append(int(m.group(1)))
    return sorted(steps)


def load(out_dir: str, step: int, template: Any) -> tuple[Any, dict]:
    """(train state shaped like `template`, meta) from the checkpoint at `step`."""
    p = paths(out_dir, step)
    with np.load(p["state"]) as data:
        meta = json.loads(str(data["__meta__"]))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        restored = []
        for path, leaf in leaves:
            key = jax.tree_util.keystr(path)
            if key not in data:
                raise ValueError(f"{p['state']}: has no entry {key}; was it written by another model "
                                 "or optimizer configuration?")
            arr = data[key]
            if arr.shape != np.shape(leaf):
                raise ValueError(f"{p['state']}: {key} has shape {arr.shape}, this run expects "
                                 f"{np.shape(leaf)} (different model or flags?)")
            want = np.asarray(leaf).dtype
            restored.append(arr.view(want) if want == jnp.bfloat16 else arr.astype(want))
    return jax.tree_util.tree_unflatten(treedef, restored), meta


def prune(out_dir: str, step: int, every: int, keep: int, major: int) -> None:
    """llm.c's rolling retention: after writing `step`, delete step - keep*every unless it is major."""
    old = step - keep * every
    if keep <= 0 or old <= 0 or (major > 0 and old % major == 0):
        return
    p = paths(out_dir, old)
    for key in ("done", "state", "model"):          # DONE first: a half-deleted step is incomplete
        if os.path.exists(p[key]):
            os.remove(p[key])
