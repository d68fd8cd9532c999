"""tarflow_hf.fileio: atomic writes leave the old output or the new one, never a mix nor debris; folders this program
did not write are never deleted; written files have ordinary permissions; stale temporaries are cleaned by pattern."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import textwrap
from pathlib import Path

import pytest
from conftest import kill_when_ready

from tarflow_hf import fileio
from tarflow_hf.fileio import (
    atomic_file,
    atomic_folder,
    clean_stale_temporaries,
    discard,
    write_json_atomic,
    write_text_atomic,
)


def tree(folder: Path) -> dict[str, str | None]:
    """Every path under `folder` -> its text (None for folders)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_text() for path in sorted(folder.rglob("*"))
    }


def disk_full(path: Path) -> None:
    """A writer that gets half way, then finds the disk full."""
    path.write_text("half")
    raise OSError(errno.ENOSPC, "No space left on device")


def is_ours(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "tarflow"
    except (OSError, ValueError):
        return False


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------------ files
def test_atomic_file_replaces_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_file(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".a.txt.") and temporary.suffix == ".tmp"
        assert temporary.exists() and target.read_text() == "old"  # nothing visible until the block ends
        temporary.write_text("new")
    assert tree(tmp_path) == {"a.txt": "new"}
    assert write_text_atomic(tmp_path / "b.txt", "text") == tmp_path / "b.txt"
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": 2}, sort_keys=True)
    assert (tmp_path / "c.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_file_write_leaves_the_old_file_and_no_debris(tmp_path, error):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(type(error)), atomic_file(target) as temporary:
        temporary.write_text("half")
        raise error
    assert tree(tmp_path) == {"a.txt": "old"}

    new = tmp_path / "made" / "for" / "it.txt"
    with pytest.raises(OSError), atomic_file(new) as temporary:
        disk_full(temporary)
    assert tree(tmp_path) == {"a.txt": "old"}  # the parent folders made for it are gone too


def test_failed_rename_leaves_no_debris(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError), atomic_file(tmp_path / "folder") as temporary:
        temporary.write_text("x")
    assert tree(tmp_path) == {"folder": None}


def test_unwritable_folder_leaves_no_parents(tmp_path, monkeypatch):
    """Where no temporary can be made (a read-only or full file system), the parents made for it go again."""

    def refuse(path, folder):
        raise PermissionError(f"read-only file system: {path.parent}")

    monkeypatch.setattr(fileio, "_new_temporary", refuse)
    for write in (atomic_file, atomic_folder):
        with pytest.raises(PermissionError), write(tmp_path / "a" / "b" / "out"):
            raise AssertionError("never runs")
    assert tree(tmp_path) == {}


def test_file_permissions_follow_the_umask(tmp_path, umask):
    write_text_atomic(tmp_path / "ordinary.txt", "x")
    assert mode(tmp_path / "ordinary.txt") == 0o644  # not mkstemp's private 0o600
    umask(0o077)
    write_text_atomic(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600
    with atomic_file(tmp_path / "explicit.sh", mode=0o750) as temporary:
        temporary.write_text("x")
    assert mode(tmp_path / "explicit.sh") == 0o750


def test_private_files_from_writers_are_made_ordinary(tmp_path, umask):
    """safetensors' save_file (and mkstemp) make 0o600 files; what fileio publishes is ordinary."""
    import torch
    from safetensors.torch import save_file

    with atomic_file(tmp_path / "weights.safetensors") as temporary:
        save_file({"a": torch.ones(2)}, str(temporary))
    assert mode(tmp_path / "weights.safetensors") == 0o644
    with atomic_folder(tmp_path / "model") as staging:
        save_file({"a": torch.ones(2)}, str(staging / "model.safetensors"))
        (staging / "private").mkdir(mode=0o700)
        (staging / "private" / "run.sh").write_text("#!/bin/sh")
        (staging / "private" / "run.sh").chmod(0o700)
    assert mode(tmp_path / "model" / "model.safetensors") == 0o644
    assert mode(tmp_path / "model" / "private") == 0o755
    assert mode(tmp_path / "model" / "private" / "run.sh") == 0o755  # executable bits are kept


# ---------------------------------------------------------------------------------------------------- folders
def test_atomic_folder_creates_and_replaces(tmp_path, umask):
    target = tmp_path / "new" / "out"
    with atomic_folder(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".out.") and not target.exists()
        (staging / "sub").mkdir()
        (staging / "sub" / "weights").write_text("1")
    assert tree(target) == {"sub": None, "sub/weights": "1"}
    assert mode(target) == 0o755 and mode(target / "sub" / "weights") == 0o644  # not mkdtemp's private 0o700

    (target / "config.json").write_text(json.dumps({"model_type": "tarflow"}))
    with pytest.raises(FileExistsError, match="exists and is not empty"), atomic_folder(target):
        raise AssertionError("refused before the block runs")
    with atomic_folder(target, overwrite=True, may_replace=is_ours) as staging:
        (staging / "config.json").write_text("{}")
    assert tree(tmp_path) == {"new": None, "new/out": None, "new/out/config.json": "{}"}  # old one gone, no debris

    umask(0o077)
    with atomic_folder(tmp_path / "private") as staging:
        (staging / "f").write_text("x")
    assert mode(tmp_path / "private") == 0o700 and mode(tmp_path / "private" / "f") == 0o600


def test_empty_folder_is_replaced_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "f").write_text("x")
    assert tree(tmp_path) == {"out": None, "out/f": "x"}


def test_failed_folder_write_leaves_the_old_folder_and_no_debris(tmp_path):
    old = tmp_path / "out"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "tarflow"}))
    (old / "weights").write_text("old")
    before = tree(tmp_path)
    for error in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(error)), atomic_folder(old, overwrite=True, may_replace=is_ours) as staging:
            (staging / "weights").write_text("half")
            raise error
        assert tree(tmp_path) == before

    with pytest.raises(OSError), atomic_folder(tmp_path / "a" / "b" / "new") as staging:
        disk_full(staging / "weights")
    assert tree(tmp_path) == before  # the parents made for it are removed as well


def test_a_folder_it_did_not_write_is_never_deleted(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (user / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    ran = []
    refused = pytest.raises(FileExistsError, match=f"refusing to replace {re.escape(str(user))}")
    with refused, atomic_folder(user, overwrite=True, may_replace=is_ours):
        ran.append(True)
    assert not ran and tree(tmp_path) == before

    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match="is not a folder"), atomic_folder(tmp_path / "file", overwrite=True):
        pass
    assert (tmp_path / "file").read_text() == "a file"


def test_a_folder_that_appears_during_the_write_is_not_deleted(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_folder(target, overwrite=True, may_replace=is_ours) as staging:
        (staging / "f").write_text("new")
        target.mkdir()
        (target / "mine").write_text("user")
    assert tree(tmp_path) == {"out": None, "out/mine": "user"}


def test_merge_keeps_the_users_files(tmp_path):
    target = tmp_path / "pipe"
    (target / "transformer").mkdir(parents=True)
    (target / "transformer" / "model-00001-of-00002.safetensors").write_text("stale shard")
    (target / "README.md").write_text("old card")
    (target / "notes.txt").write_text("the user's")
    with atomic_folder(target, merge=True) as staging:
        (staging / "transformer").mkdir()
        (staging / "transformer" / "model.safetensors").write_text("new weights")
        (staging / "README.md").write_text("new card")
    assert tree(tmp_path) == {
        "pipe": None,
        "pipe/README.md": "new card",
        "pipe/notes.txt": "the user's",
        "pipe/transformer": None,
        "pipe/transformer/model.safetensors": "new weights",  # the folder is swapped whole: no stale shard
    }
    before = tree(tmp_path)
    with pytest.raises(OSError), atomic_folder(target, merge=True) as staging:
        (staging / "README.md").write_text("newer card")
        disk_full(staging / "transformer")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- temporaries
def test_stale_temporaries_of_our_pattern_only_are_cleaned(tmp_path):
    ours = [
        "..out.0123abcd.tmp.89abcdef.tmp",  # a save into a staging folder: a temporary of a temporary
        "...out.0123abcd.tmp.89abcdef.tmp.deadbeef.tmp",
        ".out.0123abcd.old",  # a swap's previous version, `out` being in place
        ".out.0123abcd.tmp",
        ".out.deadbeef.tmp",
    ]
    others = [
        "out",
        ".out.tmp",
        ".out.old",
        ".out.0123abcd.tmp.bak",
        ".out.0123ABCD.tmp",
        ".out.0123abc.tmp",
        ".out.0123abcd.bak",
        ".outer.0123abcd.tmp",
        ".out.x.0123abcd.tmp",
        "out.0123abcd.tmp",
        ".other.0123abcd.tmp",
        "..out.0123abcd.tmp",  # a temporary of `.out`, not of `out`
        "..out.0123abcd.tmp.89abcdef",
        ".out.0123abcd.tmp.89abcdef.tmp",  # of `out.0123abcd.tmp`
        "..other.0123abcd.tmp.89abcdef.tmp",
    ]
    (tmp_path / ours[0]).mkdir()
    (tmp_path / ours[0] / "weights").write_text("half")
    for name in ours[1:]:
        (tmp_path / name).write_text("half")
    for name in others:
        (tmp_path / name).write_text("keep")
    assert sorted(path.name for path in clean_stale_temporaries(tmp_path, "out")) == sorted(ours)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(others)
    assert clean_stale_temporaries(tmp_path / "absent", "out") == []


def test_stale_temporaries_of_every_name_a_pattern_matches(tmp_path):
    names = ["checkpoint-2", "checkpoint-10", "checkpoint-x", "checkpoint-2.superseded", "model"]
    for name in names:
        (tmp_path / f".{name}.0123abcd.tmp").mkdir()
        (tmp_path / f"..{name}.0123abcd.tmp.89abcdef.tmp").mkdir()
    removed = clean_stale_temporaries(tmp_path, re.compile(r"checkpoint-\d+"))
    assert sorted(path.name for path in removed) == sorted(
        f"{prefix}{name}.0123abcd.tmp{suffix}"
        for name in ("checkpoint-2", "checkpoint-10")
        for prefix, suffix in ((".", ""), ("..", ".89abcdef.tmp"))
    )
    assert {path.name for path in tmp_path.iterdir()} == {
        f"{prefix}{name}.0123abcd.tmp{suffix}"
        for name in ("checkpoint-x", "checkpoint-2.superseded", "model")
        for prefix, suffix in ((".", ""), ("..", ".89abcdef.tmp"))
    }


def test_discard_never_leaves_part_of_a_folder_under_its_name(tmp_path, monkeypatch):
    (tmp_path / "old" / "sub").mkdir(parents=True)
    (tmp_path / "old" / "sub" / "weights").write_text("x")
    (tmp_path / "file").write_text("x")
    discard(tmp_path / "file")
    seen = []
    monkeypatch.setattr(fileio, "_remove", lambda path: seen.append(path.name))  # the deletion is cut short
    discard(tmp_path / "old")
    assert not (tmp_path / "old").exists() and re.fullmatch(r"\.old\.[0-9a-f]{8}\.tmp", seen[0]), seen
    monkeypatch.undo()
    assert [path.name for path in clean_stale_temporaries(tmp_path, "old")] == seen
    assert tree(tmp_path) == {}


def test_a_swap_cut_between_its_renames_puts_the_previous_folder_back(tmp_path):
    """`out` was renamed aside and the process died before the new folder took its place: the aside is the last
    complete `out`, so the next write puts it back (and then refuses to replace a folder it may not replace)."""
    (tmp_path / ".out.0123abcd.old").mkdir()
    (tmp_path / ".out.0123abcd.old" / "weights").write_text("previous")
    (tmp_path / ".out.89abcdef.tmp").mkdir()
    (tmp_path / ".out.89abcdef.tmp" / "weights").write_text("new")
    with pytest.raises(FileExistsError, match="exists and is not empty"), atomic_folder(tmp_path / "out"):
        raise AssertionError("refused before the block runs")
    assert tree(tmp_path) == {"out": None, "out/weights": "previous"}


def test_a_rerun_cleans_what_a_killed_write_left(tmp_path):
    """A process killed outright (no exception handler runs) leaves its temporaries; the next write removes them."""
    (tmp_path / ".out.0123abcd.tmp").mkdir()
    (tmp_path / ".out.json.89abcdef.tmp").write_text("half")
    (tmp_path / ".unrelated.0123abcd.tmp").write_text("someone else's")
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "f").write_text("x")
    write_text_atomic(tmp_path / "out.json", "{}")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".unrelated.0123abcd.tmp", "out", "out.json"]


KILLED_IN_A_NESTED_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tarflow_hf.fileio import atomic_folder

    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    with atomic_folder(out, overwrite=True) as staging:  # as training saves its pipeline folder
        with atomic_folder(staging, merge=True) as inner:  # as save_pipeline merges into the folder it is given
            (inner / "weights").write_text("half of the new weights")
            marker.write_text("")
            time.sleep(600)
    """
)


def test_a_save_killed_inside_a_staging_folder_is_cleaned_by_the_next_write(tmp_path):
    """SIGKILL in the middle of a save into a staging folder leaves `.out.{hex}.tmp` and, beside it, the save's own
    staging `..out.{hex}.tmp.{hex}.tmp` (with the weights written so far); the next write to `out` removes both."""
    run = tmp_path / "run"
    run.mkdir()
    kill_when_ready(KILLED_IN_A_NESTED_SAVE, tmp_path / "marker", str(run / "out"), str(tmp_path / "marker"))
    left = sorted(path.name for path in run.iterdir())
    assert len(left) == 2 and re.fullmatch(r"\.\.out\.[0-9a-f]{8}\.tmp\.[0-9a-f]{8}\.tmp", left[0]), left
    with atomic_folder(run / "out", overwrite=True) as staging:
        (staging / "weights").write_text("complete")
    assert tree(run) == {"out": None, "out/weights": "complete"}


KILLED_IN_A_SWAP = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tarflow_hf.fileio import atomic_folder

    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    rename = os.rename

    def slow_rename(source, destination):  # the new folder's rename into place never happens
        if Path(destination) == out:
            marker.write_text("")
            time.sleep(600)
        rename(source, destination)

    os.rename = slow_rename
    with atomic_folder(out, overwrite=True) as staging:
        (staging / "weights").write_text("new")
    """
)


def test_a_swap_killed_between_its_renames_loses_nothing(tmp_path):
    """SIGKILL after the previous `out` was moved aside and before the new one took its place: the next write puts
    the previous one back (it is the last complete `out`) rather than deleting both copies."""
    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    (run / "out" / "weights").write_text("previous")
    kill_when_ready(KILLED_IN_A_SWAP, tmp_path / "marker", str(run / "out"), str(tmp_path / "marker"))
    assert not (run / "out").exists()
    with pytest.raises(FileExistsError, match="exists and is not empty"), atomic_folder(run / "out"):
        raise AssertionError("refused before the block runs")
    assert tree(run) == {"out": None, "out/weights": "previous"}
    with atomic_folder(run / "out", overwrite=True) as staging:
        (staging / "weights").write_text("new")
    assert tree(run) == {"out": None, "out/weights": "new"}
