"""Every bad input gives exactly one stderr line `error: ...` and its exit status (2 usage / bad named
file, 1 failure while running), never a traceback (llmc_jax/errors.py). Most cases run in-process
through errors.run, the same wrapper every `__main__` uses; a few real subprocesses check the wiring."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import random_params
from llmc_jax import errors, eval_hellaswag, eval_loss, gradcheck, launch, sample, train
from llmc_jax.evals import hellaswag
from llmc_jax.formats import llmc_format as lf
from llmc_jax.models.config import GPTConfig
from llmc_jax.evals.hellaswag import Example
from test_multiprocess import _children

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "data", "llmc_tiny")
MODEL, TRAIN, VAL = (os.path.join(FIXTURE, f) for f in ("model.bin", "train.bin", "val.bin"))
CFG = GPTConfig(L=2, NH=4, C=64, maxT=64, V=250, Vp=256)      # the fixture model's
# A short valid run on the fixture; each case adds or overrides one thing.
FLAGS = ["-e", MODEL, "-i", TRAIN, "-j", VAL, "-b", "2", "-t", "16", "-x", "1", "-v", "0", "-s", "0",
         "--dtype", "float32", "--shuffle", "0"]


def call(main, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of main(argv) run through errors.run, as `python -m ...` runs it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = errors.run(main, argv)
    return rc, err.getvalue()


def one_error(rc: int, err: str, want_rc: int, match: str | None = None) -> str:
    """Assert the status and exactly one stderr line, `error: ...` (matching `match`); return it."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert rc == want_rc, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    if match:
        assert re.search(match, lines[0]), lines[0]
    return lines[0]


def _script(name: str):
    if os.path.join(REPO, "scripts") not in sys.path:
        sys.path.insert(0, os.path.join(REPO, "scripts"))      # the scripts import their siblings
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ wrong flag uses

TRAIN_FLAG_CASES = [
    (["-l", "nan"], r"-l/--learning-rate nan: must be a finite number"),
    (["-l", "inf"], r"-l/--learning-rate inf"),
    (["-l", "-1"], r"-l/--learning-rate -1\.0: must be >= 0"),
    (["-u", "-1"], r"-u/--warmup-steps -1: must be >= 0"),
    (["-c", "-0.1"], r"-c/--weight-decay -0\.1"),
    (["--eps", "0"], r"--eps 0\.0: must be > 0"),
    (["--grad-clip", "-1"], r"--grad-clip -1\.0: must be >= 0"),
    (["--beta1", "1.5"], r"--beta1 1\.5: must be in \[0, 1\)"),
    (["--beta2", "-0.5"], r"--beta2 -0\.5"),
    (["--beta2", "1"], r"--beta2 1\.0"),
    (["-q", "1.5"], r"-q/--final-lr-frac 1\.5: must be in \[0, 1\]"),
    (["-q", "-0.1"], r"-q/--final-lr-frac"),
    (["-m", "0"], r"-m/--val-batches 0: must be -1 \(all\) or >= 1"),
    (["-g", "0"], r"-g/--gen-tokens 0: must be >= 1"),
    (["-g", "-3"], r"-g/--gen-tokens -3"),
    (["-v", "-1"], r"-v/--val-every"),
    (["-s", "-1"], r"-s/--sample-every"),
    (["-n", "-2"], r"-n/--checkpoint-every -2: must be -1 \(never\) or >= 0"),
    (["-nk", "-1"], r"-nk/--checkpoint-keep"),
    (["-nm", "-1"], r"-nm/--checkpoint-major"),
    (["-x", "0"], r"-x/--max-steps 0: must be -1"),
    (["-d", "-5"], r"-d/--total-batch-size -5"),
    (["-sl", "-1"], r"-sl/--skip-loss-z"),
    (["-sg", "nan"], r"-sg/--skip-grad-z nan"),
    (["-b", "0"], r"-b/--batch-size 0: must be >= 1"),
    (["-t", "-1"], r"-t/--seq-len -1"),
    (["--seed", "-1"], r"--seed -1"),
    (["-h", "2"], r"-h/--hellaswag 2: must be 0 or 1"),
    (["-a", "2"], r"-a/--overfit"), (["-f", "3"], r"-f/--allow-tf32"), (["-w", "-1"], r"-w/--master-weights"),
    (["-y", "2"], r"-y/--resume"), (["--shuffle", "2"], r"--shuffle"),
    (["-b", "x"], r"argument -b/--batch-size: invalid int value: 'x'; see --help"),
    (["-l"], r"argument -l/--learning-rate: expected one argument"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
    (["-k", "nope"], r"-k/--lr-scheduler: invalid choice"),
    (["-z", "4"], r"-z/--zero-stage"), (["-r", "3"], r"-r/--recompute"), (["--dtype", "float16"], r"--dtype"),
    (["-d", "300"], r"-d 300 is not a multiple"),
    (["-t", "128"], r"exceeds the model's maxT=64"),
    (["--fp8", "on"], r"--fp8: invalid choice"),
    (["--param-rounding", "up"], r"--param-rounding: invalid choice: 'up'"),
    (["--fp8", "delayed", "--fp8-matmuls", "qkv,mlp"],
     r"--fp8-matmuls 'qkv,mlp': expected a comma-separated subset of qkv,attproj,fc,fcproj \(unknown: mlp\)"),
    (["--fp8", "delayed", "--fp8-matmuls", ","], r"--fp8-matmuls ',': expected a comma-separated subset"),
    (["--fp8", "delayed", "--backward", "autodiff"], r"--fp8 delayed needs --backward manual"),
    (["--fp8", "delayed", "--fp8-history", "0"], r"--fp8-history 0: must be >= 1"),
]


@pytest.mark.parametrize("argv,match", TRAIN_FLAG_CASES, ids=[" ".join(a) for a, _ in TRAIN_FLAG_CASES])
def test_train_flag_out_of_range(argv, match):
    one_error(*call(train.main, FLAGS + argv), 2, match)


def test_train_still_runs_at_the_bounds(tmp_path):
    """The edges of the ranges are allowed: -q 0 and 1, -m -1, --beta2 0, -l 0, -g 1."""
    rc, err = call(train.main, FLAGS + ["-q", "0", "-m", "-1", "--beta1", "0", "-l", "0", "-g", "1", "-v", "1"])
    assert rc == 0, err


OTHER_FLAG_CASES = [
    (gradcheck.main, ["-e", "tiny", "-b", "0"], r"-b/--batch-size 0"),
    (gradcheck.main, ["-e", "tiny", "--tol", "nan"], r"--tol nan"),
    (gradcheck.main, ["-e", "tiny", "--tol", "0"], r"--tol 0\.0: must be > 0"),
    (gradcheck.main, ["-e", "tiny", "--seed", "-2"], r"--seed -2"),
    (gradcheck.main, ["-e", "tiny", "-t", "65"], r"T=65 exceeds the model's maxT=64"),
    (gradcheck.main, ["-e", "nope"], r"-e nope: no such file, and not a model descriptor"),
    (gradcheck.main, ["-e", "d13"], r"unknown GPT-2 depth descriptor"),
    (sample.main, ["-e", "tiny", "-g", "-1"], r"-g/--gen-tokens -1"),
    (sample.main, ["-e", "tiny", "--temperature", "nan"], r"--temperature nan"),
    (sample.main, ["-e", "tiny", "--top-k", "0"], r"--top-k 0"),
    (sample.main, ["-e", "tiny", "--seed", "0"], r"--seed 0: must be in \[1, 2\*\*64\)"),
    (sample.main, [], r"required: -e/--init"),
    (eval_hellaswag.main, ["-e", "tiny", "-b", "3"], r"-b/--batch-size 3: must be >= 4"),
    (eval_hellaswag.main, ["-e", "tiny", "-n", "0"], r"-n/--max-examples 0"),
    (launch.main, ["--nproc", "0", "--", "-x", "1"], r"--nproc 0: must be >= 1"),
    (launch.main, ["--nproc", "2", "--port", "70000", "--", "-x", "1"], r"--port 70000"),
    (launch.main, ["--nproc", "2", "--grace", "nan", "--", "-x", "1"], r"--grace nan"),
    (launch.main, ["--nproc", "2"], r"give the train arguments after --"),
    (launch.main, ["--nproc", "2", "--", "-pn", "2"], r"-pn is set by the launcher"),
]


@pytest.mark.parametrize("main,argv,match", OTHER_FLAG_CASES,
                         ids=[f"{m.__module__.split('.')[-1]} {' '.join(a)}" for m, a, _ in OTHER_FLAG_CASES])
def test_other_commands_flag_errors(main, argv, match):
    one_error(*call(main, argv), 2, match)


def test_scripts_flag_errors(tmp_path):
    pt, plot_log = _script("prepare_text"), _script("plot_log")
    src = tmp_path / "a.txt"
    src.write_text("hello")
    for argv, match in ((["--workers", "0"], r"--workers 0"), (["--val-frac", "1.5"], r"--val-frac 1\.5"),
                        (["--shard-size", "0"], r"--shard-size 0"), (["--val-tokens", "-1"], r"--val-tokens -1"),
                        (["--tokenizer", "nope"], r"invalid choice")):
        one_error(*call(pt.main, [str(src), "-o", str(tmp_path / "o"), *argv]), 2, match)
    assert not (tmp_path / "o").exists()          # refused before any work
    one_error(*call(plot_log.main, [str(tmp_path), "--smooth", "0"]), 2, r"--smooth 0")
    one_error(*call(plot_log.main, []), 2, r"required: runs")


# ------------------------------------------------------------------------------ --config TOML

CONFIG_CASES = [
    (None, r"config file not found"),
    ("", r"not a regular file"),                                  # a directory (see below)
    ("batch-size = \n", r"not valid TOML"),
    (b"seed = 1\n\xff\xfe\n", r"not valid TOML"),
    ('batch-size = "x"\n', r"batch-size = 'x' must be an integer"),
    ("batch-size = 2.5\n", r"batch-size = 2\.5 must be an integer"),
    ("batch-size = true\n", r"batch-size = True must be an integer"),
    ('learning-rate = "fast"\n', r"learning-rate = 'fast' must be a number"),
    ("train-data = 3\n", r"train-data = 3 must be a string"),
    ("bogus-key = 1\n", r"unknown key 'bogus-key'"),
    ('lr-scheduler = "nope"\n', r"lr-scheduler = 'nope' must be one of cosine"),
    ("zero-stage = 7\n", r"zero-stage = 7 must be one of 0, 1, 2, 3"),
    ("learning-rate = nan\n", r"-l/--learning-rate nan \(from --config .*\): must be a finite"),
    ("beta2 = 1.0\n", r"--beta2 1\.0 \(from --config .*\): must be in \[0, 1\)"),
    ("val-batches = 0\n", r"-m/--val-batches 0 \(from --config"),
    ("model = 3\n", r"model must be a table"),
    ('[model]\nL = "x"\nNH = 4\nC = 64\n', r"\[model\] L = 'x' must be an integer"),
    ("[model]\nL = 2\nNH = 3\nC = 64\n", r"C=64 is not divisible by NH=3"),
    ("[model]\nL = 2\nNH = 4\n", r"bad \[model\] table"),
    ("[model]\nL = 2\nNH = 4\nC = 64\nheads = 4\n", r"bad \[model\] table"),
    ('[model]\nfamily = "llama2"\nL = 2\n', r"\[model\] family = 'llama2' must be one of 'gpt2', 'llama3'"),
    ('[model]\nfamily = "llama3"\nL = 2\nNH = 4\nNKV = 3\nC = 64\n', r"multiple of NKV=3"),
    ('[model]\nfamily = "llama3"\nL = 2\nNH = 4\nNKV = 2\nC = 64\nrope_theta = "x"\n',
     r"\[model\] rope_theta = 'x' must be a number"),
    ('[model]\nfamily = "llama3"\nL = 2\nNH = 4\nNKV = 2\nC = 64\ntied = 1\n', r"\[model\] tied = 1 must be true or false"),
]


@pytest.mark.parametrize("text,match", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))])
def test_bad_config(tmp_path, text, match):
    path = tmp_path / "c.toml"
    if text == "":
        path.mkdir()
    elif text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_error(*call(train.main, FLAGS + ["--config", str(path)]), 2, match)


def test_config_value_overridden_on_the_command_line_is_not_blamed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("learning-rate = 0.001\n")
    one_error(*call(train.main, FLAGS + ["--config", str(path), "-l", "-1"]), 2, r"-l/--learning-rate -1\.0: must")


def test_gradcheck_config_without_model_table(tmp_path):
    (tmp_path / "c.toml").write_text("seed = 1\n")
    one_error(*call(gradcheck.main, ["--config", str(tmp_path / "c.toml")]), 2, r"no \[model\] table")


# ------------------------------------------------------------------------------ malformed files

def _header(magic: int, version: int, *vals: int) -> bytes:
    h = np.zeros(256, "<i4")
    h[0], h[1], h[2:2 + len(vals)] = magic, version, vals
    return h.tobytes()


def _corruptions(good: bytes, slots: dict[int, list[int]], rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Truncations, wrong magic/version, header fields set to the given wrong values (slot -> values;
    None: -1, 0, one more, 2**31-1), trailing bytes, random bytes."""
    n = len(good)
    out = [(f"truncated to {k}", good[:k]) for k in sorted({0, 3, 1023, 1024, 1026, n // 2, n - 1}) if k < n]
    h = np.frombuffer(good[:1024], "<i4").copy()
    for slot, value in [(0, 12345), (0, lf.SHARD_MAGIC if h[0] != lf.SHARD_MAGIC else lf.MODEL_MAGIC),
                        (1, 99), (1, -1)] + [(s, v) for s, vs in slots.items()
                                             for v in (vs if vs is not None else (-1, 0, int(h[s]) + 1, 2**31 - 1))]:
        bad = h.copy()
        bad[slot] = value
        if bad[slot] != h[slot]:
            out.append((f"slot {slot} = {value}", bad.tobytes() + good[1024:]))
    out.append(("trailing bytes", good + b"\0\0\0\0"))
    out.append(("random bytes", rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    out.append(("random header", rng.integers(0, 256, 1024, dtype=np.uint8).tobytes() + good[1024:]))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good files of every kind (small), built once."""
    d = tmp_path_factory.mktemp("good")
    cfg = GPTConfig(L=1, NH=2, C=16, maxT=16, V=250, Vp=256)
    params = random_params(cfg)
    lf.write_model(d / "m3.bin", cfg, params, version=3)
    lf.write_model(d / "m5.bin", cfg, params, version=5)
    x = np.arange(16).reshape(2, 8) % cfg.V
    lf.write_debug_state(d / "state.bin", cfg, x, x, np.zeros((2, 8, cfg.V), np.float32), 1.0, params)
    lf.write_shard(d / "shard.bin", np.arange(2000) % 200)
    exs = [Example(i, i % 4, [1, 2, 3], [[4], [5, 6], [7], [8, 9]]) for i in range(3)]
    hellaswag.write_eval_file(d / "hs.bin", exs)
    return d


def _fuzz_paths(tmp_path, good: bytes, slots: dict[int, list[int] | None], seed: int):
    for k, (what, data) in enumerate(_corruptions(good, slots, np.random.default_rng(seed))):
        path = tmp_path / f"bad{k}.bin"
        path.write_bytes(data)
        yield what, str(path)


@pytest.mark.parametrize("version", [3, 5])
def test_fuzz_model_file(files, tmp_path, version):
    """-e of train, gradcheck, sample: every malformed model is one line, exit 2 (slots: maxT, L, C, Vp)."""
    good = (files / f"m{version}.bin").read_bytes()
    mains = [(train.main, FLAGS + ["-t", "8", "-e"]), (gradcheck.main, ["-t", "8", "-e"]),
             (sample.main, ["--tokenizer", "byte", "-e"])]
    for k, (what, path) in enumerate(_fuzz_paths(tmp_path, good, dict.fromkeys([2, 4, 6, 7]), version)):
        main, argv = mains[k % len(mains)]
        rc, err = call(main, argv + [path])
        one_error(rc, err, 2, re.escape(path))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    """gradcheck, sample, eval_loss refuse a model holding NaN/Inf (one line naming the tensor);
    train starts and stops at its first non-finite loss (exit 1), as tests/test_checkpoint_integrity.py shows."""
    params = random_params(CFG)
    params["fcw"][1, 2, 3] = value
    path = str(tmp_path / "bad.bin")
    lf.write_model(path, CFG, params, version=3)
    for main, argv in [(gradcheck.main, ["-t", "8", "-e", path]), (sample.main, ["--tokenizer", "byte", "-e", path]),
                       (eval_loss.main, ["-j", VAL, "-e", path])]:
        rc, err = call(main, argv)
        one_error(rc, err, 2, r"tensor fcw holds 1 NaN/Inf value")


def test_fuzz_debug_state(files, tmp_path):
    """gradcheck --llmc-state: malformed, or made for another model (B/T/V do not fit), one line, exit 2."""
    good = (files / "state.bin").read_bytes()
    for what, path in _fuzz_paths(tmp_path, good, dict.fromkeys([2, 3]), 7):
        one_error(*call(gradcheck.main, ["-e", str(files / "m3.bin"), "--llmc-state", path]), 2, re.escape(path))
    # well formed, but for the fixture's model (V=250, L=2): its size cannot fit this one (L=1)
    one_error(*call(gradcheck.main, ["-e", str(files / "m3.bin"), "--llmc-state", f"{FIXTURE}/debug_state.bin"]),
              2, r"debug state of another model")
    cfg = GPTConfig(L=1, NH=2, C=16, maxT=16, V=250, Vp=256)
    params = random_params(cfg)
    for name, x, match in (("long.bin", np.zeros((1, 17), int), r"T=17 exceeds the model's maxT=16"),
                           ("ids.bin", np.full((2, 4), 251), r"token id 251 at position 0, outside")):
        lf.write_debug_state(tmp_path / name, cfg, x, x, np.zeros((*x.shape, cfg.V), np.float32), 1.0, params)
        one_error(*call(gradcheck.main, ["-e", str(files / "m3.bin"), "--llmc-state", str(tmp_path / name)]),
                  2, match)


def test_fuzz_data_shards(files, tmp_path):
    """-i as the second shard of a glob (the first is good) and -j: one line, exit 2, naming the shard."""
    good = (files / "shard.bin").read_bytes()
    bad_dir = tmp_path / "glob"
    for k, (what, path) in enumerate(_fuzz_paths(tmp_path, good, {2: None}, 11)):
        if os.path.isdir(bad_dir):
            shutil.rmtree(bad_dir)
        bad_dir.mkdir()
        shutil.copy(files / "shard.bin", bad_dir / "d_000000.bin")
        shutil.copy(path, bad_dir / "d_000001.bin")
        flag = "-i" if k % 2 == 0 else "-j"
        rc, err = call(train.main, FLAGS + [flag, str(bad_dir / "d_*.bin")])
        one_error(rc, err, 2, re.escape(str(bad_dir / "d_000001.bin")))


def test_token_id_too_big_in_the_second_shard_stops_before_step_0(files, tmp_path):
    lf.write_shard(tmp_path / "x_000000.bin", np.arange(3000) % 200)
    toks = np.arange(3000) % 200
    toks[1234] = 250                                 # the fixture model's V = 250
    lf.write_shard(tmp_path / "x_000001.bin", toks)
    rc, err = call(train.main, FLAGS + ["-i", str(tmp_path / "x_*.bin"), "-x", "50"])
    one_error(rc, err, 2, re.escape(f"{tmp_path}/x_000001.bin: token id 250 at position 1234") +
              r".*vocab size 250")


def test_many_shards_show_progress(tmp_path):
    for i in range(10):
        lf.write_shard(tmp_path / f"p_{i:06d}.bin", np.arange(300) % 200)
    toks = np.arange(300) % 200
    toks[7] = 60000
    lf.write_shard(tmp_path / "p_000010.bin", toks)
    rc, err = call(train.main, FLAGS + ["-i", str(tmp_path / "p_*.bin")])
    assert rc == 2 and "Traceback" not in err
    assert "checking 11 shards" in err and err.rstrip().splitlines()[-1].startswith("error: ")
    assert "p_000010.bin: token id 60000 at position 7" in err


def test_fuzz_hellaswag_file(files, tmp_path):
    good = (files / "hs.bin").read_bytes()
    longest = int(np.frombuffer(good[:1024], "<i4")[3])          # a larger "longest" is harmless
    for what, path in _fuzz_paths(tmp_path, good, {2: None, 3: [-1, 0, longest - 2]}, 13):
        one_error(*call(eval_hellaswag.main, ["-e", "tiny", "-b", "4", "-i", path]), 2, re.escape(path))
    one_error(*call(train.main, FLAGS + ["-b", "4", "-h", "1", "--hellaswag-file", str(tmp_path / "bad0.bin")]),
              2, r"bad0\.bin")


def test_directories_and_missing_files(files, tmp_path):
    d = str(tmp_path)
    cases = [(train.main, FLAGS + ["-e", d], r"not a regular file"),
             (train.main, FLAGS + ["-i", d], r"not a regular file"),
             (train.main, FLAGS + ["-j", str(tmp_path / "none_*.bin")], r"no data shards match"),
             (train.main, FLAGS + ["-e", str(tmp_path / "missing.bin")], r"no such file"),
             (gradcheck.main, ["-e", d], r"not a regular file"),
             (gradcheck.main, ["-e", str(tmp_path / "missing.bin")], r"missing\.bin: no such file"),
             (gradcheck.main, ["-e", "tiny", "--llmc-state", d], r"not a regular file"),
             (gradcheck.main, ["-e", "tiny", "--llmc-state", str(tmp_path / "missing.bin")], r"file not found"),
             (gradcheck.main, ["-e", "tiny", "-i", d], r"not a regular file"),
             (gradcheck.main, ["-e", "tiny", "-i", str(files / "shard.bin"), "-b", "64", "-t", "64"],
              r"a batch needs B\*T\+1 = 4097"),
             (gradcheck.main, ["-e", "tiny", "--config", d], r"not a regular file"),
             (sample.main, ["-e", d], r"not a regular file"),
             (sample.main, ["-e", str(tmp_path / "missing.bin")], r"missing\.bin: no such file"),
             (eval_hellaswag.main, ["-e", "tiny", "-i", d], r"not a regular file"),
             (eval_hellaswag.main, ["-e", "tiny", "-i", str(tmp_path / "missing.bin")], r"prepare_hellaswag"),
             (eval_hellaswag.main, ["-e", d, "-i", str(files / "hs.bin")], r"not a regular file")]
    for main, argv, match in cases:
        one_error(*call(main, argv), 2, match)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_files(files, tmp_path):
    for name in ("m3.bin", "shard.bin"):
        shutil.copy(files / name, tmp_path / name)
        os.chmod(tmp_path / name, 0)
    one_error(*call(train.main, FLAGS + ["-e", str(tmp_path / "m3.bin")]), 2, r"Permission denied")
    one_error(*call(train.main, FLAGS + ["-i", str(tmp_path / "shard.bin")]), 2, r"Permission denied")


# ------------------------------------------------------------------------------ the wrapper itself

def _raiser(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_wrapper_kinds(monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    from jax.errors import JaxRuntimeError
    oom = JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.\nBufferAssignment:")
    line = one_error(*call(_raiser(oom), []), 1, r"out of memory \(RESOURCE_EXHAUSTED: Out of memory while")
    assert "BufferAssignment" not in line
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert errors.run(_raiser(oom), [], train.OOM_HINT) == 1
    for flag in ("-b", "-t", "-r 1/2", "-z 1..3", "--dtype bfloat16"):
        assert flag in out.getvalue()
    import jax.numpy as jnp                     # a real one: 16 TiB on the CPU
    one_error(*call(lambda argv: jnp.ones((2**42,), jnp.float32).block_until_ready(), []), 1,
              r"^error: out of memory \(RESOURCE_EXHAUSTED: .*\); use a smaller model or batch$")
    one_error(*call(_raiser(KeyboardInterrupt()), []), 130, r"interrupted")
    one_error(*call(_raiser(FileNotFoundError(2, "No such file or directory", "x.bin")), []), 1,
              r"^error: x\.bin: No such file or directory$")
    one_error(*call(_raiser(IsADirectoryError(21, "Is a directory", "d")), []), 1, r"d: Is a directory")
    one_error(*call(_raiser(ZeroDivisionError("boom")), []), 1,
              r"^error: internal error: ZeroDivisionError: boom \(rerun with LLMC_JAX_DEBUG=1")
    one_error(*call(lambda argv: np.zeros(3).reshape(2, 2), []), 1, r"internal error: ValueError")   # numpy's
    one_error(*call(_raiser(lf.LLMCFormatError("f.bin: bad\nand more")), []), 1, r"^error: f\.bin: bad; and more$")
    one_error(*call(_raiser(SystemExit("two\nlines")), []), 1, r"^error: two; lines$")
    assert call(_raiser(SystemExit(0)), []) == (0, "")
    assert call(_raiser(SystemExit(3)), []) == (3, "")
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        call(_raiser(ZeroDivisionError("boom")), [])
    assert call(_raiser(errors.UsageError("bad")), [])[0] == 2       # usage errors keep their status


def test_help_still_works():
    rc, _ = call(train.main, ["--help"])
    assert rc == 0


def test_one_line():
    assert errors.one_line("a\n\n  b.\nc:\n    cmd one\n    cmd two") == "a; b. c: cmd one; cmd two"


# ------------------------------------------------------------------------------ real subprocesses

def _env(**extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


@pytest.mark.parametrize("argv,rc,match", [
    (["-m", "llmc_jax.train", "-l", "nan"], 2, r"-l/--learning-rate nan"),
    (["-m", "llmc_jax.gradcheck", "-e", "missing.bin"], 2, r"-e missing\.bin: no such file"),
    (["-m", "llmc_jax.sample", "-e", "missing.bin"], 2, r"-e missing\.bin: no such file"),
    (["scripts/plot_log.py", "--smooth", "0", "x"], 2, r"--smooth 0"),
])
def test_commands_as_processes(argv, rc, match):
    r = subprocess.run([sys.executable] + argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    one_error(r.returncode, r.stderr, rc, match)


# ------------------------------------------------------------------------------ launcher death

_INTERMEDIATE = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from llmc_jax import launch
child = [sys.executable, "-c", {child!r}]
p = launch.spawn(child, dict(os.environ)) if {pdeathsig} else subprocess.Popen(
    child, env=dict(os.environ, LLMC_JAX_LAUNCHER_PID=str(os.getpid())))
print(p.pid, flush=True)
time.sleep(120)
"""
_WATCHING_CHILD = ("import sys, time; sys.path.insert(0, {repo!r}); from llmc_jax import launch; "
                   "launch.watch_launcher(0.1); time.sleep(120)")


def _gone(pid: int, within: float) -> bool:
    """True once pid has exited (or is a zombie waiting for a reaper) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _kill_intermediate(pdeathsig: bool) -> int:
    child = "import time; time.sleep(120)" if pdeathsig else _WATCHING_CHILD.format(repo=REPO)
    code = _INTERMEDIATE.format(repo=REPO, child=child, pdeathsig=pdeathsig)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    if not pdeathsig:
        time.sleep(1.0)                 # the child imports llmc_jax.launch and starts watching
    p.kill()
    p.wait()
    return pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pdeathsig_stops_a_worker_whose_launcher_is_killed():
    pid = _kill_intermediate(pdeathsig=True)
    assert _gone(pid, 5), f"worker {pid} outlived its launcher"


def test_watcher_fallback_stops_a_worker_whose_launcher_is_killed():
    pid = _kill_intermediate(pdeathsig=False)
    assert _gone(pid, 5), f"worker {pid} outlived its launcher"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the launcher's children through /proc")
def test_sigkilled_launcher_takes_its_workers_along(tmp_path):
    argv = ["-e", MODEL, "-i", TRAIN, "-j", VAL, "-t", "64", "-d", "256", "-b", "1", "-s", "0", "-v", "0",
            "-x", "100000", "--dtype", "float32", "--shuffle", "0"]
    p = subprocess.Popen([sys.executable, "-m", "llmc_jax.launch", "--nproc", "2", "--devices-per-proc", "2",
                          "--"] + argv, cwd=REPO, env=_env(LLMC_JAX_CACHE=str(tmp_path), LLMC_JAX_INIT_TIMEOUT="30"),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers: list[int] = []
    try:
        for line in p.stdout:                                  # rank 0 trains: both workers are up
            if re.match(r"^step\s+1/", line):
                break
        workers = [pid for pid, _ in _children(p.pid)]
        assert len(workers) == 2, workers
        p.kill()
        p.wait()
        t0 = time.monotonic()
        alive = [pid for pid in workers if not _gone(pid, max(0.1, 10 - (time.monotonic() - t0)))]
        assert not alive, f"workers {alive} outlived the SIGKILLed launcher"
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()


def test_excepthook_chain_still_hears_of_a_failure(monkeypatch):
    """peer_watch.py learns that the main thread failed through sys.excepthook; under run_command
    it still does, and the hook it chains to prints nothing more than run's one line."""
    heard = []
    monkeypatch.setattr(errors, "_under_run_command", True)
    monkeypatch.setattr(sys, "excepthook", lambda *exc: (heard.append(exc[0]), errors._quiet_excepthook(*exc)))
    one_error(*call(_raiser(KeyboardInterrupt()), []), 130, r"^error: interrupted$")
    one_error(*call(_raiser(ZeroDivisionError("x")), []), 1, r"internal error")
    one_error(*call(_raiser(errors.UsageError("u")), []), 2, r"^error: u$")   # a SystemExit: never passed on
    assert heard == [KeyboardInterrupt, ZeroDivisionError]


@pytest.mark.parametrize("argv,match", [
    (["-i", "data/fineweb10B/fineweb_train_*.bin", "-j", "data/fineweb10B/fineweb_val_*.bin"], r"no data shards match the pattern .data/fineweb10B/fineweb_train_\*.bin.; check the path \(-i/-j take a glob such as .data/fineweb10B/"),
    (["--attention", "cudnn"], r"cudnn"),
    (["-x", "0"], r"-x/--max-steps"),
])
def test_a_refused_run_creates_no_output_folder(tmp_path, argv, match):
    """README's fineweb command without its data, cuDNN on a CPU, a bad flag: one line, exit 2, and
    the -o folder (and its missing parents) not made."""
    out = tmp_path / "log124M" / "inner"
    argv = [a for a in FLAGS] + argv
    one_error(*call(train.main, argv + ["-o", str(out)]), 2, match)
    assert not (tmp_path / "log124M").exists()
