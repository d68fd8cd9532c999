"""tarflow_hf.hub: the saved folder's layout and code files, the model card (metadata, sections, no local paths,
sections kept across saves and pushes) and the one upload path, with the Hub client's calls intercepted."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_model
from huggingface_hub import HfApi, ModelCard

from tarflow_hf import TarFlowModel, hub
from tarflow_hf.hub import CARD_MARKER, EvaluationInfo, TrainingInfo
from tarflow_hf.pipeline_tarflow import TarFlowPipeline

NAMES = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "tabby, tabby cat"}


def make_pipe(model: TarFlowModel) -> TarFlowPipeline:
    pipe = TarFlowPipeline(transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model() -> TarFlowModel:
    model = random_model(seed=1)
    model.config.id2label = dict(NAMES)
    return model


@pytest.fixture(scope="module")
def pipe(model) -> TarFlowPipeline:
    return make_pipe(model)


@pytest.fixture(scope="module")
def noise(model) -> torch.Tensor:
    return torch.randn(4, model.config.num_patches, model.config.patch_dim, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny-tarflow"
    make_pipe(model).save_pretrained(folder)
    return folder


def files_under(folder) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def saved_files(pipe) -> list[str]:
    """What a saved pipeline folder holds (and what push_to_hub uploads): weights, configs, card and code."""
    data = ["README.md", "model_index.json", "transformer/config.json", "transformer/model.safetensors"]
    data.append("sampler/sampler_config.json")
    return sorted([*data, *hub.code_files(pipe)])


def relative_imports(path: Path) -> set[str]:
    return set(re.findall(r"^\s*from\s+\.(\w+)\s+import", path.read_text(), flags=re.MULTILINE))


# ------------------------------------------------------------------------------------------------- layout
def test_code_files_are_the_package_modules_and_their_relative_imports(pipe):
    files = hub.code_files(pipe)
    assert {"pipeline_tarflow.py", "labels.py"} <= set(files)
    assert {"transformer/modeling_tarflow.py", "transformer/configuration_tarflow.py"} <= set(files)
    assert "hub.py" not in files  # saving needs the installed package; a saved folder does not carry it
    package = Path(inspect.getsourcefile(TarFlowPipeline)).parent
    for relative, source in files.items():
        assert source == package / Path(relative).name
    # diffusers copies only a local folder's direct relative imports: each entry module imports its closure directly.
    for entry, folder in (
        ("pipeline_tarflow.py", ""),
        ("modeling_tarflow.py", "transformer/"),
        ("samplers.py", "sampler/"),
    ):
        closure = {Path(name).stem for name in files if name.startswith(folder) and "/" not in name[len(folder) :]}
        assert closure - {Path(entry).stem} <= relative_imports(package / entry), entry


@pytest.fixture(scope="module")
def star_pipe():
    from test_pipeline_starflow import make_pipe as make_star_pipe

    return make_star_pipe()


def test_starflow_code_files_and_closure(star_pipe):
    """Only this package's classes get code: the pipeline's module (with the shared modules it imports) and the
    transformer's; T5, the tokenizer and the VAE are standard components."""
    assert set(hub.components(star_pipe)) == {"transformer", "sampler"}
    files = hub.code_files(star_pipe)
    assert {"pipeline_starflow.py", "pipeline_utils.py", "images.py"} <= set(files)
    assert {"transformer/modeling_starflow.py", "transformer/configuration_starflow.py"} <= set(files)
    assert not [name for name in files if name.startswith(("text_encoder/", "tokenizer/", "vae/"))]
    assert "hub.py" not in files
    package = Path(inspect.getsourcefile(TarFlowPipeline)).parent
    for entry, folder in (
        ("pipeline_starflow.py", ""),
        ("modeling_starflow.py", "transformer/"),
        ("samplers.py", "sampler/"),
    ):
        closure = {Path(name).stem for name in files if name.startswith(folder) and "/" not in name[len(folder) :]}
        assert closure - {Path(entry).stem} <= relative_imports(package / entry), entry


def test_starflow_saved_folder_layout(star_pipe, tmp_path):
    folder = tmp_path / "tiny-starflow"
    star_pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_starflow", "StarFlowPipeline"]
    assert index["transformer"] == ["modeling_starflow", "StarFlowModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["vae"] == [
        "diffusers",
        "AutoencoderKL",
    ]
    assert index["tokenizer"][0] == "transformers" and "_name_or_path" not in index
    for relative, source in hub.code_files(star_pipe).items():
        assert (folder / relative).read_bytes() == source.read_bytes(), relative
    assert json.loads((folder / "transformer" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_starflow.StarFlowConfig",
        "AutoModel": "modeling_starflow.StarFlowModel",
    }
    for component in ("text_encoder", "vae"):
        assert "auto_map" not in json.loads((folder / component / "config.json").read_text())
        assert not list((folder / component).glob("*.py"))
    assert ModelCard.load(folder / "README.md").data.pipeline_tag == "text-to-image"


def test_starflow_card_states_apples_license(star_pipe, tmp_path):
    card = hub.model_card(star_pipe, repo_id="me/starflow")
    assert card.data.pipeline_tag == "text-to-image" and card.data.library_name == "diffusers"
    assert {"starflow", "normalizing-flow", "text-to-image"} <= set(card.data.tags)
    assert (card.data.license, card.data.license_name) == ("other", "apple-amlr")
    assert card.data.license_link == "https://github.com/apple/ml-starflow/blob/main/LICENSE_MODEL"
    assert "## License" in card.text and "research purposes only" in card.text
    assert "Apple Machine Learning Research Model License" in card.text and "authors at Apple" in card.text
    assert "arxiv.org/abs/2506.06276" in card.text and "# STARFlow (text-to-image)" in card.text
    assert 'StarFlowPipeline.from_pretrained("me/starflow")' in card.text and 'pipe("a photo of a cat"' in card.text
    assert "num_classes" not in card.text  # TarFlow-only parts
    assert 'tarflow-hf sample me/starflow --prompt "a photo of a cat"' in card.text
    # The license is carried across saves like the other metadata; another license drops the section.
    star_pipe.save_pretrained(tmp_path / "first", model_card=card)
    again = hub.model_card(star_pipe, folder=tmp_path / "first")
    assert (again.data.license, again.data.license_name) == ("other", "apple-amlr") and "## License" in again.text
    mine = hub.model_card(star_pipe, license="mit")
    assert mine.data.license == "mit" and "## License" not in mine.text and "license_name" not in mine.content


def test_starflow_push_to_hub(fake_hub, star_pipe):
    star_pipe.push_to_hub("me/tiny-starflow")
    uploaded = files_under(fake_hub.uploaded)
    assert {"model_index.json", "README.md", "pipeline_starflow.py", "transformer/modeling_starflow.py"} <= set(
        uploaded
    )
    assert "text_encoder/model.safetensors" in uploaded and "vae/diffusion_pytorch_model.safetensors" in uploaded
    assert 'from_pretrained("me/tiny-starflow")' in (fake_hub.uploaded / "README.md").read_text()


def test_saved_folder_layout(saved, pipe):
    assert files_under(saved) == saved_files(pipe)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_tarflow", "TarFlowPipeline"]
    assert index["transformer"] == ["modeling_tarflow", "TarFlowModel"]
    assert index["id2label"] == {str(key): name for key, name in NAMES.items()}
    assert "_name_or_path" not in index
    for relative, source in hub.code_files(pipe).items():
        assert (saved / relative).read_bytes() == source.read_bytes(), relative
    config = json.loads((saved / "transformer" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_tarflow.TarFlowConfig",
        "AutoModel": "modeling_tarflow.TarFlowModel",
    }


def test_package_layout_has_no_code(pipe, tmp_path, noise):
    folder = hub.save_pipeline(pipe, tmp_path / "bundle", with_code=False)
    assert not list(folder.rglob("*.py"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "TarFlowPipeline" and index["transformer"] == ["tarflow_hf", "TarFlowModel"]
    assert "auto_map" not in json.loads((folder / "transformer" / "config.json").read_text())
    loaded = TarFlowPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    kwargs = {"class_labels": [0, 1, 2, 0], "latents": noise, "output_type": "pt"}
    torch.testing.assert_close(loaded(**kwargs).images, pipe(**kwargs).images, rtol=0, atol=0)


def test_saving_again_keeps_custom_readme_and_other_files(tmp_path, model):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "README.md").write_text("# My training run\n")
    (folder / "notes.txt").write_text("keep me")
    pipe = make_pipe(model)
    pipe.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# My training run\n"
    assert (folder / "notes.txt").read_text() == "keep me"
    pipe.save_pretrained(folder, overwrite_model_card=True, model_card={"license": "mit", "repo_id": "me/run"})
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and 'from_pretrained("me/run")' in card.text
    # A generated card is regenerated; nothing is left over from the staging folders.
    pipe.save_pretrained(folder, model_card={"license": "apache-2.0"})
    assert ModelCard.load(folder / "README.md").data.license == "apache-2.0"
    root_code = [name for name in hub.code_files(pipe) if "/" not in name]
    expected = ["README.md", "model_index.json", "notes.txt", "transformer", "sampler", *root_code]
    assert sorted(path.name for path in folder.iterdir()) == sorted(expected)
    with pytest.raises(ValueError, match=r"unexpected arguments to save_pretrained: \['shard_size'\]"):
        pipe.save_pretrained(tmp_path / "typo", shard_size="1GB")
    assert not (tmp_path / "typo").exists()


def test_saved_folder_has_ordinary_permissions(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "saved").stat().st_mode & 0o777 == 0o777 & ~mask


# --------------------------------------------------------------------------------------------- model card
def test_generated_card(saved):
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "other"
    assert card.data.base_model is None  # trained from scratch
    assert {"tarflow", "normalizing-flow", "class-conditional"} <= set(card.data.tags)
    assert CARD_MARKER in card.text
    # The folder was given as an absolute path: the card names it by its folder name, never the local path.
    assert 'TarFlowPipeline.from_pretrained("tiny-tarflow")' in card.text
    assert str(saved.parent) not in card.content
    assert 'pipe(class_labels=["tench"], guidance_scale=3.0, generator' in card.text
    assert "trust_remote_code=True" in card.text
    assert "## Training" not in card.text and "## Evaluation" not in card.text


def fine_tuned_card(pipe, tmp_path: Path) -> ModelCard:
    data_dir = tmp_path / "data" / "my-digits"
    training = TrainingInfo(
        recipe={"dataset": str(data_dir), "lr": 0.001, "output_dir": str(tmp_path / "runs" / "x")},
        command=f"tarflow-hf train --dataset {data_dir} --output-dir {tmp_path / 'runs' / 'x'}",
        metrics={"step": 10, "bits_per_dim": 3.25},
    )
    evaluation = EvaluationInfo(metrics={"fid": 12.5, "classifier": str(tmp_path / "clf")}, notes="| a | b |")
    return hub.model_card(
        pipe,
        repo_id="me/fine-tuned",
        license="apache-2.0",
        datasets=[str(data_dir)],
        base_model="apple/tarflow-base",
        training=training,
        evaluation=evaluation,
    )


def test_card_metadata_and_sections(pipe, tmp_path):
    card = fine_tuned_card(pipe, tmp_path)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == ["apple/tarflow-base"]
    assert card.data.datasets == ["my-digits"]  # a local dataset is named by its folder name
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.library_name == "diffusers"
    assert "## Training" in card.text and '"lr": 0.001' in card.text and '"bits_per_dim": 3.25' in card.text
    assert "tarflow-hf train --dataset my-digits --output-dir x" in card.text
    assert "## Evaluation" in card.text and '"fid": 12.5' in card.text and "| a | b |" in card.text
    assert str(tmp_path) not in card.content
    assert 'from_pretrained("me/fine-tuned")' in card.text


def test_sections_survive_a_save_and_a_push(pipe, tmp_path, fake_hub):
    trained = tmp_path / "run" / "model"
    hub.save_pipeline(pipe, trained, card=fine_tuned_card(pipe, tmp_path))
    loaded = TarFlowPipeline.from_pretrained(trained)
    # Saved again elsewhere, and pushed: the recipe, the metrics and the metadata stay; the usage names the target.
    loaded.save_pretrained(tmp_path / "copy")
    loaded.push_to_hub("me/pushed")
    for path, name in ((tmp_path / "copy" / "README.md", "copy"), (fake_hub.uploaded / "README.md", "me/pushed")):
        card = ModelCard.load(path)
        assert '"lr": 0.001' in card.text and '"fid": 12.5' in card.text and "| a | b |" in card.text
        assert card.data.base_model == ["apple/tarflow-base"] and card.data.datasets == ["my-digits"]
        assert card.data.license == "apache-2.0"
        assert f'from_pretrained("{name}")' in card.text and "me/fine-tuned" not in card.text
        assert str(tmp_path) not in card.content
    # Saving into the folder itself keeps them too.
    loaded.save_pretrained(trained, model_card={"license": "mit"})
    card = ModelCard.load(trained / "README.md")
    assert card.data.license == "mit" and '"bits_per_dim": 3.25' in card.text


def test_display_name():
    assert hub.display_name("me/model") == "me/model"
    assert hub.display_name("runs/mnist/model") == "runs/mnist/model"
    assert hub.display_name("/home/someone/runs/model") == "model"
    assert hub.portable({"a": "/abs/x", "b": ["rel/y", 3]}) == {"a": "x", "b": ["rel/y", 3]}


# ---------------------------------------------------------------------------------------------------- the Hub
@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Intercept huggingface_hub's HfApi: record calls, copy what would be uploaded."""
    state = SimpleNamespace(calls=[], uploaded=tmp_path / "uploaded", remote_card=None)

    def create_repo(self, repo_id, **kwargs):
        state.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def file_exists(self, repo_id, filename, **kwargs):
        state.calls.append(("file_exists", repo_id, filename))
        return state.remote_card is not None

    def hf_hub_download(self, repo_id, filename, **kwargs):
        state.calls.append(("hf_hub_download", repo_id, filename))
        path = tmp_path / "remote_README.md"
        path.write_text(state.remote_card)
        return str(path)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        state.calls.append(("upload_folder", repo_id, kwargs))
        ignored = set(ignore_patterns or [])
        shutil.rmtree(state.uploaded, ignore_errors=True)
        shutil.copytree(folder_path, state.uploaded, ignore=lambda _, names: [n for n in names if n in ignored])
        return "commit-info"

    for name, function in [
        ("create_repo", create_repo),
        ("file_exists", file_exists),
        ("hf_hub_download", hf_hub_download),
        ("upload_folder", upload_folder),
    ]:
        monkeypatch.setattr(HfApi, name, function)
    return state


def test_push_to_hub(fake_hub, pipe, noise, tmp_path):
    assert pipe.push_to_hub("me/tiny-tarflow", private=True, model_card={"license": "mit"}) == "commit-info"
    assert fake_hub.calls[0] == ("create_repo", "me/tiny-tarflow", {"private": True, "exist_ok": True})
    assert fake_hub.calls[-1][0] == "upload_folder" and fake_hub.calls[-1][2]["commit_message"]
    assert files_under(fake_hub.uploaded) == saved_files(pipe)
    card = ModelCard.load(fake_hub.uploaded / "README.md")
    assert card.data.license == "mit" and 'from_pretrained("me/tiny-tarflow")' in card.text
    assert "/tmp" not in card.content and str(tmp_path) not in card.content  # never the temporary folder
    # What was uploaded is a working pipeline.
    loaded = TarFlowPipeline.from_pretrained(fake_hub.uploaded)
    loaded.set_progress_bar_config(disable=True)
    kwargs = {"class_labels": [0, 1, 2, 0], "latents": noise, "output_type": "pt"}
    torch.testing.assert_close(loaded(**kwargs).images, pipe(**kwargs).images, rtol=0, atol=0)


def test_push_to_hub_keeps_the_repository_card(fake_hub, pipe):
    fake_hub.remote_card = "---\nlicense: mit\n---\n# Hand-written card\n"
    pipe.push_to_hub("me/tiny-tarflow")
    assert not (fake_hub.uploaded / "README.md").exists()
    assert (fake_hub.uploaded / "model_index.json").exists()
    pipe.push_to_hub("me/tiny-tarflow", overwrite_model_card=True)
    assert CARD_MARKER in (fake_hub.uploaded / "README.md").read_text()
    # A card tarflow-hf generated earlier is refreshed.
    fake_hub.remote_card = f"---\nlicense: other\n---\n\n{CARD_MARKER}\n# old\n"
    pipe.push_to_hub("me/tiny-tarflow")
    assert (fake_hub.uploaded / "README.md").exists()


def test_save_pretrained_push_to_hub(fake_hub, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/from-save", commit_message="first")
    upload = next(call for call in fake_hub.calls if call[0] == "upload_folder")
    assert upload[1] == "me/from-save" and upload[2]["commit_message"] == "first"
    assert (fake_hub.uploaded / "transformer" / "model.safetensors").exists()
    assert 'from_pretrained("me/from-save")' in (tmp_path / "local" / "README.md").read_text()


def test_upload_folder_uploads_a_trained_folder_as_it_is(fake_hub, pipe, tmp_path):
    folder = hub.save_pipeline(pipe, tmp_path / "model", card=fine_tuned_card(pipe, tmp_path))
    assert hub.upload_folder(folder, "me/fine-tuned", private=False) == "commit-info"
    assert files_under(fake_hub.uploaded) == files_under(folder)
    assert (fake_hub.uploaded / "README.md").read_text() == (folder / "README.md").read_text()
