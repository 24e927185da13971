#!/usr/bin/env bash
# Shared by the run_gpt2_*.sh scripts: run `python -m llmc_jax.train` with -y 1 until the final
# step's DONE marker exists, so a crash or preemption resumes from the newest checkpoint (as
# llm.c's scripts do). Usage: run_until_done.sh OUT_DIR FINAL_STEP [train flags...]
set -u
out_dir=$1; final_step=$2; shift 2
done_file=$(printf "%s/DONE_%08d" "$out_dir" "$final_step")
tries=0
while [ ! -f "$done_file" ]; do
    python -m llmc_jax.train -o "$out_dir" -y "$([ -n "$(ls "$out_dir"/DONE_* 2>/dev/null)" ] && echo 1 || echo 0)" "$@"
    rc=$?
    tries=$((tries + 1))
    # 75: preempted (SIGTERM/SIGUSR1) after writing a checkpoint; the loop resumes it like any other stop
    if [ "$rc" -eq 2 ] || [ "$tries" -ge "${MAX_TRIES:-100}" ]; then   # 2: a usage error, retrying cannot help
        echo "stopping after $tries tries (last exit status $rc)"; exit "$rc"
    fi
    sleep 1
done
echo "$done_file exists: training finished"
