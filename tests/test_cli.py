"""The command line: ``fastjepa info``, exit codes of bad input, options."""

import subprocess
import sys

import pytest

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


def test_plot_and_eval_bad_input_exit_1_with_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "run folder not found" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 1
    assert "no training log" in capsys.readouterr().err
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "nope.pth.tar")]) == 1
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes(b"not a checkpoint")
    assert main(["eval", "linear", "--checkpoint", str(broken)]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err


def test_profile_ranks_option(capsys):
    from fastjepa.cli import build_parser

    def parse(*args):
        return build_parser().parse_args(["train", *args]).profile_ranks
    assert parse() == (0,) and parse("--profile-ranks", "0,8") == (0, 8) and parse("--profile-ranks", "all") is None
    for bad in ("x", "-1", "0,,1"):
        with pytest.raises(SystemExit) as exit_info:
            parse("--profile-ranks", bad)
        assert exit_info.value.code == 2 and "--profile-ranks" in capsys.readouterr().err
