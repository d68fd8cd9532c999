"""TarFlowModel: exact parity with apple/ml-tarflow, flow properties, inputs, and serialisation."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_model
from transformers import AutoConfig, AutoModel

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.guidance import tarflow_guidance_from_apple

TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------ parity
def test_forward_matches_reference(reference):
    _, model, expected = reference
    out = model(expected["x"], expected.get("y"), output_hidden_states=True)
    num_dims = model.config.num_patches * model.config.patch_dim
    torch.testing.assert_close(out.latents, expected["z"], atol=TOLERANCE, rtol=0)
    # Apple's logdets are per-dimension means; ours is the true sum over dimensions.
    torch.testing.assert_close(out.logdet / num_dims, expected["logdets"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], atol=TOLERANCE, rtol=0)
    assert len(out.hidden_states) == model.config.num_blocks
    for i, hidden in enumerate(out.hidden_states):
        torch.testing.assert_close(hidden, expected[f"block_output_{i}"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("sampler", ["sequential", "jacobi:tolerance=1e-7", "newton:tolerance=1e-7"])
def test_inverse_matches_reference_samples(reference, sampler):
    meta, model, expected = reference
    for i, kwargs in enumerate(meta["sample_kwargs"]):
        images = model.inverse(
            expected["noise"], expected.get("y_sample"), sampler=sampler, **tarflow_guidance_from_apple(kwargs)
        )
        torch.testing.assert_close(images, expected[f"sample_{i}"], atol=TOLERANCE, rtol=0, msg=f"sample_{i}")


def test_denoise_matches_reference(reference):
    meta, model, expected = reference
    sigma = meta["denoise"]["noise_std"]
    denoised = model.denoise(expected["sample_0"], expected.get("y_sample"), noise_std=sigma)
    torch.testing.assert_close(denoised, expected["denoised_0"], atol=TOLERANCE, rtol=0)
    # The step must actually move the image, or the comparison above proves little.
    assert (expected["denoised_0"] - expected["sample_0"]).abs().max() > 100 * TOLERANCE


def test_denoise_does_not_depend_on_batching():
    model = random_model()
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, -1, 1])
    whole = model.denoise(images, labels, batch_size=5)
    pieces = model.denoise(images, labels, batch_size=2)
    torch.testing.assert_close(whole, pieces, atol=1e-6, rtol=0)
    assert not torch.allclose(whole, images)


def test_a_denoising_step_that_overflows_is_refused():
    """Far from the data the log-likelihood overflows and its gradient is NaN: one line instead of grey images."""
    model = random_model()
    with pytest.raises(FloatingPointError, match=r"denoising step produced non-finite values.*denoise=False"):
        model.denoise(torch.full((2, 1, 8, 8), 1e30), [0, 1])
    assert torch.isfinite(model.denoise(torch.rand(2, 1, 8, 8), [0, 1])).all()


# -------------------------------------------------------------------------------------------- properties
def test_bits_per_dim_follows_apples_evaluation_formula():
    model = random_model()
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(images, torch.tensor([0, 1, 2, 0]))
    num_dims = 64
    # evaluate_bpd.py: log p(z) = sum(-(z^2 + log 2 pi) / 2) - log(128) * n; nll = -log p / n - mean logdet.
    prior = (-0.5 * (out.latents**2 + math.log(2 * math.pi))).flatten(1).sum(1) - math.log(128) * num_dims
    expected = (-prior / num_dims - out.logdet / num_dims) / math.log(2)
    torch.testing.assert_close(out.bits_per_dim, expected, atol=1e-5, rtol=0)
    loss = 0.5 * out.latents.pow(2).mean() - (out.logdet / num_dims).mean()
    torch.testing.assert_close(out.loss, loss)


def test_hidden_states_only_when_asked_and_tuple_output():
    model = random_model()
    images = torch.rand(2, 1, 8, 8)
    assert model(images, [0, 1]).hidden_states is None
    as_tuple = model(images, [0, 1], return_dict=False)
    torch.testing.assert_close(as_tuple[1], model(images, [0, 1]).latents)


# ------------------------------------------------------------------------------------------- conditioning
def test_dropped_label_is_the_mean_class_branch():
    model = random_model()
    images = torch.rand(2, 1, 8, 8)
    dropped = model(images, torch.tensor([-1, -1])).latents
    torch.testing.assert_close(dropped, model(images, None).latents)
    assert not torch.allclose(dropped, model(images, torch.tensor([0, 0])).latents)


def test_guidance_options():
    model = random_model()
    noise = torch.randn(2, 16, 4)
    labels = torch.tensor([0, 2])
    plain = model.inverse(noise, labels)
    uncond_temperature = "extrapolate:unconditional_temperature=0.5"
    torch.testing.assert_close(model.inverse(noise, labels, 1.0, uncond_temperature), plain)  # no uncond branch
    results = {
        target: model.inverse(noise, labels, guidance_scale=3.0, guidance_rule=f"extrapolate:target={target}")
        for target in ("both", "scale", "shift")
    }
    for target, images in results.items():
        assert not torch.allclose(images, plain, atol=1e-4), target
    assert not torch.allclose(results["scale"], results["shift"], atol=1e-4)
    linear = model.inverse(noise, labels, guidance_scale=3.0, guidance_rule="extrapolate:schedule=linear")
    assert not torch.allclose(linear, results["both"], atol=1e-4)
    tempered = model.inverse(noise, labels, 3.0, uncond_temperature)
    assert not torch.allclose(tempered, results["both"], atol=1e-4)
    cooled = model.inverse(noise, labels, guidance_scale=1.0, attention_temperature=0.5)  # every branch
    assert not torch.allclose(cooled, plain, atol=1e-4)
    # Guidance runs both branches as one batch; each image must still be independent of the others.
    torch.testing.assert_close(model.inverse(noise[:1], labels[:1], guidance_scale=3.0), results["both"][:1])


def test_callback_sees_every_block():
    model = random_model(num_blocks=3)
    seen = []
    final = model.inverse(torch.randn(1, 16, 4), [1], callback=lambda step, images: seen.append((step, images)))
    assert [step for step, _ in seen] == [0, 1, 2]
    torch.testing.assert_close(seen[-1][1], final)


def test_images_a_callback_returns_replace_the_current_ones():
    """The flow continues from what the callback returns: replacing the images after block 0 with the images of
    another sample's block 0 gives that sample's result."""
    model = random_model(num_blocks=3)
    first, second = torch.randn(1, 16, 4), torch.randn(1, 16, 4)
    after_first_block = {}
    model.inverse(second, [1], callback=lambda step, images: after_first_block.setdefault(step, images))
    swapped = model.inverse(first, [1], callback=lambda step, images: after_first_block[0] if step == 0 else None)
    torch.testing.assert_close(swapped, model.inverse(second, [1]))


def test_a_callable_guidance_scale_is_asked_before_each_block():
    model = random_model(num_blocks=3)
    noise, asked = torch.randn(2, 16, 4), []

    def scale(step: int) -> float:
        asked.append(step)
        return 3.0

    torch.testing.assert_close(model.inverse(noise, [0, 1], guidance_scale=scale), model.inverse(noise, [0, 1], 3.0))
    assert asked == [0, 1, 2]


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.rand(2, 3, 8, 8), [0, 1], "pixel_values must have shape (batch, 1, 8, 8), got (2, 3, 8, 8)"),
        (torch.rand(1, 8, 8), [0], "pixel_values must have shape (batch, 1, 8, 8), got (1, 8, 8)"),
        (torch.rand(2, 1, 8, 8), [0, 3], "class label 3 is out of range; allowed are 0..2"),
        (torch.rand(2, 1, 8, 8), [0, -2], "class label -2 is out of range"),
        (torch.rand(2, 1, 8, 8), [0, 1, 2], "got 3 class labels for a batch of 2"),
        (torch.rand(2, 1, 8, 8), torch.tensor([0.5, 1.0]), "class_labels must be integers"),
    ],
)
def test_bad_forward_inputs(images, labels, message):
    with pytest.raises(ValueError) as error:
        random_model()(images, labels)
    assert message in str(error.value)


def test_labels_on_unconditional_model_are_refused():
    model = random_model(num_classes=0)
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\); pass class_labels=None"):
        model(torch.rand(1, 1, 8, 8), [0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_rule": "extrapolate:target=ab"}, "target must be one of ('both', 'scale', 'shift'), got 'ab'"),
        ({"guidance_rule": "extrapolate:schedule=cosine"}, "schedule must be one of ('constant', 'linear')"),
        ({"attention_temperature": 0.0}, "attention_temperature must be a finite number > 0, got 0.0"),
        ({"attention_temperature": "1"}, "attention_temperature must be a finite number > 0, got '1'"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        (
            {"sampler": "euler"},
            "sampler must be one of ('sequential', 'jacobi', 'newton', 'block_jacobi'), got 'euler'",
        ),
        ({"sampler": "jacobi:tolerance=0"}, "tolerance must be a finite number > 0, got 0"),
        ({"sampler": "block_jacobi:block_size=2.5"}, "block_size must be an integer >= 1, got 2.5"),
        ({"sampler": "jacobi:sequential_blocks=-1"}, "sequential_blocks must be an integer >= 0 or None, got -1"),
    ],
)
def test_bad_sampling_options(kwargs, message):
    with pytest.raises(ValueError) as error:
        random_model().inverse(torch.randn(1, 16, 4), [0], **kwargs)
    assert message in str(error.value)


def test_bad_latent_shape():
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 16, 4\), got \(1, 16, 5\)"):
        random_model().inverse(torch.randn(1, 16, 5))


def test_non_finite_samples_are_reported():
    model = random_model()
    with torch.no_grad():
        model.blocks[0].proj_out.bias.fill_(200.0)  # exp(200) overflows float32
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.inverse(torch.randn(1, 16, 4), [0])
    with pytest.raises(FloatingPointError, match="NaN latents or weights give NaN samples"):
        random_model().inverse(torch.full((1, 16, 4), float("nan")), [0])


# -------------------------------------------------------------------------------------------- saving
def test_save_load_gives_identical_outputs(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = TarFlowModel.from_pretrained(tmp_path).eval()
    images, noise = torch.rand(2, 1, 8, 8), torch.randn(2, 16, 4)
    assert torch.equal(loaded(images, [0, 1]).latents, model(images, [0, 1]).latents)
    assert torch.equal(loaded.inverse(noise, [2, 0]), model.inverse(noise, [2, 0]))


def test_auto_classes_find_the_model(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TarFlowConfig)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, TarFlowModel)
    assert torch.equal(auto.blocks[1].proj_out.weight, model.blocks[1].proj_out.weight)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    noise = torch.randn(1, 16, 4)
    torch.save(noise, tmp_path / "noise.pt")
    torch.save(model.inverse(noise, [1]), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tarflow_hf":
                    raise ImportError("tarflow_hf must not be importable here")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        images = model.inverse(torch.load({str(tmp_path / "noise.pt")!r}), [1])
        difference = (images - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item()
        assert difference < 1e-6, difference
        print("remote-ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}
    )
    assert "remote-ok" in result.stdout, result.stderr[-3000:]


def test_push_to_hub_uploads_a_loadable_folder(tmp_path, monkeypatch):
    """transformers' push_to_hub with the Hub client's calls intercepted: the committed files must form a folder
    that loads back to the same model."""
    import huggingface_hub
    from huggingface_hub import HfApi, RepoUrl

    uploaded = tmp_path / "uploaded"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id))
        for operation in operations:
            target = uploaded / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(operation.path_or_fileobj).read_bytes())
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )

    def no_card(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("no card on the Hub yet")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", no_card)
    model = random_model()
    model.push_to_hub("someone/tiny-tarflow")
    assert calls == [("create_repo", "someone/tiny-tarflow"), ("create_commit", "someone/tiny-tarflow")]
    assert {"config.json", "model.safetensors", "modeling_tarflow.py", "configuration_tarflow.py"} <= {
        p.name for p in uploaded.iterdir()
    }
    loaded = TarFlowModel.from_pretrained(uploaded)
    noise = torch.randn(1, 16, 4)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    torch.testing.assert_close(loaded.inverse(noise, [1]), model.inverse(noise, [1]), atol=1e-6, rtol=0)
