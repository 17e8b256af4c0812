"""The `lmforge` command line: one table of commands, each a thin function over the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.training import TrainConfig

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `lmforge COMMAND: error: ...` and exit code 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def writable_folder(path: str | Path, option: str) -> Path:
    """Check, before any expensive work, that `path` is a folder that files can be written in, or a path that
    can be created as one (its nearest existing ancestor is a writable folder). Creates nothing.

    Raises ValueError naming the option, the path and the problem.
    """
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} exists and is not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ValueError(f"{option} {str(path)!r} is not writable: a file cannot be created in "
                         f"{str(existing)!r} ({err.strerror or err})") from None
    return path


def checked_device(text: str) -> str:
    """A --device value that torch knows and this machine has (cpu, cuda, cuda:N), else ValueError."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {text}: no such CUDA device here ({torch.cuda.device_count()} available)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: lmforge runs on cpu or cuda")
    return text


def error_message(err: BaseException) -> str:
    """One line for a command's error: OS errors as 'PATH: problem', others as their message."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return " ".join(str(err).split("\n"))


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
    layers = f"{d['n_layer']} layers"
    if d["n_decoder_layer"] is not None:
        layers = f"{d['n_layer']} encoder + {d['n_decoder_layer']} decoder layers"
    if d["n_kv_head"] != d["n_head"]:
        heads += f" ({d['n_kv_head']} key/value)"
    rows = [("source", d["source"]), ("format", d["format"]),
            ("architecture", f"{d['architecture']} ({d['family']} {d['arch']}, head {d['head']})"),
            ("parameters", f"{d['parameters']:,} ({d['parameters'] / 1e6:.1f}M)"),
            ("dtype", f"{d['dtype']} when loaded; stored tensors: {stored}"),
            ("context length", f"{d['context_length']:,} tokens"),
            ("shape", f"{layers}, width {d['d_model']}, {heads}, "
                      f"vocabulary {d['vocab_size']:,}")]
    rows += [("file" if i == 0 else "", f"{Path(f).name}  {_size(n)}") for i, (f, n) in enumerate(d["files"])]
    rows.append(("total size", _size(sum(n for _, n in d["files"]))))
    for key, value in rows:
        print(f"{key:<15} {value}")
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="GGUF file, HF folder, packaged name or training checkpoint "
                   "(RUN_DIR/checkpoints/step_N)")
    p.add_argument("dst", help="output folder (Hugging Face layout: config.json + model.safetensors)")
    p.add_argument("--dtype", default=None, help="cast the weights, e.g. float32, bfloat16, float16 "
                   "(default: keep the stored dtype; GGUF weights are dequantized to float32)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")


@command("convert", "Convert a GGUF file or HF folder into an HF safetensors folder (with its tokenizer).",
         _convert_arguments)
def _convert(args: argparse.Namespace) -> int:
    from lmforge.io import load_model, resolve_source, save_model
    from lmforge.io.hf import copy_sentence_transformers_files
    from lmforge.tokenizer import Tokenizer

    src = resolve_source(args.src)
    writable_folder(args.dst, "destination")
    model = load_model(src, dtype=args.dtype)
    files = save_model(model, args.dst, max_shard_size=args.max_shard_size)
    try:
        tokenizer = Tokenizer.for_model(src)
    except FileNotFoundError:
        tokenizer = None  # a folder with weights only: nothing to carry over
    if tokenizer is not None:
        tokenizer.save(args.dst)
    if src.is_dir():
        files += copy_sentence_transformers_files(src, Path(args.dst))
    params = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"wrote {args.dst}: {', '.join(f.name for f in files)}"
          f"{' + tokenizer' if tokenizer is not None else ''} ({params:,} parameters, {dtype})")
    return 0


COMMANDS["export"] = ("Export a training checkpoint (RUN_DIR/checkpoints/step_N, mid-run too) or any model as an "
                      "HF safetensors folder (with its tokenizer); the same as convert.", _convert_arguments,
                      _convert)


# --- generation (lmforge.generation): generate -------------------------------------------------------------------


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (batched, left-padded)")
    p.add_argument("--model", default="default",
                   help="HF folder, .gguf file or packaged name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "int4", "auto"], default="auto",
                   help="weights: float32, bfloat16, or int8 / int4 (weight-only quantization, activations in "
                        "bfloat16 where the CPU has it); auto (default): float32 on CPU, bfloat16 on CUDA "
                        "(see benchmarks/dtype_perplexity.py)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="GGUF files: compute with the file's Q4_0 / Q4_1 / Q8_0 blocks as they are (CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token step with torch.compile (decoders; always on CUDA): on the CPU "
                        "the first call spends tens of seconds compiling (cached on disk for later runs), "
                        "then each token costs less (benchmarks/generate.py)")
    p.add_argument("--max-length", type=int, help="prompt + new tokens, as in transformers")
    p.add_argument("--max-new-tokens", type=int, help="new tokens (instead of --max-length; default: "
                   "128, or what the model's context leaves)")
    p.add_argument("--min-new-tokens", type=int, help="no end-of-sequence before this many new tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding (implied by "
                   "--temperature, --top-k, --top-p and --min-p; --temperature 0 means greedy)")
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
    p.add_argument("--stream", action="store_true", help="print text as it is generated: the same tokens as "
                   "without --stream (one prompt's sequences in turn; not with --num-beams)")
    p.add_argument("--json", action="store_true", help="print one JSON object: model, dtype and a list of "
                   "{prompt_index, sequence, prompt, text}")


@command("generate", "Generate text from prompts with a causal language model or a T5 (text-to-text).",
         _generate_arguments)
def _generate(args: argparse.Namespace) -> int:
    import torch

    from lmforge.generation import default_dtype, generate, preferred_dtype, stream_rows
    from lmforge.io import load_config, load_model
    from lmforge.tokenizer import Tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        checked_device(args.device)
    quantize = args.dtype if args.dtype in ("int8", "int4") else None
    if args.keep_quantized and quantize:
        raise ValueError("--keep-quantized computes with the GGUF file's own blocks; it cannot be combined with "
                         f"--dtype {args.dtype}")
    if args.stream and args.json:
        raise ValueError("--json prints whole results; it cannot be combined with --stream")
    if args.stream and (args.num_beams or 1) > 1:
        raise ValueError("--stream cannot be combined with --num-beams (beam search's best hypothesis changes "
                         "until the end)")
    seq2seq = load_config(args.model).arch == "encoder-decoder"
    if seq2seq and args.compile:
        raise ValueError("--compile compiles a decoder's one-token step; an encoder-decoder (T5) decodes eagerly")
    if seq2seq and args.chat:
        raise ValueError("--chat wraps prompts in a decoder chat model's template; an encoder-decoder (T5) takes "
                         "the task in plain text, e.g. 'summarize: ...'")
    dtype = preferred_dtype(device) if quantize else default_dtype(device) if args.dtype == "auto" else args.dtype
    model = load_model(args.model, dtype=dtype, device=device, quantize=quantize,
                       keep_quantized=args.keep_quantized)
    tokenizer = Tokenizer.for_model(args.model)
    names = ("max_length", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size", "num_beams", "num_return_sequences",
             "stop_strings")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    # A sampling option means sampling: never silently ignored (temperature 0 still means greedy).
    kwargs["do_sample"] = args.do_sample or any(name in kwargs for name in ("temperature", "top_k", "top_p",
                                                                            "min_p"))
    if args.seed is not None:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(args.seed)
    if args.compile:
        kwargs["compile"] = True
    n = kwargs.get("num_return_sequences", 1)

    def label(row: int) -> str:
        return f"Generated {row % n}" + (f" (prompt {row // n})" if len(args.prompts) > 1 else "") + ": "

    def shown(row: int, text: str) -> str:  # a decoder continues its prompt, a T5 answers it
        return text if args.chat or seq2seq else args.prompts[row // n] + text

    if args.stream:
        pieces = stream_rows(model, tokenizer, args.prompts, chat=args.chat, **kwargs)
        _print_streamed(pieces, len(args.prompts) * n, lambda row: label(row) + shown(row, ""))
        return 0
    texts = generate(model, tokenizer, args.prompts, chat=args.chat, **kwargs)
    if args.json:
        print(json.dumps({"model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                          "outputs": [{"prompt_index": row // n, "sequence": row % n,
                                       "prompt": args.prompts[row // n], "text": text}
                                      for row, text in enumerate(texts)]}, ensure_ascii=False))
        return 0
    for row, text in enumerate(texts):
        print(label(row) + shown(row, text))
    return 0


def _print_streamed(pieces, rows: int, start: Callable[[int], str]) -> None:
    """Print the `rows` rows of `stream_rows` in order, one line each beginning with `start(row)`: the current
    row live, later rows' pieces held until it ends (rows decode together, so the random draws are those of
    the call without streaming)."""
    held: dict[int, list[str]] = {row: [] for row in range(rows)}
    ended: set[int] = set()
    current = 0
    print(start(0), end="", flush=True)
    for piece in pieces:
        if piece.row != current:
            held[piece.row].append(piece.text)
            ended.update([piece.row] if piece.last else [])
            continue
        print(piece.text, end="", flush=True)
        if not piece.last:
            continue
        ended.add(current)
        while current in ended:
            print()
            current += 1
            if current == rows:
                return
            print(start(current) + "".join(held.pop(current)), end="", flush=True)


# --- serving (lmforge.serve): serve ------------------------------------------------------------------------------


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="HF folder, .gguf file or packaged name; repeatable (decoders generate, encoders embed); "
                        "clients name it exactly so in the 'model' field")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "int4", "auto"], default="auto",
                   help="weights, as for generate (auto: bfloat16 where the CPU or GPU has it, else float32)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; then 429")
    p.add_argument("--context", type=int, help="cache slots per sequence, prompt + max_tokens (default: the "
                                               "model's context, at most 2048)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds that requests in flight get to finish on SIGINT/SIGTERM")


@command("serve", "Serve models over an OpenAI-compatible HTTP API (continuous batching).", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    from lmforge.generation import preferred_dtype
    from lmforge.serve import serve

    if args.max_batch < 1 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise ValueError(f"--max-batch must be >= 1, --max-queue >= 0 and --port in 1..65535, got "
                         f"{args.max_batch}, {args.max_queue} and {args.port}")
    quantize = args.dtype if args.dtype in ("int8", "int4") else None
    dtype = preferred_dtype() if args.dtype == "auto" or quantize else args.dtype
    serve(args.model, host=args.host, port=args.port, dtype=dtype, quantize=quantize, api_key=args.api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
          shutdown_timeout=args.shutdown_timeout)
    return 0


# --- training (lmforge.training, lmforge.distill): train, finetune, evaluate, distill, plot ------------------------


def add_loop_arguments(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """The options of `lmforge.training.TrainConfig`, shared by train, finetune and distill."""
    p.add_argument("--run-dir", required=True, help="folder of checkpoints, metrics.jsonl, final model")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=8, help="items per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay after warm-up (default cosine)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="gradient-norm clip, 0: none (default 1)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32, or autocast in bf16 / fp16 (fp16 with a gradient scaler)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--eval-batches", type=int, help="evaluate on at most N batches (default: all)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (default 2)")
    p.add_argument("--log-every", type=int, default=10, help="log train metrics every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and masking")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the result still prints)")


def loop_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of the options added by `add_loop_arguments`."""
    from lmforge.training import TrainConfig

    if args.resume and not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"--resume: run directory {args.run_dir!r} does not exist")
    writable_folder(args.run_dir, "--run-dir")
    checked_device(args.device)
    return TrainConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                       max_steps=args.steps, schedule=args.schedule, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, clip_norm=args.clip_norm or None, precision=args.precision,
                       eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last,
                       log_every=args.log_every, seed=args.seed, run_dir=args.run_dir, device=args.device,
                       eval_max_batches=args.eval_batches, progress=not args.quiet)


def _fit_length(value: int | None, default: int, config, option: str) -> int:
    """A sequence length option: `default` capped by the model's context when not given, else checked."""
    context = config.max_seq_len - config.position_offset
    if value is None:
        return min(default, context)
    if not 2 <= value <= context:
        raise ValueError(f"{option} {value} is outside [2, {context}], the model's context")
    return value


def _save_final(model, tokenizer, run_dir: str) -> Path:
    from lmforge.io import save_model

    out = Path(run_dir) / "model"
    save_model(model.cpu(), out)
    tokenizer.save(out)
    return out


def _lm_data(args: argparse.Namespace, tokenizer, objective: str, block_size: int, split: str | None = None,
             vocab_size: int | None = None, pad_id: int = 0):
    """Causal-LM, masked-LM or span-corruption datasets of args.data: (train, eval) without `split`, else one
    dataset: a bbc-news split ("all" for the three together), or a whole corpus. MLM's random replacement tokens
    are drawn below `vocab_size` (default: the tokenizer's). Span corruption (T5) cuts the corpus into blocks of
    `block_size` tokens before corruption and pads with `pad_id`."""
    from lmforge import data

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer.encode_many(texts, add_special_tokens=False, progress=not args.quiet)

    def blocks(texts: list[str]):
        if objective in ("clm", "span-corruption"):
            return data.pack_tokens(encode(texts), block_size, separator=tokenizer.eos_token_id)
        cls_id, sep_id = tokenizer.special_token_id("cls"), tokenizer.special_token_id("sep")
        if cls_id is None or sep_id is None or tokenizer.mask_token_id is None:
            raise ValueError(f"masked LM needs a tokenizer with [CLS], [SEP] and [MASK] tokens; {tokenizer} "
                             f"lacks some")
        return data.encoder_blocks(encode(texts), block_size, cls_id, sep_id)

    def dataset(rows):
        if objective == "clm":
            return data.TokenBlocks(rows)
        if objective == "span-corruption":
            if not tokenizer.sentinel_ids or tokenizer.eos_token_id is None:
                raise ValueError(f"span corruption needs T5's sentinel tokens <extra_id_0>, <extra_id_1>, ... and "
                                 f"an end-of-sequence token; {tokenizer} lacks them")
            return data.SpanCorruptedBlocks(rows, tokenizer.sentinel_ids, tokenizer.eos_token_id, pad_id,
                                            seed=args.seed)
        vocab = min(tokenizer.vocab_size, vocab_size or tokenizer.vocab_size)
        return data.MaskedBlocks(rows, tokenizer.mask_token_id, vocab, tokenizer.all_special_ids,
                                 pad_id=tokenizer.pad_token_id, seed=args.seed)

    if args.data == "bbc-news":
        splits = data.bbc_news()
        if split is None:
            return dataset(blocks(splits["train"].texts)), dataset(blocks(splits["validation"].texts))
        parts = list(splits.values()) if split == "all" else [splits[split]]
        return dataset(blocks([text for part in parts for text in part.texts]))
    rows = blocks(data.read_corpus(args.data, getattr(args, "encoding", None) or "utf-8"))
    if split is not None:
        return dataset(rows)
    train_rows, eval_rows = data.split_blocks(rows, args.eval_fraction)
    return dataset(train_rows), dataset(eval_rows)


def record_run(run_dir: str, model_config, tokenizer) -> None:
    """The run's config.json and tokenizer in its folder, before training: its checkpoints
    (RUN_DIR/checkpoints/step_N) then load in every command and export while the run goes on."""
    from lmforge.io.hf import write_config

    write_config(model_config, Path(run_dir))
    tokenizer.save(run_dir)


_SIZES = {"n_layer": "--n-layer", "n_decoder_layer": "--n-decoder-layer", "n_head": "--n-head",
          "n_kv_head": "--n-kv-head", "d_model": "--d-model", "d_ff": "--d-ff", "context": "--context"}
# The packaged tokenizer of each preset family (bert-base-uncased's vocabulary is all-MiniLM-L6-v2's).
_PRESET_TOKENIZERS = {"gpt2": "gpt2", "llama": "smollm2-135m-instruct", "bert": "all-minilm-l6-v2",
                      "distilbert": "all-minilm-l6-v2"}


def _scratch_config(args: argparse.Namespace):
    """--from-scratch: the architecture of --config, a preset or a model source, resized by the size options."""
    from lmforge.config import PRESETS, ModelConfig
    from lmforge.io import load_config
    from lmforge.io.hf import config_from_hf

    if args.config:
        try:
            cfg = config_from_hf(json.loads(Path(args.config).read_text(encoding="utf-8")), args.config)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {args.config!r} is not a JSON config file: {err}") from None
    elif args.model.lower() in PRESETS:
        cfg = ModelConfig.from_name(args.model)
    else:
        cfg = load_config(args.model)
    sizes = {name: getattr(args, name) for name in _SIZES if getattr(args, name) is not None}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{_SIZES[name]} must be a positive integer, got {value}")
    if "context" in sizes:
        sizes["max_seq_len"] = sizes.pop("context") + cfg.position_offset
    if "n_head" in sizes or "d_model" in sizes:
        n_head, d_model = sizes.get("n_head", cfg.n_head), sizes.get("d_model", cfg.d_model)
        if d_model % n_head:
            raise ValueError(f"--d-model {d_model} must be divisible by --n-head {n_head}")
        sizes.setdefault("n_kv_head", n_head if "n_head" in sizes else cfg.n_kv_head)
        sizes["head_dim"] = None  # recomputed: d_model // n_head
    n_head = sizes.get("n_head", cfg.n_head)
    if n_head % sizes.get("n_kv_head", cfg.n_kv_head):
        raise ValueError(f"--n-head {n_head} must be a multiple of --n-kv-head {sizes['n_kv_head']}")
    return cfg.replace(**sizes, head="lm")


def _scratch_tokenizer(args: argparse.Namespace, family: str):
    """--tokenizer, else --model's own, else (a preset or --config) the packaged tokenizer of the family."""
    from lmforge.config import PRESETS
    from lmforge.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.for_model(args.tokenizer)
    if args.config or args.model.lower() in PRESETS:
        if family not in _PRESET_TOKENIZERS:
            raise ValueError(f"no packaged tokenizer for {args.config or args.model!r}: give --tokenizer (a model "
                             f"folder, .gguf or one of gpt2, smollm2-135m-instruct, all-minilm-l6-v2)")
        return Tokenizer.from_name(_PRESET_TOKENIZERS[family])
    return Tokenizer.for_model(args.model)


def _lm_stream(args: argparse.Namespace, tokenizer):
    """The text of args.data (a bbc-news split, or a whole corpus) as one token stream (N,), each document
    followed by the eos token (when the tokenizer has one)."""
    import torch

    from lmforge import data

    if args.data == "bbc-news":
        splits = data.bbc_news()
        texts = [t for name, part in splits.items() if args.split in (name, "all") for t in part.texts]
    else:
        texts = data.read_corpus(args.data)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded = tokenizer.encode_many(texts, add_special_tokens=False, progress=not args.quiet)
    return torch.tensor([i for ids in encoded for i in ids + eos])


def add_seq2seq_arguments(p: argparse.ArgumentParser, scoring: bool) -> None:
    """Options of (source, target) data for encoder-decoder models (T5); `scoring`: also those of the generation
    that ROUGE scores (finetune, evaluate)."""
    p.add_argument("--source-column", default="source", help="encoder-decoder (source, target) files: the "
                   "source column (default source)")
    p.add_argument("--target-column", default="target", help="... the target column (default target)")
    p.add_argument("--max-source-len", type=int, default=512, help="encoder-decoder: source tokens kept, eos "
                   "included (default 512)")
    p.add_argument("--max-target-len", type=int, default=128, help="encoder-decoder: target tokens kept, eos "
                   "included (default 128; also the new tokens generated for ROUGE)")
    if scoring:
        p.add_argument("--num-beams", type=int, default=1, help="encoder-decoder: beams of the generation "
                       "scored with ROUGE (default 1: greedy)")


def seq2seq_objective(config):
    """The `Seq2SeqLM` objective of an encoder-decoder model's config (its decoder start and padding ids)."""
    from lmforge.objectives import Seq2SeqLM

    pad = config.pad_token_id if config.pad_token_id is not None else 0
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
    return Seq2SeqLM(decoder_start_id=start, pad_id=pad)


def _pair_splits(args: argparse.Namespace):
    """The (source, target) splits the data options name (see `lmforge.labelled.load_pair_splits`)."""
    from lmforge.labelled import load_pair_splits

    if args.data is None and getattr(args, "train", None) is None:
        raise ValueError("no data: give --data (bbc-headlines or a file of (source, target) pairs), or --train "
                         "and --validation")
    fractions = _fractions(args.split_fractions) if hasattr(args, "split_fractions") else (0.8, 0.1, 0.1)
    return load_pair_splits(args.data, train=getattr(args, "train", None),
                            validation=getattr(args, "validation", None), test=getattr(args, "test", None),
                            source_column=args.source_column, target_column=args.target_column,
                            encoding=getattr(args, "encoding", None) or "utf-8",
                            header=not getattr(args, "no_header", False), fractions=fractions,
                            split_seed=getattr(args, "split_seed", 0))


def _encoded_pairs(args: argparse.Namespace, tokenizer, config, pairs):
    from lmforge.predict import encode_pairs

    for option, value in (("--max-source-len", args.max_source_len), ("--max-target-len", args.max_target_len)):
        if value < 2:
            raise ValueError(f"{option} {value}: expected at least 2 (a token and the end-of-sequence token)")
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return encode_pairs(tokenizer, pairs, args.max_source_len, args.max_target_len, pad)


def _seq2seq_data(args: argparse.Namespace, tokenizer, config, objective: str, split: str | None = None):
    """An encoder-decoder's (train, eval) datasets: span-corrupted corpus blocks (`split`: one split's, as
    `_lm_data`), or encoded (source, target) pairs (the validation split for evaluation)."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if objective == "span-corruption":
        if _pairs_data(args):
            raise ValueError(f"--objective span-corruption pre-trains on a text corpus (a text file, a folder of "
                             f".txt files or bbc-news), not on (source, target) pairs {args.data or args.train}")
        block_size = _fit_length(args.block_size, 128, config, "--block-size")
        return _lm_data(args, tokenizer, objective, block_size, split=split, pad_id=pad)
    if args.data == "bbc-news":
        raise ValueError("--objective seq2seq needs (source, target) pairs: bbc-headlines (BBC News articles and "
                         "their headlines) or a CSV / TSV / JSON-lines file; bbc-news is a plain-text corpus")
    splits = _pair_splits(args)
    return (_encoded_pairs(args, tokenizer, config, splits["train"]),
            _encoded_pairs(args, tokenizer, config, splits["validation"]))


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, .gguf file or packaged name to start from")
    p.add_argument("--data", required=True, help="a text file, a folder of .txt files, or bbc-news")
    p.add_argument("--objective", choices=["clm", "mlm", *SEQ2SEQ_OBJECTIVES],
                   help="causal or masked LM; for an encoder-decoder (T5): span-corruption (pre-training on a "
                        "corpus) or seq2seq ((source, target) pairs: bbc-headlines or a CSV / TSV / JSON-lines "
                        "file, split 80/10/10 with seed 0); default: by the model and the data")
    p.add_argument("--from-scratch", action="store_true",
                   help="pre-train: fresh random weights of --model's architecture (a model source or a preset: "
                        "gpt2, distilgpt2, smollm2-135m, bert-base-uncased, distilbert-base-uncased, "
                        "roberta-base), of --config, resized by the size options")
    p.add_argument("--config", help="--from-scratch: the architecture from this config.json instead")
    p.add_argument("--tokenizer", help="--from-scratch: tokenizer source (default: --model's, or for a preset "
                   "the packaged one of its family); the vocabulary size follows it")
    for option, what in (("--n-layer", "layers (an encoder-decoder's encoder layers)"),
                         ("--n-decoder-layer", "an encoder-decoder's decoder layers (default: --n-layer)"),
                         ("--n-head", "attention heads"),
                         ("--n-kv-head", "key/value heads (default: --n-head)"), ("--d-model", "width"),
                         ("--d-ff", "feed-forward width"), ("--context", "context length in tokens")):
        p.add_argument(option, type=int, help=f"--from-scratch: {what}")
    p.add_argument("--block-size", type=int, help="tokens per training sequence (default 128 or the context; "
                   "span corruption: tokens of a block before corruption)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="share of a corpus's blocks held out for evaluation (default 0.05; bbc-news uses its "
                        "validation split)")
    add_seq2seq_arguments(p, scoring=False)
    add_loop_arguments(p, steps=200, lr=3e-4)
    p.add_argument("--strategy", choices=["allreduce", "ddp", "ps", "fsdp"],
                   help="data parallelism under torchrun --nproc-per-node N (default: one process); "
                        "--batch-size is per data-parallel rank; fsdp: sharded (FSDP2, ZeRO-3)")
    p.add_argument("--dp", type=int, help="data-parallel degree (default: what --tp and --pp leave of the ranks)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1); with --strategy fsdp "
                   "2-D FSDP x TP, with --pp each stage tensor-parallel")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--pp-schedule", choices=["gpipe", "1f1b", "interleaved-1f1b"],
                   help="--pp > 1: the pipeline schedule (default 1f1b; interleaved-1f1b: 2 stages per rank; "
                        "--schedule is the learning-rate one)")
    p.add_argument("--microbatches", type=int, help="--pp > 1: micro-batches per batch (default: --pp); "
                   "--batch-size must be a multiple")
    p.add_argument("--pp-split", help="--pp > 1: layers per stage, e.g. 3,5 (default: balanced by parameters; "
                   "interleaved-1f1b has 2 x --pp stages)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="--tp > 1: norms and dropout on sequence shards (--block-size divisible by --tp)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward instead of storing them (any layout "
                        "without --pp)")
    p.add_argument("--ps-servers", type=int, default=1, help="ps: server ranks, the first ones (default 1)")
    p.add_argument("--ps-mode", choices=["sync", "async", "bounded"], default="sync",
                   help="ps: consistency (default sync)")
    p.add_argument("--ps-tau", type=int, help="ps bounded: max steps a worker may run ahead of the slowest")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank waits for its peers before failing (default 60)")


@command("train", "Pre-train or continue training a language model (causal or masked LM) on a corpus.",
         _train_arguments)
def _train(args: argparse.Namespace) -> int:
    import torch

    from lmforge.io import load_config, load_model
    from lmforge.models import build_model
    from lmforge.objectives import CausalLM, MaskedLM
    from lmforge.tokenizer import Tokenizer
    from lmforge.training import train

    config = loop_config(args)
    _check_layout(args)
    if not args.from_scratch and (args.config or args.tokenizer or any(getattr(args, n) is not None for n in _SIZES)):
        raise ValueError("--config, --tokenizer and the size options build a new model: add --from-scratch")
    model_config = _scratch_config(args) if args.from_scratch else load_config(args.model)
    pp_split = _pp_split(args, model_config.n_layer)
    if model_config.arch == "encoder-decoder" or args.objective in SEQ2SEQ_OBJECTIVES:
        checked = model_config.replace(head="lm") if args.from_scratch else model_config
        objective = _fitting_objective(checked, args.objective, f"--model {args.model}", args)
    else:
        objective = args.objective or ("clm" if model_config.arch == "decoder" else "mlm")
    if objective not in SEQ2SEQ_OBJECTIVES and (objective == "clm") != (model_config.arch == "decoder"):
        raise ValueError(f"objective {objective!r} does not fit a {model_config.arch} model; causal LM needs "
                         f"a decoder, masked LM an encoder")
    head = "lm" if model_config.arch == "encoder" else None
    if args.from_scratch:
        tokenizer = _scratch_tokenizer(args, model_config.family)
        torch.manual_seed(args.seed)
        model = build_model(model_config.replace(head="lm", vocab_size=tokenizer.vocab_size))
    else:
        model = load_model(args.model, dtype="float32", head=head)
        tokenizer = Tokenizer.for_model(args.model)
    if objective in SEQ2SEQ_OBJECTIVES:
        train_data, eval_data = _seq2seq_data(args, tokenizer, model.config, objective)
        loss = seq2seq_objective(model.config)
    else:
        block_size = _fit_length(args.block_size, 128, model.config, "--block-size")
        vocab_size = model.config.vocab_size
        train_data, eval_data = _lm_data(args, tokenizer, objective, block_size, vocab_size=vocab_size)
        loss = CausalLM() if objective == "clm" else MaskedLM()
    if args.strategy:
        from lmforge.parallel.strategy import make_strategy, run_training

        strategy = make_strategy(args.strategy, grad_accum=config.grad_accum, n_servers=args.ps_servers,
                                 mode=args.ps_mode, tau=args.ps_tau, timeout=args.timeout, dp=args.dp,
                                 tp=args.tp, pp=args.pp, sequence_parallel=args.sequence_parallel,
                                 activation_checkpointing=args.activation_checkpointing,
                                 schedule=args.pp_schedule or "1f1b", microbatches=args.microbatches or args.pp,
                                 pp_split=pp_split)
        if strategy.is_main:
            record_run(args.run_dir, model.config, tokenizer)
        result = run_training(model, loss, train_data, config, strategy, eval_data=eval_data,
                              resume=args.resume)
        model = strategy.full_model(model)  # a sharded model is gathered (every rank takes part)
        if not strategy.is_main:  # other workers and parameter servers: rank 0 reports and saves
            return 0
    else:
        if args.activation_checkpointing:
            from lmforge.parallel.plans import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        record_run(args.run_dir, model.config, tokenizer)
        result = train(model, loss, train_data, config, eval_data=eval_data, resume=args.resume)
    out = _save_final(model, tokenizer, args.run_dir)
    print(json.dumps({"step": result.step, "train_loss": result.train_loss, "eval": result.eval_metrics,
                      "model": str(out)}))
    return 0


SEQ2SEQ_OBJECTIVES = ("seq2seq", "span-corruption")


def _pairs_data(args: argparse.Namespace) -> bool:
    """Whether the data options name (source, target) pairs (bbc-headlines, a table file, split files) rather
    than a corpus of plain text."""
    data = getattr(args, "data", None)
    return getattr(args, "train", None) is not None or data == "bbc-headlines" or (
        data is not None and Path(data).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"))


def _check_layout(args: argparse.Namespace) -> None:
    """Validate the model-parallel options before any work: degrees against torchrun's world size, pipeline
    options only with --pp > 1, a layout only with a strategy that takes one."""
    import os

    from lmforge.parallel.mesh import Layout
    from lmforge.parallel.plans import check_plan

    layout_given = args.dp is not None or args.tp != 1 or args.pp != 1
    if (args.sequence_parallel or layout_given) and not args.strategy:
        raise ValueError("--dp/--tp/--pp and --sequence-parallel need --strategy (fsdp, ddp or allreduce) under "
                         "torchrun")
    if args.strategy == "ps" and (layout_given or args.sequence_parallel or args.activation_checkpointing):
        raise ValueError("--strategy ps takes no --dp/--tp/--pp layout nor activation checkpointing")
    if args.pp == 1 and (args.pp_schedule or args.microbatches is not None or args.pp_split):
        raise ValueError("--pp-schedule, --microbatches and --pp-split are pipeline options: they need --pp > 1")
    if args.microbatches is not None and args.microbatches < 1:
        raise ValueError(f"--microbatches must be a positive integer, got {args.microbatches}")
    if args.pp > 1:
        if args.strategy not in ("ddp", "allreduce") or args.sequence_parallel or args.activation_checkpointing:
            raise ValueError(f"--pp {args.pp} runs with --strategy ddp or allreduce (with --tp or without), "
                             f"without --sequence-parallel or --activation-checkpointing (pipeline x FSDP is not "
                             f"supported)")
        micro = args.microbatches or args.pp
        if (args.pp_schedule or "1f1b") == "1f1b" and micro < args.pp:
            raise ValueError(f"the 1f1b schedule needs --microbatches >= --pp ({args.pp}), got {micro}")
        if args.pp_schedule == "interleaved-1f1b" and micro % max(1, micro // args.pp):
            raise ValueError(f"the interleaved-1f1b schedule needs --microbatches a multiple of "
                             f"max(1, microbatches // pp) = {max(1, micro // args.pp)}, got {micro}")
        if args.batch_size % micro:
            raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {micro} pipeline "
                             f"micro-batches (--microbatches)")
        _pp_split(args, None)
    if args.sequence_parallel and args.tp == 1:
        raise ValueError("--sequence-parallel shards the sequence over tensor-parallel ranks: it needs --tp > 1")
    if args.strategy:
        layout = Layout.parse(dp=args.dp, pp=args.pp, tp=args.tp, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if args.strategy != "ps" and layout.pp == 1:  # a pipeline is checked above
            check_plan(layout.dp, layout.tp, "fsdp" if args.strategy == "fsdp" else "ddp", args.sequence_parallel)


def _pp_split(args: argparse.Namespace, n_layer: int | None) -> list[int] | None:
    """--pp-split as layer counts, checked against --pp and (when given) the model's layers."""
    if not args.pp_split:
        return None
    from lmforge.parallel.pipeline import parse_split

    split = parse_split(args.pp_split)
    stages = args.pp * (2 if args.pp_schedule == "interleaved-1f1b" else 1)
    if len(split) != stages:
        raise ValueError(f"--pp-split {args.pp_split} gives {len(split)} stages, the pipeline has {stages} "
                         f"(--pp {args.pp}, schedule {args.pp_schedule or '1f1b'})")
    if n_layer is not None and sum(split) != n_layer:
        raise ValueError(f"--pp-split {args.pp_split} covers {sum(split)} layers; the model has {n_layer}")
    return split


# --- planning (lmforge.parallel.planner): plan ------------------------------------------------------------------


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset (gpt2, bert-base-uncased, bert-large-uncased, ...), "
                   "an HF folder or a .gguf file: its config only, no weights are read")
    p.add_argument("--batch", type=int, required=True, help="sequences per optimizer step, all devices together "
                   "(with --generate: sequences generated at once)")
    p.add_argument("--seq", type=int, required=True, help="tokens per sequence (with --generate: prompt + new)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="training: fp32, or autocast in bf16 / fp16 on float32 weights (lmforge's --precision); "
                        "generation: the weights' and cache's dtype (default fp32)")
    p.add_argument("--devices", type=int, default=1, help="devices to spread over (default 1)")
    p.add_argument("--device-memory", default="16GB", help="memory of one device, e.g. 16GB, 80GB (default 16GB)")
    p.add_argument("--device-type", choices=["cuda", "cpu"], default="cuda",
                   help="kernels to plan for: cuda (fused AdamW, fused dropout) or cpu (default cuda)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam: two float32 moments (lmforge train's AdamW); sgd: one momentum buffer")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on a data-parallel rank")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="only layouts with per-block activation checkpointing (default: with and without)")
    p.add_argument("--generate", action="store_true", help="plan generation (weights + KV cache) instead")
    p.add_argument("--tflops", type=float, default=100.0,
                   help="peak dense TFLOP/s of one device in bf16/fp16; fp32 is a quarter (default 100)")
    p.add_argument("--link-gbs", type=float, default=50.0, help="GB/s between devices, each way (default 50)")
    p.add_argument("--headroom", type=float, help="share of --device-memory left free for the CUDA context and "
                   "allocator fragmentation (default 0.1 on cuda, 0 on cpu)")
    p.add_argument("--data", default="DATA", help="the corpus to put into the printed train command")
    p.add_argument("--top", type=int, default=15, help="table rows to print (default 15; --json has all)")
    p.add_argument("--json", action="store_true", help="one JSON object with every layout")


@command("plan", "Predict the peak memory per device of each parallel layout (dp, fsdp, tp, pp), which fit, "
         "their step time, and the command that runs the best; exit 1 when none fits.", _plan_arguments)
def _plan(args: argparse.Namespace) -> int:
    from lmforge.config import ModelConfig
    from lmforge.io import load_config
    from lmforge.parallel import planner

    for option in ("batch", "seq", "devices", "grad_accum", "top"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be a positive integer, got {getattr(args, option)}")
    if args.tflops <= 0 or args.link_gbs <= 0:
        raise ValueError("--tflops and --link-gbs must be positive")
    if args.headroom is not None and not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), got {args.headroom}")
    memory = planner.parse_bytes(args.device_memory)
    cfg = ModelConfig.from_name(args.model) if planner.is_preset_only(args.model) else load_config(args.model)
    hardware = planner.Hardware(memory=memory, device=args.device_type, tflops=args.tflops,
                                link_gbs=args.link_gbs, headroom=args.headroom)
    if args.generate:
        rows = planner.generation_plan(cfg, args.batch, args.seq, args.dtype, hardware, args.devices)
        if args.json:
            print(json.dumps({"device_memory": memory, "usable": hardware.usable,
                              "layouts": [r.to_dict() for r in rows]}))
        else:
            print(planner.format_generation_table(rows))
        return 0 if any(r.fits for r in rows) else 1
    workload = planner.Workload(cfg.replace(head="lm"), args.batch, args.seq, args.dtype, args.optimizer,
                                args.grad_accum)
    ac = True if args.activation_checkpointing else None
    rows = planner.plan(workload, hardware, args.devices, ac, model=args.model, data=args.data)
    if not rows:
        raise ValueError(f"no layout of {args.devices} devices divides batch {args.batch} x grad-accum "
                         f"{args.grad_accum}; give a batch that is a multiple of the data-parallel degree")
    best = rows[0] if rows[0].fits else None
    if args.json:
        print(json.dumps({"device_memory": memory, "usable": hardware.usable, "best": best.to_dict() if best else None,
                          "layouts": [r.to_dict() for r in rows]}))
        return 0 if best else 1
    print(f"{args.model}: {planner.count_parameters(cfg.replace(head='lm')).total / 1e6:.1f}M parameters, batch "
          f"{args.batch} x {args.seq} tokens, {args.dtype}, {args.optimizer}, {args.devices} device(s) of "
          f"{memory / planner.GiB:.1f} GiB ({hardware.usable / planner.GiB:.1f} usable); peak per rank in GiB, "
          "step time in seconds (predicted)")
    print(planner.format_table(rows, args.top))
    fitting = sum(r.fits for r in rows)
    print(f"{fitting} of {len(rows)} layouts fit")
    if best is None:
        print(f"none fits: the smallest peak is {rows[0].peak / planner.GiB:.2f} GiB ({rows[0].layout.name}); "
              "try more devices, a smaller batch with --grad-accum, bf16 or activation checkpointing")
        return 1
    print(f"best: {best.layout.name}\n{best.command}")
    return 0


def _fitting_objective(cfg, requested: str | None, who: str, args: argparse.Namespace | None = None) -> str:
    """The objective a model's head supports (clm, mlm or classify; seq2seq or span-corruption for an
    encoder-decoder, by default seq2seq for (source, target) data and span-corruption for a corpus); an error
    if `requested` is another one."""
    if cfg.arch == "encoder-decoder" and cfg.head == "lm":
        objective = requested or ("seq2seq" if args is None or _pairs_data(args) else "span-corruption")
        if objective not in SEQ2SEQ_OBJECTIVES:
            raise ValueError(f"--objective {objective} does not fit {who} (an encoder-decoder model, T5); it "
                             f"trains with --objective span-corruption (pre-training on a corpus) or seq2seq "
                             f"((source, target) pairs)")
        return objective
    if requested in SEQ2SEQ_OBJECTIVES:
        raise ValueError(f"--objective {requested} needs an encoder-decoder model (T5); {who} is a {cfg.arch} "
                         f"with head {cfg.head!r}")
    fitting = "classify" if cfg.head == "classify" else ("clm" if cfg.arch == "decoder" else "mlm")
    objective = requested or fitting
    if cfg.head == "none" or objective != fitting:
        raise ValueError(f"--objective {objective} does not fit {who} ({cfg.arch}, head {cfg.head!r}); it needs "
                         f"an output head and fits {fitting if cfg.head != 'none' else 'nothing (no head)'}")
    return objective


def add_data_arguments(p: argparse.ArgumentParser, corpus: bool = False) -> None:
    """Where labelled data comes from and how it is read (finetune, evaluate, distill, predict)."""
    from lmforge.labelled import GLUE_TASKS
    from lmforge.metrics import METRICS

    p.add_argument("--data", help="bbc-news; a CSV / TSV / JSON-lines file (split with --split-fractions); a folder of "
                   "split files (train, validation or dev, test); or a folder of <label>/*.txt"
                   + ("; or a text file / folder of .txt files (LM objectives)" if corpus else ""))
    p.add_argument("--train", help="training split file (with --validation; overrides those in --data)")
    p.add_argument("--validation", help="validation split file")
    p.add_argument("--test", help="test split file")
    p.add_argument("--task", choices=list(GLUE_TASKS), help="a GLUE task: its TSV column names and metric")
    p.add_argument("--text-column", help="column of the text (default: text, sentence or sentence1); a 0-based "
                   "number with --no-header")
    p.add_argument("--text-pair-column", help="column of the second text of sentence pairs (default: "
                   "sentence2 beside sentence1)")
    p.add_argument("--label-column", help="column of the label (default: label)")
    p.add_argument("--encoding", help="text encoding of the files, e.g. latin-1; several tried in order: "
                   "utf-8,latin-1 (default utf-8; bytes that do not decode are an error)")
    p.add_argument("--no-header", action="store_true", help="CSV/TSV files without a header row")
    p.add_argument("--regression", action="store_true", default=None,
                   help="labels are scores (default: inferred, numbers with a fraction are scores)")
    p.add_argument("--split-fractions", default="0.8,0.1,0.1", help="train,validation,test fractions for a "
                   "single data file or label folder (default 0.8,0.1,0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that split (default 0)")
    p.add_argument("--metric", choices=list(METRICS), help="the metric reported as 'metric' (default: the "
                   "task's; accuracy for classes, pearson for scores)")


def _column_options(args: argparse.Namespace):
    from lmforge.labelled import task_options

    return task_options(args.task, text_column=args.text_column, pair_column=args.text_pair_column,
                        label_column=args.label_column, encoding=args.encoding,
                        header=False if args.no_header else None, regression=args.regression)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(f"--split-fractions {text!r}: expected three fractions, e.g. 0.8,0.1,0.1")
    return values


def _splits(args: argparse.Namespace, label_names: list[str] | None = None):
    """The labelled splits the data options name (see `lmforge.labelled.load_splits`)."""
    from lmforge.labelled import load_splits

    if args.data is None and args.train is None:
        raise ValueError("no data: give --data, or --train and --validation")
    return load_splits(args.data, train=args.train, validation=args.validation, test=args.test,
                       options=_column_options(args), fractions=_fractions(args.split_fractions),
                       split_seed=args.split_seed, label_names=label_names)


def _model_splits(cfg, args: argparse.Namespace, who: str):
    """The labelled splits of the data options in the label order a classifier `cfg` stores ([] for a
    regressor); an error if the label sets differ."""
    from lmforge.predict import is_regressor, label_names

    stored = cfg.extra.get("id2label")
    names = [] if is_regressor(cfg) else (label_names(cfg) if stored and len(stored) == cfg.n_labels else None)
    splits = _splits(args, names)
    n = 1 if splits["train"].is_regression else len(splits["train"].label_names)
    if n != cfg.n_labels:
        raise ValueError(f"label-set mismatch: the {who} has {cfg.n_labels} output(s), the data "
                         f"{'is a regression' if n == 1 else f'has {n} labels'}")
    return splits


def _task_objective(cfg):
    from lmforge.objectives import Classification, Regression
    from lmforge.predict import is_regressor

    return Regression() if is_regressor(cfg) else Classification(cfg.n_labels)


def _with_metric(metrics: dict, args: argparse.Namespace, regression: bool) -> dict:
    """metrics plus "metric": the --metric (or the task's, or the default) name and value."""
    from lmforge.labelled import GLUE_TASKS
    from lmforge.metrics import METRICS

    name = args.metric or (GLUE_TASKS[args.task].metric if args.task else ("pearson" if regression else
                                                                            "accuracy"))
    if METRICS[name][0] != ("regress" if regression else "classify") or name not in metrics:
        raise ValueError(f"--metric {name} does not apply to a {'regression' if regression else 'classification'}"
                         f" with these labels; choose among {sorted(k for k in metrics if k in METRICS)}")
    return {**metrics, "metric": {"name": name, "value": metrics[name]}}


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="encoder to fine-tune (classification, regression), or "
                   "encoder-decoder (T5: (source, target) pairs, e.g. --data bbc-headlines): HF folder or "
                   "packaged name")
    add_data_arguments(p)
    p.add_argument("--max-len", type=int, help="tokens per text or pair, cut beyond (default 256 or the context)")
    add_seq2seq_arguments(p, scoring=True)
    add_loop_arguments(p, steps=300, lr=5e-5)


_CLASSIFICATION_OPTIONS = {"task": "--task", "text_column": "--text-column", "text_pair_column":
                           "--text-pair-column", "label_column": "--label-column", "regression": "--regression",
                           "metric": "--metric", "max_len": "--max-len"}


def _seq2seq_report(args: argparse.Namespace, model, tokenizer, objective, pairs, data) -> dict:
    """Loss and perplexity (teacher-forced) and ROUGE-1/2/L of generated targets on one split."""
    from lmforge.predict import seq2seq_rouge
    from lmforge.training import evaluate

    metrics = evaluate(model, objective, data, batch_size=args.batch_size, precision=args.precision,
                       progress=not args.quiet)
    rouge = seq2seq_rouge(model, tokenizer, pairs, batch_size=args.batch_size, max_source_len=args.max_source_len,
                          max_new_tokens=args.max_target_len, num_beams=args.num_beams, progress=not args.quiet)
    return {**metrics, **rouge}


def _finetune_seq2seq(args: argparse.Namespace, config) -> int:
    """finetune for an encoder-decoder model: (source, target) pairs, validation loss, test loss and ROUGE."""
    from lmforge.io import load_model
    from lmforge.tokenizer import Tokenizer
    from lmforge.training import train

    given = [option for name, option in _CLASSIFICATION_OPTIONS.items() if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to classification; an "
                         f"encoder-decoder model (T5) fine-tunes on (source, target) pairs (--source-column, "
                         f"--target-column, --max-source-len, --max-target-len)")
    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be at least 1, got {args.num_beams}")
    splits = _pair_splits(args)
    model = load_model(args.model, dtype="float32")
    tokenizer = Tokenizer.for_model(args.model)
    encoded = {split: _encoded_pairs(args, tokenizer, model.config, pairs) for split, pairs in splits.items()}
    objective = seq2seq_objective(model.config)
    record_run(args.run_dir, model.config, tokenizer)
    result = train(model, objective, encoded["train"], config, eval_data=encoded["validation"],
                   resume=args.resume)
    report = {"step": result.step, "validation": result.eval_metrics}
    if "test" in encoded:
        report["test"] = _seq2seq_report(args, model, tokenizer, objective, splits["test"], encoded["test"])
    report["model"] = str(_save_final(model, tokenizer, args.run_dir))
    print(json.dumps(report))
    return 0


@command("finetune", "Fine-tune an encoder for text or sentence-pair classification or regression, or an "
         "encoder-decoder on (source, target) pairs; reports validation and test metrics.", _finetune_arguments)
def _finetune(args: argparse.Namespace) -> int:
    from lmforge.io import load_config, load_model
    from lmforge.predict import encode_for
    from lmforge.tokenizer import Tokenizer
    from lmforge.training import evaluate, train

    config = loop_config(args)
    if load_config(args.model).arch == "encoder-decoder":
        return _finetune_seq2seq(args, config)
    splits = _splits(args)
    names = splits["train"].label_names
    regression = splits["train"].is_regression
    model = load_model(args.model, dtype="float32", head="classify", n_labels=1 if regression else len(names),
                       seed=args.seed)
    if regression:
        model.config.extra.update(problem_type="regression", id2label={0: "score"}, label2id={"score": 0})
    else:
        model.config.extra.update(problem_type="single_label_classification", id2label=dict(enumerate(names)),
                                  label2id={name: i for i, name in enumerate(names)})
    tokenizer = Tokenizer.for_model(args.model)
    max_len = _fit_length(args.max_len, 256, model.config, "--max-len")
    encoded = {split: encode_for(model, tokenizer, texts, max_len, progress=not args.quiet)
               for split, texts in splits.items()}
    objective = _task_objective(model.config)
    record_run(args.run_dir, model.config, tokenizer)
    result = train(model, objective, encoded["train"], config, eval_data=encoded["validation"],
                   resume=args.resume)
    report = {"step": result.step, "validation": _with_metric(result.eval_metrics, args, regression)}
    if "test" in encoded:
        test = evaluate(model, objective, encoded["test"], batch_size=args.batch_size, precision=args.precision,
                        progress=not args.quiet)
        report["test"] = _with_metric(test, args, regression)
    report["model"] = str(_save_final(model, tokenizer, args.run_dir))
    print(json.dumps(report))
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, .gguf file or packaged name")
    add_data_arguments(p, corpus=True)
    p.add_argument("--split", choices=["train", "validation", "test", "all"], default="test",
                   help="which split of labelled data or bbc-news (default test); corpora: all text")
    p.add_argument("--objective", choices=["clm", "mlm", "classify", *SEQ2SEQ_OBJECTIVES],
                   help="default: classify for classifiers and regressors, clm for decoders, mlm for encoders; "
                        "encoder-decoders: seq2seq on (source, target) pairs (loss and ROUGE of generated "
                        "targets), span-corruption on a corpus")
    p.add_argument("--block-size", type=int, help="tokens per LM sequence (default 128 or the context)")
    add_seq2seq_arguments(p, scoring=True)
    p.add_argument("--stride", type=int, help="causal LM: sliding-window perplexity over the whole text as one "
                   "stream, windows of --block-size tokens advancing by this many (transformers' method; "
                   "the last partial window is kept; = --block-size: non-overlapping)")
    p.add_argument("--max-len", type=int, help="tokens per classified text (default 256 or the context)")
    p.add_argument("--batch-size", type=int, default=16, help="items per batch (default 16)")
    p.add_argument("--max-batches", type=int, help="evaluate the first N batches only (default: all)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MLM masking (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the result still prints)")


@command("evaluate", "Evaluate a model: perplexity (LM), GLUE's classification metrics (accuracy, F1, Matthews) "
         "or correlations (regressors).", _evaluate_arguments)
def _evaluate(args: argparse.Namespace) -> int:
    from lmforge.data import LabelledTexts
    from lmforge.io import load_model
    from lmforge.objectives import CausalLM, MaskedLM
    from lmforge.predict import encode_for, is_regressor
    from lmforge.tokenizer import Tokenizer
    from lmforge.training import evaluate, sliding_window_perplexity

    model = load_model(args.model, dtype="float32", device=checked_device(args.device))
    cfg = model.config
    objective = _fitting_objective(cfg, args.objective, "this model", args)
    tokenizer = Tokenizer.for_model(args.model)
    split = args.split
    if objective in SEQ2SEQ_OBJECTIVES:
        if split == "all":
            raise ValueError("--split all: an encoder-decoder is evaluated on one split (train, validation or test)")
        obj = seq2seq_objective(cfg)
        if objective == "span-corruption":
            data = _seq2seq_data(args, tokenizer, cfg, objective, split=split)
        else:
            splits = _pair_splits(args)
            if split not in splits:
                raise ValueError(f"--split {split}: the data has no {split} split (it has {', '.join(splits)})")
            pairs = splits[split]
            if args.max_batches is not None:
                pairs = pairs.subset(range(min(len(pairs), args.max_batches * args.batch_size)))
            if args.num_beams < 1:
                raise ValueError(f"--num-beams must be at least 1, got {args.num_beams}")
            metrics = _seq2seq_report(args, model, tokenizer, obj, pairs, _encoded_pairs(args, tokenizer, cfg, pairs))
            print(json.dumps({"model": args.model, "data": args.data or args.train, "split": split, **metrics}))
            return 0
    elif objective == "classify":
        splits = _model_splits(cfg, args, "model")
        if split == "all":
            parts = list(splits.values())
            pick = (lambda name: None if parts[0].text_pairs is None else  # noqa: E731
                    [x for s in parts for x in getattr(s, name)])
            texts = LabelledTexts([t for s in parts for t in s.texts], [y for s in parts for y in s.labels],
                                  parts[0].label_names, pick("text_pairs"), pick("sources"))
        elif split not in splits:
            raise ValueError(f"--split {split}: the data has no {split} split (it has {', '.join(splits)})")
        else:
            texts = splits[split]
        max_len = _fit_length(args.max_len, 256, cfg, "--max-len")
        data, obj = encode_for(model, tokenizer, texts, max_len, progress=not args.quiet), _task_objective(cfg)
    elif args.stride is not None:
        if objective != "clm":
            raise ValueError(f"--stride applies to causal LM perplexity; this evaluation is {objective}")
        block_size = _fit_length(args.block_size, 128, cfg, "--block-size")
        metrics = sliding_window_perplexity(model, _lm_stream(args, tokenizer), block_size, args.stride,
                                            precision=args.precision, progress=not args.quiet)
        split = args.split if args.data == "bbc-news" else "all"
        print(json.dumps({"model": args.model, "data": args.data, "split": split, "stride": args.stride,
                          "window": block_size, **metrics}))
        return 0
    else:
        if args.data is None:
            raise ValueError("no data: give --data (a text file, a folder of .txt files or bbc-news)")
        block_size = _fit_length(args.block_size, 128, cfg, "--block-size")
        data = _lm_data(args, tokenizer, objective, block_size, split=split, vocab_size=cfg.vocab_size)
        obj = CausalLM() if objective == "clm" else MaskedLM()
    metrics = evaluate(model, obj, data, batch_size=args.batch_size, precision=args.precision,
                       max_batches=args.max_batches, progress=not args.quiet)
    if objective == "classify":
        metrics = _with_metric(metrics, args, is_regressor(cfg))
    split = split if args.data == "bbc-news" or objective == "classify" else "all"
    print(json.dumps({"model": args.model, "data": args.data or args.train, "split": split, **metrics}))
    return 0


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run folder (with metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")


@command("plot", "Plot a run's loss and evaluation curves to a PNG.", _plot_arguments)
def _plot(args: argparse.Namespace) -> int:
    from lmforge.training import plot_run

    if args.out is not None:
        if Path(args.out).suffix.lower() != ".png":
            raise ValueError(f"--out {args.out!r}: expected a .png path")
        writable_folder(Path(args.out).parent, "--out folder")
    print(plot_run(args.run_dir, args.out))
    return 0


def _student_layers(text: str | None) -> int | list[int] | None:
    """--student-layers: None (every other layer), "N" (N evenly spaced layers) or "0,2,4" (a layer map; one
    layer as "5,")."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip() or "," not in text]
    except ValueError:
        raise ValueError(f"--student-layers {text!r}: expected a layer count (6) or teacher layer indices "
                         f"(0,2,4)") from None
    return values[0] if "," not in text else values


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="HF folder, .gguf file or packaged name of the teacher")
    p.add_argument("--student-layers", help="N evenly spaced teacher layers, or a map 0,2,4 (one layer: 5,); "
                   "default: every other layer (an encoder-decoder's decoder layers)")
    p.add_argument("--student-encoder-layers", help="encoder-decoder teachers: the encoder layers, in the same "
                   "form (default: all)")
    add_data_arguments(p, corpus=True)
    p.add_argument("--objective", choices=["clm", "mlm", "classify", *SEQ2SEQ_OBJECTIVES],
                   help="default: classify for classifiers and regressors, clm for decoders, mlm for encoders; "
                        "encoder-decoders: seq2seq on (source, target) pairs, span-corruption on a corpus")
    add_seq2seq_arguments(p, scoring=False)
    p.add_argument("--alpha-ce", type=float, default=5.0, help="weight of the soft-target KL (default 5)")
    p.add_argument("--alpha-lm", type=float, default=2.0,
                   help="weight of the LM / MLM / classification loss (default 2)")
    p.add_argument("--alpha-cos", type=float, default=1.0, help="weight of the hidden-state cosine loss "
                   "(default 1)")
    p.add_argument("--alpha-mse", type=float, help="weight of the logit MSE (default 0; for a regressor, whose "
                   "single output has no soft-target KL, --alpha-ce)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL (default 2)")
    p.add_argument("--align", choices=["last", "layers"], default="last",
                   help="cosine loss on the last hidden states (DistilBERT), or on every student layer's "
                        "output against the teacher layer it replaces")
    p.add_argument("--block-size", type=int, help="tokens per LM sequence (default 128 or the context)")
    p.add_argument("--max-len", type=int, help="tokens per classified text (default 256 or the context)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="share of a corpus's blocks held out for evaluation (default 0.05; bbc-news uses its "
                        "validation split)")
    add_loop_arguments(p, steps=300, lr=1e-4)


@command("distill", "Distil a teacher into a student initialised from its layers (DistilBERT-style).",
         _distill_arguments)
def _distill(args: argparse.Namespace) -> int:
    from lmforge.distill import DistillObjective, aligned_hidden_pairs, init_student, n_output_layers
    from lmforge.io import load_model
    from lmforge.objectives import CausalLM, MaskedLM
    from lmforge.predict import encode_for, is_regressor
    from lmforge.tokenizer import Tokenizer
    from lmforge.training import evaluate, seed_everything, train

    config = loop_config(args)
    seed_everything(args.seed)  # a projection the objective may create is initialised from the seed
    teacher = load_model(args.teacher, dtype="float32", device=args.device)
    cfg = teacher.config
    objective = _fitting_objective(cfg, args.objective, "the teacher", args)
    student, layer_map = init_student(teacher, _student_layers(args.student_layers),
                                      encoder_layers=_student_layers(args.student_encoder_layers))
    tokenizer = Tokenizer.for_model(args.teacher)
    test = None
    regression = objective == "classify" and is_regressor(cfg)
    if objective == "classify":
        splits = _model_splits(cfg, args, "teacher")
        max_len = _fit_length(args.max_len, 256, cfg, "--max-len")
        encoded = {split: encode_for(teacher, tokenizer, texts, max_len, progress=not args.quiet)
                   for split, texts in splits.items()}
        train_data, eval_data, test = encoded["train"], encoded["validation"], encoded.get("test")
        base = _task_objective(cfg)
    elif objective in SEQ2SEQ_OBJECTIVES:
        train_data, eval_data = _seq2seq_data(args, tokenizer, cfg, objective)
        base = seq2seq_objective(cfg)
    else:
        if args.data is None:
            raise ValueError("no data: give --data (a text file, a folder of .txt files or bbc-news)")
        block_size = _fit_length(args.block_size, 128, cfg, "--block-size")
        train_data, eval_data = _lm_data(args, tokenizer, objective, block_size)
        base = CausalLM() if objective == "clm" else MaskedLM()
    alpha_mse = args.alpha_mse if args.alpha_mse is not None else (args.alpha_ce if regression else 0.0)
    pairs = aligned_hidden_pairs(layer_map, n_output_layers(cfg)) if args.align == "layers" else None
    loss = DistillObjective(teacher, student, base, alpha_ce=0.0 if regression else args.alpha_ce,
                            alpha_lm=args.alpha_lm, alpha_cos=args.alpha_cos, alpha_mse=alpha_mse,
                            temperature=args.temperature, hidden_pairs=pairs)
    record_run(args.run_dir, student.config, tokenizer)
    result = train(student, loss, train_data, config, eval_data=eval_data, resume=args.resume)
    report = {"step": result.step, "train_loss": result.train_loss, "layer_map": layer_map,
              "eval": result.eval_metrics}
    if objective == "classify":
        report["eval"] = _with_metric(result.eval_metrics, args, regression)
    if test is not None:
        metrics = evaluate(student, base, test, batch_size=args.batch_size, precision=args.precision)
        report["test"] = _with_metric(metrics, args, regression)
    report["model"] = str(_save_final(student, tokenizer, args.run_dir))
    print(json.dumps(report))
    return 0


# --- inference (lmforge.predict, lmforge.embeddings): predict, embed ------------------------------------------------


def _read_inputs(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts) from positional TEXT arguments or --input FILE (.txt: one per line)."""
    from lmforge.labelled import ColumnOptions, read_table

    if bool(args.texts) == bool(args.input):
        raise ValueError("give texts on the command line or --input FILE, not both or neither")
    if args.texts:
        return list(args.texts), None
    options = ColumnOptions(text_column=args.text_column, pair_column=getattr(args, "text_pair_column", None),
                            encoding=args.encoding or "utf-8", header=not args.no_header)
    table = read_table(args.input, options, need_labels=False)
    return table.texts, table.pairs


def _input_arguments(p: argparse.ArgumentParser, pairs: bool) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to process (or --input)")
    p.add_argument("--input", help="a .txt file (one text per line) or a CSV / TSV / JSON-lines file")
    p.add_argument("--text-column", help="column of the text (default: text, sentence or sentence1)")
    if pairs:
        p.add_argument("--text-pair-column", help="column of the second text of pairs (default: sentence2 "
                       "beside sentence1)")
    p.add_argument("--encoding", help="text encoding of --input (default utf-8)")
    p.add_argument("--no-header", action="store_true", help="CSV/TSV input without a header row")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")


def _write_rows(rows: list[dict], output: str | None) -> None:
    """Rows as JSON lines (stdout or .jsonl) or CSV (.csv; nested dicts flattened as key_subkey)."""
    import csv

    if output is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    path = Path(output)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8")
    elif path.suffix.lower() == ".csv":
        flat = [{f"{k}_{sub}" if isinstance(v, dict) else k: x for k, v in row.items()
                 for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])} for row in rows]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    else:
        raise ValueError(f"--output {output!r}: expected a .jsonl or .csv file")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a fine-tuned classifier or regressor (HF folder)")
    _input_arguments(p, pairs=True)
    p.add_argument("--output", help="a .jsonl or .csv file (default: JSON lines on stdout)")
    p.add_argument("--max-len", type=int, help="tokens per text or pair (default 256 or the context)")


@command("predict", "Label new texts (or text pairs) with a classifier (label + per-class probabilities) or "
         "score them with a regressor.", _predict_arguments)
def _predict(args: argparse.Namespace) -> int:
    from lmforge.io import load_model
    from lmforge.predict import predict
    from lmforge.tokenizer import Tokenizer

    texts, pairs = _read_inputs(args)
    model = load_model(args.model, dtype="float32", device=args.device)
    tokenizer = Tokenizer.for_model(args.model)
    max_len = _fit_length(args.max_len, 256, model.config, "--max-len")
    results = predict(model, tokenizer, texts, pairs, batch_size=args.batch_size, max_len=max_len,
                      progress=args.input is not None)
    rows = [{"text": t, **({"text_pair": pairs[i]} if pairs else {}), **r}
            for i, (t, r) in enumerate(zip(texts, results, strict=True))]
    _write_rows(rows, args.output)
    if args.output:
        print(f"wrote {len(rows)} predictions to {args.output}")
    return 0


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="all-minilm-l6-v2", help="an encoder: HF or sentence-transformers folder, "
                   "or packaged name (default all-minilm-l6-v2)")
    _input_arguments(p, pairs=False)
    p.add_argument("--output", help="a .npy (float32 matrix) or .jsonl file (default: JSON lines on stdout)")
    normalize = p.add_mutually_exclusive_group()
    normalize.add_argument("--normalize", action="store_true", default=None, help="unit-length vectors")
    normalize.add_argument("--no-normalize", dest="normalize", action="store_false",
                           help="raw vectors (default: as the model's Normalize module says)")


@command("embed", "Sentence embeddings: pooling, Dense and Normalize as the model's sentence-transformers files "
         "say (mean pooling without them).", _embed_arguments)
def _embed(args: argparse.Namespace) -> int:
    from lmforge.embeddings import SentenceEncoder

    if args.output is not None and Path(args.output).suffix.lower() not in (".npy", ".jsonl"):
        raise ValueError(f"--output {args.output!r}: expected a .npy or .jsonl file")
    texts, _ = _read_inputs(args)
    encoder = SentenceEncoder.load(args.model, device=args.device)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=args.normalize,
                             progress=args.input is not None)
    if args.output is not None and Path(args.output).suffix.lower() == ".npy":
        import numpy as np

        np.save(args.output, vectors.numpy())
    else:
        _write_rows([{"text": t, "embedding": v} for t, v in zip(texts, vectors.tolist(), strict=True)],
                    args.output)
    if args.output:
        print(f"wrote {tuple(vectors.shape)} embeddings to {args.output}")
    return 0


# --- end of commands ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    parser = _Parser(prog="lmforge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lmforge {version('lmforge')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    from lmforge.data import DataWarning

    def show(message, category, *rest, **kwargs) -> None:
        print(f"lmforge {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DataWarning)
            warnings.showwarning = show
            return COMMANDS[args.command][2](args)
    except (ValueError, OSError, TypeError, KeyError) as err:
        print(f"lmforge {args.command}: error: {error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
