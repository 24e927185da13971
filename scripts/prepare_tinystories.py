#!/usr/bin/env python3
"""Download and tokenize TinyStories as llm.c's dev/data/tinystories.py does.

    python scripts/prepare_tinystories.py [-o data/tinystories] [--tokenizer gpt2|byte|llama3[:PATH]] [--workers N]

Source: roneneldan/TinyStories' TinyStories_all_data.tar.gz on Hugging Face (about 1.5 GB; a
partial download is resumed, the sha256 that Hugging Face publishes for it is checked), unpacked
into DIR/TinyStories_all_data/ (50 JSON files, data00.json ... data49.json). File 0 is val, the
rest train; the stories of the k-th file of a split are shuffled with Python's
random.Random(1337 + k) and stripped, and each is preceded by EOT (128000 = <|begin_of_text|> with
`--tokenizer llama3:PATH`, whose shards are uint32, llm.c's Llama 3 format). Writes llm.c's file
names, DIR/TinyStories_val.bin and DIR/TinyStories_train.bin (llm.c reports 19,043,638 and
925,653,391 tokens with GPT-2, 18,660,516 and 907,021,844 with Llama 3; the script compares).
Files are processed in order (llm.c's own script gathers the train files in completion order, so
its train file's order can differ run to run).

Without internet access: put TinyStories_all_data.tar.gz (URL below) at
DIR/TinyStories_all_data.tar.gz, or its JSON files in DIR/TinyStories_all_data/, and run again.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_text as pt  # noqa: E402
from llmc_jax.errors import ArgumentParser, one_line, run_command  # noqa: E402

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
ARCHIVE = "TinyStories_all_data.tar.gz"
DATA_DIR = "TinyStories_all_data"
NAME = "TinyStories"
EXPECTED_FILES = 50
LLMC_GPT2_TOKENS = {"val": 19043638, "train": 925653391}
LLMC_LLAMA3_TOKENS = {"val": 18660516, "train": 907021844}     # llm.c's llama3 branch, -m llama-3


def shard_files(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, DATA_DIR, "*.json")))


def unpack(archive: str, dest: str, verbose: bool = True) -> None:
    """Extract the archive's JSON files into dest (through a temporary folder, so never half-done)."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if verbose:
        print(f"unpacking {archive} ...", file=sys.stderr)
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".json"):
                    name = os.path.basename(m.name)
                    with tf.extractfile(m) as src, open(os.path.join(tmp, name), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise pt.PrepareError(f"{archive}: cannot unpack ({e}); the archive is corrupt or incomplete: delete it "
                              f"and run again") from None
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def stories(path: str, index: int):
    """The stories of one JSON file, shuffled with Random(1337 + index) and stripped, as llm.c."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    random.Random(1337 + index).shuffle(data)
    per = os.path.getsize(path) / max(len(data), 1)
    for i, example in enumerate(data):
        yield pt._field(example, "story", f"{path}[{i}]").strip(), per


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python scripts/prepare_tinystories.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output-dir", default=os.path.join("data", "tinystories"),
                   help="where the download, the JSON files and the shards go (default: data/tinystories)")
    pt.add_common_args(p)
    args = pt.parse_checked(p, argv)
    out = args.output_dir
    verbose = not args.quiet
    try:
        pt.load_tokenizer(args.tokenizer, args.tokenizer_path)    # a missing tokenizer fails before the download
        files = shard_files(out)
        if not files:
            archive = os.path.join(out, ARCHIVE)
            hint = (f"Without internet access: download {URL} on another machine and put it at {archive} "
                    f"(or its data*.json files in {os.path.join(out, DATA_DIR)}/), then run this command again.")
            pt.download(URL, archive, hint=hint, verbose=verbose)
            unpack(archive, os.path.join(out, DATA_DIR), verbose)
            files = shard_files(out)
            if not files:
                raise pt.PrepareError(f"{archive} holds no .json files; is it the TinyStories archive?")
        if len(files) != EXPECTED_FILES:
            print(f"warning: {len(files)} JSON files in {os.path.join(out, DATA_DIR)}, the full dataset has "
                  f"{EXPECTED_FILES}", file=sys.stderr)
        recipe = {"files": [pt._file_id(f) for f in files],
                  "tokenizer": pt.tokenizer_id(args.tokenizer, args.tokenizer_path)}
        if not args.force and pt.is_done(out, NAME, recipe):
            print(f"{out}: already prepared ({pt.record_path(out, NAME)}); --force redoes it", file=sys.stderr)
            return 0
        total = sum(os.path.getsize(f) for f in files)
        workers = args.workers if args.workers is not None else pt.auto_workers(total)
        pt.remove_outputs(out, NAME)
        with pt.Encoder(args.tokenizer, args.tokenizer_path, workers) as enc, \
                pt.Progress("tokenizing TinyStories", total, enabled=verbose) as prog, \
                pt.ShardWriter(out, NAME, shard_size=None, val_tokens=float("inf"), single_files=True,
                               verbose=verbose, token_bytes=enc.token_bytes) as w:
            for split, split_files in (("val", files[:1]), ("train", files[1:])):
                for k, f in enumerate(split_files):
                    pt.tokenize_into(w, enc, stories(f, k), prog)
                if split == "val":
                    w.end_val()
        rec = pt.write_record(out, NAME, recipe, w.written)
        print(f"{out}: {pt.summarize(w.written)}", file=sys.stderr)
        want = {("gpt2", 50257): LLMC_GPT2_TOKENS,
                ("llama3", 128256): LLMC_LLAMA3_TOKENS}.get((enc.name, enc.vocab_size))
        if want is not None and len(files) == EXPECTED_FILES:
            got = {"val": rec["val_tokens"], "train": rec["train_tokens"]}
            same = "match" if got == want else "differ from"
            print(f"token counts {got} {same} llm.c's {want}", file=sys.stderr)
        return 0
    except (pt.PrepareError, pt.tokmod.TokenizerNotFoundError, pt.tokmod.TokenizerHashError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run_command(main)
