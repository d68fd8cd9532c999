"""apple/ml-starflow checkpoints <-> StarFlowModel folders: exact both ways, configuration from weights and yaml."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_without_tarflow_hf

from tarflow_hf.apple_checkpoints import is_starflow_state_dict, source_family
from tarflow_hf.commands import CommandError
from tarflow_hf.commands.arguments import convert as add_arguments
from tarflow_hf.commands.convert import run
from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.convert_starflow import (
    RELEASED_YAML,
    apple_to_hf_state_dict,
    convert_ml_starflow_checkpoint,
    convert_ml_starflow_pipeline,
    deprecated_buffers,
    expected_apple_shapes,
    export_ml_starflow_checkpoint,
    hf_to_apple_state_dict,
    load_ml_starflow_checkpoint,
    read_apple_yaml,
    starflow_config_from_apple,
)
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.registry import STARFLOW, TARFLOW

FIXTURES = Path(__file__).parent / "fixtures" / "starflow"
CASES = ("sf_t2i", "sf_variant")


def apple_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{name}.pth", map_location="cpu", weights_only=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", CASES)
def test_config_from_weights_and_yaml(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    apple = meta["model_kwargs"]
    config = starflow_config_from_apple(apple_state(name), read_apple_yaml(FIXTURES / f"{name}.yaml"))
    assert config.sample_size == apple["img_size"]
    assert config.patch_size == apple["patch_size"]
    assert config.in_channels == apple["in_channels"]
    assert config.hidden_size == apple["channels"]
    assert config.deep_hidden_size == (apple["top_block_channels"] or apple["channels"])
    assert config.layers_per_block == apple["layers_per_block"]
    assert config.head_dim == apple["head_dim"]
    assert config.text_hidden_size == apple["txt_dim"]
    assert config.max_text_length == apple["txt_size"]
    assert config.soft_clip == apple["soft_clip"]
    assert config.noise_std == meta["denoise"]["noise_std"]
    assert config.latent_norm_regularization == meta["forward"]["latent_norm_regularization"]


def test_yaml_format_is_read_like_apples_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("arguments:\n- layers_per_block: 2 2 24  # comment\n- lr: 6.4e-05\n- seq_order: L2R\n- sos: 1\n")
    assert read_apple_yaml(path) == {"layers_per_block": [2, 2, 24], "lr": 6.4e-05, "seq_order": "L2R", "sos": 1}
    path.write_text("arguments:\nnot a setting\n")
    with pytest.raises(ValueError, match="key: value"):
        read_apple_yaml(path)


def test_released_config_without_yaml():
    """The 3B checkpoint's shapes (from the fixture README) give the released architecture; without a yaml the
    released values fill in the rest."""
    width, patch_dim, text, positions = 3072, 4, 128, 32 * 32
    shapes = {"var": (positions, patch_dim), "feat_rope.freqs_cos": (positions + text, 64)}
    for i, layers in enumerate([2, 2, 2, 2, 2, 24]):
        shapes[f"blocks.{i}.proj_in.weight"] = (width, patch_dim)
        shapes[f"blocks.{i}.attn_mask"] = (positions + text, positions + text)
        for j in range(layers):
            shapes[f"blocks.{i}.attn_blocks.{j}.mlp.main.0.weight"] = (4 * width, width)
    shapes["blocks.5.proj_txt.weight"] = (width, 2048)
    config = starflow_config_from_apple(shapes, None)
    assert (config.sample_size, config.max_text_length, config.head_dim) == (32, 128, 64)
    assert config.layers_per_block == RELEASED_YAML["layers_per_block"]
    defaults = StarFlowConfig().to_dict()
    assert {key: value for key, value in config.to_dict().items() if key != "transformers_version"} == {
        key: value for key, value in defaults.items() if key != "transformers_version"
    }
    apple_shapes = expected_apple_shapes(config)
    assert len(apple_shapes) == 455
    assert (
        sum(
            torch.Size(shape).numel()
            for key, shape in apple_shapes.items()
            if "." in key and "attn_mask" not in key and "freqs" not in key
        )
        == 3_858_281_544
    )
    assert apple_shapes["blocks.0.attn_mask"] == (1152, 1152)
    assert apple_shapes["feat_rope.freqs_cos"] == (1152, 64)


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_tensor_identical(name, tmp_path):
    """.pth -> folder -> .pth gives back every tensor (deprecated buffers included), in Apple's key order."""
    original = apple_state(name)
    folder = tmp_path / "model"
    convert_ml_starflow_checkpoint(FIXTURES / f"{name}.pth", folder, config_yaml=FIXTURES / f"{name}.yaml")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "Apple Machine Learning Research Model License" in card and "apple/ml-starflow" in card
    export_ml_starflow_checkpoint(folder, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert list(again) == list(original)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    # Apple's two rotary buffers are one tensor (one storage in the file), and so are ours.
    assert again["feat_rope.freqs_cos"].data_ptr() == again["feat_rope.freqs_sin"].data_ptr()
    # The same from a model in memory.
    model = StarFlowModel.from_pretrained(folder)
    export_ml_starflow_checkpoint(model, tmp_path / "from_model.pth")
    from_model = torch.load(tmp_path / "from_model.pth", weights_only=True)
    assert all(torch.equal(from_model[key], tensor) for key, tensor in original.items())


def test_dropped_buffers_are_what_apple_writes():
    original = apple_state("sf_variant")
    config = starflow_config_from_apple(original, read_apple_yaml(FIXTURES / "sf_variant.yaml"))
    for key, tensor in deprecated_buffers(config).items():
        assert torch.equal(tensor, original[key]), key
    hf = apple_to_hf_state_dict(original)
    assert not any(key == "var" or "attn_mask" in key or "freqs" in key for key in hf)
    assert all(
        hf[key]
        is original[key.replace(".layers.", ".attn_blocks.").replace(".fc1.", ".main.0.").replace(".fc2.", ".main.2.")]
        for key in hf
    )
    assert list(hf_to_apple_state_dict(hf, config)) == list(original)


def test_mismatched_checkpoints_are_named(tmp_path):
    state = apple_state("sf_t2i")
    yaml = read_apple_yaml(FIXTURES / "sf_t2i.yaml")
    with pytest.raises(ValueError, match="channels=128"):
        starflow_config_from_apple(state, {**yaml, "channels": 128})
    with pytest.raises(ValueError, match="txt_size"):
        starflow_config_from_apple(state, {**yaml, "txt_size": 8})
    with pytest.raises(ValueError, match="seq_order"):
        starflow_config_from_apple(state, {**yaml, "seq_order": "R2L"})
    broken = dict(state)
    broken["blocks.0.unexpected"] = torch.zeros(1)
    del broken["blocks.1.proj_out.bias"]
    broken["blocks.2.proj_in.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as error:
        load_ml_starflow_checkpoint(tmp_path / "broken.pth", FIXTURES / "sf_t2i.yaml")
    for name in ("blocks.0.unexpected", "blocks.1.proj_out.bias", "blocks.2.proj_in.weight"):
        assert name in str(error.value)


def test_command_line(tmp_path, capsys):
    assert (
        run(
            parse(
                [
                    str(FIXTURES / "sf_variant.pth"),
                    str(tmp_path / "out"),
                    "--config",
                    str(FIXTURES / "sf_variant.yaml"),
                    "--license-file",
                    str(FIXTURES / "README.md"),
                    "--transformer-only",
                ]
            )
        )
        == 0
    )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["transformer"]  # OUT/transformer/ alone
    assert (tmp_path / "out" / "transformer" / "LICENSE").read_text() == (FIXTURES / "README.md").read_text()
    assert "research" in capsys.readouterr().out
    assert run(parse([str(tmp_path / "out"), str(tmp_path / "back.pth"), "--reverse"])) == 0
    assert list(torch.load(tmp_path / "back.pth", weights_only=True)) == list(apple_state("sf_variant"))
    with pytest.raises(FileExistsError):
        run(parse([str(FIXTURES / "sf_variant.pth"), str(tmp_path / "out"), "--transformer-only"]))
    assert (
        run(parse([str(FIXTURES / "sf_variant.pth"), str(tmp_path / "out"), "--overwrite", "--transformer-only"])) == 0
    )
    assert "assuming the released" in capsys.readouterr().out


AUTOMODEL_SCRIPT = """
import sys

import torch
from transformers import AutoModel

model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not [name for name in sys.modules if name.startswith("tarflow_hf")]
torch.manual_seed(0)
x = torch.randn(1, model.config.in_channels, model.config.sample_size, model.config.sample_size)
text = torch.randn(1, model.config.max_text_length, model.config.text_hidden_size)
print(type(model).__module__, repr(model(x, text).logdet.item()))
"""


def test_transformer_only_folder_loads_with_automodel_and_remote_code(tmp_path, capsys):
    """A --transformer-only conversion (a fresh `python -m tarflow_hf convert` process, as users run it) carries the
    model's code and `auto_map`: a process that cannot import tarflow_hf loads it with `AutoModel(...,
    trust_remote_code=True)` and computes what the package does. Without --license-file the card (and the command)
    warn that the license text is missing; the card always carries the attribution notice the license requires."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    converted = subprocess.run(
        [sys.executable, "-m", "tarflow_hf", "convert", str(FIXTURES / "sf_t2i.pth"), str(out),
         "--config", str(FIXTURES / "sf_t2i.yaml"), "--transformer-only"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    assert "--license-file LICENSE_MODEL" in converted.stderr
    folder = out / "transformer"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_starflow.StarFlowModel"
    result = run_without_tarflow_hf(AUTOMODEL_SCRIPT, tmp_path, str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    module, logdet = result.stdout.split()
    assert module.startswith("transformers_modules"), module
    model = load_ml_starflow_checkpoint(FIXTURES / "sf_t2i.pth", FIXTURES / "sf_t2i.yaml")
    torch.manual_seed(0)
    x = torch.randn(1, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    text = torch.randn(1, model.config.max_text_length, model.config.text_hidden_size)
    assert abs(float(logdet) - model(x, text).logdet.item()) < 1e-4
    card = (folder / "README.md").read_text()
    attribution = (
        '"Apple Machine Learning Research Model is licensed under the Apple Machine Learning Research Model License '
        'Agreement."'
    )
    assert attribution in card and "Warning: this folder does not carry the license's text" in card
    licensed = ["--transformer-only", "--overwrite", "--license-file", str(FIXTURES / "README.md")]
    assert (
        run(parse([str(FIXTURES / "sf_t2i.pth"), str(out), "--config", str(FIXTURES / "sf_t2i.yaml"), *licensed])) == 0
    )
    card = (folder / "README.md").read_text()
    assert attribution in card and "Warning" not in card and "`LICENSE` in this folder holds" in card
    assert "license's text" not in capsys.readouterr().err


def test_checkpoint_family_is_recognised():
    assert is_starflow_state_dict(list(apple_state("sf_t2i")))
    assert not is_starflow_state_dict(["var", "blocks.0.pos_embed", "blocks.0.proj_in.weight"])
    tarflow = Path(__file__).parent / "fixtures" / "tiny_cond.pth"
    with pytest.raises(ValueError, match=r"is not an apple/ml-starflow checkpoint .*`tarflow-hf convert`"):
        load_ml_starflow_checkpoint(tarflow, FIXTURES / "sf_t2i.yaml")


def test_sources_are_recognised_for_dispatch(tmp_path):
    """`tarflow-hf convert` can hand STARFlow checkpoints and folders to this converter, with its own namespace."""
    assert source_family(FIXTURES / "sf_t2i.pth") is STARFLOW
    assert source_family(Path(__file__).parent / "fixtures" / "tiny_cond.pth") is TARFLOW
    assert source_family(tmp_path) is TARFLOW  # the TarFlow converter says what is wrong with it
    namespace = parse(
        [str(FIXTURES / "sf_t2i.pth"), str(tmp_path / "out"), "--config", str(FIXTURES / "sf_t2i.yaml"),
         "--transformer-only"]
    )  # fmt: skip
    assert run(namespace) == 0
    assert source_family(tmp_path / "out") is STARFLOW
    namespace.noise_std = 0.1
    with pytest.raises(CommandError, match="--noise-std"):
        run(namespace)


# ------------------------------------------------------------------------- `tarflow-hf convert`: full pipelines
def local_components(root: Path) -> tuple[Path, Path]:
    """A T5 folder (t5_tiny's encoder + a word-level tokenizer saved beside it) and a tiny AutoencoderKL folder."""
    import shutil

    from conftest import tiny_vae, word_tokenizer

    t5 = root / "t5"
    shutil.copytree(FIXTURES / "t5_tiny", t5)
    word_tokenizer().save_pretrained(t5)
    tiny_vae(64).save_pretrained(root / "vae")
    return t5, root / "vae"


def test_tarflow_hf_convert_writes_a_starflow_pipeline(tmp_path, capsys):
    """`tarflow-hf convert` hands STARFlow checkpoints over and, without --transformer-only, writes a pipeline."""
    from tarflow_hf.commands import main
    from tarflow_hf.pipeline_starflow import StarFlowPipeline

    t5, vae = local_components(tmp_path)
    out = tmp_path / "pipe"
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(out), "--config", str(FIXTURES / "sf_t2i.yaml"),
                 "--text-encoder", str(t5), "--vae", str(vae),
                 "--license-file", str(FIXTURES / "README.md")]) == 0  # fmt: skip
    assert "(pipeline)" in capsys.readouterr().out
    pipe = StarFlowPipeline.from_pretrained(out)
    assert {"transformer", "text_encoder", "tokenizer", "vae"} <= set(pipe.components)
    card = (out / "README.md").read_text()
    assert (out / "LICENSE").is_file() and "STARFlow" in card
    # The pipeline's card says what the folder is and whose weights they are, under which license.
    assert "format conversion of Apple's STARFlow checkpoint `sf_t2i.pth`" in card
    assert "license_name: apple-amlr" in card and "research purposes only" in card
    assert "licensed under the Apple Machine Learning Research Model License Agreement." in card
    assert "`LICENSE` in this folder holds the license's text" in card and "Warning" not in card
    # A copy saved from it (after fine-tuning, say) keeps the license text; one saved from weights without it warns.
    pipe.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "LICENSE").read_text() == (FIXTURES / "README.md").read_text()
    assert "`LICENSE` in this folder holds the license's text" in (tmp_path / "resaved" / "README.md").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "LICENSE").write_text("the user's own")
    pipe.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "LICENSE").read_text() == "the user's own"  # never overwritten
    StarFlowPipeline(**pipe.components).save_pretrained(tmp_path / "unlicensed")  # assembled in memory
    assert not (tmp_path / "unlicensed" / "LICENSE").exists()
    unlicensed_card = (tmp_path / "unlicensed" / "README.md").read_text()
    assert "Warning: this folder does not carry the license's text" in unlicensed_card
    assert str(tmp_path) not in card
    reference = load_ml_starflow_checkpoint(FIXTURES / "sf_t2i.pth", FIXTURES / "sf_t2i.yaml")
    for key, tensor in reference.state_dict().items():
        torch.testing.assert_close(pipe.transformer.state_dict()[key], tensor, rtol=0, atol=0)
    assert pipe.tokenizer("w5 w7").input_ids == [5, 7, 1]
    # --overwrite replaces it; the reverse conversion reads the pipeline's transformer.
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(out), "--config", str(FIXTURES / "sf_t2i.yaml"),
                 "--transformer-only", "--overwrite"]) == 0  # fmt: skip
    assert sorted(path.name for path in out.iterdir()) == ["transformer"]
    assert main(["convert", "--reverse", str(out), str(tmp_path / "back.pth")]) == 0
    assert list(torch.load(tmp_path / "back.pth", weights_only=True)) == list(apple_state("sf_t2i"))


def test_tarflow_hf_convert_refuses_flags_of_the_other_family(tmp_path, capsys):
    from tarflow_hf.commands import main

    for flags in (["--noise-std", "0.1"], ["--in-channels", "3"], ["--labels", "none"]):
        assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(tmp_path / "out"), *flags]) == 2
        message = capsys.readouterr().err.strip()
        assert flags[0] in message and "STARFlow" in message and "\n" not in message
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(tmp_path / "out"), "--transformer-only",
                 "--vae", "x"]) == 2  # fmt: skip
    assert "--vae" in capsys.readouterr().err
    # A text encoder that cannot be found is one line, before anything is written.
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(tmp_path / "out"), "--text-encoder",
                 str(tmp_path / "missing"), "--vae", str(tmp_path / "missing")]) == 2  # fmt: skip
    message = capsys.readouterr().err.strip()
    assert "could not load the text encoder" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_reported_as_nan(tmp_path, capsys):
    from tarflow_hf.commands import main

    state = apple_state("sf_t2i")
    key = next(key for key in state if key.endswith("proj_out.weight"))
    state[key][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    assert main(["convert", str(tmp_path / "nan.pth"), str(tmp_path / "out"), "--config", str(FIXTURES / "sf_t2i.yaml"),
                 "--transformer-only"]) == 2  # fmt: skip
    message = capsys.readouterr().err
    hf_key = next(iter(apple_to_hf_state_dict({key: state[key]})))
    assert "NaN" in message and f"'{hf_key}'" in message
    assert not (tmp_path / "out").exists()


def test_python_m_tarflow_hf_convert_dispatches_starflow(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tarflow_hf", "convert", str(FIXTURES / "sf_variant.pth"), str(tmp_path / "out"),
         "--config", str(FIXTURES / "sf_variant.yaml"), "--transformer-only"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert source_family(tmp_path / "out") is STARFLOW and (tmp_path / "out" / "transformer" / "config.json").is_file()


# ----------------------------------------------------------------------------------- yaml settings (issue 21)
def yaml_without(tmp_path: Path, *keys: str, replace: dict[str, str] | None = None, header: bool = True) -> Path:
    """sf_t2i.yaml without the lines of `keys` (and the `arguments:` line unless `header`), values replaced."""
    lines = []
    for line in (FIXTURES / "sf_t2i.yaml").read_text().splitlines():
        key = line.lstrip("- ").split(":")[0]
        if key in keys or (line == "arguments:" and not header):
            continue
        lines.append(f"- {key}: {replace[key]}" if replace and key in replace else line)
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def convert_message(capsys, *args: str | os.PathLike) -> str:
    """A `tarflow-hf convert --transformer-only` that must fail as a user error: its one-line message."""
    from tarflow_hf.commands import main

    capsys.readouterr()
    assert main(["convert", *map(str, args), "--transformer-only"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("tarflow-hf convert: error: ") and "\n" not in message
    return message


def test_yaml_training_settings_are_honoured(tmp_path):
    """noise_std, soft_clip and latent_norm_regularization come from the yaml (the fixtures' 0.3 / 4 / 1e-4 are the
    released values, so a hard-coded value would pass them): other values reach the converted folder's config."""
    config_yaml = yaml_without(
        tmp_path, replace={"noise_std": "0.55", "soft_clip": "2.5", "latent_norm_regularization": "0.02"}
    )
    convert_ml_starflow_checkpoint(FIXTURES / "sf_t2i.pth", tmp_path / "out", config_yaml=config_yaml)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["noise_std"], saved["soft_clip"], saved["latent_norm_regularization"]) == (0.55, 2.5, 0.02)
    assert StarFlowModel.from_pretrained(tmp_path / "out").config.noise_std == 0.55
    # A key the yaml leaves out takes Apple's parser default (soft clip off), as in Apple's own loading.
    config = starflow_config_from_apple(apple_state("sf_t2i"), read_apple_yaml(yaml_without(tmp_path, "soft_clip")))
    assert config.soft_clip == 0.0


def test_yaml_errors_say_what_is_wrong_with_the_yaml(tmp_path, capsys):
    """A yaml without 'arguments:' was 'the config sets sos=0' (or, with sos given, silently taken); a missing key
    was attributed to the yaml ('says head_dim=64', a default it never said); a bad value was a raw float() error
    or a TypeError traceback."""
    pth = FIXTURES / "sf_t2i.pth"
    flat = tmp_path / "flat.yaml"
    flat.write_text("img_size: 64\nchannels: 64\n")
    for config_yaml in (flat, yaml_without(tmp_path, header=False)):
        message = convert_message(capsys, pth, tmp_path / "out", "--config", config_yaml)
        assert f"config {config_yaml} has no 'arguments:' line: it is not an apple/ml-starflow config" in message
    config_yaml = yaml_without(tmp_path, "head_dim")
    message = convert_message(capsys, pth, tmp_path / "out", "--config", config_yaml)
    assert f"config {config_yaml} does not set head_dim, so Apple's default head_dim=64 applies" in message
    assert "weights give head_dim=32; add '- head_dim: 32' to the yaml" in message and "says" not in message
    message = convert_message(capsys, pth, tmp_path / "out", "--config", yaml_without(tmp_path, "sos"))
    assert "does not set sos, so Apple's default sos=0 applies; this port implements" in message
    message = convert_message(capsys, pth, tmp_path / "out", "--config", yaml_without(tmp_path, "layers_per_block",
                              replace={"channels": "128"}))  # fmt: skip
    assert "says channels=128, but the checkpoint's weights give channels=64" in message and "add '" not in message
    message = convert_message(capsys, pth, tmp_path / "out", "--config", yaml_without(tmp_path, "txt_size"))
    assert "does not set txt_size, so Apple's default txt_size=0 applies" in message
    for key, value, expected in (("noise_std", "high", "a finite number >= 0"), ("img_size", "64px", "a whole number")):
        config_yaml = yaml_without(tmp_path, replace={key: value})
        message = convert_message(capsys, pth, tmp_path / "out", "--config", config_yaml)
        assert f"says {key}={value}; expected {expected}" in message
    (tmp_path / "binary.yaml").write_bytes(b"\x80\x81\xff" * 10)
    message = convert_message(capsys, pth, tmp_path / "out", "--config", tmp_path / "binary.yaml")
    assert f"config {tmp_path / 'binary.yaml'} is not a text file" in message
    assert f"config {tmp_path} is not a file" in convert_message(capsys, pth, tmp_path / "out", "--config", tmp_path)
    assert not (tmp_path / "out").exists()


def test_truncated_starflow_checkpoint_is_named_as_such(tmp_path, capsys):
    """Half a STARFlow download was taken for an ml-tarflow checkpoint ('--config ... apply to STARFlow
    checkpoints; ... is a TarFlow one')."""
    data = (FIXTURES / "sf_t2i.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    message = convert_message(capsys, tmp_path / "cut.pth", tmp_path / "out", "--config", FIXTURES / "sf_t2i.yaml")
    assert f"{tmp_path / 'cut.pth'} is truncated or corrupt" in message and "TarFlow" not in message
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_ml_starflow_checkpoint(tmp_path / "cut.pth", FIXTURES / "sf_t2i.yaml")


def test_the_yaml_names_the_text_encoder_and_vae(tmp_path, capsys):
    """A pipeline conversion loads the text encoder and VAE the yaml names (`text`, `vae`), not Apple's released
    ones regardless; a flag still wins, and a name that does not load says where it came from."""
    from tarflow_hf.commands import main
    from tarflow_hf.pipeline_starflow import StarFlowPipeline

    t5, vae = local_components(tmp_path)
    config_yaml = yaml_without(tmp_path, replace={"text": str(t5), "vae": str(vae)})
    out = tmp_path / "pipe"
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(out), "--config", str(config_yaml)]) == 0
    pipe = StarFlowPipeline.from_pretrained(out)
    assert pipe.text_encoder.config.d_model == json.loads((t5 / "config.json").read_text())["d_model"]
    config_yaml = yaml_without(tmp_path, replace={"text": str(tmp_path / "no_t5"), "vae": str(vae)})
    capsys.readouterr()
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(tmp_path / "other"), "--config", str(config_yaml)]) == 2
    message = capsys.readouterr().err
    assert f"could not load the text encoder '{tmp_path / 'no_t5'}', named by config {config_yaml}'s 'text'" in message
    assert main(["convert", str(FIXTURES / "sf_t2i.pth"), str(tmp_path / "other"), "--config", str(config_yaml),
                 "--text-encoder", str(t5)]) == 0  # fmt: skip


# ------------------------------------------------------------------------------- destinations (issue 21)
def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` -> its bytes (None for folders)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


def test_overwrite_never_deletes_an_input(tmp_path, capsys):
    """`tarflow-hf convert OUT/x.pth OUT --overwrite` deleted the checkpoint (for the released model a 15 GB
    download); so did a yaml or license file inside OUT. Refused before anything is read, the files kept."""
    from tarflow_hf.commands import main

    out = tmp_path / "out"
    config_yaml = FIXTURES / "sf_t2i.yaml"
    assert (
        main(["convert", str(FIXTURES / "sf_t2i.pth"), str(out), "--config", str(config_yaml), "--transformer-only"])
        == 0
    )
    shutil.copy(FIXTURES / "sf_t2i.pth", out / "sf_t2i.pth")
    shutil.copy(config_yaml, out / "sf_t2i.yaml")
    shutil.copy(FIXTURES / "README.md", out / "LICENSE_MODEL")
    before = tree(out)
    message = convert_message(capsys, out / "sf_t2i.pth", out, "--config", config_yaml, "--overwrite")
    assert f"refusing to replace {out}: it contains the checkpoint {out / 'sf_t2i.pth'}" in message
    message = convert_message(capsys, FIXTURES / "sf_t2i.pth", out, "--config", out / "sf_t2i.yaml", "--overwrite")
    assert f"it contains the config {out / 'sf_t2i.yaml'}, which replacing it would delete" in message
    message = convert_message(capsys, FIXTURES / "sf_t2i.pth", out, "--config", config_yaml, "--overwrite",
                              "--license-file", out / "LICENSE_MODEL")  # fmt: skip
    assert f"it contains the license file {out / 'LICENSE_MODEL'}" in message
    assert tree(out) == before


def test_overwrite_refuses_a_folder_holding_the_users_files(tmp_path, capsys):
    """`--overwrite` onto an earlier conversion removed every file the user had added there, without a word."""
    out = tmp_path / "out"
    convert_ml_starflow_pipeline(FIXTURES / "sf_t2i.pth", out, config_yaml=FIXTURES / "sf_t2i.yaml",
                                 transformer_only=True)  # fmt: skip
    (out / "notes.txt").write_text("mine")
    (out / "samples").mkdir()
    (out / "samples" / "0.png").write_bytes(b"png")
    (out / "transformer" / "eval.json").write_text("{}")
    before = tree(out)
    message = convert_message(capsys, FIXTURES / "sf_t2i.pth", out, "--config", FIXTURES / "sf_t2i.yaml", "--overwrite")
    assert "it holds what no conversion writes: notes.txt, samples/, transformer/eval.json" in message
    assert tree(out) == before


def test_reverse_never_writes_into_the_converted_folder(tmp_path, capsys):
    from tarflow_hf.commands import main

    folder = tmp_path / "folder"
    convert_ml_starflow_checkpoint(FIXTURES / "sf_variant.pth", folder, config_yaml=FIXTURES / "sf_variant.yaml")
    before = tree(folder)
    for target in (folder / "model.safetensors", folder / "again.pth"):
        capsys.readouterr()
        assert main(["convert", "--reverse", str(folder), str(target), "--overwrite"]) == 2
        assert f"refusing to write {target}: it is inside {folder}" in capsys.readouterr().err
    assert tree(folder) == before
    with pytest.raises(FileExistsError, match="inside"):
        export_ml_starflow_checkpoint(folder, folder / "model.safetensors", overwrite=True)


def test_nan_weights_are_refused_by_every_loader(tmp_path):
    """Only the command line's pipeline conversion checked for NaN; the library's model-folder conversion wrote
    the broken weights."""
    state = apple_state("sf_t2i")
    state["blocks.1.proj_out.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=r"'blocks.1.proj_out.weight' \(inf\)"):
        convert_ml_starflow_checkpoint(tmp_path / "inf.pth", tmp_path / "out", config_yaml=FIXTURES / "sf_t2i.yaml")
    assert not (tmp_path / "out").exists()


def test_transformer_only_card_is_the_hub_card_of_a_model_folder(tmp_path):
    """The card of a converted model folder comes from tarflow_hf.hub (the registry's family facts and license),
    not a hand-written one: generated (so a later conversion may replace it), naming the folder it loads."""
    from tarflow_hf.hub import CARD_MARKER
    from tarflow_hf.registry import APPLE_AMLR

    out = tmp_path / "starflow-small"
    convert_ml_starflow_pipeline(FIXTURES / "sf_t2i.pth", out, config_yaml=FIXTURES / "sf_t2i.yaml",
                                 transformer_only=True, license_file=FIXTURES / "README.md")  # fmt: skip
    card = (out / "transformer" / "README.md").read_text()
    assert (
        CARD_MARKER in card and f"license_name: {APPLE_AMLR.id}" in card and f"license_link: {APPLE_AMLR.link}" in card
    )
    assert STARFLOW.citation in card and STARFLOW.paper in card and APPLE_AMLR.card_text(True) in card
    assert 'StarFlowModel.from_pretrained("starflow-small/transformer")' in card
    assert "format conversion of Apple's STARFlow checkpoint `sf_t2i.pth`" in card and str(tmp_path) not in card
