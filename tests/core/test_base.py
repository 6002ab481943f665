"""The embedded base model's one-time conversion, base resolution errors, fingerprints, `models list`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterctl.cli import main
from adapterctl.core.errors import BaseModelError
from adapterctl.core import base


def test_embedded_conversion_is_complete_and_usable(embedded_base: Path) -> None:
    assert embedded_base == base.models_dir() / base.EMBEDDED_NAME
    config = json.loads((embedded_base / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(embedded_base / "model.safetensors", "pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    marker = json.loads((embedded_base / base.MARKER).read_text())
    assert marker["fingerprint"] == base.fingerprint(embedded_base)

    tokenizer = AutoTokenizer.from_pretrained(embedded_base)
    assert "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids["input_ids"].shape[1] :])


def test_embedded_conversion_is_idempotent(embedded_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = embedded_base / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def refuse(*_: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(base, "_convert_gguf", refuse)
    assert base.ensure_embedded() == embedded_base
    assert base.resolve_base(None).path == embedded_base
    assert weights.stat().st_mtime_ns == before


def test_killed_conversion_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path))
    staging = tmp_path / "models" / f".{base.EMBEDDED_NAME}.partial"
    code = "from adapterctl.core.base import ensure_embedded; ensure_embedded()"
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not (staging / "model.safetensors").exists():  # killed mid-conversion, weights half there
        assert process.poll() is None and time.monotonic() < deadline, "conversion ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert not (tmp_path / "models" / base.EMBEDDED_NAME).exists()
    assert base.cached_models() == []
    result = base.ensure_embedded()  # the next run starts clean and finishes
    assert (result / base.MARKER).is_file() and not staging.exists()
    assert [m["name"] for m in base.cached_models()] == [base.EMBEDDED_NAME]


def test_models_list(embedded_base: Path) -> None:
    listed = CliRunner().invoke(main, ["models", "list"])
    assert listed.exit_code == 0
    assert base.EMBEDDED_NAME in listed.output and str(embedded_base) in listed.output
    as_json = json.loads(CliRunner().invoke(main, ["models", "list", "--json"]).output)
    assert as_json[0]["fingerprint"].startswith("sha256:") and as_json[0]["size_bytes"] > 200e6


def test_models_list_when_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0 and "No base models cached" in result.output


def test_local_folder_base_resolves(tiny_base: Path) -> None:
    resolved = base.resolve_base(str(tiny_base))
    assert resolved.path == tiny_base.resolve() and resolved.hub_id is None


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("nothing", "is not a local folder, a Hub id"),
        ("empty", "has no config.json"),
        ("pickle", "only safetensors are loaded"),
    ],
)
def test_unusable_bases_are_refused(tmp_path: Path, setup: str, message: str) -> None:
    folder = tmp_path / "model"
    if setup != "nothing":
        folder.mkdir()
    if setup == "pickle":
        (folder / "config.json").write_text("{}")
        (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BaseModelError, match=message):
        base.resolve_base(str(folder) if setup != "nothing" else "no such model")


def test_unreachable_hub_id_is_one_clear_error() -> None:
    # HF_HUB_OFFLINE=1 (set for the test session) makes the Hub unreachable, as it is on this machine.
    with pytest.raises(BaseModelError, match="Could not download base model 'someorg/some-model'"):
        base.resolve_base("someorg/some-model")


def test_fingerprint_follows_the_weight_bytes(tmp_path: Path, tiny_base: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert base.fingerprint(copy) == base.fingerprint(tiny_base)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert base.fingerprint(copy) != base.fingerprint(tiny_base)
