"""The ``fastjepa`` command line: train, submit, plot, eval, finetune, export, info, data verify.

Exit codes: 0 done, 1 the run failed (bad data, an unreadable or unsafe checkpoint, a full
disk, non-finite loss; ``data verify``: bad files found), 2 bad command line or config, 130
interrupted. Each failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
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
    from fastjepa.plot import FINETUNE_LOG, eval_results_in, plot_eval, plot_finetune, plot_run

    evaluations = eval_results_in(args.folder) if os.path.isdir(args.folder) else []
    for results in evaluations:  # an eval run's folder: one grid per probe
        print(plot_eval(results))
    if os.path.isfile(os.path.join(args.folder, FINETUNE_LOG)):
        print(plot_finetune(args.folder))
    elif not evaluations:
        print(plot_run(args.folder))
    return 0


def _eval(args) -> int:
    import time
    from pathlib import Path

    from fastjepa.distributed import rank, setup, teardown
    from fastjepa.eval.results import format_table, write_results
    from fastjepa.eval.runner import evaluate, load_frozen_encoder

    device, started = setup(args.device or "cpu")  # under torchrun: join the group, each rank on its own GPU
    try:
        path = args.checkpoint or args.weights
        encoder = load_frozen_encoder(path, encoder=args.encoder, device=device)
        out = Path(args.out) if args.out else Path.cwd() / f"fastjepa-eval-{time.strftime('%Y%m%d-%H%M%S')}"
        options = {keyword: getattr(args, dest) for dest, keyword in _PROBE_OPTIONS[args.method].items() if getattr(args, dest) is not None}
        if args.method == "attentive" and args.probe_heads is not None:
            from fastjepa.eval.attentive import probe_grid

            options["grid"] = probe_grid(args.probe_heads)
        augmentation = getattr(args, "augmentation", None) or "none"
        result, context = evaluate(args.method, encoder, args.data, image_size=args.image_size, per_class=args.per_class, fraction=args.fraction,
                                   subset=args.subset, seed=args.seed, batch_size=args.batch_size,
                                   cache=None if args.no_cache else out / "features", num_workers=args.num_workers or 0,
                                   augmentation=augmentation, progress=not args.no_progress, **options)
        if rank() == 0:
            written = write_results(result, out / f"{args.method}.json", weights=os.fspath(path), encoder=args.encoder,
                                    command=args.command_line, **context)
            print(format_table(result))
            print(f"results: {written}  (fastjepa plot {out} draws the heads' grid)")
    finally:
        if started:
            teardown()
    return 0


def _finetune_config(args) -> dict:
    from fastjepa.config import apply_override, load_yaml
    from fastjepa.finetune.recipe import SCHEMA, load_preset, validate

    config = load_yaml(args.config) if args.config else load_preset(args.preset)
    for assignment in args.set:
        apply_override(config, assignment, SCHEMA)
    return validate(config)


def _finetune(args) -> int:
    config = _finetune_config(args)
    weights = args.checkpoint or args.weights
    if weights is None and args.resume is None:
        raise UsageError("fastjepa finetune needs --weights PATH or --checkpoint PATH (the pretrained encoder), or --resume")
    subset = dict(per_class=args.per_class, fraction=args.fraction, subset=args.subset)
    if args.dry_run:
        from fastjepa.finetune.plan import describe

        print(describe(config, weights, args.data, device=args.device, seed=args.seed, **subset))
        return 0
    from fastjepa.finetune.loop import main

    main(config, weights, args.data, device=args.device, out=args.out, seed=args.seed, max_steps=args.max_steps, resume=args.resume,
         checkpoint_every=args.checkpoint_every, progress=not args.no_progress, **subset)
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


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers like 1e-3,1e-2, got {text!r}") from None
    return values


def _ints(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


# Each probe's own options: command-line dest -> the keyword of its function (fastjepa.eval.runner.evaluate's **options).
_PROBE_OPTIONS = {
    "linear": {"lrs": "lrs", "weight_decays": "weight_decays", "heads": "heads", "epochs": "epochs", "probe_batch_size": "batch_size",
               "optimizer": "optimizer", "holdout": "holdout"},
    "logreg": {"lambd": "lambd", "max_iter": "max_iter"},
    "attentive": {"epochs": "epochs", "probe_batch_size": "batch_size", "holdout": "holdout"},
    "knn": {"ks": "ks", "temperature": "temperature", "holdout": "holdout"},
}


def _add_labelled_data(parser) -> None:
    """--data and the low-shot subset options (--per-class, --fraction, --subset) of eval and finetune."""
    parser.add_argument("--data", default="digits", metavar="DIR|digits|shapes-count|shapes-dist",
                        help="DIR/train/<class>/* and DIR/val/<class>/*, or a built-in set (default digits)")
    low_shot = parser.add_mutually_exclusive_group()
    low_shot.add_argument("--per-class", type=_positive_int, metavar="N", help="train on N seeded images of every class")
    low_shot.add_argument("--fraction", type=_fraction, metavar="F", help="train on a seeded fraction F of every class (1%%: 0.01)")
    low_shot.add_argument("--subset", metavar="FILE", help="train on the images a list names (the reference's ImageNetSubset .txt)")


def _add_eval_parsers(commands) -> None:
    """``fastjepa eval METHOD``: one sub-command per probe, each with its own options beside the shared ones."""
    shared = argparse.ArgumentParser(add_help=False)
    source = shared.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a training checkpoint (fastjepa's or the reference's)")
    source.add_argument("--weights", metavar="PATH", help="any weights fastjepa export reads or writes: a checkpoint, a Hugging Face "
                                                          "IJepa folder, a timm or fastjepa .safetensors file (the shape is read off them)")
    shared.add_argument("--encoder", choices=("target", "context"), default="target",
                        help="which encoder of a training checkpoint (default: target, the EMA encoder the paper evaluates)")
    _add_labelled_data(shared)
    shared.add_argument("--image-size", type=_positive_int, help="must equal the encoder's training crop (the default)")
    shared.add_argument("--seed", type=int, default=0, help="the subset, the held-out split, the heads' init and order")
    shared.add_argument("--out", metavar="DIR", help="results (METHOD.json) and the feature cache (features/); default: a new folder here")
    shared.add_argument("--no-cache", action="store_true", help="encode again instead of reading DIR/features")
    shared.add_argument("--batch-size", type=_positive_int, default=256, help="images per encoder batch")
    shared.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu; under torchrun, cuda means each rank's own GPU)")
    shared.add_argument("--num-workers", type=_positive_int, help="image decoding processes for folders (default: in this process)")
    shared.add_argument("--no-progress", action="store_true")

    evaluation = commands.add_parser("eval", help="frozen-feature probes: linear grid, logreg, attentive, kNN")
    methods = evaluation.add_subparsers(dest="method", required=True, metavar="METHOD")
    linear = methods.add_parser("linear", parents=[shared], help="a grid of linear heads (lr x weight decay x head x features) in one pass")
    linear.add_argument("--lrs", type=_floats, help="learning rates, scaled by batch/256 (default: 13 values from 1e-5 to 0.1)")
    linear.add_argument("--weight-decays", type=_floats, help="default 0,5e-4")
    linear.add_argument("--heads", type=_names, help="linear and/or bn (BatchNorm then linear); default both")
    linear.add_argument("--epochs", type=_positive_int)
    linear.add_argument("--probe-batch-size", type=_positive_int, help="features per step of the heads")
    linear.add_argument("--optimizer", choices=("sgd", "lars"), help="SGD with momentum 0.9 (default) or LARS for large batches")
    linear.add_argument("--holdout", type=_fraction, help="fraction of each class held out of train to choose the head (default 0.1)")
    linear.add_argument("--augmentation", choices=("none", "rrc-flip", "center-flip"),
                        help="none: features once, cached (default); rrc-flip / center-flip (Clevr): train images re-encoded each epoch")
    logreg = methods.add_parser("logreg", parents=[shared], help="L2 multinomial logistic regression for extreme low-shot (MSN)")
    logreg.add_argument("--lambd", type=float, help="the L2 weight (default 0.00025 / N)")
    logreg.add_argument("--max-iter", type=_positive_int)
    attentive = methods.add_parser("attentive", parents=[shared], help="V-JEPA's attentive probe over the patch tokens")
    attentive.add_argument("--probe-heads", type=_positive_int, dest="probe_heads", metavar="K",
                           help="K probes over an (lr, weight decay) grid in one pass, chosen on held-out train (default 1)")
    attentive.add_argument("--epochs", type=_positive_int)
    attentive.add_argument("--probe-batch-size", type=_positive_int)
    attentive.add_argument("--holdout", type=_fraction)
    knn = methods.add_parser("knn", parents=[shared], help="weighted kNN on L2-normalised features (DINO's)")
    knn.add_argument("--k", type=_ints, dest="ks", help="neighbour counts (default 10,20,100,200), the best chosen on held-out train")
    knn.add_argument("--temperature", type=float)
    knn.add_argument("--holdout", type=_fraction)
    evaluation.set_defaults(run=_eval)


def _add_finetune_parser(commands) -> None:
    from fastjepa.config import recipe_names

    finetune = commands.add_parser(
        "finetune", help="fine-tune an encoder with a linear head (MAE's recipe: layer-wise lr decay, RandAugment, mixup/cutmix)",
        description="Fine-tune a pretrained encoder end to end with a linear head on its averaged last layer, as the paper's "
                    "ImageNet-1% and full fine-tuning (MAE's recipe), with the augmentation on the device. Every epoch it measures "
                    "held-out train (choosing finetune-best.pth.tar) and val.")
    source = finetune.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="PATH", help="any weights fastjepa export reads or writes (a checkpoint, an hf folder, "
                                                          "a timm or fastjepa .safetensors file)")
    source.add_argument("--checkpoint", metavar="PATH", help="a pretraining checkpoint (fastjepa's or the reference's)")
    _add_labelled_data(finetune)
    recipe = finetune.add_mutually_exclusive_group()
    recipe.add_argument("--preset", default="finetune_digits", metavar="NAME",
                        help=f"a shipped preset: {', '.join(recipe_names(finetune=True))} (default finetune_digits)")
    recipe.add_argument("--config", metavar="FILE", help="a fine-tuning YAML file (the presets' format)")
    finetune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    finetune.add_argument("--out", metavar="DIR", help="the run folder (default: a new folder here)")
    finetune.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best present)")
    finetune.add_argument("--seed", type=int, default=0, help="the subset, the held-out split, the head's init, the data order and augmentation")
    finetune.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop after N steps (a checkpoint is written)")
    finetune.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                          help="continue from a checkpoint: PATH, latest (the run folder's finetune-latest.pth.tar) or auto")
    finetune.add_argument("--checkpoint-every", type=_positive_int, metavar="N", help="also write the -latest checkpoint every N steps")
    finetune.add_argument("--dry-run", action="store_true", help="print the param groups, the schedule and the memory estimate; train nothing")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bar")
    finetune.set_defaults(run=_finetune)


def _add_run_parsers(commands) -> None:
    """``train`` and ``submit``, which share the config, the run folder and the run's length."""
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


def _add_plot_parser(commands) -> None:
    plot = commands.add_parser("plot", help="draw a training or fine-tuning run's curves, or an eval run's grid of heads, to PNG")
    plot.add_argument("folder", metavar="OUT_DIR")
    plot.set_defaults(run=_plot)


def _add_export_parser(commands) -> None:
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


def _add_info_parser(commands) -> None:
    info = commands.add_parser("info", help="print versions, devices and which backends are usable here")
    info.set_defaults(run=_info)


def _add_data_parser(commands) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjepa", description="Kernel-optimized I-JEPA pretraining.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run_parsers, _add_plot_parser, _add_eval_parsers, _add_finetune_parser, _add_export_parser, _add_info_parser,
                _add_data_parser):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fastjepa.config import ConfigError
    from fastjepa.helper import CheckpointError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = " ".join(shlex.quote(word) for word in ["fastjepa", *argv])
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
