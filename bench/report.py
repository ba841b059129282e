"""Turn the figures into the printed table and bench/results/latest.json.

Only ratios are judged: absolute rates on a shared 2-core machine move with whatever else runs,
while Rekku and the baselines measured side by side in the same run move together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def verdict(ratio: float, target: float, higher_is_better: bool) -> bool:
    return ratio >= target if higher_is_better else ratio <= target


def table(results: dict[str, Any]) -> Table:
    """One row per scenario: ours, plain Celery, ours/plain (judged), bare Celery with Rekku's settings,
    ours/bare (shown), the target and whether it was met."""
    t = Table(title="Rekku vs plain Celery and vs bare Celery with Rekku's settings (same run, same broker)",
              header_style="bold")
    for col, justify in (("scenario", "left"), ("ours", "right"), ("plain", "right"), ("ours/plain", "right"),
                         ("bare", "right"), ("ours/bare", "right"), ("target", "right"), ("result", "center")):
        t.add_column(col, justify=justify)
    for row in results["rows"]:
        if row["pass"] is None:
            result = "[dim]info[/dim]"
        else:
            result = "[green]PASS[/green]" if row["pass"] else "[red]FAIL[/red]"
        digits = ".3f" if row["unit"] == "ms" and row["ours"] < 1 else ",.1f"
        t.add_row(row["scenario"], f"{row['ours']:{digits}} {row['unit']}", f"{row['plain']:{digits}}",
                  f"{row['ratio']:.2f}", f"{row['bare']:{digits}}", f"{row['ratio_bare']:.2f}",
                  row["target_text"], result)
    return t


def row(scenario: str, ours: float, plain: float, bare: float, unit: str, target: float | None,
        higher_is_better: bool) -> dict[str, Any]:
    """A table row; ``ratio`` (ours/plain) is the one judged against ``target``."""
    ratio = ours / plain if plain else float("inf")
    return {
        "scenario": scenario, "ours": ours, "plain": plain, "bare": bare, "unit": unit, "ratio": ratio,
        "ratio_bare": ours / bare if bare else float("inf"), "target": target,
        "target_text": "—" if target is None else ("≥ " if higher_is_better else "≤ ") + f"{target:g}",
        "pass": None if target is None else verdict(ratio, target, higher_is_better),
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def show(results: dict[str, Any], path: Path, console: Console | None = None) -> None:
    console = console or Console()
    console.print(table(results))
    cfg = results["config"]
    console.print(f"[dim]{cfg['actions']} actions x {cfg['rounds']} rounds for (a) at 100 per request and "
                  f"(b) (a quarter as many at 5 and at 1 per request; median of rounds), "
                  f"{cfg['samples']} latency samples each; database {cfg['database']}; "
                  f"load average {results['environment']['loadavg_before']} → "
                  f"{results['environment']['loadavg_after']}; figures in {path}[/dim]")
    diag = results.get("diagnostics", {})
    if diag:
        legs = ", ".join(f"{k} {v:.1f}" for k, v in diag["ours_latency_legs_p50_ms"].items())
        console.print(f"[dim]ours, where (c) goes (p50 ms per leg): {legs}; "
                      f"(b) echo start → finish p50 {diag['ours_echo_start_to_finish_p50_ms']:.1f} ms[/dim]")
        calls = diag.get("drain_redis_calls_per_action")
        if calls:
            console.print("[dim](b) Redis commands per action (all; MULTI/EXEC, PUBLISH, BRPOP): " + "; ".join(
                f"{who} {c['all']:.1f} ({c['exec']:.2f}, {c['publish']:.2f}, {c['brpop']:.2f})"
                for who, c in calls.items()) + "[/dim]")
