"""The benchmarks still run on the current API: the sampling benchmark of both families on their tiny presets (a
few seconds, without Apple's code), the pieces of the anatomy benchmarks that touch the samplers, and the loading of
Apple's checkouts (on a stand-in checkout)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import random_model, tiny_config

from tarflow_hf.guidance import Guidance, GuidanceRule
from tarflow_hf.samplers import SequentialSampler, sample_sequential

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str) -> ModuleType:
    """`benchmarks.NAME`, the package loaded from the repository root (as `python -m benchmarks.NAME` runs it from
    there) when pytest did not start there."""
    if "benchmarks" not in sys.modules:
        folder = ROOT / "benchmarks"
        spec = importlib.util.spec_from_file_location(
            "benchmarks", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"benchmarks.{name}")


def test_round_robin_reverses_every_other_round_so_neighbours_run_back_to_back():
    timing = benchmark("timing")
    calls = []
    samplers = {name: (lambda name=name: calls.append(name) or name.upper()) for name in ("ours", "apple", "other")}
    rounds = timing.round_robin(samplers, repeats=2)
    warm_up, first, second = calls[:3], calls[3:6], calls[6:]
    assert warm_up == first == ["ours", "apple", "other"] and second == ["other", "apple", "ours"]
    assert rounds.results == {"ours": "OURS", "apple": "APPLE", "other": "OTHER"}
    assert all(len(rounds.wall[name]) == len(rounds.cpu[name]) == 2 for name in samplers)


def test_paired_speedup_is_the_median_of_each_rounds_ratio():
    timing = benchmark("timing")
    times = {"fast": [1.0, 2.0, 4.0], "slow": [3.0, 2.0, 8.0]}  # rounds' ratios 3, 1, 2
    assert timing.paired_speedup(times, "fast", "slow") == 2.0
    assert timing.per_round_ratios(times, "fast", "slow") == "3.00, 1.00, 2.00"


def test_a_childs_peak_memory_is_its_own_not_the_parents():
    memory = benchmark("memory")
    parent_peak = memory.peak_resident_mib()  # this process has torch loaded: hundreds of MiB
    seconds, child_peak = memory.run_module_measuring_peak("platform", [])  # prints a line, a few MiB
    assert 0 < child_peak < parent_peak / 4 and seconds > 0
    with pytest.raises(subprocess.CalledProcessError):
        memory.run_module_measuring_peak("benchmarks.no_such_module", [])


def test_tarflow_sampling_benchmark_on_the_tiny_preset(tmp_path):
    sampling = benchmark("sampling")
    json_path = tmp_path / "results.json"
    results = sampling.main(
        ["--preset", "tiny", "--batch-size", "4", "--repeats", "2", "--newton", "--json", str(json_path)]
    )
    preset = sampling.PRESETS["tiny"]
    exact_passes = preset["num_blocks"] * ((preset["image_size"] // preset["patch_size"]) ** 2 - 1)
    assert results["sequential_passes_exact"] == exact_passes
    for name in ("jacobi", "newton"):
        assert 1 <= results[f"{name}_sequential_passes"] <= exact_passes
        assert results[f"{name}_max_abs_deviation_01"] < 1e-3  # the default tolerance, 1e-4, in model space
    assert results["exact_images_per_s"] > 0 and results["weight_packing_speedup"] > 0
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))


def test_starflow_sampling_benchmark_on_the_tiny_preset():
    sampling = benchmark("sampling")
    results = sampling.main(["--family", "starflow", "--preset", "tiny", "--batch-size", "2", "--repeats", "2"])
    config = sampling.sampling_starflow.PRESETS["tiny"]
    exact_passes = len(config["layers_per_block"]) * config["sample_size"] ** 2
    assert results["sequential_passes_exact"] == exact_passes
    assert results["exact_max_abs_deviation_from_unpacked"] < 1e-4  # packed weights change rounding only
    assert results["jacobi_max_abs_deviation_from_exact"] < 1e-2
    for name in ("block_jacobi", "jacobi", "coarse_jacobi", "shallow_jacobi"):
        assert results[f"{name}_passes"] >= 1, name
    assert "sequential_blocks=1" in results["shallow_jacobi_sampler"]
    assert "original_images_per_s" not in results  # no Apple checkout given


def test_starflow_benchmark_refuses_a_tarflow_only_preset():
    with pytest.raises(SystemExit, match="imagenet64"):
        benchmark("sampling").main(["--family", "starflow", "--preset", "imagenet64"])


def test_timed_sequential_sampler_samples_exactly_and_times_every_block():
    decode_anatomy = benchmark("decode_anatomy")
    model = random_model(tiny_config())
    noise = torch.randn(2, model.config.num_patches, model.config.patch_dim, generator=torch.Generator().manual_seed(0))
    timed = decode_anatomy.TimedSequentialSampler()
    images = model.inverse(noise, [0, 1], guidance_scale=2.0, sampler=timed)
    torch.testing.assert_close(images, model.inverse(noise, [0, 1], guidance_scale=2.0, sampler=SequentialSampler()))
    assert len(timed.block_seconds) == model.config.num_blocks and min(timed.block_seconds) > 0


def test_jacobi_map_has_the_exact_inverse_as_its_fixed_point():
    jacobi_anatomy = benchmark("jacobi_anatomy")
    model = random_model(tiny_config())
    block = model.blocks[-1]
    z = torch.randn(1, model.config.num_patches, model.config.patch_dim, generator=torch.Generator().manual_seed(1))
    condition = block.sampling_condition(torch.tensor([2]), 1, Guidance(2.0, GuidanceRule()))
    with torch.no_grad():
        exact, _ = sample_sequential(block, z, condition)
        apply = jacobi_anatomy.jacobi_map(block, z, condition)
        torch.testing.assert_close(apply(exact), exact, atol=1e-5, rtol=0)
        assert (apply(z) - z).abs().max() > 1e-3  # the latents themselves are not a fixed point


def test_apple_checkout_loads_with_its_siblings_and_leaves_sys_path_alone(tmp_path, monkeypatch):
    apple_model = benchmark("apple_model")
    (tmp_path / "stand_in_sibling").mkdir()
    (tmp_path / "stand_in_sibling" / "__init__.py").write_text("WIDTH = 7\n")
    (tmp_path / "transformer_flow.py").write_text("from stand_in_sibling import WIDTH\n")
    monkeypatch.delitem(sys.modules, "stand_in_sibling", raising=False)
    path_before = list(sys.path)
    module = apple_model.load_ml_starflow(tmp_path)
    monkeypatch.delitem(sys.modules, "stand_in_sibling")
    assert module.WIDTH == 7
    assert sys.path == path_before


def test_a_folder_that_is_not_an_apple_checkout_is_one_line(tmp_path):
    apple_model = benchmark("apple_model")
    with pytest.raises(SystemExit, match=r"no transformer_flow\.py"):
        apple_model.load_ml_tarflow(tmp_path)
    with pytest.raises(SystemExit, match="apple/ml-starflow"):
        apple_model.load_ml_starflow(tmp_path)
