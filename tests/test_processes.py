"""The accelerate state a process joins: launched processes on a machine without CUDA ask for CPU mode (gloo), so
they share the work instead of each doing all of it (the two-process runs are in test_sample_cli, test_evaluate
and test_train)."""

from __future__ import annotations

import pytest
import torch

from tarflow_hf.processes import process_state, use_cpu


@pytest.mark.parametrize(
    ("env", "cuda", "requested", "expected"),
    [
        ({}, False, False, False),  # one plain process: accelerate picks the device
        ({}, False, True, True),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False, False, True),
        ({"LOCAL_RANK": "1"}, False, False, True),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, True, False, False),  # GPUs: one per process, NCCL
    ],
)
def test_launched_processes_without_cuda_use_cpu_mode(monkeypatch, env, cuda, requested, expected):
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert use_cpu(requested) is expected


def test_a_plain_process_is_alone():
    state = process_state()
    assert state.num_processes == 1 and state.process_index == 0 and state.is_main_process
    with state.split_between_processes([1, 2, 3]) as mine:
        assert mine == [1, 2, 3]
