"""The pirate style adapter trained with LoRA or QLoRA on the embedded model: the fidelity measured at training
time next to its held-out hit rate (greedy answers in pirate voice, through PEFT) on nf4, int8 and none.

    python -m bench.fidelity --train lora --output runs/pirate-lora      # train (30 steps), then score
    python -m bench.fidelity --score runs/pirate-lora runs/pirate-qlora  # score adapters already trained
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.base import resolve_base
from core.precision import QUANTIZE
from tests.test_slow import HELDOUT, in_pirate_voice
from train import compare
from train.config import TrainArgs
from train.trainer import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "pirate.jsonl"


def score(folder: Path, prompts: list[str]) -> list[tuple[str, str, float | None, int]]:
    """(method, precision, measured fidelity, held-out answers in style) for each serving precision."""
    lineage = json.loads((folder / "lineage.json").read_text())
    rows = []
    for quantize in QUANTIZE:
        model, tokenizer = compare.load(resolve_base(None), folder, quantize)
        answers = compare.answer(model, tokenizer, prompts, max_new_tokens=40)
        share = lineage["fidelity"]["precisions"][quantize].get("fidelity")
        rows.append((lineage["method"], quantize, share, sum(in_pirate_voice(a) for a in answers)))
        print(rows[-1], answers, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", choices=["lora", "qlora"], help="train this way first (into --output)")
    parser.add_argument("--output", type=Path, default=Path("runs/pirate-fidelity"))
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=5, help="held-out prompts answered per precision")
    parser.add_argument("--score", type=Path, nargs="*", default=[], help="adapter folders to score")
    options = parser.parse_args()
    folders = list(options.score)
    if options.train:
        args = TrainArgs(
            name="pirate", data=DATA, qlora=options.train == "qlora", max_steps=options.max_steps, lr=1e-3,
            batch_size=8, seq_len=256, output=options.output, overwrite=True,
        )  # fmt: skip
        train(args, echo=print)
        folders.append(options.output)
    prompts = HELDOUT[: options.prompts]
    rows = [row for folder in folders for row in score(folder, prompts)]
    print("\n| trained | served on | measured fidelity | held-out in style |\n|---|---|---|---|")
    for method, quantize, share, hits in rows:
        print(f"| {method} | {quantize} | {'n/a' if share is None else f'{share:.0%}'} | {hits}/{len(prompts)} |")


if __name__ == "__main__":
    main()
