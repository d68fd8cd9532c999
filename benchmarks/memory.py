"""Peak memory of a process: the high-water mark of its own resident memory.

`resource.getrusage(...).ru_maxrss` cannot measure a child: Linux carries the parent's high-water mark into a child
started by fork or vfork and exec (Python's `subprocess` uses vfork), so the child of a parent that once held 6 GB
reports at least 6 GB, whatever it used itself (`RUSAGE_CHILDREN` and `os.wait4` report the same number). The
`VmHWM` line of `/proc/self/status` belongs to the process's own address space, which exec replaces. A module that
is not ours (the command line) is measured by running it under this one:

    python -m benchmarks.memory PEAK_FILE MODULE [ARGS...]   # `python -m MODULE ARGS...`, then its peak to PEAK_FILE
"""

from __future__ import annotations

import resource
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATUS = Path("/proc/self/status")


def peak_resident_mib() -> float:
    """This process's peak resident memory in MiB: `VmHWM` where /proc has it (Linux), else `ru_maxrss` (which is
    this process's own where a new process does not inherit the parent's mark; Linux reports KiB)."""
    if STATUS.is_file():
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_module_measuring_peak(module: str, arguments: list[str]) -> tuple[float, float]:
    """Run `python -m MODULE ARGUMENTS` in a child (its output discarded, an error raised if it fails). -> (its
    seconds, its own peak resident memory in MiB)"""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak_mib"
        command = [sys.executable, "-m", __spec__.name, str(peak_file), module, *arguments]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        return seconds, float(peak_file.read_text())


def main(argv: list[str]) -> None:
    peak_file, module, *arguments = argv
    sys.argv = [module, *arguments]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_request:  # the module's own exit status is this process's
        status = exit_request.code
    finally:
        Path(peak_file).write_text(f"{peak_resident_mib()}\n")
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
