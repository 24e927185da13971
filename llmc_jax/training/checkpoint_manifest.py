"""The DONE_%08d manifest that makes a checkpoint verifiable (checkpoint.py writes and reads the
checkpoint; this module says what its DONE marker records and holds a resume to it).

DONE_N is a JSON record of what the step must agree with (model config, step, AdamW count, every
device rank's loader state, the data shards' sizes) and the size and sha256 of every file of the
step. Before a resume uses a step, `verify` checks each file against it and refuses the step with
one line naming the file and the mismatch, with what to do: never a silent fall-back to an older
step. `check_run` and `check_restored` then hold the resuming run's model, data and restored
train state to the same record.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax

from llmc_jax.errors import describe
from llmc_jax.models import family
from llmc_jax.training.checkpoint import (CheckpointError, done_steps, first_problem, load_meta, paths, scalar,
                                          write_json_atomic)


MANIFEST_FORMAT = 1
_FILE_KEYS = ("model", "meta")      # with every file under state_N/
_MANIFEST_KEYS = {"model", "opt_count", "train_loaders", "data", "files"}


class PredatesVerification(CheckpointError):
    """A DONE marker without a manifest: written before checkpoints recorded what they hold."""


def file_record(path: str) -> dict:
    """{"size", "sha256"} of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def checkpoint_files(out_dir: str, step: int) -> list[str]:
    """The files of `step` (paths relative to out_dir): the model, the meta, every file of the state dir."""
    p = paths(out_dir, step)
    names = [os.path.basename(p[k]) for k in _FILE_KEYS]
    for root, _, files in os.walk(p["state"]):
        names += [os.path.relpath(os.path.join(root, f), out_dir) for f in files]
    return sorted(names)


def data_files(pattern_paths: list[str]) -> list[dict]:
    """[{"path", "size"}] of the data shards a run reads, in the loader's order."""
    return [{"path": path, "size": os.path.getsize(path)} for path in pattern_paths]


def write_done(out_dir: str, step: int, manifest: dict) -> None:
    """The DONE marker with the manifest and every file's size and sha256 (the state dir is shared,
    so process 0 sees every process's shards once the barrier has passed)."""
    files = {name: file_record(os.path.join(out_dir, name)) for name in checkpoint_files(out_dir, step)}
    write_json_atomic(paths(out_dir, step)["done"], dict(manifest, files=files))


def config_record(config: Any, model_version: int) -> dict:
    return {**family.family_of(config).config_record(config), "version": model_version}


def _read_manifest(out_dir: str, step: int) -> dict:
    done = paths(out_dir, step)["done"]
    name = os.path.basename(done)
    try:
        with open(done) as f:
            text = f.read()
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read it ({describe(e, 300)})") from None
    if not text.strip():
        raise PredatesVerification(f"{name} is empty: the checkpoint predates verification (written before "
                                   "checkpoints recorded their sizes and hashes), so it cannot be checked")
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("step") != step or not _MANIFEST_KEYS <= set(manifest)):
        raise CheckpointError(f"{name}: not a format-{MANIFEST_FORMAT} manifest of step {step} "
                              "(damaged or edited)")
    return manifest


def _check_file_set(out_dir: str, step: int, manifest: dict) -> None:
    recorded = set(manifest["files"])
    present = {n for n in checkpoint_files(out_dir, step) if os.path.isfile(os.path.join(out_dir, n))}
    missing, extra = sorted(recorded - present), sorted(present - recorded)
    if missing and extra:
        raise CheckpointError(f"{missing[0].split(os.sep)[0]}/: not the files the checkpoint wrote ({len(missing)} "
                              f"missing, such as {missing[0]}; {len(extra)} it did not write, such as {extra[0]}): "
                              "another step's state dir?")
    if missing:
        raise CheckpointError(f"{missing[0]}: missing (the checkpoint recorded "
                              f"{manifest['files'][missing[0]]['size']} bytes there)")
    if extra:
        raise CheckpointError(f"{extra[0]}: a file the checkpoint did not write (another step's state dir?)")


def _check_model_header(out_dir: str, step: int, manifest: dict) -> None:
    path = paths(out_dir, step)["model"]
    try:
        config, version = family.read_model_header(path)
    except ValueError as e:          # LLMCFormatError: truncated, bad magic; it names the file
        raise CheckpointError(describe(e, 300).replace(path, os.path.basename(path))) from None
    have = config_record(config, version)
    for key, want in manifest["model"].items():
        if have.get(key) != want:
            raise CheckpointError(f"{os.path.basename(path)}: header has {key}={have.get(key)}, "
                                  f"the checkpoint recorded {key}={want}")


def _loader_difference(have: list[dict], want: list[dict]) -> str | None:
    """The first way the meta's loader states differ from the recorded ones (None: they agree)."""
    if len(have) != len(want):
        return f"has loader states of {len(have)} device ranks, the checkpoint recorded {len(want)}"
    for rank, (h, w) in enumerate(zip(have, want)):
        for key in sorted(set(h) | set(w)):
            if h.get(key) != w.get(key) and key == "rng":
                return f"train loader of device rank {rank} has another generator state than the checkpoint recorded"
            if h.get(key) != w.get(key):
                return (f"train loader of device rank {rank} has {key}={h.get(key)!r}, "
                        f"the checkpoint recorded {key}={w.get(key)!r}")
    return None


def _check_meta(out_dir: str, step: int, manifest: dict) -> None:
    name = os.path.basename(paths(out_dir, step)["meta"])
    try:
        meta = load_meta(out_dir, step)
    except ValueError as e:
        raise CheckpointError(f"{name}: not valid JSON (damaged or edited: {describe(e, 300)})") from None
    loaders = meta.get("train_loaders") if isinstance(meta, dict) else None
    if not isinstance(loaders, list) or not all(isinstance(s, dict) for s in loaders):
        raise CheckpointError(f"{name}: holds no train loader states (damaged or edited)")
    if meta.get("step") != step:
        raise CheckpointError(f"{name}: says step {meta.get('step')!r}, its name and DONE say step {step}")
    problem = _loader_difference(loaders, manifest["train_loaders"])
    if problem:
        raise CheckpointError(f"{name}: {problem}")


def _check_contents(out_dir: str, manifest: dict) -> None:
    """Size and sha256 of every recorded file: what the header and meta checks cannot see."""
    for name, want in sorted(manifest["files"].items()):
        path = os.path.join(out_dir, name)
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointError(f"{name}: {size} bytes, the checkpoint recorded {want['size']}")
        if file_record(path)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{name}: its sha256 differs from the one recorded (changed on disk "
                                  "since it was written)")


def _damage_advice(out_dir: str, step: int) -> str:
    older = [s for s in done_steps(out_dir) if s < step]
    done = os.path.basename(paths(out_dir, step)["done"])
    if older:
        return f"delete {done} to resume from the previous checkpoint (step {older[-1]}), or start without -y"
    return "it is the only checkpoint: start without -y, or restore its files from a copy"


def verify(out_dir: str, step: int) -> dict:
    """The manifest of `step` once every file checks out against it (sizes, sha256, model header,
    meta step and loader states); raises CheckpointError naming the file and the mismatch, with
    what to do. Process 0 checks, every process gets its verdict (a collective)."""
    problem = None
    if jax.process_index() == 0:
        try:
            manifest = _read_manifest(out_dir, step)
        except PredatesVerification as e:     # older steps predate verification too
            problem = f"{e}; start without -y, or start afresh from its model with -e {paths(out_dir, step)['model']}"
        except CheckpointError as e:
            problem = f"{e}; {_damage_advice(out_dir, step)}"
        else:
            problem = _problem_with_files(out_dir, step, manifest)
    problem = first_problem(problem)
    if problem:
        raise CheckpointError(f"step {step} in {out_dir}: {problem}")
    return _read_manifest(out_dir, step)


def _problem_with_files(out_dir: str, step: int, manifest: dict) -> str | None:
    """The first file that disagrees with the manifest, with what to do (None: all agree)."""
    try:
        _check_file_set(out_dir, step, manifest)
        _check_model_header(out_dir, step, manifest)
        _check_meta(out_dir, step, manifest)
        _check_contents(out_dir, manifest)
    except CheckpointError as e:
        return f"{e}; {_damage_advice(out_dir, step)}"
    except OSError as e:         # a file that vanished or cannot be read while checking
        name = os.path.basename(getattr(e, "filename", None) or out_dir)
        return f"{name}: cannot read it ({describe(e, 300)}); {_damage_advice(out_dir, step)}"
    except (KeyError, TypeError, AttributeError):     # a manifest edited inside its format
        name = os.path.basename(paths(out_dir, step)["done"])
        return (f"{name}: a damaged manifest (its entries are not what a checkpoint writes); "
                f"{_damage_advice(out_dir, step)}")
    return None


def check_run(manifest: dict, config: Any, data: dict[str, list[dict]]) -> None:
    """This run's model config and data shards (data_files of its train and val loaders) against the
    checkpoint's: a changed or replaced shard would continue on other tokens than the run trained on."""
    have = config_record(config, manifest["model"]["version"])
    if have != manifest["model"]:
        raise CheckpointError(f"this run's model ({have}) is not the checkpoint's ({manifest['model']}); "
                              "resume with the model config of the run that wrote it")
    for split, recorded in manifest["data"].items():
        current = data.get(split, [])
        if len(current) != len(recorded):
            raise CheckpointError(f"the {split} data now has {len(current)} shards, the checkpoint was trained on "
                                  f"{len(recorded)} ({recorded[0]['path'] if recorded else 'none'}, ...); "
                                  "resume with the same data")
        for now, then in zip(current, recorded):
            if now["size"] != then["size"]:
                raise CheckpointError(f"{now['path']}: {now['size']} bytes, but the checkpoint was trained on "
                                      f"{then['path']} of {then['size']} bytes (a changed or replaced {split} "
                                      "shard); resume with the data the run trained on")


def check_restored(manifest: dict, train_state: Any, out_dir: str) -> None:
    """The restored AdamW step count against the recorded one: Orbax's own view of the state dir."""
    count = scalar(train_state.opt_state.count)
    if count != manifest["opt_count"]:
        name = os.path.basename(paths(out_dir, manifest["step"])["state"])
        raise CheckpointError(f"{name}: its AdamW step count is {count}, the checkpoint recorded "
                              f"{manifest['opt_count']} (another step's train state?); "
                              f"{_damage_advice(out_dir, manifest['step'])}")
