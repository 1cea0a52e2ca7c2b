"""`retrieval serve` as a real process on loopback: concurrent clients, then the page in Chromium.

The browser is Debian's ``chromium`` driven by playwright (no browser download): set
``RETRIEVAL_CHROMIUM`` to use another executable. Without one the browser tests are skipped
with the reason (``pytest -ra`` lists it); the HTTP tests still run. Screenshots go to
``RETRIEVAL_TEST_ARTIFACTS`` when set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import wait_until_serving

from retrieval.corpus import synthetic
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import SHIPPED_MODEL, ModelSpec

QUERY = "a red circle left of a blue square"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("corpus"), n=60, seed=11)


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus):
    """The shipped demo model over 60 synthetic scenes, served by `retrieval serve`."""
    root = tmp_path_factory.mktemp("indexes")
    encoder = Encoder.load(ModelSpec("tiny-vit", str(SHIPPED_MODEL)), device="cpu")
    build(corpus, "shapes", BuildConfig(progress=False, workers=0), root, encoder=encoder)
    port = _free_port()
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w")
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "shapes", "--index-dir", str(root)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, Path(log.name), time.monotonic() + 90)
    finally:
        if proc.poll() is not None:
            log.close()
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_concurrent_clients_get_the_sequential_answers(server):
    queries = [QUERY, "a green triangle above a yellow circle", "a purple square", "blue"]
    want = {q: httpx.post(f"{server}/search", json={"text": q, "k": 5}).json() for q in queries}
    jobs = [queries[i % len(queries)] for i in range(48)]
    with httpx.Client(base_url=server, timeout=60) as c, ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda q: (q, c.post("/search", json={"text": q, "k": 5})), jobs))
    for q, r in got:
        assert r.status_code == 200
        assert r.json()["results"] == want[q]["results"]


def test_bad_requests_leave_the_server_running(server):
    assert httpx.post(f"{server}/search", content=b"{oops", timeout=30).status_code == 400
    assert httpx.post(f"{server}/search", json={"text": "x", "k": 10**6}).status_code == 422
    r = httpx.post(f"{server}/search", files={"image": ("x.png", b"GIF89a-broken", "image/png")})
    assert r.status_code in (400, 415) and r.json()["error"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def _chromium() -> str | None:
    return os.environ.get("RETRIEVAL_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TEST SKIPPED: the playwright package is not installed")
    exe = _chromium()
    if exe is None:
        pytest.skip("BROWSER TEST SKIPPED: no chromium (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.set_default_timeout(30_000)
        pg.goto(server)
        pg.wait_for_function("document.getElementById('strategy').options.length > 1")
        yield pg
        browser.close()


def _artifact(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("RETRIEVAL_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _thumbnails_loaded(page) -> int:
    page.wait_for_function(
        "[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    return page.locator(".result").count()


def test_page_text_search_shows_thumbnails(page, tmp_path):
    assert "60 items" in page.locator("#stats").inner_text()
    page.fill("#text", QUERY)
    page.fill("#k", "8")
    page.press("#text", "Enter")
    page.wait_for_selector(".result")
    assert _thumbnails_loaded(page) == 8
    assert "cosine" in page.locator("#status").inner_text()
    first = page.locator(".result .caption").first.inner_text()
    assert "circle" in first or "square" in first
    page.screenshot(path=str(_artifact(tmp_path, "serve-text-search.png")), full_page=True)


def test_page_upload_picker_and_click_to_search(page, corpus, tmp_path):
    page.fill("#text", "")
    page.set_input_files("#file", str(corpus.parent / "images" / "000007.png"))
    page.click("#go")
    page.wait_for_function("document.getElementById('status').innerText.includes('captions')")
    assert _thumbnails_loaded(page) == 8
    first = page.locator(".result").first
    clicked = first.get_attribute("data-id")
    first.click()
    page.wait_for_function(
        f"document.getElementById('drop-label').innerText === 'item {clicked}'"
        " && document.getElementById('status').innerText.includes('results')"
    )
    assert _thumbnails_loaded(page) == 8
    page.screenshot(path=str(_artifact(tmp_path, "serve-click-result.png")), full_page=True)


def test_page_drop_an_image_with_text_for_a_composed_query(page, server, tmp_path):
    page.click("#clear-image")
    page.fill("#text", "a yellow triangle")
    # A real drag from the desktop cannot be scripted; a drop event with a File is what it sends.
    page.evaluate(
        """async (url) => {
            const blob = await (await fetch(url)).blob();
            const dt = new DataTransfer();
            dt.items.add(new File([blob], 'dropped.png', {type: blob.type}));
            const drop = document.getElementById('drop');
            drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }""",
        f"{server}/items/{page.locator('.result').first.get_attribute('data-id')}/image",
    )
    assert page.locator("#drop-label").inner_text() == "dropped.png"
    page.select_option("#strategy", "arith")
    page.click("#go")
    page.wait_for_function("document.getElementById('status').innerText.includes('arith')")
    assert _thumbnails_loaded(page) == 8
    page.screenshot(path=str(_artifact(tmp_path, "serve-composed.png")), full_page=True)


def test_page_reranks_when_the_model_has_a_reranker(page, tmp_path):
    """The shipped demo model carries its re-ranker: the page offers "re-rank top" and the
    results show the itm score beside the others."""
    assert page.locator("#rerank-box").is_visible()
    page.click("#clear-image")
    page.select_option("#strategy", "")
    page.fill("#text", QUERY)
    page.fill("#k", "5")
    page.fill("#rerank", "12")
    page.click("#go")
    page.wait_for_function("document.getElementById('status').innerText.includes('re-ranked')")
    assert "re-ranked top 12" in page.locator("#status").inner_text()
    assert _thumbnails_loaded(page) == 5
    assert all("itm" in t for t in page.locator(".result .parts").all_inner_texts())
    page.screenshot(path=str(_artifact(tmp_path, "serve-reranked.png")), full_page=True)
    page.fill("#rerank", "")
