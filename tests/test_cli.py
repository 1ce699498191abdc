import subprocess
import sys

import capscale
from capscale.cli import main


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"capscale {capscale.__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "version" in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run(["capscale", "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: capscale" in out
    out = subprocess.run([sys.executable, "-m", "capscale", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("capscale ")


def test_unknown_command_fails():
    assert subprocess.run(["capscale", "no-such-command"], capture_output=True).returncode == 2
