"""The HTML report of an analysis or a sweep: one page a researcher opens in a browser.

``write_html(evaluation, path)`` writes ``path`` (e.g. ``RESULTS/report.html``) and one
sibling folder, ``<stem>_files/``, of small PNG files: thumbnails (each image once, at
most ``THUMB`` px), figures and attribution maps. Nothing is fetched from the network (no
script, font or style from elsewhere; the sorting script and the style are inline), so
the page opens from ``file://``; sent alone, its tables still read. It needs the
``plots`` extra (matplotlib, Pillow) and never imports torch.

The page holds:

* the caption facts: model, weights hash, preprocessing, every cache and its rows, the
  fitting caches, tuned parameters and the metric convention;
* the paper table, one number per cell as ``summary.csv`` (with its interval columns
  under ``--ci``); a click on a column header sorts it (the page reads without the
  script); the near/far table and, with csid sets, the full-spectrum table;
* per score, its histogram and ROC curves (inline SVG), and its failure galleries: per OOD set the
  ``k`` OOD images it ranks most in-distribution, and once the ``k`` ID images it ranks
  least in-distribution (``gallery_rows``: skipped rows left out, ties broken by the
  lower row index first). Captions give the file name, the score, the rank within the
  set (1 = the most in-distribution-looking OOD image, the least in-distribution-looking
  ID image), the predicted class and, for ID images, the label. An image no longer at its
  recorded path (caches move between machines) gets a placeholder that says so;
* attribution maps, where the caches hold a layer's raw activation and gradient maps
  (``extract --hook LAYER --store LAYER=raw``): per OOD set, the Grad-CAM-style map of
  that layer (``attribution.gradcam``) over the thumbnails of the OOD gallery of the
  lead score (GAIA-A when analysed, else the first score) and of a few typical ID images
  (the ID rows whose scores are nearest the ID median), and the strip of their channel-
  wise gradient means, ID beside OOD (``attribution.channel_means``), GAIA's figure.
  Where the caches hold statistics only, the section says what to extract and its cost.
"""
import hashlib
import html
import io
import os
import shutil

import numpy as np
from sklearn.metrics import roc_curve

from gradood.store.reader import CacheReader, cache_path
from gradood.store.schema import MAP, head_label, stat_path

from .attribution import channel_means, gradcam, map_layer
from .plots import channel_strip, heat_colors
from .results import Evaluation, SweepResult
from .tables import CONVENTION_TEXT, caption, grouped_table, summary_csv_table, sweep_caption, sweep_table, title

GALLERY = 8         # images per gallery (--gallery)
THUMB = 64          # thumbnail side in pixels (longest side; smaller images are enlarged to it)
TYPICAL = 4         # typical ID images beside each OOD gallery's attribution maps

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1.1em}
h4{font-size:.95em;margin:.8em 0 .3em}
p.caption{font-size:.85em;color:#444}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f3f3f3;cursor:pointer}
td:first-child,th:first-child{text-align:left}
table.facts td,table.facts th{text-align:left}
.scroll{overflow-x:auto}
.row{display:flex;flex-wrap:wrap;gap:6px}
figure.item{margin:0;width:90px;font-size:.65em;text-align:center;overflow-wrap:anywhere}
figure.item img,.missing{width:64px;height:64px;image-rendering:pixelated;border:1px solid #ccc}
.missing{display:inline-block;background:#eee;color:#900;font-size:.8em;overflow:hidden}
img.figure{max-width:100%}
nav a{margin-right:.6em;font-size:.85em}
"""

# Sorts a table by the clicked column: numbers as numbers, other cells as text; a second
# click reverses. Inline, so the page needs nothing from elsewhere.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, column) {
    th.title = 'sort by this column';
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows), up = th.dataset.dir !== 'asc';
      rows.sort(function (a, b) {
        var x = a.cells[column].textContent, y = b.cells[column].textContent, nx = parseFloat(x), ny = parseFloat(y);
        var d = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return up ? d : -d;
      });
      th.dataset.dir = up ? 'asc' : 'desc';
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def gallery_rows(values, usable, k, highest):
    """(k,) int row indices of the ``k`` usable rows with the highest (``highest``) or
    lowest ``values`` (N,), in that order; ties broken by the lower row index first."""
    rows = np.flatnonzero(usable)
    v = np.asarray(values, np.float64)[rows]
    order = np.lexsort((rows, -v if highest else v))
    return rows[order[:k]]


def usable_rows(evaluation, dataset):
    """(N,) bool: the rows of ``dataset`` that were scored (not skipped as unreadable)."""
    skipped = evaluation.skip_reasons.get(dataset, {})
    return np.array([str(p) not in skipped for p in evaluation.paths[dataset]], dtype=bool)


def attribution_maps(cache_file, layer, objective, rows, strip=None):
    """``(maps, means)`` of ``rows`` of a cache: (n, H, W) float64 Grad-CAM-style maps
    (``attribution.gradcam``) from its stored activation map and ``objective`` gradient map
    of ``layer``, and (n, C) channel-wise means (``attribution.channel_means``) of the
    ``strip`` gradient map (default ``objective``)."""
    with CacheReader(cache_file, allow_partial=True) as r:       # rows the analysis read, finished ones
        return _maps(r, layer, objective, strip or objective, rows)


def _maps(reader, layer, objective, strip, rows):
    """``attribution_maps`` on an open cache: each stored map read once."""
    def rows_of(source):
        return np.stack([reader.read(stat_path(layer, source, MAP), i, i + 1)[0] for i in rows])
    grad = rows_of(objective)
    return gradcam(rows_of("act"), grad), channel_means(grad if strip == objective else rows_of(strip))


class _Assets:
    """The report's sibling folder: each file written once, named by its content; each
    image read once (``thumbnail``); each cache opened once (``reader``, closed by
    ``close``)."""

    def __init__(self, folder, cache_dir):
        self.folder, self.count, self.thumbs = folder, 0, {}
        self.cache_dir, self.readers = cache_dir, {}
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)

    def reader(self, dataset):
        """The open cache of ``dataset`` (its finished rows, as the analysis read them)."""
        if dataset not in self.readers:
            self.readers[dataset] = CacheReader(cache_path(self.cache_dir, dataset), allow_partial=True)
        return self.readers[dataset]

    def close(self):
        for reader in self.readers.values():
            reader.close()

    def thumbnail(self, path):
        """``(rgb (H, W, 3) uint8, relative file)`` of the image at ``path``, or (None, None)."""
        if path not in self.thumbs:
            rgb = _thumbnail(path)
            self.thumbs[path] = (rgb, None if rgb is None else self.add(_png(_pillow().fromarray(rgb))))
        return self.thumbs[path]

    def add(self, data, ext=".png"):
        name = hashlib.sha256(data).hexdigest()[:20] + ext
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            self.count += 1
        return f"{os.path.basename(self.folder)}/{name}"


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError("the HTML report needs Pillow and matplotlib: pip install -e '.[plots]'") from None
    return Image


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _thumbnail(path):
    """(H, W, 3) uint8 of the image at ``path`` shrunk to fit THUMB x THUMB (a smaller
    image is kept as it is; the page shows it at THUMB px, pixels sharp), or None when it
    is not there (or not readable)."""
    Image = _pillow()
    if not os.path.isfile(str(path)):
        return None
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB), Image.LANCZOS)
            return np.asarray(img)
    except OSError:
        return None


def _overlay(rgb, cam):
    """PNG bytes of ``cam`` (h, w) upsampled over ``rgb`` (H, W, 3), normalised by its max."""
    Image = _pillow()
    peak = cam.max()
    level = (cam / peak) if peak > 0 else np.zeros_like(cam)
    heat = Image.fromarray((255 * level).astype(np.uint8)).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR)
    colours = heat_colors(np.asarray(heat, np.float64) / 255)
    return _png(Image.fromarray((0.5 * rgb + 0.5 * colours).astype(np.uint8)))


def _e(text):
    return html.escape(str(text), quote=True)


COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
PANEL_W, PANEL_H, MARGIN = 320, 190, 34


def _frame(x0, label_x, label_y, ticks_x, ticks_y):
    """SVG axes of one panel at horizontal offset ``x0``: box, tick labels, axis labels."""
    w, h = PANEL_W - MARGIN - 8, PANEL_H - MARGIN - 8
    parts = [f'<rect x="{x0 + MARGIN}" y="8" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for frac, text in ticks_x:
        parts.append(f'<text x="{x0 + MARGIN + frac * w:.1f}" y="{8 + h + 11}" font-size="8" '
                     f'text-anchor="middle">{_e(text)}</text>')
    for frac, text in ticks_y:
        parts.append(f'<text x="{x0 + MARGIN - 3}" y="{8 + h - frac * h + 3:.1f}" font-size="8" '
                     f'text-anchor="end">{_e(text)}</text>')
    parts.append(f'<text x="{x0 + MARGIN + w / 2}" y="{PANEL_H - 4}" font-size="9" text-anchor="middle">'
                 f'{_e(label_x)}</text>')
    parts.append(f'<text x="{x0 + 9}" y="{8 + h / 2}" font-size="9" text-anchor="middle" '
                 f'transform="rotate(-90 {x0 + 9} {8 + h / 2})">{_e(label_y)}</text>')
    return parts, w, h


def _polyline(points):
    """SVG ``points`` of a line through ``points`` (x, y) at whole pixels, keeping only
    the corners: a point on a straight run between its neighbours draws nothing."""
    pixels = list(dict.fromkeys((round(x), round(y)) for x, y in points))
    kept = pixels[:1]
    for before, here, after in zip(pixels, pixels[1:], pixels[2:]):
        if (here[0] - before[0]) * (after[1] - here[1]) != (here[1] - before[1]) * (after[0] - here[0]):
            kept.append(here)
    kept += pixels[-1:] if len(pixels) > 1 else []
    return " ".join(f"{x},{y}" for x, y in kept)


def score_svg(evaluation, score):
    """Inline SVG of one score: the ID score histogram (grey) against each OOD set's
    (outlines, density, 40 bins over the range of every set) and the ROC curves (ID
    positive; dashed: TPR 95 %), with the AUROC of each set in its legend."""
    ref = evaluation.scores[evaluation.id][score]
    ref = ref[np.isfinite(ref)]
    sets = {d: evaluation.scores[d][score][np.isfinite(evaluation.scores[d][score])] for d in evaluation.ood}
    every = np.concatenate([ref, *sets.values()])
    lo, hi = (float(every.min()), float(every.max())) if len(every) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, 41)
    density = {d: np.histogram(v, edges, density=True)[0] if len(v) else np.zeros(40)
               for d, v in [(evaluation.id, ref), *sets.items()]}
    top = max(float(h.max(initial=0)) for h in density.values()) or 1.0
    parts, w, h = _frame(0, "score (higher = more in-distribution)", "density",
                         [(0, f"{lo:.3g}"), (1, f"{hi:.3g}")], [(0, "0"), (1, f"{top:.2g}")])

    def steps(heights):
        points = []
        for i, v in enumerate(heights):
            y = 8 + h - v / top * h
            points += [(MARGIN + i / 40 * w, y), (MARGIN + (i + 1) / 40 * w, y)]
        return _polyline(points)
    base = f"{MARGIN + w:.1f},{8 + h} {MARGIN},{8 + h}"
    parts.append(f'<polygon points="{steps(density[evaluation.id])} {base}" fill="#000" fill-opacity="0.25"/>')
    roc_parts, _, _ = _frame(PANEL_W, "false positive rate (OOD accepted)", "true positive rate",
                             [(0, "0"), (1, "1")], [(0, "0"), (0.95, ".95")])
    parts += roc_parts
    parts.append(f'<line x1="{PANEL_W + MARGIN}" x2="{PANEL_W + MARGIN + w}" y1="{8 + h * 0.05:.1f}" '
                 f'y2="{8 + h * 0.05:.1f}" stroke="#999" stroke-dasharray="3,3"/>')
    legend = [f'<text x="{MARGIN + 4}" y="18" font-size="8">{_e(evaluation.id)} (ID)</text>']
    for n, (d, v) in enumerate(sets.items()):
        colour = COLOURS[n % len(COLOURS)]
        parts.append(f'<polyline points="{steps(density[d])}" fill="none" stroke="{colour}" stroke-width="1.2"/>')
        if not len(ref) or not len(v):
            continue                        # no finite score on one side: no curve
        fpr, tpr, _ = roc_curve(np.r_[np.ones(len(ref)), np.zeros(len(v))], np.r_[ref, v])
        line = _polyline([(PANEL_W + MARGIN + a * w, 8 + h - b * h) for a, b in zip(fpr, tpr)])
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.2"/>')
        auroc = 100 * evaluation.results[score][d]["AUROC"]
        legend.append(f'<text x="{PANEL_W + MARGIN + w - 4}" y="{8 + h - 6 - 10 * n}" font-size="8" '
                      f'text-anchor="end" fill="{colour}">{_e(d)} (AUROC {auroc:.1f})</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * PANEL_W}" height="{PANEL_H}" '
            f'viewBox="0 0 {2 * PANEL_W} {PANEL_H}" role="img" aria-label="histogram and ROC of {_e(score)}">'
            + "".join(parts + legend) + "</svg>")


def _table(header, rows, sortable=True, cls=""):
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    klass = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    return f'<div class="scroll"><table class="{klass}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _page(heading, body):
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{_e(heading)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{_e(heading)}</h1>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def _facts(evaluation):
    """Rows (fact, value) of the caption facts, read from the ID cache's attributes."""
    with CacheReader(cache_path(evaluation.cache_dir, evaluation.id), allow_partial=True) as r:
        a = r.attrs
    steps = "; ".join(" ".join(str(x) for x in step) for step in (a.get("preprocess") or {}).get("steps", []))
    rows = [("model", f"{a.get('arch')} ({a.get('family', '')} adapter, head {head_label(a)}, "
                      f"{a.get('num_classes')} classes)"),
            ("weights (SHA-256 of the tensors)", a.get("weights_sha256") or a.get("checkpoint_sha256")),
            ("checkpoint", a.get("checkpoint", "")),
            ("preprocessing", f"{(a.get('preprocess') or {}).get('name', '')}: {steps}"),
            ("benchmark", a.get("benchmark") or "-"),
            ("cache folder", evaluation.cache_dir)]
    for d in [evaluation.id, *evaluation.csid, *evaluation.ood]:
        role = "ID test" if d == evaluation.id else ("covariate-shifted ID" if d in evaluation.csid else "OOD")
        rows.append((f"{role} cache {d}", f"{evaluation.n_rows[d]} rows"
                     + (f", {evaluation.skipped[d]} skipped" if evaluation.skipped[d] else "")))
    rows += [("fitted on", ", ".join(evaluation.fit_caches) or "-"),
             ("settings", "; ".join(f"{title(s)}: {t}" for s, t in evaluation.settings.items()) or "defaults"),
             ("tuned", "; ".join(f"{title(s)}: {t['params']} on {t.get('on', '')}"
                                 for s, t in evaluation.tuned.items()) or "-"),
             ("metrics", f"in %, {CONVENTION_TEXT[evaluation.convention]}")]
    return rows


def _predictions(reader, rows):
    """``[(predicted class, label)]`` of ``rows`` of an open cache (the rows shown only: a
    report reads no whole set's logits)."""
    return [(int(reader.read("logits", i, i + 1)[0].argmax()), int(reader.read("labels", i, i + 1)[0])) for i in rows]


def _gallery(evaluation, assets, name, dataset, rows, is_id):
    """HTML of one gallery row: ``rows`` of ``dataset`` with their captions."""
    values = evaluation.scores[dataset][name]
    items = []
    for rank, (i, (predicted, label)) in enumerate(zip(rows, _predictions(assets.reader(dataset), rows)), 1):
        path = str(evaluation.paths[dataset][i])
        rgb, src = assets.thumbnail(path)
        if rgb is None:
            picture = f'<span class="missing">not found: {_e(path)}</span>'
        else:
            picture = f'<img src="{src}" alt="{_e(os.path.basename(path))}">'
        lines = [_e(os.path.basename(path)), f"score {values[i]:.4g} · rank {rank}",
                 f"predicted {predicted}" + (f" · label {label}" if is_id and label >= 0 else "")]
        items.append(f'<figure class="item" data-dataset="{_e(dataset)}" data-index="{int(i)}">'
                     f'{picture}<figcaption>{"<br>".join(lines)}</figcaption></figure>')
    return f'<div class="row">{"".join(items)}</div>'


def _attribution(evaluation, assets, lead, k, usable):
    """HTML of the attribution section (see the module docstring); ``usable``: ``{dataset:
    (N,) bool}`` of the scored rows."""
    attrs = {d: assets.reader(d).attrs for d in [evaluation.id, *evaluation.ood]}
    found = map_layer(attrs[evaluation.id])
    if found is None or any(map_layer(attrs[d]) != found for d in evaluation.ood):
        return "<p>" + _e(_what_to_extract(attrs[evaluation.id])) + "</p>"
    layer, cam_objective, strip_objective = found
    out = [f"<p>Layer <b>{_e(layer)}</b>: ReLU(Σ<sub>c</sub> mean<sub>hw</sub>(g<sub>c</sub>) · a<sub>c</sub>) "
           f"with g the gradient of {_e(cam_objective)}, over each thumbnail (brighter = stronger); the strip "
           f"shows the channel-wise means of the {_e(strip_objective)} gradient, GAIA-A's statistic. Images: the "
           f"OOD gallery of {_e(title(lead))} and {TYPICAL} typical ID images (scores nearest the ID median).</p>"]
    ref = evaluation.scores[evaluation.id][lead]
    kept = np.flatnonzero(usable[evaluation.id])
    typical = kept[np.lexsort((kept, np.abs(ref[kept] - np.median(ref[kept]))))][:TYPICAL]
    id_cams, id_means = _maps(assets.reader(evaluation.id), layer, cam_objective, strip_objective, typical)
    for d in evaluation.ood:
        rows = gallery_rows(evaluation.scores[d][lead], usable[d], k, highest=True)
        cams, means = _maps(assets.reader(d), layer, cam_objective, strip_objective, rows)
        items = []
        for dataset, chosen, maps in ((evaluation.id, typical, id_cams), (d, rows, cams)):
            for i, cam in zip(chosen, maps):
                path = str(evaluation.paths[dataset][i])
                rgb, _ = assets.thumbnail(path)
                if rgb is None:
                    rgb = np.full((THUMB, THUMB, 3), 128, np.uint8)       # the map alone, on grey
                items.append(f'<figure class="item" data-dataset="{_e(dataset)}" data-index="{int(i)}">'
                             f'<img src="{assets.add(_overlay(rgb, cam))}" alt="map">'
                             f'<figcaption>{_e(dataset)}<br>{_e(os.path.basename(path))}</figcaption></figure>')
        strip = channel_strip(id_means, means, f"{evaluation.id} (ID, typical)", f"{d} (OOD gallery)", strip_objective)
        out.append(f'<h4>{_e(d)}</h4><div class="row">{"".join(items)}</div>'
                   f'<img class="figure" src="{assets.add(strip)}" alt="channel strip">')
    return "\n".join(out)


def _what_to_extract(attrs):
    """What to extract to get the maps, with its cost per image."""
    shapes = attrs.get("layer_shapes") or {}
    maps = [l for l in attrs.get("layers") or [] if shapes.get(l, [0, 1, 1])[1] * shapes.get(l, [0, 1, 1])[2] > 1]
    if not maps:
        return ("These caches hold no layer with a spatial map: attribution maps need a convolutional layer's "
                "raw maps (extract --hook LAYER --store LAYER=raw).")
    deepest = maps[-1]
    layer = deepest.split(".")[0]       # the top-level block holding the deepest map: Grad-CAM's usual layer
    c, h, w = shapes[deepest]
    sources = 1 + len(attrs.get("objectives") or []) or 2
    return (f"These caches hold statistics only. To see attribution maps, extract with --hook {layer} --store "
            f"{layer}=raw: it keeps {layer}'s activation and gradient maps (about {c}x{h}x{w} each, as its "
            f"{deepest}; about {c * h * w * 4 * sources / 1024:.0f} KiB per image for {sources} maps).")


def write_html(evaluation, path, gallery=GALLERY):
    """Write the report of ``evaluation`` (an ``analyze.results.Evaluation``) to ``path``
    and its sibling folder ``<stem>_files/``; returns the two paths. gallery: images per
    gallery (k)."""
    if not isinstance(gallery, int) or isinstance(gallery, bool) or gallery < 1:
        raise ValueError(f"gallery={gallery!r}: the number of images per gallery, an integer of at least 1")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    assets = _Assets(os.path.splitext(path)[0] + "_files", evaluation.cache_dir)
    try:
        body = _report_body(evaluation, assets, gallery)
    finally:
        assets.close()
    with open(path, "w") as f:
        f.write(_page(f"OOD detection report: {evaluation.id} vs {', '.join(evaluation.ood)}", body))
    return [path, assets.folder]


def _report_body(evaluation, assets, gallery):
    """The HTML body of ``write_html``."""
    names = list(evaluation.results)
    usable = {d: usable_rows(evaluation, d) for d in [evaluation.id, *evaluation.ood]}
    nav = "".join(f'<a href="#score-{_e(n)}">{_e(title(n))}</a>' for n in names)
    body = [f'<p class="caption">{_e(caption(evaluation))}</p>',
            _table(["fact", "value"], _facts(evaluation), sortable=False, cls="facts"),
            "<h2 id=\"table\">Results</h2>", _table(*summary_csv_table(evaluation))]
    if evaluation.groups:
        body.append("<h3>Near-OOD and far-OOD</h3>" + _table(*grouped_table(evaluation)))
    if evaluation.fsood:
        body += ["<h3>Full-spectrum OOD (FS-OOD)</h3>", f'<p class="caption">{_e(caption(evaluation.fsood))}</p>',
                 _table(*summary_csv_table(evaluation.fsood))]
    lead = "gaia_a" if "gaia_a" in names else names[0]
    body += ["<h2 id=\"attribution\">Attribution maps</h2>", _attribution(evaluation, assets, lead, gallery, usable),
             f"<h2 id=\"scores\">Scores</h2><nav>{nav}</nav>"]
    for name in names:
        section = [f'<section id="score-{_e(name)}"><h3>{_e(title(name))}</h3>', score_svg(evaluation, name)]
        for d in evaluation.ood:
            rows = gallery_rows(evaluation.scores[d][name], usable[d], gallery, highest=True)
            section.append(f'<div class="gallery" data-score="{_e(name)}" data-ood="{_e(d)}">'
                           f"<h4>{_e(d)}: the {len(rows)} OOD images {_e(title(name))} ranks most in-distribution</h4>"
                           + _gallery(evaluation, assets, name, d, rows, is_id=False) + "</div>")
        rows = gallery_rows(evaluation.scores[evaluation.id][name], usable[evaluation.id], gallery, highest=False)
        section.append(f'<div class="gallery" data-score="{_e(name)}" data-id="{_e(evaluation.id)}">'
                       f"<h4>{_e(evaluation.id)}: the {len(rows)} ID images {_e(title(name))} ranks least "
                       "in-distribution</h4>" + _gallery(evaluation, assets, name, evaluation.id, rows, is_id=True)
                       + "</div></section>")
        body.append("\n".join(section))
    return "\n".join(body)


def write_sweep_html(sweep, path, figures=()):
    """Write the report of a sweep (``analyze.results.SweepResult``) to ``path``: its
    caption, the ranking table (sortable) and ``figures`` (paths of PNG files beside
    ``path``, e.g. the layer charts), shown as they are."""
    header, rows = sweep_table(sweep)
    pictures = "".join(f'<img class="figure" src="{_e(os.path.relpath(f, os.path.dirname(path)))}" alt="chart">'
                       for f in figures)
    errors = "".join(f"<li>{_e(e['label'])}: {_e(e['error'])}</li>" for e in sweep.errors)
    body = (f'<p class="caption">{_e(sweep_caption(sweep))}</p>' + _table(header, rows) + pictures
            + (f"<h2>Variants the caches could not serve</h2><ul>{errors}</ul>" if errors else ""))
    with open(path, "w") as f:
        f.write(_page(f"Sweep: {sweep.id} vs {', '.join(sweep.reported)}", body))
    return path


def report_problem():
    """Why no report can be written here (the plots extra is missing), or ""."""
    try:
        _pillow()
        import matplotlib  # noqa: F401
    except (RuntimeError, ImportError):
        return "no report.html: the HTML report needs the plots extra (pip install -e '.[plots]')"
    return ""



def to_html(result, path, gallery=GALLERY):
    """Write the HTML report of ``result`` to ``path`` (an ``Evaluation``: ``write_html``,
    with ``<stem>_files/`` beside it; a ``SweepResult``: ``write_sweep_html``, without its
    charts); returns ``path``. The Python door of ``analyze``'s and ``sweep``'s
    ``report.html``, like ``to_markdown`` and ``to_csv``: results stay plain data."""
    problem = report_problem()
    if problem:
        raise RuntimeError(problem)
    if isinstance(result, SweepResult):
        return write_sweep_html(result, path)
    if not isinstance(result, Evaluation):
        raise TypeError(f"to_html renders an Evaluation or a SweepResult, not {type(result).__name__}")
    write_html(result, path, gallery)
    return path
