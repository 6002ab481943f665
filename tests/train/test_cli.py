"""`adapters train` as a user meets it: what it prints, exit codes, one-line errors."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from click.testing import CliRunner

from adapterctl.cli import main


def _train(*args: str):  # noqa: ANN202
    return CliRunner().invoke(main, ["train", *args])


def test_train_prints_parameters_losses_size_and_memory(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    out = tmp_path / "adapter"
    result = _train("people", "--data", str(json_data), "--base", str(tiny_base), "--max-steps", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "trainable params" in result.stdout and "%)" in result.stdout
    assert "eval loss before:" in result.stdout and "eval loss after:" in result.stdout
    assert f"Adapter 'people' written to {out} in 3 steps" in result.stdout
    assert "adapter size" in result.stdout and "peak memory" in result.stdout
    assert (out / "adapter_model.safetensors").is_file()


def test_malformed_data_is_one_line_and_exit_2(tmp_path: Path, tiny_base: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    result = _train("x", "--data", str(data), "--base", str(tiny_base))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {data}:2: not valid JSON (Expecting value at column 12)."
    assert "Traceback" not in result.output


def test_user_mistakes_exit_non_zero_without_traceback(tmp_path: Path, tiny_base: Path, json_data: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    cases = [
        (["../evil", "--data", str(json_data)], 2, "is not allowed"),
        (["ok", "--data", str(json_data), "--rank", "0"], 4, "Invalid value for --rank: 0"),
        (["ok", "--data", str(json_data), "--base", str(tmp_path / "missing")], 3, "is not a local folder"),
        (["ok", "--data", str(tmp_path / "none.jsonl")], 2, "no such file"),
        (["ok", "--data", str(json_data), "--base", str(broken), "-o", str(tmp_path / "o")], 3, "Cannot load base"),
        (
            ["ok", "--data", str(json_data), "--base", str(tiny_base), "--target-modules", "nope"],
            4,
            "Cannot apply LoRA",
        ),
    ]
    for args, code, message in cases:
        result = _train(*args)
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output
        # One line of ours, last; libraries may log their own warnings before it.
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0] and result.stderr.strip().endswith(errors[0])


def test_interrupted_training_exits_130_and_says_how_to_resume(
    tmp_path: Path, tiny_base: Path, json_data: Path, signal_at_step
) -> None:
    signal_at_step(2, signal.SIGINT)
    args = ["people", "--data", str(json_data), "--base", str(tiny_base), "--max-steps", "6", "-o", str(tmp_path / "a")]
    result = _train(*args)
    assert result.exit_code == 130
    assert "Interrupted at step 2/6" in result.stderr and "Run the same command again to resume" in result.stderr
    resumed = _train(*args)
    assert resumed.exit_code == 0 and "Resuming from step 2" in resumed.stdout
