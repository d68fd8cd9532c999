"""The README's first command, sampling part, exactly as written, on the installed console script:

    .venv/bin/tarflow-hf sample --class-label 3 --class-label 8 --num-images 4 --seed 0 --output samples.png

run in an empty folder with PYTHONPATH at the source under test. The grid must be a PNG of 2 rows x 4 columns of
28x28 digits, and the bundled MNIST classifier (independent of TarFlow) must read the rows as 3s and 8s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

import tarflow_hf
from tarflow_hf.classifier import load_classifier

SRC = Path(__file__).resolve().parents[1] / "src"
README_COMMAND = "sample --class-label 3 --class-label 8 --num-images 4 --seed 0 --output samples.png".split()  # noqa: SIM905
PADDING = 2  # the grid's border and gap (README: captioned grid; sample.make_grid)


def console_script() -> str | None:
    here = Path(sys.executable).with_name("tarflow-hf")
    return str(here) if here.is_file() else shutil.which("tarflow-hf")


@pytest.mark.skipif(console_script() is None, reason="the tarflow-hf console script is not installed")
def test_readme_quickstart_samples_recognisable_digits(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [console_script(), *README_COMMAND], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote samples.png (8 images, seed 0)" in done.stdout

    grid = Image.open(tmp_path / "samples.png")
    assert grid.format == "PNG"
    # 4 columns of 28-pixel cells (captions "3"/"8" are narrower than a digit), 2 rows with a caption under each.
    caption_height = ImageFont.load_default().getbbox("3")[3] + 2 * PADDING
    cell_w, cell_h = 28 + PADDING, 28 + caption_height + PADDING
    assert grid.size == (4 * cell_w + PADDING, 2 * cell_h + PADDING)

    pixels = np.asarray(grid.convert("L"), dtype=np.float32)
    cells = np.stack(
        [
            pixels[PADDING + r * cell_h : PADDING + r * cell_h + 28, PADDING + c * cell_w : PADDING + c * cell_w + 28]
            for r in range(2)
            for c in range(4)
        ]
    )
    # Not blank: MNIST-like digits are mostly dark background with a bright stroke.
    for cell in cells:
        assert 5 < (cell > 127).mean() * 100 < 60, "a cell is blank or saturated"
    assert np.abs(cells[:4].mean(0) - cells[4:].mean(0)).max() > 50  # the two rows are different digits

    classifier = load_classifier(tarflow_hf.BUNDLED_CLASSIFIER)
    with torch.no_grad():
        predicted = classifier.predict(torch.from_numpy(cells / 127.5 - 1).unsqueeze(1)).tolist()
    # Row 1 was asked for 3s, row 2 for 8s; allow one miss per row (bundled metrics.json: class accuracy ~0.8).
    assert sum(p == 3 for p in predicted[:4]) >= 3, predicted
    assert sum(p == 8 for p in predicted[4:]) >= 3, predicted
