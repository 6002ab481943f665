"""vLLM's operator endpoints on our server, over real HTTP: tokenizer, version, health, runtime LoRA load/unload."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import registry_with, serving

CHAT = [{"role": "user", "content": "Say something about foxes."}]


@dataclass
class Operated:
    """A tenants-mode server: tenant 'acme' may use acme-*, 'admin' holds the admin key."""

    url: str
    engine: Any
    keys: dict[str, str]

    def post(self, path: str, who: str | None, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60)

    def get(self, path: str, who: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60)


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any) -> Iterator[Operated]:
    from adapterctl.serve.api.tenants import add_tenant, set_admin
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    root = tmp_path_factory.mktemp("operated")
    registry = registry_with(root / "registry", {"acme-a": [make_adapter(1)], "globex-a": [make_adapter(2)]})
    tenants_file = root / "tenants.yaml"
    keys = {"acme": add_tenant(tenants_file, "acme", ["acme-*"], None, None), "admin": set_admin(tenants_file)}
    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=2, max_batch=4)
    with serving(engine, registry, tiny_base, tenants=tenants_file) as server:
        yield Operated(server.url, engine, keys)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_tokenize_and_detokenize_are_the_servers_own_tokenizer(operated: Operated) -> None:
    engine = operated.engine
    plain = operated.post("/tokenize", "acme", prompt="The quick brown fox", add_special_tokens=False).json()
    assert plain["tokens"] == engine.encode("The quick brown fox", add_special_tokens=False)
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == engine.context_length
    chat = operated.post("/tokenize", "acme", model="acme-a", messages=CHAT).json()
    assert chat["tokens"] == engine.encode_chat(CHAT)
    text = operated.post("/detokenize", "acme", tokens=plain["tokens"]).json()
    assert text == {"prompt": "The quick brown fox"}


def test_tokenizer_info_lets_lm_eval_use_the_remote_tokenizer(operated: Operated) -> None:
    info = operated.get("/tokenizer_info", "acme").json()
    tokenizer = operated.engine.tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == operated.engine.context_length and info["vocab_size"] == len(tokenizer)


def test_tokenizer_endpoints_refuse_bad_input_and_other_tenants_models(operated: Operated) -> None:
    assert (
        "either prompt or messages"
        in _error(operated.post("/tokenize", "acme", prompt="a", messages=CHAT), 400)["message"]
    )
    assert _error(operated.post("/detokenize", "acme", tokens=[-1]), 400)["param"] == "tokens"
    assert _error(operated.post("/tokenize", "acme", prompt="a", model="globex-a"), 404)["code"] == "model_not_found"
    assert operated.post("/tokenize", None, prompt="a").status_code == 401
    assert operated.post("/tokenize", "acme", prompt="a", prompt_typo=1).status_code == 400


def test_version_and_health_answer_without_a_key(operated: Operated) -> None:
    assert operated.get("/version").json() == {"version": importlib.metadata.version("adapterctl")}
    health = operated.get("/health")
    assert health.status_code == 200 and health.content == b""


def test_runtime_lora_loading_takes_registry_references_and_the_admin_key_only(operated: Operated) -> None:
    assert _error(operated.post("/v1/load_lora_adapter", "acme", lora_name="acme-a"), 403)["type"]
    refused = _error(operated.post("/v1/load_lora_adapter", "admin", lora_name="x", lora_path="/etc"), 400)
    assert refused["param"] == "lora_path" and "by reference" in refused["message"]
    loaded = operated.post("/v1/load_lora_adapter", "admin", lora_name="acme-a")
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'acme-a@v1.0.0' added successfully."
    assert "acme-a@v1.0.0" in operated.get("/admin/loaded", "admin").json()["loaded"]
    unloaded = operated.post("/v1/unload_lora_adapter", "admin", lora_name="acme-a@v1.0.0")
    assert unloaded.text == "Success: LoRA adapter 'acme-a@v1.0.0' removed successfully."
    assert "acme-a@v1.0.0" not in operated.get("/admin/loaded", "admin").json()["loaded"]
    assert _error(operated.post("/v1/unload_lora_adapter", "admin", lora_name="acme-a"), 404)["message"]
    assert _error(operated.post("/v1/load_lora_adapter", "admin", lora_name="nope"), 404)


def test_docs_work_offline_and_the_schema_names_the_real_errors(operated: Operated) -> None:
    page = operated.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    script = operated.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    spec = operated.get("/openapi.json").json()
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and completions["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert "401" in spec["paths"]["/tokenize"]["post"]["responses"]
    assert set(spec["components"]["schemas"]["Error"]["properties"]["error"]["required"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    # The server really answers a bad body with 400 in that shape.
    bad = operated.post("/v1/completions", "acme", model="acme-a", prompt="a", max_tokens=0)
    assert _error(bad, 400)["param"] == "max_tokens"
