"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, vendored in tests/common) on both flows,
with tiny random models.

Where a flow differs in kind from the models the suite was written for, the test is replaced here: by a test of what
the flow does instead (its hidden states are per-block latents, its input projection is a linear layer over patches),
or by a skip naming the feature the flows do not have. Everything else runs as transformers runs it.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import unittest
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from common.configuration_common import ConfigTester
from common.modeling_common import ModelTesterMixin
from torch import nn

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.modeling_starflow import StarFlowModel

# Tests of transformers features that neither flow has, with the reason; each is skipped in the test itself.
FEATURES_THE_FLOWS_DO_NOT_HAVE = {
    "test_keep_in_fp32_modules_exist": "neither flow declares `_keep_in_fp32_modules`: they compute what must stay in "
    "float32 (LayerNorm, exp, the log-determinant) in float32 inside their layers, whatever the weights' dtype",
    "test_keep_in_fp32_modules": "neither flow declares `_keep_in_fp32_modules` (see test_keep_in_fp32_modules_exist)",
    "test_keep_in_fp32_modules_strict_also_hardcode_fp32": "neither flow declares `_keep_in_fp32_modules_strict`",
    "test_save_load_keys_to_ignore_on_save": "neither flow leaves tensors out of its checkpoints "
    "(`_keys_to_ignore_on_save` is unset): every tensor is a weight or the prior's variance",
    "test_resize_position_vector_embeddings": "no `resize_position_embeddings`: TarFlow's position tables fix the "
    "number of patches (another image size is another flow), STARFlow's rotary positions take any size as they are",
    "test_feed_forward_chunking": "the flows ignore `chunk_size_feed_forward` (their MLPs run unchunked, as in most "
    "current transformers models), so this test would compare a model with itself",
    "test_tp_plan_matches_params": "no tensor-parallel plan (`base_model_tp_plan`): sharding a flow over devices is "
    "not offered",
    "test_reverse_loading_mapping": "no checkpoint key renaming (`conversion_mapping`): the flows load their own key "
    "names; Apple's checkpoints are converted by tarflow_hf.convert and tarflow_hf.convert_starflow",
    "test_can_load_from_already_mapped_keys": "no checkpoint key renaming (`conversion_mapping`), as above",
    "test_capture_outputs_decorator": "the flows build their outputs themselves, not with transformers' "
    "output-capturing hooks (`_can_record_outputs`): a flow's hidden states are per-block latents, not layer outputs",
    "test_format_of_can_record_outputs": "no `_can_record_outputs` (see test_capture_outputs_decorator)",
    "test_can_capture_specific_layers_hidden_states": "no `_can_record_outputs`, so `output_hidden_states` takes no "
    "layer indices (see test_capture_outputs_decorator)",
}


def skipped_because(reason: str):
    def test(self):
        pytest.skip(reason)

    return test


@contextlib.contextmanager
def random_output_projections(model_class: type) -> Iterator[None]:
    """New models of `model_class` get small random output projections. Apple zero-initialises them, so that a new
    flow is (nearly) the identity map and its loss has no gradient at all in its transformer layers."""
    original = model_class._init_weights

    def init_weights(self, module):
        original(self, module)
        if hasattr(module, "proj_out") and hasattr(module, "layers"):  # a flow block
            with torch.no_grad():
                module.proj_out.weight.normal_(0.0, 0.02)

    with mock.patch.object(model_class, "_init_weights", init_weights):
        yield


class FlowModelTests(ModelTesterMixin):
    """The mixin's tests as the flows run them (see the module doc)."""

    # The flows' `_init_weights` initialises every weight and buffer; upstream runs this check for recent models only.
    test_can_init_all_missing_weights_before_2023 = True

    def check_flow_hidden_states(self, outputs, inputs: dict) -> None:
        raise NotImplementedError

    def test_hidden_states_output(self):
        """A flow's hidden states are its per-block latents, not transformer activations: replaced by the flow's
        own contract (the family's `check_flow_hidden_states`), asked for by argument and by config."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model_class = self.all_model_classes[0]
        model = model_class(copy.deepcopy(config)).eval()
        with torch.no_grad():
            by_argument = model(**inputs, output_hidden_states=True)
            assert model(**inputs).hidden_states is None
        self.check_flow_hidden_states(by_argument, inputs)
        config.output_hidden_states = True
        model = model_class(config).eval()
        with torch.no_grad():
            self.check_flow_hidden_states(model(**inputs), inputs)

    def test_enable_input_require_grads_with_gradient_checkpointing(self):
        # Upstream compares the input embedding's gradients with and without gradient checkpointing, and skips a
        # model whose loss gives it none, which a new flow's zero output projections do (see
        # `random_output_projections`); with random ones the comparison runs.
        with random_output_projections(self.all_model_classes[0]):
            super().test_enable_input_require_grads_with_gradient_checkpointing()

    def test_model_get_set_embeddings(self):
        """Flows read continuous patches, not tokens: their input embedding is the first block's linear projection
        of a patch to the transformer's width (what PEFT and gradient checkpointing hook), and there are no output
        embeddings."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.all_model_classes[0](config)
        embedding = model.get_input_embeddings()
        assert embedding is model.blocks[0].proj_in
        assert isinstance(embedding, nn.Linear)
        assert embedding.in_features == self.model_tester.patch_dim
        replacement = nn.Linear(embedding.in_features, embedding.out_features)
        model.set_input_embeddings(replacement)
        assert model.get_input_embeddings() is replacement
        assert model.blocks[0].proj_in is replacement
        assert model.get_output_embeddings() is None

    def test_save_and_load_keep_the_log_likelihood(self):
        """What the mixin's save/load tests compare is `outputs[0]` (the loss); the per-image log-likelihood, which
        the pipelines and the bits/dim evaluation read, must round-trip too."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.all_model_classes[0](config).eval()
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded = self.all_model_classes[0].from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).log_likelihood, model(**inputs).log_likelihood)


for _name, _reason in FEATURES_THE_FLOWS_DO_NOT_HAVE.items():
    setattr(FlowModelTests, _name, skipped_because(_reason))


class TarFlowModelTester:
    """A tiny class-conditional TarFlow: 8x8 RGB images in 2x2 patches (16 patches of 12 values), 2 blocks of 1 layer,
    2 heads; 5 classes (the SDPA/eager comparison draws extra labels below 5)."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size, self.num_channels, self.patch_size = 8, 3, 2
        self.hidden_size, self.head_dim, self.num_classes = 32, 16, 5
        self.num_blocks, self.layers_per_block = 2, 1
        self.is_training = True
        self.seq_length = (self.image_size // self.patch_size) ** 2
        self.patch_dim = self.num_channels * self.patch_size**2
        self.num_hidden_layers = self.num_blocks * self.layers_per_block
        self.num_attention_heads = self.hidden_size // self.head_dim

    def config_arguments(self) -> dict:
        return dict(
            image_size=self.image_size,
            num_channels=self.num_channels,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            head_dim=self.head_dim,
            num_blocks=self.num_blocks,
            layers_per_block=self.layers_per_block,
            num_classes=self.num_classes,
        )

    def get_config(self) -> TarFlowConfig:
        return TarFlowConfig(**self.config_arguments())

    def prepare_config_and_inputs_for_common(self) -> tuple[TarFlowConfig, dict]:
        shape = (self.batch_size, self.num_channels, self.image_size, self.image_size)
        pixel_values = torch.rand(shape) * 2 - 1
        class_labels = torch.randint(0, self.num_classes, (self.batch_size,))
        return self.get_config(), {"pixel_values": pixel_values, "class_labels": class_labels}


class StarFlowModelTester:
    """A tiny text-conditional STARFlow: 4x4 latents of 4 channels (16 tokens), a shallow and a deep block of 1 layer
    each, 2 heads, 4 text tokens of width 16."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.sample_size, self.in_channels, self.patch_size = 4, 4, 1
        self.hidden_size, self.head_dim = 64, 32
        self.text_hidden_size, self.text_length = 16, 4
        self.layers_per_block = [1, 1]
        self.is_training = True
        self.seq_length = (self.sample_size // self.patch_size) ** 2
        self.patch_dim = self.in_channels * self.patch_size**2
        self.num_hidden_layers = sum(self.layers_per_block)
        self.num_attention_heads = self.hidden_size // self.head_dim
        # `output_hidden_states` adds two outputs: the per-block latents and the deep block's text states.
        self.num_hidden_states_types = 2

    def config_arguments(self) -> dict:
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            head_dim=self.head_dim,
            layers_per_block=self.layers_per_block,
            text_hidden_size=self.text_hidden_size,
            max_text_length=self.text_length,
        )

    def get_config(self) -> StarFlowConfig:
        return StarFlowConfig(**self.config_arguments())

    def prepare_config_and_inputs_for_common(self) -> tuple[StarFlowConfig, dict]:
        shape = (self.batch_size, self.in_channels, self.sample_size, self.sample_size)
        text = torch.randn(self.batch_size, self.text_length, self.text_hidden_size)
        return self.get_config(), {"pixel_values": torch.randn(shape), "encoder_hidden_states": text}


class TarFlowModelTest(FlowModelTests, unittest.TestCase):
    all_model_classes = (TarFlowModel,)
    additional_model_inputs = ("class_labels",)  # passed with `pixel_values` where the suite builds its own inputs

    def setUp(self):
        self.model_tester = TarFlowModelTester(self)
        arguments = self.model_tester.config_arguments()
        self.config_tester = ConfigTester(self, config_class=TarFlowConfig, has_text_modality=False, **arguments)

    def test_config(self):
        self.config_tester.run_common_tests()

    def check_flow_hidden_states(self, outputs, inputs: dict) -> None:
        """TarFlow: the patch sequence after each block, (batch, patches, patch_dim); the last is the latents."""
        tester = self.model_tester
        hidden_states = outputs.hidden_states
        assert len(hidden_states) == tester.num_blocks
        for hidden in hidden_states:
            assert hidden.shape == (tester.batch_size, tester.seq_length, tester.patch_dim)
        torch.testing.assert_close(hidden_states[-1], outputs.latents, rtol=0, atol=0)
        assert not torch.equal(hidden_states[0], hidden_states[1])


class StarFlowModelTest(FlowModelTests, unittest.TestCase):
    all_model_classes = (StarFlowModel,)
    additional_model_inputs = ("encoder_hidden_states",)

    def setUp(self):
        self.model_tester = StarFlowModelTester(self)
        arguments = self.model_tester.config_arguments()
        self.config_tester = ConfigTester(self, config_class=StarFlowConfig, has_text_modality=False, **arguments)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_retain_grad_hidden_states_attentions(self):
        """Upstream's test with the first block's output for the first hidden state: STARFlow's first hidden state is
        its input itself (Apple's `outputs`), which has no gradient to retain."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.output_hidden_states = True
        model = StarFlowModel._from_config(config, attn_implementation="eager")
        outputs = model(**inputs, output_attentions=True)
        hidden_states, attentions = outputs.hidden_states[1], outputs.attentions[0]
        hidden_states.retain_grad()
        attentions.retain_grad()
        outputs[0].flatten()[0].backward(retain_graph=True)
        assert hidden_states.grad is not None
        assert attentions.grad is not None
        assert not outputs.hidden_states[0].requires_grad

    def check_flow_hidden_states(self, outputs, inputs: dict) -> None:
        """STARFlow: the input's patch grid, then the grid after each block, (batch, h / p, w / p, p * p * channels);
        the first is the input itself, the last the latents."""
        tester = self.model_tester
        hidden_states = outputs.hidden_states
        side = tester.sample_size // tester.patch_size
        assert len(hidden_states) == len(tester.layers_per_block) + 1
        for hidden in hidden_states:
            assert hidden.shape == (tester.batch_size, side, side, tester.patch_dim)
        # patch_size 1: the grid is the latent with its channels last.
        torch.testing.assert_close(hidden_states[0], inputs["pixel_values"].permute(0, 2, 3, 1), rtol=0, atol=0)
        torch.testing.assert_close(hidden_states[-1], outputs.latents.permute(0, 2, 3, 1), rtol=0, atol=0)
        assert outputs.text_hidden_states.shape == (tester.batch_size, tester.text_length, tester.hidden_size)
