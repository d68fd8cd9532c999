"""The maintenance scripts still run against the library: the bundled model's card is rebuilt from its own
evaluation files (shipped in its metrics.json) with the same results table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import tarflow_hf
from tarflow_hf import TarFlowPipeline

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_model_rebuilds_the_bundled_cards_results(tmp_path):
    bundle = load_script("bundle_model")
    bundled = Path(tarflow_hf.BUNDLED_MODEL)
    metrics = json.loads((bundled / "metrics.json").read_text())
    (tmp_path / "eval").mkdir()
    for stem, result in metrics.items():
        (tmp_path / "eval" / f"{stem}.json").write_text(json.dumps(result))
    (tmp_path / "recipe.json").write_text(json.dumps({"noise_std": 0.1, "lr": 0.0015, "max_steps": 5000}))
    pipe = TarFlowPipeline.from_pretrained(bundled)
    guidance = pipe.transformer.config.default_guidance_scale
    card = bundle.model_card(tmp_path, {"test_accuracy": 0.99}, guidance, pipe)
    shipped = (bundled / "README.md").read_text()
    for line in bundle.results_table(tmp_path, {"test_accuracy": 0.99}, guidance, 0.0)[2:8]:  # the metrics rows
        assert line in shipped and line in card.text, line
    assert "tarflow-hf train" in card.text and "--lr 0.0015" in card.text  # the reproducing command
