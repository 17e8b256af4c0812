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
    return {"gpt2": str(cli_fixtures / "tiny-gpt2"), "bert": str(cli_fixtures / "tiny-bert"),
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
