"""Training across two processes on the CPU (torchrun, gloo) on the tiny model: one adapter, one version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterctl.registry.repo import Registry
from adapterctl.train.config import TrainArgs
from adapterctl.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["--no-qlora", "--lr", "5e-3", "--seq-len", "64", "--eval-fraction", "0.25", "--max-steps", "12",
            "--fidelity-examples", "0"]  # fmt: skip


def torchrun(processes: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node PROCESSES adapters ARGS`, on a free local port."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launcher, "-m", "adapterctl.cli", *args]


def test_two_processes_train_one_adapter_as_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_base: Path, json_data: Path
) -> None:
    registry, _ = Registry.init(tmp_path / "registry")
    command = torchrun(2, "train", "people", "--data", str(json_data), "--base", str(tiny_base), "--batch-size", "2",
                       *SETTINGS)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=registry.root, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Batch: 2 per device x 1 accumulated x 2 processes = 4 examples per optimizer step" in done.stdout
    assert done.stdout.count("Registered people@v") == 1
    tags = subprocess.run(["git", "tag", "-l", "people@*"], cwd=registry.root, capture_output=True, text=True)
    assert tags.stdout.split() == ["people@v1.0.0"]
    lineage = json.loads((registry.root / "runs" / "people" / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and lineage["metrics"]["steps"] == 12

    alone = train(
        TrainArgs(name="people", data=json_data, base=str(tiny_base), output=tmp_path / "alone", batch_size=4,
                  qlora=False, lr=5e-3, seq_len=64, eval_fraction=0.25, max_steps=12, fidelity_examples=0),
        echo=lambda _: None,
    )  # fmt: skip
    assert lineage["metrics"]["eval_loss_after"] == pytest.approx(alone.eval_loss_after, rel=0.02)
    # The eval batches are shared between the ranks: each rank's mean loss is weighed by examples, not tokens.
    assert lineage["metrics"]["eval_loss_before"] == pytest.approx(alone.eval_loss_before, rel=0.01)


def test_ctrl_c_stops_every_rank_at_one_checkpoint_and_the_same_command_resumes(
    tmp_path: Path, tiny_base: Path, json_data: Path
) -> None:
    import signal
    import time

    registry, _ = Registry.init(tmp_path / "registry")
    command = torchrun(2, "train", "people", "--data", str(json_data), "--base", str(tiny_base), "--batch-size", "2",
                       *SETTINGS[:-4], "--max-steps", "80", "--save-steps", "1000",
                       "--fidelity-examples", "0")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a terminal's Ctrl-C reaches the launcher and its workers: one process group
        launch = subprocess.Popen(command, cwd=registry.root, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  env=env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while "loss=" not in log.read_text():  # training has begun: steps are logged
            assert launch.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        os.killpg(launch.pid, signal.SIGINT)
        stdout, _ = launch.communicate(timeout=300)
    assert launch.returncode != 0
    assert "Interrupted at step" in log.read_text() + stdout
    checkpoints = list((registry.root / "runs" / ".people.partial" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 80

    done = subprocess.run(command, cwd=registry.root, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Resuming from step {step}" in done.stdout
    lineage = json.loads((registry.root / "runs" / "people" / "lineage.json").read_text())
    assert lineage["resumed_from_step"] == step and lineage["metrics"]["steps"] == 80
    assert done.stdout.count("Registered people@v1.0.0") == 1
