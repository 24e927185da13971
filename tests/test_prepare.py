"""scripts/prepare_*.py: tokenize-and-shard on small local inputs, downloads against a loopback
server, offline errors (127.0.0.1:9 refuses at once), and training on the shards made.

Nothing here touches the network. GPT-2 tests read the BPE files the install ships (see
conftest.gpt2_bpe_folder); without them they fail with the message saying how to provide them.
"""
import gzip
import hashlib
import http.server
import importlib
import json
import os
import random
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from llmc_jax.formats import tokenizer as T
from llmc_jax.formats.llmc_format import read_shard
from conftest import gpt2_bpe_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)
pt = importlib.import_module("prepare_text")
td = importlib.import_module("text_documents")      # where prepare_text's document cutting lives
OFFLINE_URL = "http://127.0.0.1:9/"   # discard port: connection refused at once

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
        "Grüße aus Köln — naïve café, 世界! 🙂\n\n\n\nThe end?\n")


def gpt2():
    return T.get_tokenizer("gpt2", path=gpt2_bpe_folder())


def shards(d, pattern=""):
    return sorted(f for f in os.listdir(d) if f.endswith(".bin") and pattern in f)


def stream(d, files):
    return np.concatenate([np.asarray(read_shard(os.path.join(d, f))) for f in files]).tolist()


def byte_stream(docs):
    out = []
    for d in docs:
        out += [0] + list(d.replace("\x00", "").encode("utf-8"))
    return out


# ----------------------------------------------------------------------------- exact cutting

def test_split_exact_keeps_gpt2_tokens():
    tok = gpt2()
    rng = random.Random(0)
    alphabet = list("ab c\n\n  \t\r's'll 1²3 é\u0301 世界!?.\u00a0\u2003\x1c xyz'")
    texts = [TEXT * 20, open(pt.__file__, encoding="utf-8").read()]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 2000))) for _ in range(100)]
    cuts = 0
    for text in texts:
        for max_chars in (5, 40, 300):
            pieces = pt.split_exact(text, max_chars)
            assert "".join(pieces) == text
            cuts += len(pieces) - 1
            assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)
    assert cuts > 1000


# ----------------------------------------------------------------------------- shard writer

def test_shard_writer_cuts_the_stream(tmp_path):
    toks = np.arange(2500) % 65536
    with pt.ShardWriter(str(tmp_path), "x", shard_size=1000, val_tokens=300, verbose=False) as w:
        for i in range(0, 2500, 170):
            w.write(toks[i:i + 170])
    assert shards(tmp_path) == ["x_train_000001.bin", "x_train_000002.bin", "x_train_000003.bin",
                                "x_val_000000.bin"]
    sizes = [len(read_shard(tmp_path / f)) for f in ("x_val_000000.bin", "x_train_000001.bin",
                                                     "x_train_000002.bin", "x_train_000003.bin")]
    assert sizes == [300, 1000, 1000, 200]
    assert stream(tmp_path, ["x_val_000000.bin", "x_train_000001.bin", "x_train_000002.bin",
                             "x_train_000003.bin"]) == toks.tolist()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_shard_writer_val_over_several_shards_and_end_val(tmp_path):
    with pt.ShardWriter(str(tmp_path), "a", shard_size=100, val_tokens=250, verbose=False) as w:
        w.write(np.arange(400))
    assert shards(tmp_path) == ["a_train_000003.bin", "a_train_000004.bin", "a_val_000000.bin",
                                "a_val_000001.bin", "a_val_000002.bin"]
    d = tmp_path / "single"
    with pt.ShardWriter(str(d), "b", shard_size=None, val_tokens=float("inf"), single_files=True,
                        verbose=False) as w:
        w.write(np.arange(10))
        w.end_val()
        w.write(np.arange(5))
    assert shards(d) == ["b_train.bin", "b_val.bin"]
    assert len(read_shard(d / "b_val.bin")) == 10 and len(read_shard(d / "b_train.bin")) == 5


# ----------------------------------------------------------------------------- prepare_text

def test_prepare_text_byte_txt(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(TEXT * 3 + "nul\x00byte")
    out = tmp_path / "out"
    assert pt.main([str(src), "-o", str(out), "--tokenizer", "byte", "--val-tokens", "100",
                    "--shard-size", "200", "-q"]) == 0
    files = shards(out)
    assert files[0] == "out_train_000001.bin" and "out_val_000000.bin" in files
    order = ["out_val_000000.bin"] + [f for f in files if "_train_" in f]
    assert stream(out, order) == byte_stream([TEXT * 3 + "nul\x00byte"])   # one document, EOT first
    assert len(read_shard(out / "out_val_000000.bin")) == 100
    rec = json.loads((out / "out.prep.json").read_text())
    assert rec["val_tokens"] == 100 and rec["val_tokens"] + rec["train_tokens"] == len(stream(out, order))


def test_prepare_text_blank_line_split_equals_llmc_rule(tmp_path):
    """--doc-split blank-line gives exactly llm.c's tinyshakespeare tokens."""
    tok = gpt2()
    src = tmp_path / "s.txt"
    src.write_text(TEXT)
    out = tmp_path / "o"
    assert pt.main([str(src), "-o", str(out), "--doc-split", "blank-line", "--val-tokens", "16", "-q",
                    "--name", "ts"]) == 0
    got = stream(out, ["ts_val_000000.bin", "ts_train_000001.bin"])
    want = tok.encoding.encode("<|endoftext|>" + TEXT.replace("\n\n", "\n\n<|endoftext|>"),
                               allowed_special={"<|endoftext|>"})
    assert got == want


def test_prepare_text_jsonl_json_gz_and_val_frac(tmp_path):
    docs = [f"document {i}: " + "word " * i for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:20])))
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        json.dump([{"body": d} for d in docs[20:]], f)
    out = tmp_path / "j"
    assert pt.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json.gz"), "-o", str(out), "--tokenizer",
                    "byte", "--jsonl-field", "body", "--val-frac", "0.25", "-q"]) == 0
    want = byte_stream(docs)
    assert stream(out, ["j_val_000000.bin", "j_train_000001.bin"]) == want
    assert len(read_shard(out / "j_val_000000.bin")) == round(0.25 * len(want))


def test_prepare_text_bad_field_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"story": "x"}\n')
    assert pt.main([str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "o"), "--tokenizer", "byte", "-q"]) == 1
    err = capsys.readouterr().err
    assert "a.jsonl:1" in err and "'text'" in err and "--jsonl-field" in err


def test_prepare_text_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    docs = [f"row {i} " * (i % 7) for i in range(50)]
    pq.write_table(pa.table({"text": docs, "n": list(range(50))}), tmp_path / "d.parquet", row_group_size=16)
    out = tmp_path / "p"
    assert pt.main([str(tmp_path / "d.parquet"), "-o", str(out), "--tokenizer", "byte", "--val-tokens", "50",
                    "-q"]) == 0
    assert stream(out, ["p_val_000000.bin", "p_train_000001.bin"]) == byte_stream(docs)


def test_process_pool_gives_the_same_shards(tmp_path, monkeypatch):
    gpt2()
    monkeypatch.setattr(pt, "BATCH_CHARS", 500)       # many tasks
    monkeypatch.setattr(td, "MAX_UNIT_CHARS", 300)    # long documents cut into pieces
    src = tmp_path / "big.txt"
    src.write_text(TEXT * 40)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": TEXT[:i]}) + "\n" for i in range(0, 300, 7)))
    results = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert pt.main([str(src), str(tmp_path / "docs.jsonl"), "-o", str(out), "--name", "x", "--workers",
                        workers, "--val-tokens", "500", "--shard-size", "700", "-q"]) == 0
        results.append([(f, (out / f).read_bytes()) for f in shards(out)])
    assert results[0] == results[1]
    docs = [TEXT * 5, "x", ""] * 10
    with pt.Encoder("gpt2", workers=2) as enc:
        pooled = np.concatenate([a for a, _ in enc.encode_docs(docs)])
        assert enc._pool is not None
    with pt.Encoder("gpt2", workers=1) as enc:
        inline = np.concatenate([a for a, _ in enc.encode_docs(docs)])
        assert enc._pool is None
    assert pooled.tolist() == inline.tolist()
    tok = T.get_tokenizer("gpt2")
    whole = [tok.eot] + tok.encode(TEXT * 40)
    out = tmp_path / "w1"
    got = stream(out, ["x_val_000000.bin"] + [f for f in shards(out) if "_train_" in f])
    assert got[:len(whole)] == whole


def test_rerun_skips_and_force_redoes(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text(TEXT)
    out = tmp_path / "o"
    args = [str(src), "-o", str(out), "--tokenizer", "byte", "--val-tokens", "20", "--shard-size", "100", "-q"]
    assert pt.main(args) == 0
    (out / "o_train_000099.bin").write_bytes(b"stale")      # an old shard must not survive a redo
    capsys.readouterr()
    assert pt.main(args) == 0
    assert "already prepared" in capsys.readouterr().err
    assert pt.main(args + ["--force"]) == 0
    assert "o_train_000099.bin" not in os.listdir(out)
    src.write_text(TEXT + "more")                          # changed input: redone without --force
    assert pt.main(args) == 0
    assert stream(out, ["o_val_000000.bin"] + [f for f in shards(out) if "_train_" in f]) == byte_stream([TEXT + "more"])


# ----------------------------------------------------------------------------- acceptance: train on the shards

def _train(out, extra=()):
    from llmc_jax import train
    return train.main(["-e", "tiny", "-i", f"{out}/*_train_*.bin", "-j", f"{out}/*_val_*.bin", "-b", "2",
                       "-t", "32", "-x", "3", "-v", "3", "-m", "1", "-s", "0", "--dtype", "float32", *extra])


def test_acceptance_byte_shards_train(tmp_path, capsys):
    src = tmp_path / "some.txt"
    src.write_text(TEXT * 10)
    out = tmp_path / "data"
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "prepare_text.py"), str(src), "-o", str(out),
                        "--tokenizer", "byte"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "data_val_000000.bin" in os.listdir(out) and "data_train_000001.bin" in os.listdir(out)
    assert _train(out) == 0
    assert "val loss" in capsys.readouterr().out


def test_acceptance_gpt2_shards_train(tmp_path, capsys):
    gpt2()
    src = tmp_path / "some.txt"
    src.write_text(TEXT * 30)
    out = tmp_path / "data"
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "prepare_text.py"), str(src), "-o", str(out),
                        "--tokenizer", "gpt2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert max(stream(out, shards(out))) < 50257
    cfg = tmp_path / "gpt2_tiny.toml"
    cfg.write_text("[model]\nL = 1\nNH = 2\nC = 32\nmaxT = 64\nV = 50257\nVp = 50304\n")
    assert _train(out, ["--config", str(cfg)]) == 0
    assert "val loss" in capsys.readouterr().out


# ----------------------------------------------------------------------------- downloads

class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    ranges: list = []

    def do_GET(self):
        data = type(self).payload
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _RangeHandler.payload = os.urandom(300_000)
    _RangeHandler.ranges = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.bin", _RangeHandler
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_and_verifies(server, tmp_path):
    url, handler = server
    data = handler.payload
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:123_456])
    sha = hashlib.sha256(data).hexdigest()
    assert pt.download(url, str(dest), sha256=sha, size=len(data), verbose=False) == str(dest)
    assert dest.read_bytes() == data and handler.ranges == ["bytes=123456-"]
    assert not (tmp_path / "f.bin.part").exists()
    pt.download(url, str(dest), sha256=sha, verbose=False)   # present: verified, not fetched again
    assert len(handler.ranges) == 1


def test_download_hash_mismatch(server, tmp_path):
    url, _ = server
    with pytest.raises(pt.DownloadError, match="sha256"):
        pt.download(url, str(tmp_path / "g.bin"), sha256="0" * 64, verbose=False)
    assert not os.path.exists(tmp_path / "g.bin") and not os.path.exists(tmp_path / "g.bin.part")


def test_download_offline_says_where_to_put_the_file(tmp_path):
    dest = tmp_path / "x" / "file.txt"
    with pytest.raises(pt.DownloadError) as e:
        pt.download(OFFLINE_URL + "file.txt", str(dest), verbose=False)
    assert str(dest) in str(e.value) and "Without internet access" in str(e.value)


# ----------------------------------------------------------------------------- tinyshakespeare

def test_tinyshakespeare_local_file(tmp_path, monkeypatch):
    tok = gpt2()
    ts = importlib.import_module("prepare_tinyshakespeare")
    monkeypatch.setattr(ts, "URL", OFFLINE_URL)
    monkeypatch.setattr(ts, "SIZE", None)       # our stand-in text is not the 1,115,394-byte original
    monkeypatch.setattr(ts, "VAL_TOKENS", 20)
    (tmp_path / "tiny_shakespeare.txt").write_text(TEXT)
    assert ts.main(["-o", str(tmp_path), "-q"]) == 0
    assert shards(tmp_path) == ["tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"]
    want = tok.encoding.encode("<|endoftext|>" + TEXT.replace("\n\n", "\n\n<|endoftext|>"),
                               allowed_special={"<|endoftext|>"})
    assert stream(tmp_path, ["tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"]) == want
    assert len(read_shard(tmp_path / "tiny_shakespeare_val.bin")) == 20


def test_tinyshakespeare_offline_error(tmp_path, monkeypatch, capsys):
    ts = importlib.import_module("prepare_tinyshakespeare")
    monkeypatch.setattr(ts, "URL", OFFLINE_URL)
    assert ts.main(["-o", str(tmp_path / "ts"), "-q", "--tokenizer", "byte"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "ts" / "tiny_shakespeare.txt") in err and "Without internet access" in err


# ----------------------------------------------------------------------------- tinystories

def _stories(n, seed):
    rng = random.Random(seed)
    return [{"story": f"  Once upon a time {rng.random():.6f} there was a story {i}.\n ", "instruction": {}}
            for i in range(n)]


def _expected_tinystories(files):
    docs = {"val": [], "train": []}
    for split, group in (("val", files[:1]), ("train", files[1:])):
        for k, data in enumerate(group):
            data = list(data)
            random.Random(1337 + k).shuffle(data)
            docs[split] += [d["story"].strip() for d in data]
    return byte_stream(docs["val"]), byte_stream(docs["train"])


def test_tinystories_local_json_and_archive(tmp_path, monkeypatch):
    st = importlib.import_module("prepare_tinystories")
    monkeypatch.setattr(st, "URL", OFFLINE_URL)
    files = [_stories(5 + i, i) for i in range(3)]
    want_val, want_train = _expected_tinystories(files)
    # 1) JSON files put in DIR/TinyStories_all_data/ by hand
    d = tmp_path / "a"
    (d / "TinyStories_all_data").mkdir(parents=True)
    for i, data in enumerate(files):
        (d / "TinyStories_all_data" / f"data{i:02d}.json").write_text(json.dumps(data))
    assert st.main(["-o", str(d), "--tokenizer", "byte", "-q"]) == 0
    assert shards(d) == ["TinyStories_train.bin", "TinyStories_val.bin"]
    assert stream(d, ["TinyStories_val.bin"]) == want_val
    assert stream(d, ["TinyStories_train.bin"]) == want_train
    # 2) only the archive put in DIR by hand: unpacked, same result
    b = tmp_path / "b"
    b.mkdir()
    with tarfile.open(b / "TinyStories_all_data.tar.gz", "w:gz") as tf:
        for i in range(3):
            tf.add(d / "TinyStories_all_data" / f"data{i:02d}.json", arcname=f"data{i:02d}.json")
    assert st.main(["-o", str(b), "--tokenizer", "byte", "-q"]) == 0
    assert (b / "TinyStories_val.bin").read_bytes() == (d / "TinyStories_val.bin").read_bytes()
    assert (b / "TinyStories_train.bin").read_bytes() == (d / "TinyStories_train.bin").read_bytes()


def test_tinystories_offline_error(tmp_path, monkeypatch, capsys):
    st = importlib.import_module("prepare_tinystories")
    monkeypatch.setattr(st, "URL", OFFLINE_URL)
    assert st.main(["-o", str(tmp_path), "--tokenizer", "byte", "-q"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "TinyStories_all_data.tar.gz") in err
    assert str(tmp_path / "TinyStories_all_data") in err and "Without internet access" in err


# ----------------------------------------------------------------------------- fineweb

def test_fineweb_offline_error(tmp_path, monkeypatch, capsys):
    fw = importlib.import_module("prepare_fineweb")
    monkeypatch.setattr(fw, "HF", OFFLINE_URL.rstrip("/"))
    assert fw.main(["-o", str(tmp_path / "fw"), "--tokenizer", "byte", "-q"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "fw" / "downloads") in err and "Without internet access" in err
    assert "sample/10BT" in err


def test_fineweb_local_files(tmp_path, monkeypatch):
    fw = importlib.import_module("prepare_fineweb")
    monkeypatch.setattr(fw, "HF", OFFLINE_URL.rstrip("/"))
    out = tmp_path / "edu_fineweb10B"
    dl = out / "downloads"
    dl.mkdir(parents=True)
    docs = [[f"file {k} doc {i} " + "text " * (i % 9) for i in range(30)] for k in range(2)]
    for k, ds in enumerate(docs):
        (dl / f"{k:03d}_00000.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                                      for i, d in enumerate(ds)))
    assert fw.main(["--edu", "-o", str(out), "--tokenizer", "byte", "--shard-size", "1000", "-q"]) == 0
    files = shards(out)
    assert files[0] == "edu_fineweb_train_000001.bin" and files[-1] == "edu_fineweb_val_000000.bin"
    order = [files[-1]] + files[:-1]
    want = byte_stream(docs[0] + docs[1])
    assert stream(out, order) == want
    assert [len(read_shard(out / f)) for f in order[:-1]] == [1000] * (len(order) - 1)   # exact cuts
    assert len(read_shard(out / order[-1])) == len(want) - 1000 * (len(order) - 1)


def test_fineweb_saved_listing_verifies_files(tmp_path, monkeypatch, capsys):
    """With a listing saved by an earlier run, local files are checked against its sha256."""
    fw = importlib.import_module("prepare_fineweb")
    monkeypatch.setattr(fw, "HF", OFFLINE_URL.rstrip("/"))
    out = tmp_path / "fineweb10B"
    dl = out / "downloads"
    dl.mkdir(parents=True)
    good = b'{"text": "hello"}\n'
    (dl / "000_00000.jsonl").write_bytes(good)
    (dl / "001_00000.jsonl").write_bytes(b'{"text": "tampered"}\n')
    listing = [{"path": f"sample/10BT/{n}", "size": None, "sha256": hashlib.sha256(good).hexdigest()}
               for n in ("000_00000.jsonl", "001_00000.jsonl")]
    (dl / "files.json").write_text(json.dumps(listing))
    assert fw.main(["-o", str(out), "--tokenizer", "byte", "-q"]) == 1
    err = capsys.readouterr().err
    assert "001_00000.jsonl" in err and "sha256" in err


# ----------------------------------------------------------------------------- Llama 3 (uint32 shards)

from test_llama3_tokenizer import MERGES, _write_bpe  # noqa: E402  (the small BPE files of the tokenizer tests)

LLAMA3_EXTRA = MERGES + [b".\n"]     # ".\n" is one Llama 3 pre-token: a cut between them would change the tokens


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    """A tokenizer.model laid out as Meta's: 128000 ranks (so <|begin_of_text|> is 128000 and V=128256),
    the merges last, so "hello" and " world" get ids above uint16's range; the filler tokens are
    never formed (their 2-byte prefix is no token)."""
    fill = 128000 - 256 - len(LLAMA3_EXTRA)
    tokens = [bytes([b]) for b in range(256)] + [b"\x00\x01" + i.to_bytes(3, "big") for i in range(fill)]
    path = _write_bpe(tmp_path_factory.mktemp("llama3") / "tokenizer.model", tokens + LLAMA3_EXTRA)
    tok = T.get_tokenizer(f"llama3:{path}")
    assert tok.eot == 128000 and tok.vocab_size == 128256
    assert tok.encode("hello world") == [127990, 127995]          # MERGES[3], MERGES[8]
    return path, tok


def test_split_exact_keeps_llama3_tokens(tmp_path):
    """Cutting never changes Llama 3's tokens: a BPE that merges every pair of the alphabet's ASCII
    characters, so a cut through a pre-token shows as a different token."""
    ascii_chars = "ab .\n'sTL1!"
    pairs = sorted({(a + b).encode() for a in ascii_chars for b in ascii_chars})
    path = _write_bpe(tmp_path / "pairs.model", [bytes([b]) for b in range(256)] + pairs)
    tok = T.get_tokenizer(f"llama3:{path}")
    rng = random.Random(1)
    alphabet = list("ab c\n\n  \t\r's'S'LL 1²34 é\u0301 世界!?.\n.\n!\n\u00a0\u2003\x1c xyz'T")
    cuts = 0
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 1500)))
        whole = tok.encode(text)
        for max_chars in (3, 50):
            pieces = pt.split_exact(text, max_chars)
            assert "".join(pieces) == text
            cuts += len(pieces) - 1
            assert [i for p in pieces for i in tok.encode(p)] == whole
    assert cuts > 500
    assert pt.split_exact("foo.\nbar bar", 2) == ["foo.\nbar", " bar"]   # never between "." and "\n"


def test_prepare_text_llama3_uint32_shards(tmp_path, monkeypatch, llama3_model):
    from llmc_jax.formats.data import DataLoader
    path, tok = llama3_model
    monkeypatch.setattr(td, "MAX_UNIT_CHARS", 40)     # long documents cut into pieces
    docs = ["hello world. 12345 hello", "foo.\nbar.\nhello.\nworld.\n" * 30 + "hello world", "", TEXT,
            "it's 2024's 1234567 Hello"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "o"
    assert pt.main([str(tmp_path / "d.jsonl"), "-o", str(out), "--tokenizer", f"llama3:{path}",
                    "--val-tokens", "30", "--shard-size", "500", "-q"]) == 0
    files = shards(out)
    order = ["o_val_000000.bin"] + [f for f in files if "_train_" in f]
    want = [t for d in docs for t in [128000] + tok.encode(d)]
    assert len(order) == 1 + -(-(len(want) - 30) // 500)
    for f in order:
        header = np.fromfile(out / f, "<i4", count=256)
        n = int(header[2])
        assert header[:2].tolist() == [20240801, 7] and not header[3:].any()     # llm.c's Llama 3 shard
        assert os.path.getsize(out / f) == 1024 + 4 * n
    assert stream(out, order) == want
    assert read_shard(out / order[0]).dtype == np.dtype("<u4") and max(want) > 65535
    loader = DataLoader(str(out / "o_train_*.bin"), B=2, T=8, shuffle=False, vocab_size=tok.vocab_size)
    x, y = loader.next_batch()
    assert x.ravel().tolist() == want[30:46] and y.ravel().tolist() == want[31:47]
    # the process-pool worker path, in-process: the same tokens from the name, path and width it is given
    with pt.Encoder("llama3", path, workers=2) as enc:
        assert (enc.name, enc.path, enc.token_bytes, enc.eot) == ("llama3", os.path.abspath(path), 4, 128000)
        pt._init_worker(enc.name, enc.path, enc.token_bytes)
    batch = [(d, True) for d in docs]
    assert pt._encode_batch(batch).tolist() == want and pt._encode_batch(batch).dtype == np.uint32


def test_llama3_tokenizer_from_env_and_missing_file_errors(tmp_path, monkeypatch, capsys, llama3_model):
    from llmc_jax.errors import run
    from llmc_jax.formats import llama3_tokenizer
    path, tok = llama3_model
    ts = importlib.import_module("prepare_tinyshakespeare")
    monkeypatch.setattr(ts, "URL", OFFLINE_URL)
    monkeypatch.setattr(ts, "SIZE", None)
    monkeypatch.setattr(ts, "VAL_TOKENS", 20)
    monkeypatch.delenv(llama3_tokenizer.ENV_VAR, raising=False)
    (tmp_path / "tiny_shakespeare.txt").write_text(TEXT)
    # missing file / no file given: one line, exit 1, before the (offline) download is tried
    for flag in (f"llama3:{tmp_path}/missing.model", "llama3"):
        assert run(ts.main, ["-o", str(tmp_path / "none"), "-q", "--tokenizer", flag]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "tokenizer.model" in err and "Traceback" not in err
        assert ("missing.model: no such file" if flag != "llama3" else "no Llama 3 tokenizer file given") in err
    assert run(pt.main, [str(tmp_path / "tiny_shakespeare.txt"), "-o", str(tmp_path / "p"), "--tokenizer", "nope"]) == 2
    assert "--tokenizer: invalid choice: 'nope' (choose gpt2, byte or llama3[:PATH])" in capsys.readouterr().err
    # $LLMC_JAX_LLAMA3_TOKENIZER: llm.c's tinyshakespeare -m llama-3 (128000 before every section, uint32)
    monkeypatch.setenv(llama3_tokenizer.ENV_VAR, path)
    assert ts.main(["-o", str(tmp_path), "-q", "--tokenizer", "llama3"]) == 0
    sections = TEXT.split("\n\n")
    want = [t for i, s in enumerate(sections) for t in [128000] + tok.encode(s + "\n\n" * (i < len(sections) - 1))]
    assert stream(tmp_path, ["tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"]) == want
    assert np.fromfile(tmp_path / "tiny_shakespeare_val.bin", "<i4", count=3).tolist() == [20240801, 7, 20]


def test_tinystories_and_fineweb_llama3(tmp_path, monkeypatch):
    """Both streaming scripts write uint32 Llama 3 shards, <|begin_of_text|> (here 268, the small BPE's
    first special id) before every document."""
    path = _write_bpe(tmp_path / "small.model", [bytes([b]) for b in range(256)] + MERGES)
    tok = T.get_tokenizer(f"llama3:{path}")
    st, fw = importlib.import_module("prepare_tinystories"), importlib.import_module("prepare_fineweb")
    monkeypatch.setattr(st, "URL", OFFLINE_URL)
    monkeypatch.setattr(fw, "HF", OFFLINE_URL.rstrip("/"))
    files = [_stories(3 + i, i) for i in range(2)]
    d = tmp_path / "ts" / "TinyStories_all_data"
    d.mkdir(parents=True)
    for i, data in enumerate(files):
        (d / f"data{i:02d}.json").write_text(json.dumps(data))
    assert st.main(["-o", str(tmp_path / "ts"), "--tokenizer", f"llama3:{path}", "-q"]) == 0
    for name, data in (("val", files[0]), ("train", files[1])):
        data = list(data)
        random.Random(1337).shuffle(data)
        want = [t for s in data for t in [268] + tok.encode(s["story"].strip())]
        assert np.fromfile(tmp_path / "ts" / f"TinyStories_{name}.bin", "<i4", count=2).tolist() == [20240801, 7]
        assert stream(tmp_path / "ts", [f"TinyStories_{name}.bin"]) == want
    out = tmp_path / "fineweb10B"
    (out / "downloads").mkdir(parents=True)
    docs = [f"doc {i}: hello world 12345" * (i % 3) for i in range(20)]
    (out / "downloads" / "000_00000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert fw.main(["-o", str(out), "--tokenizer", f"llama3:{path}", "--shard-size", "200", "--workers", "1",
                    "-q"]) == 0
    files = shards(out)
    assert np.fromfile(out / files[0], "<i4", count=2).tolist() == [20240801, 7]
    assert stream(out, [files[-1]] + files[:-1]) == [t for x in docs for t in [268] + tok.encode(x)]
