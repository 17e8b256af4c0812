"""Convert openai-whisper's gpt2.tiktoken ranks into GPT-2's vocab.json, merges.txt, tokenizer_config.json.

    .venv/bin/python scripts/convert_gpt2_tiktoken.py [OUT_DIR] [--tiktoken FILE]

Defaults: the ranks packaged with openai-whisper and lmforge's cache ($LMFORGE_CACHE or ~/.cache/lmforge,
under tokenizers/gpt2), which is where `Tokenizer.from_name("gpt2")` looks. The work is done by
`lmforge.tokenizer.convert_gpt2_tiktoken`.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.tokenizer import convert_gpt2_tiktoken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output folder (default: the lmforge cache)")
    parser.add_argument("--tiktoken", help="a .tiktoken ranks file (default: whisper's assets/gpt2.tiktoken)")
    args = parser.parse_args(argv)
    out = convert_gpt2_tiktoken(args.out_dir, args.tiktoken)
    print(f"wrote {out / 'vocab.json'}, {out / 'merges.txt'}, {out / 'tokenizer_config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
