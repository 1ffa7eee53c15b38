"""A run whose metrics are all map metrics (cls_map, rollout) writes its maps figures and its report
like any run; a figure kind the run's metrics cannot give is named with the reason, in one line
(run.json ``notes`` and the command's output), never left out silently."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from probekit.api import compare

pytestmark = pytest.mark.usefixtures("toy_backend")
pytest.importorskip("seaborn")

RUN = {"name": "maps-only", "models": [{"model": "toy:vit", "label": "toy-a"}], "images": {"path": "sample", "count": 3},
       "metrics": ["cls_map"], "figures": ["maps"], "report": {"showcase": 1}}


def _page_data(html: str) -> dict:
    HTMLParser().feed(html)  # parses
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))


def test_a_map_only_run_writes_its_maps_figure_and_its_report(tmp_path, run_file):
    cmp = compare(run_file(RUN, figures=["maps"]), out=tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "figures" / "maps_cls_map.png").stat().st_size > 1000
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and "figures/maps_cls_map.png" in rec["manifest"]
    assert "report.html" in rec["manifest"] and cmp.report == out / "report.html"
    data = _page_data((out / "report.html").read_text())
    assert [m["name"] for m in data["models"]] == ["toy-a"]
    assert data["metrics"] == [] and data["explorer"]["models"][0]["images"] == rec["report"]["showcase"]
    # the sections with nothing to show say so, and why
    assert any("cls_map" in n and "map" in n for n in data["provenance"]["notes"]), data["provenance"]["notes"]
    assert rec.get("notes", []) == []  # maps were asked for and drawn: nothing to say


def test_a_requested_figure_the_metrics_cannot_give_is_named_in_one_line(tmp_path, run_cli, run_file):
    cmp = compare(run_file(RUN, figures=["depth", "maps"]), out=tmp_path / "a", report=False)
    notes = json.loads((tmp_path / "a" / "run.json").read_text())["notes"]
    assert len(notes) == 1 and notes[0].startswith("No depth figure:") and "cls_map" in notes[0], notes
    assert "\n" not in notes[0] and cmp.notes == notes
    assert sorted(p.name for p in cmp.figures) == ["maps_cls_map.png", "maps_cls_map.svg"]
    # and the other way round: maps asked of a scalar metric; the command says it too
    r = run_cli("compare", str(run_file(RUN, figures=["depth", "maps"], metrics=["mad"])), "--out", str(tmp_path / "b"),
                "--no-report")
    assert r.exit_code == 0, r.stderr
    notes = json.loads((tmp_path / "b" / "run.json").read_text())["notes"]
    assert len(notes) == 1 and notes[0].startswith("No maps figure:") and "mad" in notes[0], notes
    assert notes[0] in " ".join(r.stderr.split())


def test_plot_says_why_a_kind_it_was_asked_for_gives_no_figure(tmp_path, run_cli, run_file):
    compare(run_file(RUN, figures=["maps"]), out=tmp_path / "out", report=False)
    r = run_cli("plot", tmp_path / "out", "--kind", "depth", "--kind", "maps")
    assert r.exit_code == 0, r.stderr
    said = " ".join(r.stderr.split())
    assert "No depth figure: it draws per-head values" in said and "(cls_map)" in said
    assert "No maps figure" not in said and r.stdout.count("maps_cls_map") == 2


def test_default_figures_say_nothing_when_some_are_drawn(tmp_path, run_file):
    cmp = compare(run_file(RUN, metrics=["mad"], figures=None), out=tmp_path / "out", report=False)
    assert cmp.figures and json.loads((tmp_path / "out" / "run.json").read_text()).get("notes", []) == []


@pytest.mark.browser
@pytest.mark.slow
def test_the_map_only_report_opens_without_an_error_in_headless_chromium(tmp_path, run_file):
    import shutil
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = compare(run_file(RUN, figures=["maps"]), out=tmp_path / "out").report
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        d.get(page.as_uri())
        end = time.time() + 20
        while d.execute_script("return document.body.dataset.explorer") != "ready" and time.time() < end:
            time.sleep(0.1)
        assert d.execute_script("return document.body.dataset.explorer") == "ready"
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
        for sid in ("metric-none", "summary-table", "contrasts-table"):
            assert "(cls_map) give arrays" in d.find_element("id", sid).text, sid
        assert d.find_elements("css selector", "#explorer canvas")  # the explorer draws the maps
    finally:
        d.quit()
