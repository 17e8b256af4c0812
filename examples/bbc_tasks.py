"""Two users' data sets built from BBC News, as CSV and JSON-lines files for the lmforge command line.

    python examples/bbc_tasks.py runs/bbc-tasks    # writes the files below (the texts are not committed)

- Sentence pairs, `same-category/{train,validation,test}.csv` (columns sentence1, sentence2, label): two
  headlines (an article's first line) and label 1 when their articles share a BBC category, else 0; half of
  the pairs of each split are positive.
- Regression, `relatedness/{train,validation,test}.jsonl` (fields headline, sentence, score): a headline and
  one sentence from an article's body, with a derived relatedness score: 1.0 when the sentence comes from the
  headline's own article, 0.5 from another article of the same category, 0.0 from another category; a third
  of the pairs each.

Both follow BBC's fixed split (lmforge.data.bbc_news): pairs of the train files come from training articles
only, and so on, so no article is seen in two splits. Drawn with a fixed seed: the files are the same on every
run.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

from lmforge.data import LabelledTexts, bbc_news

SIZES = {"train": 2000, "validation": 300, "test": 300}


def headline(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def body_sentences(text: str) -> list[str]:
    body = text.strip().split("\n", 1)[1] if "\n" in text.strip() else text
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", body.replace("\n", " ")) if len(s.split()) >= 5]


def same_category_pairs(data: LabelledTexts, n: int, rng: random.Random) -> list[dict]:
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_label.setdefault(y, []).append(i)
    rows = []
    for k in range(n):
        a = rng.randrange(len(data))
        if k % 2 == 0:
            b = rng.choice([j for j in by_label[data.labels[a]] if j != a])
        else:
            b = rng.choice([j for j in range(len(data)) if data.labels[j] != data.labels[a]])
        rows.append({"sentence1": headline(data.texts[a]), "sentence2": headline(data.texts[b]),
                     "label": int(data.labels[a] == data.labels[b])})
    return rows


def relatedness_pairs(data: LabelledTexts, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for k in range(n):
        a = rng.randrange(len(data))
        kind = k % 3
        if kind == 0:
            b, score = a, 1.0
        elif kind == 1:
            b = rng.choice([j for j in range(len(data)) if j != a and data.labels[j] == data.labels[a]])
            score = 0.5
        else:
            b = rng.choice([j for j in range(len(data)) if data.labels[j] != data.labels[a]])
            score = 0.0
        rows.append({"headline": headline(data.texts[a]), "sentence": rng.choice(body_sentences(data.texts[b])),
                     "score": score})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for same-category/ and relatedness/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for name in ("same-category", "relatedness"):
        (args.out / name).mkdir(parents=True, exist_ok=True)
    for split, data in bbc_news().items():
        pairs = same_category_pairs(data, SIZES[split], rng)
        with open(args.out / "same-category" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence1", "sentence2", "label"])
            writer.writeheader()
            writer.writerows(pairs)
        with open(args.out / "relatedness" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in relatedness_pairs(data, SIZES[split], rng):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}: {len(pairs)} headline pairs, {SIZES[split]} headline-sentence pairs")


if __name__ == "__main__":
    main()
