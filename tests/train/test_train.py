"""Training on a tiny random Llama: loss goes down, the output folder is complete, QLoRA runs, resume works."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapterctl.core.errors import InvalidName, TrainingError, TrainingInterrupted
from adapterctl.train import trainer as trainer_module
from adapterctl.core.base import fingerprint
from adapterctl.train.config import TrainArgs
from adapterctl.train.trainer import train

FAST = dict(lr=5e-3, batch_size=4, seq_len=64, eval_fraction=0.25, rank=8, alpha=16, qlora=False)


def _args(tmp_path: Path, base: Path, data: Path, **overrides) -> TrainArgs:
    return TrainArgs(
        **{"name": "people", "data": data, "base": str(base), "output": tmp_path / "out", **FAST, **overrides}
    )


def _cli(tmp_path: Path, base: Path, data: Path, *options: str) -> list[str]:
    """`adapters train people` on the tiny base as a separate process, writing tmp_path/out."""
    return [sys.executable, "-m", "adapterctl.cli", "train", "people", "--data", str(data), "--base", str(base),
            "--output", str(tmp_path / "out"), "--seq-len", "64", *options]  # fmt: skip


def test_lora_lowers_the_loss_and_writes_a_complete_adapter(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    result = train(_args(tmp_path, tiny_base, json_data, max_steps=12), echo=lambda _: None)

    assert result.eval_loss_after < result.eval_loss_before
    assert result.steps == 12 and result.resumed_from_step is None
    assert 0 < result.trainable_params < result.total_params
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lineage.json",
        "loss.png",
    ]
    assert not (tmp_path / ".out.partial").exists()  # checkpoints are gone once the adapter is complete
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.adapter_bytes == (out / "adapter_model.safetensors").stat().st_size

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["base_model"]["fingerprint"] == fingerprint(tiny_base)
    assert lineage["dataset"]["sha256"] == hashlib.sha256(json_data.read_bytes()).hexdigest()
    assert lineage["dataset"] == {**lineage["dataset"], "format": "prompt_completion", "examples": 12}
    assert lineage["hyperparameters"]["rank"] == 8 and lineage["hyperparameters"]["max_steps"] == 12
    assert lineage["seed"] == 42 and lineage["method"] == "lora"
    assert lineage["metrics"]["eval_loss_after"] == pytest.approx(result.eval_loss_after)
    assert lineage["versions"]["torch"].startswith("2.13.0") and lineage["versions"]["peft"]
    assert lineage["git"] is None or len(lineage["git"]["commit"]) == 40

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == str(tiny_base)
    assert card.data.datasets == ["people"] and "lora" in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(result.eval_loss_after, abs=1e-4)


def test_lineage_records_the_git_commit_of_the_surrounding_repository(
    tmp_path: Path, tiny_base: Path, json_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    train(_args(tmp_path, tiny_base, json_data, max_steps=1), echo=lambda _: None)
    assert json.loads((tmp_path / "out" / "lineage.json").read_text())["git"] == {"commit": head, "dirty": False}


def test_adapter_loads_with_plain_peft_and_changes_the_output(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    train(_args(tmp_path, tiny_base, json_data, max_steps=6), echo=lambda _: None)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, tmp_path / "out")
        after = model(ids).logits
    assert not torch.allclose(before, after)
    assert any("lora_B" in name for name, _ in model.named_parameters())


def test_same_seed_gives_the_same_adapter(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    for run in ("a", "b"):
        train(_args(tmp_path, tiny_base, json_data, max_steps=3, output=tmp_path / run), echo=lambda _: None)
    first, second = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_qlora_trains_on_an_nf4_base_on_cpu(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    result = train(_args(tmp_path, tiny_base, json_data, max_steps=12, qlora=True), echo=lambda _: None)
    assert result.eval_loss_after < result.eval_loss_before
    assert json.loads((tmp_path / "out" / "lineage.json").read_text())["method"] == "qlora"

    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=nf4, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, tmp_path / "out")
    assert type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"


@pytest.mark.parametrize("qlora", [False, True])
def test_gradient_checkpointing_trains_to_the_same_eval_loss(
    tmp_path: Path, tiny_base: Path, json_data: Path, qlora: bool
) -> None:
    results = {
        kept: train(
            _args(tmp_path, tiny_base, json_data, max_steps=12, qlora=qlora, gradient_checkpointing=not kept,
                  output=tmp_path / f"kept-{kept}"),
            echo=lambda _: None,
        )
        for kept in (False, True)
    }  # fmt: skip
    assert results[False].eval_loss_after < results[False].eval_loss_before
    assert results[False].eval_loss_after == pytest.approx(results[True].eval_loss_after, rel=0.01)
    weights = load_file(tmp_path / "kept-False" / "adapter_model.safetensors")
    first_layer_b = [v for k, v in weights.items() if "layers.0." in k and "lora_B" in k]
    assert first_layer_b and all(v.abs().sum() > 0 for v in first_layer_b)  # gradients reached the first layer


def test_gradient_checkpointing_is_on_by_default_from_1024_tokens_per_device_batch(json_data: Path) -> None:
    def checkpointed(batch_size: int, seq_len: int, **given: bool) -> bool | None:
        args = TrainArgs(name="x", data=json_data, batch_size=batch_size, seq_len=seq_len, **given)
        return args.gradient_checkpointing

    assert checkpointed(8, 256) is True and checkpointed(2, 512) is True
    assert checkpointed(4, 128) is False and checkpointed(1, 1023) is False
    assert checkpointed(8, 256, gradient_checkpointing=False) is False  # --no-gradient-checkpointing
    assert checkpointed(1, 64, gradient_checkpointing=True) is True


def test_qlora_gradients_after_an_eval_pass_match_a_dequantized_base(tiny_base: Path) -> None:
    """An eval pass must not switch the NF4 layers to bitsandbytes' CPU kernel that has no autograd."""
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model

    from adapterctl.core.base import BaseModel

    torch.manual_seed(0)
    quantized = trainer_module.load_base_model(BaseModel("tiny", tiny_base, None), qlora=True)
    quantized = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    reference = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    for name, module in quantized.named_modules():  # give the reference the very same (dequantized) weights
        if type(module).__name__ == "Linear4bit":
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            reference.get_submodule(
                name.replace("base_model.model.", "").replace(".base_layer", "")
            ).weight.data = weight
    reference = get_peft_model(reference, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    reference.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.tensor([[1, 5, 9, 14, 20, 31]])
    quantized.eval()
    with torch.no_grad():
        quantized(ids)  # the eval-loss pass training runs first
    quantized.train()
    grads = []
    for model in (quantized, reference):
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_resume_continues_from_it(
    tmp_path: Path, tiny_base: Path, json_data: Path, signal_at_step, signum: int
) -> None:
    signal_at_step(5, signum)
    args = _args(tmp_path, tiny_base, json_data, max_steps=10, save_steps=2)
    with pytest.raises(TrainingInterrupted, match=r"Interrupted at step 5/10"):
        train(args, echo=lambda _: None)
    assert not (tmp_path / "out").exists()  # nothing half-written where the adapter goes
    assert (tmp_path / ".out.partial" / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    lines: list[str] = []
    result = train(args, echo=lines.append)
    assert result.resumed_from_step == 5 and result.steps == 10
    assert "Resuming from step 5" in "\n".join(lines)
    lineage = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert lineage["resumed_from_step"] == 5 and lineage["metrics"]["steps"] == 10


def test_resume_after_sigkill_continues_from_the_last_complete_checkpoint(
    tmp_path: Path, tiny_base: Path, json_data: Path
) -> None:
    command = _cli(tmp_path, tiny_base, json_data, "--max-steps", "60", "--save-steps", "4")
    checkpoints = tmp_path / ".out.partial" / "checkpoints"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None and time.monotonic() < deadline, "training ended before a checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out").exists()
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))

    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"Resuming from step {saved}" in done.stdout
    assert json.loads((tmp_path / "out" / "lineage.json").read_text())["metrics"]["steps"] == 60


def test_resume_refuses_different_settings(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"hyperparameters": {"rank": 99}, "dataset_sha256": "x", "base": "y"}))
    with pytest.raises(TrainingError, match="interrupted run with different settings"):
        train(_args(tmp_path, tiny_base, json_data, max_steps=2), echo=lambda _: None)
    result = train(_args(tmp_path, tiny_base, json_data, max_steps=2, overwrite=True), echo=lambda _: None)
    assert result.resumed_from_step is None


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already exists"):
        train(_args(tmp_path, tiny_base, json_data, max_steps=2), echo=lambda _: None)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    command = _cli(tmp_path, tiny_base, json_data, "--max-steps", "2000")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / ".out.partial" / "run.json").exists():  # the first run holds the lock by now
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(TrainingError, match="Another training run is writing"):
            train(_args(tmp_path, tiny_base, json_data, max_steps=2), echo=lambda _: None)
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "", " ", "Upper", "caf\u00e9", "x" * 65, "-lead", "a.b"])
def test_bad_adapter_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidName, match="is not allowed"):
        TrainArgs(name=name, data=tmp_path / "d.jsonl")


@pytest.mark.parametrize("num_items", [None, 23])
def test_chunked_loss_matches_the_plain_loss_and_its_gradients(tiny_base: Path, monkeypatch, num_items) -> None:
    from peft import LoraConfig, get_peft_model

    from adapterctl.train import loss

    monkeypatch.setattr(loss, "CHUNK_TOKENS", 5)  # several chunks, the last one short
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    plain, chunked = (get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config) for _ in range(2))
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 1000, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # prompts are not scored
    labels[2, 9:] = -100  # padding
    expected = plain(ids, labels=labels, num_items_in_batch=num_items).loss
    scorer = loss.ChunkedLoss(chunked)
    got = scorer(chunked(ids), labels, num_items_in_batch=num_items)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    got.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_the_lighter_defaults_leave_the_eval_loss_where_it_was(
    tmp_path: Path, tiny_base: Path, json_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lighter = train(_args(tmp_path, tiny_base, json_data, max_steps=12, output=tmp_path / "a"), echo=lambda _: None)
    build = trainer_module.build_trainer
    monkeypatch.setattr(trainer_module, "build_trainer", lambda *a, **k: build(*a, **k, plain_loss=True))  # as before
    before = train(
        _args(tmp_path, tiny_base, json_data, max_steps=12, output=tmp_path / "b", dropout=0.05), echo=lambda _: None
    )
    assert lighter.eval_loss_after == pytest.approx(before.eval_loss_after, rel=0.01)


def test_training_threads_follow_the_cores_other_processes_leave_free(monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine's load cannot be set from a test, so /proc/stat's busy time says what another process took.
    from adapterctl.train import threads

    clock, others, current = [0.0], [0.0], [2]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(threads, "busy_seconds", lambda allowed: others[0])
    monkeypatch.setattr(threads, "cpus", lambda: [0, 1])
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: current[0])
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: current.__setitem__(0, n))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = threads.ShareCpus(period=5.0)
    seen = []
    for second in range(1, 13):
        if 2 < second <= 8:  # another process keeps one core busy from 2 s to 8 s
            others[0] += 1.0
        clock[0] = float(second)
        share.on_step_begin(None, None, None)
        seen.append(current[0])
    # Checked at the first step (0-1 s: quiet), at 6 s (1-6 s: 4 of 5 s busy) and at 11 s (6-11 s: 2 of 5 s).
    assert seen == [2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 2, 2]


def test_eval_steps_keep_the_best_checkpoint_and_tensorboard_shows_the_run(
    tmp_path: Path, tiny_base: Path, json_data: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines: list[str] = []
    result = train(_args(tmp_path, tiny_base, json_data, max_steps=12, eval_steps=4, lr=3e-2), echo=lines.append)
    lineage = json.loads((tmp_path / "out" / "lineage.json").read_text())
    folder = Path(lineage["logs"]["folder"])
    assert lineage["logs"]["report_to"] == "tensorboard"
    assert folder.parent == tmp_path / "out.logs"  # beside the adapter, one folder per run
    events = EventAccumulator(str(folder))
    events.Reload()
    evals = events.Scalars("eval/loss")
    assert [e.step for e in evals] == [0, 4, 8, 12, 12]  # before, every 4 steps, after (on the best checkpoint)
    assert len(events.Scalars("train/loss")) == 12
    during = {e.step: e.value for e in evals[1:-1]}
    best = min(during, key=during.get)
    assert lineage["metrics"]["best_step"] == best
    assert result.eval_loss_after == pytest.approx(during[best], rel=1e-4)  # the adapter written is the best one
    assert evals[-1].value == pytest.approx(result.eval_loss_after, rel=1e-6)
    assert f"(the best checkpoint, step {best})" in "\n".join(lines)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("optim", "adamw_typo", "Invalid value for --optim: 'adamw_typo'; choose one of adamw_torch, "),
        ("lr_scheduler", "cosin", "Invalid value for --lr-scheduler: 'cosin'; choose one of linear, cosine, "),
        (
            "report_to",
            "comet",
            "Invalid value for --report-to: 'comet'; choose one of tensorboard, mlflow, wandb, none.",
        ),
        ("report_to", "wandb", r"--report-to wandb needs the wandb package: pip install it."),
        ("eval_steps", 5, "--eval-steps needs an eval split; pass --eval-fraction above 0."),
    ],
)
def test_training_options_are_checked_in_one_line(tmp_path: Path, option: str, value: object, message: str) -> None:
    if option == "report_to" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    extra = {"eval_fraction": 0.0} if option == "eval_steps" else {}
    with pytest.raises(TrainingError, match=re.escape(message)):
        TrainArgs(name="people", data=tmp_path / "d.jsonl", **{option: value}, **extra)


def test_gpus_without_bf16_train_in_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert trainer_module.compute_dtype() == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert trainer_module.compute_dtype() == "bfloat16"


def test_each_step_gives_memory_freed_in_the_c_heap_back_to_the_system() -> None:
    from adapterctl.core.memory import resident_bytes, trim
    from adapterctl.train.heap import TrimHeap

    if not trim():
        pytest.skip("this C library has no malloc_trim")
    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 125 MB in the C heap: each is below its mmap threshold
    last = blocks[-1]
    del blocks  # freed, but below a live block: glibc keeps it resident
    before = resident_bytes()
    TrimHeap().on_step_end(None, None, None)
    assert resident_bytes() < before - 100 * 2**20 and len(last) == 64 * 1024
