"""Writing llm.c token shards for scripts/prepare_text.py and the dataset scripts: `ShardWriter`
(one token stream cut into val and train shards, streamed to disk, each renamed into place when
complete) and the NAME.prep.json records that let a rerun with the same recipe skip the work."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from llmc_jax.formats.llmc_format import HEADER_INTS, SHARD_FORMATS, read_shard_header
from prep_common import PrepareError

DEFAULT_SHARD_SIZE = 10**8
MAX_SHARD_TOKENS = 2**31 - 1    # llm.c's limit (the header's token count is an int32)

# ----------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Cuts one token stream into llm.c shards, streaming each to disk (memory stays small).

    The first `val_tokens` tokens go to val shards (float("inf"): until end_val() is called), the rest
    to train shards; a shard holds at most `shard_size` tokens (None: unbounded). Names:
    NAME_{val,train}_NNNNNN.bin with one running index, or with single_files=True llm.c's
    NAME_val.bin / NAME_train.bin (one file per split). A shard is written to NAME.tmp and renamed
    when complete. token_bytes 2 writes GPT-2's format (uint16, magic 20240520 version 1), 4 llm.c's
    Llama 3 format (uint32, magic 20240801 version 7).
    """

    def __init__(self, out_dir: str, name: str, shard_size: int | None = DEFAULT_SHARD_SIZE,
                 val_tokens: float = 0, single_files: bool = False, verbose: bool = True,
                 token_bytes: int = 2):
        if shard_size is not None and shard_size <= 0:
            raise PrepareError(f"--shard-size must be positive, got {shard_size}")
        if token_bytes not in SHARD_FORMATS:
            raise PrepareError(f"token_bytes={token_bytes!r}; shards hold 2 (uint16) or 4 (uint32) bytes per token")
        self.token_bytes = token_bytes
        self.magic, self.version, self.dtype, _ = SHARD_FORMATS[token_bytes]
        self.out_dir, self.name = out_dir, name
        self.shard_size = min(shard_size or MAX_SHARD_TOKENS, MAX_SHARD_TOKENS)
        self.single_files = single_files
        self.verbose = verbose
        self.val_left = val_tokens
        self.split = "val" if val_tokens > 0 else "train"
        self.index = 0
        self.written: list[dict] = []  # {"path", "split", "tokens"}
        self._f = None
        self._count = 0
        os.makedirs(out_dir, exist_ok=True)

    def path_for(self, split: str, index: int) -> str:
        if self.single_files:
            return os.path.join(self.out_dir, f"{self.name}_{split}.bin")
        return os.path.join(self.out_dir, f"{self.name}_{split}_{index:06d}.bin")

    def _open(self) -> None:
        self._path = self.path_for(self.split, self.index)
        if self.single_files and any(w["path"] == self._path for w in self.written):
            raise PrepareError(f"{self._path}: the {self.split} split would need a second file; llm.c's "
                               f"single-file layout holds at most {MAX_SHARD_TOKENS} tokens per split")
        self._f = open(self._path + ".tmp", "wb")
        self._f.write(b"\0" * (4 * HEADER_INTS))
        self._count = 0

    def _finish(self) -> None:
        if self._f is None:
            return
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (self.magic, self.version, self._count)
        self._f.seek(0)
        self._f.write(header.tobytes())
        self._f.close()
        self._f = None
        os.replace(self._path + ".tmp", self._path)
        assert read_shard_header(self._path) == self._count
        self.written.append({"path": self._path, "split": self.split, "tokens": self._count})
        if self.verbose:
            nbytes = 4 * HEADER_INTS + self.token_bytes * self._count
            print(f"wrote {self._count:,} tokens to {self._path} ({nbytes:,} bytes)", file=sys.stderr)
        self.index += 1

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and tokens.dtype != np.dtype(self.dtype):    # the Encoder's arrays need no check
            lo, hi, top = int(tokens.min()), int(tokens.max()), (1 << (8 * self.token_bytes)) - 1
            if lo < 0 or hi > top:
                raise PrepareError(f"token id {lo if lo < 0 else hi} does not fit the uint{8 * self.token_bytes} "
                                   f"shards being written")
            tokens = tokens.astype(self.dtype)
        pos, n_total = 0, len(tokens)
        while pos < n_total:
            if self._f is None:
                self._open()
            room = self.shard_size - self._count
            if self.split == "val":
                room = min(room, self.val_left)
            n = int(min(room, n_total - pos))
            self._f.write(tokens[pos:pos + n].tobytes())
            self._count += n
            pos += n
            if self.split == "val":
                self.val_left -= n
            if self._count >= self.shard_size:
                self._finish()
            if self.split == "val" and self.val_left <= 0:
                self._finish()
                self.split = "train"

    def end_val(self) -> None:
        """Close the val split now (split by source, as TinyStories' shard 0); later tokens are train."""
        if self.split == "val":
            self._finish()
            self.split = "train"
            self.val_left = 0

    def close(self) -> list[dict]:
        self._finish()
        return self.written

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            try:
                os.remove(self._path + ".tmp")
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()


def remove_outputs(out_dir: str, name: str) -> None:
    """Delete shards (and leftovers) of an earlier run named `name`, so no stale shard joins a glob."""
    if not os.path.isdir(out_dir):
        return
    pat = re.compile(re.escape(name) + r"_(val|train)(_\d{6})?\.bin(\.tmp)?$")
    for f in os.listdir(out_dir):
        if pat.match(f) or f == f".{name}.tokens.tmp":
            os.remove(os.path.join(out_dir, f))


# ----------------------------------------------------------------------------- recipe records

def record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{name}.prep.json")


def is_done(out_dir: str, name: str, recipe: dict) -> bool:
    """True when a previous run with the same recipe completed and all its shards are intact."""
    try:
        with open(record_path(out_dir, name)) as f:
            rec = json.load(f)
        if rec.get("recipe") != json.loads(json.dumps(recipe)):
            return False
        return all(read_shard_header(os.path.join(out_dir, s["file"])) == s["tokens"] for s in rec["shards"])
    except Exception:
        return False


def write_record(out_dir: str, name: str, recipe: dict, shards: list[dict]) -> dict:
    rec = {"recipe": recipe,
           "shards": [{"file": os.path.basename(s["path"]), "split": s["split"], "tokens": s["tokens"]}
                      for s in shards],
           "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
           "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train")}
    tmp = record_path(out_dir, name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, record_path(out_dir, name))
    return rec


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": int(st.st_mtime)}
