#!/usr/bin/env bash
# GPT-2 (124M) on FineWeb 10B tokens with Open MPI: one process per GPU host (8 GPUs each), started
# by mpirun on the hosts of a hostfile. -b is per GPU; 524,288 tokens per step, so -b = 64 / hosts.
#
# UNTESTED on a real cluster: this project has not had a multi-node machine yet. What is tested
# (tests/test_multiprocess_faults.py): the script's syntax and that llmc_jax.train accepts its flags.
#
#   HOSTS=hosts.txt NP=2 bash scripts/run_mpirun.sh      # hosts.txt: one line per host ("node0 slots=1")
#
# The ranks are given explicitly: --coordinator (the first host, port $PORT) -pn $OMPI_COMM_WORLD_SIZE
# -pr $OMPI_COMM_WORLD_RANK. jax's own Open MPI detection would also work with Open MPI 4, but it
# hands each process a single GPU (OMPI_COMM_WORLD_LOCAL_RANK), and Open MPI 5 no longer sets the
# variable it reads. The repository must be at the same path on every host, and OUT a directory
# every host sees.
set -eu
cd "$(dirname "$0")/.."
export DATA=${DATA:-data/fineweb10B} OUT=${OUT:-log_gpt2_124M} PYTHON=${PYTHON:-python}
if [ -n "${OMPI_COMM_WORLD_RANK:-}" ]; then               # one of mpirun's processes, on its host
    NP=$OMPI_COMM_WORLD_SIZE
    RESUME=0
    if ls "$OUT"/DONE_* >/dev/null 2>&1; then RESUME=1; fi     # a restarted run resumes from its newest checkpoint
    exec "$PYTHON" -m llmc_jax.train --coordinator "$COORDINATOR" -pn "$NP" -pr "$OMPI_COMM_WORLD_RANK" \
        -e d12 -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -o "$OUT" -y "$RESUME" \
        -b $((64 / NP)) -t 1024 -d 524288 -z 1 -r 0 -c 0.1 -l 0.0006 -q 0.0 -u 700 -x 18865 \
        -v 250 -s 20000 -g 144 -n 5000 "$@"
fi
HOSTS=${HOSTS:?set HOSTS to a hostfile (one line per host, e.g. "node0 slots=1")}
NP=${NP:-$(grep -cv '^\s*\(#\|$\)' "$HOSTS")}
if [ $((64 % NP)) -ne 0 ]; then
    echo "run_mpirun.sh: 64 sequences per step per GPU do not split over $NP hosts; use 1, 2, 4 or 8" >&2
    exit 2
fi
FIRST_HOST=$(grep -v '^\s*\(#\|$\)' "$HOSTS" | head -n 1 | awk '{print $1}')
export COORDINATOR=${COORDINATOR:-$FIRST_HOST:${PORT:-12345}}     # process 0 runs on the first host
mkdir -p "$OUT"
# Start-up and peer-loss timeouts (docs/multihost.md): every process waits up to 10 minutes for the
# others to start; one silent for 2 minutes stops the others instead of leaving them hanging.
export LLMC_JAX_INIT_TIMEOUT=${LLMC_JAX_INIT_TIMEOUT:-600} LLMC_JAX_PEER_TIMEOUT=${LLMC_JAX_PEER_TIMEOUT:-120}
exec mpirun -np "$NP" --hostfile "$HOSTS" --map-by ppr:1:node --bind-to none \
    -x PATH -x COORDINATOR -x LLMC_JAX_INIT_TIMEOUT -x LLMC_JAX_PEER_TIMEOUT -x DATA -x OUT -x PYTHON \
    bash "$(pwd)/scripts/run_mpirun.sh" "$@"
