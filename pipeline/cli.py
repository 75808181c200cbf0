"""`python -m pipeline STAGE ...`: one command line for every data stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int`. A `StageError` is a
problem the user can fix: it is printed as one line on stderr and the exit code is 2, no traceback;
so is a failed file operation (a full disk, a read-only or forbidden folder).
Ctrl-C (exit 130) and SIGTERM (exit 143) stop a stage the same way: the exception unwinds through
every `atomic_path`, so nothing is left at a final path, and the workers are stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from pathlib import Path
from typing import Iterator

from pipeline import HelpFormatter
from pipeline.errors import StageError, describe_os_error

STAGES = {  # command -> module (each exposes add_arguments and run)
    "download": "pipeline.download",
    "extract-paragraphs": "pipeline.extract",
    "add-corpus": "pipeline.add_corpus",
    "stats": "pipeline.stats",
    "tokenize": "pipeline.tokenize_stage",
    "pack": "pipeline.pack",
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="root of the stage outputs; default input/output paths live under it")
    parser.add_argument("--manifests", type=Path, default=Path("manifests"), help="directory of the stage manifests")
    parser.add_argument("--force", action="store_true",
                        help="rerun even when the manifest says the outputs are up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="STAGE",
                                       help="the stage to run, in this order (`python -m pipeline STAGE --help`)")
    for name, module_name in STAGES.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = subparsers.add_parser(name, help=doc.split("\n\n")[0] if doc else name, description=doc,
                                    formatter_class=HelpFormatter)
        add_common_arguments(sub)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a stage unwinds exactly as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_interrupts():
            return args.func(args) or 0
    except StageError as err:
        print(f"error: {args.stage}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {args.stage}: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"error: {args.stage}: interrupted; no output was left at its final path", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
