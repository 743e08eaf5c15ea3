"""The ``fastjepa`` command line."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from fastjepa.info import collect, format_info

    print(format_info(collect()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjepa", description="Kernel-optimized I-JEPA pretraining.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="print versions, devices and which backends are usable here")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)
