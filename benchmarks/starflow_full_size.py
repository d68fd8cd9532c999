"""STARFlow at its released size on a CPU, end to end: Apple's text-to-image layout (3.86B parameters, width 3072,
blocks of 2, 2, 2, 2, 2 and 24 layers, 1024 latent tokens, 128 text tokens of flan-t5-xl, sd-vae-ft-ema) built with
Apple's code, saved as Apple ships it, converted, loaded both ways, sampled with bf16, int8 and int4 weights, and
Apple's float32 decoder timed against ours on the same weights and noise.

    python -m benchmarks.starflow_full_size --ml-starflow /tmp/ml-starflow --workdir /tmp/starflow-full --threads 1 \\
        --json /tmp/starflow_full_size.json        # the released size: 40 GB of files, 20 GB of memory, 2 hours
    python -m benchmarks.starflow_full_size --width 64 --deep-layers 2 --image-size 64    # seconds (the CI test)
    python -m benchmarks.starflow_full_size --ml-starflow /tmp/ml-starflow --workdir /tmp/starflow-full --device cuda

Stages, each child in a process of its own (`benchmarks.stage_memory`: time, peak resident and anonymous memory);
`--stages` picks some, `--keep` keeps the files and results for a later run:

- `checkpoint`: Apple's `transformer_flow.Model` from the released yaml (with `--ml-starflow`; else the same layout
  from our model through `convert_starflow.hf_to_apple_state_dict`), random, the output projections randomised
  (Apple zero-initialises them: every block would be the identity), saved as Apple ships it (its state dict).
- `components`: a T5 encoder of flan-t5-xl's configuration, an AutoencoderKL of sd-vae-ft-ema's (random weights) and
  a word-level tokenizer of T5's vocabulary size, all offline.
- `convert`: `tarflow-hf convert` of the transformer alone (its peak against the file) and of the whole pipeline.
- `load`: `StarFlowPipeline.from_pretrained` of the converted folder and `from_single_file` of the `.pth`.
- `sample`: one image end to end per setting: bf16, int8 or int4 weights (diffusers' `PipelineQuantizationConfig`
  with torchao's int8 or CPU int4 weight-only), the sequential sampler or the fastest parallel setting,
  `JacobiSampler(tolerance=1e-2, sequential_blocks=1)`.
- `deep_tokens`: Apple's float32 `Model.reverse` and ours (float32, bf16, int8) on the deep block's first 64 tokens;
  those named by `--compiled-deep-tokens` also with their steps compiled (the compile timed apart).

Offloading: on a CPU-only machine `enable_model_cpu_offload` cannot lower the peak (both sides are the same memory);
the samplings load the text encoder alone, encode, free it, and only then load the transformer and the VAE.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import torch
from torch import nn

from tarflow_hf.apple_checkpoints import save_apple_state_dict
from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.convert_starflow import RELEASED_YAML, SUPPORTED_FLAGS, VAE_DOWNSAMPLING, apple_settings
from tarflow_hf.convert_starflow import hf_to_apple_state_dict as apple_layout
from tarflow_hf.fileio import write_text_atomic
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.products import is_quantized
from tarflow_hf.samplers import FlowSampler, JacobiSampler, SequentialSampler

from .apple_model import load_ml_starflow
from .stage_memory import GB, Phases, available_gb, in_child, machine, memory_status, timed
from .starflow_deep_tokens import DeepInputs, FirstDeepTokens, apple_deep_tokens, our_deep_tokens
from .timing import report

RELEASED_WIDTH = 3072
RELEASED_YAML_FILE = "configs/starflow_3B_t2i_256x256.yaml"
DEEP_TOKENS = 64  # of the deep block's 1024, timed for Apple's decoder and ours
# Output projections drawn with std OUTPUT_STD / sqrt(width): outputs of std about 0.5, so every block moves its
# tokens by a softly clipped scale and shift (std 0.02 gives 1.1 at width 3072, compounding over six blocks).
OUTPUT_STD = 0.5
SEED = 0
PROMPT = " ".join(f"w{(7919 * i) % 32000 + 100}" for i in range(40))  # 40 stand-in words (padded to 128 tokens)

# google/flan-t5-xl's config.json (T5 v1.1 XL: gated-gelu with gelu_new, relative attention 32 buckets / distance
# 128, untied embeddings; float32 weights). Only the encoder is built.
FLAN_T5_XL = dict(
    vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, dropout_rate=0.1, initializer_factor=1.0,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
# stabilityai/sd-vae-ft-ema's config.json (scaling_factor 0.18215 is diffusers' default, which the file leaves out).
SD_VAE_FT_EMA = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
)  # fmt: skip
# Below the released width the components shrink too (a run in seconds): 2 T5 layers as wide as the flow, a thin VAE.
SMALL_T5 = dict(num_layers=2, num_heads=1, d_ff=160)
SMALL_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)

BFLOAT16, INT8, INT4 = "bf16", "int8", "int4"
SAMPLERS: dict[str, FlowSampler] = {
    "sequential": SequentialSampler(),
    "jacobi": JacobiSampler(tolerance=1e-2, sequential_blocks=1),  # the fastest parallel setting on a CPU
}
SETTINGS = [(weights, sampler) for weights in (BFLOAT16, INT8, INT4) for sampler in SAMPLERS]
STAGES = ("checkpoint", "components", "convert", "load", "sample", "deep_tokens")


# ----------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """What a run builds: the flow's width and deep block, the image size, and the components' configurations."""

    width: int
    deep_layers: int
    image_size: int

    @property
    def description(self) -> str:
        return f"width {self.width}, blocks [2, 2, 2, 2, 2, {self.deep_layers}], {self.image_size}px"

    @property
    def released(self) -> bool:
        return self.width == RELEASED_WIDTH

    def t5(self) -> dict[str, Any]:
        return FLAN_T5_XL if self.released else {**FLAN_T5_XL, **SMALL_T5, "d_model": self.width}

    def vae(self) -> dict[str, Any]:
        return SD_VAE_FT_EMA if self.released else {**SD_VAE_FT_EMA, **SMALL_VAE, "sample_size": self.image_size}

    def yaml_values(self) -> dict[str, Any]:
        return {"img_size": self.image_size, "channels": self.width, "layers_per_block": [2] * 5 + [self.deep_layers]}


class Paths:
    """The files a run writes, all under `root`; nothing else is ever removed."""

    def __init__(self, root: Path):
        self.root = root
        self.yaml = root / "starflow_3B_t2i_256x256.yaml"
        self.checkpoint = root / "starflow_3B_t2i_256x256.pth"
        self.text_encoder = root / "flan-t5-xl-random"  # with the tokenizer, where conversion looks for it
        self.vae = root / "sd-vae-ft-ema-random"
        self.transformer_only = root / "converted-transformer"
        self.pipeline = root / "converted"
        self.outputs = root / "outputs"  # images and latents of the samplings
        self.stage_results = root / "stage_results"  # each stage's results, merged by the report

    def written(self) -> list[Path]:
        return [path for name, path in vars(self).items() if name != "root"]


def released_yaml_text(checkout: Path | None) -> str:
    """Apple's released yaml, as the file reads (with a checkout), else written from the converter's copy of its
    values (`convert_starflow.RELEASED_YAML` and the flags it supports)."""
    if checkout is not None:
        return (Path(checkout) / RELEASED_YAML_FILE).read_text()
    values = {**SUPPORTED_FLAGS, **RELEASED_YAML, "cfg": 2.5}
    values.pop("head_dim")  # Apple's yaml leaves it to the parser's default, 64
    return "arguments:\n" + "".join(f"- {key}: {_yaml_value(value)}\n" for key, value in values.items())


def _yaml_value(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def layout_yaml(text: str, layout: Layout) -> str:
    """Apple's yaml with the layout's sizes in place of the released ones (unchanged at the released size)."""
    for key, value in layout.yaml_values().items():
        text, count = re.subn(rf"(?m)^- {key}: .*$", f"- {key}: {_yaml_value(value)}", text)
        if count != 1:
            raise SystemExit(f"the released yaml has no single '- {key}:' line to set")
    return text


def prepare_child(threads: int | None) -> None:
    """What each stage's child does first: no per-file progress bars (the stages print their own), its threads."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ stages
def random_output_projections(blocks: Any, width: int) -> None:
    """Every block's output projection drawn at random (Apple's are zero, every block the identity)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for block in blocks:
            weight = block.proj_out.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * (OUTPUT_STD / math.sqrt(width)))


def apple_model_arguments(yaml: Path, text_width: int) -> dict[str, Any]:
    """`transformer_flow.Model`'s arguments as Apple's `utils.setup_transformer` passes them from the yaml (read
    over Apple's parser defaults; `sample.py` divides img_size by the VAE's downsampling first)."""
    settings = apple_settings(yaml)
    layers = list(settings.get("layers_per_block"))
    names = ("patch_size", "channels", "rope", "head_dim", "txt_size", "sos", "cond_top_only", "use_softplus",
             "use_final_norm", "soft_clip", "seq_order", "top_block_channels")  # fmt: skip
    return {
        **{name: settings.get(name) for name in names},
        "in_channels": settings.get("channel_size"),
        "img_size": settings.get("img_size") // VAE_DOWNSAMPLING,
        "num_blocks": len(layers),
        "layers_per_block": layers,
        "txt_dim": text_width,
    }


def our_config(yaml: Path, text_width: int) -> StarFlowConfig:
    """Our configuration of the yaml's model (what conversion reads off the weights and the yaml)."""
    apple, settings = apple_model_arguments(yaml, text_width), apple_settings(yaml)
    ours = {"sample_size": "img_size", "hidden_size": "channels", "max_text_length": "txt_size"}
    ours |= {name: name for name in ("in_channels", "patch_size", "head_dim", "layers_per_block")}
    numbers = {name: settings.number(name) for name in ("soft_clip", "noise_std", "latent_norm_regularization")}
    return StarFlowConfig(**{key: apple[name] for key, name in ours.items()}, **numbers, text_hidden_size=text_width)


def make_checkpoint(args: argparse.Namespace, layout: Layout, paths: Paths) -> dict[str, Any]:
    """Apple's model from the yaml, random, saved as Apple ships it (with Apple's code when given, else in Apple's
    key layout from ours)."""
    write_text_atomic(paths.yaml, layout_yaml(released_yaml_text(args.ml_starflow), layout))
    text_width = layout.t5()["d_model"]
    phases = Phases()
    torch.manual_seed(SEED)
    with phases("build"):
        if args.ml_starflow:
            model = load_ml_starflow(args.ml_starflow).Model(**apple_model_arguments(paths.yaml, text_width))
        else:
            model = StarFlowModel(our_config(paths.yaml, text_width))
        random_output_projections(model.blocks, layout.width)
        state = model.state_dict() if args.ml_starflow else apple_layout(model.state_dict(), model.config)
    with phases("save"):
        save_apple_state_dict(state, paths.checkpoint)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return {**phases, "built_with": "apple/ml-starflow" if args.ml_starflow else "ours", "parameters": parameters,
            "file_gb": paths.checkpoint.stat().st_size / GB}  # fmt: skip


def word_tokenizer(vocab_size: int) -> Any:
    """T5-like (as tests/conftest.py's): `<pad>` 0, `</s>` 1 after every text, `<unk>` 2, words `w3` ... with ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_components(layout: Layout, paths: Paths) -> dict[str, Any]:
    """The text encoder (with its tokenizer in its folder, where conversion looks) and the VAE, random, saved as
    the Hub stores them (float32)."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED + 2)
    text_encoder = T5EncoderModel(T5Config(**layout.t5())).eval()
    text_encoder.save_pretrained(paths.text_encoder)
    word_tokenizer(layout.t5()["vocab_size"]).save_pretrained(paths.text_encoder)
    vae = AutoencoderKL(**layout.vae()).eval()
    vae.save_pretrained(paths.vae)
    return {"text_encoder_parameters": text_encoder.num_parameters(), "vae_parameters": vae.num_parameters()}


def convert(paths: Paths, transformer_only: bool) -> dict[str, Any]:
    """`tarflow-hf convert` (the command line's own entry point, in this process)."""
    from tarflow_hf.commands import main as tarflow_hf

    target = paths.transformer_only if transformer_only else paths.pipeline
    options = ["--transformer-only"] if transformer_only else ["--text-encoder", str(paths.text_encoder),
                                                                 "--vae", str(paths.vae)]  # fmt: skip
    if target.exists():  # an earlier run's conversion: the command writes a new folder
        shutil.rmtree(target)
    start = time.perf_counter()
    status = tarflow_hf(["convert", str(paths.checkpoint), str(target), "--config", str(paths.yaml), *options])
    if status:
        raise RuntimeError(f"tarflow-hf convert exited with status {status}")
    return {"seconds": time.perf_counter() - start}


PIPELINE_DTYPES = {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16, "default": torch.float32}


def load(paths: Paths, single_file: bool) -> dict[str, Any]:
    """The whole pipeline (transformer and text encoder in bf16, the VAE in float32), from the converted folder or
    straight from Apple's file."""
    from tarflow_hf import StarFlowPipeline

    start = time.perf_counter()
    if single_file:
        components = {"text_encoder": paths.text_encoder, "tokenizer": paths.text_encoder, "vae": paths.vae}
        pipe = StarFlowPipeline.from_single_file(paths.checkpoint, config=paths.yaml, dtype=PIPELINE_DTYPES,
                                                 **{key: str(value) for key, value in components.items()})  # fmt: skip
    else:
        pipe = StarFlowPipeline.from_pretrained(paths.pipeline, dtype=PIPELINE_DTYPES)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "transformer_dtype": str(pipe.transformer.dtype)}


# ------------------------------------------------------------------------------------------------- sampling
def int4_config(width: int) -> Any:
    """torchao's int4 weight-only quantization for CPUs (ATen's int4 kernel; groups of 128 columns, 32 at a reduced
    width), the 8-wide output projections left in bf16 (the layout cannot hold them)."""
    from torchao.prototype.int4_opaque_tensor import Int4WeightOnlyOpaqueTensorConfig
    from transformers import TorchAoConfig

    from tarflow_hf.products import NARROW_OUTPUT_LAYERS

    config = Int4WeightOnlyOpaqueTensorConfig(group_size=128 if width % 128 == 0 else 32)
    return TorchAoConfig(quant_type=config, modules_to_not_convert=[NARROW_OUTPUT_LAYERS])


def int8_config() -> Any:
    """torchao's int8 weight-only quantization as transformers takes it (run by `layers.FlowLinear` with ATen's
    int8 kernel)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2))


def transformer_options(weights: str, width: int) -> dict[str, Any]:
    """`from_pretrained` options of a pipeline with the transformer's weights in bf16, or int8 or int4 (diffusers'
    `PipelineQuantizationConfig`, bf16 activations: the kernels' fast path), the VAE in float32."""
    options: dict[str, Any] = {"dtype": {"transformer": torch.bfloat16, "default": torch.float32}}
    if weights in (INT8, INT4):
        from diffusers import PipelineQuantizationConfig

        config = int8_config() if weights == INT8 else int4_config(width)
        options["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"transformer": config})
    return options


def prior_noise(layout: Layout, channels: int = 4) -> torch.Tensor:
    grid = layout.image_size // VAE_DOWNSAMPLING
    return torch.randn(1, channels, grid, grid, generator=torch.Generator().manual_seed(SEED + 3))


def encode(paths: Paths, phases: Phases) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's and the empty prompt's embeddings, from a pipeline of the text encoder (bf16) and tokenizer
    alone, freed before the transformer loads. (The components load one by one: the pipeline's `from_pretrained`
    loads the transformer even when given `transformer=None`.)"""
    from transformers import AutoTokenizer, T5EncoderModel

    from tarflow_hf import StarFlowPipeline

    with phases("load_text_encoder"):
        text_encoder = T5EncoderModel.from_pretrained(paths.pipeline / "text_encoder", dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(paths.pipeline / "tokenizer")
        text_only = StarFlowPipeline(transformer=None, text_encoder=text_encoder, tokenizer=tokenizer, vae=None)
        del text_encoder
    with phases("encode"):
        embeds = text_only.encode_prompt(PROMPT)
    del text_only
    return embeds


def sample(layout: Layout, paths: Paths, weights: str, sampler: str, device: str = "cpu") -> dict[str, Any]:
    """One image end to end: encode (text encoder alone), load the transformer and VAE, invert the flow, denoise,
    decode. The per-block times come from the pipeline's step callback, the denoising step's from the model."""
    from tarflow_hf import StarFlowPipeline

    phases = Phases()
    prompt_embeds, negative_embeds = encode(paths, phases)
    with phases("load_transformer"):
        pipe = StarFlowPipeline.from_pretrained(paths.pipeline, text_encoder=None, tokenizer=None,
                                                **transformer_options(weights, layout.width))  # fmt: skip
    pipe = pipe.to(device)
    prompt_embeds, negative_embeds = prompt_embeds.to(device), negative_embeds.to(device)
    pipe.set_progress_bar_config(disable=True)
    block_ends, denoising, flow_latents = [], [], []

    def on_block(pipe: Any, step: int, block_index: int, tensors: dict[str, Any]) -> dict[str, Any]:
        block_ends.append(time.perf_counter())
        print(f"{weights} {sampler}: block {block_index} after {block_ends[-1] - start:.0f} s", flush=True)
        if block_index == 0:
            flow_latents.append(tensors["latents"].clone())
        return {}

    noise = prior_noise(layout).to(device)
    with phases("sample"), timed(pipe.transformer, "denoise", denoising):
        start = time.perf_counter()
        output = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, latents=noise,
                      sampler=SAMPLERS[sampler], callback_on_step_end=on_block)  # fmt: skip
    name = f"{weights}_{sampler}"
    paths.outputs.mkdir(exist_ok=True)
    output.images[0].save(paths.outputs / f"{name}.png")
    torch.save(flow_latents[0], paths.outputs / f"{name}_latents.pt")
    return {
        **phases,
        "seconds_per_image": phases["encode_seconds"] + phases["sample_seconds"],
        "end_to_end_seconds": sum(value for key, value in phases.items() if key.endswith("_seconds")),
        "deep_block_seconds": block_ends[0] - start,
        "shallow_blocks_seconds": block_ends[-1] - block_ends[0],
        "denoise_seconds": sum(denoising),
        "transformer_passes": output.stats.transformer_passes,
        "weights": f"{pipe.transformer.dtype}" + (f" ({weights} weight-only)" if weights != BFLOAT16 else ""),
        "quantized_layers": sum(
            is_quantized(module.weight) for module in pipe.transformer.modules() if isinstance(module, nn.Linear)
        ),
    }


# ---------------------------------------------------------------------------------------------- deep tokens
def apple_from_checkpoint(module: ModuleType, paths: Paths, text_width: int) -> torch.nn.Module:
    """Apple's `Model` with the `.pth`'s tensors, memory-mapped (Apple's loading copies them; this keeps a single
    copy, the file's), built without initialising its weights (never written, so never resident)."""
    no_init = [mock.patch.object(layer, "reset_parameters", lambda self: None) for layer in (nn.Linear, nn.LayerNorm)]
    with no_init[0], no_init[1]:
        apple = module.Model(**apple_model_arguments(paths.yaml, text_width))
    apple.load_state_dict(torch.load(paths.checkpoint, mmap=True, weights_only=True), assign=True)
    return apple.eval()


def touch(module: torch.nn.Module) -> None:
    """Read every plain weight once, so that a memory-mapped model's pages are in memory before it is timed."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if type(tensor) is torch.Tensor:  # not a quantized tensor (those are in memory anyway)
                tensor.float().sum()


def our_models(paths: Paths) -> dict[str, Callable[[], StarFlowModel]]:
    """Our model three ways: float32 straight from Apple's file (memory-mapped), and int8 and bf16 weights from the
    converted folder (the largest last: Apple's weights stay memory-mapped beside each)."""
    folder = dict(pretrained_model_name_or_path=paths.pipeline, subfolder="transformer", dtype=torch.bfloat16)
    return {
        "float32": lambda: StarFlowModel.from_single_file(paths.checkpoint, config=paths.yaml),
        INT8: lambda: StarFlowModel.from_pretrained(**folder, quantization_config=int8_config()),
        BFLOAT16: lambda: StarFlowModel.from_pretrained(**folder),
    }


def deep_tokens(args: argparse.Namespace, layout: Layout, paths: Paths) -> dict[str, Any]:
    """Apple's float32 decoder and ours (float32, bf16, int8) on the deep block's first tokens, same weights, text
    and noise. Each of ours is timed in `args.rounds` rounds with Apple's, back to back, each first in half of
    them; its speed-up is the median of the rounds' ratios (the machine's speed drifts: see `timing`)."""
    module = load_ml_starflow(args.ml_starflow) if args.ml_starflow else None
    apple = None if module is None else apple_from_checkpoint(module, paths, layout.t5()["d_model"]).to(args.device)
    if apple is not None:
        touch(apple.blocks[-1])
    results: dict[str, Any] = {"tokens": args.deep_tokens, "rounds": args.rounds}
    reference, inputs, apple_seconds = None, None, []
    for name, load_ours in our_models(paths).items():
        model = load_ours().eval().to(args.device)
        touch(model.blocks[-1])
        noise = prior_noise(layout, model.config.in_channels)
        words = len(PROMPT.split())
        inputs = inputs or DeepInputs.build(model.config, noise, words, SEED + 4, args.deep_tokens).to(args.device)
        runs = {name: partial(our_deep_tokens, model, inputs)}
        if name in args.compiled_deep_tokens:
            runs[f"{name}_compiled"] = compiled_deep_tokens(model, inputs, args.device, results, name)
        if apple is not None:
            runs["apple"] = partial(apple_deep_tokens, module, apple, inputs)
        tokens, seconds = paired_rounds(runs, args.rounds)
        reference = tokens.get("apple", reference if reference is not None else tokens[name])
        for ours in (run for run in runs if run != "apple"):
            results[f"{ours}_seconds_per_token"] = statistics.median(seconds[ours])
            results[f"{ours}_max_abs_deviation"] = (tokens[ours] - reference).abs().max().item()
            if apple is not None:
                ratios = [slow / fast for fast, slow in zip(seconds[ours], seconds["apple"], strict=True)]
                results[f"{ours}_speedup_over_apple"] = statistics.median(ratios)
        if apple is not None:
            apple_seconds += seconds["apple"]
        del model, runs
        gc.collect()
    results["deviations_from"] = "apple's float32" if apple is not None else "our float32"
    if apple_seconds:
        results["apple_float32_seconds_per_token"] = statistics.median(apple_seconds)
    return results


def compiled_deep_tokens(
    model: StarFlowModel, inputs: DeepInputs, device: str, results: dict[str, Any], name: str
) -> Callable[[], tuple[torch.Tensor, float]]:
    """Our decoder with its steps compiled (a CPU: inductor's kernels, weights frozen in; CUDA: one CUDA graph a
    step), compiled here by a first run whose seconds go into `results`."""
    cpu = torch.device(device).type == "cpu"
    mode = "max-autotune-no-cudagraphs" if cpu else "reduce-overhead"
    sampler = FirstDeepTokens(inputs.tokens, compile_mode=mode, freeze_weights=cpu)
    start = time.perf_counter()
    our_deep_tokens(model, inputs, sampler)
    results[f"{name}_compile_seconds"] = time.perf_counter() - start
    return partial(our_deep_tokens, model, inputs, sampler)


def paired_rounds(
    runs: dict[str, Callable[[], tuple[torch.Tensor, float]]], rounds: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Each run once per round, in reverse order every other round. -> (the tokens of each, from its first round;
    its seconds per token in each round)."""
    tokens: dict[str, torch.Tensor] = {}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for index in range(rounds):
        for name, run in order if index % 2 == 0 else reversed(order):
            result, per_token = run()
            tokens.setdefault(name, result)
            seconds[name].append(per_token)
            print(f"deep tokens, round {index + 1}/{rounds}: {name} {per_token:.3f} s/token", flush=True)
    return tokens, seconds


# ------------------------------------------------------------------------------------------------- the run
def stage_work(args: argparse.Namespace, layout: Layout, paths: Paths) -> dict[str, dict[str, Callable[[], Any]]]:
    """Each stage's children: their names (the results' prefixes) and what each runs."""
    sample_runs = {f"{w}_{s}": (w, s) for w, s in SETTINGS if f"{w}_{s}" in args.settings}
    return {
        "checkpoint": {"checkpoint": lambda: make_checkpoint(args, layout, paths)},
        "components": {"components": lambda: make_components(layout, paths)},
        "convert": {
            "convert_transformer": lambda: convert(paths, transformer_only=True),
            "convert_pipeline": lambda: convert(paths, transformer_only=False),
        },
        "load": {
            "load_pretrained": lambda: load(paths, single_file=False),
            "load_single_file": lambda: load(paths, single_file=True),
        },
        "sample": {
            name: (lambda s=setting: sample(layout, paths, *s, args.device)) for name, setting in sample_runs.items()
        },
        "deep_tokens": {"deep_tokens": lambda: deep_tokens(args, layout, paths)},
    }


def run_stages(args: argparse.Namespace, layout: Layout, paths: Paths) -> None:
    """The chosen stages in order, each child's results written to `paths.stage_results` as it ends."""
    work = stage_work(args, layout, paths)
    paths.stage_results.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        for name, run in work[stage].items():
            print(f"--- {name} (free memory {available_gb():.1f} GB)", flush=True)
            results = in_child(run, partial(prepare_child, args.threads))
            write_text_atomic(paths.stage_results / f"{name}.json", json.dumps(results, indent=2) + "\n")
            print(f"--- {name}: {json.dumps(results)}", flush=True)
        if stage == "convert" and paths.transformer_only.exists():
            shutil.rmtree(paths.transformer_only)  # measured; the pipeline folder is the one the loads read


# ---------------------------------------------------------------------------------------------------- report
def merged(paths: Paths, names: list[str]) -> dict[str, Any]:
    """Every finished child's results (of this run or an earlier one kept with --keep), prefixed by its name."""
    results: dict[str, Any] = {}
    for name in names:
        path = paths.stage_results / f"{name}.json"
        if path.exists():
            results.update({f"{name}_{key}": value for key, value in json.loads(path.read_text()).items()})
    return results


def goal(results: dict[str, Any], value_of: Callable[[dict[str, Any]], float], limit: float, most: bool) -> str:
    """`met` or `missed`, with the value, for a goal of at most (`most`) or at least `limit`; `not measured`
    when a figure it needs is missing."""
    try:
        value = value_of(results)
    except (KeyError, ValueError):
        return "not measured"
    met = value <= limit if most else value >= limit
    return f"{'met' if met else 'missed'} ({value:.3g} {'<=' if most else '>='} {limit:g})"


def goals(results: dict[str, Any]) -> dict[str, str]:
    """Issue 24's goals on this machine, over the settings measured. An image's time counts from the prompt to the
    decoded image, loading included; its memory is the child's own (anonymous) peak: a memory-mapped file's pages
    are the kernel's page cache, which it reclaims."""

    def values(weights: str, key: str, r: dict[str, Any]) -> list[float]:
        found = [r[name] for sampler in SAMPLERS if (name := f"{weights}_{sampler}_{key}") in r]
        if not found:
            raise KeyError(key)
        return found

    def best(weights: str, key: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: min(values(weights, key, r))

    def worst(weights: str, key: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: max(values(weights, key, r))

    return {
        "goal_conversion_peak_vs_file": goal(
            results, lambda r: r["convert_transformer_peak_gb"] / r["checkpoint_file_gb"], 1.15, most=True
        ),
        "goal_bf16_sampling_peak_gb": goal(results, worst(BFLOAT16, "anon_peak_gb"), 12, most=True),
        "goal_int8_sampling_peak_gb": goal(results, worst(INT8, "anon_peak_gb"), 8, most=True),
        "goal_bf16_deep_token_speedup": goal(results, lambda r: r["deep_tokens_bf16_speedup_over_apple"], 2, False),
        "goal_int8_deep_token_speedup": goal(results, lambda r: r["deep_tokens_int8_speedup_over_apple"], 3, False),
        "goal_bf16_image_minutes": goal(results, lambda r: best(BFLOAT16, "end_to_end_seconds")(r) / 60, 6, True),
        "goal_int8_image_minutes": goal(results, lambda r: best(INT8, "end_to_end_seconds")(r) / 60, 4, True),
    }


def summary(args: argparse.Namespace, layout: Layout, paths: Paths, parent_rss: float) -> dict[str, Any]:
    names = [name for stage in stage_work(args, layout, paths).values() for name in stage]
    results = {
        "layout": layout.description,
        "machine": machine(),
        "threads": args.threads or torch.get_num_threads(),
        "parent_rss_gb": parent_rss,
        **merged(paths, names),
    }
    return {**results, **goals(results)}


# ------------------------------------------------------------------------------------------------- command
def check_layout(paths: Paths, layout: Layout) -> None:
    """A kept work folder serves later runs of the same layout only (its files are that layout's)."""
    record = paths.stage_results / "layout.json"
    if record.exists() and json.loads(record.read_text()) != vars(layout):
        raise SystemExit(f"{paths.root} holds a run of {record.read_text().strip()}; use another --workdir")
    paths.stage_results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(vars(layout)) + "\n")


def remove_files(paths: Paths, made_root: bool) -> None:
    """What this benchmark wrote (and the folder, when it made it); nothing else."""
    for path in paths.written():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if made_root:
        with contextlib.suppress(OSError):
            paths.root.rmdir()


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml-starflow", type=Path, help="checkout of apple/ml-starflow (its code builds the model)")
    parser.add_argument("--width", type=int, default=RELEASED_WIDTH, help="the flow's width (released: 3072)")
    parser.add_argument("--deep-layers", type=int, default=24, help="layers of the deep block (released: 24)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (released: 256)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    names = [f"{weights}_{sampler}" for weights, sampler in SETTINGS]
    parser.add_argument("--settings", default=",".join(names), help=f"the samplings, of {', '.join(names)}")
    parser.add_argument("--deep-tokens", type=int, default=DEEP_TOKENS, help="deep-block tokens timed (issue: 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the deep-token timings (even: fair)")
    parser.add_argument("--compiled-deep-tokens", default="", help="also time these of float32,bf16,int8 compiled")
    parser.add_argument("--threads", type=int, help="torch threads of every stage (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the samplings and deep tokens run (e.g. cuda)")
    parser.add_argument("--workdir", type=Path, help="where the files go (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the files (and results) for a later --stages run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    for stage in args.stages:
        if stage not in STAGES:
            parser.error(f"--stages: {stage!r} is not a stage; the stages are {', '.join(STAGES)}")
    args.settings = [setting.strip() for setting in args.settings.split(",") if setting.strip()]
    args.compiled_deep_tokens = [name.strip() for name in args.compiled_deep_tokens.split(",") if name.strip()]
    if unknown := set(args.compiled_deep_tokens) - {"float32", BFLOAT16, INT8}:
        parser.error(f"--compiled-deep-tokens: {', '.join(sorted(unknown))} not among float32, bf16, int8")
    if unknown := set(args.settings) - set(names):
        parser.error(f"--settings: {', '.join(sorted(unknown))} not among {', '.join(names)}")
    checks = {"--width": (args.width, 64), "--image-size": (args.image_size, VAE_DOWNSAMPLING),
              "--deep-layers": (args.deep_layers, 1), "--rounds": (args.rounds, 1)}  # fmt: skip
    for flag, (value, step) in checks.items():
        if value < step or value % step:
            parser.error(f"{flag} must be a positive multiple of {step}, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    layout = Layout(args.width, args.deep_layers, args.image_size)
    made_root = args.workdir is None or not args.workdir.exists()
    root = Path(tempfile.mkdtemp(prefix="starflow-full-size-")) if args.workdir is None else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    paths = Paths(root)
    try:
        check_layout(paths, layout)
        parent_rss = memory_status()["VmRSS"]
        run_stages(args, layout, paths)
        results = summary(args, layout, paths, parent_rss)
    finally:
        if not args.keep:
            remove_files(paths, made_root)
    return report(results, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
