#!/usr/bin/env bash
# GPT-2 (1558M) on FineWeb-Edu 32B tokens, with llm.c's hyperparameters for this run (its scripts/run_gpt2_1558M.sh).
# 32,000 steps of 1,048,576 tokens (8x H100: ~2.8 s/step with llm.c).
# Data: llm.c-format shards under $DATA (prepare them with the data scripts). One process for now;
# HellaSwag (-h 1) and ZeRO-1 (-z 1) join when the evaluation and sharding work lands.
set -eu
cd "$(dirname "$0")/.."
DATA=${DATA:-data/edu_fineweb100B}
exec bash scripts/run_until_done.sh "${OUT:-log_gpt2_1558M}" 32000 \
    -i "$DATA/edu_fineweb_train_*.bin" -j "$DATA/edu_fineweb_val_*.bin" \
    -v 250 -s 300000 -g 384 -b 16 -t 1024 -d 1048576 -r 0 -c 0.1 -k cosine -l 0.0006 -q 0.1 -u 700 -n 2000 -x 32000 -e d48 "$@"
