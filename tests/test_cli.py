"""The command line answers --help without importing torch, diffusers or gradio (a fresh interpreter each time)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tarflow_hf.commands import COMMANDS

HEAVY = ("torch", "diffusers", "gradio", "transformers")
PROBE = """
import runpy, sys
sys.argv = ["tarflow_hf", *{argv!r}]
try:
    runpy.run_module("tarflow_hf", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("HEAVY", sorted(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name, _, _ in COMMANDS])
def test_help_imports_nothing_heavy(argv):
    code = PROBE.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: tarflow" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_importtime_shows_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tarflow_hf", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "tarflow_hf.commands" in imported
    assert not {"torch", "diffusers", "gradio"} & imported


def test_every_command_has_its_arguments_and_module():
    from tarflow_hf.commands.arguments import ARGUMENTS

    assert set(ARGUMENTS) == {name for name, _, _ in COMMANDS}
