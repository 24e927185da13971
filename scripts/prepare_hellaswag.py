#!/usr/bin/env python
"""HellaSwag JSONL -> llm.c's multiple-choice eval file (hellaswag_val.bin) with GPT-2 tokens.

As llm.c's dev/data/hellaswag.py: the context is the example's `ctx` field, each of the 4 `endings`
is tokenized with a leading space (" " + ending), the label is `label`; examples keep file order.

    python scripts/prepare_hellaswag.py -o data/hellaswag/hellaswag_val.bin
    python scripts/prepare_hellaswag.py --jsonl hellaswag_val.jsonl -o data/hellaswag/hellaswag_val.bin

Without --jsonl it uses <output dir>/hellaswag_<split>.jsonl, downloading it first if it is missing.
Offline, download the JSONL by hand (URL below) and give it with --jsonl or put it at that path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Callable, Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmc_jax.evals import hellaswag  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, run_command  # noqa: E402

URLS = {
    "val": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
}
VAL_EXAMPLES = 10042


def examples_from_jsonl(lines: Iterable[str], encode: Callable[[str], list[int]],
                        source: str = "<jsonl>") -> list[hellaswag.Example]:
    """One Example per non-blank JSONL line: context = encode(ctx), completions = encode(" " + ending)."""
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ctx, endings, label = item["ctx"], item["endings"], int(item["label"])
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{source}:{lineno}: not a HellaSwag example with ctx, endings, label ({e}); "
                             f"the test split has no labels, use val") from None
        if len(endings) != hellaswag.NUM_COMPLETIONS or not 0 <= label < len(endings):
            raise SystemExit(f"{source}:{lineno}: expected {hellaswag.NUM_COMPLETIONS} endings and a label "
                             f"in range, got {len(endings)} endings and label {label}")
        examples.append(hellaswag.Example(index=len(examples), label=label, context=list(encode(ctx)),
                                          completions=[list(encode(" " + e)) for e in endings]))
    return examples


def download(url: str, dest: str, timeout: float = 30.0) -> None:
    """Fetch url to dest (via dest.tmp); SystemExit saying where to put the file by hand if offline."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp"
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except (OSError, ValueError) as e:      # URLError, timeouts and HTTP errors are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not download {url} ({e}).\nWithout network: download that file "
                         f"on another machine and put it at {dest}, or pass it with --jsonl FILE.") from None


def _encoder() -> Callable[[str], list[int]]:
    from llmc_jax.formats import tokenizer     # tiktoken's GPT-2 BPE, from local files
    try:
        tok = tokenizer.get_tokenizer("gpt2")
    except (tokenizer.TokenizerNotFoundError, tokenizer.TokenizerHashError) as e:
        raise SystemExit(f"error: {e}") from None
    return tok.encode      # no special tokens, as tiktoken's encode on HellaSwag text


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", help="the HellaSwag JSONL (default <output dir>/hellaswag_<split>.jsonl, "
                                   "downloaded if missing)")
    p.add_argument("-o", "--output", default=hellaswag.DEFAULT_PATH,
                   help=f"eval file to write (default {hellaswag.DEFAULT_PATH})")
    p.add_argument("--split", choices=sorted(URLS), default="val", help="which split to download (default val)")
    args = p.parse_args(argv)

    if args.jsonl is not None and not os.path.exists(args.jsonl):
        raise UsageError(f"--jsonl {args.jsonl}: no such file; download {URLS[args.split]} and give its path")
    encode = _encoder()      # before any download: fail fast without the tokenizer files
    jsonl = args.jsonl
    if jsonl is None:
        jsonl = os.path.join(os.path.dirname(os.path.abspath(args.output)), f"hellaswag_{args.split}.jsonl")
        if not os.path.exists(jsonl):
            download(URLS[args.split], jsonl)
    with open(jsonl, encoding="utf-8") as f:
        examples = examples_from_jsonl(f, encode, jsonl)
    if not examples:
        raise SystemExit(f"error: {jsonl} holds no examples")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    hellaswag.write_eval_file(args.output, examples)
    note = "" if args.split != "val" or len(examples) == VAL_EXAMPLES else \
        f" (the full val split has {VAL_EXAMPLES}; is the JSONL complete?)"
    print(f"wrote {len(examples)} examples to {args.output} ({os.path.getsize(args.output):,} bytes){note}; "
          f"longest example {max(e.num_tokens for e in examples)} tokens, so llm.c needs "
          f"T >= {hellaswag.required_seq_len(examples)}")
    return 0


if __name__ == "__main__":
    run_command(main)
