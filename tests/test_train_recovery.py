"""Nothing of the user's lost: resuming from an earlier checkpoint continues that branch (later checkpoints moved
aside, not deleted), a damaged latest checkpoint falls back to the newest intact one, a non-finite loss stops with
one line and keeps the checkpoints, a failing sample grid never stops training, bad data stops before step 1."""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, kill_when_ready, reset_accelerate, write_idx_split
from conftest import mnist_train_args as argv
from conftest import parse_train_args as parse
from PIL import Image
from safetensors.torch import load_file

from tarflow_hf.commands import main as cli_main
from tarflow_hf.training import train
from tarflow_hf.training.checkpoints import list_checkpoints

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A tiny MNIST look-alike in IDX format (24 images of 8x8, 10 classes)."""
    write_idx_split(tmp_path / "idx", count=24)
    return tmp_path / "idx"


def files(folder: Path) -> dict[Path, bytes]:
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_resuming_from_an_earlier_checkpoint_continues_that_branch(idx_dir, tmp_path):
    out = tmp_path / "run"
    train(parse(argv(idx_dir, out, "--max-steps", "8", "--checkpoint-every", "4")))
    reset_accelerate()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    old_branch = files(out / "checkpoints" / "checkpoint-8")

    branch = ["--max-steps", "8", "--checkpoint-every", "2", "--stop-after-steps", "6"]
    result = train(parse(argv(idx_dir, out, *branch, "--resume", str(out / "checkpoints" / "checkpoint-4"))))
    reset_accelerate()
    assert result.progress.step == 6
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6", "checkpoint-8.superseded"]  # 4 kept, 8 renamed, not deleted
    assert files(out / "checkpoints" / "checkpoint-8.superseded") == old_branch
    assert list_checkpoints(out)[-1].name == "checkpoint-6"  # what `latest` means now

    resumed = train(parse(argv(idx_dir, out, "--max-steps", "8", "--checkpoint-every", "2", "--resume", "latest")))
    assert resumed.progress.step == 8 and resumed.pipeline_dir is not None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [7, 8]


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "progress.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(idx_dir, tmp_path, damaged, caplog):
    """The run resumed from checkpoint-2 after checkpoint-4 was truncated ends exactly as the uninterrupted run."""
    common = ["--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--ema-decay", "0"]
    full = train(parse(argv(idx_dir, tmp_path / "full", *common)))
    reset_accelerate()
    out = tmp_path / "run"
    train(parse(argv(idx_dir, out, *common, "--stop-after-steps", "4")))
    reset_accelerate()
    target = out / "checkpoints" / "checkpoint-4" / damaged
    target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 2)])

    with caplog.at_level("WARNING", logger="tarflow_hf.training"):
        result = train(parse(argv(idx_dir, out, *common, "--resume", "latest")))
    assert "checkpoint-4 is damaged" in caplog.text
    assert result.progress.step == 6
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name]), name
    assert (out / "checkpoints" / "checkpoint-4.superseded" / damaged).is_file()  # kept for inspection


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    idx_dir, tmp_path, monkeypatch, capsys
):
    from tarflow_hf.training import families

    calls = {"n": 0}
    add_noise = families.add_noise

    def poisoned(images, *args, **kwargs):  # the fourth batch is NaN: step 4's loss is not finite
        calls["n"] += 1
        noisy = add_noise(images, *args, **kwargs)
        return noisy * float("nan") if calls["n"] == 4 else noisy

    monkeypatch.setattr(families, "add_noise", poisoned)
    out = tmp_path / "run"
    code = cli_main(["train", *argv(idx_dir, out, "--max-steps", "8", "--checkpoint-every", "2")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "non-finite loss at step 4" in err and "checkpoint-2" in err, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    weights = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_a_failing_sample_grid_never_stops_training(idx_dir, tmp_path, monkeypatch, caplog):
    """Sampling blows up (as a wrecked model's does): the checkpoint of that step is written first, the grid
    is a warning, and the run ends with its pipeline folder."""
    from tarflow_hf import TarFlowModel

    def overflow(self, *args, **kwargs):
        raise FloatingPointError("sampling produced non-finite values")

    monkeypatch.setattr(TarFlowModel, "inverse", overflow)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="tarflow_hf.training"):
        result = train(parse(argv(idx_dir, out, "--max-steps", "4", "--checkpoint-every", "2", "--sample-every", "2")))
    assert result.pipeline_dir == out / "model" and (out / "model" / "model_index.json").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert caplog.text.count("sampling produced non-finite values") == 3  # steps 2 and 4, and the final grid
    assert not (out / "samples").exists() or not list((out / "samples").iterdir())


def write_folder(root: Path, sizes: dict[str, list[int]]) -> Path:
    rng = np.random.default_rng(0)
    for name, image_sizes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate(image_sizes):
            array = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(array, "L").save(root / name / f"{i}.png")
    return root


def test_a_corrupt_image_is_found_before_step_one(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", {"a": [8] * 6, "b": [8] * 6})
    broken = folder / "b" / "5.png"
    broken.write_bytes(broken.read_bytes()[:-30])  # a valid header, then the file ends early
    out = tmp_path / "run"
    code = cli_main(["train", "--dataset", str(folder), "--output-dir", str(out), *TINY_MODEL, "--batch-size", "2",
                     "--max-steps", "6", "--log-every", "1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(broken) in err, err
    assert not (out / "metrics.jsonl").exists()  # no step was taken


def test_mixed_image_sizes_without_image_size_are_one_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", {"a": [8, 8, 8], "b": [8, 12, 8]})
    common = ["--dataset", str(folder), *TINY_MODEL, "--batch-size", "2", "--max-steps", "1", "--no-progress"]
    code = cli_main(["train", *common, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "different sizes" in err and "--image-size" in err, err
    reset_accelerate()
    assert cli_main(["train", *common, "--output-dir", str(tmp_path / "sized"), "--image-size", "8"]) == 0


def test_resume_of_a_damaged_named_checkpoint_is_one_line(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse(argv(idx_dir, out, "--max-steps", "2", "--checkpoint-every", "2", "--stop-after-steps", "2")))
    reset_accelerate()
    checkpoint = out / "checkpoints" / "checkpoint-2"
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 10)
    shutil.copytree(checkpoint, tmp_path / "copy")
    capsys.readouterr()
    code = cli_main(["train", *argv(idx_dir, out, "--max-steps", "4", "--resume", str(checkpoint))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot load this checkpoint" in err, err
    assert files(checkpoint) == files(tmp_path / "copy")  # left as it was


# ------------------------------------------------------------------------------------ outputs that fail to write
def refuse_writes_under(folder: Path, monkeypatch) -> None:
    """From now on, every attempt to create, write, rename or delete anything under `folder` fails as on a
    read-only file system (running as root, chmod would not stop the writes)."""
    import builtins
    import io

    def under(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(str(folder) + os.sep)

    def refused(path) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def guard(function, writes=lambda *args: True):
        def guarded(path, *args, **kwargs):
            if under(path) and writes(*args, **kwargs):
                raise refused(path)
            return function(path, *args, **kwargs)

        return guarded

    def writing_mode(mode="r", *args, **kwargs) -> bool:
        return any(flag in mode for flag in "wax+")

    def writing_flags(flags, *args, **kwargs) -> bool:
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    for module in (builtins, io):
        monkeypatch.setattr(module, "open", guard(io.open, writing_mode))
    monkeypatch.setattr(os, "open", guard(os.open, writing_flags))
    for name in ("mkdir", "unlink", "rmdir", "remove"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("rename", "replace"):
        original = getattr(os, name)

        def moved(source, destination, *args, original=original, **kwargs):
            if under(source) or under(destination):
                raise refused(destination)
            return original(source, destination, *args, **kwargs)

        monkeypatch.setattr(os, name, moved)


def test_an_output_folder_turned_read_only_stops_with_one_line_naming_the_last_checkpoint(
    idx_dir, tmp_path, monkeypatch, capsys
):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    out = tmp_path / "run"
    steps = []

    def after_step(optimizer, args, kwargs):
        steps.append(len(steps) + 1)
        if len(steps) == 3:  # after the checkpoint of step 2
            refuse_writes_under(out, monkeypatch)

    handle = register_optimizer_step_post_hook(after_step)
    try:
        code = cli_main(["train", *argv(idx_dir, out, "--max-steps", "8", "--checkpoint-every", "2")])
    finally:
        handle.remove()
        monkeypatch.undo()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert "Read-only file system" in err and f"the last good checkpoint is {checkpoint} (--resume it)" in err, err
    assert "training stopped at step 3" in err, err
    assert (checkpoint / "progress.json").is_file()


KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import pathlib, sys, time
    import transformers.modeling_utils
    from tarflow_hf.commands import main

    marker, what, arguments = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

    def then_hang(write):
        def slow(*args, **kwargs):
            result = write(*args, **kwargs)
            if what == "checkpoint" and args[0].name != "progress.json":
                return result
            marker.write_text("")  # the weights are written: a late kill leaves a whole copy of them
            time.sleep(600)
        return slow

    if what == "model":
        transformers.modeling_utils.safe_save_file = then_hang(transformers.modeling_utils.safe_save_file)
    else:
        pathlib.Path.write_text = then_hang(pathlib.Path.write_text)
    main(["train", *arguments])
    """
)


@pytest.mark.parametrize("what", ["model", "checkpoint"])
def test_what_a_save_killed_midway_left_is_removed_by_the_next_run(what, idx_dir, tmp_path):
    """SIGKILL while training saves its pipeline folder (into a staging folder, through another one: hidden
    `.model.{hex}.tmp` and `..model.{hex}.tmp.{hex}.tmp`) or a checkpoint: the next run removes every hidden leftover,
    whatever it writes itself."""
    out = tmp_path / "run"
    first = argv(idx_dir, out, "--max-steps", "2", "--checkpoint-every", "2", "--stop-after-steps", "2")
    if what == "model":
        first = argv(idx_dir, out, "--max-steps", "2")
    kill_when_ready(KILLED_WHILE_SAVING, tmp_path / "marker", str(tmp_path / "marker"), what, *first)
    leftovers = [path.name for path in out.rglob(".*")]
    assert leftovers and all(name.endswith(".tmp") for name in leftovers), leftovers
    if what == "model":
        assert any(name.startswith("..model.") for name in leftovers), leftovers
    train(parse(argv(idx_dir, out, "--max-steps", "3", "--checkpoint-every", "3")))
    assert not list(out.rglob(".*"))
    assert (out / "model" / "model_index.json").is_file() and (out / "checkpoints" / "checkpoint-3").is_dir()
