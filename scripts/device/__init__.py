"""The parts of scripts/device_check.py, the one GPU check; that script is the entry point (arguments,
the section order, the worker processes and the deadlines) and imports this package with scripts/
on sys.path. One job per module:
  plan          the sections, the parts' nominal times, the GPU and --smoke plans (data only)
  common        formatting, atomic result files, Skip, the jax queries the parts share
  recorder      a part's rows on the worker side, each item under the part's deadline
  worker        `device_check.py --worker ...`: runs the named parts in one process
  environment   section 1: versions, device, the matmul and copy ceilings
  reference     the float64 NumPy truth the kernels are held to, and the tolerances
  correctness   section 2: kernels vs float64 on NaN-filled memory, the canary, model gradients
  kernel_bench  section 3: scripts/bench_kernels.py's rows
  training      section 4: the training step's timings, d48's largest -b, Llama
  peer          section 5: the PyTorch peer, scripts/bench_torch_gpt2.py
  report        the parent's merge of the workers' files, statuses, the section files
  summary       the table printed last
jax is imported inside functions only, so that the parent never takes the GPU's memory."""
