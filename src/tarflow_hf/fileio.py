"""Writing files and folders so that nobody ever sees half of one: the single place tarflow-hf does it.

Every output (converted pipelines, checkpoints, sample grids, results files, saved pipelines) is written under a
temporary name beside its destination and renamed into place once complete. A rename within one folder is atomic,
so a crash, a full disk or Ctrl-C leaves either the previous output or the new one, never a mix, and a failed
write removes what it made (its temporary, and the parent folders it created).

Conventions:

- Temporaries are named `.{name}.{8 hex digits}.tmp` after their destination `name`; while a folder is replaced,
  the previous one waits under `.{name}.{8 hex digits}.old`. A save into a staging folder (a pipeline saved into
  `atomic_folder`'s temporary merges through another one) makes temporaries of temporaries:
  `..{name}.{hex}.tmp.{hex}.tmp`. A run killed outright (SIGKILL, power loss) cannot clean up, so the next write to
  the same destination removes these leftovers with `clean_stale_temporaries`, which matches only these shapes (any
  depth of them), and puts a previous folder back where a swap was cut between its two renames. This assumes one
  writer per destination at a time, as the rest of the package does.
- What is written gets ordinary permissions: 0o666 / 0o777 less the process umask (0o644 / 0o755 under the usual
  022), as `open()` and `mkdir` make them, executable bits kept. `tempfile.mkstemp`/`mkdtemp`, and some writers
  (safetensors' `save_file` writes 0o600 files), make them private, which for saved weights is a bug; so the
  temporary is created with mode 0o666 / 0o777, the mode the kernel gave it is read back, and that is applied to
  everything written before it is renamed into place. (The umask itself is never read: reading it means setting
  it, which races with other threads.)
- An existing folder is replaced only when the caller allows it (`overwrite`) and `may_replace` agrees it is one
  this program wrote, so a mistyped destination never deletes a user's folder. The old folder is moved aside and
  deleted only once the new one is in place.

Standard library only: every module (and the scripts) may import it cheaply.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_SUFFIX = ".tmp"  # a temporary being written: garbage once its writer is gone
_ASIDE = ".old"  # the previous version of a folder while `_swap` replaces it
# One layer of a temporary's name around the name it stands for: `.{inner}.{8 hex digits}{.tmp|.old}`.
_LAYER = re.compile(rf"\.(?P<inner>.+)\.[0-9a-f]{{8}}(?P<kind>{re.escape(_SUFFIX)}|{re.escape(_ASIDE)})")


def _temporary_name(name: str, suffix: str = _SUFFIX) -> str:
    return f".{name}.{secrets.token_hex(4)}{suffix}"


def _temporary_layers(entry: str) -> tuple[str, list[str]] | None:
    """The destination name a temporary stands for and its layers' kinds, outermost first
    (`..out.{hex}.tmp.{hex}.tmp` -> `("out", [".tmp", ".tmp"])`); None for a name of no temporary."""
    kinds = []
    while (layer := _LAYER.fullmatch(entry)) is not None:
        kinds.append(layer["kind"])
        entry = layer["inner"]
    return (entry, kinds) if kinds else None


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temporaries(folder: str | os.PathLike, name: str | re.Pattern[str]) -> list[Path]:
    """Remove what interrupted writes to `folder/name` left behind and return it: temporaries `.{name}.{8 hex}.tmp`,
    temporaries of those at any depth (`..{name}.{hex}.tmp.{hex}.tmp`), and previous versions `.{name}.{hex}.old`
    that a folder swap had moved aside. Where `name` itself is missing, the swap was cut between its two renames:
    the previous version is put back instead (it is the last complete one). `name` may be a compiled pattern: the
    leftovers of every destination name it matches whole. Nothing else is touched, whatever its name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    matches = name.fullmatch if isinstance(name, re.Pattern) else name.__eq__
    stale: dict[str, list[tuple[Path, list[str]]]] = {}
    for entry in folder.iterdir():
        layers = _temporary_layers(entry.name)
        if layers is not None and matches(layers[0]):
            stale.setdefault(layers[0], []).append((entry, layers[1]))
    removed = []
    for destination, entries in stale.items():
        previous = [entry for entry, kinds in entries if kinds == [_ASIDE]]
        if previous and not (folder / destination).exists() and not (folder / destination).is_symlink():
            newest = max(previous, key=lambda entry: entry.stat().st_mtime_ns)
            os.rename(newest, folder / destination)
            entries = [(entry, kinds) for entry, kinds in entries if entry != newest]
        for entry, _ in entries:
            _remove(entry)
            removed.append(entry)
    return removed


def _new_temporary(path: Path, folder: bool) -> tuple[Path, int]:
    """Create an empty file (or folder) under a fresh temporary name beside `path`; return it and its permission
    bits, those of an ordinary file (folder): 0o666 (0o777) less the umask."""
    for _ in range(100):
        candidate = path.parent / _temporary_name(path.name)
        try:
            if folder:
                candidate.mkdir(0o777)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate, stat.S_IMODE(candidate.stat().st_mode) & 0o777
    raise FileExistsError(f"no free temporary name beside {path}")


def _make_ordinary(tree: Path, folder_mode: int) -> None:
    """Give `tree`, the folders and the executable files in it `folder_mode` (0o777 less the umask), other files
    the same less the executable bits (0o666 less the umask)."""
    os.chmod(tree, folder_mode)
    for root, folders, files in os.walk(tree):
        for name in folders + files:
            entry = os.path.join(root, name)
            if os.path.islink(entry):
                continue
            current = stat.S_IMODE(os.stat(entry).st_mode)
            executable = name in folders or current & 0o111  # as made with mode 0o777, else 0o666
            wanted = folder_mode if executable else folder_mode & 0o666
            if current != wanted:
                os.chmod(entry, wanted)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first) so that a failure can remove them again."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(0o777, exist_ok=True)
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty: someone else put something there meanwhile
            break


@contextmanager
def _temporary_beside(path: Path, folder: bool) -> Iterator[tuple[Path, int]]:
    """A fresh temporary beside `path` (parents made as needed) and its ordinary permission bits; on any exception
    the temporary and those parents go."""
    created = _make_parents(path.parent)
    try:
        clean_stale_temporaries(path.parent, path.name)
        temporary, ordinary = _new_temporary(path, folder)
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield temporary, ordinary
    except BaseException:
        _remove(temporary)
        _remove_created(created)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield the path of an empty temporary file beside `path` to write; when the block ends normally it is renamed
    onto `path` (replacing any file there), on any exception it is removed and `path` is left as it was.

    `mode`: permission bits for the file; by default 0o666 less the umask. Writers that pick a format from the
    file name (PIL, `np.savez`) must be given the format (or an open file), as the temporary ends in `.tmp`.

    ```python
    >>> with atomic_file("results.json") as tmp:
    ...     tmp.write_text(text)
    ```
    """
    path = Path(path)
    with _temporary_beside(path, folder=False) as (temporary, ordinary):
        yield temporary
        os.chmod(temporary, ordinary if mode is None else mode)  # the writer may have replaced the file
        os.replace(temporary, path)


def _check_destination(path: Path, overwrite: bool, may_replace: Callable[[Path], bool] | None, merge: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if merge or not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty")
    if may_replace is not None and not may_replace(path):
        raise FileExistsError(f"refusing to replace {path}: it is not a folder this program wrote")


def _swap(new: Path, path: Path) -> None:
    """Put `new` in place of `path`: an existing `path` is renamed aside first (and put back if the rename of `new`
    fails), then deleted, so there is no moment where neither is complete."""
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
    if not (path.exists() or path.is_symlink()):
        os.rename(new, path)
        return
    aside = path.parent / _temporary_name(path.name, _ASIDE)
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    _remove(aside)


def _merge(staging: Path, target: Path) -> None:
    """Move everything in `staging` into the existing folder `target`: files replace theirs one by one (each
    rename atomic), folders are swapped whole so that no stale file (an old weight shard) survives inside them;
    anything else in `target` stays."""
    for entry in sorted(staging.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            clean_stale_temporaries(target, entry.name)
            _swap(entry, destination)
        else:
            os.replace(entry, destination)


@contextmanager
def atomic_folder(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    may_replace: Callable[[Path], bool] | None = None,
    merge: bool = False,
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; when the block ends normally it becomes `path`, on
    any exception it is removed (with the parent folders made for it) and `path` is left as it was.

    A missing or empty `path` is simply replaced. An existing folder with content is
    - with `merge=True`: kept, and the new folder's entries moved into it (files replace theirs, sub-folders are
      swapped whole, other files stay): for saving into a folder that may also hold the user's files. Each entry
      is replaced atomically, the folder as a whole is not: a failure between two entries leaves some new and
      some old (never a half-written file);
    - otherwise replaced only if `overwrite` and `may_replace(path)` (when given) is true: pass a test that
      recognises the folders this program writes, so that a mistyped destination never deletes a user's folder.
      The check runs before the block (so no work is wasted) and again before the swap. The old folder is renamed
      aside and deleted after the new one is in place.
    Raises FileExistsError when `path` is refused or is not a folder.

    ```python
    >>> with atomic_folder("out", overwrite=True, may_replace=lambda p: (p / "model_index.json").is_file()) as tmp:
    ...     pipeline.save_pretrained(tmp)
    ```
    """
    path = Path(path)
    clean_stale_temporaries(path.parent, path.name)  # first: it may put back the folder a killed swap moved aside
    _check_destination(path, overwrite, may_replace, merge)
    with _temporary_beside(path, folder=True) as (staging, ordinary):
        try:
            yield staging
            _make_ordinary(staging, ordinary)
            _check_destination(path, overwrite, may_replace, merge)  # it may have appeared meanwhile
            if merge and path.is_dir() and any(path.iterdir()):
                _merge(staging, path)
            else:
                _swap(staging, path)
        finally:
            _remove(staging)  # after a merge, the emptied staging folder; after a swap, nothing


def discard(path: str | os.PathLike) -> None:
    """Delete a file or folder tree so that no part of it is ever left under its name: it is renamed to a temporary
    name first, which `clean_stale_temporaries` removes should the deletion be cut short."""
    path = Path(path)
    doomed = path.parent / _temporary_name(path.name)
    os.rename(path, doomed)
    _remove(doomed)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `data` as JSON (with a final newline) to `path` atomically (see `atomic_file`)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


__all__ = [
    "atomic_file",
    "atomic_folder",
    "clean_stale_temporaries",
    "discard",
    "write_json_atomic",
    "write_text_atomic",
]
