"""The ``fastjepa`` command line: train, submit, plot, eval, export, info, data verify.

Exit codes: 0 done, 1 the run failed (bad data, unreadable checkpoint, non-finite
loss; ``data verify``: bad files found), 2 bad command line or config, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """Bad command-line input; exits with code 2."""


def _config_from_args(args) -> dict:
    from fastjepa.config import apply_override, config_path, load_yaml, tiny_preset

    config = load_yaml(config_path(args.config)) if args.config else tiny_preset()
    for assignment in args.set:
        apply_override(config, assignment)
    return config


def _profile_steps(text: str) -> tuple[int, int]:
    from fastjepa.profiling import parse_profile_steps

    try:
        return parse_profile_steps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _train(args) -> int:
    from fastjepa.config import validate

    config = validate(_config_from_args(args))
    if args.dry_run:
        from fastjepa.plan import describe

        print(describe(config, device=args.device))
        return 0
    from fastjepa.train import main

    main(config, device=args.device, out=args.out, max_steps=args.max_steps, seed=args.seed, resume=args.resume,
         checkpoint_every=args.checkpoint_every, progress=not args.no_progress, profile_steps=args.profile_steps,
         torch_profiler=args.torch_profiler, profile_ranks=args.profile_ranks)
    return 0


def _submit(args) -> int:
    from fastjepa.config import validate
    from fastjepa.submit import submit

    config = validate(_config_from_args(args))
    out = args.out or config["logging"]["folder"]
    if not out:
        raise UsageError("fastjepa submit needs --out DIR (or logging.folder): the run folder a requeued job resumes from")
    job = submit(config, out=out, nodes=args.nodes, tasks_per_node=args.tasks_per_node, time_min=args.time,
                 partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task, cluster=args.cluster,
                 seed=args.seed, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every)
    print(f"submitted job {job.job_id}: {args.nodes} x {args.tasks_per_node} processes, output folder {out}")
    if args.cluster == "debug":  # submitit's debug executor runs the job here, when its result is asked for
        print(f"finished: {job.result()}")
    return 0


def _plot(args) -> int:
    from fastjepa.plot import plot_run

    print(plot_run(args.folder))
    return 0


def _eval(args) -> int:
    from fastjepa.eval import evaluate

    if args.data is not None and args.dataset is not None:
        raise UsageError("give either --data DIR or --dataset digits, not both")
    shape = {k: v for k, v in (("model_name", args.model_name), ("patch_size", args.patch_size), ("crop_size", args.crop_size)) if v is not None}
    source = {"checkpoint": args.checkpoint}
    if args.weights is not None:
        from fastjepa.weights import load_encoder

        if shape:
            raise UsageError("--model-name, --patch-size and --crop-size go with --checkpoint; --weights reads the shape off the weights")
        source = {"encoder": load_encoder(args.weights, encoder={"target_encoder": "target", "encoder": "context"}[args.encoder])}
    result = evaluate(args.method, **source, dataset=args.dataset or ("digits" if args.data is None else None),
                      data=args.data, which=args.encoder, k=args.k, batch_size=args.batch_size, device=args.device, **shape)
    print(f"{args.method} top-1: {100 * result['top1']:.2f}% ({result['train']} train / {result['test']} test images)")
    return 0


def _export(args) -> int:
    from fastjepa.weights import ENCODERS, FORMATS, export_weights

    if args.format not in FORMATS:
        raise UsageError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.encoder not in ENCODERS:
        raise UsageError(f"unknown --encoder {args.encoder!r}; choose one of {', '.join(ENCODERS)}")
    print(export_weights(args.weights, args.format, args.out, encoder=args.encoder, force=args.force))
    return 0


def _info(args) -> int:
    from fastjepa.info import collect, format_info

    print(format_info(collect()))
    return 0


def _data_verify(args) -> int:
    from fastjepa.data.images import IMAGE_EXTENSIONS
    from fastjepa.data.verify import verify_folder

    report = verify_folder(args.folder, move_to=args.move_to, workers=args.workers, progress=not args.no_progress)
    if report.checked == 0:
        print(f"fastjepa data: no image files under {args.folder} (extensions {', '.join(IMAGE_EXTENSIONS)}, any case)", file=sys.stderr)
        return 1
    moved = dict(report.moved)
    for name, reason in report.bad:
        if name in moved:
            reason += f" (moved to {moved[name]})"
        elif args.move_to is not None:
            reason += " (inside a tar shard: not moved; write the shard again without it)"
        print(f"{name}: {reason}")
    ignored = f"; {len(report.ignored)} files without an image extension not checked (training does not read them)" if report.ignored else ""
    if report.bad:
        print(f"{len(report.bad)} of {report.checked} image files are bad" + (f", moved to {args.move_to}" if report.moved else "") + ignored)
        return 1
    print(f"all {report.checked} image files decode{ignored}")
    return 0


def _profile_ranks(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes all or ranks like 0,8, got {text!r}") from None
    if any(rank < 0 for rank in ranks):
        raise argparse.ArgumentTypeError(f"ranks are >= 0, got {text!r}")
    return ranks


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# Long by nature: one declaration per command and option, read top to bottom like the help it prints.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjepa", description="Kernel-optimized I-JEPA pretraining.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # what train and submit share: the config, the run folder and the run's length
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", metavar="PATH|NAME", help="a YAML config in the reference's format (its published configs work unchanged), "
                                                         "or a shipped recipe by name: vit_s16_in1k, vit_b16_in1k, vit_b16_in1k_1gpu")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    run.add_argument("--out", metavar="DIR", help="output folder (default: logging.folder, else a new folder here; submit needs one)")
    run.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop after N steps (a checkpoint is written)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--checkpoint-every", type=_positive_int, metavar="N", help="also write the -latest checkpoint every N steps")

    train = commands.add_parser("train", parents=[run], help="pretrain I-JEPA (default: ViT-tiny on the embedded photos)",
                                description="Pretrain I-JEPA. Without --config: a tiny preset on photos shipped with fastjepa.")
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best present)")
    train.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                       help="continue from a checkpoint: PATH, latest (the default: the run folder's -latest checkpoint) "
                            "or auto (latest when it exists, else a fresh start: for requeued jobs)")
    train.add_argument("--dry-run", action="store_true", help="check the config and print the plan (sizes, FLOPs, memory); read no data")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--profile-steps", type=_profile_steps, metavar="A:B",
                       help="cudaProfilerStart/Stop around global steps A..B-1 (nsys --capture-range=cudaProfilerApi), NVTX range per step")
    train.add_argument("--torch-profiler", metavar="DIR",
                       help="torch.profiler over the --profile-steps range (default 2:5): Chrome trace in DIR, top kernels printed")
    train.add_argument("--profile-ranks", type=_profile_ranks, default=(0,), metavar="R,R|all",
                       help="the ranks that profile under torchrun (default 0)")
    train.set_defaults(run=_train)

    submit = commands.add_parser("submit", parents=[run], help="pretrain on a SLURM cluster through submitit (requeued after time limits)",
                                 description="Submit fastjepa train as a SLURM job through submitit (pip install 'fastjepa[submit]'): "
                                             "one process per GPU; at the time limit the job writes its checkpoint and is requeued.")
    submit.add_argument("--nodes", type=_positive_int, default=1)
    submit.add_argument("--tasks-per-node", type=_positive_int, default=1, metavar="N", help="processes per node, one per GPU")
    submit.add_argument("--time", type=_positive_int, default=4300, metavar="MIN", help="time limit per job in minutes (default 4300)")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--cpus-per-task", type=_positive_int, default=10)
    submit.add_argument("--cluster", choices=("slurm", "local", "debug"), help="submitit executor (default: slurm when sbatch is found)")
    submit.set_defaults(run=_submit)

    plot = commands.add_parser("plot", help="draw a run's loss, lr, momentum and throughput curves to PNG")
    plot.add_argument("folder", metavar="OUT_DIR")
    plot.set_defaults(run=_plot)

    evaluation = commands.add_parser("eval", help="kNN or linear probe of a frozen encoder")
    evaluation.add_argument("method", choices=("knn", "linear"))
    source = evaluation.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a training checkpoint (fastjepa's or the reference's)")
    source.add_argument("--weights", metavar="PATH", help="any weights fastjepa export reads or writes: a checkpoint, a Hugging Face "
                                                          "IJepa folder, a timm or fastjepa .safetensors file (the shape is read off them)")
    evaluation.add_argument("--dataset", choices=("digits",), help="scikit-learn's digits (the default without --data)")
    evaluation.add_argument("--data", metavar="DIR", help="a labeled image folder with train/ and val/ class subfolders")
    evaluation.add_argument("--encoder", choices=("target_encoder", "encoder"), default="target_encoder")
    evaluation.add_argument("--k", type=_positive_int, default=20, help="neighbours for knn")
    evaluation.add_argument("--batch-size", type=_positive_int, default=256)
    evaluation.add_argument("--device")
    evaluation.add_argument("--model-name", help="model shape, for checkpoints without a fastjepa config")
    evaluation.add_argument("--patch-size", type=_positive_int)
    evaluation.add_argument("--crop-size", type=_positive_int)
    evaluation.set_defaults(run=_eval)

    export = commands.add_parser(
        "export", help="write an encoder for Hugging Face transformers, timm or safetensors",
        description="Write one encoder of a checkpoint (or of weights in any format below) as: hf, a folder "
                    "transformers.IJepaModel.from_pretrained loads; timm, a .safetensors file for timm's *_gap_* ViTs (the command "
                    "prints the timm.create_model line); safetensors, fastjepa's own key names. The default is the target (EMA) "
                    "encoder, the one the paper evaluates; the Hugging Face and timm conversions of Meta's published weights took "
                    "the context encoder (checkpoint['encoder']): --encoder context gives the same.")
    export.add_argument("weights", metavar="CHECKPOINT", help="a fastjepa or reference checkpoint (module. prefixes or not), an hf folder "
                                                             "or a .safetensors file")
    export.add_argument("--format", required=True, metavar="hf|timm|safetensors")
    export.add_argument("--out", required=True, metavar="PATH", help="a folder for hf, a .safetensors file otherwise")
    export.add_argument("--encoder", default="target", metavar="target|context",
                        help="which encoder of a training checkpoint (default target; Meta's HF and timm weights are the context encoder)")
    export.add_argument("--force", action="store_true", help="replace an existing --out")
    export.set_defaults(run=_export)

    info = commands.add_parser("info", help="print versions, devices and which backends are usable here")
    info.set_defaults(run=_info)

    data = commands.add_parser("data", help="check image folders before training")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    verify = data_commands.add_parser(
        "verify", help="list the image files training cannot decode; exit 1 when there are any",
        description="Decode every image file under DIR (header, end marker, PIL verify, full decode) and list the bad ones. "
                    "Exit code 0 when all decode, 1 when some do not (or DIR holds no image).")
    verify.add_argument("folder", metavar="DIR")
    verify.add_argument("--move-to", metavar="DIR", help="move the bad files there, under their paths relative to DIR (nothing is deleted)")
    verify.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, help="processes (default: one per CPU core)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar (shown on stderr from 1000 files)")
    verify.set_defaults(run=_data_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fastjepa.config import ConfigError
    from fastjepa.helper import CheckpointError

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except (ConfigError, UsageError) as e:
        print(f"fastjepa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, FloatingPointError, ValueError, ImportError) as e:  # OSError: also a full disk, no write permission
        print(f"fastjepa {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastjepa {args.command}: interrupted", file=sys.stderr)
        return 130
