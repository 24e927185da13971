#!/usr/bin/env python3
"""Download and tokenize TinyShakespeare as llm.c's dev/data/tinyshakespeare.py does.

    python scripts/prepare_tinyshakespeare.py [-o data/tinyshakespeare] [--tokenizer gpt2|byte|llama3[:PATH]]

Source: karpathy/char-rnn's input.txt (1,115,394 bytes), saved as DIR/tiny_shakespeare.txt; a
partial download is resumed. Every blank-line-separated section is a document (EOT in front, the
section keeps its trailing "\\n\\n"); the first 32,768 tokens are val. Writes llm.c's file names,
DIR/tiny_shakespeare_val.bin and DIR/tiny_shakespeare_train.bin (with GPT-2: 32,768 and 305,260
uint16 tokens; with Llama 3 (`--tokenizer llama3:PATH` to Meta's tokenizer.model, llm.c's
`-m llama-3`): 32,768 and 276,224 uint32 tokens, <|begin_of_text|> 128000 before each section;
the script compares). Train with
`python -m llmc_jax.train -i DIR/tiny_shakespeare_train.bin -j DIR/tiny_shakespeare_val.bin ...`.

Without internet access: put input.txt (URL below) at DIR/tiny_shakespeare.txt and run again.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_text as pt  # noqa: E402
from llmc_jax.errors import ArgumentParser, one_line, run_command  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SIZE = 1115394
NAME = "tiny_shakespeare"
VAL_TOKENS = 32768
LLMC_GPT2_TOKENS = {"val": 32768, "train": 305260}
LLMC_LLAMA3_TOKENS = {"val": 32768, "train": 276224}     # llm.c's llama3 branch, -m llama-3


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python scripts/prepare_tinyshakespeare.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output-dir", default=os.path.join("data", "tinyshakespeare"),
                   help="where the text and the shards go (default: data/tinyshakespeare)")
    pt.add_common_args(p)
    args = pt.parse_checked(p, argv)
    out = args.output_dir
    src = os.path.join(out, f"{NAME}.txt")
    try:
        # the tokenizer first: a missing tokenizer.model fails before any download
        with pt.Encoder(args.tokenizer, args.tokenizer_path, args.workers or 1) as enc:
            pt.download(URL, src, size=SIZE, verbose=not args.quiet)
            recipe = {"source": pt._file_id(src), "tokenizer": enc.recipe_id, "val_tokens": VAL_TOKENS}
            if not args.force and pt.is_done(out, NAME, recipe):
                print(f"{out}: already prepared ({pt.record_path(out, NAME)}); --force redoes it", file=sys.stderr)
                return 0
            shards = pt.run_prepare(pt.iter_file_documents(src, "blank-line"), out, NAME,
                                    val_tokens=VAL_TOKENS, shard_size=None, single_files=True,
                                    total_bytes=os.path.getsize(src), verbose=not args.quiet, encoder=enc)
        rec = pt.write_record(out, NAME, recipe, shards)
        print(f"{out}: {pt.summarize(shards)}", file=sys.stderr)
        want = {("gpt2", 50257): LLMC_GPT2_TOKENS,
                ("llama3", 128256): LLMC_LLAMA3_TOKENS}.get((enc.name, enc.vocab_size))
        if want is not None:
            got = {"val": rec["val_tokens"], "train": rec["train_tokens"]}
            if got == want:
                print(f"token counts match llm.c's ({want['val']:,} val, {want['train']:,} train)", file=sys.stderr)
            else:
                print(f"warning: llm.c's script makes {want}, this run made {got}: is {src} "
                      f"the original input.txt?", file=sys.stderr)
        return 0
    except (pt.PrepareError, pt.tokmod.TokenizerNotFoundError, pt.tokmod.TokenizerHashError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run_command(main)
