"""What the two Apple-checkpoint converters share, below both (`tarflow_hf.convert` for apple/ml-tarflow,
`tarflow_hf.convert_starflow` for apple/ml-starflow; neither imports the other): reading Apple's `.pth` files safely,
checking weights against a configuration, reading a converted folder back, and deciding where a conversion may write.

- **Reading `.pth` files.** `load_apple_state_dict` uses `torch.load(weights_only=True, mmap=True)`: only tensors and
  plain containers are unpickled (a file that would run code is refused, naming the function it calls), and the
  tensors stay in the memory-mapped file, so a conversion holds a single copy of the weights. A truncated download
  is named as such.
- **Checking weights.** `check_state_dict` names every missing, unexpected and mis-shaped key at once;
  `check_weight_values` refuses integer and NaN / infinite weights. Models are built on the meta device
  (`meta_model`) and take the checked tensors as they are.
- **Reading converted folders** (`--reverse`): `read_converted_folder` finds the model folder (a pipeline's
  `transformer/`), reads its config and every safetensors shard, and checks one against the other.
- **Destinations.** A conversion never writes over or deletes its own inputs (`check_output_folder`,
  `check_output_file`: an output may not lie inside an input nor an input inside the output), and `--overwrite`
  replaces only a folder a conversion wrote, as a whole. A folder that also holds anything a conversion does not
  write (the user's `notes.txt`, `samples/`, a `.git`, a card they edited) is refused, naming those entries, rather
  than merged into or emptied: the user moves them out, nothing is deleted behind their back. `--reverse
  --overwrite` replaces only a PyTorch checkpoint file.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedConfig

from .fileio import atomic_file
from .registry import STARFLOW, TARFLOW, ModelFamily, family_of_folder, is_flow_folder, read_json_object

# A model and a config class, for `meta_model` and `read_model_config`.
ModelT = TypeVar("ModelT", bound=torch.nn.Module)
ConfigT = TypeVar("ConfigT", bound=PreTrainedConfig)
# How every torch.save file starts: a zip archive (torch >= 1.6), or the legacy format's pickled magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
# Globals a torch.save pickle calls to rebuild tensors and ordered dicts (anything else is code to run).
_SAFE_PICKLE_MODULES = ("torch.", "collections.OrderedDict", "_codecs.encode")
# What `save_pretrained` writes into a model folder besides the code (`auto_map`'s modules and their imports).
_MODEL_FOLDER_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
_WEIGHT_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)


def list_keys(keys: Sequence[str], limit: int = 6) -> str:
    """The first `limit` keys, quoted, and how many more there are."""
    shown = ", ".join(repr(key) for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------- reading .pth
def _pickled_call(path: Path) -> str | None:
    """The function a plain (not torch.save) pickle file calls when unpickled, if any: `module.name` of its first
    GLOBAL / STACK_GLOBAL followed by a call (REDUCE, OBJ, INST, NEWOBJ). Read without unpickling (pickletools)."""
    import pickletools

    if zipfile.is_zipfile(path):
        return None
    strings: list[str] = []
    name = None
    try:
        with path.open("rb") as handle:
            for opcode, argument, _ in pickletools.genops(handle):
                if isinstance(argument, str):
                    strings.append(argument)
                if opcode.name in ("GLOBAL", "INST"):
                    name = str(argument).replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if opcode.name in ("REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "INST") and name:
                    if not name.startswith(_SAFE_PICKLE_MODULES):  # tensors and ordered dicts are rebuilt by calls
                        return name
                    name = None
    except Exception:  # not a pickle at all: the caller's message stands
        return None
    return None


def _looks_like_torch_save(path: Path) -> bool:
    """The file starts as torch.save files do (whether or not the rest of it is there)."""
    with path.open("rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_MAGIC))
    return head.startswith(_ZIP_MAGIC) or head == _LEGACY_TORCH_MAGIC


def is_torch_checkpoint_file(path: str | os.PathLike) -> bool:
    """True for a complete torch.save file (a zip archive holding `data.pkl`, or the legacy format's magic number):
    what `--reverse --overwrite` may replace."""
    path = Path(path)
    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/data.pkl") for name in archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    with path.open("rb") as handle:
        return handle.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC


def _unreadable(path: Path, error: Exception) -> ValueError:
    """The one-line error for a file torch.load refused (not for safety)."""
    size = path.stat().st_size
    if size == 0:
        return ValueError(f"{path} is empty (0 bytes); expected a .pth file written by torch.save(model.state_dict())")
    if _looks_like_torch_save(path):  # the start of a torch.save file, but its rest is missing or damaged
        return ValueError(
            f"{path} is truncated or corrupt: it starts as a torch.save file but cannot be read to its end "
            f"({size:,} bytes on disk); download or copy it again"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ValueError(
        f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {first_line}); expected a .pth file written by "
        "torch.save(model.state_dict())"
    )


def _torch_load(path: Path) -> Any:
    """torch.load that only ever unpickles tensors and plain containers, memory-mapped when the format allows."""
    # Only the zip format (torch >= 1.6) can be memory-mapped; Apple's checkpoints use it.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        message = str(error)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", message)
        called = unsafe.group(1) or unsafe.group(2) if unsafe else _pickled_call(path)
        if called:
            raise ValueError(
                f"refused: the file tries to run code (unsafe pickle): {path} calls {called} when unpickled; only "
                "plain state dicts of tensors (torch.save(model.state_dict())) are loaded, with "
                "torch.load(weights_only=True)"
            ) from None
        if _looks_like_torch_save(path) and re.search(r"truncated|EOF|[Rr]an out of input", message):
            raise _unreadable(path, error) from None
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]*(?:\n\n[^\n]+)?)", message)
        detail = " ".join(reason.group(1).split()) if reason and reason.group(1).strip() else "not a torch.save file"
        raise ValueError(
            f"{path} is not a PyTorch state dict that torch.load(weights_only=True) can read ({detail})"
        ) from None
    except Exception as error:  # torch raises KeyError, RuntimeError, EOFError... on arbitrary bytes
        raise _unreadable(path, error) from None


def load_apple_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an Apple `.pth` safely (`weights_only=True`, memory-mapped) and check it is a flat dict of tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(
            f"checkpoint {path} is a directory; expected an Apple .pth file (to turn a converted folder back into a "
            ".pth, use --reverse)"
        )
    state = _torch_load(path)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not a state dict; expected the dict written by "
            "torch.save(model.state_dict())"
        )
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} is not a model state dict: the entries {list_keys(not_tensors)} are not tensors (a training "
            "checkpoint or optimizer state?); expected the dict written by torch.save(model.state_dict())"
        )
    return dict(state)


def save_apple_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """`torch.save(state, path)`, atomically (a failure leaves whatever was at `path`)."""
    with atomic_file(path) as temporary:
        torch.save(dict(state), temporary)
    return path


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is an existing file; else a one-line error naming `what` it should be."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    return path


# ------------------------------------------------------------------------------------------- which family
def is_starflow_state_dict(keys: Iterable[str]) -> bool:
    """True for the keys of an apple/ml-starflow state dict (start tokens, final RMSNorms), as opposed to an
    ml-tarflow one."""
    return any(str(key).endswith((".sos_embed", ".final_norm.weight")) for key in keys)


def source_family(path: str | os.PathLike) -> ModelFamily:
    """The family whose converter takes `path`: STARFlow for an apple/ml-starflow `.pth` (by its keys, read
    memory-mapped) or a STARFlow folder (as `tarflow_hf.registry` recognises it); else TarFlow, whose converter
    then says what is wrong with a missing path or another folder. A file that is no readable checkpoint
    (truncated, unsafe, not a state dict) raises its one-line error here, rather than passing for a TarFlow one."""
    path = Path(path)
    if path.is_dir():
        try:
            return family_of_folder(path)
        except (OSError, ValueError):
            return TARFLOW
    if not path.exists():
        return TARFLOW
    return STARFLOW if is_starflow_state_dict(load_apple_state_dict(path)) else TARFLOW


# ------------------------------------------------------------------------------------------- checking weights
def state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of a state dict (tensors, or anything with a `.shape`) and its shape, in the state dict's order."""
    return {str(key): tuple(tensor.shape) for key, tensor in state.items()}


def key_indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
    """The distinct numbers the first group of `pattern` matches among the keys (block indices, say), sorted."""
    regex = re.compile(pattern)
    return sorted({int(match.group(1)) for key in shapes if (match := regex.match(key))})


def shape_of(
    shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, source: str, origin: str, purpose: str = ""
) -> tuple[int, ...]:
    """The shape of `key`, which must exist with `ndim` dimensions; else a ValueError naming the `source`, the
    `purpose` of the key and the repository (`origin`) whose state dicts have it."""
    what = f" ({purpose})" if purpose else ""
    if key not in shapes:
        raise ValueError(f"{source} has no key {key!r}{what}; is it an {origin} state dict?")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"{source}: {key!r} has shape {shape}; expected {ndim} dimensions{what}")
    return shape


def check_state_dict(
    state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str, target: str
) -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key of `state` (tensors, or anything
    with a `.shape`) against `expected`."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key!r} is {tuple(state[key].shape)}, expected {expected[key]}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {list_keys(unexpected)}")
    if mismatched:
        problems.append("wrong shapes: " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    if problems:
        raise ValueError(f"{source} does not match {target}: " + "; ".join(problems))


def non_finite_weights(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN or infinite values (meta tensors are not read)."""
    return [
        f"{key!r} ({'NaN' if tensor.isnan().any() else 'inf'})"
        for key, tensor in state.items()
        if tensor.is_floating_point() and not tensor.is_meta and not tensor.isfinite().all()
    ]


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN / infinite weights up front: sampling would otherwise only report non-finite output."""
    bad = non_finite_weights(state)
    if bad:
        raise ValueError(f"{source} holds NaN or infinite weights: {list_keys(bad)}; the checkpoint is broken")


def check_weight_values(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Every weight a floating-point tensor, none NaN or infinite."""
    not_float = [f"{key!r} ({tensor.dtype})" for key, tensor in state.items() if not tensor.is_floating_point()]
    if not_float:
        raise ValueError(f"{source}: every weight must be a floating-point tensor; got {', '.join(not_float[:6])}")
    check_finite(state, source)


def meta_model(model_class: Callable[[Any], ModelT], config: Any) -> ModelT:
    """`model_class(config)` on the meta device: parameters there have shapes but no storage, so building even the
    largest model is free."""
    with torch.device("meta"):
        return model_class(config)


# --------------------------------------------------------------------------------------- converted folders
def check_folder(folder: Path, expected: str) -> None:
    """Refuse a `folder` that is missing or is not a folder (`--reverse` takes `expected`)."""
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; --reverse takes {expected}")


def model_directory(folder: Path, family_title: str) -> Path:
    """The model folder of a converted folder: a pipeline's (or a `--transformer-only` output's) `transformer/`,
    or `folder` itself when it is a model folder."""
    check_folder(folder, f"a converted {family_title} pipeline or model folder")
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is neither a {family_title} pipeline folder (model_index.json + transformer/) nor a model "
            "folder (config.json + model.safetensors)"
        )
    return folder


def read_model_config(model_dir: Path, config_class: type[ConfigT]) -> ConfigT:
    """`model_dir/config.json` as a `config_class`, refused when unreadable or another family's."""
    config_file = model_dir / "config.json"
    model_type = read_json_object(config_file).get("model_type")  # not JSON: a ValueError naming the file
    if model_type != config_class.model_type:
        raise ValueError(f"{config_file} is a {model_type!r} config, not a {config_class.model_type!r} one")
    try:
        return config_class.from_json_file(config_file)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read {config_file}: {error}") from None


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The exact stored tensors (dtypes as saved) of a model folder: `model.safetensors`, or every shard its
    `model.safetensors.index.json` names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object naming the weight files")
        files = sorted(set(map(str, weight_map.values())))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not (model_dir / file).is_file():
            raise FileNotFoundError(f"no {file} in {model_dir} (its model.safetensors.index.json names it)")
        try:
            state.update(load_file(model_dir / file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read weights {model_dir / file}: {error}") from None
    return state


def read_converted_folder(
    folder: str | os.PathLike,
    config_class: type[ConfigT],
    expected_shapes: Callable[[ConfigT], Mapping[str, tuple[int, ...]]],
    family_title: str,
) -> tuple[ConfigT, dict[str, torch.Tensor]]:
    """The config and the exact stored tensors of a converted pipeline or model folder, checked against each other
    (`expected_shapes(config)`: every key of the model's state dict and its shape)."""
    model_dir = model_directory(Path(folder), family_title)
    config = read_model_config(model_dir, config_class)
    state = read_safetensors(model_dir)
    check_state_dict(state, expected_shapes(config), f"the weights in {model_dir}", "its config.json")
    return config, state


# ------------------------------------------------------------------------------------------- destinations
def _absolute_forms(path: str | os.PathLike) -> set[Path]:
    """`path` made absolute as written (`..` folded, links kept) and with every link resolved."""
    return {Path(os.path.abspath(path)), Path(path).resolve()}


def lies_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """`path` is `folder` or lies inside it, as written or through symbolic links."""
    return any(inner.is_relative_to(outer) for inner in _absolute_forms(path) for outer in _absolute_forms(folder))


def _local_inputs(inputs: Mapping[str, str | os.PathLike | None]) -> dict[str, Path]:
    """The inputs that are local paths (a Hub id such as `google/flan-t5-xl` names no file here)."""
    return {what: Path(path) for what, path in inputs.items() if path is not None and Path(path).exists()}


def _code_files(folder: Path, modules: set[str]) -> set[str]:
    """The `.py` files of `modules` in `folder` and, transitively, of the sibling modules they import relatively:
    the remote code a saved folder carries (whatever tarflow-hf version wrote it)."""
    found: set[str] = set()
    pending = list(modules)
    while pending:
        module = pending.pop()
        file = folder / f"{module}.py"
        if module in found or not file.is_file():
            continue
        found.add(module)
        pending += _RELATIVE_IMPORT.findall(file.read_text(encoding="utf-8", errors="replace"))
    return {f"{module}.py" for module in found}


def _is_generated_card(path: Path) -> bool:
    from .hub import is_generated_card

    return is_generated_card(path)


def _written_by_conversions(entry: Path, expected: set[str]) -> bool:
    """`entry` is something a conversion writes: one of the `expected` names, a weight shard, a generated card."""
    if entry.name == "README.md":
        return entry.is_file() and _is_generated_card(entry)
    return entry.name in expected or _WEIGHT_SHARD.fullmatch(entry.name) is not None


def _model_folder_strays(folder: Path, prefix: str = "") -> list[str]:
    """What a model folder holds besides its config, weights, generated card, LICENSE and code."""
    try:
        auto_map = read_json_object(folder / "config.json").get("auto_map") or {}
    except (OSError, ValueError):
        auto_map = {}
    modules = {str(entry).split(".")[0] for entry in auto_map.values()} if isinstance(auto_map, dict) else set()
    expected = _MODEL_FOLDER_FILES | {"LICENSE"} | _code_files(folder, modules)
    return [_shown(entry, prefix) for entry in sorted(folder.iterdir()) if not _written_by_conversions(entry, expected)]


def _shown(entry: Path, prefix: str) -> str:
    return f"{prefix}{entry.name}{'/' if entry.is_dir() else ''}"


def _pipeline_folder_strays(folder: Path) -> list[str]:
    """What a pipeline folder holds besides its index, generated card, LICENSE, code and component folders (the
    transformer's checked as a model folder; T5, tokenizer and VAE folders are whole standard components)."""
    index = read_json_object(folder / "model_index.json")
    components = {name for name, value in index.items() if isinstance(value, list) and len(value) == 2}
    entry_class = index.get("_class_name")
    modules = {str(entry_class[0])} if isinstance(entry_class, list) and entry_class else set()
    expected = {"model_index.json", "LICENSE", "transformer"} | components | _code_files(folder, modules)
    strays = [_shown(entry, "") for entry in sorted(folder.iterdir()) if not _written_by_conversions(entry, expected)]
    if (folder / "transformer" / "config.json").is_file():
        strays += _model_folder_strays(folder / "transformer", "transformer/")
    return strays


def entries_no_conversion_writes(folder: str | os.PathLike) -> list[str]:
    """The entries of a TarFlow/STARFlow pipeline, model or `--transformer-only` folder that no conversion writes
    (folders end in `/`): the user's files, which replacing the folder would delete."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return _pipeline_folder_strays(folder)
    if (folder / "config.json").is_file():
        return _model_folder_strays(folder)
    strays = [_shown(entry, "") for entry in sorted(folder.iterdir()) if entry.name != "transformer"]
    return strays + _model_folder_strays(folder / "transformer", "transformer/")


def _inputs_inside(folder: Path, inputs: Mapping[str, str | os.PathLike | None]) -> str | None:
    inside = [f"{what} {path}" for what, path in _local_inputs(inputs).items() if lies_within(path, folder)]
    return f"it contains {inside[0]}, which replacing it would delete" if inside else None


def _refusal(folder: Path, inputs: Mapping[str, str | os.PathLike | None]) -> str | None:
    """Why `--overwrite` may not replace the existing, non-empty `folder` (None: it may)."""
    reason = _inputs_inside(folder, inputs)
    if reason is None and not is_flow_folder(folder):
        reason = (
            "it is not a TarFlow/STARFlow pipeline or model folder (no model_index.json naming TarFlowPipeline or "
            "StarFlowPipeline, nor a config.json with model_type tarflow or starflow); remove it yourself or choose "
            "another output directory"
        )
    if reason is None and (strays := entries_no_conversion_writes(folder)):
        reason = (
            f"it holds what no conversion writes: {', '.join(strays[:8])}{' ...' if len(strays) > 8 else ''} "
            "(--overwrite replaces the whole folder); move them elsewhere first, or choose another output directory"
        )
    return None if reason is None else f"refusing to replace {folder}: {reason}"


def replaceable_output(inputs: Mapping[str, str | os.PathLike | None]) -> Callable[[Path], bool]:
    """`atomic_folder`'s `may_replace` for a conversion reading `inputs`: the test `check_output_folder` makes."""
    return lambda folder: _refusal(folder, inputs) is None


def check_output_folder(
    folder: str | os.PathLike, overwrite: bool, inputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Refuse, before any work, an output folder a conversion may not write: a non-folder; a non-empty folder
    without `overwrite`; and with it one that contains an input (`inputs`: what it is, e.g. "the checkpoint" ->
    path), is not a TarFlow/STARFlow folder, or holds anything a conversion does not write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"output {folder} exists and is not a directory")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output directory {folder} exists and is not empty; pass --overwrite to replace it")
    reason = _refusal(folder, inputs)
    if reason is not None:
        raise FileExistsError(reason)


def _same_file_as_any(path: Path, folder: Path) -> bool:
    """`path` is (through links) one of the files under `folder`: a Hub cache snapshot links to its blobs."""
    if not path.exists():
        return False
    target = path.resolve()
    return any(file.resolve() == target for file in folder.rglob("*") if file.is_file())


def check_output_file(path: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None) -> Path:
    """Refuse, before any work, a `.pth` destination of `--reverse`: a folder; a file inside the converted folder
    `source` (or one of its files, through links); an existing file without `overwrite`, or with it one that is not
    a PyTorch checkpoint (`--overwrite` replaces an earlier .pth, never another file)."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"output {path} is a directory; give a .pth file path")
    source = Path(source) if source is not None else None
    if source is not None and source.is_dir() and (lies_within(path, source) or _same_file_as_any(path, source)):
        raise FileExistsError(f"refusing to write {path}: it is inside {source}, the folder being converted")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output file {path} exists; pass --overwrite to replace it")
    if path.exists() and not is_torch_checkpoint_file(path):
        raise FileExistsError(
            f"refusing to replace {path}: it is not a PyTorch checkpoint (--overwrite replaces only an earlier .pth); "
            "remove it yourself or choose another file name"
        )
    return path


__all__ = [
    "check_finite",
    "check_folder",
    "check_input_file",
    "check_output_file",
    "check_output_folder",
    "check_state_dict",
    "check_weight_values",
    "entries_no_conversion_writes",
    "is_starflow_state_dict",
    "is_torch_checkpoint_file",
    "key_indices",
    "lies_within",
    "list_keys",
    "load_apple_state_dict",
    "meta_model",
    "model_directory",
    "non_finite_weights",
    "read_converted_folder",
    "read_model_config",
    "read_safetensors",
    "replaceable_output",
    "save_apple_state_dict",
    "shape_of",
    "source_family",
    "state_shapes",
]
