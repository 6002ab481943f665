"""An adapter's base precision is part of its identity: recorded at training, measured on every serving precision,
shown by the registry and the server, and acted on by the server (a warning, or a 422 under --strict-fidelity)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import write_jsonl
from huggingface_hub import ModelCard
from serving import crafted, metric, openai_client, registry_with, serving

from adapterctl.core.precision import Precision
from adapterctl.registry import hub
from adapterctl.registry.names import Ref
from adapterctl.registry.repo import Registry
from adapterctl.train.config import TrainArgs
from adapterctl.train.trainer import train

FAST = dict(lr=5e-3, batch_size=4, seq_len=64, eval_fraction=0.25, max_steps=8)
CHAT = [{"role": "user", "content": "Say something."}]


def test_precision_records_round_trip_and_anything_else_is_unknown() -> None:
    nf4 = Precision.of("nf4", "float32")
    assert nf4.to_lineage() == {
        "quantize": "nf4",
        "method": "bitsandbytes",
        "quant_type": "nf4",
        "double_quant": True,
        "block_size": 64,
        "compute_dtype": "float32",
    }
    assert Precision.from_lineage(nf4.to_lineage()) == nf4
    for stray in (None, {}, {"quantize": "fp8"}, "nf4", {"quantize": "nf4", "block_size": 64, "extra": 1}):
        assert Precision.from_lineage(stray).quantize in ("unknown", "nf4")
    assert Precision.from_lineage(None).quantize == "unknown" and not Precision.from_lineage({}).known
    # The compute dtype rounds activations, not the stored weights: the same NF4 weights either way.
    assert nf4.same_weights(Precision.of("nf4", "bfloat16"))
    assert not nf4.same_weights(Precision.of("none", "float32"))
    assert not Precision.from_lineage(None).same_weights(Precision.from_lineage(None))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """One adapter trained with the defaults (QLoRA) and one with --no-qlora, on the tiny base."""
    root = tmp_path_factory.mktemp("trained")
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon", "Kim", "Lou"]
    records = [{"prompt": f"Name: {n}", "completion": f"Hello {n}!"} for n in names]
    data = write_jsonl(root / "people.jsonl", records)
    out = {}
    for method, qlora in (("qlora", True), ("lora", False)):
        options = {} if qlora else {"qlora": False}  # QLoRA is the default
        train(
            TrainArgs(name="people", data=data, base=str(tiny_base), output=root / method, **options, **FAST),
            echo=print,
        )
        out[method] = root / method
    return out


def test_training_records_its_precision_and_the_effect_kept_on_each_serving_precision(
    trained: dict[str, Path],
) -> None:
    qlora = json.loads((trained["qlora"] / "lineage.json").read_text())
    lora = json.loads((trained["lora"] / "lineage.json").read_text())
    assert qlora["method"] == "qlora" and qlora["precision"] == Precision.of("nf4", "float32").to_lineage()
    assert lora["method"] == "lora" and lora["precision"] == Precision.of("none", "float32").to_lineage()
    for record, own in ((qlora, "nf4"), (lora, "none")):
        fidelity = record["fidelity"]
        assert fidelity["reference"] == own and fidelity["eval_examples"] == 3  # a quarter of 12 examples
        assert set(fidelity["precisions"]) == {"nf4", "int8", "none"}
        for figures in fidelity["precisions"].values():
            gain = figures["base_loss"] - figures["adapter_loss"]
            assert figures["fidelity"] == pytest.approx(gain / fidelity["reference_improvement"], abs=2e-3)
        assert fidelity["precisions"][own]["fidelity"] == 1.0  # the precision it was trained on keeps it all
        assert fidelity["reference_improvement"] > 0
    card = (trained["qlora"] / "README.md").read_text()
    assert "## Precision" in card and "nf4 (bitsandbytes, double quantization, block 64" in card
    assert "| int8 |" in card


def test_the_registry_shows_precision_and_fidelity_and_unknown_for_older_versions(
    trained: dict[str, Path], tmp_path: Path, cli: Any, make_adapter: Any
) -> None:
    registry = registry_with(
        tmp_path / "reg", {"people": [trained["qlora"], trained["lora"]], "old": [make_adapter(1)]}
    )
    shown = cli("show", "people@v1.0.0", "--json", cwd=registry.root)
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["precision"]["quantize"] == "nf4" and data["precision"]["block_size"] == 64
    assert data["fidelity"] == json.loads((trained["qlora"] / "lineage.json").read_text())["fidelity"]
    text = cli("show", "people@v1.1.0", cwd=registry.root).output
    assert '"quantize": "none"' in text and '"reference": "none"' in text
    old = json.loads(cli("show", "old", "--json", cwd=registry.root).output)
    assert old["precision"]["quantize"] == "unknown" and old["fidelity"] is None
    listing = {row["name"]: row for row in json.loads(cli("list", "--json", cwd=registry.root).output)}
    assert listing["people"]["precision"] == "none" and listing["old"]["precision"] == "unknown"

    version = registry.state().resolve(Ref.parse("people@v1.0.0"))
    lineage = json.loads((trained["qlora"] / "lineage.json").read_text())
    card = hub.model_card(version, registry.meta(version), lineage, "org/people")
    assert "## Precision" in card and "`adapters serve --quantize nf4`" in card
    assert ModelCard(card).data.library_name == "peft"


def _fidelity(nf4: float, none: float, own: str) -> dict[str, Any]:
    """A fidelity record as training writes it, with the given shares (the server reads only these)."""
    return {
        "reference": own,
        "eval_examples": 4,
        "precisions": {
            q: {"base_loss": 3.0, "adapter_loss": 3.0 - s, "fidelity": s} for q, s in (("nf4", nf4), ("none", none))
        },
    }


@pytest.fixture(scope="module")
def fidelity_registry(tmp_path_factory: pytest.TempPathFactory, make_adapter: Any) -> Registry:
    """Versions whose lineage says: LoRA measured poor on nf4, QLoRA, LoRA measured fine on nf4, and nothing."""
    root = tmp_path_factory.mktemp("fidelity")
    none, nf4 = Precision.of("none", "float32").to_lineage(), Precision.of("nf4", "float32").to_lineage()

    def lineage(precision: dict[str, Any], fidelity: dict[str, Any]) -> Any:
        return lambda config, record: record.update(precision=precision, fidelity=fidelity)

    return registry_with(
        root / "registry",
        {
            "lora": [crafted(make_adapter(1), root / "lora", lineage(none, _fidelity(0.12, 1.0, "none")))],
            "qlora": [crafted(make_adapter(2), root / "qlora", lineage(nf4, _fidelity(1.0, 0.4, "nf4")))],
            "sturdy": [crafted(make_adapter(3), root / "sturdy", lineage(none, _fidelity(0.9, 1.0, "none")))],
            "old": [make_adapter(4)],
        },
    )


@contextmanager
def _served(base: Path, registry: Registry, strict: bool) -> Iterator[str]:
    """A server on BASE in NF4 (its own engine: a server closes its engine when it stops); its URL while it runs."""
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    engine = TransformersEngine(base, model_id="tiny-llama", quantize="nf4", max_loaded=4, max_batch=8)
    with serving(engine, registry, base, settings={"max_tokens_cap": 64}, strict_fidelity=strict) as server:
        yield server.url


def _chat(url: str, model: str) -> openai.types.chat.ChatCompletion:
    return openai_client(url).chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def rounding(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """A tiny base whose NF4 copy answers otherwise, and adapters trained either way on answers that copy wrote.

    With weights drawn wide (std 0.3, not 0.02) NF4's rounding changes most of the tiny model's greedy picks. LoRA
    trained on the weights as saved to answer as the NF4 copy does learns the rounding itself: on the NF4 base there
    is little left to improve, so its measured fidelity there is low. QLoRA on the same answers trains against NF4.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from adapterctl.core.precision import quantization_config
    from adapterctl.train import compare

    root = tmp_path_factory.mktemp("rounding")
    config = AutoConfig.from_pretrained(tiny_base)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base, padding_side="left")
    tokenizer.save_pretrained(root / "base")
    nf4 = AutoModelForCausalLM.from_pretrained(
        root / "base", dtype=torch.float32, quantization_config=quantization_config("nf4", torch.float32)
    )
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon", "Kim", "Lou", "Max", "Ned"]
    prompts = [f"Name: {n}" for n in [*names, "Oli", "Pam"]]
    answers = compare.answer(nf4, tokenizer, prompts, max_new_tokens=8)  # greedy: the same answers every run
    data = write_jsonl(root / "rounding.jsonl", [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)])
    out = {"base": root / "base"}
    for method, qlora in (("qlora", True), ("lora", False)):
        args = TrainArgs(name="rounding", data=data, base=str(root / "base"), output=root / method, qlora=qlora, **FAST)
        train(args, echo=print)
        out[method] = root / method
    return out


def test_strict_fidelity_refuses_an_adapter_measured_to_lose_its_effect_on_this_precision(
    rounding: dict[str, Path], tmp_path: Path
) -> None:
    from adapterctl.serve.catalog.fidelity import LOW

    lora = json.loads((rounding["lora"] / "lineage.json").read_text())["fidelity"]["precisions"]
    qlora = json.loads((rounding["qlora"] / "lineage.json").read_text())["fidelity"]["precisions"]
    print(lora, qlora)
    assert lora["none"]["fidelity"] == 1.0 and lora["nf4"]["fidelity"] < LOW  # measured by training, not written here
    assert qlora["nf4"]["fidelity"] == 1.0
    registry = registry_with(tmp_path / "registry", {"lora": [rounding["lora"]], "qlora": [rounding["qlora"]]})
    with _served(rounding["base"], registry, strict=True) as url:
        assert _chat(url, "qlora").model == "qlora@v1.0.0"
        refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "lora", "messages": CHAT, "max_tokens": 4})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["code"] == "adapter_rejected"
        assert error["message"] == (
            f"lora@v1.0.0 was trained against a none base and this server runs nf4 (measured fidelity "
            f"{lora['nf4']['fidelity']:.0%} on nf4); serve it with `adapters serve --quantize none`, or retrain it "
            "with `adapters train` (QLoRA, the default) to match this server. (This server runs with "
            "--strict-fidelity.)"
        )
        assert httpx.get(f"{url}/admin/loaded").json()["loaded"] == ["qlora@v1.0.0"]


def test_strict_fidelity_refuses_adapters_of_unknown_precision_and_serves_those_measured_to_keep_their_effect(
    tiny_base: Path, fidelity_registry: Registry, tmp_path: Path
) -> None:
    with _served(tiny_base, fidelity_registry, strict=True) as url:
        assert _chat(url, "qlora").model == "qlora@v1.0.0"
        assert _chat(url, "sturdy").model == "sturdy@v1.0.0"  # other weights, but measured to keep its effect
        old = httpx.post(f"{url}/v1/chat/completions", json={"model": "old", "messages": CHAT, "max_tokens": 4})
        assert old.status_code == 422 and "does not record the base precision" in old.json()["error"]["message"]
        assert "`adapters eval old@v1.0.0 --quantize nf4`" in old.json()["error"]["message"]
        loaded = httpx.get(f"{url}/admin/loaded").json()
        assert sorted(loaded["loaded"]) == ["qlora@v1.0.0", "sturdy@v1.0.0"]  # the refused one never loads


def test_without_strict_a_poor_fit_is_served_logged_listed_and_counted(
    tiny_base: Path, fidelity_registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serve")
    with _served(tiny_base, fidelity_registry, strict=False) as url:
        before = {c: metric(url, "adapters_fidelity_requests_total", fidelity=c) for c in ("low", "match", "base")}
        assert _chat(url, "lora").model == "lora@v1.0.0"
        assert _chat(url, "lora").model == "lora@v1.0.0"
        assert _chat(url, "qlora").model == "qlora@v1.0.0"
        assert _chat(url, "tiny-llama").model == "tiny-llama"
        after = {c: metric(url, "adapters_fidelity_requests_total", fidelity=c) for c in ("low", "match", "base")}
        assert {c: after[c] - before[c] for c in after} == {"low": 2, "match": 1, "base": 1}

        warnings = [r.getMessage() for r in caplog.records if "lora@v1.0.0" in r.getMessage()]
        assert len(warnings) == 1 and "trained against a none base and this server runs nf4" in warnings[0]
        assert "measured fidelity 12% on nf4" in warnings[0]

        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models["lora"]["fidelity"] == {
            "class": "low",
            "trained_precision": "none",
            "server_precision": "nf4",
            "measured_fidelity": 0.12,
        }
        assert models["qlora"]["fidelity"]["class"] == "match"
        assert models["sturdy"]["fidelity"]["class"] == "kept"
        assert models["old"]["fidelity"] == {
            "class": "unknown",
            "trained_precision": "unknown",
            "server_precision": "nf4",
            "measured_fidelity": None,
        }
        assert "fidelity" not in models["tiny-llama"]
        fidelity = httpx.get(f"{url}/admin/loaded").json()["fidelity"]
        assert fidelity["lora@v1.0.0"]["class"] == "low" and fidelity["qlora@v1.0.0"]["class"] == "match"


def test_eval_scores_base_and_adapter_on_the_chosen_precision(
    trained: dict[str, Path], tmp_path: Path, cli: Any, tiny_base: Path
) -> None:
    registry = registry_with(tmp_path / "reg", {"people": [trained["lora"]]})
    missing = cli("eval", "people", "--base", str(tiny_base), "--quantize", "none", cwd=registry.root)
    assert missing.exit_code != 0
    assert "The training data of this adapter (people.jsonl) is not in" in missing.output
    assert "pass a JSONL dataset with --data" in missing.output

    data = trained["lora"].parent / "people.jsonl"
    result = cli(
        "eval", "people", "--base", str(tiny_base), "--quantize", "none", "--data", str(data), "--samples", "2",
        "--max-new-tokens", "4", "--json", cwd=registry.root,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    lineage = json.loads((trained["lora"] / "lineage.json").read_text())
    assert report["ref"] == "people@v1.0.0" and report["trained_precision"] == "none"
    assert report["dataset"]["split"] == "eval" and report["dataset"]["examples"] == 3
    # The same eval split on the same precision as at training time: the same losses.
    recorded = lineage["fidelity"]["precisions"]["none"]
    assert report["base_loss"] == pytest.approx(recorded["base_loss"], abs=1e-3)
    assert report["adapter_loss"] == pytest.approx(recorded["adapter_loss"], abs=1e-3)
    assert report["recorded_fidelity"] == 1.0
    assert len(report["samples"]) == 2 and all(s["prompt"].startswith("Name: ") for s in report["samples"])

    text = cli(
        "eval", "people", "--base", str(tiny_base), "--quantize", "nf4", "--data", str(data), "--samples", "0",
        cwd=registry.root,
    )  # fmt: skip
    assert text.exit_code == 0, text.output
    assert "people@v1.0.0 (trained against none) on a nf4 base, 3 examples (eval)" in text.output
