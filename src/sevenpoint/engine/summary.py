"""Several `evaluate` outputs of one recipe (one per seed) summarised as mean ± sd with every seed's value:
accuracy per task, the 7-point rule, calibration before/after, prediction sets per task and class, the
melanoma referral point and the intervention curve (docs/RESULTS.md reports headline figures this way).

Every run must score the same cases: the same data format, split and number of cases; anything else is
refused naming the folder, because a mean over different test sets means nothing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..schema import PAPER_ORDER

SAME = ("format", "split", "cases")  # what makes two evaluations comparable


class SummaryError(ValueError):
    """Evaluations that cannot be summarised together; the message names the folder."""


def numeric_leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    """Every number in a metrics.json as {'a.b.c': value}; lists (confusion matrices, temperatures) and
    booleans are left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_leaves(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def load_metrics(folder: Path) -> dict:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (expected an `evaluate --out` folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{path}: not valid JSON ({exc})") from None


def summarize(folders: list[Path]) -> dict:
    """{'runs', 'format', 'split', 'cases', 'level', 'stats': {leaf: {'values', 'mean', 'sd'}}, 'partial'}.
    A leaf present in only some runs (a task without sets, an older evaluate) goes to 'partial', not 'stats'."""
    if not folders:
        raise SummaryError("no evaluation folders given")
    runs = [load_metrics(f) for f in folders]
    first = runs[0]
    for folder, m in zip(folders[1:], runs[1:]):
        for key in SAME:
            if m.get(key) != first.get(key):
                raise SummaryError(f"{folder}: {key} = {m.get(key)!r}, but {folders[0]} has {first.get(key)!r}; "
                                   "summarise evaluations of the same cases only")
    leaves = [numeric_leaves(m) for m in runs]
    common = [k for k in leaves[0] if all(k in other for other in leaves[1:])]
    stats = {}
    for key in common:
        values = [run[key] for run in leaves]
        stats[key] = {"values": values, "mean": statistics.fmean(values),
                      "sd": statistics.stdev(values) if len(values) > 1 else None}
    partial = sorted({k for run in leaves for k in run} - set(common))
    return {"runs": [str(f) for f in folders], "format": first.get("format"), "split": first.get("split"),
            "cases": first.get("cases"), "level": (first.get("sets") or {}).get("level"),
            "checkpoints": [m.get("checkpoint") for m in runs], "stats": stats, "partial": partial}


def _cell(stats: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± sd (v1 / v2 / v3)' in the given scale; '–' where the leaf is missing."""
    s = stats.get(key)
    if s is None:
        return "–"
    f = f"{{:.{digits}f}}"
    text = f.format(scale * s["mean"])
    if s["sd"] is not None:
        text += " ± " + f.format(scale * s["sd"])
        text += " (" + " / ".join(f.format(scale * v) for v in s["values"]) + ")"
    return text


def _table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *["| " + " | ".join(r) + " |" for r in rows], ""]


def summary_markdown(summary: dict) -> str:
    st = summary["stats"]
    n = len(summary["runs"])
    text = [f"# sevenpoint summary — {n} evaluation{'s' * (n > 1)} of {summary['format']} split "
            f"`{summary['split']}` ({summary['cases']} cases)", "",
            "Mean ± sample sd over the runs, then each run's value in the order given:", "",
            *[f"{i + 1}. `{r}`" for i, r in enumerate(summary["runs"])], "",
            "## Accuracy (%)", ""]
    tasks = [t for t in PAPER_ORDER if f"tasks.{t}.accuracy" in st]
    text += _table(("task", "accuracy"), [[t, _cell(st, f"tasks.{t}.accuracy")] for t in tasks]
                   + [["**AVG**", _cell(st, "average_accuracy")]])
    mel = [("sensitivity (%)", "melanoma.sensitivity", 100.0), ("specificity (%)", "melanoma.specificity", 100.0),
           ("AUC of the 7-point score", "melanoma.score_auc", 1.0),
           ("AUC of the diagnosis head's P(MEL)", "melanoma.diag_head_auc", 1.0)]
    text += ["## Melanoma: the 7-point rule (score ≥ 3) and the diagnosis head", ""]
    text += _table(("", "value"), [[name, _cell(st, key, scale, 2 if scale > 1 else 3)] for name, key, scale in mel
                                  if key in st])
    if "ece_mean" in st:
        text += ["## Calibration (mean over the tasks)", ""]
        text += _table(("", "as shown", "without temperatures"),
                       [["ECE", _cell(st, "ece_mean", 1, 3), _cell(st, "ece_uncalibrated.mean", 1, 3)],
                        ["NLL", _cell(st, "nll_mean", 1, 3), _cell(st, "nll_uncalibrated.mean", 1, 3)]])
    if "sets.mean_coverage" in st:
        level = summary["level"]
        text += [f"## Prediction sets at {100 * level:.0f} %" if level else "## Prediction sets", ""]
        rows = []
        for t in PAPER_ORDER:
            key = f"sets.tasks.{t}"
            if f"{key}.coverage" not in st:
                continue
            classes = sorted(k.rsplit(".", 1)[1] for k in st if k.startswith(f"{key}.coverage_by_class."))
            lowest = min(classes, key=lambda c: st[f"{key}.coverage_by_class.{c}"]["mean"], default=None)
            rows.append([t, _cell(st, f"{key}.coverage", 100, 1), _cell(st, f"{key}.mean_size", 1, 2),
                         _cell(st, f"{key}.single", 100, 1),
                         f"{lowest} {_cell(st, f'{key}.coverage_by_class.{lowest}', 100, 1)}" if lowest else "–"])
        rows.append(["**mean**", _cell(st, "sets.mean_coverage", 100, 1), _cell(st, "sets.mean_size", 1, 2), "", ""])
        text += _table(("task", "coverage (%)", "mean size", "single-class (%)", "lowest class coverage (%)"), rows)
        text += [f"Cases marked uncertain: {_cell(st, 'uncertain_share', 100, 1)} %.", ""]
    if "triage.threshold" in st:
        text += ["## Referral point on P(MEL) (chosen on held-out predictions)", ""]
        text += _table(("", "value"), [
            ["threshold", _cell(st, "triage.threshold", 1, 3)],
            ["target sensitivity (%)", _cell(st, "triage.sensitivity", 100, 0)],
            ["sensitivity here (%)", _cell(st, "triage.sensitivity_here", 100, 1)],
            ["specificity here (%)", _cell(st, "triage.specificity_here", 100, 1)],
            ["referred here (%)", _cell(st, "triage.referred_here", 100, 1)]])
    ks = sorted({int(k.split(".")[2]) for k in st if k.startswith("diagnosis_models.intervention.")})
    if ks:
        text += ["## Intervention curve: the stacked diagnosis with k criteria set to the truth", ""]
        rows = [["0", *[_cell(st, "diagnosis_models.stacked.diag_accuracy")] * 2]]
        rows += [[str(k), _cell(st, f"diagnosis_models.intervention.{k}.diag_accuracy"),
                  _cell(st, f"diagnosis_models.intervention_random.{k}.diag_accuracy")] for k in ks]
        text += _table(("k", "least sure first", "random order"), rows)
        text += [f"DIAG accuracy (%). The image model's own: "
                 f"{_cell(st, 'diagnosis_models.image_model.diag_accuracy')}.", ""]
    if summary["partial"]:
        text += [f"Not in every run, so not summarised: {len(summary['partial'])} figures "
                 f"(first: {', '.join(summary['partial'][:3])}).", ""]
    return "\n".join(text)


def write_summary(folders: list[Path], out: Path) -> dict:
    """summary.json (every common number: values, mean, sd) and summary.md in `out`."""
    summary = summarize(folders)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary
