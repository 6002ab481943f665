"""The demo: train a pirate-voice LoRA adapter on the embedded SmolLM2-135M-Instruct, then compare answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = Path(sys.executable).with_name("adapters")  # the console script installed beside this Python
COLUMN = 46


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(*args: str) -> None:
    print("$ adapters " + " ".join(args), flush=True)
    subprocess.run([str(ADAPTERS), *args], check=True, cwd=ROOT)


def _columns(left: str, right: str) -> str:
    """Two answers side by side, wrapped to fixed-width columns."""
    lefts, rights = textwrap.wrap(left, COLUMN) or [""], textwrap.wrap(right, COLUMN) or [""]
    height = max(len(lefts), len(rights))
    lefts += [""] * (height - len(lefts))
    rights += [""] * (height - len(rights))
    return "\n".join(f"  {a:<{COLUMN}} | {b}" for a, b in zip(lefts, rights))


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="adapters-demo-"))
    adapter = work / "pirate"
    try:
        _step("1. The embedded base model (converted from its GGUF once, then cached)")
        _run("models", "prepare")

        _step("2. Train a LoRA adapter on examples/pirate.jsonl (one epoch)")
        _run(
            "train",
            "pirate",
            "--data",
            "examples/pirate.jsonl",
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--batch-size",
            "8",
            "--seq-len",
            "256",
            "--output",
            str(adapter),
        )
        print(f"\nFiles: {', '.join(sorted(p.name for p in adapter.iterdir()))}")

        _step("3. Held-out questions: base model vs base + adapter (greedy)")
        from train import compare
        from train.base import resolve_base

        model, tokenizer = compare.load(resolve_base(None), adapter)
        questions = (ROOT / "examples" / "pirate_heldout.txt").read_text().splitlines()[:4]
        for question, (plain, pirate) in zip(questions, compare.side_by_side(model, tokenizer, questions, 64)):
            print(f"\nQ: {question}")
            print(_columns("base", "pirate adapter"))
            print(_columns("-" * 4, "-" * 14))
            print(_columns(plain, pirate))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
