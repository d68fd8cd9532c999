"""The family registry: which family a folder or name holds, read without loading anything; damaged folders named
in one line before loading; `AutoFlowPipeline` returning each family's pipeline."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import random_model

import tarflow_hf
from tarflow_hf import AutoFlowPipeline, StarFlowPipeline, TarFlowPipeline
from tarflow_hf.registry import (
    MAX_NAME_LENGTH,
    STARFLOW,
    TARFLOW,
    check_pipeline_folder,
    family_of,
    family_of_folder,
    is_flow_folder,
    resolve_model_name,
)


@pytest.fixture(scope="module")
def tarflow_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("registry") / "tarflow"
    TarFlowPipeline(transformer=random_model(seed=5)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def starflow_folder(tmp_path_factory) -> Path:
    from test_pipeline_starflow import make_pipe

    folder = tmp_path_factory.mktemp("registry") / "starflow"
    make_pipe().save_pretrained(folder)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_families_are_read_from_the_folders_files(tarflow_folder, starflow_folder, tmp_path):
    assert family_of_folder(tarflow_folder) is TARFLOW and family_of_folder(starflow_folder) is STARFLOW
    assert family_of(tarflow_hf.BUNDLED_MODEL) is TARFLOW and family_of("bundled") is TARFLOW
    assert family_of_folder(starflow_folder / "transformer") is STARFLOW  # a model folder, by its config.json
    model_only = tmp_path / "model_only"
    shutil.copytree(starflow_folder / "transformer", model_only / "transformer")  # a --transformer-only output
    assert family_of_folder(model_only) is STARFLOW and is_flow_folder(model_only)
    assert not is_flow_folder(tmp_path / "missing") and not is_flow_folder(Path(__file__).parent)


def test_auto_flow_pipeline_returns_each_familys_pipeline(tarflow_folder, starflow_folder):
    tarflow = AutoFlowPipeline.from_pretrained(tarflow_folder)
    starflow = AutoFlowPipeline.from_pretrained(starflow_folder)
    assert type(tarflow) is TarFlowPipeline and type(starflow) is StarFlowPipeline
    assert type(AutoFlowPipeline.from_pretrained("bundled")) is TarFlowPipeline
    assert AutoFlowPipeline.from_pretrained(tarflow_folder, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
    with pytest.raises(OSError, match="not instantiable"):
        AutoFlowPipeline()


def test_another_programs_folder_is_named_as_such(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"names the pipeline 'StableDiffusionPipeline', not a TarFlow or STARFlow"):
        family_of_folder(tmp_path / "sd")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"is a 'bert' model, not a TarFlow or STARFlow one"):
        family_of_folder(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"is not a TarFlow or STARFlow folder \(no model_index.json"):
        family_of_folder(tmp_path)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("", ValueError, "no model given"),
        ("x" * (MAX_NAME_LENGTH + 1), ValueError, f"model name of {MAX_NAME_LENGTH + 1} characters"),
        ("nowhere/at/all", FileNotFoundError, "is neither an existing folder nor a Hub repo id"),
        ("a" * 97 + "/b", FileNotFoundError, "is neither an existing folder nor a Hub repo id"),  # over the Hub's 96
        ("a--b/c", FileNotFoundError, "is neither an existing folder nor a Hub repo id"),
    ],
)
def test_bad_model_names_are_one_line(name, error, message):
    with pytest.raises(error, match=message) as raised:
        resolve_model_name(name)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400


def damage(kind: str, folder: Path) -> None:
    """What a user's disk or editor does to a saved folder."""
    weights = folder / "transformer" / "model.safetensors"
    config = folder / "transformer" / "config.json"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage weights":
        weights.write_bytes(b"not a tensor file" * 64)
    elif kind == "config of the wrong type":
        config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": "32"'))
    elif kind == "no transformer config":
        config.unlink()
    elif kind == "index that is not JSON":
        (folder / "model_index.json").write_text("{not json")
    elif kind == "missing component":
        shutil.rmtree(folder / "sampler")


DAMAGE = {
    "truncated weights": (ValueError, r"model.safetensors is not a readable safetensors file \(.*\): truncated"),
    "garbage weights": (ValueError, r"model.safetensors is not a readable safetensors file"),
    "config of the wrong type": (ValueError, r"config.json: .*'hidden_size' expected int, got str \(value: '32'\)"),
    "no transformer config": (FileNotFoundError, r"transformer/config.json is missing: the folder has no model"),
    "index that is not JSON": (ValueError, r"model_index.json is not valid JSON \(.* at line 1\); restore or re-save"),
    "missing component": (FileNotFoundError, r"sampler is missing: model_index.json names a SequentialSampler there"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_folder_is_one_line_naming_the_file_before_loading(kind, tarflow_folder, tmp_path):
    folder = copy_of(tarflow_folder, tmp_path)
    damage(kind, folder)
    error, message = DAMAGE[kind]
    for load in (AutoFlowPipeline.from_pretrained, TarFlowPipeline.from_pretrained):
        start = time.perf_counter()
        with pytest.raises(error, match=message) as raised:
            load(folder)
        assert "\n" not in str(raised.value) and time.perf_counter() - start < 30


@pytest.mark.parametrize("channels", [[], "abc", [128, -1], [64, 64.5]])
def test_a_vae_config_with_bad_block_out_channels_is_named(channels, starflow_folder, tmp_path):
    folder = copy_of(starflow_folder, tmp_path)
    config_file = folder / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "block_out_channels": channels}))
    with pytest.raises(ValueError, match=r"vae/config.json: block_out_channels must be a non-empty list of positive"):
        check_pipeline_folder(folder)
    with pytest.raises(ValueError, match=r"block_out_channels must be a non-empty list of positive integers, got"):
        AutoFlowPipeline.from_pretrained(folder)
