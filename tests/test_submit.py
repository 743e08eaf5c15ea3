"""fastjepa submit: the job submitit runs (here through its debug executor, in this
process), the requeue hand-over after a preemption notice, and the command line."""

import os
import signal

import pytest

pytest.importorskip("submitit", reason="fastjepa submit needs the submit extra (submitit)")

from fastjepa.cli import main as cli
from fastjepa.helper import read_checkpoint
from fastjepa.submit import TrainJob, submit

SMALL = ["--set", "data.batch_size=4", "--set", "data.crop_size=48", "--set", "data.repeat=1", "--set", "meta.pred_depth=1",
         "--set", "mask.min_keep=1"]


def run_as_job(job: TrainJob, folder) -> str:
    """Run ``job`` the way a submitted job runs: through submitit's debug executor, in this process."""
    import submitit

    return submitit.AutoExecutor(folder=str(folder / "submitit"), cluster="debug").submit(job).result()


def small_config():
    from fastjepa.config import tiny_preset

    config = tiny_preset()
    config["data"].update(batch_size=4, crop_size=48, repeat=1)
    config["meta"]["pred_depth"], config["mask"]["min_keep"] = 1, 1
    return config


def test_submit_runs_the_trainer_as_a_job_and_resubmits_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    job = submit(small_config(), out=str(tmp_path), nodes=1, tasks_per_node=1, time_min=5, cluster="debug", max_steps=2)
    assert job.result() == str(tmp_path)
    assert read_checkpoint(tmp_path / "jepa-latest.pth.tar")["fastjepa"]["itr"] == 2
    again = TrainJob(small_config(), {"out": str(tmp_path), "max_steps": 2}).checkpoint()  # what submitit requeues
    assert isinstance(again.function, TrainJob) and again.function.options == {"out": str(tmp_path), "max_steps": 2}
    assert run_as_job(again.function, tmp_path) == str(tmp_path)  # resumes the run: two more steps
    assert read_checkpoint(tmp_path / "jepa-latest.pth.tar")["epoch"] == 1  # 3 steps per epoch: 4 steps end in epoch 2


def test_a_preempted_job_checkpoints_then_hands_the_signal_to_submitit(tmp_path, monkeypatch):
    import fastjepa.train as train_module

    real_step, calls, handed = train_module.train_step, [], []

    def step_then_notice(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's notice before the time limit
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_notice)
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: handed.append(number))  # plays submitit's handler
    try:
        run_as_job(TrainJob(small_config(), {"out": str(tmp_path), "max_steps": 5}), tmp_path)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handed == [signal.SIGUSR1] and len(calls) == 1  # the trainer stopped after the step, then submitit was told
    assert read_checkpoint(tmp_path / "jepa-latest.pth.tar")["fastjepa"]["itr"] == 1


def test_submit_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert cli(["submit", *SMALL, "--cluster", "debug", "--out", str(tmp_path), "--max-steps", "1"]) == 0
    assert "finished: " + str(tmp_path) in capsys.readouterr().out
    assert cli(["submit", *SMALL, "--cluster", "debug"]) == 2
    assert "needs --out DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fixed output folder"):
        TrainJob(small_config(), {})
