"""`python -m mmpl_fast.evaluate`: prompt adherence and drift of long videos of the procedural world.

For held-out scenes (scene seeds from `train.HELDOUT_SEED` on, never trained on) the model generates videos
from the scenes' captions, in mode ``mmpl`` and mode ``ar``, and each video is measured frame by frame:

* detection (`detect`): background colour = the frame's per-channel median; object pixels = pixels within
  `COLOR_TOLERANCE` of an object colour of the world's palette (40: no blend of a shape's colour with a
  background colour comes that close to a third colour, so anti-aliased edges add no phantom shapes);
  objects = connected components per colour of at least `MIN_AREA` (joined across the frame's edges, where
  the world's straight motions wrap); shape = nearest prototype in (fill of the bounding box, share of the
  pixels in its top half): circle (0.79, 0.5), square (1, 0.5), diamond (0.5, 0.5), triangle (0.5, 0.25);
* prompt adherence (`adherence`): the share of the caption's checks a frame passes: the background colour,
  and for each shape its colour (present) and its shape (of the detection of that colour); `checks` gives
  the three kinds separately (``background_ok``, ``color_found``, ``shape_ok``: where adherence is lost);
* no unprompted objects (`unprompted`, the fourth of `CHECKS`, ``no_unprompted``; not part of adherence): a
  frame passes when no detection has a colour or a shape that the caption names for none of its shapes;
* drift (`drift`) of each time window against the first segment (its first `REFERENCE_FRAMES` frames):
  background colour distance, object colour distance (RGB distance / (255 sqrt 3); a shape gone is 1),
  relative size change (a shape gone is 1) and the change in the number of shapes, relative to the count.

Ground truth (rendered world clips, 64x64, 16 held-out scenes, 60 s) scores 99.4 % adherence (background
100 %, colours found 99.9 %, shapes right 98.8 %), 98.5 % no unprompted objects (99.2 % at 128x128; every
miss is a shape of the scene read as another shape, in 57 % of them while another shape covers part of it,
most often a small triangle read as a circle; no unprompted colour is ever found) and at most 0.05 size
drift, 0.03 colour and count drift per window (occlusions, pixel rounding): the numbers measure the model,
not the detector (`--ground-truth` reruns that check; tests check a smaller one).
`--ground-truth --through-vae` measures the same clips after the model's VAE (encode, decode): what the VAE
alone lets through, a ceiling for the generator. A first segment without any detected shape gives colour /
size drift 0: read drift together with adherence.

Outputs in ``--out``: ``rows.csv`` (every video and window), ``summary.csv`` (mean per mode and window),
``summary.json`` (overall adherence and `CHECKS` per mode, drift in the last window (``end``) and averaged over
the last 10 s (``end_10s``), and the MMPL/AR ratios of both) and ``metrics.png``
(each metric of `PLOTTED` against time, one line per mode). ``--docs DIR`` copies the plot and the summary to
``DIR/eval_metrics.png`` and ``DIR/eval_summary.json``: the README's figures come from
``python -m mmpl_fast.evaluate --prompts 8 --seconds 60 --out runs/eval --docs docs``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import scenes as world

COLOR_TOLERANCE = 40.0  # RGB distance within which a pixel counts as a palette colour (see `detect`)
MIN_AREA = 0.004  # smallest object, as a fraction of min(H, W)^2 (a small triangle is ~0.013)
REFERENCE_FRAMES = 81  # the first segment (21 latent frames of a 4x temporal VAE)
END_SECONDS = 10  # "end_10s": drift averaged over the windows of the last 10 s (one window alone is noisy)
SHAPE_PROTOTYPES = {"circle": (math.pi / 4, 0.5), "square": (1.0, 0.5), "diamond": (0.5, 0.5), "triangle": (0.5, 0.25)}
METRICS = ("adherence", "background_drift", "color_drift", "size_drift", "count_drift")
CHECKS = ("background_ok", "color_found", "shape_ok", "no_unprompted")  # `checks`: adherence's parts, then
# "no unprompted objects" (not part of adherence, which stays comparable with earlier figures)
PLOTTED = ("adherence", "no_unprompted", *METRICS[1:])  # the panels of metrics.png
_TITLES = {"no_unprompted": "no unprompted objects"}
_PALETTE = np.array([world.PALETTE[c] for c in world.PALETTE], dtype=np.float32)
_NAMES = list(world.PALETTE)
_RGB_SCALE = 255 * math.sqrt(3)


@dataclass(frozen=True)
class Detection:
    """One shape in one frame: palette colour, mean RGB, shape, area (fraction of ``min(H, W)^2``), centre."""

    color: str
    rgb: tuple[float, float, float]
    shape: str
    area: float
    center: tuple[float, float]


@dataclass(frozen=True)
class FrameReport:
    """What `detect` sees in one frame."""

    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[Detection, ...]

    def find(self, color: str) -> Detection | None:
        """The largest detection of `color` (None if absent)."""
        found = [o for o in self.objects if o.color == color]
        return max(found, key=lambda o: o.area) if found else None


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components of a bool ``[H, W]`` mask on the torus, as ``[n, 2]`` (y, x) pixel arrays."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    parent = list(range(count + 1))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in ((labels[:, 0], labels[:, -1]), (labels[0, :], labels[-1, :])):  # join across the edges
        for i, j in zip(a.tolist(), b.tolist()):
            if i and j:
                parent[root(i)] = root(j)
    ys, xs = np.nonzero(labels)
    roots = np.array([root(int(v)) for v in range(count + 1)])[labels[ys, xs]]
    return [np.stack([ys[roots == r], xs[roots == r]], 1) for r in np.unique(roots)]


def _span(coords: np.ndarray, size: int) -> tuple[int, int]:
    """(start, length) of the shortest circular interval holding every coordinate."""
    occupied = np.unique(coords)
    gaps = np.diff(np.concatenate([occupied, occupied[:1] + size])) - 1
    k = int(np.argmax(gaps))
    return int(occupied[(k + 1) % len(occupied)]), int(size - gaps[k])


def classify_shape(pixels: np.ndarray, height: int, width: int) -> str:
    """Shape of one component (``[n, 2]`` (y, x) pixels) by its fill and top-half share (see the module doc)."""
    y0, h = _span(pixels[:, 0], height)
    _, w = _span(pixels[:, 1], width)
    fill = len(pixels) / (h * w)
    top = float((((pixels[:, 0] - y0) % height) < h / 2).mean())
    return min(
        SHAPE_PROTOTYPES, key=lambda s: (fill - SHAPE_PROTOTYPES[s][0]) ** 2 + (top - SHAPE_PROTOTYPES[s][1]) ** 2
    )


def detect(frame: np.ndarray) -> FrameReport:
    """Background and shapes of one uint8 (or [0, 1] float) ``[H, W, 3]`` frame."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame: expected [H, W, 3], got shape {frame.shape}")
    rgb = frame.astype(np.float32) * (255.0 if frame.dtype.kind == "f" else 1.0)
    height, width = rgb.shape[:2]
    bg_rgb = np.median(rgb.reshape(-1, 3), axis=0)
    background = _nearest(bg_rgb)
    dist = np.sqrt(((rgb[:, :, None, :] - _PALETTE) ** 2).sum(-1))  # [H, W, colours]
    nearest = dist.argmin(-1)
    close = dist.min(-1) < COLOR_TOLERANCE
    unit = min(height, width) ** 2
    objects = []
    for c, name in enumerate(_NAMES):
        if name not in world.OBJECT_COLORS or name == background:
            continue
        mask = close & (nearest == c)
        if mask.sum() < MIN_AREA * unit:
            continue
        for px in _components(mask):
            if len(px) < MIN_AREA * unit:
                continue
            y0, h = _span(px[:, 0], height)
            x0, w = _span(px[:, 1], width)
            objects.append(Detection(
                color=name, rgb=tuple(rgb[px[:, 0], px[:, 1]].mean(0).tolist()),
                shape=classify_shape(px, height, width), area=len(px) / unit,
                center=(((x0 + w / 2) % width) / width, ((y0 + h / 2) % height) / height),
            ))  # fmt: skip
    return FrameReport(background, tuple(bg_rgb.tolist()), tuple(objects))


def _passed(report: FrameReport, prompt: str) -> tuple[bool, list[bool], list[bool]]:
    """(background right, each shape's colour found, each shape's shape right) for one frame."""
    background, expected = world.parse_caption(prompt)
    found = [report.find(obj["color"]) for obj in expected]
    shaped = [d is not None and d.shape == obj["shape"] for d, obj in zip(found, expected)]
    return report.background == background, [d is not None for d in found], shaped


def adherence(report: FrameReport, prompt: str) -> float:
    """Share of the caption's checks the frame passes: background colour, each shape's colour and shape."""
    background, found, shaped = _passed(report, prompt)
    return (background + sum(found) + sum(shaped)) / (1 + len(found) + len(shaped))


def unprompted(report: FrameReport, prompt: str) -> list[Detection]:
    """The detections whose colour or whose shape the caption names for none of its shapes."""
    _, expected = world.parse_caption(prompt)
    colors, shapes = {o["color"] for o in expected}, {o["shape"] for o in expected}
    return [d for d in report.objects if d.color not in colors or d.shape not in shapes]


def checks(report: FrameReport, prompt: str) -> dict[str, float]:
    """`CHECKS` for one frame: background right (0 / 1), the shares of the caption's shapes whose colour is
    found and whose shape is right (adherence's parts), and no unprompted object (0 / 1: no detection of a
    colour or a shape the caption does not name, `unprompted`)."""
    background, found, shaped = _passed(report, prompt)
    return {
        "background_ok": float(background),
        "color_found": float(np.mean(found)),
        "shape_ok": float(np.mean(shaped)),
        "no_unprompted": float(not unprompted(report, prompt)),
    }


@dataclass(frozen=True)
class Summary:
    """Median state of a run of frames: background RGB, shape count, and per colour its RGB and area."""

    background_rgb: np.ndarray
    count: float
    objects: dict[str, tuple[np.ndarray, float]]


def summarize(reports: Sequence[FrameReport]) -> Summary:
    """Medians over frames (robust to a few frames of occlusion); a colour counts if seen in half the frames."""
    if not reports:
        raise ValueError("reports: need at least one frame")
    bg = np.median([r.background_rgb for r in reports], axis=0)
    count = float(np.median([len(r.objects) for r in reports]))
    objects = {}
    for color in {o.color for r in reports for o in r.objects}:
        seen = [d for d in (r.find(color) for r in reports) if d is not None]
        if len(seen) * 2 >= len(reports):
            objects[color] = (np.median([d.rgb for d in seen], axis=0), float(np.median([d.area for d in seen])))
    return Summary(bg, count, objects)


def drift(summary: Summary, reference: Summary) -> dict[str, float]:
    """Background colour, object colour, size and count drift of `summary` against `reference` (0 = none)."""
    color, size = [], []
    for name, (rgb0, area0) in reference.objects.items():
        now = summary.objects.get(name)
        color.append(1.0 if now is None else float(np.linalg.norm(now[0] - rgb0)) / _RGB_SCALE)
        size.append(1.0 if now is None else abs(now[1] - area0) / area0)
    return {
        "background_drift": float(np.linalg.norm(summary.background_rgb - reference.background_rgb)) / _RGB_SCALE,
        "color_drift": float(np.mean(color)) if color else 0.0,
        "size_drift": float(np.mean(size)) if size else 0.0,
        "count_drift": abs(summary.count - reference.count) / max(reference.count, 1.0),
    }


def video_metrics(
    frames: np.ndarray, prompt: str, *, fps: float = world.FPS, window: int = 16, stride: int = 2
) -> list[dict[str, float]]:
    """Metrics of one video (uint8 or [0, 1] float ``[T, H, W, 3]``) per window of `window` frames.

    Every `stride`-th frame is measured. Returns one row per window: ``time`` (seconds at the window's
    start), `METRICS` and `CHECKS`; drift is against the first `REFERENCE_FRAMES` frames.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected [T, H, W, 3], got shape {frames.shape}")
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    world.parse_caption(prompt)  # ValueError early for a prompt outside the world's grammar
    index = list(range(0, len(frames), stride))
    reports = dict(zip(index, (detect(frames[i]) for i in index)))
    reference = summarize([reports[i] for i in index if i < REFERENCE_FRAMES])
    rows = []
    for start in range(0, len(frames), window):
        part = [reports[i] for i in index if start <= i < start + window]
        if not part:
            continue
        row = {"time": start / fps, "adherence": float(np.mean([adherence(r, prompt) for r in part]))}
        row.update(drift(summarize(part), reference))
        parts = [checks(r, prompt) for r in part]
        row.update({c: float(np.mean([p[c] for p in parts])) for c in CHECKS})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmpl_fast.evaluate",
        description="Prompt adherence and drift over time of long world videos, in mode mmpl and mode ar.",
        epilog="example: python -m mmpl_fast.evaluate --model runs/tiny/pipeline --prompts 8 --seconds 60",
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--ground-truth", action="store_true", help="measure rendered world clips instead (a check)")
    p.add_argument("--through-vae", action="store_true",
                   help="with --ground-truth: clips pass through the model's VAE first (its ceiling)")  # fmt: skip
    p.add_argument("--modes", default="mmpl,ar", help="comma-separated generation modes (default %(default)s)")
    p.add_argument("--prompts", type=int, default=8, help="held-out scenes (default %(default)s)")
    p.add_argument("--training-scenes", action="store_true",
                   help="measure the first training scenes, not held-out ones (the generalisation gap)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=1, help="generation seeds per scene (default %(default)s)")
    p.add_argument("--seconds", type=float, default=60.0, help="video length (default %(default)s)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    p.add_argument("--window", type=int, default=16, help="frames per measured window (default %(default)s)")
    p.add_argument("--out", default="eval", help="output folder (default %(default)s)")
    p.add_argument("--docs", default=None, metavar="DIR",
                   help="also copy the plot and the summary to DIR/eval_metrics.png and DIR/eval_summary.json "
                   "(the README's figures: --docs docs)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _videos(args, modes):
    """(mode, scene, seed, frames [T, H, W, 3], prompt) for every video to measure."""
    from .train import HELDOUT_SEED

    first = 0 if args.training_scenes else HELDOUT_SEED
    num_frames = round(args.seconds * world.FPS) + 1
    pipe = None
    if not args.ground_truth or args.through_vae:
        from ..generate import load_pipeline

        pipe = load_pipeline(args.model, None, "cpu")
    height = args.height or (pipe.default_size[0] if pipe else 64)
    width = args.width or (pipe.default_size[1] if pipe else 64)
    for k in range(args.prompts):
        scene = world.sample_scene(first + k)
        prompt = world.caption(scene)
        for seed in range(args.seeds):
            for mode in modes:
                if args.ground_truth:
                    frames = world.render(scene, num_frames, height, width)
                    if args.through_vae:
                        frames = _through_vae(pipe.vae, frames)
                else:
                    frames = pipe(prompt=prompt, num_frames=num_frames, height=height, width=width, mode=mode,
                                  seed=seed, progress=not args.quiet).frames[0]  # fmt: skip
                yield mode, first + k, seed, frames, prompt


def _through_vae(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames -> the same after the VAE's encode and decode (float, [0, 1])."""
    import torch

    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    return ((vae.decode(vae.encode(video))[0].permute(1, 2, 3, 0).cpu() + 1) / 2).clamp(0, 1).numpy()


def write_outputs(rows: list[dict], out: Path, title: str | None = None) -> dict:
    """rows.csv, summary.csv, summary.json and metrics.png (titled `title`) from per-window rows (with mode,
    scene, seed)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["mode", "scene", "seed", "time", *METRICS, *CHECKS]
    with open(out / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows({k: r[k] for k in keys} for r in rows)
    modes = sorted({r["mode"] for r in rows})
    table = {}
    for mode in modes:
        for t in sorted({r["time"] for r in rows if r["mode"] == mode}):
            sel = [r for r in rows if r["mode"] == mode and r["time"] == t]
            table[(mode, t)] = {m: float(np.mean([r[m] for r in sel])) for m in (*METRICS, *CHECKS)}
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "time", *METRICS, *CHECKS])
        for (mode, t), v in table.items():
            w.writerow([mode, t, *(f"{v[m]:.4f}" for m in (*METRICS, *CHECKS))])
    summary: dict = {}
    drifts = [m for m in METRICS if m != "adherence"]
    for mode in modes:
        times = sorted(t for m, t in table if m == mode)
        end = table[(mode, times[-1])]
        tail = [t for t in times if t >= times[-1] - END_SECONDS]
        summary[mode] = {
            "adherence": float(np.mean([table[(mode, t)]["adherence"] for t in times])),
            "checks": {c: float(np.mean([table[(mode, t)][c] for t in times])) for c in CHECKS},
            "end": {m: end[m] for m in drifts},
            "end_10s": {m: float(np.mean([table[(mode, t)][m] for t in tail])) for m in drifts},
        }
    if {"mmpl", "ar"} <= set(summary):
        for key in ("end", "end_10s"):
            summary[f"mmpl_over_ar_{key}_drift"] = {
                m: summary["mmpl"][key][m] / summary["ar"][key][m] if summary["ar"][key][m] else None for m in drifts
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(table, modes, out / "metrics.png", title)
    return summary


def _plot(table: dict, modes: list[str], path: Path, title: str | None = None) -> None:
    """One panel per metric of `PLOTTED` against time, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(3.6 * len(PLOTTED), 3.2), constrained_layout=True)
    for ax, metric in zip(axes, PLOTTED):
        for mode in modes:
            times = sorted(t for m, t in table if m == mode)
            ax.plot(times, [table[(mode, t)][metric] for t in times], label=mode)
        ax.set_title(_TITLES.get(metric, metric.replace("_", " ")))
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or any(m not in ("mmpl", "ar") for m in modes):
            raise ValueError(f"--modes must list mmpl and/or ar, got {args.modes!r}")
        for name in ("prompts", "seeds", "window"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
        if not args.seconds > 0:
            raise ValueError(f"--seconds must be > 0, got {args.seconds}")
        if args.through_vae and not args.ground_truth:
            raise ValueError("--through-vae measures rendered clips: it needs --ground-truth")
        docs = _check_docs(args.docs)
        rows = []
        for mode, scene, seed, frames, prompt in _videos(args, modes):
            for r in video_metrics(frames, prompt, window=args.window):
                rows.append({"mode": mode, "scene": scene, "seed": seed, **r})
        out = Path(args.out)
        summary = write_outputs(rows, out, _title(args))
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps(summary, indent=1))
    if docs is not None:
        for name in ("metrics.png", "summary.json"):
            shutil.copyfile(out / name, docs / f"eval_{name}")
        print(f"wrote {docs / 'eval_metrics.png'} and {docs / 'eval_summary.json'}")
    return 0


def _check_docs(path: str | None) -> Path | None:
    """--docs: an existing, writable folder (checked before any video is made)."""
    if path is None:
        return None
    docs = Path(path)
    if not docs.is_dir():
        raise ValueError(f"--docs {docs}: {'not a folder' if docs.exists() else 'folder does not exist'}")
    if not os.access(docs, os.W_OK):
        raise ValueError(f"--docs {docs}: not writable")
    return docs


def _title(args) -> str:
    """What the plot shows, in one line."""
    what = "rendered world" + (" through the VAE" if args.through_vae else "") if args.ground_truth else "generated"
    model = "" if args.ground_truth and not args.through_vae else f", model {args.model or 'embedded'}"
    seeds = f"{args.seeds} seed{'s' if args.seeds != 1 else ''}"
    scenes = "training" if args.training_scenes else "held-out"
    return f"{what}: {args.prompts} {scenes} scenes x {seeds}, {args.seconds:g} s{model}"


if __name__ == "__main__":
    sys.exit(main())
