"""Human-readable outputs: the paper-layout table (Markdown) beside published rows, and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from ..schema import PAPER_ORDER, TASKS

# Published averages over the 8 labels on the official test split (sources in docs/RESULTS.md). Per-label
# figures only where the papers give them (Kawahara 2018 as commonly cited).
PUBLISHED: dict[str, dict[str, float]] = {
    "Kawahara et al. 2018": {"BWV": 87.1, "DaG": 60.0, "PIG": 66.1, "PN": 70.9, "RS": 77.2, "STR": 74.2,
                             "VS": 79.7, "DIAG": 74.2, "AVG": 73.7},
    "FusionM4Net": {"AVG": 77.0},
    "TFormer": {"AVG": 77.99},
    "Wang et al. 2021 (CC)": {"AVG": 81.3},
    "Omeroglu et al. 2023": {"AVG": 83.04},
}
PAPER_ABLATIONS = {
    "modality": {"DIM": 79.72, "CIM": 70.57, "DCIHMM": 83.04},
    "attention": {"with soft attention": 83.04, "without soft attention": 79.68},
}


def mean_sd(values: list[float]) -> str:
    """'m' for one value, 'm ± sd' (sample sd) for several."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


SCREEN_MARGIN = 0.5  # points: about what two paired seeds resolve (docs/RESULTS.md §16)


def paired_verdict(values: dict[int, float], baseline: dict[int, float],
                   margin: float = SCREEN_MARGIN) -> dict:
    """Judge a lever against a baseline trained with the same seeds (validation accuracy in points, by seed):
    *promising* if the mean gain is >= `margin` and every seed gains, *rejected* if the mean change is
    <= -`margin`, otherwise *no measurable effect*. Seeds missing from `baseline` are an error."""
    missing = sorted(set(values) - set(baseline))
    if missing:
        raise ValueError(f"the baseline has no seed {', '.join(map(str, missing))}: "
                         f"it was trained with seeds {sorted(baseline)}")
    deltas = {s: values[s] - baseline[s] for s in sorted(values)}
    mean_delta = sum(deltas.values()) / len(deltas)
    if mean_delta >= margin and all(d > 0 for d in deltas.values()):
        verdict = "promising"
    elif mean_delta <= -margin:
        verdict = "rejected"
    else:
        verdict = "no measurable effect"
    return {"delta": deltas, "mean_delta": mean_delta, "verdict": verdict, "margin": margin}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(rows: dict[str, dict[str, float | None]]) -> str:
    cols = [*PAPER_ORDER, "AVG"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def metrics_row(metrics: dict) -> dict[str, float | None]:
    """Accuracy (%) per task and the average; None for a task the data does not annotate."""
    row = {name: _pct(metrics["tasks"][name]["accuracy"]) for name in PAPER_ORDER}
    row["AVG"] = _pct(metrics["average_accuracy"])
    return row


def write_report(path: Path, ours: dict[str, dict], baseline: dict[str, float], split: str) -> None:
    rows = {name: metrics_row(m) for name, m in ours.items()}
    first = next(iter(ours.values()))
    if baseline:
        rows[f"majority class ({first.get('majority_baseline_from') or 'train mode'})"] = \
            {k: _pct(v) for k, v in baseline.items()}
    mel = first["melanoma"]
    fmt = first.get("format", "derm7pt")
    text = [
        f"# sevenpoint evaluation — {fmt} split `{split}` ({first['cases']} cases)",
        "",
        "Accuracy (%) per task in the paper's column order"
        + (f"; not annotated in this data (–): {', '.join(first['not_annotated'])}; AVG over the other tasks."
           if first.get("not_annotated") else "."),
    ]
    presence = [name for name, t in first["tasks"].items() if "presence_confusion" in t]
    if presence:
        text.append(f"Scored as absent vs present (the data says only 'present'): {', '.join(presence)}.")
    if not baseline:
        text.append("No majority-class baseline: no training split to take it from (see `evaluate --help`).")
    text += ["", table(rows), ""]
    if fmt == "derm7pt":
        text += ["Published on the official Derm7pt test split (for reference; only comparable when this is the "
                 "real test split):", "", table(PUBLISHED), ""]
    text += [
        "## Melanoma decision",
        "",
        f"- rule: {mel['rule']}: accuracy {_fmt(_pct(mel['accuracy']))} %, sensitivity "
        f"{_fmt(_pct(mel['sensitivity']))} %, specificity {_fmt(_pct(mel['specificity']))} %",
        f"- DIAG head melanoma AUC: {_fmt(mel['diag_head_auc'])}; expected-score AUC: {_fmt(mel['score_auc'])}",
        "",
        "Plots: `confusion_matrices.png`, `roc_curves.png`, `reliability.png`. Per-case probabilities: "
        "`predictions.csv`.",
    ]
    text += trust_sections(first)
    branches = {b: m for b, m in first.get("branches", {}).items() if m["cases"]}
    if len(branches) > 1:  # one branch alone is the fused result
        text += ["", "## Each branch alone (before late fusion)", "",
                 table({f"{b} ({m['cases']} cases)": metrics_row(m) for b, m in branches.items()})]
    path.write_text("\n".join(text) + "\n")


def _task_grid():
    """One subplot per task (a grid of 4 columns, as many rows as the schema needs); spare axes hidden."""
    rows = -(-len(TASKS) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 4 * rows), squeeze=False)
    for ax in axes.flat[len(TASKS):]:
        ax.set_visible(False)
    return fig, axes


def plot_confusion(metrics: dict, path: Path) -> None:
    fig, axes = _task_grid()
    for ax, task in zip(axes.flat, TASKS):
        entry = metrics["tasks"][task.name]
        if "confusion_matrix" not in entry:
            ax.set_title(f"{task.name}  not annotated" if entry["accuracy"] is None else
                         f"{task.name}  acc {100 * entry['accuracy']:.1f}% (absent vs present)")
            ax.axis("off")
            continue
        cm = np.array(entry["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        ax.set_title(f"{task.name}  acc {100 * entry['accuracy']:.1f}%")
        ax.set_xticks(range(task.num_classes), task.classes)
        ax.set_yticks(range(task.num_classes), task.classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_roc(probs: list[np.ndarray], targets: np.ndarray, path: Path) -> None:
    fig, axes = _task_grid()
    for t, (ax, task) in enumerate(zip(axes.flat, TASKS)):
        exact = targets[:, t] >= 0  # exactly labelled cases only
        for c, name in enumerate(task.classes):
            pos = targets[exact, t] == c
            if 0 < pos.sum() < len(pos):
                fpr, tpr, _ = roc_curve(pos, probs[t][exact, c])
                ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(task.name)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ci(pair) -> str:
    return "" if not pair else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def trust_sections(m: dict) -> list[str]:
    """Markdown: intervals, calibration, prediction sets, diagnosis models and the breakdown (what is there)."""
    text = []
    iv = m.get("intervals")
    if iv:
        text += ["", f"## 95 % bootstrap intervals ({iv['resamples']} resamples of the cases)", "",
                 "| figure | value (%, AUC as a fraction) | 95 % interval |", "|---|---:|---|"]
        text.append(f"| average accuracy | {_fmt(_pct(m['average_accuracy']))} |{_ci(iv['average_accuracy'])} |")
        for name in PAPER_ORDER:
            if iv["tasks"].get(name):
                text.append(f"| {name} accuracy | {_fmt(_pct(m['tasks'][name]['accuracy']))} |{_ci(iv['tasks'][name])} |")
        mel, ivm = m["melanoma"], iv.get("melanoma_rule") or {}
        for key, label in (("accuracy", "7-point rule accuracy"), ("sensitivity", "7-point rule sensitivity"),
                           ("specificity", "7-point rule specificity"), ("diag_head_auc", "melanoma AUC (DIAG)"),
                           ("score_auc", "melanoma AUC (expected score)")):
            if ivm.get(key):
                auc = key.endswith("auc")
                value = _fmt(mel[key]) if auc else _fmt(_pct(mel[key]))
                span = f" [{ivm[key][0]:.2f}, {ivm[key][1]:.2f}]" if auc else _ci(ivm[key])
                text.append(f"| {label} | {value} |{span} |")
    eces = {t.name: m["tasks"][t.name].get("ece") for t in TASKS}
    if any(v is not None for v in eces.values()):
        temps = m.get("temperature")
        text += ["", "## Calibration", "",
                 ("Temperatures applied" + (" to each member before averaging" if m.get("temperature_on") == "members"
                                           else "") + ": " + ", ".join(f"{t.name} {v:.2f}" for t, v in zip(TASKS, temps))
                  if temps else "No temperatures in this checkpoint: raw probabilities."),
                 ""]
        raw = (m.get("ece_uncalibrated") or {}).get("tasks")
        if raw:
            nlls = {t.name: m["tasks"][t.name].get("nll") for t in TASKS}
            raw_nll = (m.get("nll_uncalibrated") or {}).get("tasks") or {}
            text += ["| task | ECE | ECE of the raw probabilities | NLL | NLL of the raw probabilities |",
                     "|---|---:|---:|---:|---:|"]
            text += [f"| {k} | {v:.3f} | {_fmt(raw.get(k), 3)} | {_fmt(nlls[k], 3)} | {_fmt(raw_nll.get(k), 3)} |"
                     for k, v in eces.items() if v is not None]
            text.append(f"| mean | {m['ece_mean']:.3f} | {m['ece_uncalibrated']['mean']:.3f} | "
                        f"{_fmt(m.get('nll_mean'), 3)} | {_fmt((m.get('nll_uncalibrated') or {}).get('mean'), 3)} |")
        else:
            text += ["| task | ECE |", "|---|---:|"]
            text += [f"| {k} | {v:.3f} |" for k, v in eces.items() if v is not None]
            text.append(f"| mean | {m['ece_mean']:.3f} |" if m.get("ece_mean") is not None else "")
        text.append("Reliability diagrams: `reliability.png`.")
    sets = m.get("sets")
    if sets:
        text += ["", f"## Prediction sets at {sets['level']:.0%} (measured on this split)", "",
                 "| task | cases | coverage % | mean size | single class % |", "|---|---:|---:|---:|---:|"]
        for name, v in sets["tasks"].items():
            if v:
                text.append(f"| {name} | {v['cases']} | {100 * v['coverage']:.1f} | {v['mean_size']:.2f} | "
                            f"{100 * v['single']:.1f} |")
        text += ["", "Coverage per true class (%): " + "; ".join(
            f"{name} " + ", ".join(f"{c} {100 * x:.0f}" for c, x in v["coverage_by_class"].items())
            for name, v in sets["tasks"].items() if v) + "."]
    elif "lacks" in m:
        text += ["", "No prediction sets: " + "; ".join(m["lacks"]) + "."]
    tr = m.get("triage")
    if tr:
        text += ["", f"## Melanoma referral at the {tr['sensitivity']:.0%}-sensitivity point (P(MEL) ≥ "
                 f"{tr['threshold']:.3f})", "",
                 "| | sensitivity % | specificity % | referred % |", "|---|---:|---:|---:|",
                 f"| held out (where it was chosen) | {_fmt(_pct(tr['held_out_sensitivity']))} | "
                 f"{_fmt(_pct(tr['held_out_specificity']))} | – |",
                 f"| this split | {_fmt(_pct(tr['sensitivity_here']))} | {_fmt(_pct(tr['specificity_here']))} | "
                 f"{_fmt(_pct(tr['referred_here']))} |"]
    dm = m.get("diagnosis_models")
    if dm:
        text += ["", f"## Diagnosis: image model vs stacked (default here: {dm['default']})", "",
                 "| diagnosis from | DIAG accuracy % | melanoma AUC | 7-point rule accuracy % |", "|---|---:|---:|---:|"]
        rows = [("image model", dm["image_model"]), ("stacked, predicted criteria", dm["stacked"])]
        rows += [(f"stacked, {k} least sure criteria set to the truth", v) for k, v in dm["intervention"].items()]
        rows += [(f"stacked, {k} random criteria set to the truth (control)", v)
                 for k, v in dm.get("intervention_random", {}).items()]
        for label, v in rows:
            text.append(f"| {label} | {_fmt(_pct(v['diag_accuracy']))} | {_fmt(v['melanoma_auc'])} | "
                        f"{_fmt(_pct(v['rule_accuracy']))} |")
        effects = dm.get("correction_effects")
        if effects:
            text += ["", "What a correction does to the stacked model's P(MEL): the mean change, in points, when a "
                     "criterion is set to a value instead of ABS (the checklist's melanoma signs should be positive).",
                     "", "| criterion | value | mean change in P(MEL) |", "|---|---|---:|"]
            text += [f"| {name} | {value} | {100 * d:+.1f} |" for name, values in effects.items()
                     for value, d in values.items()]
    bd = m.get("breakdown")
    if bd:
        text += ["", "## Where it fails: accuracy by kind of case", "",
                 "| field | value | cases | average accuracy % | DIAG accuracy % |", "|---|---|---:|---:|---:|"]
        for field_name, groups in bd.items():
            for value, g in groups.items():
                mark = " (small)" if g["small"] else ""
                text.append(f"| {field_name} | {value}{mark} | {g['cases']} | {_fmt(_pct(g['average_accuracy']))} | "
                            f"{_fmt(_pct(g['diag_accuracy']))} |")
        text.append("(small): fewer than 20 cases; one case moves its accuracy by more than 5 points.")
    return text


def plot_reliability(probs: list[np.ndarray], targets: np.ndarray, path: Path, bins: int = 10) -> None:
    """Per task: accuracy against top-label confidence in equal-width bins (the diagonal is perfect
    calibration), with the number of cases per bin."""
    fig, axes = _task_grid()
    edges = np.linspace(0, 1, bins + 1)
    for t, (ax, task) in enumerate(zip(axes.flat, TASKS)):
        exact = targets[:, t] >= 0
        if not exact.any():
            ax.set_title(f"{task.name}  not annotated")
            ax.axis("off")
            continue
        conf = probs[t][exact].max(axis=1)
        hit = probs[t][exact].argmax(axis=1) == targets[exact, t]
        which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
        centres = (edges[:-1] + edges[1:]) / 2
        for b in range(bins):
            inside = which == b
            if inside.any():
                ax.bar(centres[b], hit[inside].mean(), width=1 / bins, color="tab:blue", edgecolor="white")
                ax.text(centres[b], 0.02, str(int(inside.sum())), ha="center", fontsize=7, color="white")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task.name}  mean conf {conf.mean():.2f}, acc {hit.mean():.2f}")
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
