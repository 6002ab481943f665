"""`adapters hub push / pull` against a local double of the Hugging Face Hub, driven by the real huggingface_hub
client in child processes: byte-exact round trips, the model card, idempotent pushes, and one-line errors that leave
the Hub and the registry as they were."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT, adapters_cli, sha_tree
from huggingface_hub import ModelCard
from hubserver import HubServer

from adapterctl.registry.repo import Registry

REPO = "team/support-lora"
TOKENS = {"hf_write": ("ada", True), "hf_read": ("ada", False)}
TOKEN_HELP = "set HF_TOKEN or run `hf auth login`"
TROUBLE_TOKENS = {"bad token": "hf_wrong", "read token": "hf_read"}


@pytest.fixture(scope="module")
def hub_server() -> Iterator[HubServer]:
    """The Hub double on a loopback port: user ada, who may write to her namespace and to the organisation team."""
    server = HubServer(TOKENS, {"ada": ["team"]})
    with server.running():
        yield server


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """An empty Hub double, and what `adapters` child processes see: its endpoint, a write token, a fresh HF_HOME."""
    hub_server.reset()
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login from this machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the session is offline; this Hub is on 127.0.0.1
    return hub_server


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A loopback URL whose port is held by a socket that never listens: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def trouble(hub: HubServer, dead_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Give the next child process a CASE of trouble (no token, a bad or read-only token, no network); returns the
    endpoint it will talk to."""

    def arrange(case: str) -> str:
        if case in ("no token", "private without a token"):
            monkeypatch.delenv("HF_TOKEN")
        elif case in TROUBLE_TOKENS:
            monkeypatch.setenv("HF_TOKEN", TROUBLE_TOKENS[case])
        elif case == "no network":
            monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
            return dead_endpoint
        return hub.url

    return arrange


def _hub(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return adapters_cli("hub", *args, cwd=cwd)


def _ok(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = _hub(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def _registry_state(root: Path) -> tuple[str, str, list[str]]:
    """Everything a registration would change: refs, the work tree's status, every file (DVC's cache included)."""
    git = ["git", "-C", str(root)]
    refs = subprocess.run([*git, "show-ref"], capture_output=True, text=True).stdout
    status = subprocess.run([*git, "status", "--porcelain", "--ignored"], capture_output=True, text=True).stdout
    return refs, status, sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".git" not in p.parts)


def _variant(source: Path, dest: Path, **base_model: str | None) -> Path:
    """A copy of adapter SOURCE whose lineage names another base model (keys of lineage's base_model)."""
    shutil.copytree(source, dest)
    lineage = json.loads((dest / "lineage.json").read_text())
    lineage["base_model"].update(base_model)
    (dest / "lineage.json").write_text(json.dumps(lineage, indent=2))
    return dest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_two_pushed_versions_pull_back_byte_for_byte_with_their_provenance(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path
) -> None:
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2), message="more tickets")
    first = _ok("push", "support@v1.0.0", "--repo-id", REPO, cwd=registry.root)
    _ok("push", "support@latest", "--repo-id", REPO, cwd=registry.root)
    refs = hub.refs(REPO)
    assert first.stdout == (
        f"Pushed support@v1.0.0 to {hub.url}/{REPO}/tree/v1.0.0 (commit {refs['tags']['v1.0.0'][:8]}, tag v1.0.0).\n"
    )
    assert sorted(refs["tags"]) == ["v1.0.0", "v1.1.0"] and refs["branches"]["main"] == refs["tags"]["v1.1.0"]
    assert len(hub.repos[REPO].commits) == 3  # the Hub's initial commit, then one per version
    on_hub = hub.files(REPO, "v1.0.0")
    assert sorted(on_hub) == sorted(
        [".gitattributes", "README.md", "adapters.json", "version_card.md"]
        + [p.name for p in make_adapter(1).iterdir() if p.name != "README.md"]
    )
    assert on_hub["adapter_model.safetensors"] == (make_adapter(1) / "adapter_model.safetensors").read_bytes()

    mate, _ = Registry.init(tmp_path / "mate")
    pulled = _ok("pull", f"{REPO}@v1.0.0", "--as", "support", cwd=mate.root)
    assert pulled.stdout == (
        f"Registered support@v1.0.0 from {REPO}@v1.0.0 (Hub commit {refs['tags']['v1.0.0'][:8]}).\n"
    )
    mate.checkout("support@v1.0.0", tmp_path / "v1")
    assert sha_tree(tmp_path / "v1") == sha_tree(make_adapter(1))  # README.md too: the card it was registered with
    shown = json.loads(adapters_cli("show", "support@v1.0.0", "--json", cwd=mate.root).stdout)
    assert shown["hub"] == {
        "repo_id": REPO,
        "revision": "v1.0.0",
        "commit": refs["tags"]["v1.0.0"],
        "published_as": "support@v1.0.0",
    }
    # Without a revision: main, the version pushed last; --version chooses the local number.
    _ok("pull", REPO, "--as", "support", "--version", "2.0.0", cwd=mate.root)
    mate.checkout("support@v2.0.0", tmp_path / "v2")
    assert sha_tree(tmp_path / "v2") == sha_tree(make_adapter(2))


def test_pulling_a_commit_already_registered_changes_nothing(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path
) -> None:
    registry.add("support", make_adapter(1))
    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    mate, _ = Registry.init(tmp_path / "mate")
    _ok("pull", REPO, "--as", "support", cwd=mate.root)
    before = _registry_state(mate.root)
    again = _ok("pull", f"{REPO}@v1.0.0", "--as", "support", cwd=mate.root)
    commit = hub.refs(REPO)["tags"]["v1.0.0"]
    assert again.stdout == f"{REPO}@v1.0.0 (Hub commit {commit[:8]}) is already support@v1.0.0; nothing changed.\n"
    assert _registry_state(mate.root) == before


def test_the_hub_card_carries_the_metadata_lineage_and_how_to_load_it(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path
) -> None:
    adapter = _variant(make_adapter(1), tmp_path / "hub-base", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    registry.add("support", adapter)
    registry.add("local", make_adapter(2))
    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    _ok("push", "local", "--repo-id", "team/local-lora", cwd=registry.root)

    on_hub = hub.files(REPO, "v1.0.0")
    card = ModelCard(on_hub["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "peft"
    assert {"lora", "peft"} <= set(card.data.tags) and card.data.datasets == ["people"]
    assert card.data.eval_results[0].metric_value == pytest.approx(0.5)  # seed 1's eval_loss_after
    lineage = json.loads((adapter / "lineage.json").read_text())
    for text in (
        'PeftModel.from_pretrained(base, "team/support-lora", revision="v1.0.0")',
        "adapters hub pull team/support-lora@v1.0.0 --as support",
        "adapters serve",
        lineage["base_model"]["fingerprint"],
        lineage["dataset"]["sha256"],
        "| eval_loss_after | 0.5 |",
    ):
        assert text in card.text
    assert on_hub["version_card.md"] == (adapter / "README.md").read_bytes()
    manifest = json.loads(on_hub["adapters.json"])
    assert manifest["files"]["README.md"] == {"path": "version_card.md", "sha256": _sha256(on_hub["version_card.md"])}
    assert manifest["files"]["adapter_model.safetensors"]["sha256"] == _sha256(on_hub["adapter_model.safetensors"])
    # A base known only as a local folder is named in the text, never as base_model (the Hub accepts ids only).
    local = ModelCard(hub.files("team/local-lora", "v1.0.0")["README.md"].decode())
    assert local.data.base_model is None and lineage["base_model"]["name"] in local.text


def test_pushing_a_version_again_changes_nothing_and_stages_become_branches(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path
) -> None:
    registry.add("support", make_adapter(1))
    _ok("push", "support@v1.0.0", "--repo-id", REPO, cwd=registry.root)
    commits, refs = len(hub.repos[REPO].commits), hub.refs(REPO)
    again = _ok("push", "support@v1.0.0", "--repo-id", REPO, cwd=registry.root)
    assert (
        again.stdout
        == f"{REPO} already has support@v1.0.0 as v1.0.0 ({refs['tags']['v1.0.0'][:8]}); nothing to push.\n"
    )
    assert len(hub.repos[REPO].commits) == commits and hub.refs(REPO) == refs

    registry.promote("support@v1.0.0", "prod")
    staged = _ok("push", "support#prod", "--repo-id", REPO, "--stages", cwd=registry.root)
    assert staged.stdout.endswith("  branch prod -> v1.0.0\n")
    assert hub.refs(REPO)["branches"]["prod"] == refs["tags"]["v1.0.0"] and len(hub.repos[REPO].commits) == commits

    registry.add("support", make_adapter(2))
    registry.promote("support@v1.1.0", "prod")
    _ok("push", "support#prod", "--repo-id", REPO, "--stages", cwd=registry.root)
    refs = hub.refs(REPO)
    assert refs["branches"]["prod"] == refs["tags"]["v1.1.0"] != refs["tags"]["v1.0.0"]
    assert len(hub.repos[REPO].commits) == commits + 1
    mate, _ = Registry.init(tmp_path / "mate")
    _ok("pull", f"{REPO}@prod", "--as", "support", cwd=mate.root)
    mate.checkout("support", tmp_path / "prod")
    assert sha_tree(tmp_path / "prod") == sha_tree(make_adapter(2))


def test_main_holds_the_version_pushed_last_and_keeps_files_others_added(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path
) -> None:
    with_notes = tmp_path / "with-notes"
    shutil.copytree(make_adapter(1), with_notes)
    (with_notes / "notes.txt").write_text("first cut\n")
    registry.add("support", with_notes)
    registry.add("support", make_adapter(2))
    _ok("push", "support@v1.0.0", "--repo-id", REPO, cwd=registry.root)
    hub.commit(REPO, {"CONTRIBUTING.md": b"Ask first.\n"}, "Add contributing notes")
    _ok("push", "support@v1.1.0", "--repo-id", REPO, cwd=registry.root)
    main, first = hub.files(REPO, "main"), hub.files(REPO, "v1.0.0")
    assert "notes.txt" in first and "notes.txt" not in main and "CONTRIBUTING.md" in main
    assert main["adapter_model.safetensors"] == (make_adapter(2) / "adapter_model.safetensors").read_bytes()
    # A pull downloads the version's files alone.
    _ok("pull", REPO, "--as", "pulled", cwd=registry.root)
    assert not any("CONTRIBUTING.md" in path for _, path in hub.requests)


def test_a_tag_follows_its_commit_and_an_interrupted_push_completes_when_run_again(
    registry: Registry, make_adapter, hub: HubServer
) -> None:
    registry.add("support", make_adapter(1))
    hub.fail_next("POST", "/commit/", 500)
    failed = _hub("push", "support", "--repo-id", REPO, cwd=registry.root)
    assert failed.returncode == 9
    assert failed.stderr == f"Error: The Hub at {hub.url} answered 500 for {REPO}: Injected failure.\n"
    assert hub.refs(REPO)["tags"] == {} and len(hub.repos[REPO].commits) == 1  # the repository and nothing else

    hub.fail_next("POST", "/tag/", 500)
    assert _hub("push", "support", "--repo-id", REPO, cwd=registry.root).returncode == 9
    assert hub.refs(REPO)["tags"] == {} and len(hub.repos[REPO].commits) == 2  # committed, not yet tagged

    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    refs = hub.refs(REPO)
    assert refs["tags"] == {"v1.0.0": refs["branches"]["main"]} and len(hub.repos[REPO].commits) == 2


def test_a_private_push_creates_a_private_repository_and_refuses_a_public_one(
    registry: Registry, make_adapter, hub: HubServer
) -> None:
    registry.add("support", make_adapter(1))
    _ok("push", "support", "--repo-id", "team/secret", "--private", cwd=registry.root)
    assert hub.repos["team/secret"].private
    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    refused = _hub("push", "support", "--repo-id", REPO, "--private", cwd=registry.root)
    assert refused.returncode == 7
    assert (
        refused.stderr == f"Error: {REPO} already exists and is public; --private only applies to a new repository.\n"
    )


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("no token", 10, f"Pushing to the Hub needs a token with write access: {TOKEN_HELP}."),
        (
            "bad token",
            10,
            "The Hub at {url} refused the token (401 Unauthorized: Invalid credentials in Authorization header); "
            f"{TOKEN_HELP}.",
        ),
        (
            "read token",
            10,
            f"The token may not write {REPO} (403 Forbidden: You don't have the rights to write to this repository); "
            "use a token with write access to it.",
        ),
        (
            "no network",
            9,
            "Cannot reach the Hub at {url} ([Errno 111] Connection refused); check the network or HF_ENDPOINT.",
        ),
    ],
)
def test_a_refused_push_is_one_line_and_pushes_nothing(
    case: str, code: int, message: str, registry: Registry, make_adapter, hub: HubServer, trouble
) -> None:
    registry.add("support", make_adapter(1))
    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    registry.add("support", make_adapter(2))
    before = (len(hub.repos[REPO].commits), hub.refs(REPO))
    url = trouble(case)
    result = _hub("push", "support@v1.1.0", "--repo-id", REPO, cwd=registry.root)
    assert result.returncode == code
    assert result.stderr == f"Error: {message.format(url=url)}\n"
    assert (len(hub.repos[REPO].commits), hub.refs(REPO)) == before


@pytest.mark.parametrize(
    ("case", "source", "code", "message"),
    [
        (
            "no such repository",
            "team/nothing-here",
            6,
            "No Hub repository team/nothing-here at {url}, or it is private and the token cannot read it "
            f"({TOKEN_HELP}).",
        ),
        (
            "private without a token",
            "team/secret",
            6,
            f"No Hub repository team/secret at {{url}}, or it is private and the token cannot read it ({TOKEN_HELP}).",
        ),
        (
            "no such revision",
            f"{REPO}@v9.9.9",
            6,
            f"{REPO} has no revision 'v9.9.9' on the Hub (a branch, a tag vX.Y.Z or a commit).",
        ),
        (
            "bad token",
            REPO,
            10,
            "The Hub at {url} refused the token (401 Unauthorized: Invalid credentials in Authorization header); "
            f"{TOKEN_HELP}.",
        ),
        (
            "no network",
            REPO,
            9,
            "Cannot reach the Hub at {url} ([Errno 111] Connection refused); check the network or HF_ENDPOINT.",
        ),
    ],
)
def test_a_failed_pull_is_one_line_and_registers_nothing(
    case: str, source: str, code: int, message: str, registry: Registry, make_adapter, trouble
) -> None:
    registry.add("support", make_adapter(1))
    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    _ok("push", "support", "--repo-id", "team/secret", "--private", cwd=registry.root)
    before = _registry_state(registry.root)
    url = trouble(case)
    result = _hub("pull", source, "--as", "support", cwd=registry.root)
    assert result.returncode == code
    assert result.stderr == f"Error: {message.format(url=url)}\n"
    assert _registry_state(registry.root) == before


def test_pull_checks_the_files_against_their_manifest_and_the_local_base(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path, tiny_base: Path
) -> None:
    other_base = _variant(make_adapter(1), tmp_path / "other-base", fingerprint="sha256:" + "0" * 64)
    registry.add("other", other_base)
    registry.add("support", make_adapter(1))
    _ok("push", "other", "--repo-id", "team/other-lora", cwd=registry.root)
    _ok("push", "support", "--repo-id", REPO, cwd=registry.root)
    weights = bytearray(hub.files(REPO, "main")["adapter_model.safetensors"])
    weights[-1] ^= 1  # one flipped bit, same size
    hub.commit(REPO, {"adapter_model.safetensors": bytes(weights)}, "Tamper")
    before = _registry_state(registry.root)

    tampered = _hub("pull", REPO, "--as", "pulled", cwd=registry.root)
    assert tampered.returncode == 8
    assert tampered.stderr == (  # one line: no progress bars written into the pipe before it
        f"Error: {REPO}@main: adapter_model.safetensors does not match its sha256 in adapters.json; "
        "nothing was registered.\n"
    )
    mismatched = _hub("pull", "team/other-lora", "--as", "pulled", cwd=registry.root)
    assert mismatched.returncode == 2
    local = json.loads((make_adapter(1) / "lineage.json").read_text())["base_model"]["fingerprint"]
    assert mismatched.stderr == (
        f"Error: team/other-lora@main was trained on {tiny_base} with fingerprint sha256:000000000000..., "
        f"but the local copy is {local[:19]}...; it would load onto other weights. Nothing was registered.\n"
    )
    assert _registry_state(registry.root) == before


def test_pull_takes_an_adapter_published_by_other_tools_as_it_is_but_never_pickle(
    registry: Registry, make_adapter, hub: HubServer, tmp_path: Path
) -> None:
    files = {p.name: p.read_bytes() for p in make_adapter(3).iterdir()}
    hub.create("team/plain")
    hub.commit("team/plain", files, "Upload adapter")
    hub.create("team/pickled")
    hub.commit("team/pickled", {**files, "adapter_model.bin": b"\x80\x04pickle"}, "Upload adapter")
    before = _registry_state(registry.root)
    refused = _hub("pull", "team/pickled", "--as", "plain", cwd=registry.root)
    assert refused.returncode == 2
    assert refused.stderr == "Error: adapter_model.bin: pickle-based weights are refused; save with safetensors.\n"
    hub.create("team/truncated")
    hub.commit("team/truncated", {**files, "adapter_model.safetensors": files["adapter_model.safetensors"][:-9]}, "Up")
    truncated = _hub("pull", "team/truncated", "--as", "plain", cwd=registry.root)
    assert truncated.returncode == 2  # named as the Hub copy, not as a temporary folder that is gone
    assert (
        truncated.stderr == "Error: team/truncated@main/adapter_model.safetensors is truncated or holds no tensors.\n"
    )
    assert _registry_state(registry.root) == before

    _ok("pull", "team/plain", "--as", "plain", cwd=registry.root)
    registry.checkout("plain", tmp_path / "plain")
    assert sha_tree(tmp_path / "plain") == sha_tree(make_adapter(3))
    assert "published_as" not in registry.meta(registry.state().resolve("plain"))["hub"]


def test_the_hub_commands_start_without_importing_the_hub_client_or_torch(tmp_path: Path) -> None:
    probe = (
        "import sys; from adapterctl.cli import main\n"
        "try: main(['hub', 'push', '--help'])\n"
        "except SystemExit as exit: assert exit.code == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'huggingface_hub', 'torch', 'httpx2'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--repo-id" in proc.stdout and proc.stdout.splitlines()[-1] == "[]"


def test_pull_of_an_adapter_trained_elsewhere_takes_its_base_from_the_command(
    registry: Registry, make_adapter, hub: HubServer, tiny_base: Path
) -> None:
    files = {p.name: p.read_bytes() for p in make_adapter(4).iterdir() if p.name != "lineage.json"}
    hub.create("team/peft-only")
    hub.commit("team/peft-only", {**files, "training_args.bin": b"\x80\x04pickle"}, "Upload adapter")
    before = _registry_state(registry.root)
    refused = _hub("pull", "team/peft-only", "--as", "peft", cwd=registry.root)
    assert refused.returncode == 2
    assert refused.stderr.startswith("Error: team/peft-only@main has no lineage.json: it was trained elsewhere, so ")
    assert _registry_state(registry.root) == before

    pulled = _ok("pull", "team/peft-only", "--as", "peft", "--base", str(tiny_base), cwd=registry.root)
    assert pulled.stderr == "Left out training_args.bin: a pickle, never loaded.\n"
    meta = registry.meta(registry.state().resolve("peft"))
    assert meta["imported"] == {"source": "team/peft-only@main", "left_out": ["training_args.bin"]}
    assert meta["hub"]["repo_id"] == "team/peft-only"
