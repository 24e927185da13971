"""python -m llmc_jax.eval_loss against llm.c's own val loss of the tiny fixture (tests/data/llmc_tiny)."""
import json
import os

import pytest

from llmc_jax import eval_loss
from llmc_jax.errors import run

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llmc_tiny")


def test_matches_llmc_val_loss(capsys):
    """llm.c's train_gpt2.c printed val loss (5 batches of 4x64 from the start of val.bin) at step 0."""
    want = json.load(open(os.path.join(DATA, "expected.json")))["val_losses"]["0"]
    assert eval_loss.main(["-e", os.path.join(DATA, "model.bin"), "-j", os.path.join(DATA, "val.bin"),
                           "-b", "4", "-t", "64", "-m", "5"]) == 0
    got = float(capsys.readouterr().out.split("val loss")[1])
    assert got == pytest.approx(want, abs=2e-5)


@pytest.mark.parametrize("argv, needle", [
    (["-e", os.path.join(DATA, "model.bin")], "name its val shards with -j"),       # V=250: no default data
    (["-e", os.path.join(DATA, "model.bin"), "-j", os.path.join(DATA, "val.bin"), "-t", "65"], "maxT"),
    (["-e", os.path.join(DATA, "model.bin"), "-j", os.path.join(DATA, "val.bin"), "-b", "0"], "-b"),
    (["-e", os.path.join(DATA, "nope.bin"), "-j", os.path.join(DATA, "val.bin")], "nope.bin"),
])
def test_bad_input_is_one_line(argv, needle, capsys):
    assert run(eval_loss.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
