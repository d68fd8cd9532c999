"""Fine-tuning a STARFlow pipeline with `tarflow-hf train --init-from STARFLOW_FOLDER`: latent-space training as
Apple's train.py (VAE posterior sample * scaling factor + noise, frozen T5 through `encode_prompt`, captions dropped
to ""), only the transformer moves, the whole pipeline folder comes out and samples, resume is exact, two processes
stay in sync.

Everything is tiny and built here: the fixture's random T5 (`t5_tiny`), a word-level tokenizer whose word `wN` is
token N, a 4-level AutoencoderKL (downsampling 8) and a 2-block STARFlow on a 4x4 latent (32 px images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    launch_two_processes,
    reset_accelerate,
    tiny_vae,
    train_as_the_command_line,
    train_in_two_processes,
    word_tokenizer,
)
from conftest import parse_train_args as parse
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import T5EncoderModel

from tarflow_hf.commands import main as cli_main
from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.data import load_captioned_dataset
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.pipeline_starflow import StarFlowPipeline
from tarflow_hf.training import train
from tarflow_hf.training.families import StarFlowFamily, family_for
from tarflow_hf.training.recipe import drop_captions

T5_TINY = Path(__file__).parent / "fixtures" / "starflow" / "t5_tiny"
IMAGE_SIZE = 32  # 4x4 latent


# ---------------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_pipeline(folder: Path) -> Path:
    vae = tiny_vae(IMAGE_SIZE, scaling_factor=0.18215)
    config = StarFlowConfig(
        sample_size=4, hidden_size=32, layers_per_block=[1, 1], head_dim=32, text_hidden_size=32,
        max_text_length=8, noise_std=0.3, default_guidance_scale=2.0,
    )  # fmt: skip
    pipe = StarFlowPipeline(
        transformer=StarFlowModel(config),
        text_encoder=T5EncoderModel.from_pretrained(T5_TINY),
        tokenizer=word_tokenizer(),
        vae=vae,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("sf") / "base")


def write_captioned_folder(root: Path, count: int = 8) -> Path:
    """Images whose colour follows the caption, with a metadata.jsonl (`file_name`, `text`)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(count):
        colour = np.array([(i % 2) * 200, 100, 255 - (i % 2) * 200], dtype=np.uint8)
        pixels = (colour + rng.integers(0, 40, (40, 48, 3))).clip(0, 255).astype(np.uint8)  # resized + cropped
        Image.fromarray(pixels, "RGB").save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"w{5 + i % 2} w{10 + i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_captioned_folder(tmp_path_factory.mktemp("sf") / "data")


def argv(base: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--init-from", str(base), "--dataset", str(data), "--output-dir", str(output), "--batch-size", "4",
        "--no-progress", "--log-every", "1", "--checkpoint-every", "0", "--seed", "3", *extra,
    ]  # fmt: skip


def read_metrics(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("elapsed_s")
    return lines


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / component).glob("*.safetensors"))
    assert files, f"no weights in {folder / component}"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


# -------------------------------------------------------------------------------------------------------- data
def test_captioned_folder_reads_images_and_captions(data):
    dataset = load_captioned_dataset(str(data), image_size=IMAGE_SIZE)
    image, caption = dataset[1]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and caption == "w6 w11"
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image[0].mean() > 0.2 and image[2].mean() < -0.2  # odd images are red-ish: the right file was read
    assert len(dataset) == 8 and "8 captioned images" in dataset.summary()


def test_a_folder_without_metadata_is_one_clear_line(base, tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "0.png")
    code = cli_main(["train", *argv(base, folder, tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "has no metadata.jsonl" in err and "file_name" in err


def test_bad_metadata_lines_name_the_problem(tmp_path):
    root = write_captioned_folder(tmp_path / "d", count=2)
    (root / "metadata.jsonl").write_text('{"file_name": "images/0.png", "caption": "w5"}\n')
    with pytest.raises(ValueError, match=r"line 1 needs 'file_name' and 'text'"):
        load_captioned_dataset(str(root))
    assert load_captioned_dataset(str(root), caption_column="caption")[0][1] == "w5"  # --caption-column
    (root / "metadata.jsonl").write_text('{"file_name": "images/9.png", "text": "w5"}\n')
    with pytest.raises(ValueError, match=r"no image .*9\.png"):
        load_captioned_dataset(str(root))


# ------------------------------------------------------------------------------------------------ the recipe
def test_family_is_read_from_the_init_folder(base, tmp_path):
    assert isinstance(family_for(str(base)), StarFlowFamily)
    assert not isinstance(family_for(None), StarFlowFamily)


def test_caption_dropout_encodes_the_empty_prompt(base, data):
    """A dropped caption becomes "" and its embedding is exactly the pipeline's empty-prompt (negative) encoding;
    the latents are the VAE posterior sample times the scaling factor plus noise_std Gaussian noise."""
    dropped = drop_captions(["a", "b", "c"] * 2000, 0.25, torch.Generator().manual_seed(0))
    assert abs(dropped.count("") / 6000 - 0.25) < 0.02 and set(dropped) == {"", "a", "b", "c"}

    run = train_setup(base, data, drop=0.5)
    family = run.family
    images, captions = next(iter(torch.utils.data.DataLoader(run.dataset, batch_size=8)))
    state = run.generator.get_state()
    inputs, embeds = family.encode_batch(run, (images, list(captions)))
    # Replay the same random stream by hand.
    run.generator.set_state(state)
    kept = drop_captions(list(captions), 0.5, run.generator)
    assert "" in kept and any(kept)
    pipe = family.pipe
    z = pipe.vae.encode(images).latent_dist.sample(run.generator) * pipe.vae.config.scaling_factor
    noise = torch.randn(z.shape, generator=run.generator)
    torch.testing.assert_close(inputs, z + 0.3 * noise)
    _, empty = pipe.encode_prompt("w5", do_classifier_free_guidance=True)  # the default negative: ""
    for row, caption in enumerate(kept):
        expected = empty[0] if caption == "" else pipe.encode_prompt(caption, do_classifier_free_guidance=False)[0][0]
        assert torch.equal(embeds[row], expected), (row, caption)
    assert not torch.equal(embeds[kept.index("")], embeds[next(i for i, c in enumerate(kept) if c)])


def train_setup(base: Path, data: Path, drop: float):
    """A run set up as `train` does, stopped before the first step."""
    from tarflow_hf.training.setup import init_model, resolve_args, start_accelerator
    from tarflow_hf.training.state import Run

    args = parse(argv(base, data, data.parent / "unused", "--drop-label", str(drop), "--ema-decay", "0"))
    family = family_for(args.init_from)
    resolved = resolve_args(args)
    accelerator = start_accelerator(resolved, [])
    run = Run(resolved, None, accelerator, Path("."), [], family)
    init_model(run)
    run.generator = torch.Generator().manual_seed(0)
    return run


# ---------------------------------------------------------------------------------------------------- training
def test_fine_tuning_trains_only_the_transformer_and_saves_a_pipeline_that_samples(base, data, tmp_path):
    out = tmp_path / "run"
    result = train_as_the_command_line(argv(base, data, out, "--max-steps", "12", "--lr", "3e-3", "--ema-decay", "0",
                                            "--warmup-steps", "1", "--sample-every", "12"))  # fmt: skip
    metrics = read_metrics(out)
    assert len(metrics) == 12 and all(np.isfinite(m["loss"]) for m in metrics)
    first, last = np.mean([m["loss"] for m in metrics[:3]]), np.mean([m["loss"] for m in metrics[-3:]])
    assert last < first - 0.05, (first, last)
    folder = result.pipeline_dir
    assert folder == out / "model"
    # Only the transformer moved: text encoder and VAE weights are bit-identical to the base's.
    for component in ("text_encoder", "vae"):
        before, after = weights(base, component), weights(folder, component)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), component
    moved = weights(base, "transformer"), weights(folder, "transformer")
    assert any(not torch.equal(moved[0][k], moved[1][k]) for k in moved[0])
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    # The folder loads and samples; its card is a STARFlow card with the training section.
    pipe = StarFlowPipeline.from_pretrained(folder)
    images = pipe("w5 w10", num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images.images).all()
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and "## Training recipe" in card.text
    assert "--init-from" in card.text and str(tmp_path) not in card.content
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["model_type"] == "starflow" and config["noise_std"] == 0.3  # the model's own noise, kept
    # Sample grids: the step's and the final one, captioned with prompts from the dataset.
    for name in ("step_0000012", "final"):
        grid = Image.open(out / "samples" / f"{name}.png")
        assert grid.width > 2 * IMAGE_SIZE and grid.height > IMAGE_SIZE


def test_resume_is_exact(base, data, tmp_path):
    extra = ["--max-steps", "4", "--drop-label", "0.5", "--ema-decay", "0.9", "--lr", "1e-3"]
    full = train(parse(argv(base, data, tmp_path / "full", *extra)))
    reset_accelerate()
    parted = tmp_path / "parted"
    first = train(parse(argv(base, data, parted, *extra, "--stop-after-steps", "3")))  # mid-epoch (2 per epoch)
    assert first.pipeline_dir is None and (parted / "checkpoints" / "checkpoint-3").is_dir()
    reset_accelerate()
    second = train(parse(argv(base, data, parted, *extra, "--resume", "latest")))
    assert read_metrics(parted) == read_metrics(tmp_path / "full")
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    a, b = weights(full.pipeline_dir, "transformer"), weights(second.pipeline_dir, "transformer")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights too


def test_options_that_do_not_apply_are_refused(base, data, tmp_path, capsys):
    for flag in (["--noise-type", "uniform"], ["--unconditional"]):
        code = cli_main(["train", *argv(base, data, tmp_path / "o"), *flag])
        assert code == 2 and "does not apply to a STARFlow model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 2 processes
def test_two_process_fine_tuning_keeps_ranks_in_sync(base, data, tmp_path):
    """DDP over gloo: both processes end with the same weights."""
    arguments = argv(base, data, tmp_path / "run", "--max-steps", "2", "--drop-label", "0.5", "--checkpoint-every", "2")
    done, out = train_in_two_processes(tmp_path, [*arguments, "--lr", "1e-3"])
    assert done.returncode == 0, done.stderr[-3000:]
    hashes = [(out / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    assert "2 process(es)" in done.stdout + done.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "generator_0.safetensors").is_file() and (checkpoint / "generator_1.safetensors").is_file()
    trained, start = weights(tmp_path / "run" / "model", "transformer"), weights(base, "transformer")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    # FSDP with the shipped config, as users launch it: torch's FSDP2 shards every StarFlowLayer over gloo
    # (accelerate alone would fall back to DDP on CPU, each process holding everything). Checkpoints hold each
    # process's shards, a run stopped after step 1 resumes, and the weights come out as DDP's to float rounding.
    config = Path(__file__).parents[1] / "scripts" / "fsdp_starflow.yaml"
    sharded = argv(base, data, tmp_path / "fsdp", "--max-steps", "2", "--drop-label", "0.5", "--lr", "1e-3")
    for extra in (["--checkpoint-every", "1", "--stop-after-steps", "1"], ["--resume", "latest"]):
        done = launch_two_processes(["-m", "tarflow_hf", "train", *sharded, *extra], config_file=config)
        assert done.returncode == 0, done.stderr[-3000:]
    first = tmp_path / "fsdp" / "checkpoints" / "checkpoint-1"
    assert (first / "pytorch_model_fsdp_0").is_dir() and not (first / "model.safetensors").exists()
    assert "resumed from" in done.stdout and "at step 1" in done.stdout
    fsdp = weights(tmp_path / "fsdp" / "model", "transformer")
    assert fsdp.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-6, msg=name)
