"""Registry costs, measured side by side in one run: push time and bytes moved, `adapters list`, CLI start-up,
and how the first push, `clone`, `pull REF` of one version, `log`, `list` and `status` grow with the registry's
size (50 against 2,000 versions by default, 10 per adapter), with each ratio.

Usage: python bench/registry.py [--adapters 20] [--versions 3] [--mb 2.0] [--list-versions 500]
                                [--scale 50,2000] [--scale-only] [--quick] [--code CHECKOUT] [--json out.json]

Adapters are synthetic but real in form: a safetensors file of LoRA-shaped tensors (about --mb MB each),
adapter_config.json, lineage.json and a model card, registered with `adapters add` into a repository
whose remote is a local bare git repository with its DVC storage inside it. --code measures the `adapters`
of another checkout (an older commit, say) with this bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "bench"),
    "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "bench@example.com"),
    "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "bench"),
    "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "bench@example.com"),
}


def adapters(*args: str, cwd: Path) -> float:
    """Run `adapters ARGS` as a user would; return its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"adapters {' '.join(args)} failed: {proc.stderr.strip()}")
    return time.perf_counter() - start


def make_adapter(folder: Path, seed: int, megabytes: float) -> int:
    """A LoRA-shaped adapter folder of about MEGABYTES; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    layers = max(1, round(megabytes * MB / (2 * 2 * 8 * 576 * 4)))
    tensors = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": rng.standard_normal(
            (8, 576) if ab == "A" else (576, 8), dtype=np.float32
        )
        for i in range(layers)
        for m in ("q_proj", "v_proj")
        for ab in ("A", "B")
    }
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "smollm2-135m-instruct"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    lineage = {"base_model": {"name": "smollm2-135m-instruct", "fingerprint": "sha256:" + "0" * 64}, "seed": seed}
    (folder / "lineage.json").write_text(json.dumps(lineage))
    (folder / "README.md").write_text(f"---\nlibrary_name: peft\n---\nSynthetic adapter {seed}.\n")
    return sum(p.stat().st_size for p in folder.iterdir())


def tree_bytes(folder: Path) -> int:
    """Bytes of all files under FOLDER (what a remote holds)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def median_time(command: list[str], cwd: Path, runs: int) -> float:
    """Median wall time of COMMAND over RUNS runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


VERSIONS_PER_ADAPTER = 10


def grow(registry: Path, work: Path, versions: int) -> None:
    """A registry of VERSIONS versions, 10 per adapter, cheaply: one real adapter's pointer file is reused by every
    name (the same DVC objects), one commit per round of versions and one annotated tag per version, as `adapters
    add` makes; the tag objects are written in one git call and their refs in one transaction."""
    seed = work / "seed-adapter"
    make_adapter(seed, 0, 0.1)
    adapters("add", "seed", str(seed), cwd=registry)
    pointer = (registry / "adapters" / "seed.dvc").read_text()
    names = [f"adapter-{i:03d}" for i in range(max(1, versions // VERSIONS_PER_ADAPTER))]
    commits = []
    for minor in range(VERSIONS_PER_ADAPTER):
        for name in names:
            (registry / "adapters" / f"{name}.dvc").write_text(
                pointer.replace("version: 1.0.0", f"version: 1.{minor}.0").replace("path: seed", f"path: {name}")
            )
        if minor == 0:
            ignore = registry / "adapters" / ".gitignore"
            ignore.write_text(ignore.read_text() + "".join(f"/{name}\n" for name in names))
            project = registry / "dvc.yaml"
            project.write_text(
                project.read_text()
                + "".join(f"  {name}:\n    path: adapters/{name}\n    type: model\n" for name in names)
            )
        git("add", "-A", "adapters", "dvc.yaml", cwd=registry)
        git("commit", "-qm", f"Register round {minor}", cwd=registry)
        commits.append(git("rev-parse", "HEAD", cwd=registry).strip())
    start = int(time.time())
    tags = [(f"{name}@v1.{minor}.0", commits[minor]) for minor in range(VERSIONS_PER_ADAPTER) for name in names]
    objects = work / "tag-objects"
    objects.mkdir()
    for number, (tag, commit) in enumerate(tags):
        (objects / str(number)).write_text(
            f"object {commit}\ntype commit\ntag {tag}\ntagger bench <bench@example.com> {start + number} +0000\n\n"
            f"Register {tag}\n"
        )
    paths = "".join(f"{objects / str(number)}\n" for number in range(len(tags)))
    shas = git("hash-object", "-t", "tag", "-w", "--stdin-paths", cwd=registry, input=paths).split()
    updates = "".join(f"create refs/tags/{tag} {sha}\n" for (tag, _), sha in zip(tags, shas, strict=True))
    git("update-ref", "--stdin", cwd=registry, input=updates)


def git(*args: str, cwd: Path, input: str = "") -> str:
    """`git ARGS` in CWD; its stdout."""
    return subprocess.run(
        ["git", *args], cwd=cwd, env=ENV, input=input, capture_output=True, text=True, check=True
    ).stdout


def median_of(runs: int, command: Callable[[int], float]) -> float:
    """The median of RUNS timings of COMMAND(run number)."""
    return statistics.median(command(run) for run in range(runs))


def scale(work: Path, versions: int, mb: float, runs: int) -> dict[str, float]:
    """Seconds (and bytes) of the first push of a registry of VERSIONS versions, a clone of it, pull of one new
    version into the clone, and `log` (every adapter: the first, then again), `list` and `status` there."""
    registry, origin, mate = work / "registry", work / "origin.git", work / "mate"
    adapters("init", str(registry), cwd=work)
    adapters("remote", "add", "origin", str(origin), "--create", cwd=registry)
    grow(registry, work, versions)
    before = tree_bytes(origin)
    first_push = adapters("push", cwd=registry)
    pushed = tree_bytes(origin) - before
    clone = median_of(runs, lambda run: adapters("clone", str(origin), str(work / f"clone-{run}"), cwd=work))
    adapters("clone", str(origin), str(mate), cwd=work)
    make_adapter(work / "new", 10**6, mb)
    adapters("add", "adapter-000", str(work / "new"), cwd=registry)
    adapters("push", cwd=registry)
    return {
        "first_push_s": first_push,
        "first_push_mb": pushed / MB,
        "clone_s": clone,
        "pull_one_s": adapters("pull", f"adapter-000@v1.{VERSIONS_PER_ADAPTER}.0", cwd=mate),
        # The first log in a clone reads every version's summary; later ones only the versions new since.
        "log_first_s": adapters("log", cwd=mate),
        "log_s": median_of(runs, lambda _: adapters("log", cwd=mate)),
        "list_s": median_of(runs, lambda _: adapters("list", cwd=mate)),
        "status_s": median_of(runs, lambda _: adapters("status", cwd=mate)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--mb", type=float, default=2.0, help="Approximate size of one adapter version.")
    parser.add_argument("--list-versions", type=int, default=500)
    parser.add_argument("--runs", type=int, default=7, help="Runs per start-up measurement.")
    parser.add_argument("--scale", default="50,2000", help="Registry sizes (versions, 10 per adapter) to compare.")
    parser.add_argument("--scale-runs", type=int, default=3, help="Runs (median) of clone, log, list and status.")
    parser.add_argument("--scale-only", action="store_true", help="Only the scale table.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and one run each: checks the bench runs.")
    parser.add_argument("--code", type=Path, default=ROOT, help="Checkout whose `adapters` is measured.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.versions, args.mb, args.list_versions, args.runs = 2, 1, 0.1, 4, 1
        args.scale, args.scale_runs = "10,20", 1
    ENV["PYTHONPATH"] = str(args.code.resolve())
    sizes = [int(n) for n in args.scale.split(",") if n]
    scaled = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-registry-scale-") as tmp:
            scaled[size] = scale(Path(tmp), size, args.mb, args.scale_runs)
        print(f"scale {size}: {scaled[size]}", file=sys.stderr)
    if sizes:
        columns = list(next(iter(scaled.values())))
        print("| versions | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for size, row in scaled.items():
            print(f"| {size:,} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
        first, last = scaled[sizes[0]], scaled[sizes[-1]]
        ratios = " | ".join(f"{last[c] / first[c]:.2f}x" for c in columns)
        print(f"| {sizes[-1]:,} / {sizes[0]:,} | {ratios} |")
    if args.scale_only:
        if args.json:
            args.json.write_text(json.dumps({"scale": scaled}, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        work = Path(tmp)
        registry, origin = work / "registry", work / "origin.git"
        adapters("init", str(registry), cwd=work)
        adapters("remote", "add", "origin", str(origin), "--create", cwd=registry)
        total, seed = 0, 0
        for _ in range(args.versions):
            for index in range(args.adapters):
                seed += 1
                total += make_adapter(work / "src" / str(seed), seed, args.mb)
                adapters("add", f"adapter-{index:02d}", str(work / "src" / str(seed)), cwd=registry)
        count = args.adapters * args.versions
        print(f"registered {count} versions ({total / MB:,.1f} MB of adapter files)", file=sys.stderr)

        before = tree_bytes(origin)
        first_push = adapters("push", cwd=registry)
        first_bytes = tree_bytes(origin) - before

        seed += 1
        one = make_adapter(work / "src" / str(seed), seed, args.mb)
        adapters("add", "adapter-00", str(work / "src" / str(seed)), cwd=registry)
        before = tree_bytes(origin)
        one_push = adapters("push", cwd=registry)
        one_bytes = tree_bytes(origin) - before

        before = tree_bytes(origin)
        noop_push = adapters("push", cwd=registry)
        noop_bytes = tree_bytes(origin) - before

        # Grow to LIST_VERSIONS versions for `adapters list`: extra version tags on registered commits
        # (registering hundreds more through DVC would only make the setup slow, not the listing).
        commits = subprocess.run(
            ["git", "rev-list", "HEAD", "--", "adapters"], cwd=registry, capture_output=True, text=True, check=True
        ).stdout.split()
        existing = count + 1
        for extra in range(max(0, args.list_versions - existing)):
            name = f"adapter-{extra % args.adapters:02d}"
            tag = f"{name}@v9.{extra // args.adapters}.0"
            commit = commits[0]  # the tip holds every adapter's pointer file: a tag elsewhere may name none
            subprocess.run(["git", "tag", "-a", tag, commit, "-m", "bench"], cwd=registry, env=ENV, check=True)
        listed = json.loads(
            subprocess.run(
                [sys.executable, "-m", "adapterctl.cli", "list", "--json"], cwd=registry, env=ENV, capture_output=True
            ).stdout
        )
        versions_listed = sum(row["versions"] for row in listed)

        python = median_time([sys.executable, "-c", "pass"], registry, args.runs)
        listing = median_time([sys.executable, "-m", "adapterctl.cli", "list"], registry, args.runs)
        help_only = median_time([sys.executable, "-m", "adapterctl.cli", "--help"], registry, args.runs)

    figures: dict[str, Any] = {
        "scale": scaled,
        "versions_first_push": count,
        "first_push_s": first_push,
        "first_push_bytes": first_bytes,
        "adapter_files_bytes": total,
        "one_version_push_s": one_push,
        "one_version_push_bytes": one_bytes,
        "one_version_bytes": one,
        "unchanged_push_s": noop_push,
        "unchanged_push_bytes": noop_bytes,
        "list_versions": versions_listed,
        "list_s": listing,
        "help_s": help_only,
        "python_pass_s": python,
    }
    print("| measurement | time | bytes moved | ratio |\n|---|---|---|---|")
    print(
        f"| (a) first push, {count} versions | {first_push:.2f} s | {first_bytes / MB:,.1f} MB | "
        f"{first_bytes / total:.3f}x the adapter files |"
    )
    print(
        f"| (b) one new version after that | {one_push:.2f} s | {one_bytes / MB:,.2f} MB | "
        f"{one_bytes / one:.3f}x that version's files |"
    )
    print(f"| unchanged registry | {noop_push:.2f} s | {noop_bytes} B | - |")
    print(
        f"| (c) `adapters list`, {versions_listed} versions | {listing * 1000:.0f} ms | - | "
        f"{listing / python:.1f}x `python -c pass` ({python * 1000:.0f} ms) |"
    )
    print(f"| `adapters --help` (start-up alone) | {help_only * 1000:.0f} ms | - | {help_only / python:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
