"""Lineage you can see, against a REAL `prefect server start` with its UI, in Debian's Chromium:

- a flow run materialises the windows and the records of a recording as assets, the records with
  the windows as their upstream (asset events read back from the server's API);
- the open-source UI of this Prefect version shows that lineage where docs/deploy.md says: Event
  Feed -> "Asset materialization succeeded" -> Resource and Related Resources. The test saves the
  screenshot that docs/img/lineage.png is (written there when AUTOEXPLAIN_WRITE_DOCS_IMG=1);
- the viewer artifact's http link, to a site served by `autoexplain view --serve`, opens from the UI;
- `autoexplain view --serve` serves a site over http until it is stopped, and says so in a file
  that the viewer artifact believes only while that server answers.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.test_prefect_server import (  # noqa: F401 - against_server is a fixture, used by name
    ASSET_EVENTS,
    PREFECT,
    _asset_events,
    _clean_env,
    _stop,
    _wait_healthy,
    against_server,
)
from tests.llama_server import free_port
from tests.prefect_homes import prefect_home
from tests.viewer_fixtures import CHROMIUM_ARGS, chromium  # noqa: F401 - chromium is a fixture

REPO = Path(__file__).resolve().parents[1]
DOCS_IMG = REPO / "docs" / "img" / "lineage.png"
EXE = [sys.executable, "-m", "autoexplain.flows.cli"]  # the console script's module
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> bytes:
    with NO_PROXY.open(url, timeout=10) as r:
        assert r.status == 200, url
        return r.read()


def _tiny_site(folder: Path, title: str = "tiny viewer") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(f"<!doctype html><title>{title}</title><h1 id='t'>{title}</h1>")
    return folder


# ---------------------------------------------------------------- view --serve, no Prefect


class _Served:
    """`autoexplain view --serve ...` as a subprocess; `url` is the first line it prints."""

    def __init__(self, *args: str, cwd: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([*EXE, "view", "--serve", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True).start()
        try:
            self.url = lines.get(timeout=60).strip()
        except queue.Empty:
            self.stop()
            raise AssertionError(f"view --serve printed no URL: {self.proc.stderr.read()[-3000:]}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            _stop(self.proc)


def test_view_serve_serves_the_site_and_says_so(tmp_path):
    from autoexplain.serve import STATE, running_url
    from autoexplain.tasks.report import viewer_markdown

    site = _tiny_site(tmp_path / "my site")  # a space: the command in the artifact must quote it
    index_uri = (site / "index.html").as_uri()
    assert running_url(site) is None
    assert "No `autoexplain view --serve` was serving" in viewer_markdown(index_uri)

    served = _Served("--site", str(site), "--port", "0", cwd=tmp_path)
    try:
        assert served.url.startswith("http://127.0.0.1:") and served.url.endswith("/"), served.url
        assert _get(served.url) == _get(served.url + "index.html") == (site / "index.html").read_bytes()
        assert json.loads((site / STATE).read_text())["url"] == served.url
        assert running_url(site) == served.url
        md = viewer_markdown(index_uri)
        assert f"autoexplain view --serve --site '{site}'" in md
        assert f"[{served.url}]({served.url})" in md
        # another folder's server is not this folder's: the state file must match what the URL serves
        other = _tiny_site(tmp_path / "other")
        (other / STATE).write_text((site / STATE).read_text())
        assert running_url(other) is None
    finally:
        rc = served.stop()
    assert rc == 0, served.proc.stderr.read()[-3000:]
    assert not (site / STATE).exists(), "the state file outlived its server"
    assert running_url(site) is None
    with pytest.raises(OSError):
        _get(served.url)


def test_view_serve_errors_are_one_line(tmp_path):
    from tests.test_cli import _one_error_line, run

    assert "not a viewer site" in _one_error_line(run("view", "--serve", "--site", str(tmp_path)))
    assert "no --scores given" in _one_error_line(run("view", "--site", str(tmp_path)))
    site = _tiny_site(tmp_path / "site")
    served = _Served("--site", str(site), "--port", "0", cwd=tmp_path)
    try:
        port = served.url.rsplit(":", 1)[1].strip("/")
        assert "cannot serve on 127.0.0.1:" in _one_error_line(
            run("view", "--serve", "--site", str(site), "--port", port))
    finally:
        served.stop()


# ---------------------------------------------------------------- a real server with its UI


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` with its UI, on a free loopback port (test_prefect_server's fixture runs
    it without the UI). `against_server`, imported from there, points this process at it."""
    root = tmp_path_factory.mktemp("prefect-ui-server")
    home, client_home, log = root / "server-home", root / "client-home", root / "server.log"
    prefect_home(home)  # a migrated database: the server starts without migrating one
    client_home.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=f"{base}/api",
                     PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db")
    with open(log, "w") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"{base}/api", proc, log)
        yield {"url": f"{base}/api", "ui": base, "home": client_home, "root": root, "log": log}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def recording_run(against_server, tiny_llama_dir, prose_corpus, tmp_path_factory):
    """A flow that records the tiny Llama, publishes the recording, and writes the viewer artifact for
    a site that a `view --serve` server is serving."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.events.worker import EventsWorker

    from autoexplain import serve
    from autoexplain.tasks.report import publish, publish_recording, viewer_markdown
    from autoexplain.tasks.stages import record_task

    root = tmp_path_factory.mktemp("lineage")
    out = root / "out"
    site = _tiny_site(root / "site", "served from the viewer artifact")
    server = serve.start(site, port=0)

    @flow(name="lineage-check")
    def lineage_check() -> dict:
        records = record_task(tiny_llama_dir, str(prose_corpus), [1], 100_000, str(out), 8, 8, 6)
        published = publish_recording(records)
        # an independent output, published from a fresh dict: it must not inherit an upstream asset
        publish({"uri": (out / "independent").resolve().as_uri(), "key": "independent"}, [])
        create_markdown_artifact(viewer_markdown((site / "index.html").as_uri()), key="viewer")
        return {"records": records, "published": published}

    try:
        state = lineage_check(return_state=True)
        assert state.is_completed(), state
        EventsWorker.drain_all()
        yield {"run_id": state.state_details.flow_run_id, "out": out, "site": site, "served": server.url,
               **state.result()}
    finally:
        server.close()


@pytest.mark.slow
def test_recording_is_materialised_with_its_upstream(recording_run, against_server):
    from autoexplain.storage import read_manifest

    records = recording_run["records"]
    windows_dir = Path(records["windows"]).parent
    assert recording_run["published"] == {"windows": windows_dir.resolve().as_uri(), "records": records["uri"]}
    assert read_manifest(records["path"])["inputs"]["windows"] == windows_dir.name
    windows = recording_run["published"]["windows"]

    independent = (recording_run["out"] / "independent").resolve().as_uri()
    events = _asset_events(against_server["url"], recording_run["run_id"], want=3)
    materialised = {e["resource"]["prefect.resource.id"]: {
        r["prefect.resource.id"] for r in e["related"] if r["prefect.resource.role"] == "asset"}
        for e in events if e["event"] == ASSET_EVENTS[0]}
    assert materialised == {windows: set(), records["uri"]: {windows}, independent: set()}
    referenced = {e["resource"]["prefect.resource.id"] for e in events if e["event"] == ASSET_EVENTS[1]}
    assert referenced == {windows}


@pytest.mark.slow
def test_lineage_and_viewer_link_in_the_ui(recording_run, against_server, chromium, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    ui, records = against_server["ui"], recording_run["records"]["uri"]
    windows = recording_run["published"]["windows"]
    shot = DOCS_IMG if os.environ.get("AUTOEXPLAIN_WRITE_DOCS_IMG") == "1" else tmp_path / "lineage.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 560})
            page.set_default_timeout(30_000)
            # Event Feed -> the materialisation of the records -> its page
            page.goto(f"{ui}/events")
            card = (page.locator(".workspace-events-timeline-content")
                    .filter(has=page.locator(".workspace-events-list-item__resource", has_text=records))
                    .filter(has_text="Asset materialization succeeded"))
            card.first.get_by_role("link", name="Asset materialization succeeded").click()
            page.wait_for_url("**/events/event/**")
            expect(page.get_by_text("Related Resources", exact=True)).to_have_count(1)  # the feed is gone
            resource = page.locator(".p-key-value", has=page.get_by_text("Resource", exact=True))
            related = page.locator(".p-key-value", has=page.get_by_text("Related Resources", exact=True))
            expect(resource.get_by_text(records, exact=True)).to_be_visible()
            expect(related.get_by_text(windows, exact=True)).to_be_visible()
            expect(related.get_by_text("lineage-check", exact=True)).to_be_visible()  # the flow
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), animations="disabled")  # not mid-way through a fade-in
            assert shot.stat().st_size > 10_000

            # the viewer artifact (Artifacts -> viewer -> the latest one): its http link opens the served site
            page.goto(f"{ui}/artifacts/key/viewer")
            page.locator("a[href^='/artifacts/artifact/']").first.click()
            expect(page.get_by_role("heading", name="Neuron viewer")).to_be_visible()
            expect(page.get_by_text(f"autoexplain view --serve --site {recording_run['site']}")).to_be_visible()
            link = page.locator(f"a[href='{recording_run['served']}']")
            expect(link.first).to_be_visible()
            with page.context.expect_page() as opened:
                link.first.click()
            site_page = opened.value
            site_page.wait_for_load_state()
            assert site_page.url == recording_run["served"]
            expect(site_page.locator("#t")).to_have_text("served from the viewer artifact")
        finally:
            browser.close()
