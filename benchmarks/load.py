"""Load time of SmolLM2-135M-Instruct: lmforge vs transformers' from_pretrained, in one run.

    python benchmarks/load.py                # 3 repetitions per case
    python benchmarks/load.py --reps 5 --json load.json

Cases (each load is timed in a fresh Python process, after its imports, until an fp32 model in eval mode):
  gguf, first load   lmforge.io.load_model(<the Q4_1 .gguf>) with an empty cache (a new LMFORGE_CACHE
                     folder every repetition): parse, dequantize, write the cache entry, build the model,
                     vs AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
  gguf, cached       the same lmforge call once the cache entry exists, vs the same transformers call
  hf folder          lmforge.io.load_model(folder) vs AutoModelForCausalLM.from_pretrained(folder), where
                     the folder is the model saved once with lmforge.io.save_model (config.json +
                     model.safetensors)
Transformers has no GGUF cache: both GGUF rows compare against the same transformers loads. Repetitions are
interleaved so that noise from other processes spreads over every case. Prints medians and the speed-up
(transformers time / lmforge time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# measurement -> (library, source kind, lmforge cache state)
LOADS = {"lmforge gguf first": ("lmforge", "gguf", "empty"),
         "lmforge gguf cached": ("lmforge", "gguf", "warm"),
         "lmforge folder": ("lmforge", "folder", "warm"),
         "transformers gguf": ("transformers", "gguf", "warm"),
         "transformers folder": ("transformers", "folder", "warm")}
# table row -> (lmforge measurement, transformers measurement); transformers has no GGUF cache, so both GGUF
# rows compare against the same transformers loads
ROWS = {"gguf, first load": ("lmforge gguf first", "transformers gguf"),
        "gguf, cached": ("lmforge gguf cached", "transformers gguf"),
        "hf folder": ("lmforge folder", "transformers folder")}


def time_one(library: str, source: str, gguf_file: str | None, threads: int) -> float:
    """Runs in the worker process: seconds for one load by `library`, imports excluded."""
    import torch

    torch.set_num_threads(threads)
    if library == "lmforge":
        from lmforge.io import load_model

        start = time.perf_counter()
        model = load_model(source, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32).eval()
    elapsed = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.float32
    return elapsed


def run_worker(library: str, source: Path, gguf_file: str | None, cache: Path, threads: int) -> float:
    """One timed load in a fresh process with LMFORGE_CACHE=cache."""
    cmd = [sys.executable, __file__, "--worker", library, "--source", str(source), "--threads", str(threads)]
    if gguf_file:
        cmd += ["--gguf-file", gguf_file]
    env = dict(os.environ, LMFORGE_CACHE=str(cache))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed loads per case and library (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each worker (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["lmforge", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--gguf-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(time_one(args.worker, args.source, args.gguf_file, args.threads))
        return
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")

    from lmforge.io import load_model, save_model
    from lmforge.registry import packaged_path

    gguf_path = packaged_path("smollm2-135m-instruct")
    times: dict[str, list[float]] = {name: [] for name in LOADS}
    with tempfile.TemporaryDirectory(prefix="lmforge-load-bench-") as tmp:
        work = Path(tmp)
        warm_cache = work / "cache-warm"
        os.environ["LMFORGE_CACHE"] = str(warm_cache)
        folder = work / "smollm2-hf"
        save_model(load_model(gguf_path), folder)  # also fills the warm cache
        print(f"GGUF: {gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB); HF folder: "
              f"{sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.0f} MiB; {args.reps} reps, "
              f"{args.threads} threads", flush=True)
        for rep in range(args.reps):
            for name, (library, kind, cache_state) in LOADS.items():
                cache = work / f"cache-empty-{rep}" if cache_state == "empty" else warm_cache
                if kind == "folder":
                    seconds = run_worker(library, folder, None, cache, args.threads)
                elif library == "lmforge":
                    seconds = run_worker(library, gguf_path, None, cache, args.threads)
                else:
                    seconds = run_worker(library, gguf_path.parent, gguf_path.name, cache, args.threads)
                times[name].append(seconds)
                print(f"  rep {rep + 1}  {name:<22}{seconds:7.2f} s", flush=True)

    print(f"\n{'case':<18}{'lmforge (s)':>13}{'transformers (s)':>18}{'speed-up':>10}")
    rows = []
    for row, (lm_name, tf_name) in ROWS.items():
        lm, tf = statistics.median(times[lm_name]), statistics.median(times[tf_name])
        rows.append({"case": row, "lmforge_s": lm, "transformers_s": tf, "speedup": tf / lm,
                     "lmforge_all": times[lm_name], "transformers_all": times[tf_name]})
        print(f"{row:<18}{lm:>13.2f}{tf:>18.2f}{tf / lm:>9.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
