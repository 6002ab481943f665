"""Adapters trained elsewhere: folders written by PEFT and by TRL's SFTTrainer are registered with `--base`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import git

from adapterctl.core.base import fingerprint
from adapterctl.registry.repo import Registry


def _peft_folder(tiny_base: Path, out: Path, **settings: object) -> Path:
    """What `get_peft_model(...).save_pretrained(out)` writes on the tiny base: no lineage of ours."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(**{**options, **settings})
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trl_folder(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What TRL's SFTTrainer writes with `save_model` after two LoRA steps on the tiny base."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("trl-run")
    rows = [{"prompt": f"Say {i}.", "completion": f" {i} it is."} for i in range(8)]
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_base),
        args=SFTConfig(
            output_dir=str(out), max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True, seed=0
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_base),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    trainer.save_state()
    (out / "final" / "trainer_state.json").write_text((out / "trainer_state.json").read_text())
    return out / "final"


def test_a_peft_folder_needs_its_base_named_and_then_registers_with_an_imported_lineage(
    registry: Registry, tiny_base: Path, tmp_path: Path, cli
) -> None:
    folder = _peft_folder(tiny_base, tmp_path / "peft")
    refused = cli("add", "plain", str(folder), cwd=registry.root)
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"Error: {folder} has no lineage.json: it was trained elsewhere, so name the base it was trained on with "
        f"--base (here perhaps --base {tiny_base}: a cached model name, a local folder or a Hub id).\n"
    )
    added = cli("add", "plain", str(folder), "--base", str(tiny_base), cwd=registry.root)
    assert added.exit_code == 0, added.output
    assert "Registered plain@v1.0.0" in added.stdout and added.stderr == ""

    out = tmp_path / "out"
    assert cli("checkout", "plain", "-o", str(out), cwd=registry.root).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lineage.json",
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"] == "imported" and lineage["dataset"] is None
    assert lineage["base_model"]["fingerprint"] == fingerprint(tiny_base)
    assert lineage["hyperparameters"]["r"] == 4 and lineage["hyperparameters"]["target_modules"] in (
        ["q_proj", "v_proj"],
        ["v_proj", "q_proj"],
    )
    shown = json.loads(cli("show", "plain", "--json", cwd=registry.root).output)
    assert shown["imported"]["source"] == str(folder.resolve())
    assert shown["precision"]["quantize"] == "unknown"  # what it was trained against is not known


def test_a_trl_run_registers_without_its_pickles_and_is_servable(
    registry: Registry, tiny_base: Path, trl_folder: Path, tmp_path: Path, cli
) -> None:
    assert (trl_folder / "training_args.bin").is_file()  # TRL's own pickle beside the adapter
    added = cli("add", "trl", str(trl_folder), "--base", str(tiny_base), cwd=registry.root)
    assert added.exit_code == 0, added.output
    notes = added.stderr.splitlines()
    assert "Left out training_args.bin: a pickle, never loaded." in notes
    assert "Left out tokenizer_config.json: not needed to serve it." in notes
    assert all(line.startswith("Left out ") for line in notes)

    version = registry.state().resolve("trl")
    lineage = json.loads((registry.root / "adapters" / "trl" / "lineage.json").read_text())
    assert lineage["training"]["global_step"] == 2 and "train_loss" in lineage["metrics"]
    assert "training_args.bin" in lineage["imported"]["left_out"]

    from adapterctl.serve.catalog.versions import Catalog

    catalog = Catalog(registry, tmp_path / "cache", base_id="tiny", fingerprint=fingerprint(tiny_base), max_rank=64)
    spec = catalog.materialize(version)  # the server's own checks accept it
    assert (spec.path / "adapter_model.safetensors").read_bytes() == (
        trl_folder / "adapter_model.safetensors"
    ).read_bytes()


def test_options_the_server_cannot_apply_are_refused_at_add_unless_allowed(
    registry: Registry, tiny_base: Path, tmp_path: Path, cli
) -> None:
    folder = _peft_folder(tiny_base, tmp_path / "dora", use_dora=True)
    refused = cli("add", "dora", str(folder), "--base", str(tiny_base), cwd=registry.root)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1].endswith(
        "adapter_config.json: LoRA options use_dora=True cannot be applied by the server's engines; "
        "to keep it anyway (refused when served): --allow-unservable."
    )
    assert git(registry.root, "tag", "--list") == ""
    kept = cli("add", "dora", str(folder), "--base", str(tiny_base), "--allow-unservable", cwd=registry.root)
    assert kept.exit_code == 0, kept.output
    assert kept.stderr.splitlines()[-1] == "Warning: dora@v1.0.0 uses use_dora=True; the server refuses to serve it."
    assert registry.meta(registry.state().resolve("dora"))["unservable"] == ["use_dora=True"]


def test_base_is_refused_for_an_adapter_that_names_its_own(registry: Registry, make_adapter, tiny_base: Path, cli):
    result = cli("add", "support", str(make_adapter(1)), "--base", str(tiny_base), cwd=registry.root)
    assert result.exit_code == 2
    assert "already names the base it was trained on; --base is for adapters trained elsewhere." in result.stderr
