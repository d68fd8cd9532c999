"""TarFlowPipeline: parity with Apple's reference samples through the public API, every argument, the likelihood
tools, loading (with and without tarflow_hf importable). Saving, cards and uploads: tests/test_hub.py."""

from __future__ import annotations

import io
import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    REFERENCE_CASES,
    load_reference,
    offload_and_record_onloads,
    random_model,
    run_without_tarflow_hf,
    tiny_config,
)

from tarflow_hf import JacobiSampler, NewtonSampler, SequentialSampler, TarFlowModel
from tarflow_hf.guidance import GuidanceRule, tarflow_guidance_from_apple
from tarflow_hf.pipeline_tarflow import TarFlowPipeline, TarFlowPipelineOutput

NAMES = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "tabby, tabby cat"}


def make_pipe(model: TarFlowModel, **kwargs) -> TarFlowPipeline:
    pipe = TarFlowPipeline(transformer=model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model space -> [0, 1], computed here independently of the pipeline."""
    return (images / 2 + 0.5).clamp(0, 1)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.fixture(scope="module")
def model() -> TarFlowModel:
    model = random_model(seed=1)
    model.config.id2label = dict(NAMES)
    return model


@pytest.fixture(scope="module")
def pipe(model) -> TarFlowPipeline:
    return make_pipe(model)


@pytest.fixture(scope="module")
def uncond_pipe() -> TarFlowPipeline:
    return make_pipe(random_model(seed=2, num_classes=0))


@pytest.fixture(scope="module")
def noise(model) -> torch.Tensor:
    return torch.randn(4, model.config.num_patches, model.config.patch_dim, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------ Apple's references
@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_samples_match_apple_reference(name):
    meta, model, expected = load_reference(name)
    pipe = make_pipe(model)
    labels = expected.get("y_sample")
    for index, apple in enumerate(meta["sample_kwargs"]):
        assert set(apple) <= {"guidance", "attn_temp", "annealed_guidance"}, apple
        images = pipe(
            class_labels=labels,
            latents=expected["noise"],
            denoise=False,
            **tarflow_guidance_from_apple(apple),
            output_type="pt",
        ).images
        torch.testing.assert_close(images, to_unit(expected[f"sample_{index}"]), atol=1e-5, rtol=0)

    denoise = meta["denoise"]
    assert denoise["applied_to"] == "sample_0" and denoise["lr_multiplier"] == 1.0
    first = meta["sample_kwargs"][0]
    images = pipe(
        class_labels=labels,
        latents=expected["noise"],
        denoise=(denoise["noise_std"] / model.config.noise_std) ** 2,  # the step's strength at the model's sigma
        **tarflow_guidance_from_apple(first),
        output_type="pt",
    ).images
    torch.testing.assert_close(images, to_unit(expected["denoised_0"]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- labels
def test_label_names_aliases_and_ids(pipe, noise):
    assert pipe.labels == {"Tinca tinca": 0, "golden retriever": 1, "tabby": 2, "tabby cat": 2, "tench": 0}
    assert pipe.get_label_ids(["Golden  Retriever", "tinca tinca", "tabby cat"]) == [1, 0, 2]
    assert pipe.get_label_ids("tench") == [0]
    by_id = pipe(class_labels=[1, 0, 2, 1], latents=noise, denoise=False, output_type="pt").images
    by_name = pipe(class_labels=["golden retriever", "tench", 2, "golden retriever"], latents=noise, denoise=False,
                   output_type="pt").images  # fmt: skip
    by_tensor = pipe(class_labels=torch.tensor([1, 0, 2, 1]), latents=noise, denoise=False, output_type="pt").images
    by_array = pipe(class_labels=np.array([1, 0, 2, 1]), latents=noise, denoise=False, output_type="pt").images
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)
    torch.testing.assert_close(by_tensor, by_id, rtol=0, atol=0)
    torch.testing.assert_close(by_array, by_id, rtol=0, atol=0)
    # One label for all images.
    single = pipe(class_labels="golden retriever", latents=noise, denoise=False, output_type="pt").images
    torch.testing.assert_close(
        single, pipe(class_labels=[1] * 4, latents=noise, denoise=False, output_type="pt").images
    )


def test_unknown_and_ambiguous_names(pipe, model):
    with pytest.raises(ValueError, match=r"unknown class name 'golden retreiver': did you mean 'golden retriever'"):
        pipe(class_labels=["golden retreiver"])
    with pytest.raises(ValueError, match=r"unknown class name 'zebra': no similar name"):
        pipe.get_label_ids("zebra")
    ambiguous = make_pipe(model, id2label={0: "crane", 1: "golden retriever", 2: "crane, derrick"})
    with pytest.raises(ValueError, match=r"'crane' is ambiguous, it names classes 0: 'crane'; 2: 'crane, derrick'"):
        ambiguous.get_label_ids(["crane"])
    assert ambiguous.get_label_ids(["derrick"]) == [2]


def test_none_and_minus_one_are_the_unconditional_branch(pipe, noise):
    none = pipe(class_labels=None, latents=noise, denoise=False, output_type="pt").images
    minus_one = pipe(class_labels=[-1] * 4, latents=noise, denoise=False, output_type="pt").images
    labelled = pipe(class_labels=[0] * 4, latents=noise, denoise=False, output_type="pt").images
    torch.testing.assert_close(minus_one, none, rtol=0, atol=0)
    assert not torch.allclose(labelled, none)


@pytest.mark.parametrize(
    ("class_labels", "message"),
    [
        ([3], r"class label 3 is out of range; allowed are 0..2, or -1"),
        ([-2], r"class label -2 is out of range"),
        ([1.5], r"class labels must be ints \(class ids\) or strings \(class names\), got 1.5"),
        ([True], r"class labels must be ints .* got True"),
        (torch.tensor([0.0]), r"class_labels must hold integer class ids, got dtype torch.float32"),
        (np.array([True]), r"class_labels must hold integer class ids, got dtype bool"),
        ([], r"class_labels is empty"),
        ([0, 1, 2], r"got 3 class labels for 4 images"),
    ],
)
def test_bad_class_labels(pipe, noise, class_labels, message):
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=class_labels, latents=noise)


@pytest.mark.parametrize("class_labels", [{0: "tench", 1: "golden retriever"}, {1, 2}])
def test_dict_or_set_as_class_labels_is_refused(pipe, noise, class_labels):
    """Issue #13: a dict (or a set) is not a list of labels; its keys used to be read as the labels."""
    with pytest.raises(ValueError, match=r"class_labels must be an id, a name, a list of them") as error:
        pipe(class_labels=class_labels, latents=noise[:2])
    assert "\n" not in str(error.value) and type(class_labels).__name__ in str(error.value)
    with pytest.raises(ValueError, match=r"class_labels must be"):
        pipe.log_likelihood(torch.rand(2, 1, 8, 8), class_labels=class_labels)


def test_labels_on_unconditional_model(uncond_pipe):
    with pytest.raises(ValueError, match=r"this model is unconditional \(num_classes=0\) and takes no class labels"):
        uncond_pipe(class_labels=[0])
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\): it has no class names"):
        uncond_pipe.get_label_ids(["cat"])
    assert uncond_pipe.labels == {}


def test_id2label_must_cover_the_classes(model):
    with pytest.raises(ValueError, match=r"id2label must name each class id 0..2 exactly once"):
        TarFlowPipeline(transformer=model, id2label={0: "a", 1: "b"})
    assert make_pipe(model, id2label={"0": "x", "1": "y", "2": "z"}).id2label == {0: "x", 1: "y", 2: "z"}


# -------------------------------------------------------------------------------------- batches and randomness
def test_seeded_images_do_not_depend_on_the_batch(pipe):
    batch = pipe(class_labels=[0, 2], num_images_per_label=2, generator=generators(10, 11, 12, 13), output_type="pt")
    assert batch.images.shape == (4, 1, 8, 8)
    for index, (label, seed) in enumerate([(0, 10), (0, 11), (2, 12), (2, 13)]):
        alone = pipe(class_labels=[label], generator=generators(seed), output_type="pt").images
        torch.testing.assert_close(batch.images[index : index + 1], alone, atol=1e-6, rtol=0)


def test_generator_latents_and_noise_dtype(pipe, noise):
    first = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(3), output_type="pt").images
    again = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(3), output_type="pt").images
    other = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(4), output_type="pt").images
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    # Noise comes from randn in float32 on the generator's device, one generator per image.
    drawn = pipe.prepare_latents(2, generators(5, 6), None, torch.device("cpu"))
    expected = torch.cat([torch.randn(1, 16, 4, generator=g) for g in generators(5, 6)])
    assert drawn.dtype == torch.float32
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    # Given latents win over the generator.
    given = pipe(class_labels=[1] * 4, latents=noise, generator=generators(0, 1, 2, 3), output_type="pt").images
    torch.testing.assert_close(given, pipe(class_labels=[1] * 4, latents=noise, output_type="pt").images)


def test_num_images_per_label(pipe, uncond_pipe):
    assert len(uncond_pipe(num_images_per_label=3).images) == 3
    assert len(pipe(class_labels=["tench", 1], num_images_per_label=3).images) == 6
    with pytest.raises(ValueError, match=r"num_images_per_label must be >= 1, got 0"):
        pipe(num_images_per_label=0)
    with pytest.raises(ValueError, match=r"num_images_per_label must be a positive integer, got 2.0"):
        pipe(num_images_per_label=2.0)


def test_bad_latents_and_generators(pipe):
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 16, 4\), got \(2, 4, 16\)"):
        pipe(latents=torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match=r"latents must be floating point"):
        pipe(latents=torch.zeros(2, 16, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got a list of 2 generators for 3 images; pass one generator per image"):
        pipe(class_labels=[0, 1, 2], generator=generators(0, 1))
    for bad in ([0], 0, [torch.Generator(), "seed"], []):
        with pytest.raises(
            ValueError, match=r"generator must be a torch.Generator or a list of them \(one per image\)"
        ):
            pipe(class_labels=[0], generator=bad)
    seeded = pipe(class_labels=[0], generator=(torch.Generator().manual_seed(1),), output_type="pt").images  # a tuple
    torch.testing.assert_close(seeded, pipe(class_labels=[0], generator=generators(1), output_type="pt").images)


# ------------------------------------------------------------------------------------------ guidance, sampler
def test_guidance_arguments_reach_the_model(pipe, model, noise):
    labels = [0, 1, 2, 1]
    rule = GuidanceRule(target="shift", schedule="linear", unconditional_temperature=0.8)
    guided = pipe(
        class_labels=labels,
        latents=noise,
        guidance_scale=2.5,
        guidance_rule=rule,
        attention_temperature=0.7,
        denoise=False,
        output_type="pt",
    ).images
    direct = model.inverse(noise, torch.tensor(labels), 2.5, rule, 0.7)
    torch.testing.assert_close(guided, to_unit(direct), rtol=0, atol=0)
    plain = pipe(class_labels=labels, latents=noise, guidance_scale=1.0, denoise=False, output_type="pt").images
    assert not torch.allclose(guided, plain)
    with pytest.raises(ValueError, match=r"target must be one of \('both', 'scale', 'shift'\), got 'size'"):
        pipe(class_labels=labels, latents=noise, guidance_rule="extrapolate:target=size")
    with pytest.raises(ValueError, match=r"schedule must be one of"):
        pipe(class_labels=labels, latents=noise, guidance_rule="extrapolate:schedule=cosine")
    for bad in (0.0, -1.0, math.inf, "3"):
        with pytest.raises(ValueError, match=r"guidance_scale must be a (finite )?number > 0"):
            pipe(class_labels=labels, latents=noise, guidance_scale=bad)
    product = pipe(
        class_labels=labels,
        latents=noise,
        guidance_scale=2.5,
        guidance_rule="gaussian_product",
        denoise=False,
        output_type="pt",
    ).images
    direct = model.inverse(noise, torch.tensor(labels), 2.5, guidance_rule="gaussian_product")
    torch.testing.assert_close(product, to_unit(direct), rtol=0, atol=0)
    assert not torch.allclose(
        product, pipe(class_labels=labels, latents=noise, guidance_scale=2.5, denoise=False, output_type="pt").images
    )
    with pytest.raises(ValueError, match=r"guidance_rule must be one of \('extrapolate', 'gaussian_product'\)"):
        pipe(class_labels=labels, latents=noise, guidance_scale=2.5, guidance_rule="mean")


def test_default_guidance_scale_comes_from_the_config(noise):
    model = random_model(seed=3, default_guidance_scale=2.0)
    pipe = make_pipe(model)
    default = pipe(class_labels=[0, 1, 2, 0], latents=noise, denoise=False, output_type="pt").images
    explicit = pipe(class_labels=[0, 1, 2, 0], latents=noise, guidance_scale=2.0, denoise=False, output_type="pt")
    none = pipe(class_labels=[0, 1, 2, 0], latents=noise, guidance_scale=1.0, denoise=False, output_type="pt")
    torch.testing.assert_close(default, explicit.images, rtol=0, atol=0)
    assert not torch.allclose(default, none.images)


def test_jacobi_sampler_and_stats(pipe, noise, model):
    exact = pipe(class_labels=[0, 1, 2, 0], latents=noise, denoise=False, output_type="pt")
    assert exact.stats.sequential_steps == [model.config.num_patches - 1] * model.config.num_blocks
    assert exact.stats.iterations == [0] * model.config.num_blocks
    jacobi = pipe(
        class_labels=[0, 1, 2, 0],
        latents=noise,
        denoise=False,
        output_type="pt",
        sampler=JacobiSampler(tolerance=1e-7, sequential_blocks=1),
    )
    torch.testing.assert_close(jacobi.images, exact.images, atol=1e-5, rtol=0)
    assert jacobi.stats.sequential_blocks[0] and jacobi.stats.iterations[0] == 0
    assert len(jacobi.stats.iterations) == model.config.num_blocks
    steps = model.config.num_patches - 1
    one_patch = pipe(
        class_labels=[0, 1, 2, 0], latents=noise, denoise=False, output_type="pt", sampler="jacobi:window=1"
    )
    assert one_patch.stats.iterations == one_patch.stats.rows_computed == [steps] * model.config.num_blocks
    torch.testing.assert_close(one_patch.images, exact.images, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"sampler must be one of"):
        pipe(sampler="euler")


def test_the_sampler_component_is_used_kept_and_overridden_per_call(model, noise, tmp_path):
    pipe = make_pipe(model)
    assert pipe.sampler == SequentialSampler() and pipe.config.sampler[1] == "SequentialSampler"
    pipe.sampler = JacobiSampler(tolerance=1e-7, window=1)  # diffusers' way of swapping a scheduler
    assert pipe.config.sampler[1] == "JacobiSampler"
    used = pipe(class_labels=[0, 1, 2, 0], latents=noise, denoise=False, output_type="pt")
    assert used.stats.iterations == [model.config.num_patches - 1] * model.config.num_blocks  # window 1: Jacobi
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["sampler"] == ["samplers", "JacobiSampler"]
    config = json.loads((tmp_path / "saved" / "sampler" / "sampler_config.json").read_text())
    assert (config["tolerance"], config["window"]) == (1e-7, 1)
    loaded = TarFlowPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.sampler == JacobiSampler(tolerance=1e-7, window=1)
    once = loaded(class_labels=[0], latents=noise[:1], denoise=False, sampler=SequentialSampler())
    assert once.stats.iterations == [0] * model.config.num_blocks and loaded.sampler == pipe.sampler
    pipe.sampler = NewtonSampler.from_config(pipe.sampler.config)
    assert pipe.sampler == NewtonSampler(tolerance=1e-7)


def test_a_folder_saved_before_samplers_were_components_loads_with_the_sequential_sampler(model, tmp_path):
    make_pipe(model).save_pretrained(tmp_path / "old")
    index_file = tmp_path / "old" / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["sampler"]
    index_file.write_text(json.dumps(index))
    shutil.rmtree(tmp_path / "old" / "sampler")
    assert TarFlowPipeline.from_pretrained(tmp_path / "old").sampler == SequentialSampler()


# --------------------------------------------------------------------------------------------------- denoising
def test_denoising_step(pipe, model, noise):
    labels = torch.tensor([0, 1, 2, 1])
    raw = model.inverse(noise, labels)
    default = pipe(class_labels=labels, latents=noise, output_type="pt").images
    expected = model.denoise(raw, labels, noise_std=model.config.noise_std)
    torch.testing.assert_close(default, to_unit(expected), rtol=0, atol=1e-6)
    stronger = pipe(class_labels=labels, latents=noise, denoise=2.5, output_type="pt").images
    torch.testing.assert_close(stronger, to_unit(model.denoise(raw, labels, strength=2.5)), rtol=0, atol=1e-6)
    assert not torch.allclose(stronger, default)
    for none in (False, 0.0):
        torch.testing.assert_close(pipe(class_labels=labels, latents=noise, denoise=none, output_type="pt").images,
                                   to_unit(raw), rtol=0, atol=0)  # fmt: skip
    one_by_one = torch.cat([model.denoise(raw[i : i + 1], labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-6)


def test_the_denoising_step_runs_under_inference_mode(pipe, model, noise):
    """A caller's `torch.inference_mode()` (common around sampling) must not break the score step's gradient."""
    labels = [0, 1, 2, 1]
    expected = pipe(class_labels=labels, latents=noise, output_type="pt").images
    with torch.inference_mode():
        images = pipe(class_labels=labels, latents=noise, output_type="pt").images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"denoise": "no"}, r"denoise must be True, False or a finite strength \(a number\), got 'no'"),
        ({"denoise": math.nan}, r"denoise must be True, False or a finite strength"),
        ({"denoise": math.inf}, r"denoise must be True, False or a finite strength"),
        ({"denoise": None}, r"denoise must be True, False or a finite strength \(a number\), got None"),
    ],
)
def test_bad_denoise_arguments_fail_before_sampling(pipe, kwargs, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=[0], callback_on_step_end=lambda *args: calls.append(args), **kwargs)
    assert calls == []


# ------------------------------------------------------------------------------------------------ output types
def test_output_types(pipe, noise):
    kwargs = {"class_labels": [0, 1, 2, 0], "latents": noise}
    pt = pipe(**kwargs, output_type="pt").images
    np_images = pipe(**kwargs, output_type="np").images
    pil = pipe(**kwargs).images
    assert pt.dtype == torch.float32 and pt.shape == (4, 1, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    assert isinstance(np_images, np.ndarray) and np_images.dtype == np.float32 and np_images.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert [image.mode for image in pil] == ["L"] * 4 and pil[0].size == (8, 8)
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in pil]), (np_images[..., 0] * 255).round())
    rgb = make_pipe(random_model(seed=4, num_channels=3, num_classes=0))(num_images_per_label=2).images
    assert [image.mode for image in rgb] == ["RGB", "RGB"]
    # TarFlow samples in pixel space: its "latent" output is the model's own, before clipping to [0, 1].
    raw = pipe(**kwargs, output_type="latent").images
    torch.testing.assert_close(raw, pipe.transformer.denoise(pipe.transformer.inverse(noise, kwargs["class_labels"]),
                                                            kwargs["class_labels"]), rtol=0, atol=1e-6)  # fmt: skip
    torch.testing.assert_close((raw / 2 + 0.5).clamp(0, 1), pt, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"output_type must be one of \('latent', 'pil', 'np', 'pt'\), got 'jpeg'"):
        pipe(**kwargs, output_type="jpeg")


def test_return_dict_false(pipe, noise):
    output = pipe(class_labels=[0] * 4, latents=noise, output_type="pt", return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1
    torch.testing.assert_close(output[0], pipe(class_labels=[0] * 4, latents=noise, output_type="pt").images)
    output = pipe(class_labels=[0], output_type="pt")
    assert isinstance(output, TarFlowPipelineOutput) and len(output.stats.iterations) == 2


# ------------------------------------------------------------------------------ progress, callbacks, trajectory
def test_progress_bar_counts_blocks_and_denoising(model):
    pipe = TarFlowPipeline(transformer=model)
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False, ascii=True)
    pipe(class_labels=[0])
    assert "3/3" in stream.getvalue()  # two blocks + the denoising step
    stream.seek(0)
    stream.truncate()
    pipe(class_labels=[0], denoise=False)
    assert "2/2" in stream.getvalue() and "3/3" not in stream.getvalue()
    pipe.set_progress_bar_config(disable=True)
    stream.seek(0)
    stream.truncate()
    pipe(class_labels=[0])
    assert stream.getvalue() == ""


def test_callback_sees_each_blocks_images(pipe, noise):
    seen = []

    def callback(pipeline, step, block_index, callback_kwargs):
        assert pipeline is pipe
        assert pipeline.num_timesteps == 2 and pipeline.guidance_scale == 3.0 and pipeline.do_classifier_free_guidance
        seen.append((step, block_index, callback_kwargs["latents"].clone()))
        return callback_kwargs

    output = pipe(
        class_labels=[0, 1, 2, 0], latents=noise, guidance_scale=3.0, denoise=False, output_type="pt",
        callback_on_step_end=callback,
    )  # fmt: skip
    assert [(step, block) for step, block, _ in seen] == [(0, 1), (1, 0)]
    assert all(images.shape == (4, 1, 8, 8) for _, _, images in seen)
    torch.testing.assert_close(to_unit(seen[-1][2]), output.images, rtol=0, atol=0)
    assert not torch.allclose(seen[0][2], seen[1][2])
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs has \['images'\]; allowed are"):
        pipe(class_labels=[0], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["images"])


def test_latents_a_callback_returns_replace_the_current_ones(pipe, noise):
    """diffusers' convention: the pipeline continues from the tensors the callback returns."""
    after_first = {}

    def record(pipeline, step, block_index, callback_kwargs):
        after_first.setdefault(step, callback_kwargs["latents"])
        return callback_kwargs

    pipe(class_labels=[0, 1, 2, 0], latents=noise, denoise=False, output_type="pt", callback_on_step_end=record)

    def swap(pipeline, step, block_index, callback_kwargs):
        return {"latents": after_first[0]} if step == 0 else callback_kwargs

    other_noise = torch.randn_like(noise)
    swapped = pipe(class_labels=[0, 1, 2, 0], latents=other_noise, denoise=False, output_type="pt",
                   callback_on_step_end=swap).images  # fmt: skip
    expected = pipe(class_labels=[0, 1, 2, 0], latents=noise, denoise=False, output_type="pt").images
    torch.testing.assert_close(swapped, expected, rtol=0, atol=0)


def test_diffusers_guidance_cutoff_callback_stops_guiding_the_blocks_left():
    """diffusers' `SDCFGCutoffCallback` sets `pipe._guidance_scale = 0.0` at its step; the blocks still to run are
    then sampled without guidance, as one would with guidance_scale=1 from that block on."""
    from diffusers.callbacks import PipelineCallback

    class CutOff(PipelineCallback):  # SDCFGCutoffCallback's rule without its prompt_embeds (TarFlow has none)
        tensor_inputs = ["latents"]  # noqa: RUF012

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == self.config.cutoff_step_index:
                pipeline._guidance_scale = 0.0
            return callback_kwargs

    model = random_model(num_blocks=3)
    pipe = make_pipe(model)
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    cut = pipe(class_labels=[0, 1], latents=noise, guidance_scale=3.0, denoise=False, output_type="latent",
               callback_on_step_end=CutOff(cutoff_step_ratio=None, cutoff_step_index=0)).images  # fmt: skip
    scales = iter([3.0, 1.0, 1.0])
    expected = model.inverse(noise, [0, 1], guidance_scale=lambda step: next(scales))
    torch.testing.assert_close(cut, expected, rtol=0, atol=0)
    full = pipe(class_labels=[0, 1], latents=noise, guidance_scale=3.0, denoise=False, output_type="latent").images
    assert (full - cut).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ dtypes and devices
def test_autocast_and_float64(model, noise):
    labels = [0, 1, 2, 0]
    reference = make_pipe(model)(class_labels=labels, latents=noise, output_type="pt").images
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = make_pipe(model)(class_labels=labels, latents=noise, output_type="pt").images
    assert autocast.dtype == torch.float32 and (autocast - reference).abs().max() < 0.05
    double = make_pipe(random_model(seed=1).to(torch.float64))
    double_images = double(class_labels=labels, latents=noise, output_type="pt").images
    assert double_images.dtype == torch.float32
    torch.testing.assert_close(double_images, reference, atol=1e-5, rtol=0)


def test_bfloat16_weights(noise):
    """`pipe.to(device, torch.bfloat16)`, the usual diffusers way to halve memory."""
    labels = [0, 1, 2, 0]
    reference = make_pipe(random_model(seed=1))(class_labels=labels, latents=noise, output_type="pt").images
    half = make_pipe(random_model(seed=1)).to(torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    half_images = half(class_labels=labels, latents=noise, output_type="pt").images
    assert half_images.dtype == torch.float32 and (half_images - reference).abs().max() < 0.05


def test_model_cpu_offload_runs_the_hook(monkeypatch, noise):
    pipe = make_pipe(random_model(seed=1))
    kwargs = {"class_labels": [0, 1, 2, 0], "latents": noise, "denoise": False, "output_type": "pt"}
    expected = pipe(**kwargs).images
    onloads = offload_and_record_onloads(pipe, monkeypatch)
    images = pipe(**kwargs).images
    # Sampling calls `inverse`, not `forward`, so only the pipeline's own call can have moved the model.
    assert onloads == [pipe.transformer]
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- likelihood, encoding
@pytest.fixture(scope="module")
def images01() -> torch.Tensor:
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_encode_decode_round_trip(pipe, model, images01):
    labels = [2, 0, 1]
    latents = pipe.encode(images01, class_labels=labels)
    torch.testing.assert_close(latents, model(images01 * 2 - 1, torch.tensor(labels)).latents, rtol=0, atol=0)
    decoded = pipe.decode(latents, class_labels=labels, output_type="pt")
    torch.testing.assert_close(decoded, images01, atol=1e-5, rtol=0)
    # PIL images come back pixel for pixel.
    pil = pipe(class_labels=labels, generator=generators(0, 1, 2)).images
    again = pipe.decode(pipe.encode(pil, class_labels=labels), class_labels=labels)
    for original, decoded_image in zip(pil, again, strict=True):
        np.testing.assert_array_equal(np.asarray(decoded_image), np.asarray(original))
    # Decoding prior noise is sampling without guidance or denoising.
    noise = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        pipe.decode(noise, class_labels=labels, output_type="pt"),
        pipe(class_labels=labels, latents=noise, guidance_scale=1.0, denoise=False, output_type="pt").images,
    )


def test_log_likelihood_accepts_every_image_format(pipe, model, images01):
    labels = [1, 1, 0]
    expected = model(images01 * 2 - 1, torch.tensor(labels)).log_likelihood
    torch.testing.assert_close(pipe.log_likelihood(images01, class_labels=labels), expected, rtol=0, atol=1e-4)
    as_array = images01.permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(pipe.log_likelihood(as_array, labels), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(pipe.log_likelihood(list(images01), labels), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(pipe.log_likelihood(images01[0], labels[:1]), expected[:1], rtol=0, atol=1e-4)
    # 8-bit inputs: PIL, uint8 arrays and uint8 tensors are the same images.
    levels = (images01 * 255).round().to(torch.uint8)
    pil = [PIL.Image.fromarray(image[0].numpy(), mode="L") for image in levels]
    from_pil = pipe.log_likelihood(pil, labels)
    torch.testing.assert_close(from_pil, model(levels / 255 * 2 - 1, torch.tensor(labels)).log_likelihood)
    torch.testing.assert_close(pipe.log_likelihood(levels, labels), from_pil, rtol=0, atol=0)
    torch.testing.assert_close(pipe.log_likelihood(levels.permute(0, 2, 3, 1).numpy(), labels), from_pil)
    # Chunking does not change anything.
    torch.testing.assert_close(pipe.log_likelihood(images01, labels, batch_size=1), expected, rtol=0, atol=1e-4)


def test_bits_per_dim(pipe, model, images01):
    levels = (images01 * 255).round()
    dims = images01[0].numel()
    # Without dequantization: the density at the pixels, Apple's bits/dim formula.
    log_likelihood = model(levels / 255 * 2 - 1).log_likelihood
    expected = (-log_likelihood / dims + math.log(128)) / math.log(2)
    torch.testing.assert_close(pipe.bits_per_dim(images01, dequantize=False), expected, rtol=0, atol=1e-5)
    # With it: uniform noise from the given generators, x = 2 (k + u) / 256 - 1.
    noise = torch.cat([torch.rand(1, 1, 8, 8, generator=g) for g in generators(0, 1, 2)])
    log_likelihood = model((levels + noise) / 256 * 2 - 1).log_likelihood
    expected = (-log_likelihood / dims + math.log(128)) / math.log(2)
    dequantized = pipe.bits_per_dim(images01, generator=generators(0, 1, 2))
    torch.testing.assert_close(dequantized, expected, rtol=0, atol=1e-5)
    # Batch-independent with one generator per image; a different seed gives a different estimate.
    torch.testing.assert_close(pipe.bits_per_dim(images01[1:2], generator=generators(1)), dequantized[1:2])
    assert not torch.allclose(pipe.bits_per_dim(images01, generator=generators(5, 6, 7)), dequantized)
    conditional = pipe.bits_per_dim(images01, class_labels="tench", dequantize=False)
    torch.testing.assert_close(
        conditional, (-model(levels / 255 * 2 - 1, [0, 0, 0]).log_likelihood / dims + math.log(128)) / math.log(2)
    )


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 1, 16, 16), r"images must have shape \(batch, 1, 8, 8\) .* got \(2, 1, 16, 16\)"),
        (torch.rand(2, 3, 8, 8), r"images must have shape \(batch, 1, 8, 8\)"),
        (torch.rand(2, 1, 8, 8) * 2 - 1, r"image values must lie in \[0, 1\] .* map model-space images x to x / 2"),
        (torch.ones(1, 1, 8, 8, dtype=torch.long), r"image tensors must be uint8 or floating point"),
        ([PIL.Image.new("L", (9, 9))], r"images must be 8x8 pixels, got sizes \[\(9, 9\)\]"),
        ([], r"images is empty"),
        ([torch.rand(1, 8, 8), np.zeros((8, 8))], r"must hold PIL images, arrays or tensors of one kind"),
        ("cat.png", r"images must be PIL images, NumPy arrays or torch tensors, got str"),
    ],
)
def test_bad_images(pipe, images, message):
    with pytest.raises(ValueError, match=message):
        pipe.log_likelihood(images)


@pytest.mark.parametrize(
    "images",
    [
        np.random.default_rng(0).random((3, 8, 8)),  # (C, H, W), or three grayscale images? Not guessed.
        np.random.default_rng(0).random((1, 8, 8)),
        np.random.default_rng(0).random((2, 1, 8, 8)),  # channels first
        [np.random.default_rng(0).random((3, 8, 8))],
    ],
)
def test_ambiguous_arrays_are_refused_naming_the_allowed_shapes(pipe, images):
    """Issue #13: a (C, H, W) array on a single-channel model used to be read silently as C images."""
    with pytest.raises(ValueError, match=r"must be channels-last \(height, width\) or \(height, width, 1\)") as error:
        pipe.log_likelihood(images)
    assert "\n" not in str(error.value) and str(np.shape(images[0] if isinstance(images, list) else images)) in str(
        error.value
    )


@pytest.mark.parametrize(
    "images", [torch.zeros(0, 1, 8, 8), np.zeros((0, 8, 8, 1), dtype=np.uint8), [], np.zeros((0, 8, 8))]
)
def test_empty_batches_are_refused(pipe, images):
    """Issue #13: an empty batch fails at once with one line (it used to reach the model)."""
    for method in (pipe.log_likelihood, pipe.bits_per_dim, pipe.encode, pipe.classify):
        with pytest.raises(ValueError, match=r"images is (empty|an empty batch)") as error:
            method(images)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"latents is an empty batch"):
        pipe.decode(torch.zeros(0, 16, 4))


def test_transparent_images_are_flattened_onto_white():
    """Issue #13: RGBA (and LA) images are composited onto white, not stripped of their alpha channel."""
    rgb = make_pipe(random_model(seed=4, num_channels=3, num_classes=0))
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., 0] = 200  # red, with alpha 0 (left), 255 (right) and 128 (last row)
    pixels[:, 4:, 3] = 255
    pixels[-1, :, 3] = 128
    unit = rgb.preprocess(PIL.Image.fromarray(pixels, mode="RGBA"))[0]
    torch.testing.assert_close(unit[:, 0, :4], torch.ones(3, 4))  # transparent: white, not the hidden colour
    torch.testing.assert_close(unit[:, 0, 4:], torch.tensor([200 / 255, 0, 0]).view(3, 1).expand(3, 4))
    expected = torch.tensor([(200 * 128 + 255 * 127) / 255, 127, 127]).round() / 255
    torch.testing.assert_close(unit[:, -1, 0], expected, atol=1 / 255, rtol=0)
    gray = np.stack([np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.uint8)], axis=-1)  # LA, fully transparent
    torch.testing.assert_close(
        make_pipe(random_model(seed=1)).preprocess(PIL.Image.fromarray(gray, "LA")), torch.ones(1, 1, 8, 8)
    )


def train_two_class_model() -> tuple[TarFlowModel, torch.Tensor, torch.Tensor]:
    """A tiny conditional flow trained on two classes that differ in brightness (dark: class 0, bright: class 1);
    returns it with held-out images of each class in [0, 1] and their labels."""
    torch.manual_seed(0)
    config = tiny_config(image_size=4, patch_size=2, num_classes=2, hidden_size=32, head_dim=16)
    model = TarFlowModel(config)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % 2
        means = torch.where(labels == 1, 0.5, -0.5).view(-1, 1, 1, 1)
        return (means + 0.15 * torch.randn(count, 1, 4, 4)).clamp(-1, 1), labels

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        images, labels = draw(64)
        loss = model(images, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels = draw(12)
    return model, images / 2 + 0.5, labels


def test_classify_recovers_the_trained_classes():
    model, images, labels = train_two_class_model()
    pipe = make_pipe(model)
    probabilities = pipe.classify(images)
    assert probabilities.shape == (12, 2)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(12))
    assert probabilities.argmax(-1).tolist() == labels.tolist()
    assert probabilities.max(-1).values.min() > 0.9
    # It is Bayes' rule on the class-conditional likelihoods; the prior shifts it; chunking changes nothing.
    per_class = torch.stack([pipe.log_likelihood(images, class_labels=k) for k in range(2)], dim=-1)
    torch.testing.assert_close(probabilities, per_class.softmax(-1), rtol=0, atol=1e-5)
    prior = torch.tensor([0.9, 0.1])
    torch.testing.assert_close(
        pipe.classify(images, prior=prior), (per_class + prior.log()).softmax(-1), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(pipe.classify(images, batch_size=1), probabilities, rtol=0, atol=1e-5)


def test_classify_errors(pipe, uncond_pipe, images01):
    with pytest.raises(ValueError, match=r"classify needs a class-conditional model"):
        uncond_pipe.classify(images01)
    with pytest.raises(ValueError, match=r"prior must be 3 non-negative finite numbers"):
        pipe.classify(images01, prior=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        pipe.classify(images01, batch_size=0)


# ------------------------------------------------------------------------------------------- saving & loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory, model) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny-tarflow"
    make_pipe(model).save_pretrained(folder)
    return folder


def test_from_pretrained_round_trip(saved, pipe, noise):
    loaded = TarFlowPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is TarFlowPipeline and type(loaded.transformer) is TarFlowModel
    assert loaded.id2label == NAMES
    assert loaded.components.keys() == {"transformer", "sampler"}
    kwargs = {"class_labels": [0, 1, 2, "tabby"], "latents": noise, "output_type": "pt"}
    torch.testing.assert_close(loaded(**kwargs).images, pipe(**kwargs).images, rtol=0, atol=0)
    half = TarFlowPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, out = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert not [name for name in sys.modules if name.startswith("tarflow_hf")]
    assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
    generator = [torch.Generator().manual_seed(seed) for seed in range(4)]
    images = pipe(class_labels=["tench", 1, "tabby"], num_images_per_label=1, generator=generator[:3],
                  guidance_scale=2.0, output_type="np").images
    np.save(out, images)
    print(type(pipe).__module__, type(pipe.transformer).__module__)
    """
)


def test_trust_remote_code_without_tarflow_hf(saved, pipe, tmp_path):
    out = tmp_path / "remote.npy"
    result = run_without_tarflow_hf(REMOTE_SCRIPT, tmp_path, str(saved), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diffusers_modules" in result.stdout and "modeling_tarflow" in result.stdout
    assert "tarflow_hf" not in result.stderr  # no "might require tarflow_hf" warning from diffusers' import scan
    expected = pipe(
        class_labels=["tench", 1, "tabby"], generator=generators(0, 1, 2), guidance_scale=2.0, output_type="np"
    ).images
    np.testing.assert_array_equal(np.load(out), expected)
