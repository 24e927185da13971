"""The train command's second and third phases: start a resolved Run, then run llm.c's loop.

    session = start(run)     # weights, loaders, train state (fresh or restored exactly), jitted step
    loop(run, session)       # per step: the due events in llm.c's order, then one optimizer update

Loop order per step s (0-based), as llm.c: validation (at s % v == 0 and at the last step),
HellaSwag (s > 0 and s % v == 0, and the last step), sampling (s > 0 and s % s_every == 0, and the
last step), checkpoint (s > 0 and s % n == 0, and the last step), then, unless s is the last step,
one optimizer update. So -x N runs N updates and evaluates once more after the last one. The step
a run resumed at had its events before its checkpoint was written; they are not repeated.

The host never waits on a step it has just started: step s's line (its loss, norm and the finite
check computed inside the jitted step) is read and printed while step s+1 runs, and the next
batch is read from the shards on a thread meanwhile (BatchPrefetch). Before any event the
pending line is printed first, so stdout and main.log keep llm.c's content and order.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, NoReturn, TextIO

import numpy as np

from llmc_jax.training import train_log
from llmc_jax.errors import UsageError
from llmc_jax.multihost import peer_watch
from llmc_jax.training.run import Run, describe_run


@dataclasses.dataclass
class Session:
    """What a started run holds: the live state and what acts on it."""

    state: Any
    shardings: Any
    train_loaders: list
    val_loaders: list
    step_fn: Callable
    eval_fn: Callable
    log: TextIO | None
    tokenizer: Any
    eot: int
    device: Any
    last_good: int | None       # the newest checkpoint this run can name as its resume point
    batches: "BatchPrefetch | None" = None
    metrics: Any = None         # live_metrics.LiveMetrics (TensorBoard) beside main.log, process 0


class Event(NamedTuple):
    """Periodic work: at multiples of `every` (and step 0 if at_zero) and at the last step;
    every == 0: at the last step only."""

    name: str
    every: int
    at_zero: bool
    fn: Callable[[Run, Session, int], None]

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0 and (self.at_zero or step > 0))


def print0(run: Run, *a, **k) -> None:
    if run.is_main_process:
        print(*a, **k, flush=True)


def stop(run: Run, message: str) -> NoReturn:
    """End a run that failed while running: one `error:` line (process 0) and exit status 1."""
    raise SystemExit(f"error: {message}" if run.is_main_process else 1)


# ----------------------------------------------------------------------------------------------
# start

def start(run: Run) -> Session:
    import jax
    import jax.numpy as jnp

    from llmc_jax.training import parallel, train_step
    from llmc_jax.models.family import load_model
    _enable_compilation_cache(run.num_processes)
    if run.platform == "gpu" and run.dtype == "float32" and not run.flags.allow_tf32:
        jax.config.update("jax_default_matmul_precision", "highest")
    train_loaders, val_loaders = _loaders(run)
    device = jax.devices()[0]
    print0(run, _config_table(describe_run(run, device, jax.__version__)))
    print0(run, f"batch_size B={run.B} * seq_len T={run.T} * num_devices={run.num_devices} and "
                f"total_batch_size={run.total_batch}")
    print0(run, f"=> setting grad_accum_steps={run.grad_accum}")
    if run.num_processes > 1 and run.flags.sample_every > 0:
        print0(run, f"note: {run.num_processes} processes: every process gathers the params to sample (-s); "
                    "only process 0 prints")

    _, params_np = load_model(run.init, None if run.resume_step is not None else run.model_table,
                              check_finite=False)
    params = {k: jnp.asarray(v, run.param_dtype) for k, v in params_np.items()}
    del params_np
    sc = run.step_config()
    state = train_step.init_train_state(params, sc)
    layer_params = _family(run).LAYER_PARAMS
    shardings = (parallel.make_shardings(state, run.mesh, run.flags.zero_stage, layer_params, run.dtype)
                 if run.mesh else None)
    if run.resume_step is not None:
        state = _resume_state(run, state, shardings, train_loaders, val_loaders)
        print0(run, f"resumed from step {run.resume_step} of {run.flags.output_dir}")
    if shardings is not None:
        state = parallel.shard_state(state, shardings)
    log = metrics = None
    if run.flags.output_dir and run.is_main_process:
        from llmc_jax.training.live_metrics import LiveMetrics
        log = train_log.open_log(run.flags.output_dir, run.resume_step, lambda line: print0(run, line))
        metrics = LiveMetrics(run.flags.output_dir, run.resume_step)
        if run.resume_step is not None:      # purged with the rest from resume_step on; main.log kept them
            metrics.scalars(run.resume_step, train_log.evals_at(run.flags.output_dir, run.resume_step))
    tokenizer = _tokenizer(run.model)
    # the tokenizer's EOT; a model with another vocabulary starts from its last token instead
    eot = tokenizer.eot if tokenizer else min(50256, run.model.V - 1)
    return Session(state=state, shardings=shardings, train_loaders=train_loaders, val_loaders=val_loaders,
                   step_fn=train_step.make_train_step(sc, shardings, deterministic=run.platform == "gpu"),
                   eval_fn=train_step.make_eval_step(sc, deterministic=run.platform == "gpu", shardings=shardings),
                   log=log, tokenizer=tokenizer, eot=eot, device=device, last_good=run.resume_step,
                   metrics=metrics)


def _family(run: Run):
    from llmc_jax.models.family import family_of
    return family_of(run.model)


def _loaders(run: Run) -> tuple[list, list]:
    """Per local device rank: its train loader and its val loader (unshuffled: rank r's B rows of
    each val batch, the rows DataLoader(val, B*D, T) reads)."""
    from llmc_jax.formats.data import DataLoader
    f, D, V = run.flags, run.num_devices, run.model.V
    train = [DataLoader(run.train_data, run.B, run.T, r, D, shuffle=bool(f.shuffle) and not f.overfit,
                        seed=f.seed, vocab_size=V) for r in run.local_ranks]
    val = [DataLoader(run.val_data, run.B, run.T, r, D, shuffle=False, vocab_size=V) for r in run.local_ranks]
    return train, val


def _enable_compilation_cache(num_processes: int) -> None:
    """Persistent XLA cache under the llmc_jax cache root, so a second start skips compiling.

    Not for several processes on jax >= 0.11: with jax 0.12.1 (Python 3.12) a 2-process run whose
    step is already in the cache hangs at its first step (seen with 2 CPU processes, fixed by
    turning the cache off); jax 0.10.2 runs them, cached, in the test suite. 0.11 is untested."""
    import jax

    from llmc_jax.paths import cache_root
    if num_processes > 1 and tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11):
        return
    path = os.path.join(cache_root(), "jax_compilation_cache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return                                # read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _tokenizer(model):
    """Something with decode(list[int]) -> str, or None where no tokenizer fits the vocabulary."""
    from llmc_jax.formats import tokenizer
    name = "byte" if model.V == 256 else "gpt2"
    try:
        tok = tokenizer.get_tokenizer(name)
    except Exception as e:   # offline without the BPE files: print token ids, as llm.c does
        print(f"warning: no GPT-2 tokenizer ({type(e).__name__}); samples print token ids", file=sys.stderr)
        return None
    return tok if tok.vocab_size == model.V else None


def _config_table(rows: list[tuple[str, object]]) -> str:
    line = "+-----------------------+----------------------------------------------------+"
    out = [line, f"| {'Parameter':<21} | {'Value':<50} |", line]
    out += [f"| {k:<21} | {str(v):<50} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def _data_record(train_loaders: list, val_loaders: list) -> dict:
    """Path and size of every shard the run reads, as the checkpoint manifest records them."""
    from llmc_jax.training import checkpoint_manifest
    return {"train": checkpoint_manifest.data_files(train_loaders[0].shard_paths),
            "val": checkpoint_manifest.data_files(val_loaders[0].shard_paths)}


def _resume_state(run: Run, state, shardings, train_loaders: list, val_loaders: list):
    """The checkpoint's train state, with this run's -x, model, data and loaders checked against it
    first. Every refusal is one UsageError line."""
    from llmc_jax.training import checkpoint, checkpoint_manifest
    step, out_dir = run.resume_step, run.flags.output_dir
    if run.max_steps <= step:
        raise UsageError(f"-y 1: the checkpoint in {out_dir} is already at step {step}, and this run ends at "
                         f"step {run.max_steps} (-x); give -x above {step} to train on from it")
    where = f"-y 1: cannot resume from step {step} of {out_dir}"
    try:
        checkpoint_manifest.check_run(run.manifest, run.model, _data_record(train_loaders, val_loaders))
    except checkpoint.CheckpointError as e:
        raise UsageError(f"{where}: {e}") from None
    try:     # loader states first (cheap checks), then the state straight onto this run's shardings
        loader_states, note = checkpoint.loader_states(checkpoint.load_meta(out_dir, step), list(run.local_ranks),
                                                       run.num_devices)
        for loader, loader_state in zip(train_loaders, loader_states):
            loader.load_state_dict(loader_state)
    except ValueError as e:        # another batch geometry or data than the checkpoint's
        raise UsageError(f"{where}: {e}; resume with the flags of the run that wrote it") from None
    if note:
        print0(run, note)
    try:
        state = checkpoint.load_state(out_dir, step, state, shardings.state if shardings is not None else None)
        checkpoint_manifest.check_restored(run.manifest, state, out_dir)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"{where}: {e}") from None
    return state


# ----------------------------------------------------------------------------------------------
# the loop

def events(run: Run, s: Session) -> list[Event]:
    """The periodic events this run has, in llm.c's order."""
    f = run.flags
    out = []
    if f.val_every > 0:
        out.append(Event("val", f.val_every, True, _validate))
        if run.hellaswag:
            out.append(Event("hellaswag", f.val_every, False, _hellaswag))
    if f.sample_every > 0:
        out.append(Event("sample", f.sample_every, False, _sample))
    if f.output_dir and f.checkpoint_every >= 0:      # -n 0: at the end only; -n -1: never
        out.append(Event("checkpoint", f.checkpoint_every, False, _checkpoint))
    return out


def loop(run: Run, s: Session) -> int:
    """llm.c's loop; 0 at the end, preemption.PREEMPTED_EXIT after a preemption's checkpoint."""
    from llmc_jax.training import preemption
    start_step = run.resume_step or 0
    timing = _Timing()
    due_events = events(run, s)
    flops_per_step = run.model.flops_per_token(run.T) * run.total_batch
    s.batches = BatchPrefetch(run, s.train_loaders)
    pending: _Pending | None = None
    preempt = preemption.Preemption(run.num_processes)
    preempted = False
    try:
        for step in range(start_step, run.max_steps + 1):
            last = step == run.max_steps
            due = [e for e in due_events if e.due(step, last)] if step != run.resume_step else []
            preempted = not last and preempt.requested(step)
            if preempted:
                due = _preemption_events(run, due, step)
            if due and pending is not None:    # events see the state after the line before them
                _report(run, s, pending, timing, flops_per_step)
                pending = None
            for event in due:
                event.fn(run, s, step)
                peer_watch.progress()
            if last or preempted:
                break
            started = _dispatch(run, s, step, first=step == start_step)
            if pending is not None:            # the previous step's line, while this one runs
                _report(run, s, pending, timing, flops_per_step)
            pending = started
        if pending is not None:
            _report(run, s, pending, timing, flops_per_step)
    finally:
        s.batches.close()
        preempt.close(preempted)
    if timing.steps:
        print0(run, f"total average iteration time: {1000 * timing.total / timing.steps:f} ms")
    if s.log:
        s.log.close()
    if s.metrics:
        s.metrics.close()
    if preempted:
        saved = (f"the checkpoint of step {s.last_good} is the resume point" if s.last_good is not None
                 else "no checkpoint (no -o)")
        print0(run, f"preempted ({preempt.describe()}) at step {step}: {saved}; exit status "
                    f"{preemption.PREEMPTED_EXIT}: run again with -y 1 to resume")
        return preemption.PREEMPTED_EXIT
    return 0


def _preemption_events(run: Run, due: list[Event], step: int) -> list[Event]:
    """What a preempted run still does at its last step boundary: the logged evaluations due there
    (the resumed run skips its first step's events) and a checkpoint (with -o, whatever -n says),
    unless the run resumed from this very step's checkpoint. No sample."""
    due = [e for e in due if e.name != "sample"]
    if run.flags.output_dir and step != run.resume_step and not any(e.name == "checkpoint" for e in due):
        due.append(Event("checkpoint", 0, False, _checkpoint))
    return due


@dataclasses.dataclass
class _Timing:
    ema_tok_s: float = 0.0
    total: float = 0.0
    steps: int = 0
    last_ready: float = 0.0      # when the host saw the previous step's numbers


class _Pending(NamedTuple):
    """A started step whose numbers the host has not read yet."""
    step: int
    metrics: Any
    lr: float
    started: float
    first: bool


class BatchPrefetch:
    """The next step's host batch, read from the shards on a thread while the current step runs.

    The loaders' states are copied before each read, so a checkpoint records the batches the steps
    consumed (`consumed_states`), not the one read ahead."""

    def __init__(self, run: Run, loaders: list):
        self.run, self.loaders = run, loaders
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc-batch")
        self.ahead = None

    def _read(self):
        from llmc_jax.training import parallel
        states = [copy.deepcopy(loader.state_dict()) for loader in self.loaders]
        if self.run.flags.overfit:
            for loader in self.loaders:
                loader.reset()
        return parallel.next_batches(self.loaders, self.run.grad_accum), states

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        batch = (self.ahead.result() if self.ahead is not None else self._read())[0]
        self.ahead = self.pool.submit(self._read)
        return batch

    def consumed_states(self) -> list[dict]:
        if self.ahead is not None:
            return self.ahead.result()[1]
        return [copy.deepcopy(loader.state_dict()) for loader in self.loaders]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _dispatch(run: Run, s: Session, step: int, first: bool) -> _Pending:
    """Start one optimizer update (asynchronously: nothing here waits for the device)."""
    from llmc_jax.training import parallel
    t0 = time.perf_counter()
    x, y = s.batches.next()
    if run.num_processes > 1:
        x = parallel.global_rows(x, run.mesh, run.num_devices, axis=1)
        y = parallel.global_rows(y, run.mesh, run.num_devices, axis=1)
    elif s.shardings is not None:
        x, y = parallel.shard_batch(x, s.shardings), parallel.shard_batch(y, s.shardings)
    lr = run.learning_rate(step)
    s.state, metrics = s.step_fn(s.state, x, y, np.float32(lr), np.int32(step))
    return _Pending(step, metrics, lr, t0, first)


def _report(run: Run, s: Session, p: _Pending, timing: _Timing, flops_per_step: int) -> None:
    """A started step's stdout and main.log lines (llm.c's format); waits for its numbers. Its time
    runs from the previous step's numbers (or its own start, after events) to its own."""
    from llmc_jax.training import live_metrics, mfu
    import jax
    m = jax.device_get(p.metrics)                  # one transfer for all six numbers
    loss, norm, lz, nz = (float(m.loss), float(m.norm), float(m.loss_z), float(m.norm_z))
    skipped, finite = bool(m.skipped), bool(m.finite)
    ready = time.perf_counter()
    dt = ready - max(p.started, timing.last_ready)
    timing.last_ready = ready
    tok_s = run.total_batch / dt
    if not p.first:
        timing.total += dt
        timing.steps += 1
        timing.ema_tok_s = 0.95 * timing.ema_tok_s + 0.05 * tok_s
        tok_s = timing.ema_tok_s / (1 - 0.95 ** timing.steps)
    util = mfu.mfu(flops_per_step, dt, run.num_devices, s.device.device_kind)
    util_s = f"{100 * util:.1f}% bf16 MFU" if util is not None else "n/a MFU"
    step, lr = p.step, p.lr
    if skipped:
        print0(run, f"skipping update due to loss z-score of {lz:.2f} / grad z-score of {nz:.2f}")
    step_s = timing.total / timing.steps if timing.steps else dt
    print0(run, f"step {step + 1:4d}/{run.max_steps} | loss {loss:7.6f} ({lz:+.2f}z)| norm {norm:6.4f} "
                f"({nz:+.2f}z)| lr {lr:.2e} | {1000 * dt:.2f} ms | {util_s} | {tok_s:.0f} tok/s | "
                f"eta {_duration((run.max_steps - step - 1) * step_s)}")
    _log(run, s, f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}", step)
    peer_watch.progress()
    if s.metrics:
        s.metrics.scalars(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                                 "train/tokens_per_s": tok_s, "train/mfu": util, "train/step_ms": 1000 * dt,
                                 "train/device_memory_gib": live_metrics.device_memory_gib(s.device)})
    if not finite:      # stop before a checkpoint could hold it; numbered as the line above
        stop(run, f"step {step + 1}: loss/grad norm is not finite (loss {loss}, grad norm {norm}); stopping; "
                  f"{_resume_point(s.last_good)} (lower -l, or check the data and model)")


def _duration(seconds: float) -> str:
    """1h02m, 3m12s, 12s: the time left at the steps' mean time (events not counted)."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _log(run: Run, s: Session, line: str, step: int) -> None:
    train_log.write(s.log, line, step, lambda message: stop(run, message))


def _validate(run: Run, s: Session, step: int) -> None:
    from llmc_jax.training import parallel
    for loader in s.val_loaders:
        loader.reset()
    val_loss = 0.0
    for _ in range(run.val_batches):
        x, y = (a[0] for a in parallel.next_batches(s.val_loaders, 1))     # (B*D, T), ranks in order
        if run.num_processes > 1:     # (B*D, T) global array; this process gives its ranks' rows
            x = parallel.global_rows(x, run.mesh, run.num_devices)
            y = parallel.global_rows(y, run.mesh, run.num_devices)
        val_loss += float(s.eval_fn(s.state.params, x, y, s.state.fp8))
    val_loss /= max(run.val_batches, 1)
    print0(run, f"val loss {val_loss:.6f}")
    _log(run, s, f"s:{step} tel:{val_loss:.4f}", step)
    if s.metrics:
        s.metrics.scalars(step, {"val/loss": val_loss})
        s.metrics.flush()


def _hellaswag(run: Run, s: Session, step: int) -> None:
    from llmc_jax.evals import hellaswag
    from llmc_jax.training import parallel
    correct, total = hellaswag.score(parallel.gather_params(s.state.params), run.model, run.hellaswag, B=run.B,
                                     T=run.T, dtype=run.dtype, kernels=run.kernels)
    print0(run, f"HellaSwag: {correct}/{total} = {correct / total:f}")
    _log(run, s, f"s:{step} eval:{correct / total:.4f}", step)
    if s.metrics:
        s.metrics.scalars(step, {"eval/hellaswag": correct / total})


def _sample(run: Run, s: Session, step: int) -> None:
    from llmc_jax.training import parallel
    from llmc_jax.evals.generate import generate
    toks = generate(parallel.gather_params(s.state.params), run.model, run.flags.gen_tokens, s.eot,
                    dtype=run.dtype, kernels=run.kernels)
    text = s.tokenizer.decode(toks[1:]) if s.tokenizer else " ".join(map(str, toks[1:]))
    print0(run, f"generating:\n---\n{text}\n---")


def _checkpoint(run: Run, s: Session, step: int) -> None:
    """Write (and prune after) the checkpoint of `step`; a NaN/Inf state or a failed write ends the
    run (exit 1) with one line, leaving `last_good` the newest resumable checkpoint."""
    from llmc_jax.training import checkpoint
    f, out_dir = run.flags, run.flags.output_dir
    meta = {"step": step, "num_devices": run.num_devices, "num_processes": run.num_processes,
            "args": _jsonable(f._asdict()),       # the flags as given, and what they resolved to:
            "resolved": {"dtype": run.dtype, "kernels": str(run.kernels), "init": run.init,
                         "train_data": run.train_data, "val_data": run.val_data}}
    keep = _resume_point(s.last_good)
    try:
        checkpoint.save(out_dir, step, run.model, s.state,
                        dict(zip(run.local_ranks, s.batches.consumed_states())), meta,
                        model_version=3 if run.dtype == "float32" else 5,
                        data=_data_record(s.train_loaders, s.val_loaders))
    except checkpoint.NonFiniteStateError as e:
        stop(run, f"{e}; not writing a checkpoint of it; {keep} (lower -l, or check the data)")
    except OSError as e:                 # CheckpointWriteError
        stop(run, f"cannot write checkpoint step {step} to {out_dir}: {e.strerror or e}; {keep}")
    print0(run, f"checkpoint step {step} -> {checkpoint.paths(out_dir, step)['model']} "
                f"(with state, meta and DONE_{step:08d}: resume with -y 1)")
    s.last_good = step
    try:
        checkpoint.prune(out_dir, step, f.checkpoint_every, f.checkpoint_keep, f.checkpoint_major)
    except OSError as e:
        stop(run, f"checkpoint step {step} was written to {out_dir} (the resume point), but deleting "
                  f"an older one (-nk) failed: {e.strerror or e}")


def _resume_point(last_good: int | None) -> str:
    if last_good is None:
        return "no checkpoint of this run was written before it"
    return f"the last good checkpoint (step {last_good}) stays the resume point"


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}
