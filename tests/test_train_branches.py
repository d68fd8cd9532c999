"""Branches of a run (`tarflow_hf.training.branches`): resuming at an earlier step (or starting afresh in a used
output folder) continues one branch, and what the run wrote for later steps is moved aside under `.superseded`
names, never deleted nor overwritten; the metrics log holds each step once; the checkpoint rotation sees only this
branch's checkpoints and never deletes a folder that is not one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mnist_train_args as argv
from conftest import parse_train_args as parse
from conftest import reset_accelerate, write_idx_split

from tarflow_hf.commands import main as cli_main
from tarflow_hf.training import train
from tarflow_hf.training.checkpoints import list_checkpoints

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A tiny MNIST look-alike in IDX format (24 images of 8x8, 10 classes): 6 steps of 4 per epoch."""
    write_idx_split(tmp_path / "idx", count=24)
    return tmp_path / "idx"


def files(folder: Path) -> dict[Path, bytes]:
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def run(*arguments: str):
    result = train(parse(list(arguments)))
    reset_accelerate()
    return result


def test_resuming_a_finished_run_from_an_earlier_checkpoint_keeps_its_final_outputs(idx_dir, tmp_path, capsys):
    """The finished branch ends at step 8, which is no checkpoint step: its final model exists nowhere but in
    model/. Resuming at checkpoint-6 for a longer run keeps it (with its grid and summary) under .superseded names
    and says where."""
    out = tmp_path / "run"
    run(*argv(idx_dir, out, "--max-steps", "8", "--checkpoint-every", "3"))
    old_model, old_grid = files(out / "model"), (out / "samples" / "final.png").read_bytes()
    old_summary = (out / "train_summary.json").read_bytes()
    capsys.readouterr()

    result = run(*argv(idx_dir, out, "--max-steps", "10", "--checkpoint-every", "3", "--resume", "latest"))
    said = capsys.readouterr().out
    assert result.progress.step == 10 and json.loads((out / "train_summary.json").read_text())["step"] == 10
    assert files(out / "model.superseded") == old_model and files(out / "model") != old_model
    assert (out / "samples" / "final.superseded.png").read_bytes() == old_grid
    assert (out / "train_summary.superseded.json").read_bytes() == old_summary
    for kept in ("model.superseded", "final.superseded.png", "train_summary.superseded.json"):
        assert kept in said, said


def test_a_second_superseded_branch_gets_its_own_names(idx_dir, tmp_path):
    out = tmp_path / "run"
    run(*argv(idx_dir, out, "--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "5"))
    first = files(out / "model")
    run(*argv(idx_dir, out, "--max-steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "5", "--resume",
              str(out / "checkpoints" / "checkpoint-2")))  # fmt: skip
    second = files(out / "model")
    run(*argv(idx_dir, out, "--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "5", "--resume",
              str(out / "checkpoints" / "checkpoint-2")))  # fmt: skip
    assert files(out / "model.superseded") == first and files(out / "model.superseded-2") == second
    assert json.loads((out / "train_summary.superseded-2.json").read_text())["step"] == 5
    assert logged_steps(out / "metrics.superseded-2.jsonl") == [3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-4.superseded", "checkpoint-4.superseded-2", "checkpoint-6",
    ]  # fmt: skip


def test_resuming_a_finished_run_at_its_end_rewrites_its_outputs_in_place(idx_dir, tmp_path):
    """Resumed at the step its final outputs were made at, with nothing left to train: they are made again from
    the same state, in place (nothing to keep aside)."""
    out = tmp_path / "run"
    common = ["--max-steps", "4", "--checkpoint-every", "2"]
    run(*argv(idx_dir, out, *common))
    weights = (out / "model" / "transformer" / "model.safetensors").read_bytes()
    run(*argv(idx_dir, out, *common, "--resume", "latest"))
    assert (out / "model" / "transformer" / "model.safetensors").read_bytes() == weights
    assert not [path.name for path in out.rglob("*superseded*")]


def test_after_a_resume_the_metrics_log_holds_each_step_once(idx_dir, tmp_path):
    """Steps 1..4 from the first run (as logged then), 5..8 from the branch resumed at checkpoint-4; the old
    branch's steps 5..8 are kept in metrics.superseded.jsonl."""
    out = tmp_path / "run"
    run(*argv(idx_dir, out, "--max-steps", "8", "--checkpoint-every", "4"))
    first = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    branch = ["--max-steps", "8", "--checkpoint-every", "2", "--lr", "1e-3"]
    run(*argv(idx_dir, out, *branch, "--stop-after-steps", "6", "--resume", str(out / "checkpoints" / "checkpoint-4")))
    assert logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.superseded.jsonl").read_text() == "".join(first[4:])
    run(*argv(idx_dir, out, *branch, "--resume", "latest"))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert logged_steps(out / "metrics.jsonl") == list(range(1, 9))
    assert lines[:4] == first[:4]


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(idx_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--max-steps", "6", "--checkpoint-every", "2"]
    run(*argv(idx_dir, out, *common, "--stop-after-steps", "4"))
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "epoch": 0, "lr": 0.00')  # the process died in the middle of the line
    run(*argv(idx_dir, out, *common, "--resume", "latest"))
    assert logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.superseded.jsonl").read_text() == '{"step": 5, "epoch": 0, "lr": 0.00\n'


def test_a_fresh_start_in_a_used_folder_keeps_the_earlier_run_aside(idx_dir, tmp_path):
    """Without --resume the run starts afresh: the earlier run's checkpoints (steps 6 and 8) no longer outrank the
    new ones in the rotation or in `--resume latest`, and its model is kept aside."""
    out = tmp_path / "run"
    common = ["--checkpoint-every", "2", "--keep-checkpoints", "2"]
    run(*argv(idx_dir, out, "--max-steps", "8", *common))
    earlier = files(out / "model")
    run(*argv(idx_dir, out, "--max-steps", "4", *common))
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    names = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6.superseded", "checkpoint-8.superseded"]
    assert files(out / "model.superseded") == earlier
    assert logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4]


def test_the_rotation_never_deletes_a_folder_that_is_not_a_checkpoint(idx_dir, tmp_path):
    out = tmp_path / "run"
    notes = out / "checkpoints" / "checkpoint-1" / "notes.txt"  # named like a checkpoint, but no progress.json
    notes.parent.mkdir(parents=True)
    notes.write_text("the user's")
    run(*argv(idx_dir, out, "--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "1"))
    assert notes.read_text() == "the user's"
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-6"]


def test_a_changed_recipe_keeps_the_earlier_recipe_aside(idx_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--max-steps", "4", "--checkpoint-every", "2"]
    run(*argv(idx_dir, out, *common, "--lr", "1e-3", "--stop-after-steps", "2"))
    run(*argv(idx_dir, out, *common, "--lr", "1e-3", "--stop-after-steps", "3", "--resume", "latest"))
    assert not (out / "recipe.superseded.json").exists()  # the same recipe: nothing to keep
    run(*argv(idx_dir, out, *common, "--lr", "2e-3", "--resume", "latest"))
    assert json.loads((out / "recipe.superseded.json").read_text())["lr"] == 1e-3
    assert json.loads((out / "recipe.json").read_text())["lr"] == 2e-3


def test_a_model_folder_that_is_not_ours_is_refused_before_training(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    thesis = out / "model" / "thesis.tex"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("years of work")
    code = cli_main(["train", *argv(idx_dir, out, "--max-steps", "2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a pipeline folder tarflow-hf wrote" in err, err
    assert thesis.read_text() == "years of work" and not (out / "metrics.jsonl").exists()
