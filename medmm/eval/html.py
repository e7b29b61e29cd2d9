"""One self-contained HTML page for evaluation results: no network, no external scripts or styles.

    write_report("runs/demo/eval/report.html", "demo suite", {"vqa": (metrics_json, rows), ...})

The page has a summary table (each benchmark's headline metric with its 95% interval and protocol), then a
section per benchmark (``<section id="bench-NAME">``) with its metrics table, a plot of every metric with its
interval (matplotlib, inlined PNG), and its per-item rows: a thumbnail of the input (DICOM through its VOI
window, or a raster image; SMILES/DNA inputs as text), the question, the reference, the generated text,
right or wrong, the item score, and filters (free text, right/wrong, group) in plain JavaScript. The script
sets ``data-ready="1"`` on ``<body>`` when it has run; ``tests/test_report_html.py`` opens the page in
headless Chromium and checks that, the sections and the console.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path

from ..utils import atomic_write_text

__all__ = ["thumbnail_data_uri", "write_report"]

_THUMB = 96

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:16px 24px}header h1{margin:0 0 4px 0;font-size:22px}
header p{margin:0;opacity:.85;font-size:13px}main{padding:16px 24px}nav a{margin-right:12px;color:#1f3a5f}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 16px;margin:16px 0}
h2{margin:4px 0 6px 0;font-size:18px}.protocol{font-size:12px;color:#4a5563;margin:2px 0 10px 0}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #e5e7eb;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.items td{max-width:340px;white-space:pre-wrap;word-break:break-word}.ok{color:#0a7d32;font-weight:600}
.bad{color:#b42318;font-weight:600}.na{color:#6b7280}.err{color:#b42318}img.thumb{width:96px;height:auto;
border:1px solid #ccd}.filters{margin:8px 0;font-size:13px}.filters input,.filters select{margin-right:10px}
.note{font-size:12px;color:#4a5563}.plot{max-width:640px;width:100%;height:auto}code{font-size:12px}
"""

_JS = """
(function () {
  function apply(section) {
    var text = section.querySelector('.f-text').value.toLowerCase();
    var verdict = section.querySelector('.f-correct').value;
    var groupSel = section.querySelector('.f-group');
    var group = groupSel ? groupSel.value : '';
    var rows = section.querySelectorAll('tbody.items-body tr');
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var ok = (!text || r.textContent.toLowerCase().indexOf(text) >= 0) &&
               (!verdict || r.getAttribute('data-correct') === verdict) &&
               (!group || r.getAttribute('data-group') === group);
      r.style.display = ok ? '' : 'none';
      if (ok) { shown++; }
    }
    var counter = section.querySelector('.f-count');
    if (counter) { counter.textContent = shown + ' of ' + rows.length + ' rows'; }
  }
  var sections = document.querySelectorAll('section.benchmark');
  for (var s = 0; s < sections.length; s++) {
    (function (section) {
      var controls = section.querySelectorAll('.f-text, .f-correct, .f-group');
      for (var c = 0; c < controls.length; c++) {
        controls[c].addEventListener('input', function () { apply(section); });
        controls[c].addEventListener('change', function () { apply(section); });
      }
      apply(section);
    })(sections[s]);
  }
  document.body.setAttribute('data-ready', '1');
})();
"""


def _png_data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_data_uri(path: str | Path, size: int = _THUMB) -> str | None:
    """A PNG thumbnail (data URI) of a DICOM file (first frame, VOI window) or a raster image; None otherwise."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return None
    from ..io.dicom import is_dicom_file

    try:
        if is_dicom_file(path):
            from ..io.dicom import read_dicom, window

            im = read_dicom(path, apply_voi=True)
            frame = im.pixels[len(im.pixels) // 2]  # (H, W) or (H, W, 3); the middle frame of a multi-frame file
            if frame.ndim == 2:
                frame = window(frame.astype(np.float32), fallback=None) if frame.max() > 1 else frame
                arr = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
            else:
                f = frame.astype(np.float32)
                f = (f - f.min()) / max(float(f.max() - f.min()), 1e-6)
                arr = (f * 255).astype(np.uint8)
            img = Image.fromarray(arr)
        else:
            from ..io.images import RASTER_SUFFIXES

            if path.suffix.lower() not in RASTER_SUFFIXES:
                return None
            img = Image.open(path)
            img.load()
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        img.thumbnail((size, size))
        return _png_data_uri(img)
    except Exception:  # a thumbnail is decoration: an unreadable input is shown without one
        return None


def _input_cell(modalities: dict | None, cache: dict) -> str:
    if not modalities:
        return '<span class="na">-</span>'
    parts = []
    for name, value in modalities.items():
        values = value if isinstance(value, list) else [value]
        for v in values[:2]:
            if not isinstance(v, str):
                continue
            uri = cache.get(v)
            if v not in cache:
                uri = cache[v] = thumbnail_data_uri(v) if ("/" in v or "\\" in v) else None
            if uri:
                parts.append(f'<img class="thumb" alt="{html.escape(name)}" src="{uri}">')
            else:
                text = Path(v).name if ("/" in v and Path(v).exists()) else v
                parts.append(f"<code>{html.escape(name)}: {html.escape(text[:80])}</code>")
    return "<br>".join(parts) or '<span class="na">-</span>'


def _fmt(v, scale: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" if scale >= 10 else f"{v:.4f}"


def _plot(result: dict) -> str | None:
    """Every metric with its interval, as an inlined PNG (None when there is nothing to plot)."""
    names = [k for k, m in result["metrics"].items() if m.get("value") is not None]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = [result["metrics"][k]["value"] for k in names]
    lo = [v - (result["metrics"][k]["ci95"] or [v, v])[0] for k, v in zip(names, vals)]
    hi = [(result["metrics"][k]["ci95"] or [v, v])[1] - v for k, v in zip(names, vals)]
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(names) + 1.0), dpi=100)
    y = list(range(len(names)))[::-1]
    ax.errorbar(vals, y, xerr=[lo, hi], fmt="o", color="#1f3a5f", ecolor="#7b93b3", capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel(f"value with 95% bootstrap interval (scale 0-{result.get('scale', 1):g})", fontsize=8)
    scale = float(result.get("scale", 1.0))
    ends = [v - a for v, a in zip(vals, lo)] + [v + b for v, b in zip(vals, hi)]
    if min(ends) >= 0 and max(ends) <= scale:  # fractions (or 0-100 scores): show the whole scale
        ax.set_xlim(-0.02 * scale, 1.02 * scale)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(result["benchmark"], fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _verdict(c) -> tuple[str, str]:
    if c is True:
        return "1", '<span class="ok">right</span>'
    if c is False:
        return "0", '<span class="bad">wrong</span>'
    return "", '<span class="na">-</span>'


def _section(name: str, result: dict, rows: list[dict], max_rows: int, cache: dict) -> str:
    e = html.escape
    scale = result.get("scale", 1.0)
    out = [f'<section class="benchmark" id="bench-{e(name)}" data-benchmark="{e(name)}">',
           f"<h2>{e(name)} <small>n = {result['n']}"
           + (f", errors = {result['errors']}" if result.get("errors") else "") + "</small></h2>",
           f'<p class="protocol">protocol: {e(result.get("protocol", ""))}</p>',
           '<table class="metrics"><thead><tr><th>metric</th><th>value</th><th>95% CI</th></tr></thead><tbody>']
    for k, m in result["metrics"].items():
        ci = m.get("ci95")
        ci_s = f"[{_fmt(ci[0], scale)}, {_fmt(ci[1], scale)}]" if ci else "n/a"
        out.append(f'<tr><td>{e(k)}</td><td class="num">{_fmt(m.get("value"), scale)}</td>'
                   f'<td class="num">{ci_s}</td></tr>')
    out.append("</tbody></table>")
    b = result.get("bootstrap", {})
    out.append(f'<p class="note">Percentile bootstrap over items: {b.get("resamples", 0)} resamples, seed '
               f'{b.get("seed", 0)}{", stratified" if b.get("stratified") else ""}.</p>')
    for note in result.get("notes", []):
        out.append(f'<p class="note">{e(str(note))}</p>')
    uri = _plot(result)
    if uri:
        out.append(f'<img class="plot" alt="{e(name)} metrics with intervals" src="{uri}">')
    groups = sorted({str(r["group"]) for r in rows if r.get("group") is not None})
    out.append('<div class="filters">filter: <input class="f-text" type="search" placeholder="text">'
               '<select class="f-correct"><option value="">all</option><option value="1">right</option>'
               '<option value="0">wrong</option></select>')
    if groups:
        out.append('<select class="f-group"><option value="">all groups</option>'
                   + "".join(f'<option value="{e(g)}">{e(g)}</option>' for g in groups) + "</select>")
    out.append('<span class="f-count note"></span></div>')
    out.append('<table class="items"><thead><tr><th>#</th><th>id</th><th>input</th><th>question</th>'
               '<th>reference</th><th>generated</th><th>verdict</th><th>score</th></tr></thead>'
               '<tbody class="items-body">')
    for i, r in enumerate(rows[:max_rows]):
        code, verdict = _verdict(r.get("correct"))
        if "error" in r:
            verdict = f'<span class="err">{e(str(r["error"]))}</span>'
            generated = f'<span class="err">{e(str(r.get("message", "")))}</span>'
        else:
            generated = e(str(r.get("prediction", "")))
        score = r.get("score")
        out.append(f'<tr data-correct="{code}" data-group="{e(str(r.get("group", "")))}"><td class="num">{i + 1}</td>'
                   f'<td>{e(str(r.get("id", "")))}</td><td>{_input_cell(r.get("modalities"), cache)}</td>'
                   f'<td>{e(str(r.get("question", ""))[:1500])}</td><td>{e(str(r.get("reference", "")))}</td>'
                   f'<td>{generated}</td><td>{verdict}</td>'
                   f'<td class="num">{"" if score is None else e(str(score))}</td></tr>')
    out.append("</tbody></table>")
    if len(rows) > max_rows:
        out.append(f'<p class="note">{len(rows) - max_rows} more rows in predictions.jsonl (showing {max_rows}).</p>')
    out.append("</section>")
    return "\n".join(out)


def write_report(path: str | Path, title: str, benchmarks: dict[str, tuple[dict, list[dict]]], subtitle: str = "",
                 max_rows: int = 500) -> Path:
    """Write the HTML page for ``{name: (metrics.json dict, rows)}``; returns the path."""
    e = html.escape
    cache: dict = {}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<header><h1>{e(title)}</h1><p>{e(subtitle)} &middot; {stamp}</p></header><main>",
             '<section id="summary"><h2>summary</h2><table><thead><tr><th>benchmark</th><th>n</th><th>headline</th>'
             '<th>value</th><th>95% CI</th><th>protocol</th></tr></thead><tbody>']
    for name, (res, _) in benchmarks.items():
        head = res.get("headline") or next(iter(res["metrics"]), "")
        m = res["metrics"].get(head, {})
        ci = m.get("ci95")
        scale = res.get("scale", 1.0)
        parts.append(f'<tr><td><a href="#bench-{e(name)}">{e(name)}</a></td><td class="num">{res["n"]}</td>'
                     f'<td>{e(head)}</td><td class="num">{_fmt(m.get("value"), scale)}</td>'
                     f'<td class="num">{f"[{_fmt(ci[0], scale)}, {_fmt(ci[1], scale)}]" if ci else "n/a"}</td>'
                     f'<td class="protocol">{e(res.get("protocol", ""))}</td></tr>')
    parts.append("</tbody></table></section>")
    parts.append("<nav>" + "".join(f'<a href="#bench-{e(n)}">{e(n)}</a>' for n in benchmarks) + "</nav>")
    for name, (res, rows) in benchmarks.items():
        parts.append(_section(name, res, rows, max_rows, cache))
    parts.append(f"</main><script>{_JS}</script></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(parts))
    return path
