"""A procedural video world: one to three coloured shapes moving over a plain background, with captions.

Used to train the embedded tiny model and to evaluate it. Everything is a pure function of a seed:
`sample_scene(seed)` draws a `Scene`, `caption(scene)` says it in words the tiny tokenizer knows, and
`render(scene, num_frames, height, width, start=...)` draws any window of frames, computing frame t directly
from t (closed-form motions), so a minute at 16 fps costs the same per frame as the first second and any
window equals the same frames of a longer render.

Geometry is resolution independent: sizes, orbit radii and speeds are in units of ``min(height, width)``
("u"), start positions are fractions of the frame, so one scene renders at any size and aspect ratio.

Motions (all stay valid for any length of video):

* ``straight``: constant velocity left, right, up or down; the frame **wraps** (a torus), so the shape keeps
  its direction forever, leaving through one edge while re-entering through the opposite one (its area on
  screen is constant);
* ``bouncing``: a diagonal constant velocity **reflected** at the frame edges (a triangle wave per axis), the
  shape always fully inside the frame;
* ``circling``: a periodic orbit around a centre, always fully inside the frame.

Shapes are drawn axis-aligned (no rotation) with anti-aliased edges (coverage from a signed distance), in
list order (later shapes in front). Every shape of a scene has its own colour, different from the
background's, so colour alone identifies a shape in a frame (`evaluate` relies on that).

Caption grammar (one clause per shape, joined with "and")::

    a <size> <colour> <shape> <motion> [and a ...] on a <colour> background
    motion: "bouncing" | "circling" | "moving left" | "moving right" | "moving up" | "moving down"
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

FPS = 16  # frames per second of world videos (Wan2.1's rate)

#: Colour names and their sRGB values (pairwise distances >= ~100, so a nearest-colour match is robust).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 130, 10),
    "yellow": (245, 235, 30),
    "green": (40, 180, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 230),
    "purple": (130, 50, 200),
    "pink": (250, 130, 190),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 75, 35),
}
BACKGROUND_COLORS = ("black", "gray", "white", "brown")
OBJECT_COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond")
#: Size word -> radius in u (a circle's radius; other shapes are scaled to look about as large).
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}
MOTIONS = ("straight", "bouncing", "circling")
DIRECTIONS = ("left", "right", "up", "down")
_DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
#: Half-extent of each shape in units of its radius (how far its pixels reach from its centre).
_EXTENT = {"circle": 1.0, "square": 0.9, "triangle": 1.25, "diamond": 1.2}


@dataclass(frozen=True)
class Motion:
    """How a shape moves. Positions are fractions of the frame; lengths in u (``min(H, W)``), time in seconds.

    Attributes:
        kind: ``straight``, ``bouncing`` or ``circling``.
        x, y: start position (straight, bouncing) or orbit centre (circling) as fractions of width / height;
            a position the shape cannot take at some aspect ratio is moved to the nearest one that it can.
        direction: straight only: ``left``, ``right``, ``up`` or ``down``.
        speed: u per second (straight, bouncing).
        angle: bouncing only: direction of the start velocity in radians (image axes, y down).
        radius: circling only: orbit radius in u.
        period: circling only: seconds per turn (negative: clockwise on screen).
        phase: circling only: start angle in radians.
    """

    kind: str
    x: float
    y: float
    direction: str = ""
    speed: float = 0.0
    angle: float = 0.0
    radius: float = 0.0
    period: float = 0.0
    phase: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in MOTIONS:
            raise ValueError(f"Motion.kind: {self.kind!r} is not one of {', '.join(MOTIONS)}")
        if self.kind == "straight" and self.direction not in DIRECTIONS:
            raise ValueError(f"Motion.direction: {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if self.kind == "circling" and (self.period == 0 or self.radius <= 0):
            raise ValueError("Motion: circling needs a non-zero period and a positive radius")

    @property
    def words(self) -> str:
        """The motion as caption words."""
        return f"moving {self.direction}" if self.kind == "straight" else self.kind


@dataclass(frozen=True)
class SceneObject:
    """One shape: `shape` in `SHAPES`, `color` in `PALETTE`, `size` in `SIZES`, and its `motion`."""

    shape: str
    color: str
    size: str
    motion: Motion

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, PALETTE),
                                     ("size", self.size, SIZES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"SceneObject.{name}: {value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.motion, Motion):
            raise TypeError(f"SceneObject.motion: expected a Motion, got {type(self.motion).__name__}")

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def extent(self) -> float:
        """How far the shape's pixels reach from its centre, in u."""
        return SIZES[self.size] * _EXTENT[self.shape]


@dataclass(frozen=True)
class Scene:
    """A background colour and one or more shapes (drawn in order: later ones in front)."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in PALETTE:
            raise ValueError(f"Scene.background: {self.background!r} is not one of {', '.join(PALETTE)}")
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("Scene.objects: a scene needs at least one shape")
        colors = [o.color for o in self.objects]
        if len(set(colors)) != len(colors) or self.background in colors:
            raise ValueError(f"Scene: shape colours {colors} must differ from each other and from the background")

    @property
    def caption(self) -> str:
        return caption(self)


# ----------------------------------------------------------------------------------------------- sampling
def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected a non-negative int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed}")
    return int(seed)


def sample_scene(seed: int, *, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """A random scene, the same for the same seed (numpy PCG64 keyed by the seed alone).

    Shape colours are distinct and differ from the background; start positions are spread apart (centres at
    least 0.3 of the frame apart where possible) so the first frames rarely overlap.
    """
    seed = _check_seed(seed)
    for name, value in (("min_objects", min_objects), ("max_objects", max_objects)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3:
            raise ValueError(f"{name}: expected an int in 1..3, got {value!r}")
    if min_objects > max_objects:
        raise ValueError(f"min_objects={min_objects} is larger than max_objects={max_objects}")
    rng = np.random.default_rng([seed, 0x3D])
    background = str(rng.choice(BACKGROUND_COLORS))
    count = int(rng.integers(min_objects, max_objects + 1))
    colors = rng.choice([c for c in OBJECT_COLORS if c != background], size=count, replace=False)
    starts: list[tuple[float, float]] = []
    objects = []
    for color in colors:
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(tuple(SIZES)))
        for _ in range(20):  # spread the start positions
            x, y = (float(v) for v in rng.uniform(0.2, 0.8, size=2))
            if all(math.hypot(x - a, y - b) >= 0.3 for a, b in starts):
                break
        starts.append((x, y))
        kind = str(rng.choice(MOTIONS))
        if kind == "straight":
            motion = Motion(kind, x, y, direction=str(rng.choice(DIRECTIONS)), speed=float(rng.uniform(0.08, 0.2)))
        elif kind == "bouncing":
            # a clearly diagonal direction: 20..70 degrees off an axis, in any quadrant
            angle = float(rng.uniform(math.radians(20), math.radians(70)) + rng.integers(0, 4) * math.pi / 2)
            motion = Motion(kind, x, y, speed=float(rng.uniform(0.12, 0.3)), angle=angle)
        else:
            period = float(rng.uniform(3.0, 8.0)) * (1 if rng.random() < 0.5 else -1)
            motion = Motion(kind, x, y, radius=float(rng.uniform(0.1, 0.22)), period=period,
                            phase=float(rng.uniform(0, 2 * math.pi)))  # fmt: skip
        objects.append(SceneObject(shape, str(color), size, motion))
    objects.sort(key=lambda o: -SIZES[o.size])  # large shapes behind small ones: none hides another for long
    return Scene(background, tuple(objects))


# ------------------------------------------------------------------------------------------------ captions
def caption(scene: Scene) -> str:
    """The scene in words (see the module docstring for the grammar)."""
    clauses = [f"a {o.size} {o.color} {o.shape} {o.motion.words}" for o in scene.objects]
    return " and ".join(clauses) + f" on a {scene.background} background"


def parse_caption(text: str) -> tuple[str, list[dict[str, str]]]:
    """Invert `caption`: ``(background, [{"size", "color", "shape", "motion"}, ...])``.

    Raises ValueError for text that does not follow the grammar.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    body, sep, tail = text.strip().lower().rpartition(" on a ")
    bg = tail.split()
    if not sep or len(bg) != 2 or bg[1] != "background" or bg[0] not in PALETTE:
        raise ValueError(f"caption {text!r}: expected it to end with 'on a <colour> background'")
    objects = []
    for clause in body.split(" and "):
        w = clause.split()
        ok = len(w) >= 5 and w[0] == "a" and w[1] in SIZES and w[2] in PALETTE and w[3] in SHAPES
        motion = " ".join(w[4:])
        if not ok or motion not in ("bouncing", "circling", *(f"moving {d}" for d in DIRECTIONS)):
            raise ValueError(f"caption {text!r}: clause {clause!r} is not 'a <size> <colour> <shape> <motion>'")
        objects.append({"size": w[1], "color": w[2], "shape": w[3], "motion": motion})
    return bg[0], objects


# ---------------------------------------------------------------------------------------------- rendering
def _triangle_wave(s: np.ndarray, length: float) -> np.ndarray:
    """0 -> length -> 0 with period 2 * length (reflection between two walls)."""
    if length <= 0:
        return np.zeros_like(s)
    return length - np.abs(np.mod(s, 2 * length) - length)


def positions(obj: SceneObject, times: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre of `obj` at `times` (seconds) in u, for a frame of ``aspect = width / height``.

    The frame spans ``[0, A] x [0, B]`` u with ``(A, B) = (aspect, 1)`` or ``(1, 1 / aspect)``.
    """
    a, b = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
    m, e = obj.motion, obj.extent
    t = np.asarray(times, dtype=np.float64)
    if m.kind == "straight":
        dx, dy = _DIRECTION_VECTORS[m.direction]
        return np.mod(m.x * a + dx * m.speed * t, a), np.mod(m.y * b + dy * m.speed * t, b)
    if m.kind == "bouncing":
        out = []
        for start, v, size in ((m.x * a, math.cos(m.angle) * m.speed, a), (m.y * b, math.sin(m.angle) * m.speed, b)):
            lo, hi = e, max(e, size - e)
            out.append(lo + _triangle_wave(min(max(start, lo), hi) - lo + v * t, hi - lo))
        return out[0], out[1]
    # circling: the centre is moved inside the frame so the whole orbit is (if the frame allows it)
    reach = e + m.radius
    cx = min(max(m.x * a, reach), a - reach) if a > 2 * reach else a / 2
    cy = min(max(m.y * b, reach), b - reach) if b > 2 * reach else b / 2
    ang = m.phase + 2 * math.pi * t / m.period
    return cx + m.radius * np.cos(ang), cy + m.radius * np.sin(ang)


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside) of an axis-aligned shape of radius r at offset (dx, dy), y down."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - _EXTENT["square"] * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - _EXTENT["diamond"] * r) / math.sqrt(2)
    # equilateral triangle pointing up, circumradius R: three half-planes at distance R / 2 from the centre
    big = _EXTENT["triangle"] * r
    s3 = math.sqrt(3) / 2
    return np.maximum(np.maximum(dy, s3 * dx - 0.5 * dy), -s3 * dx - 0.5 * dy) - big / 2


def _check_dims(num_frames, height, width, start, fps) -> None:
    for name, value, low in (("num_frames", num_frames, 1), ("height", height, 1), ("width", width, 1),
                             ("start", start, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not fps > 0:
        raise ValueError(f"fps: expected a number > 0, got {fps!r}")


def render(
    scene: Scene,
    num_frames: int,
    height: int,
    width: int,
    *,
    start: int = 0,
    fps: float = FPS,
    antialias: bool = True,
    chunk: int = 128,
) -> np.ndarray:
    """Frames ``start .. start + num_frames - 1`` of `scene` as uint8 ``[T, H, W, 3]``.

    Frame t shows the scene at ``t / fps`` seconds; each frame is computed from its own time only, so any
    window equals the same frames of a longer render. `chunk` frames are drawn at once (memory bound).
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a Scene, got {type(scene).__name__}")
    _check_dims(num_frames, height, width, start, fps)
    unit = min(height, width)  # pixels per u
    aspect = width / height
    px = (np.arange(width, dtype=np.float64) + 0.5) / unit  # pixel centres in u
    py = (np.arange(height, dtype=np.float64) + 0.5) / unit
    span_x, span_y = width / unit, height / unit
    bg = np.asarray(PALETTE[scene.background], dtype=np.float64)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for c0 in range(0, num_frames, chunk):
        n = min(chunk, num_frames - c0)
        times = (start + c0 + np.arange(n)) / fps
        img = np.broadcast_to(bg, (n, height, width, 3)).copy()
        for obj in scene.objects:
            cx, cy = positions(obj, times, aspect)
            # offsets on the torus (only straight motions come near an edge; for them this draws the wrap)
            dx = np.mod(px[None, None, :] - cx[:, None, None] + span_x / 2, span_x) - span_x / 2
            dy = np.mod(py[None, :, None] - cy[:, None, None] + span_y / 2, span_y) - span_y / 2
            d = _sdf(obj.shape, dx, dy, obj.radius) * unit  # pixels
            alpha = np.clip(0.5 - d, 0.0, 1.0) if antialias else (d <= 0).astype(np.float64)
            alpha = alpha[..., None]
            img = img * (1 - alpha) + alpha * np.asarray(PALETTE[obj.color], dtype=np.float64)
        out[c0 : c0 + n] = np.rint(img).astype(np.uint8)
    return out


def clip(
    seed: int, num_frames: int, height: int, width: int, *, start: int | None = None, fps: float = FPS
) -> tuple[np.ndarray, str]:
    """A training / evaluation clip: ``(frames uint8 [T, H, W, 3], caption)`` of scene `seed`.

    `start` (frames) defaults to a seed-keyed random time in the first minute, so clips of one scene show
    its shapes in different places.
    """
    scene = sample_scene(seed)
    if start is None:
        start = int(np.random.default_rng([_check_seed(seed), 0x5A]).integers(0, int(60 * fps)))
    return render(scene, num_frames, height, width, start=start, fps=fps), caption(scene)
