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

import json
import logging
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHIPPED_LABEL_SETS = ("afhq", "imagenet")
LABEL_CHOICES = (*SHIPPED_LABEL_SETS, "none")


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


__all__ = [
    "LABEL_CHOICES",
    "SHIPPED_LABEL_SETS",
    "disambiguate",
    "load_label_file",
    "load_label_set",
    "names_from_json",
    "resolve_labels",
]
