"""The MNIST model shipped inside the package."""

from pathlib import Path

import torch

import tarflow_hf
from tarflow_hf import TarFlowPipeline

SOURCE = Path(tarflow_hf.__file__).parent
BUNDLED = Path(tarflow_hf.BUNDLED_MODEL)


def test_bundled_code_copies_match_the_sources():
    # The folder carries the package's modules for trust_remote_code; they must not go stale.
    # Refresh with `STAGE=bundle bash scripts/make_bundled_model.sh` after changing them.
    assert (BUNDLED / "pipeline_tarflow.py").read_text() == (SOURCE / "pipeline_tarflow.py").read_text()
    for name in ("modeling_tarflow.py", "configuration_tarflow.py"):
        assert (BUNDLED / "transformer" / name).read_text() == (SOURCE / name).read_text(), name


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
