"""The GPUs a run can be planned for, and the topology XLA compiles against without them.

A target is `GPU[xN[xH]]`: a GPU model (h100, h200), N GPUs per host (default 1), H hosts
(default 1). XLA compiles for it from a GpuTargetConfigProto (text form) describing one GPU: the
figures below are the public ones XLA keeps in xla/backends/gpu/target_config/specs/
(h100_sxm.txtpb, h200.txtpb), reduced to the fields every jaxlib >= 0.10 parses. `--target-config
FILE` gives any other GPU's spec (one of XLA's files, say) for the GPU model's name.
"""
from __future__ import annotations

import dataclasses
import os
import re

from llmc_jax.errors import UsageError

# the SM is the same on both; they differ in memory size and bandwidth
_SM90 = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
             shared_memory_per_core=233472, shared_memory_per_block_optin=232448, threads_per_core_limit=2048,
             core_count=132, fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
             block_dim_limit_z=65535, l2_cache_size=52428800, clock_rate_ghz=1.98,
             registers_per_core_limit=65536, registers_per_block_limit=65536)
GPUS = {
    "h100": dict(_SM90, memory_bandwidth=3352320000000, device_memory_size=84942979072,
                 description="NVIDIA H100 80GB HBM3"),
    "h200": dict(_SM90, memory_bandwidth=4800000000000, device_memory_size=151397597184,
                 description="NVIDIA H200 141GB HBM3e"),
}
# The train command on a GPU lets XLA's allocator take this fraction of the device memory
# (llmc_jax/__init__.py sets XLA_PYTHON_CLIENT_MEM_FRACTION unless the user did); the rest is the
# CUDA context and the libraries' workspaces. A plan fits when it needs at most this much.
GPU_MEMORY_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class Target:
    gpu: str                  # h100, h200, or the name given with --target-config
    per_host: int             # GPUs per host
    hosts: int
    spec_text: str            # the GpuTargetConfigProto XLA compiles for
    memory_bytes: int         # one GPU's memory
    description: str

    @property
    def devices(self) -> int:
        return self.per_host * self.hosts

    @property
    def capacity_bytes(self) -> int:
        """What one GPU's allocator may hand out to the run (GPU_MEMORY_FRACTION of its memory)."""
        return int(self.memory_bytes * GPU_MEMORY_FRACTION)

    @property
    def name(self) -> str:
        return f"{self.gpu}x{self.per_host}" + (f"x{self.hosts}" if self.hosts > 1 else "")


def spec_text(gpu: dict) -> str:
    """GPU figures -> the GpuTargetConfigProto text XLA parses (compute capability 9.0, CUDA 13)."""
    fields = "\n".join(f"  {k}: {v}" for k, v in gpu.items() if k != "description")
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 10 }}\n'
            f'runtime_version {{ major: 13 minor: 0 }}\ndevice_description_str: "{gpu["description"]}"\n')


def parse_target(text: str, config_file: str | None = None) -> Target:
    """`h100x8`, `h200x8x2`, `h100` -> Target; with config_file any GPU name, its spec read from it."""
    m = re.fullmatch(r"([a-z][a-z0-9_-]*?)(?:x(\d+))?(?:x(\d+))?", text.strip().lower())
    if not m:
        raise UsageError(f"--target {text}: expected GPU[xN[xH]] (GPU h100 or h200, N GPUs per host, H hosts), "
                         "e.g. h100x8 or h200x8x2")
    gpu, per_host, hosts = m.group(1), int(m.group(2) or 1), int(m.group(3) or 1)
    if per_host < 1 or hosts < 1:
        raise UsageError(f"--target {text}: GPUs per host and hosts must be >= 1")
    if config_file is not None:
        text_proto, memory, description = _read_spec(config_file)
        return Target(gpu, per_host, hosts, text_proto, memory, description)
    if gpu not in GPUS:
        raise UsageError(f"--target {text}: unknown GPU {gpu!r}; known: {', '.join(GPUS)} "
                         "(or describe it with --target-config FILE, one of XLA's GpuTargetConfigProto specs)")
    spec = GPUS[gpu]
    return Target(gpu, per_host, hosts, spec_text(spec), spec["device_memory_size"], spec["description"])


def _read_spec(path: str) -> tuple[str, int, str]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"--target-config {path}: cannot read it ({e.strerror or e})") from None
    memory = re.search(r"device_memory_size:\s*(\d+)", text)
    if "gpu_device_info" not in text or memory is None:
        raise UsageError(f"--target-config {path}: not a GpuTargetConfigProto text spec (needs gpu_device_info "
                         "with device_memory_size; XLA keeps them in xla/backends/gpu/target_config/specs/)")
    name = re.search(r'device_description_str:\s*"([^"]*)"', text)
    return text, int(memory.group(1)), name.group(1) if name else os.path.basename(path)


def prepare_jax() -> None:
    """Before JAX's backends start: the CPU is the only platform that runs anything, and the CUDA
    plugin loads without a driver (its version check would fail for want of cuPTI's driver)."""
    import jax
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    jax.config.update("jax_platforms", "cpu")
    # the persistent cache holds executables for this machine's devices; a deviceless compile can
    # neither load nor use them (XLA warns "PjRtCompiler must be constructed with a Client"). JAX
    # decides once per process whether the cache is used: reset that decision (a process that trained
    # first, as a test worker may, had already made it)
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()


def topology_mesh(target: Target):
    """A ("data",) mesh over the target's GPUs, as parallel.make_mesh lays out real devices."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh

    from llmc_jax.training.parallel import DATA_AXIS
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target.spec_text,
                                            topology=f"1x{target.hosts}x{target.per_host}")
    except Exception as e:          # no CUDA plugin, or a spec this XLA cannot parse
        raise UsageError(f"--target {target.name}: XLA cannot describe this GPU here ({_first_line(e)}); "
                         "planning needs jax's CUDA plugin: pip install -e \".[dev]\" (or \"jax[cuda13]\" "
                         "of jaxlib's version)") from None
    devices = np.array(topo.devices)
    return Mesh(devices.reshape(devices.size), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
