"""Loading a pipeline by Hub id from a simulated, offline Hugging Face cache.

`hub_cache_repo` lays a saved pipeline folder out exactly as huggingface_hub caches a download
(`models--{owner}--{name}/refs/main` holding the commit, `snapshots/{commit}/...` files, optionally as symlinks into
`blobs/{sha256}`), and `offline_hub_env` points a fresh process at it with `HF_HUB_OFFLINE=1`. Both are generic:
any pipeline class with `save_pretrained` (e.g. a future StarFlowPipeline) can reuse them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tarflow_hf import TarFlowConfig, TarFlowModel, TarFlowPipeline

SRC = Path(__file__).resolve().parents[1] / "src"
REPO_ID = "someone/tiny-tarflow"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, blobs: bool = True) -> Path:
    """Copy `folder` into `cache` (an HF_HUB_CACHE) as the snapshot of `repo_id` at `commit` on `main`."""
    owner, name = repo_id.split("/")
    repo = cache / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if blobs:
            data = path.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copy2(path, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def offline_hub_env(home: Path) -> dict[str, str]:
    """Environment for a subprocess that may only read the cache under `home` (no network, no user cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
    )
    return env


def tiny_pipeline_folder(path: Path) -> TarFlowModel:
    torch.manual_seed(7)
    config = TarFlowConfig(
        image_size=8, num_channels=1, patch_size=2, hidden_size=32, head_dim=16, num_blocks=2, layers_per_block=1,
        num_classes=3, noise_std=0.0,
    )  # fmt: skip
    model = TarFlowModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj_out.weight" in name:
                param.normal_(0.0, 0.02)
    TarFlowPipeline(transformer=model).save_pretrained(str(path))
    return model


CHECK = textwrap.dedent(
    """
    import sys, torch
    from tarflow_hf import TarFlowPipeline
    from tarflow_hf.commands import main

    pipe = TarFlowPipeline.from_pretrained(sys.argv[1])
    torch.save(pipe.transformer.state_dict(), sys.argv[2])
    for model, output in ((sys.argv[1], sys.argv[3]), (sys.argv[4], sys.argv[5])):  # hub id, then local folder
        code = main(["sample", model, "--class-label", "1", "--num-images", "2", "--seed", "0",
                     "--output", output, "--quiet", "--device", "cpu"])
        if code:
            sys.exit(code)
    """
)


def test_pipeline_and_sample_command_load_a_hub_id_from_the_offline_cache(tmp_path):
    model = tiny_pipeline_folder(tmp_path / "saved")
    hub_cache_repo(tmp_path / "home" / "hub", REPO_ID, tmp_path / "saved")
    work = tmp_path / "cwd"  # no folder named like the repo id next to the process
    work.mkdir()
    (work / "check.py").write_text(CHECK)
    # One process (a fresh interpreter costs seconds): from_pretrained, then the command with the hub id and
    # with the local folder, which must give the same grid (same weights, same seed).
    done = subprocess.run(
        [sys.executable, "check.py", REPO_ID, "weights.pt", "hub.png", str(tmp_path / "saved"), "local.png"],
        cwd=work, env=offline_hub_env(tmp_path / "home"), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(work / "weights.pt", weights_only=True)
    assert loaded.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value), name
    from PIL import Image, ImageChops

    hub, local = Image.open(work / "hub.png"), Image.open(work / "local.png")
    assert hub.format == "PNG" and hub.size == local.size
    assert ImageChops.difference(hub.convert("RGB"), local.convert("RGB")).getbbox() is None
