"""Shared test helpers: tiny random models and Apple's reference outputs."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.convert import config_from_apple_arguments, load_ml_tarflow_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_CASES = ("tiny_cond", "tiny_uncond")


def tiny_config(**overrides) -> TarFlowConfig:
    settings = dict(
        image_size=8,
        num_channels=1,
        patch_size=2,
        hidden_size=32,
        head_dim=16,
        num_blocks=2,
        layers_per_block=1,
        num_classes=3,
        noise_std=0.1,
    )
    settings.update(overrides)
    return TarFlowConfig(**settings)


def random_model(config: TarFlowConfig | None = None, seed: int = 0, **overrides) -> TarFlowModel:
    """A model whose every path matters: Apple zero-initialises the output projections, which would make the
    flow nearly the identity, so they get small random weights here (as in the reference fixtures)."""
    torch.manual_seed(seed)
    model = TarFlowModel(config or tiny_config(**overrides)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    return model


def reference_config(name: str) -> TarFlowConfig:
    apple = json.loads((FIXTURES / f"{name}.json").read_text())["config"]
    return config_from_apple_arguments(apple, noise_std=0.1)


def load_reference(name: str) -> tuple[dict, TarFlowModel, dict[str, torch.Tensor]]:
    """(the case's json, the model with its weights, Apple's expected outputs)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    model = load_ml_tarflow_checkpoint(str(FIXTURES / f"{name}.pth"), reference_config(name))
    expected = torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)
    return meta, model, expected


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny models: starting threads costs more than it saves, and far more on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=REFERENCE_CASES)
def reference(request):
    return load_reference(request.param)


# ------------------------------------------------------------------------------------------- training helpers
TINY_MODEL = [
    "--patch-size", "2", "--hidden-size", "32", "--head-dim", "16", "--num-blocks", "2", "--layers-per-block", "1",
]  # fmt: skip


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Used by the training tests (`pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`)."""
    yield
    reset_accelerate()


def write_idx_split(folder: Path, count: int = 24, size: int = 8, seed: int = 0) -> None:
    """A tiny MNIST look-alike in IDX format: class c is a bright blob at a class-dependent place, on a dark
    background."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % 10).astype(np.uint8)
    images = rng.integers(0, 40, (count, size, size)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        images[i, 2 * row : 2 * row + 3, 2 * col : 2 * col + 3] = 230
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / (stem + ".gz")).write_bytes(gzip.compress(header + array.tobytes()))


def mnist_train_args(idx_dir: Path, output: Path, *extra: str) -> list[str]:
    """`tarflow-hf train` arguments for the tiny model on an IDX folder, with `extra` appended."""
    return [
        "--dataset", "mnist", "--data-dir", str(idx_dir), "--output-dir", str(output), *TINY_MODEL,
        "--batch-size", "4", "--no-progress", "--log-every", "1", "--checkpoint-every", "0", "--seed", "1", *extra,
    ]  # fmt: skip


def parse_train_args(arguments: list[str]) -> argparse.Namespace:
    from tarflow_hf.commands.arguments import train as add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(arguments)


def train_as_the_command_line(arguments: list[str]):
    """`train` as `tarflow-hf train ARGUMENTS` calls it (with the reproducing command for the card); its result."""
    from tarflow_hf.commands.train import format_command
    from tarflow_hf.training import train

    args = parse_train_args(arguments)
    return train(args, command=format_command(args))


TWO_PROCESS_WORKER = textwrap.dedent(
    """
    import argparse, hashlib, sys
    from accelerate import PartialState
    from tarflow_hf.commands.arguments import train as add_arguments
    from tarflow_hf.training import train

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    result = train(parser.parse_args(sys.argv[2:]))
    digest = hashlib.sha256()
    for model in (result.model, result.ema_model):
        for name, value in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    with open(f"{sys.argv[1]}/rank{PartialState().process_index}.txt", "w") as handle:
        handle.write(digest.hexdigest())
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(arguments: list[str], config_file: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch ARGUMENTS` (a script and its arguments, or `-m MODULE ...`) with 2 CPU processes, in
    float32; an accelerate `config_file` sets the rest (FSDP, ...)."""
    setup = ["--multi_gpu", "--num_machines", "1"] if config_file is None else ["--config_file", str(config_file)]
    setup += ["--num_processes", "2", "--mixed_precision", "no"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *setup, "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *arguments,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def train_in_two_processes(tmp_path: Path, arguments: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """`train(arguments)` under `accelerate launch` with 2 CPU processes: (the finished launch, the folder where
    each rank writes `rank{N}.txt`, the hash of its model and EMA weights)."""
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    out = tmp_path / "ranks"
    out.mkdir()
    return launch_two_processes([str(worker), str(out), *arguments]), out


# ----------------------------------------------------------------------------------------- killed writers
def kill_when_ready(script: str, marker: Path, *arguments: str, timeout: float = 240) -> None:
    """Run `script` (with `arguments`) in a fresh Python and SIGKILL it as soon as it has created `marker`: no
    exception handler, `finally` or exit hook of the child runs, as when a job is killed outright."""
    log = marker.with_name(marker.name + ".stderr")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", script, *arguments], stdout=stderr, stderr=stderr, env=env)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                child.wait()
                raise AssertionError(f"the child never got to {marker.name}: {log.read_text()[-3000:]}")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


# -------------------------------------------------------------------------------------- STARFlow helpers
def word_tokenizer():
    """T5-like: `<pad>` 0, `</s>` 1 appended to every text, `<unk>` 2, and words `w3` ... `w99` with their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------- remote-code loading
BLOCK_TARFLOW_HF = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tarflow_hf" or name.startswith("tarflow_hf."):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocker())
    """
)


def run_without_tarflow_hf(script: str, tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`script` (after an import hook that refuses tarflow_hf) in a fresh isolated Python, offline, with its own
    remote-code module cache."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-I", "-c", BLOCK_TARFLOW_HF + script, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def tiny_vae(sample_size: int, **overrides):
    """A 4-level AutoencoderKL (downsampling 8, 4 latent channels, 8 channels wide), built right after
    torch.manual_seed(0)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        **overrides,
    )


def offload_and_record_onloads(pipe, monkeypatch) -> list:
    """`pipe.enable_model_cpu_offload(device="cpu")`; the returned list then collects every module that the
    transformer's offload hook moves onto the execution device."""
    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.transformer._hf_hook
    onloads = []
    original = hook.pre_forward

    def pre_forward(module, *args, **kwargs):
        onloads.append(module)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(hook, "pre_forward", pre_forward)
    return onloads
