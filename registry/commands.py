"""Registry commands: set up, register, inspect, promote and roll back, push and pull adapter versions."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from adapterctl.core.errors import IntegrityError, RegistryError
from adapterctl.registry import hub as hub_api
from adapterctl.registry import importing, remotes, report, store
from adapterctl.registry import pull as pull_api
from adapterctl.registry import push as push_api
from adapterctl.registry import verify as verify_api
from adapterctl.registry.names import BUMPS
from adapterctl.registry.refs import State
from adapterctl.registry.repo import Registry

_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
_base_option = click.option(
    "--base",
    help="The base model an adapter trained elsewhere (PEFT, TRL, Axolotl, Unsloth) was trained on: a cached model "
    "name, a local folder or a Hub id. Its weights are fingerprinted and a lineage written.",
)
_unservable_option = click.option(
    "--allow-unservable", is_flag=True, help="Register an adapter whose LoRA options the server cannot apply."
)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _state_here() -> State | None:
    """The registry around the current folder, quietly: completion must never fail or print."""
    registry = Registry.around(Path.cwd())
    if registry is None:
        return None
    with contextlib.redirect_stderr(io.StringIO()):
        return registry.state()


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Shell completion: adapter names in the registry here."""
    state = _state_here()
    return [CompletionItem(name) for name in (state.adapters if state else []) if name.startswith(incomplete)]


def complete_refs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Shell completion: NAME, NAME@latest, NAME@vX.Y.Z and NAME#STAGE for every adapter here."""
    state = _state_here()
    refs = []
    for name, adapter in (state.adapters if state else {}).items():
        refs += [name, f"{name}@latest", *(v.ref for v in adapter.versions), *(f"{name}#{s}" for s in adapter.stages())]
    return [CompletionItem(ref) for ref in refs if ref.startswith(incomplete)]


@click.command()
@click.argument("path", type=click.Path(path_type=Path), default=".")
def init(path: Path) -> None:
    """Make PATH (default: here) an adapter repository: git, DVC, adapters/, a default DVC remote."""
    if path.exists() and not path.is_dir():
        raise RegistryError(f"{path} is a file; give a folder (new or existing) to make an adapter repository.")
    registry, done = Registry.init(path)
    click.echo(f"Adapter repository at {registry.root}: {', '.join(done) if done else 'already set up'}.")


@click.group(invoke_without_command=True)
@click.option("-v", "--verbose", is_flag=True, help="With URLs (as `remote list`).")
@click.pass_context
def remote(ctx: click.Context, verbose: bool) -> None:
    """Git and DVC remotes, configured together; alone, the remotes' names (-v: with URLs)."""
    if ctx.invoked_subcommand is None:
        if verbose:
            ctx.invoke(remote_list, as_json=False)
        else:
            for row in remotes.list_remotes(Registry.find()):
                click.echo(row["name"])


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--dvc", "dvc_url", help="DVC storage URL (s3://bucket/path or a folder). Default: URL/dvc for a folder.")
@click.option("--endpoint-url", help="S3-compatible endpoint for the DVC storage.")
@click.option("--create", is_flag=True, help="URL is a folder: create an empty bare repository there.")
def remote_add(name: str, url: str, dvc_url: str | None, endpoint_url: str | None, create: bool) -> None:
    """Add remote NAME: git refs go to URL, adapter files to its DVC storage."""
    options = {"endpointurl": endpoint_url} if endpoint_url else {}
    stored = remotes.set_remote(Registry.find(), name, url, dvc_url, options, create=create)
    click.echo(f"Remote {name}: git {url}, DVC {stored}.")


@remote.command("remove")
@click.argument("name")
def remote_remove(name: str) -> None:
    """Forget remote NAME (its git remote and its DVC storage entry); nothing on the remote is deleted."""
    remotes.remove_remote(Registry.find(), name)
    click.echo(f"Removed remote {name}.")


@remote.command("list")
@_json_option
def remote_list(as_json: bool) -> None:
    """List remotes with their git and DVC URLs."""
    rows = remotes.list_remotes(Registry.find())
    if as_json:
        return _print_json(rows)
    for row in rows:
        click.echo(f"{row['name']}{' (default)' if row['default'] else ''}\tgit {row['git']}\tdvc {row['dvc']}")


@click.command()
@click.argument("url")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
def clone(url: str, directory: Path | None) -> None:
    """Clone the adapter repository at URL and pull every stage head and latest version."""
    registry, result = pull_api.clone(url, directory, [])
    count = len(result.versions)
    click.echo(
        f"Cloned into {registry.root}; {count} version{'s' * (count != 1)} ready ({result.files} files fetched)."
    )
    if elsewhere := remotes.storage_elsewhere(registry, url):
        click.echo(
            f"Note: adapter files come from the DVC storage {elsewhere} (committed in .dvc/config), not from beside "
            f"{url}; to give this copy its own: adapters remote add origin {url} --dvc PATH",
            err=True,
        )


@click.command()
@click.argument("name", shell_complete=complete_names)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--version", help="Version X.Y.Z. Default: the next after the latest (1.0.0 first).")
@click.option("--bump", type=click.Choice(BUMPS), help="Which part to increase. Default: minor.")
@click.option("-m", "--message", help="What changed in this version.")
@_base_option
@_unservable_option
def add(
    name: str,
    path: Path,
    version: str | None,
    bump: str | None,
    message: str | None,
    base: str | None,
    allow_unservable: bool,
) -> None:
    """Register the adapter folder PATH as a new immutable version of NAME."""
    registry = Registry.find()
    settings = {"version": version, "bump": bump, "message": message, "allow_unservable": allow_unservable}
    with importing.staged_if_foreign(path, base, name) as imported:
        if imported is None:
            registered = registry.add(name, path, **settings)
        else:
            for line in imported.notes():
                click.echo(line, err=True)
            registered = registry.add(name, imported.path, meta={"imported": imported.provenance}, **settings)
    click.echo(f"Registered {registered.ref} ({registered.commit[:8]}).")
    if options := registry.meta(registered).get("unservable"):
        click.echo(f"Warning: {registered.ref} uses {', '.join(options)}; the server refuses to serve it.", err=True)


@click.command("list")
@_json_option
def list_(as_json: bool) -> None:
    """List adapters with their latest version and stages."""
    rows = report.listing(Registry.find())
    if as_json:
        return _print_json(rows)
    if not rows:
        click.echo("No adapters yet; register one with `adapters add NAME PATH` or `adapters train`.")
    for row in rows:
        stages = " ".join(f"{stage}={version}" for stage, version in row["stages"].items())
        click.echo(f"{row['name']:<24} latest {row['latest']:<10} {row['versions']:>3} versions  {stages}")


@click.command()
@click.argument("name", required=False, shell_complete=complete_names)
@click.option("-n", "--max-count", type=click.IntRange(min=1), help="Show at most this many versions.")
@_json_option
def log(name: str | None, max_count: int | None, as_json: bool) -> None:
    """Versions of NAME (default: of every adapter), newest first, with metrics, and the stage history."""
    data = report.log(Registry.find(), name, max_count)
    if as_json:
        return _print_json(data)
    for row in data["versions"]:
        stages = f" [{', '.join(row['stages'])}]" if row["stages"] else ""
        loss = row["metrics"].get("eval_loss_after")
        metric = f"  eval_loss {loss:.4f}" if isinstance(loss, float) else ""
        click.echo(
            f"{row['ref']}{stages}  {row['date']}  {row['author']}  {row['commit'][:8]}{metric}\n    {row['message']}"
        )
    if data["stage_history"]:
        click.echo("Stage history:")
    for event in data["stage_history"]:
        click.echo(
            f"  {event['date']}  {event['adapter'] + '#' + event['stage']:<20} {event['action']:<9} "
            f"{event['version']}  {event['author']}"
        )


@click.command()
@click.argument("ref", shell_complete=complete_refs)
@_json_option
def show(ref: str, as_json: bool) -> None:
    """Show the version REF means (NAME, NAME@vX.Y.Z, NAME#STAGE, NAME@latest)."""
    data = report.show(Registry.find(), ref)
    if as_json:
        return _print_json(data)
    for key, value in data.items():
        click.echo(f"{key:<18} {json.dumps(value) if isinstance(value, dict | list) else value}")


@click.command()
@click.argument("left", shell_complete=complete_refs)
@click.argument("right", shell_complete=complete_refs)
@_json_option
def diff(left: str, right: str, as_json: bool) -> None:
    """Compare two versions: config, hyper-parameters, metrics, lineage, file hashes; exit 1 when they differ."""
    data = report.diff(Registry.find(), left, right)
    if as_json:
        _print_json(data)
    else:
        click.echo(f"--- {data['left']}\n+++ {data['right']}")
        for section in report.DIFF_SECTIONS:
            for key, (a, b) in data[section].items():
                click.echo(f"{section}.{key}: {json.dumps(a)} -> {json.dumps(b)}")
    if any(data[section] for section in report.DIFF_SECTIONS):
        raise SystemExit(1)  # as `git diff --exit-code`: 1 when the versions differ


@click.command()
@click.argument("ref", shell_complete=complete_refs)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder to write. Default: ./NAME-vX.Y.Z.")
def checkout(ref: str, output: Path | None) -> None:
    """Write the exact files of version REF to a folder (fetched from the remote when needed)."""
    registry = Registry.find()
    version = registry.state().resolve(ref)
    target = output or Path(f"{version.name}-{version.version}")
    registry.checkout(version, target)
    click.echo(f"{version.ref} written to {target}.")


@click.command()
@click.option("--remote", help="Remote to compare with. Default: the default remote.")
@_json_option
def status(remote: str | None, as_json: bool) -> None:
    """Unpushed versions, and versions whose files are missing here or on the remote."""
    data = report.status(Registry.find(), remote)
    if as_json:
        return _print_json(data)
    labels = {
        "modified": "modified here (adapters pull --force discards)",
        "unpushed_tags": "not pushed",
        "missing_locally": "files not here (adapters pull)",
        "missing_on_remote": "files missing on the remote (adapters push)",
        "remote_only_tags": "only on the remote (adapters pull)",
    }
    clean = True
    if data["interrupted_pull"]:
        clean = False
        click.echo("A pull was interrupted: run `adapters pull` to finish it.")
    for key, label in labels.items():
        for item in data[key]:
            clean = False
            click.echo(f"{label}: {item}")
    if data["remote_state"] == "unknown":
        click.echo(f"{data['remote']}: unknown ({data['remote_error']})")
    elif clean:
        click.echo(f"In sync with {data['remote']}.")


@click.command()
@click.argument("ref", shell_complete=complete_refs)
@click.option("--stage", required=True, help="Stage to assign, e.g. prod or staging.")
@click.option("-m", "--message", help="Why.")
def promote(ref: str, stage: str, message: str | None) -> None:
    """Assign STAGE to the version REF means."""
    version, previous = Registry.find().promote(ref, stage, message)
    was = f" (was {previous.version})" if previous else ""
    click.echo(f"{version.name}#{stage} -> {version.version}{was}.")


@click.command()
@click.argument("name", shell_complete=complete_names)
@click.option("--stage", required=True, help="Stage to roll back.")
@click.option("--to", "to", help="Version to return to. Default: the one that held the stage before.")
def rollback(name: str, stage: str, to: str | None) -> None:
    """Give STAGE of NAME back to the version that held it before; history is kept."""
    now, was = Registry.find().rollback(name, stage, to)
    click.echo(f"{name}#{stage} -> {now.version} (rolled back from {was.version}).")


@click.command()
@click.argument("names", nargs=-1, shell_complete=complete_names)
@click.option("--remote", help="Remote to push to. Default: the default remote.")
@click.option("--verify", is_flag=True, help="Hash every file on the remote and upload again any that rotted.")
def push(names: tuple[str, ...], remote: str | None, verify: bool) -> None:
    """Upload adapter files the remote lacks, then the branch and version/stage tags (all adapters, or NAMES)."""
    result = push_api.push(Registry.find(), list(names), remote, verify=verify)
    if not result.tags and not result.branch_updated and not result.files:
        click.echo(f"Everything is already on {result.remote}.")
        return
    click.echo(f"Pushed to {result.remote}: {result.files} files, {len(result.tags)} tags.")
    for ref in result.repaired:
        click.echo(f"  repaired {ref}")
    for tag in result.tags:
        click.echo(f"  {tag}")


@click.command()
@click.option("--remote", "check_remote", is_flag=True, help="Also hash every published file on the remote.")
@click.option("--from", "remote", help="Remote to check. Default: the default remote.")
@_json_option
def verify(check_remote: bool, remote: str | None, as_json: bool) -> None:
    """Check every adapter file against its hash, here (and on the remote); say what is wrong and what fixes it."""
    store.PROGRESS = not as_json
    checked, problems = verify_api.verify(Registry.find(), remote, check_remote)
    if as_json:
        _print_json({"checked": checked, "problems": [vars(p) for p in problems]})
    else:
        for p in problems:
            where = "here" if p.where == "here" else f"on {p.where}"
            click.echo(f"{p.ref}: {p.file} {p.problem} {where}; fix: {p.fix}")
        where = "here and on the remote" if check_remote else "here"
        click.echo(f"{checked} versions checked {where}: {len(problems) or 'no'} problem{'s' * (len(problems) != 1)}.")
    if problems:
        raise SystemExit(IntegrityError.exit_code)


@click.command()
@click.argument("refs", nargs=-1, shell_complete=complete_refs)
@click.option("--remote", help="Remote to pull from. Default: the default remote.")
@click.option("--force", is_flag=True, help="Discard local edits in adapters/NAME folders the pull replaces.")
def pull(refs: tuple[str, ...], remote: str | None, force: bool) -> None:
    """Fetch refs, then the files of REFS (default: every stage head and latest version), hashes checked."""
    result = pull_api.pull(Registry.find(), list(refs), remote, force=force)
    for old, new in result.renumbered.items():
        click.echo(f"{old} was also registered on {result.remote}; yours is now {new}.")
    click.echo(
        f"Pulled from {result.remote}: {len(result.new_tags)} new tags, {result.files} files, branch {result.merged}."
    )
    for ref in result.versions:
        click.echo(f"  {ref}")


@click.group()
def hub() -> None:
    """Publish versions to the Hugging Face Hub and register versions from it (token: HF_TOKEN; HF_ENDPOINT)."""


@hub.command("push")
@click.argument("ref", shell_complete=complete_refs)
@click.option("--repo-id", required=True, help="Hub repository ORG/NAME; created when missing.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--stages", is_flag=True, help="Also point a branch per stage the version holds (prod, ...) at it.")
def hub_push(ref: str, repo_id: str, private: bool, stages: bool) -> None:
    """Publish version REF with its model card to a Hub repository, in one commit tagged vX.Y.Z."""
    result = hub_api.push(Registry.find(), ref, repo_id, private=private, stages=stages)
    if result.committed:
        click.echo(f"Pushed {result.ref} to {result.url} (commit {result.commit[:8]}, tag {result.tag}).")
    else:
        click.echo(f"{result.repo_id} already has {result.ref} as {result.tag} ({result.commit[:8]}); nothing to push.")
    for branch in result.branches:
        click.echo(f"  branch {branch} -> {result.tag}")


@hub.command("pull")
@click.argument("source", metavar="REPO_ID[@REVISION]")
@click.option("--as", "name", required=True, help="Adapter name to register it as.")
@click.option("--version", help="Version X.Y.Z. Default: the next after the latest (1.0.0 first).")
@_base_option
@_unservable_option
def hub_pull(source: str, name: str, version: str | None, base: str | None, allow_unservable: bool) -> None:
    """Register a Hub repository's adapter (at a branch, tag or commit; default main) as a new version."""
    result = hub_api.pull(Registry.find(), source, name, version, base=base, allow_unservable=allow_unservable)
    for line in result.left_out:
        click.echo(line, err=True)
    if result.registered:
        click.echo(f"Registered {result.version.ref} from {source} (Hub commit {result.commit[:8]}).")
    else:
        click.echo(f"{source} (Hub commit {result.commit[:8]}) is already {result.version.ref}; nothing changed.")


COMMANDS = [
    init,
    remote,
    clone,
    add,
    list_,
    log,
    show,
    diff,
    checkout,
    status,
    verify,
    promote,
    rollback,
    push,
    pull,
    hub,
]
