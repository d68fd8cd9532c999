"""A benchmark's stages each in a process of its own, with their time and peak memory, so that what one stage
allocated (or the allocator kept) never counts in another's figures.

`in_child(stage)` forks: the parent has imported the libraries but computes nothing, so the child starts without
tensors and without a thread pool to inherit. Its peak is its own `ru_maxrss`, read with `os.wait4` for that one
child (`getrusage(RUSAGE_CHILDREN)` gives the largest over every child waited for so far). Inside a stage, `Phases`
times named phases and reads each one's peak after resetting the high-water mark (Linux `/proc/self/clear_refs`).

Resident memory (maxrss, VmHWM) counts the pages of memory-mapped files a process has read, such as a checkpoint
loaded with `mmap`: the kernel can drop those and read them again, so they bound what the process needs only
loosely. The anonymous peak (RssAnon: what the process allocated itself), polled every 20 ms by a thread, is the
memory it cannot do without; a spike shorter than the interval can escape it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GB = 1e9  # memory and files in GB (10**9 bytes)
POLL_SECONDS = 0.02


def memory_status() -> dict[str, float]:
    """This process's peak resident (VmHWM), resident, anonymous and file-backed memory in GB (Linux; zeros
    elsewhere)."""
    path = Path("/proc/self/status")
    text = path.read_text() if path.exists() else ""
    values = {key: re.search(rf"{key}:\s+(\d+) kB", text) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    return {key: int(match.group(1)) * 1024 / GB if match else 0.0 for key, match in values.items()}


class AnonymousPeak:
    """The largest anonymous resident memory seen, over the process (`overall`) and since `restart` (`phase`),
    polled by a daemon thread."""

    def __init__(self) -> None:
        self.overall = self.phase = 0.0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            self.sample()
            time.sleep(POLL_SECONDS)

    def sample(self) -> None:
        anonymous = memory_status()["RssAnon"]
        self.overall, self.phase = max(self.overall, anonymous), max(self.phase, anonymous)

    def restart(self) -> None:
        self.phase = 0.0
        self.sample()


class ProcessPeaks:
    """A child's peaks: the high-water marks it reset (each phase's starts afresh), and its anonymous peak."""

    def __init__(self) -> None:
        self.reset_peak = 0.0
        self.anonymous = AnonymousPeak()

    def reset(self) -> None:
        """Reset the high-water mark to the current resident memory, remembering the one it replaces."""
        self.reset_peak = max(self.reset_peak, memory_status()["VmHWM"])
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.anonymous.restart()


_PEAKS: ProcessPeaks | None = None  # this child's, when running in one


class Phases(dict):
    """Seconds, peak resident and peak anonymous memory (GB) of each named phase of a stage run by `in_child`."""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        gc.collect()
        if _PEAKS is not None:
            _PEAKS.reset()
        start = time.perf_counter()
        yield
        self[f"{name}_seconds"] = time.perf_counter() - start
        self[f"{name}_peak_gb"] = memory_status()["VmHWM"]
        if _PEAKS is not None:
            _PEAKS.anonymous.sample()
            self[f"{name}_anon_peak_gb"] = _PEAKS.anonymous.phase


def _run_in_child(stage: Callable[[], dict[str, Any]], prepare: Callable[[], None], write_end: int) -> None:
    """The forked child's part: prepare, run, send the results (or the traceback) as JSON, leave at once (without
    the parent's exit hooks)."""
    global _PEAKS
    try:
        _PEAKS = ProcessPeaks()
        prepare()
        load = os.getloadavg()[0]
        results = stage()
        _PEAKS.anonymous.sample()
        payload = {
            "results": results,
            "reset_peak_gb": _PEAKS.reset_peak,
            "anon_peak_gb": _PEAKS.anonymous.overall,
            "load_average": (load + os.getloadavg()[0]) / 2,
        }
    except BaseException:
        payload = {"error": traceback.format_exc()}
    with os.fdopen(write_end, "w") as pipe:
        json.dump(payload, pipe)
    os._exit(0)


def in_child(stage: Callable[[], dict[str, Any]], prepare: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """`stage()` in a forked child (after `prepare()` there): its results, with `peak_gb` its peak resident memory
    (`ru_maxrss`, or a high-water mark it reset before, if larger), `anon_peak_gb` its peak anonymous memory and
    `load_average` the machine's (1-minute, at its start and end). A failure is a `SystemExit` with the child's
    traceback."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _run_in_child(stage, prepare, write_end)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status, usage = os.wait4(pid, 0)
    payload = json.loads(text) if text else {"error": f"the child died (wait status {status})"}
    if "error" in payload:
        raise SystemExit(f"stage failed in its child process:\n{payload['error']}")
    peak = max(usage.ru_maxrss * 1024 / GB, payload["reset_peak_gb"])  # Linux: KiB
    extra = {key: payload[key] for key in ("anon_peak_gb", "load_average")}
    return {**payload["results"], "peak_gb": peak, **extra}


@contextlib.contextmanager
def timed(owner: Any, method: str, seconds: list[float]) -> Iterator[None]:
    """Append the duration of every call of `owner.method` to `seconds` meanwhile (an instance attribute shadowing
    the method, set as a plain attribute even on an `nn.Module`)."""
    original = getattr(owner, method)

    def timed_call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    object.__setattr__(owner, method, timed_call)
    try:
        yield
    finally:
        object.__delattr__(owner, method)


def available_gb() -> float:
    """The machine's available memory (Linux MemAvailable), NaN where unknown."""
    meminfo = Path("/proc/meminfo")
    match = re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()) if meminfo.exists() else None
    return int(match.group(1)) * 1024 / GB if match else math.nan


def machine() -> str:
    """The CPU's model name (as lscpu gives it), family and model, its widest vector and bf16 instructions (the same
    model name covers CPUs of very different speeds), its cores and the memory."""
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    fields = {
        key: re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE) for key in ("model name", "cpu family", "model")
    }
    name, family, model = (match.group(1).strip() if match else "?" for match in fields.values())
    flags = set(match.group(1).split()) if (match := re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)) else set()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "bf16 instructions" if flags & {"avx512_bf16", "amx_bf16"} else "no bf16 instructions"
    memory = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text()) if meminfo.exists() else None
    total = f", {int(memory.group(1)) * 1024 / GB:.1f} GB ({int(memory.group(1)) / 2**20:.1f} GiB)" if memory else ""
    return f"{name} (family {family}, model {model}; {vector}, {bf16}), {os.cpu_count()} cores{total}"


__all__ = ["GB", "Phases", "available_gb", "in_child", "machine", "memory_status", "timed"]
