"""Class-name tables for TarFlow models: the label sets shipped with the package and user label files.

Shipped tables (in `tarflow_hf/label_tables/`, JSON objects `{"0": name, "1": name, ...}` like a config's `id2label`):

- `afhq`: the three AFHQ classes in the order of their training folders: `cat`, `dog`, `wild`.
- `imagenet`: the 1000 ImageNet-1k classes in the standard order (synsets sorted by WordNet id), each named by
  the first lemma of its synset, as image classifiers on the Hub name them (0 `tench`, 207 `golden retriever`,
  999 `toilet tissue`).

Two pairs of ImageNet classes share their first lemma (134 and 517 are both "crane", a bird and a machine; 638
and 639 are both "maillot", tights and a swimsuit). A config's `label2id` needs one name per class, so every
name that occurs more than once gets its index appended: `crane (134)`, `crane (517)`, `maillot (638)`,
`maillot (639)`. The same rule, `disambiguate`, applies to user label files.

Example:

```python
>>> from tarflow_hf.labels import resolve_labels
>>> resolve_labels("afhq")
['cat', 'dog', 'wild']
>>> resolve_labels("imagenet")[207]
'golden retriever'
>>> resolve_labels("none") is None
True
```
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHIPPED_LABEL_SETS = ("afhq", "imagenet")
LABEL_CHOICES = (*SHIPPED_LABEL_SETS, "none")
# The class id of the unconditional (mean-class) branch, and how captions and menus name it.
UNCONDITIONAL_ID = -1
UNCONDITIONAL_CAPTION = "unconditional"
_INTEGER = re.compile(r"-?\d+")


def disambiguate(names: Sequence[str]) -> list[str]:
    """Make names unique: every name that occurs more than once gets ` (index)` appended, at each occurrence.

    ```python
    >>> disambiguate(["crane", "dog", "crane"])
    ['crane (0)', 'dog', 'crane (2)']
    ```
    """
    counts = Counter(names)
    unique = [f"{name} ({index})" if counts[name] > 1 else name for index, name in enumerate(names)]
    clashes = sorted(name for name, count in Counter(unique).items() if count > 1)
    if clashes:
        # Only possible when a name already looks like "x (i)" for another x at index i.
        raise ValueError(f"class names are still not unique after appending indices: {clashes}")
    return unique


def names_from_json(data: Any, source: str) -> list[str]:
    """Class names, in index order, from parsed JSON: a list of names, an `id2label`-style object
    `{"0": name, ...}`, or a config-like object with an `id2label` entry."""
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        data = data["id2label"]
    if isinstance(data, dict):
        try:
            indexed = {int(key): value for key, value in data.items()}
        except (TypeError, ValueError):
            keys = [key for key in data if not str(key).lstrip("-").isdigit()]
            raise ValueError(
                f"{source}: object keys must be class indices '0'..'{len(data) - 1}', got {keys[:3]}"
            ) from None
        if sorted(indexed) != list(range(len(indexed))):
            missing = sorted(set(range(len(indexed))) - set(indexed))
            raise ValueError(
                f"{source}: class indices must be exactly 0..{len(indexed) - 1}; missing {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        names = [indexed[index] for index in range(len(indexed))]
    elif isinstance(data, list):
        names = data
    else:
        raise ValueError(
            f"{source}: expected a JSON list of class names or an object {{'0': name, ...}}, got {type(data).__name__}"
        )
    bad = [(index, name) for index, name in enumerate(names) if not isinstance(name, str) or not name.strip()]
    if bad:
        index, name = bad[0]
        raise ValueError(f"{source}: class {index} has name {name!r}; every name must be a non-empty string")
    return list(names)


def load_label_file(path: str | Path) -> list[str]:
    """Class names from a JSON file (see `names_from_json` for the accepted layouts), made unique with
    `disambiguate` (with a warning when that renames anything)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"label file {path} is not valid JSON: {error}") from None
    names = names_from_json(data, f"label file {path}")
    unique = disambiguate(names)
    renamed = [f"{old!r} -> {new!r}" for old, new in zip(names, unique, strict=True) if old != new]
    if renamed:
        logger.warning("label file %s repeats class names; renamed %s", path, ", ".join(renamed))
    return unique


def load_label_set(name: str) -> list[str]:
    """One of the shipped tables, `afhq` or `imagenet`, in class-index order."""
    if name not in SHIPPED_LABEL_SETS:
        raise ValueError(f"unknown label set {name!r}; shipped sets are {', '.join(SHIPPED_LABEL_SETS)}")
    text = resources.files("tarflow_hf").joinpath("label_tables", f"{name}_classes.json").read_text(encoding="utf-8")
    return names_from_json(json.loads(text), f"shipped label set {name!r}")


def resolve_labels(spec: str) -> list[str] | None:
    """`afhq` | `imagenet` -> that table; `none` -> None (no names); anything else is a JSON file path."""
    if spec == "none":
        return None
    if spec in SHIPPED_LABEL_SETS:
        return load_label_set(spec)
    if not spec.endswith(".json") and not Path(spec).exists():
        raise ValueError(f"--labels must be one of {', '.join(LABEL_CHOICES)} or a .json file, got {spec!r}")
    return load_label_file(spec)


# ------------------------------------------------------------------------------------ names <-> class ids
# One path for every caller (the pipeline, the command line, the demo, evaluation): a class is named by its id or
# by any of the comma-separated aliases of its `id2label` entry (ImageNet style, `"tench, Tinca tinca"`).


def normalize_name(name: str) -> str:
    """Spaces collapsed: the form aliases are stored and compared in (comparison also ignores case)."""
    return " ".join(name.split())


def aliases(id2label: Mapping[int, str]) -> dict[str, list[int]]:
    """Alias (spaces normalised) -> the class ids it names, usually one."""
    table: dict[str, list[int]] = {}
    for class_id, name in sorted(id2label.items()):
        for alias in name.split(","):
            alias = normalize_name(alias)
            if alias and class_id not in table.setdefault(alias, []):
                table[alias].append(class_id)
    return table


def label2id(id2label: Mapping[int, str]) -> dict[str, int]:
    """Every accepted name (each alias separately) -> class id, sorted by name (as `DiTPipeline.labels`); a name
    shared by several classes maps to the first."""
    return {alias: ids[0] for alias, ids in sorted(aliases(id2label).items())}


def display_name(id2label: Mapping[int, str], class_id: int) -> str:
    """The short name of a class for captions: its first alias, or `unconditional` for -1."""
    if class_id == UNCONDITIONAL_ID:
        return UNCONDITIONAL_CAPTION
    return normalize_name(id2label[class_id].split(",")[0])


def ids_for_names(id2label: Mapping[int, str], names: str | Sequence[str]) -> list[int]:
    """Class names -> class ids, ignoring case and extra spaces. An unknown name raises a `ValueError` listing the
    closest known names; a name several classes share raises one listing them (`id: 'name'`), to pass an id."""
    names = [names] if isinstance(names, str) else list(names)
    if not id2label:
        raise ValueError("this model is unconditional (num_classes=0): it has no class names")
    table = aliases(id2label)
    lookup: dict[str, list[int]] = {}
    for alias, alias_ids in table.items():
        matches = lookup.setdefault(alias.casefold(), [])
        matches.extend(class_id for class_id in alias_ids if class_id not in matches)
    ids = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"class names must be strings, got {name!r}")
        matches = lookup.get(normalize_name(name).casefold())
        if not matches:
            raise ValueError(
                f"unknown class name {name!r}: {_suggestion(name, table)} (the model has {len(table)} class names)"
            )
        if len(matches) > 1:
            options = "; ".join(f"{i}: {id2label[i]!r}" for i in matches)
            raise ValueError(f"class name {name!r} is ambiguous, it names classes {options}; pass the class id")
        ids.append(matches[0])
    return ids


def _suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    return f"did you mean {', '.join(map(repr, close))}?" if close else "no similar name exists"


def parse_label(text: str) -> int | str:
    """A label typed on a command line or in a text field: an integer is a class id, anything else a name."""
    text = text.strip()
    return int(text) if _INTEGER.fullmatch(text) else text


def resolve_class_ids(id2label: Mapping[int, str], num_classes: int, items: Sequence[Any] | Any) -> list[int]:
    """Class ids (ints) and names (strings), mixed -> ids, checked against `num_classes`; -1 is the unconditional
    branch. Raises `ValueError` with what to pass instead."""
    if num_classes == 0:
        raise ValueError(
            f"this model is unconditional (num_classes=0) and takes no class labels; got {items!r}, "
            "pass class_labels=None"
        )
    if not items:
        raise ValueError("class_labels is empty; pass at least one label, or None for the unconditional branch")
    names = [item for item in items if isinstance(item, str)]
    named = iter(ids_for_names(id2label, names)) if names else iter(())
    ids = []
    for item in items:
        if isinstance(item, str):
            ids.append(next(named))
        elif _is_integer(item):
            ids.append(int(item))
        else:
            raise ValueError(f"class labels must be ints (class ids) or strings (class names), got {item!r}")
    bad = [class_id for class_id in ids if not UNCONDITIONAL_ID <= class_id < num_classes]
    if bad:
        raise ValueError(
            f"class label {bad[0]} is out of range; allowed are 0..{num_classes - 1}, or -1 for the "
            "unconditional (mean-class) branch"
        )
    return ids


def _is_integer(item: Any) -> bool:
    """int or a numpy integer, but not bool (checked without importing numpy)."""
    if isinstance(item, bool):
        return False
    return isinstance(item, int) or (hasattr(item, "__index__") and type(item).__module__ == "numpy")


def menu_names(id2label: Mapping[int, str]) -> list[str]:
    """One unique entry per class, in id order, for menus: a name several classes share gets ` (id)` appended
    (`disambiguate`, the rule label files follow)."""
    return disambiguate([normalize_name(id2label[class_id]) for class_id in sorted(id2label)])


def id_from_text(id2label: Mapping[int, str], text: str) -> int:
    """A class picked from `menu_names` or typed: a menu entry, an id, `name (id)`, or any alias of a name."""
    text = normalize_name(text)
    menu = menu_names(id2label)
    if text in menu:
        return sorted(id2label)[menu.index(text)]
    numbered = re.fullmatch(r".* \((\d+)\)", text) or re.fullmatch(r"(\d+)", text)
    if numbered:
        class_id = int(numbered.group(1))
        if class_id not in id2label:
            raise ValueError(f"class id {class_id} is out of range: this model has classes 0..{len(id2label) - 1}")
        return class_id
    return ids_for_names(id2label, text)[0]


__all__ = [
    "LABEL_CHOICES",
    "SHIPPED_LABEL_SETS",
    "UNCONDITIONAL_CAPTION",
    "UNCONDITIONAL_ID",
    "aliases",
    "disambiguate",
    "display_name",
    "id_from_text",
    "ids_for_names",
    "label2id",
    "load_label_file",
    "load_label_set",
    "menu_names",
    "names_from_json",
    "normalize_name",
    "parse_label",
    "resolve_class_ids",
    "resolve_labels",
]
