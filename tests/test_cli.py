"""The command line as a whole: `python -m lmforge`, --version, and a table of bad inputs across every command,
each of which must end in one line on stderr naming the problem and exit code 2, before any expensive work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

READ_ONLY = "/proc/lmforge-test"  # procfs: nothing can be created there, not even by root

# (argv with {placeholders}, text the one-line error must contain). Placeholders: gpt2 / bert (tiny model
# folders with a vocabulary), corpus (a folder of .txt), labelled (a <label>/*.txt folder), file (an existing
# text file), empty (an empty folder), missing (a path that does not exist), out (a fresh path).
BAD_INPUTS = [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice"),
    (["generate"], "PROMPT"),
    (["info"], "model"),
    (["train", "--model", "{gpt2}"], "--data"),
    # info
    (["info", "no-such-model"], "unknown model 'no-such-model'"),
    (["info", "{missing}"], "missing"),
    (["info", "{empty}"], "empty"),
    (["info", "{file}"], "file.txt"),
    # convert
    (["convert", "{gpt2}", "{file}"], "exists and is not a folder"),
    (["convert", "{gpt2}", READ_ONLY], "not writable"),
    (["convert", "{gpt2}", "{file}/sub"], "is a file"),
    (["convert", "no-such-model", "{out}"], "unknown model"),
    (["convert", "{gpt2}", "{out}", "--dtype", "float7"], "float7"),
    (["convert", "{gpt2}", "{out}", "--max-shard-size", "lots"], "lots"),
    # export (convert's code: a training checkpoint or any model)
    (["export", "{empty}", "{out}"], "no config.json"),
    (["export", "{gpt2}", "{file}"], "exists and is not a folder"),
    (["export", "{missing}/checkpoints/step_00000002", "{out}"], "missing"),
    # predict, embed, serve
    (["predict", "--model", "no-such-model", "hi"], "unknown model 'no-such-model'"),
    (["predict", "--model", "{bert}", "--input", "{missing}.csv"], "does not exist"),
    (["embed", "--model", "no-such-model", "hi"], "unknown model 'no-such-model'"),
    (["embed", "--model", "{bert}", "--input", "{missing}.txt"], "does not exist"),
    (["serve", "--model", "{gpt2}", "--port", "0"], "--port in 1..65535"),
    (["serve", "--model", "{gpt2}", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["serve", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    # data that does not decode: never read as latin-1 behind the user's back
    (["train", "--model", "{gpt2}", "--data", "{utf16}", "--run-dir", "{out}"], "not valid utf-8: byte offset 0"),
    (["train", "--model", "{gpt2}", "--data", "{binary}", "--run-dir", "{out}"], "not valid utf-8"),
    # generate
    (["generate", "hi", "--model", "no-such-model"], "unknown model"),
    (["generate", "hi", "--model", "{gpt2}", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "hi", "--model", "{gpt2}", "--max-new-tokens", "abc"], "invalid int value"),
    (["generate", "hi", "--model", "{gpt2}", "--max-new-tokens", "1000"], "context"),
    (["generate", "hi", "--model", "{gpt2}", "--max-length", "9", "--max-new-tokens", "5"], "not both"),
    (["generate", "hi", "--model", "{gpt2}", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--model", "{gpt2}", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--model", "{gpt2}", "--top-k", "-3"], "top_k"),
    (["generate", "hi", "--model", "{gpt2}", "--min-p", "1.5"], "min_p"),
    (["generate", "hi", "--model", "{gpt2}", "--num-beams", "0"], "num_beams"),
    (["generate", "hi", "--model", "{gpt2}", "--num-return-sequences", "3"], "num_return_sequences"),
    (["generate", "hi", "--model", "{gpt2}", "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", "hi", "--model", "{gpt2}", "--stream", "--num-beams", "2"], "--num-beams"),
    (["generate", "hi", "--model", "{gpt2}", "--stream", "--json"], "--json"),
    (["generate", "hi", "--model", "{gpt2}", "--device", "tpu"], "tpu"),
    (["generate", "hi", "--model", "{gpt2}", "--device", "cuda:7"], "cuda:7"),
    (["generate", "hi", "--model", "{gpt2}", "--dtype", "float64"], "invalid choice"),
    (["generate", "hi", "--model", "{gpt2}", "--dtype", "int8", "--keep-quantized"], "keep-quantized"),
    (["generate", "", "--model", "{gpt2}"], "non-empty"),
    (["generate", "hi", "--model", "{bert}"], "Decoder"),
    # train
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{file}"], "not a folder"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", READ_ONLY], "not writable"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{file}/run"], "is a file"),
    (["train", "--model", "{gpt2}", "--data", "{missing}", "--run-dir", "{out}"], "missing"),
    # model-parallel layouts (one process here: the world size is 1)
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--tp", "2"], "need --strategy"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "fsdp", "--tp", "2"],
     "pp x tp = 1 x 2 = 2 does not divide the world size 1"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--tp", "0"],
     "--tp must be a positive integer, got 0"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ps", "--tp", "2"],
     "--strategy ps takes no"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp",
      "--microbatches", "4"], "they need --pp > 1"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp",
      "--sequence-parallel"], "it needs --tp > 1"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "1",
      "--dp", "1", "--pp-schedule", "gpipe"], "pipeline options"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp",
      "--pp-split", "1,1"], "pipeline options"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "fsdp", "--pp", "2"],
     "--pp 2 runs with --strategy ddp or allreduce"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--tp", "2", "--sequence-parallel"], "without --sequence-parallel or --activation-checkpointing"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--microbatches", "1"], "1f1b schedule needs --microbatches >= --pp (2), got 1"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--microbatches", "3", "--batch-size", "4"], "--batch-size 4 must be a multiple of the 3 pipeline"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--pp-split", "1,x"], "pipeline split '1,x'"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--pp-split", "1,1,1"], "gives 3 stages, the pipeline has 2"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--pp-schedule", "interleaved-1f1b", "--microbatches", "5", "--batch-size", "5"], "a multiple of max"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--strategy", "ddp", "--pp", "2",
      "--dp", "0"], "--dp must be a positive integer"),
    (["train", "--model", "{gpt2}", "--data", "{empty}", "--run-dir", "{out}"], "no .txt files"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--objective", "mlm"],
     "masked LM an encoder"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--block-size", "500"],
     "--block-size 500"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--block-size", "1"],
     "--block-size 1"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--resume"], "does not exist"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--steps", "many"],
     "invalid int value"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--device", "cuda"], "cuda"),
    (["train", "--model", "no-such-model", "--data", "{corpus}", "--run-dir", "{out}"], "no-such-model"),
    (["train", "--model", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--precision", "fp8"],
     "invalid choice"),
    (["train", "--model", "{bert}", "--data", "{corpus}", "--run-dir", "{out}", "--objective", "clm",
      "--from-scratch"], "causal LM needs a decoder"),
    (["train", "--model", "{gpt2}", "--data", "bbc-headlines", "--run-dir", "{out}", "--objective", "seq2seq"],
     "--objective seq2seq needs an encoder-decoder model (T5)"),
    (["train", "--model", "{bert}", "--data", "{corpus}", "--run-dir", "{out}", "--objective", "span-corruption"],
     "--objective span-corruption needs an encoder-decoder model (T5)"),
    # finetune
    (["finetune", "--model", "{bert}", "--data", "{labelled}", "--run-dir", "{file}"], "not a folder"),
    (["finetune", "--model", "{bert}", "--data", "{labelled}", "--run-dir", READ_ONLY], "not writable"),
    (["finetune", "--model", "{bert}", "--data", "{missing}", "--run-dir", "{out}"], "missing"),
    (["finetune", "--model", "no-such-model", "--data", "{labelled}", "--run-dir", "{out}"], "no-such-model"),
    (["finetune", "--model", "{bert}", "--data", "{labelled}", "--run-dir", "{out}", "--max-len", "5000"],
     "--max-len 5000"),
    # evaluate
    (["evaluate", "--model", "no-such-model", "--data", "{corpus}"], "no-such-model"),
    (["evaluate", "--model", "{gpt2}", "--data", "{missing}"], "missing"),
    (["evaluate", "--model", "{gpt2}", "--data", "{corpus}", "--objective", "mlm"], "does not fit"),
    (["evaluate", "--model", "{gpt2}", "--data", "bbc-headlines", "--objective", "seq2seq"],
     "needs an encoder-decoder model"),
    (["evaluate", "--model", "{gpt2}", "--data", "{corpus}", "--block-size", "1000"], "--block-size 1000"),
    (["evaluate", "--model", "{gpt2}", "--data", "{corpus}", "--device", "cuda:5"], "cuda:5"),
    # distill
    (["distill", "--teacher", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--student-layers", "a,b"],
     "--student-layers"),
    (["distill", "--teacher", "{gpt2}", "--data", "{corpus}", "--run-dir", "{file}"], "not a folder"),
    (["distill", "--teacher", "{gpt2}", "--data", "{corpus}", "--run-dir", READ_ONLY], "not writable"),
    (["distill", "--teacher", "no-such-model", "--data", "{corpus}", "--run-dir", "{out}"], "no-such-model"),
    (["distill", "--teacher", "{gpt2}", "--data", "{corpus}", "--run-dir", "{out}", "--student-layers", "0,9"],
     "9"),
    # plan
    (["plan", "--model", "no-such-model", "--batch", "8", "--seq", "128"], "no-such-model"),
    (["plan", "--model", "gpt2", "--batch", "8", "--seq", "128", "--device-memory", "lots"], "lots"),
    (["plan", "--model", "gpt2", "--batch", "0", "--seq", "128"], "--batch"),
    (["plan", "--model", "gpt2", "--batch", "8", "--seq", "4096"], "exceeds the model context"),
    (["plan", "--model", "{bert}", "--batch", "8", "--seq", "16", "--generate"], "needs a decoder"),
    # plot
    (["plot", "{missing}"], "metrics.jsonl"),
    (["plot", "{empty}"], "metrics.jsonl"),
    (["plot", "{empty}", "--out", READ_ONLY + "/plot.png"], "not writable"),
    (["plot", "{empty}", "--out", "{out}/plot.jpg"], ".png"),
]


@pytest.fixture(scope="module")
def places(cli_fixtures, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "file.txt").write_text("a text file, not a model or a folder\n")
    (root / "empty").mkdir()
    (root / "utf16.txt").write_bytes("text in UTF-16, not UTF-8\n".encode("utf-16"))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    return {"utf16": str(root / "utf16.txt"), "binary": str(root / "binary.txt"),
            "gpt2": str(cli_fixtures / "tiny-gpt2"), "bert": str(cli_fixtures / "tiny-bert"),
            "corpus": str(cli_fixtures / "corpus"), "labelled": str(cli_fixtures / "labelled"),
            "file": str(root / "file.txt"), "empty": str(root / "empty"), "missing": str(root / "missing")}


def test_the_table_spans_every_command():
    from lmforge.cli import COMMANDS

    assert len(BAD_INPUTS) >= 50
    assert set(COMMANDS) <= {argv[0] for argv, _ in BAD_INPUTS if argv}


@pytest.mark.parametrize("argv, expected", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(places, run_cli, tmp_path, argv, expected):
    values = {**places, "out": str(tmp_path / "out")}
    code, out, err = run_cli(*[a.format(**values) for a in argv])
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("lmforge"), err
    assert "Traceback" not in err and expected in err, err
    assert not (tmp_path / "out").exists() or argv[0] == "plot"  # failed before writing anything


def test_python_m_lmforge_and_version(places):
    from importlib.metadata import version

    run = subprocess.run([sys.executable, "-m", "lmforge", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"lmforge {version('lmforge')}"
    run = subprocess.run([sys.executable, "-m", "lmforge", "train", "--model", places["gpt2"], "--data",
                          places["corpus"], "--run-dir", str(Path(places["file"]) / "run")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_train_from_scratch_by_size_export_mid_run(cli_fixtures, run_cli, tmp_path):
    """A GPT-2-shape model sized by options only, trained from scratch through the CLI; its mid-run checkpoint
    is exported as an HF folder that transformers loads with the same logits, and every command reads it."""
    import json

    import torch
    import transformers

    from lmforge.io import load_model

    run = tmp_path / "run"
    code, out, err = run_cli("train", "--model", "distilgpt2", "--from-scratch", "--n-layer", 2, "--n-head", 2,
                             "--d-model", 32, "--d-ff", 64, "--context", 32, "--data", cli_fixtures / "corpus",
                             "--run-dir", run, "--steps", 4, "--save-every", 2, "--keep-last", 3, "--batch-size",
                             2, "--block-size", 16, "--quiet")
    assert code == 0 and "%|" not in err, err  # --quiet: no progress bar
    step2 = run / "checkpoints" / "step_00000002"
    model = load_model(step2)
    cfg = model.config
    assert (cfg.family, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_ff, cfg.max_seq_len, cfg.vocab_size) == \
        ("gpt2", 2, 2, 32, 64, 32, 50257)
    final = load_model(run / "model")
    assert not torch.equal(model.lm_head.weight, final.lm_head.weight)  # step 2 is not the end of the run
    code, out, err = run_cli("export", step2, tmp_path / "hf")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    code, out, _ = run_cli("info", step2)
    assert code == 0 and "lmforge-training-checkpoint" in out
    code, out, _ = run_cli("evaluate", "--model", step2, "--data", cli_fixtures / "corpus", "--block-size", 16)
    assert code == 0 and json.loads(out)["tokens"] > 0
    code, out, _ = run_cli("generate", "the cat", "--model", step2, "--max-new-tokens", 3)
    assert code == 0 and out.startswith("Generated 0: the cat")


def test_from_scratch_option_errors(cli_fixtures, run_cli, tmp_path):
    common = ("--data", cli_fixtures / "corpus", "--run-dir", tmp_path / "r")
    cases = [(("--model", "gpt2", "--n-layer", 2), "add --from-scratch"),
             (("--model", "gpt2", "--from-scratch", "--d-model", 30, "--n-head", 4), "divisible"),
             (("--model", "gpt2", "--from-scratch", "--n-layer", 0), "--n-layer must be a positive"),
             (("--model", "smollm2-135m", "--from-scratch", "--n-head", 6, "--n-kv-head", 4), "multiple"),
             (("--model", "roberta-base", "--from-scratch", "--n-layer", 1), "--tokenizer"),
             (("--model", "gpt2", "--from-scratch", "--config", tmp_path / "nope.json"), "nope.json")]
    for argv, expected in cases:
        code, _, err = run_cli("train", *argv, *common)
        assert code == 2 and expected in err and err.count("\n") == 1, (argv, err)


def test_evaluate_shows_progress_unless_quiet(cli_fixtures, run_cli):
    """Tokenising and evaluating draw progress bars on stderr; --quiet leaves stderr empty, stdout unchanged."""
    base = ("evaluate", "--model", cli_fixtures / "tiny-gpt2", "--data", cli_fixtures / "corpus", "--block-size", 16)
    for extra, bars in ((), ("tokenising", "evaluating")), (("--stride", 8), ("tokenising", "perplexity")):
        code, out, err = run_cli(*base, *extra)
        assert code == 0 and all(bar in err for bar in bars), err
        code, quiet_out, quiet_err = run_cli(*base, *extra, "--quiet")
        assert code == 0 and quiet_err == "" and quiet_out == out


@pytest.mark.parametrize("stride", [7, 17])
def test_evaluate_stride_equals_transformers_sliding_window(cli_fixtures, run_cli, stride):
    """`evaluate --stride` against transformers' documented sliding-window loop (labels masked to -100 before
    the window's new tokens) with its model on the same token stream; the last partial window is kept."""
    import argparse
    import json
    import math

    import torch
    import transformers

    from lmforge.cli import _evaluate_arguments, _lm_stream
    from lmforge.tokenizer import Tokenizer

    folder, corpus, window = cli_fixtures / "tiny-gpt2", cli_fixtures / "corpus", 17
    code, out, err = run_cli("evaluate", "--model", folder, "--data", corpus, "--block-size", window,
                             "--stride", stride)
    assert code == 0, err
    got = json.loads(out)
    parser = argparse.ArgumentParser()
    _evaluate_arguments(parser)
    ids = _lm_stream(parser.parse_args(["--model", str(folder), "--data", str(corpus)]),
                     Tokenizer.for_model(folder))
    assert (len(ids) - window) % stride  # the last window is a partial one
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        input_ids = ids[None, begin:end]
        target = input_ids.clone()
        target[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss
        scored = int((target[:, 1:] != -100).sum())  # the tokens the shifted loss averages over
        nll, n, prev_end = nll + float(loss) * scored, n + scored, end
        if end == len(ids):
            break
    windows = -(-(len(ids) - window) // stride) + 1
    assert got["tokens"] == n == (len(ids) - 1 if stride < window else len(ids) - windows)  # stride = window:
    # each window's first token has no context and is not scored, as in transformers' loop
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
