"""The page of `charnn serve` in a real browser: headless Chromium (Debian's /usr/bin/chromium,
or CHARNN_CHROMIUM) driven by Playwright's Python package, against a real `charnn serve`
process with an API key. Skips with its reason when playwright or the browser cannot start
(`.ci/run` installs chromium with apt-get where it can; never `playwright install`).

With CHARNN_SCREENSHOTS=DIR the two views' screenshots are written to DIR (the README's
docs/serve.png and docs/serve-score.png come from `CHARNN_SCREENSHOTS=docs`); otherwise to a
temporary folder.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from charnn.cli.score import HEAT
from serve_support import ROOT, needs_serve, serve_process

pytestmark = needs_serve
CHROMIUM = os.environ.get("CHARNN_CHROMIUM", "/usr/bin/chromium")
KEY = "test-key-7f3a"
STATIC = ROOT / "charnn" / "serve" / "static"


def test_page_heat_scale_is_the_terminals():
    """app.js's HEAT (limits and backgrounds) is charnn score --tokens' HEAT, entry by entry."""
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    block = re.search(r"const HEAT = \[(.*?)\n\];", js, re.S).group(1)
    entries = re.findall(r"\[(Infinity|[\d.]+), (null|\"#[0-9a-f]{6}\"), (null|\"#[0-9a-f]{6}\")\]", block)
    page = [(float("inf") if lim == "Infinity" else float(lim), None if bg == "null" else bg.strip('"'))
            for lim, bg, _ in entries]
    assert page == [(float(lim), colour) for lim, colour in HEAT]


def test_page_loads_nothing_from_elsewhere():
    """No CDN: every src/href of the page is on the server itself (or a data: URL)."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert refs and all(r.startswith("/static/") or r.startswith("data:") for r in refs), refs
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    assert "http://" not in js and "https://" not in js


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"playwright is not installed ({e}): pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium, or set CHARNN_CHROMIUM)")
    try:
        pw = sync_playwright().start()
    except Exception as e:  # its driver (a node process) may not run here
        pytest.skip(f"playwright cannot start: {str(e).strip().splitlines()[0]}")
    try:
        chromium = pw.chromium.launch(executable_path=CHROMIUM)
    except Exception as e:
        pw.stop()
        pytest.skip(f"{CHROMIUM} cannot start: {str(e).strip().splitlines()[0]}")
    yield chromium
    chromium.close()
    pw.stop()


@pytest.fixture(scope="module")
def served(browser):
    with serve_process(None, "--slots", "4", "--max-tokens", "1000000", env={"CHARNN_API_KEY": KEY}) as s:
        yield s
    assert s.exit_code == 0, s.stderr()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    where = os.environ.get("CHARNN_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser, served):
    """A fresh browser context on the page, the API key entered (and so remembered)."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    p = context.new_page()
    problems = []
    p.on("pageerror", lambda e: problems.append(str(e)))
    p.goto(served.url + "/")
    p.fill("#api-key", KEY)
    p.press("#api-key", "Enter")
    p.locator("#api-key").blur()
    p.wait_for_function("document.getElementById('model').textContent === 'default'")
    yield p
    context.close()
    assert problems == [], problems


def test_api_key_asked_for_sent_and_remembered(browser, served):
    context = browser.new_context()
    p = context.new_page()
    p.goto(served.url + "/")
    error = p.locator("#error")
    error.wait_for(state="visible")
    p.wait_for_function("document.getElementById('error').textContent.includes('API key')")
    p.fill("#api-key", "wrong")
    p.locator("#api-key").blur()  # a change event: the page asks again with the key
    p.wait_for_function("document.getElementById('error').textContent.startsWith('401')")
    p.fill("#api-key", KEY)
    p.locator("#api-key").blur()
    p.wait_for_function("document.getElementById('model').textContent === 'default'")
    assert error.text_content() == ""
    p.reload()  # remembered in localStorage
    p.wait_for_function("document.getElementById('model').textContent === 'default'")
    assert p.input_value("#api-key") == KEY
    context.close()


def _length(p) -> int:
    return p.evaluate("document.getElementById('output-text').textContent.length")


def test_generate_streams_and_stops(page, served, shots):
    import httpx

    page.fill("#prompt", "JULIET:")
    page.fill("#max-tokens", "1000000")  # far more than it makes before Stop
    page.fill("#temperature", "1")
    page.click("#generate")
    page.wait_for_function("document.getElementById('output-text').textContent.length > 0")
    first = _length(page)
    deadline = time.monotonic() + 10
    while _length(page) == first and time.monotonic() < deadline:
        time.sleep(0.05)
    second = _length(page)
    assert second > first, "the text did not grow while streaming"
    assert page.is_disabled("#generate") and page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function("document.getElementById('stop').disabled")
    stopped = _length(page)
    time.sleep(0.5)
    assert _length(page) == stopped, "the text kept growing after Stop"
    assert stopped < 1000000
    assert page.text_content("#generate-status").startswith("stopped after")
    assert page.text_content("#output-prompt") == "JULIET:"
    assert page.text_content("#error") == ""
    # The aborted stream leaves its slot (the server notices the disconnect within a step or so).
    busy = None
    deadline = time.monotonic() + 10
    while busy != 0 and time.monotonic() < deadline:
        metrics = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
        busy = float(re.search(r"^charnn_slots_busy (\S+)$", metrics, re.M).group(1))
        time.sleep(0.05)
    assert busy == 0, "Stop did not free the slot"

    # A whole, seeded generation to its end (its screenshot is the README's).
    page.fill("#prompt", "ROMEO:")
    page.fill("#max-tokens", "300")
    page.fill("#temperature", "0.8")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate-status').textContent.includes('length reached')")
    assert page.text_content("#generate-status").startswith("300 tokens in")
    text = page.text_content("#output-text")
    expected = httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"prompt": "ROMEO:", "max_tokens": 300, "temperature": 0.8, "seed": 7}).json()
    assert text == expected["choices"][0]["text"]
    page.screenshot(path=str(shots / "serve.png"))


def test_api_error_shown_on_one_line(page):
    page.fill("#temperature", "-1")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('400')")
    message = page.text_content("#error")
    assert "\n" not in message and "temperature must be at least 0" in message
    assert page.is_enabled("#generate") and page.is_disabled("#stop")


def _rgb(colour: str) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_score_heat_map(page, served, shots):
    import httpx

    lines = ["To be, or not to be, that is the question.", "To be, or not to be, that is the banana."]
    page.click("#tab-score")
    page.fill("#score-input", "\n".join(lines))
    page.click("#score")
    page.wait_for_selector("#heat .tok")
    api = httpx.post(served.url + "/v1/score", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                     json={"input": "\n".join(lines), "tokens": True}).json()
    shown = page.locator("#heat .line")
    assert shown.count() == len(lines)
    for n, line in enumerate(api["data"]):
        spans = shown.nth(n).locator(".tok")
        assert spans.count() == line["tokens"] == len(line["token_surprisal_bits"])
        got = spans.evaluate_all("s => s.map(e => [e.textContent, getComputedStyle(e).backgroundColor])")
        for (token, bits), (text, background) in zip(line["token_surprisal_bits"], got):
            assert text == ("⏎" if token == "\n" else token)
            colour = next(c for limit, c in HEAT if bits < limit)
            assert background == ("rgba(0, 0, 0, 0)" if colour is None else _rgb(colour)), (token, bits)
        numbers = shown.nth(n).locator(".numbers").text_content()
        assert numbers.startswith(f"{line['tokens']} tokens, {line['logprob']:.2f} nats")
    assert any(bg != "rgba(0, 0, 0, 0)" for _, bg in got)
    rows = page.locator("#score-table tbody tr")
    assert rows.count() == len(lines) + 1  # and the "all" row
    assert rows.nth(0).locator("td").nth(6).text_content() == lines[0]
    assert page.locator("#legend .swatch").count() == len(HEAT)
    page.screenshot(path=str(shots / "serve-score.png"))


def test_keyboard_only(page):
    """The views switch with the arrow keys and Ctrl+Enter in the text runs the score."""
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-score"
    assert page.is_visible("#view-score") and not page.is_visible("#view-generate")
    page.focus("#score-input")
    page.keyboard.press("Control+End")
    page.keyboard.type(" again")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#heat .tok")
    page.focus("#tab-score")
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#view-generate")
