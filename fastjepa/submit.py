"""``fastjepa submit``: pretrain on a SLURM cluster through submitit (``pip install
'fastjepa[submit]'``), as the reference's ``main_distributed.py`` does: ``--nodes`` x
``--tasks-per-node`` processes, one per GPU, each running the trainer with ``--resume auto``.

Time limits and preemption: SLURM sends SIGUSR1 ``SIGNAL_DELAY_S`` seconds before the job's
time limit (and submitit is told to use that signal). The trainer finishes its step, writes
the checkpoint and returns; the job then hands the signal on to submitit, which calls
``TrainJob.checkpoint`` and requeues the job, and the requeued job continues exactly where
the checkpoint stopped.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

SIGNAL = "USR1"
SIGNAL_DELAY_S = 120  # the last step, a checkpoint of ViT-H (about 10 GB) and the requeue fit in two minutes


class TrainJob:
    """What each task of the job runs: the trainer on ``config`` with ``options`` (the
    trainer's keyword options; ``out`` is required so that a requeued job finds its run)."""

    def __init__(self, config: dict, options: dict):
        if not options.get("out"):
            raise ValueError("a submitted job needs a fixed output folder (out) so that a requeued job finds its checkpoint")
        self.config, self.options = config, options

    def __call__(self) -> str:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
        from fastjepa.train import main

        result = main(self.config, resume="auto", progress=False, **self.options)
        handler = signal.getsignal(signal.SIGUSR1)
        if result.preempted and callable(handler):  # submitit's handler, back in place: checkpoint() and requeue (rank 0)
            signal.raise_signal(signal.SIGUSR1)
        return str(result.folder)

    def checkpoint(self, *args, **kwargs):
        """submitit calls this before requeueing: the same job again (it resumes from the latest checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.options))


def submit(config: dict, *, out: str, nodes: int, tasks_per_node: int, time_min: int, partition: str | None = None,
           account: str | None = None, cpus_per_task: int = 10, cluster: str | None = None, **options):
    """Submit the training job; returns submitit's Job. ``cluster``: submitit's executor
    (``slurm``, ``local`` or ``debug``; default: SLURM when ``sbatch`` is found)."""
    try:
        import submitit
    except ImportError:
        raise ImportError("fastjepa submit needs submitit: pip install 'fastjepa[submit]'") from None
    out = str(Path(out).resolve())
    executor = submitit.AutoExecutor(folder=os.path.join(out, "submitit", "%j"), cluster=cluster)
    slurm = {"slurm_signal_delay_s": SIGNAL_DELAY_S, "slurm_setup": [f"export SUBMITIT_PREEMPT_SIGNAL={SIGNAL}"]}
    if partition:
        slurm["slurm_partition"] = partition
    if account:
        slurm["slurm_account"] = account
    executor.update_parameters(name="fastjepa", nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=tasks_per_node,
                               cpus_per_task=cpus_per_task, timeout_min=time_min,
                               **(slurm if executor.cluster == "slurm" else {}))
    return executor.submit(TrainJob(config, {"out": out, **options}))
