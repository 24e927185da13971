#!/usr/bin/env python
"""Black-box reliability probe: throw bad input and faults at the real commands and classify the outcome.

    python scripts/probe_reliability.py [--quick] [--out DIR] [--seed N] [--jobs N] [--timeout S]

Every case runs one real command (`python -m llmc_jax.train|sample|gradcheck|eval_hellaswag|launch`
or a script) in a subprocess with a timeout, on inputs built under OUT/files from the tiny fixture
tests/data/llmc_tiny: broken model files, debug states, data shards, --config TOML files, HellaSwag
eval files, ~100 wrong flag uses, tampered checkpoints, and training runs SIGKILLed at random points
and resumed. Each outcome is one of

    one-line error   rc 1/2 as expected, no traceback, exactly one stderr line starting `error:`
    ran              rc 0 where the case allows it (controls, an empty --config, ...)
    traceback        a Python exception dump on stderr
    silent accept    rc 0 where the case must fail
    hang             still running at the timeout
    wrong code       a one-line error with another exit status than expected
    messy error      failed without exactly one `error:` line (or killed by a signal)
    late refusal     refused, but only after training had started
    vague message    the one line does not name the file the case damaged
    failed run       a run that must succeed (control, resume) did not
    log mismatch     a resumed run's main.log differs from an uninterrupted run's

It prints a table per kind of input and every non-passing case (command, what was done, rc, last
stderr lines), writes OUT/probe.json and OUT/probe.md, and exits 0 when every case passes, else 1.
Inputs are deterministic from --seed. The subprocesses get JAX_PLATFORMS=cpu and a private cache
(LLMC_JAX_CACHE=OUT/cache) so nothing outside OUT is read or written but the repo's sources.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import datetime
import functools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "llmc_tiny"
HEADER = 1024                                   # every llm.c file: 256 little-endian int32
MODEL_MAGIC, STATE_MAGIC, SHARD_MAGIC, EVAL_MAGIC = 20240326, 20240327, 20240520, 20240522
V, VP, MAXT, C = 250, 256, 64, 64              # the fixture model's (L=2, NH=4)
MODEL_FIELDS = ("maxT", "V", "L", "NH", "C", "Vp")   # header slots 2..7
PY = sys.executable

ONE_LINE, RAN = "one-line error", "ran"
TRACEBACK, SILENT, HANG, WRONG_CODE = "traceback", "silent accept", "hang", "wrong code"
MESSY, LATE, VAGUE, FAILED, MISMATCH = "messy error", "late refusal", "vague message", "failed run", "log mismatch"
PASSING = (ONE_LINE, RAN)
COLUMNS = (ONE_LINE, TRACEBACK, SILENT, HANG, WRONG_CODE)      # the rest is counted as "other"
TRACE_RE = re.compile(r"Traceback \(most recent call last\)|^\s*File \".*\", line \d+|^Fatal Python error"
                      r"|^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit): ", re.M)
STARTED_RE = re.compile(r"^(step\s+\d+/|val loss)", re.M)     # the run got past its checks


# ---------------------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Case:
    """One probe: a command line (after the interpreter), what it may exit with, and how to set it up."""

    kind: str
    name: str
    argv: list[str]
    expect: tuple[int, ...] = (2,)
    what: str = ""
    setup: Callable[[], str | None] | None = None      # returns a note on what it did, if any
    procedure: Callable[[Case, Runner], Outcome] | None = None   # a case that is more than one run
    mention: str | None = None          # the error line should name this (the damaged file)
    forbid_started: bool = False        # must be refused before training starts
    quick: bool = False                 # part of the --quick sample


@dataclasses.dataclass
class Outcome:
    """What one case did, as reported."""

    kind: str
    name: str
    what: str
    command: str
    expect: list[int]
    rc: int | None
    seconds: float
    verdict: str
    stderr_lines: int = 0
    stderr_tail: list[str] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict in PASSING


@dataclasses.dataclass
class Proc:
    """A finished (or killed) subprocess."""

    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool = False


def py(module: str, *args: object) -> list[str]:
    """argv for `python -m module args...` (paths stringified)."""
    return ["-m", module, *map(str, args)]


# ------------------------------------------------------------------------------------- fixtures

class Fixtures:
    """The inputs every case starts from, copied from tests/data/llmc_tiny under OUT/files, and
    once-only expensive results (a checkpointed run, a reference run) shared by the cases."""

    def __init__(self, out: Path, seed: int):
        self.out, self.seed = out, seed
        self.files = out / "files"
        base = self.files / "base"
        base.mkdir(parents=True, exist_ok=True)
        for name in ("model.bin", "train.bin", "val.bin", "debug_state.bin"):
            shutil.copyfile(FIXTURE / name, base / name)
        self.model, self.train, self.val, self.state = (base / n for n in
                                                        ("model.bin", "train.bin", "val.bin", "debug_state.bin"))
        self.model_bytes = self.model.read_bytes()
        self.model_v5_bytes = to_bf16_model(self.model_bytes)
        self._lock = threading.Lock()
        self._once: dict[str, tuple[threading.Lock, list]] = {}
        self.hellaswag = self.file("base/hellaswag.bin", writer(eval_file(good_examples(seed))))

    def rng(self, *what: object) -> random.Random:
        """A generator of its own for each purpose, so adding cases elsewhere changes nothing here."""
        return random.Random(":".join(map(str, (self.seed, *what))))

    def file(self, rel: str, build: Callable[[Path], None]) -> Path:
        """OUT/files/rel, built by build(path) on first use (several commands share one input)."""
        path = self.files / rel
        with self._lock:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                build(path)
        return path

    def once(self, key: str, fn: Callable[[], object]) -> object:
        """fn() computed by the first caller; later (and concurrent) callers get the same value, or
        the same exception (a failed shared run is reported by every case that needs it, run once)."""
        with self._lock:
            lock, box = self._once.setdefault(key, (threading.Lock(), []))
        with lock:
            if not box:
                try:
                    box.append((True, fn()))
                except Exception as e:      # noqa: BLE001 - re-raised to every caller
                    box.append((False, e))
            ok, value = box[0]
        if not ok:
            raise value
        return value

    def tiny_train(self, *extra: object) -> list[str]:
        """A valid short train run on the fixture; each case adds or overrides flags at the end."""
        return py("llmc_jax.train", "-e", self.model, "-i", self.train, "-j", self.val, "-b", 1, "-t", 32,
                  "-x", 1, "-s", 0, "-v", 0, "--dtype", "float32", *extra)


# --------------------------------------------------------------------------------- file helpers

def header(data: bytes) -> np.ndarray:
    return np.frombuffer(data[:HEADER], "<i4").copy()


def with_slots(data: bytes, slots: dict[int, int]) -> bytes:
    """data with header int32 slots overwritten (values wrap to int32 as llm.c would read them)."""
    h = header(data)
    for i, value in slots.items():
        h[i] = np.int64(value).astype("<i4")
    return h.tobytes() + data[HEADER:]


def num_params(L: int) -> int:
    """Parameters of the fixture's GPT-2 with L layers (wte padded to Vp, wpe, blocks, final layernorm)."""
    return VP * C + MAXT * C + L * (12 * C * C + 13 * C) + 2 * C


def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]


def to_bf16_model(v3: bytes) -> bytes:
    """llm.c's v5 (bf16, round-to-nearest-even) model file from a v3 (fp32) one."""
    bits = np.frombuffer(v3[HEADER:], "<u4")
    bf16 = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype("<u2")
    return with_slots(v3[:HEADER], {1: 5}) + bf16.tobytes()


def nan_model(data: bytes, value: float, bf16: bool) -> bytes:
    """Every weight of the last tensors (lnfw, lnfb: the final 2*C values) set to value."""
    n = 2 * C
    if bf16:
        word = np.array([value], "<f4").view("<u4")[0] >> 16
        return data[:-2 * n] + np.full(n, word, "<u2").tobytes()
    return data[:-4 * n] + np.full(n, value, "<f4").tobytes()


def shard(tokens: Iterable[int]) -> bytes:
    toks = np.asarray(list(tokens), "<u2")
    h = np.zeros(256, "<i4")
    h[:3] = SHARD_MAGIC, 1, toks.size
    return h.tobytes() + toks.tobytes()


def good_examples(seed: int) -> list[tuple[int, list[int], list[list[int]]]]:
    """Six small 4-way examples (label, context, completions), every row shorter than T=64."""
    rng = random.Random(f"{seed}:hellaswag")
    toks = lambda n: [rng.randrange(V) for _ in range(n)]   # noqa: E731
    return [(rng.randrange(4), toks(rng.randint(3, 20)), [toks(rng.randint(1, 10)) for _ in range(4)])
            for _ in range(6)]


def eval_file(examples: list[tuple[int, list[int], list[list[int]]]]) -> bytes:
    """llm.c's HellaSwag layout (see llmc_jax/evals/hellaswag.py), written independently of it."""
    streams = []
    for i, (label, context, comps) in enumerate(examples):
        s = [65535, 0, i, label, 4, len(context), *context]
        for c in comps:
            s += [len(c), *c]
        s[1] = 2 * len(s)
        streams.append(np.asarray(s, "<u2"))
    h = np.zeros(256, "<i4")
    h[:4] = EVAL_MAGIC, 1, len(streams), max(2 * s.size for s in streams)
    return h.tobytes() + b"".join(s.tobytes() for s in streams)


def writer(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------ input variants

@dataclasses.dataclass(frozen=True)
class Variant:
    """One input file (bad, or a control): its name, what was done to it and how to build it."""

    name: str
    what: str
    build: Callable[[Path], None]
    quick: bool = False
    expect: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)   # per command


def damaged(base: bytes, rng: random.Random, other_magic: int, quick: Iterable[str] = ("trunc-body",)) -> list[Variant]:
    """What can happen to any llm.c file: cut short, grown, wrong magic/version, noise, not a file
    (the variants named in `quick`, the first random one of a kind, go into the --quick sample)."""
    v = [Variant(f"trunc-header-{k}", f"cut to {k} bytes (inside the header)", writer(base[:k]))
         for k in sorted(rng.sample(range(1, HEADER), 3))]
    v += [Variant(f"trunc-body-{k}", f"cut to {k} of {len(base)} bytes (inside the body)", writer(base[:k]))
          for k in rng.sample(range(HEADER + 1, len(base) - 1), 3)]
    noise = rng.randbytes(rng.randint(1, 4096))
    v += [Variant("one-byte-short", "last byte cut", writer(base[:-1])),
          Variant("header-only", "only the 1024-byte header", writer(base[:HEADER])),
          Variant("appended-1", "one byte appended", writer(base + b"\0")),
          Variant(f"appended-{len(noise)}", f"{len(noise)} random bytes appended", writer(base + noise)),
          Variant("bad-magic", "magic 12345678", writer(with_slots(base, {0: 12345678}))),
          Variant("other-magic", f"magic {other_magic} (another llm.c file type)",
                  writer(with_slots(base, {0: other_magic}))),
          Variant("version-0", "version 0", writer(with_slots(base, {1: 0}))),
          Variant("version-99", "version 99", writer(with_slots(base, {1: 99}))),
          Variant("version-neg", "version -1", writer(with_slots(base, {1: -1}))),
          Variant("random-same-size", "random bytes, same size", writer(rng.randbytes(len(base)))),
          Variant("random-small", "300 random bytes", writer(rng.randbytes(300))),
          Variant("empty", "empty file", writer(b"")),
          Variant("directory", "a directory", make_dir),
          Variant("missing", "path does not exist", lambda p: None)]
    picked = set()
    for i, x in enumerate(v):
        kind = re.sub(r"-\d+$", "", x.name)
        if kind in quick and kind not in picked:
            v[i] = dataclasses.replace(x, quick=True)
            picked.add(kind)
    return v


def model_header_variants(base: bytes, rng: random.Random) -> list[Variant]:
    """Each header int set to 0, negative, huge and an inconsistent value."""
    odd = {"maxT": 32, "V": 257, "L": 3, "NH": 3, "C": 66, "Vp": 249}
    why = {"maxT": "size no longer matches", "V": "V > Vp", "L": "size no longer matches",
           "NH": "NH does not divide C", "C": "not a multiple of NH", "Vp": "Vp < V"}
    out = []
    for i, field in enumerate(MODEL_FIELDS, start=2):
        for label, value in (("0", 0), ("neg", -rng.randint(1, 1000)), ("huge", 2**31 - 1), ("odd", odd[field])):
            what = f"header {field} = {value}" + (f" ({why[field]})" if label == "odd" else "")
            out.append(Variant(f"{field}-{label}", what, writer(with_slots(base, {i: value})),
                               quick=(field, label) in {("NH", "odd"), ("Vp", "odd"), ("L", "huge")}))
    return out


def model_variants(fx: Fixtures) -> list[Variant]:
    """Bad model files, v3 and v5, plus controls; NaN/Inf weights must stop train with exit 1."""
    b3, b5 = fx.model_bytes, fx.model_v5_bytes
    nan_expect = {"train": (1,), "sample": (2,), "gradcheck": (2,)}
    v = [Variant("v3-control", "the fixture model, unchanged", writer(b3), expect={"*": (0,)}),
         Variant("v5-control", "the fixture model as v5 (bf16)", writer(b5), quick=True, expect={"*": (0,)})]
    v += [dataclasses.replace(x, name="v3-" + x.name)
          for x in damaged(b3, fx.rng("model3"), SHARD_MAGIC, ("trunc-body", "bad-magic"))]
    v += [dataclasses.replace(x, name="v3-" + x.name) for x in model_header_variants(b3, fx.rng("model3h"))]
    k5 = fx.rng("model5").randrange(HEADER + 1, len(b5) - 1)
    v += [Variant(f"v5-trunc-body-{k5}", f"v5 cut to {k5} bytes", writer(b5[:k5]), quick=True),
          Variant("v5-one-byte-short", "v5, last byte cut", writer(b5[:-1])),
          Variant("v5-appended-2", "v5, two bytes appended", writer(b5 + b"\0\0")),
          Variant("v5-header-on-v3-body", "version 5 in the header of an fp32 body", writer(with_slots(b3, {1: 5}))),
          Variant("v3-header-on-v5-body", "version 3 in the header of a bf16 body", writer(with_slots(b5, {1: 3}))),
          Variant("v5-NH-odd", "v5, header NH = 3", writer(with_slots(b5, {5: 3})))]
    for name, value, data, bf16 in (("v3-nan", np.nan, b3, False), ("v3-inf", np.inf, b3, False),
                                    ("v5-nan", np.nan, b5, True)):
        v.append(Variant(f"{name}-weights", f"final layernorm weights set to {value} ({'bf16' if bf16 else 'fp32'})",
                         writer(nan_model(data, value, bf16)), quick=name == "v3-nan", expect=nan_expect))
    return v


def model_cases(fx: Fixtures) -> list[Case]:
    """Kind 1: every model variant given to train, sample and gradcheck (--quick: one command each)."""
    commands: dict[str, Callable[[Path], list[str]]] = {
        "train": lambda p: py("llmc_jax.train", "-e", p, "-i", fx.train, "-j", fx.val, "-b", 1, "-t", 32,
                              "-x", 2, "-s", 0, "-v", 2),
        "sample": lambda p: py("llmc_jax.sample", "-e", p, "-g", 4, "--tokenizer", "byte"),
        "gradcheck": lambda p: py("llmc_jax.gradcheck", "-e", p, "-b", 1, "-t", 16)}
    cases, turn = [], 0
    for var in model_variants(fx):
        rel = f"model/{var.name}.bin"
        quick_cmd = "train" if "weights" in var.name else list(commands)[turn % 3]
        turn += var.quick
        for cmd, argv in commands.items():
            expect = var.expect.get(cmd, var.expect.get("*", (2,)))
            cases.append(Case("model file", f"{cmd}/{var.name}", argv(fx.files / rel), expect,
                              what=f"{cmd} -e <{var.what}>", setup=_build(fx, rel, var.build),
                              mention=_must_name(expect, rel),
                              quick=var.quick and cmd == quick_cmd))
    return cases


def _must_name(expect: tuple[int, ...], rel: str) -> str | None:
    """A refused input file must be named in the error line (not asked of runs that may pass or of
    failures while running, such as NaN weights)."""
    return None if 0 in expect or 1 in expect else Path(rel).name


def _build(fx: Fixtures, rel: str, build: Callable[[Path], None]) -> Callable[[], None]:
    return lambda: fx.file(rel, build) and None


def file_cases(fx: Fixtures, kind: str, variants: list[Variant], subdir: str,
               argv: Callable[[Path], list[str]], what: str) -> list[Case]:
    """One case per variant: the variant's file given to one command line."""
    cases = []
    for var in variants:
        rel = f"{subdir}/{var.name}.bin"
        expect = var.expect.get("*", (2,))
        cases.append(Case(kind, var.name, argv(fx.files / rel), expect, what=f"{what} <{var.what}>",
                          setup=_build(fx, rel, var.build), mention=_must_name(expect, rel),
                          quick=var.quick))
    return cases


def debug_state_cases(fx: Fixtures) -> list[Case]:
    """Kind 2: debug states given to gradcheck --llmc-state (B=2, T=16 in the good one)."""
    base = fx.state.read_bytes()
    words_before_grads = 2 * 32 + 32 * V + 1          # x, y (int32), logits, loss of B*T = 32
    other_model = base[:HEADER + 4 * (words_before_grads + num_params(L=1))]   # the model with L=1
    bad_token = bytearray(base)
    bad_token[HEADER + 4 * 5:HEADER + 4 * 6] = np.int32(300).tobytes()
    vs = [Variant("control", "the fixture debug state, unchanged", writer(base), expect={"*": (0,)})]
    vs += damaged(base, fx.rng("state"), MODEL_MAGIC)
    for field, slot in (("B", 2), ("T", 3)):
        for label, value in (("0", 0), ("neg", -2), ("huge", 2**31 - 1), ("double", 2 * int(header(base)[slot]))):
            vs.append(Variant(f"{field}-{label}", f"header {field} = {value}", writer(with_slots(base, {slot: value})),
                              quick=(field, label) == ("T", "huge")))
    vs += [Variant("other-model", "a debug state of the same model with L=1 (fewer gradients)",
                   writer(other_model), quick=True),
           Variant("token-300", "x[5] = 300, outside V=250", writer(bytes(bad_token)))]
    return file_cases(fx, "debug state", vs, "state",
                      lambda p: py("llmc_jax.gradcheck", "-e", fx.model, "--llmc-state", p),
                      "gradcheck --llmc-state")


def shard_cases(fx: Fixtures) -> list[Case]:
    """Kind 3: data shards for -i (and some for -j); all must be refused before step 0."""
    base, rng = fx.train.read_bytes(), fx.rng("shard")
    toks = np.frombuffer(base[HEADER:], "<u2")
    ntok = toks.size
    vs = damaged(base, rng, 20240801, ("trunc-body", "directory"))
    vs += [Variant("count-larger", f"header count {ntok + 100} > the {ntok} tokens",
                   writer(with_slots(base, {2: ntok + 100}))),
           Variant("count-smaller", f"header count {ntok - 100} < the {ntok} tokens",
                   writer(with_slots(base, {2: ntok - 100}))),
           Variant("count-neg", "header count -5", writer(with_slots(base, {2: -5}))),
           Variant("zero-tokens", "a valid shard with no tokens", writer(shard([]))),
           Variant("too-short", "a valid shard of 20 tokens (< B*T+1)", writer(shard(toks[:20])))]
    pos = rng.randrange(ntok)
    bad = toks.copy()
    bad[pos] = V + rng.randrange(65535 - V)
    vs.append(Variant("token-ge-V", f"token {int(bad[pos])} >= V at position {pos}", writer(shard(bad)), quick=True))
    cases = file_cases(fx, "data shard", vs, "shard", lambda p: shard_argv(fx, "-i", p), "train -i")
    cases += glob_cases(fx, toks, rng)
    for var in (v for v in vs if v.name in ("bad-magic", "token-ge-V", "directory", "empty", "count-larger")
                or v.name.startswith("trunc-body")):
        rel = f"shard/{var.name}.bin"
        cases.append(Case("data shard", f"val/{var.name}", shard_argv(fx, "-j", fx.files / rel),
                          what=f"train -j <{var.what}>", setup=_build(fx, rel, var.build), mention=Path(rel).name,
                          quick=var.name == "bad-magic"))
    for case in cases:
        case.forbid_started = True
    return cases


def write_shards(folder: Path, parts: list[np.ndarray | None]) -> None:
    """folder/tiny_train_00000i.bin for each part (None: a directory of that name)."""
    make_dir(folder)
    for i, part in enumerate(parts):
        path = folder / f"tiny_train_{i:06d}.bin"
        if part is None:
            make_dir(path)
        else:
            path.write_bytes(shard(part))


def shard_argv(fx: Fixtures, flag: str, path: Path | str) -> list[str]:
    data = {"-i": fx.train, "-j": fx.val, flag: path}
    return py("llmc_jax.train", "-e", fx.model, "-i", data["-i"], "-j", data["-j"], "-b", 1, "-t", 32, "-x", 2,
              "-s", 0, "-v", 2)


def glob_cases(fx: Fixtures, toks: np.ndarray, rng: random.Random) -> list[Case]:
    """Two-shard globs: a bad token in the first or the second shard, a directory the glob matches,
    a glob matching nothing."""
    half = toks.size // 2
    cases = []
    for which in (0, 1):
        parts = [toks[:half].copy(), toks[half:].copy()]
        pos = rng.randrange(half)
        parts[which][pos] = V + rng.randrange(10)
        folder = fx.files / f"glob/bad-token-shard{which}"
        cases.append(Case("data shard", f"glob/token-ge-V-in-shard-{which + 1}",
                          shard_argv(fx, "-i", folder / "tiny_train_*.bin"),
                          what=f"train -i <2-shard glob, token {int(parts[which][pos])} at {pos} of shard {which + 1}>",
                          setup=functools.partial(write_shards, folder, parts),
                          mention=f"tiny_train_{which:06d}.bin", quick=which == 1))
    folder = fx.files / "glob/with-dir"
    cases.append(Case("data shard", "glob/matches-a-directory", shard_argv(fx, "-i", folder / "tiny_train_*.bin"),
                      what="train -i <glob matching a good shard and a directory>",
                      setup=functools.partial(write_shards, folder, [toks, None]),
                      mention="tiny_train_000001.bin"))
    cases.append(Case("data shard", "glob/matches-nothing", shard_argv(fx, "-i", fx.files / "glob/none_*.bin"),
                      what="train -i <a glob matching no file>", mention="none_*.bin", quick=True))
    return cases


CONFIGS: list[tuple[str, str | None, str, bool]] = [     # name, TOML text (None: special), what, quick
    ("missing", None, "the file does not exist", True),
    ("syntax-no-value", "batch-size = \n", "TOML syntax error: a key without a value", True),
    ("syntax-table", "[model\nL = 2\n", "TOML syntax error: unclosed table header", False),
    ("syntax-string", 'seed = "unterminated\n', "TOML syntax error: unterminated string", False),
    ("syntax-duplicate", "batch-size = 1\nbatch-size = 2\n", "TOML error: a key given twice", False),
    ("unknown-key", "no-such-option = 1\n", "an unknown key", False),
    ("batch-size-string", 'batch-size = "x"\n', 'batch-size = "x"', True),
    ("lr-array", "learning-rate = [1]\n", "learning-rate = [1]", False),
    ("lr-nan", "learning-rate = nan\n", "learning-rate = nan", False),
    ("warmup-neg", "warmup-steps = -1\n", "warmup-steps = -1 (a key the command line does not override)", False),
    ("resume-bool", "resume = true\n", "resume = true (a bool for an int)", False),
    ("dtype-bad", 'dtype = "float16"\n', 'dtype = "float16"', False),
    ("model-L0", "[model]\nL = 0\nNH = 4\nC = 64\nmaxT = 64\nV = 250\nVp = 256\n", "[model] L = 0", True),
    ("model-NH3", "[model]\nL = 2\nNH = 3\nC = 64\nmaxT = 64\nV = 250\nVp = 256\n", "[model] NH=3, C=64", False),
    ("model-missing-keys", "[model]\nL = 2\n", "[model] with only L", False),
    ("model-Vp-lt-V", "[model]\nL = 2\nNH = 4\nC = 64\nmaxT = 64\nV = 250\nVp = 200\n", "[model] Vp < V", False),
    ("model-float", "[model]\nL = 2.5\nNH = 4\nC = 64\nmaxT = 64\nV = 250\nVp = 256\n", "[model] L = 2.5", False),
    ("model-not-table", "model = 5\n", "model = 5 (not a table)", False),
    ("model-extra-key", "[model]\nL = 2\nNH = 4\nC = 64\nmaxT = 64\nV = 250\nVp = 256\ndropout = 0.1\n",
     "[model] with an unknown key", False),
    ("binary", None, "random bytes (not UTF-8)", False),
    ("directory", None, "a directory", False),
    ("empty", "", "an empty file (valid: nothing set; accept rc 0 with -x 1)", True),
]


def config_cases(fx: Fixtures) -> list[Case]:
    """Kind 4: --config TOML files for train ([model] cases without -e, so the table is the model)."""
    cases = []
    for name, text, what, quick in CONFIGS:
        path = fx.files / "config" / f"{name}.toml"
        if name == "binary":
            build: Callable[[Path], None] = writer(fx.rng("config").randbytes(200) + b"\xff\xfe")
        elif name == "directory":
            build = make_dir
        else:
            build = (lambda p: None) if text is None else writer(text.encode())
        model = [] if name.startswith("model") else ["-e", fx.model]
        argv = py("llmc_jax.train", "--config", path, *model, "-i", fx.train, "-j", fx.val, "-b", 1, "-t", 32,
                  "-x", 1, "-s", 0, "-v", 0)      # these override the file: its range cases use other keys
        expect = (0, 2) if name == "empty" else (2,)
        cases.append(Case("config", name, argv, expect, what=f"train --config <{what}>",
                          setup=_build(fx, f"config/{name}.toml", build), mention=path.name, quick=quick))
    return cases


def hellaswag_cases(fx: Fixtures) -> list[Case]:
    """Kind 5: HellaSwag eval files for eval_hellaswag (layout in llmc_jax/evals/hellaswag.py)."""
    examples = good_examples(fx.seed)
    base = eval_file(examples)
    label, context, comps = examples[0]
    edits = {"token-ge-V": (label, [*context[:-1], 300], comps),
             "too-long-for-T": (label, list(range(70)), comps),
             "label-7": (7, context, comps),
             "empty-completion": (label, context, [comps[0], [], comps[2], comps[3]])}
    n = len(examples)
    vs = [Variant("control", "a valid 6-example file", writer(base), expect={"*": (0,)})]
    vs += damaged(base, fx.rng("hellaswag"), STATE_MAGIC, ("trunc-body", "bad-magic"))
    vs += [Variant("count-larger", f"header count {n + 5} > {n} examples", writer(with_slots(base, {2: n + 5}))),
           Variant("count-neg", "header count -1", writer(with_slots(base, {2: -1}))),
           Variant("longest-too-small", "header longest example = 4 bytes", writer(with_slots(base, {3: 4})))]
    vs += [Variant(name, f"example 0 edited: {name}", writer(eval_file([ex, *examples[1:]])),
                   quick=name == "token-ge-V") for name, ex in edits.items()]
    return file_cases(fx, "hellaswag file", vs, "hellaswag",
                      lambda p: py("llmc_jax.eval_hellaswag", "-e", fx.model, "-i", p, "-b", 4, "-t", 64),
                      "eval_hellaswag -i")


TRAIN_FLAGS: list[tuple[str, list[str], bool]] = [      # name, flags added to a valid run, quick
    ("lr-neg", ["-l", "-1"], False), ("lr-nan", ["-l", "nan"], True), ("lr-inf", ["-l", "inf"], False),
    ("lr-minus-inf", ["-l", "-inf"], False), ("lr-word", ["-l", "abc"], False),
    ("warmup-neg", ["-u", "-1"], False), ("wd-neg", ["-c", "-0.1"], False), ("eps-neg", ["--eps", "-1e-8"], False),
    ("eps-0", ["--eps", "0"], False), ("grad-clip-neg", ["--grad-clip", "-1"], False),
    ("beta1-1.5", ["--beta1", "1.5"], False), ("beta1-neg", ["--beta1", "-0.1"], False),
    ("beta2-neg", ["--beta2", "-0.5"], False), ("beta2-1.5", ["--beta2", "1.5"], False),
    ("final-frac-neg", ["-q", "-0.1"], False), ("final-frac-1.5", ["-q", "1.5"], False),
    ("skip-loss-z-neg", ["-sl", "-1"], False), ("skip-grad-z-neg", ["-sg", "-1"], False),
    ("val-batches-0", ["-m", "0"], False), ("val-batches-neg", ["-m", "-2"], False),
    ("gen-tokens-0", ["-g", "0"], False), ("gen-tokens-neg", ["-g", "-1"], False),
    ("batch-0", ["-b", "0"], False), ("batch-neg", ["-b", "-1"], False), ("batch-word", ["-b", "x"], False),
    ("seq-0", ["-t", "0"], False), ("seq-neg", ["-t", "-1"], False), ("seq-100000", ["-t", "100000"], True),
    ("seq-65", ["-t", "65"], False), ("steps-neg", ["-x", "-5"], False), ("steps-float", ["-x", "1.5"], False),
    ("val-every-neg", ["-v", "-1"], False), ("sample-every-neg", ["-s", "-1"], False),
    ("ckpt-every-neg", ["-n", "-2"], False), ("ckpt-keep-neg", ["-nk", "-1"], False),
    ("zero-7", ["-z", "7"], False), ("recompute-3", ["-r", "3"], False),
    ("dtype-float16", ["--dtype", "float16"], True),
    ("kernels-foo", ["--kernels", "foo"], False), ("attention-foo", ["--attention", "foo"], False),
    ("layernorm-foo", ["--layernorm", "foo"], False), ("backward-foo", ["--backward", "foo"], False),
    ("scheduler-foo", ["-k", "foo"], False), ("resume-2", ["-y", "2"], False), ("overfit-2", ["-a", "2"], False),
    ("tf32-2", ["-f", "2"], False), ("master-2", ["-w", "2"], False), ("shuffle-2", ["--shuffle", "2"], False),
    ("hellaswag-2", ["-h", "2"], False), ("seed-neg", ["--seed", "-1"], False),
    ("total-batch-not-multiple", ["-d", "48"], False), ("total-batch-neg", ["-d", "-32"], False),
    ("procs-0", ["-pn", "0"], False), ("rank-out-of-range", ["-pn", "1", "-pr", "3"], False),
    ("resume-without-o", ["-y", "1"], True), ("ckpt-without-o", ["-n", "2"], False),
    ("init-missing", ["-e", "missing.bin"], False), ("init-d999", ["-e", "d999"], False),
    ("init-empty", ["-e", ""], False), ("unknown-flag", ["--no-such-flag", "1"], True),
    ("missing-value", ["-l"], False), ("train-glob-empty-string", ["-i", ""], False),
    ("proc-output", ["-o", "/proc/llmc_probe"], False),
]


def flag_cases(fx: Fixtures) -> list[Case]:
    """Kind 6: ~100 wrong flag uses across the commands and scripts; each must be exit 2, one line."""
    d = fx.files / "flags"
    d.mkdir(parents=True, exist_ok=True)
    cases = [Case("flags", f"train/{name}", fx.tiny_train(*extra), what="train " + shlex.join(extra), quick=quick)
             for name, extra, quick in TRAIN_FLAGS]
    specials = [("train/output-is-a-file", fx.tiny_train("-o", d / "regular_file"), "train -o <an existing file>",
                 lambda: d.joinpath("regular_file").write_text("x"), True),
                ("train/resume-empty-dir", fx.tiny_train("-o", d / "empty_dir", "-y", 1), "train -o <empty dir> -y 1",
                 lambda: make_dir(d / "empty_dir"), False),
                ("train/hellaswag-missing-file", fx.tiny_train("-h", 1, "-b", 4, "--hellaswag-file", d / "missing.bin"),
                 "train -h 1 --hellaswag-file <missing>", None, False),
                ("train/hellaswag-batch-too-small", fx.tiny_train("-h", 1, "--hellaswag-file", fx.hellaswag),
                 "train -h 1 -b 1 (needs B >= 4)", None, False)]
    cases += [Case("flags", name, argv, what=what, setup=setup, quick=quick)
              for name, argv, what, setup, quick in specials]
    return cases + other_flag_cases(fx, d)


OTHER_FLAGS: list[tuple[str, list[object], bool]] = [    # name, flags added to a valid command, quick
    ("sample/init-missing", ["-e", "missing.bin"], False), ("sample/gen-neg", ["-g", "-1"], False),
    ("sample/gen-0", ["-g", "0"], False), ("sample/top-k-0", ["--top-k", "0"], True),
    ("sample/top-k-neg", ["--top-k", "-3"], False), ("sample/temperature-neg", ["--temperature", "-1"], False),
    ("sample/temperature-nan", ["--temperature", "nan"], False),
    ("sample/tokenizer-foo", ["--tokenizer", "foo"], False),
    ("sample/tokenizer-gpt2-for-V250", ["--tokenizer", "gpt2"], False),
    ("sample/dtype-float16", ["--dtype", "float16"], False), ("sample/unknown-flag", ["--bogus"], False),
    ("gradcheck/init-missing", ["-e", "missing.bin"], False),
    ("gradcheck/state-missing", ["--llmc-state", "missing_state.bin"], False),
    ("gradcheck/batch-0", ["-b", "0"], False), ("gradcheck/seq-0", ["-t", "0"], False),
    ("gradcheck/seq-100000", ["-t", "100000"], False), ("gradcheck/batch-neg", ["-b", "-1"], False),
    ("gradcheck/input-missing", ["-i", "missing_shard.bin"], False),
    ("gradcheck/config-missing", ["--config", "missing.toml"], False),
    ("gradcheck/dtype-float16", ["--dtype", "float16"], False),
    ("eval_hellaswag/init-missing", ["-e", "missing.bin"], False),
    ("eval_hellaswag/input-missing", ["-i", "missing_hellaswag.bin"], False),
    ("eval_hellaswag/batch-2", ["-b", "2"], True), ("eval_hellaswag/batch-0", ["-b", "0"], False),
    ("eval_hellaswag/seq-0", ["-t", "0"], False), ("eval_hellaswag/seq-100000", ["-t", "100000"], False),
    ("eval_hellaswag/seq-too-short", ["-t", "8"], False), ("eval_hellaswag/max-examples-neg", ["-n", "-1"], False),
]


def other_flag_cases(fx: Fixtures, d: Path) -> list[Case]:
    """Wrong uses of sample, gradcheck, eval_hellaswag, launch and the scripts."""
    valid = {"sample": py("llmc_jax.sample", "-e", fx.model, "-g", 4, "--tokenizer", "byte"),
             "gradcheck": py("llmc_jax.gradcheck", "-e", fx.model, "-b", 1, "-t", 16),
             "eval_hellaswag": py("llmc_jax.eval_hellaswag", "-e", fx.model, "-i", fx.hellaswag, "-b", 4, "-t", 64)}
    cases = [Case("flags", name, [*valid[name.split("/")[0]], *map(str, extra)],
                  what=f"{name.split('/')[0]} {shlex.join(map(str, extra))}", quick=quick)
             for name, extra, quick in OTHER_FLAGS]
    cases.append(Case("flags", "sample/no-init", py("llmc_jax.sample", "-g", 4), what="sample without -e"))
    train = [PY, *map(str, fx.tiny_train())]
    launch = lambda *a: py("llmc_jax.launch", *a)      # noqa: E731
    prep, plot, text = str(REPO / "scripts" / "prepare_text.py"), str(REPO / "scripts" / "plot_log.py"), d / "text.txt"
    table: list[tuple[str, list[object], bool]] = [
        ("launch/nproc-0", launch("--nproc", 0, "--", *train), True),
        ("launch/nothing-after-dashes", launch("--nproc", 2, "--"), False),
        ("launch/no-command", launch("--nproc", 2), False),
        ("launch/nproc-word", launch("--nproc", "x", "--", *train), False),
        ("launch/nproc-neg", launch("--nproc", -1, "--", *train), False),
        ("launch/port-99999", launch("--nproc", 1, "--port", 99999, "--", *train), False),
        ("scripts/prepare-text-missing", [prep, "missing.txt", "-o", d / "prep"], True),
        ("scripts/prepare-text-bad-tokenizer", [prep, text, "-o", d / "prep2", "--tokenizer", "foo"], False),
        ("scripts/prepare-text-no-output", [prep, text], False),
        ("scripts/prepare-text-directory", [prep, d / "empty_dir", "-o", d / "prep3"], False),
        ("scripts/plot-log-missing", [plot, "missing_dir"], False),
        ("scripts/plot-log-empty-dir", [plot, d / "empty_dir"], False)]
    setup = lambda: (make_dir(d / "empty_dir"), text.write_text("hello world\n")) and None   # noqa: E731
    for name, argv, quick in table:
        what = shlex.join(map(str, argv[1:] if argv[0] == "-m" else argv)).replace(str(fx.out), "$OUT")
        cases.append(Case("flags", name, list(map(str, argv)), what=what.replace(str(REPO) + "/", ""),
                          setup=setup, quick=quick))
    return cases


# ---------------------------------------------------------------------------------- checkpoints

CKPT_STEP = 6


def ckpt_argv(fx: Fixtures, run: Path, *extra: object) -> list[str]:
    """The checkpointed run (steps 3 and 6); resumes repeat it with -y 1 -x 9 (extra wins)."""
    return py("llmc_jax.train", "-e", fx.model, "-i", fx.train, "-j", fx.val, "-b", 1, "-t", 32, "-x", 6, "-n", 3,
              "-o", run, "--dtype", "float32", *extra)


def ckpt_base(fx: Fixtures, runner: Runner) -> Path:
    """Run the good checkpointed run once; every checkpoint case tampers with a copy of it."""
    run = fx.out / "runs" / "ckpt-base"
    proc = runner.run(ckpt_argv(fx, run))
    if proc.rc != 0 or not (run / f"DONE_{CKPT_STEP:08d}").exists():
        raise RuntimeError(f"the checkpointed base run failed (rc {proc.rc}): {last_lines(proc.err, 3)}")
    return run


@dataclasses.dataclass(frozen=True)
class Tamper:
    """One way to damage a copy of the checkpointed run before resuming it."""

    name: str
    what: str
    apply: Callable[[Path], str | None]     # (run dir) -> a note on what exactly was done
    extra: tuple[object, ...] = ()          # resume flags added after -y 1 -x 9
    mention: str | None = None              # the file the refusal must name
    quick: bool = False
    expect: tuple[int, ...] = (2,)          # exit codes that pass (0: must resume)


S6 = f"{CKPT_STEP:08d}"
MODEL6, META6, STATE6, DONE6 = f"model_{S6}.bin", f"meta_{S6}.json", f"state_{S6}", f"DONE_{S6}"


def edit_bytes(path: Path, edit: Callable[[bytes], bytes]) -> None:
    path.write_bytes(edit(path.read_bytes()))


def edit_meta(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """A tamper that edits meta_00000006.json's JSON."""
    def apply(run: Path) -> None:
        meta = json.loads((run / META6).read_text())
        edit(meta)
        (run / META6).write_text(json.dumps(meta))
    return apply


def bump_sample_idx(meta: dict) -> None:
    meta["train_loaders"][0]["sample_idx"] += 1


def change_rng(meta: dict) -> None:
    meta["train_loaders"][0]["rng"]["key"][1] ^= 1


def change_seed(meta: dict) -> None:
    meta["args"]["seed"] += 1


def state_files(run: Path) -> list[Path]:
    return sorted(p for p in (run / STATE6).rglob("*") if p.is_file())


def flip_state_file(k: int, rng: random.Random) -> Callable[[Path], str]:
    """Flip one byte of the k-th (in a seeded order) regular file under state_00000006/."""
    def apply(run: Path) -> str:
        files = state_files(run)
        rng.shuffle(files)
        if k >= len(files):
            return f"only {len(files)} files under {STATE6}: nothing flipped"
        pos = rng.randrange(max(1, files[k].stat().st_size))
        edit_bytes(files[k], lambda b: flip(b, pos) if b else b"\0")
        return f"flipped byte {pos} of {files[k].relative_to(run)}"
    return apply


def delete_state_file(rng: random.Random) -> Callable[[Path], str]:
    def apply(run: Path) -> str:
        target = rng.choice(state_files(run))
        target.unlink()
        return f"deleted {target.relative_to(run)}"
    return apply


def older_state(run: Path) -> None:
    shutil.rmtree(run / STATE6)
    shutil.copytree(run / "state_00000003", run / STATE6)


def empty_done(run: Path) -> None:
    (run / DONE6).write_bytes(b"")


def malform_log(run: Path) -> str:
    lines = (run / "main.log").read_text().splitlines(keepends=True)
    lines.insert(len(lines) // 2, "s:3x trl:oops\n")
    (run / "main.log").write_text("".join(lines))
    return f"inserted 's:3x trl:oops' as line {len(lines) // 2 + 1} of main.log"


def ckpt_tampers(fx: Fixtures) -> list[Tamper]:
    """Every way the checkpoint probe damages a copy of the run (and one untouched control)."""
    pos = HEADER + fx.rng("ckpt").randrange(len(fx.model_bytes) - HEADER)
    smaller = fx.files / "ckpt" / "train_smaller.bin"
    tokens = np.frombuffer(fx.train.read_bytes()[HEADER:], "<u2")
    return [
        Tamper("control", "an untouched copy (must resume: rc 0)", lambda r: None, quick=True, expect=(0,)),
        Tamper("model-NH", f"{MODEL6} header NH 4 -> 8 (same size)",
               lambda r: edit_bytes(r / MODEL6, lambda b: with_slots(b, {5: 8})), mention=MODEL6, quick=True),
        Tamper("model-V", f"{MODEL6} header V 250 -> 200 (same size)",
               lambda r: edit_bytes(r / MODEL6, lambda b: with_slots(b, {3: 200})), mention=MODEL6),
        Tamper("model-weight-byte", f"{MODEL6} byte {pos} flipped (inside the weights)",
               lambda r: edit_bytes(r / MODEL6, lambda b: flip(b, pos)), mention=MODEL6),
        Tamper("meta-sample-idx", f"{META6}: train loader sample_idx + 1", edit_meta(bump_sample_idx),
               mention=META6, quick=True),
        Tamper("meta-seed", f"{META6}: args.seed 42 -> 43", edit_meta(change_seed), mention=META6),
        Tamper("meta-rng", f"{META6}: train loader rng key[1] changed", edit_meta(change_rng), mention=META6),
        Tamper("meta-invalid-json", f"{META6} cut in half (invalid JSON)",
               lambda r: edit_bytes(r / META6, lambda b: b[:len(b) // 2]), mention=META6),
        Tamper("state-from-step-3", f"{STATE6} replaced by state_00000003", older_state, mention=STATE6),
        *(Tamper(f"state-byte-flip-{k}", f"one byte flipped in a file under {STATE6}/",
                 flip_state_file(k, fx.rng("flip", k)), mention=STATE6, quick=k == 0) for k in range(5)),
        Tamper("state-file-deleted", f"one file under {STATE6}/ deleted", delete_state_file(fx.rng("delete")),
               mention=STATE6),
        Tamper("done-emptied", f"{DONE6} emptied (a pre-verification checkpoint)", empty_done, mention=DONE6),
        # main.log is a log, not checkpoint state (a kill can tear its last line): the resume drops
        # the malformed line with a note naming main.log and goes on
        Tamper("main-log-malformed", "main.log gets a malformed line (dropped with a note: rc 0)", malform_log,
               mention="main.log", expect=(0,)),
        Tamper("max-steps-below", f"resumed with -x 4, below the checkpoint's step {CKPT_STEP}", lambda r: None,
               extra=("-x", 4), quick=True),
        Tamper("train-shard-resized", f"resumed with a train shard of 12000 instead of {tokens.size} tokens",
               lambda r: fx.file("ckpt/train_smaller.bin", writer(shard(tokens[:12000]))) and None,
               extra=("-i", smaller)),
    ]


def ckpt_cases(fx: Fixtures, runner: Runner) -> list[Case]:
    """Kind 7: copy the checkpointed run, tamper with the copy, resume it with -y 1 -x 9."""
    cases = []
    for t in ckpt_tampers(fx):
        run = fx.out / "runs" / f"ckpt-{t.name}"

        def setup(run: Path = run, t: Tamper = t) -> str | None:
            base = fx.once("ckpt-base", lambda: ckpt_base(fx, runner))
            shutil.copytree(base, run)
            return t.apply(run)
        cases.append(Case("checkpoint", t.name, ckpt_argv(fx, run, "-y", 1, "-x", 9, *t.extra),
                          t.expect, what=t.what, setup=setup, mention=t.mention,
                          quick=t.quick))
    return cases


# -------------------------------------------------------------------------------- kill & resume

KILL_STEPS = 12


def kill_argv(fx: Fixtures, run: Path, *extra: object) -> list[str]:
    return py("llmc_jax.train", "-e", fx.model, "-i", fx.train, "-j", fx.val, "-b", 1, "-t", 32, "-x", KILL_STEPS,
              "-n", 2, "-v", 4, "-s", 0, "-o", run, "--shuffle", 1, "--dtype", "float32", *extra)


def reference_log(fx: Fixtures, runner: Runner) -> str:
    """main.log of the uninterrupted run that every killed and resumed run must reproduce exactly."""
    run = fx.out / "runs" / "kill-reference"
    proc = runner.run(kill_argv(fx, run))
    if proc.rc != 0:
        raise RuntimeError(f"the reference run failed (rc {proc.rc}): {last_lines(proc.err, 3)}")
    return (run / "main.log").read_text()


def wait_for(done: Callable[[], bool], timeout: float, poll: float = 0.005) -> float:
    """Seconds until done() (or the timeout)."""
    start = time.monotonic()
    while not done() and time.monotonic() - start < timeout:
        time.sleep(poll)
    return time.monotonic() - start


def partial_checkpoint(run: Path, step: int | None = None) -> str | None:
    """A checkpoint file or state dir (of `step`, or any) whose DONE marker is not there yet."""
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return None
    for name in names:
        m = re.match(r"(?:model|state|meta)_(\d{8})", name)
        if m and int(m.group(1)) > 0 and f"DONE_{m.group(1)}" not in names and step in (None, int(m.group(1))):
            return name
    return None


def done_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("DONE_*") if p.name[5:].isdigit())


def kill_cases(fx: Fixtures, n: int) -> list[Case]:
    """Kind 8: SIGKILL a checkpointing run (right after a random step, while it writes a checkpoint,
    or during start-up), resume it with -y 1 (afresh if no checkpoint was complete); its main.log
    must equal the uninterrupted run's."""
    cases = []
    for k in range(n):
        rng = fx.rng("kill", k)
        plan = (("checkpoint", rng.randrange(2, KILL_STEPS + 1, 2)) if k % 5 == 1 else
                ("startup", round(rng.uniform(0.2, 4.0), 2)) if k % 6 == 3 else ("step", rng.randint(1, KILL_STEPS)))
        what = {"checkpoint": "killed while writing checkpoint {}", "startup": "killed {}s after start",
                "step": "killed within 50 ms after step {} was printed"}[plan[0]].format(plan[1])
        run = fx.out / "runs" / f"kill-{k:02d}"
        cases.append(Case("kill & resume", f"run-{k:02d}", kill_argv(fx, run, "-y", 1), (0,),
                          what=what + ", then resumed", quick=k < 3,
                          procedure=functools.partial(kill_and_resume, fx, run, plan, rng)))
    return cases


def interrupt(argv: list[str], run: Path, plan: tuple[str, float], rng: random.Random,
              runner: Runner) -> tuple[str, int | None]:
    """Start the run, SIGKILL it as planned; (what happened, its exit status if it ended by itself)."""
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.out", "w") as out, open(run.parent / f"{run.name}.err", "w") as err:
        p = runner.popen(argv, stdout=out, stderr=err)
    mode, x = plan
    ended = lambda: p.poll() is not None      # noqa: E731
    start = time.monotonic()
    if mode == "startup":
        wait_for(ended, x)
    elif mode == "step":
        printed = re.compile(rf"^step\s+{int(x)}/", re.M)
        wait_for(lambda: ended() or bool(printed.search((run.parent / f"{run.name}.out").read_text())), runner.timeout)
        time.sleep(rng.uniform(0.0, 0.05))
    else:
        wait_for(lambda: ended() or partial_checkpoint(run, int(x)) is not None, runner.timeout, 0.001)
    caught, rc = partial_checkpoint(run), p.poll()
    runner.kill(p)
    p.wait()
    runner.live.discard(p)
    if rc is not None:
        return f"the run ended by itself (rc {rc}) before the kill", rc
    return (f"SIGKILL {time.monotonic() - start:.2f}s after start"
            + (f" while {caught} was being written" if caught else "")), None


def kill_and_resume(fx: Fixtures, run: Path, plan: tuple[str, float], rng: random.Random, case: Case,
                    runner: Runner) -> Outcome:
    """One kill & resume; the outcome is the resumed run's, with main.log compared to the reference."""
    ref = str(fx.once("kill-reference", lambda: reference_log(fx, runner)))
    start = time.monotonic()
    how, rc = interrupt(kill_argv(fx, run), run, plan, rng, runner)
    steps = done_steps(run)
    if KILL_STEPS in steps or rc is not None:      # nothing left to resume: judge the run itself
        argv = kill_argv(fx, run)
        err = (run.parent / f"{run.name}.err").read_text()
        proc = Proc(rc if rc is not None else 0, "", err, time.monotonic() - start)
        resumed = "complete, no resume needed"
    else:
        argv = kill_argv(fx, run, "-y", 1) if steps else kill_argv(fx, run)
        proc = runner.run(argv)
        resumed = f"resumed from step {steps[-1]}" if steps else "no complete checkpoint: started afresh without -y"
    out = runner.outcome(case, argv, proc, seconds=time.monotonic() - start)
    out.note = f"{how}; complete checkpoints {steps}; {resumed}"
    log = (run / "main.log").read_text() if (run / "main.log").exists() else ""
    if out.passed and log != ref:
        out.verdict = MISMATCH
        out.note += "; main.log differs from the uninterrupted run's: " + log_diff(ref, log)
    elif out.passed:
        out.note += "; main.log identical to the uninterrupted run's"
    return out


def log_diff(want: str, got: str) -> str:
    a, b = want.splitlines(), got.splitlines()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {i + 1}: expected {x!r}, got {y!r}"
    return f"{len(b)} lines instead of {len(a)}"


# ---------------------------------------------------------------------------------------- runner

def last_lines(text: str, n: int) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def classify(case: Case, proc: Proc) -> tuple[str, str]:
    """The verdict for one finished run of a case, and a note saying why when it is not obvious."""
    err = proc.err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if proc.timed_out:
        return HANG, f"still running after {proc.seconds:.0f}s"
    if TRACE_RE.search(err):
        return TRACEBACK, ""
    if proc.rc == 0:
        return (RAN, "") if 0 in case.expect else (SILENT, "exit 0 for a case that must fail")
    if case.expect == (0,):
        return FAILED, "a run that must succeed did not"
    if proc.rc is None or proc.rc < 0:
        return MESSY, f"killed by signal {-proc.rc if proc.rc else '?'}"
    if len(errors) != 1:
        return MESSY, f"{len(errors)} lines start with 'error:'"
    if proc.rc not in case.expect:
        return WRONG_CODE, f"exit {proc.rc}, expected {'/'.join(map(str, case.expect))}"
    if case.forbid_started and STARTED_RE.search(proc.out):
        return LATE, "refused only after training had started"
    if case.mention and case.mention not in errors[0]:
        return VAGUE, f"the error line does not name {case.mention}"
    return ONE_LINE, ""


class Runner:
    """Runs commands in subprocesses (own process group, private cache, timeout) and judges them."""

    def __init__(self, out: Path, timeout: float):
        self.out, self.timeout = out, timeout
        self.live: set[subprocess.Popen] = set()
        self.stopping = False
        self.cwd = out / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "LLMC_JAX_DEBUG"}
        self.env.update(JAX_PLATFORMS="cpu", LLMC_JAX_CACHE=str(out / "cache"), MPLCONFIGDIR=str(out / "cache" / "mpl"),
                        XDG_CACHE_HOME=str(out / "cache" / "xdg"), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def popen(self, argv: list[str], stdout: object = subprocess.PIPE, stderr: object = subprocess.PIPE
              ) -> subprocess.Popen:
        """`python argv...` in its own process group (so a kill reaches its children too)."""
        if self.stopping:
            raise RuntimeError("the probe is stopping")
        p = subprocess.Popen([PY, *map(str, argv)], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                             stdout=stdout, stderr=stderr, text=True, errors="replace", start_new_session=True)
        self.live.add(p)
        return p

    def stop_all(self) -> None:
        """No new commands; SIGKILL the groups of those running."""
        self.stopping = True
        for p in list(self.live):
            self.kill(p)

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        """SIGKILL the process group we started for p (children included)."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self, argv: list[str]) -> Proc:
        """Run to the end or to the timeout (then SIGKILL the group: a hang)."""
        start = time.monotonic()
        p = self.popen(argv)
        try:
            out, err = p.communicate(timeout=self.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            self.kill(p)
            out, err = p.communicate()
            timed_out = True
        self.kill(p)             # anything it left behind in its group
        self.live.discard(p)
        return Proc(None if timed_out else p.returncode, out, err, time.monotonic() - start, timed_out)

    def outcome(self, case: Case, argv: list[str], proc: Proc, seconds: float | None = None) -> Outcome:
        verdict, note = classify(case, proc)
        lines = proc.err.strip().splitlines()
        return Outcome(case.kind, case.name, case.what, self.show(argv), list(case.expect), proc.rc,
                       round(proc.seconds if seconds is None else seconds, 2), verdict, len(lines), lines[-6:], note)

    def show(self, argv: list[str]) -> str:
        """The command as a developer would type it from the repo root ($OUT = the probe's out dir)."""
        return ("python " + shlex.join(map(str, argv))).replace(str(self.out), "$OUT").replace(str(REPO) + "/", "")

    def execute(self, case: Case) -> Outcome:
        """Set up, run and judge one case; a failing setup is reported as the case's failure."""
        start = time.monotonic()
        try:
            note = case.setup() if case.setup else None
            if case.procedure:
                return case.procedure(case, self)
            out = self.outcome(case, case.argv, self.run(case.argv))
        except Exception as e:      # the probe must report every case, whatever happened
            return Outcome(case.kind, case.name, case.what, self.show(case.argv), list(case.expect), None,
                           round(time.monotonic() - start, 2), FAILED, note=f"setup failed: {type(e).__name__}: {e}")
        if note:
            out.what = f"{case.what}: {note}"
        return out


# -------------------------------------------------------------------------------------- reporter

def counts(outcomes: list[Outcome]) -> dict[str, int]:
    c = Counter(o.verdict for o in outcomes)
    row = {"inputs tried": len(outcomes), "passed": sum(o.passed for o in outcomes)}
    row.update({col: c[col] for col in COLUMNS})
    row["other"] = sum(n for v, n in c.items() if v not in COLUMNS and v != RAN)
    return row


def tables(outcomes: list[Outcome]) -> tuple[dict[str, dict[str, int]], str]:
    """Counts per kind (and a total) and the same as a Markdown table."""
    kinds = list(dict.fromkeys(o.kind for o in outcomes))
    rows = {k: counts([o for o in outcomes if o.kind == k]) for k in kinds}
    rows["total"] = counts(outcomes)
    head = ["kind", *rows["total"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, row in rows.items():
        name = f"**{kind}**" if kind == "total" else kind
        lines.append("| " + " | ".join([name, *map(str, row.values())]) + " |")
    return rows, "\n".join(lines)


def failure_list(outcomes: list[Outcome]) -> str:
    """Every non-passing case, with what a developer needs to reproduce and fix it."""
    bad = [o for o in outcomes if not o.passed]
    if not bad:
        return "No failing cases."
    parts = []
    for o in bad:
        tail = "\n".join(f"    {line}" for line in o.stderr_tail) or "    (empty)"
        parts.append(f"- **{o.kind} / {o.name}**: {o.verdict} (rc {o.rc}, expected {'/'.join(map(str, o.expect))}, "
                     f"{o.stderr_lines} stderr lines, {o.seconds:.1f}s){': ' + o.note if o.note else ''}\n"
                     f"  - done: {o.what}\n  - command: `{o.command}`\n  - last stderr lines:\n\n{tail}\n")
    return "\n".join(parts)


def case_table(outcomes: list[Outcome], kind: str) -> str:
    """Every case of one kind with its expectation (for the small, stateful kinds)."""
    rows = ["| case | expected rc | got rc | verdict | done / note |", "|---|---|---|---|---|"]
    for o in (o for o in outcomes if o.kind == kind):
        detail = (o.what + (f" — {o.note}" if o.note else "")).replace("|", "\\|")
        rows.append(f"| {o.name} | {'/'.join(map(str, o.expect))} | {o.rc} | {o.verdict} | {detail} |")
    return "\n".join(rows)


def markdown(outcomes: list[Outcome], meta: dict) -> str:
    """The whole report: run facts, the table per kind, the stateful kinds case by case, the failures."""
    _, table = tables(outcomes)
    kill = [o for o in outcomes if o.kind == "kill & resume"]
    exact = sum(o.verdict == RAN and "resumed from" in o.note for o in kill)
    fresh = sum("afresh" in o.note for o in kill)
    aimed = sum("being written" in o.note for o in kill)
    whole = sum("no resume needed" in o.note for o in kill)
    scope = ("quick" if meta["quick"] else "full") + (f", only kinds matching {meta['only']!r}" if meta["only"] else "")
    doc = [f"# Reliability probe ({scope} run)", "",
           f"{meta['date']}, seed {meta['seed']}, {meta['jobs']} jobs, timeout {meta['timeout']}s, "
           f"{meta['seconds']:.0f}s wall; `$OUT` = `{meta['out']}`; tree: {meta['tree']}", "",
           "`passed` = one-line errors with the expected exit status + runs that were allowed to succeed; "
           "`other` = messy error, late refusal, vague message, failed run, log mismatch.", "", table, ""]
    if kill:
        doc += [f"Kill & resume: {exact}/{len(kill)} exact resumes from a checkpoint (main.log identical), "
                f"{fresh} fresh starts (killed before the first checkpoint), {whole} already complete when killed; "
                f"{aimed} killed while a checkpoint was being written.", ""]
    for kind in ("checkpoint", "kill & resume"):
        if any(o.kind == kind for o in outcomes):
            doc += [f"## {kind}: every case", "", case_table(outcomes, kind), ""]
    doc += ["## Non-passing cases", "", failure_list(outcomes)]
    return "\n".join(doc) + "\n"


def write_report(out: Path, outcomes: list[Outcome], meta: dict) -> str:
    rows, _ = tables(outcomes)
    (out / "probe.json").write_text(json.dumps({"meta": meta, "summary": rows,
                                                "cases": [dataclasses.asdict(o) for o in outcomes]}, indent=1))
    text = markdown(outcomes, meta)
    (out / "probe.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------ main

def all_cases(fx: Fixtures, runner: Runner, kills: int) -> list[Case]:
    """Every kind, the long stateful ones first so that they do not straggle at the end."""
    return [*kill_cases(fx, kills), *ckpt_cases(fx, runner), *model_cases(fx), *debug_state_cases(fx),
            *shard_cases(fx), *hellaswag_cases(fx), *config_cases(fx), *flag_cases(fx)]


def run_all(cases: list[Case], runner: Runner, fx: Fixtures, jobs: int) -> list[Outcome]:
    """Run the cases on `jobs` threads (each a subprocess), printing one line per finished case."""
    results: dict[int, Outcome] = {}
    with futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        if any(c.kind == "kill & resume" for c in cases):     # start the shared runs before the cases
            pool.submit(safely, fx.once, "kill-reference", lambda: reference_log(fx, runner))
        if any(c.kind == "checkpoint" for c in cases):
            pool.submit(safely, fx.once, "ckpt-base", lambda: ckpt_base(fx, runner))
        todo = {pool.submit(runner.execute, case): i for i, case in enumerate(cases)}
        for n, fut in enumerate(futures.as_completed(todo), start=1):
            o = results[todo[fut]] = fut.result()
            print(f"[{n:3d}/{len(cases)}] {o.verdict:15s} {o.kind} / {o.name} (rc {o.rc}, {o.seconds:.1f}s)",
                  file=sys.stderr, flush=True)
    return [results[i] for i in range(len(cases))]


def safely(fn: Callable[..., object], *args: object) -> None:
    """A warm-up whose failure the cases that need it will report (fx.once raises again for them)."""
    try:
        fn(*args)
    except Exception:
        pass


def git_state() -> str:
    """The tree the probe ran on (commit, and whether it had uncommitted changes), for the report."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The probe's own flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a sample of each kind (~40 cases, a few minutes)")
    p.add_argument("--out", help="output dir for inputs, runs, probe.json and probe.md (default: a new temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="parallel subprocesses (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as a hang (default 120)")
    p.add_argument("--kills", type=int, help="kill & resume rounds (default 12; 3 with --quick)")
    p.add_argument("--only", help="run only the kinds whose name contains this (e.g. 'model', 'flags')")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0 or (args.kills is not None and args.kills < 0):
        p.error("--jobs and --timeout must be positive, --kills >= 0")
    return args


def prepare_out(arg: str | None) -> Path:
    """The out dir, with what an earlier probe left in it removed (the compile cache is kept)."""
    out = Path(arg or tempfile.mkdtemp(prefix="llmc_probe_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("files", "runs", "cwd"):
        shutil.rmtree(out / sub, ignore_errors=True)
    return out


BULKY = ("files", "runs", "cwd", "cache")     # inputs, run folders, compile cache: ~260 MB for all cases


def clean_temp_out(out: Path, reported: bool) -> None:
    """A default (temporary) out dir on the way out: only the report stays; nothing if there is none."""
    if not reported:
        shutil.rmtree(out, ignore_errors=True)
        return
    for sub in BULKY:
        shutil.rmtree(out / sub, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Build the inputs, run the selected cases, report; 0 when every case passed, else 1. With no
    --out, the temporary out dir keeps only probe.json and probe.md, on every way out (SIGTERM,
    SIGHUP and Ctrl-C kill the running commands first)."""
    args = parse_args(argv)
    out = prepare_out(args.out)
    runner = Runner(out, args.timeout)

    def stop(signum, frame):
        runner.stop_all()
        raise SystemExit(128 + signum)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    reported = False
    try:
        reported, rc = probe(args, out, runner)
        return rc
    finally:
        runner.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.out is None:
            clean_temp_out(out, reported)


def probe(args: argparse.Namespace, out: Path, runner: Runner) -> tuple[bool, int]:
    """(report written, exit status)."""
    started, date = time.monotonic(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    fx = Fixtures(out, args.seed)
    cases = all_cases(fx, runner, args.kills if args.kills is not None else 3 if args.quick else 12)
    cases = [c for c in cases if (c.quick or not args.quick) and (not args.only or args.only in c.kind)]
    if args.list:
        for c in cases:
            print(f"{c.kind:14s} {c.name:40s} expect {'/'.join(map(str, c.expect)):5s} {c.what}")
        return False, 0
    print(f"probing {len(cases)} cases with {args.jobs} jobs; out dir {out}", file=sys.stderr, flush=True)
    outcomes = run_all(cases, runner, fx, args.jobs)
    meta = {"date": date, "seed": args.seed, "jobs": args.jobs, "timeout": args.timeout, "quick": args.quick,
            "only": args.only, "out": str(out), "tree": git_state(), "seconds": round(time.monotonic() - started, 1),
            "python": sys.version.split()[0]}
    print(write_report(out, outcomes, meta))
    print(f"wrote {out / 'probe.json'} and {out / 'probe.md'}", file=sys.stderr)
    return True, 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
