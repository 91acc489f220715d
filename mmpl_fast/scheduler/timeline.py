"""Gantt timeline of a schedule (matplotlib, written atomically: a failed plot leaves no file behind)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .placement import HOST, Schedule

COLORS = {
    "start": "#4c72b0",
    "reencode": "#4c72b0",
    "plan": "#c44e52",
    "populate": "#55a868",
    "block": "#8172b2",
    "decode": "#dd8452",
    "write": "#937860",
}


def plot_timeline(schedule: Schedule, path: str | os.PathLike, *, title: str | None = None, dpi: int = 120) -> Path:
    """Write a PNG with one row per device (and one for the host writer), a bar per launch.

    Bars are coloured by task kind and labelled with the segment; the planning chain is outlined in black,
    batched launches are labelled with all their segments. A widened task (one task across several devices)
    is one hatched bar across its devices' rows (rows that are not its devices are left uncovered, the parts
    joined by a line) labelled with the segment and its width. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    rows = list(range(len(schedule.devices))) + [HOST]
    labels = [schedule.device_name(d) + f"  x{schedule.devices[d].speed:g}" for d in rows[:-1]] + ["host (writer)"]
    fig_h = 1.0 + 0.45 * len(rows)
    fig, ax = plt.subplots(figsize=(12, fig_h))
    for launch in schedule.launches():
        p0 = launch[0]
        start, end = p0.start, max(p.end for p in launch)
        chain = any(p.task.chain for p in launch)
        style = dict(facecolor=COLORS.get(p0.task.kind, "#999999"), edgecolor="black" if chain else "white",
                     linewidth=1.2 if chain else 0.4)  # fmt: skip
        runs = _runs(sorted(rows.index(d) for d in p0.all_devices))
        for lo, hi in runs:  # one rectangle per run of adjacent rows
            ax.add_patch(Rectangle((start, lo - 0.35), end - start, hi - lo + 0.7, hatch="///" if p0.split else None,
                                   **style))  # fmt: skip
        if len(runs) > 1:
            x = (start + end) / 2
            ax.plot([x, x], [runs[0][1] + 0.35, runs[-1][0] - 0.35], color="black", linewidth=0.6)
        segs = ",".join(str(p.task.segment) for p in launch)
        if p0.split is not None:
            segs += f" x{p0.split.ways}"
        if end - start > schedule.makespan / 120:
            y = (runs[0][0] + runs[0][1]) / 2
            ax.text((start + end) / 2, y, segs, ha="center", va="center", fontsize=6, color="white")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, schedule.makespan * 1.01 if schedule.makespan > 0 else 1)
    ax.set_title(title or f"{schedule.policy}: makespan {schedule.makespan:.2f} s", fontsize=10)
    kinds = [k for k in COLORS if any(p.task.kind == k for p in schedule.placements)]
    handles = [Patch(color=COLORS[k], label=k) for k in kinds]
    handles.append(Patch(facecolor="white", edgecolor="black", label="planning chain"))
    if schedule.has_splits:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="///", label="across devices (xk)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(handles), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as (first, last) runs of consecutive rows."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and r == out[-1][1] + 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out
