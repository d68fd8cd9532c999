"""benchmarks/half_products.py: both routes of half-precision products are timed on the same work, agree to bf16's
precision, and leave the machine's answer as it was."""

from __future__ import annotations

import json

import pytest
import torch
from test_benchmarks import benchmark

from tarflow_hf import products

half_products = benchmark("half_products")


def test_both_routes_are_timed_on_the_same_work_and_agree(tmp_path):
    machine = products._HALF_INSTRUCTIONS
    results = half_products.main(["--width", "64", "--preset", "tiny", "--repeats", "1", "--json", str(tmp_path / "r")])
    assert products._HALF_INSTRUCTIONS is machine  # the routes are set for the benchmark only
    assert results["bf16_instructions"] == products.half_products_native(torch.bfloat16)
    for name in ("decoding", "text_prefix", "denoising"):
        assert results[f"product_{name}_speedup_over_aten"] > 0
    for name in ("sampling", "denoising"):
        assert results[f"{name}_bf16_ours_seconds"] > 0 and results[f"{name}_speedup_over_float32"] > 0
        assert results[f"{name}_ours_max_abs_deviation_from_aten"] < 0.05  # bf16 rounding, not another result
    assert json.loads((tmp_path / "r").read_text()) == json.loads(json.dumps(results))


def test_each_route_answers_as_a_machine_of_its_kind():
    with half_products.route(native=False):
        assert not products.half_products_native(torch.bfloat16) and products.half_products_native(torch.float32)
    with half_products.route(native=True):
        assert products.half_products_native(torch.bfloat16)


@pytest.mark.parametrize("flag", ["--width", "--repeats"])
def test_a_width_or_repeats_below_one_is_one_line(flag, capsys):
    with pytest.raises(SystemExit):
        half_products.main([flag, "0"])
    assert f"{flag} must be a positive whole number, got 0" in capsys.readouterr().err
