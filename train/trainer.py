"""LoRA / QLoRA supervised fine-tuning with resumable checkpoints and an atomic output folder."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from adapterctl.core.errors import BaseModelError, DataError, TrainingError, TrainingInterrupted
from adapterctl.train import card, data, fidelity
from adapterctl.train.heap import TrimHeap
from adapterctl.train.loss import ChunkedLoss
from adapterctl.train.threads import ShareCpus
from adapterctl.core.base import BaseModel, fingerprint, resolve_base
from adapterctl.core.cache import home, locked
from adapterctl.core.precision import Precision, quantization_config
from adapterctl.registry.folder import WEIGHTS
from adapterctl.train.config import TrainArgs
from adapterctl.train.distributed import Ranks, local_rank

RUN_FILE = "run.json"  # inside the partial folder: the settings a resume must match
REENTRANT_OFF = {"use_reentrant": False}  # reentrant checkpointing breaks DDP's gradient hooks and frozen inputs


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output: Path
    steps: int
    resumed_from_step: int | None
    trainable_params: int
    total_params: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss: float
    adapter_bytes: int
    peak_memory_bytes: int
    seconds: float


def device() -> str:
    """The device this process trains on: its own GPU (LOCAL_RANK under a launcher) if there are GPUs, else CPU."""
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def compute_dtype() -> str:
    """bf16 on GPUs that have it, fp16 on older ones (T4, V100); on CPUs fp32 matmuls are faster and safer."""
    if device() == "cpu":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def training_precision(qlora: bool) -> Precision:
    """The form of the base weights a run trains against: NF4 for QLoRA, as saved for LoRA."""
    return Precision.of("nf4" if qlora else "none", compute_dtype())


def load_base_model(base: BaseModel, qlora: bool, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """Load the base model in full precision for LoRA, or in 4-bit NF4 with double quantization for QLoRA."""
    dtype = getattr(torch, training_precision(qlora).compute_dtype)
    options: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "device_map": {"": device()}}
    if qlora:
        options["quantization_config"] = quantization_config("nf4", dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, **options)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        hint = " (QLoRA needs bitsandbytes; --no-qlora trains plain LoRA)" if qlora else ""
        raise BaseModelError(f"Cannot load base model {base.name}{hint}: {exc}".splitlines()[0]) from None
    if not qlora:
        return model
    # bitsandbytes repacks NF4 weights for a CPU inference kernel the first time a layer runs in eval mode
    # (our eval-loss pass); that kernel has no autograd, so later training steps would lose the gradient
    # through the base weights. Keep the trainable layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=REENTRANT_OFF
    )


def tokenized_splits(examples: data.Examples, tokenizer: Any, args: TrainArgs) -> tuple[list, list]:
    """The train and eval splits, tokenized; examples whose answer falls beyond --seq-len are dropped."""
    train_ids, eval_ids = data.split(len(examples.conversations), args.eval_fraction, args.seed)
    train_set, eval_set = (
        [t for i in ids if (t := data.tokenize(examples.conversations[i], tokenizer, args.seq_len))]
        for ids in (train_ids, eval_ids)
    )
    if not train_set:
        raise DataError(f"{args.data}: no training example keeps an answer within --seq-len {args.seq_len}.")
    return train_set, eval_set


def add_lora(model: PreTrainedModel, args: TrainArgs, base: BaseModel) -> PeftModel:
    """Wrap the base model with a fresh LoRA adapter shaped by args."""
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainingError(f"Cannot apply LoRA to {base.name}: {exc}") from None


def build_trainer(
    model: PreTrainedModel,
    tokenizer: Any,
    train_set: list,
    eval_set: list,
    args: TrainArgs,
    checkpoints: Path,
    plain_loss: bool = False,
    log_dir: Path | None = None,
) -> Trainer:
    """A transformers Trainer set up for our runs: the chunked loss (or, plain_loss, the model's own over full
    logits: the benchmark's reference), checkpoints every save_steps (at each evaluation with eval_steps, keeping
    the best), our progress bar, threads that share the CPU, metrics to args.report_to (TensorBoard in log_dir)."""
    dtype = compute_dtype()
    settings = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        warmup_steps=0.05,
        lr_scheduler_type=args.lr_scheduler,
        optim=args.optim,
        logging_steps=1,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps or args.save_steps,  # the best checkpoint is one saved at an evaluation
        save_total_limit=2,  # the latest, and the best when it is another
        load_best_model_at_end=bool(args.eval_steps),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=[] if args.report_to in ("none", "tensorboard") else [args.report_to],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=device() == "cpu",
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        remove_unused_columns=False,
        disable_tqdm=True,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs=REENTRANT_OFF,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
        dataloader_pin_memory=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=data.IGNORE_INDEX, padding=True)
    trainer = Trainer(
        model=model,
        args=settings,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=collator,
        compute_loss_func=None if plain_loss else ChunkedLoss(model),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if trainer.is_world_process_zero():
        trainer.add_callback(LossBar())
    trainer.add_callback(ShareCpus())
    trainer.add_callback(TrimHeap())
    if args.report_to == "tensorboard" and log_dir is not None:
        from transformers.integrations import TensorBoardCallback

        board = TensorBoardCallback()
        board.logging_dir = str(log_dir)  # its only other source is an environment variable, for every run at once
        trainer.add_callback(board)
    return trainer


class LossBar(TrainerCallback):
    """A progress bar over optimizer steps that shows the running (smoothed) training loss."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.running: float | None = None
        self.eval: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "eval_loss" in logs:
            self.eval = logs["eval_loss"]
        if self.bar is not None and logs and "loss" in logs:
            loss = logs["loss"]
            self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
            shown = {"loss": f"{self.running:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
            self.bar.set_postfix(shown if self.eval is None else {**shown, "eval loss": f"{self.eval:.4f}"})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class StopOnSignal(TrainerCallback):
    """On Ctrl-C or SIGTERM, finish the current step, save a checkpoint and stop; a second Ctrl-C aborts.

    Across processes every rank stops after the same step, and a second Ctrl-C does not abort: the launcher passes
    the first one on to its workers, which already had it from the terminal.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def request_stop(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        """Ask training to stop after the current step (the signal handler; tests call it directly)."""
        self.stopped = True
        if self.ranks.world_size == 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self.request_stop)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stopped = self.ranks.any(self.stopped)
        if self.stopped:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _step_of(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint folder (checkpoint-N) was saved at."""
    return int(checkpoint.name.rsplit("-", 1)[1])


def peak_memory_bytes() -> int:
    """Peak memory of this process so far: GPU memory allocated on CUDA, else resident set size."""
    if device() != "cpu":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _resume_point(partial: Path, run: dict[str, Any], overwrite: bool) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint an interrupted run with identical settings left behind, and that run's record."""
    run_file = partial / RUN_FILE
    if overwrite or not run_file.is_file():
        shutil.rmtree(partial, ignore_errors=True)
        return None, run
    previous = json.loads(run_file.read_text())
    same = {k: previous.get(k) for k in run} == run
    if not same:
        raise TrainingError(
            f"{partial} holds an interrupted run with different settings, data or base model; "
            f"re-run it with the same settings to resume, or pass --overwrite to start over."
        )
    # trainer_state.json is written last: a checkpoint without it was cut short by a kill and is dropped.
    found = sorted((partial / "checkpoints").glob("checkpoint-*"), key=_step_of)
    complete = [c for c in found if (c / "trainer_state.json").is_file()]
    for broken in set(found) - set(complete):
        shutil.rmtree(broken)
    return (complete[-1] if complete else None), previous


def train(args: TrainArgs, echo: Callable[[str], None] = print) -> TrainResult | None:
    """Train one adapter from args.data on args.base and write it, complete, to args.output.

    Under a launcher (torchrun, accelerate launch) every process calls this; rank 0 returns the result, the others
    None.
    """
    output: Path = args.output
    partial = output.parent / f".{output.name}.partial"
    ranks = Ranks.start()
    if not ranks.main:
        return _train(args, lambda _: None, output, partial, ranks)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise TrainingError(f"{output} already exists and is not empty; pass --overwrite or another --output.")
    # One run per output folder: a second one would share (and wreck) the first one's checkpoints.
    lock_name = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]
    try:
        with locked(home() / "locks" / f".{lock_name}.lock", wait=False):
            return _train(args, echo, output, partial, ranks)
    except BlockingIOError:
        raise TrainingError(f"Another training run is writing {output}; wait or pick another --output.") from None


def _train(
    args: TrainArgs, echo: Callable[[str], None], output: Path, partial: Path, ranks: Ranks
) -> TrainResult | None:
    """The run itself: rank 0 under the output folder's lock; the other ranks follow its resume point."""
    started = time.monotonic()
    examples = data.load(args.data)
    base = resolve_base(args.base)
    base_fingerprint = fingerprint(base.path)
    run = {
        "hyperparameters": args.hyperparameters(),
        "dataset_sha256": examples.sha256,
        "base": base_fingerprint,
        "world_size": ranks.world_size,
    }
    # Rank 0 alone looks at (and cleans) the partial folder; a failure there ends the launch, and every rank with it.
    checkpoint, run = ranks.share(_resume_point(partial, run, args.overwrite) if ranks.main else None)
    resumed_from_step = _step_of(checkpoint) if checkpoint else None
    # A resumed run logs on in the folder it started (run.json keeps it).
    run.setdefault("log_dir", str(args.log_dir or Path(f"{output}.logs") / time.strftime("%Y%m%d-%H%M%S")))
    log_dir = Path(run["log_dir"]) if args.report_to == "tensorboard" else None

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    train_set, eval_set = tokenized_splits(examples, tokenizer, args)
    echo(f"Data: {examples.path} ({examples.format}), {len(train_set)} train / {len(eval_set)} eval examples")

    torch.manual_seed(args.seed)  # LoRA's A matrices are initialised randomly
    model = add_lora(load_base_model(base, args.qlora, args.gradient_checkpointing), args, base)
    trainable, total = model.get_nb_trainable_parameters()
    method = "QLoRA (NF4 base)" if args.qlora else "LoRA"
    echo(f"{method} on {base.name}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    per_step = args.batch_size * args.grad_accum * ranks.world_size
    echo(
        f"Batch: {args.batch_size} per device x {args.grad_accum} accumulated x {ranks.world_size} "
        f"process{'es' if ranks.world_size > 1 else ''} = {per_step} examples per optimizer step"
    )

    trainer = build_trainer(model, tokenizer, train_set, eval_set, args, partial / "checkpoints", log_dir=log_dir)
    stopper = StopOnSignal(ranks)
    trainer.add_callback(stopper)
    if checkpoint is None:
        # One evaluation, its batches shared between the ranks; rank 0 records it.
        run["eval_loss_before"] = trainer.evaluate()["eval_loss"] if eval_set else None
        if ranks.main:
            partial.mkdir(parents=True, exist_ok=True)
            (partial / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    else:
        echo(f"Resuming from step {resumed_from_step} ({checkpoint})")
    if log_dir is not None:
        echo(f"TensorBoard: tensorboard --logdir {log_dir}")
    if run["eval_loss_before"] is not None:
        echo(f"eval loss before: {run['eval_loss_before']:.4f}")

    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.stopped:
        raise TrainingInterrupted(
            f"Interrupted at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint saved in "
            f"{partial}. Run the same command again to resume."
        )
    history = list(trainer.state.log_history)  # the curve of training, without the evaluation after it
    eval_after = trainer.evaluate()["eval_loss"] if eval_set else None
    if not ranks.main:
        return None
    best_step = trainer.state.best_global_step if args.eval_steps else None
    if eval_after is not None:
        echo(f"eval loss after:  {eval_after:.4f}" + (f" (the best checkpoint, step {best_step})" if best_step else ""))

    staging = partial / "final"
    shutil.rmtree(staging, ignore_errors=True)
    # Cite the base by Hub id when known; no vocabulary lookup on the Hub (embeddings are never trained here).
    model.peft_config["default"].base_model_name_or_path = base.hub_id or base.name
    model.save_pretrained(staging, save_embedding_layers=False)
    precision = training_precision(args.qlora)
    measured = None
    if args.fidelity_examples and eval_set:
        echo(f"Measuring the adapter's effect on each serving precision ({args.fidelity_examples} eval examples)...")
        measured = fidelity.measure(base, staging, precision, eval_set[: args.fidelity_examples])
        echo(fidelity.summary(measured))
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss_before": run["eval_loss_before"],
        "eval_loss_after": eval_after,
        "steps": trainer.state.global_step,
        "best_step": best_step,
    }
    lineage = card.lineage(
        args,
        base,
        base_fingerprint,
        examples,
        metrics,
        counts={"train": len(train_set), "eval": len(eval_set), "trainable": trainable, "total": total},
        resumed_from_step=resumed_from_step,
        precision=precision,
        fidelity=measured,
        world_size=ranks.world_size,
        logs={"report_to": args.report_to, "folder": str(log_dir) if log_dir else None},
    )
    card.write(staging, lineage, history)
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(output)
    shutil.rmtree(partial)

    adapter_bytes = (output / WEIGHTS).stat().st_size  # safetensors only: never a pickle beside it
    return TrainResult(
        output=output,
        steps=trainer.state.global_step,
        resumed_from_step=resumed_from_step,
        trainable_params=trainable,
        total_params=total,
        eval_loss_before=run["eval_loss_before"],
        eval_loss_after=eval_after,
        train_loss=result.training_loss,
        adapter_bytes=adapter_bytes,
        peak_memory_bytes=peak_memory_bytes(),
        seconds=time.monotonic() - started,
    )
