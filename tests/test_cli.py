"""The command line: ``fastjepa info``."""

import subprocess
import sys

from fastjepa.cli import main


def test_info_lists_versions_and_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("torch", "python", "backends:", "triton", "cuda", "dali", "usable"):
        assert expected in out


def test_module_entry_point_and_missing_command():
    done = subprocess.run([sys.executable, "-m", "fastjepa", "info"], capture_output=True, text=True)
    assert done.returncode == 0 and "backends:" in done.stdout
    done = subprocess.run([sys.executable, "-m", "fastjepa"], capture_output=True, text=True)
    assert done.returncode == 2 and "COMMAND" in done.stderr
