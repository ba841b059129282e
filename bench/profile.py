"""Optional profiling (``--profile``): py-spy recordings of Rekku's own processes during its phases.

A missed ratio needs a "where does the time go"; attaching py-spy to the ingress during (a) and to
the Rekku worker (all its pool processes) during (b) and (c) answers it without touching Rekku's
code. Samples include idle ones (``--idle``), so a wait on a database commit or lock counts as the
wall time it costs. Recordings are collapsed stacks (``*.txt``, flamegraph.pl / speedscope
compatible) in bench/results/profile/; :func:`hottest` ranks what runs under one Rekku entry point.
Profiling perturbs the run: read the ratios of an unprofiled run, the stacks of a profiled one.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: A frame in py-spy's raw output: ``function (path/to/file.py:123)``.
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]+?):\d+\)$")
#: The Rekku function each process's work hangs from: shares are relative to samples under it.
ROOTS = {"ingress": "rekku/ingest.py:Ingress.submit", "worker": "workers/runner.py:execute"}


def find_py_spy(explicit: str | None) -> str:
    # the venv's bin is not on PATH when the bench runs as .venv/bin/python (make bench)
    exe = explicit or shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not exe:
        raise SystemExit("--profile needs py-spy: `pip install py-spy` (or --py-spy PATH)")
    return exe


@dataclass
class Profiler:
    exe: str
    outdir: Path
    #: name → (recording, root function)
    recordings: dict[str, tuple[Path, str]] = field(default_factory=dict)

    @contextmanager
    def record(self, name: str, pid: int, root: str) -> Iterator[None]:
        """Sample ``pid`` and its children, idle time included, for the duration of the block."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        out = self.outdir / f"{name}.txt"
        proc = subprocess.Popen([self.exe, "record", "--pid", str(pid), "--subprocesses", "--idle", "--nonblocking",
                                 "--rate", "200", "--format", "raw", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let py-spy attach before the phase starts
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.recordings[name] = (out, root)


def _frames(stack: str) -> list[tuple[str, str]]:
    """(file, function) of each Python frame, outermost first."""
    out = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame.strip())
        if m:
            out.append((m["file"], m["func"]))
    return out


def hottest(path: Path, root: str, top: int = 8) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Under ``root`` (``file:function``): Rekku functions by inclusive share of samples, and the
    innermost frames (any module) by self share. Both as (name, percent of root's samples)."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f"{file}:{func}" for file, func in _frames(stack)]
        at = next((i for i, f in enumerate(frames) if f.endswith(root)), None)
        if at is None:
            continue
        total += int(n)
        below = frames[at:]
        for key in {f.split("site-packages/")[-1] for f in below if "rekku/" in f}:
            inclusive[key] += int(n)
        leaves[below[-1].split("site-packages/")[-1]] += int(n)
    if not total:
        return [], []

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(key, 100.0 * c / total) for key, c in counter.most_common(top)]

    return share(inclusive), share(leaves)
