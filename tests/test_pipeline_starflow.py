"""StarFlowPipeline: Apple parity through the public API, the text path, seeds, saving, inputs and likelihood tools.

Apple's reference outputs are in tests/fixtures/starflow (see its README): the `sf_t2i` transformer, its inputs and
samples, and the prompt encoding through `t5_tiny`. The tokenizer is a word-level stand-in whose word `wN` is token
id N, so the fixture's token ids can be written as text. The VAE is tiny and random (4 levels, downsampling 8).
Every comparison with Apple prints its largest error (`pytest -s` shows them); the tolerance is 1e-4.
"""

from __future__ import annotations

import copy
import json
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import offload_and_record_onloads, run_without_tarflow_hf, tiny_vae, word_tokenizer
from diffusers import AutoencoderKL, DiffusionPipeline
from transformers import PreTrainedTokenizerFast, T5EncoderModel

from tarflow_hf.convert_starflow import load_ml_starflow_checkpoint
from tarflow_hf.pipeline_starflow import StarFlowPipeline, StarFlowPipelineOutput
from tarflow_hf.samplers import BlockJacobiSampler, JacobiSampler

FIXTURES = Path(__file__).parent / "fixtures" / "starflow"
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------- components
@cache
def reference(name: str = "sf_t2i") -> tuple[dict, torch.nn.Module, dict[str, torch.Tensor]]:
    """(the case's json, the converted transformer, Apple's expected tensors)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    model = load_ml_starflow_checkpoint(FIXTURES / f"{name}.pth", FIXTURES / f"{name}.yaml").eval()
    expected = torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)
    return meta, model, expected


@cache
def text_encoding() -> tuple[list[str], dict[str, torch.Tensor]]:
    """The fixture's prompts written in the stand-in tokenizer's words, and Apple's encoding of them."""
    meta = json.loads((FIXTURES / "text_encoding.json").read_text())
    ids = meta["token_ids_before_padding"]
    prompts = [" ".join(f"w{i}" for i in ids[prompt]) for prompt in meta["prompts"]]
    return prompts, torch.load(FIXTURES / "text_encoding_expected.pt", weights_only=True)


@cache
def tokenizer() -> PreTrainedTokenizerFast:
    """T5-like: `<pad>` 0, `</s>` 1 appended to every text, `<unk>` 2, and words `w3` ... `w99` with their ids."""
    return word_tokenizer()


@cache
def text_encoder() -> T5EncoderModel:
    return T5EncoderModel.from_pretrained(FIXTURES / "t5_tiny").eval()


@cache
def vae() -> AutoencoderKL:
    return tiny_vae(64, scaling_factor=0.18215).eval()


def make_pipe(name: str = "sf_t2i") -> StarFlowPipeline:
    pipe = StarFlowPipeline(
        transformer=reference(name)[1], text_encoder=text_encoder(), tokenizer=tokenizer(), vae=vae()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def private_pipe(name: str = "sf_t2i") -> StarFlowPipeline:
    """A pipeline with its own copies of the cached components, for tests that change them (dtype, hooks)."""
    components = dict(transformer=reference(name)[1], text_encoder=text_encoder(), vae=vae())
    pipe = StarFlowPipeline(tokenizer=tokenizer(), **{key: copy.deepcopy(value) for key, value in components.items()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = TOLERANCE) -> float:
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs().max().item()
    print(f"max |error| {what}: {error:.2e}")
    assert error <= tolerance, f"{what}: max error {error:.2e} > {tolerance}"
    return error


def apple_arguments(spec: dict, expected: dict[str, torch.Tensor]) -> dict:
    """Pipeline arguments for one of Apple's recorded sampling runs (Apple's cfg g is guidance_scale 1 + g)."""
    kwargs = spec["kwargs"]
    guidance = kwargs["guidance"]
    arguments = {
        "prompt_embeds": expected["y_cond"],
        "latents": expected["noise"],
        "guidance_scale": 1.0 + guidance,
        "attention_temperature": kwargs.get("attn_temp", 1.0),
    }
    if guidance > 0:
        arguments["negative_prompt_embeds"] = expected["y_empty" if "y_empty" in spec["y"] else "y_neg"]
    if kwargs.get("jacobi"):
        arguments["sampler"] = BlockJacobiSampler(
            kwargs["jacobi_block_size"], kwargs["jacobi_th"], kwargs["jacobi_max_iter"]
        )
    return arguments


def samples(jacobi: bool) -> list[str]:
    meta = json.loads((FIXTURES / "sf_t2i.json").read_text())
    return [spec["key"] for spec in meta["samples"] if bool(spec["kwargs"].get("jacobi")) == jacobi]


# ------------------------------------------------------------------------------------------- Apple parity
@pytest.mark.parametrize("key", samples(jacobi=False))
def test_sequential_samples_match_apple(key):
    meta, _, expected = reference()
    spec = next(spec for spec in meta["samples"] if spec["key"] == key)
    out = make_pipe()(**apple_arguments(spec, expected), denoise=False, output_type="latent")
    assert isinstance(out, StarFlowPipelineOutput)
    assert_close(out.images, expected[key], f"pipeline {key}")


@pytest.mark.parametrize("key", samples(jacobi=True))
def test_block_jacobi_samples_match_apple(key):
    meta, _, expected = reference()
    spec = next(spec for spec in meta["samples"] if spec["key"] == key)
    out = make_pipe()(**apple_arguments(spec, expected), denoise=False, output_type="latent")
    assert_close(out.images, expected[key], f"pipeline {key} (block Jacobi)")
    assert out.stats.chunk_iterations == spec["jacobi_iters"]


def test_default_denoising_matches_apple():
    meta, _, expected = reference()
    spec = next(spec for spec in meta["samples"] if spec["key"] == meta["denoise"]["applied_to"])
    images = make_pipe()(**apple_arguments(spec, expected), output_type="latent").images
    assert_close(images, expected["denoised"], "pipeline denoised")
    assert (expected["denoised"] - expected[spec["key"]]).abs().max() > 1e-3  # the step is not a no-op here


def test_prompts_through_tokenizer_and_encoder_match_apple():
    """Apple's sample_3 (cfg 3.6 against the empty prompt, 4.6 in the diffusers convention: the config default)
    from the prompts themselves: tokenizer, T5, masking, default guidance and default negative prompt."""
    meta, model, expected = reference()
    assert model.config.default_guidance_scale == 1.0 + meta["samples"][3]["kwargs"]["guidance"]
    assert "y_empty" in meta["samples"][3]["y"]
    prompts, _ = text_encoding()
    images = make_pipe()(prompts[:3], latents=expected["noise"], denoise=False, output_type="latent").images
    assert_close(images, expected["sample_3"], "pipeline sample_3 from prompts")


def test_sf_variant_non_square_matches_apple():
    """Patch size 2 and a non-square 8x16 latent (64x128 pixels): Apple's aspect sample (cfg 1.5 against y_neg)."""
    _, _, expected = reference("sf_variant")
    cfg = 1.5
    out = make_pipe("sf_variant")(
        prompt_embeds=expected["y_cond"],
        negative_prompt_embeds=expected["y_neg"],
        latents=expected["aspect_noise"],
        guidance_scale=1.0 + cfg,
        height=64,
        width=128,
        denoise=False,
        output_type="latent",
    )
    assert_close(out.images, expected["aspect_sample"], "pipeline sf_variant aspect_sample")


# ---------------------------------------------------------------------------------------------- text path
def test_encode_prompt_matches_apple_encode_text():
    prompts, encoding = text_encoding()
    pipe = make_pipe()
    tokens = tokenizer()(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(tokens.input_ids, encoding["input_ids"])
    assert torch.equal(tokens.attention_mask, encoding["attention_mask"])

    embeds, negative = pipe.encode_prompt(prompts, num_images_per_prompt=2, negative_prompt=None)
    assert_close(embeds[::2], encoding["prompt_embeds"], "encode_prompt vs Apple's encode_text")
    assert torch.equal(embeds[::2], embeds[1::2])  # each prompt repeated consecutively
    padding = encoding["attention_mask"] == 0
    assert padding.any() and (embeds[::2][padding] == 0).all()  # padding rows zeroed
    assert (encoding["t5_last_hidden_state"][padding] != 0).any()  # ... which T5 alone does not do
    # The default negative is the empty prompt's encoding, Apple's y_empty.
    _, _, expected = reference()
    assert negative.shape == embeds.shape
    assert_close(negative, expected["y_empty"][:1].expand(8, -1, -1), "default negative vs Apple's y_empty")


def test_prompts_and_their_embeddings_give_the_same_images():
    prompts, encoding = text_encoding()
    _, _, expected = reference()
    pipe = make_pipe()
    from_prompts = pipe(prompts[:3], negative_prompt="w5 w6", latents=expected["noise"], output_type="np").images
    negative = pipe.encode_prompt(["w5 w6"] * 3, do_classifier_free_guidance=False)[0]
    from_embeds = pipe(
        prompt_embeds=encoding["prompt_embeds"][:3],
        negative_prompt_embeds=negative,
        latents=expected["noise"],
        output_type="np",
    ).images
    assert from_prompts.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(from_prompts, from_embeds, atol=1e-5)
    # The negative prompt reached the guidance: the empty prompt gives other images.
    default = pipe(prompts[:3], latents=expected["noise"], output_type="np").images
    assert np.abs(default - from_prompts).max() > 1e-3


# -------------------------------------------------------------------------------------------------- seeds
def test_one_generator_per_image_gives_the_same_image_in_any_batch():
    pipe = make_pipe()
    prompts = ["w10 w11", "w12", "w13 w14 w15"]
    batch = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)], output_type="pt").images
    alone = pipe(prompts[1:2], generator=[torch.Generator().manual_seed(8)], output_type="pt").images
    assert batch.shape == (3, 3, 64, 64)
    assert_close(alone[0], batch[1], "seed 8 alone vs in a batch of 3", tolerance=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3
    # The noise is diffusers' randn_tensor: torch.randn with the image's generator, shape (C, H/8, W/8).
    _, model, _ = reference()
    latents = pipe(prompts[1:2], generator=torch.Generator().manual_seed(8), denoise=False, output_type="latent").images
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8))
    embeds, negative = pipe.encode_prompt(prompts[1:2])
    direct = model.inverse(noise, embeds, negative, guidance_scale=model.config.default_guidance_scale)
    assert_close(latents, direct, "pipeline vs inverse of torch.randn(seed)", tolerance=1e-6)


def test_num_images_per_prompt():
    pipe = make_pipe()
    generator = [torch.Generator().manual_seed(s) for s in range(4)]
    images = pipe(["w10", "w11"], num_images_per_prompt=2, generator=generator, output_type="latent").images
    assert images.shape == (4, 4, 8, 8)
    single = pipe(["w11"], generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    assert_close(single[0], images[3], "second prompt's second image", tolerance=1e-5)


# ------------------------------------------------------------------------------------------ save and load
def test_save_pretrained_round_trip(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_starflow", "StarFlowPipeline"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert (tmp_path / "pipeline_starflow.py").is_file()
    for component in ("transformer", "text_encoder", "tokenizer", "vae"):
        assert (tmp_path / component).is_dir()

    arguments = dict(prompt=["w10 w11", "w12"], generator=torch.Generator().manual_seed(0), output_type="np")
    before = pipe(**arguments).images
    installed = StarFlowPipeline.from_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(installed) is StarFlowPipeline
    assert type(generic).__name__ == "StarFlowPipeline"
    for loaded in (installed, generic):
        loaded.set_progress_bar_config(disable=True)
        arguments["generator"] = torch.Generator().manual_seed(0)
        np.testing.assert_array_equal(loaded(**arguments).images, before)


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
    images = pipe(["w10 w11", "w12"], generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(out, images)
    print(type(pipe).__module__, type(pipe.transformer).__module__, type(pipe.text_encoder).__module__)
    """
)


def test_trust_remote_code_without_tarflow_hf(tmp_path):
    """The saved folder carries the pipeline's code and the transformer's (through tarflow_hf.hub); T5, the tokenizer
    and the VAE are standard components. A fresh process that cannot import tarflow_hf samples the same images."""
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "saved")
    out = tmp_path / "remote.npy"
    result = run_without_tarflow_hf(REMOTE_SCRIPT, tmp_path, str(tmp_path / "saved"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diffusers_modules" in result.stdout and "modeling_starflow" in result.stdout
    assert "transformers.models.t5" in result.stdout
    assert "tarflow_hf" not in result.stderr  # no "might require tarflow_hf" warning from diffusers' import scan
    expected = pipe(["w10 w11", "w12"], generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(np.load(out), expected)


# ------------------------------------------------------------------------------------ sizes and outputs
def test_non_square_height_and_width():
    pipe = make_pipe()
    generator = torch.Generator().manual_seed(0)
    images = pipe("w10", height=48, width=96, generator=generator, output_type="np").images
    assert images.shape == (1, 48, 96, 3)
    latents = pipe("w10", height=48, width=96, denoise=False, output_type="latent").images
    assert latents.shape == (1, 4, 6, 12)
    # Without height/width the given latents set the size.
    images = pipe("w10", latents=torch.randn(1, 4, 4, 6), denoise=False, output_type="pt").images
    assert images.shape == (1, 3, 32, 48)


def test_output_types():
    pipe = make_pipe()
    _, _, expected = reference()
    common = dict(prompt_embeds=expected["y_cond"][:2], latents=expected["noise"][:2], guidance_scale=1.0)
    latents = pipe(**common, output_type="latent").images
    assert latents.shape == (2, 4, 8, 8)
    pt = pipe(**common, output_type="pt").images
    # Independent decode: the VAE on latents / scaling_factor, [-1, 1] -> [0, 1].
    with torch.no_grad():
        decoded = vae().decode(latents / 0.18215).sample
    assert_close(pt, (decoded / 2 + 0.5).clamp(0, 1), "pt output vs direct VAE decode", tolerance=1e-6)
    array = pipe(**common, output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (2, 64, 64, 3) and array.dtype == np.float32
    np.testing.assert_allclose(array, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe(**common).images
    assert len(pil) == 2 and all(isinstance(image, PIL.Image.Image) and image.size == (64, 64) for image in pil)
    as_tuple = pipe(**common, output_type="latent", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], latents, rtol=0, atol=0)


def test_bfloat16_weights():
    """`pipe.to(torch.bfloat16)`, the usual diffusers way to halve memory: every component in bf16, samples close
    to float32's (a random model amplifies rounding along the sequence, hence the loose bound)."""
    _, _, expected = reference()
    common = dict(prompt_embeds=expected["y_cond"][:2], negative_prompt_embeds=expected["y_neg"][:2])
    common.update(latents=expected["noise"][:2], guidance_scale=2.0, output_type="pt")
    reference_images = make_pipe()(**common).images
    half = private_pipe().to(torch.bfloat16)
    assert half.transformer.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    images = half(**common).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - reference_images).abs().max() < 0.1


def test_model_cpu_offload_runs_the_transformer_hook(monkeypatch):
    """Sampling calls the transformer's `inverse`, not `forward`, so the pipeline itself must move it onto the
    execution device under `enable_model_cpu_offload`."""
    _, _, expected = reference()
    pipe = private_pipe()
    common = dict(prompt_embeds=expected["y_cond"][:2], latents=expected["noise"][:2], guidance_scale=1.0)
    common.update(denoise=False, output_type="latent")
    expected_latents = pipe(**common).images
    onloads = offload_and_record_onloads(pipe, monkeypatch)
    latents = pipe(**common).images
    assert onloads == [pipe.transformer]
    torch.testing.assert_close(latents, expected_latents, rtol=0, atol=0)


def test_callback_after_each_block():
    pipe = make_pipe()
    _, model, expected = reference()
    calls = []

    def callback(pipeline, step, block_index, callback_kwargs):
        calls.append((step, block_index, callback_kwargs["latents"].clone()))
        return callback_kwargs

    out = pipe(
        prompt_embeds=expected["y_cond"],
        latents=expected["noise"],
        guidance_scale=1.0,
        denoise=False,
        output_type="latent",
        callback_on_step_end=callback,
    )
    num_blocks = model.config.num_blocks
    assert [(step, block) for step, block, _ in calls] == [(i, num_blocks - 1 - i) for i in range(num_blocks)]
    assert all(latents.shape == (3, 4, 8, 8) for _, _, latents in calls)
    # Apple's return_sequence: the latents after the deep block, ..., after block 1; then the sample itself.
    for _, block, latents in calls[:-1]:
        assert_close(latents, expected[f"sample_0_after_block_{block}"], f"callback latents after block {block}")
    torch.testing.assert_close(calls[-1][2], out.images, rtol=0, atol=0)


def test_the_sampler_component_reaches_the_model_and_is_saved(tmp_path):
    """`JacobiSampler(sequential_blocks=1)` as the pipeline's sampler: the deep block decodes exactly, the shallow
    ones iterate; it is saved with the pipeline, and a sampler given to one call wins for that call."""
    _, model, expected = reference()
    pipe = make_pipe()
    pipe.sampler = JacobiSampler(tolerance=1e-6, sequential_blocks=1)
    arguments = dict(prompt_embeds=expected["y_cond"], latents=expected["noise"], guidance_scale=1.0, denoise=False,
                     output_type="latent")  # fmt: skip
    out = pipe(**arguments)
    assert out.stats.sequential_blocks == [True] + [False] * (model.config.num_blocks - 1)
    assert pipe(**arguments, sampler="sequential").stats.sequential_blocks == [True] * model.config.num_blocks
    pipe.save_pretrained(tmp_path / "saved")
    assert StarFlowPipeline.from_pretrained(tmp_path / "saved").sampler == pipe.sampler


def test_diffusers_guidance_cutoff_callback_runs():
    """diffusers' own `SDCFGCutoffCallback` (which reads `num_timesteps`, drops the negative half of
    `prompt_embeds` and sets `_guidance_scale = 0`) runs on STARFlow; guidance lives in the deep block, the first
    step, so a cut-off after it leaves the sample as it was."""
    from diffusers.callbacks import SDCFGCutoffCallback

    _, _, expected = reference()
    arguments = dict(prompt_embeds=expected["y_cond"], negative_prompt_embeds=expected["y_neg"],
                     latents=expected["noise"], guidance_scale=2.5, denoise=False, output_type="latent")  # fmt: skip
    pipe = make_pipe()
    cut = pipe(**arguments, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4)).images
    torch.testing.assert_close(cut, pipe(**arguments).images, rtol=0, atol=0)


def test_guidance_rule_reaches_the_model():
    """TarFlow's extrapolation through STARFlow's pipeline: the model's sample with that rule, not the default's."""
    _, model, expected = reference()
    pipe = make_pipe()
    arguments = dict(
        prompt_embeds=expected["y_cond"],
        negative_prompt_embeds=expected["y_neg"],
        latents=expected["noise"],
        guidance_scale=2.5,
        denoise=False,
        output_type="latent",
    )
    extrapolated = pipe(**arguments, guidance_rule="extrapolate").images
    direct = model.inverse(expected["noise"], expected["y_cond"], expected["y_neg"], 2.5, guidance_rule="extrapolate")
    torch.testing.assert_close(extrapolated, direct, rtol=0, atol=1e-6)
    assert (extrapolated - pipe(**arguments).images).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"guidance_rule must be one of \('extrapolate', 'gaussian_product'\)"):
        pipe(**arguments, guidance_rule="mean")


# ----------------------------------------------------------------------------------------------- bad inputs
BAD_INPUTS = [
    (dict(prompt="w10", prompt_embeds=torch.zeros(1, 16, 32)), "prompt_embeds"),
    (dict(), "prompt"),
    (
        dict(prompt_embeds=torch.zeros(3, 16, 32), negative_prompt_embeds=torch.zeros(2, 16, 32)),
        "negative_prompt_embeds",
    ),
    (dict(prompt_embeds=torch.zeros(1, 16, 7)), "prompt_embeds"),
    (dict(prompt="w10", latents=torch.zeros(1, 3, 8, 8)), "latents"),
    (dict(prompt="w10", latents=torch.zeros(2, 4, 8, 8)), "latents"),
    (dict(prompt="w10", latents=torch.zeros(1, 4, 8, 8), height=128), "latents"),
    (dict(prompt="w10", latents=torch.zeros(4, 8, 8)), "latents"),
    (dict(prompt="w10", height=60), "height"),
    (dict(prompt="w10", width=0), "width"),
    (dict(prompt="w10", output_type="bogus"), "output_type"),
    (dict(prompt="w10", guidance_scale=0.5), "guidance_scale"),
    (dict(prompt="w10", sampler="bogus"), "sampler"),
    (dict(prompt="w10", sampler="jacobi:sequential_blocks=-1"), "sequential_blocks"),
    (dict(prompt="w10", denoise="no"), "denoise"),
    (dict(prompt="w10", height=80000, width=80000), r"latent tokens, whose sampling needs more than the .* GiB"),
    (dict(prompt="w\ud800x"), "prompt 0 holds .* at position 1, which is not a Unicode character"),
    (dict(prompt="w10", num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompt="w10", callback_on_step_end_tensor_inputs=["images"]), "callback_on_step_end_tensor_inputs"),
    (dict(prompt=["w10", "w11"], negative_prompt=["w5", "w6", "w7"]), "negative_prompt"),
    (dict(prompt=["w10"], generator=[torch.Generator(), torch.Generator()]), "generator"),
]


@pytest.mark.parametrize(("arguments", "name"), BAD_INPUTS)
def test_bad_inputs_raise_one_line_errors_naming_the_argument(arguments, name):
    with pytest.raises(ValueError, match=name) as error:
        make_pipe()(**arguments)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ likelihood tools
def images_in_unit_range() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((2, 3, 64, 64), generator=generator)


def direct_log_likelihood(images: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """log p(latent | text) computed without the pipeline: VAE posterior mode times 0.18215, then the flow."""
    _, model, _ = reference()
    with torch.no_grad():
        latents = vae().encode(images * 2 - 1).latent_dist.mode() * 0.18215
        return model(latents, embeds).log_likelihood


def test_encode_images():
    pipe = make_pipe()
    images = images_in_unit_range()
    with torch.no_grad():
        posterior = vae().encode(images * 2 - 1).latent_dist
    assert_close(pipe.encode_images(images), posterior.mode() * 0.18215, "encode_images (mode)", tolerance=1e-6)
    sampled = pipe.encode_images(images, generator=torch.Generator().manual_seed(3), sample_posterior=True)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    direct = (posterior.mean + posterior.std * noise) * 0.18215
    assert_close(sampled, direct, "encode_images (posterior sample)", tolerance=1e-6)
    # PIL and NumPy inputs give the same latents as the tensor.
    array = images.permute(0, 2, 3, 1).numpy()
    assert_close(pipe.encode_images(array), pipe.encode_images(images), "numpy input", tolerance=1e-6)
    pil = [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    quantized = torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2) / 255
    assert_close(pipe.encode_images(pil), pipe.encode_images(quantized), "PIL input", tolerance=1e-5)
    with pytest.raises(ValueError, match="images"):
        pipe.encode_images(torch.rand(1, 3, 60, 64))


def test_log_likelihood_and_bits_per_dim():
    pipe = make_pipe()
    prompts, encoding = text_encoding()
    images = images_in_unit_range()
    embeds = encoding["prompt_embeds"][:2]
    expected = direct_log_likelihood(images, embeds)
    assert_close(pipe.log_likelihood(images, prompts[:2]), expected, "log_likelihood")
    dims = 4 * 8 * 8
    bits = pipe.bits_per_dim(images, prompt_embeds=embeds)
    assert_close(bits, -expected / (dims * np.log(2)), "bits_per_dim", tolerance=1e-5)
    # One prompt is used for every image.
    one = direct_log_likelihood(images, embeds[:1].expand(2, -1, -1))
    # (nats summed over 256 dimensions: batch composition moves the last digits)
    assert_close(pipe.log_likelihood(images, prompts[0]), one, "log_likelihood, one prompt", tolerance=1e-3)


def test_classify_is_bayes_rule_over_the_candidates():
    pipe = make_pipe()
    prompts, encoding = text_encoding()
    images = images_in_unit_range()
    candidates = prompts[:3]
    probabilities = pipe.classify(images, candidates, batch_size=4)
    assert probabilities.shape == (2, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))
    scores = torch.stack(
        [direct_log_likelihood(images, encoding["prompt_embeds"][j : j + 1].expand(2, -1, -1)) for j in range(3)],
        dim=-1,
    )
    assert_close(probabilities, scores.softmax(-1), "classify vs softmax of direct log-likelihoods", tolerance=1e-5)
    with pytest.raises(ValueError, match="candidate_prompts"):
        pipe.classify(images, "w10")


# ------------------------------------------------------------------------------- image inputs (issue #13)
def test_transparent_images_are_flattened_onto_white():
    pipe = make_pipe()
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[..., 2] = 255  # blue under a fully transparent alpha
    rgba = PIL.Image.fromarray(pixels, mode="RGBA")
    torch.testing.assert_close(pipe.preprocess([rgba]), torch.ones(1, 3, 64, 64))  # white, in the VAE's [-1, 1]
    white = PIL.Image.new("RGB", (64, 64), (255, 255, 255))
    assert_close(pipe.encode_images([rgba]), pipe.encode_images([white]), "RGBA onto white", tolerance=0)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (
            np.random.default_rng(0).random((3, 64, 64)),
            r"channels-last \(height, width, 3\) or \(batch, height, width, 3\)",
        ),
        (np.random.default_rng(0).random((1, 3, 64, 64)), r"got shape \(1, 3, 64, 64\)"),
        (torch.zeros(0, 3, 64, 64), r"images is an empty batch"),
        (np.zeros((0, 64, 64, 3)), r"images is an empty batch"),
        ([], r"images is empty"),
        (torch.rand(1, 3, 64, 64) * 2, r"image values must lie in \[0, 1\]"),
    ],
)
def test_bad_images_raise_one_line_errors(images, message):
    pipe = make_pipe()
    for method in (pipe.encode_images, lambda images: pipe.classify(images, ["w10", "w11"])):
        with pytest.raises(ValueError, match=message) as error:
            method(images)
        assert "\n" not in str(error.value)


def test_uint8_arrays_are_read_as_8_bit_images():
    pipe = make_pipe()
    levels = (images_in_unit_range() * 255).round().to(torch.uint8)
    as_unit = levels.float() / 255
    assert_close(
        pipe.encode_images(levels.permute(0, 2, 3, 1).numpy()), pipe.encode_images(as_unit), "uint8", tolerance=1e-6
    )


def test_sampling_under_inference_mode_denoises_as_without_it():
    """A caller's `torch.inference_mode()` must not break the score step's gradient."""
    _, _, expected = reference()
    arguments = dict(
        prompt_embeds=expected["y_cond"], latents=expected["noise"], guidance_scale=1.0, output_type="latent"
    )
    pipe = make_pipe()
    outside = pipe(**arguments).images
    with torch.inference_mode():
        inside = pipe(**arguments).images
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-6)
    assert (outside - pipe(**arguments, denoise=False).images).abs().max() > 1e-4  # the step did something


def test_prompts_encode_without_a_transformer():
    """`encode_prompt` with only the text encoder and tokenizer loaded (diffusers' way of precomputing embeddings)."""
    pipe = StarFlowPipeline(transformer=None, text_encoder=text_encoder(), tokenizer=tokenizer(), vae=vae())
    embeds, negative = pipe.encode_prompt("w5 w7", num_images_per_prompt=2)
    full, full_negative = make_pipe().encode_prompt("w5 w7", num_images_per_prompt=2, max_sequence_length=128)
    assert embeds.shape[:2] == (2, 128) and negative.shape == embeds.shape
    torch.testing.assert_close(embeds, full, rtol=0, atol=0)
    torch.testing.assert_close(negative, full_negative, rtol=0, atol=0)


def test_embeddings_of_another_text_length_are_fitted_to_the_transformers():
    """The flow reads text padded to its `max_text_length` (16 here); embeddings padded to another length (as
    `encode_prompt` without a transformer pads to 128) are fitted to it: zero rows added or cut, the same images."""
    _, model, expected = reference()
    pipe = make_pipe()
    arguments = {"latents": expected["noise"][:1], "denoise": False, "output_type": "latent"}
    from_prompt = pipe("w5 w7", negative_prompt="w9", **arguments).images
    for length in (model.config.max_text_length + 9, 4):  # "w5 w7 </s>" is 3 tokens
        embeds = pipe.encode_prompt("w5 w7", do_classifier_free_guidance=False, max_sequence_length=length)[0]
        negative = pipe.encode_prompt("w9", do_classifier_free_guidance=False, max_sequence_length=length)[0]
        assert embeds.shape[1] == length
        images = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **arguments).images
        assert_close(images, from_prompt, f"embeddings of {length} tokens vs the prompt", tolerance=1e-5)
    # Text past the model's length is not cut: those embeddings reach the flow as they are.
    long = pipe.encode_prompt(" ".join(f"w{i}" for i in range(10, 40)), do_classifier_free_guidance=False,
                              max_sequence_length=40)[0]  # fmt: skip
    assert pipe.encode_prompt(None, prompt_embeds=long, do_classifier_free_guidance=False)[0].shape[1] == 40


def test_a_variant_the_transformer_lacks_loads_its_own_weights(tmp_path):
    """diffusers' rule for `variant=`: a component saved without the variant loads its own weights; a variant that
    no component has is diffusers' ValueError, before anything loads."""
    pipe = private_pipe()
    pipe.save_pretrained(tmp_path, variant="fp16")
    weights = tmp_path / "transformer" / "model.fp16.safetensors"
    weights.rename(weights.with_name("model.safetensors"))
    loaded = StarFlowPipeline.from_pretrained(tmp_path, variant="fp16")
    for key, tensor in pipe.transformer.state_dict().items():
        torch.testing.assert_close(loaded.transformer.state_dict()[key], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="variant=bf16"):
        StarFlowPipeline.from_pretrained(tmp_path, variant="bf16")
