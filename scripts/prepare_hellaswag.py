#!/usr/bin/env python
"""HellaSwag JSONL -> llm.c's multiple-choice eval file (hellaswag_val.bin), GPT-2 or Llama 3 tokens.

As llm.c's dev/data/hellaswag.py: the context is the example's `ctx` field, each of the 4 `endings`
is tokenized with a leading space (" " + ending), the label is `label`; examples keep file order.

    python scripts/prepare_hellaswag.py -o data/hellaswag/hellaswag_val.bin
    python scripts/prepare_hellaswag.py --jsonl hellaswag_val.jsonl -o data/hellaswag/hellaswag_val.bin
    python scripts/prepare_hellaswag.py --tokenizer llama3:/path/to/tokenizer.model \\
        -o data/hellaswag/hellaswag_val_llama3.bin

--tokenizer gpt2 (default) writes llm.c's file byte for byte (uint16 words). llm.c has no HellaSwag file
for Llama 3 (its llama3 branch's hellaswag.py is GPT-2 only), so `--tokenizer llama3:PATH` (Meta's
tokenizer.model; plain llama3 reads $LLMC_JAX_LLAMA3_TOKENIZER) writes the same layout with uint32
words (version 2; the width follows the vocabulary), and by default puts <|begin_of_text|> (128000)
before each context, as Llama 3 sees every document start in training (--no-bos leaves it out; --bos
adds the EOT token for the other tokenizers). The byte and llama3 files record their tokenizer's
vocabulary size in the header (slot 4, which llm.c's reader ignores; GPT-2's file leaves it 0, as
llm.c's), and `python -m llmc_jax.eval_hellaswag` refuses a model with another vocabulary.

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prepare_text as pt  # noqa: E402  (the --tokenizer rule shared with the data scripts)
from llmc_jax.evals import hellaswag  # noqa: E402
from llmc_jax.errors import ArgumentParser, UsageError, one_line, run_command  # noqa: E402

URLS = {
    "val": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
}
VAL_EXAMPLES = 10042


def examples_from_jsonl(lines: Iterable[str], encode: Callable[[str], list[int]],
                        source: str = "<jsonl>", bos: int | None = None) -> list[hellaswag.Example]:
    """One Example per non-blank JSONL line: context = [bos] (if given) + encode(ctx), completions =
    encode(" " + ending)."""
    prefix = [] if bos is None else [int(bos)]
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
        examples.append(hellaswag.Example(index=len(examples), label=label, context=prefix + list(encode(ctx)),
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


def _tokenizer(spec: str = "gpt2", path: str | None = None):
    """The tokenizer (GPT-2's BPE from local files, bytes, or Llama 3's tokenizer.model); one
    `error:` line (which file, how to get it) when it cannot be loaded. Its encode never emits
    special tokens, as tiktoken's encode on HellaSwag text."""
    from llmc_jax.formats import tokenizer
    try:
        return pt.load_tokenizer(spec, path)
    except (pt.PrepareError, tokenizer.TokenizerNotFoundError, tokenizer.TokenizerHashError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", help="the HellaSwag JSONL (default <output dir>/hellaswag_<split>.jsonl, "
                                   "downloaded if missing)")
    p.add_argument("-o", "--output", default=hellaswag.DEFAULT_PATH,
                   help=f"eval file to write (default {hellaswag.DEFAULT_PATH})")
    p.add_argument("--split", choices=sorted(URLS), default="val", help="which split to download (default val)")
    p.add_argument("--tokenizer", type=pt.tokenizer_arg, default="gpt2", metavar="{gpt2,byte,llama3[:PATH]}",
                   help="gpt2 (default; llm.c's file), byte, or llama3:PATH (Meta's tokenizer.model; plain "
                        "llama3 reads $LLMC_JAX_LLAMA3_TOKENIZER): the model's tokenizer")
    p.add_argument("--tokenizer-path", default=None,
                   help="gpt2: folder with the GPT-2 BPE files; llama3: the tokenizer.model file")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put the tokenizer's EOT/BOS token before each context (default: yes for llama3, "
                        "<|begin_of_text|>; no for gpt2 and byte, as llm.c)")
    args = p.parse_args(argv)

    if args.jsonl is not None and not os.path.exists(args.jsonl):
        raise UsageError(f"--jsonl {args.jsonl}: no such file; download {URLS[args.split]} and give its path")
    tok = _tokenizer(args.tokenizer, args.tokenizer_path)   # before any download: fail fast without it
    name, _ = pt.resolve_tokenizer(args.tokenizer, args.tokenizer_path)
    bos = tok.eot if (args.bos if args.bos is not None else name == "llama3") else None
    jsonl = args.jsonl
    if jsonl is None:
        jsonl = os.path.join(os.path.dirname(os.path.abspath(args.output)), f"hellaswag_{args.split}.jsonl")
        if not os.path.exists(jsonl):
            download(URLS[args.split], jsonl)
    with open(jsonl, encoding="utf-8") as f:
        examples = examples_from_jsonl(f, tok.encode, jsonl, bos)
    if not examples:
        raise SystemExit(f"error: {jsonl} holds no examples")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # GPT-2's file stays llm.c's byte for byte (an unrecorded uint16 file means GPT-2 tokens to the eval)
    hellaswag.write_eval_file(args.output, examples, vocab_size=None if name == "gpt2" else tok.vocab_size)
    note = "" if args.split != "val" or len(examples) == VAL_EXAMPLES else \
        f" (the full val split has {VAL_EXAMPLES}; is the JSONL complete?)"
    words = "uint16 words" if hellaswag.token_bytes_for(tok.vocab_size) == 2 else \
        "uint32 words, this project's version 2 (llm.c reads only its uint16 version 1)"
    print(f"wrote {len(examples)} examples to {args.output} ({os.path.getsize(args.output):,} bytes, {words}, "
          f"vocabulary {tok.vocab_size}){note}; longest example {max(e.num_tokens for e in examples)} tokens, "
          f"so llm.c needs T >= {hellaswag.required_seq_len(examples)}")
    return 0


if __name__ == "__main__":
    run_command(main)
