#!/usr/bin/env python3
"""Download and tokenize FineWeb or FineWeb-Edu as llm.c's dev/data/fineweb.py does.

    python scripts/prepare_fineweb.py [--version 10B|100B] [--edu] [-o DIR] [--shard-size 100000000]
        [--tokenizer gpt2|byte|llama3[:PATH]] [--workers N] [--delete-downloads]

Source: the parquet files of the `sample-10BT` / `sample-100BT` subsets of HuggingFaceFW/fineweb
(or HuggingFaceFW/fineweb-edu with --edu), i.e. sample/10BT/*.parquet, taken in sorted order as
the `datasets` library does. They are streamed: downloaded one at a time into DIR/downloads/
(the next one downloads while the current one is tokenized; a partial download is resumed; each
file's size and sha256 are checked against the Hub's listing, saved as DIR/downloads/files.json),
tokenized by a process pool, and (with --delete-downloads) removed once tokenized.

Every document is preceded by EOT (with `--tokenizer llama3:PATH`, Meta's tokenizer.model:
<|begin_of_text|> 128000, and the shards are uint32, llm.c's Llama 3 format as its `-m llama-3`)
and the stream is cut into shards of exactly --shard-size tokens (default 10^8; the last holds the
rest): shard 0 is val, the rest train, with llm.c's names and folders: DIR = data/fineweb10B,
data/fineweb100B, data/edu_fineweb10B or data/edu_fineweb100B, files fineweb_val_000000.bin, fineweb_train_000001.bin, ... (edu_fineweb_... with --edu). The 10B
sample makes about 100 shards (~20 GB) and needs ~30 GB of downloads.

Without internet access: download the subset's parquet files elsewhere (e.g.
`huggingface-cli download HuggingFaceFW/fineweb --repo-type dataset --include "sample/10BT/*"
--local-dir DIR/downloads`) and put them (000_00000.parquet, ...) in DIR/downloads/ or
DIR/downloads/sample/10BT/; the script then uses the files it finds there (unverified unless
files.json is there too). Reading parquet needs pyarrow (pip install
pyarrow); .jsonl(.gz) files with a "text" field work too.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import sys
import threading
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_text as pt  # noqa: E402
from llmc_jax.errors import ArgumentParser, one_line, run_command  # noqa: E402

HF = "https://huggingface.co"
SUBSETS = {"10B": "sample/10BT", "100B": "sample/100BT"}
LOCAL_PATTERNS = ("*.parquet", "*.jsonl", "*.jsonl.gz")


def dataset(edu: bool) -> tuple[str, str]:
    """(Hugging Face repo, shard name)."""
    return ("HuggingFaceFW/fineweb-edu", "edu_fineweb") if edu else ("HuggingFaceFW/fineweb", "fineweb")


def list_remote(repo: str, subset: str, timeout: float = 20.0) -> list[dict]:
    """The subset's parquet files from the Hub's tree API: [{"path", "size", "sha256"}], sorted."""
    url = f"{HF}/api/datasets/{repo}/tree/main/{subset}"
    entries = []
    while url:
        req = urllib.request.Request(url, headers={"User-Agent": "llmc-jax-prepare/1"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            entries += json.load(resp)
            link = resp.headers.get("Link", "")
        url = None
        for part in link.split(","):
            if 'rel="next"' in part:
                url = part[part.index("<") + 1:part.index(">")]
    files = []
    for e in entries:
        if e.get("type") == "file" and e["path"].endswith(".parquet"):
            lfs = e.get("lfs") or {}
            files.append({"path": e["path"], "size": lfs.get("size", e.get("size")), "sha256": lfs.get("oid")})
    return sorted(files, key=lambda f: f["path"])


def plan(repo: str, subset: str, dl_dir: str, verbose: bool = True) -> tuple[list[dict], bool]:
    """(files to process [{"name", "url", "size", "sha256"}], remote): from the Hub's listing
    (fetched now, or saved by an earlier run), else from the files found in dl_dir."""
    listing = os.path.join(dl_dir, "files.json")
    hint_dir = f"{HF}/datasets/{repo}/tree/main/{subset}"
    try:
        files = list_remote(repo, subset)
        if not files:
            raise pt.PrepareError(f"the Hub lists no parquet files under {hint_dir}")
        os.makedirs(dl_dir, exist_ok=True)
        with open(listing + ".tmp", "w") as f:
            json.dump(files, f, indent=1)
        os.replace(listing + ".tmp", listing)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if os.path.exists(listing):
            with open(listing) as f:
                files = json.load(f)
            if verbose:
                print(f"cannot reach the Hub ({reason}); using the listing saved in {listing}", file=sys.stderr)
        else:
            local = sorted({p for d in (dl_dir, os.path.join(dl_dir, subset)) for pat in LOCAL_PATTERNS
                            for p in glob.glob(os.path.join(d, pat))})
            if not local:
                raise pt.DownloadError(
                    f"cannot list {hint_dir}: {reason} (no internet access?).\n"
                    f"Without internet access: download the parquet files of {subset} from {hint_dir} on another "
                    f"machine, e.g. `huggingface-cli download {repo} --repo-type dataset --include '{subset}/*' "
                    f"--local-dir {os.path.abspath(dl_dir)}`, and put them (000_00000.parquet, ...) in "
                    f"{os.path.abspath(dl_dir)}/ or {os.path.abspath(os.path.join(dl_dir, subset))}/, then run this "
                    f"command again.") from None
            print(f"warning: cannot reach the Hub ({reason}); using the {len(local)} file(s) found in {dl_dir} "
                  f"as they are (unverified, in sorted order)", file=sys.stderr)
            return [{"name": os.path.relpath(p, dl_dir), "url": None, "size": None, "sha256": None}
                    for p in local], False
    return [{"name": _local_name(dl_dir, f["path"]), "url": f"{HF}/datasets/{repo}/resolve/main/{f['path']}",
             "size": f["size"], "sha256": f["sha256"]} for f in files], True


def _local_name(dl_dir: str, repo_path: str) -> str:
    """Where a listed file lives under dl_dir: its base name, or its repo path if put there by hand."""
    base = os.path.basename(repo_path)
    if not os.path.exists(os.path.join(dl_dir, base)) and os.path.exists(os.path.join(dl_dir, repo_path)):
        return repo_path
    return base


def fetch(entry: dict, dl_dir: str, verbose: bool, cancel: threading.Event | None = None) -> str:
    dest = os.path.join(dl_dir, entry["name"])
    if entry["url"] is None:
        return dest
    return pt.download(entry["url"], dest, sha256=entry["sha256"], size=entry["size"], verbose=verbose,
                       cancel=cancel)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python scripts/prepare_fineweb.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--version", choices=sorted(SUBSETS), default="10B", help="sample size (default 10B)")
    p.add_argument("-t", "--type", choices=("classic", "edu"), default=None,
                   help="llm.c's spelling of --edu (classic = FineWeb, edu = FineWeb-Edu)")
    p.add_argument("--edu", action="store_true", help="FineWeb-Edu instead of FineWeb")
    p.add_argument("-o", "--output-dir", default=None,
                   help="where the shards go (default: data/{edu_,}fineweb{10B,100B}, llm.c's folder names)")
    p.add_argument("--download-dir", default=None, help="where the parquet files go (default: OUTPUT_DIR/downloads)")
    p.add_argument("-s", "--shard-size", type=int, default=pt.DEFAULT_SHARD_SIZE,
                   help=f"tokens per shard (default {pt.DEFAULT_SHARD_SIZE:,}); shard 0 is val")
    p.add_argument("--delete-downloads", action="store_true",
                   help="delete each downloaded file once tokenized (saves disk; a rerun downloads again)")
    pt.add_common_args(p)
    args = pt.parse_checked(p, argv)
    edu = args.edu or args.type == "edu"
    repo, name = dataset(edu)
    out = args.output_dir or os.path.join("data", f"{name}{args.version}")
    dl_dir = args.download_dir or os.path.join(out, "downloads")
    verbose = not args.quiet
    try:
        pt.load_tokenizer(args.tokenizer, args.tokenizer_path)    # a missing tokenizer fails before any download
        entries, remote = plan(repo, SUBSETS[args.version], dl_dir, verbose)
        recipe = {"repo": repo, "subset": SUBSETS[args.version],
                  "tokenizer": pt.tokenizer_id(args.tokenizer, args.tokenizer_path),
                  "shard_size": args.shard_size,
                  "files": [[e["name"], e["sha256"] or pt._file_id(os.path.join(dl_dir, e["name"]))["size"]]
                            for e in entries]}
        if not args.force and pt.is_done(out, name, recipe):
            print(f"{out}: already prepared ({pt.record_path(out, name)}); --force redoes it", file=sys.stderr)
            return 0
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        pt.remove_outputs(out, name)
        total = sum(e["size"] or os.path.getsize(os.path.join(dl_dir, e["name"])) for e in entries)
        stop = threading.Event()
        downloader = concurrent.futures.ThreadPoolExecutor(1)
        try:
            with pt.Encoder(args.tokenizer, args.tokenizer_path, workers) as enc, \
                    pt.Progress(f"tokenizing {name}{args.version}", total, enabled=verbose) as prog, \
                    pt.ShardWriter(out, name, args.shard_size, val_tokens=args.shard_size, verbose=verbose,
                                   token_bytes=enc.token_bytes) as w:
                nxt = downloader.submit(fetch, entries[0], dl_dir, verbose, stop) if entries else None
                for i, entry in enumerate(entries):
                    path = nxt.result()
                    if i + 1 < len(entries):  # download the next file while this one is tokenized
                        nxt = downloader.submit(fetch, entries[i + 1], dl_dir, False, stop)
                    prog.desc = f"tokenizing {name}{args.version} [file {i + 1}/{len(entries)}]"
                    pt.tokenize_into(w, enc, pt.iter_file_documents(path, "file", "text"), prog)
                    if args.delete_downloads and entry["url"] is not None:
                        os.remove(path)
        finally:
            stop.set()
            downloader.shutdown(wait=True, cancel_futures=True)
        pt.write_record(out, name, recipe, w.written)
        print(f"{out}: {pt.summarize(w.written)}", file=sys.stderr)
        return 0
    except (pt.PrepareError, pt.tokmod.TokenizerNotFoundError, pt.tokmod.TokenizerHashError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (downloads resume on the next run; tokenizing starts over)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run_command(main)
