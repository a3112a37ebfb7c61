"""GPU telemetry from NVML (nvidia-ml-py) on a background thread; process CPU / RSS on a CPU run."""

from __future__ import annotations

import socket
import sys
import threading

from engine.protocol import GpuStat, Telemetry
from engine.util import printable

_THROTTLE = {
    0x1: "gpu_idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal",
    0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks",
}


def sample_gpus(pynvml, handles) -> list[GpuStat]:
    out = []
    for i, h in handles:
        def get(fn, *a, default=0.0, h=h):
            try:
                return fn(h, *a)
            except Exception:  # NVMLError, or a query this driver / library does not have
                return default
        mem = get(pynvml.nvmlDeviceGetMemoryInfo, default=None)
        util = get(pynvml.nvmlDeviceGetUtilizationRates, default=None)
        reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        reasons = int(get(reasons_fn, default=0))
        name = get(pynvml.nvmlDeviceGetName, default="")
        out.append(GpuStat(
            index=i, name=name.decode() if isinstance(name, bytes) else str(name),
            util=float(util.gpu) if util else 0.0,
            mem_used=mem.used / 2**30 if mem else 0.0, mem_total=mem.total / 2**30 if mem else 0.0,
            power=get(pynvml.nvmlDeviceGetPowerUsage) / 1000.0,
            temp=float(get(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)),
            sm_clock=float(get(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)),
            throttle=[n for bit, n in _THROTTLE.items() if reasons & bit and bit != 0x1],
        ))
    return out


class TelemetryThread(threading.Thread):
    """Samples every ``interval`` seconds and hands a Telemetry event to ``emit``. What fails is said once
    on stderr (NVML that will not start: no GPU figures; a sample or its ``emit``: that sample is skipped),
    and never stops the thread or the run."""

    def __init__(self, emit, interval: float, gpu_indices: list[int] | None, rank: int = 0) -> None:
        super().__init__(name="voxtui-telemetry", daemon=True)
        self.emit, self.interval, self.rank = emit, interval, rank
        self.gpu_indices = gpu_indices
        self._halt = threading.Event()  # not ``_stop``: threading.Thread has a method of that name (join calls it)
        self._said: set[str] = set()

    def _say_once(self, what: str, e: BaseException) -> None:
        if what not in self._said:
            self._said.add(what)
            print(printable(f"[voxtui] telemetry: {what}: {type(e).__name__}: {e}"), file=sys.stderr, flush=True)

    def run(self) -> None:
        host = socket.gethostname()
        pynvml = handles = None
        if self.gpu_indices:
            try:
                import pynvml as _nvml

                _nvml.nvmlInit()
                pynvml = _nvml
                handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in self.gpu_indices]
            except Exception as e:
                pynvml = None
                self._say_once("no GPU figures (NVML did not start)", e)
        import psutil

        proc = psutil.Process()
        proc.cpu_percent(None)
        while not self._halt.wait(self.interval):
            try:
                ev = Telemetry(host=host, rank=self.rank, cpu_percent=proc.cpu_percent(None),
                               rss=proc.memory_info().rss / 2**30,
                               mem_used_frac=psutil.virtual_memory().percent / 100)
                if pynvml is not None:
                    ev.gpus = sample_gpus(pynvml, handles)
                self.emit(ev)
            except Exception as e:
                self._say_once("a sample failed and was skipped (further failures go unsaid)", e)
        if pynvml is not None:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass

    def stop(self) -> None:
        self._halt.set()
