"""The `stag4d` console script: help lists the design's subcommands; unimplemented ones refuse clearly."""

import subprocess
import sys
from pathlib import Path

import pytest

from stag4d_backend import cli

STAG4D = Path(sys.executable).with_name("stag4d")
DESIGN_COMMANDS = ["generate", "fit", "render", "bake", "serve", "submit", "doctor", "models"]


def test_console_script_help_lists_design_subcommands():
    assert STAG4D.exists(), "the stag4d console script is not installed in this environment"
    out = subprocess.run([str(STAG4D), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in DESIGN_COMMANDS:
        assert name in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert "generate" in capsys.readouterr().out


def test_doctor_reports_device_and_torch(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device" in out and "memory" in out
