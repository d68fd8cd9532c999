"""The MNIST model shipped inside the package: weights, configs and card only, loaded through the installed
classes (no copies of the package's code in the package)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModel

import tarflow_hf
from tarflow_hf import TarFlowModel, TarFlowPipeline

BUNDLED = Path(tarflow_hf.BUNDLED_MODEL)


def test_bundled_folder_holds_no_code():
    assert not list(BUNDLED.rglob("*.py"))
    index = json.loads((BUNDLED / "model_index.json").read_text())
    assert index["_class_name"] == "TarFlowPipeline" and index["transformer"] == ["tarflow_hf", "TarFlowModel"]
    assert "auto_map" not in json.loads((BUNDLED / "transformer" / "config.json").read_text())


def test_bundled_model_samples_digits_offline():
    pipe = TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL)
    config = pipe.transformer.config
    assert (config.num_classes, config.image_size, config.num_channels) == (10, 28, 1)
    assert config.default_guidance_scale > 1.0, "the bundled model should sample with guidance by default"
    assert config.id2label[7] == "7"
    out = pipe(class_labels=[7, 1], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 1, 28, 28)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    # A trained model scores its own samples far better than noise.
    noise = torch.rand(2, 1, 28, 28)
    assert (pipe.bits_per_dim(out.images, [7, 1]) + 2 < pipe.bits_per_dim(noise, [7, 1])).all()


def test_auto_model_loads_the_bundled_transformer():
    model = AutoModel.from_pretrained(f"{tarflow_hf.BUNDLED_MODEL}/transformer")
    assert type(model) is TarFlowModel


def test_auto_model_in_a_fresh_process():
    # Only `import tarflow_hf` and the path: asking for BUNDLED_MODEL registers the classes with AutoModel.
    code = (
        "import tarflow_hf\n"
        "from transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(f'{tarflow_hf.BUNDLED_MODEL}/transformer')\n"
        "print(type(model).__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tarflow_hf.modeling_tarflow" in result.stdout
