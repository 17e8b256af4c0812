"""The `lmforge` command line: one table of commands, each a thin function over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

# Each command: (help, add_arguments(parser), run(args) -> exit code). Sections below are grouped by library module.
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `run` as the command `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


# --- checkpoints (lmforge.io): info, convert ---------------------------------------------------------------------


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file or packaged name (e.g. default, all-minilm-l6-v2)")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@command("info", "Describe a model: architecture, parameter count, dtype, context length, files.",
         _info_arguments)
def _info(args: argparse.Namespace) -> int:
    from lmforge.io import describe_checkpoint

    d = describe_checkpoint(args.model)
    stored = ", ".join(f"{name} x{count}" for name, count in sorted(d["stored_dtypes"].items()))
    heads = f"{d['n_head']} heads"
    if d["n_kv_head"] != d["n_head"]:
        heads += f" ({d['n_kv_head']} key/value)"
    rows = [("source", d["source"]), ("format", d["format"]),
            ("architecture", f"{d['architecture']} ({d['family']} {d['arch']}, head {d['head']})"),
            ("parameters", f"{d['parameters']:,} ({d['parameters'] / 1e6:.1f}M)"),
            ("dtype", f"{d['dtype']} when loaded; stored tensors: {stored}"),
            ("context length", f"{d['context_length']:,} tokens"),
            ("shape", f"{d['n_layer']} layers, width {d['d_model']}, {heads}, "
                      f"vocabulary {d['vocab_size']:,}")]
    rows += [("file" if i == 0 else "", f"{Path(f).name}  {_size(n)}") for i, (f, n) in enumerate(d["files"])]
    rows.append(("total size", _size(sum(n for _, n in d["files"]))))
    for key, value in rows:
        print(f"{key:<15} {value}")
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="GGUF file, HF folder or packaged name")
    p.add_argument("dst", help="output folder (Hugging Face layout: config.json + model.safetensors)")
    p.add_argument("--dtype", default=None, help="cast the weights, e.g. float32, bfloat16, float16 "
                   "(default: keep the stored dtype; GGUF weights are dequantized to float32)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")


@command("convert", "Convert a GGUF file or HF folder into an HF safetensors folder (with its tokenizer).",
         _convert_arguments)
def _convert(args: argparse.Namespace) -> int:
    from lmforge.io import load_model, resolve_source, save_model
    from lmforge.tokenizer import Tokenizer

    src = resolve_source(args.src)
    model = load_model(src, dtype=args.dtype)
    files = save_model(model, args.dst, max_shard_size=args.max_shard_size)
    try:
        tokenizer = Tokenizer.for_model(src)
    except FileNotFoundError:
        tokenizer = None  # a folder with weights only: nothing to carry over
    if tokenizer is not None:
        tokenizer.save(args.dst)
    params = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"wrote {args.dst}: {', '.join(f.name for f in files)}"
          f"{' + tokenizer' if tokenizer is not None else ''} ({params:,} parameters, {dtype})")
    return 0


# --- generation (lmforge.generation): generate -------------------------------------------------------------------

# --- training (lmforge.training, lmforge.distill): train, finetune, evaluate, distill, plot ------------------------

# --- end of commands ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as err:
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
