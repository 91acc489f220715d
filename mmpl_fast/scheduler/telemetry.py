"""GPU telemetry through NVML (nvidia-ml-py): free/used memory, utilisation, SM clock, power.

* NVML handles are looked up once and cached; a side thread polls them at most 10 times a second.
* NVML numbers GPUs physically (PCI bus order); CUDA numbers the GPUs `CUDA_VISIBLE_DEVICES` lets through,
  in the order it lists them. `visible_devices` maps CUDA index -> NVML index: integer entries are
  physical indices, ``GPU-...`` entries are (prefixes of) UUIDs, ``MIG-...`` entries MIG instances
  (looked up by UUID when NVML supports it); like CUDA, the list stops at the first entry that matches
  nothing. Integer entries assume ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default orders the fastest GPU
  first, which differs from NVML's order only on machines with mixed GPUs; `Telemetry.notes` warns then).
* Without NVML (a CPU machine, no driver) telemetry is *unavailable*: `status` says why, reads return an
  empty list, and scheduling falls back to the cost model alone. Nothing here raises because of NVML.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .placement import Device

MIN_INTERVAL = 0.1  # seconds between polls: at most 10 Hz


@dataclass(frozen=True)
class DeviceStats:
    """One reading of one visible GPU (fields NVML does not support on that GPU are None).

    Attributes:
        cuda_index: the index CUDA (torch) uses.
        nvml_index: NVML's physical index (-1 for a MIG instance found by UUID).
        memory_free, memory_used, memory_total: bytes.
        utilization: percent of time a kernel ran over NVML's last sample period.
        sm_clock_mhz: current SM clock.
        power_w: board power draw in watts.
        timestamp: `time.time()` of the reading.
    """

    cuda_index: int
    nvml_index: int
    name: str
    uuid: str
    memory_free: int | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    utilization: int | None = None
    sm_clock_mhz: int | None = None
    power_w: float | None = None
    timestamp: float = 0.0


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_devices(nvml, count: int, visible: str | None) -> list[tuple[int, object]]:
    """``[(nvml_index, handle)]`` in CUDA order for a `CUDA_VISIBLE_DEVICES` value (None: all, NVML order)."""
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    if visible is None:
        return list(enumerate(handles))
    uuids = []
    for h in handles:
        try:
            uuids.append(_text(nvml.nvmlDeviceGetUUID(h)))
        except Exception:  # noqa: BLE001 - a GPU without a readable UUID can still be listed by index
            uuids.append("")
    out: list[tuple[int, object]] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            i = int(entry)
            if not 0 <= i < count:
                break  # CUDA ignores this entry and every one after it
            out.append((i, handles[i]))
        elif entry.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            if len(matches) != 1:
                break
            out.append((matches[0], handles[matches[0]]))
        elif entry.startswith("MIG-") and hasattr(nvml, "nvmlDeviceGetHandleByUUID"):
            try:
                out.append((-1, nvml.nvmlDeviceGetHandleByUUID(entry)))
            except Exception:  # noqa: BLE001
                break
        else:
            break
    return out


class Telemetry:
    """NVML readings of the visible GPUs, polled from a side thread.

    Args:
        interval: seconds between polls (>= 0.1, i.e. at most 10 Hz).
        nvml: the NVML module (default: ``import pynvml`` from nvidia-ml-py); tests pass a fake.
        visible: a `CUDA_VISIBLE_DEVICES` value (default: the environment's).

    Use as a context manager (polls while inside), or call `start`/`stop`, or `read` for one reading.
    """

    def __init__(self, interval: float = 0.5, *, nvml=None, visible: str | None = None):
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= MIN_INTERVAL:
            raise ValueError(f"interval must be >= {MIN_INTERVAL} seconds (at most 10 Hz), got {interval!r}")
        self.interval = float(interval)
        self.notes: list[str] = []
        self.reason = ""
        self.last_error: str | None = None
        self._nvml = None
        self._devices: list[tuple[int, object]] = []
        self._names: list[str] = []
        self._uuids: list[str] = []
        self._latest: list[DeviceStats] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if visible is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py
            nvml.nvmlInit()
            count = int(nvml.nvmlDeviceGetCount())
            self._devices = visible_devices(nvml, count, visible)
            self._names = [_text(nvml.nvmlDeviceGetName(h)) for _, h in self._devices]
            self._uuids = []
            for _, h in self._devices:
                try:
                    self._uuids.append(_text(nvml.nvmlDeviceGetUUID(h)))
                except Exception:  # noqa: BLE001
                    self._uuids.append("")
            self._nvml = nvml
        except Exception as exc:  # noqa: BLE001 - no NVML (no driver, no library, no permission): unavailable
            self._nvml = None
            self._devices = []
            self.reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return
        if not self._devices:
            self.reason = f"no visible GPU (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "no GPU"
        order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        if order != "PCI_BUS_ID" and len(set(self._names)) > 1:
            self.notes.append(
                "mixed GPUs and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA may number them differently from NVML; "
                "set CUDA_DEVICE_ORDER=PCI_BUS_ID"
            )

    # ---- state
    @property
    def available(self) -> bool:
        return self._nvml is not None and bool(self._devices)

    @property
    def status(self) -> str:
        """``"available: N GPU(s)"`` or ``"unavailable: <why>"`` (then scheduling uses the cost model only)."""
        if self.available:
            return f"available: {len(self._devices)} GPU(s) ({', '.join(self._names)})"
        return f"unavailable: {self.reason or 'NVML not initialised'}"

    @property
    def mapping(self) -> list[tuple[int, int]]:
        """``[(cuda_index, nvml_index)]`` of the visible GPUs."""
        return [(c, n) for c, (n, _) in enumerate(self._devices)]

    # ---- reading
    def read(self) -> list[DeviceStats]:
        """One reading of every visible GPU now ([] when unavailable); never raises."""
        if not self.available:
            return []
        nvml = self._nvml
        out = []
        now = time.time()
        for cuda_index, (nvml_index, h) in enumerate(self._devices):
            fields: dict = {}
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                fields.update(memory_free=int(mem.free), memory_used=int(mem.used), memory_total=int(mem.total))
            except Exception as exc:  # noqa: BLE001
                self.last_error = repr(exc)
            try:
                fields["utilization"] = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception as exc:  # noqa: BLE001
                self.last_error = repr(exc)
            try:
                fields["sm_clock_mhz"] = int(nvml.nvmlDeviceGetClockInfo(h, getattr(nvml, "NVML_CLOCK_SM", 1)))
            except Exception as exc:  # noqa: BLE001
                self.last_error = repr(exc)
            try:
                fields["power_w"] = float(nvml.nvmlDeviceGetPowerUsage(h)) / 1000.0
            except Exception as exc:  # noqa: BLE001
                self.last_error = repr(exc)
            out.append(
                DeviceStats(
                    cuda_index, nvml_index, self._names[cuda_index], self._uuids[cuda_index], **fields, timestamp=now
                )  # fmt: skip
            )
        return out

    def latest(self) -> list[DeviceStats]:
        """The side thread's last reading (a fresh `read` when the thread is not running)."""
        if self._thread is None:
            return self.read()
        with self._lock:
            return list(self._latest)

    # ---- polling thread
    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                stats = self.read()
            except Exception as exc:  # noqa: BLE001 - a poll must never kill the run
                self.last_error = repr(exc)
                stats = []
            with self._lock:
                self._latest = stats
            self._stop.wait(self.interval)

    def start(self) -> Telemetry:
        """Start polling (no-op when unavailable or already polling)."""
        if self.available and self._thread is None:
            self._stop.clear()
            self._latest = self.read()
            self._thread = threading.Thread(target=self._poll, name="mmpl-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5 * self.interval + 1)
            self._thread = None

    def __enter__(self) -> Telemetry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def close(self) -> None:
        """Stop polling and shut NVML down."""
        self.stop()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None

    # ---- for the scheduler
    def devices(self, speeds: Sequence[float] | None = None, reserve_bytes: int = 0) -> list[Device]:
        """A `Device` per visible GPU (``cuda:i (name)``) with its free memory minus `reserve_bytes`;
        [] when unavailable (the caller then describes devices itself)."""
        stats = self.latest()
        if speeds is not None and len(speeds) != len(stats):
            raise ValueError(f"speeds: expected {len(stats)} values (one per visible GPU), got {len(speeds)}")
        out = []
        for k, s in enumerate(stats):
            free = None if s.memory_free is None else max(0, s.memory_free - reserve_bytes)
            out.append(Device(f"cuda:{s.cuda_index} ({s.name})", speeds[k] if speeds else 1.0, free))
        return out
