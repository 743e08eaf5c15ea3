"""fastjepa.profiling: --profile-steps parsing, the torch profiler over a step range in a real
run (Chrome trace written, top kernels printed), and ranges the run never reaches."""

import json

import pytest

from fastjepa.cli import main as cli
from fastjepa.profiling import parse_profile_steps
from fastjepa.train import fit

SMALL = dict(crop_size=48, batch_size=4, repeat=1, pred_depth=1, min_keep=1, epochs=2, warmup=1, progress=False)


@pytest.mark.parametrize("text, expected", [("0:1", (0, 1)), ("20:30", (20, 30))])
def test_parse_profile_steps(text, expected):
    assert parse_profile_steps(text) == expected


@pytest.mark.parametrize("text", ["5", "3:1", "2:2", "a:b", "-1:3", "1:2:3"])
def test_bad_profile_steps_exit_2_naming_the_option(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", f"--profile-steps={text}", "--max-steps", "1"])
    assert exit_info.value.code == 2
    assert "--profile-steps takes A:B" in capsys.readouterr().err


def test_torch_profiler_traces_the_requested_steps(tmp_path, capsys):
    fit(out=tmp_path / "run", max_steps=4, profile_steps=(1, 3), torch_profiler=str(tmp_path / "prof"), **SMALL)
    trace = tmp_path / "prof" / "trace-steps-1-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in event.get("name", "") for event in events)
    out = capsys.readouterr().out
    assert "Self CPU" in out and "torch profiler: steps 1..2" in out
    assert "no CUDA device, so no cudaProfilerStart/Stop" in out


def test_a_range_the_run_never_reaches_is_reported(tmp_path, capsys):
    fit(out=tmp_path / "run", max_steps=2, torch_profiler=str(tmp_path / "prof"), profile_steps=(5, 6), **SMALL)
    assert "before step 5: nothing was profiled" in capsys.readouterr().out
    assert not (tmp_path / "prof").exists()
