"""The engines agree on what they serve: the catalog refuses, before any load, an adapter whose LoRA pairs name
modules the base lacks or do not fit its layers; `--max-context` is clamped to the base's positions on both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from engines import VLLM
from serving import registry_with, reweighted, serving

from adapterctl.core.base import linear_shapes
from adapterctl.registry.repo import Registry

PROMPT = "The quick brown fox"


def _ghost_layer(tensors: dict[str, torch.Tensor]) -> None:
    """Move layer 0's q_proj pair to layer 99, which the 2-layer base lacks."""
    for name in [n for n in tensors if "layers.0.self_attn.q_proj" in n]:
        tensors[name.replace("layers.0.", "layers.99.")] = tensors.pop(name)


def _too_wide(tensors: dict[str, torch.Tensor]) -> None:
    """Give v_proj's B eight output rows more than the base's layer has."""
    for name in [n for n in tensors if "v_proj.lora_B" in n]:
        tensors[name] = torch.cat([tensors[name], tensors[name][:8]])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, make_adapter: Any) -> Registry:
    root = tmp_path_factory.mktemp("parity")
    return registry_with(
        root / "registry",
        {
            "good": [make_adapter(1)],
            "ghost": [reweighted(make_adapter(2), root / "ghost", _ghost_layer)],
            "wide": [reweighted(make_adapter(3), root / "wide", _too_wide)],
        },
    )


@pytest.fixture(params=["transformers", VLLM])
def url(request: pytest.FixtureRequest, registry: Registry, tiny_base: Path, tmp_path: Path) -> Iterator[str]:
    if request.param == "vllm":
        engine = request.getfixturevalue("vllm_engine")
    else:
        from adapterctl.serve.engines.transformers.engine import TransformersEngine

        engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=2, max_batch=4)
    with serving(engine, registry, tiny_base, settings={"max_tokens_cap": 64}) as server:
        yield server.url


def test_base_shapes_come_from_the_safetensors_headers(tiny_base: Path) -> None:
    shapes = linear_shapes(tiny_base)
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 128)
    assert shapes["lm_head"] == shapes["model.embed_tokens"]  # tied: no weight of its own in the file
    assert "model.layers.99.self_attn.q_proj" not in shapes


def test_both_engines_refuse_adapters_that_do_not_fit_the_base_before_loading(url: str) -> None:
    def complete(model: str) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

    ghost, wide = complete("ghost"), complete("wide")
    assert (ghost.status_code, wide.status_code) == (422, 422), (ghost.text, wide.text)
    assert ghost.json()["error"]["message"] == (
        "ghost@v1.0.0 cannot be served: it adapts model.layers.99.self_attn.q_proj, a module this server's base "
        "model lacks."
    )
    assert wide.json()["error"]["message"] == (
        "wide@v1.0.0 cannot be served: its LoRA pair of model.layers.0.self_attn.v_proj (A [4, 64], B [40, 4]) does "
        "not fit that layer of this server's base model (64 in, 32 out)."
    )
    loaded = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert complete("good").status_code == 200, loaded


def test_vllm_clamps_max_context_to_the_base_positions(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault point: vLLM's engine arguments are recorded, then the start stops there (no engine process)."""
    pytest.importorskip("vllm")
    from adapterctl.serve.engines import vllm_engine

    class Stop(Exception):
        pass

    asked: dict[str, Any] = {}

    def record(**args: Any) -> None:
        asked.update(args)
        raise Stop

    monkeypatch.setattr(vllm_engine, "AsyncEngineArgs", record)
    with pytest.raises(Stop):
        vllm_engine.VLLMEngine(tiny_base, model_id="tiny", max_context=4096)
    assert asked["max_model_len"] == 1024  # the tiny base's max_position_embeddings, as the transformers engine
