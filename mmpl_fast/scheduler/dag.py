"""The task DAG of one video: what has to run, and in which order, for `num_segments` chained segments.

Per segment ``s`` (MMPL layout, DESIGN.md section 3)::

    start / reencode --> plan --> populate(2) --> populate(3)        stage tasks: edges from the frames
          |               |  \\_________________________/                each stage reads (its KV pages)
          |               |               |
          |               |            decode --> write              decode: the kept latents -> video
          |               |                         |                write: in segment order (host)
          v               v                         v
    reencode(s+1) <-------'   (chain edge)     write(s+1)

* Segment 0's first stage is generated from noise (kind ``"start"``); every later segment's first stage is
  the re-encode of its predecessor's handoff frames plus a cache prefill (kind ``"reencode"``).
* Chain edges: the next segment's re-encode reads the predecessor's frame 0 and its handoff frames, which
  are the terminal keyframes (chain mode ``"terminal"``) or the middle ones (``"middle"``), so the edges
  come from whichever stages produce those frames (for the released layout: stage 0 and the plan).
* Decode reads the kept latents ``0 .. max(handoff)`` (all frames without a chain), the frames that enter
  the stitched video; the write of segment s follows the write of s - 1 (one video file, in order).
* Chain tasks are the stage tasks up to the last handoff producer: the sequential part of the video.

Edges are data edges (not transitively reduced): each names the frames that flow along it, so a
scheduler can price moving KV pages (stage edges) or latents (chain and decode edges) between devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from ..layouts import Layout, get_layout

CHAIN_MODES = ("terminal", "middle")
TASK_KINDS = ("start", "reencode", "plan", "populate", "block", "decode", "write")
EDGE_KINDS = ("stage", "chain", "decode", "write", "order")
HOST_KINDS = ("write",)


@dataclass(frozen=True)
class Task:
    """One unit of work of one segment.

    Attributes:
        index: position in `TaskDAG.tasks`.
        segment: the segment it belongs to.
        kind: one of `TASK_KINDS`. Stage tasks are ``start``/``reencode`` (stage 0), ``plan``, ``populate``
            or ``block`` (the layout role); ``decode`` is the VAE decode, ``write`` the host-side writer.
        stage: the layout stage index (stage tasks only).
        frames: latent frames the task produces (stage tasks) or decodes (decode).
        reads: latent frames of earlier stages of the segment it attends to (stage tasks).
        chain: whether the task lies on the planning chain (it gates the next segment).
        given: frames of the stage that are re-encoded rather than denoised (``reencode`` only).
        cache_pass: whether the stage runs the extra t = 0 pass that writes its clean keys/values
            (some later stage reads its frames).
    """

    index: int
    segment: int
    kind: str
    stage: int | None = None
    frames: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()
    chain: bool = False
    given: tuple[int, ...] = ()
    cache_pass: bool = False

    @property
    def name(self) -> str:
        """A short label, e.g. ``s3.plan``, ``s3.populate2``, ``s0.decode``."""
        suffix = str(self.stage) if self.kind in ("populate", "block") else ""
        return f"s{self.segment}.{self.kind}{suffix}"

    @property
    def on_host(self) -> bool:
        """Host tasks (the video writer) run on the CPU, not on an accelerator."""
        return self.kind in HOST_KINDS

    @property
    def is_stage(self) -> bool:
        return self.stage is not None

    def __repr__(self) -> str:
        return f"Task({self.name})"


@dataclass(frozen=True)
class Edge:
    """``src`` must finish before ``dst`` starts; `frames` are the latent frames whose data flows along it."""

    src: int
    dst: int
    kind: str
    frames: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class TaskDAG:
    """Tasks and edges of a video; build it with `build_dag`.

    Attributes:
        layout: the segment layout.
        num_segments: segments of the video.
        chain_mode: ``"terminal"`` or ``"middle"``.
        tasks: all tasks, in a topological order (segment by segment, stages in layout order).
        edges: all data/order edges.
        handoff: frames of a segment that start the next one (empty without a chain).
        kept: latent frames of each segment that are decoded into the video.
    """

    layout: Layout
    num_segments: int
    chain_mode: str
    tasks: tuple[Task, ...]
    edges: tuple[Edge, ...]
    handoff: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    @cached_property
    def preds(self) -> tuple[tuple[Edge, ...], ...]:
        """Incoming edges of each task (by task index)."""
        out: list[list[Edge]] = [[] for _ in self.tasks]
        for e in self.edges:
            out[e.dst].append(e)
        return tuple(tuple(x) for x in out)

    @cached_property
    def succs(self) -> tuple[tuple[Edge, ...], ...]:
        """Outgoing edges of each task (by task index)."""
        out: list[list[Edge]] = [[] for _ in self.tasks]
        for e in self.edges:
            out[e.src].append(e)
        return tuple(tuple(x) for x in out)

    def task(self, segment: int, kind: str, stage: int | None = None) -> Task:
        """The task of `segment` with `kind` (and layout `stage` for ``populate``/``block``)."""
        key = (segment, kind, stage if kind in ("populate", "block") else None)
        if key not in self._index:
            raise KeyError(f"no task {kind!r} (stage {stage}) in segment {segment}")
        return self.tasks[self._index[key]]

    def segment_tasks(self, segment: int) -> list[Task]:
        return [t for t in self.tasks if t.segment == segment]

    @property
    def chain_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.chain]

    def has_edge(self, src: Task, dst: Task) -> bool:
        return any(e.src == src.index for e in self.preds[dst.index])

    def topological_order(self) -> list[int]:
        """Task indices in a topological order (the construction order is one; this checks it)."""
        seen: set[int] = set()
        for t in self.tasks:
            for e in self.preds[t.index]:
                assert e.src in seen, f"{self.tasks[e.src]} is not before {t}"
            seen.add(t.index)
        return [t.index for t in self.tasks]

    def longest_path(self, duration) -> tuple[float, list[int]]:
        """Length and tasks of the longest path when task i takes ``duration(task)`` (edges free)."""
        best = [0.0] * len(self.tasks)
        prev = [-1] * len(self.tasks)
        for t in self.tasks:
            start = 0.0
            for e in self.preds[t.index]:
                if best[e.src] > start:
                    start, prev[t.index] = best[e.src], e.src
            best[t.index] = start + duration(t)
        end = max(range(len(best)), key=best.__getitem__)
        path = [end]
        while prev[path[-1]] >= 0:
            path.append(prev[path[-1]])
        return best[end], path[::-1]

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for t in self.tasks:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in kinds.items())
        return f"{self.num_segments} segments of layout {self.layout.name!r} ({self.chain_mode}): {parts}"


def chain_stages(layout: Layout, handoff: tuple[int, ...]) -> tuple[int, ...]:
    """Stages that must finish before the next segment can start: those up to the last handoff producer."""
    if not handoff:
        return ()
    last = max(layout.stage_of(f) for f in handoff)
    return tuple(range(last + 1))


def build_dag(
    layout: str | Layout = "mmpl",
    num_segments: int = 1,
    chain: str = "terminal",
    *,
    decode: bool = True,
    write: bool = True,
    prune: bool = True,
) -> TaskDAG:
    """The task DAG of a video of `num_segments` segments.

    Args:
        layout: a layout name (``mmpl``, ``mmpl-no-early``, ``mmpl-no-mid``, ``ar``, ``arN``) or a `Layout`.
        num_segments: segments of the video (>= 1).
        chain: ``"terminal"`` (the next segment starts from the terminal keyframes) or ``"middle"``.
        decode: add a VAE decode task per segment.
        write: add an in-order writer task per segment (needs `decode`).
        prune: leave out stages whose frames are neither kept in the video, nor read by a kept stage, nor
            handed to the next segment (`Layout.stages_for`; in ``"middle"`` mode the released layout's
            second populate stage). The pipeline runs the pruned DAG; ``False`` gives every stage.

    Raises:
        ValueError: bad `num_segments` or `chain`, or a layout without handoff frames for `chain` when
            more than one segment is asked for.
    """
    lay = get_layout(layout)
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
    if chain not in CHAIN_MODES:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_MODES)}, got {chain!r}")
    if write and not decode:
        raise ValueError("write=True needs decode=True (the writer consumes decoded frames)")
    handoff = tuple(lay.handoff.get(chain, ()))
    if num_segments > 1 and not handoff:
        raise ValueError(
            f"chain: layout {lay.name!r} has no {chain!r} handoff frames (it has: {', '.join(lay.handoff) or 'none'})"
        )
    if handoff and len(handoff) < 2:
        raise ValueError(f"layout {lay.name!r}: the {chain!r} handoff needs at least 2 frames, got {handoff}")
    kept = tuple(range(max(handoff) + 1)) if handoff else tuple(range(lay.num_frames))
    b = _Builder(lay, handoff, kept, num_segments, prune)
    for s in range(num_segments):
        b.stages(s)
        if decode:
            b.decode(s, write)
    return TaskDAG(lay, num_segments, chain, tuple(b.tasks), tuple(b.edges), handoff, kept, b.index)


class _Builder:
    """Adds the tasks and edges of `build_dag` segment by segment."""

    def __init__(self, lay: Layout, handoff: tuple[int, ...], kept: tuple[int, ...], num_segments: int, prune: bool):
        self.lay, self.kept = lay, kept
        self.on_chain = set(chain_stages(lay, handoff)) if num_segments > 1 else set()
        self.producer = {f: k for k, st in enumerate(lay.stages) for f in st.frames}
        # The re-encode reads frame 0 and the last two handoff frames of the predecessor (chain.py's recipe).
        self.reencode_reads = (0, *handoff[-2:]) if handoff else ()
        self.needed = set(lay.stages_for(set(kept) | set(handoff))) if prune else set(range(lay.num_stages))
        self.read_later = {f for k, st in enumerate(lay.stages) if k in self.needed for f in st.reads}
        self.tasks: list[Task] = []
        self.edges: list[Edge] = []
        self.index: dict = {}
        self.stage_task: dict[tuple[int, int], int] = {}

    def add(self, key, **fields) -> Task:
        t = Task(index=len(self.tasks), **fields)
        self.tasks.append(t)
        self.index[key] = t.index
        return t

    def link(self, segment: int, frames, dst: int, kind: str) -> None:
        """Edges into `dst` from the stage tasks of `segment` that produce `frames`, one per producer."""
        by_src: dict[int, list[int]] = {}
        for f in frames:
            by_src.setdefault(self.producer[f], []).append(f)
        for src_stage, fs in sorted(by_src.items()):
            self.edges.append(Edge(self.stage_task[segment, src_stage], dst, kind, tuple(dict.fromkeys(fs))))

    def stages(self, s: int) -> None:
        lay = self.lay
        for k, st in enumerate(lay.stages):
            if k not in self.needed:
                continue
            if k == 0:
                kind = "start" if s == 0 else "reencode"
            else:
                kind = st.role if st.role in ("plan", "populate", "block") else "block"
            given = tuple(st.frames[: lay.start_frames or 2]) if kind == "reencode" else ()
            t = self.add(
                (s, kind, k if kind in ("populate", "block") else None), segment=s, kind=kind, stage=k,
                frames=st.frames, reads=st.reads, chain=k in self.on_chain, given=given,
                cache_pass=bool(set(st.frames) & self.read_later),
            )  # fmt: skip
            self.stage_task[s, k] = t.index
            self.link(s, st.reads, t.index, "stage")
            if k == 0 and s > 0:
                self.link(s - 1, self.reencode_reads, t.index, "chain")

    def decode(self, s: int, write: bool) -> None:
        t = self.add((s, "decode", None), segment=s, kind="decode", frames=self.kept)
        self.link(s, self.kept, t.index, "decode")
        if write:
            w = self.add((s, "write", None), segment=s, kind="write", frames=self.kept)
            self.edges.append(Edge(t.index, w.index, "write", self.kept))
            if s > 0:
                self.edges.append(Edge(self.index[s - 1, "write", None], w.index, "order"))
