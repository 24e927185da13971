"""Training checkpoints in the output dir, laid out as llm.c's, for one process or several:

    model_%08d.bin   the llm.c model (loadable with -e by llm.c and by us), written by process 0
    state_%08d/      the train state (params, AdamW moments, count, lr, outlier detectors, FP8 metas) as an Orbax
                     checkpoint: every process writes its own shards; restored onto the shardings of
                     the resuming run, so another device count, process count or ZeRO stage can resume
    meta_%08d.json   every device rank's data loader state and the run's flags, written by process 0
    DONE_%08d        written last by process 0, once every process has finished its part: the
                     manifest that a resume verifies the step against (checkpoint_manifest)

A step without its DONE file is incomplete and never resumed from, so a run killed while writing
loses nothing that was already checkpointed. A train state holding NaN/Inf is never written. The
output dir must be one every process sees (a shared filesystem where the processes run on several
hosts).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llmc_jax.training import parallel
from llmc_jax.models import family
from llmc_jax.errors import describe


def paths(out_dir: str, step: int) -> dict[str, str]:
    return {"model": os.path.join(out_dir, f"model_{step:08d}.bin"),
            "state": os.path.abspath(os.path.join(out_dir, f"state_{step:08d}")),   # Orbax wants absolute
            "meta": os.path.join(out_dir, f"meta_{step:08d}.json"),
            "done": os.path.join(out_dir, f"DONE_{step:08d}")}


class CheckpointError(ValueError):
    """A checkpoint that disagrees with its manifest or with this run: one line naming the file."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (the output dir turned unwritable, the disk is full)."""


class NonFiniteStateError(ValueError):
    """The train state holds NaN/Inf: writing it would make a resume point that can only produce NaN."""


def _checkpointer():
    import orbax.checkpoint as ocp      # imported here: ~1 s, paid only by runs that checkpoint
    return ocp.StandardCheckpointer()


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax logs its own failures with tracebacks on stderr; we report them in one line instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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


def first_problem(problem: str | None) -> str | None:
    """The first process's problem (None: none has one), so every process stops together (a collective)."""
    return next((p for p in _gather_json(problem) if p), None)


def probe_writable(out_dir: str) -> None:
    """Create, write and delete a small file in `out_dir`: raises OSError where that fails, at once
    (where Orbax would first wait on its own timeouts)."""
    probe = os.path.join(out_dir, f".write_probe_{os.getpid()}_{jax.process_index()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
    os.remove(probe)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def state_is_finite(train_state: Any) -> bool:
    """Every param and AdamW moment finite: one jitted reduction (the same answer on every process)."""
    opt = train_state.opt_state
    return bool(_all_finite(jax.tree.leaves((train_state.params, opt.mu, opt.nu))))


def scalar(x: Any) -> int:
    """A replicated scalar as an int, also where other processes hold copies of it."""
    return int(np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x))


def write_json_atomic(path: str, obj: Any) -> None:
    """tmp + fsync + os.replace + fsync of the dir: `path` holds all of `obj` or is absent."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _attempt(fn, *args) -> str | None:
    """None where fn(*args) succeeds, else its error in one line (a write failure, not a traceback)."""
    try:
        fn(*args)
    except Exception as e:      # Orbax and tensorstore wrap OSErrors in their own types
        return describe(e, 300) if isinstance(e, OSError) else f"{type(e).__name__}: {describe(e, 300)}"
    return None


class _StateWithoutFp8(NamedTuple):
    """A train state as checkpoints hold it when FP8 is off: the four fields of every checkpoint
    written before TrainState had `fp8`, so those resume and off-runs write the same tree as before."""

    params: Any
    opt_state: Any
    loss_detector: Any
    norm_detector: Any


def _on_disk(tree: Any) -> Any:
    """What Orbax saves and restores for a TrainState (or a like-shaped tree of shardings or
    templates): the state itself with FP8 metas, without the empty fp8 field otherwise."""
    if getattr(tree, "fp8", None) is None and hasattr(tree, "norm_detector"):
        return _StateWithoutFp8(tree.params, tree.opt_state, tree.loss_detector, tree.norm_detector)
    return tree


def _from_disk(restored: Any, template: Any) -> Any:
    return type(template)(*restored, None) if isinstance(restored, _StateWithoutFp8) else restored


def _saved_fp8_matmuls(ckptr: Any, path: str) -> tuple[str, ...] | None:
    """The FP8 matmuls whose metas the state dir holds (() for an --fp8 off state; None: its metadata
    cannot tell, and Orbax decides)."""
    try:
        tree = ckptr.metadata(path).item_metadata.tree
    except Exception:     # noqa: BLE001 - an unreadable dir is reported by the restore itself
        return None
    if not isinstance(tree, dict):
        return None
    metas = tree.get("fp8")
    return tuple(metas) if isinstance(metas, dict) else ()


def _check_fp8_match(ckptr: Any, path: str, template: Any) -> None:
    """One line where the checkpoint and this run disagree on --fp8 or --fp8-matmuls (the state
    trees differ)."""
    if not hasattr(template, "norm_detector"):
        return
    saved, want = _saved_fp8_matmuls(ckptr, path), tuple(getattr(template, "fp8", None) or ())
    if saved is None or set(saved) == set(want):
        return
    if not saved or not want:
        have = "FP8 metas (a --fp8 delayed/current run)" if saved else "no FP8 metas (a --fp8 off run)"
        raise CheckpointError(f"{path} holds {have}, and this run has --fp8 {'on' if want else 'off'}; "
                              "resume with the --fp8 setting of the run that wrote it")
    raise CheckpointError(f"{path} holds FP8 metas for --fp8-matmuls {','.join(sorted(saved))}, and this run "
                          f"has {','.join(sorted(want))}; resume with the --fp8-matmuls of the run that wrote it")


def _save_state(path: str, train_state: Any) -> None:
    try:
        with _orbax_quiet(), _checkpointer() as ckptr:   # leaving the block waits for every shard
            ckptr.save(path, _on_disk(train_state), force=True)
    except BaseException:
        _release_orbax_threads()
        raise


def _release_orbax_threads() -> None:
    """A failed Orbax save leaves non-daemon threads waiting up to 300 s for signals of the steps
    that failed, and the interpreter waits for them at exit: cancel them and send those signals.
    Orbax internals (0.12): with another version the threads end on their own timeout instead."""
    # their work, never started, is dropped: no "coroutine ... was never awaited" lines at exit
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    try:
        from orbax.checkpoint._src.futures import future
        for thread in threading.enumerate():
            if isinstance(thread, future._SignalingThread) and thread.is_alive():
                thread.cancel()
                future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
    except Exception:     # noqa: BLE001 - best effort; the save's own error is what gets reported
        pass


def save(out_dir: str, step: int, config: Any, train_state: Any, loader_states: dict[int, dict],
         meta: dict, model_version: int = 3, data: dict[str, list[dict]] | None = None) -> None:
    """Write one complete checkpoint for `step`. Every process calls it (it is a collective) with the
    loader states of its own device ranks ({rank: state_dict}); `meta` must be JSON-able; `data`:
    {"train": checkpoint_manifest.data_files(...), "val": ...}. Raises NonFiniteStateError (nothing
    written) or CheckpointWriteError (no DONE written), the same on every process."""
    # here, not at the top: checkpoint_manifest builds on this module (paths, CheckpointError, ...)
    from llmc_jax.training.checkpoint_manifest import MANIFEST_FORMAT, config_record, write_done
    if not state_is_finite(train_state):
        raise NonFiniteStateError(f"step {step}: the train state holds NaN or Inf (params or AdamW moments)")
    p = paths(out_dir, step)
    main = jax.process_index() == 0

    def check(problem: str | None) -> None:
        problem = first_problem(problem)
        if problem:
            raise CheckpointWriteError(problem)

    problem = _attempt(probe_writable, out_dir)
    if main and not problem and os.path.exists(p["done"]):    # rewriting a step: incomplete until all there
        problem = _attempt(os.remove, p["done"])
    check(problem)
    check(_attempt(_save_state, p["state"], train_state))
    params = parallel.gather_params(train_state.params)
    loaders = {int(r): s for part in _gather_json({str(r): s for r, s in loader_states.items()})
               for r, s in part.items()}
    loaders = [loaders[r] for r in sorted(loaders)]
    problem = None
    if main:
        problem = (_attempt(family.family_of(config).write_model, p["model"], config, params, model_version)
                   or _attempt(write_json_atomic, p["meta"], dict(meta, train_loaders=loaders)))
    check(problem)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"llmc_jax checkpoint {step}")
    opt_count = scalar(train_state.opt_state.count)
    if main:
        manifest = {"format": MANIFEST_FORMAT, "step": step, "model": config_record(config, model_version),
                    "opt_count": opt_count, "train_loaders": loaders, "data": data or {}}
        problem = _attempt(write_done, out_dir, step, manifest)
    check(problem)


def done_steps(out_dir: str) -> list[int]:
    """Steps with a DONE marker, ascending. Their files are not looked at here: a marked step with
    a file missing is refused by `checkpoint_manifest.verify`, not skipped for an older one."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(m.group(1)) for m in map(re.compile(r"DONE_(\d{8})").fullmatch, os.listdir(out_dir)) if m)


def latest_step(out_dir: str) -> int | None:
    """The newest marked step (None: there is none), checked to be the same on every process."""
    steps = done_steps(out_dir)
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
    shardings like `template`; None: this process's first device). Every process calls it. Any
    Orbax failure is a CheckpointError in one line."""
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), template)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                          _on_disk(template), _on_disk(shardings))
    path = paths(out_dir, step)["state"]
    with _orbax_quiet(), _checkpointer() as ckptr:
        _check_fp8_match(ckptr, path, template)
    try:
        with _orbax_quiet(), _checkpointer() as ckptr:
            return _from_disk(ckptr.restore(path, target), template)
    except ValueError as e:       # Orbax names the leaf and both shapes or tree structures
        raise CheckpointError(f"{path} does not fit this run's model and optimizer (another model or flags?): "
                              f"{describe(e, 300)}") from None
    except Exception as e:        # a damaged or unreadable state dir: tensorstore, OSError, ...
        raise CheckpointError(f"{path}: Orbax cannot restore it ({type(e).__name__}: {describe(e, 300)})") from None


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
