"""Users' labelled data files: CSV / TSV / JSON lines, columns, strict encodings, splits, duplicates, GLUE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data import DataWarning
from lmforge.labelled import ColumnOptions, load_splits, read_table, task_options

POSITIVE = ["good film", "great fun", "loved it", "superb acting", "a delight", "wonderful", "brilliant",
            "so moving", "top notch", "pure joy"]
NEGATIVE = ["bad film", "dull plot", "hated it", "poor acting", "a bore", "awful", "terrible", "so slow",
            "weak script", "pure pain"]


def write_csv(path: Path, rows: list[tuple], header: str = "text,label") -> Path:
    lines = [header] + [",".join(f'"{v}"' if isinstance(v, str) and "," in v else str(v) for v in row)
                        for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_tsv_and_jsonl_read_the_same(tmp_path: Path) -> None:
    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    csv_file = write_csv(tmp_path / "d.csv", [("hello, world", "pos"), *rows])
    (tmp_path / "d.tsv").write_text("label\ttext\n" + "pos\thello, world\n"
                                    + "".join(f"{y}\t{t}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y, "id": i})
                                                for i, (t, y) in enumerate([("hello, world", "pos"), *rows])))
    tables = [read_table(p) for p in (csv_file, tmp_path / "d.tsv", tmp_path / "d.jsonl")]
    for table, line in zip(tables, (3, 3, 2), strict=True):  # the JSON-lines file has no header line
        assert table.texts[0] == "hello, world" and table.labels[:2] == ["pos", "pos"] and len(table.texts) == 21
        assert table.pairs is None and table.sources[1].endswith(f":{line}")


@pytest.mark.filterwarnings("ignore::lmforge.data.DataWarning")
def test_columns_pairs_and_regression(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": s})
                              for a, b, s in [("a cat", "a dog", 1.5), ("x", "y", 4.0), ("p", "q", 0.25)]))
    table = read_table(path, ColumnOptions(label_column="score"))
    assert table.pairs == ["a dog", "y", "q"]  # sentence2 found beside sentence1
    tsv = tmp_path / "data.tsv"
    tsv.write_text("id\tq\tanswer\tgrade\n1\twho\tme\t3.5\n2\twhat\tit\t1\n3\tx\ty\t2\n4\tz\tw\t0.5\n")
    splits = load_splits(train=tsv, validation=tsv, options=ColumnOptions(
        text_column="q", pair_column="answer", label_column="grade"))
    train = splits["train"]
    assert train.is_regression and train.labels == [3.5, 1.0, 2.0, 0.5] and train.text_pairs[0] == "me"
    forced = load_splits(train=tsv, validation=tsv, options=ColumnOptions(
        text_column="q", label_column="id", regression=True))
    assert forced["train"].labels == [1.0, 2.0, 3.0, 4.0]  # integers read as scores when asked
    classes = load_splits(train=tsv, validation=tsv, options=ColumnOptions(text_column="q", label_column="id"))
    assert classes["train"].label_names == ["1", "2", "3", "4"]


@pytest.mark.filterwarnings("ignore::lmforge.data.DataWarning")
def test_header_less_columns_by_number(tmp_path: Path) -> None:
    path = tmp_path / "cola.tsv"
    path.write_text("gj04\t1\t\tOur friends won't buy this analysis.\nclc95\t0\t*\tThey drank the pub.\n")
    splits = load_splits(train=path, validation=path, options=task_options("cola"))
    assert splits["train"].texts[1] == "They drank the pub." and splits["train"].label_names == ["0", "1"]
    with pytest.raises(ValueError, match="give the text column as a 0-based number"):
        read_table(path, ColumnOptions(text_column="sentence", header=False))


def test_encoding_errors_name_file_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tweets.csv"
    path.write_bytes(b"text,label\ngood,1\n" + "caf\xe9 au lait,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"tweets.csv: not valid utf-8: byte offset 21 \(line 3\).*--encoding"):
        read_table(path)
    assert read_table(path, ColumnOptions(encoding="latin-1")).texts[1] == "café au lait"
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        read_table(path, ColumnOptions(encoding="klingon"))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbftext,label\nx,1\n")
    assert read_table(bom).texts == ["x"]  # a byte-order mark is not part of the first column's name


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("text,label\n", "has no data rows"),
    ("txt,label\na,1\n", r"no text column; looked for text, sentence, sentence1 .*\['txt', 'label'\]"),
    ("text,stars\na,1\n", r"line 1: no label column 'label'; the file's columns are \['text', 'stars'\]"),
    ("text,label\na,1\nb,0,extra\n", r"line 3: malformed row with 3 fields, expected 2"),
    ('text,label\na,1\n"unclosed,0\n', r"line 3: malformed CSV row"),
    ("text,label\na,1\n ,0\n", r"line 3, column 'text': expected a non-empty text"),
    ("text,label\na,\n", r"line 2, column 'label': empty label"),
])
def test_bad_csv_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_table(path)


def test_bad_jsonl_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: malformed JSON"):
        read_table(path)
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2: no label column 'label'; the object has \['text'\]"):
        read_table(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object, got list"):
        read_table(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="unknown data file type '.xlsx'"):
        read_table(tmp_path / "x.xlsx")


@pytest.mark.filterwarnings("ignore::lmforge.data.DataWarning")
def test_seeded_split_of_one_file_reports_duplicates(tmp_path: Path) -> None:
    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    path = write_csv(tmp_path / "d.csv", rows + [("good film", "neg"), ("awful", "neg")])
    with pytest.warns(DataWarning, match=r"2 example\(s\) repeat another exactly \(2 distinct texts, 1 with "
                                         r"conflicting labels; e.g. .*d.csv:2, .*d.csv:22\)"):
        splits = load_splits(path, fractions=(0.6, 0.2, 0.2), split_seed=5)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [12, 4, 4]
    for split in splits.values():  # stratified
        assert sorted(split.labels) == [0] * (len(split) // 2) + [1] * (len(split) // 2)
    again = load_splits(path, fractions=(0.6, 0.2, 0.2), split_seed=5)
    other = load_splits(path, fractions=(0.6, 0.2, 0.2), split_seed=6)
    assert again["test"].texts == splits["test"].texts != other["test"].texts


@pytest.mark.filterwarnings("ignore::lmforge.data.DataWarning")
def test_user_given_splits_kept_as_given(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [(t, "pos") for t in POSITIVE[:6]] + [(t, "neg") for t in NEGATIVE[:6]])
    dev = write_csv(tmp_path / "dev.csv", [("good film", "pos"), ("awful", "neg")])
    test = write_csv(tmp_path / "test.csv", [("wonderful", "pos"), ("so slow", "neg"), ("so slow", "neg")])
    with pytest.warns(DataWarning) as caught:
        splits = load_splits(tmp_path)  # a folder of split files: dev.csv is the validation split
    messages = " | ".join(str(w.message) for w in caught)
    assert "test: 1 example(s) repeat another exactly" in messages
    assert "2 example(s) appear in both train and validation" in messages
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [12, 2, 3]  # nothing dropped
    only = load_splits(train=train, validation=dev)
    assert set(only) == {"train", "validation"} and only["train"].label_names == ["neg", "pos"]
    with pytest.raises(ValueError, match="need at least train and validation"):
        load_splits(train=train, test=test)
    bad = write_csv(tmp_path / "other.csv", [("meh", "neutral")])
    with pytest.raises(ValueError, match=r"other.csv:2: label 'neutral' is not one of"):
        load_splits(train=train, validation=bad)
    with pytest.raises(ValueError, match="every example has the label 'pos'"):
        load_splits(train=write_csv(tmp_path / "same.csv", [("x", "pos"), ("y", "pos")]), validation=dev)


def test_glue_presets(tmp_path: Path) -> None:
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (mrpc / "train.tsv").write_text(header + '1\t1\t2\tHe said "yes".\tHe agreed.\n0\t3\t4\tIt rained.\tShe left.\n')
    (mrpc / "dev.tsv").write_text(header + "1\t5\t6\tA man eats.\tA man is eating.\n")
    (mrpc / "test.tsv").write_text("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t7\t8\tx\ty\n")  # unlabelled
    with pytest.warns(DataWarning, match="test.tsv has no labels .* not used as the test split"):
        splits = load_splits(mrpc, options=task_options("mrpc"))
    assert set(splits) == {"train", "validation"}
    assert splits["train"].texts[0] == 'He said "yes".' and splits["train"].text_pairs[1] == "She left."
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    head = "index\tsentence1\tsentence2\tgold_label\n"
    (mnli / "train.tsv").write_text(head + "0\ta\tb\tentailment\n1\tc\td\tneutral\n2\te\tf\tcontradiction\n")
    (mnli / "dev_matched.tsv").write_text(head + "0\tg\th\tneutral\n")
    splits = load_splits(mnli, options=task_options("mnli"))
    assert splits["validation"].labels == [2] and splits["train"].label_names[0] == "contradiction"
    assert task_options("stsb").regression and task_options("qqp", label_column="dup").label_column == "dup"
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        task_options("glue")
