"""Record what llama.cpp does with a GGUF, for tests that must agree with it without it.

llama.cpp is the reference for a GGUF: its tokenizer and its forward pass are what the file
was made for. It is a benchmark-only dependency (``pip install -e .[bench]`` compiles it,
about 10 minutes on 2 cores), never in CI, so the tests read a recording instead:
``tests/data/llamacpp_<name>.json`` holds llama.cpp's token ids for a fixed set of strings
(with and without special-token parsing) and its greedy completions of fixed prompts.

    python benchmarks/llamacpp_reference.py builtin:gemma3-270m [--tokens 16]

Re-run it after changing the strings or prompts below, or the model package.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Strings that exercise a SentencePiece vocabulary: spaces, runs of whitespace, tabs and
# newlines (user-defined pieces), accents, CJK, emoji (byte fallback), code, digits, and
# control pieces that only count when special tokens are parsed.
STRINGS = [
    "Water boils at a temperature of",
    "Hello  world\n\nfoo\tbar",
    " leading space and trailing space ",
    "naïve café, Zürich, São Paulo, Kraków",
    "東京は日本の首都です。",
    "emoji 😀👍🏽 and symbols ©®™ ≤ ≥ ∑",
    "def f(x):\n    return x ** 2  # square\n",
    "3.14159 + 2,718 = 5.85959; 1e-10",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "UPPER lower MiXeD snake_case camelCase kebab-case",
    "https://example.com/path?query=1&other=two#frag",
    "      indented\n\n\n\ttabbed\r\nwindows",
]
PROMPTS = [
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "The capital of France is",
    "The chemical symbol for gold is",
    "Once upon a time, there was a",
    "def add(a, b):\n    return",
]


def source_path(source: str) -> Path:
    if source.startswith("builtin:"):
        from exporters.sources import builtin_file

        return builtin_file(source.split(":", 1)[1])
    return Path(source)


def record(gguf: Path, tokens: int, threads: int) -> dict:
    from llama_cpp import Llama, __version__

    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, verbose=False, seed=0)
    tokenized = [
        {"text": text, "special": special,
         "ids": llm.tokenize(text.encode(), add_bos=True, special=special)}
        for text in STRINGS for special in (False, True)
    ]
    completions = []
    for prompt in PROMPTS:
        llm.reset()
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(out) == tokens:
                break
            out.append(token)
        completions.append({"prompt": prompt, "prompt_ids": ids, "ids": out,
                            "text": llm.detokenize(out).decode("utf-8", "replace")})
    return {"gguf": gguf.name, "llama_cpp_python": __version__, "machine": platform.machine(),
            "tokenized": tokenized, "greedy": completions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="builtin:NAME or a .gguf path")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="default: tests/data/llamacpp_<name>.json")
    args = ap.parse_args()
    gguf = source_path(args.source)
    name = args.source.split(":", 1)[1] if args.source.startswith("builtin:") else gguf.stem
    out = Path(args.out) if args.out else REPO / "tests" / "data" / f"llamacpp_{name}.json"
    data = record(gguf, args.tokens, args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    for item in data["greedy"]:
        print(f"{item['prompt']!r} -> {item['text']!r}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
