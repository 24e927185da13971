"""One line on stderr for every failure a command can hit, and an exit status that says which kind.

Every command's `if __name__ == "__main__":` is `run_command(main)`, so a user never sees a
traceback for a bad flag, a bad file or a full device. The exit status rule:

  0    success.
  2    usage: a bad flag or flag value (argparse's or our range checks), a --config TOML that is
       missing or wrong, or a file named on the command line (-e, -i, -j, --llmc-state, ...) that is
       missing, a directory, unreadable, or not in the expected format. Raise `UsageError`, or read
       such files inside `with user_files():`.
  1    failure while running: an OSError, a corrupt file met mid-run, a tokenizer that cannot be
       loaded, out of device/host memory (the line names the flags that lower it), or a bug
       ("internal error: <Type>: <message>", with the hint to rerun with LLMC_JAX_DEBUG=1).
  130  interrupted (Ctrl-C).

`LLMC_JAX_DEBUG=1` re-raises everything but usage errors, so the traceback shows (usage errors
then print theirs before their line).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import NoReturn

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_ENV = "LLMC_JAX_DEBUG"
# Where "our" code lives: ValueError/RuntimeError raised here carry a message meant for the user;
# raised anywhere else (numpy, jax) they are bugs and get the internal-error line.
_PKG = os.path.dirname(os.path.abspath(__file__))
_OUR_DIRS = (_PKG + os.sep, os.path.join(os.path.dirname(_PKG), "scripts") + os.sep)


def one_line(text: object) -> str:
    """Collapse a multi-line message into one line (how-to blocks become '; '-separated steps)."""
    out = ""
    for line in str(text).splitlines():
        line = line.strip()
        if not line:
            continue
        if not out:
            out = line
        else:
            out += (" " if out.endswith((":", ",", ".", "(", ";")) else "; ") + line
    return out


class UsageError(SystemExit):
    """A flag, flag value or named input that cannot work; reported before any work (exit 2).

    A SystemExit, so code that calls `main()` without `run_command` still stops with the message."""

    def __init__(self, message: str):
        self.message = one_line(message)
        super().__init__(f"error: {self.message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: <what>; see --help`, exit 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see --help")


def describe(exc: BaseException, limit: int | None = None) -> str:
    """The user-facing text of an expected failure: `path: reason` for OSErrors, else the message;
    cut to `limit` characters where a library's message can run long."""
    if isinstance(exc, OSError) and exc.strerror:
        text = one_line(f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror)
    else:
        text = one_line(exc) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def user_files() -> Iterator[None]:
    """Reading files the user named: a missing, unreadable or malformed one is a usage error (exit 2).

    LLMCFormatError and TOMLDecodeError are ValueErrors; OSError covers IsADirectoryError,
    PermissionError, FileNotFoundError."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UsageError(describe(e)) from e


def is_out_of_memory(exc: BaseException) -> bool:
    """jax's XlaRuntimeError/JaxRuntimeError for RESOURCE_EXHAUSTED, or the host's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc)
    return bool(names & {"XlaRuntimeError", "JaxRuntimeError"}) and (
        "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def _raised_by_us(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    return os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_OUR_DIRS)


def _expected(exc: BaseException) -> bool:
    """A failure whose message is meant for the user (not a bug): an OSError, a malformed llm.c
    file, or a ValueError/RuntimeError (the tokenizer's errors among them) raised by our code."""
    fmt = sys.modules.get("llmc_jax.formats.llmc_format")
    if isinstance(exc, OSError) or (fmt is not None and isinstance(exc, fmt.LLMCFormatError)):
        return True
    return isinstance(exc, (ValueError, RuntimeError)) and _raised_by_us(exc)


def _report(line: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(one_line(line), file=sys.stderr, flush=True)


def _system_exit(e: SystemExit) -> int:
    if isinstance(e, UsageError):
        if _debug():
            traceback.print_exc()
        _report(f"error: {e.message}")
        return EXIT_USAGE
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    text = one_line(e.code)
    _report(text if text.startswith("error:") else f"error: {text}")
    return EXIT_FAILURE


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def _failure_line(e: BaseException, oom_hint: str) -> tuple[int, str]:
    """(exit status, the one line) for an exception other than SystemExit."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "error: interrupted"
    if is_out_of_memory(e):
        first = one_line(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:200]
        return EXIT_FAILURE, f"error: out of memory ({first}); {oom_hint or 'use a smaller model or batch'}"
    if _expected(e):
        return EXIT_FAILURE, f"error: {describe(e)}"
    return EXIT_FAILURE, (f"error: internal error: {type(e).__name__}: {describe(e)} "
                          f"(rerun with {DEBUG_ENV}=1 for the traceback)")


_under_run_command = False      # run_command has put _quiet_excepthook at the bottom of sys.excepthook


def _quiet_excepthook(type_, value, tb) -> None:
    """The bottom of the excepthook chain under run_command: silent for what `run` reported."""
    if not getattr(value, "_llmc_jax_reported", False):
        sys.__excepthook__(type_, value, tb)


def run(main: Callable[..., int | None], argv: list[str] | None = None, oom_hint: str = "") -> int:
    """Call main(argv) (main() when argv is None) and turn whatever it raises into one stderr line
    and an exit status (see the module docstring); returns the status.

    Code that hooks sys.excepthook to learn that the main thread failed (peer_watch.py: the peers
    of a multi-process run must stop) is still called, for the exceptions Python would have passed
    it (under run_command only, whose hook at the bottom of the chain stays silent for them)."""
    try:
        rc = main() if argv is None else main(argv)
        return 0 if rc is None else int(rc)
    except SystemExit as e:
        return _system_exit(e)
    except (Exception, KeyboardInterrupt) as e:
        if _debug() and not isinstance(e, KeyboardInterrupt):
            raise
        rc, line = _failure_line(e, oom_hint)
        _report(line)
        if _under_run_command and sys.excepthook is not _quiet_excepthook:
            with contextlib.suppress(AttributeError):
                e._llmc_jax_reported = True
            sys.excepthook(type(e), e, e.__traceback__)
        return rc


def run_command(main: Callable[..., int | None], oom_hint: str = "") -> NoReturn:
    """The `__main__` of every command: run main() and exit with its status (see `run`)."""
    global _under_run_command
    sys.excepthook, _under_run_command = _quiet_excepthook, True
    sys.exit(run(main, None, oom_hint))
