"""The report with hostile names in every field that reaches it (issue 19, item 12).

A name holding ``<!--<script>`` once put the page's inline JSON into the HTML parser's "script
data double escaped" state: the data script swallowed the rest of the page and nothing drew.
Names reach the page through the run name, model labels and specs, training groups and tags,
image file names (the explorer, the skipped list), class-folder labels and metric option
strings. Each is made hostile here; the page must keep exactly its three scripts, its inline
JSON must hold no ``<``, ``>``, ``&``, U+2028 or U+2029 and decode back to the same names, and
in headless Chromium every table and chart must draw with no script of the names running.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import probekit as pk
from probekit.api import compare

pytestmark = pytest.mark.usefixtures("toy_backend")

# what an HTML or JS parser might trip on; no "/" or NUL, so that it can name files too
EVIL = "<!--<script>&amp;<img src=x onerror=window.__pwned=1>\u2028\u2029]]>'\" é"
LABEL = EVIL + "</script><script>window.__pwned=2</script>"  # labels may hold "/"
RAW = ("<", ">", "&", "\u2028", "\u2029")


@pytest.fixture
def tagged_metric():
    """A metric with a free-text option (its label carries the string into every table)."""
    from probekit.plugins.metrics.entropy import AttentionEntropy

    class Tagged(AttentionEntropy):
        name = "tagged"
        tag: str = "plain"

    pk.metrics.register(Tagged)
    yield Tagged
    pk.metrics.unregister("tagged")


def _hostile_run(tmp_path: Path) -> dict:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c, cls in enumerate((f"{EVIL}cat", f"{EVIL}dog")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{EVIL}{c}{i}.png")
    (root / f"{EVIL}cat" / f"{EVIL}broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # skipped, by name
    return {"name": f"run {LABEL}",
            "models": [{"model": f"toy:{EVIL}a", "label": f"A {LABEL}", "training": f"self {LABEL}",
                        "tags": {"arch": f"vit {LABEL}"}},
                       {"model": "toy:vit", "label": f"B {LABEL}", "training": f"sup {LABEL}"}],
            "images": {"kind": "classes", "path": str(root)},
            "metrics": ["mad", {"name": "tagged", "options": {"tag": LABEL}}],
            "batch_size": 2, "figures": [], "report": {"showcase": 2}, "out": str(tmp_path / "out")}


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self._in: dict | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._in = dict(attrs)
            self.scripts.append((self._in, ""))

    def handle_data(self, data):
        if self._in is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def test_hostile_names_keep_the_page_whole_and_its_json_round_trips(tmp_path, tagged_metric):
    cmp = compare(_hostile_run(tmp_path))
    assert cmp.status == "complete" and cmp.report is not None
    html = cmp.report.read_text(encoding="utf-8")
    # exactly the page's three scripts (data, blob, code), as a browser's parser sees them
    assert len(re.findall(r"<script\b", html, re.I)) == 3 and len(re.findall(r"</script", html, re.I)) == 3
    assert "<!--" not in html
    parser = _Scripts()
    parser.feed(html)
    assert [a.get("id") for a, _ in parser.scripts] == ["data", "blob", None]
    text = parser.scripts[0][1]
    assert not [c for c in RAW if c in text]  # every one escaped as \\uXXXX inside the JSON
    data = json.loads(text)
    # every hostile field came through, unchanged, as data
    assert [m["name"] for m in data["models"]] == [f"A {LABEL}", f"B {LABEL}"]
    assert data["title"].endswith(f"run {LABEL}")
    assert data["models"][0]["spec"] == f"toy:{EVIL}a"
    assert sorted(data["groups"]) == sorted([f"self {LABEL}", f"sup {LABEL}"])
    assert [m["label"] for m in data["metrics"]] == ["mad", f"tagged[tag={LABEL}]"]
    assert data["metrics"][1]["options"]["tag"] == LABEL
    names = [n for m in data["explorer"]["models"] for n in m["images"]]
    assert names and all(EVIL in n for n in names)
    assert any(EVIL in s[0] for s in data["provenance"]["images"]["skipped"])
    assert any(f"{EVIL}cat" in s for s in _strings(data))  # class names, in the image names
    assert set(cmp.results.table["label"].astype(str)) == {f"{EVIL}cat", f"{EVIL}dog"}
    # the headings outside the JSON are HTML-escaped text
    assert f"tagged[tag={LABEL}]" not in html.split('<script type="application/json"')[0]


def _browser():
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, ("headless Chromium is needed: apt-get install -y chromium chromium-driver "
                               "(.ci/run installs both)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(a)
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.browser
@pytest.mark.slow
def test_hostile_names_in_headless_chromium_draw_every_table_and_chart_and_run_nothing(tmp_path, tagged_metric):
    import time

    page = compare(_hostile_run(tmp_path)).report
    d = _browser()
    try:
        d.get(page.as_uri())
        end = time.time() + 20
        while time.time() < end and not d.execute_script("return document.body.dataset.explorer === 'ready'"):
            time.sleep(0.1)
        assert d.execute_script("return document.body.dataset.explorer") == "ready"
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
        assert d.execute_script("return window.__pwned") is None  # no name ran as markup or script
        assert d.execute_script("return document.querySelectorAll('script').length") == 3
        assert d.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
        assert d.title == f"probekit report: run {LABEL}"
        counts = d.execute_script(
            "return [document.querySelectorAll('svg .series').length, document.querySelectorAll('#summary td').length,"
            " document.querySelectorAll('#contrasts-table td').length, document.querySelectorAll('section.metric svg').length]")
        assert all(c > 0 for c in counts), counts
        cells = d.execute_script("return [...document.querySelectorAll('#summary td')].map(t => t.textContent)")
        assert f"A {LABEL}" in cells and f"B {LABEL}" in cells  # names shown as text, whole
    finally:
        d.quit()
