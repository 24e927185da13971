"""Checkpoints that cannot lie: every tampering with a checkpoint is refused on resume with one line
naming the file (exit 2), a NaN/Inf run stops (exit 1) before any checkpoint can hold it, and an
unwritable output dir or main.log is one line, at once.

One base run (4 steps, checkpoints 2 and 4) is written once per module; each test tampers with a
copy. Runs go through errors.run, the same path as `python -m llmc_jax.train` (exit status and
stderr), in-process; two subprocess runs check the real command line."""
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmc_jax import errors, train
from llmc_jax.formats import llmc_format
from llmc_jax.training import checkpoint, checkpoint_manifest
from test_train import FIXTURE, LLMC_CPU_FLAGS, _stdout_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 4                 # the base run's newest checkpoint


def _flags(out_dir, **over) -> list[str]:
    """test_train's llm.c flags at -b 1 (64 tokens a step), shuffled, val and checkpoint every 2."""
    argv = list(LLMC_CPU_FLAGS)
    values = {"-b": "1", "-d": "64", "--shuffle": "1", "-v": "2", "-m": "1", **over}
    for flag, value in values.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv + ["-n", "2", "-o", str(out_dir)]


def _cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the train command run in-process."""
    rc = errors.run(train.main, argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _refused(argv, capsys, *names: str) -> tuple[str, str]:
    """(the one stderr line, stdout) of a run refused with exit 2 before any step; the line names
    all of `names`."""
    rc, out, err = _cli(argv, capsys)
    assert rc == 2, out[-2000:] + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], lines[0]
    assert not _stdout_losses(out)[0]
    return lines[0], out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run to step 4 with checkpoints 2 and 4; tests work on copies of it."""
    out = tmp_path_factory.mktemp("base")
    rc = errors.run(train.main, _flags(out, **{"-x": "4"}))
    assert rc == 0 and checkpoint.done_steps(out) == [2, 4]
    return out


@pytest.fixture
def run_dir(base, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base, copy)
    return copy


def _resume(run_dir, max_steps: int = 6, **over) -> list[str]:
    return _flags(run_dir, **{"-x": str(max_steps), **over}) + ["-y", "1"]


def _edit_header(index: int, value: int):
    def edit(run_dir):
        path = run_dir / f"model_{STEP:08d}.bin"
        header = np.fromfile(path, "<i4", count=llmc_format.HEADER_INTS)
        header[index] = value
        with open(path, "r+b") as f:
            f.write(header.tobytes())
    return edit


def _edit_meta(change):
    def edit(run_dir):
        path = run_dir / f"meta_{STEP:08d}.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
    return edit


def _replace_state(run_dir):
    shutil.rmtree(run_dir / f"state_{STEP:08d}")
    shutil.copytree(run_dir / "state_00000002", run_dir / f"state_{STEP:08d}")


def _largest_state_file(run_dir) -> str:
    files = [os.path.join(root, f) for root, _, fs in os.walk(run_dir / f"state_{STEP:08d}") for f in fs]
    return max(files, key=os.path.getsize)


def _flip_byte(run_dir):
    path = _largest_state_file(run_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def _truncate_model(run_dir):
    path = run_dir / f"model_{STEP:08d}.bin"
    os.truncate(path, os.path.getsize(path) - 100)


def _set_rng(meta):
    meta["train_loaders"][0]["rng"]["pos"] += 1


TAMPERINGS = {   # name: (edit of the copied run dir, what the refusal line must name)
    "model header NH": (_edit_header(5, 8), ["model_00000004.bin", "NH=8"]),
    "model header V": (_edit_header(3, 200), ["model_00000004.bin", "V=200"]),
    "truncated model": (_truncate_model, ["model_00000004.bin"]),
    "deleted model": (lambda d: os.remove(d / "model_00000004.bin"), ["model_00000004.bin", "missing"]),
    "deleted Orbax file": (lambda d: os.remove(d / "state_00000004" / "_METADATA"),
                           ["state_00000004/_METADATA", "missing"]),
    "meta loader position": (_edit_meta(lambda m: m["train_loaders"][0].update(sample_idx=3)),
                             ["meta_00000004.json", "sample_idx=3"]),
    "meta rng": (_edit_meta(_set_rng), ["meta_00000004.json", "generator"]),
    "meta seed": (_edit_meta(lambda m: m["train_loaders"][0].update(seed=7)), ["meta_00000004.json", "seed=7"]),
    "meta step": (_edit_meta(lambda m: m.update(step=2)), ["meta_00000004.json", "step 2"]),
    "meta not json": (lambda d: (d / "meta_00000004.json").write_text("{"), ["meta_00000004.json"]),
    "state dir of another step": (_replace_state, ["state_00000004/"]),
    "flipped byte in Orbax data": (_flip_byte, ["state_00000004/", "sha256"]),
    "DONE not json": (lambda d: (d / "DONE_00000004").write_text("{"), ["DONE_00000004"]),
    "DONE from before verification": (lambda d: (d / "DONE_00000004").write_text(""),
                                      ["DONE_00000004", "predates verification"]),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampered_checkpoint_is_refused_in_one_line(name, run_dir, capsys):
    edit, named = TAMPERINGS[name]
    edit(run_dir)
    line, out = _refused(_resume(run_dir), capsys, *named)
    assert "resumed from" not in out
    if "predates" not in line:   # the way back: the older step, never a silent fall-back to it
        assert "delete DONE_00000004 to resume from the previous checkpoint (step 2)" in line


def test_count_that_disagrees_with_the_restored_state_is_refused(run_dir, capsys):
    """A manifest rewritten along with another step's state: Orbax's own AdamW count gives it away."""
    done = run_dir / "DONE_00000004"
    manifest = json.loads(done.read_text())
    done.write_text(json.dumps(dict(manifest, opt_count=3)))
    _refused(_resume(run_dir), capsys, "state_00000004", "AdamW step count is 4", "recorded 3")


def test_orbax_restore_error_is_one_line(run_dir, capsys, monkeypatch):
    """Any Orbax failure on restore (here a multi-line tensorstore-like error) is one line."""
    class Broken:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def restore(self, *a, **k):
            raise RuntimeError("tensorstore: DATA_LOSS\n  at chunk 7\n")
    monkeypatch.setattr(checkpoint, "_checkpointer", Broken)
    _refused(_resume(run_dir), capsys, "state_00000004", "DATA_LOSS; at chunk 7")


def test_changed_shard_is_refused(run_dir, tmp_path, capsys):
    """A train shard of another size than the one the checkpoint was trained on (a valid shard)."""
    shard = tmp_path / "train.bin"
    llmc_format.write_shard(shard, llmc_format.read_shard(f"{FIXTURE}/train.bin")[:-64])
    _refused(_resume(run_dir, **{"-i": str(shard)}), capsys, str(shard), "bytes")


def test_model_config_of_another_run_is_refused(base):
    """A run whose model (a --config [model] table) is not the checkpoint's."""
    manifest = checkpoint_manifest.verify(str(base), STEP)
    cfg, _ = llmc_format.read_model_header(f"{FIXTURE}/model.bin")
    data = manifest["data"]
    checkpoint_manifest.check_run(manifest, cfg, data)  # the run's own: fine
    with pytest.raises(checkpoint.CheckpointError, match="model"):
        checkpoint_manifest.check_run(manifest, dataclasses.replace(cfg, NH=8), data)


@pytest.mark.parametrize("max_steps", [2, 4])
def test_max_steps_at_or_below_the_checkpoint_is_refused(run_dir, capsys, max_steps):
    _refused(_resume(run_dir, max_steps), capsys, "already at step 4")


def test_malformed_main_log_does_not_stop_a_resume(run_dir, capsys):
    """Lines that are not `s:STEP ...` (an edit, a run killed mid-line) are dropped, with a note."""
    with open(run_dir / "main.log", "ab") as f:
        f.write(b"s:abc trl:1\ngarbage line\n\xff\xfe\x00\ns:\n\ns:5 trl:5.1")   # killed mid-line
    rc, out, err = _cli(_resume(run_dir), capsys)
    assert rc == 0 and not err, err
    assert "note: dropped 4 malformed line(s)" in out        # the empty line is not counted
    lines = (run_dir / "main.log").read_text().splitlines()
    assert all(line.split()[0][2:].isdigit() for line in lines), lines
    assert [line.split()[0] for line in lines if "trl" in line] == [f"s:{s}" for s in range(6)]


def test_unreadable_main_log_is_one_line(run_dir, capsys):
    os.remove(run_dir / "main.log")
    os.mkdir(run_dir / "main.log")
    _refused(_resume(run_dir), capsys, "main.log")


@pytest.mark.parametrize("where", ["regular file", "under /proc"])
def test_unusable_output_dir_is_refused_at_start(tmp_path, capsys, where):
    """-o that is a file, or where no directory can be made: one line before any work."""
    out = tmp_path / "file" if where == "regular file" else "/proc/llmc-jax-test/out"
    if where == "regular file":
        out.write_text("not a directory")
    _refused(_flags(out, **{"-x": "2"}), capsys, str(out))
    assert not os.path.exists("/proc/llmc-jax-test")


def _erofs(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_output_dir_turning_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    """The dir goes read-only before checkpoint 2 (as root, chmod would not stop us: patched)."""
    monkeypatch.setattr(checkpoint, "probe_writable", _erofs)
    rc, out, err = _cli(_flags(tmp_path, **{"-x": "4"}), capsys)
    assert rc == 1 and err.splitlines() == [
        f"error: cannot write checkpoint step 2 to {tmp_path}: Read-only file system; "
        "no checkpoint of this run was written before it"], err
    assert checkpoint.done_steps(tmp_path) == [] and "step    3/4" not in out


# The command, with Orbax's own directory creation failing as on a read-only filesystem
READ_ONLY_ORBAX = """
import errno, os, sys
real = os.makedirs
def makedirs(path, *a, **k):
    if "orbax-checkpoint-tmp" in str(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real(path, *a, **k)
os.makedirs = makedirs
from llmc_jax import errors, train
sys.exit(errors.run(train.main, sys.argv[1:]))
"""


def test_orbax_failing_to_write_ends_the_command_at_once(tmp_path):
    """Orbax's failed save leaves threads that would hold the exit for 300 s: one line, exit 1, now."""
    cmd = [sys.executable, "-c", READ_ONLY_ORBAX] + _flags(tmp_path / "out", **{"-x": "4"})
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=90)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: cannot write checkpoint step 2 to ") and "Read-only file system" in r.stderr
    assert checkpoint.done_steps(tmp_path / "out") == []


def test_main_log_write_error_is_one_line(tmp_path, capsys):
    """A main.log write failing mid-run (a full disk) ends the run with one line naming the file."""
    os.symlink("/dev/full", tmp_path / "main.log")       # every flush: ENOSPC
    rc, _, err = _cli(_flags(tmp_path, **{"-x": "2"}), capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "main.log at step 0: No space left on device" in err


def test_nonfinite_state_is_never_checkpointed(tmp_path, capsys):
    """An Inf in a position embedding past -t: losses and norms stay finite, the state does not."""
    cfg, params = llmc_format.read_model(f"{FIXTURE}/model.bin")
    params["wpe"][-1, 0] = np.inf
    llmc_format.write_model(tmp_path / "inf.bin", cfg, params)
    out = tmp_path / "out"
    rc, _, err = _cli(_flags(out, **{"-x": "4", "-e": str(tmp_path / "inf.bin"), "-t": "32", "-d": "32"}), capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: step 2: the train state holds NaN or Inf"), err
    assert not [f for f in os.listdir(out) if f not in ("main.log", "tensorboard")]   # nothing of step 2 written


def test_nan_run_stops_and_the_last_good_checkpoint_resumes_exactly(base, tmp_path, capsys):
    """-l 1e30 from step 4 on: step 6's loss is NaN; the run exits 1 with one line before
    checkpoint 6, and resuming from 4 with the base flags gives the straight run's losses."""
    split = tmp_path / "split"
    shutil.copytree(base, split)
    rc, _, err = _cli(_resume(split, 8, **{"-l": "1e30"}), capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: step 6: loss/grad norm is not finite"), err
    assert "the last good checkpoint (step 4) stays the resume point" in err
    assert checkpoint.done_steps(split) == [2, 4]
    straight, _ = _stdout_losses(_cli(_flags(tmp_path / "straight", **{"-x": "8"}), capsys)[1])
    rc, out, err = _cli(_resume(split, 8), capsys)
    assert rc == 0 and "resumed from step 4" in out, err
    resumed, _ = _stdout_losses(out)
    assert resumed == straight[4:]
    assert (split / "main.log").read_text() == (tmp_path / "straight" / "main.log").read_text()


def test_command_line_refusal_is_one_stderr_line(run_dir):
    """The real command: a flipped byte in the Orbax data is exit 2 and one line, no traceback."""
    _flip_byte(run_dir)
    cmd = [sys.executable, "-m", "llmc_jax.train"] + _resume(run_dir)
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert os.path.relpath(_largest_state_file(run_dir), run_dir) in r.stderr
