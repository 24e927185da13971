"""Llama 3 from scratch through the commands: a TOML [model] table (the `llama3:tiny` descriptor's
sizes) trains on the built-in byte corpus, the run learns, and `sample` decodes from its checkpoint
what the plain-jnp reference decodes greedily."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from llmc_jax import sample, train
from llmc_jax.formats import llama3_format
from llmc_jax.models import llama_reference
from llmc_jax.models.config import load_toml
from llmc_jax.models.llama_config import from_descriptor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["-b", "4", "-t", "64", "-d", "256", "-x", "12", "-l", "3e-3", "-u", "0", "-q", "1.0", "-v", "0", "-s", "0",
         "-n", "12", "--dtype", "float32"]


def _losses(out: str) -> list[float]:
    return [float(m.group(1)) for m in (re.match(r"^step\s+\d+/\d+ \| loss (\S+)", line) for line in out.splitlines()) if m]


def test_config_table_trains_and_sample_decodes_its_checkpoint(tmp_path, capsys):
    assert load_toml(f"{REPO}/configs/llama3_tiny.toml")["model"] == from_descriptor("llama3:tiny")
    assert train.main(FLAGS + ["--config", f"{REPO}/configs/llama3_tiny.toml", "-o", str(tmp_path / "toml")]) == 0
    losses = _losses(capsys.readouterr().out)
    # byte-level text: from ln(256) = 5.55 a model that learns reaches well under the unigram level
    assert len(losses) == 12 and losses[0] > 5.3 and np.mean(losses[-3:]) < losses[0] - 1.5, losses

    ckpt = tmp_path / "toml" / "model_00000012.bin"
    config, params = llama3_format.read_model(ckpt)
    assert config == from_descriptor("llama3:tiny")
    assert sample.main(["-e", str(ckpt), "--temperature", "0", "-g", "10", "--prompt", "The "]) == 0
    text = capsys.readouterr().out
    tok = sample._get_tokenizer("byte")
    ids = [tok.eot] + tok.encode("The ")
    params = {k: jnp.asarray(v) for k, v in params.items()}
    # greedy decoding by full forwards of the reference model over 16 positions (causal: the padding
    # after the last real token never reaches it), so one compile serves every step
    full = jax.jit(lambda idx: llama_reference.hidden_states(params, idx, config) @ params["lm_head"].T)
    for _ in range(10):
        ids.append(int(jnp.argmax(full(jnp.asarray([ids + [0] * (16 - len(ids))]))[0, len(ids) - 1])))
    assert text == tok.decode(ids[-10:]) + "\n"
