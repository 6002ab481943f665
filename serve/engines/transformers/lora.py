"""Many LoRA adapters applied in one forward pass: each batch row gets its own adapter's low-rank update."""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapterctl.registry.folder import (
    CONFIG,
    LORA_KEY,
    WEIGHTS,
    InvalidAdapter,
    LoraSettings,
    lora_settings,
    safetensors_header,
    unservable,
)
from adapterctl.serve.engines.transformers.kernels import sgmv
from adapterctl.serve.engines.base import AdapterLoadFailed

# The linear layers wrapped: plain, and bitsandbytes' NF4 and int8 ones (the base model's quantized layers).
_LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt")
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_LARGEST = torch.finfo(torch.float32).max
# In row-equivalents: what reading one adapter's weights of a layer costs next to applying them to one row.
_WEIGHT_COST = 3


@dataclass(frozen=True)
class Plan:
    """How one forward pass's token rows map onto adapter slots: G groups padded to M rows each.

    Group g uses slot g (`slots` None: the layers' first G slots, read in place) or slot `slots[g]` (gathered).
    A pass of one token a row (the runner packs every pass so) also lists its rows by slot for the compiled kernel,
    which needs no padding.
    """

    groups: int
    size: int  # M: rows per group after padding
    slots: torch.Tensor | None
    gather: torch.Tensor | None  # padded layout -> token row; None when the input already is that layout
    scatter: torch.Tensor | None  # real rows' places in the padded layout; None without padding
    dest: torch.Tensor | None  # token row of each real row, when some rows use no adapter; else None
    inverse: torch.Tensor | None  # layout place of each token row, when every row uses an adapter
    segments: tuple[torch.Tensor, torch.Tensor] | None = None  # decode: rows using an adapter by slot, their slots

    @property
    def identity(self) -> bool:
        """Every row uses an adapter and the rows already are the padded layout."""
        return self.gather is None and self.scatter is None and self.dest is None and self.inverse is None


def plan(slots: list[int | None], tokens: int) -> Plan | None:
    """The plan for a pass whose row i (of TOKENS tokens each) uses the adapter in slot SLOTS[i] (None: the base).

    Either every slot up to the highest in use is a group (the weights are read where they lie; idle slots
    cost padding), or only the slots in use are gathered, a large group split so that groups are alike in
    size; whichever costs less.
    """
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot is not None:
            by_slot.setdefault(slot, []).append(row)
    if not by_slot:
        return None
    used = max(by_slot) + 1
    widest = max(len(rows) for rows in by_slot.values())
    chunk = -(-sum(len(rows) for rows in by_slot.values()) // len(by_slot))  # the mean group, rounded up
    chunks = [(slot, rows[i : i + chunk]) for slot, rows in sorted(by_slot.items()) for i in range(0, len(rows), chunk)]
    if used * (widest + _WEIGHT_COST) <= len(chunks) * (chunk + 3 * _WEIGHT_COST):
        groups, gathered = [(slot, by_slot.get(slot, [])) for slot in range(used)], None
        size = widest * tokens
    else:
        groups, gathered = chunks, torch.tensor([slot for slot, _ in chunks])
        size = chunk * tokens
    layout, real = [], []
    for group, (_, rows) in enumerate(groups):
        token_rows = [row * tokens + t for row in rows for t in range(tokens)]
        real.extend(range(group * size, group * size + len(token_rows)))
        layout.extend(token_rows + [0] * (size - len(token_rows)))  # padding reads row 0; its output is dropped
    total = len(slots) * tokens
    ordered = [layout[place] for place in real]  # token row of each real row, in layout order
    in_order = layout == list(range(total))
    everyone = len(ordered) == total
    inverse = None
    if everyone and not in_order:
        inverse = torch.empty(total, dtype=torch.long)
        inverse[torch.tensor(ordered)] = torch.arange(total)
    segments = None
    if tokens == 1:
        by_order = [(slot, row) for slot, rows in sorted(by_slot.items()) for row in rows]
        segments = (torch.tensor([row for _, row in by_order]), torch.tensor([slot for slot, _ in by_order]))
    return Plan(
        groups=len(groups),
        size=size,
        slots=gathered,
        gather=None if in_order else torch.tensor(layout),
        scatter=None if len(real) == len(layout) else torch.tensor(real),
        dest=None if everyone else torch.tensor(ordered),
        inverse=inverse,
        segments=segments,
    )


@dataclass
class SharedPlan:
    """The current pass's plan, shared by every LoRA layer of the model."""

    plan: Plan | None = None


class MultiLoRALinear(nn.Module):
    """A base linear layer plus adapter slots; one pass applies each row's own LoRA pair.

    Slot s holds A^T in `a[s]` and scaling * B^T in `b[s]`, ranks padded with zeros, so that two batched
    matmuls (or one kernel call) cover every adapter of a pass. A slot an adapter leaves untouched in this layer
    stays zero. The slots grow as adapters are installed: memory goes to the slots used, not to every one allowed.
    """

    def __init__(self, base: nn.Module, rows: SharedPlan) -> None:
        super().__init__()
        self.base_layer = base
        self.rows = rows
        d_in, d_out = base.in_features, base.out_features
        self.a = torch.zeros(0, d_in, 0)
        self.b = torch.zeros(0, 0, d_out)

    def reserve(self, slots: int, rank: int) -> None:
        """Room for SLOTS slots of RANK ranks (new room zero); the storage is copied only when it must grow."""
        had_slots, had_rank = self.a.shape[0], self.a.shape[2]
        if slots <= had_slots and rank <= had_rank:
            return
        slots, rank = max(slots, had_slots), max(rank, had_rank)
        wider_a = self.a.new_zeros(slots, self.a.shape[1], rank)
        wider_b = self.b.new_zeros(slots, rank, self.b.shape[2])
        wider_a[:had_slots, :, :had_rank] = self.a
        wider_b[:had_slots, :had_rank] = self.b
        self.a, self.b = wider_a, wider_b

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> None:
        """Write A^T and SCALING * B^T (any layout, any float dtype) into SLOT, which is clear (new, or cleared when
        its adapter left), widening every slot's rank if it needs more."""
        rank = a.shape[1]
        self.reserve(slot + 1, rank)
        self.a[slot, :, :rank].copy_(a)
        scaled = self.b[slot, :rank]
        scaled.copy_(b)
        if scaling != 1.0:
            scaled.mul_(scaling)  # in float32, as PEFT scales

    def clear(self, slot: int) -> None:
        """Zero SLOT: its adapter no longer changes this layer."""
        self.a[slot] = 0
        self.b[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        plan = self.rows.plan
        if plan is None or self.a.shape[2] == 0:
            return result
        if plan.segments is not None:
            flat, out = x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1])
            if sgmv.fits(flat, out, self.a, self.b):  # one call, each row's slot read in place
                sgmv.apply(flat, out, *plan.segments, self.a, self.b)
                return result
        a, b = (self.a[: plan.groups], self.b[: plan.groups]) if plan.slots is None else (
            self.a.index_select(0, plan.slots), self.b.index_select(0, plan.slots))  # fmt: skip
        flat = x.reshape(-1, x.shape[-1]).to(a.dtype)
        if plan.identity and result.dtype == a.dtype:  # rows already grouped: two fused calls, no copies
            result.view(plan.groups, plan.size, -1).baddbmm_(torch.bmm(flat.view(plan.groups, plan.size, -1), a), b)
            return result
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


@dataclass
class AdapterWeights:
    """One adapter's LoRA pairs, views of its memory-mapped weights file, keyed by the module path they modify."""

    key: str
    rank: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A^T, B^T, scaling)


def wrap_linears(model: nn.Module, rows: SharedPlan) -> dict[str, MultiLoRALinear]:
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
    """Read a PEFT LoRA adapter folder and check that every pair fits the model's layers and is finite."""
    settings = _settings(key, folder)
    if not (folder / WEIGHTS).is_file():
        raise AdapterLoadFailed(key, f"no {WEIGHTS}; the server loads safetensors weights only.")
    pairs = {}
    for module, half in _halves(key, folder / WEIGHTS).items():
        layer = layers.get(module)
        if layer is None:
            raise AdapterLoadFailed(key, f"it targets {module}, which this base model has no linear layer for.")
        pairs[module] = _pair(key, module, half, layer, settings, max_rank)
    if not pairs:
        raise AdapterLoadFailed(key, f"{WEIGHTS} holds no LoRA weights.")
    return AdapterWeights(key, max(a.shape[1] for a, _, _ in pairs.values()), pairs)


def _settings(key: str, folder: Path) -> LoraSettings:
    """The adapter's LoRA settings from its config, refused when the server cannot apply them."""
    try:
        config = json.loads((folder / CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise AdapterLoadFailed(key, f"unreadable {CONFIG} ({exc}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadFailed(key, f"peft_type {config.get('peft_type')} is not served; only LoRA adapters are.")
    unsupported = unservable(config)
    if unsupported:
        raise AdapterLoadFailed(key, f"LoRA options {', '.join(unsupported)} are not supported by the server.")
    try:
        return lora_settings(config, CONFIG)
    except InvalidAdapter as exc:
        raise AdapterLoadFailed(key, f"{exc}") from None


def _halves(key: str, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weights file's tensors by module, then by part (A or B); anything but LoRA A/B weights is refused."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in _mapped(key, path).items():
        match = LORA_KEY.match(name)
        if not match:
            raise AdapterLoadFailed(key, f"tensor {name} is not a LoRA A/B weight of a linear layer.")
        halves.setdefault(match["module"], {})[match["part"]] = tensor
    return halves


def _pair(
    key: str,
    module: str,
    half: dict[str, torch.Tensor],
    layer: MultiLoRALinear,
    settings: LoraSettings,
    max_rank: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MODULE's (A transposed, B transposed, scaling), checked to fit LAYER at its rank and to be finite once scaled."""
    rank = settings.rank(module)
    if rank > max_rank:
        raise AdapterLoadFailed(key, f"rank {rank} is above this server's maximum rank {max_rank}.")
    a, b = half.get("A"), half.get("B")
    d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
    if a is None or b is None or a.shape != (rank, d_in) or b.shape != (d_out, rank):
        raise AdapterLoadFailed(key, f"LoRA weights of {module} do not fit a {d_in}x{d_out} layer at rank {rank}.")
    scaling = settings.scaling(module)
    for part, tensor in (("A", a), ("B", b)):
        low, high = (float(v) for v in torch.aminmax(tensor))  # NaN if any is NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            raise AdapterLoadFailed(key, f"the LoRA {part} weight of {module} holds NaN or infinite values; "
                                    "the adapter is broken.")  # fmt: skip
        if part == "B" and max(-low, high) * abs(scaling) > _LARGEST:
            raise AdapterLoadFailed(key, f"LoRA weights of {module} overflow once scaled by lora_alpha.")
    return a.T, b.T, scaling


def _mapped(key: str, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of its memory map (copy-on-write: nothing is read until used)."""
    try:
        header, start = safetensors_header(path)
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, InvalidAdapter) as exc:
        raise AdapterLoadFailed(key, f"unreadable {WEIGHTS} ({exc}).") from None
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise AdapterLoadFailed(key, f"tensor {name} is {info.get('dtype')}; LoRA weights must be floats.")
        begin, end = info["data_offsets"]
        shape = [int(n) for n in info.get("shape", [])]
        count = (end - begin) // dtype.itemsize
        if count != math.prod(shape) or count * dtype.itemsize != end - begin:
            raise AdapterLoadFailed(key, f"unreadable {WEIGHTS} (tensor {name} does not fill its {shape} shape).")
        if count == 0:  # frombuffer refuses empty views
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).view(shape)
    return tensors


def install(weights: AdapterWeights, slot: int, layers: dict[str, MultiLoRALinear], room: int = 0) -> None:
    """Write the adapter's pairs into SLOT of every layer it modifies (the slot is clear everywhere else).

    Layers without SLOT grow to ROOM slots at once (at least SLOT + 1): growing copies every slot, so it is rare.
    """
    for layer in layers.values():  # every layer has the slot, as a pass reads each row's slot in every layer
        if layer.a.shape[0] <= slot:
            layer.reserve(max(room, slot + 1), 0)  # ranks widen as pairs are put
    for module, (a, b, scaling) in weights.pairs.items():
        layers[module].put(slot, a, b, scaling)


def uninstall(modules: tuple[str, ...], slot: int, layers: dict[str, MultiLoRALinear]) -> None:
    """Clear SLOT in the layers MODULES, which its adapter modified."""
    for module in modules:
        layers[module].clear(slot)
