"""Sentence-embedding throughput of lmforge vs sentence-transformers on all-MiniLM-L6-v2, and a retrieval check.

Both encode the same BBC sentences (`bbc_sentences`: 1,000 of mixed length, one in fifty a run of sentences cut
at the model's 256 tokens) with the same batch size; the per-sentence cosine between the two is checked first.
Then the calls alternate (lmforge, sentence-transformers, lmforge, ...) so machine noise hits both alike; the
script prints each one's median sentences/s and the median and spread of the per-pair time ratios.

The retrieval check embeds the first line (the headline) of every BBC test article and every article of another
split (--pool: validation, 212 articles, by default; train, 1,701, is slower), and counts the headlines whose
nearest article (cosine) has the headline's category.

    .venv/bin/python benchmarks/embed.py                    # 1,000 sentences, batch 32, 5 pairs, 2 threads
    .venv/bin/python benchmarks/embed.py --repeats 3 --no-retrieval
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time

import torch

try:
    from common import cpu_model  # run as a script: benchmarks/ is on sys.path
except ImportError:  # imported as benchmarks.embed (tests/test_embed.py)
    from benchmarks.common import cpu_model

from lmforge.data import bbc_news
from lmforge.embeddings import SentenceEncoder


def bbc_sentences(n: int = 1000, seed: int = 0, long_every: int = 50) -> list[str]:
    """n BBC sentences of mixed length from the validation and test articles, drawn with `seed`; every
    `long_every`-th item is a run of 40 sentences, longer than the model's 256-token limit."""
    articles = bbc_news("test").texts + bbc_news("validation").texts
    sentences = [s.strip() for a in articles for s in re.split(r"(?<=[.!?])\s+", a) if len(s.strip()) > 3]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(len(sentences))
        out.append(" ".join(sentences[start:start + 40]) if i % long_every == 0 else sentences[start])
    return out


def retrieval(encoder: SentenceEncoder, batch_size: int, pool: str) -> tuple[int, int]:
    """(headlines whose nearest article of the `pool` split has their category, test headlines)."""
    articles, test = bbc_news(pool), bbc_news("test")
    headlines = [t.strip().split("\n", 1)[0] for t in test.texts]
    vectors = encoder.encode(articles.texts, batch_size=batch_size, normalize=True)  # (N_pool, d)
    queries = encoder.encode(headlines, batch_size=batch_size, normalize=True)  # (N_test, d)
    nearest = (queries @ vectors.T).argmax(dim=1)
    hits = sum(articles.labels[int(j)] == y for j, y in zip(nearest, test.labels, strict=True))
    return hits, len(headlines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs (lmforge, sentence-transformers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-retrieval", dest="retrieval", action="store_false")
    parser.add_argument("--pool", choices=["validation", "train"], default="validation",
                        help="the BBC split whose articles the test headlines are matched against")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import sentence_transformers

    from lmforge.registry import packaged_path

    texts = bbc_sentences(args.sentences)
    ours = SentenceEncoder.load("all-minilm-l6-v2")
    theirs = sentence_transformers.SentenceTransformer(str(packaged_path("all-minilm-l6-v2")), device="cpu")

    def run_ours() -> torch.Tensor:
        return ours.encode(texts, batch_size=args.batch_size)

    def run_theirs() -> torch.Tensor:
        return theirs.encode(texts, batch_size=args.batch_size, convert_to_tensor=True)

    cosine = torch.nn.functional.cosine_similarity(run_ours(), run_theirs().float(), dim=1)  # also a warm-up
    print(f"{len(texts)} sentences: cosine lmforge vs sentence-transformers min {cosine.min():.7f}, "
          f"mean {cosine.mean():.7f}", flush=True)
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        for run, times in ((run_ours, ours_t), (run_theirs, theirs_t)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    ratios = [t / o for o, t in zip(ours_t, theirs_t, strict=True)]  # > 1: lmforge faster
    print(f"\nembedding throughput, all-MiniLM-L6-v2 fp32, batch {args.batch_size}, {args.threads} threads, "
          f"{args.repeats} alternating pairs\nCPU: {cpu_model()}; torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")
    n = len(texts)
    print(f"lmforge               {n / statistics.median(ours_t):8.1f} sentences/s (median "
          f"{statistics.median(ours_t):.2f} s)")
    print(f"sentence-transformers {n / statistics.median(theirs_t):8.1f} sentences/s (median "
          f"{statistics.median(theirs_t):.2f} s)")
    print(f"speed ratio lmforge / sentence-transformers: median {statistics.median(ratios):.3f} "
          f"(pairs from {min(ratios):.3f} to {max(ratios):.3f})")
    if args.retrieval:
        hits, total = retrieval(ours, args.batch_size, args.pool)
        print(f"retrieval: {hits} of {total} BBC test headlines ({hits / total:.1%}) have their category in the "
              f"nearest of the {len(bbc_news(args.pool))} {args.pool} articles")


if __name__ == "__main__":
    main()
