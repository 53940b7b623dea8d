"""Learnable synthetic datasets in the exact layouts of Derm7pt `release_v0/`, PH2 and the ISIC
challenges (for demos and tests: CI never needs real data).

Each criterion has its own visible rendering on the dermoscopy image; the diagnosis drives the
criteria with probabilities shaped like the real data's; the clinical photo shows the same
lesion smaller on skin; metadata carries a weak signal. A few real quirks are reproduced: a
case-mismatched image path and cases without a clinical photo (clinic == derm).
Same seed -> byte-identical files. The PH2 and ISIC sets draw the same lesions (dermoscopy
only), labelled the way those datasets label them; the PH2 spreadsheet has the real one's
quirks (title rows, a merged header cell, line breaks in header cells, legends below).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from ..schema import LEAKY_META_FIELDS, META_FIELDS, TASK_BY_NAME, TASKS, seven_point_score
from .derm7pt import COLUMNS, META_COLUMNS, RAW_VALUES

# P(diagnosis): roughly the real 1011 cases (BCC 42, NEV 575, MEL 252, MISC 97, SK 45).
DIAG_PRIOR = np.array([0.05, 0.55, 0.25, 0.10, 0.05])
# P(criterion class | diagnosis), rows BCC, NEV, MEL, MISC, SK; shaped like the real data
# (melanomas carry the atypical criteria, BCCs the vessels), not copied from it.
CRITERIA_GIVEN_DIAG: dict[str, np.ndarray] = {
    "PN": np.array([[.90, .05, .05], [.35, .50, .15], [.25, .20, .55], [.50, .40, .10], [.80, .15, .05]]),
    "BWV": np.array([[.80, .20], [.88, .12], [.55, .45], [.90, .10], [.90, .10]]),
    "VS": np.array([[.15, .75, .10], [.90, .08, .02], [.70, .12, .18], [.70, .20, .10], [.70, .25, .05]]),
    "PIG": np.array([[.80, .10, .10], [.60, .20, .20], [.30, .05, .65], [.50, .20, .30], [.60, .20, .20]]),
    "STR": np.array([[.95, .03, .02], [.70, .18, .12], [.40, .10, .50], [.80, .10, .10], [.90, .05, .05]]),
    "DaG": np.array([[.60, .10, .30], [.20, .45, .35], [.10, .20, .70], [.50, .25, .25], [.60, .20, .20]]),
    "RS": np.array([[.70, .30], [.85, .15], [.50, .50], [.80, .20], [.90, .10]]),
}
SPLIT_FRACTIONS = (0.41, 0.20, 0.39)  # official 413 / 203 / 395


def _meta_for(rng: np.random.Generator, diag: int) -> dict[str, str]:
    """Weakly informative metadata: BCC on head/neck and nodular, SK on trunk, MEL on back."""
    loc = list(META_FIELDS["location"])
    p_loc = np.ones(len(loc))
    boost = {0: "head neck", 2: "back", 4: "chest"}.get(diag)
    if boost:
        p_loc[loc.index(boost)] += 4
    p_elev = {0: [.1, .3, .6], 1: [.45, .45, .1], 2: [.5, .4, .1], 3: [.5, .4, .1], 4: [.2, .6, .2]}[diag]
    p_sex = [0.4, 0.6] if diag == 2 else [0.55, 0.45]
    return {
        "location": loc[rng.choice(len(loc), p=p_loc / p_loc.sum())],
        "elevation": META_FIELDS["elevation"][rng.choice(3, p=p_elev)],
        "sex": META_FIELDS["sex"][rng.choice(2, p=p_sex)],
        "management": "excision" if diag in (0, 2) else LEAKY_META_FIELDS["management"][rng.choice([0, 2])],
        "level_of_diagnostic_difficulty": LEAKY_META_FIELDS["level_of_diagnostic_difficulty"][rng.integers(3)],
    }


def _lesion_geometry(rng: np.random.Generator, w: int, h: int, irregular: bool):
    cx, cy = w / 2 + rng.normal(0, w * 0.03), h / 2 + rng.normal(0, h * 0.03)
    r = h * rng.uniform(0.26, 0.32)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 0.18 if irregular else 0.05
    radii = r * (1 + wobble * np.sin(3 * angles + rng.uniform(0, 6)) + 0.03 * rng.standard_normal(48))
    outline = [(cx + rr * math.cos(a), cy + 0.85 * rr * math.sin(a)) for a, rr in zip(angles, radii)]
    return cx, cy, r, outline


def render_dermoscopy(rng: np.random.Generator, targets: tuple[int, ...], w: int, h: int) -> Image.Image:
    """Draw one lesion whose criteria follow `targets` (DIAG, PN, BWV, VS, PIG, STR, DaG, RS)."""
    diag, pn, bwv, vs, pig, streaks, dag, rs = targets
    skin = np.array([224, 178, 150]) + rng.normal(0, 10, 3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in skin))
    d = ImageDraw.Draw(img)
    cx, cy, r, outline = _lesion_geometry(rng, w, h, irregular=diag == 2)
    base = np.array([150, 95, 60]) + rng.normal(0, 8, 3)
    if diag == 0:
        base = base + [20, 20, 30]  # BCCs: paler, pinkish
    d.polygon(outline, fill=tuple(int(v) for v in base))
    lw = max(1, round(h / 64))
    dark = (70, 40, 25)
    if pn:  # pigment network: a regular mesh, or a thick, broken, uneven one
        step = h / 14 if pn == 1 else h / 9
        for k in range(-8, 9):
            jit = 0 if pn == 1 else rng.uniform(-step / 3, step / 3)
            width = lw if pn == 1 else lw + 1 + int(rng.integers(0, 2))
            x = cx + k * step + jit
            if abs(x - cx) < r * 0.9:
                span = r * 0.8 * math.sqrt(max(0.0, 1 - ((x - cx) / r) ** 2))
                d.line([(x, cy - span), (x, cy + span)], fill=dark, width=width)
            y = cy + k * step + jit
            if abs(y - cy) < r * 0.75:
                span = r * 0.9 * math.sqrt(max(0.0, 1 - ((y - cy) / (0.85 * r)) ** 2))
                d.line([(cx - span, y), (cx + span, y)], fill=dark, width=width)
    if pig:  # regular: one dark centred disc; irregular: off-centre blotches of varied size
        if pig == 1:
            d.ellipse([cx - r * 0.45, cy - r * 0.4, cx + r * 0.45, cy + r * 0.4], fill=(85, 50, 30))
        else:
            for _ in range(int(rng.integers(2, 4))):
                a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.55) * r
                bx, by, br = cx + rr * math.cos(a), cy + rr * 0.8 * math.sin(a), r * rng.uniform(0.15, 0.3)
                d.ellipse([bx - br, by - br * 0.7, bx + br * 1.2, by + br], fill=(45, 25, 20))
    if rs:  # regression: white scar-like patches with grey-blue peppering
        a = rng.uniform(0, 2 * np.pi)
        bx, by, br = cx + 0.45 * r * math.cos(a), cy + 0.35 * r * math.sin(a), r * 0.3
        d.ellipse([bx - br, by - br, bx + br, by + br * 0.8], fill=(235, 230, 225))
        for _ in range(6):
            px, py = bx + rng.uniform(-br, br) * 0.7, by + rng.uniform(-br, br) * 0.6
            d.ellipse([px - lw, py - lw, px + lw, py + lw], fill=(120, 120, 140))
    if streaks:  # radial lines at the rim: all around (regular) or in one sector (irregular)
        n = 16 if streaks == 1 else int(rng.integers(5, 8))
        start = rng.uniform(0, 2 * np.pi)
        for k in range(n):
            a = start + (2 * np.pi * k / n if streaks == 1 else rng.uniform(0, 1.3))
            x0, y0 = cx + 0.9 * r * math.cos(a), cy + 0.77 * r * math.sin(a)
            length = 0.3 * r if streaks == 1 else rng.uniform(0.3, 0.5) * r
            x1, y1 = x0 + length * math.cos(a), y0 + length * 0.85 * math.sin(a)
            d.line([(x0, y0), (x1, y1)], fill=(40, 25, 20), width=lw + 1)
    if dag:  # dots/globules: an even ring of equal dots, or scattered dots of varied size
        if dag == 1:
            for k in range(10):
                a = 2 * np.pi * k / 10
                px, py, pr = cx + 0.55 * r * math.cos(a), cy + 0.45 * r * math.sin(a), lw * 1.8
                d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=(30, 20, 15))
        else:
            for _ in range(int(rng.integers(8, 14))):
                a, rr = rng.uniform(0, 2 * np.pi), r * rng.uniform(0.1, 1.0)
                px, py, pr = cx + rr * math.cos(a), cy + 0.8 * rr * math.sin(a), lw * rng.uniform(0.8, 3.2)
                d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=(30, 20, 15))
    if bwv:  # blue-whitish veil: a structureless blue-white blotch over the structures beneath
        a = rng.uniform(0, 2 * np.pi)
        bx, by, br = cx + 0.2 * r * math.cos(a), cy + 0.2 * r * math.sin(a), r * 0.5
        d.ellipse([bx - br, by - br * 0.8, bx + br, by + br * 0.8], fill=(105, 140, 210))
    if vs:  # vessels: branching red lines (regular types) or red dots / irregular lines
        red = (200, 40, 50)
        if vs == 1:
            for _ in range(3):
                x0, y0 = cx + rng.uniform(-0.5, 0.5) * r, cy + rng.uniform(-0.4, 0.4) * r
                a = rng.uniform(0, 2 * np.pi)
                x1, y1 = x0 + 0.5 * r * math.cos(a), y0 + 0.5 * r * math.sin(a)
                d.line([(x0, y0), (x1, y1)], fill=red, width=lw + 1)
                for s in (-0.6, 0.6):
                    d.line([(x1, y1), (x1 + 0.25 * r * math.cos(a + s), y1 + 0.25 * r * math.sin(a + s))],
                           fill=red, width=lw)
        else:
            for _ in range(14):
                px, py = cx + rng.uniform(-0.7, 0.7) * r, cy + rng.uniform(-0.6, 0.6) * r
                d.ellipse([px - lw * 1.2, py - lw * 1.2, px + lw * 1.2, py + lw * 1.2], fill=red)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 6, arr.shape)  # sensor noise
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)) > 1.25  # black scope border
    arr[vignette] = 5
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def render_clinical(rng: np.random.Generator, derm: Image.Image) -> Image.Image:
    """The same lesion seen from further away: smaller, softer, on a skin-toned field."""
    w, h = derm.size
    skin = np.array([214, 170, 140]) + rng.normal(0, 12, 3)
    field = np.ones((h, w, 3), np.float32) * skin
    field *= np.linspace(0.9, 1.08, w)[None, :, None]  # uneven lighting
    canvas = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    core = derm.crop((w // 2 - h // 2, 0, w // 2 + h // 2, h)).resize((h // 2, h // 2))
    mask = Image.new("L", core.size, 0)
    ImageDraw.Draw(mask).ellipse([4, 4, core.size[0] - 4, core.size[1] - 4], fill=255)
    pos = (w // 2 - core.size[0] // 2 + int(rng.integers(-w // 10, w // 10)),
           h // 2 - core.size[1] // 2 + int(rng.integers(-h // 10, h // 10)))
    canvas.paste(core, pos, mask.filter(ImageFilter.GaussianBlur(3)))
    return canvas.filter(ImageFilter.GaussianBlur(1.0))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_synthetic(out_dir: str | Path, cases: int = 200, size: int = 128, seed: int = 0,
                   clinic_missing: int = 3) -> Path:
    """Write a synthetic Derm7pt to `out_dir/release_v0` and return that folder.

    `size` is the image height; images are 3:2 like the real ones. Every class of every task
    appears in every split (rare classes are forced into the first cases of each split).
    """
    if cases < 30:
        raise ValueError(f"cases={cases}: need at least 30 so every class appears in every split")
    if size < 32:
        raise ValueError(f"size={size}: need at least 32 px")
    rng = np.random.default_rng(seed)
    root = Path(out_dir) / "release_v0"
    (root / "meta").mkdir(parents=True, exist_ok=True)
    w, h = size * 3 // 2, size

    order = rng.permutation(cases)
    n_train = round(cases * SPLIT_FRACTIONS[0])
    n_valid = round(cases * SPLIT_FRACTIONS[1])
    splits = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
              "test": order[n_train + n_valid:]}
    rank = np.empty(cases, dtype=np.int64)  # position of each case within its split
    for idx in splits.values():
        rank[idx] = np.arange(len(idx))
    missing_clinic = set(rng.choice(cases, size=min(clinic_missing, cases), replace=False).tolist())
    typo_case = int(order[0])  # one path with the wrong case, like the real row 816

    raw_groups = [RAW_VALUES[t.name] for t in TASKS]
    rows = []
    for i in range(cases):
        k = int(rank[i])
        diag = k if k < 5 else int(rng.choice(5, p=DIAG_PRIOR))
        targets = [diag]
        for t, task in enumerate(TASKS[1:], start=1):
            p = CRITERIA_GIVEN_DIAG[task.name][diag]
            forced = k - 5  # after the diagnosis cases, cycle every criterion through its classes
            cls = forced % task.num_classes if 0 <= forced < 3 else int(rng.choice(task.num_classes, p=p))
            targets.append(cls)
        targets_t = tuple(targets)
        meta = _meta_for(rng, diag)
        derm = render_dermoscopy(rng, targets_t, w, h)
        clinic = render_clinical(rng, derm)
        folder = f"S{chr(65 + (i // 100) % 26)}{chr(65 + (i // 10) % 10)}"
        derm_name, clinic_name = f"{folder}/S{i:04d}d.jpg", f"{folder}/S{i:04d}C.JPG"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "images" / derm_name).write_bytes(_jpeg(derm))
        notes = ""
        if i in missing_clinic:
            clinic_name, notes = derm_name, "Clinical missing and replaced with derm"
        else:
            (root / "images" / clinic_name).write_bytes(_jpeg(clinic))
        derm_ref = derm_name
        if i == typo_case:  # meta.csv spells the folder with the wrong case; the file is fine
            derm_ref = folder[0] + folder[1:].lower() + derm_name[len(folder):]
            if clinic_name == derm_name:
                clinic_name = derm_ref
        raw = {COLUMNS[task.name]: raw_groups[t][targets_t[t]][int(rng.integers(len(raw_groups[t][targets_t[t]])))]
               for t, task in enumerate(TASKS)}
        rows.append({
            "case_num": i + 1, **raw, "seven_point_score": int(seven_point_score(np.array(targets_t))),
            **meta, "clinic": clinic_name, "derm": derm_ref, "case_id": f"syn{i + 1:04d}", "notes": notes,
        })
    frame = pd.DataFrame(rows)[list(META_COLUMNS)]
    frame.to_csv(root / "meta" / "meta.csv", index=False, lineterminator="\n")
    for name, idx in splits.items():
        pd.DataFrame({"indexes": np.sort(idx)}).to_csv(
            root / "meta" / f"{name}_indexes.csv", index=False, lineterminator="\n")
    return root


def _draw_targets(rng: np.random.Generator, diag: int) -> tuple[int, ...]:
    """Criteria for a diagnosis, drawn like the Derm7pt synthetic cases."""
    crit = [int(rng.choice(t.num_classes, p=CRITERIA_GIVEN_DIAG[t.name][diag])) for t in TASKS[1:]]
    return (diag, *crit)


def make_synthetic_ph2(out_dir: str | Path, cases: int = 60, size: int = 96, seed: int = 0) -> Path:
    """Write a synthetic PH2 (`PH2Dataset/` with PH2_dataset.xlsx and BMP images) and return that folder.

    Nevi (common / atypical) and melanomas 2:2:1 like PH2; the rendered criteria follow the labels
    written (PN never absent, STR only absent / present), so a model trained on the synthetic
    Derm7pt scores above chance here.
    """
    import openpyxl
    from openpyxl.styles import Alignment

    if cases < 10:
        raise ValueError(f"cases={cases}: need at least 10")
    rng = np.random.default_rng(seed)
    root = Path(out_dir) / "PH2Dataset"
    images = root / "PH2 Dataset images"
    book = openpyxl.Workbook()
    ws = book.active
    ws.title = "Sheet1"
    ws["A2"] = "PH2 Dataset (synthetic copy written by sevenpoint synth --format ph2)"
    ws["A4"] = "Image classification into nevus, atypical nevus and melanoma; dermoscopic criteria."
    header_row = 12
    header = ["Image Name", "Histological\nDiagnosis", "Clinical Diagnosis", None, "Melanoma", "Asymmetry\n(0/1/2)",
              "Pigment Network\n(AT/T)", "Dots/Globules\n(A/AT/T)", "Streaks\n(A/P)", "Regression Areas\n(A/P)",
              "Blue-Whitish Veil\n(A/P)", "Colors", None, None, None, None, None]
    sub = [None, None, "Common\nNevus", "Atypical\nNevus", None, None, None, None, None, None, None,
           "White", "Red", "Light-Brown", "Dark-Brown", "Blue-Gray", "Black"]
    for col, (top, below) in enumerate(zip(header, sub), start=1):
        ws.cell(header_row, col, top).alignment = Alignment(wrap_text=True)
        ws.cell(header_row + 1, col, below)
    ws.merge_cells(start_row=header_row, start_column=3, end_row=header_row, end_column=4)
    ws.merge_cells(start_row=header_row, start_column=12, end_row=header_row, end_column=17)
    letters = {"PN": {1: "T", 2: "AT"}, "DaG": {0: "A", 1: "T", 2: "AT"}, "STR": {0: "A", 1: "P", 2: "P"},
               "RS": {0: "A", 1: "P"}, "BWV": {0: "A", 1: "P"}}
    order = rng.permutation(cases)
    row = header_row + 2
    for k, i in enumerate(order):
        kind = ("common", "atypical", "melanoma")[k % 3 if k < 3 else int(rng.choice(3, p=[.4, .4, .2]))]
        diag = 2 if kind == "melanoma" else 1
        targets = list(_draw_targets(rng, diag))
        if targets[1] == 0:  # PH2 has no absent pigment network
            targets[1] = 2 if diag == 2 else 1
        name = f"IMD{int(i) + 2:03d}"
        w, h = size * 4 // 3, size
        folder = images / name / f"{name}_Dermoscopic_Image"
        folder.mkdir(parents=True, exist_ok=True)
        render_dermoscopy(rng, tuple(targets), w, h).save(folder / f"{name}.bmp")
        (images / name / f"{name}_lesion").mkdir(exist_ok=True)
        Image.new("L", (w, h), 255).save(images / name / f"{name}_lesion" / f"{name}_lesion.bmp")
        values = [name, None, "X" if kind == "common" else None, "X" if kind == "atypical" else None,
                  "X" if kind == "melanoma" else None, int(rng.integers(3))]
        values += [letters[t][targets[TASKS.index(TASK_BY_NAME[t])]] for t in ("PN", "DaG", "STR", "RS", "BWV")]
        values += ["X" if rng.random() < 0.3 else None for _ in range(6)]
        for col, v in enumerate(values, start=1):
            ws.cell(row, col, v)
        row += 1
    row += 2
    for line in ("Legends for the Clinical Diagnosis", "0 - Common Nevus", "1 - Atypical Nevus", "2 - Melanoma",
                 "Legends for Dots/Globules, Streaks, Regression Areas and Blue-Whitish Veil", "A - Absent",
                 "AT - Atypical", "P - Present", "T - Typical"):
        ws.cell(row, 1, line)
        row += 1
    book.save(root / "PH2_dataset.xlsx")
    return root


ISIC_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "2017": ("image_id", ["melanoma", "seborrheic_keratosis"]),
    "2018": ("image", ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]),
    "2019": ("image", ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]),
}


def make_synthetic_isic(out_dir: str | Path, cases: int = 120, size: int = 96, seed: int = 0,
                        variant: str = "2017") -> Path:
    """Write a synthetic ISIC challenge folder (training + validation ground truth, JPEGs named by
    image id) in the CSV layout of `variant` (2017, 2018 or 2019) and return it.

    Diagnoses follow Derm7pt's prior (2017: melanoma / keratosis / neither); 2018-19 also get a few
    classes with no Derm7pt counterpart (AKIEC / AK, SCC, UNK), which the reader leaves out.
    """
    if variant not in ISIC_VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {', '.join(ISIC_VARIANTS)}")
    if cases < 20:
        raise ValueError(f"cases={cases}: need at least 20")
    rng = np.random.default_rng(seed)
    image_col, columns = ISIC_VARIANTS[variant]
    ours = {"melanoma": 2, "seborrheic_keratosis": 4, "MEL": 2, "NV": 1, "BCC": 0, "BKL": 4, "DF": 3, "VASC": 3}
    root = Path(out_dir) / f"isic{variant}"
    n_train = int(cases * 0.75)
    for split, ids in (("Training", range(n_train)), ("Validation", range(n_train, cases))):
        folder = root / f"ISIC-{variant}_{split}_Input"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in ids:
            diag = i % 5 if i < 5 else int(rng.choice(5, p=DIAG_PRIOR))
            image = f"ISIC_{i:07d}"
            if variant == "2017":
                labels = {"melanoma": float(diag == 2), "seborrheic_keratosis": float(diag == 4)}
                if diag in (0, 3):  # 2017 has only melanoma / keratosis / nevus
                    diag = 1
            else:
                extra = [c for c in columns if c not in ours]
                col = (extra[i % len(extra)] if rng.random() < 0.08 else
                       {2: "MEL", 1: "NV", 0: "BCC", 4: "BKL", 3: "DF" if rng.random() < .5 else "VASC"}[diag])
                labels = {c: float(c == col) for c in columns}
            img = render_dermoscopy(rng, _draw_targets(rng, diag), size * 4 // 3, size)
            (folder / f"{image}.jpg").write_bytes(_jpeg(img))
            rows.append({image_col: image, **labels})
        pd.DataFrame(rows)[[image_col, *columns]].to_csv(
            root / f"ISIC-{variant}_{split}_GroundTruth.csv", index=False, lineterminator="\n")
    return root
