"""Training: recipe parts, loss goes down, exact resume, accumulation, fine-tuning, Hub push, 2-process run."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    launch_two_processes,
    reset_accelerate,
    train_as_the_command_line,
    train_in_two_processes,
    write_idx_split,
)
from conftest import mnist_train_args as base_args
from conftest import parse_train_args as parse
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from tarflow_hf.commands import main as cli_main
from tarflow_hf.training import train
from tarflow_hf.training.ema import EMA
from tarflow_hf.training.recipe import add_noise, cosine_lr, drop_labels

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    write_idx_split(tmp_path / "idx")
    return tmp_path / "idx"


def read_metrics(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("elapsed_s")
    return lines


# ----------------------------------------------------------------------------------------------- recipe parts
def test_cosine_schedule_shape():
    lrs = [cosine_lr(step, 100, 10, 1e-3, 1e-6) for step in range(100)]
    assert lrs[9] == pytest.approx(1e-3)  # end of warm-up: the peak
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))  # linear rise
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # cosine fall
    assert lrs[-1] == pytest.approx(1e-6)
    assert lrs[54] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6), rel=1e-6)  # half-way point of the cosine


def test_gaussian_noise_semantics():
    images = torch.zeros(64, 1, 16, 16)
    noisy = add_noise(images, "gaussian", 0.1, torch.Generator().manual_seed(0))
    assert noisy.std().item() == pytest.approx(0.1, rel=0.05)
    assert abs(noisy.mean().item()) < 0.01


def test_uniform_dequantization_stays_in_the_pixel_bin():
    levels = torch.randint(0, 256, (32, 1, 8, 8)).float()
    images = levels / 127.5 - 1
    dequantized = add_noise(images, "uniform", 0.0, torch.Generator().manual_seed(0))
    # Level k occupies [k, k+1) / 256 of the unit interval, i.e. [-1 + 2k/256, -1 + 2(k+1)/256) in model space.
    position = (dequantized + 1) / 2 * 256
    assert torch.equal(position.floor(), levels)
    assert position.sub(levels).std() > 0.2  # spread over the bin, not at one point
    with pytest.raises(ValueError, match="noise_type"):
        add_noise(images, "salt", 0.1)


def test_label_dropout_semantics():
    labels = torch.arange(20000) % 10
    dropped = drop_labels(labels, 0.25, torch.Generator().manual_seed(0))
    mask = dropped == -1
    assert mask.float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert torch.equal(dropped[~mask], labels[~mask])  # the rest untouched
    assert torch.equal(drop_labels(labels, 0.0), labels)


def test_ema_tracks_the_average():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(50):
        ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.ones(1, 2), atol=1e-6)


# -------------------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss(idx_dir, tmp_path):
    result = train_as_the_command_line(
        base_args(idx_dir, tmp_path / "run", "--max-steps", "30", "--lr", "1e-2", "--ema-decay", "0")
    )
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 30
    first, last = metrics[0]["loss"], np.mean([m["loss"] for m in metrics[-5:]])
    assert last < first - 0.5, (first, last)
    assert metrics[-1]["bits_per_dim"] < metrics[0]["bits_per_dim"]
    folder = result.pipeline_dir
    card = (folder / "README.md").read_text()
    assert "--max-steps 30" in card and "## Training recipe" in card
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["noise_std"] == 0.05


def test_resume_reproduces_the_uninterrupted_run(idx_dir, tmp_path):
    # 24 images / batch 4 = 6 steps per epoch: the interruption at step 4 is mid-epoch, the run crosses epochs.
    extra = ["--max-steps", "9", "--drop-label", "0.5", "--ema-decay", "0.9", "--noise-std", "0.2"]
    full = train(parse(base_args(idx_dir, tmp_path / "full", *extra)))
    parted = tmp_path / "parted"
    first = train(parse(base_args(idx_dir, parted, *extra, "--stop-after-steps", "4")))
    assert first.pipeline_dir is None and first.progress.step == 4
    assert (parted / "checkpoints" / "checkpoint-4" / "progress.json").is_file()
    second = train(parse(base_args(idx_dir, parted, *extra, "--resume", "latest")))
    assert read_metrics(parted) == read_metrics(tmp_path / "full")
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    final_full = load_file(str(full.pipeline_dir / "transformer" / "model.safetensors"))
    final_parted = load_file(str(second.pipeline_dir / "transformer" / "model.safetensors"))
    assert final_full.keys() == final_parted.keys()
    assert all(torch.equal(final_full[k], final_parted[k]) for k in final_full)  # EMA weights, too


def test_gradient_accumulation_matches_the_big_batch(idx_dir, tmp_path):
    common = ["--max-steps", "1", "--noise-std", "0", "--drop-label", "0", "--ema-decay", "0", "--batch-size", "8"]
    plain = train(parse(base_args(idx_dir, tmp_path / "plain", *common)))
    accumulated = train(parse(base_args(idx_dir, tmp_path / "acc", *common, "--gradient-accumulation-steps", "2")))
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(value, accumulated.model.state_dict()[name], rtol=1e-4, atol=1e-6)


def test_checkpoints_are_rotated_and_atomic(idx_dir, tmp_path):
    out = tmp_path / "run"
    train(parse(base_args(idx_dir, out, "--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2")))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # no .tmp leftovers, oldest removed


def snapshot(output: Path) -> dict[Path, bytes] | bytes:
    if output.is_dir():
        return {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    return output.read_bytes()


def test_failed_writes_keep_the_previous_outputs(idx_dir, tmp_path, monkeypatch, caplog):
    """Reruns whose writes fail midway (the serializer writes part of a file, then the disk is full) lose nothing of
    the run before them: each of its outputs (checkpoint, pipeline folder, summary, sample grid) is where it was or,
    the rerun resuming from checkpoint-2 and so starting a new branch, moved aside intact; and no debris is left. A
    sample grid that fails to be written is a warning: the run goes on."""
    import pathlib

    import safetensors.torch
    import transformers.modeling_utils

    out = tmp_path / "run"
    flags = ["--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "5", "--sample-every", "4"]
    train(parse(base_args(idx_dir, out, *flags)))
    reset_accelerate()
    rerun = parse(base_args(idx_dir, out, *flags, "--resume", str(out / "checkpoints" / "checkpoint-2")))

    def disk_full(path, content: bytes = b"part") -> None:
        Path(path).write_bytes(content)
        raise OSError(28, "No space left on device")

    grid = out / "samples" / "step_0000004.png"
    earlier_grid = grid.read_bytes()
    with monkeypatch.context() as patch, caplog.at_level("WARNING", logger="tarflow_hf.training"):
        patch.setattr(Image.Image, "save", lambda image, fp, *a, **k: disk_full(fp))
        result = train(rerun)  # the run completes
    reset_accelerate()
    assert result.pipeline_dir is not None and not grid.exists()
    assert (out / "samples" / "step_0000004.superseded.png").read_bytes() == earlier_grid
    assert "step_0000004.png failed" in caplog.text and "No space left on device" in caplog.text

    write_text = pathlib.Path.write_text

    def summary_fails(path, text, *args, **kwargs):
        if "train_summary.json" not in path.name:
            return write_text(path, text, *args, **kwargs)
        disk_full(path, text[:5].encode())

    failures = [  # (what fails to be written, how)
        (out / "checkpoints" / "checkpoint-4", safetensors.torch, "save_file", lambda t, name, **k: disk_full(name)),
        (out / "model", transformers.modeling_utils, "safe_save_file", lambda t, name, *a, **k: disk_full(name)),
        (out / "train_summary.json", pathlib.Path, "write_text", summary_fails),
    ]
    for output, owner, name, failing in failures:
        train(rerun)  # a run that completes: the failing one has an earlier output to lose
        reset_accelerate()
        before, siblings = snapshot(output), set(output.parent.iterdir())
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, failing)
            with pytest.raises(OSError, match="No space left on device"):
                train(rerun)
        reset_accelerate()
        if output.exists():
            assert snapshot(output) == before, output
        else:  # moved aside intact
            aside = Path(output.name).stem + ".superseded"
            (moved,) = [path for path in set(output.parent.iterdir()) - siblings if path.name.startswith(aside)]
            assert snapshot(moved) == before, output
        assert not list(out.rglob(".*")), output  # no temporaries left


def hub_online_with_a_token(monkeypatch) -> None:
    """The Hub switched on and a token to upload with, whatever the test machine has (no request is ever made)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")


@pytest.mark.parametrize(
    ("problem", "repo", "message"),
    [
        ("offline", "me/tiny", "the Hub is switched off (HF_HUB_OFFLINE)"),
        ("no token", "me/tiny", "no Hugging Face token"),
        ("repo id", "me/tiny/extra", "not a Hub repository id"),
        ("repo id", "tiny", "not a Hub repository id"),
    ],
)
def test_an_upload_that_cannot_work_stops_before_training(
    problem, repo, message, idx_dir, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    hub_online_with_a_token(monkeypatch)
    if problem == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if problem == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "run"
    code = cli_main(["train", *base_args(idx_dir, out, "--max-steps", "2", "--push-to-hub", repo)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and repo in err, err
    assert not out.exists()  # found before any step


def test_a_failed_upload_keeps_the_model_and_says_where(idx_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Max retries exceeded with url: /api/repos/create\n(Caused by NameResolutionError)")

    hub_online_with_a_token(monkeypatch)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    out = tmp_path / "run"
    code = cli_main(["train", *base_args(idx_dir, out, "--max-steps", "2", "--push-to-hub", "me/tiny")])
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # one line, no traceback
    assert code == 2 and "upload to me/tiny failed" in err, err
    assert f"the trained model is kept in {out / 'model'}" in err, err
    assert TarFlowPipeline.from_pretrained(str(out / "model")).transformer.config.num_classes == 10


def test_push_to_hub_uploads_a_loadable_folder(idx_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = repo_id
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload"] = repo_id
        shutil.copytree(folder_path, tmp_path / "hub" / repo_id)
        return "https://huggingface.co/fake/commit"

    hub_online_with_a_token(monkeypatch)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda self, repo_id, filename, **kwargs: False)
    result = train(parse(base_args(idx_dir, tmp_path / "run", "--max-steps", "2", "--push-to-hub", "me/tiny")))
    assert calls == {"create": "me/tiny", "upload": "me/tiny"}
    uploaded = tmp_path / "hub" / "me" / "tiny"
    card = ModelCard.load(uploaded / "README.md")
    assert 'from_pretrained("me/tiny")' in card.text and card.data.datasets == ["mnist"]
    assert str(tmp_path) not in card.content  # no local paths: the data and output folders are named by their names
    model = TarFlowPipeline.from_pretrained(str(uploaded)).transformer
    for name, value in result.ema_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def write_class_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / name / f"{i}.png")
    return root


def test_fine_tune_keeps_or_replaces_labels(idx_dir, tmp_path):
    base = train(parse(base_args(idx_dir, tmp_path / "base", "--max-steps", "1"))).pipeline_dir
    letters = [chr(ord("a") + i) for i in range(10)]
    folder = write_class_folder(tmp_path / "letters", letters)
    common = ["--dataset", str(folder), "--init-from", str(base), "--batch-size", "4", "--max-steps", "1"]
    kept = train(parse([*common, "--output-dir", str(tmp_path / "kept"), "--no-progress"]))
    assert kept.model.config.id2label[0] == "0"
    replaced = train(parse([*common, "--output-dir", str(tmp_path / "new"), "--no-progress", "--replace-labels"]))
    config = json.loads((replaced.pipeline_dir / "transformer" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(10)] == letters


def test_clear_errors_from_the_command_line(idx_dir, tmp_path, capsys):
    base = train(parse(base_args(idx_dir, tmp_path / "base", "--max-steps", "1"))).pipeline_dir
    two = write_class_folder(tmp_path / "two", ["x", "y"])
    code = cli_main(["train", "--dataset", str(two), "--init-from", str(base), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "num_classes=10 but the dataset has 2 classes" in capsys.readouterr().err
    missing = tmp_path / "nothing-here"
    code = cli_main(["train", "--dataset", str(missing), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    broken = write_class_folder(tmp_path / "broken", ["a"], per_class=4)
    (broken / "a" / "0.png").write_bytes(b"garbage")
    code = cli_main(["train", "--dataset", str(broken), "--output-dir", str(tmp_path / "o"), "--batch-size", "2"])
    assert code == 2 and "0.png" in capsys.readouterr().err
    code = cli_main(["train", "--dataset", "mnist", "--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "o"),
                     "--batch-size", "3", "--gradient-accumulation-steps", "2"])  # fmt: skip
    assert code == 2 and "divisible" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 2 processes
def test_two_process_training_keeps_ranks_in_sync(idx_dir, tmp_path):
    arguments = base_args(idx_dir, tmp_path / "run", "--max-steps", "4", "--batch-size", "8")
    done, out = train_in_two_processes(tmp_path, [*arguments, "--drop-label", "0.5", "--checkpoint-every", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    hashes = [(out / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    assert "2 process(es)" in done.stdout + done.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "generator_0.safetensors").is_file() and (checkpoint / "generator_1.safetensors").is_file()
    # The ranks agree on a trained model, not an untouched one: output projections start at zero.
    weights = load_file(str(tmp_path / "run" / "model" / "transformer" / "model.safetensors"))
    assert weights["blocks.0.proj_out.weight"].abs().sum() > 0
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["step"] == 4


def test_accelerate_launch_runs_the_train_command_on_two_processes(idx_dir, tmp_path):
    """The documented way: `accelerate launch -m tarflow_hf train ...` (the command line, as a module)."""
    out = tmp_path / "run"
    arguments = base_args(idx_dir, out, "--max-steps", "2", "--batch-size", "8")
    done = launch_two_processes(["-m", "tarflow_hf", "train", *arguments])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr
    card = ModelCard.load(out / "model" / "README.md")
    assert "tarflow-hf train --dataset mnist" in card.text and "--max-steps 2" in card.text
    assert json.loads((out / "train_summary.json").read_text())["step"] == 2


def test_bf16_mixed_precision_trains(idx_dir, tmp_path):
    result = train(parse(base_args(idx_dir, tmp_path / "run", "--max-steps", "3", "--mixed-precision", "bf16")))
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3 and all(np.isfinite(m["loss"]) for m in metrics)
    assert result.model.dtype == torch.float32  # autocast, float32 master weights
