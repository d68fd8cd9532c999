"""from_single_file: Apple's `.pth` straight into both families' pipelines and models, the same tensors as
`tarflow-hf convert` followed by `from_pretrained`, memory-mapped (no float32 copy of the state when loading in
bfloat16), with every check the conversion makes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, tiny_vae, word_tokenizer
from test_convert_starflow import local_components

from tarflow_hf import (
    JacobiSampler,
    SequentialSampler,
    StarFlowModel,
    StarFlowPipeline,
    TarFlowModel,
    TarFlowPipeline,
    commands,
)
from tarflow_hf.registry import STARFLOW_TEXT_ENCODER, STARFLOW_VAE

STARFLOW_FIXTURES = FIXTURES / "starflow"
SF_PTH, SF_YAML = STARFLOW_FIXTURES / "sf_t2i.pth", STARFLOW_FIXTURES / "sf_t2i.yaml"
# What the TarFlow fixtures need besides their weights (their file names do not follow Apple's pattern).
TARFLOW_OPTIONS = {"tiny_cond": {"noise_std": 0.1}, "tiny_uncond": {"noise_std": 0.1, "num_channels": 1}}
TARFLOW_FLAGS = {"tiny_cond": ["--noise-std", "0.1"], "tiny_uncond": ["--noise-std", "0.1", "--in-channels", "1"]}
# Config fields that say where a model was loaded from and what `save_pretrained` wrote beside it, not what it is.
PROVENANCE = {"_name_or_path", "architectures", "auto_map"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Every fixture converted by the command line into a pipeline folder; the STARFlow components' folders."""
    root = tmp_path_factory.mktemp("converted")
    for name, flags in TARFLOW_FLAGS.items():
        assert commands.main(["convert", str(FIXTURES / f"{name}.pth"), str(root / name), *flags]) == 0
    t5, vae = local_components(root)
    arguments = ["--config", str(SF_YAML), "--text-encoder", str(t5), "--vae", str(vae)]
    assert commands.main(["convert", str(SF_PTH), str(root / "sf_t2i"), *arguments]) == 0
    return {"tiny_cond": root / "tiny_cond", "tiny_uncond": root / "tiny_uncond", "sf_t2i": root / "sf_t2i",
            "t5": t5, "vae": vae}  # fmt: skip


def assert_same_tensors(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    """The same keys in the same order, each tensor of the same dtype and shape and bit for bit equal."""
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert list(actual_state) == list(expected_state)
    for key, tensor in expected_state.items():
        assert actual_state[key].dtype == tensor.dtype, key
        assert torch.equal(actual_state[key], tensor), key


def config_fields(module: Any) -> dict[str, Any]:
    config = module.config
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: value for key, value in fields.items() if key not in PROVENANCE}


def rehomed(pipeline: Any) -> Any:
    """`pipeline` with its transformer's tensors copied into freshly allocated memory. `from_pretrained` leaves them
    in the safetensors file's memory map at offsets that are not 64-byte aligned, and CPU matrix kernels (MKL) round
    differently on unaligned data, so sampling with the very same tensors can differ in the last bit; the `.pth`
    mapping (and any allocation) is aligned."""
    transformer = pipeline.transformer
    transformer.load_state_dict({key: value.clone() for key, value in transformer.state_dict().items()}, assign=True)
    return pipeline


def images(pipeline: Any, **inputs: Any) -> torch.Tensor:
    return pipeline(**inputs, generator=torch.manual_seed(0), output_type="pt").images


# ----------------------------------------------------------------------------------- identical to a conversion
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("name", list(TARFLOW_OPTIONS))
def test_tarflow_pipeline_is_the_converted_pipeline(converted, name, dtype):
    options = {} if dtype is None else {"dtype": dtype}
    expected = TarFlowPipeline.from_pretrained(converted[name], **options)
    pipe = TarFlowPipeline.from_single_file(FIXTURES / f"{name}.pth", **TARFLOW_OPTIONS[name], **options)
    assert_same_tensors(expected.transformer, pipe.transformer)
    assert pipe.transformer.dtype == (dtype or torch.float32)
    assert config_fields(pipe.transformer) == config_fields(expected.transformer)
    assert {**pipe.config, "_name_or_path": None} == {**expected.config, "_name_or_path": None}
    assert pipe.sampler == expected.sampler and not pipe.transformer.training
    labels = [1, 2] if pipe.transformer.config.num_classes else None
    assert torch.equal(images(pipe, class_labels=labels), images(rehomed(expected), class_labels=labels))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_tarflow_model_is_the_converted_model(converted, dtype):
    options = {} if dtype is None else {"dtype": dtype}
    expected = TarFlowModel.from_pretrained(converted["tiny_uncond"] / "transformer", **options)
    model = TarFlowModel.from_single_file(FIXTURES / "tiny_uncond.pth", **TARFLOW_OPTIONS["tiny_uncond"], **options)
    assert_same_tensors(expected, model)
    assert config_fields(model) == config_fields(expected)
    assert model.config.dtype == expected.config.dtype == (dtype or torch.float32)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_starflow_pipeline_is_the_converted_pipeline(converted, dtype):
    options = {} if dtype is None else {"dtype": dtype}
    expected = StarFlowPipeline.from_pretrained(converted["sf_t2i"], **options)
    pipe = StarFlowPipeline.from_single_file(
        SF_PTH, config=SF_YAML, text_encoder=converted["t5"], vae=str(converted["vae"]), **options
    )
    for component in ("transformer", "text_encoder", "vae"):
        assert_same_tensors(getattr(expected, component), getattr(pipe, component))
        assert config_fields(getattr(pipe, component)) == config_fields(getattr(expected, component)), component
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == (dtype or torch.float32)
    texts = ["w3 w5 w7", "w9 unknown w11"]
    assert pipe.tokenizer(texts).input_ids == expected.tokenizer(texts).input_ids
    assert pipe.sampler == expected.sampler
    assert torch.equal(images(pipe, prompt="w3 w4"), images(rehomed(expected), prompt="w3 w4"))


def test_starflow_model_is_the_converted_model(converted):
    expected = StarFlowModel.from_pretrained(converted["sf_t2i"] / "transformer")
    model = StarFlowModel.from_single_file(SF_PTH, config=SF_YAML)
    assert_same_tensors(expected, model)
    assert config_fields(model) == config_fields(expected)


def test_a_single_file_pipeline_saves_as_a_converted_folder_without_this_module(tmp_path, converted):
    """Saved, it reloads with the same tensors; the folder's code does not include `single_file.py` (the classes
    reach it by name, so folders loaded without tarflow-hf do not need it)."""
    pipe = TarFlowPipeline.from_single_file(FIXTURES / "tiny_cond.pth", noise_std=0.1)
    pipe.save_pretrained(tmp_path / "saved")
    assert_same_tensors(pipe.transformer, TarFlowPipeline.from_pretrained(tmp_path / "saved").transformer)
    assert not list((tmp_path / "saved").rglob("single_file.py"))
    assert (tmp_path / "saved" / "transformer" / "modeling_tarflow.py").is_file()


# --------------------------------------------------------------------------------------- keyword arguments
def test_sampler_and_device_as_from_pretrained_takes_them():
    pipe = TarFlowPipeline.from_single_file(
        FIXTURES / "tiny_cond.pth", noise_std=0.1, sampler="jacobi:tolerance=0.001", device="cpu"
    )
    assert pipe.sampler == JacobiSampler(tolerance=1e-3) and pipe.device == torch.device("cpu")
    pipe = TarFlowPipeline.from_single_file(FIXTURES / "tiny_cond.pth", noise_std=0.1, sampler=SequentialSampler())
    assert pipe.sampler == SequentialSampler()


def test_dtype_by_component_and_torch_dtype(converted):
    pipe = StarFlowPipeline.from_single_file(
        SF_PTH, config=SF_YAML, text_encoder=converted["t5"], vae=converted["vae"],
        torch_dtype={"transformer": torch.bfloat16, "default": torch.float16},
    )  # fmt: skip
    assert (pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (
        torch.bfloat16,
        torch.float16,
        torch.float16,
    )
    model = TarFlowModel.from_single_file(FIXTURES / "tiny_cond.pth", noise_std=0.1, dtype="bfloat16")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_components_given_as_objects_are_used_as_they_are():
    """Diffusers' convention: a component passed in is neither loaded, nor cast, nor copied."""
    from transformers import T5EncoderModel

    text_encoder, tokenizer, vae = (
        T5EncoderModel.from_pretrained(STARFLOW_FIXTURES / "t5_tiny"),
        word_tokenizer(),
        tiny_vae(64),
    )
    pipe = StarFlowPipeline.from_single_file(
        SF_PTH, config=SF_YAML, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, dtype=torch.bfloat16
    )
    assert pipe.text_encoder is text_encoder and pipe.tokenizer is tokenizer and pipe.vae is vae
    assert text_encoder.dtype == vae.dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16


def record_loads(monkeypatch) -> list[tuple[str, str, dict[str, Any]]]:
    """Replace the three component loaders by recorders that return the fixtures' components (no Hub)."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    loads: list[tuple[str, str, dict[str, Any]]] = []
    text_encoder = T5EncoderModel.from_pretrained(STARFLOW_FIXTURES / "t5_tiny")
    for owner, component, value in (
        (T5EncoderModel, "text_encoder", text_encoder),
        (AutoTokenizer, "tokenizer", word_tokenizer()),
        (AutoencoderKL, "vae", tiny_vae(64)),
    ):

        def load(name, _component=component, _value=value, **options):
            loads.append((_component, str(name), options))
            return _value

        monkeypatch.setattr(owner, "from_pretrained", load)
    return loads


@pytest.mark.parametrize("yaml", [SF_YAML, None])
def test_components_default_to_the_yaml_then_the_registry(monkeypatch, yaml):
    """As `tarflow-hf convert`: the yaml's `text` and `vae` (the fixture's name `t5_tiny`), else Apple's released
    choices; the tokenizer comes from the text encoder's name; dtype and Hub options go to every load."""
    loads = record_loads(monkeypatch)
    StarFlowPipeline.from_single_file(SF_PTH, config=yaml, dtype=torch.bfloat16, local_files_only=True)
    text, vae = ("t5_tiny", "stabilityai/sd-vae-ft-ema") if yaml else (STARFLOW_TEXT_ENCODER, STARFLOW_VAE)
    assert [(component, name) for component, name, _ in loads] == [
        ("text_encoder", text),
        ("tokenizer", text),
        ("vae", vae),
    ]
    options = {component: found for component, _, found in loads}
    assert options["text_encoder"] == options["vae"] == {"local_files_only": True, "dtype": torch.bfloat16}
    assert options["tokenizer"] == {"local_files_only": True}


def test_a_loaded_text_encoder_names_the_tokenizer(monkeypatch):
    loads = record_loads(monkeypatch)
    from transformers import T5EncoderModel

    text_encoder = T5EncoderModel(T5EncoderModel.config_class(vocab_size=100, d_model=32, num_layers=1))
    text_encoder.name_or_path = "someone/t5-variant"
    StarFlowPipeline.from_single_file(SF_PTH, config=SF_YAML, text_encoder=text_encoder, vae="my/vae")
    assert [(component, name) for component, name, _ in loads] == [
        ("tokenizer", "someone/t5-variant"),
        ("vae", "my/vae"),
    ]
    loads.clear()
    StarFlowPipeline.from_single_file(SF_PTH, config=SF_YAML, text_encoder="my/t5", tokenizer="my/tokenizer")
    assert [name for _, name, _ in loads] == ["my/t5", "my/tokenizer", "stabilityai/sd-vae-ft-ema"]


# ------------------------------------------------------------------------------------------------- memory
def peak_heap_bytes(load: Callable[[], Any]) -> tuple[Any, int]:
    """`load()` and the most bytes its CPU tensors held at once on the heap while it ran, from the profiler's
    allocation events (each with its pointer and size). A memory-mapped file's pages are not on the heap: the
    profiler reports the mapping with a running total of 0, as no allocator holds it, and it is left out here."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = load()
    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields))
    held, peak, live = 0, 0, {}
    for _, event in sorted(events, key=lambda item: item[0]):
        if event.alloc_size > 0 and event.total_allocated > 0:
            live[event.ptr] = event.alloc_size
            held += event.alloc_size
            peak = max(peak, held)
        elif event.alloc_size < 0 and event.ptr in live:
            held -= live.pop(event.ptr)
    return result, peak


def file_bytes(path: Path) -> tuple[int, int]:
    """(all the tensors' bytes, the largest tensor's bytes) of a `.pth`."""
    sizes = [tensor.numel() * tensor.element_size() for tensor in torch.load(path, weights_only=True).values()]
    return sum(sizes), max(sizes)


@pytest.mark.parametrize(
    ("model_class", "path", "options"),
    [
        (TarFlowModel, FIXTURES / "tiny_cond.pth", {"noise_std": 0.1}),
        (StarFlowModel, SF_PTH, {"config": SF_YAML}),
    ],
    ids=["tarflow", "starflow"],
)
def test_bfloat16_loading_never_holds_a_float32_copy(model_class, path, options):
    """Measured: the heap's peak while loading a float32 file as bfloat16 is the bfloat16 model plus at most two
    tensors' worth of checking temporaries (`isfinite`, a causal mask compared), below the float32 state alone; in
    the file's dtype no weight is copied (they stay in the file's map): the heap holds checking temporaries only."""
    total, largest = file_bytes(path)
    model, peak = peak_heap_bytes(lambda: model_class.from_single_file(path, dtype=torch.bfloat16, **options))
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.bfloat16}
    model_bytes = sum(tensor.numel() * 2 for tensor in model.state_dict().values())
    assert model_bytes <= peak <= model_bytes + 2 * largest < total
    _, peak = peak_heap_bytes(lambda: model_class.from_single_file(path, **options))
    assert peak < total / 4
    # The measure sees a whole-state float32 copy when one is made.
    state = model_class.from_single_file(path, **options).state_dict()
    _, copied = peak_heap_bytes(lambda: {key: value.float().clone() for key, value in state.items()})
    assert copied >= sum(tensor.numel() * 4 for tensor in state.values())


def test_a_bfloat16_file_loads_in_place_and_is_never_upcast(tmp_path):
    """A bfloat16 `.pth` loaded as bfloat16 is not copied (no detour through float32: the heap holds checking
    temporaries only); a pipeline, float32 by default as `from_pretrained`, makes its float32 copy."""
    bf16 = tmp_path / "tiny_bf16.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in torch.load(FIXTURES / "tiny_cond.pth").items()}, bf16)
    total, _ = file_bytes(bf16)
    model, peak = peak_heap_bytes(lambda: TarFlowModel.from_single_file(bf16, noise_std=0.1, dtype=torch.bfloat16))
    assert model.dtype == torch.bfloat16 and peak < total / 4  # a float32 detour would take twice the file
    pipe, peak = peak_heap_bytes(lambda: TarFlowPipeline.from_single_file(bf16, noise_std=0.1))
    assert pipe.transformer.dtype == torch.float32 and peak >= sum(p.numel() * 4 for p in pipe.transformer.parameters())


# ------------------------------------------------------------------------------------------------- errors
def error_of(call: Callable[[], Any], kind: type[Exception] = ValueError) -> str:
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def damaged(tmp_path: Path, how: str) -> Path:
    path = tmp_path / f"{how}.pth"
    if how == "truncated":
        path.write_bytes((FIXTURES / "tiny_cond.pth").read_bytes()[:5000])
    else:
        state = torch.load(FIXTURES / "tiny_cond.pth", weights_only=True)
        state["blocks.0.proj_in.weight"][0, 0] = float("nan")
        torch.save(state, path)
    return path


def test_the_conversions_checks_apply(tmp_path):
    tarflow = {"noise_std": 0.1}
    assert "truncated" in error_of(lambda: TarFlowPipeline.from_single_file(damaged(tmp_path, "truncated"), **tarflow))
    assert "NaN" in error_of(lambda: TarFlowModel.from_single_file(damaged(tmp_path, "nan"), **tarflow))
    assert "not found" in error_of(lambda: TarFlowModel.from_single_file(tmp_path / "no.pth"), FileNotFoundError)
    assert "training noise is unknown" in error_of(lambda: TarFlowModel.from_single_file(FIXTURES / "tiny_cond.pth"))
    # The yaml against the weights: sf_variant's yaml describes another architecture.
    message = error_of(lambda: StarFlowModel.from_single_file(SF_PTH, config=STARFLOW_FIXTURES / "sf_variant.yaml"))
    assert "sf_variant.yaml" in message


def test_the_other_familys_checkpoint_or_a_folder_is_named(converted):
    message = error_of(lambda: StarFlowPipeline.from_single_file(FIXTURES / "tiny_cond.pth"))
    assert "apple/ml-tarflow" in message and "TarFlowPipeline.from_single_file" in message
    message = error_of(lambda: TarFlowModel.from_single_file(SF_PTH))
    assert "apple/ml-starflow" in message and "StarFlowModel.from_single_file" in message
    message = error_of(lambda: TarFlowPipeline.from_single_file(converted["tiny_cond"]))
    assert "is a folder" in message and "TarFlowPipeline.from_pretrained" in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"text_encoder": "t5"}, "unexpected arguments ['text_encoder']"),
        ({"dtype": torch.int8}, "dtype must be a floating-point torch dtype"),
        ({"dtype": "fp32"}, "got 'fp32'"),
        ({"dtype": torch.float16, "torch_dtype": torch.float16}, "not both"),
        ({"device": "auto"}, "device must name one device"),
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"config": "config.json"}, "config must be a TarFlowConfig"),
    ],
)
def test_bad_keyword_arguments_are_one_line(options, expected):
    assert expected in error_of(lambda: TarFlowPipeline.from_single_file(FIXTURES / "tiny_cond.pth", **options))


def test_bad_components_are_one_line(tmp_path):
    message = error_of(lambda: StarFlowPipeline.from_single_file(SF_PTH, config=SF_YAML, vae=3))
    assert message == "vae must be a Hub id, a folder or a loaded Module, got int"
    missing = tmp_path / "no_t5"
    message = error_of(lambda: StarFlowPipeline.from_single_file(SF_PTH, config=SF_YAML, text_encoder=missing))
    assert message.startswith(f"could not load the text encoder '{missing}'") and "pass text_encoder=" in message
