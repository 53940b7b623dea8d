"""Score an archive: `sevenpoint predict --batch cases.csv|folder/ --out results.csv`.

Every row is predicted or gets its own error (file, row, reason); one bad image never costs the
others. Results go to a journal as they come (one JSON line per row, flushed after every batch), so
memory stays flat and a killed run resumes where it stopped: rerunning the same command predicts
only the rows the journal lacks. When every row is in, the journal is merged in input order into
the outputs (CSV, JSON list or JSON lines, by suffix), each written atomically, and removed.

`devices=N` starts N processes (a `concurrent.futures` pool, spawned: N CPU processes sharing the
cores, or one per GPU), each building its own predictor and streaming its share of the rows (row i
goes to process i mod N) into its own journal shard; with one device the rows run in this process.

Input: a CSV (comma, semicolon or tab separated; UTF-8 with or without BOM, UTF-16 with a BOM;
CRLF or LF) with a `derm` and/or `clinic` column (paths relative to the CSV's folder, or absolute)
and optional `sex`, `location`, `elevation` and a case id column (`case_id`, `id` or `case_num`);
or a folder of dermoscopy images (file names as case ids).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..schema import META_FIELDS, TASKS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ID_COLUMNS = ("case_id", "id", "case_num")
OUTPUT_SUFFIXES = (".csv", ".json", ".jsonl")
JOURNAL_VERSION = 1
# `predict --batch` exit status when the run finished but some rows failed (0: all predicted; 2: the
# command itself could not run, e.g. an unreadable CSV or checkpoint).
EXIT_ROWS_FAILED = 3


class BatchInputError(ValueError):
    """The batch input or output as a whole cannot be used; the message names the file (and row)."""


@dataclass(frozen=True)
class Case:
    row: int  # 1-based position among the input's cases (the CSV header is not a row)
    case_id: str
    derm: str | None
    clinic: str | None
    meta: dict[str, str | None]
    error: str | None = None  # a row the reader could already tell is unusable


# ---------------------------------------------------------------- reading the input

def _encoding(head: bytes) -> tuple[str, int]:
    """(codec, BOM length) from the first bytes: a BOM decides; else UTF-16 by its NUL pattern; else UTF-8."""
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                       (codecs.BOM_UTF16_BE, "utf-16-be")):
        if head.startswith(bom):
            return codec, len(bom)
    if len(head) >= 4 and head.count(0) >= len(head) // 3:  # ASCII text in UTF-16 without a BOM
        return ("utf-16-le" if head[1::2].count(0) > head[0::2].count(0) else "utf-16-be"), 0
    return "utf-8", 0


class CaseSource:
    """The cases of a CSV file or an image folder, read lazily (the file is streamed, never held)."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.path = Path(source)
        if not self.path.exists():
            raise BatchInputError(f"{self.path}: no such file or folder")
        self.is_folder = self.path.is_dir()
        self.skipped = 0  # folder entries that are not images (by suffix)
        if not self.is_folder:
            with open(self.path, "rb") as f:
                self.codec, self.bom = _encoding(f.read(4096))
            self._check_text()
            self.header, self.delimiter = self._header()
        self.count = sum(1 for _ in self)  # one streaming pass: every row checked before any is predicted

    def _text(self):
        f = open(self.path, "rb")
        f.seek(self.bom)
        return io.TextIOWrapper(f, encoding=self.codec, errors="strict", newline="")

    def _check_text(self) -> None:
        """Decode the whole file once, a block at a time, so a bad byte is named by its line and offset."""
        decoder = codecs.getincrementaldecoder(self.codec)("strict")
        newline = "\n".encode(self.codec)
        lines, offset = 1, self.bom
        with open(self.path, "rb") as f:
            f.seek(self.bom)
            for block in iter(lambda: f.read(1 << 16), b""):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    at = max(0, exc.start - len(exc.object) + len(block))  # the decoder may hold a few bytes back
                    lines += block[:at].count(newline)
                    raise BatchInputError(f"{self.path} line {lines}: not {self.codec} text (byte offset "
                                          f"{offset + at}: {exc.reason}); save it as UTF-8 or UTF-16 CSV") from None
                lines += block.count(newline)
                offset += len(block)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                raise BatchInputError(f"{self.path} line {lines}: ends inside a {self.codec} character "
                                      f"({exc.reason})") from None

    def _header(self) -> tuple[list[str], str]:
        with self._text() as text:
            first = text.readline()
        delimiter = max(",\t;", key=first.count) if any(c in first for c in ",\t;") else ","
        header = [h.strip().lower() for h in next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter), [])]
        if "derm" not in header and "clinic" not in header:
            raise BatchInputError(f"{self.path}: the header needs a 'derm' and/or 'clinic' column "
                                  f"(found {', '.join(repr(h) for h in header[:8]) or 'nothing'})")
        return header, delimiter

    def fingerprint(self) -> str:
        """What a resumed run must find unchanged: the CSV's bytes, or the folder's image listing."""
        h = hashlib.sha256()
        if self.is_folder:
            for p in self._images():
                st = p.stat()
                h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        else:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def _images(self) -> list[Path]:
        entries = sorted(self.path.iterdir(), key=lambda p: p.name)
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        self.skipped = len(entries) - len(images)
        return images

    def __iter__(self) -> Iterator[Case]:
        if self.is_folder:
            for row, p in enumerate(self._images(), 1):
                yield Case(row, p.name, str(p), None, dict.fromkeys(META_FIELDS))
            return
        yield from self._csv_cases()

    def _csv_cases(self) -> Iterator[Case]:
        base = self.path.parent
        id_col = next((c for c in ID_COLUMNS if c in self.header), None)
        row = 0
        with self._text() as text:
            reader = csv.reader(text, delimiter=self.delimiter)
            try:
                next(reader, None)  # the header
                for fields in reader:
                    if not any(f.strip() for f in fields):
                        continue  # blank line
                    row += 1
                    rec = dict(zip(self.header, (f.strip() for f in fields)))
                    error = (f"{len(fields)} fields, the header has {len(self.header)}"
                             if len(fields) > len(self.header) else None)

                    def path(key: str) -> str | None:
                        value = rec.get(key) or ""
                        return str(base / value) if value else None  # base / absolute = absolute

                    yield Case(row, (rec.get(id_col) if id_col else "") or str(row), path("derm"), path("clinic"),
                               {k: rec.get(k) or None for k in META_FIELDS}, error)
            except UnicodeDecodeError as exc:  # only if the file changed since _check_text
                raise BatchInputError(f"{self.path} row {row + 1}: not {self.codec} text ({exc.reason})") from None
            except csv.Error as exc:
                raise BatchInputError(f"{self.path} row {row + 1} (line {reader.line_num}): {exc}") from None


# ---------------------------------------------------------------- the journal

class Journal:
    """`OUT.parts/`: header.json (what this run is) and one append-only JSON-lines shard per process."""

    def __init__(self, folder: Path, header: dict) -> None:
        self.folder = folder
        self.header = header

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal for this run: a second command on the same output is refused, not interleaved."""
        import fcntl

        with open(self.folder / "lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise BatchInputError(f"{self.folder}: another run is writing this output now") from None
            yield

    @classmethod
    def open(cls, folder: Path, header: dict, restart: bool = False) -> Journal:
        if restart and folder.exists():
            shutil.rmtree(folder)
        head = folder / "header.json"
        if head.exists():
            try:
                old = json.loads(head.read_text())
            except (OSError, ValueError) as exc:
                raise BatchInputError(f"{head}: unreadable journal header ({exc}); pass --restart") from None
            diff = [k for k in sorted(set(old) | set(header)) if old.get(k) != header.get(k)]
            if diff:
                raise BatchInputError(f"{folder}: holds a run with other {', '.join(diff)}; pass --restart to "
                                      "discard it, or another --out")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(head) as tmp:
                tmp.write_text(json.dumps(header, indent=2))
        return cls(folder, header)

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("rank*.jsonl"))

    def done(self, total: int) -> np.ndarray:
        """Which rows (index row - 1) are in the journal; a line cut by a kill is dropped from its shard."""
        seen = np.zeros(total, dtype=bool)
        for shard in self.shards():
            good = 0
            with open(shard, "rb") as f:
                for line in f:
                    try:
                        row = json.loads(line)["row"] if line.endswith(b"\n") else None
                    except (ValueError, KeyError, TypeError):
                        row = None
                    if not isinstance(row, int) or not 1 <= row <= total:
                        break
                    seen[row - 1] = True
                    good += len(line)
            if good < shard.stat().st_size:
                with open(shard, "rb+") as f:
                    f.truncate(good)
        return seen

    def append(self, rank: int, records: Sequence[dict]) -> None:
        data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
        with open(self.folder / f"rank{rank}.jsonl", "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> Iterator[dict]:
        """Every row once, in input order (an index of (row, shard, offset) is sorted; records are read one by one)."""
        index: list[tuple[int, int, int]] = []
        shards = self.shards()
        for s, shard in enumerate(shards):
            offset = 0
            with open(shard, "rb") as f:
                for line in f:
                    index.append((json.loads(line)["row"], s, offset))
                    offset += len(line)
        index.sort()
        files = [open(p, "rb") for p in shards]
        try:
            last = None
            for row, s, offset in index:
                if row == last:
                    continue  # written twice (a process killed between its write and the next run's scan)
                last = row
                files[s].seek(offset)
                yield json.loads(files[s].readline())
        finally:
            for f in files:
                f.close()


# ---------------------------------------------------------------- outputs

def csv_columns() -> list[str]:
    cols = ["row", "case_id", "status", "error", "derm", "clinic", *META_FIELDS,
            "diagnosis", "diagnosis_name", "melanoma_probability", "seven_point_score", "seven_point_rule"]
    for task in TASKS:
        cols += [task.name, *(f"{task.name}_p_{c}" for c in task.classes), f"{task.name}_set"]
    return cols + ["ood_score", "ood_threshold", "ood_warning", "branches_used", "calibrated", "uncertain", "refer",
                   "tta"]


def csv_row(rec: dict) -> dict:
    out = {"row": rec["row"], "case_id": rec["case_id"], "status": "error" if rec.get("error") else "ok",
           "error": rec.get("error") or "", **rec["inputs"]}
    p = rec.get("prediction")
    if p is None:
        return out
    out |= {"diagnosis": p["diagnosis"], "diagnosis_name": p["diagnosis_name"],
            "melanoma_probability": p["melanoma_probability"], "seven_point_score": p["seven_point_score"],
            "seven_point_rule": "melanoma" if p["melanoma_flag"] else "benign",
            "ood_score": p["ood_score"], "ood_threshold": p["ood_threshold"], "ood_warning": p["ood_warning"],
            "branches_used": "+".join(p["branches_used"]), "calibrated": rec.get("calibrated"), "tta": rec.get("tta")}
    sets = p.get("sets")  # conformal sets, where the checkpoint carries them
    for name, task in p["tasks"].items():
        out[name] = task["predicted"]
        out |= {f"{name}_p_{c}": v for c, v in task["probabilities"].items()}
        if sets is not None:
            out[f"{name}_set"] = "|".join(sets[name])
    out["uncertain"] = p.get("uncertain")
    out["refer"] = p.get("refer")  # the melanoma referral point's decision, where the checkpoint carries one
    return out


def json_record(rec: dict) -> dict:
    """The JSON list's entry: the single-case JSON of `predict` plus row, case_id, inputs and error."""
    return {"row": rec["row"], "case_id": rec["case_id"], "inputs": rec["inputs"], "error": rec.get("error"),
            **(rec.get("prediction") or {})}


def write_outputs(journal: Journal, outs: Sequence[Path]) -> tuple[int, int]:
    """Merge the journal into every output (atomically, one record in memory at a time); (ok, failed)."""
    counts = [0, 0]
    for out in outs:
        counts = [0, 0]
        with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            if out.suffix == ".csv":
                writer = csv.DictWriter(f, csv_columns(), extrasaction="ignore")
                writer.writeheader()
            elif out.suffix == ".json":
                f.write("[")
            for i, rec in enumerate(journal.records()):
                counts[bool(rec.get("error"))] += 1
                if out.suffix == ".csv":
                    writer.writerow(csv_row(rec))
                elif out.suffix == ".json":
                    f.write(("," if i else "") + "\n" + json.dumps(json_record(rec), indent=2))
                else:
                    f.write(json.dumps(json_record(rec)) + "\n")
            if out.suffix == ".json":
                f.write("\n]\n")
    return counts[0], counts[1]


# ---------------------------------------------------------------- the engine

def _score_share(settings: dict, journal: Journal, source: CaseSource, done: np.ndarray, rank: int, world: int,
                 batch_size: int, progress: bool, device: str) -> int:
    """What process `rank` of `world` runs: builds the predictor (in a spawned process only the settings
    travel), predicts the rows rank, rank + world, ... that the journal lacks, `batch_size` at a time, and
    appends their records to its journal shard. Returns how many rows it scored."""
    from .predict import Predictor

    if device == "cpu":  # N processes share the cores
        torch.set_num_threads(max(1, (settings["threads"] or torch.get_num_threads()) // world))
    predictor = Predictor.from_checkpoint(settings["checkpoint"], precision=settings["precision"],
                                          backend=settings["backend"], tta=settings["tta"], device=device)
    share = sum(1 for r in range(rank, len(done), world) if not done[r])
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=share, unit="row", dynamic_ncols=True,
                   desc="predict" if world == 1 else f"predict (process 1 of {world})")
    chunk: list[Case] = []

    def flush() -> None:
        journal.append(rank, predict_cases(predictor, chunk))
        if bar is not None:
            bar.update(len(chunk))
        chunk.clear()

    for case in source:
        if (case.row - 1) % world == rank and not done[case.row - 1]:
            chunk.append(case)
            if len(chunk) == batch_size:
                flush()
    if chunk:
        flush()
    if bar is not None:
        bar.close()
    return share


def predict_cases(predictor, cases: Sequence[Case]) -> list[dict]:
    """One journal record per case: its prediction, or the reason it has none."""
    from ..data.images import ImageError
    from .predict import PredictError

    records, prepared, where = [], [], []
    for case in cases:
        inputs = {"derm": case.derm, "clinic": case.clinic, **case.meta}
        rec = {"row": case.row, "case_id": case.case_id, "inputs": inputs, "error": case.error, "prediction": None}
        if case.error is None:
            try:
                prepared.append(predictor.prepare({"derm": case.derm, "clinic": case.clinic, "meta": case.meta},
                                                  label="case"))
                where.append(len(records))
            except (PredictError, ImageError, OSError, ValueError) as exc:
                rec["error"] = str(exc).replace("case derm: ", "derm ").replace("case clinic: ", "clinic ")
        if rec["error"]:  # one line, whatever the CSV's quoted fields held
            rec["error"] = f"row {case.row}: {rec['error']}".replace("\r", "\\r").replace("\n", "\\n")
        records.append(rec)
    calibrated = predictor.cfg.infer.temperature is not None
    for i, result in zip(where, predictor.run(prepared) if prepared else []):
        records[i] |= {"prediction": result.to_dict(), "calibrated": calibrated, "tta": predictor.tta}
    return records


@dataclass
class BatchSummary:
    total: int
    ok: int
    failed: int
    resumed: int  # rows found in the journal from an earlier, interrupted run
    outputs: list[str]
    failures: list[str]  # the first errors, for the terminal
    skipped: int  # folder entries that are not images


def run_batch(checkpoint: str | os.PathLike, source: str | os.PathLike, outs: Sequence[str | os.PathLike],
              *, precision: str = "auto", backend: str = "auto", tta: str | None = None, devices: int = 1,
              accelerator: str = "cpu", batch_size: int = 16, restart: bool = False, progress: bool = True,
              threads: int | None = None) -> BatchSummary:
    """Predict every case of `source` into `outs` (suffix .csv, .json or .jsonl); resumable (see module doc)."""
    outs = [Path(o) for o in outs]
    if not outs:
        raise BatchInputError("give at least one output file (.csv, .json or .jsonl)")
    for out in outs:
        if out.suffix not in OUTPUT_SUFFIXES:
            raise BatchInputError(f"{out}: output suffix must be one of {', '.join(OUTPUT_SUFFIXES)}")
    if devices < 1 or batch_size < 1:
        raise BatchInputError(f"--devices {devices} and --batch-size {batch_size} must be >= 1")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator != "cpu" and backend == "auto":
        backend = "torch"  # the only engine on a GPU
    if accelerator != "cpu" and backend != "torch":
        raise BatchInputError(f"backend {backend!r} runs on the CPU only; use --backend torch with --accelerator "
                              f"{accelerator}")
    cases = CaseSource(source)
    ckpt = Path(checkpoint).resolve()
    if not ckpt.is_file():
        raise BatchInputError(f"{checkpoint}: no such checkpoint")
    st = ckpt.stat()
    header = {"version": JOURNAL_VERSION, "input": str(Path(source).resolve()), "input_sha256": cases.fingerprint(),
              "checkpoint": f"{ckpt} ({st.st_size} bytes, mtime {st.st_mtime_ns})", "backend": backend,
              "precision": precision, "tta": tta}
    settings = {"precision": precision, "backend": backend, "tta": tta, "threads": threads}
    journal = Journal.open(outs[0].with_name(outs[0].name + ".parts"), header, restart=restart)
    with journal.locked():
        return _predict_into(journal, cases, outs, settings | {"checkpoint": str(ckpt)}, devices, accelerator,
                             batch_size, progress)


def _predict_into(journal: Journal, cases: CaseSource, outs: list[Path], settings: dict, devices: int,
                  accelerator: str, batch_size: int, progress: bool) -> BatchSummary:
    done = journal.done(cases.count)
    resumed = int(done.sum())
    if resumed < cases.count:
        def device(rank: int) -> str:
            return "cpu" if accelerator == "cpu" else ("cuda" if devices == 1 else f"cuda:{rank}")

        jobs = [(settings, journal, cases, done, rank, devices, batch_size, progress, device(rank))
                for rank in range(devices)]
        if devices == 1:
            _score_share(*jobs[0])
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(devices, mp_context=multiprocessing.get_context("spawn")) as pool:
                for job in [pool.submit(_score_share, *args) for args in jobs]:
                    job.result()  # a process's error is raised here, after the others finished their share
    ok, failed = write_outputs(journal, outs)
    if ok + failed != cases.count:  # never true unless a shard was edited by hand: keep the journal then
        raise BatchInputError(f"{journal.folder}: holds {ok + failed} of {cases.count} rows after the run")
    failures = [r["error"] for r in journal.records() if r.get("error")][:10] if failed else []
    shutil.rmtree(journal.folder)
    return BatchSummary(cases.count, ok, failed, resumed, [str(o) for o in outs], failures, cases.skipped)
