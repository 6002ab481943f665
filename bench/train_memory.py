"""Peak memory and step time of full fine-tuning vs LoRA vs QLoRA on the embedded base model, side by side.

Usage: python -m bench.train_memory [--steps 6] [--batch-size 8] [--seq-len 256] [--quick] [--methods lora,qlora]
                                    [--base PATH] [--json out.json]

Each method trains in its own process, so its peak RSS is its own. "before" rows train as `adapters train` did
before the loss was chunked (LoRA dropout 0.05, the model's own loss over full logits, activations kept); LoRA and
QLoRA rows train as it does by default (gradient checkpointing from 1,024 tokens per batch), "activations kept" rows
the same without checkpointing; the busy row trains LoRA beside one Python busy loop the bench starts, to show how
training shares a machine. Full fine-tuning keeps its activations. Every row gives the C heap back after each step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on sys.path, where bench/registry.py shadows the registry package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
DATA = ROOT / "examples" / "pirate.jsonl"
METHODS = {
    "full": "full fine-tune (full logits)",
    "lora-before": "LoRA, before",
    "lora": "LoRA",
    "qlora-before": "QLoRA (NF4), before",
    "qlora": "QLoRA (NF4)",
    "lora-keep": "LoRA, activations kept",
    "qlora-keep": "QLoRA (NF4), activations kept",
    "lora-busy": "LoRA, 1 busy process beside",
}
QUICK = {"steps": 3, "batch_size": 2, "seq_len": 64}
BUSY_LOOP = "while True: pass"
# What each row's time per step is compared with: the same method before the change, or without the extra.
REFERENCE = {
    "lora": "lora-before",
    "qlora": "qlora-before",
    "lora-keep": "lora",
    "qlora-keep": "qlora",
    "lora-busy": "lora",
}
MB = 1024 * 1024


def measure(method: str, steps: int, batch_size: int, seq_len: int, base_name: str | None) -> dict[str, Any]:
    """Train `steps` optimizer steps with one method in this process and report what it cost."""
    from adapterctl.core.threads import configure_openmp

    configure_openmp()  # as `adapters train` does, before torch loads
    # Imported here, in the child only: the parent stays light and quiet (bitsandbytes warns on import).
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from adapterctl.core.base import resolve_base
    from adapterctl.core.memory import resident_bytes
    from adapterctl.train import data
    from adapterctl.train.config import TrainArgs
    from adapterctl.train.trainer import (
        add_lora,
        build_trainer,
        device,
        load_base_model,
        peak_memory_bytes,
        tokenized_splits,
    )

    class StepClock(TrainerCallback):
        """Timestamps the end of every optimizer step."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    before = method.endswith("-before")
    args = TrainArgs(
        name=f"bench-{method}",
        data=DATA,
        base=base_name,
        qlora=method.startswith("qlora"),
        gradient_checkpointing=None if method in ("lora", "qlora", "lora-busy") else False,  # None: as by default
        dropout=0.05 if before else 0.0,
        max_steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        save_steps=10**9,
    )
    base = resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    train_set, eval_set = tokenized_splits(data.load(args.data), tokenizer, args)

    torch.manual_seed(args.seed)
    model = load_base_model(base, args.qlora, args.gradient_checkpointing)
    if method == "full":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    else:
        model = add_lora(model, args, base)
        trainable, total = model.get_nb_trainable_parameters()
    load_rss = resident_bytes()

    clock = StepClock()
    with tempfile.TemporaryDirectory() as checkpoints:
        plain = before or method == "full"
        trainer = build_trainer(model, tokenizer, train_set, eval_set, args, Path(checkpoints), plain_loss=plain)
        trainer.add_callback(clock)
        result = trainer.train()
    gaps = [end - start for start, end in zip(clock.ends, clock.ends[1:])]  # drops the warm-up step
    return {
        "method": method,
        "base": base.name,
        "device": device(),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "load_rss_mb": load_rss / MB,
        "peak_rss_mb": peak_memory_bytes() / MB,
        "s_per_step": sum(gaps) / len(gaps),
        "step_seconds": gaps,
        "threads_at_end": torch.get_num_threads(),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
    }


def run_child(method: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in a fresh interpreter, so its peak RSS is its own; the busy row beside a busy loop."""
    command = [sys.executable, "-m", "bench.train_memory", "--method", method, "--steps", str(opts.steps),
               "--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len)]  # fmt: skip
    if opts.base:
        command += ["--base", opts.base]
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if method.endswith("-busy") else None
    try:
        child = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    finally:
        if busy:
            busy.kill()
            busy.wait()
    if child.returncode != 0:
        tail = "\n".join(child.stderr.splitlines()[-40:])
        sys.exit(f"{METHODS[method]} failed (exit {child.returncode}); last lines of its stderr:\n{tail}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    """Results as an aligned text table; memory and time over full fine-tuning's and over each row's reference."""
    found = {r["method"]: r for r in results}
    full = found.get("full")
    header = ["method", "trainable params", "load RSS MB", "peak RSS MB", "peak / full", "s/step", "s/step / full",
              "s/step / reference"]  # fmt: skip
    rows = [header]
    for r in results:
        reference = found.get(REFERENCE.get(r["method"], ""))
        rows.append(
            [
                METHODS[r["method"]],
                f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%)",
                f"{r['load_rss_mb']:,.0f}",
                f"{r['peak_rss_mb']:,.0f}",
                f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x" if full else "-",
                f"{r['s_per_step']:.2f}",
                f"{r['s_per_step'] / full['s_per_step']:.2f}x" if full else "-",
                f"{r['s_per_step'] / reference['s_per_step']:.2f}x ({METHODS[reference['method']]})"
                if reference
                else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per method (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example at most")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 steps of batch 2 x 64 tokens")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--base", help="base model folder; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--json", type=Path, help="also write the settings and results to this file")
    parser.add_argument("--method", choices=METHODS, help="internal: measure one method, print one JSON line")
    opts = parser.parse_args()
    if opts.quick:
        vars(opts).update(QUICK)
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if opts.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up and is not timed)")
    if opts.method:
        print(json.dumps(measure(opts.method, opts.steps, opts.batch_size, opts.seq_len, opts.base)))
        return

    results = []
    for method in methods:
        print(f"measuring {METHODS[method]} ...", flush=True)
        results.append(run_child(method, opts))
    print(
        f"\n{results[0]['base']} on {results[0]['device']}: batch {opts.batch_size}, "
        f"seq-len {opts.seq_len}, {opts.steps} steps each (s/step over steps 2-{opts.steps}); "
        f"'before': LoRA dropout 0.05 and the loss over full logits, as `adapters train` trained until now\n"
    )
    print(table(results))
    if opts.json:
        settings = {"steps": opts.steps, "batch_size": opts.batch_size, "seq_len": opts.seq_len}
        opts.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
