"""What a microscopist checks: a screen-sized overlay per field, session.json, and one self-contained
report.html (summary with its interval, every field, every positive cell with its Grad-CAM)."""
from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path

import cv2
import numpy as np

from edge.card import atomic_write_text, calibrated
from edge.field import FieldResult
from edge.gradcam import overlay as gradcam_overlay

MAX_WIDTH = 2048
COLOURS = {"Parasitized": (0, 0, 230), "Uninfected": (0, 170, 0), "rejected": (150, 150, 150)}  # BGR
# left-out regions named on the overlay: those that could be a cell the detector should have counted (an
# enlarged infected cell taken for a white cell or a clump); cut, small and platelets are too many to name
LEFT_OUT_LABELS = {"wbc": "white cell?", "large": "clump?"}
LEFT_OUT_WORDS = {"cut": ("cut by an edge",) * 2, "small": ("debris",) * 2, "large": ("clump", "clumps"),
                  "wbc": ("white cell", "white cells"), "platelets": ("platelet clump", "platelet clumps")}


def field_overlay(rgb: np.ndarray, res: FieldResult, max_width: int = MAX_WIDTH) -> np.ndarray:
    """Cell outlines (green: uninfected, red with confidence: parasitized, grey: left out), BGR, ≤ max_width."""
    H, W = rgb.shape[:2]
    s = min(1.0, max_width / W)
    bgr = cv2.cvtColor(cv2.resize(rgb, (round(W * s), round(H * s)), interpolation=cv2.INTER_AREA) if s < 1 else rgb,
                       cv2.COLOR_RGB2BGR)
    det = res.detection
    if det is None:
        return bgr
    thick = max(1, round(bgr.shape[1] / 800))
    font = max(0.4, bgr.shape[1] / 2400)
    for call, cell in zip(res.cells, det.cells):
        x, y, w, h = cell.box
        m = np.zeros((h + 2, w + 2), np.uint8)
        m[1:-1, 1:-1] = cell.mask
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cs = [((c.astype(np.float32) + (x - 1, y - 1)) * s).astype(np.int32) for c in cs]
        key = call.label if call.status == "ok" and call.label else "rejected"
        cv2.drawContours(bgr, cs, -1, COLOURS[key], thick + (1 if key == "Parasitized" else 0))
        text = (f"#{call.cell} {call.prob_parasitized:.2f}" if key == "Parasitized" else
                LEFT_OUT_LABELS.get(call.status) if key == "rejected" else None)
        if text:
            tx, ty = int(x * s), max(12, int(y * s) - 4)
            cv2.putText(bgr, text, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), thick + 2, cv2.LINE_AA)
            cv2.putText(bgr, text, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, font, COLOURS[key], thick, cv2.LINE_AA)
    band = np.full((max(28, int(34 * font * 2)), bgr.shape[1], 3), 255, np.uint8)
    head = (f"{res.rbc} red cells, {res.positive} parasitized" if res.status == "ok"
            else f"NOT COUNTED: {res.reason}")
    cv2.putText(band, head, (8, band.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, font * 1.2,
                (0, 0, 0) if res.status == "ok" else (0, 0, 200), thick, cv2.LINE_AA)
    return np.vstack([band, bgr])


def encode(bgr: np.ndarray, ext: str = ".jpg", quality: int = 88) -> bytes:
    ok, buf = cv2.imencode(ext, bgr, [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else [])
    if not ok:
        raise OSError(f"could not encode a {ext} picture")
    return buf.tobytes()


def data_uri(bgr: np.ndarray, ext: str = ".jpg") -> str:
    """A picture inside the HTML itself, so report.html is one self-contained file."""
    mime = "jpeg" if ext == ".jpg" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(encode(bgr, ext, 85)).decode()}"


def left_out_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {LEFT_OUT_WORDS.get(k, (k, k))[n != 1]}" for k, n in counts.items())


def percent_text(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.0f}%"


def write_session(out: Path, summary: dict) -> Path:
    path = out / "session.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    return path


def review_id(summary: dict, gallery: list) -> str:
    """Names a session's review in the browser's storage: the same cells give the same id, so a report
    re-opened (or re-made from the same fields) keeps its reviewer's decisions, and another session's do not
    leak into it."""
    key = json.dumps([summary["rbc_count"], [(str(g[0]), int(g[1]), round(float(g[2]), 6)) for g in gallery]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# The review: the reviewer confirms or rejects each positive call; the page shows the parasitemia of the
# confirmed calls (looked up in the table Python computed, edge.parasitemia.confirmed_table), keeps the
# decisions in the browser's storage and downloads them as CSV. No statistics in JavaScript.
REVIEW_JS = r"""
const R = JSON.parse(document.getElementById('review-data').textContent);
const KEY = 'malaria-edge-review:' + R.id;
const cards = [...document.querySelectorAll('.cell')];
function decisions() {
  return cards.map(c => { const r = c.querySelector('input:checked'); return r ? r.value : ''; });
}
function fmt(v) { return v.toFixed(2); }
function ul(v) { return Math.round(v / 100 * R.rbc_per_ul).toLocaleString('en-US'); }
function update() {
  const d = decisions(), c = d.filter(v => v === 'confirmed').length, j = d.filter(v => v === 'rejected').length;
  cards.forEach((card, i) => {
    card.classList.toggle('rv-confirmed', d[i] === 'confirmed');
    card.classList.toggle('rv-rejected', d[i] === 'rejected');
  });
  const left = cards.length - c - j;
  document.getElementById('rv-progress').textContent = cards.length === 0 ? 'No positive call to review.' :
    (c + j) + ' of ' + cards.length + ' positive calls reviewed: ' + c + ' confirmed, ' + j + ' rejected.';
  const t = R.table[Math.min(c, R.table.length - 1)];
  document.getElementById('rv-result').textContent = (c + j) === 0 ? '' :
    'Confirmed parasitemia ' + fmt(t[0]) + '% (95% interval ' + fmt(t[1]) + '-' + fmt(t[2]) + '%), ' + ul(t[0]) +
    ' parasites/µL (' + ul(t[1]) + '-' + ul(t[2]) + ', assuming ' + ul(100) + ' red cells/µL): ' + c +
    ' confirmed of ' + R.rbc + ' red cells, over the sensitivity ' + R.se +
    ' (the infected cells the classifier misses); the calls you rejected count as its false positives.' +
    (left ? ' ' + left + ' calls not yet reviewed are not counted in it.' : '');
  try { localStorage.setItem(KEY, JSON.stringify(d)); } catch (e) {}
}
function reviewCsv() {
  const d = decisions();
  const q = s => '"' + String(s).replace(/"/g, '""') + '"';
  return ['field,cell,prob_parasitized,decision'].concat(cards.map((c, i) =>
    [q(c.dataset.field), c.dataset.cell, c.dataset.p, d[i]].join(','))).join('\n') + '\n';
}
document.getElementById('rv-download').onclick = () => {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([reviewCsv()], {type: 'text/csv'}));
  a.download = 'review.csv';
  a.click();
};
try {
  const saved = JSON.parse(localStorage.getItem(KEY) || '[]');
  cards.forEach((c, i) => { const r = c.querySelector('input[value="' + saved[i] + '"]'); if (r) r.checked = true; });
} catch (e) {}
cards.forEach(c => c.querySelectorAll('input').forEach(r => r.addEventListener('change', update)));
// keys: c confirms and r rejects the current cell, then moves on; left and right arrows move (up and down
// still scroll the page)
let cur = 0;
function show(i, scroll) {
  if (!cards.length) return;
  cur = Math.max(0, Math.min(i, cards.length - 1));
  cards.forEach((c, k) => c.classList.toggle('rv-current', k === cur));
  if (scroll) cards[cur].scrollIntoView({block: 'center'});
}
document.addEventListener('keydown', ev => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !cards.length) return;
  const k = ev.key.toLowerCase();
  if (k === 'c' || k === 'r') {
    cards[cur].querySelector('input[value=' + (k === 'c' ? 'confirmed' : 'rejected') + ']').checked = true;
    update();
    show(cur + 1, true);
  } else if (k === 'arrowright') { show(cur + 1, true); ev.preventDefault(); }
  else if (k === 'arrowleft') { show(cur - 1, true); ev.preventDefault(); }
});
cards.forEach((c, i) => c.addEventListener('click', () => show(i, false)));
show(0, false);
update();
"""


def write_html(out: Path, summary: dict, overlays: list[tuple[str, str]],
               gallery: list[tuple[str, int, float, np.ndarray, np.ndarray | None]],
               confirmed: list[tuple[float, float, float]] | None = None) -> Path:
    """overlays: (field path, data URI) per field; gallery: (field path, cell index, P(Parasitized), RGB crop,
    heat map or None) per positive cell; confirmed: the parasitemia (percent, low, high) for 0, 1, ... of
    the gallery's calls confirmed (edge.parasitemia.confirmed_table), for the review; None: no review."""
    e = summary
    lo, hi = e["parasitemia_ci95"]
    pct = "n/a" if e["parasitemia_percent"] is None else f"{e['parasitemia_percent']:.2f}%"
    raw = "n/a" if e["raw_positive_percent"] is None else f"{e['raw_positive_percent']:.2f}%"
    per_ul = "n/a" if e["parasites_per_ul"] is None else f"{e['parasites_per_ul']:,.0f}"
    sc = e.get("screen")
    screen = (f", behind the screen {html.escape(sc['model'])} (cells it gives P &lt; {sc['forward_at']:.3f} are "
              "uninfected; the counts above were measured for that whole rule)") if sc else ""
    target = ("reached" if e["target_reached"] else "NOT reached: count more fields before trusting the result")
    rows = "".join(
        f"<tr><td>{html.escape(Path(f['path']).name)}</td><td class='{f['status']}'>{f['status']}</td>"
        f"<td>{html.escape(f['reason'])}</td><td>{f['rbc_count']}</td><td>{f['positive_count']}</td>"
        f"<td>{f['cell_diameter_px']}</td><td>{f['quality'].get('focus', '')}</td>"
        f"<td>{percent_text(f['quality'].get('overlapped'))}</td><td>{left_out_text(f.get('left_out', {}))}</td></tr>"
        for f in e["fields"])
    figs = "".join(f"<figure><img src='{uri}'><figcaption>{html.escape(name)}</figcaption></figure>"
                   for name, uri in overlays)
    cards = []
    for k, (name, idx, prob, rgb, heat) in enumerate(gallery):
        pic = gradcam_overlay(rgb, heat, "Parasitized", calibrated(prob, e.get("temperature", 1.0)), panel=True)
        verdict = "".join(f"<label><input type='radio' name='rv{k}' value='{v}'> {v[:-2]}</label> "
                          for v in ("confirmed", "rejected")) if confirmed else ""
        cards.append(f"<div class='cell' data-field='{html.escape(str(name))}' data-cell='{idx}' data-p='{prob:.6f}'>"
                     f"<img src='{data_uri(pic)}'><br>{html.escape(Path(name).name)} #{idx}<br>"
                     f"P(parasitized) {prob:.3f}<br>{verdict}</div>")
    review = script = ""
    if confirmed and e["rbc_count"]:
        data = {"id": review_id(e, gallery), "rbc": e["rbc_count"], "se": e.get("sensitivity_used") or e["sensitivity_validation"],
                "rbc_per_ul": e["rbc_per_ul_assumed"],
                "table": [[round(v, 4) for v in row] for row in confirmed]}
        review = ("<div class='review'><b>Your review</b> (confirm or reject each positive cell below; kept in this "
                  "browser; keys: c confirms, r rejects the outlined cell and moves on, ← → move): "
                  "<span id='rv-progress'></span><br><b id='rv-result'></b><br>"
                  "<button id='rv-download'>Download the review (CSV)</button></div>")
        script = (f"<script id='review-data' type='application/json'>{json.dumps(data)}</script>"
                  f"<script>{REVIEW_JS}</script>")
    used, se_val = e.get("sensitivity_used"), e["sensitivity_validation"]
    kept = ("" if not used or not se_val or abs(used - se_val) < 1e-4 else
            f", scaled to {used} for the infected cells field mode's crops miss against their own crops")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>malaria-edge session report</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1400px}} .big{{font-size:1.6em}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px}} .rejected,.error{{color:#b00}}
figure{{display:inline-block;margin:4px}} figure img{{max-width:680px}} .cell{{display:inline-block;margin:6px;
font-size:.85em;text-align:center;vertical-align:top;padding:3px;border:3px solid transparent}}
.cell img{{width:300px}} .cell.rv-confirmed{{border-color:#c00}} .cell.rv-rejected{{opacity:.45}}
.cell.rv-current{{outline:3px dashed #36c;outline-offset:2px}}
.review{{background:#eef4ff;padding:.5em;position:sticky;top:0;z-index:1;border-bottom:1px solid #99b}}
.warn{{background:#fff3cd;padding:.5em}}</style></head><body>
<h1>Session report</h1>
<p class="warn">Research use only, not a diagnosis: a trained microscopist must confirm every positive cell below.</p>
<p class="big">Parasitemia <b>{pct}</b> (95% interval {lo:.2f}–{hi:.2f}%) · {per_ul}
parasites/µL (interval {e['parasites_per_ul_ci95'][0]:,.0f}–{e['parasites_per_ul_ci95'][1]:,.0f}, assuming
{e['rbc_per_ul_assumed']:,.0f} red cells/µL)</p>
<p>{e['positive_count']} of {e['rbc_count']} red cells called parasitized (raw share {raw});
target {e['target_cells']} red cells: {target}. Fields counted {e['fields_counted']}, rejected {e['fields_rejected']},
failed {e['fields_failed']}. Median cell diameter {e['cell_diameter_px_median']} px.</p>
<p>The estimate corrects the raw share for the classifier's errors at the <b>{e['operating_point']}</b> operating point
(threshold {e['threshold']:.3f}; validation sensitivity {e['sensitivity_validation']}{kept}, specificity
{e['specificity_validation']}). The interval includes the sampling of cells and the uncertainty of those two rates;
it assumes this smear looks like the validation cells. Model {html.escape(e['model'])}{screen}. {html.escape(e['method'])}.</p>
{review}
<h2>Fields</h2><table><tr><th>field</th><th>status</th><th>reason</th><th>red cells</th><th>parasitized</th>
<th>cell px</th><th>focus</th><th title='share of its red cells that overlap a neighbour by over 5% of their area: the
classifier misses more parasites there, so a crowded field reads low'>overlapped</th><th title='regions not
counted as red cells; white cells and clumps are named on the overlay, to check that none is an infected cell'>left
out</th></tr>{rows}</table>
<h2>Positive cells ({len(gallery)}): crop and Grad-CAM of the Parasitized class</h2>{''.join(cards) or '<p>none</p>'}
<h2>Field overlays</h2><p>green: uninfected · red: parasitized (#cell, P) · grey: left out (cut by an edge,
white cell, platelets, debris, clumps; white cells and clumps are named: check that none is an enlarged infected cell,
as P. vivax and P. ovale make them)</p>{figs}
{script}</body></html>"""
    path = out / "report.html"
    atomic_write_text(path, doc)
    return path
