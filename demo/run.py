"""The demo: train pirate-voice LoRA adapters on the embedded SmolLM2-135M-Instruct, version them like code.

Train two versions inside a fresh adapter repository, promote, push to a local remote, clone it as a
server would, pull `pirate#prod`, compare answers, roll back, pull again. Everything happens in a temp folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = Path(sys.executable).with_name("adapters")  # the console script installed beside this Python
COLUMN = 46


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _identity() -> dict[str, str]:
    """Commits record an author; on a machine where git has none yet, the demo signs as itself."""
    if subprocess.run(["git", "config", "user.email"], capture_output=True).returncode == 0:
        return {}
    return {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER") for what, value in
            (("NAME", "adapters demo"), ("EMAIL", "demo@adapters.invalid"))}  # fmt: skip


ENV = {**os.environ, **_identity()}


def _run(*args: str, cwd: Path) -> None:
    print(f"$ adapters {' '.join(args)}", flush=True)
    subprocess.run([str(ADAPTERS), *args], check=True, cwd=cwd, env=ENV)


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def _columns(left: str, right: str) -> str:
    """Two answers side by side, wrapped to fixed-width columns."""
    lefts, rights = textwrap.wrap(left, COLUMN) or [""], textwrap.wrap(right, COLUMN) or [""]
    height = max(len(lefts), len(rights))
    lefts += [""] * (height - len(lefts))
    rights += [""] * (height - len(rights))
    return "\n".join(f"  {a:<{COLUMN}} | {b}" for a, b in zip(lefts, rights))


TRAIN = ["--data", str(ROOT / "examples" / "pirate.jsonl"), "--lr", "1e-3", "--batch-size", "8", "--seq-len", "256"]


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="adapters-demo-"))
    registry, server, origin = work / "registry", work / "server", work / "origin.git"
    try:
        _step("1. The embedded base model (converted from its GGUF once, then cached)")
        _run("models", "prepare", cwd=work)

        _step("2. An adapter repository (git + DVC) with a local remote")
        _run("init", str(registry), cwd=work)
        _run("remote", "add", "origin", str(origin), cwd=registry)

        _step("3. Train twice inside it: each run is registered as a new version")
        for version, length, message in (
            ("v1.0.0", ["--max-steps", "8"], "quick cut"),
            ("v1.1.0", ["--epochs", "1"], "full epoch"),
        ):
            output = str(work / "runs" / version)
            _run("train", "pirate", *TRAIN, *length, "-o", output, "-m", message, cwd=registry)
            _run("promote", f"pirate@{version}", "--stage", "prod", cwd=registry)
        _run("log", "pirate", cwd=registry)

        _step("4. Push (adapter files first, then git refs), clone as a server would, pull pirate#prod")
        _run("push", cwd=registry)
        _run("clone", str(origin), str(server), cwd=work)
        _run("pull", "pirate#prod", cwd=server)
        _run("checkout", "pirate#prod", "-o", str(work / "prod-before"), cwd=server)
        print(f"pirate#prod on the server: adapter_model.safetensors sha256 {_sha(work / 'prod-before')}...")

        _step("5. Held-out questions: base model vs base + pirate#prod (greedy)")
        from train import compare
        from train.base import resolve_base

        model, tokenizer = compare.load(resolve_base(None), work / "prod-before")
        questions = (ROOT / "examples" / "pirate_heldout.txt").read_text().splitlines()[:4]
        for question, (plain, pirate) in zip(questions, compare.side_by_side(model, tokenizer, questions, 64)):
            print(f"\nQ: {question}")
            print(_columns("base", "pirate#prod adapter"))
            print(_columns("-" * 4, "-" * 19))
            print(_columns(plain, pirate))

        _step("6. Roll prod back to the previous version, push, and pull again on the server")
        _run("rollback", "pirate", "--stage", "prod", cwd=registry)
        _run("push", cwd=registry)
        _run("pull", "pirate#prod", cwd=server)
        _run("show", "pirate#prod", cwd=server)
        _run("checkout", "pirate#prod", "-o", str(work / "prod-after"), cwd=server)
        if _sha(work / "prod-after") != _sha(work / "runs" / "v1.0.0"):
            raise SystemExit("pirate#prod on the server does not match the v1.0.0 training output")
        print(f"pirate#prod on the server now: sha256 {_sha(work / 'prod-after')}..., byte-identical to v1.0.0")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
