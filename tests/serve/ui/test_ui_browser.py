"""The console in a real browser (headless Chromium from Debian, driven by Playwright) against a real server on the
tiny model: browse, lineage and loss curve, the playground's streamed answers, promote and roll back as the admin,
refused as a tenant, keyboard reach; screenshots (ADAPTERS_SCREENSHOTS=docs/images refreshes the manual's)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import serving_app
from test_ui import SCRIPT, Console, big_registry, start_console

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, make_adapter: Any, tiny_base: Path) -> Iterator[Console]:
    """The console on the tiny model: two versions of one adapter answer differently."""
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=4, max_batch=8)
    yield from start_console(tmp_path_factory.mktemp("browser"), make_adapter, engine, tiny_base)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as driver:
        # Debian's Chromium; root in CI has no user namespaces for its sandbox.
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage) that fails the test on any dialog: no script of the registry runs."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    dialogs: list[str] = []
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    context.close()
    assert not dialogs, f"a page opened dialogs: {dialogs}"


def sign_in(page: Any, console: Console, who: str, path: str = "/ui") -> None:
    """Open PATH and give the page WHO's key through its form."""
    page.goto(f"{console.url}{path}")
    page.get_by_label("API key").fill(console.keys[who])
    page.get_by_role("button", name="Use key").click()


@functools.cache
def images() -> Path:
    """Where screenshots go: a temp folder, or ADAPTERS_SCREENSHOTS (docs/images refreshes the manual's)."""
    chosen = os.environ.get("ADAPTERS_SCREENSHOTS")
    folder = Path(chosen) if chosen else Path(tempfile.mkdtemp(prefix="console-screenshots-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(images() / name), full_page=True)


def test_browse_versions_lineage_and_loss_curve(page: Any, console: Console) -> None:
    page.goto(f"{console.url}/ui")
    playwright.expect(page.locator("#notice")).to_contain_text("API key", timeout=10_000)  # written once it asked
    sign_in(page, console, "acme")
    page.get_by_role("link", name="acme-a", exact=True).click()
    page.get_by_role("heading", name="acme-a").wait_for()
    assert "globex" not in page.content()
    page.get_by_role("link", name="v1.1.0").click()
    page.get_by_role("heading", name="acme-a@v1.1.0").wait_for()
    plot = page.get_by_role("img", name="Training and evaluation loss of acme-a@v1.1.0")
    loaded = "img => img.complete && img.naturalWidth > 0"
    assert any(plot.evaluate(loaded) or time.sleep(0.1) for _ in range(100)), "the loss plot never loaded"
    page.locator("#lineage summary").click()
    assert page.get_by_role("row", name="base_model.fingerprint").is_visible()
    card = page.locator("article.card").inner_text()
    assert SCRIPT in card and "bold" in card  # shown as text, never run
    assert console.keys["acme"] not in page.url
    assert page.evaluate("Object.keys(localStorage).length") == 0 and not page.context.cookies()
    shot(page, "console-version.png")


def test_playground_streams_two_versions_side_by_side(page: Any, console: Console) -> None:
    sign_in(page, console, "acme", "/ui/playground")
    page.get_by_label("Prompt", exact=True).fill("Once upon a time")
    page.get_by_label("Version or stage 1").fill("acme-a@v1.0.0")
    page.get_by_label("Version or stage 2").fill("acme-a@v1.1.0")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Run").click()
    columns = page.locator("#pg-columns .column")
    # Playwright's own waits, not wait_for_function: the page's policy forbids evaluating strings, tests' included.
    playwright.expect(columns.locator(".stats").filter(has_text="done")).to_have_count(3, timeout=60_000)
    assert columns.count() == 3
    stats = columns.locator(".stats").all_inner_texts()
    assert all("tok/s" in s and "first token" in s for s in stats), stats
    answers = columns.locator(".answer").all_inner_texts()
    assert all(answers) and answers[1] != answers[2], answers
    shot(page, "console-playground.png")


def test_admin_promotes_and_rolls_back(page: Any, console: Console, cli: Any) -> None:
    def prod() -> str | None:
        listed = json.loads(cli("list", "--json", cwd=console.registry.root).stdout)
        return next(row["stages"].get("prod") for row in listed if row["name"] == "acme-a")

    sign_in(page, console, "admin", "/ui/adapters/acme-a")
    for version in ("v1.0.0", "v1.1.0"):
        page.get_by_label("Version", exact=True).select_option(f"acme-a@{version}")
        page.get_by_label("Stage", exact=True).fill("prod")
        page.get_by_role("button", name="Promote").click()
        page.get_by_text(f"Promoted acme-a@{version} to prod").wait_for()
    assert prod() == "v1.1.0"
    page.get_by_role("button", name="Roll back prod…").click()
    plan = page.locator("#rollback-text")
    plan.get_by_text("after the rollback it will hold acme-a@v1.0.0").wait_for()
    assert "holds acme-a@v1.1.0 now" in plan.inner_text()
    page.get_by_role("button", name="Confirm rollback").click()
    page.get_by_text("Rolled back acme-a#prod to acme-a@v1.0.0").wait_for()
    assert prod() == "v1.0.0"
    page.get_by_role("cell", name="rollback").first.wait_for()
    shot(page, "console-adapter.png")


def test_tenant_sees_no_action_and_is_refused(page: Any, console: Console) -> None:
    sign_in(page, console, "acme", "/ui/adapters/acme-a")
    page.get_by_role("heading", name="Versions").wait_for()
    assert page.get_by_role("button", name="Promote").count() == 0
    assert page.get_by_role("button", name="Roll back prod…").count() == 0
    status = page.evaluate(
        """async () => (await fetch('/ui/api/promote', {method: 'POST', body: JSON.stringify({ref: 'acme-a@v1.0.0',
        stage: 'prod'}), headers: {'Content-Type': 'application/json',
        Authorization: 'Bearer ' + sessionStorage.getItem('adapters-console-key')}})).status"""
    )
    assert status == 403


def test_live_figures_refresh_without_reloading(page: Any, console: Console) -> None:
    sign_in(page, console, "admin", "/ui/live")
    chat = {"model": "acme-a@v1.0.0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    headers = {"Authorization": f"Bearer {console.keys['admin']}"}
    httpx.post(f"{console.url}/v1/chat/completions", json=chat, headers=headers, timeout=60).raise_for_status()
    row = page.locator("#live-models").get_by_role("row").filter(has_text="acme-a@v1.0.0")
    row.wait_for()
    before = int(row.locator("td").nth(1).inner_text())
    page.evaluate("window.marker = 1")  # gone if the page reloads
    httpx.post(f"{console.url}/v1/chat/completions", json=chat, headers=headers, timeout=60).raise_for_status()
    playwright.expect(row.locator("td").nth(1)).not_to_have_text(str(before), timeout=10_000)
    assert page.evaluate("window.marker") == 1
    loaded = page.locator("#live-loaded")
    assert loaded.get_by_role("cell", name="acme-a@v1.0.0", exact=True).count() == 1
    loaded.get_by_role("button", name="Unload acme-a@v1.0.0").click()  # the admin's /admin/unload
    page.get_by_text("Unloaded acme-a@v1.0.0").wait_for()
    playwright.expect(loaded.get_by_role("cell", name="acme-a@v1.0.0", exact=True)).to_have_count(0, timeout=10_000)


def test_inputs_are_labelled_and_the_keyboard_reaches_every_action(page: Any, console: Console) -> None:
    sign_in(page, console, "admin", "/ui/adapters/acme-a")
    page.get_by_role("heading", name="Versions").wait_for()
    unlabelled = page.evaluate(
        "[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.outerHTML)"
    )
    assert unlabelled == []
    actions = page.evaluate(
        "[...document.querySelectorAll('a[href], button:not([hidden]), input:not([type=hidden]), select')]"
        ".filter(e => e.offsetParent !== null).length"
    )
    page.locator("body").focus()
    reached = set()
    for _ in range(actions + 5):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.outerHTML"))
    assert len(reached) >= actions


def test_screenshots_for_the_readme(page: Any, console: Console) -> None:
    sign_in(page, console, "admin")
    page.get_by_role("link", name="acme-a", exact=True).wait_for()
    shot(page, "console-adapters.png")
    assert (images() / "console-adapters.png").stat().st_size > 0 and shutil.which("git")


def test_first_paint_on_2000_versions_is_under_a_second(page: Any, tmp_path: Path) -> None:
    from adapterctl.serve.api.tenants import Tenants
    from adapterctl.serve.ui import browse_app

    with serving_app(browse_app(big_registry(tmp_path), Tenants(None))) as browsing:
        url = browsing.url
        page.goto(f"{url}/ui")  # the first read of the registry writes what later reads reuse
        page.get_by_role("link", name="adapter-000", exact=True).wait_for()
        for path, shown in (("/ui", "adapter-049"), ("/ui/adapters/adapter-150", "v1.9.0")):
            started = time.perf_counter()
            page.goto(f"{url}{path}")
            page.get_by_role("link", name=shown, exact=True).wait_for()
            seconds = time.perf_counter() - started
            assert seconds < 1.0, (path, seconds)
