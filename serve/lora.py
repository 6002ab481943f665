"""Many LoRA adapters applied in one forward pass: each batch row gets its own adapter's low-rank update."""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from serve.errors import AdapterRejected

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# PEFT saves "base_model.model.<module path>.lora_A.weight" (the adapter name is dropped on save).
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt")
_STACKS = 4  # adapter sets kept stacked per layer: the running batch, new prompts, and a little slack


@dataclass(frozen=True)
class Plan:
    """How one forward pass's token rows map onto the stacked adapters: G groups padded to M rows each."""

    keys: tuple[str, ...]  # the adapters of this pass, in stack order
    groups: int
    size: int  # M: rows per group after padding
    gather: torch.Tensor | None  # padded layout -> token row; None when the input already is that layout
    scatter: torch.Tensor | None  # real rows' places in the padded layout; None without padding
    dest: torch.Tensor | None  # token row of each real row, when some rows use no adapter; else None
    inverse: torch.Tensor | None  # layout place of each token row, when every row uses an adapter


def plan(keys: list[str | None], tokens: int) -> Plan | None:
    """The plan for a pass whose row i (of TOKENS tokens each) uses adapter KEYS[i] (None: the base)."""
    by_key: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        if key is not None:
            by_key.setdefault(key, []).append(row)
    if not by_key:
        return None
    size = max(len(rows) for rows in by_key.values()) * tokens
    layout, real = [], []
    for group, rows in enumerate(by_key.values()):
        token_rows = [row * tokens + t for row in rows for t in range(tokens)]
        real.extend(range(group * size, group * size + len(token_rows)))
        layout.extend(token_rows + [token_rows[0]] * (size - len(token_rows)))  # padding repeats a real row
    total = len(keys) * tokens
    ordered = [layout[place] for place in real]  # token row of each real row, in layout order
    in_order = layout == list(range(total))
    everyone = len(ordered) == total
    inverse = None
    if everyone and not in_order:
        inverse = torch.empty(total, dtype=torch.long)
        inverse[torch.tensor(ordered)] = torch.arange(total)
    return Plan(
        keys=tuple(by_key),
        groups=len(by_key),
        size=size,
        gather=None if in_order else torch.tensor(layout),
        scatter=None if len(real) == len(layout) else torch.tensor(real),
        dest=None if everyone else torch.tensor(ordered),
        inverse=inverse,
    )


@dataclass
class Rows:
    """The current pass's plan, shared by every LoRA layer of the model."""

    plan: Plan | None = None


class MultiLoRALinear(nn.Module):
    """A base linear layer plus any number of loaded LoRA pairs; one pass applies each row's own pair.

    The pairs of a pass's adapters are stacked (rank padded with zeros) so that two batched matmuls
    cover every adapter at once; stacks are kept per set of adapters, since a batch keeps its set for many steps.
    """

    def __init__(self, base: nn.Module, rows: Rows) -> None:
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (A^T, scaling * B^T)
        self.stacks: OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        plan = self.rows.plan
        if plan is None:
            return result
        a, b = self._stack(plan.keys)
        flat = x.reshape(-1, x.shape[-1]).to(a.dtype)
        if plan.gather is not None:
            flat = flat.index_select(0, plan.gather)
        update = torch.bmm(torch.bmm(flat.view(plan.groups, plan.size, -1), a), b).view(-1, b.shape[-1])
        if plan.scatter is not None:
            update = update.index_select(0, plan.scatter)
        out = result.view(-1, result.shape[-1])
        if plan.dest is not None:
            out.index_add_(0, plan.dest, update.to(out.dtype))
        else:
            out += (update if plan.inverse is None else update.index_select(0, plan.inverse)).to(out.dtype)
        return result

    def _stack(self, keys: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, in, R) and (G, R, out) stacks of KEYS' pairs; an adapter that skips this layer adds zeros."""
        stack = self.stacks.get(keys)
        if stack is None:
            d_in, d_out = self.base_layer.in_features, self.base_layer.out_features
            pairs = [self.pairs.get(key) for key in keys]
            rank = max((p[0].shape[1] for p in pairs if p is not None), default=1)
            a = torch.zeros(len(keys), d_in, rank)
            b = torch.zeros(len(keys), rank, d_out)
            for i, pair in enumerate(pairs):
                if pair is not None:
                    a[i, :, : pair[0].shape[1]] = pair[0]
                    b[i, : pair[1].shape[0]] = pair[1]
            stack = self.stacks[keys] = (a, b)
            while len(self.stacks) > _STACKS:
                self.stacks.popitem(last=False)
        self.stacks.move_to_end(keys)
        return stack


@dataclass
class AdapterWeights:
    """One adapter's LoRA pairs read from disk, keyed by the module path they modify."""

    key: str
    rank: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A^T, scaling * B^T)


def wrap_linears(model: nn.Module, rows: Rows) -> dict[str, MultiLoRALinear]:
    """Put every linear layer of the decoder blocks behind a MultiLoRALinear; returns them by module path."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in _LINEAR_TYPES and ".layers." in f".{name}"
    ]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        layer = MultiLoRALinear(module, rows)
        setattr(model.get_submodule(parent_name), child, layer)
        wrapped[name] = layer
    return wrapped


def read_adapter(key: str, folder: Path, layers: dict[str, MultiLoRALinear], max_rank: int) -> AdapterWeights:
    """Read a PEFT LoRA adapter folder and check that every pair fits the model's layers."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"{key}: unreadable {CONFIG} ({exc}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterRejected(f"{key}: peft_type {config.get('peft_type')} is not served; only LoRA adapters are.")
    unsupported = [f"{o}={config[o]!r}" for o in ("use_dora", "modules_to_save") if config.get(o)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise AdapterRejected(f"{key}: LoRA options {', '.join(unsupported)} are not supported by the server.")
    rank = int(config.get("r", 0))
    if rank > max_rank:
        raise AdapterRejected(f"{key}: rank {rank} is above this server's maximum rank {max_rank}.")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if not (folder / WEIGHTS).is_file():
        raise AdapterRejected(f"{key}: no {WEIGHTS}; the server loads safetensors weights only.")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(folder / WEIGHTS, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open has no __iter__
                match = _KEY.match(name)
                if not match:
                    raise AdapterRejected(f"{key}: tensor {name} is not a LoRA A/B weight of a linear layer.")
                halves.setdefault(match["module"], {})[match["part"]] = weights.get_tensor(name).to(torch.float32)
    except (OSError, SafetensorError) as exc:
        raise AdapterRejected(f"{key}: unreadable {WEIGHTS} ({exc}).") from None
    pairs = {}
    for module, half in halves.items():
        layer = layers.get(module)
        if layer is None:
            raise AdapterRejected(f"{key}: it targets {module}, which this base model has no linear layer for.")
        a, b = half.get("A"), half.get("B")
        d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
        if a is None or b is None or a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterRejected(f"{key}: LoRA weights of {module} do not fit a {d_in}x{d_out} layer at rank {rank}.")
        pairs[module] = (a.T.contiguous(), (b.T * scaling).contiguous())
    if not pairs:
        raise AdapterRejected(f"{key}: {WEIGHTS} holds no LoRA weights.")
    return AdapterWeights(key, rank, pairs)


def install(weights: AdapterWeights, layers: dict[str, MultiLoRALinear]) -> None:
    """Make the adapter's pairs part of every layer it modifies."""
    uninstall(weights.key, layers)  # stacks built while it was absent hold zeros for it
    for module, pair in weights.pairs.items():
        layers[module].pairs[weights.key] = pair


def uninstall(key: str, layers: dict[str, MultiLoRALinear]) -> None:
    """Remove an adapter's pairs and every stack holding them from every layer, so that its memory is freed."""
    for layer in layers.values():
        layer.pairs.pop(key, None)
        for keys in [keys for keys in layer.stacks if key in keys]:
            del layer.stacks[keys]
