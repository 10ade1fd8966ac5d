"""Result rows on the terminal and in files, written as they come so an interrupted run loses nothing."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge.card import atomic_write_text

FIELDS = ["path", "label", "prob_parasitized", "model", "status", "error"]
# field mode: one row per detected cell; box = [x, y, w, h] in pixels of the image as displayed
CELL_FIELDS = ["path", "cell", "box", "image_width", "image_height", "label", "prob_parasitized", "status"]


@dataclass
class Row:
    path: str
    label: str
    prob_parasitized: float | None
    model: str
    status: str  # ok | error
    error: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prob_parasitized"] = None if self.prob_parasitized is None else round(float(self.prob_parasitized), 6)
        return d


class OutputError(ValueError):
    """A results file that cannot be used as asked (exists, unreadable for --resume); one line, no traceback."""


class Writer:
    """One output stream in one format; `write` flushes, so every finished batch is on disk (a .json
    document is kept in memory and replaced atomically at close: use .csv/.jsonl for very long runs)."""

    def __init__(self, stream, fmt: str, fields: list[str] = FIELDS, header: bool = True, path: Path | None = None,
                 prior: list | None = None):
        self.stream, self.fmt, self.path, self.rows = stream, fmt, path, list(prior or [])
        self._csv = csv.DictWriter(stream, fieldnames=fields) if fmt == "csv" else None
        if self._csv and header:
            self._csv.writeheader()
        if fmt == "table":
            stream.write(f"{'label':<12} {'p(parasitized)':>14}  {'status':<6} path\n")

    def write(self, rows: list) -> None:
        """Row objects, or plain dicts (field mode's cell rows)."""
        for r in rows:
            d = r if isinstance(r, dict) else r.as_dict()
            if self.fmt == "csv":
                self._csv.writerow({k: "" if v is None else json.dumps(v) if isinstance(v, list) else v
                                    for k, v in d.items()})
            elif self.fmt == "jsonl":
                self.stream.write(json.dumps(d) + "\n")
            elif self.fmt == "table":
                p = "" if r.prob_parasitized is None else f"{r.prob_parasitized:.4f}"
                tail = f"  ({r.error})" if r.error else ""
                self.stream.write(f"{r.label or '-':<12} {p:>14}  {r.status:<6} {r.path}{tail}\n")
            else:  # json: one document, written at close
                self.rows.append(d)
        if self.stream is not None:
            self.stream.flush()

    def close(self) -> None:
        """Write what is pending and fsync: a Pi writes to an SD card, and a power cut must not eat the tail."""
        if self.fmt == "json" and self.path is not None:
            atomic_write_text(self.path, json.dumps(self.rows, indent=1) + "\n")
        elif self.fmt == "json":
            self.stream.write(json.dumps(self.rows, indent=1) + "\n")
        if self.stream is not None:
            self.stream.flush()
            if self.path is not None:
                os.fsync(self.stream.fileno())
                self.stream.close()


def format_for(path: Path) -> str:
    """Output file format from its extension (CSV unless .jsonl/.ndjson/.json)."""
    ext = path.suffix.lower().lstrip(".")
    return {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json"}.get(ext, "csv")


def open_results(path: Path, fields: list[str] = FIELDS, mode: str = "new") -> tuple[Writer, set[str]]:
    """A Writer on a results file and the input paths it already holds.

    new: refuse an existing file; overwrite: start it again; resume: keep its rows and append, so a run
    cut by a power failure picks up where it stopped (a half-written last line is dropped)."""
    fmt = format_for(path)
    exists = path.exists() and path.stat().st_size > 0
    if exists and mode == "new":
        raise OutputError(f"{path} already exists: pass --overwrite to replace it or --resume to continue it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (exists and mode == "resume"):
        return (Writer(None, fmt, fields, path=path) if fmt == "json"
                else Writer(open(path, "w", newline="", buffering=1), fmt, fields, path=path)), set()
    text = path.read_text(errors="replace")
    try:
        if fmt == "json":
            prior = json.loads(text)
            return Writer(None, fmt, fields, path=path, prior=prior), {r["path"] for r in prior}
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]  # the row being written when the power went
            atomic_write_text(path, text)
        if fmt == "jsonl":
            done = {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
        else:
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames != fields:
                raise OutputError(f"{path}: its columns {reader.fieldnames} are not this run's; cannot --resume it")
            done = {r["path"] for r in reader}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OutputError(f"{path}: cannot --resume from it (unreadable {fmt}: {e})") from None
    return Writer(open(path, "a", newline="", buffering=1), fmt, fields, header=False, path=path), done


def session_dir(out: Path) -> Path:
    """A new folder per live or field session under `out`: an earlier session is never overwritten."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d, k = out / f"session-{stamp}", 1
    while d.exists():
        k += 1
        d = out / f"session-{stamp}-{k}"
    d.mkdir(parents=True)
    return d


def summary(rows_ok: int, rows_err: int, parasitized: int) -> str:
    pct = f"{100 * parasitized / rows_ok:.1f}%" if rows_ok else "n/a"
    return (f"{rows_ok + rows_err} inputs: {parasitized} Parasitized, {rows_ok - parasitized} Uninfected, "
            f"{rows_err} errors; parasitemia (parasitized / classified cells) {pct}")
