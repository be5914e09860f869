"""Command line: `python -m zimage_core COMMAND …`; each command wraps one core function.

Commands: `inspect PATH` (print the JSON report of `inspect.inspect`); `generate` (text to PNG, see
`cli_generate.py`); `lora inspect|convert|merge` (the LoRA hub, see `cli_lora.py`); `train CONFIG.toml` (headless
LoRA training, see `cli_train.py`). A new command: an `add_<command>(commands)` that registers a subparser with
`set_defaults(run=…)`.

Exit status: 0 on success; 2 on bad input — one line on stderr naming the file and the problem, no
traceback — as for bad arguments (argparse's convention); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .cli_generate import add_generate
from .cli_lora import add_lora
from .cli_train import add_train
from .inspection import inspect

# Bad input as the core reports it: ValueError (JSON and Unicode errors are ValueErrors too) and OSError
# (FileNotFoundError, PermissionError, IsADirectoryError), each naming the file.
USER_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zimage_core", description="Z-Image tools (zimage_core).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_inspect(commands)
    add_generate(commands)
    add_lora(commands)
    add_train(commands)
    return parser


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        help="describe a DiT, text encoder, VAE or LoRA from its headers (JSON)",
        description="Print what a checkpoint is (kind, layout, dtypes, parameters, inferred config) as JSON, "
        "from its safetensors headers only. PATH: a .safetensors file, a shard, an index, a component "
        "folder or a diffusers model root.",
    )
    p.add_argument("path", help="file or folder to describe")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(inspect(args.path), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader stopped early (`| head`): no message; silence the exit-time flush too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
