"""Contact sheets: a video as one PNG strip of evenly spaced frames, each labelled with its time.

People look at a strip faster than they open an mp4: ``python -m mmpl_fast.generate ... --preview PATH.png``
writes one next to the video, and ``docs/make_strips.py`` makes the README's.

Layout (all in pixels; `sheet_size` computes it): an optional title band of `TITLE_HEIGHT`, then `count` tiles
side by side, `GAP` apart and from the edges, each a frame scaled up by the smallest whole factor that makes it
at least `min_width` wide (nearest neighbour: the pixels stay the model's), with its time (``"2.5 s"``) in a
band of `LABEL_HEIGHT` under it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .pipeline import FPS

GAP = 4
LABEL_HEIGHT = 18
TITLE_HEIGHT = 22
BACKGROUND = (48, 48, 48)  # dark gray: apart from every background colour of the world
INK = (235, 235, 235)


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame indices evenly spaced over ``0 .. total - 1``, first and last included (fewer if the
    video is shorter)."""
    for name, v in (("total", total), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    n = min(count, total)
    return [round(i * (total - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]


def sheet_size(count: int, height: int, width: int, *, min_width: int = 128, title: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of `count` frames of ``height x width``."""
    scale = max(1, math.ceil(min_width / width))
    return (count * width * scale + (count + 1) * GAP,
            (TITLE_HEIGHT if title else 0) + GAP + height * scale + LABEL_HEIGHT)  # fmt: skip


def contact_sheet(
    frames, path, count: int = 10, fps: float = FPS, min_width: int = 128, title: str | None = None
) -> Path:
    """Write a PNG strip of `count` frames of `frames` evenly spaced over the video (first and last included),
    each labelled with its time in seconds at `fps`.

    Args:
        frames: the video, ``[T, H, W, 3]``: uint8, or floats in [0, 1].
        path: the .png to write (its folder must exist).
        min_width: each frame is scaled up by a whole factor to at least this many pixels wide.
        title: a line above the frames (e.g. the prompt), or None.

    Returns the path written.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames: expected [T, H, W, 3] with T >= 1, got shape {frames.shape}")
    picked = {i: frames[i] for i in frame_indices(len(frames), count)}
    return write_sheet(picked, path, fps=fps, min_width=min_width, title=title)


def write_sheet(
    picked: Mapping[int, np.ndarray], path, *, fps: float = FPS, min_width: int = 128, title: str | None = None
) -> Path:
    """Write the sheet of already picked frames: ``{frame index: [H, W, 3] frame}`` (see `contact_sheet`)."""
    from PIL import Image, ImageDraw, ImageFont

    if not picked:
        raise ValueError("picked: no frames")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps: expected a finite number > 0, got {fps!r}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path {path}: a contact sheet is a .png")
    tiles = {i: _uint8(f) for i, f in sorted(picked.items())}
    height, width = next(iter(tiles.values())).shape[:2]
    if any(t.shape != (height, width, 3) for t in tiles.values()):
        raise ValueError("picked: frames of different shapes")
    scale = max(1, math.ceil(min_width / width))
    size = sheet_size(len(tiles), height, width, min_width=min_width, title=title is not None)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    top = TITLE_HEIGHT if title is not None else 0
    if title is not None:
        draw.text((GAP, TITLE_HEIGHT // 2 + 1), _fit(draw, title, font, size[0] - 2 * GAP), fill=INK, font=font,
                  anchor="lm")  # fmt: skip
    for k, (index, tile) in enumerate(tiles.items()):
        x = GAP + k * (width * scale + GAP)
        image = Image.fromarray(tile).resize((width * scale, height * scale), Image.NEAREST)
        sheet.paste(image, (x, top + GAP))
        label = f"{index / fps:.1f} s"
        draw.text((x + width * scale // 2, top + GAP + height * scale + LABEL_HEIGHT // 2), label, fill=INK,
                  font=font, anchor="mm")  # fmt: skip
    tmp = path.with_name(f".{path.stem}.partial.png")
    try:
        sheet.save(tmp, format="PNG", optimize=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _uint8(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame: expected [H, W, 3], got shape {frame.shape}")
    if frame.dtype.kind == "f":
        return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    return frame.astype(np.uint8)


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
