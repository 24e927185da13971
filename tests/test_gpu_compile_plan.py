"""`python -m llmc_jax.train ... --target h100x8 --compile-only`, as a user runs it: the table, the
exit status (0 fits, 1 does not, 2 usage), the JSON report, --find-batch, one line per bad flag, and
a CPU machine with the CUDA plugin installed that shows no traceback."""
import json
import os
import subprocess
import sys

import pytest

from llmc_jax import errors, train

D48 = "-e d48 -t 1024 -r 0 -z 1 --target h100x8 --compile-only"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(flags: str, capsys):
    rc = errors.run(train.main, flags.split())
    out, err = capsys.readouterr()
    return rc, out, err


def test_d48_on_8_h100s_fits_at_b16_not_at_b64(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, out, _ = _plan(f"{D48} -b 16 --compile-report {path}", capsys)
    assert rc == 0 and "fits: " in out and "llm.c" in out
    r = json.loads(path.read_text())
    for key in ("target", "devices", "per_device_bytes", "capacity_bytes", "fits", "breakdown", "collectives",
                "kernels"):
        assert key in r
    n = r["num_parameters"]
    assert r["devices"] == 8 and r["fits"] and r["per_device_bytes"] <= r["capacity_bytes"]
    assert r["capacity_bytes"] == int(84942979072 * 0.95)          # XLA's H100 SXM spec, the allocator's 95%
    assert r["breakdown"]["parameters"] == 4 * n // 8                # fp32 master weights split 8 ways at -z 1
    # llm.c's own allocation for this run (train_gpt2.cu's buffers): within 2x of ours
    assert 0.5 < r["per_device_bytes"] / r["llmc"]["total"] < 2
    rc, out, _ = _plan(f"{D48} -b 64", capsys)
    assert rc == 1 and "does not fit: needs " in out and "GiB over the" in out


def test_find_batch_is_the_largest_that_fits(capsys, tmp_path):
    """A 3 GiB GPU (a --target-config spec): the -b found fits and the next one does not."""
    from llmc_jax.planning import targets
    spec = dict(targets.GPUS["h100"], device_memory_size=3 * 1024 ** 3, description="small GPU")
    path = tmp_path / "small.txtpb"
    path.write_text(targets.spec_text(spec))
    base = f"-e d6 -t 1024 --target small --target-config {path}"
    rc, out, _ = _plan(f"{base} --find-batch", capsys)
    assert rc == 0, out
    best = int(out.split("the largest -b that fits is ")[1].split()[0])
    assert best >= 1
    assert _plan(f"{base} -b {best} --compile-only", capsys)[0] == 0
    assert _plan(f"{base} -b {best + 1} --compile-only", capsys)[0] == 1


@pytest.mark.parametrize("flags, says", [
    ("--compile-only", "need --target"),
    ("--target x100x8 --compile-only", "unknown GPU 'x100'"),
    ("--target h100x0 --compile-only", "must be >= 1"),
    ("--target h100x8 --target-config /nonexistent.txtpb --compile-only", "cannot read it"),
    ("-e d12 -t 2048 --target h100 --compile-only", "exceeds the model's maxT"),
    ("-e d12 -b 3 -d 1000 --target h100x8 --compile-only", "-d 1000 is not a multiple"),
])
def test_bad_flags_are_one_line(flags, says, capsys):
    rc, out, err = _plan(flags, capsys)
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_planning_writes_nothing(capsys, tmp_path, monkeypatch):
    """No output dir, no corpus, no checkpoint: the built-in run's defaults plan without touching disk."""
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _plan("--target h100 --compile-only", capsys)
    assert rc == 0 and list(tmp_path.iterdir()) == []


def test_cpu_machine_with_the_cuda_plugin_shows_no_traceback():
    """The dev extra installs jax's CUDA plugin; without a driver llmc_jax keeps JAX on the CPU, quietly."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-c", "import llmc_jax, jax; print(jax.devices()[0].platform)"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() in ("cpu", "gpu")
    assert "Traceback" not in r.stderr and "cuPTI" not in r.stderr, r.stderr


def test_plan_after_cached_cpu_compiles_reads_no_cache(tmp_path):
    """A process that compiled with the persistent cache on (the trainer turns it on) then plans twice:
    no plan reads or writes that cache (a deviceless compile cannot load its executables: XLA warned)."""
    code = ("import warnings, jax, jax.numpy as jnp\n"
            f"jax.config.update('jax_compilation_cache_dir', {str(tmp_path)!r})\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: x * 2)(jnp.ones(3))\n"
            "from llmc_jax.planning import plan\n"
            "warnings.simplefilter('error')\n"
            "for _ in range(2):\n"
            "    plan.plan_flags('-e d6 -b 2 -t 64'.split(), 'h100x1', eval_step=False)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
