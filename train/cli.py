"""`adapters train` and `adapters models`: heavy libraries are imported only when a command runs."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import inspect
import json
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adapterctl.core.precision import QUANTIZE
from adapterctl.train.config import TrainArgs

# Options that are not plain values of TrainArgs: short names, and a list typed as one comma-separated string.
_SHORT = {"output": "-o"}
_LISTS = {"target_modules"}


def _field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string under it in the class body): written once, the CLI's help."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: after.value.value
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per TrainArgs field but the name, typed and documented as the field is."""
    docs, hints = _field_docs(TrainArgs), typing.get_type_hints(TrainArgs)
    for spec in reversed(dataclasses.fields(TrainArgs)[1:]):
        flag = f"--{spec.name.replace('_', '-')}"
        names = [flag, _SHORT[spec.name]] if spec.name in _SHORT else [flag]
        help_text = docs[spec.name]
        kind = hints[spec.name]
        if spec.name in _LISTS:
            option = click.option(*names, default=",".join(spec.default_factory()), show_default=True, help=help_text)
        elif kind is bool and spec.default:
            option = click.option(f"{flag}/--no-{flag[2:]}", default=True, show_default=True, help=help_text)
        elif kind == bool | None:  # on, off, or decided from the other options when neither is given
            option = click.option(f"{flag}/--no-{flag[2:]}", default=None, help=help_text)
        elif kind is bool:
            option = click.option(*names, is_flag=True, help=help_text)
        elif spec.default is dataclasses.MISSING:
            option = click.option(*names, required=True, type=click.Path(path_type=Path), help=help_text)
        else:
            value = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            value = click.Path(path_type=Path) if value is Path else value
            option = click.option(
                *names, type=value, default=spec.default, show_default=spec.default is not None, help=help_text
            )
        command = option(command)
    return command


def _mb(count: int) -> str:
    return f"{count / 2**20:,.1f} MB"


@click.command()
@click.argument("name")
@_options
@click.option("--no-register", is_flag=True, help="Inside an adapter repository, do not register the result.")
@click.option("-m", "--message", help="Message for the registered version.")
def train(name: str, target_modules: str, no_register: bool, message: str | None, **options: Any) -> None:
    """Train a LoRA adapter NAME on a JSONL dataset; re-run after an interruption to resume.

    Inside an adapter repository the result is registered as the next version of NAME.
    """
    args = TrainArgs(name=name, target_modules=[m.strip() for m in target_modules.split(",") if m.strip()], **options)
    from adapterctl.core.threads import configure_openmp

    configure_openmp()  # before torch loads: idle OpenMP threads sleep soon instead of spinning on shared cores
    from adapterctl.registry.repo import Registry
    from adapterctl.train.distributed import rank
    from adapterctl.train.trainer import train as run_training

    # Under torchrun or accelerate launch every process runs this command; rank 0 alone touches the registry.
    registry = None if no_register or rank() != 0 else Registry.around(Path.cwd())
    output = args.output
    if registry and not args.overwrite and output.is_dir() and any(output.iterdir()):
        # The last run's folder is in the way of the next version; once registered it is safe in the
        # registry and can go. An unregistered run is never deleted: training refuses as before.
        held = registry.registered_as(name, output)
        if held:
            shutil.rmtree(output)
            click.echo(f"{output} held {held.ref}, already registered; training the next version there.")
    result = run_training(args, echo=click.echo)
    if result is None:
        return
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
    from adapterctl.core.base import cached_models, models_dir

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
    from adapterctl.core.base import fingerprint, resolve_base

    model = resolve_base(base)
    click.echo(f"{model.name}: {model.path} ({fingerprint(model.path)})")


@click.command("eval")
@click.argument("ref")
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE),
    help="Base precision to check the adapter on. Default: what `adapters serve` loads (nf4 where bitsandbytes runs).",
)
@click.option(
    "--data",
    "dataset",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL dataset. Default: the adapter's training file (by name, here or at the repository root, its sha256 "
    "checked), of which its eval split is scored.",
)
@click.option("--base", help="Base model. Default: the embedded SmolLM2-135M-Instruct.")
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="Examples scored.")
@click.option(
    "--samples", type=click.IntRange(min=0), default=3, show_default=True, help="Prompts answered side by side."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Per answer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(
    ref: str,
    quantize: str | None,
    dataset: Path | None,
    base: str | None,
    limit: int,
    samples: int,
    max_new_tokens: int,
    as_json: bool,
) -> None:
    """Eval loss and greedy answers of base vs adapter REF on the base precision you will serve it on."""
    from adapterctl.core.precision import default_quantize
    from adapterctl.registry.repo import Registry

    registry = Registry.find()
    from adapterctl.train.fidelity import evaluate as run_eval

    result = run_eval(registry, ref, quantize or default_quantize(), dataset, base, limit, samples, max_new_tokens)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    data = result["dataset"]
    recorded = result["recorded_fidelity"]
    click.echo(
        f"{result['ref']} (trained against {result['trained_precision']}) on a {result['quantize']} base, "
        f"{data['examples']} examples ({data['split']}) of {data['file']}:"
    )
    click.echo(
        f"  eval loss: base {result['base_loss']:.4f}, adapter {result['adapter_loss']:.4f} "
        f"(improvement {result['improvement']:.4f}); recorded fidelity on {result['quantize']}: "
        + ("n/a" if recorded is None else f"{recorded:.0%}")
    )
    for sample in result["samples"]:
        click.echo(f"\nQ: {sample['prompt']}\n  base:    {sample['base']}\n  adapter: {sample['adapter']}")
