"""Users' labelled data: CSV, TSV and JSON-lines files, label folders, their splits, and GLUE's task presets.

    options = ColumnOptions(text_column="review", label_column="stars", encoding="latin-1")
    splits = load_splits("tweets.csv", options=options, fractions=(0.8, 0.1, 0.1), split_seed=0)
    splits = load_splits(train="train.jsonl", validation="dev.jsonl")      # the user's own splits
    splits = load_splits("glue/MRPC", options=GLUE_TASKS["mrpc"].options)  # train.tsv + dev.tsv

A file is read whole and decoded strictly (a byte that does not decode is an error naming the file, byte offset
and line). CSV follows RFC 4180 (quoted fields may hold commas and newlines); TSV is one row per line with no
quoting (GLUE's files hold bare quote characters); JSON lines are one object per line. The first row of a CSV
or TSV file names the columns unless `header=False`, when columns are 0-based numbers. Every problem (missing
column, empty file or cell, malformed row, unknown label) is a ValueError naming the file, line and column.

Labels: class names (any text; sorted, numerically when all are integers) or, for regression, numbers. The
kind is inferred (numbers of which one is not an integer: regression) unless `regression` is set.
Duplicates are reported (`lmforge.data.DataWarning`), never dropped silently: see `lmforge.data.split_labelled`
for a seeded split of one file; split files the user gives are kept as they are, and examples shared by two of
them are reported.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.data import (
    DataWarning,
    Encoding,
    LabelledTexts,
    TextPairs,
    bbc_headlines,
    bbc_news,
    decode_bytes,
    describe_duplicates,
    read_labelled_folder,
    split_labelled,
)

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}
DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1")
DEFAULT_PAIR_COLUMNS = {"sentence1": "sentence2"}  # a pair column is looked for only beside these text columns
DEFAULT_LABEL_COLUMN = "label"


@dataclass(frozen=True)
class ColumnOptions:
    """How to read a data file: columns, encoding, header, label kind.

    text_column: None picks the first of text / sentence / sentence1 the file has.
    pair_column: the second text of sentence pairs; None: sentence2 when the text column is sentence1.
    label_column: default "label". regression: None infers it from the labels (see the module docstring).
    header: False for CSV/TSV files without a header row; columns are then given as 0-based numbers.
    """

    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None
    encoding: Encoding = "utf-8"
    header: bool = True
    regression: bool | None = None
    validation_file: str | None = None  # file name of the validation split in a folder (GLUE: dev_matched.tsv)


@dataclass
class Table:
    """The rows of one file: texts, optional second texts, raw labels (None when not read) and "file:line"."""

    path: Path
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any] | None
    sources: list[str] = field(default_factory=list)


def file_format(path: Path) -> str:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r}; expected one of "
                         f"{', '.join(FILE_FORMATS)}")
    return fmt


def _records(path: Path, text: str, fmt: str, header: bool) -> tuple[list[str] | None, list[tuple[int, Any]]]:
    """(column names or None, [(line, row)]) of a file's text: rows are lists (CSV/TSV) or dicts (JSON)."""
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
        return None, rows
    if fmt == "tsv":
        reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(text.splitlines(keepends=True), strict=True)
    rows = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV row ({err})") from None
    if not header:
        return None, rows
    if not rows:
        raise ValueError(f"{path} is empty: expected a header row naming the columns, then data rows")
    names = [c.strip() for c in rows[0][1]]
    return names, rows[1:]


def _column(path: Path, names: list[str] | None, wanted: str, role: str, header: bool) -> str | int:
    """The key of column `wanted` in a row: an index (CSV/TSV) or the name itself (JSON)."""
    if names is None and header:  # JSON: checked row by row
        return wanted
    if not header:
        if not wanted.isdigit():
            raise ValueError(f"{path} has no header row: give the {role} column as a 0-based number, "
                             f"got {wanted!r}")
        return int(wanted)
    if wanted not in names:
        raise ValueError(f"{path}, line 1: no {role} column {wanted!r}; the file's columns are {names}")
    return names.index(wanted)


def _default_column(names: list[str] | None, first_row: Any, candidates: Sequence[str]) -> str | None:
    present = names if names is not None else list(first_row) if isinstance(first_row, dict) else []
    return next((c for c in candidates if c in present), None)


def read_table(path: str | Path, options: ColumnOptions = ColumnOptions(), need_labels: bool = True,
               role_names: tuple[str, str] = ("text", "pair")) -> Table:
    """The texts (pairs) and raw labels of one CSV / TSV / JSON-lines / .txt file (see the module docstring).

    A .txt file holds one text per line and no labels. need_labels=False reads no label column (prediction).
    role_names: what messages call the text and pair columns (("source", "target") for `read_pairs`).
    Raises FileNotFoundError for a missing file and ValueError naming file, line and column otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    fmt = file_format(path)
    text = decode_bytes(path.read_bytes(), options.encoding, str(path))
    if fmt == "txt":
        if need_labels:
            raise ValueError(f"{path}: a .txt file holds texts only; labelled data needs a CSV, TSV or JSON-lines "
                             f"file or a folder of <label>/*.txt")
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise ValueError(f"{path} is empty: expected one text per line")
        return Table(path, [line for _, line in lines], None, None, [f"{path}:{n}" for n, _ in lines])
    names, rows = _records(path, text, fmt, options.header)
    if not rows:
        raise ValueError(f"{path} is empty: it has no data rows")
    first = rows[0][1]
    text_col = options.text_column or _default_column(names, first, DEFAULT_TEXT_COLUMNS)
    if text_col is None:
        shown = names if names is not None else sorted(first) if isinstance(first, dict) else None
        raise ValueError(f"{path}: no text column; looked for {', '.join(DEFAULT_TEXT_COLUMNS)} (the file has "
                         f"{shown}); name it with --text-column")
    pair_col = options.pair_column
    if pair_col is None and options.text_column is None and text_col in DEFAULT_PAIR_COLUMNS:
        pair_col = _default_column(names, first, [DEFAULT_PAIR_COLUMNS[text_col]])
    label_col = (options.label_column or DEFAULT_LABEL_COLUMN) if need_labels else None
    wanted = {"text": text_col, "pair": pair_col, "label": label_col}
    shown_role = {"text": role_names[0], "pair": role_names[1], "label": "label"}
    keys = {role: _column(path, names, col, shown_role[role], options.header) for role, col in wanted.items()
            if col}
    width = len(names) if names is not None else None
    out: dict[str, list[Any]] = {role: [] for role in keys}
    sources = []
    for line, row in rows:
        if width is not None and len(row) != width:
            raise ValueError(f"{path}, line {line}: malformed row with {len(row)} fields, expected {width} "
                             f"({', '.join(names)})")
        for role, key in keys.items():
            if isinstance(row, dict):
                if key not in row:
                    raise ValueError(f"{path}, line {line}: no {shown_role[role]} column {key!r}; the object has "
                                     f"{sorted(row)}")
                value = row[key]
            else:
                if key >= len(row):
                    raise ValueError(f"{path}, line {line}: no {shown_role[role]} column {key} (the row has "
                                     f"{len(row)} fields)")
                value = row[key]
            if role != "label" and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"{path}, line {line}, column {wanted[role]!r}: expected a non-empty text, "
                                 f"got {value!r}")
            if role == "label" and (value is None or (isinstance(value, str) and not value.strip())):
                raise ValueError(f"{path}, line {line}, column {wanted[role]!r}: empty label")
            out[role].append(value)
        sources.append(f"{path}:{line}")
    return Table(path, out["text"], out.get("pair"), out.get("label"), sources)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _is_regression(tables: Sequence[Table]) -> bool:
    values = [v for t in tables for v in t.labels]
    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        return False
    return any(isinstance(v, float) or not float(n).is_integer() for v, n in zip(values, numbers, strict=True))


def _label_key(value: Any) -> str:
    """Class labels as text: JSON 1 and CSV "1" are the same class."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def label_names_of(tables: Sequence[Table]) -> list[str]:
    """The class names of tables' labels, sorted (numerically when every name is an integer)."""
    names = {_label_key(v) for t in tables for v in t.labels}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def to_labelled(table: Table, label_names: Sequence[str] | None) -> LabelledTexts:
    """A table as `LabelledTexts`: label_names None or empty means regression (float labels); else each label
    must be one of label_names (ValueError naming the file and line otherwise)."""
    if table.labels is None:
        raise ValueError(f"{table.path}: read without labels")
    if not label_names:
        labels: list[Any] = []
        for value, where in zip(table.labels, table.sources, strict=True):
            number = _number(value)
            if number is None:
                raise ValueError(f"{where}: label {value!r} is not a number, expected a regression score")
            labels.append(number)
        return LabelledTexts(table.texts, labels, [], table.pairs, table.sources)
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for value, where in zip(table.labels, table.sources, strict=True):
        key = _label_key(value)
        if key not in index:
            raise ValueError(f"{where}: label {key!r} is not one of the model's or training set's labels "
                             f"{list(label_names)}")
        labels.append(index[key])
    return LabelledTexts(table.texts, labels, list(label_names), table.pairs, table.sources)


def _find_split_files(folder: Path, options: ColumnOptions) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        candidates = [folder / options.validation_file] if split == "validation" and options.validation_file \
            else [folder / f"{stem}{ext}" for stem in stems for ext in FILE_FORMATS if ext != ".txt"]
        hits = [p for p in candidates if p.is_file()]
        if hits:
            found[split] = hits[0]
    return found


def _report_overlaps(splits: dict[str, LabelledTexts]) -> None:
    for name, data in splits.items():
        report = describe_duplicates(data, name)
        if report is not None:
            warnings.warn(report + "; kept as given", DataWarning, stacklevel=3)
    keys = {name: {data.key(i) for i in range(len(data))} for name, data in splits.items()}
    names = list(splits)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            shared = keys[names[a]] & keys[names[b]]
            if shared:
                warnings.warn(f"{len(shared)} example(s) appear in both {names[a]} and {names[b]} (e.g. "
                              f"{next(iter(shared))[0][:60]!r}); kept as given", DataWarning, stacklevel=3)


def load_splits(data: str | Path | None = None, *, train: str | Path | None = None,
                validation: str | Path | None = None, test: str | Path | None = None,
                options: ColumnOptions = ColumnOptions(), fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                split_seed: int = 0, label_names: Sequence[str] | None = None) -> dict[str, LabelledTexts]:
    """The "train", "validation" and (when there is one) "test" splits of a data set.

    data: "bbc-news"; a folder of <label>/*.txt; a folder holding train / validation (or dev) / test files; or
        one file, split with `fractions` and `split_seed` (stratified by label). train / validation / test:
        split files given one by one (train and validation at least); they override those found in `data`.
    label_names: the label order a model already has (a classifier being evaluated or distilled); [] for a
        regressor. Labels outside it are errors. None: the training split's labels, sorted.
    Raises FileNotFoundError / ValueError naming the file and line at fault.
    """
    given = {"train": train, "validation": validation, "test": test}
    given = {k: Path(v) for k, v in given.items() if v is not None}
    if data is not None and str(data) == "bbc-news" and not given:
        splits = bbc_news()
        if label_names is not None and list(label_names) != splits["train"].label_names:
            raise ValueError(f"label-set mismatch: the model predicts {list(label_names)}, bbc-news has "
                             f"{splits['train'].label_names}")
        return splits
    files: dict[str, Path] = {}
    single: Path | None = None
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"data {str(path)!r} does not exist; expected bbc-news, a CSV / TSV / "
                                    f"JSON-lines file, or a folder of split files or of <label>/*.txt")
        if path.is_dir():
            files = _find_split_files(path, options)
            if not files:
                if not any(p.is_dir() for p in path.iterdir()):
                    raise ValueError(f"data folder {str(path)!r} holds neither split files (train.csv / .tsv / "
                                     f".jsonl, validation or dev, test) nor <label>/*.txt folders")
                folder = read_labelled_folder(path, label_names or None, options.encoding)
                return split_labelled(folder, fractions, split_seed)
        else:
            single = path
    files.update(given)
    if single is not None and files:
        raise ValueError(f"give either one data file to split ({single}) or split files (--train, "
                         f"--validation, --test), not both")
    if single is not None:
        table = read_table(single, options)
        return split_labelled(_labelled([table], options, label_names)[0], fractions, split_seed)
    if "train" not in files or "validation" not in files:
        raise ValueError(f"split files need at least train and validation; found {sorted(files) or 'none'}"
                         f"{' in ' + str(data) if data is not None else ''}")
    tables = {}
    for split, p in files.items():
        try:
            tables[split] = read_table(p, options)
        except ValueError as err:  # GLUE's test files are unlabelled: a test file found in a folder is optional
            if split != "test" or split in given or "no label column" not in str(err):
                raise
            warnings.warn(f"{p} has no labels ({err}); it is not used as the test split", DataWarning,
                          stacklevel=2)
    labelled = _labelled(list(tables.values()), options, label_names)
    splits = dict(zip(tables, labelled, strict=True))
    _report_overlaps(splits)
    return splits


def _labelled(tables: list[Table], options: ColumnOptions,
              label_names: Sequence[str] | None) -> list[LabelledTexts]:
    """Tables as LabelledTexts with one label set: the model's, else the first table's (training) labels."""
    if label_names is None:
        regression = options.regression if options.regression is not None else _is_regression(tables[:1])
        label_names = [] if regression else label_names_of(tables[:1])
        if not regression and len(label_names) < 2:
            raise ValueError(f"{tables[0].path}: every example has the label {label_names[0]!r}; "
                             f"classification needs at least two classes")
    return [to_labelled(t, label_names) for t in tables]


# --- (source, target) pairs for sequence-to-sequence tasks ----------------------------------------------------


def read_pairs(path: str | Path, source_column: str = "source", target_column: str = "target",
               encoding: Encoding = "utf-8", header: bool = True) -> TextPairs:
    """The (source, target) texts of one CSV / TSV / JSON-lines file (the columns `source_column` and
    `target_column`: names, or 0-based numbers with header=False). Raises FileNotFoundError for a missing file
    and ValueError naming the file, line and column of a missing column, an empty text or a malformed row."""
    options = ColumnOptions(text_column=source_column, pair_column=target_column, encoding=encoding,
                            header=header)
    if file_format(Path(path)) == "txt":
        raise ValueError(f"{path}: a .txt file holds one text per line; (source, target) pairs need a CSV, TSV "
                         f"or JSON-lines file with {source_column!r} and {target_column!r} columns")
    table = read_table(path, options, need_labels=False, role_names=("source", "target"))
    return TextPairs(table.texts, table.pairs, table.sources)


def split_pairs(pairs: TextPairs, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> dict[str, TextPairs]:
    """A seeded train / validation / test split of pairs. Pairs that repeat an earlier one exactly are kept once
    (reported with a `DataWarning`), so that none lands in two splits."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    first: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(pairs.sources, pairs.targets, strict=True)):
        first.setdefault(key, i)
    if len(first) < len(pairs):
        warnings.warn(f"{len(pairs) - len(first)} pair(s) repeat another exactly; each is kept once so that "
                      f"none lands in two splits", DataWarning, stacklevel=2)
    order = sorted(first.values())
    random.Random(seed).shuffle(order)
    n_train, n_val = round(len(order) * fractions[0]), round(len(order) * fractions[1])
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    empty = [name for (name, ids), f in zip(parts.items(), fractions, strict=True) if f > 0 and not ids]
    if empty:
        raise ValueError(f"{len(order)} distinct pairs are too few for a {fractions} split: {', '.join(empty)} "
                         f"would be empty")
    return {name: pairs.subset(ids) for name, ids in parts.items() if ids}


def load_pair_splits(data: str | Path | None = None, *, train: str | Path | None = None,
                     validation: str | Path | None = None, test: str | Path | None = None,
                     source_column: str = "source", target_column: str = "target", encoding: Encoding = "utf-8",
                     header: bool = True, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                     split_seed: int = 0) -> dict[str, TextPairs]:
    """The "train", "validation" and (when there is one) "test" (source, target) splits of a data set.

    data: "bbc-headlines" (`lmforge.data.bbc_headlines`, BBC News' fixed split); one file, split with
        `fractions` and `split_seed`; or a folder holding train / validation (or dev) / test files.
    train / validation / test: split files given one by one (train and validation at least).
    """
    given = {k: Path(v) for k, v in {"train": train, "validation": validation, "test": test}.items()
             if v is not None}
    if data is not None and str(data) == "bbc-headlines" and not given:
        return bbc_headlines()
    files: dict[str, Path] = {}
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"data {str(path)!r} does not exist; expected bbc-headlines, a CSV / TSV / "
                                    f"JSON-lines file of (source, target) pairs, or a folder of split files")
        if path.is_file():
            if given:
                raise ValueError(f"give either one data file to split ({path}) or split files (--train, "
                                 f"--validation, --test), not both")
            pairs = read_pairs(path, source_column, target_column, encoding, header)
            return split_pairs(pairs, fractions, split_seed)
        files = _find_split_files(path, ColumnOptions())
        if not files:
            raise ValueError(f"data folder {str(path)!r} holds no split files (train.csv / .tsv / .jsonl, "
                             f"validation or dev, test)")
    files.update(given)
    if "train" not in files or "validation" not in files:
        raise ValueError(f"split files need at least train and validation; found {sorted(files) or 'none'}"
                         f"{' in ' + str(data) if data is not None else ''}")
    return {split: read_pairs(p, source_column, target_column, encoding, header) for split, p in files.items()}


# --- GLUE -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A GLUE task: how its TSV files are read and which metric it reports."""

    options: ColumnOptions
    metric: str


GLUE_TASKS: dict[str, Task] = {
    # CoLA's train.tsv / dev.tsv have no header: source, label, original label, sentence.
    "cola": Task(ColumnOptions(text_column="3", label_column="1", header=False), "mcc"),
    "sst2": Task(ColumnOptions(text_column="sentence", label_column="label"), "accuracy"),
    "mrpc": Task(ColumnOptions(text_column="#1 String", pair_column="#2 String", label_column="Quality"), "f1"),
    "qqp": Task(ColumnOptions(text_column="question1", pair_column="question2", label_column="is_duplicate"),
                "f1"),
    "stsb": Task(ColumnOptions(text_column="sentence1", pair_column="sentence2", label_column="score",
                               regression=True), "pearson"),
    "mnli": Task(ColumnOptions(text_column="sentence1", pair_column="sentence2", label_column="gold_label",
                               validation_file="dev_matched.tsv"), "accuracy"),
    "qnli": Task(ColumnOptions(text_column="question", pair_column="sentence", label_column="label"),
                 "accuracy"),
    "rte": Task(ColumnOptions(text_column="sentence1", pair_column="sentence2", label_column="label"),
                "accuracy"),
}


def task_options(task: str | None, **overrides: Any) -> ColumnOptions:
    """The column options of a GLUE task (or the defaults) with the options the user gave (non-None) on top."""
    if task is not None and task not in GLUE_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(GLUE_TASKS)}")
    base = GLUE_TASKS[task].options if task is not None else ColumnOptions()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
