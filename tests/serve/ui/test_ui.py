"""The console at /ui: pages, tenant isolation, escaping, security headers, admin actions through the registry's own
code, live figures from the server's metrics, and speed on a registry of 2,000 versions."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ROOT
from serving import crafted, registry_with, serving, serving_app, tenants_cli, wait_for

from adapterctl.registry.repo import Registry

SCRIPT = "<script>alert('x')</script>"


@dataclass
class Console:
    """A tenants-mode server with a console: acme-a (two versions), globex-a; keys for each tenant and the admin."""

    url: str
    registry: Registry
    keys: dict[str, str]

    def get(self, path: str, who: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60)

    def post(self, path: str, who: str | None, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60)


def hostile(source: Path, dest: Path) -> Path:
    """A copy of adapter SOURCE whose model card holds a script, raw HTML and a javascript: link, with a loss plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    shutil.copytree(source, dest)
    card = f"---\nlibrary_name: peft\n---\n# Card\n\n{SCRIPT}\n\n<b>bold</b> [click](javascript:alert(1))\n"
    (dest / "README.md").write_text(card)
    figure = pyplot.figure(figsize=(3, 2))
    pyplot.plot([3.0, 2.0, 1.5], label="train")
    figure.savefig(dest / "loss.png")
    pyplot.close(figure)
    return dest


def start_console(root: Path, make_adapter: Any, engine: Any, base: Path) -> Iterator[Console]:
    """Serve a console with ENGINE on the base folder BASE, a fresh registry and a tenants file (yields it while it
    runs)."""
    registry = registry_with(root / "registry", {"acme-a": [make_adapter(1)], "globex-a": [make_adapter(2)]})
    registry.add("acme-a", hostile(make_adapter(3), root / "hostile"), message=f"Try {SCRIPT}")
    tenants_file = root / "tenants.yaml"

    key = partial(tenants_cli, tenants_file)

    keys = {
        "acme": key("add", "acme", "--adapters", "acme-*"),
        "globex": key("add", "globex", "--adapters", "globex-*"),
    }
    keys["admin"] = key("admin")
    with serving(engine, registry, base, tenants=tenants_file, interval=0.2) as server:
        yield Console(server.url, registry, keys)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, make_adapter: Any, tiny_base: Path) -> Iterator[Console]:
    from fake_engine import FakeEngine

    from adapterctl.core.base import fingerprint

    engine = FakeEngine(model_id="tiny-llama", fingerprint=fingerprint(tiny_base))
    yield from start_console(tmp_path_factory.mktemp("console"), make_adapter, engine, tiny_base)


def test_pages_are_public_shells_with_strict_headers_and_no_inline_script(console: Console) -> None:
    for path in ("/ui", "/ui/adapters/acme-a", "/ui/versions/acme-a%23prod", "/ui/diff", "/ui/playground", "/ui/live"):
        page = console.get(path)
        assert page.status_code == 200, path
        assert "acme-a" not in page.text.replace(path.removeprefix("/ui"), "")  # a shell holds no registry data
        assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/ui/static/console.js" defer>']
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
    assert 'data-src="/ui/part/versions/acme-a%23prod"' in console.get("/ui/versions/acme-a%23prod").text
    script = console.get("/ui/static/console.js")
    assert script.status_code == 200 and "sessionStorage" in script.text and "localStorage" not in script.text
    assert script.headers["x-content-type-options"] == "nosniff"


def test_data_needs_a_key_and_a_tenant_sees_only_its_adapters(console: Console) -> None:
    assert console.get("/ui/part/adapters").status_code == 401
    assert console.get("/ui/part/adapters").json()["error"]["type"] == "authentication_error"
    acme = console.get("/ui/part/adapters", "acme").text
    assert "acme-a" in acme and "globex" not in acme
    for path in ("/ui/part/adapters/globex-a", "/ui/part/versions/globex-a@v1.0.0"):
        # Another tenant's adapter answers exactly as one that does not exist.
        refused, absent = console.get(path, "acme"), console.get(path.replace("globex", "nobody"), "acme")
        assert refused.status_code == absent.status_code == 404
        assert refused.text == absent.text.replace("nobody", "globex")
    assert console.get("/ui/api/rollback?name=globex-a&stage=prod", "acme").status_code == 403
    assert console.get("/ui/part/diff?left=acme-a@v1.0.0&right=globex-a@v1.0.0", "acme").status_code == 404
    assert "globex-a" in console.get("/ui/part/adapters", "admin").text
    assert "acme-a" in console.get("/ui/part/adapters?q=ACME", "admin").text
    assert "acme-a" not in console.get("/ui/part/adapters?q=glob", "admin").text


def test_registry_values_render_as_text(console: Console) -> None:
    adapter = console.get("/ui/part/adapters/acme-a", "acme").text
    assert "Try &lt;script&gt;" in adapter and SCRIPT not in adapter
    page = console.get("/ui/part/versions/acme-a@v1.1.0", "acme")
    assert page.status_code == 200
    assert SCRIPT not in page.text and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text
    assert "<b>bold</b>" not in page.text and "&lt;b&gt;bold&lt;/b&gt;" in page.text
    assert "javascript:" not in page.text.replace("[click](javascript:alert(1))", "")
    assert "<h1>Card</h1>" in page.text  # the markdown itself is rendered
    assert 'src="data:image/png;base64,' in page.text
    for shown in ("adapter_model.safetensors", "base_model.fingerprint", "trained here", "Diff acme-a@v1.1.0 against"):
        assert shown in page.text


def test_version_pages_show_fidelity_origin_files_and_a_diff(console: Console) -> None:
    adapter = console.get("/ui/part/adapters/acme-a", "acme").text
    assert "v1.0.0" in adapter and "v1.1.0" in adapter and "Promote" not in adapter  # no admin action for tenants
    assert adapter.count('class="fidelity unknown"') == 6  # unknown precision: on nf4, int8 and none, per version
    assert "<td>0.5000</td>" in adapter and "<td>0.2500</td>" in adapter  # eval loss after training (seeds 1, 3)
    page = console.get("/ui/part/versions/acme-a@v1.0.0", "acme").text
    assert "No model card" not in page and "Adapter made with seed 1" in page and "no loss.png" in page
    assert 'data-admin="/admin/load"' not in page
    diff = console.get("/ui/part/diff?left=acme-a@v1.0.0&right=acme-a@v1.1.0", "acme").text
    assert "hyperparameters" in diff and "README.md" in diff and "seed" in diff


def test_fidelity_classes_per_serving_precision(console: Console, tmp_path: Path, make_adapter: Any) -> None:
    from adapterctl.core.precision import Precision

    def nf4_trained(config: dict[str, Any], lineage: dict[str, Any]) -> None:
        lineage["precision"] = Precision.of("nf4", "float32").to_lineage()
        lineage["fidelity"] = {"precisions": {"none": {"fidelity": 0.5}}}

    console.registry.add("acme-q", crafted(make_adapter(4), tmp_path / "q", nf4_trained))
    page = console.get("/ui/part/versions/acme-q@v1.0.0", "acme").text
    for precision, kind in (("nf4", "match"), ("int8", "unmeasured"), ("none", "low")):
        assert f'<li>{precision}: <span class="fidelity {kind}">{kind}</span></li>' in page


def test_tenants_cannot_act_and_actions_take_json_only(console: Console) -> None:
    assert console.post("/ui/api/promote", "acme", ref="acme-a@v1.0.0", stage="prod").status_code == 403
    assert console.post("/ui/api/rollback", "acme", name="acme-a", stage="prod").status_code == 403
    form = httpx.post(
        f"{console.url}/ui/api/promote",
        data={"ref": "acme-a@v1.0.0", "stage": "prod"},
        headers={"Authorization": f"Bearer {console.keys['admin']}"},
    )
    assert form.status_code == 400 and "application/json" in form.json()["error"]["message"]
    assert not console.registry.state().adapters["acme-a"].stages()


def test_admin_promotes_and_rolls_back_with_the_tags_the_cli_writes(console: Console, cli: Any) -> None:
    def stages() -> dict[str, str]:
        listed = cli("list", "--json", cwd=console.registry.root)
        return next(row["stages"] for row in json.loads(listed.stdout) if row["name"] == "globex-a")

    registry = console.registry
    registry.add("globex-a", registry.root.parent / "hostile")
    for ref in ("globex-a@v1.0.0", "globex-a@v1.1.0"):
        done = console.post("/ui/api/promote", "admin", ref=ref, stage="prod")
        assert done.status_code == 200, done.text
    assert done.json() == {"ref": "globex-a@v1.1.0", "stage": "prod", "was": "globex-a@v1.0.0"}
    assert stages() == {"prod": "v1.1.0"}
    # The server's own catalog sees it at once: the bare name means the promoted version.
    models = console.get("/v1/models", "globex").json()["data"]
    assert {m["id"]: m.get("version") for m in models}["globex-a"] == "globex-a@v1.1.0"
    preview = console.get("/ui/api/rollback?name=globex-a&stage=prod", "admin").json()
    assert preview == {"stage": "prod", "now": "globex-a@v1.1.0", "to": "globex-a@v1.0.0"}
    back = console.post("/ui/api/rollback", "admin", name="globex-a", stage="prod")
    assert back.json() == {"ref": "globex-a@v1.0.0", "stage": "prod", "was": "globex-a@v1.1.0"}
    assert stages() == {"prod": "v1.0.0"}
    history = console.get("/ui/part/adapters/globex-a", "admin").text
    assert history.count("<td>rollback</td>") == 1 and history.count("<td>promote</td>") == 2
    # A stage the CLI assigns (another process) shows on the next page: a written tag ends the page's snapshot.
    assert cli("promote", "globex-a@v1.1.0", "--stage", "staging", cwd=registry.root).exit_code == 0
    assert '<span class="stage">staging</span>' in console.get("/ui/part/adapters/globex-a", "admin").text
    again = console.post("/ui/api/promote", "admin", ref="globex-a@v1.0.0", stage="prod!")
    assert again.status_code == 400
    assert console.get("/ui/api/rollback?name=acme-a&stage=prod", "admin").status_code == 404


def test_live_figures_come_from_the_metrics_and_stay_per_tenant(console: Console) -> None:
    chat = {"model": "acme-a@v1.0.0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    assert console.post("/v1/chat/completions", "acme", **chat).status_code == 200
    assert console.post("/v1/chat/completions", "acme", **{**chat, "max_tokens": -1}).status_code == 400
    acme = console.get("/ui/api/live", "acme").json()
    row = next(m for m in acme["models"] if m["model"] == "acme-a@v1.0.0")
    assert row["requests"] >= 1 and row["completion_tokens"] >= 1 and row["mean_seconds"] > 0
    # Its lineage records no precision: its fidelity on the server's base is unknown, as `adapters serve` judges it.
    assert {"model": "acme-a@v1.0.0", "fidelity": "unknown"} in acme["loaded"] and acme["running"] is None
    globex = console.get("/ui/api/live", "globex").json()
    assert not [m for m in globex["models"] if m["model"].startswith("acme")] and not globex["loaded"]
    assert "acme-a@v1.0.0" in [m["model"] for m in console.get("/ui/api/live", "admin").json()["models"]]
    assert console.get("/ui/api/live").status_code == 401


def test_errors_per_model_are_counted(console: Console) -> None:
    before = _live_row(console, "acme-a@v1.0.0").get("errors", 0)
    bad = {"model": "acme-a@v1.0.0", "prompt": "x" * 600, "max_tokens": 5}  # over the context: refused once resolved
    assert console.post("/v1/completions", "acme", **bad).status_code == 400
    assert _live_row(console, "acme-a@v1.0.0")["errors"] == before + 1


def _live_row(console: Console, model: str) -> dict[str, Any]:
    rows = console.get("/ui/api/live", "admin").json()["models"]
    return next((m for m in rows if m["model"] == model), {})


def test_browse_only_console_without_a_model(tmp_path: Path, make_adapter: Any) -> None:
    from adapterctl.serve.api.tenants import Tenants
    from adapterctl.serve.ui import browse_app

    registry = registry_with(tmp_path / "registry", {"solo": [make_adapter(1)]})
    with serving_app(browse_app(registry, Tenants(None))) as browsing:
        url = browsing.url
        assert "solo" in httpx.get(f"{url}/ui/part/adapters").text
        assert "needs a model" in httpx.get(f"{url}/ui/part/playground").text
        assert httpx.get(f"{url}/ui/api/live").status_code == 503
        assert "/ui/playground" not in httpx.get(f"{url}/ui").text
        done = httpx.post(f"{url}/ui/api/promote", json={"ref": "solo@v1.0.0", "stage": "prod"})
        assert done.status_code == 200 and registry.state().adapters["solo"].stages()["prod"].ref == "solo@v1.0.0"


def test_ui_command_serves_a_registry_without_a_model(cli: Any, tmp_path: Path, make_adapter: Any) -> None:
    registry = registry_with(tmp_path / "registry", {"solo": [make_adapter(1)]})
    refused = cli("ui", "--host", "0.0.0.0", cwd=registry.root)
    assert refused.exit_code == 2 and "pass --tenants FILE" in refused.output
    command = [sys.executable, "-m", "adapterctl.cli", "ui", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, cwd=registry.root, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            line = process.stderr.readline()
            url = line.strip().split(" at ")[1]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/ui"), line
            wait_for(lambda: _answers(f"{url}/part/adapters"), 60, "the console to listen")
            assert "solo" in httpx.get(f"{url}/part/adapters", timeout=30).text
        finally:
            process.terminate()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def big_registry(work: Path, versions: int = 2000) -> Registry:
    """A registry of VERSIONS versions, 10 per adapter, grown as bench/registry.py grows its own (seconds)."""
    spec = importlib.util.spec_from_file_location("bench_registry", ROOT / "bench" / "registry.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    registry, _ = Registry.init(work / "big")
    bench.grow(registry.root, work, versions)
    return registry


def test_first_paint_is_fast_on_2000_versions(tmp_path: Path) -> None:
    """The adapters page and an adapter's page of a registry of 2,000 versions answer in well under a second."""
    from adapterctl.serve.api.tenants import Tenants
    from adapterctl.serve.ui import browse_app

    with serving_app(browse_app(big_registry(tmp_path), Tenants(None))) as browsing:
        url = browsing.url
        httpx.get(f"{url}/ui/part/adapters").raise_for_status()  # the tag-pointer record is written once
        for path in ("/ui", "/ui/part/adapters", "/ui/part/adapters?page=4", "/ui/part/adapters/adapter-150"):
            started = time.perf_counter()
            page = httpx.get(f"{url}{path}", timeout=60)
            seconds = time.perf_counter() - started
            assert page.status_code == 200 and seconds < 1.0, (path, seconds)
        assert "Page 4 of 5 (201 in all)" in httpx.get(f"{url}/ui/part/adapters?page=4").text
