"""Layouts: the stages of one segment, as data.

A stage is the set of latent frames denoised together, plus the frames (produced by earlier stages) it
may attend to. MMPL, plain autoregressive generation and the ablations are all layouts, and one engine
runs any of them. The same object decides visibility at inference (page lists) and in training (the
teacher-forcing mask), so the two cannot disagree.

MMPL text-to-video as released (segment of 21 latent frames)::

    stage 0  start     0 1                       (noise, or re-encoded from the previous segment)
    stage 1  plan      2 3 | 10 11 12 | 19 20    reads 0 1
    stage 2  populate  4..9                      reads 0..3, 10..12        (not 19, 20)
    stage 3  populate  13..18                    reads 0..12, 19, 20
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

ROLES = ("start", "plan", "populate", "block")


def _frame_tuple(value, what: str) -> tuple[int, ...]:
    """`value` as a tuple of ints (lists, ranges, numpy / torch integers accepted; bools and floats are not)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{what}: expected a sequence of frame indices (ints), got {type(value).__name__}")
    out = []
    for f in value:
        if isinstance(f, bool):
            raise TypeError(f"{what}: frame indices must be ints, got the bool {f!r}")
        try:
            out.append(operator.index(f))
        except TypeError:
            raise TypeError(f"{what}: frame indices must be ints, got {f!r} ({type(f).__name__})") from None
    return tuple(out)


@dataclass(frozen=True)
class Stage:
    """Frames denoised together (`frames`) and the earlier frames they attend to (`reads`).

    `frames` and `reads` accept any sequence of ints and are stored as tuples; ranges are checked against a
    layout's `num_frames` by `validate`.
    """

    frames: tuple[int, ...]
    reads: tuple[int, ...] = ()
    role: str = "block"

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", _frame_tuple(self.frames, "Stage.frames"))
        object.__setattr__(self, "reads", _frame_tuple(self.reads, "Stage.reads"))
        if not isinstance(self.role, str):
            raise TypeError(f"Stage.role: expected one of {ROLES}, got {type(self.role).__name__}")

    @property
    def visible(self) -> tuple[int, ...]:
        """Frames this stage's tokens attend to: its reads, then itself (bidirectional inside)."""
        return self.reads + self.frames


@dataclass(frozen=True)
class Layout:
    """An ordered, validated list of stages covering frames ``0..num_frames-1`` exactly once.

    Attributes:
        name: a label.
        num_frames: latent frames per segment.
        stages: the stages in execution order.
        handoff: frames of this segment that start the next one, per chain mode (``"terminal"``,
            ``"middle"``); empty for layouts that do not chain.
        start_frames: how many leading frames a chained segment takes from its predecessor (re-encoded).
    """

    name: str
    num_frames: int
    stages: tuple[Stage, ...]
    handoff: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)
    start_frames: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Layout.name: expected a str, got {type(self.name).__name__}")
        if isinstance(self.stages, (str, bytes)) or not isinstance(self.stages, Iterable):
            got = type(self.stages).__name__
            raise TypeError(f"layout {self.name!r}: stages must be a sequence of Stage, got {got}")
        object.__setattr__(self, "stages", tuple(self.stages))
        for k, s in enumerate(self.stages):
            if not isinstance(s, Stage):
                raise TypeError(f"layout {self.name!r} stage {k}: expected a Stage, got {type(s).__name__}")
        if not isinstance(self.handoff, Mapping):
            raise TypeError(f"layout {self.name!r}: handoff must map a chain mode to frames, got {self.handoff!r}")
        handoff = {}
        for mode, frames in self.handoff.items():
            if not isinstance(mode, str):
                raise TypeError(f"layout {self.name!r}: handoff modes must be strings, got {mode!r}")
            handoff[mode] = _frame_tuple(frames, f"layout {self.name!r} handoff {mode!r}")
        object.__setattr__(self, "handoff", handoff)
        validate(self)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_of(self, frame: int) -> int:
        for i, s in enumerate(self.stages):
            if frame in s.frames:
                return i
        raise ValueError(f"frame {frame} is not in layout {self.name!r}")

    def stages_for(self, frames: Iterable[int]) -> tuple[int, ...]:
        """The stages a segment must run to produce `frames`: the stages holding them, and, transitively,
        the stages producing what those read (in execution order)."""
        wanted, needed = set(frames), set()
        ok = lambda f: isinstance(f, int) and not isinstance(f, bool) and 0 <= f < self.num_frames  # noqa: E731
        bad = sorted((f for f in wanted if not ok(f)), key=str)
        if bad:
            raise ValueError(f"layout {self.name!r} has frames 0..{self.num_frames - 1}; asked for {bad[:5]}")
        for k in range(self.num_stages - 1, -1, -1):
            if set(self.stages[k].frames) & wanted:
                needed.add(k)
                wanted |= set(self.stages[k].reads)
        return tuple(sorted(needed))

    def frame_visibility(self) -> torch.Tensor:
        """bool ``[N, N]``: entry (i, j) says whether frame i attends to frame j at inference."""
        n = self.num_frames
        vis = torch.zeros(n, n, dtype=torch.bool)
        for s in self.stages:
            for i in s.frames:
                vis[i, list(s.visible)] = True
        return vis

    def training_visibility(self) -> torch.Tensor:
        """bool ``[2N, 2N]`` for the teacher-forcing sequence ``[clean | noisy]``.

        Noisy frames of stage k see the noisy frames of stage k and the clean frames stage k reads;
        clean frames of stage k see the clean frames of stage k and of what it reads — the same
        visibility as inference, where the cache holds clean (t = 0) keys of earlier stages.
        """
        n = self.num_frames
        vis = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
        for s in self.stages:
            clean_cols = list(s.visible)
            for i in s.frames:
                vis[i, clean_cols] = True
                vis[n + i, list(s.reads)] = True
                vis[n + i, [n + j for j in s.frames]] = True
        return vis

    def stage_slices(self) -> list[tuple[int, ...]]:
        return [s.frames for s in self.stages]

    def training_sequence(self) -> TrainingSequence:
        """The teacher-forcing sequence as one model call: frame order and per-query-stage groups.

        Call order: the clean frames stage by stage, then the noisy frames stage by stage, so each
        (clean or noisy) stage is a consecutive query group whose page list is `training_visibility`'s row.
        """
        n = self.num_frames
        order = [f for s in self.stages for f in s.frames]
        call = [(f, False) for f in order] + [(f, True) for f in order]
        where = {key: j for j, key in enumerate(call)}
        groups = []
        for noisy in (False, True):
            for s in self.stages:
                if noisy:
                    visible = [where[(f, False)] for f in s.reads] + [where[(f, True)] for f in s.frames]
                else:
                    visible = [where[(f, False)] for f in s.visible]
                groups.append((len(s.frames), tuple(visible)))
        assert len(call) == 2 * n
        return TrainingSequence(frames=tuple(f for f, _ in call), noisy=tuple(z for _, z in call), groups=tuple(groups))


@dataclass(frozen=True)
class TrainingSequence:
    """One teacher-forcing call: ``frames[j]`` / ``noisy[j]`` say what call frame j is; `groups` are
    ``(num_frames, visible call frames)`` per query stage, for `KVPool.view(groups=...)`."""

    frames: tuple[int, ...]
    noisy: tuple[bool, ...]
    groups: tuple[tuple[int, tuple[int, ...]], ...]

    def visibility(self, num_frames: int) -> torch.Tensor:
        """The groups as a bool ``[2N, 2N]`` mask over the natural ``[clean | noisy]`` frame indexing."""
        index = [f + (num_frames if z else 0) for f, z in zip(self.frames, self.noisy)]
        vis = torch.zeros(2 * num_frames, 2 * num_frames, dtype=torch.bool)
        start = 0
        for n, visible in self.groups:
            for j in range(start, start + n):
                vis[index[j], [index[v] for v in visible]] = True
            start += n
        return vis


def validate(layout: Layout) -> None:
    """Raise ValueError unless every frame is produced exactly once and stages read only earlier frames.

    Checked: ``num_frames`` is a positive int; there is at least one stage; every stage has a known role,
    produces at least one frame, lists no frame twice and reads no frame twice; every index is within
    ``0..num_frames-1``; no frame is produced by two stages; a stage reads only frames that earlier stages
    produced (not its own); every frame is produced; handoff frames are in range and non-empty;
    ``start_frames`` is within the first stage. Wrong types raise TypeError.
    """
    n = layout.num_frames
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"layout {layout.name!r}: num_frames must be an int, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"layout {layout.name!r}: num_frames must be a positive int, got {n!r}")
    if not layout.stages:
        raise ValueError(f"layout {layout.name!r}: needs at least one stage")
    produced: set[int] = set()
    for k, s in enumerate(layout.stages):
        where = f"layout {layout.name!r} stage {k}"
        if s.role not in ROLES:
            raise ValueError(f"{where}: role {s.role!r} is not one of {ROLES}")
        if not s.frames:
            raise ValueError(f"{where}: produces no frames (an empty stage)")
        for f in (*s.frames, *s.reads):
            if not 0 <= f < n:
                raise ValueError(f"{where}: frame {f!r} is outside 0..{n - 1}")
        if len(set(s.frames)) != len(s.frames):
            raise ValueError(f"{where}: lists a frame twice in its frames {s.frames}")
        if len(set(s.reads)) != len(s.reads):
            raise ValueError(f"{where}: lists a frame twice in its reads {s.reads}")
        again = produced & set(s.frames)
        if again:
            raise ValueError(f"{where}: frames {sorted(again)} are produced twice (already by an earlier stage)")
        own = set(s.reads) & set(s.frames)
        if own:
            raise ValueError(f"{where}: reads its own frames {sorted(own)}; a stage sees its own frames anyway")
        unready = set(s.reads) - produced
        if unready:
            raise ValueError(f"{where}: reads frames {sorted(unready)} that no earlier stage produced")
        produced |= set(s.frames)
    missing = set(range(n)) - produced
    if missing:
        raise ValueError(f"layout {layout.name!r}: frames {sorted(missing)} are never produced")
    for mode, frames in layout.handoff.items():
        if not frames or any(not 0 <= f < n for f in frames):
            raise ValueError(
                f"layout {layout.name!r}: handoff {mode!r} frames {frames} are empty or outside 0..{n - 1}"
            )
    sf = layout.start_frames
    if isinstance(sf, bool) or not isinstance(sf, int):
        raise TypeError(f"layout {layout.name!r}: start_frames must be an int, got {type(sf).__name__}")
    first = len(layout.stages[0].frames)
    if not 0 <= sf <= first:
        raise ValueError(f"layout {layout.name!r}: start_frames={sf} must be within the first stage (0..{first})")


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


def mmpl(num_frames: int = 21, early: bool = True, middle: bool = True) -> Layout:
    """The released MMPL text-to-video layout (DESIGN.md section 3), and its ablations.

    Only the default 21-frame geometry is the released one; `early=False` / `middle=False` give the
    ablations without early or middle keyframes (those frames are then populated instead: without early
    keyframes the first half also produces 2, 3; without middle ones the second half produces 10..12 and
    reads the whole first half).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        raise TypeError(f"num_frames: expected an int, got {type(num_frames).__name__}")
    if num_frames != 21:
        raise ValueError(f"num_frames: the MMPL layout is defined for 21 latent frames, got {num_frames}")
    for arg, value in (("early", early), ("middle", middle)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg}: expected a bool, got {type(value).__name__}")
    start, early_kf, mid_kf, term_kf = _r(0, 2), _r(2, 4), _r(10, 13), _r(19, 21)
    plan = (early_kf if early else ()) + (mid_kf if middle else ()) + term_kf
    first_half = (() if early else early_kf) + _r(4, 10)
    second_half = _r(13, 19)
    stages = [
        Stage(start, (), "start"),
        Stage(plan, start, "plan"),
        Stage(first_half, start + (early_kf if early else ()) + (mid_kf if middle else ()), "populate"),
    ]
    second = (() if middle else mid_kf) + second_half
    stages.append(Stage(second, start + early_kf + _r(4, 10) + (mid_kf if middle else ()) + term_kf, "populate"))
    name = "mmpl" + ("" if early else "-no-early") + ("" if middle else "-no-mid")
    handoff = {"terminal": term_kf}
    if middle:
        handoff["middle"] = mid_kf
    return Layout(name, num_frames, tuple(stages), handoff=handoff, start_frames=len(start))


def ar(num_frames: int = 21, block: int = 3) -> Layout:
    """Self-Forcing style: blocks of `block` frames, each reading every earlier frame.

    The ``"terminal"`` handoff is the last two frames (the last one when ``num_frames`` is 1).
    """
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0 or num_frames % block:
        raise ValueError(f"num_frames={num_frames!r} must be a positive multiple of block={block}")
    stages = tuple(Stage(_r(i, i + block), _r(0, i), "block") for i in range(0, num_frames, block))
    handoff = {"terminal": _r(max(0, num_frames - 2), num_frames)}
    return Layout(f"ar{block}", num_frames, stages, handoff=handoff)


def custom(name: str, num_frames: int, stages: Iterable[Sequence], **kwargs) -> Layout:
    """A user layout from ``[(frames, reads[, role]), ...]`` items (validated like the built-in ones).

    Each item may also be a `Stage`, or a bare ``frames`` sequence of ints (a stage that reads nothing).
    `kwargs` go to `Layout` (``handoff``, ``start_frames``).
    """
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
        raise TypeError(f"stages: expected a sequence of (frames, reads[, role]) items, got {type(stages).__name__}")
    built = []
    for k, item in enumerate(stages):
        if isinstance(item, Stage):
            built.append(item)
            continue
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or not item:
            raise TypeError(f"stages[{k}]: expected (frames, reads[, role]), got {item!r}")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in item):  # bare frames
            built.append(Stage(tuple(item)))
            continue
        if len(item) > 3:
            raise TypeError(f"stages[{k}]: expected (frames, reads[, role]), got {len(item)} elements")
        frames = _frame_tuple(item[0], f"stages[{k}] frames")
        reads = _frame_tuple(item[1], f"stages[{k}] reads") if len(item) > 1 else ()
        built.append(Stage(frames, reads, item[2] if len(item) > 2 else "block"))
    return Layout(name, num_frames, tuple(built), **kwargs)


LAYOUTS = {
    "mmpl": lambda: mmpl(),
    "mmpl-no-early": lambda: mmpl(early=False),
    "mmpl-no-mid": lambda: mmpl(middle=False),
    "ar": lambda: ar(),
}


def get_layout(name: str | Layout) -> Layout:
    """A built-in layout by name (``mmpl``, ``mmpl-no-early``, ``mmpl-no-mid``, ``ar``, ``arN`` for blocks of N)."""
    if isinstance(name, Layout):
        return name
    if not isinstance(name, str):
        raise TypeError(f"layout must be a name or a Layout, got {type(name).__name__}")
    if name in LAYOUTS:
        return LAYOUTS[name]()
    if name.startswith("ar") and name[2:].isdigit():
        return ar(block=int(name[2:]))
    raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}, arN, or pass a Layout")
