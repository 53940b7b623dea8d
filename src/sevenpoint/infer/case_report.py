"""One printable page per case: `predict --report case.html` and the page's "Print / save report".

A self-contained HTML file (images embedded as data URLs, no script, no external resource), laid out
for A4 so the browser's Print -> Save as PDF gives the PDF: the inputs, each criterion with its
probability and prediction set (the clinician's corrections marked), the 7-point score and rule, the
diagnosis and how sure the model is (an "uncertain" banner with its reason: a diagnosis set of more than one
class, or below 50 % for a model without sets), the attention overlays, the out-of-distribution warning, the model (name, members, commit,
recipe command, what it was fitted on, its measured test figures when given) and the caveat.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from .predict import Prediction, _image_array
from ..schema import MELANOMA_THRESHOLD, PAPER_ORDER, TASK_BY_NAME, score_rule
from .viz import jpeg_data_url, overlay_attention

CAVEAT = ("Research tool, not a medical device. These outputs are a model's estimate from images and metadata; "
          "they must not be used on their own for diagnosis or treatment decisions.")
_CSS = """
body { font-family: system-ui, sans-serif; color: #1d2433; margin: 24px; }
h1 { font-size: 1.3rem; margin: 0 0 4px; } h2 { font-size: 1.05rem; margin: 18px 0 6px; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; }
td, th { border-bottom: 1px solid #e6e8ec; padding: 3px 6px; text-align: left; vertical-align: top; }
.caveat { background: #fff4d6; border: 1px solid #e0b84c; padding: 6px 10px; border-radius: 4px; font-size: .85rem; }
.uncertain { background: #fdecea; border: 2px solid #b3261e; padding: 6px 10px; border-radius: 4px; font-weight: 600; }
.confident { border: 2px solid #2e7d32; padding: 6px 10px; border-radius: 4px; }
.ood { color: #b3261e; font-weight: 600; }
.fixed { color: #6a1b9a; font-weight: 600; }
.imgs img { width: 220px; margin: 4px; border-radius: 4px; }
.imgs figure { display: inline-block; margin: 0 6px 6px 0; font-size: .75rem; text-align: center; }
.muted { color: #667; font-size: .8rem; }
@page { size: A4; margin: 14mm; }
@media print { body { margin: 0; } .imgs img { width: 170px; } }
"""


class ReportError(ValueError):
    """A --figures file that is not an `evaluate` metrics.json (the message names it)."""


def _e(value) -> str:
    return html.escape(str(value))


def _thumb(img: Image.Image, size: int = 480) -> Image.Image:
    img = img.convert("RGB").copy()
    img.thumbnail((size, size))
    return img


def _figures_block(figures: Mapping | None) -> str:
    if not figures:
        return ("<p class='muted'>No measured test figures were given for this model (pass "
                "<code>--figures EVAL/metrics.json</code> from <code>sevenpoint evaluate</code>).</p>")
    rows = []
    avg = figures.get("average_accuracy")
    iv = (figures.get("intervals") or {}).get("average_accuracy")
    span = f" (95 % interval {100 * iv[0]:.1f}-{100 * iv[1]:.1f})" if iv else ""
    if avg is not None:
        rows.append(f"<tr><th>average accuracy, 8 tasks</th><td>{100 * avg:.1f} %{span}</td></tr>")
    for name in PAPER_ORDER:
        acc = (figures.get("tasks") or {}).get(name, {}).get("accuracy")
        if acc is not None:
            rows.append(f"<tr><th>{_e(name)}</th><td>{100 * acc:.1f} %</td></tr>")
    mel = figures.get("melanoma") or {}
    if mel.get("sensitivity") is not None:
        rows.append(f"<tr><th>7-point rule (&ge; {MELANOMA_THRESHOLD})</th><td>sensitivity {100 * mel['sensitivity']:.1f} %, "
                    f"specificity {100 * mel['specificity']:.1f} %</td></tr>")
    if mel.get("diag_head_auc") is not None:
        rows.append(f"<tr><th>melanoma AUC</th><td>{mel['diag_head_auc']:.3f}</td></tr>")
    sets = figures.get("sets")
    if sets and sets.get("mean_coverage") is not None:
        rows.append(f"<tr><th>prediction sets at {sets['level']:.0%}</th><td>measured coverage "
                    f"{100 * sets['mean_coverage']:.1f} % (mean over tasks), mean size {sets['mean_size']:.2f}</td></tr>")
    where = f"{figures.get('format', '')} split {figures.get('split', '?')}, {figures.get('cases', '?')} cases"
    return f"<p class='muted'>Measured on {_e(where)}:</p><table>{''.join(rows)}</table>"


def render_report(result: Prediction, images: Mapping[str, object], meta: Mapping[str, object] | None,
                  model_info: Mapping, provenance: Mapping | None = None, figures: Mapping | None = None,
                  case_id: str | None = None) -> str:
    """The report as one HTML string. `images`: the inputs as given (paths, bytes, arrays or PIL images);
    `model_info`: `Predictor.info`; `provenance`: what the checkpoint says about its training; `figures`:
    an `evaluate` metrics.json of this model (optional)."""
    given = {k: _image_array(v, k) for k, v in images.items() if v is not None}
    inputs = "".join(f"<figure><img src='{jpeg_data_url(_thumb(img))}' alt='{_e(k)} input'><figcaption>{_e(k)}"
                     "</figcaption></figure>" for k, img in given.items())
    overlays = []
    for key, amap in result.attention.items():
        source = given.get(key.split(".")[0]) or given.get("derm")
        if source is not None:
            overlays.append(f"<figure><img src='{jpeg_data_url(overlay_attention(_thumb(source, 320), amap))}' "
                            f"alt='attention {_e(key)}'><figcaption>{_e(key)}</figcaption></figure>")
    meta_text = ", ".join(f"{k}: {v}" for k, v in (meta or {}).items() if v) or "none given"
    rows = []
    for name, task in result.tasks.items():
        fixed = name in result.corrections
        who = "<span class='fixed'>clinician</span>" if fixed else "model"
        plausible = " or ".join(result.sets[name]) if result.sets is not None else "–"
        rows.append(f"<tr><th>{_e(name)}</th><td>{_e(TASK_BY_NAME[name].title)}</td><td>{_e(task.predicted)} "
                    f"({_e(task.predicted_name)})</td><td>{100 * task.probabilities[task.predicted]:.1f} %</td>"
                    f"<td>{_e(plausible)}</td><td>{who}</td></tr>")
    level = f"{result.set_level:.0%}" if result.set_level else ""
    if result.uncertain:
        verdict = (f"<p class='uncertain' id='verdict'>Uncertain: {_e(result.uncertain_why)}. Most probable: "
                   f"{_e(result.diagnosis)} ({_e(result.diagnosis_name)}, "
                   f"{100 * result.tasks['DIAG'].probabilities[result.diagnosis]:.0f} %).</p>")
    elif result.sets is None:
        verdict = (f"<p class='confident' id='verdict'>Diagnosis: {_e(result.diagnosis)} ({_e(result.diagnosis_name)}, "
                   f"{100 * result.tasks['DIAG'].probabilities[result.diagnosis]:.0f} %) "
                   "<span class='muted'>(this model carries no prediction sets; an answer below 50 % would be marked "
                   "uncertain)</span></p>")
    else:
        verdict = (f"<p class='confident' id='verdict'>Diagnosis: {_e(result.diagnosis)} ({_e(result.diagnosis_name)}); "
                   f"the only diagnosis in its {level} prediction set.</p>")
    ood = ("<p class='ood'>Warning: the dermoscopy image looks unlike the training images (out-of-distribution score "
           f"{result.ood_score:.1f} &gt; {result.ood_threshold:.1f}); treat this result with extra caution.</p>"
           if result.ood_warning else "")
    triage = (f"<p class='{'uncertain' if result.refer else 'confident'}' id='triage'>Melanoma triage: "
              f"{_e(result.triage_text())}.</p>" if result.triage is not None else
              "<p class='muted' id='triage'>This model carries no melanoma referral point.</p>")
    fixes = ", ".join(f"{k} = {v}" for k, v in result.corrections.items()) or "none"
    prov = provenance or {}
    model_rows = [("model", f"{model_info.get('variant')} / {model_info.get('backbone')}, "
                            f"{model_info.get('members')} member(s), {model_info.get('image_size')} px"),
                  ("sevenpoint", prov.get("version") or "unknown"), ("commit", prov.get("git_commit") or "unknown"),
                  ("recipe", " ".join(prov.get("command") or []) or "unknown"),
                  ("probabilities", result.calibration or "not calibrated"),
                  ("diagnosis from", result.diagnosis_source)]
    if model_info.get("lacks"):
        model_rows.append(("lacks", "; ".join(model_info["lacks"])))
    model_table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in model_rows)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sevenpoint case report{(' - ' + _e(case_id)) if case_id else ''}</title>
<style>{_CSS}</style></head><body>
<h1>sevenpoint case report{(' - ' + _e(case_id)) if case_id else ''}</h1>
<p class="muted">Written {when}.</p>
<p class="caveat" id="caveat">{_e(CAVEAT)}</p>
<h2>Inputs</h2><div class="imgs">{inputs}</div><p>Metadata: {_e(meta_text)}</p>
<h2>Result</h2>{verdict}{triage}{ood}
<p>7-point score: <strong id="score">{result.seven_point_score}</strong> &rarr;
{'suspicious for melanoma' if result.melanoma_flag else 'below the melanoma threshold'} (rule: {_e(score_rule())}).
Melanoma probability: {100 * result.melanoma_probability:.1f} %.</p>
<p>Corrections made by the clinician: <span id="corrections">{_e(fixes)}</span>.</p>
<table id="criteria"><thead><tr><th>task</th><th></th><th>value</th><th>probability</th><th>{level} prediction set</th>
<th>from</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Where the model looked</h2><div class="imgs">{''.join(overlays) or "<p class='muted'>no attention maps</p>"}</div>
<h2>Model</h2><table>{model_table}</table>
{_figures_block(figures)}
<p class="caveat">{_e(CAVEAT)}</p>
</body></html>
"""


def write_report(path: str | os.PathLike, *args, **kwargs) -> Path:
    """`render_report` written to `path` atomically."""
    from ..atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(render_report(*args, **kwargs), encoding="utf-8")
    return path


def read_figures(path: str | os.PathLike | None) -> dict | None:
    """An `evaluate` metrics.json, or None; a file that is not one is a clear error."""
    if path is None:
        return None
    try:
        figures = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not a readable evaluate metrics.json ({exc})") from None
    if not isinstance(figures, dict) or "average_accuracy" not in figures:
        raise ReportError(f"{path}: not an evaluate metrics.json (no average_accuracy)")
    return figures
