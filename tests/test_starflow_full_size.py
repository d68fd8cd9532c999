"""benchmarks/starflow_full_size.py at a reduced width, offline and without Apple's code: a random checkpoint in
Apple's key layout (our converter's reverse), `tarflow-hf convert`, `from_single_file`, and one image each with bf16
int8 and int4 weights and both samplers, every stage in a child process of its own; and the pieces it measures with."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from test_benchmarks import benchmark

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.convert_starflow import RELEASED_YAML, apple_settings
from tarflow_hf.modeling_starflow import StarFlowModel

full_size = benchmark("starflow_full_size")
SMALL = ["--width", "64", "--deep-layers", "2", "--image-size", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole benchmark once, its files kept: (results, the work folder, the JSON file's contents)."""
    folder = tmp_path_factory.mktemp("full_size")
    json_path = folder / "results.json"
    results = full_size.main([*SMALL, "--workdir", str(folder / "work"), "--keep", "--json", str(json_path)])
    return results, full_size.Paths(folder / "work"), json.loads(json_path.read_text())


def test_every_stage_ran_in_its_own_child_and_the_json_holds_the_results(run):
    results, _, written = run
    assert written == json.loads(json.dumps(results))
    assert results["checkpoint_built_with"] == "ours"  # no Apple checkout: our converter's reverse
    children = ["checkpoint", "components", "convert_transformer", "convert_pipeline", "load_pretrained",
                "load_single_file", *(f"{w}_{s}" for w, s in full_size.SETTINGS), "deep_tokens"]  # fmt: skip
    for child in children:
        assert results[f"{child}_peak_gb"] > 0.05, child
        phases = [key for key in results if key.startswith(child) and key.endswith("_peak_gb")]
        for phase in phases:  # a phase's peak (after a reset) is never above its process's peak
            assert results[phase] <= results[f"{child}_peak_gb"] + 1e-3, phase


def test_the_checkpoint_is_apples_released_layout_at_the_reduced_width(run):
    results, paths, _ = run
    config = StarFlowConfig(**json.loads((paths.pipeline / "transformer" / "config.json").read_text()))
    assert config.layers_per_block == [2, 2, 2, 2, 2, 2] and config.hidden_size == 64
    assert config.max_text_length == RELEASED_YAML["txt_size"] and config.sample_size == 64 // 8
    assert config.text_hidden_size == 64  # the reduced text encoder's width, read off proj_txt
    model = StarFlowModel.from_single_file(paths.checkpoint, config=paths.yaml)
    assert results["checkpoint_parameters"] == model.num_parameters()
    assert all(block.proj_out.weight.abs().sum() > 0 for block in model.blocks)  # no block is the identity


def test_both_loads_give_a_bf16_pipeline(run):
    results, _, _ = run
    assert results["load_pretrained_transformer_dtype"] == results["load_single_file_transformer_dtype"]
    assert results["load_single_file_transformer_dtype"] == "torch.bfloat16"


def test_each_setting_draws_an_image_with_its_weights_and_sampler(run):
    results, paths, _ = run
    tokens = (64 // 8) ** 2
    latents = {}
    for weights, sampler in full_size.SETTINGS:
        name = f"{weights}_{sampler}"
        image = np.asarray(PIL.Image.open(paths.outputs / f"{name}.png"))
        assert image.shape == (64, 64, 3) and image.std() > 0, name
        assert (weights in results[f"{name}_weights"]) == (weights != full_size.BFLOAT16)
        assert (results[f"{name}_quantized_layers"] >= 24) == (weights != full_size.BFLOAT16)  # qkv, proj, fc1, fc2
        passes = results[f"{name}_transformer_passes"]
        # sequential: every token of the 6 blocks; Jacobi: the deep block exact, the shallow ones in fewer passes
        assert passes == 6 * tokens if sampler == "sequential" else tokens <= passes < 6 * tokens, name
        parts = ("deep_block", "shallow_blocks", "denoise")
        assert sum(results[f"{name}_{part}_seconds"] for part in parts) <= results[f"{name}_sample_seconds"]
        latents[name] = torch.load(paths.outputs / f"{name}_latents.pt")
    scale = latents["bf16_sequential"].abs().max()
    for name, value in latents.items():  # int8, int4 and Jacobi land near bf16's exact sample
        assert torch.isfinite(value).all() and (value - latents["bf16_sequential"]).abs().max() < 0.2 * scale, name


def test_goals_are_reported_and_apples_speedups_need_its_code(run):
    results, _, _ = run
    goals = {key: value for key, value in results.items() if key.startswith("goal_")}
    assert len(goals) == 7
    assert goals["goal_bf16_deep_token_speedup"] == "not measured"
    ratio = results["convert_transformer_peak_gb"] / results["checkpoint_file_gb"]
    assert goals["goal_conversion_peak_vs_file"].startswith("met" if ratio <= 1.15 else "missed")
    assert results["deep_tokens_deviations_from"] == "our float32"
    assert results["deep_tokens_bf16_max_abs_deviation"] < 0.5 and results["deep_tokens_int8_max_abs_deviation"] < 0.5


def test_without_keep_only_what_the_run_wrote_is_removed(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("not the benchmark's")
    full_size.main([*SMALL, "--workdir", str(work), "--stages", "checkpoint"])
    assert sorted(path.name for path in work.iterdir()) == ["mine.txt"]


# --------------------------------------------------------------------------------------------- the pieces
def test_the_written_yaml_is_apples_format_with_the_layout_in_it(tmp_path):
    layout = full_size.Layout(width=128, deep_layers=3, image_size=64)
    path = tmp_path / "config.yaml"
    path.write_text(full_size.layout_yaml(full_size.released_yaml_text(None), layout))
    settings = apple_settings(path)
    assert settings.get("channels") == 128 and settings.get("layers_per_block") == [2, 2, 2, 2, 2, 3]
    assert settings.get("img_size") == 64 and settings.get("txt_size") == RELEASED_YAML["txt_size"]
    config = full_size.our_config(path, text_width=96)
    assert (config.hidden_size, config.sample_size, config.text_hidden_size) == (128, 8, 96)


def test_an_unknown_setting_is_one_line_naming_the_settings(capsys):
    with pytest.raises(SystemExit):
        full_size.main([*SMALL, "--settings", "bf16_sequential,fp8_sequential"])
    assert (
        "--settings: fp8_sequential not among bf16_sequential, bf16_jacobi, int8_sequential" in capsys.readouterr().err
    )


def test_an_unknown_weight_format_to_compile_is_one_line(capsys):
    with pytest.raises(SystemExit):
        full_size.main([*SMALL, "--compiled-deep-tokens", "int8,fp8"])
    assert "--compiled-deep-tokens: fp8 not among float32, bf16, int8" in capsys.readouterr().err
