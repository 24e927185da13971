#!/usr/bin/env bash
# GPT-2 (350M) on FineWeb ~30B tokens, with llm.c's hyperparameters for this run (its scripts/run_gpt2_350M.sh).
# 60,000 steps of 524,288 tokens (8x A100: ~820 ms/step with llm.c).
# Data: llm.c-format shards under $DATA (prepare them with the data scripts). One process for now;
# HellaSwag (-h 1) and ZeRO-1 (-z 1) join when the evaluation and sharding work lands.
set -eu
cd "$(dirname "$0")/.."
DATA=${DATA:-data/fineweb100B}
exec bash scripts/run_until_done.sh "${OUT:-log_gpt2_350M}" 60000 \
    -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" \
    -v 250 -s 100000 -g 144 -b 64 -t 1024 -d 524288 -r 0 -c 0.1 -l 0.0003 -q 0.0 -u 700 -n 2000 -x 60000 -e d24 "$@"
