"""benchmarks/image_time_bound.py: the weights it counts are the layout's (checked against the transformer's
arithmetic), its floors follow from the rates it measured, and a goal below a floor is called out of reach."""

from __future__ import annotations

import json

import pytest
from test_benchmarks import benchmark

bound = benchmark("image_time_bound")

WIDTH, DEEP_LAYERS, IMAGE_SIZE = 64, 2, 64


def expected_linear_weights(width: int, deep_layers: int, patch_dim: int, text_width: int) -> list[int]:
    """A transformer layer holds qkv (3 W^2), the attention's output (W^2) and an MLP of ratio 4 (8 W^2); each
    block projects a patch in and (scale, shift) out; the deep block also projects the text in."""
    layers = [2] * 5 + [deep_layers]
    ends = patch_dim * width + width * 2 * patch_dim
    return [count * 12 * width * width + ends + (text_width * width if i == 5 else 0) for i, count in enumerate(layers)]


def test_the_floors_follow_from_the_counted_weights_and_the_measured_rates(tmp_path):
    path = tmp_path / "bound.json"
    argv = ["--width", str(WIDTH), "--deep-layers", str(DEEP_LAYERS), "--image-size", str(IMAGE_SIZE)]
    results = bound.main([*argv, "--repeats", "1", "--threads", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))

    config = bound.layout_config(bound.Layout(WIDTH, DEEP_LAYERS, IMAGE_SIZE))
    weights = expected_linear_weights(WIDTH, DEEP_LAYERS, config.patch_dim, config.text_hidden_size)
    assert results["linear_weights"] == sum(weights)
    tokens = (IMAGE_SIZE // 8) ** 2  # the VAE's 8x downsampling, patch 1
    assert results["tokens"] == tokens
    assert results["machine"] == benchmark("stage_memory").machine()  # whose rates these are

    bandwidth = results["streaming_read_gb_per_s"] * 1e9
    deep_read = (tokens - 1) * weights[-1] * 2 / bandwidth  # bf16: 2 bytes a weight, every weight once a step
    assert results["bf16_deep_block_read_floor_seconds"] == pytest.approx(deep_read, rel=1e-9)
    assert results["int8_deep_block_read_floor_seconds"] == pytest.approx(deep_read / 2, rel=1e-9)
    flops = max(value for key, value in results.items() if key.endswith("_product_gflops")) * 1e9
    rows = [tokens + (config.max_text_length if i == 5 else 0) for i in range(6)]
    denoise = sum(4 * count * n for count, n in zip(weights, rows, strict=True)) / flops
    assert results["denoise_floor_seconds"] == pytest.approx(denoise, rel=1e-9)
    any_sampler = denoise + sum(2 * count * 2 * tokens for count in weights) / flops
    assert results["any_sampler_floor_seconds"] == pytest.approx(any_sampler, rel=1e-9)
    for name in ("bf16", "int8", "int4"):
        exact, jacobi = results[f"{name}_exact_floor_seconds"], results[f"{name}_shallow_jacobi_floor_seconds"]
        assert any_sampler <= jacobi * (1 + 1e-12) and jacobi <= exact * (1 + 1e-12)
        assert exact >= denoise + results[f"{name}_deep_block_read_floor_seconds"] * (1 - 1e-12)


def test_a_goal_below_the_floor_is_out_of_reach_and_one_above_is_not_ruled_out():
    weights = expected_linear_weights(3072, 24, 4, 2048)
    # A machine that reads 10 GB/s and multiplies at 100 GFLOP/s: the deep block alone reads 2.8 TB in int8.
    slow = bound.floors(weights, 5, 1024, 128, bytes_per_second=10e9, flops_per_second=100e9)
    assert slow["int8_deep_block_read_floor_seconds"] == pytest.approx(1023 * weights[5] / 10e9)
    assert slow["goal_int8_image_minutes"].endswith("out of reach (the floor is above the goal)")
    assert slow["goal_bf16_image_minutes"].endswith("out of reach (the floor is above the goal)")
    fast = bound.floors(weights, 5, 1024, 128, bytes_per_second=3e12, flops_per_second=500e12)  # a GPU's figures
    assert fast["goal_int8_image_minutes"].endswith("not ruled out")
    assert fast["goal_bf16_image_minutes"].endswith("not ruled out")


def test_a_width_that_is_no_multiple_of_the_head_size_is_one_line(capsys):
    with pytest.raises(SystemExit):
        bound.main(["--width", "100"])
    assert "--width must be a positive multiple of 64, got 100" in capsys.readouterr().err
