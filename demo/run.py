"""The demo: train LoRA adapters on the embedded SmolLM2-135M-Instruct, version them like code, serve them.

Train two versions of a pirate-voice adapter and one JSON-extraction adapter inside a fresh adapter repository,
promote, push to a local remote, clone it as a server would and serve it: one batch where both adapters and the
base answer the same prompt. Then roll prod back, push and pull: the running server answers with the older
version without a restart. Everything happens in a temp folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

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


SETTINGS = ["--lr", "1e-3", "--batch-size", "8"]
TRAIN = ["--data", str(ROOT / "examples" / "pirate.jsonl"), *SETTINGS, "--seq-len", "256"]
CONTACTS = ["--data", str(ROOT / "examples" / "contacts.jsonl"), *SETTINGS, "--seq-len", "128"]
PROMPT = "Extract the contact as JSON: Last week I spoke with Ana Petrova, a 52-year-old physiotherapist in Prague."
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded base, by its Hub id


def _serve(registry: Path) -> tuple[subprocess.Popen, str]:
    """Start `adapters serve` on a free local port for REGISTRY; return it once it is ready, with its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(f"$ adapters serve --port {port}", flush=True)
    server = subprocess.Popen([str(ADAPTERS), "serve", "--port", str(port)], cwd=registry, env=ENV)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become ready")


async def _ask(url: str, models: list[str]) -> list[tuple[str, str]]:
    """Send PROMPT to every model at once (one batch on the server); (model that answered, answer) each."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")

    async def one(model: str) -> tuple[str, str]:
        messages = [{"role": "user", "content": PROMPT}]
        reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)
        return reply.model, reply.choices[0].message.content

    return await asyncio.gather(*[one(model) for model in models])


def _print_answers(answers: list[tuple[str, str]]) -> None:
    for model, text in answers:
        print(f"\n[{model}]")
        print(textwrap.indent(textwrap.fill(text, 2 * COLUMN), "  "))


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="adapters-demo-"))
    registry, server, origin = work / "registry", work / "server", work / "origin.git"
    try:
        _step("1. The embedded base model (converted from its GGUF once, then cached)")
        _run("models", "prepare", cwd=work)

        _step("2. An adapter repository (git + DVC) with a local remote")
        _run("init", str(registry), cwd=work)
        _run("remote", "add", "origin", str(origin), "--create", cwd=registry)

        _step("3. Train inside it: each run is registered as a new version")
        for version, length, message in (
            ("v1.0.0", ["--max-steps", "8"], "quick cut"),
            ("v1.1.0", ["--epochs", "1"], "full epoch"),
        ):
            output = str(work / "runs" / version)
            _run("train", "pirate", *TRAIN, *length, "-o", output, "-m", message, cwd=registry)
            _run("promote", f"pirate@{version}", "--stage", "prod", cwd=registry)
        _run("train", "contacts", *CONTACTS, "--max-steps", "20", "-o", str(work / "runs" / "contacts"), cwd=registry)
        _run("log", "pirate", cwd=registry)

        _step("4. Push (adapter files first, then git refs), clone as a server would")
        _run("push", cwd=registry)
        _run("clone", str(origin), str(server), cwd=work)

        _step("5. Serve the clone: one batch where both adapters and the base answer the same prompt")
        process, url = _serve(server)
        try:
            print(f"\nQ: {PROMPT}")
            _print_answers(asyncio.run(_ask(url, [BASE_ID, "pirate#prod", "contacts"])))

            _step("6. Roll prod back to the previous version, push, pull on the server: no restart")
            _run("rollback", "pirate", "--stage", "prod", cwd=registry)
            _run("push", cwd=registry)
            _run("pull", cwd=server)
            time.sleep(2)  # the server re-reads its registry's tags every second
            answers = asyncio.run(_ask(url, ["pirate#prod"]))
            _print_answers(answers)
            if answers[0][0] != "pirate@v1.0.0":
                raise SystemExit(f"the running server answered pirate#prod with {answers[0][0]}, not pirate@v1.0.0")
        finally:
            process.send_signal(signal.SIGTERM)  # drains running requests, then exits
            process.wait(timeout=60)
        _run("checkout", "pirate#prod", "-o", str(work / "prod-after"), cwd=server)
        if _sha(work / "prod-after") != _sha(work / "runs" / "v1.0.0"):
            raise SystemExit("pirate#prod on the server does not match the v1.0.0 training output")
        print(f"pirate#prod on the server now: sha256 {_sha(work / 'prod-after')}..., byte-identical to v1.0.0")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
