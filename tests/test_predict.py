"""Users' data end to end through the command line: sentence pairs and regression from CSV / JSON lines,
finetune -> evaluate -> predict -> distill, and bit-identical reruns with the same seed."""

from __future__ import annotations

import csv
import json
import random
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ModelConfig
from lmforge.io import load_model, save_model
from lmforge.models import build_model
from lmforge.predict import predict
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["cat", "dog", "cow", "home", "park", "town", "red", "blue"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from lmforge.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny BERT with dropout (letter-level WordPiece vocabulary), a sentence-pair CSV (label: do the two
    texts share their first word) and a regression JSON-lines file (score: share of the second text's words
    found in the first), each with its own train / validation / test files."""
    root = tmp_path_factory.mktemp("users")
    torch.manual_seed(0)
    save_model(build_model(ModelConfig.from_name("tiny-bert", head="none", dropout=0.1)), root / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase)]
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    rng = random.Random(0)
    for split, n in (("train", 40), ("validation", 12), ("test", 12)):
        rows = []
        for _ in range(n):
            a, b = rng.choices(WORDS, k=3), rng.choices(WORDS, k=3)
            rows.append({"sentence1": " ".join(a), "sentence2": " ".join(b), "label": int(a[0] == b[0])})
        rows[0]["label"], rows[1]["label"] = 0, 1  # both classes in every split
        with open(root / f"pairs_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence1", "sentence2", "label"])
            writer.writeheader()
            writer.writerows(rows)
        with open(root / f"scores_{split}.jsonl", "w") as f:
            for row in rows:
                score = sum(w in row["sentence1"].split() for w in row["sentence2"].split()) / 3 + 0.05
                f.write(json.dumps({"text": row["sentence1"], "other": row["sentence2"], "score": score}) + "\n")
    return root


def finetune(capsys, root: Path, run: Path, kind: str, *extra) -> dict:
    data = ("--train", root / f"{kind}_train.{'csv' if kind == 'pairs' else 'jsonl'}",
            "--validation", root / f"{kind}_validation.{'csv' if kind == 'pairs' else 'jsonl'}",
            "--test", root / f"{kind}_test.{'csv' if kind == 'pairs' else 'jsonl'}")
    columns = () if kind == "pairs" else ("--text-pair-column", "other", "--label-column", "score")
    code, out, err = run_cli(capsys, "finetune", "--model", root / "bert", *data, *columns, "--run-dir", run,
                             "--steps", 12, "--batch-size", 4, "--lr", 3e-3, "--max-len", 24, *extra)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def test_same_seed_same_metrics_and_weights(root: Path, tmp_path: Path, capsys) -> None:
    """Two runs of the same command give bit-identical metrics and weights (new head, dropout, data order
    included); another seed gives other weights, so the check can fail."""
    first = finetune(capsys, root, tmp_path / "a", "pairs", "--seed", 3)
    torch.rand(5)  # the global random state differs between the runs: nothing may depend on it
    second = finetune(capsys, root, tmp_path / "b", "pairs", "--seed", 3)
    finetune(capsys, root, tmp_path / "c", "pairs", "--seed", 4)
    assert first["validation"] == second["validation"] and first["test"] == second["test"]
    weights = [load_file(tmp_path / r / "model" / "model.safetensors") for r in ("a", "b", "c")]
    assert set(weights[0]) == set(weights[1])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["classifier.weight"], weights[2]["classifier.weight"])
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text() \
        or _same_but_timing(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    # loading with a new head is itself seeded: the same seed, the same head
    heads = [load_model(root / "bert", head="classify", n_labels=3, seed=s).cls_head.out.weight for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def _same_but_timing(a: Path, b: Path) -> bool:
    strip = (lambda p: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                        for line in p.read_text().splitlines()])
    return strip(a) == strip(b)


def test_sentence_pairs_finetune_evaluate_predict_distill(root: Path, tmp_path: Path, capsys) -> None:
    result = finetune(capsys, root, tmp_path / "ft", "pairs")
    test = result["test"]
    assert test["examples"] == 12 and {"accuracy", "f1", "macro_f1", "mcc"} <= set(test)
    assert test["metric"]["name"] == "accuracy"
    model_dir = tmp_path / "ft" / "model"
    code, out, _ = run_cli(capsys, "evaluate", "--model", model_dir, "--train", root / "pairs_train.csv",
                           "--validation", root / "pairs_validation.csv", "--test", root / "pairs_test.csv",
                           "--metric", "mcc")
    evaluated = json.loads(out)
    assert code == 0 and evaluated["accuracy"] == test["accuracy"] and evaluated["metric"]["name"] == "mcc"
    code, out, _ = run_cli(capsys, "predict", "--model", model_dir, "--input", root / "pairs_test.csv",
                           "--output", tmp_path / "pred.jsonl", "--batch-size", 5, "--max-len", 24)
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert code == 0 and len(rows) == 12 and set(rows[0]) == {"text", "text_pair", "label", "probabilities"}
    # against the model run directly on the pair encoding ([CLS] a [SEP] b [SEP], token types 0 / 1)
    model, tokenizer = load_model(model_dir), Tokenizer.for_model(model_dir)
    for row in rows[:3]:
        ids, types = tokenizer.encode_pair(row["text"], row["text_pair"], 24)
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits, -1)[0]
        assert [row["probabilities"][n] for n in ("0", "1")] == pytest.approx(probs.tolist(), abs=1e-6)
        assert row["label"] == ("0", "1")[int(probs.argmax())]
    accuracy = sum(r["label"] == str(y) for r, y in zip(rows, _labels(root / "pairs_test.csv"), strict=True)) / 12
    assert accuracy == pytest.approx(test["accuracy"])
    code, out, _ = run_cli(capsys, "predict", "--model", model_dir, "--input", root / "pairs_test.csv",
                           "--output", tmp_path / "pred.csv", "--max-len", 24)
    with open(tmp_path / "pred.csv") as f:
        assert next(csv.reader(f)) == ["text", "text_pair", "label", "probabilities_0", "probabilities_1"]
    code, out, _ = run_cli(capsys, "distill", "--teacher", model_dir, "--student-layers", "1,",
                           "--data", root / "pairs_train.csv", "--split-fractions", "0.6,0.2,0.2",
                           "--run-dir", tmp_path / "student", "--steps", 4, "--batch-size", 4, "--max-len", 24)
    report = json.loads(out.splitlines()[-1])
    assert code == 0 and report["layer_map"] == [1] and "mcc" in report["test"]


def _labels(path: Path) -> list[int]:
    with open(path) as f:
        return [int(r["label"]) for r in csv.DictReader(f)]


def test_regression_finetune_evaluate_predict_distill(root: Path, tmp_path: Path, capsys) -> None:
    result = finetune(capsys, root, tmp_path / "ft", "scores")
    test = result["test"]
    assert {"mse", "pearson", "spearman"} <= set(test) and test["loss"] == pytest.approx(test["mse"])
    assert test["metric"]["name"] == "pearson"
    model_dir = tmp_path / "ft" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    assert config["problem_type"] == "regression"
    code, out, _ = run_cli(capsys, "predict", "--model", model_dir, "--input", root / "scores_test.jsonl",
                           "--text-pair-column", "other", "--max-len", 24)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 12 and set(rows[0]) == {"text", "text_pair", "score"}
    model, tokenizer = load_model(model_dir), Tokenizer.for_model(model_dir)
    direct = predict(model, tokenizer, [r["text"] for r in rows], [r["text_pair"] for r in rows], max_len=24)
    assert [r["score"] for r in rows] == pytest.approx([d["score"] for d in direct], abs=1e-6)
    truth = [json.loads(line)["score"] for line in (root / "scores_test.jsonl").read_text().splitlines()]
    mse = sum((r["score"] - y) ** 2 for r, y in zip(rows, truth, strict=True)) / 12
    assert mse == pytest.approx(test["mse"], rel=1e-5)
    code, out, err = run_cli(capsys, "distill", "--teacher", model_dir, "--student-layers", "1,",
                             "--train", root / "scores_train.jsonl", "--validation", root / "scores_validation.jsonl",
                             "--text-pair-column", "other", "--label-column", "score",
                             "--run-dir", tmp_path / "student", "--steps", 4, "--batch-size", 4, "--max-len", 24)
    report = json.loads(out.splitlines()[-1])
    assert code == 0, err
    assert "pearson" in report["eval"] and "test" not in report  # no test split was given
    code, _, err = run_cli(capsys, "finetune", "--model", root / "bert", "--train", root / "scores_train.jsonl",
                           "--validation", root / "scores_validation.jsonl", "--label-column", "score",
                           "--metric", "accuracy", "--run-dir", tmp_path / "bad", "--steps", 1)
    assert code == 2 and "--metric accuracy does not apply to a regression" in err


def test_predict_errors_and_texts_on_the_command_line(root: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "predict", "--model", root / "bert", "cat dog")
    assert code == 2 and "needs a classifier or regressor" in err
    code, _, err = run_cli(capsys, "predict", "--model", root / "bert")
    assert code == 2 and "give texts on the command line or --input" in err
    finetune(capsys, root, tmp_path / "ft", "pairs", "--steps", 1)
    code, out, _ = run_cli(capsys, "predict", "--model", tmp_path / "ft" / "model", "cat dog", "red town")
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == ["cat dog", "red town"]
