"""The local registry on real git and DVC: init, add, list/log/show/diff, checkout, promote and rollback."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, adapters_cli, git, sha_tree, start_adapters

from adapterctl.core.errors import Conflict, NotFound
from adapterctl.registry import folder as folder_module
from adapterctl.registry.folder import InvalidAdapter
from adapterctl.registry.repo import Registry


def _gto_show(root: Path) -> dict:
    """What GTO itself reads from the same tags: {name: {latest, stages}}."""
    from gto.api import show

    return {
        row["name"]: {"latest": row["latest"], "stages": {k[1:]: v for k, v in row.items() if k.startswith("#") and v}}
        for row in show(str(root), table=True)[0]
    }


def test_init_sets_up_git_dvc_and_adapters_folder_and_is_idempotent(tmp_path: Path, cli) -> None:
    result = cli("init", "reg", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    root = tmp_path / "reg"
    assert (root / ".dvc" / "config").is_file() and (root / "adapters" / "README.md").is_file()
    assert "Initialise the adapter registry" in git(root, "log", "--oneline")
    head = git(root, "rev-parse", "HEAD")
    again = cli("init", cwd=root)
    assert again.exit_code == 0 and "already set up" in again.output
    assert git(root, "rev-parse", "HEAD") == head
    assert git(root, "status", "--porcelain") == ""


def test_init_inside_an_existing_git_repository_keeps_its_history_and_uses_its_origin(tmp_path: Path, cli) -> None:
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q", "-b", "main")
    (project / "train.py").write_text("print('hi')\n")
    git(project, "add", "train.py")
    git(project, "commit", "-qm", "code")
    git(tmp_path, "init", "-q", "--bare", "-b", "main", "origin.git")
    git(project, "remote", "add", "origin", str(tmp_path / "origin.git"))
    result = cli("init", cwd=project)
    assert result.exit_code == 0, result.output
    assert f"DVC remote 'origin' -> {tmp_path / 'origin.git' / 'dvc'}" in result.output
    assert git(project, "log", "--format=%s").split("\n")[:2] == ["Initialise the adapter registry", "code"]
    listed = cli("remote", "list", "--json", cwd=project)
    assert json.loads(listed.output) == [
        {
            "name": "origin",
            "git": str(tmp_path / "origin.git"),
            "dvc": str(tmp_path / "origin.git" / "dvc"),
            "default": True,
        }
    ]


def test_remote_add_configures_git_and_dvc_together(registry: Registry, tmp_path: Path, cli) -> None:
    result = cli(
        "remote",
        "add",
        "backup",
        str(tmp_path / "backup.git"),
        "--dvc",
        str(tmp_path / "store"),
        "--create",
        cwd=registry.root,
    )
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(cli("remote", "list", "--json", cwd=registry.root).output)}
    assert rows["backup"] == {
        "name": "backup",
        "git": str(tmp_path / "backup.git"),
        "dvc": str(tmp_path / "store"),
        "default": False,
    }
    assert rows["origin"]["default"] is True
    assert (tmp_path / "backup.git" / "HEAD").is_file()  # a local remote is created as a bare repository
    not_local = cli("remote", "add", "gh", "https://example.com/org/reg.git", cwd=registry.root)
    assert not_local.exit_code == 5 and "give its DVC storage with --dvc" in not_local.stderr


def test_add_registers_an_immutable_version_that_dvc_and_gto_understand(registry: Registry, make_adapter, cli) -> None:
    source = make_adapter(1)
    result = cli("add", "support", str(source), "-m", "first cut", cwd=registry.root)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Registered support@v1.0.0 (")
    root = registry.root
    assert sha_tree(root / "adapters" / "support") == sha_tree(source)
    project = yaml.safe_load((root / "dvc.yaml").read_text())
    assert project["artifacts"]["support"]["path"] == "adapters/support"
    assert project["artifacts"]["support"]["type"] == "model"
    pointer = yaml.safe_load((root / "adapters" / "support.dvc").read_text())
    assert pointer["outs"][0]["md5"].endswith(".dir") and pointer["meta"]["version"] == "1.0.0"
    assert git(root, "cat-file", "-t", "support@v1.0.0").strip() == "tag"  # annotated, as GTO expects
    assert git(root, "status", "--porcelain") == ""
    assert "/support" in (root / "adapters" / ".gitignore").read_text()  # files live in DVC, not git
    assert cli("add", "support", str(make_adapter(2)), cwd=root).output.startswith("Registered support@v1.1.0")
    assert cli("add", "support", str(make_adapter(3)), "--bump", "major", cwd=root).output.startswith(
        "Registered support@v2.0.0"
    )
    assert cli("add", "support", str(make_adapter(4)), "--version", "1.1.1", cwd=root).exit_code == 0
    clash = cli("add", "support", str(make_adapter(5)), "--version", "1.1.0", cwd=root)
    assert clash.exit_code == 7
    assert clash.stderr.strip() == (
        "Error: support@v1.1.0 already exists and versions are immutable; register with --bump or another --version."
    )
    assert _gto_show(root) == {"support": {"latest": "v2.0.0", "stages": {}}}


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
        (lambda d: (d / "adapter_model.bin").write_bytes(b"pickle"), "pickle-based weights are refused"),
        (lambda d: (d / "adapter_config.json").write_text("{oops"), "adapter_config.json is not valid JSON"),
        (lambda d: (d / "lineage.json").write_text("{}"), "has no base_model.fingerprint"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(
                (d / "adapter_model.safetensors").read_bytes()[:-9]
            ),
            "is truncated",
        ),
        (lambda d: (d / "sub").mkdir(), "is not a plain file"),
    ],
)
def test_add_refuses_an_invalid_folder_and_changes_nothing(
    registry: Registry, make_adapter, tmp_path: Path, cli, breakage, message: str
) -> None:
    cli("add", "support", str(make_adapter(1)), cwd=registry.root)
    head = git(registry.root, "rev-parse", "HEAD")
    broken = tmp_path / "broken"
    shutil.copytree(make_adapter(2), broken)
    breakage(broken)
    result = cli("add", "support", str(broken), cwd=registry.root)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert git(registry.root, "rev-parse", "HEAD") == head
    assert git(registry.root, "tag", "--list", "support@*").split() == ["support@v1.0.0"]
    assert sha_tree(registry.root / "adapters" / "support") == sha_tree(make_adapter(1))


def test_a_failure_while_registering_restores_the_workspace(
    registry: Registry, make_adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add("support", make_adapter(1))
    head = git(registry.root, "rev-parse", "HEAD")

    def broken_dvc(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("adapterctl.registry.store.track", broken_dvc)
    with pytest.raises(OSError, match="disk full"):
        registry.add("support", make_adapter(2))
    assert git(registry.root, "rev-parse", "HEAD") == head
    assert git(registry.root, "status", "--porcelain") == ""
    assert sha_tree(registry.root / "adapters" / "support") == sha_tree(make_adapter(1))
    assert [v.ref for v in registry.state().adapter("support").versions] == ["support@v1.0.0"]


BAD_NAMES = ["../x", "a/b", "/etc/passwd", "", " ", "pir ate", "p\u0430rate", "x" * 65, "-x", "A", "a.b", "a@b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_try_tricks_are_refused_with_one_clear_line(
    registry: Registry, make_adapter, cli, name: str
) -> None:
    result = cli("add", "--", name, str(make_adapter(1)), cwd=registry.root)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: Adapter name {name!r} is not allowed;")
    assert not any(p.name not in ("README.md",) for p in (registry.root / "adapters").iterdir())
    assert cli("promote", "--stage", "prod", "--", f"{name}@v1.0.0", cwd=registry.root).exit_code == 2


@pytest.mark.parametrize("ref", ["support@1.0", "support@v1.0.0.0", "support#Prod", "support#", "support#../x"])
def test_malformed_references_are_refused(registry: Registry, cli, ref: str) -> None:
    result = cli("show", ref, cwd=registry.root)
    assert result.exit_code == 2 and "is not allowed" in result.stderr


def test_list_log_show_and_their_json(registry: Registry, make_adapter, cli) -> None:
    root = registry.root
    registry.add("support", make_adapter(1), message="first cut")
    registry.add("support", make_adapter(2), message="more data")
    registry.add("contacts", make_adapter(3))
    registry.promote("support@v1.0.0", "prod")
    listed = json.loads(cli("list", "--json", cwd=root).output)
    assert [(r["name"], r["latest"], r["versions"], r["stages"]) for r in listed] == [
        ("contacts", "v1.0.0", 1, {}),
        ("support", "v1.1.0", 2, {"prod": "v1.0.0"}),
    ]
    text = cli("list", cwd=root).output
    assert "support" in text and "prod=v1.0.0" in text
    log = json.loads(cli("log", "support", "--json", cwd=root).output)
    assert [v["ref"] for v in log["versions"]] == ["support@v1.1.0", "support@v1.0.0"]
    first = log["versions"][1]
    assert first["message"] == "first cut" and first["author"] == "Ada Tester" and first["stages"] == ["prod"]
    assert first["metrics"]["eval_loss_after"] == pytest.approx(0.5)
    assert [(e["stage"], e["action"], e["version"]) for e in log["stage_history"]] == [("prod", "promote", "v1.0.0")]
    shown = json.loads(cli("show", "support", "--json", cwd=root).output)  # a bare name means prod
    assert shown["ref"] == "support@v1.0.0" and shown["rank"] == 4 and shown["stages"] == ["prod"]
    assert json.loads(cli("show", "support@latest", "--json", cwd=root).output)["ref"] == "support@v1.1.0"
    assert json.loads(cli("show", "contacts", "--json", cwd=root).output)["ref"] == "contacts@v1.0.0"
    missing = cli("show", "support@v9.0.0", cwd=root)
    assert missing.exit_code == 6 and "support@v9.0.0 is not registered; support has v1.0.0, v1.1.0." in missing.stderr
    unknown = cli("log", "nope", cwd=root)
    assert unknown.exit_code == 6 and "No adapter named 'nope'" in unknown.stderr


def test_diff_reports_config_hyperparameters_metrics_lineage_and_files(registry: Registry, make_adapter, cli) -> None:
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    data = json.loads(cli("diff", "support@v1.0.0", "support@v1.1.0", "--json", cwd=registry.root).output)
    assert data["left"] == "support@v1.0.0" and data["right"] == "support@v1.1.0"
    assert data["hyperparameters"] == {"seed": [1, 2]}
    assert data["metrics"]["train_loss"] == [2.0, 3.0]
    assert data["lineage"]["dataset.sha256"] == [f"{1:064x}", f"{2:064x}"]
    assert set(data["files"]) == {"adapter_model.safetensors", "lineage.json", "README.md"}
    assert data["config"] == {}
    text = cli("diff", "support@v1.0.0", "support@v1.1.0", cwd=registry.root).output
    assert "hyperparameters.seed: 1 -> 2" in text


def test_checkout_writes_the_exact_files_of_a_version(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    result = cli("checkout", "support@v1.0.0", "-o", str(tmp_path / "out"), cwd=registry.root)
    assert result.exit_code == 0, result.output
    assert sha_tree(tmp_path / "out") == sha_tree(make_adapter(1))
    default = cli("checkout", "support@latest", cwd=tmp_path / "registry")
    assert default.exit_code == 0 and sha_tree(registry.root / "support-v1.1.0") == sha_tree(make_adapter(2))
    again = cli("checkout", "support@v1.0.0", "-o", str(tmp_path / "out"), cwd=registry.root)
    assert again.exit_code == 7 and "is not empty" in again.stderr


def test_promote_and_rollback_keep_history_and_agree_with_gto(registry: Registry, make_adapter, cli) -> None:
    root = registry.root
    for seed in (1, 2, 3):
        registry.add("support", make_adapter(seed))
    assert cli("promote", "support@v1.0.0", "--stage", "prod", cwd=root).output == "support#prod -> v1.0.0.\n"
    assert (
        cli("promote", "support@v1.1.0", "--stage", "prod", cwd=root).output == "support#prod -> v1.1.0 (was v1.0.0).\n"
    )
    assert cli("promote", "support@v1.2.0", "--stage", "prod", cwd=root).exit_code == 0
    assert cli("promote", "support@latest", "--stage", "staging", cwd=root).exit_code == 0
    assert _gto_show(root)["support"]["stages"] == {"prod": "v1.2.0", "staging": "v1.2.0"}
    back = cli("rollback", "support", "--stage", "prod", cwd=root)
    assert back.output == "support#prod -> v1.1.0 (rolled back from v1.2.0).\n"
    assert _gto_show(root)["support"]["stages"] == {"prod": "v1.1.0", "staging": "v1.2.0"}
    assert registry.state().resolve("support").ref == "support@v1.1.0"
    assert cli("rollback", "support", "--stage", "prod", cwd=root).exit_code == 0
    assert registry.state().resolve("support#prod").ref == "support@v1.0.0"
    nothing = cli("rollback", "support", "--stage", "prod", cwd=root)
    assert nothing.exit_code == 6 and "nothing earlier to return to" in nothing.stderr
    assert cli("rollback", "support", "--stage", "prod", "--to", "support@v1.2.0", cwd=root).exit_code == 0
    assert _gto_show(root)["support"]["stages"]["prod"] == "v1.2.0"
    events = json.loads(cli("log", "support", "--json", cwd=root).output)["stage_history"]
    prod = [(e["action"], e["version"]) for e in reversed(events) if e["stage"] == "prod" and e["action"] != "unassign"]
    assert prod == [
        ("promote", "v1.0.0"),
        ("promote", "v1.1.0"),
        ("promote", "v1.2.0"),
        ("rollback", "v1.1.0"),
        ("rollback", "v1.0.0"),
        ("rollback", "v1.2.0"),
    ]
    assert cli("rollback", "support", "--stage", "canary", cwd=root).exit_code == 6
    assert json.loads(cli("list", "--json", cwd=root).output)[0]["stages"] == {"prod": "v1.2.0", "staging": "v1.2.0"}


def test_commands_outside_a_registry_say_what_to_run(tmp_path: Path, cli) -> None:
    result = cli("list", cwd=tmp_path)
    assert result.exit_code == 5
    assert result.stderr.strip() == (
        f"Error: {tmp_path.resolve()} is not inside an adapter repository; run `adapters init` or `adapters clone URL`."
    )


def test_registry_commands_never_import_torch(registry: Registry, make_adapter) -> None:
    registry.add("support", make_adapter(1))
    probe = (
        "import sys; from adapterctl.cli import main\n"
        "for args in (['list'], ['log', 'support'], ['show', 'support'], ['status'], ['list', '--json']):\n"
        "    try: main(args)\n"
        "    except SystemExit as exit: assert exit.code == 0, (args, exit.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('torch-free')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=registry.root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("torch-free")


def test_a_second_command_waits_for_the_lock_instead_of_failing(registry: Registry, make_adapter) -> None:
    import fcntl

    registry.add("support", make_adapter(1))
    with open(registry.git.git_dir / "adapters.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = start_adapters("promote", "support", "--stage", "prod", cwd=registry.root)
        first_line = waiting.stderr.readline()
        assert "Waiting for another adapters command" in first_line
        assert waiting.poll() is None
    out, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and out == "support#prod -> v1.0.0.\n"


def test_subprocess_cli_exit_codes_and_single_error_line(registry: Registry) -> None:
    proc = adapters_cli("rollback", "ghost", "--stage", "prod", cwd=registry.root)
    assert proc.returncode == 6
    assert proc.stderr.strip().splitlines() == ["Error: No adapter named 'ghost' in this registry (known: none yet)."]


def test_version_and_stage_errors_are_typed(registry: Registry, make_adapter) -> None:
    registry.add("support", make_adapter(1))
    with pytest.raises(Conflict):
        registry.add("support", make_adapter(2), version="1.0.0")
    with pytest.raises(InvalidAdapter):
        registry.add("support", make_adapter(2).parent)
    with pytest.raises(NotFound):
        registry.state().resolve("support#prod")


def test_a_machine_without_a_git_identity_gets_one_line_saying_how_to_set_it(
    registry: Registry, make_adapter, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_AUTHOR", "GIT_COMMITTER"))}
    env.update(HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1", EMAIL="", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl.cli", "add", "support", str(make_adapter(1))],
        cwd=registry.root,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 5
    assert proc.stderr.strip().splitlines() == [
        "Error: git does not know who you are, and every version records its author: run "
        "`git config --global user.name 'Your Name'` and `git config --global user.email you@example.com`."
    ]
    assert registry.git.run("tag", "--list") == ""


def _declared_weights(folder: Path, shapes: dict[str, list[int]]) -> Path:
    """Replace FOLDER's weights by a sparse file whose header declares SHAPES (F32) and holds no bytes of them."""
    offset, tensors = 0, {}
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        tensors[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(tensors).encode()
    weights = folder / "adapter_model.safetensors"
    with open(weights, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + offset)  # holes: terabytes declared, none written
    return weights


@pytest.mark.parametrize(
    "shapes, message",
    [
        (
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [10**6, 10**6]},
            "is not of rank 4, as the config says",
        ),
        (
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [4, 1 << 30],
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [1 << 30, 4],
            },
            "(a sparse file); write the adapter out whole.",
        ),
    ],
)
def test_add_refuses_a_file_that_declares_absurd_sizes_without_reading_it(
    registry: Registry,
    make_adapter,
    tmp_path: Path,
    cli,
    shapes: dict[str, list[int]],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = tmp_path / "sparse"
    shutil.copytree(make_adapter(1), broken)
    weights = _declared_weights(broken, shapes)
    assert weights.stat().st_blocks * 512 < 1 << 20 < weights.stat().st_size  # sparse indeed
    read = []
    monkeypatch.setattr(folder_module, "_finite", lambda *args: read.append(args) or True)  # a scan is recorded
    result = cli("add", "support", str(broken), cwd=registry.root)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert read == [] and not (registry.root / "adapters" / "support").exists()  # refused before a byte was scanned
