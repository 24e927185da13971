"""HellaSwag eval: llm.c's eval-file format, EvalLoader packing, and scoring against known answers."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_params
from llmc_jax import eval_hellaswag
from llmc_jax.evals import hellaswag
from llmc_jax.formats import llmc_format
from llmc_jax.models import gpt2
from llmc_jax.models.family import family_of, load_model
from conftest import gpt2_bpe_folder
from llmc_jax.models.config import GPTConfig
from llmc_jax.errors import run
from llmc_jax.evals.hellaswag import Example
from llmc_jax.formats.llmc_format import HEADER_BYTES, LLMCFormatError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GPTConfig(L=1, NH=2, C=32, maxT=32, V=16, Vp=16)


def _examples():
    return [
        Example(0, 2, [1, 2, 3], [[4], [5, 6], [7, 8, 9], [10]]),
        Example(1, 0, [11], [[12, 13], [14], [15], [0, 1, 2]]),
        Example(2, 3, [5, 4, 3, 2, 1], [[9], [9], [9, 9], [1, 2]]),
    ]


# ----------------------------------------------------------------------------------------------
# file format

def test_round_trip(tmp_path):
    path = tmp_path / "hs.bin"
    exs = _examples()
    hellaswag.write_eval_file(path, exs)
    assert hellaswag.read_eval_file(path) == exs
    header = np.fromfile(path, "<i4", count=256)
    words = np.fromfile(path, "<u2", offset=HEADER_BYTES)
    # example 0 by hand: 65535, bytes, index, label, 4, ctx len + ctx, 4 x (len + tokens)
    ex0 = [65535, 0, 0, 2, 4, 3, 1, 2, 3, 1, 4, 2, 5, 6, 3, 7, 8, 9, 1, 10]
    ex0[1] = 2 * len(ex0)
    assert words[:len(ex0)].tolist() == ex0
    sizes = [2 * (6 + len(e.context) + sum(1 + len(c) for c in e.completions)) for e in exs]
    assert header[:4].tolist() == [20240522, 1, 3, max(sizes)]
    assert os.path.getsize(path) == HEADER_BYTES + sum(sizes)


def test_write_renumbers_and_refuses_bad_examples(tmp_path):
    exs = [Example(7, 1, [1], [[2], [3], [4], [5]])]
    hellaswag.write_eval_file(tmp_path / "a.bin", exs)
    assert hellaswag.read_eval_file(tmp_path / "a.bin")[0].index == 0   # llm.c: index = position
    for bad, msg in [(Example(0, 4, [1], [[2], [3], [4], [5]]), "label 4"),
                     (Example(0, 0, [1], [[2], [3], [4]]), "3 completions"),
                     (Example(0, 0, [], [[2], [3], [4], [5]]), "empty context"),
                     (Example(0, 0, [1], [[2], [], [4], [5]]), "empty completion 1"),
                     (Example(0, 0, [65535], [[2], [3], [4], [5]]), "token 65535")]:
        with pytest.raises(LLMCFormatError, match=msg):
            hellaswag.write_eval_file(tmp_path / "b.bin", [bad])
    assert not os.path.exists(tmp_path / "b.bin")


def _corrupt(tmp_path, edit_words=None, edit_header=None, cut_bytes=0, extra=b""):
    path = tmp_path / "bad.bin"
    hellaswag.write_eval_file(path, _examples())
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], "<i4").copy()
    words = np.frombuffer(raw[HEADER_BYTES:], "<u2").copy()
    if edit_header:
        edit_header(header)
    if edit_words:
        words = np.asarray(edit_words(words), "<u2")
    data = header.tobytes() + words.tobytes() + extra
    path.write_bytes(data[:len(data) - cut_bytes])
    return path


EX0_WORDS = 20   # example 0 is 20 uint16 words (see test_round_trip)


def _set(i, v):
    def f(w):
        w[i] = v
        return w
    return f


@pytest.mark.parametrize("kwargs, msg", [
    (dict(edit_header=lambda h: h.__setitem__(0, 20240520)), "GPT-2 token data shard"),
    (dict(edit_header=lambda h: h.__setitem__(0, 12345)), "bad magic number 12345"),
    (dict(edit_header=lambda h: h.__setitem__(1, 3)), "unsupported version 3"),
    (dict(edit_header=lambda h: h.__setitem__(2, 4)), "ends after 3 of the 4 examples"),
    (dict(edit_header=lambda h: h.__setitem__(2, 2)), "bytes after the last of the header's 2 examples"),
    (dict(edit_header=lambda h: h.__setitem__(3, 20)), "longer than the header's longest"),
    (dict(cut_bytes=1), "not a whole number of uint16"),
    (dict(cut_bytes=4), "truncated"),
    (dict(extra=b"\xff\xff"), "bytes after the last"),
    (dict(edit_words=_set(EX0_WORDS, 65534)), "bad delimiter 65534"),
    (dict(edit_words=_set(EX0_WORDS + 2, 5)), "example index 5, expected 1"),
    (dict(edit_words=_set(3, 4)), "label 4 is not in"),
    (dict(edit_words=_set(4, 3)), "3 completions"),
    (dict(edit_words=_set(1, 41)), "impossible"),
    (dict(edit_words=_set(5, 30)), "lengths do not add up: context length 30"),
    (dict(edit_words=_set(5, 2)), "lengths do not add up"),   # context 1 shorter: the rest shifts
    (dict(edit_words=_set(1, 42)), "lengths do not add up"),  # example claims one word more
])
def test_bad_files(tmp_path, kwargs, msg):
    path = _corrupt(tmp_path, **kwargs)
    with pytest.raises(LLMCFormatError, match=msg):
        hellaswag.read_eval_file(path)


def test_short_or_missing_file(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    with pytest.raises(LLMCFormatError, match="shorter than"):
        hellaswag.read_eval_file(tmp_path / "short.bin")
    with pytest.raises(LLMCFormatError, match="not found"):
        hellaswag.read_eval_file(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="prepare_hellaswag.py"):
        hellaswag.load(tmp_path / "nope.bin", 4, 32)


# ----------------------------------------------------------------------------------------------
# packing

def test_packing_by_hand():
    exs = _examples()
    batches = list(hellaswag.batch_examples(exs, B=10, T=8))   # 2 examples per batch, rows 8, 9 unused
    assert len(batches) == 2 and [b.num_examples for b in batches] == [2, 1]
    b = batches[0]
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (10, 8)
    assert b.labels.tolist() == [2, 0]
    assert b.inputs.tolist() == [
        [1, 2, 3, 4, 0, 0, 0, 0],
        [1, 2, 3, 5, 6, 0, 0, 0],
        [1, 2, 3, 7, 8, 9, 0, 0],
        [1, 2, 3, 10, 0, 0, 0, 0],
        [11, 12, 13, 0, 0, 0, 0, 0],
        [11, 14, 0, 0, 0, 0, 0, 0],
        [11, 15, 0, 0, 0, 0, 0, 0],
        [11, 0, 1, 2, 0, 0, 0, 0],
        [0] * 8, [0] * 8]
    # the last context token (position 2 / 0) predicts the first completion token
    assert b.targets.tolist() == [
        [0, 0, 4, 0, 0, 0, 0, 0],
        [0, 0, 5, 6, 0, 0, 0, 0],
        [0, 0, 7, 8, 9, 0, 0, 0],
        [0, 0, 10, 0, 0, 0, 0, 0],
        [12, 13, 0, 0, 0, 0, 0, 0],
        [14, 0, 0, 0, 0, 0, 0, 0],
        [15, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 2, 0, 0, 0, 0, 0],
        [0] * 8, [0] * 8]
    assert b.mask.astype(int).tolist() == [
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0] * 8, [0] * 8]
    last = batches[1]   # padded: one example, slot 1 empty
    assert last.labels.tolist() == [3, -1]
    assert last.inputs[:4].tolist() == [[5, 4, 3, 2, 1, 9, 0, 0], [5, 4, 3, 2, 1, 9, 0, 0],
                                        [5, 4, 3, 2, 1, 9, 9, 0], [5, 4, 3, 2, 1, 1, 2, 0]]
    assert last.mask[:4].astype(int).tolist() == [[0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0],
                                                  [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
    assert not last.mask[4:].any() and not last.inputs[4:].any()
    # inputs shifted by one are the targets wherever the mask is set
    for bt in batches:
        assert (bt.targets[:, :-1][bt.mask[:, :-1]] == bt.inputs[:, 1:][bt.mask[:, :-1]]).all()


def test_packing_refuses_what_llmc_refuses():
    ex = [Example(0, 0, [1, 2, 3], [[4], [5, 6, 7, 8], [9], [10]])]   # 3 + 4 = 7 tokens
    assert hellaswag.required_seq_len(ex) == 8
    list(hellaswag.batch_examples(ex, 4, 8))       # 7 < 8: fits
    with pytest.raises(LLMCFormatError, match=r"T=7.*use T >= 8"):
        list(hellaswag.batch_examples(ex, 4, 7))   # llm.c asserts context + completion < T
    with pytest.raises(ValueError, match="B >= 4"):
        list(hellaswag.batch_examples(ex, 3, 8))
    with pytest.raises(LLMCFormatError, match="empty"):
        list(hellaswag.batch_examples([Example(0, 0, [], [[4], [5], [9], [10]])], 4, 8))
    with pytest.raises(LLMCFormatError, match="outside the model's vocabulary"):
        hellaswag.check_examples([Example(0, 0, [1], [[4], [5], [16], [10]])], 8, vocab_size=16)


def test_predict_is_llmc_scan():
    losses = np.array([[1.0, 1.0, 0.5, 0.5], [2.0, 1.0, 3.0, 0.9], [np.nan, 0.1, 0.2, 0.3],
                       [0.5, np.nan, 0.4, 0.6]])
    assert hellaswag.predict(losses).tolist() == [2, 3, 0, 2]


# ----------------------------------------------------------------------------------------------
# scoring

def _count(start, n):
    return [(start + i) % CFG.V for i in range(n)]


@pytest.fixture(scope="module")
def counting_params():
    """A tiny GPT-2 trained to continue the pattern t -> t+1 (mod 16)."""
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(v) for k, v in random_params(CFG, seed=3).items()}
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    vg = gpt2.value_and_grad(CFG)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = vg(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(60):
        seq = (rng.integers(0, CFG.V, size=(8, 1)) + np.arange(25)) % CFG.V
        params, opt_state, loss = step(params, opt_state, jnp.asarray(seq[:, :-1], jnp.int32),
                                       jnp.asarray(seq[:, 1:], jnp.int32))
    assert float(loss) < 0.05
    return params


def _pattern_examples():
    """Exactly one completion continues the count; labels 0..3; completions of different lengths."""
    exs = []
    for i, (start, n, label) in enumerate([(3, 4, 0), (10, 2, 1), (14, 6, 2), (0, 1, 3), (7, 5, 1), (12, 3, 2)]):
        ctx = _count(start, n)
        nxt = (start + n) % CFG.V
        right = _count(nxt, 1 + i % 3)
        wrong = [[(nxt + 5) % CFG.V, (nxt + 1) % CFG.V], [(nxt + 9) % CFG.V], _count(nxt + 2, 3)]
        comps = wrong[:label] + [right] + wrong[label:]
        exs.append(Example(i, label, ctx, comps))
    return exs


def _numpy_losses(params, config, examples):
    """Each completion on its own row starting at position 0 (zero-padded to maxT; attention is
    causal), one logits call of the model's family (gpt2.logits, llama.logits), then a float64
    log-softmax and mean in numpy."""
    rows = np.zeros((4 * len(examples), config.maxT), np.int32)
    for e, ex in enumerate(examples):
        for c, comp in enumerate(ex.completions):
            rows[4 * e + c, :len(ex.context) + len(comp)] = ex.context + comp
    logits = family_of(config).logits
    lg = np.asarray(jax.jit(logits, static_argnums=2)(params, jnp.asarray(rows), config), np.float64)
    out = np.zeros((len(examples), 4))
    for e, ex in enumerate(examples):
        for c, comp in enumerate(ex.completions):
            z = lg[4 * e + c, :, :config.V]
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            n = len(ex.context)
            out[e, c] = -np.mean([logp[n - 1 + i, tok] for i, tok in enumerate(comp)])
    return out


def test_known_answers(counting_params):
    exs = _pattern_examples()
    for B in (6, 16):   # 1 example per forward (2 rows unused); 4 per forward, the last batch padded
        assert hellaswag.score(counting_params, CFG, exs, B=B, T=CFG.maxT) == (len(exs), len(exs))
    # the same examples with a wrong label all count as wrong
    flipped = [Example(e.index, (e.label + 1) % 4, e.context, e.completions) for e in exs]
    assert hellaswag.score(counting_params, CFG, flipped, B=16, T=CFG.maxT) == (0, len(exs))
    mixed = exs[:3] + flipped[3:]
    assert hellaswag.score(counting_params, CFG, mixed, B=16, T=CFG.maxT) == (3, len(exs))


def test_losses_match_direct_computation(counting_params):
    rng = np.random.default_rng(5)
    exs = _pattern_examples()
    for i in range(9):   # random ones, where the answer is not obvious
        ctx = rng.integers(0, CFG.V, rng.integers(1, 8)).tolist()
        comps = [rng.integers(0, CFG.V, rng.integers(1, 6)).tolist() for _ in range(4)]
        exs.append(Example(len(exs), int(rng.integers(0, 4)), ctx, comps))
    for params in (counting_params, random_params(CFG, seed=1)):
        want = _numpy_losses(params, CFG, exs)
        for B, T, trim in ((16, 32, True), (6, 16, False)):
            got = hellaswag.completion_losses(params, CFG, exs, B=B, T=T, trim=trim)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        correct, total = hellaswag.score(params, CFG, exs, B=16, T=32)
        assert total == len(exs)
        assert correct == int(np.sum(np.argmin(want, 1) == [e.label for e in exs]))


def test_padded_vocab_and_bf16(counting_params):
    """Vp > V: the padded logit columns must not enter the softmax; bf16 gives the same answers."""
    cfg = GPTConfig(L=1, NH=2, C=32, maxT=32, V=16, Vp=24)
    params = {k: np.asarray(v) for k, v in counting_params.items()}
    params["wte"] = np.concatenate([params["wte"], np.full((8, 32), 3.0, np.float32)])  # huge pad logits
    exs = _pattern_examples()
    want = _numpy_losses(counting_params, CFG, exs)
    np.testing.assert_allclose(hellaswag.completion_losses(params, cfg, exs, B=16, T=32), want,
                               rtol=1e-4, atol=1e-5)
    assert hellaswag.score(params, cfg, exs, B=16, T=32, dtype="bfloat16") == (len(exs), len(exs))
    assert hellaswag.score(params, cfg, [], B=16, T=32) == (0, 0)


# ----------------------------------------------------------------------------------------------
# command line and the prepare script

def test_eval_cli(tmp_path, counting_params, capsys):
    llmc_format.write_model(tmp_path / "m.bin", CFG, counting_params)
    exs = _pattern_examples()
    exs[4] = Example(4, (exs[4].label + 1) % 4, exs[4].context, exs[4].completions)
    hellaswag.write_eval_file(tmp_path / "hs.bin", exs)
    rc = eval_hellaswag.main(["-e", str(tmp_path / "m.bin"), "-i", str(tmp_path / "hs.bin"), "-b", "16"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.splitlines() == ["HellaSwag: 5/6 = 0.833333"]
    assert "evaluating HellaSwag: 2/2" in out.err
    rc = run(eval_hellaswag.main, ["-e", str(tmp_path / "m.bin"), "-i", str(tmp_path / "missing.bin")])
    assert rc == 2 and "scripts/prepare_hellaswag.py" in capsys.readouterr().err
    rc = run(eval_hellaswag.main, ["-e", str(tmp_path / "m.bin"), "-i", str(tmp_path / "hs.bin"), "-t", "8"])
    assert rc == 2 and "use T >= 10" in capsys.readouterr().err


def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_hellaswag",
                                                  os.path.join(REPO, "scripts", "prepare_hellaswag.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_from_jsonl(tmp_path):
    prep = _prepare_module()
    lines = ['{"ind": 24, "ctx": "A man is on a roof. he", "label": 3, '
             '"endings": ["is using wrap.", "rips tiles.", "holds a cube.", "pulls up roofing."]}',
             "",
             '{"ctx": "B", "label": 0, "endings": ["x", "y", "z", "w"]}']
    encode = lambda s: [ord(ch) % 200 for ch in s]     # stand-in tokenizer: one token per character
    exs = prep.examples_from_jsonl(lines, encode)
    assert len(exs) == 2 and exs[0].label == 3 and exs[1].index == 1
    assert exs[0].context == encode("A man is on a roof. he")
    assert exs[0].completions[1] == encode(" rips tiles.")     # leading space, as llm.c
    hellaswag.write_eval_file(tmp_path / "hs.bin", exs)
    assert hellaswag.read_eval_file(tmp_path / "hs.bin") == exs
    with pytest.raises(SystemExit, match="4 endings"):
        prep.examples_from_jsonl(['{"ctx": "a", "label": 0, "endings": ["x"]}'], encode)
    with pytest.raises(SystemExit, match="no such file"):
        prep.main(["--jsonl", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.bin")])


def test_prepare_offline_message(tmp_path):
    prep = _prepare_module()
    with pytest.raises(SystemExit, match="Without network.*--jsonl"):
        prep.download("http://127.0.0.1:9/hellaswag_val.jsonl", str(tmp_path / "h.jsonl"), timeout=2)
    assert not os.listdir(tmp_path)


def test_prepare_with_gpt2_tokenizer(tmp_path, capsys):
    gpt2_bpe_folder()                 # the script loads them by the same rule; fails (not skips) if absent
    prep = _prepare_module()
    (tmp_path / "val.jsonl").write_text(
        '{"ind": 24, "ctx": "A man is sitting on a roof. he", "label": 3, "endings": ["is using wrap to wrap '
        'a pair of skis.", "is ripping level tiles off.", "is holding a rubik\'s cube.", "starts pulling up '
        'roofing on a roof."]}\n')
    assert prep.main(["--jsonl", str(tmp_path / "val.jsonl"), "-o", str(tmp_path / "hs.bin")]) == 0
    [ex] = hellaswag.read_eval_file(tmp_path / "hs.bin")
    assert ex.label == 3
    assert ex.context == [32, 582, 318, 5586, 319, 257, 9753, 13, 339]
    assert ex.completions[1] == [318, 34759, 1241, 19867, 572, 13]     # " is ripping level tiles off."
    assert ex.completions[3][0] == 4940                                # " starts", with the space
    assert "llm.c needs T >= 21" in capsys.readouterr().out
    nbytes = 2 * (6 + len(ex.context) + sum(1 + len(c) for c in ex.completions))
    assert np.fromfile(tmp_path / "hs.bin", "<i4", count=256)[:4].tolist() == [20240522, 1, 1, nbytes]
    assert not np.fromfile(tmp_path / "hs.bin", "<i4", count=256)[4:].any()    # llm.c's header, nothing added


# ----------------------------------------------------------------------------------------------
# Llama 3: uint32 eval files, the vocabulary check, and scoring a Llama model

def test_uint32_file_round_trip_and_recorded_vocab(tmp_path):
    exs = [Example(0, 1, [128000, 9906], [[1917], [70000, 2], [65535], [128255]])]
    exs += [Example(1 + e.index, e.label, e.context, e.completions) for e in _examples()]
    hellaswag.write_eval_file(tmp_path / "l3.bin", exs, vocab_size=128256)
    assert hellaswag.read_eval_file(tmp_path / "l3.bin") == exs
    header = np.fromfile(tmp_path / "l3.bin", "<i4", count=256)
    words = np.fromfile(tmp_path / "l3.bin", "<u4", offset=HEADER_BYTES)
    ex0 = [2**32 - 1, 0, 0, 1, 4, 2, 128000, 9906, 1, 1917, 2, 70000, 2, 1, 65535, 1, 128255]
    ex0[1] = 4 * len(ex0)
    assert words[:len(ex0)].tolist() == ex0
    sizes = [4 * (6 + len(e.context) + sum(1 + len(c) for c in e.completions)) for e in exs]
    assert header[:5].tolist() == [20240522, 2, 4, max(sizes), 128256] and not header[5:].any()
    assert os.path.getsize(tmp_path / "l3.bin") == HEADER_BYTES + sum(sizes)
    assert hellaswag.read_eval_info(tmp_path / "l3.bin") == hellaswag.EvalFileInfo(4, 4, 128256)
    # a vocabulary that fits uint16 keeps llm.c's file (version 1), with the vocabulary recorded
    hellaswag.write_eval_file(tmp_path / "b.bin", _examples(), vocab_size=256)
    assert np.fromfile(tmp_path / "b.bin", "<i4", count=5).tolist()[:2] == [20240522, 1]
    assert hellaswag.read_eval_info(tmp_path / "b.bin") == hellaswag.EvalFileInfo(3, 2, 256)
    assert hellaswag.read_eval_file(tmp_path / "b.bin") == _examples()
    with pytest.raises(LLMCFormatError, match="context token 128000 is outside.*needs the uint32 file"):
        hellaswag.write_eval_file(tmp_path / "c.bin", exs)


def test_vocabulary_mismatch_is_one_clear_line(tmp_path, capsys):
    llmc = tmp_path / "llmc.bin"                    # llm.c's file: uint16, GPT-2 tokens, nothing recorded
    hellaswag.write_eval_file(llmc, _examples())
    l3 = tmp_path / "l3.bin"
    hellaswag.write_eval_file(l3, _examples(), vocab_size=128256)
    with pytest.raises(LLMCFormatError, match=r"llmc.bin: an llm.c uint16 eval file \(GPT-2 tokens.*V=128256 "
                                              r"\(Llama 3's\); remake it.*--tokenizer"):
        hellaswag.load(llmc, 8, 32, vocab_size=128256)
    with pytest.raises(LLMCFormatError, match=r"vocabulary of 128256 tokens \(Llama 3's\), but the model has "
                                              r"V=50257 \(GPT-2's\)"):
        hellaswag.load(l3, 8, 32, vocab_size=50257)
    assert len(hellaswag.load(llmc, 8, 32, vocab_size=50257)) == 3 == len(hellaswag.load(l3, 8, 32, 128256))
    # the command: a byte-tokenized file with a Llama model of V=512 stops before any compile, exit 2
    hellaswag.write_eval_file(tmp_path / "byte.bin", _examples(), vocab_size=256)
    rc = run(eval_hellaswag.main, ["-e", LLAMA_MODEL, "-i", str(tmp_path / "byte.bin"), "-b", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "vocabulary of 256 tokens (the byte tokenizer's), but the model has V=512" in err


LLAMA_MODEL = os.path.join(REPO, "tests", "data", "llama3_tiny", "model.bin")   # llm.c's tiny Llama 3.1, V=512


def test_llama_model_matches_direct_losses(tmp_path, capsys):
    """A Llama 3 model (llm.c's tiny one, V=512) on an eval file made by the prepare script with a
    Llama 3 tokenizer.model of the 256 single bytes only (so V = 256 + 256 special = 512, <|begin_of_text|>
    = 256, and every text's tokens are its UTF-8 bytes): the tokens are checked against the bytes, the
    per-completion losses against a float64 log-softmax of the model's own logits (rtol 1e-4, atol 1e-5),
    and the command's count against their argmin."""
    import base64
    tok_file = tmp_path / "tokenizer.model"
    tok_file.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    items = [{"ctx": f"A man {i} is on a roof. He", "label": i % 4,
              "endings": ["is using wrap.", "rips off tiles.", f"holds {i} cubes.", "pulls up roofing!"][i % 4:] +
                         ["is using wrap.", "rips off tiles.", f"holds {i} cubes.", "pulls up roofing!"][:i % 4]}
             for i in range(6)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    prep = _prepare_module()
    assert prep.main(["--jsonl", str(tmp_path / "val.jsonl"), "-o", str(tmp_path / "hs.bin"),
                      "--tokenizer", f"llama3:{tok_file}"]) == 0
    assert "uint16 words, vocabulary 512" in capsys.readouterr().out
    exs = hellaswag.read_eval_file(tmp_path / "hs.bin")
    assert hellaswag.read_eval_info(tmp_path / "hs.bin").vocab_size == 512
    for ex, it in zip(exs, items):
        assert ex.label == it["label"] and ex.context == [256] + list(it["ctx"].encode())   # BOS, then bytes
        assert ex.completions == [list((" " + e).encode()) for e in it["endings"]]
    cfg, params = load_model(LLAMA_MODEL)
    assert type(cfg).__name__ == "LlamaConfig" and cfg.V == 512
    want = _numpy_losses(params, cfg, exs)
    from llmc_jax.nn.kernels import XLA      # what the command resolves on the CPU: it reuses this compilation
    got = hellaswag.completion_losses(params, cfg, exs, B=8, T=cfg.maxT, kernels=XLA)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    correct = int(np.sum(np.argmin(want, 1) == [e.label for e in exs]))
    rc = eval_hellaswag.main(["-e", LLAMA_MODEL, "-i", str(tmp_path / "hs.bin"), "-b", "8"])
    assert rc == 0 and capsys.readouterr().out.splitlines() == [f"HellaSwag: {correct}/6 = {correct / 6:f}"]
