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


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (batched, left-padded)")
    p.add_argument("--model", default="default",
                   help="HF folder, .gguf file or packaged name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                   help="weights dtype; auto: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--max-length", type=int, help="prompt + new tokens, as in transformers (default 20)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens (instead of --max-length)")
    p.add_argument("--min-new-tokens", type=int, help="no end-of-sequence before this many new tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 means greedy; default 1)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 50, 0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set reaching this probability")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already present")
    p.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    p.add_argument("--num-beams", type=int, help="beam search with this many beams")
    p.add_argument("--num-return-sequences", type=int, help="sequences per prompt (sampling or beams)")
    p.add_argument("--stop", action="append", dest="stop_strings", metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    p.add_argument("--seed", type=int, help="random seed for sampling (same seed, same output)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")


@command("generate", "Generate text from prompts with a causal language model.", _generate_arguments)
def _generate(args: argparse.Namespace) -> int:
    import torch

    from lmforge.generation import generate, preferred_dtype, stream
    from lmforge.io import load_model
    from lmforge.tokenizer import Tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = preferred_dtype(device) if args.dtype == "auto" else args.dtype
    model = load_model(args.model, dtype=dtype, device=device)
    tokenizer = Tokenizer.for_model(args.model)
    names = ("max_length", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size", "num_beams", "num_return_sequences",
             "stop_strings")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    kwargs["do_sample"] = args.do_sample
    if args.seed is not None:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(args.seed)
    shown = (lambda prompt, text: text) if args.chat else (lambda prompt, text: prompt + text)
    if not args.stream:
        texts = generate(model, tokenizer, args.prompts, chat=args.chat, **kwargs)
        per_prompt = len(texts) // len(args.prompts)
        for i, text in enumerate(texts):
            print(f"Generated {i + 1}: {shown(args.prompts[i // per_prompt], text)}")
        return 0
    n = kwargs.pop("num_return_sequences", 1)
    i = 0
    for prompt in args.prompts:
        for _ in range(n):
            i += 1
            print(f"Generated {i}: {shown(prompt, '')}", end="", flush=True)
            for piece in stream(model, tokenizer, prompt, chat=args.chat, **kwargs):
                print(piece, end="", flush=True)
            print()
    return 0


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
