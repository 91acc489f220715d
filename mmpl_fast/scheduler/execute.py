"""Executors: run a `Schedule` for real, move each edge's data between devices, and record what ran.

The executor knows tasks, devices and edges; what a task does and what an edge carries belongs to the caller's
`Work` (the pipeline's generation). For every launch of a device, in the schedule's start order::

    wait until its tasks' predecessors are done          (same process: events; other process: the receive)
    receive what each incoming edge from another device carries      Work.accept(edge, device, tensors)
    run the launch                                                    Work.run(launch)
    send what each outgoing edge to another device carries            Work.export(edge, device)
    Work.finish(launch)                                               (e.g. give KV pages back)

Host placements (the video writer, in segment order) are yielded to the caller as soon as their inputs are
there; the caller runs them (decoded frames out of a generator). With one local device the launches run
inline in the caller's thread between those yields: no threads at all. With several local devices, one
worker thread per device (CUDA kernels and most torch CPU ops release the GIL); an exception in any of them
stops the others at their next launch and is raised to the caller. Devices: a work that has
``device_context(device)`` (a context manager, e.g. ``torch.cuda.device``) gets it entered by each worker
thread before its first launch, and around each inline launch (the caller's thread keeps its own device).

Transports carry the tensors of edges that cross devices, as `Message`s listed up front in one order that
every process derives from the schedule (`Executor.messages`): `LocalTransport` (one process: a mailbox,
filled when the source finishes and emptied by the destination) and `DistributedTransport` (torch.distributed
point-to-point between ranks, device i = rank i, the host = rank 0; per peer, sends and receives are issued in
that one order, so it is correct under NCCL, which ignores tags and matches messages in issue order; a wait
is bounded by the process group's timeout, so a failed peer ends the run with an error instead of a hang).

`Executor.measured()` is the schedule as it really ran (measured start and end of every launch) for the
timeline plot and for `CostModel.observe`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .dag import Edge
from .placement import HOST, Placement, Schedule


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor an edge carries (what a receiver allocates)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


class Work(Protocol):
    """What the tasks of a schedule do, and what their edges carry.

    Optional: ``device_context(device: int) -> AbstractContextManager``, entered by the thread that runs the
    device's launches (see the module docstring).
    """

    def run(self, launch: Sequence[Placement]) -> None: ...

    def finish(self, launch: Sequence[Placement]) -> None: ...

    def payload(self, edge: Edge) -> list[TensorSpec]: ...

    def export(self, edge: Edge, device: int) -> list[torch.Tensor]: ...

    def accept(self, edge: Edge, device: int, tensors: Sequence[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class Message:
    """What one edge carries from the device that runs its source to the device that runs its destination."""

    key: int  # the edge's index in the DAG
    edge: Edge
    src: int  # device (HOST for the writer)
    dst: int
    specs: tuple[TensorSpec, ...]


class Transport(Protocol):
    """Moves the messages of edges that cross devices (or processes).

    `open` receives every crossing message of the run in one order that every process derives the same way
    from the schedule (`Executor.messages`); a transport that needs an order (NCCL matches point-to-point
    messages per peer in issue order, ignoring tags) issues each peer's sends and receives in that order.
    """

    def local(self, device: int) -> bool: ...

    def crosses(self, src: int, dst: int) -> bool: ...

    def open(self, messages: Sequence[Message]) -> None: ...

    def send(self, message: Message, tensors: list[torch.Tensor]) -> None: ...

    def ready(self, message: Message) -> bool: ...

    def recv(self, message: Message) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


class ExecutionError(RuntimeError):
    """A launch failed; the message names the task and the device."""


# --------------------------------------------------------------------------------------------- transports
class LocalTransport:
    """All devices in this process: edges cross between different devices, never into the host (the caller
    reads the source device's results directly). A mailbox: filled when the source finishes, emptied by the
    destination, which the executor starts only after its sources finished (so order does not matter)."""

    def __init__(self) -> None:
        self._box: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def local(self, device: int) -> bool:
        return True

    def crosses(self, src: int, dst: int) -> bool:
        return src != dst and dst != HOST

    def open(self, messages: Sequence[Message]) -> None:
        self._box.clear()

    def send(self, message: Message, tensors: list[torch.Tensor]) -> None:
        with self._lock:
            self._box[message.key] = tensors

    def ready(self, message: Message) -> bool:
        with self._lock:
            return message.key in self._box

    def recv(self, message: Message) -> list[torch.Tensor]:
        with self._lock:  # the source task is done (the executor waited for it), so its tensors are here
            return self._box.pop(message.key)

    def close(self) -> None:
        self._box.clear()


def comm_device(comm=None, device: torch.device | str | None = None) -> torch.device:
    """Where this rank's point-to-point and collective buffers live, decided here only: under NCCL the rank's
    GPU (`device` when given, which must be a CUDA device; else ``cuda:$LOCAL_RANK``, the GPU torchrun's
    launch binds; else the current device), under any other backend (gloo) the CPU. `comm`: what answers
    ``get_backend()`` (default: torch.distributed's default process group; tests pass a fake)."""
    if comm is None:
        import torch.distributed as comm
    if comm.get_backend() != "nccl":
        return torch.device("cpu")
    if device is not None:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device: NCCL moves CUDA tensors, got {device!r}")
        return dev
    local = os.environ.get("LOCAL_RANK")
    index = int(local) if local is not None else torch.cuda.current_device()  # current device: set by the caller
    return torch.device("cuda", index)


class DistributedTransport:
    """One device per rank of the default process group (device i = rank i; the host writer is rank 0).

    Correct under NCCL's point-to-point semantics, where tags are ignored and the sends and receives between
    two ranks match in the order each side issues them (and one of them may wait, on the GPU, until the other
    side issued its counterpart). No correctness rests on tags (every message uses tag 0):

    * per peer, this rank issues its sends and receives exactly in the order of `open`'s message list, which
      every rank derives from the same schedule, so the i-th message either side issues to the other is the
      same message with the same shapes;
    * that order is the order a sequential run of the schedule produces the messages, so a rank never has to
      receive a message before sending one that precedes it: issuing a send first issues the (non-blocking)
      receives before it, and a receive first issues what precedes it, which this rank has already produced;
    * receives are posted only when needed (or to let a later send go out), not all up front;
    * before the run, every pair of ranks that exchanges messages makes one small exchange, pairs in one
      global order, so NCCL's lazily created per-pair communicators are all set up before any rank blocks.

    Each tensor of a message is its own point-to-point transfer; both sides know the shapes from the schedule,
    so no header is needed. Waits on a peer are bounded by the process group's timeout. gloo moves CPU tensors,
    NCCL CUDA ones (`comm_device`: the rank's GPU, or `device` when given). One thread per rank uses it (one
    device per rank). `comm` replaces torch.distributed
    (``get_rank``, ``get_backend``, ``isend``, ``irecv``, ``send``, ``recv``), e.g. by a fake in tests.
    """

    def __init__(self, device: torch.device | str | None = None, *, comm=None) -> None:
        import torch.distributed as dist

        if comm is None and not dist.is_initialized():
            raise RuntimeError("DistributedTransport needs an initialised process group (torchrun)")
        self.dist = comm if comm is not None else dist  # torch.distributed's point-to-point calls (tests: a fake)
        self.rank = self.dist.get_rank()
        self.nccl = self.dist.get_backend() == "nccl"
        self.comm_device = comm_device(self.dist, device)
        self._queue: dict[int, list[Message]] = {}  # peer rank -> this rank's messages with it, in order
        self._issued: dict[int, int] = {}  # peer rank -> how many of them are issued
        self._where: dict[int, tuple[int, int]] = {}  # message key -> (peer rank, place in that peer's queue)
        self._outbox: dict[int, list[torch.Tensor]] = {}  # sends handed over but not yet issued
        self._inbox: dict[int, tuple[list, list[torch.Tensor]]] = {}  # receives issued: (works, buffers)
        self._sends: list = []  # (work, tensor) of sends in flight

    @staticmethod
    def rank_of(device: int) -> int:
        return 0 if device == HOST else device

    def local(self, device: int) -> bool:
        return self.rank_of(device) == self.rank

    def crosses(self, src: int, dst: int) -> bool:
        return self.rank_of(src) != self.rank_of(dst)

    def _peer(self, m: Message) -> int:
        src, dst = self.rank_of(m.src), self.rank_of(m.dst)
        return dst if src == self.rank else src

    def open(self, messages: Sequence[Message]) -> None:
        self._queue.clear()
        self._where.clear()
        pairs = set()
        for m in messages:
            src, dst = self.rank_of(m.src), self.rank_of(m.dst)
            pairs.add((min(src, dst), max(src, dst)))
            if self.rank in (src, dst):
                queue = self._queue.setdefault(self._peer(m), [])
                self._where[m.key] = (self._peer(m), len(queue))
                queue.append(m)
        self._issued = {peer: 0 for peer in self._queue}
        self._connect(sorted(pairs))

    def _connect(self, pairs: list[tuple[int, int]]) -> None:
        """One small exchange per communicating pair, in one global order (deadlock-free: the first pair not
        yet done has both ranks waiting on it)."""
        token = torch.zeros(1, device=self.comm_device)
        for low, high in pairs:
            try:
                if self.rank == low:
                    self.dist.send(token, high, tag=0)
                elif self.rank == high:
                    self.dist.recv(token, low, tag=0)
            except RuntimeError as e:
                raise ExecutionError(f"rank {self.rank}: connecting ranks {low} and {high} failed: {e}") from e

    def _pump(self, message: Message) -> None:
        """Issue this rank's messages with `message`'s peer in order: through `message`, and on through the
        sends already handed over (the receives before such a send are posted, so that it can go out)."""
        peer, upto = self._where[message.key]
        queue, mine = self._queue[peer], self.rank
        limit = max([upto] + [self._where[k][1] for k in self._outbox if self._where[k][0] == peer])
        while self._issued[peer] <= limit and self._issued[peer] < len(queue):
            m = queue[self._issued[peer]]
            if self.rank_of(m.src) == mine:
                if m.key not in self._outbox:
                    return  # produced later by this rank: the messages after it wait for it
                for t in self._outbox.pop(m.key):
                    self._sends.append((self.dist.isend(t, peer, tag=0), t))
            else:
                bufs = [torch.empty(s.shape, dtype=s.dtype, device=self.comm_device) for s in m.specs]
                self._inbox[m.key] = ([self.dist.irecv(b, peer, tag=0) for b in bufs], bufs)
            self._issued[peer] += 1

    def send(self, message: Message, tensors: list[torch.Tensor]) -> None:
        # a private copy: the source may reuse its memory before the transfer ends
        self._outbox[message.key] = [t.detach().to(self.comm_device, copy=True).contiguous() for t in tensors]
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]  # keep only sends in flight
        self._pump(message)

    def ready(self, message: Message) -> bool:
        self._pump(message)
        got = self._inbox.get(message.key)
        return got is not None and all(w.is_completed() for w in got[0])

    def recv(self, message: Message) -> list[torch.Tensor]:
        self._pump(message)
        if message.key not in self._inbox:  # the executor's order makes this impossible
            raise ExecutionError(f"rank {self.rank}: a {message.edge.kind} message from rank {self._peer(message)} "
                                 "comes after one this rank has not produced yet (transport order)")  # fmt: skip
        works, bufs = self._inbox[message.key]
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            raise ExecutionError(
                f"rank {self.rank}: waiting for {message.edge.kind} data from rank {self._peer(message)} failed "
                f"(did it fail?): {e}"
            ) from e
        del self._inbox[message.key]
        return bufs

    def close(self) -> None:
        left = {peer: len(q) - self._issued[peer] for peer, q in self._queue.items() if self._issued[peer] < len(q)}
        try:
            for w, _ in self._sends:
                w.wait()
        except RuntimeError as e:
            raise ExecutionError(f"rank {self.rank}: a send to a peer failed (did it fail?): {e}") from e
        finally:
            self._sends.clear()
        if left:
            raise ExecutionError(f"rank {self.rank}: messages never issued, by peer: {left}")


# ---------------------------------------------------------------------------------------------- executor
class Executor:
    """Runs `schedule`'s launches on the devices this process owns; see the module docstring.

    Args:
        schedule: what runs where and in which order.
        work: what tasks do and what edges carry.
        transport: `LocalTransport()` (default) or `DistributedTransport`.
        on_launch: called after every launch with its measured placements (progress bars, logs).
    """

    def __init__(
        self,
        schedule: Schedule,
        work: Work,
        transport: Transport | None = None,
        *,
        on_launch: Callable[[list[Placement]], None] | None = None,
    ):
        if schedule.has_splits:  # see `split` for what running one needs; refused rather than run wrong
            widened = [p.task.name for p in schedule.placements if len(p.devices) > 1]
            raise NotImplementedError(
                f"this schedule runs {len(widened)} task(s) across several devices ({', '.join(widened[:3])}"
                f"{', ...' if len(widened) > 3 else ''}); the executor runs unsplit schedules only: schedule "
                "with split='off'"
            )
        self.schedule, self.work = schedule, work
        self.transport = transport if transport is not None else LocalTransport()
        self.on_launch = on_launch
        dag = schedule.dag
        self._key = {id(e): k for k, e in enumerate(dag.edges)}
        self._device = {p.task.index: p.device for p in schedule.placements}
        self._done = [False] * len(dag.tasks)
        self._messages: dict[int, Message] = {}  # edge key -> its message, for edges that cross
        self._measured: dict[int, Placement] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._t0 = 0.0

    # ---- helpers
    def _local_devices(self) -> list[int]:
        return [d for d in range(len(self.schedule.devices)) if self.transport.local(d)]

    def _launches(self, device: int) -> list[list[Placement]]:
        """The device's launches in start order (ties by task index: the DAG's topological order)."""
        groups = [g for g in self.schedule.launches() if g[0].device == device]
        return sorted(groups, key=lambda g: (g[0].start, min(p.task.index for p in g)))

    def _crossing(self, e: Edge) -> bool:
        return self.transport.crosses(self._device[e.src], self._device[e.dst])

    def messages(self) -> list[Message]:
        """What every edge that crosses devices carries, in the order a sequential run of the schedule produces
        it: each device's launches (and the host's placements) in their order, the next launch taken among
        those whose inputs are done by (scheduled start, device). Every process derives the same list, and a
        device that runs its launches in order never needs a message that comes after one it has yet to send.
        """
        dag, work = self.schedule.dag, self.work
        seqs = {d: self._launches(d) for d in range(len(self.schedule.devices))}
        seqs[HOST] = [[p] for p in self.schedule.placements if p.device == HOST]
        nxt = dict.fromkeys(seqs, 0)
        done = [False] * len(dag.tasks)

        def runnable(d: int) -> bool:
            return nxt[d] < len(seqs[d]) and all(done[e.src] for p in seqs[d][nxt[d]] for e in dag.preds[p.task.index])

        out = []
        while ready := [d for d in seqs if runnable(d)]:
            d = min(ready, key=lambda d: (seqs[d][nxt[d]][0].start, d))
            launch = seqs[d][nxt[d]]
            nxt[d] += 1
            for p in launch:
                done[p.task.index] = True
            for e in (e for p in launch for e in dag.succs[p.task.index]):
                if self._crossing(e) and work.payload(e):
                    out.append(Message(self._key[id(e)], e, d, self._device[e.dst], tuple(work.payload(e))))
        if not all(done):
            stuck = next(seqs[d][nxt[d]][0].task.name for d in seqs if nxt[d] < len(seqs[d]))
            raise ExecutionError(f"schedule order: {stuck} waits for an input that runs after it on its device")
        return out

    def _device_context(self, device: int) -> AbstractContextManager:
        """`Work.device_context(device)` when the work has one (e.g. ``torch.cuda.device``), else nothing."""
        make = getattr(self.work, "device_context", None)
        return make(device) if make is not None else nullcontext()

    def _waits_for(self, e: Edge) -> bool:
        """Does the destination wait on an event for this edge (source in this process)?"""
        return self.transport.local(self._device[e.src])

    def _inputs_done(self, tasks: Sequence[int]) -> bool:
        dag = self.schedule.dag
        return all(self._done[e.src] for t in tasks for e in dag.preds[t] if self._waits_for(e))

    def _wait_inputs(self, tasks: Sequence[int]) -> None:
        with self._cond:
            while not (self._error is not None or self._inputs_done(tasks)):
                self._cond.wait()
            if self._error is not None:
                raise ExecutionError("stopped: another device failed") from self._error

    def _run_launch(self, launch: list[Placement], inline: bool = False) -> None:
        dag, work, tr = self.schedule.dag, self.work, self.transport
        tasks = [p.task.index for p in launch]
        if self._error is not None:  # another device failed, or the caller stopped
            raise ExecutionError("stopped: the run was stopped or another device failed") from self._error
        device = launch[0].device
        if inline and not self._inputs_done(tasks):  # nothing else could ever finish them
            raise ExecutionError(f"schedule order: {launch[0].task.name} comes before one of its inputs")
        self._wait_inputs(tasks)
        msgs = self._messages
        try:
            for e in (e for t in tasks for e in dag.preds[t] if self._key[id(e)] in msgs):
                work.accept(e, device, tr.recv(msgs[self._key[id(e)]]))
            start = time.perf_counter() - self._t0  # after the receives: the launch's own time
            work.run(launch)
            for e in (e for t in tasks for e in dag.succs[t] if self._key[id(e)] in msgs):
                tr.send(msgs[self._key[id(e)]], work.export(e, device))
            work.finish(launch)
        except Exception as e:  # the task's own error type reaches the caller, with where it happened
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"while running {', '.join(p.task.name for p in launch)} on "
                           f"{self.schedule.device_name(device)}")  # fmt: skip
            raise
        end = time.perf_counter() - self._t0
        measured = [replace(p, start=start, end=end) for p in launch]
        with self._cond:
            for p in measured:
                self._done[p.task.index] = True
                self._measured[p.task.index] = p
            self._cond.notify_all()
        if self.on_launch is not None:
            self.on_launch(measured)

    def _host_ready(self, p: Placement) -> bool:
        for e in self.schedule.dag.preds[p.task.index]:
            if self._waits_for(e):
                if not self._done[e.src]:
                    return False
            elif (m := self._messages.get(self._key[id(e)])) is not None and not self.transport.ready(m):
                return False
        return True

    def host_inputs(self, p: Placement) -> dict[int, list[torch.Tensor]]:
        """Tensors of the host placement's incoming edges from other processes, by source task (blocking)."""
        out = {}
        for e in self.schedule.dag.preds[p.task.index]:
            if not self._waits_for(e) and (m := self._messages.get(self._key[id(e)])) is not None:
                out[e.src] = self.transport.recv(m)
        return out

    def _mark_host(self, p: Placement, start: float) -> None:
        end = time.perf_counter() - self._t0
        with self._cond:
            self._done[p.task.index] = True
            self._measured[p.task.index] = replace(p, start=start, end=end)
            self._cond.notify_all()

    # ---- the run
    def run(self) -> Iterator[Placement]:
        """Execute; yield each host placement of this process, in order, once its inputs are there.

        The caller does the host task's work before asking for the next one (the time between is measured
        as the host task's duration).
        """
        self._t0 = time.perf_counter()
        host = [p for p in self.schedule.placements if p.device == HOST] if self.transport.local(HOST) else []
        messages = self.messages()
        self._messages = {m.key: m for m in messages}
        self.transport.open(messages)
        devices = self._local_devices()
        try:
            if len(devices) <= 1:
                yield from self._run_inline(devices, host)
            else:
                yield from self._run_threaded(devices, host)
            self.transport.close()
        finally:
            with self._cond:
                if self._error is None and not all(self._done[p.task.index] for p in self._mine()):
                    self._error = ExecutionError("the run was stopped")
                self._cond.notify_all()

    def _mine(self) -> list[Placement]:
        return [p for p in self.schedule.placements if self.transport.local(p.device)]

    def _run_inline(self, devices: list[int], host: list[Placement]) -> Iterator[Placement]:
        pending = list(host)

        def ready_hosts(block: bool) -> Iterator[Placement]:
            while pending and (block or self._host_ready(pending[0])):
                p = pending.pop(0)
                start = time.perf_counter() - self._t0
                yield p
                self._mark_host(p, start)

        for launch in self._launches(devices[0]) if devices else []:
            yield from ready_hosts(block=False)
            with self._device_context(devices[0]):  # around each launch: the caller's thread is the caller's between
                self._run_launch(launch, inline=True)
        yield from ready_hosts(block=True)

    def _run_threaded(self, devices: list[int], host: list[Placement]) -> Iterator[Placement]:
        def worker(device: int) -> None:
            try:
                with self._device_context(device):  # the thread's current device, before its first launch
                    for launch in self._launches(device):
                        self._run_launch(launch)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                with self._cond:
                    if self._error is None:
                        self._error = e
                    self._cond.notify_all()

        threads = [threading.Thread(target=worker, args=(d,), name=f"mmpl-device-{d}", daemon=True) for d in devices]
        for t in threads:
            t.start()
        try:
            for p in host:
                with self._cond:
                    while self._error is None and not self._host_ready(p):
                        self._cond.wait()
                    if self._error is not None:
                        break
                start = time.perf_counter() - self._t0
                yield p
                self._mark_host(p, start)
        finally:
            with self._cond:  # a caller that stopped early stops the workers at their next launch
                if self._error is None and not all(self._done[p.task.index] for p in host):
                    self._error = ExecutionError("the run was stopped")
                self._cond.notify_all()
            for t in threads:
                t.join()
        if self._error is not None:
            raise self._error

    def measured(self) -> Schedule:
        """The schedule as it ran: every finished placement with its measured start and end (seconds)."""
        placements = tuple(sorted(self._measured.values(), key=lambda p: (p.start, p.device, p.task.index)))
        return Schedule(self.schedule.dag, self.schedule.devices, placements, f"{self.schedule.policy} (measured)",
                        self.schedule.capacity)  # fmt: skip
