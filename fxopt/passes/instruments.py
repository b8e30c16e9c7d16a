"""Instruments: inspection that lives outside passes (TVM's PassInstrument, LLVM's -print-after).

The manager calls every instrument around every pass:

* ``should_run(pass, index)`` — return False to skip the pass (bisection);
* ``run_before_pass(pass, gm, ctx)`` / ``run_after_pass(pass, record, gm, ctx)``.

Records themselves (:class:`PassRecord`) are always kept by the manager; instruments print,
dump or filter them.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import _io


@dataclass
class PassRecord:
    """What one pass did: the graph after it, op counts, parameter bytes, drift, time, notes."""

    index: int
    name: str                      # the pass's pipeline text, e.g. "smoothquant{alpha=0.5}"
    modified: bool
    seconds: float
    graph: str
    ops: dict[str, int]
    num_nodes: int
    param_bytes: int
    drift_max: float | None = None     # max |out - original| over all outputs
    drift_mean: float | None = None    # mean |out - original|
    drift_rel: float | None = None     # drift_max / max |original|
    status: str = "ran"                # "ran" | "not-applicable" | "skipped" | "captured"
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index, "pass": self.name, "status": self.status, "modified": self.modified,
            "nodes": self.num_nodes, "param_bytes": self.param_bytes, "drift_max": self.drift_max,
            "drift_mean": self.drift_mean, "seconds": round(self.seconds, 4), "notes": list(self.notes),
            "stats": dict(self.stats),
        }


def diff_records(a: PassRecord, b: PassRecord, context: int = 2) -> str:
    """Unified diff between the graphs of two records."""
    return "".join(difflib.unified_diff(
        a.graph.splitlines(keepends=True), b.graph.splitlines(keepends=True),
        fromfile=f"{a.index:02d}-{a.name}", tofile=f"{b.index:02d}-{b.name}", n=context))


class Instrument:
    def should_run(self, p, index: int) -> bool:
        return True

    def run_before_pass(self, p, gm, ctx) -> None:
        pass

    def run_after_pass(self, p, record: PassRecord, gm, ctx) -> None:
        pass


class PrintAfter(Instrument):
    """Print the graph after passes: all (``names=None``), some by name, or only those that changed it."""

    def __init__(self, names: set[str] | None = None, *, only_changed: bool = False, stream: TextIO | None = None):
        self.names = set(names) if names else None
        self.only_changed = only_changed
        self.stream = stream
        self._last: str | None = None

    def run_after_pass(self, p, record, gm, ctx):
        out = self.stream or sys.stdout
        if self.names is not None and p.name not in self.names and record.name not in self.names:
            return
        if self.only_changed and not record.modified:
            return
        print(f"// ----- graph after {record.index:02d} {record.name} ({record.status}"
              f"{', modified' if record.modified else ''}) -----", file=out)
        out.write(record.graph)
        for note in record.notes:
            print(f"// note: {note}", file=out)


class Dump(Instrument):
    """Write ``NNN_<pass>.txt`` (graph text and notes) for every pass into a folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.written: list[Path] = []

    def write(self, record: PassRecord) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in record.name.split("{")[0])
        path = self.folder / f"{record.index:03d}_{safe}.txt"
        header = f"# {record.index:02d} {record.name}: {record.status}, modified={record.modified}, " \
                 f"drift_max={record.drift_max}, seconds={record.seconds:.4f}\n"
        notes = "".join(f"# note: {n}\n" for n in record.notes)
        _io.write_text(path, header + notes + record.graph)
        self.written.append(path)
        return path

    def run_after_pass(self, p, record, gm, ctx):
        self.write(record)


class Bisect(Instrument):
    """Run only the first ``limit`` passes (LLVM's -opt-bisect-limit); later ones are skipped."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("bisect limit must be >= 0")
        self.limit = limit

    def should_run(self, p, index: int) -> bool:
        return index <= self.limit
