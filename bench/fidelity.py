"""The pirate style adapter trained with LoRA or QLoRA on the embedded model: the fidelity measured at training
time next to its held-out hit rate (greedy answers in pirate voice, through PEFT) on nf4, int8 and none.

    python -m bench.fidelity --train lora --output runs/pirate-lora      # train (the default schedule), then score
    python -m bench.fidelity --train qlora --output runs/pirate-short --max-steps 30 --lr 1e-3 --batch-size 8 \\
        --seq-len 256                                                     # a short, hot schedule
    python -m bench.fidelity --score runs/pirate-lora runs/pirate-qlora  # score adapters already trained
    python -m bench.fidelity --sweep runs/pirate-lora                    # effect kept vs hit rate, adapter weakened

The sweep calibrates the server's LOW threshold: it scales the adapter's update down (PEFT's set_scale) on the
precision it was trained against, so a known share of its effect is left, and records what the fidelity measure
reads then next to the held-out hit rate. A training run stopped half-way resumes when run again; to train
again from the start, remove --output first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peft.tuners.lora import LoraLayer
from transformers import AutoTokenizer

from adapterctl.core.base import resolve_base
from adapterctl.core.precision import QUANTIZE, Precision
from adapterctl.train import compare, data, fidelity
from adapterctl.train.config import TrainArgs
from adapterctl.train.trainer import tokenized_splits, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pirate import HELDOUT, in_pirate_voice  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "pirate.jsonl"
DEFAULTS = TrainArgs(name="pirate", data=DATA)  # the schedule `adapters train` uses unless told otherwise


def score(folder: Path, prompts: list[str]) -> list[dict]:
    """Per serving precision: the fidelity recorded at training time and the held-out answers in style."""
    lineage = json.loads((folder / "lineage.json").read_text())
    hyper = lineage["hyperparameters"]
    schedule = (
        f"lr {hyper['lr']:g}, "
        + (f"{hyper['max_steps']} steps" if hyper["max_steps"] else f"{hyper['epochs']:g} epochs")
        + f", batch {hyper['batch_size']}"
    )
    rows = []
    for quantize in QUANTIZE:
        model, tokenizer = compare.load(resolve_base(None), folder, quantize)
        answers = compare.answer(model, tokenizer, prompts, max_new_tokens=40)
        del model
        hits = [in_pirate_voice(a) for a in answers]
        figures = lineage["fidelity"]["precisions"][quantize]
        rows.append({
            "adapter": str(folder), "method": lineage["method"], "schedule": schedule,
            "steps": lineage["metrics"]["steps"], "quantize": quantize, "fidelity": figures.get("fidelity"),
            "hits": sum(hits), "prompts": len(prompts), "hits_first5": sum(hits[:5]), "answers": answers,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sweep(folder: Path, prompts: list[str], strengths: list[float]) -> list[dict]:
    """Per strength of the adapter's update on its own precision: the fidelity measure reads then, and the hits."""
    lineage = json.loads((folder / "lineage.json").read_text())
    hyper, base = lineage["hyperparameters"], resolve_base(None)
    args = TrainArgs(name="pirate", data=DATA, seq_len=hyper["seq_len"], seed=hyper["seed"])
    _, eval_set = tokenized_splits(data.load(DATA), AutoTokenizer.from_pretrained(base.path), args)
    examples = eval_set[: lineage["fidelity"]["eval_examples"]]
    quantize = Precision.from_lineage(lineage["precision"]).quantize
    model, tokenizer = compare.load(base, folder, quantize)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    base_loss, full_loss = fidelity.losses(model, examples)
    rows = []
    for strength in strengths:
        for layer in layers:
            layer.set_scale("default", strength)
        _, loss = fidelity.losses(model, examples)
        hits = [in_pirate_voice(a) for a in compare.answer(model, tokenizer, prompts, max_new_tokens=40)]
        rows.append({
            "adapter": str(folder), "quantize": quantize, "strength": strength,
            "fidelity": round((base_loss - loss) / (base_loss - full_loss), 3),
            "hits": sum(hits), "prompts": len(prompts),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", choices=["lora", "qlora"], help="train this way first (into --output)")
    parser.add_argument("--output", type=Path, default=Path("runs/pirate-fidelity"))
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--epochs", type=float, default=DEFAULTS.epochs)
    parser.add_argument("--max-steps", type=int, default=DEFAULTS.max_steps, help="overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--prompts", type=int, default=len(HELDOUT), help="held-out prompts answered per precision")
    parser.add_argument("--score", type=Path, nargs="*", default=[], help="adapter folders to score")
    parser.add_argument("--sweep", type=Path, nargs="*", default=[], help="adapter folders to weaken step by step")
    parser.add_argument("--strengths", type=float, nargs="*", default=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    parser.add_argument("--json", type=Path, help="also write the rows (answers included) to this file")
    options = parser.parse_args()
    folders = list(options.score)
    if options.train:
        args = TrainArgs(
            name="pirate", data=DATA, qlora=options.train == "qlora", lr=options.lr, epochs=options.epochs,
            max_steps=options.max_steps, batch_size=options.batch_size, seq_len=options.seq_len, seed=options.seed,
            output=options.output,
        )  # fmt: skip
        train(args, echo=print)
        folders.append(options.output)
    prompts = HELDOUT[: options.prompts]
    if options.sweep:
        rows = [row for folder in options.sweep for row in sweep(folder, prompts, options.strengths)]
        if options.json:
            options.json.write_text(json.dumps(rows, indent=1) + "\n")
        print("\n| adapter | strength | fidelity | held-out in style |\n|---|---|---|---|")
        for r in rows:
            print(
                f"| {Path(r['adapter']).name} | {r['strength']:g} | {r['fidelity']:.0%} | {r['hits']}/{r['prompts']} |"
            )
        return
    rows = [row for folder in folders for row in score(folder, prompts)]
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| trained | schedule | served on | measured fidelity | held-out in style | first 5 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = "n/a" if r["fidelity"] is None else f"{r['fidelity']:.0%}"
        print(
            f"| {r['method']} | {r['schedule']} | {r['quantize']} | {share} | {r['hits']}/{r['prompts']} "
            f"| {r['hits_first5']}/{min(5, r['prompts'])} |"
        )


if __name__ == "__main__":
    main()
