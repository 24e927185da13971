"""Training checkpoints in the output dir, laid out as llm.c's, for one process or several:

    model_%08d.bin   the llm.c model (loadable with -e by llm.c and by us), written by process 0
    state_%08d/      the train state (params, AdamW moments, count, lr, outlier detectors) as an Orbax
                     checkpoint: every process writes its own shards; restored onto the shardings of
                     the resuming run, so another device count, process count or ZeRO stage can resume
    meta_%08d.json   every device rank's data loader state and the run's flags, written by process 0
    DONE_%08d        written last by process 0, once every process has finished its part

A step without its DONE file is incomplete and never resumed from, so a run killed while writing
loses nothing that was already checkpointed. The output dir must be one every process sees (a
shared filesystem where the processes run on several hosts).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llmc_jax import distributed, llmc_format
from llmc_jax.config import GPTConfig


def paths(out_dir: str, step: int) -> dict[str, str]:
    return {"model": os.path.join(out_dir, f"model_{step:08d}.bin"),
            "state": os.path.abspath(os.path.join(out_dir, f"state_{step:08d}")),   # Orbax wants absolute
            "meta": os.path.join(out_dir, f"meta_{step:08d}.json"),
            "done": os.path.join(out_dir, f"DONE_{step:08d}")}


def _checkpointer():
    import orbax.checkpoint as ocp      # imported here: ~1 s, paid only by runs that checkpoint
    return ocp.StandardCheckpointer()


def _gather_json(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(every[i, :sizes[i]])) for i in range(len(sizes))]


def save(out_dir: str, step: int, config: GPTConfig, train_state: Any, loader_states: dict[int, dict],
         meta: dict, model_version: int = 3) -> None:
    """Write one complete checkpoint for `step`. Every process calls it (it is a collective) with the
    loader states of its own device ranks ({rank: state_dict}); `meta` must be JSON-able."""
    p = paths(out_dir, step)
    main = jax.process_index() == 0
    if main and os.path.exists(p["done"]):      # rewriting a step: incomplete until it is all there
        os.remove(p["done"])
    with _checkpointer() as ckptr:              # leaving the block waits for every shard to be written
        ckptr.save(p["state"], train_state, force=True)
    params = distributed.gather_params(train_state.params)
    loaders = {int(r): s for part in _gather_json({str(r): s for r, s in loader_states.items()})
               for r, s in part.items()}
    if main:
        llmc_format.write_model(p["model"], config, params, version=model_version)
        meta = dict(meta, train_loaders=[loaders[r] for r in sorted(loaders)])
        with open(p["meta"] + ".tmp", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(p["meta"] + ".tmp", p["meta"])
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"llmc_jax checkpoint {step}")
    if main:
        with open(p["done"], "w"):
            pass


def complete_steps(out_dir: str) -> list[int]:
    """Steps with a DONE marker and all their parts present, ascending."""
    if not os.path.isdir(out_dir):
        return []
    steps = []
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"DONE_(\d{8})", name)
        if m:
            p = paths(out_dir, int(m.group(1)))
            if os.path.isfile(p["model"]) and os.path.isdir(p["state"]) and os.path.isfile(p["meta"]):
                steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(out_dir: str) -> int | None:
    """The newest complete step (None: there is none), checked to be the same on every process."""
    steps = complete_steps(out_dir)
    latest = steps[-1] if steps else -1
    if jax.process_count() > 1:
        seen = np.asarray(multihost_utils.process_allgather(np.int32(latest))).tolist()
        if len(set(seen)) > 1:
            raise ValueError(f"the processes see different checkpoints in {out_dir} (newest complete step "
                             f"per process: {seen}); -o must be a directory every process shares")
    return None if latest < 0 else latest


def load_meta(out_dir: str, step: int) -> dict:
    """The JSON meta of `step`: every device rank's loader state, the flags of the run that wrote it."""
    with open(paths(out_dir, step)["meta"]) as f:
        return json.load(f)


def load_state(out_dir: str, step: int, template: Any, shardings: Any = None) -> Any:
    """The train state of `step`, shaped like `template` and placed on `shardings` (a pytree of
    shardings like `template`; None: this process's first device). Every process calls it."""
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), template)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), template, shardings)
    path = paths(out_dir, step)["state"]
    try:
        with _checkpointer() as ckptr:
            return ckptr.restore(path, target)
    except ValueError as e:       # Orbax names the leaf and both shapes or tree structures
        raise ValueError(f"{path} does not fit this run's model and optimizer (another model or flags?): "
                         f"{e}") from None


def loader_states(meta: dict, ranks: list[int], num_devices: int) -> tuple[list[dict], str | None]:
    """The saved train-loader states for this process's device `ranks`, and a note where the device
    count changed (else None).

    llm.c's rank layout ties the data order to the device count. Unshuffled, every rank sits at one
    token offset of its shard, which a run on another device count can continue from when its
    sample (B*T*devices tokens) divides that offset; a shuffled order (one generator per rank) has
    no equivalent on another device count, so that is refused."""
    saved = meta["train_loaders"]
    old = len(saved)
    if old == num_devices:
        return [saved[r] for r in ranks], None
    first = saved[0]
    model = f"model_{int(meta['step']):08d}.bin of the output dir"
    if first["shuffle"]:
        raise ValueError(f"it was written by a run on {old} devices and this one has {num_devices}; with "
                         f"--shuffle 1 every device rank draws its own data order, which has no equivalent on "
                         f"{num_devices} devices. Resume on {old} devices (processes x devices per process), or "
                         f"start a new run from the exported model with -e {model} (fresh optimizer state and "
                         "data order)")
    where = {(s["epoch"], s["shard_idx"], s["sample_idx"]) for s in saved}
    offset = first["sample_idx"] * first["B"] * first["T"] * old
    sample = first["B"] * first["T"] * num_devices
    if len(where) > 1 or offset % sample:
        raise ValueError(f"it was written by a run on {old} devices and this one has {num_devices}; its data "
                         f"position ({offset} tokens into shard {first['shard_idx']}) is not a whole number of "
                         f"this run's {sample}-token samples. Resume on {old} devices, or start a new run from "
                         f"the exported model with -e {model}")
    states = [dict(first, process_rank=r, num_processes=num_devices, sample_idx=offset // sample) for r in ranks]
    note = (f"note: the checkpoint was written on {old} devices, this run has {num_devices}: the data continues "
            f"from the same position ({offset} tokens into shard {first['shard_idx']}), and with the same -d every "
            "step reads the same tokens; but llm.c drops the tail of each shard past its last whole sample of "
            f"B*T*devices tokens, so from the end of this shard on the data order differs from a {old}-device "
            f"run's; and each val batch (-m) now holds B*T*{num_devices} tokens")
    return states, note


def prune(out_dir: str, step: int, every: int, keep: int, major: int) -> None:
    """llm.c's rolling retention: after writing `step`, delete step - keep*every unless it is major.
    Process 0's job; the others return at once."""
    old = step - keep * every
    if jax.process_index() != 0 or keep <= 0 or old <= 0 or (major > 0 and old % major == 0):
        return
    p = paths(out_dir, old)
    for key in ("done", "meta", "model"):          # DONE first: a half-deleted step is incomplete
        if os.path.exists(p[key]):
            os.remove(p[key])
    shutil.rmtree(p["state"], ignore_errors=True)
