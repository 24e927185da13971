"""Shared by the dataset scripts: their errors, a progress bar on stderr, and resumable, verified
downloads that fail fast offline with a message saying where to put the file by hand."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request

class PrepareError(RuntimeError):
    """A user-facing failure: the message says what is wrong and what to do."""


class DownloadError(PrepareError):
    """A download that failed; the message says where to put the file by hand."""


# ----------------------------------------------------------------------------- progress

class Progress:
    """A tiny progress line on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "B", stream=None,
                 enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else 10.0
        self.n = 0.0
        self.tokens = 0
        self.t0 = self.last = time.time()
        self._drawn = False

    def update(self, n: float = 0, tokens: int = 0) -> None:
        self.n += n
        self.tokens += tokens
        now = time.time()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _draw(self, now: float, final: bool = False) -> None:
        dt = max(now - self.t0, 1e-9)
        parts = [self.desc]
        if self.total:
            frac = min(self.n / self.total, 1.0)
            parts.append(f"{100 * frac:5.1f}%")
            if 0 < frac < 1 and not final:
                parts.append(f"eta {_hms(dt * (1 - frac) / frac)}")
        if self.unit == "B":
            parts.append(f"{_human(self.n)}B" + (f"/{_human(self.total)}B" if self.total else ""))
            parts.append(f"{_human(self.n / dt)}B/s")
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens ({_human(self.tokens / dt)} tok/s)")
        parts.append(_hms(dt))
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and (self._drawn or self.tty or time.time() - self.t0 > 1.0):
            self._draw(time.time(), final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _human(x: float | None) -> str:
    x = float(x or 0)
    for unit in ("", "K", "M", "G", "T"):
        if abs(x) < 1000 or unit == "T":
            return f"{x:.0f}{unit}" if unit == "" else f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ----------------------------------------------------------------------------- downloads

class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of redirect responses (Hugging Face puts the file's sha256 there)."""

    def __init__(self):
        self.headers: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def manual_hint(url: str, dest: str) -> str:
    dest = os.path.abspath(dest)
    return (f"Without internet access: download {url} on another machine and put it at {dest} "
            f"(a partial download may be left as {dest}.part to be resumed), then run this command again.")


def _is_sha256(s: str | None) -> bool:
    return bool(s) and re.fullmatch(r"[0-9a-f]{64}", s) is not None


def download(url: str, dest: str, *, sha256: str | None = None, size: int | None = None,
             hint: str | None = None, timeout: float = 20.0, verbose: bool = True,
             cancel=None) -> str:
    """Download url to dest, resuming dest.part; check size and sha256 (given, or the server's
    X-Linked-ETag on Hugging Face); return dest. An existing dest is only verified.

    Raises DownloadError, whose message says where to put the file by hand. `cancel` (a
    threading.Event) stops a download in progress, keeping the .part for a later resume.
    """
    hint = hint or manual_hint(url, dest)
    if os.path.exists(dest):
        verify_file(dest, sha256=sha256, size=size)
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have > size:
        os.remove(part)
        have = 0
    recorder = _RecordingRedirects()
    opener = urllib.request.build_opener(recorder)
    req = urllib.request.Request(url, headers={"User-Agent": "llmc-jax-prepare/1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and (size is None or have == size):  # the .part is already complete
            resp = None
        else:
            raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}.\n{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url}: {reason} (no internet access?).\n{hint}") from None
    if resp is not None:
        with resp:
            for h in recorder.headers + [resp.headers]:
                linked = (h.get("X-Linked-ETag") or "").strip('"').lower()
                if sha256 is None and _is_sha256(linked):
                    sha256 = linked
                if size is None and (h.get("X-Linked-Size") or "").isdigit():
                    size = int(h["X-Linked-Size"])
            if resp.status == 206:
                m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    raise DownloadError(f"{url}: the server answered a resume request with a bad range; "
                                        f"delete {part} and run again")
                total = int(m.group(2)) if m.group(2) != "*" else None
                mode = "ab"
            else:  # 200: the server sends the whole file (no resume support): start over
                have, mode = 0, "wb"
                cl = resp.headers.get("Content-Length")
                total = int(cl) if cl and cl.isdigit() else None
            total = total or size
            if verbose and have:
                print(f"resuming {dest} at {have:,} bytes", file=sys.stderr)
            try:
                with open(part, mode) as f, Progress(f"downloading {os.path.basename(dest)}", total,
                                                     enabled=verbose) as prog:
                    prog.n = have
                    while True:
                        if cancel is not None and cancel.is_set():
                            raise DownloadError(f"download of {url} cancelled; {part} is kept for resuming")
                        chunk = resp.read(1 << 20)
                        if not chunk:
                            break
                        f.write(chunk)
                        prog.update(len(chunk))
            except (OSError, urllib.error.URLError) as e:
                raise DownloadError(f"downloading {url} was interrupted ({e}); run again to resume from "
                                    f"{part}.\n{hint}") from None
            if total is not None and os.path.getsize(part) != total:
                raise DownloadError(f"downloading {url} stopped at {os.path.getsize(part):,} of {total:,} "
                                    f"bytes; run again to resume from {part}")
    try:
        verify_file(part, sha256=sha256, size=size, shown=dest)
    except PrepareError:
        os.remove(part)
        raise
    os.replace(part, dest)
    return dest


def verify_file(path: str, *, sha256: str | None = None, size: int | None = None, shown: str | None = None) -> None:
    shown = shown or path
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise DownloadError(f"{shown}: {actual:,} bytes, expected {size:,}; the file is truncated or a different "
                            f"version: delete it and run again")
    if sha256 is not None:
        got = _sha256_file(path)
        if got != sha256.lower():
            raise DownloadError(f"{shown}: sha256 {got} does not match the expected {sha256}; the file is "
                                f"corrupt: delete it and run again")
