"""apple/ml-tarflow checkpoint conversion: parity with Apple's outputs, exact round trips, config inference for
every published configuration, and the error of every bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, load_reference, random_model, tiny_config

from tarflow_hf import TarFlowModel, commands
from tarflow_hf import convert as convert_module
from tarflow_hf.convert import (
    hf_to_apple_state_dict,
    infer_config,
    load_ml_tarflow_checkpoint,
    model_from_apple_state_dict,
    parse_checkpoint_name,
)
from tarflow_hf.guidance import tarflow_guidance_from_apple
from tarflow_hf.labels import disambiguate, load_label_file, load_label_set, resolve_labels
from tarflow_hf.pipeline_tarflow import TarFlowPipeline
from tarflow_hf.registry import is_flow_folder

REPO = Path(__file__).resolve().parent.parent
# The fixtures' conversion flags: their file names do not follow Apple's pattern, and tiny_uncond is grayscale.
FIXTURE_FLAGS = {"tiny_cond": ["--noise-std", "0.1"], "tiny_uncond": ["--noise-std", "0.1", "--in-channels", "1"]}


def apple_layout(
    in_channels: int,
    img_size: int,
    patch_size: int,
    channels: int,
    num_blocks: int,
    layers_per_block: int,
    nvp: bool = True,
    num_classes: int = 0,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `transformer_flow.Model(...).state_dict()`, written out from Apple's module structure
    (independently of the converter's key map), in Apple's order."""
    num_patches, patch_dim, width = (img_size // patch_size) ** 2, in_channels * patch_size**2, channels
    layout = {"var": (num_patches, patch_dim)}
    for i in range(num_blocks):
        block = f"blocks.{i}."
        layout[block + "pos_embed"] = (num_patches, width)
        if num_classes:
            layout[block + "class_embed"] = (num_classes, 1, width)
        layout[block + "attn_mask"] = (num_patches, num_patches)
        layout[block + "proj_in.weight"] = (width, patch_dim)
        layout[block + "proj_in.bias"] = (width,)
        for j in range(layers_per_block):
            for name, shape in (
                ("attention.norm.weight", (width,)),
                ("attention.norm.bias", (width,)),
                ("attention.qkv.weight", (3 * width, width)),
                ("attention.qkv.bias", (3 * width,)),
                ("attention.proj.weight", (width, width)),
                ("attention.proj.bias", (width,)),
                ("mlp.norm.weight", (width,)),
                ("mlp.norm.bias", (width,)),
                ("mlp.main.0.weight", (4 * width, width)),
                ("mlp.main.0.bias", (4 * width,)),
                ("mlp.main.2.weight", (width, 4 * width)),
                ("mlp.main.2.bias", (width,)),
            ):
                layout[f"{block}attn_blocks.{j}.{name}"] = shape
        out = 2 * patch_dim if nvp else patch_dim
        layout[block + "proj_out.weight"] = (out, width)
        layout[block + "proj_out.bias"] = (out,)
    return layout


def meta_state(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in layout.items()}


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in layout.items()}
    for key in state:
        if key.endswith(".attn_mask"):
            state[key] = torch.ones(layout[key]).tril()
    state["var"] = torch.ones(layout["var"])
    return state


def convert(*args: str | os.PathLike) -> int:
    return commands.main(["convert", *map(str, args)])


def convert_error(capsys, *args: str | os.PathLike) -> str:
    """Run a conversion that must fail as a user error; return its one-line message."""
    capsys.readouterr()  # drop earlier output (progress bars of successful conversions)
    assert convert(*args) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("tarflow-hf convert: error: ") and "\n" not in message
    return message


def assert_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Both reference checkpoints converted by the command line, as pipeline folders."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for name, flags in FIXTURE_FLAGS.items():
        assert convert(FIXTURES / f"{name}.pth", root / name, *flags) == 0
        folders[name] = root / name
    return folders


# ------------------------------------------------------------------------------------------ parity with Apple
@pytest.mark.parametrize(("name", "loader"), [("tiny_cond", "pipeline"), ("tiny_uncond", "model")])
def test_converted_folder_reproduces_apple_outputs(converted, name, loader):
    meta, _, expected = load_reference(name)
    folder = converted[name]
    if loader == "pipeline":
        model = TarFlowPipeline.from_pretrained(folder).transformer
    else:
        model = TarFlowModel.from_pretrained(folder, subfolder="transformer")
    model.eval()
    tolerance = {"atol": 1e-5, "rtol": 0.0}

    with torch.no_grad():
        out = model(expected["x"], expected.get("y"), output_hidden_states=True)
    num_dims = expected["z"].shape[1] * expected["z"].shape[2]
    torch.testing.assert_close(out.latents, expected["z"], **tolerance)
    torch.testing.assert_close(out.logdet / num_dims, expected["logdets"], **tolerance)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], **tolerance)
    blocks = sorted(key for key in expected if key.startswith("block_output_"))
    assert len(blocks) == model.config.num_blocks == len(out.hidden_states)
    for i in range(len(blocks)):
        torch.testing.assert_close(out.hidden_states[i], expected[f"block_output_{i}"], **tolerance)

    for i, kwargs in enumerate(meta["sample_kwargs"]):
        sample = model.inverse(
            expected["noise"],
            expected.get("y_sample"),
            **tarflow_guidance_from_apple(kwargs),
        )
        torch.testing.assert_close(sample, expected[f"sample_{i}"], **tolerance)


def test_pipeline_and_model_loaders_give_the_same_weights(converted):
    from_pipeline = TarFlowPipeline.from_pretrained(converted["tiny_cond"]).transformer
    from_model = TarFlowModel.from_pretrained(converted["tiny_cond"], subfolder="transformer")
    assert from_pipeline.config.to_dict() == from_model.config.to_dict()
    assert_identical(from_model.state_dict(), from_pipeline.state_dict())
    apple = load_pth(FIXTURES / "tiny_cond.pth")
    assert_identical(apple, hf_to_apple_state_dict(from_model.state_dict()))


def test_converted_config(converted):
    config = TarFlowModel.from_pretrained(converted["tiny_cond"], subfolder="transformer").config
    apple = json.loads((FIXTURES / "tiny_cond.json").read_text())["config"]
    assert (config.image_size, config.num_channels, config.patch_size) == (
        apple["img_size"],
        apple["in_channels"],
        apple["patch_size"],
    )
    assert (config.hidden_size, config.num_blocks, config.layers_per_block) == (
        apple["channels"],
        apple["num_blocks"],
        apple["layers_per_block"],
    )
    assert (config.nvp, config.num_classes, config.noise_std, config.head_dim, config.mlp_ratio) == (
        apple["nvp"],
        apple["num_classes"],
        0.1,
        64,
        4,
    )
    saved = sorted(path.name for path in (converted["tiny_cond"] / "transformer").iterdir())
    assert "model.safetensors" in saved and not [name for name in saved if name.endswith((".bin", ".pth"))]


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["tiny_cond", "tiny_uncond"])
def test_pth_folder_pth_is_identical(converted, tmp_path, name):
    original = load_pth(FIXTURES / f"{name}.pth")
    assert convert("--reverse", converted[name], tmp_path / "from_pipeline.pth") == 0
    assert_identical(original, load_pth(tmp_path / "from_pipeline.pth"))
    # A model folder (the pipeline's transformer/) works as well.
    assert convert("--reverse", converted[name] / "transformer", tmp_path / "from_model.pth") == 0
    assert_identical(original, load_pth(tmp_path / "from_model.pth"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["from_model.pth", "from_pipeline.pth"]


def test_round_trip_keeps_dtype_and_non_nvp_layout(tmp_path):
    """A bfloat16, shift-only (nvp=False) model with a learned prior variance survives .pth -> folder -> .pth."""
    model = random_model(tiny_config(hidden_size=64, head_dim=64, nvp=False, num_classes=2), seed=3)
    with torch.no_grad():
        model.prior_variance.uniform_(0.5, 1.5)
    apple = hf_to_apple_state_dict(model.to(torch.bfloat16).state_dict())
    torch.save(apple, tmp_path / "vp.pth")
    assert convert(tmp_path / "vp.pth", tmp_path / "folder", "--noise-std", "0.05", "--in-channels", "1") == 0
    reloaded = TarFlowModel.from_pretrained(tmp_path / "folder", subfolder="transformer", dtype="auto")
    assert reloaded.config.nvp is False and reloaded.dtype == torch.bfloat16
    assert convert("--reverse", tmp_path / "folder", tmp_path / "back.pth") == 0
    assert_identical(load_pth(tmp_path / "vp.pth"), load_pth(tmp_path / "back.pth"))


def test_legacy_torch_save_format_converts(tmp_path):
    """Files in the pre-zip format cannot be memory-mapped; they still load (safely)."""
    state = load_pth(FIXTURES / "tiny_uncond.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert convert(tmp_path / "legacy.pth", tmp_path / "out", *FIXTURE_FLAGS["tiny_uncond"]) == 0
    assert convert("--reverse", tmp_path / "out", tmp_path / "back.pth") == 0
    assert_identical(state, load_pth(tmp_path / "back.pth"))


def test_full_width_afhq_shaped_checkpoint_end_to_end(tmp_path):
    """AFHQ 256's real patch grid, width and classes (one block of one layer to stay cheap): inferred from the
    file name, memory-mapped without a copy, and written back identically."""
    path = tmp_path / "afhq_model_8_768_1_1_0.07.pth"
    layout = apple_layout(3, 256, 8, 768, 1, 1, num_classes=3)
    torch.save(random_state(layout), path)

    model = load_ml_tarflow_checkpoint(path)
    config = model.config
    assert (config.image_size, config.patch_size, config.hidden_size, config.noise_std) == (256, 8, 768, 0.07)
    assert config.id2label == {0: "cat", 1: "dog", 2: "wild"} and config.label2id["wild"] == 2
    # Zero copy: every weight lives inside the memory-mapped checkpoint file.
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            mapped.append((low, high))
    assert mapped
    for key, tensor in model.state_dict().items():
        assert any(low <= tensor.data_ptr() < high for low, high in mapped), key
    del model

    assert convert(path, tmp_path / "folder") == 0
    assert convert("--reverse", tmp_path / "folder", tmp_path / "back.pth") == 0
    assert_identical(load_pth(path), load_pth(tmp_path / "back.pth"))


# -------------------------------------------------------------------------------------- config inference
def test_apple_layout_matches_apples_checkpoints():
    for name in ("tiny_cond", "tiny_uncond"):
        apple = json.loads((FIXTURES / f"{name}.json").read_text())["config"]
        state = load_pth(FIXTURES / f"{name}.pth")
        assert {key: tuple(tensor.shape) for key, tensor in state.items()} == apple_layout(**apple)
        assert list(state) == list(apple_layout(**apple))


PUBLISHED = [
    # file name, apple_layout arguments, expected config fields, expected label check
    (
        "afhq_model_8_768_8_8_0.07.pth",
        dict(in_channels=3, img_size=256, patch_size=8, channels=768, num_blocks=8, layers_per_block=8, num_classes=3),
        dict(image_size=256, patch_size=8, hidden_size=768, num_classes=3, noise_std=0.07),
        {0: "cat", 1: "dog", 2: "wild"},
    ),
    (
        "imagenet_model_2_768_8_8_0.05.pth",
        dict(
            in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8, num_classes=1000
        ),
        dict(image_size=64, patch_size=2, hidden_size=768, num_classes=1000, noise_std=0.05),
        {0: "tench", 207: "golden retriever", 999: "toilet tissue"},
    ),
    (
        "imagenet64_model_2_768_8_8_0.05.pth",
        dict(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8),
        dict(image_size=64, patch_size=2, hidden_size=768, num_classes=0, noise_std=0.05),
        {},
    ),
    (
        "imagenet64_model_2_768_8_8_uniform.pth",
        dict(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8),
        dict(image_size=64, patch_size=2, hidden_size=768, num_classes=0, noise_std=0.0),
        {},
    ),
    (
        "imagenet_model_4_1024_8_8_0.15.pth",
        dict(
            in_channels=3, img_size=128, patch_size=4, channels=1024, num_blocks=8, layers_per_block=8, num_classes=1000
        ),
        dict(image_size=128, patch_size=4, hidden_size=1024, num_classes=1000, noise_std=0.15),
        {1: "goldfish", 134: "crane (134)", 517: "crane (517)"},
    ),
]


@pytest.mark.parametrize(("file_name", "layout", "fields", "labels"), PUBLISHED, ids=[case[0] for case in PUBLISHED])
def test_published_configurations_without_allocating(file_name, layout, fields, labels):
    state = meta_state(apple_layout(**layout))
    config = infer_config(state, checkpoint_name=parse_checkpoint_name(file_name))
    for field, value in fields.items():
        assert getattr(config, field) == value, field
    assert (config.num_channels, config.num_blocks, config.layers_per_block) == (3, 8, 8)
    assert (config.head_dim, config.mlp_ratio, config.nvp) == (64, 4, True)
    assert len(config.id2label) == config.num_classes
    for index, label in labels.items():
        assert config.id2label[index] == label
    # Building and loading works for the full size on the meta device, and finds every weight.
    model = model_from_apple_state_dict(state, config)
    assert all(tensor.is_meta for tensor in model.state_dict().values())
    num_weights = sum(tensor.numel() for key, tensor in state.items() if not key.endswith(".attn_mask"))
    assert sum(tensor.numel() for tensor in model.state_dict().values()) == num_weights


def test_mlp_ratio_read_from_the_weights():
    layout = apple_layout(1, 8, 2, 64, 1, 1)
    for key in list(layout):
        if key.endswith("mlp.main.0.weight"):
            layout[key] = (128, 64)
        elif key.endswith("mlp.main.0.bias"):
            layout[key] = (128,)
        elif key.endswith("mlp.main.2.weight"):
            layout[key] = (64, 128)
    config = infer_config(meta_state(layout), num_channels=1, noise_std=0.1)
    assert config.mlp_ratio == 2


def test_parse_checkpoint_name():
    name = parse_checkpoint_name("/ckpts/imagenet64_model_2_768_8_8_uniform.pth")
    assert (name.dataset, name.patch_size, name.hidden_size, name.num_blocks, name.layers_per_block) == (
        "imagenet64",
        2,
        768,
        8,
        8,
    )
    assert name.noise == "uniform" and name.noise_std == 0.0
    assert parse_checkpoint_name("afhq_model_8_768_8_8_0.07.pth").noise_std == 0.07
    assert parse_checkpoint_name("tiny_cond.pth") is None
    assert parse_checkpoint_name("afhq_opt_8_768_8_8_0.07.pth") is None


def test_file_name_supplies_noise_and_labels(tmp_path):
    shutil.copy(FIXTURES / "tiny_cond.pth", tmp_path / "cifar10_model_4_64_2_2_0.10.pth")
    assert convert(tmp_path / "cifar10_model_4_64_2_2_0.10.pth", tmp_path / "cifar") == 0
    config = TarFlowModel.from_pretrained(tmp_path / "cifar", subfolder="transformer").config
    assert config.noise_std == 0.1 and config.id2label[9] == "class_9"  # unknown dataset: generic names

    model = random_model(tiny_config(hidden_size=64, head_dim=64, num_classes=3))
    torch.save(hf_to_apple_state_dict(model.state_dict()), tmp_path / "afhq_model_2_64_2_1_0.07.pth")
    assert convert(tmp_path / "afhq_model_2_64_2_1_0.07.pth", tmp_path / "afhq", "--in-channels", "1") == 0
    config = TarFlowModel.from_pretrained(tmp_path / "afhq", subfolder="transformer").config
    assert config.noise_std == 0.07 and config.id2label == {0: "cat", 1: "dog", 2: "wild"}

    # A flag that agrees with the file name (to its two decimals) is the more precise value.
    assert convert(tmp_path / "afhq_model_2_64_2_1_0.07.pth", tmp_path / "precise", "--in-channels", "1",
                   "--noise-std", "0.0712") == 0  # fmt: skip
    assert TarFlowModel.from_pretrained(tmp_path / "precise", subfolder="transformer").config.noise_std == 0.0712


def test_labels_from_a_file(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps([f"kind {i}" for i in range(10)]))
    out = tmp_path / "out"
    assert convert(FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--labels", tmp_path / "names.json") == 0
    config = TarFlowModel.from_pretrained(out, subfolder="transformer").config
    assert config.id2label[3] == "kind 3" and config.label2id["kind 9"] == 9


# -------------------------------------------------------------------------------------------- label tables
def test_shipped_imagenet_names():
    raw = json.loads((REPO / "src/tarflow_hf/label_tables/imagenet_classes.json").read_text())
    assert list(raw) == [str(i) for i in range(1000)]
    names = load_label_set("imagenet")
    assert len(names) == len(set(names)) == 1000
    assert (names[0], names[1], names[207], names[999]) == ("tench", "goldfish", "golden retriever", "toilet tissue")
    # The only repeated first lemmas carry their index; every other name is untouched.
    renamed = {i: name for i, name in enumerate(names) if name.endswith(f" ({i})")}
    assert renamed == {134: "crane (134)", 517: "crane (517)", 638: "maillot (638)", 639: "maillot (639)"}
    assert load_label_set("afhq") == ["cat", "dog", "wild"] == resolve_labels("afhq")
    assert resolve_labels("none") is None


def test_label_files(tmp_path):
    assert disambiguate(["crane", "dog", "crane"]) == ["crane (0)", "dog", "crane (2)"]
    (tmp_path / "object.json").write_text(json.dumps({"1": "b", "0": "a"}))
    assert load_label_file(tmp_path / "object.json") == ["a", "b"]
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "x", "1": "y"}}))
    assert load_label_file(tmp_path / "config.json") == ["x", "y"]
    (tmp_path / "repeats.json").write_text(json.dumps(["a", "a"]))
    assert load_label_file(tmp_path / "repeats.json") == ["a (0)", "a (1)"]
    for content, message in (
        ("{not json", "is not valid JSON"),
        (json.dumps({"0": "a", "2": "c"}), "missing [1]"),
        (json.dumps({"zero": "a"}), "must be class indices"),
        (json.dumps(["a", ""]), "class 1 has name ''"),
        (json.dumps(3), "expected a JSON list"),
    ):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_label_file(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="label file not found"):
        load_label_file(tmp_path / "absent.json")
    with pytest.raises(ValueError, match=r"--labels must be one of afhq, imagenet, none or a \.json file"):
        resolve_labels("cifar")


# ---------------------------------------------------------------------------------------------- bad inputs
def test_missing_checkpoint(tmp_path, capsys):
    message = convert_error(capsys, tmp_path / "absent.pth", tmp_path / "out")
    assert "checkpoint not found" in message and "absent.pth" in message
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are not weights")
    assert "is not a PyTorch checkpoint" in convert_error(capsys, tmp_path / "notes.pth", tmp_path / "out")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in convert_error(capsys, tmp_path / "list.pth", tmp_path / "out")
    torch.save({"optimizer": {"state": {}}, "lr_schedule": {}}, tmp_path / "opt.pth")
    message = convert_error(capsys, tmp_path / "opt.pth", tmp_path / "out")
    assert "'optimizer', 'lr_schedule' are not tensors" in message
    torch.save({"weight": torch.ones(2)}, tmp_path / "other.pth")
    message = convert_error(capsys, tmp_path / "other.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "not an apple/ml-tarflow state dict" in message and "'weight'" in message
    assert "is a directory" in convert_error(capsys, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint_is_named_as_such(tmp_path, capsys, zip_format):
    """Half a download was 'not a PyTorch checkpoint' with torch's internal error; it is named truncated."""
    torch.save(load_pth(FIXTURES / "tiny_cond.pth"), tmp_path / "full.pth", _use_new_zipfile_serialization=zip_format)
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    message = convert_error(capsys, tmp_path / "cut.pth", tmp_path / "out", "--noise-std", "0.1")
    assert f"{tmp_path / 'cut.pth'} is truncated or corrupt" in message and "download or copy it again" in message
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty.pth is empty (0 bytes)" in convert_error(capsys, tmp_path / "empty.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    state = load_pth(FIXTURES / "tiny_uncond.pth")
    state["blocks.0.pos_embed"] = _CreatesFileWhenUnpickled(marker)
    torch.save(state, tmp_path / "evil.pth")

    message = convert_error(capsys, tmp_path / "evil.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "refused: the file tries to run code (unsafe pickle)" in message and "exec" in message
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The payload is live: an unsafe load does run it.
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_wrong_keys_are_named(tmp_path, capsys):
    state = load_pth(FIXTURES / "tiny_cond.pth")
    del state["blocks.1.proj_out.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "keys.pth")
    message = convert_error(capsys, tmp_path / "keys.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "missing keys 'blocks.1.proj_out.bias'" in message
    assert "unexpected keys 'blocks.1.extra.weight'" in message

    state = load_pth(FIXTURES / "tiny_cond.pth")
    state["blocks.1.attn_blocks.0.mlp.main.2.weight"] = torch.zeros(64, 100)
    torch.save(state, tmp_path / "shapes.pth")
    message = convert_error(capsys, tmp_path / "shapes.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "'blocks.1.attn_blocks.0.mlp.main.2.weight' is (64, 100), expected (64, 256)" in message

    state = load_pth(FIXTURES / "tiny_cond.pth")
    del state["var"]
    torch.save(state, tmp_path / "novar.pth")
    assert "no key 'var'" in convert_error(capsys, tmp_path / "novar.pth", tmp_path / "out", "--noise-std", "0.1")

    state = load_pth(FIXTURES / "tiny_cond.pth")
    state["blocks.1.attn_mask"] = torch.ones(16, 16)
    torch.save(state, tmp_path / "mask.pth")
    message = convert_error(capsys, tmp_path / "mask.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "'blocks.1.attn_mask' is not the causal" in message
    assert not (tmp_path / "out").exists()


def test_explicit_config_is_checked():
    with pytest.raises(ValueError, match=r"'blocks.0.proj_in.weight' is \(64, 48\), expected \(64, 4\)"):
        load_ml_tarflow_checkpoint(FIXTURES / "tiny_cond.pth", tiny_config(hidden_size=64, head_dim=64))


def test_contradictions_name_both_values(tmp_path, capsys):
    out = tmp_path / "out"
    cases = []
    for file_name, flags, expected in (
        # the weights have patch 4 for 3 channels, width 64, 2 blocks x 2 layers, 10 classes
        ("cifar_model_8_64_2_2_0.10.pth", [], "patch size: the file name cifar_model_8_64_2_2_0.10.pth says 8 but "
         "the weights have 4"),
        ("cifar_model_4_128_2_2_0.10.pth", [], "width: the file name cifar_model_4_128_2_2_0.10.pth says 128 but "
         "the weights have 64"),
        ("cifar_model_4_64_3_1_0.10.pth", [], "blocks: the file name cifar_model_4_64_3_1_0.10.pth says 3 but the "
         "weights have 2; layers per block: the file name cifar_model_4_64_3_1_0.10.pth says 1 but the weights have 2"),
        ("cifar_model_4_64_2_2_0.10.pth", ["--noise-std", "0.2"], "says 0.10 but --noise-std is 0.2"),
        ("cifar_model_4_64_2_2_uniform.pth", ["--noise-std", "0.05"], "says 'uniform'"),
        ("cifar_model_4_64_2_2_0.10.pth", ["--labels", "afhq"], "--labels afhq names 3 classes but the weights "
         "have 10 class embeddings"),
        ("afhq_model_4_64_2_2_0.07.pth", [], "the file name's dataset 'afhq' names 3 classes but the weights have "
         "10 class embeddings"),
        ("imagenet64_model_4_64_2_2_0.05.pth", [], "the file name's dataset 'imagenet64' is unconditional but the "
         "weights have 10 class embeddings"),
        ("cifar_model_4_64_2_2_0.10.pth", ["--in-channels", "2"], "patch dimension 48 is not channels x "
         "patch_size**2 for --in-channels 2; the file name's patch size 4 means --in-channels 3"),
    ):  # fmt: skip
        shutil.copy(FIXTURES / "tiny_cond.pth", tmp_path / file_name)
        cases.append((convert_error(capsys, tmp_path / file_name, out, *flags), expected))
    for message, expected in cases:
        assert expected in message
    shutil.copy(FIXTURES / "tiny_uncond.pth", tmp_path / "mnist_model_2_64_3_1_0.10.pth")
    message = convert_error(capsys, tmp_path / "mnist_model_2_64_3_1_0.10.pth", out)
    assert "patch dimension 4 is not channels x patch_size**2 for 3 channels (the default" in message
    assert "means --in-channels 1" in message
    message = convert_error(capsys, tmp_path / "mnist_model_2_64_3_1_0.10.pth", out, "--in-channels", "1",
                            "--labels", "imagenet")  # fmt: skip
    assert "names 1000 classes but the weights have no class embeddings (unconditional)" in message
    assert "pass --noise-std" in convert_error(capsys, FIXTURES / "tiny_cond.pth", out)
    assert "--reverse takes no --noise-std: they only matter" in convert_error(
        capsys, "--reverse", tmp_path, tmp_path / "x.pth", "--noise-std", "0.1"
    )
    assert not out.exists()


def test_bad_flag_values(capsys, tmp_path):
    for flags in (["--noise-std", "-1"], ["--noise-std", "nan"], ["--in-channels", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            convert(FIXTURES / "tiny_cond.pth", tmp_path / "out", *flags)
        assert exit_info.value.code == 2
        assert flags[0] in capsys.readouterr().err


def test_existing_output_is_not_overwritten(converted, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1")
    assert f"output directory {out} exists and is not empty; pass --overwrite" in message
    # --overwrite replaces earlier outputs only, never an arbitrary folder.
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite")
    assert "refusing to replace" in message and "not a TarFlow/STARFlow pipeline or model folder" in message
    assert [path.name for path in out.iterdir()] == ["keep.txt"]

    shutil.copytree(converted["tiny_uncond"], tmp_path / "previous")
    assert convert(FIXTURES / "tiny_cond.pth", tmp_path / "previous", "--noise-std", "0.1", "--overwrite") == 0
    replaced = TarFlowModel.from_pretrained(tmp_path / "previous", subfolder="transformer")
    assert replaced.config.num_classes == 10
    (tmp_path / "empty").mkdir()
    assert convert(FIXTURES / "tiny_cond.pth", tmp_path / "empty", "--noise-std", "0.1") == 0
    assert (tmp_path / "empty" / "model_index.json").is_file()

    torch.save({"var": torch.zeros(1)}, tmp_path / "back.pth")
    old = (tmp_path / "back.pth").read_bytes()
    message = convert_error(capsys, "--reverse", converted["tiny_cond"], tmp_path / "back.pth")
    assert "back.pth exists; pass --overwrite" in message and (tmp_path / "back.pth").read_bytes() == old
    assert convert("--reverse", converted["tiny_cond"], tmp_path / "back.pth", "--overwrite") == 0
    assert_identical(load_pth(FIXTURES / "tiny_cond.pth"), load_pth(tmp_path / "back.pth"))
    leftovers = [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_reverse_errors(tmp_path, capsys, converted):
    assert "folder not found" in convert_error(capsys, "--reverse", tmp_path / "absent", tmp_path / "x.pth")
    (tmp_path / "plain").mkdir()
    assert "neither a TarFlow pipeline folder" in convert_error(
        capsys, "--reverse", tmp_path / "plain", tmp_path / "x.pth"
    )
    broken = tmp_path / "broken"
    shutil.copytree(converted["tiny_uncond"], broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    config["num_blocks"] = 4
    (broken / "transformer" / "config.json").write_text(json.dumps(config))
    message = convert_error(capsys, "--reverse", broken, tmp_path / "x.pth")
    assert "missing keys 'blocks.3." in message and "does not match its config.json" in message
    config["model_type"] = "vit"
    (broken / "transformer" / "config.json").write_text(json.dumps(config))
    assert "is a 'vit' config, not a 'tarflow' one" in convert_error(capsys, "--reverse", broken, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, converted):
    def save_then_fail(self, directory, **kwargs):
        (Path(directory) / "transformer").mkdir()
        (Path(directory) / "transformer" / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(TarFlowPipeline, "save_pretrained", save_then_fail)
    out = tmp_path / "new" / "nested" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        convert(FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no parent folders made for it

    previous = tmp_path / "previous"
    shutil.copytree(converted["tiny_uncond"], previous)
    before = sorted(str(path.relative_to(previous)) for path in previous.rglob("*"))
    with pytest.raises(RuntimeError, match="disk full"):
        convert(FIXTURES / "tiny_cond.pth", previous, "--noise-std", "0.1", "--overwrite")
    assert sorted(str(path.relative_to(previous)) for path in previous.rglob("*")) == before
    assert [path.name for path in tmp_path.iterdir()] == ["previous"]

    def write_then_fail(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module.torch, "save", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert("--reverse", converted["tiny_cond"], tmp_path / "back.pth")
    assert [path.name for path in tmp_path.iterdir()] == ["previous"]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included) -> its bytes (None for folders)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_weights_write_failing_midway_keeps_the_previous_folder(tmp_path, monkeypatch, converted, capsys, error):
    """The serializer writes half the weights, then fails (disk full, Ctrl-C): the previous output is untouched
    and nothing else is left, hidden or not."""
    import transformers.modeling_utils

    previous = tmp_path / "out"
    shutil.copytree(converted["tiny_uncond"], previous)
    before = snapshot(tmp_path)

    def half_then_fail(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half of the weights")
        raise error

    def failing_conversion(*args: str | os.PathLike) -> None:
        if isinstance(error, OSError):  # an environment error: one line, exit status 2
            assert convert(FIXTURES / "tiny_cond.pth", *args, "--noise-std", "0.1") == 2
            assert capsys.readouterr().err.endswith("error: [Errno 28] No space left on device\n")
        else:
            with pytest.raises(KeyboardInterrupt):
                convert(FIXTURES / "tiny_cond.pth", *args, "--noise-std", "0.1")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_fail)
    failing_conversion(previous, "--overwrite")
    assert snapshot(tmp_path) == before
    failing_conversion(tmp_path / "new" / "out")
    assert snapshot(tmp_path) == before  # no new folder, no parent made for it


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("config.json", {"model_type": "bert"}),
        ("config.json", {"architectures": ["TarFlowModel"]}),
        ("model_index.json", {"_class_name": "StableDiffusionPipeline"}),
        ("model_index.json", {"_class_name": ["pipeline_sd", "MyPipeline"]}),
        ("model_index.json", "not json"),
    ],
)
def test_overwrite_refuses_folders_of_other_models(tmp_path, capsys, file_name, content):
    out = tmp_path / "someone_elses_model"
    out.mkdir()
    (out / file_name).write_text(content if isinstance(content, str) else json.dumps(content))
    (out / "weights.bin").write_bytes(b"precious")
    before = snapshot(tmp_path)
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite")
    assert f"refusing to replace {out}: it is not a TarFlow/STARFlow pipeline or model folder" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("model_index.json", {"_class_name": ["pipeline_tarflow", "TarFlowPipeline"]}),
        ("model_index.json", {"_class_name": "TarFlowPipeline"}),
        ("model_index.json", {"_class_name": "StarFlowPipeline"}),
        ("config.json", {"model_type": "tarflow"}),
        ("config.json", {"model_type": "starflow"}),
    ],
)
def test_overwrite_replaces_tarflow_and_starflow_folders(tmp_path, file_name, content):
    """An earlier conversion's folder is replaced as a whole: a stale weight shard it held does not survive."""
    out = tmp_path / "out"
    out.mkdir()
    (out / file_name).write_text(json.dumps(content))
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old")
    assert is_flow_folder(out)
    assert convert(FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite") == 0
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "transformer" / "model.safetensors").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_deletes_an_input(converted, tmp_path, capsys):
    """`--overwrite` onto a folder that holds an input (the checkpoint, the label file), named directly or through a
    link, is refused before anything is read: replacing the folder would delete the input (the label file was)."""
    out = tmp_path / "out"
    shutil.copytree(converted["tiny_cond"], out)
    shutil.copy(FIXTURES / "tiny_cond.pth", out / "tiny_cond.pth")
    (out / "names.json").write_text(json.dumps([f"kind {i}" for i in range(10)]))
    (tmp_path / "link").symlink_to(out)
    before = snapshot(out)
    for destination in (out, tmp_path / "link"):
        message = convert_error(capsys, out / "tiny_cond.pth", destination, "--noise-std", "0.1", "--overwrite")
        assert f"refusing to replace {destination}: it contains the checkpoint {out / 'tiny_cond.pth'}" in message
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite",
                            "--labels", out / "names.json")  # fmt: skip
    assert f"it contains the label file {out / 'names.json'}, which replacing it would delete" in message
    assert snapshot(out) == before


def test_overwrite_refuses_a_folder_holding_the_users_files(converted, tmp_path, capsys):
    """`--overwrite` replaces an earlier conversion as a whole; files the user added there (notes, samples, a card
    they edited) are named and the folder is left alone, never deleted with it (they were, silently)."""
    from tarflow_hf.hub import CARD_MARKER

    out = tmp_path / "out"
    shutil.copytree(converted["tiny_cond"], out)
    (out / "notes.txt").write_text("mine")
    (out / "samples").mkdir()
    (out / "samples" / "grid.png").write_bytes(b"png")
    (out / "transformer" / "eval.json").write_text("{}")
    before = snapshot(out)
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite")
    assert f"refusing to replace {out}: it holds what no conversion writes: notes.txt, samples/, " in message
    assert "transformer/eval.json" in message and "move them elsewhere first" in message
    assert snapshot(out) == before
    for added in (out / "notes.txt", out / "samples" / "grid.png", out / "samples", out / "transformer" / "eval.json"):
        added.rmdir() if added.is_dir() else added.unlink()
    card = out / "README.md"
    card.write_text(card.read_text().replace(CARD_MARKER, "") + "\nMy notes on this model.\n")
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite")
    assert "it holds what no conversion writes: README.md" in message and "My notes" in card.read_text()
    card.unlink()  # what is left is the earlier conversion's own: replaced
    assert convert(FIXTURES / "tiny_cond.pth", out, "--noise-std", "0.1", "--overwrite") == 0
    assert CARD_MARKER in card.read_text()


def test_reverse_never_writes_into_the_converted_folder(converted, tmp_path, capsys):
    """`--reverse FOLDER OUT.pth` refuses an OUT.pth inside FOLDER, one of its files included (it wrote a .pth over
    the folder's weights), and a file its files link to (a Hub cache snapshot links to blobs)."""
    folder = tmp_path / "folder"
    shutil.copytree(converted["tiny_cond"], folder)
    blob = tmp_path / "blob"
    (folder / "transformer" / "model.safetensors").rename(blob)
    (folder / "transformer" / "model.safetensors").symlink_to(blob)
    before = {**snapshot(folder), "blob": blob.read_bytes()}
    for target in (folder / "transformer" / "model.safetensors", folder / "again.pth", blob):
        message = convert_error(capsys, "--reverse", folder, target, "--overwrite")
        assert f"refusing to write {target}: it is inside {folder}, the folder being converted" in message
    assert {**snapshot(folder), "blob": blob.read_bytes()} == before


def test_reverse_overwrite_replaces_only_a_checkpoint(converted, tmp_path, capsys):
    """`--reverse ... --overwrite` replaces an earlier .pth (zip or legacy format), not any file (it did)."""
    (tmp_path / "notes.txt").write_text("mine")
    message = convert_error(capsys, "--reverse", converted["tiny_cond"], tmp_path / "notes.txt", "--overwrite")
    assert f"refusing to replace {tmp_path / 'notes.txt'}: it is not a PyTorch checkpoint" in message
    assert (tmp_path / "notes.txt").read_text() == "mine"
    torch.save({"var": torch.zeros(1)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert convert("--reverse", converted["tiny_cond"], tmp_path / "legacy.pth", "--overwrite") == 0
    assert_identical(load_pth(FIXTURES / "tiny_cond.pth"), load_pth(tmp_path / "legacy.pth"))


def test_rerun_cleans_what_a_killed_conversion_left(tmp_path):
    """A conversion killed outright (SIGKILL) cannot clean up; the next one to the same output does, removing only
    its own temporaries' names."""
    killed = tmp_path / ".out.0123abcd.tmp"
    (killed / "transformer").mkdir(parents=True)
    (killed / "transformer" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.json.0123abcd.tmp").write_bytes(b"another target's")
    (tmp_path / ".out.backup").mkdir()
    assert convert(FIXTURES / "tiny_cond.pth", tmp_path / "out", "--noise-std", "0.1") == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.backup", ".out.json.0123abcd.tmp", "out"]


def test_converted_files_are_ordinary_and_the_card_names_the_output(tmp_path):
    previous = os.umask(0o022)
    try:
        assert convert(FIXTURES / "tiny_cond.pth", tmp_path / "out", "--noise-std", "0.1") == 0
        os.umask(0o077)
        assert convert("--reverse", tmp_path / "out", tmp_path / "private.pth") == 0
    finally:
        os.umask(previous)
    for path in [tmp_path / "out", *(tmp_path / "out").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path  # weights too, not 0o600
    assert (tmp_path / "private.pth").stat().st_mode & 0o777 == 0o600
    card = (tmp_path / "out" / "README.md").read_text()
    assert ".tmp" not in card and 'from_pretrained("out")' in card  # the final folder, not the temporary one


# ------------------------------------------------------------------------------------------- command line
def test_script_runs_as_a_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "conversion" / "convert_ml_tarflow.py"), str(FIXTURES / "tiny_cond.pth"),
         str(tmp_path / "out"), "--noise-std", "0.1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3x16x16, patch 4, width 64, 2 blocks x 2 layers, 10 classes, noise_std 0.1" in result.stdout
    pipeline = TarFlowPipeline.from_pretrained(tmp_path / "out")
    assert_identical(load_pth(FIXTURES / "tiny_cond.pth"), hf_to_apple_state_dict(pipeline.transformer.state_dict()))


@pytest.mark.parametrize(
    ("module", "other"),
    [("tarflow_hf.convert", "tarflow_hf.convert_starflow"), ("tarflow_hf.convert_starflow", "tarflow_hf.convert")],
)
def test_the_two_converters_do_not_import_each_other(module, other):
    """Both sit on tarflow_hf.apple_checkpoints; importing one (in a fresh interpreter) leaves the other unimported."""
    code = f"import json, sys, {module}; print(json.dumps([name for name in sys.modules if 'tarflow' in name]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = json.loads(result.stdout)
    assert module in imported and "tarflow_hf.apple_checkpoints" in imported and other not in imported


class _CallsOsSystem:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_calling_a_blocked_function_is_reported_as_unsafe_code(tmp_path, capsys, writer):
    """A pickle calling os.system was reported as 'not a torch.save file' (torch's 'blocked module' wording, and
    plain pickles, were not recognised)."""
    state = {"var": torch.ones(4, 16), "blocks.0.pos_embed": _CallsOsSystem()}
    if writer == "torch.save":
        torch.save(state, tmp_path / "evil.pth")
    else:
        with (tmp_path / "evil.pth").open("wb") as handle:
            pickle.dump(state, handle, protocol=4)
    message = convert_error(capsys, tmp_path / "evil.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "refused: the file tries to run code (unsafe pickle)" in message and "system" in message
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_reported_as_nan(tmp_path, capsys):
    state = load_pth(FIXTURES / "tiny_cond.pth")
    state["blocks.1.proj_out.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "tiny_cond_nan.pth")
    message = convert_error(capsys, tmp_path / "tiny_cond_nan.pth", tmp_path / "out", "--noise-std", "0.1")
    assert "NaN" in message and "'blocks.1.proj_out.weight'" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags",
    [["--config", "x.yaml"], ["--license-file", "LICENSE"], ["--transformer-only"], ["--text-encoder", "t5"],
     ["--vae", "vae"]],
)  # fmt: skip
def test_starflow_only_flags_are_refused_for_tarflow_checkpoints(tmp_path, capsys, flags):
    message = convert_error(capsys, FIXTURES / "tiny_cond.pth", tmp_path / "out", "--noise-std", "0.1", *flags)
    assert flags[0] in message and "ml-starflow" in message
    assert not (tmp_path / "out").exists()
