"""Reading a PEFT adapter into the LoRA layers: views of the memory-mapped file, scaled and widened on install."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapterctl.registry.folder import LORA_KEY, safetensors_header
from adapterctl.serve.engines.base import AdapterLoadFailed
from adapterctl.registry.folder import WEIGHTS
from adapterctl.serve.engines.transformers.lora import SharedPlan, install, read_adapter, wrap_linears


@pytest.fixture
def layers(tiny_base: Path) -> dict:
    return wrap_linears(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), SharedPlan())


def test_an_adapter_is_read_as_views_of_its_file_not_copies(lora, layers):
    adapter = lora(21, target_modules="all-linear")
    weights = read_adapter(adapter.key, adapter.path, layers, 64)
    header, _ = safetensors_header(adapter.path / WEIGHTS)
    views = {}
    for name, info in header.items():
        match = LORA_KEY.match(name)
        a, b, _ = weights.pairs[match["module"]]
        views[name] = (a if match["part"] == "A" else b, info["data_offsets"][0])
    (first, first_offset), *others = views.values()
    for tensor, offset in others:  # every tensor lies where the file has it, relative to the first: one mapping
        assert tensor.data_ptr() - first.data_ptr() == offset - first_offset


def test_half_precision_weights_are_installed_as_float32_scaled_as_peft_scales(lora, layers, tmp_path):
    adapter = lora(22, r=4, lora_alpha=12)
    half = tmp_path / "half"
    shutil.copytree(adapter.path, half)
    tensors = load_file(adapter.path / WEIGHTS)
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, half / WEIGHTS)
    install(read_adapter("half@v1.0.0", half, layers, 64), 2, layers, room=4)
    for name, tensor in tensors.items():
        match = LORA_KEY.match(name)
        layer = layers[match["module"]]
        expected = tensor.to(torch.float16).float().T
        stored = layer.a[2] if match["part"] == "A" else layer.b[2]
        torch.testing.assert_close(stored, expected if match["part"] == "A" else expected * 3.0, rtol=0, atol=0)
    assert all(layer.a.shape[0] == 4 for layer in layers.values())  # every layer grew to the room asked for


def test_weights_that_overflow_once_scaled_are_refused(lora, layers, tmp_path):
    adapter = lora(23, r=4, lora_alpha=8)  # scaling 2: finite weights of 2e38 become 4e38, past float32
    huge = tmp_path / "huge"
    shutil.copytree(adapter.path, huge)
    tensors = load_file(adapter.path / WEIGHTS)
    save_file({k: torch.full_like(v, 2e38) if "lora_B" in k else v for k, v in tensors.items()}, huge / WEIGHTS)
    with pytest.raises(AdapterLoadFailed, match="overflow once scaled by lora_alpha"):
        read_adapter("huge@v1.0.0", huge, layers, 64)
