"""A small T5 pre-trained from scratch on BBC News with span corruption, fine-tuned for headline generation, and
scored with ROUGE on the test split against two baselines: the article's first 10 words, and the same model
fine-tuned for the same steps without pre-training.

    python scripts/t5_bbc_headlines.py --out runs/t5-bbc [--pretrain-steps N --finetune-steps M ...]

Every training and scoring step is an `lmforge` command (printed, then run as a subprocess); the script only adds
the T5-style tokenizer (a SentencePiece-like unigram vocabulary trained on the training split's text with the
`tokenizers` library, <pad> 0, </s> 1, <unk> 2 and 100 sentinels <extra_id_99> .. <extra_id_0> at the top of the
vocabulary, as T5's) and the first-10-words baseline. Writes OUT/summary.json and, with --report, a markdown
report. Nothing it writes (BBC text, tokenizer, weights) belongs in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

N_SENTINELS = 100


def train_t5_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Path:
    """A T5-layout unigram tokenizer trained on `texts`, saved as an HF tokenizer folder `out`."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    from lmforge.tokenizer import Tokenizer

    backend = Backend(models.Unigram())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Strip()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - N_SENTINELS, special_tokens=specials,
                                      unk_token="<unk>", show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([f"<extra_id_{k}>" for k in reversed(range(N_SENTINELS))])  # <extra_id_0> on top
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = Tokenizer(backend, {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"})
    assert tokenizer.token_to_id("<extra_id_0>") == tokenizer.vocab_size - 1
    return tokenizer.save(out)


def run(name: str, argv: list, out: Path, log: list[dict]) -> dict:
    """Run `lmforge ARGV` as a subprocess (its last stdout line is its JSON report), kept in OUT/NAME.json; a
    stage whose report exists is not run again (so an interrupted script continues where it stopped)."""
    command = ["lmforge", *[str(a) for a in argv]]
    saved = out / f"{name}.json"
    if saved.exists():
        entry = json.loads(saved.read_text())
        print(f"{name}: done before ({entry['seconds']} s)", flush=True)
    else:
        print(f"{name}: $ {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lmforge", *command[1:]], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        entry = {"command": shlex.join(command), "seconds": round(time.perf_counter() - start, 1),
                 "load_after": os.getloadavg(), "report": json.loads(proc.stdout.strip().splitlines()[-1])}
        saved.write_text(json.dumps(entry, indent=1))
        print(f"  {entry['seconds']:.0f} s: {json.dumps(entry['report'])[:400]}", flush=True)
    log.append({"stage": name, **entry})
    return entry["report"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-batch", type=int, default=16)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--max-source-len", type=int, default=128)
    p.add_argument("--max-target-len", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from lmforge.data import BBC_HEADLINE_PREFIX, bbc_headlines, bbc_news
    from lmforge.metrics import corpus_rouge

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t0 = time.perf_counter()
    train_split = bbc_news("train")
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_t5_tokenizer(train_split.texts, args.vocab_size, tokenizer_dir)
        (out / "tokenizer_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    tokenizer_seconds = float((out / "tokenizer_seconds.txt").read_text())
    print(f"tokenizer: {tokenizer_dir} in {tokenizer_seconds:.0f} s", flush=True)

    size = ["--n-layer", args.n_layer, "--d-model", args.d_model, "--d-ff", args.d_ff, "--n-head", args.n_head]
    scratch = ["--model", "t5-small", "--from-scratch", "--tokenizer", tokenizer_dir, *size]
    common = ["--seed", args.seed, "--quiet", "--log-every", 50]
    seq2seq = ["--objective", "seq2seq", "--data", "bbc-headlines", "--max-source-len", args.max_source_len,
               "--max-target-len", args.max_target_len, "--steps", args.finetune_steps, "--batch-size",
               args.finetune_batch, "--lr", args.finetune_lr, "--warmup-steps", args.finetune_steps // 20, *common]

    run("pretrain", ["train", *scratch, "--objective", "span-corruption", "--data", "bbc-news", "--block-size",
                     args.block_size, "--steps", args.pretrain_steps, "--batch-size", args.pretrain_batch, "--lr",
                     args.pretrain_lr, "--warmup-steps", args.pretrain_steps // 20, "--eval-batches", 10, *common,
                     "--run-dir", out / "pretrain"], out, log)
    run("finetune", ["train", "--model", out / "pretrain" / "model", *seq2seq, "--run-dir", out / "finetune"], out,
        log)
    run("no-pretrain", ["train", *scratch, *seq2seq, "--run-dir", out / "no-pretrain"], out, log)
    scores = {}
    for name in ("finetune", "no-pretrain"):
        scores[name] = run(f"score-{name}", ["evaluate", "--model", out / name / "model", "--data", "bbc-headlines",
                                             "--split", "test", "--max-source-len", args.max_source_len,
                                             "--max-target-len", args.max_target_len, "--batch-size", 32], out, log)
    test = bbc_headlines("test")
    lead = [" ".join(s[len(BBC_HEADLINE_PREFIX):].split()[:10]) for s in test.sources]
    scores["first-10-words"] = corpus_rouge(lead, test.targets)
    total = tokenizer_seconds + sum(entry["seconds"] for entry in log)  # the stages' own times, over restarts
    summary = {"arguments": {k: str(v) for k, v in vars(args).items()}, "tokenizer_seconds": tokenizer_seconds,
               "total_seconds": total, "steps": log, "test": scores, "load": os.getloadavg(),
               "torch_threads": os.environ.get("OMP_NUM_THREADS")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: {m: v[m] for m in ("rouge1", "rouge2", "rougeL")} for k, v in scores.items()}, indent=1))
    print(f"total {total / 60:.1f} min; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
