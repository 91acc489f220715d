"""Benchmark helpers shared by every file in benchmarks/.

Speed is reported as ratios against a baseline measured in the same run, with absolute numbers and the
device name. `record` stores a measurement; at the end of the session a table per group is printed and
written to ``benchmarks/results/latest.md`` (and ``.json``) so README figures can be copied from a real run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

_RESULTS: list[dict] = []


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()} ({torch.get_num_threads()} threads)"


def cuda_required():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only benchmark: no CUDA device here")


def median_seconds(benchmark) -> float:
    """Median of a finished pytest-benchmark run (None when benchmarks are disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return float("nan")
    return float(stats.stats.median)


def record(group: str, name: str, seconds: float, *, baseline: str | None = None, device: str = "cpu", **extra):
    """Store one measurement. `baseline` names the row of the same group the ratio is taken against."""
    _RESULTS.append(
        {"group": group, "name": name, "seconds": seconds, "baseline": baseline, "device": device_name(device), **extra}
    )


def time_it(fn, *, warmup: int = 1, repeat: int = 5, sync=None) -> float:
    """Median wall time of fn() after warm-up (for benchmarks that time several callables in one test)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _table() -> str:
    lines = []
    groups: dict[str, list[dict]] = {}
    for r in _RESULTS:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        by_name = {r["name"]: r for r in rows}
        extra_keys = sorted({k for r in rows for k in r} - {"group", "name", "seconds", "baseline", "device"})
        lines.append(f"\n### {group} ({rows[0]['device']})\n")
        lines.append("| case | median ms | ratio vs baseline | " + " | ".join(extra_keys) + " |")
        lines.append("|---|---|---|" + "---|" * len(extra_keys))
        for r in rows:
            base = by_name.get(r["baseline"]) if r["baseline"] else None
            ratio = f"{base['seconds'] / r['seconds']:.2f}x vs {base['name']}" if base else "-"
            extras = " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in extra_keys)
            lines.append(f"| {r['name']} | {r['seconds'] * 1e3:.2f} | {ratio} | {extras} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    text = _table()
    terminalreporter.write_sep("=", "mmpl_fast benchmark figures")
    terminalreporter.write_line(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "latest.md").write_text(f"Measured {stamp}\n{text}\n")
    (out / "latest.json").write_text(json.dumps({"date": stamp, "results": _RESULTS}, indent=1))
