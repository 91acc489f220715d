"""NCCL's point-to-point semantics on gloo, for the multi-process tests: `install()` patches torch.distributed.

NCCL ignores tags: between two ranks, sends and receives match in the order each side issues them, and each
operation waits for the ones issued before it with that peer (one stream per pair), so a send may wait until
the peer has issued the matching receive. gloo honours tags and buffers, which can hide ordering bugs. After
`install()`:

* every message travels with tag 0: matching is by issue order alone;
* per peer, one thread runs this rank's operations with that peer one at a time, in issue order (the pair's
  "stream"), and a send completes only once the peer has received it (an acknowledgement on a separate tag):
  stricter than NCCL for small messages, as strict as it is for large ones. Two ranks that issue crossing
  sends to each other before the matching receives deadlock here as they would under NCCL (the process
  group's timeout then ends the run with an error);
* every operation is logged in `LOG` as ``(peer, "send" | "recv", shape, dtype)`` in issue order, so a test can
  check that the i-th message one side sent is the i-th the other received, with the same shape.
"""

from __future__ import annotations

import queue
import threading

import torch
import torch.distributed as dist

LOG: list[tuple[int, str, tuple[int, ...], str]] = []
_ORIGINAL: dict[str, object] = {}
_STREAMS: dict[int, _PairStream] = {}
_LOCK = threading.Lock()
_ACK_TAG = 1


class _Op:
    """What `isend` / `irecv` return: completes when the pair's stream has run the operation."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout=None) -> bool:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"point-to-point operation failed: {self.error}") from self.error
        return True


class _PairStream:
    """This rank's operations with one peer, run one at a time in issue order."""

    def __init__(self, peer: int) -> None:
        self.peer = peer
        self.ops: queue.Queue = queue.Queue()
        self.broken: BaseException | None = None
        threading.Thread(target=self._run, name=f"pair-stream-{peer}", daemon=True).start()

    def submit(self, kind: str, tensor: torch.Tensor) -> _Op:
        op = _Op()
        with _LOCK:
            LOG.append((self.peer, kind, tuple(tensor.shape), str(tensor.dtype)))
        self.ops.put((kind, tensor, op))
        return op

    def _run(self) -> None:
        send, recv = _ORIGINAL["send"], _ORIGINAL["recv"]
        ack = torch.zeros(1)
        while True:
            kind, tensor, op = self.ops.get()
            if self.broken is None:
                try:
                    if kind == "send":
                        send(tensor, self.peer, tag=0)
                        recv(ack, self.peer, tag=_ACK_TAG)  # done only once the peer has it
                    else:
                        recv(tensor, self.peer, tag=0)
                        send(ack, self.peer, tag=_ACK_TAG)
                except BaseException as e:  # noqa: BLE001 - a broken pair fails every later operation too
                    self.broken = e
            op.error = self.broken
            op._done.set()


def _stream(peer: int) -> _PairStream:
    with _LOCK:
        if peer not in _STREAMS:
            _STREAMS[peer] = _PairStream(peer)
        return _STREAMS[peer]


def _isend(tensor, dst, group=None, tag=0):
    return _stream(dst).submit("send", tensor)


def _irecv(tensor, src=None, group=None, tag=0):
    if src is None:
        raise ValueError("NCCL has no receive from any source")
    return _stream(src).submit("recv", tensor)


def _send(tensor, dst, group=None, tag=0):
    _isend(tensor, dst).wait()


def _recv(tensor, src=None, group=None, tag=0):
    _irecv(tensor, src).wait()
    return src


def install() -> None:
    """Route torch.distributed's point-to-point calls through the pair streams (collectives are untouched)."""
    if _ORIGINAL:
        return
    _ORIGINAL.update(send=dist.send, recv=dist.recv)
    dist.isend, dist.irecv, dist.send, dist.recv = _isend, _irecv, _send, _recv
