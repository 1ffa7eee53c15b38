"""The report as a person meets it: the real page in headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs). A missing browser FAILS this test: it is never skipped.

Checks: no console error and no request other than the file itself and inline data; every
section's screenshot is non-blank; two clicked patches give two different explorer overlays;
hiding a model removes its series from every chart. What a reader needs to read it (issue 22):
the findings and a chart in the first screen at 1280x800; layer tick labels on every depth
profile; a legend or key on every chart; a colour scale on every map and heatmap (an element of
class ``colour-scale`` in the block that holds them, the nearest such block inside the section,
with at least two elements whose text is a number: its tick labels); the summary table one
metric at a time; no horizontal overflow at 800 px; no absolute local path in the HTML; a
labelled run's per-label panels and showcase images from different classes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
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
SECTIONS = ["findings", "metric-0", "metric-1", "contrasts-section", "summary-section", "explorer", "provenance"]


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


def _viewport(d, width: int, height: int) -> None:
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    d.execute_script("window.scrollTo(0, 0)")


def _check_first_screen(d) -> None:
    """The findings (a sentence per metric) and a whole chart inside the first 1280x800 screen."""
    _viewport(d, 1280, 800)
    got = d.execute_script("""
        const s = document.querySelector('#findings .sentence'), c = document.querySelector('#findings .chart svg');
        const r = (e) => e && e.getBoundingClientRect();
        return {inner: [innerWidth, innerHeight], text: s && s.textContent, s: s && [r(s).top, r(s).bottom],
                c: c && [r(c).top, r(c).bottom, r(c).width, c.querySelectorAll('.series').length]};""")
    assert got["inner"] == [1280, 800], got
    assert got["text"] and got["s"][0] >= 0 and got["s"][1] <= 800, got
    assert got["c"] and got["c"][0] >= 0 and got["c"][1] <= 800 and got["c"][2] > 300 and got["c"][3] >= 1, got


def _check_charts(d) -> None:
    """Layer ticks on every depth profile, a key on every chart, a colour scale by every map and heatmap."""
    data = json.loads(d.execute_script("return document.getElementById('data').textContent"))
    depth = d.execute_script("return [...document.querySelectorAll('.chart.depth svg')].map("
                             "s => [...s.querySelectorAll('text.xtick')].map(t => t.textContent))")
    assert len(depth) == len([m for m in data["metrics"] if data["heads"][m["label"]]]) > 0
    for m, ticks in zip([m for m in data["metrics"] if data["heads"][m["label"]]], depth, strict=True):
        layers = sorted({r[1] for r in data["heads"][m["label"]]})
        assert ticks == [str(x) for x in layers], (m["label"], ticks)  # every layer named (<= 14 layers)
    keyless = d.execute_script("""
        return [...document.querySelectorAll('.chart')].filter(c => {
          const key = c.querySelector('.legend text, .colour-scale text');
          const shared = c.parentElement.classList.contains('heatmaps') && c.parentElement.querySelector('.colour-scale text');
          return !(key || shared); }).map(c => c.className + ': ' + (c.querySelector('.title') || c).textContent);""")
    assert keyless == [], keyless
    n_charts = d.execute_script("return document.querySelectorAll('.chart').length")
    assert n_charts >= 3 * len(data["metrics"])
    # a chart's key names every model it draws
    names = d.execute_script("return [...document.querySelectorAll('.chart.depth .legend text')].map(t => t.textContent)")
    assert all(any(m["name"] in t for t in names) for m in data["models"]), names
    unscaled = d.execute_script("""
        const scaled = (e) => { for (let a = e.parentElement; a && a.tagName !== 'SECTION'; a = a.parentElement)
                                  if (a.querySelector('.colour-scale')) return a.querySelector('.colour-scale'); return null; };
        const maps = [...document.querySelectorAll('svg.heatmap, #explorer canvas')];
        const numbers = (s) => [...s.querySelectorAll('*')].filter(e => !e.children.length &&  // its tick labels
          /^[-\u2212]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?$/i.test(e.textContent.trim())).length;
        return [maps.length, maps.filter(e => { const s = scaled(e); return !s || numbers(s) < 2; })
                                 .map(e => e.id || e.className.baseVal || e.tagName)];""")
    assert unscaled[0] > 0 and unscaled[1] == [], unscaled


def _check_shareable(html: str, *dirs: Path) -> None:
    """No absolute local path: not the run's folders, not the home, the venv or site-packages."""
    for local in {*(str(p) for p in dirs), str(Path.home()), sys.prefix, os.path.realpath(sys.prefix)}:
        assert local not in html, local
    assert "site-packages" not in html and "dist-packages" not in html
    found = re.findall(r"(?<![\w/.~%<-])/(?:home|root|tmp|usr|opt|var|Users|private|mnt|srv|data|work)/[^\s\"'<]*", html)
    assert found == [], found[:5]


def test_report_in_headless_chromium(tmp_path, run_file):
    page = compare(run_file(RUN), out=tmp_path / "out").report
    assert page is not None and page.exists()
    _check_shareable(page.read_text(encoding="utf-8"), tmp_path, tmp_path / "out")
    d = _browser()
    try:
        d.get(page.as_uri())
        _wait(d, "return document.body.dataset.explorer === 'ready'", "the explorer to decode its data")
        _check_first_screen(d)
        _check_charts(d)
        # the findings name the models and the layer of the largest gap, as contrasts.csv has it
        csv = pd.read_csv(tmp_path / "out" / "contrasts.csv")
        mad = csv[csv["metric"] == "mad"]
        big = mad.loc[mad["diff"].abs().idxmax()]
        text = d.find_element("css selector", "#finding-0 .sentence").text
        assert "toy-a" in text and "toy-b" in text and f"largest gap at layer {int(big['layer'])}" in text, text
        # provenance (at the end now): the run's end, readable parameter counts
        prov = d.find_element("id", "provenance").text
        assert re.search(r"started / finished \S+ / \d{4}-\d\d-\d\dT", prov), prov
        params = [t.text for t in d.find_elements("css selector", "#models-table tr td:nth-child(6)")]
        assert len(params) == 2 and all(re.fullmatch(r"\d{1,3}(,\d{3})*( \(\d+\.\d [MB]\))?", p) for p in params), params
        # nothing wider than an 800 px window
        _viewport(d, 800, 900)
        assert d.execute_script("return document.documentElement.scrollWidth <= innerWidth"), \
            d.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
        _viewport(d, 1280, 1000)
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
        # every model side by side on the same image, all its heads as small multiples (toy-a 2, toy-b 4)
        assert d.execute_script("return [...document.querySelectorAll('#explorer .x-row')].map("
                                "r => r.querySelectorAll('canvas.x-map').length)") == [1 + 2, 1 + 4]
        # hovering previews another query on every model's maps; leaving brings the pinned one back
        other = d.find_element("id", "x-query-1")  # toy-b's mean of heads
        pinned_b = _png(other.screenshot_as_png)
        d.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('mousemove', {clientX: arguments[1], clientY: arguments[2], bubbles: true}))",
            canvas, rect[0] + 0.1 * rect[2], rect[1] + 0.1 * rect[3])
        _wait(d, "return document.getElementById('x-query-cap').textContent.startsWith('query patch (row 0, col 0)')",
              "the hover preview")
        assert (np.abs(_png(other.screenshot_as_png) - pinned_b).sum(axis=2) > 30).mean() > 0.02
        d.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseleave'))", canvas)
        _wait(d, "return document.getElementById('x-query-cap').textContent.startsWith('query patch (row 2, col 3)')",
              "the pinned query after the hover")
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
        # the summary table shows one metric at a time: sorting by mean never mixes metrics
        assert d.execute_script("return document.getElementById('summary').dataset.metric") == "mad"
        d.execute_script("const s = document.getElementById('summary-metric'); s.value = 'entropy';"
                         "s.dispatchEvent(new Event('change'))")
        assert d.execute_script("return document.getElementById('summary').dataset.metric") == "entropy"
        d.execute_script("[...document.querySelectorAll('#summary th')].find(t => t.textContent.startsWith('mean')).click()")
        means = [float(t.text) for t in d.find_elements("css selector", "#summary tbody tr td:nth-child(4)")]
        entropy = pd.read_csv(tmp_path / "out" / "summary.csv").query("metric == 'entropy' and head >= 0")
        assert means == sorted(means) and len(means) == entropy.groupby(["model", "layer"]).ngroups
        Path(tmp_path / "shots").mkdir()
        d.save_screenshot(str(tmp_path / "shots" / "page.png"))
    finally:
        d.quit()


LABELLED = {"name": "labelled",
            "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                       {"model": "toy:vit", "label": "toy-b", "training": "supervised", "options": {"depth": 3}}],
            "metrics": ["mad"], "figures": [], "report": {"showcase": 3}}
CLASSES = {"people": ["astronaut.jpg", "camera.jpg"], "animal": ["chelsea.jpg", "coffee.jpg"],
           "space": ["hubble_deep_field.jpg", "rocket.jpg"]}


def test_labelled_report_has_per_label_panels_and_showcases_every_class(tmp_path, run_file):
    import probekit as pk

    samples = {p.name: p for p in pk.sample_images()}
    for label, files in CLASSES.items():
        (tmp_path / "classes" / label).mkdir(parents=True)
        for f in files:
            shutil.copy(samples[f], tmp_path / "classes" / label / f)
    images = {"kind": "classes", "path": str(tmp_path / "classes")}
    cmp = compare(run_file(LABELLED, images=images), out=tmp_path / "out")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    label_of = dict(zip(record["images"]["names"], record["images"]["labels"], strict=True))
    html = cmp.report.read_text(encoding="utf-8")
    _check_shareable(html, tmp_path, tmp_path / "classes", tmp_path / "out")
    d = _browser()
    try:
        d.get(cmp.report.as_uri())
        _wait(d, "return document.body.dataset.explorer === 'ready'", "the explorer to decode its data")
        _check_first_screen(d)
        _check_charts(d)
        # a panel per model, a line and a key entry per label, in colours that are no model's
        panels = d.execute_script("""
            return [...document.querySelectorAll('.charts.labels .label-panel')].map(p => ({
              model: +p.dataset.model, lines: [...p.querySelectorAll('.series polyline')].map(l => l.getAttribute('stroke')),
              key: [...p.querySelectorAll('.legend text')].map(t => t.textContent)}));""")
        assert [p["model"] for p in panels] == [0, 1]
        for p in panels:
            assert sorted(k.split(" (")[0] for k in p["key"]) == sorted(CLASSES)
            assert len(set(p["lines"])) == len(CLASSES)
        swatches = set(d.execute_script("return [...document.querySelectorAll('span.swatch')].map(s => s.style.background)"))
        hexes = {"#%02x%02x%02x" % tuple(int(v) for v in re.findall(r"\d+", c)) for c in swatches}
        assert hexes and not hexes & {c.lower() for p in panels for c in p["lines"]}
        # the showcase (the explorer's images) takes one image of each class
        data = json.loads(d.execute_script("return document.getElementById('data').textContent"))
        shown = data["explorer"]["models"][0]["images"]
        assert shown == record["report"]["showcase"] and len(shown) == 3
        assert Counter(label_of[n] for n in shown) == dict.fromkeys(CLASSES, 1)
    finally:
        d.quit()
