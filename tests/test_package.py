"""The wheel claims one name in site-packages, `adapterctl`, and carries every module, kernel and console file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("core", "train", "registry", "serve")  # the design card's folders, linked into adapterctl/


def test_the_wheel_installs_only_adapterctl_with_every_source_file(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("adapterctl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["adapterctl"]
    assert {name.split("/")[0] for name in names} == {"adapterctl", wheel.name.split("-py3")[0] + ".dist-info"}
    expected = {
        f"adapterctl/{path.relative_to(ROOT)}"
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*")
        if path.suffix in {".py", ".c", ".html", ".css", ".js"} and "__pycache__" not in path.parts
    }
    assert expected - names == set()
    assert "adapterctl/serve/engines/transformers/kernels/sgmv.c" in names


def test_a_script_beside_a_file_named_like_a_package_still_imports_adapterctl(tmp_path: Path) -> None:
    """A folder holding registry.py or serve.py (as bench/ does) shadows nothing of ours."""
    for name in (*FOLDERS, "cli"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('shadowed')\n")
    script = tmp_path / "run.py"
    script.write_text("import adapterctl.registry.names\nimport adapterctl.serve.api.app\nprint('ok')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
