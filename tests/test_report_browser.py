"""The report as a person meets it: the real page in headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs). A missing browser FAILS this test: it is never skipped.

Checks: no console error and no request other than the file itself and inline data; every
section's screenshot is non-blank; two clicked patches give two different explorer overlays;
hiding a model removes its series from every chart.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probekit.api import compare

pytestmark = [pytest.mark.usefixtures("toy_backend"), pytest.mark.browser, pytest.mark.slow]

RUN = {"name": "browser",
       "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                  {"model": "toy:vit", "label": "toy-b", "training": "supervised",
                   "options": {"depth": 3, "heads": 4, "image_size": 64}}],
       "images": {"path": "sample", "count": 4}, "metrics": ["mad", "entropy"], "figures": ["depth"],
       "report": {"showcase": 2}}
SECTIONS = ["provenance", "metric-0", "metric-1", "contrasts-section", "summary-section", "explorer"]


def _browser():
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
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _wait(d, js: str, what: str, seconds: float = 20.0):
    end = time.time() + seconds
    while time.time() < end:
        if d.execute_script(js):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_report_in_headless_chromium(tmp_path, run_file):
    page = compare(run_file(RUN), out=tmp_path / "out").report
    assert page is not None and page.exists()
    d = _browser()
    try:
        d.get(page.as_uri())
        _wait(d, "return document.body.dataset.explorer === 'ready'", "the explorer to decode its data")
        # no console error, no network request (only the file and inline data/blob URLs)
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        urls = []
        for entry in d.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        outside = [u for u in urls if not u.startswith(("file://", "data:", "blob:"))]
        assert urls and outside == [], outside
        # every section is drawn: its screenshot has contrast and many colours
        for sid in SECTIONS:
            el = d.find_element("id", sid)
            d.execute_script("arguments[0].scrollIntoView()", el)
            img = _png(el.screenshot_as_png)
            assert img.shape[0] > 40 and img.std() > 10, f"section {sid} looks blank"
            assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, f"section {sid} looks blank"
        # two different patches, two different overlays
        canvas = d.find_element("id", "x-query")
        d.execute_script("arguments[0].scrollIntoView()", canvas)
        d.execute_script("document.getElementById('x-layer').value = '1';"
                         "document.getElementById('x-layer').dispatchEvent(new Event('change'))")
        shots = []
        for fx, fy in ((0.1, 0.1), (0.85, 0.7)):
            rect = d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height]", canvas)
            d.execute_script(
                "arguments[0].dispatchEvent(new MouseEvent('click', {clientX: arguments[1], clientY: arguments[2], bubbles: true}))",
                canvas, rect[0] + fx * rect[2], rect[1] + fy * rect[3])
            shots.append(_png(canvas.screenshot_as_png))
        diff = np.abs(shots[0] - shots[1]).sum(axis=2)
        assert (diff > 30).mean() > 0.05, "clicking another patch did not change the overlay"
        caption = d.find_element("id", "x-query-cap").text
        assert caption.startswith("query patch (row 2, col 3)"), caption  # 4x4 grid: 0.7 -> row 2, 0.85 -> col 3
        # hiding a model removes its series everywhere; showing it brings them back
        count = "return [document.querySelectorAll('svg .series[data-model=\"0\"]').length, " \
                "document.querySelectorAll('svg .series[data-model=\"1\"]').length, " \
                "[...document.querySelectorAll('#summary td')].filter(t => t.textContent === 'toy-b').length]"
        before = d.execute_script(count)
        assert before[0] > 0 and before[1] > 0 and before[2] > 0
        toggle = d.find_element("css selector", "input.model-toggle[data-model='1']")
        d.execute_script("arguments[0].click()", toggle)
        after = d.execute_script(count)
        assert after[1] == 0 and after[2] == 0 and after[0] == before[0]
        d.execute_script("arguments[0].click()", toggle)
        assert d.execute_script(count) == before
        # sorting the summary table by mean puts the rows in order
        d.execute_script("[...document.querySelectorAll('#summary th')].find(t => t.textContent === 'mean').click()")
        means = [float(t.text) for t in d.find_elements("css selector", "#summary tbody tr td:nth-child(5)")]
        assert means == sorted(means) and len(means) > 4
        Path(tmp_path / "shots").mkdir()
        d.save_screenshot(str(tmp_path / "shots" / "page.png"))
    finally:
        d.quit()
