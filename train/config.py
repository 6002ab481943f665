"""The settings of one training run."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterctl.core.errors import TrainingError
from adapterctl.registry.names import check_name

REPORTERS = ["tensorboard", "mlflow", "wandb", "none"]
# Tokens per device batch from which gradient checkpointing is on by default: at 1,024 a LoRA step's activations on
# SmolLM2-135M already outweigh its weights (bench/train_memory.py), and the recomputation costs less than it saves.
CHECKPOINT_TOKENS = 1024


def _check_choice(option: str, value: str, choices: list[str]) -> None:
    """One line naming the choices when VALUE is not one of them."""
    if value not in choices:
        raise TrainingError(f"Invalid value for --{option}: {value!r}; choose one of {', '.join(choices)}.")


@dataclass
class TrainArgs:
    """Every knob of `adapters train`; defaults suit a small model on a laptop CPU."""

    name: str
    """Adapter name: lowercase letters, digits, '_' and '-', at most 64 characters."""
    data: Path
    """JSONL dataset in chat, prompt/completion or Alpaca format."""
    output: Path | None = None
    """Folder for the finished adapter; default: ./runs/NAME."""
    base: str | None = None
    """Base model: a local HF folder or a Hub id; default (None): the embedded SmolLM2-135M-Instruct."""
    qlora: bool = True
    """Train against the base in 4-bit NF4, as `adapters serve` loads it; --no-qlora: the weights as saved."""
    rank: int = 8
    """LoRA rank r."""
    alpha: int = 16
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input; above 0 every wrapped layer keeps a copy of its input for the backward pass."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get LoRA; "all-linear" means every linear layer except the output head."""
    epochs: float = 3.0
    """Passes over the training split (ignored when max-steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float = 2e-4
    """Peak learning rate, reached after a warm-up of 5% of the steps."""
    lr_scheduler: str = "linear"
    """How the learning rate decays after the warm-up: any of transformers' SchedulerType (cosine, constant, ...)."""
    optim: str = "adamw_torch_fused"
    """Optimizer: any of transformers' OptimizerNames (adamw_torch, adamw_8bit, adafactor, sgd, ...)."""
    batch_size: int = 4
    """Examples per forward pass on each device; under torchrun the global batch is this x grad-accum x processes."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    seq_len: int = 512
    """Tokens per example; longer examples are truncated."""
    seed: int = 42
    """Seed for the split, LoRA initialisation and data order."""
    eval_fraction: float = 0.1
    """Share of the examples held out to measure eval loss before and after training."""
    eval_steps: int | None = None
    """Evaluate every this many steps and keep the best checkpoint: the adapter written is the one of lowest eval
    loss (its step in lineage); checkpoints are then saved at each evaluation."""
    save_steps: int = 25
    """Write a resumable checkpoint every this many steps."""
    gradient_checkpointing: bool | None = None
    """Recompute each layer's activations in the backward pass instead of keeping them; default: on when a device
    batch holds 1,024 tokens or more (--batch-size x --seq-len), where activations outgrow a small model's weights."""
    report_to: str | None = None
    """Where metrics go while training: tensorboard, mlflow, wandb or none; default tensorboard if installed."""
    log_dir: Path | None = None
    """Folder for TensorBoard event files; default: OUTPUT.logs/<start time> beside the output folder."""
    overwrite: bool = False
    """Replace an existing finished adapter in the output folder."""
    fidelity_examples: int = 16
    """Eval examples on which the adapter's effect is measured on nf4, int8 and none after training; 0 skips."""

    def __post_init__(self) -> None:
        check_name(self.name)
        self.data = Path(self.data)
        self.output = Path(self.output) if self.output else Path("runs") / self.name
        checks = {
            "rank": self.rank >= 1,
            "alpha": self.alpha >= 1,
            "dropout": 0 <= self.dropout < 1,
            "epochs": self.epochs > 0,
            "max-steps": self.max_steps is None or self.max_steps >= 1,
            "lr": self.lr > 0,
            "batch-size": self.batch_size >= 1,
            "grad-accum": self.grad_accum >= 1,
            "seq-len": self.seq_len >= 8,
            "eval-fraction": 0 <= self.eval_fraction < 1,
            "eval-steps": self.eval_steps is None or self.eval_steps >= 1,
            "save-steps": self.save_steps >= 1,
            "fidelity-examples": self.fidelity_examples >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise TrainingError(f"Invalid value for --{bad[0]}: {getattr(self, bad[0].replace('-', '_'))!r}.")
        if self.eval_steps and not self.eval_fraction:
            raise TrainingError("--eval-steps needs an eval split; pass --eval-fraction above 0.")
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.batch_size * self.seq_len >= CHECKPOINT_TOKENS
        self.log_dir = Path(self.log_dir) if self.log_dir else None
        self.report_to = self.report_to or ("tensorboard" if importlib.util.find_spec("tensorboard") else "none")
        _check_choice("report-to", self.report_to, REPORTERS)
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise TrainingError(f"--report-to {self.report_to} needs the {self.report_to} package: pip install it.")
        # transformers is imported only here, where a run is about to load it anyway, not for `adapters --help`.
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        _check_choice("lr-scheduler", self.lr_scheduler, [s.value for s in SchedulerType])
        _check_choice("optim", self.optim, [o.value for o in OptimizerNames])

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that shape the weights (no paths), as recorded in lineage and checked on resume."""
        values = asdict(self)
        for key in ("name", "data", "output", "overwrite", "fidelity_examples", "report_to", "log_dir"):
            values.pop(key)
        return values
