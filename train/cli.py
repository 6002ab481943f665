"""`adapters train` and `adapters models`: heavy libraries are imported only when a command runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from train.config import TrainArgs

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainArgs)}


def _mb(count: int) -> str:
    return f"{count / 2**20:,.1f} MB"


@click.command()
@click.argument("name")
@click.option(
    "--data", required=True, type=click.Path(path_type=Path), help="JSONL: chat, prompt/completion or Alpaca."
)
@click.option("--base", help="Local HF model folder or Hub id. Default: the embedded SmolLM2-135M-Instruct.")
@click.option("--qlora", is_flag=True, help="Load the base in 4-bit NF4 (double quantization) to save memory.")
@click.option("--rank", type=int, default=_DEFAULTS["rank"], show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=int, default=_DEFAULTS["alpha"], show_default=True, help="LoRA alpha.")
@click.option("--dropout", type=float, default=_DEFAULTS["dropout"], show_default=True, help="LoRA dropout.")
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated module names.")
@click.option("--epochs", type=float, default=_DEFAULTS["epochs"], show_default=True, help="Passes over the data.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=_DEFAULTS["lr"], show_default=True, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=_DEFAULTS["batch_size"], show_default=True, help="Examples per step.")
@click.option("--grad-accum", type=int, default=_DEFAULTS["grad_accum"], show_default=True, help="Batches per step.")
@click.option("--seq-len", type=int, default=_DEFAULTS["seq_len"], show_default=True, help="Max tokens per example.")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True, help="Seed for split, init, order.")
@click.option(
    "--eval-fraction",
    type=float,
    default=_DEFAULTS["eval_fraction"],
    show_default=True,
    help="Share held out for eval loss.",
)
@click.option(
    "--save-steps", type=int, default=_DEFAULTS["save_steps"], show_default=True, help="Checkpoint every N steps."
)
@click.option("--gradient-checkpointing", is_flag=True, help="Trade speed for activation memory.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output folder. Default: runs/NAME.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder or interrupted run.")
@click.option("--no-register", is_flag=True, help="Inside an adapter repository, do not register the result.")
@click.option("-m", "--message", help="Message for the registered version.")
def train(name: str, target_modules: str, no_register: bool, message: str | None, **options: Any) -> None:
    """Train a LoRA adapter NAME on a JSONL dataset; re-run after an interruption to resume.

    Inside an adapter repository the result is registered as the next version of NAME.
    """
    args = TrainArgs(name=name, target_modules=[m.strip() for m in target_modules.split(",") if m.strip()], **options)
    from registry.repo import Registry

    registry = None if no_register else Registry.around(Path.cwd())
    from train.trainer import train as run_training

    result = run_training(args, echo=click.echo)
    click.echo(
        f"Adapter {name!r} written to {result.output} in {result.steps} steps ({result.seconds:.0f} s): "
        f"adapter size {_mb(result.adapter_bytes)}, peak memory {_mb(result.peak_memory_bytes)}."
    )
    if registry:
        version = registry.add(name, result.output, message=message)
        click.echo(f"Registered {version.ref} in {registry.root}.")


@click.group()
def models() -> None:
    """Base models in the local cache."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_models(as_json: bool) -> None:
    """List cached base models with their size and fingerprint."""
    from train.base import cached_models, models_dir

    found = cached_models()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"No base models cached in {models_dir()}; `adapters models prepare` converts the embedded one.")
        return
    for model in found:
        click.echo(f"{model['name']:<40} {_mb(model['size_bytes']):>10}  {model['fingerprint'][:19]}  {model['path']}")


@models.command("prepare")
@click.argument("base", required=False)
def prepare(base: str | None) -> None:
    """Convert the embedded base model (or fetch BASE) into the cache now instead of on first use."""
    from train.base import fingerprint, resolve_base

    model = resolve_base(base)
    click.echo(f"{model.name}: {model.path} ({fingerprint(model.path)})")
