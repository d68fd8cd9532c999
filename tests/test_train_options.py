"""`tarflow-hf train`'s command line: nonsense numbers refused as they are parsed, defaults in `--help`, trackers
that log (metrics and sample grids) or stop at once naming the package; Apple's prior update for volume-preserving
models; the training package's functions stay small."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import mnist_train_args as argv
from conftest import parse_train_args as parse
from conftest import write_idx_split

from tarflow_hf.commands import build_parser
from tarflow_hf.commands import main as cli_main
from tarflow_hf.training import train

TRAINING = Path(__file__).resolve().parents[1] / "src" / "tarflow_hf" / "training"

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A tiny MNIST look-alike in IDX format (16 images of 8x8, 10 classes)."""
    write_idx_split(tmp_path / "idx", count=16)
    return tmp_path / "idx"


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "nan"), ("--lr", "0"), ("--lr", "inf"), ("--noise-std", "nan"), ("--noise-std", "-0.1"),
        ("--torch-threads", "-1"), ("--max-steps", "-5"), ("--max-steps", "0"), ("--warmup-steps", "-1"),
        ("--stop-after-steps", "-2"), ("--checkpoint-every", "-1"), ("--batch-size", "0"), ("--epochs", "0"),
        ("--drop-label", "1.5"), ("--ema-decay", "1"), ("--min-lr", "nan"), ("--image-size", "0"),
        ("--default-guidance-scale", "nan"), ("--sample-every", "-3"), ("--keep-checkpoints", "0"),
    ],
)  # fmt: skip
def test_nonsense_numbers_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--dataset", "mnist", "--output-dir", "out", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err, err


def test_help_shows_every_default():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    text = train_parser.format_help()
    for action in train_parser._actions:
        if not action.option_strings or action.required or isinstance(action, argparse._StoreTrueAction):
            continue
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.option_strings
    flat = " ".join(text.split())
    assert "peak learning rate (default: 0.002 for a new model, 0.0001 with --init-from)" in flat
    assert "with --init-from the model's own" in flat and "(default: 128)" in flat


# ------------------------------------------------------------------------------------------------- trackers
@pytest.mark.parametrize(("tracker", "package"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_without_its_package_stops_at_once(tracker, package, idx_dir, tmp_path, monkeypatch, capsys):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    out = tmp_path / "run"
    code = cli_main(["train", *argv(idx_dir, out, "--max-steps", "1", "--report-to", tracker)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"pip install {package}" in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # stopped before anything ran


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not a dependency): records calls."""

    calls: ClassVar[list[tuple]] = []

    def __init__(self, logdir, **kwargs):
        self.logdir = logdir

    def add_scalar(self, tag, value, global_step=None, **kwargs):
        self.calls.append(("scalar", tag, value, global_step))

    def add_images(self, tag, images, global_step=None, dataformats="NCHW", **kwargs):
        self.calls.append(("images", tag, np.asarray(images), global_step, dataformats))

    def add_hparams(self, *args, **kwargs):
        self.calls.append(("hparams",))

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        self.calls.append(("close",))


def test_tensorboard_gets_the_metrics_and_the_sample_grids(idx_dir, tmp_path, monkeypatch):
    import accelerate.tracking
    import torch.utils
    from accelerate.utils import LoggerType

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    FakeSummaryWriter.calls = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(torch.utils, "tensorboard", fake, raising=False)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.TENSORBOARD])

    out = tmp_path / "run"
    train(parse(argv(idx_dir, out, "--max-steps", "2", "--sample-every", "2", "--report-to", "tensorboard")))
    calls = FakeSummaryWriter.calls
    assert [(c[2] is not None, c[3]) for c in calls if c[:2] == ("scalar", "loss")] == [(True, 1), (True, 2)]
    images = [c for c in calls if c[0] == "images"]
    assert [(c[1], c[3], c[4]) for c in images] == [("samples", 2, "NHWC"), ("samples", 2, "NHWC")]  # step 2, final
    grid = np.asarray(__import__("PIL.Image").Image.open(out / "samples" / "step_0000002.png").convert("RGB"))
    assert np.array_equal(images[0][2][0], grid)  # the grid written to samples/
    assert calls[-1] == ("close",)


# ------------------------------------------------------------------------------------- volume-preserving prior
def test_volume_preserving_training_updates_the_prior_variance_as_apple(idx_dir, tmp_path):
    """Apple's train.py, per step: `var.lerp_(mean over the batch of z**2, 0.1)` (update_prior), z the latents of
    the step's forward pass. Recomputed here from the latents recorded during the run."""
    from tarflow_hf import TarFlowModel, TarFlowPipeline

    latents = []

    def record(module, args, output):
        if isinstance(module, TarFlowModel) and module.training:
            latents.append(output.latents.detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(parse(argv(idx_dir, tmp_path / "run", "--max-steps", "4", "--no-nvp", "--ema-decay", "0")))
    finally:
        handle.remove()
    assert len(latents) == 4
    expected = torch.ones_like(latents[0][0])
    for z in latents:
        expected = expected.lerp(z.square().mean(dim=0), 0.1)
    prior = result.model.prior_variance
    torch.testing.assert_close(prior, expected, rtol=1e-5, atol=1e-6)
    assert (prior - 1).abs().max() > 1e-2  # moved away from the initial all-ones
    saved = TarFlowPipeline.from_pretrained(str(result.pipeline_dir)).transformer
    torch.testing.assert_close(saved.prior_variance, expected, rtol=1e-5, atol=1e-6)


def test_affine_training_keeps_the_unit_prior(idx_dir, tmp_path):
    result = train(parse(argv(idx_dir, tmp_path / "run", "--max-steps", "2", "--ema-decay", "0")))
    assert torch.equal(result.model.prior_variance, torch.ones_like(result.model.prior_variance))


# -------------------------------------------------------------------------------------------------- structure
def test_training_functions_stay_small():
    """No function of the training package past 15 branches (ruff's C901; ruff is a test dependency)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "C901", "--config",
         "lint.mccabe.max-complexity=15", str(TRAINING)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_training_never_imports_the_command_line():
    """The library raises; the command line (tarflow_hf.commands) turns errors into lines, and only it imports
    the library, never the other way round."""
    import ast

    for source in sorted(TRAINING.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not (name.startswith("..commands") or name.startswith("tarflow_hf.commands")), (source, name)


def test_the_training_defaults_import_no_torch():
    code = "import sys, tarflow_hf.training.defaults, tarflow_hf.training.layout; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
