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
stops the others at their next launch and is raised to the caller.

Transports carry the tensors of edges that cross devices: `LocalTransport` (one process: a mailbox, filled
when the source finishes and emptied by the destination) and `DistributedTransport` (torch.distributed
point-to-point between ranks, device i = rank i, the host = rank 0; sends are posted when the source
finishes, receives block the destination, up to the process group's timeout, so a failed peer ends the
run with an error instead of a hang).

`Executor.measured()` is the schedule as it really ran (measured start and end of every launch) for the
timeline plot and for `CostModel.observe`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
    """What the tasks of a schedule do, and what their edges carry."""

    def run(self, launch: Sequence[Placement]) -> None: ...

    def finish(self, launch: Sequence[Placement]) -> None: ...

    def payload(self, edge: Edge) -> list[TensorSpec]: ...

    def export(self, edge: Edge, device: int) -> list[torch.Tensor]: ...

    def accept(self, edge: Edge, device: int, tensors: Sequence[torch.Tensor]) -> None: ...


class Transport(Protocol):
    def local(self, device: int) -> bool: ...

    def crosses(self, src: int, dst: int) -> bool: ...

    def send(self, key: int, edge: Edge, src: int, dst: int, tensors: list[torch.Tensor]) -> None: ...

    def recv(self, key: int, edge: Edge, src: int, dst: int, specs: list[TensorSpec]) -> list[torch.Tensor]: ...

    def post(self, key: int, edge: Edge, src: int, dst: int, specs: list[TensorSpec]) -> None: ...

    def ready(self, key: int) -> bool: ...

    def close(self) -> None: ...


class ExecutionError(RuntimeError):
    """A launch failed; the message names the task and the device."""


# --------------------------------------------------------------------------------------------- transports
class LocalTransport:
    """All devices in this process: edges cross between different devices, never into the host (the caller
    reads the source device's results directly)."""

    def __init__(self) -> None:
        self._box: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def local(self, device: int) -> bool:
        return True

    def crosses(self, src: int, dst: int) -> bool:
        return src != dst and dst != HOST

    def send(self, key, edge, src, dst, tensors) -> None:
        with self._lock:
            self._box[key] = tensors

    def recv(self, key, edge, src, dst, specs) -> list[torch.Tensor]:
        with self._lock:  # the source task is done (the executor waited for it), so its tensors are here
            return self._box.pop(key)

    def post(self, key, edge, src, dst, specs) -> None:  # host edges never cross in one process
        raise AssertionError("LocalTransport has no host transfers")

    def ready(self, key) -> bool:
        return True

    def close(self) -> None:
        self._box.clear()


class DistributedTransport:
    """One device per rank of the default process group (device i = rank i; the host writer is rank 0).

    Every tensor of an edge travels as its own message tagged by (edge key, tensor number), so matching
    sends and receives need no metadata: both sides know the edge's payload shapes. gloo moves CPU tensors,
    NCCL CUDA ones.
    """

    MAX_TENSORS = 16  # tensors per edge (tags are key * MAX_TENSORS + i)

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DistributedTransport needs an initialised process group (torchrun)")
        self.dist = dist
        self.rank = dist.get_rank()
        self.nccl = dist.get_backend() == "nccl"
        self.comm_device = torch.device(device) if self.nccl else torch.device("cpu")
        self._sends: list = []
        self._posted: dict[int, tuple[list, list[torch.Tensor]]] = {}

    @staticmethod
    def rank_of(device: int) -> int:
        return 0 if device == HOST else device

    def local(self, device: int) -> bool:
        return self.rank_of(device) == self.rank

    def crosses(self, src: int, dst: int) -> bool:
        return self.rank_of(src) != self.rank_of(dst)

    def _tag(self, key: int, i: int) -> int:
        return key * self.MAX_TENSORS + i

    def send(self, key, edge, src, dst, tensors) -> None:
        assert len(tensors) <= self.MAX_TENSORS
        for i, t in enumerate(tensors):  # a private copy: the source may reuse its memory before the send ends
            t = t.detach().to(self.comm_device, copy=True).contiguous()
            self._sends.append((self.dist.isend(t, self.rank_of(dst), tag=self._tag(key, i)), t))

    def recv(self, key, edge, src, dst, specs) -> list[torch.Tensor]:
        out = []
        for i, spec in enumerate(specs):
            buf = torch.empty(spec.shape, dtype=spec.dtype, device=self.comm_device)
            try:
                self.dist.recv(buf, self.rank_of(src), tag=self._tag(key, i))
            except RuntimeError as e:
                raise ExecutionError(
                    f"rank {self.rank}: waiting for {edge.kind} data from rank {self.rank_of(src)} failed "
                    f"(did it fail?): {e}"
                ) from e
            out.append(buf)
        return out

    def post(self, key, edge, src, dst, specs) -> None:
        bufs = [torch.empty(s.shape, dtype=s.dtype, device=self.comm_device) for s in specs]
        works = [self.dist.irecv(b, self.rank_of(src), tag=self._tag(key, i)) for i, b in enumerate(bufs)]
        self._posted[key] = (works, bufs)

    def ready(self, key) -> bool:
        return all(w.is_completed() for w in self._posted[key][0])

    def take(self, key: int, edge: Edge, src: int) -> list[torch.Tensor]:
        works, bufs = self._posted.pop(key)
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            raise ExecutionError(
                f"rank {self.rank}: waiting for {edge.kind} data from rank {self.rank_of(src)} failed (did it "
                f"fail?): {e}"
            ) from e
        return bufs

    def close(self) -> None:
        try:
            for w, _ in self._sends:
                w.wait()
        except RuntimeError as e:
            raise ExecutionError(f"rank {self.rank}: a send to a peer failed (did it fail?): {e}") from e
        finally:
            self._sends.clear()


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
        self.schedule, self.work = schedule, work
        self.transport = transport if transport is not None else LocalTransport()
        self.on_launch = on_launch
        dag = schedule.dag
        self._key = {id(e): k for k, e in enumerate(dag.edges)}
        self._device = {p.task.index: p.device for p in schedule.placements}
        self._done = [False] * len(dag.tasks)
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
        try:
            for t in tasks:
                for e in dag.preds[t]:
                    if self._crossing(e) and work.payload(e):
                        got = tr.recv(self._key[id(e)], e, self._device[e.src], device, work.payload(e))
                        work.accept(e, device, got)
            start = time.perf_counter() - self._t0  # after the receives: the launch's own time
            work.run(launch)
            for t in tasks:
                for e in dag.succs[t]:
                    if self._crossing(e) and work.payload(e):
                        tr.send(self._key[id(e)], e, device, self._device[e.dst], work.export(e, device))
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
        dag = self.schedule.dag
        for e in dag.preds[p.task.index]:
            if self._waits_for(e):
                if not self._done[e.src]:
                    return False
            elif self.work.payload(e) and not self.transport.ready(self._key[id(e)]):
                return False
        return True

    def host_inputs(self, p: Placement) -> dict[int, list[torch.Tensor]]:
        """Tensors of the host placement's incoming edges from other processes, by source task (blocking)."""
        out = {}
        for e in self.schedule.dag.preds[p.task.index]:
            if not self._waits_for(e) and self.work.payload(e):
                out[e.src] = self.transport.take(self._key[id(e)], e, self._device[e.src])
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
        for p in host:  # receives of remote results for the writer, posted up front
            for e in self.schedule.dag.preds[p.task.index]:
                if not self._waits_for(e) and self.work.payload(e):
                    self.transport.post(self._key[id(e)], e, self._device[e.src], HOST, self.work.payload(e))
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
            self._run_launch(launch, inline=True)
        yield from ready_hosts(block=True)

    def _run_threaded(self, devices: list[int], host: list[Placement]) -> Iterator[Placement]:
        def worker(device: int) -> None:
            try:
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
