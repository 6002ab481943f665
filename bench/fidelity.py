"""Train the pirate style adapter with LoRA and with QLoRA on the embedded model; for each, the fidelity measured
at training time next to its held-out hit rate (answers in pirate voice, greedy, PEFT) on nf4, int8 and none."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from core.base import resolve_base
from core.precision import QUANTIZE
from tests.test_slow import HELDOUT, in_pirate_voice
from train import compare
from train.config import TrainArgs
from train.trainer import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "pirate.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts answered per precision")
    options = parser.parse_args()
    base = resolve_base(None)
    prompts = HELDOUT[: options.prompts]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for qlora in (False, True):
            args = TrainArgs(
                name="pirate", data=DATA, qlora=qlora, max_steps=options.max_steps, lr=1e-3, batch_size=8,
                seq_len=256, output=Path(work) / f"pirate-{'qlora' if qlora else 'lora'}",
            )  # fmt: skip
            train(args, echo=print)
            record = json.loads((args.output / "lineage.json").read_text())["fidelity"]
            for quantize in QUANTIZE:
                model, tokenizer = compare.load(base, args.output, quantize)
                answers = compare.answer(model, tokenizer, prompts, max_new_tokens=40)
                hits = sum(in_pirate_voice(a) for a in answers)
                share = record["precisions"][quantize].get("fidelity")
                rows.append(("qlora" if qlora else "lora", quantize, share, hits, len(prompts)))
                print(rows[-1], answers[:2], flush=True)
    print("\n| trained | served on | measured fidelity | held-out in style |\n|---|---|---|---|")
    for method, quantize, share, hits, total in rows:
        print(f"| {method} | {quantize} | {'n/a' if share is None else f'{share:.0%}'} | {hits}/{total} |")


if __name__ == "__main__":
    main()
