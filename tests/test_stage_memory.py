"""benchmarks/stage_memory.py: a stage in a forked child reports its own time and peaks, resident and anonymous, and
a phase's peak is its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_benchmarks import benchmark

stage_memory = benchmark("stage_memory")
MB = 1_000_000


def test_a_child_reports_its_own_peak_and_phases_their_own():
    def allocate() -> dict:
        phases = stage_memory.Phases()
        with phases("big"):
            big = torch.ones(200 * MB, dtype=torch.uint8)  # written, so resident
            del big
        with phases("small"):
            small = torch.ones(20 * MB, dtype=torch.uint8)
            del small
        return dict(phases)

    quiet = stage_memory.in_child(lambda: {})
    results = stage_memory.in_child(allocate)
    assert results["peak_gb"] >= quiet["peak_gb"] + 0.19  # the big phase's, though the small one reset the mark
    assert results["big_peak_gb"] >= results["small_peak_gb"] + 0.15
    assert results["big_anon_peak_gb"] >= results["small_anon_peak_gb"] + 0.15
    assert results["big_seconds"] > 0 and results["load_average"] >= 0


def test_a_mapped_file_is_resident_but_not_anonymous(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(300 * MB))

    def read_mapped() -> dict:
        mapped = torch.from_file(str(path), shared=False, size=300 * MB, dtype=torch.uint8)
        return {"sum": int(mapped.view(torch.int64).sum())}  # every page read, nothing copied

    quiet = stage_memory.in_child(lambda: {})
    results = stage_memory.in_child(read_mapped)
    assert results["peak_gb"] >= quiet["peak_gb"] + 0.28
    assert results["anon_peak_gb"] <= quiet["anon_peak_gb"] + 0.1


def test_a_failing_stage_is_one_message_with_the_childs_traceback():
    def fail() -> dict:
        raise ValueError("broken on purpose")

    with pytest.raises(SystemExit, match="broken on purpose"):
        stage_memory.in_child(fail)


def test_timed_records_each_call_and_leaves_the_method_as_it_was():
    class Clock:
        def tick(self, value: int) -> int:
            return value + 1

    clock, seconds = Clock(), []
    with stage_memory.timed(clock, "tick", seconds):
        assert clock.tick(1) == 2 and clock.tick(2) == 3
    assert len(seconds) == 2 and "tick" not in vars(clock)


def test_the_machine_names_its_cpu_family_and_whether_it_has_avx512_and_bf16():
    """One model name ("AMD EPYC") covers CPUs of very different speeds: the description tells them apart."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE).group(1).split())
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.MULTILINE).group(1)
    described = stage_memory.machine()
    assert f"family {family}," in described
    assert ("AVX-512" in described) == ("avx512f" in flags)
    assert ("no bf16 instructions" in described) == (not flags & {"avx512_bf16", "amx_bf16"})
