"""diffusers' own common pipeline tests (`PipelineTesterMixin`, vendored in tests/common) on both pipelines, with tiny
random components.

A flow samples in one pass per block, with no scheduler, no timesteps and no `num_inference_steps`; TarFlow is
class-conditional (`num_images_per_label`, no prompt). Tests of what a flow does not have are replaced here by a skip
naming it, or by the same test on the flow's counterpart; everything else runs as diffusers runs it.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import tempfile
import textwrap
import unittest
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import torch
from common.pipelines_common import PipelineTesterMixin, torch_device
from conftest import tiny_vae, word_tokenizer
from diffusers.utils.source_code_parsing_utils import ReturnNameVisitor
from transformers import T5Config, T5EncoderModel

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.pipeline_starflow import StarFlowPipeline
from tarflow_hf.pipeline_tarflow import TarFlowPipeline
from tarflow_hf.samplers import SequentialSampler

# Tests of diffusers features that neither pipeline has, with the reason; each is skipped in the test itself.
FEATURES_THE_FLOWS_DO_NOT_HAVE = {
    "test_attention_slicing_forward_pass": "attention slicing works through diffusers' attention processors "
    "(`set_attention_slice`); the flow is a transformers model with its own attention, which "
    "`enable_attention_slicing` leaves as it is, so the test would compare a pipeline with itself",
    "test_layerwise_casting_inference": "layerwise casting (`enable_layerwise_casting`) is a method of diffusers' "
    "ModelMixin; the flow is a transformers model",
}


def skipped_because(reason: str):
    def test(self):
        pytest.skip(reason)

    return test


def with_random_output_projections(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Apple zero-initialises every block's output projection, which makes a new flow the identity map; small
    random weights make every path of the tiny flow matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=generator) * 0.02)
    return model.eval()


class FlowPipelineTests(PipelineTesterMixin):
    """The mixin's tests as the flows run them (see the module doc)."""

    # A flow has no inference steps; the rest of diffusers' canonical optional arguments it has.
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_inference_steps"}
    dummy_input_changes: dict = {}  # noqa: RUF012 (set for one test by `inputs_changed`)

    def setUp(self):
        # Upstream frees accelerator memory around every test with two full garbage collections (0.3 s each here);
        # on the CPU there is nothing to free.
        if torch_device != "cpu":
            super().setUp()

    def tearDown(self):
        if torch_device != "cpu":
            super().tearDown()

    @contextlib.contextmanager
    def inputs_changed(self, **changes) -> Iterator[None]:
        """`get_dummy_inputs` with `changes` applied, for the test run inside."""
        self.dummy_input_changes = changes
        try:
            yield
        finally:
            self.dummy_input_changes = {}

    def test_inference_batch_single_identical(self):
        # Upstream copies `num_inference_steps` into the batched call; a flow has none.
        self._test_inference_batch_single_identical(batch_size=3, additional_params_copy_to_batched_inputs=[])

    def test_save_load_optional_components(self):
        """Upstream sets every optional component to None and expects None back after saving and loading. The
        sampler is optional only so that folders saved before samplers were components still load: None stands
        for the default, the exact sequential sampler, and a pipeline made or loaded with None has that one. So:
        set to None, the pipeline samples as the sequential sampler does, and loads back with it, sampling the
        same."""
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        pipe.sampler = None
        output = pipe(**self.get_dummy_inputs("cpu"))[0]
        with tempfile.TemporaryDirectory() as folder:
            pipe.save_pretrained(folder, safe_serialization=False)
            loaded = self.pipeline_class.from_pretrained(folder)
        assert loaded.sampler == SequentialSampler()
        np.testing.assert_allclose(loaded(**self.get_dummy_inputs("cpu"))[0], output, rtol=0, atol=1e-4)
        pipe.sampler = SequentialSampler()
        np.testing.assert_array_equal(pipe(**self.get_dummy_inputs("cpu"))[0], output)

    def test_callback_inputs(self):
        # The denoising step is not a flow block: it runs after the last block's callback and would move the latents
        # that the callback set to zeros; the callback plumbing is tested without it.
        with self.inputs_changed(denoise=False):
            super().test_callback_inputs()


for _name, _reason in FEATURES_THE_FLOWS_DO_NOT_HAVE.items():
    setattr(FlowPipelineTests, _name, skipped_because(_reason))


class TarFlowPipelineTest(FlowPipelineTests, unittest.TestCase):
    pipeline_class = TarFlowPipeline
    params = frozenset({"class_labels", "guidance_scale", "num_images_per_label"})
    batch_params = frozenset({"class_labels"})
    # TarFlow's counterpart of `num_images_per_prompt` is `num_images_per_label` (see test_num_images_per_prompt).
    required_optional_params = FlowPipelineTests.required_optional_params - {"num_images_per_prompt"}

    def get_dummy_components(self) -> dict:
        torch.manual_seed(0)
        config = TarFlowConfig(
            image_size=8, num_channels=3, patch_size=2, hidden_size=32, head_dim=16, num_blocks=2, num_classes=3
        )
        transformer = with_random_output_projections(TarFlowModel(config), seed=0)
        return {"transformer": transformer, "sampler": SequentialSampler()}

    def get_dummy_inputs(self, device, seed=0) -> dict:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        inputs = {"class_labels": 1, "guidance_scale": 2.0, "generator": generator, "output_type": "np"}
        return {**inputs, **self.dummy_input_changes}

    def test_num_images_per_prompt(self):
        """Upstream's test on TarFlow's `num_images_per_label` (upstream returns at once without
        `num_images_per_prompt`)."""
        pipe = self.pipeline_class(**self.get_dummy_components()).to("cpu")
        pipe.set_progress_bar_config(disable=None)
        for batch_size in (1, 2):
            for num_images_per_label in (1, 2):
                inputs = self.get_dummy_inputs("cpu")
                inputs["class_labels"] = batch_size * [inputs["class_labels"]]
                images = pipe(**inputs, num_images_per_label=num_images_per_label)[0]
                assert images.shape[0] == batch_size * num_images_per_label

    def test_encode_prompt_works_in_isolation(self):
        pytest.skip("TarFlow is class-conditional: it has no prompt and no encode_prompt (upstream returns at once)")


class StarFlowPipelineTest(FlowPipelineTests, unittest.TestCase):
    pipeline_class = StarFlowPipeline
    params = frozenset(
        {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds", "negative_prompt_embeds"}
    )
    batch_params = frozenset({"prompt", "negative_prompt"})

    def get_dummy_components(self) -> dict:
        torch.manual_seed(0)
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="relu")
        ).eval()
        config = StarFlowConfig(
            sample_size=4,
            in_channels=4,
            patch_size=1,
            hidden_size=32,
            head_dim=32,
            layers_per_block=[1, 1],
            text_hidden_size=16,
            max_text_length=8,
            noise_std=0.1,
        )
        transformer = with_random_output_projections(StarFlowModel(config), seed=0)
        return {
            "transformer": transformer,
            "text_encoder": text_encoder,
            "tokenizer": word_tokenizer(),
            "vae": tiny_vae(32).eval(),
            "sampler": SequentialSampler(),
        }

    def get_dummy_inputs(self, device, seed=0) -> dict:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        inputs = {"prompt": "w3 w4 w5", "guidance_scale": 2.0, "generator": generator, "output_type": "np"}
        return {**inputs, **self.dummy_input_changes}

    def test_encode_prompt_works_in_isolation(self):
        # Upstream reads `encode_prompt`'s source (for the names it returns) from `diffusers.pipelines.<class name>`,
        # which holds diffusers' own pipelines only; here it is read from the pipeline class itself.
        def encode_prompt_source(visitor, cls, attribute_name="encode_prompt"):
            return ast.parse(textwrap.dedent(inspect.getsource(getattr(cls, attribute_name))))

        with mock.patch.object(ReturnNameVisitor, "get_ast_tree", encode_prompt_source):
            super().test_encode_prompt_works_in_isolation()
