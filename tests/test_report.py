"""The HTML report, rendered in Debian's headless Chromium (``make test`` installs it):
no console error, no network request, every image decodes, the table equals summary.csv,
each gallery holds the rows the docs say, a moved image gets a placeholder; one
attribution map against a direct numpy computation from the stored maps."""
import csv
import json
import os
import re
import shutil
from urllib.parse import unquote, urlparse

import h5py
import numpy as np
import pytest

from bench.helpers import run_cli as run
from gradood.analyze import report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCORES = "msp,energy,gaia_a,gaia_z,knn"
K = 5


@pytest.fixture(scope="session")
def analysed(tmp_path_factory, demo_files):
    """The demo sets (24 images each, a copy of the images) extracted with layer4's raw
    maps, analysed with intervals, their report; one gallery image then moved away and
    the analysis repeated, so its report has a placeholder."""
    base = tmp_path_factory.mktemp("report")
    data, ckpt = demo_files
    images = str(base / "data")
    shutil.copytree(data, images)
    cache = str(base / "cache")
    common = ["--benchmark", "demo", "--data-root", images, "--checkpoint", ckpt, "--cache-dir", cache, "--quiet"]
    code, out = run(["extract", *common, "--dataset", "digits", "--dataset", "noise", "--dataset", "mashups",
                     "--limit", "24", "--hook", "layer4", "--store", "layer4=raw"])
    assert code == 0, out
    code, out = run(["extract", *common, "--split", "train", "--dataset", "digits", "--limit", "100", "--balanced"])
    assert code == 0, out
    results, scores = str(base / "results"), str(base / "scores")
    args = ["analyze", "--cache-dir", cache, "--id", "digits", "--score", SCORES, "--ci", "95",
            "--results", results, "--scores-out", scores, "--gallery", str(K)]
    code, out = run(args)
    assert code == 0 and f"report: {results}/report.html" in out, out
    top = next(csv.DictReader(open(os.path.join(scores, "msp", "noise.csv"))))     # any row: moved below
    ranked = sorted(csv.DictReader(open(os.path.join(scores, "msp", "noise.csv"))),
                    key=lambda r: (-float(r["score"]), int(r["index"])))
    moved = ranked[0]["path"] if ranked else top["path"]
    os.rename(moved, moved + ".moved")
    code, out = run(args)
    assert code == 0, out
    return base, cache, results, scores, moved


def browser():
    """A headless Chromium driven by chromedriver, logging the console and the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "Debian's chromium and chromium-driver are needed: make browser (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_report_renders_offline_and_shows_what_the_tables_and_scores_say(analysed):
    base, cache, results, scores, moved = analysed
    page = os.path.join(results, "report.html")
    driver = browser()
    try:
        driver.get("file://" + page)
        driver.execute_async_script(
            "var done = arguments[0]; Promise.all(Array.from(document.images).map(function (i) {"
            " return i.complete ? 0 : new Promise(function (r) { i.onload = i.onerror = r; }); })).then(done);")
        console = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not console, console
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        assert urls and all(u.startswith("file://") or u.startswith("data:") for u in urls), urls
        assert all(unquote(urlparse(u).path).startswith(results) for u in urls if u.startswith("file://")), urls
        widths = driver.execute_script("return Array.from(document.images).map(function (i) { return i.naturalWidth; })")
        assert len(widths) > 50 and min(widths) > 0, widths
        # the paper table holds summary.csv, cell for cell
        table = driver.execute_script(
            "var t = document.querySelector('table.sortable');"
            "return [Array.from(t.tHead.rows[0].cells).map(c => c.textContent),"
            " Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.textContent))];")
        rows = list(csv.reader(open(os.path.join(results, "summary.csv"))))
        assert table[0] == rows[0] and table[1] == rows[1:]
        assert any("AUROC low" in h for h in table[0])                  # --ci: the interval columns
        # each OOD gallery: the K rows with the highest scores of --scores-out, ties by row index
        galleries = driver.execute_script(
            "return Array.from(document.querySelectorAll('.gallery[data-ood]')).map(g => [g.dataset.score,"
            " g.dataset.ood, Array.from(g.querySelectorAll('figure.item')).map(f => +f.dataset.index)]);")
        assert len(galleries) == len(SCORES.split(",")) * 2
        for score, ood, shown in galleries:
            table_rows = [r for r in csv.DictReader(open(os.path.join(scores, score, f"{ood}.csv"))) if r["skipped"] == "0"]
            expected = sorted(table_rows, key=lambda r: (-float(r["score"]), int(r["index"])))[:K]
            assert shown == [int(r["index"]) for r in expected], (score, ood)
        # captions: the predicted class is the cache's top logit, the label the stored one
        captions = driver.execute_script(
            "return Array.from(document.querySelectorAll('.gallery[data-id] figure.item')).slice(0, 3).map(f =>"
            " [+f.dataset.index, f.querySelector('figcaption').textContent]);")
        with h5py.File(os.path.join(cache, "digits.h5"), "r") as f:
            for i, text in captions:
                assert f"predicted {int(f['logits'][i].argmax())} · label {int(f['labels'][i])}" in text, text
        lowest = driver.execute_script(
            "return Array.from(document.querySelectorAll('.gallery[data-id] figure.item')).map(f => +f.dataset.index);")
        id_rows = list(csv.DictReader(open(os.path.join(scores, "energy", "digits.csv"))))
        assert lowest[K:2 * K] == [int(r["index"]) for r in sorted(id_rows, key=lambda r: (float(r["score"]),
                                                                                          int(r["index"])))[:K]]
        # the image moved away is a placeholder; the rest of the page stands
        placeholders = driver.execute_script("return Array.from(document.querySelectorAll('.missing')).map(s => s.textContent);")
        assert placeholders and all(p == f"not found: {moved}" for p in placeholders)
        # attribution maps are there (layer4's raw maps)
        assert "Layer layer4" in driver.find_element("id", "attribution").find_element("xpath", "following-sibling::p").text
        # a click on a header sorts the table by that column
        header = driver.find_elements("css selector", "table.sortable th")[2]
        header.click()
        column = driver.execute_script("return Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
                                       ".map(r => parseFloat(r.cells[2].textContent));")
        assert column == sorted(column)
        shot = os.environ.get("GRADOOD_REPORT_SCREENSHOT")      # docs/report.png is taken this way
        driver.save_screenshot(shot or str(base / "report.png"))
    finally:
        driver.quit()
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(results, "report_files"))
               for f in fs) + os.path.getsize(page)
    assert size < 2_000_000, size                                      # thumbnails, not originals


def test_an_attribution_map_equals_numpy_on_the_stored_maps(analysed):
    _, cache, _, _, _ = analysed
    path = os.path.join(cache, "noise.h5")
    rows = [3, 0, 7]
    cams, means = report.attribution_maps(path, "layer4", "max_logit", rows)
    with h5py.File(path, "r") as f:
        a = np.stack([f["layers/layer4/act/map"][i] for i in rows]).astype(np.float64)
        g = np.stack([f["layers/layer4/grad/max_logit/map"][i] for i in rows]).astype(np.float64)
    expected = np.zeros(a.shape[0:1] + a.shape[2:])
    for n in range(len(rows)):
        for c in range(a.shape[1]):
            expected[n] += g[n, c].mean() * a[n, c]
    np.testing.assert_allclose(cams, np.maximum(expected, 0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(means, g.mean(axis=(2, 3)), rtol=1e-12)
    assert cams.shape == (3, 4, 4) and cams.max() > 0


def test_statistics_only_say_what_to_extract_and_a_sweep_has_its_report(analysed, tmp_path):
    base, cache, _, _, _ = analysed
    plain = str(tmp_path / "plain")
    os.makedirs(plain)
    for name in ("digits", "noise", "digits_train"):
        with h5py.File(os.path.join(cache, f"{name}.h5")) as src, h5py.File(os.path.join(plain, f"{name}.h5"), "w") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            plan = json.loads(src.attrs["plan"])
            if "layer4" in plan:            # the same cache without its maps: statistics only
                plan["layer4"] = {s: [x for x in v if x != "map"] for s, v in plan["layer4"].items()}
            dst.attrs["plan"] = json.dumps(plan)
            for key in src:
                src.copy(src[key], dst, name=key)
            maps = []
            dst.visititems(lambda k, v: maps.append(k) if k.endswith("/map") else None)
            for key in maps:
                del dst[key]
    code, out = run(["analyze", "--cache-dir", plain, "--id", "digits", "--score", "msp,energy",
                     "--results", str(tmp_path / "r")])
    assert code == 0, out
    text = open(tmp_path / "r" / "report.html").read()
    assert "hold statistics only. To see attribution maps, extract with --hook layer4 --store layer4=raw" in text
    code, out = run(["sweep", "--cache-dir", cache, "--id", "digits", "--grid", "energy:temperature=1,10",
                     "--workers", "1", "--results", str(tmp_path / "s")])
    assert code == 0, out
    page = open(tmp_path / "s" / "report.html").read()
    assert "table class=\"sortable\"" in page and "Energy" in page and "<script>" in page
    assert "report.html" in json.load(open(tmp_path / "s" / "sweep.json"))["files"]


def test_the_python_door_writes_the_same_report(analysed, tmp_path):
    from gradood import analyze
    _, cache, results, _, _ = analysed
    ev = analyze.evaluation(cache_dir=cache, id="digits", scores=SCORES, ci=95)
    page = analyze.to_html(ev, str(tmp_path / "mine.html"), gallery=K)
    strip = re.compile(r'(src|href)="[^"]*"')          # the asset folder's name differs, nothing else
    assert strip.sub("", open(page).read()) == strip.sub("", open(os.path.join(results, "report.html")).read())
    assert sorted(os.listdir(tmp_path / "mine_files")) == sorted(os.listdir(os.path.join(results, "report_files")))
    with pytest.raises(ValueError, match="gallery=0"):
        analyze.to_html(ev, str(tmp_path / "x.html"), gallery=0)
