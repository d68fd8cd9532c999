"""Fine-tuning (`tarflow-hf train --init-from`): the bundled model gets better at a folder of digits with the
defaults, and fine-tuning keeps what it does not change (noise level, default guidance, label ids, license); the
model card of a trained model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw, ImageFont

import tarflow_hf
from tarflow_hf import TarFlowConfig, TarFlowModel, TarFlowPipeline, registry
from tarflow_hf.commands import main as cli_main
from tarflow_hf.data import load_image_dataset

DIGITS = [str(d) for d in range(10)]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def write_digit_folder(root: Path, per_class: int = 4) -> Path:
    """Typeset digits, white on black, 28x28 like MNIST, jittered by up to 2 pixels: one folder per digit."""
    font = ImageFont.load_default(size=22)
    rng = np.random.default_rng(0)
    for digit in DIGITS:
        (root / digit).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("L", (28, 28), 0)
            position = (8 + int(rng.integers(-2, 3)), 2 + int(rng.integers(-2, 3)))
            ImageDraw.Draw(image).text(position, digit, fill=255, font=font)
            image.save(root / digit / f"{i}.png")
    return root


def write_value_folder(root: Path, names: list[str], per_class: int = 2, size: int = 8) -> Path:
    """Class folder k (in `names` order) holds flat images of gray level 20 * k: a pixel tells the class."""
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size), 20 * k, dtype=np.uint8), "L").save(root / name / f"{i}.png")
    return root


def tiny_pipeline(folder: Path, sampler=None, **config) -> Path:
    settings = dict(
        image_size=8, num_channels=1, patch_size=2, hidden_size=32, head_dim=16, num_blocks=2, layers_per_block=1
    )
    torch.manual_seed(0)
    model = TarFlowModel(TarFlowConfig(**settings, **config))
    TarFlowPipeline(transformer=model, sampler=sampler).save_pretrained(folder)
    return folder


def mean_loss(model: TarFlowModel, folder: Path, noise_std: float) -> float:
    """The model's loss on every image of the folder, with one fixed draw of the training noise."""
    dataset = load_image_dataset(str(folder))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    noisy = images + noise_std * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(noisy, labels).loss.item()


def test_fine_tuning_the_bundled_model_with_the_defaults_improves_it(tmp_path, capsys):
    """`--init-from bundled` loads the package's model (no Hub), and the fine-tuning defaults (learning rate,
    warm-up) make it better at the new images: the old default (2e-3, one epoch of warm-up) made it far worse
    (loss -1.61 -> -1.06 here). The model keeps its noise level, default guidance, label names and license."""
    digits = write_digit_folder(tmp_path / "digits")
    out = tmp_path / "run"
    code = cli_main(
        ["train", "--init-from", "bundled", "--dataset", str(digits), "--output-dir", str(out), "--max-steps", "30",
         "--batch-size", "8", "--no-progress", "--log-every", "10", "--torch-threads", "1"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    base = TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL).transformer
    tuned = TarFlowPipeline.from_pretrained(str(out / "model")).transformer
    before, after = mean_loss(base, digits, 0.1), mean_loss(tuned, digits, 0.1)
    assert after < before - 0.01, (before, after)
    config = tuned.config
    assert config.noise_std == 0.1 and config.default_guidance_scale == 3.0  # the bundled model's own
    assert [config.id2label[i] for i in range(10)] == DIGITS
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["lr"] == 1e-4 and recipe["noise_std"] == 0.1 and recipe["warmup_steps"] == 3
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.license == "apache-2.0"  # the bundled model's license
    assert card.data.base_model in ("tarflow-mnist", ["tarflow-mnist"])  # named as the README publishes it
    assert "--init-from bundled" in card.text and str(tmp_path) not in card.content
    assert (out / "samples" / "final.png").is_file()


def test_fine_tuning_keeps_noise_guidance_and_sampler_and_samples_exactly_with_the_model_guidance(
    tmp_path, monkeypatch
):
    """The fine-tuned pipeline keeps the base's noise level, default guidance and sampler (model_index.json); the
    sample grids are drawn at the model's guidance with the exact sampler, whatever sampler the pipeline keeps."""
    from tarflow_hf.samplers import JacobiSampler, SequentialSampler

    base_sampler = JacobiSampler(tolerance=1e-3, window=4)
    base = tiny_pipeline(tmp_path / "base", base_sampler, num_classes=2, noise_std=0.1, default_guidance_scale=2.5)
    data = write_value_folder(tmp_path / "data", ["a", "b"], per_class=4)
    calls = []
    call = TarFlowPipeline.__call__

    def recording_call(self, *args, **kwargs):
        calls.append((kwargs.get("guidance_scale"), kwargs.get("sampler")))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "__call__", recording_call)
    out = tmp_path / "run"
    code = cli_main(
        ["train", "--init-from", str(base), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
         "--batch-size", "4", "--sample-every", "1", "--no-progress", "--checkpoint-every", "0"]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "model" / "transformer" / "config.json").read_text())
    assert saved["noise_std"] == 0.1 and saved["default_guidance_scale"] == 2.5
    assert json.loads((out / "recipe.json").read_text())["noise_std"] == 0.1  # trained at the model's noise
    assert TarFlowPipeline.from_pretrained(str(out / "model")).sampler == base_sampler
    assert calls == [(2.5, SequentialSampler())] * 3  # grids at steps 1 and 2, and the final one
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["final.png", "step_0000001.png", "step_0000002.png"]


def test_same_label_names_keep_their_ids(tmp_path, monkeypatch, capsys):
    """The base model calls id 0 "9", ..., id 9 "0"; the folder's classes sort as "0".."9". With
    --replace-labels the names are the same, so they keep the model's ids: folder "k" trains id 9 - k."""
    reversed_names = DIGITS[::-1]
    base = tiny_pipeline(tmp_path / "base", num_classes=10, id2label=dict(enumerate(reversed_names)))
    data = write_value_folder(tmp_path / "data", DIGITS, per_class=2)
    seen = []

    def record(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        labels = kwargs.get("class_labels", args[1] if len(args) > 1 else None)
        if isinstance(module, TarFlowModel) and module.training:
            seen.append((pixels.detach().clone(), labels.detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: record(m, a, {}))
    try:
        out = tmp_path / "run"
        code = cli_main(
            ["train", "--init-from", str(base), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "5",
             "--batch-size", "4", "--replace-labels", "--noise-std", "0", "--drop-label", "0", "--no-progress",
             "--checkpoint-every", "0"]
        )  # fmt: skip
    finally:
        handle.remove()
    assert code == 0
    assert len(seen) == 5
    for pixels, labels in seen:
        folder_index = ((pixels[:, 0, 0, 0] + 1) * 127.5 / 20).round().long()  # gray level 20 k -> folder k
        assert torch.equal(labels, 9 - folder_index)
    saved = json.loads((out / "model" / "transformer" / "config.json").read_text())
    assert [saved["id2label"][str(i)] for i in range(10)] == reversed_names
    assert "label ids: 0 = 9, 1 = 8, 2 = 7" in capsys.readouterr().out


def test_replaced_labels_are_printed(tmp_path, capsys):
    base = tiny_pipeline(tmp_path / "base", num_classes=3)
    data = write_value_folder(tmp_path / "data", ["cat", "dog", "fox"], per_class=2)
    out = tmp_path / "run"
    code = cli_main(
        ["train", "--init-from", str(base), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "1",
         "--batch-size", "2", "--replace-labels", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "label ids: 0 = cat, 1 = dog, 2 = fox" in capsys.readouterr().out
    saved = json.loads((out / "model" / "transformer" / "config.json").read_text())
    assert saved["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}


def test_init_from_a_missing_folder_is_one_line_at_once(tmp_path, capsys):
    data = write_value_folder(tmp_path / "data", ["a", "b"])
    code = cli_main(
        ["train", "--init-from", str(tmp_path / "no-such-model"), "--dataset", str(data), "--output-dir",
         str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "no-such-model' is neither an existing folder nor a Hub repo id" in err
    assert len(err.strip().splitlines()) == 1


def test_model_card_of_a_model_fine_tuned_from_the_hub(tmp_path, monkeypatch):
    """Hub id base -> base_model; a dataset given as a relative path -> its folder name; license from --license;
    pipeline tag, recipe, metrics; no absolute path anywhere in the card."""
    base = tiny_pipeline(tmp_path / "base", num_classes=2)
    write_value_folder(tmp_path / "data" / "letters", ["a", "b"], per_class=4)
    from_pretrained = TarFlowPipeline.from_pretrained.__func__

    def fake_hub(cls, name, *args, **kwargs):  # "someone/tiny-base" is served from the local folder
        return from_pretrained(cls, str(base) if name == "someone/tiny-base" else name, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "from_pretrained", classmethod(fake_hub))
    monkeypatch.setattr(registry, "family_of_hub_repo", lambda repo_id, revision=None: registry.family_of_folder(base))
    monkeypatch.chdir(tmp_path)
    code = cli_main(
        ["train", "--init-from", "someone/tiny-base", "--dataset", os.path.join("data", "letters"), "--output-dir",
         str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-progress", "--license", "mit"]
    )  # fmt: skip
    assert code == 0
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")
    assert card.data.license == "mit"
    assert card.data.base_model in ("someone/tiny-base", ["someone/tiny-base"])
    assert card.data.datasets == ["letters"]
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "## Training recipe" in card.text and "Final training metrics" in card.text
    assert '"lr": 0.0001' in card.text and '"bits_per_dim"' in card.text
    assert str(tmp_path) not in card.content and "/tmp" not in card.content


def test_the_bundled_model_is_named_after_its_folder():
    from tarflow_hf.training.outputs import BUNDLED_MODEL_NAME, base_model_name

    assert Path(tarflow_hf.BUNDLED_MODEL).name == BUNDLED_MODEL_NAME
    assert base_model_name("bundled") == base_model_name(tarflow_hf.BUNDLED_MODEL) == BUNDLED_MODEL_NAME
    assert base_model_name("someone/model") == "someone/model" and base_model_name(None) is None
