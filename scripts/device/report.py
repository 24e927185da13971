"""The parent's view of the results: each part's rows merged from its worker's file (a killed or
crashed worker's item becomes a timeout row), the statuses of parts and sections, and the section
files in --out, rewritten after every merge so that a run cut off anywhere leaves them current."""
from __future__ import annotations

import os
import time
from typing import Iterable

from .common import read_json, write_json
from .plan import PARTS, SECTION_FILE, SECTIONS

BAD_ROW = ("fail", "error", "timeout")


def part_status(entry: dict) -> str:
    """failed (any bad row, or the part errored), partial (budget skips), skipped, ok, or as given."""
    rows = entry.get("rows", [])
    if entry.get("error") or any(r.get("status") in BAD_ROW for r in rows):
        return "failed"
    if any(r.get("status") == "skipped" and str(r.get("reason", "")).startswith("budget") for r in rows):
        return "partial"
    if rows and all(r.get("status") == "skipped" for r in rows):
        return "skipped"
    return "ok" if rows else entry.get("status", "empty")


def section_status(parts: Iterable[dict]) -> str:
    """The worst of its parts' statuses: failed, running, partial before ok."""
    statuses = [p.get("status", "empty") for p in parts]
    for s in ("failed", "running", "partial"):
        if s in statuses:
            return s
    if statuses and all(s == "skipped" for s in statuses):
        return "skipped"
    if "ok" in statuses:
        return "ok" if all(s in ("ok", "skipped") for s in statuses) else "partial"
    return statuses[0] if statuses else "not run"


class Results:
    """Every part's entry ({"status", "rows", "info", "elapsed_s", "error"?}) and the section files:
    `tmp` is where the workers write one file per part, `out` where the section files go."""

    def __init__(self, out: str, tmp: str, sections: set[str]) -> None:
        self.out, self.tmp, self.sections = out, tmp, sections
        self.parts: dict[str, dict] = {}         # part -> {"status", "rows", "info", ...}
        self.platform: str | None = None
        self.device: str | None = None

    def part_file(self, part: str) -> str:
        """The worker's file for `part`."""
        return os.path.join(self.tmp, f"{part}.json")

    def section_data(self, section: str) -> dict:
        """One section file's content: its status, device, time and its parts' entries."""
        parts = {p: self.parts[p] for p, s, _, _ in PARTS if s == section and p in self.parts}
        return {"section": section, "status": section_status(parts.values()) if parts else "not run",
                "device": self.device, "elapsed_s": sum(p.get("elapsed_s", 0) for p in parts.values()),
                "parts": parts}

    def write_sections(self) -> None:
        """Rewrite every wanted section's file in --out."""
        for section in SECTIONS:
            if section in self.sections:
                write_json(os.path.join(self.out, SECTION_FILE[section]), self.section_data(section))

    def set_parts(self, parts: list[str], **entry) -> None:
        """Record parts that never ran (no time, or their worker died first) with the given status."""
        for p in parts:
            self.parts[p] = {"rows": [], "info": {}, **entry}
        self.write_sections()

    def merge(self, part: str, final: bool, rc: int | None = None, killed: bool = False) -> None:
        """Take `part`'s rows from its worker's file; `final` once its worker is gone, when an item
        still running becomes a timeout row and an unfinished part gets the reason as its error."""
        data = read_json(self.part_file(part))
        if data is None:
            if not final:
                return
            data = {"rows": [], "info": {}}
        entry = {"rows": list(data.get("rows", [])), "info": data.get("info", {}),
                 "elapsed_s": data.get("elapsed_s", 0)}
        if final:
            if data.get("running"):
                entry["rows"].append({"name": data["running"], "status": "timeout",
                                      "error": "killed: the part ran past its time" if killed else
                                      f"the worker died (exit {rc}) during this item"})
            if not data.get("done"):
                entry["error"] = ("killed at the end of its time" if killed else
                                  f"worker exited with status {rc} before finishing")
                if entry["info"].get("started"):
                    entry["elapsed_s"] = time.time() - entry["info"]["started"]
            if entry["info"].get("error"):
                entry["error"] = entry["info"]["error"]
        entry["status"] = part_status(entry) if final or data.get("done") else "running"
        self.parts[part] = entry
        if part == "env" and entry["info"].get("platform"):
            self.platform = entry["info"]["platform"]
            self.device = f"{self.platform} {entry['info'].get('device_kind')}"
        self.write_sections()

    def failed(self) -> bool:
        """Whether any row failed, errored or timed out, or any part errored (exit status 1)."""
        bad = any(r.get("status") in BAD_ROW for p in self.parts.values() for r in p["rows"])
        return bad or any(p.get("error") for p in self.parts.values())
