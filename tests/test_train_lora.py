"""LoRA fine-tuning (`tarflow-hf train --lora-rank`): only the adapter trains (the base weights stay bit for bit),
the run writes the adapter alone as diffusers names it with a LoRA card, a fresh pipeline that loads it samples what
the trained model samples (TarFlow on labelled folders, STARFlow on captions), resume is exact, the upload is the
adapter folder, and flags that cannot work are one line before anything loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import parse_train_args as parse
from conftest import reset_accelerate, train_as_the_command_line
from huggingface_hub import ModelCard
from safetensors import safe_open
from test_lora import LoraStarFlowPipeline, LoraTarFlowPipeline
from test_train import hub_online_with_a_token
from test_train_finetune import tiny_pipeline, write_value_folder
from test_train_starflow import tiny_pipeline as tiny_starflow_pipeline
from test_train_starflow import write_captioned_folder

from tarflow_hf import registry
from tarflow_hf.commands import main as cli_main
from tarflow_hf.lora import LORA_WEIGHT_NAME_SAFE, loaded_adapters
from tarflow_hf.pipeline_starflow import StarFlowPipeline
from tarflow_hf.pipeline_tarflow import TarFlowPipeline
from tarflow_hf.training import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

LATENTS = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0))  # the tiny TarFlow: 16 patches of 4


def randomized(folder: Path, pipeline_class: type = TarFlowPipeline) -> Path:
    """The pipeline folder with random output projections: a new model's are zero (Apple's initialisation), which
    makes every block the identity and leaves the layers before them without a gradient, unlike a trained model's."""
    pipe = pipeline_class.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    pipe.save_pretrained(folder.with_name(f"{folder.name}-trained"))
    return folder.with_name(f"{folder.name}-trained")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return randomized(tiny_pipeline(tmp_path_factory.mktemp("lora") / "base", num_classes=2, noise_std=0.1))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_value_folder(tmp_path_factory.mktemp("lora") / "data", ["a", "b"], per_class=4)


def argv(base: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--init-from", str(base), "--dataset", str(data), "--output-dir", str(output), "--batch-size", "4",
        "--no-progress", "--log-every", "1", "--checkpoint-every", "0", "--seed", "2", "--lora-rank", "4",
        "--lr", "1e-2", *extra,
    ]  # fmt: skip


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(folder / LORA_WEIGHT_NAME_SAFE), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        return tensors, json.loads(handle.metadata()["lora_adapter_metadata"])


def tarflow_samples(pipe: TarFlowPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[0, 1, 0, 1], latents=LATENTS, output_type="latent", guidance_scale=2.0).images


# ------------------------------------------------------------------------------------------------- TarFlow
def test_only_the_adapter_trains_and_the_run_writes_it_as_diffusers_does(base, data, tmp_path):
    out = tmp_path / "run"
    result = train_as_the_command_line(argv(base, data, out, "--max-steps", "6", "--ema-decay", "0"))
    folder = result.pipeline_dir
    assert folder == out / "model" and sorted(p.name for p in folder.iterdir()) == ["README.md", LORA_WEIGHT_NAME_SAFE]
    tensors, metadata = read_adapter(folder)
    assert tensors and all(key.startswith("transformer.") and ".lora_" in key for key in tensors)
    assert {key.rsplit(".", 3)[-3] for key in tensors} == {"qkv", "proj", "fc1", "fc2"}  # the default targets
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4
    assert any(value.abs().max() > 0 for key, value in tensors.items() if "lora_B" in key)  # B starts at 0: it moved
    # The base weights did not move: the trained model without its adapter is the base, bit for bit.
    trained = result.model
    assert loaded_adapters(trained) == ["default"]
    base_state = TarFlowPipeline.from_pretrained(base).transformer.state_dict()
    for name, value in trained.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(value, base_state[name.replace(".base_layer", "")]), name
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and "lora" in card.data.tags
    assert "load_lora_weights" in card.text and "## Training recipe" in card.text and "--lora-rank 4" in card.text
    assert str(tmp_path) not in card.content


def test_a_fresh_pipeline_with_the_adapter_samples_what_the_trained_model_samples(base, data, tmp_path):
    """EMA on (its adapter is the one written): the base pipeline plus the adapter file reproduces the EMA model."""
    result = train(parse(argv(base, data, tmp_path / "run", "--max-steps", "4", "--ema-decay", "0.5")))
    assert result.ema_model is not result.model
    # The EMA model shares the frozen weights with the trained model and holds its own adapter.
    shared = dict(result.model.named_parameters())
    for name, parameter in result.ema_model.named_parameters():
        assert (parameter.data_ptr() == shared[name].data_ptr()) == (".lora_" not in name), name
    pipe = LoraTarFlowPipeline.from_pretrained(base)
    before = tarflow_samples(pipe)
    pipe.load_lora_weights(result.pipeline_dir)
    expected = tarflow_samples(TarFlowPipeline(transformer=result.ema_model))
    torch.testing.assert_close(tarflow_samples(pipe), expected, atol=1e-6, rtol=1e-6)
    assert (expected - before).abs().max() > 1e-4  # the adapter matters


def test_resume_of_a_lora_run_is_exact(base, data, tmp_path):
    extra = ["--max-steps", "4", "--ema-decay", "0.9"]
    full = train(parse(argv(base, data, tmp_path / "full", *extra)))
    reset_accelerate()
    parted = tmp_path / "parted"
    train(parse(argv(base, data, parted, *extra, "--stop-after-steps", "2")))
    reset_accelerate()
    second = train(parse(argv(base, data, parted, *extra, "--resume", "latest")))
    a, b = read_adapter(full.pipeline_dir)[0], read_adapter(second.pipeline_dir)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_push_to_hub_uploads_the_adapter_alone(base, data, tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        uploaded.update(repo_id=repo_id, message=commit_message)
        shutil.copytree(folder_path, tmp_path / "hub")
        return "https://huggingface.co/fake/commit"

    hub_online_with_a_token(monkeypatch)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda self, repo_id, filename, **kwargs: False)
    train(parse(argv(base, data, tmp_path / "run", "--max-steps", "2", "--push-to-hub", "me/tiny-lora")))
    assert uploaded == {"repo_id": "me/tiny-lora", "message": "Upload TarFlow LoRA trained with tarflow-hf"}
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", LORA_WEIGHT_NAME_SAFE]
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert 'load_lora_weights("me/tiny-lora"' in card.text


def test_the_card_names_a_hub_base_model(base, data, tmp_path, monkeypatch):
    from_pretrained = TarFlowPipeline.from_pretrained.__func__

    def fake_hub(cls, name, *args, **kwargs):  # "someone/tiny-base" is served from the local folder
        return from_pretrained(cls, str(base) if name == "someone/tiny-base" else name, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "from_pretrained", classmethod(fake_hub))
    monkeypatch.setattr(registry, "family_of_hub_repo", lambda repo_id, revision=None: registry.family_of_folder(base))
    arguments = argv(Path("."), data, tmp_path / "run", "--max-steps", "2", "--license", "mit")
    arguments[1] = "someone/tiny-base"
    assert cli_main(["train", *arguments]) == 0
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")
    assert card.data.base_model in ("someone/tiny-base", ["someone/tiny-base"]) and card.data.license == "mit"
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.library_name == "diffusers"
    assert 'TarFlowPipeline.from_pretrained("someone/tiny-base")' in card.text


def test_bf16_keeps_the_frozen_weights_in_bf16_and_trains_the_adapter_in_float32(base, data, tmp_path):
    result = train(parse(argv(base, data, tmp_path / "run", "--max-steps", "2", "--mixed-precision", "bf16", "--cpu")))
    dtypes = {name: parameter.dtype for name, parameter in result.model.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if ".lora_" in name} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if ".lora_" not in name} == {torch.bfloat16}
    tensors, _ = read_adapter(result.pipeline_dir)
    assert {value.dtype for value in tensors.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ STARFlow
def test_starflow_lora_on_captions_loads_into_a_fresh_pipeline(tmp_path):
    base = randomized(tiny_starflow_pipeline(tmp_path / "base"), StarFlowPipeline)
    data = write_captioned_folder(tmp_path / "data")
    arguments = [
        "--init-from", str(base), "--dataset", str(data), "--output-dir", str(tmp_path / "run"), "--batch-size", "4",
        "--no-progress", "--checkpoint-every", "0", "--max-steps", "3", "--lora-rank", "2", "--lora-alpha", "4",
        "--lr", "1e-2", "--ema-decay", "0",
    ]  # fmt: skip
    result = train_as_the_command_line(arguments)
    tensors, metadata = read_adapter(result.pipeline_dir)
    assert metadata["transformer.r"] == 2 and metadata["transformer.lora_alpha"] == 4
    assert {key.split(".")[2] for key in tensors} == {"0", "1"}  # shallow and deep (text) block alike
    card = ModelCard.load(result.pipeline_dir / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and "StarFlowPipeline" in card.text
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("w5 w10", num_images_per_prompt=2, latents=latents, output_type="latent").images

    pipe = LoraStarFlowPipeline.from_pretrained(base)
    pipe.load_lora_weights(result.pipeline_dir)
    trained = LoraStarFlowPipeline(result.model, pipe.text_encoder, pipe.tokenizer, pipe.vae)
    torch.testing.assert_close(draw(pipe), draw(trained), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
        (["--lora-rank", "4", "--replace-labels"], "--replace-labels changes the base model's configuration"),
        (["--lora-rank", "4", "--noise-std", "0.2"], "--noise-std changes the base model's configuration"),
        (["--lora-rank", "4", "--lora-target-modules", "qkv,attn"], "--lora-target-modules attn: no linear layer"),
    ],
)
def test_lora_flags_that_cannot_work_are_one_line(base, data, tmp_path, capsys, extra, message):
    arguments = argv(base, data, tmp_path / "run")
    del arguments[arguments.index("--lora-rank") : arguments.index("--lora-rank") + 2]
    code = cli_main(["train", *arguments, *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (load bars aside)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run" / "model").exists()


def test_lora_without_init_from_or_without_peft_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    arguments = ["--dataset", "mnist", "--output-dir", str(tmp_path / "run"), "--lora-rank", "4"]
    assert cli_main(["train", *arguments]) == 2
    assert "--lora-rank fine-tunes a pretrained model: give it with --init-from" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert cli_main(["train", *arguments, "--init-from", "bundled"]) == 2
    assert 'LoRA needs the peft package: pip install "tarflow-hf[lora]"' in capsys.readouterr().err
