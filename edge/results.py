"""Result rows on the terminal and in files, written as they come so an interrupted run loses nothing."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

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


class Writer:
    """One output stream in one format; `write` flushes, so every finished batch is on disk."""

    def __init__(self, stream, fmt: str, fields: list[str] = FIELDS):
        self.stream, self.fmt, self.rows = stream, fmt, []
        self._csv = csv.DictWriter(stream, fieldnames=fields) if fmt == "csv" else None
        if self._csv:
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
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps(self.rows, indent=1) + "\n")
            self.stream.flush()


def format_for(path: Path) -> str:
    """Output file format from its extension (CSV unless .jsonl/.ndjson/.json)."""
    ext = path.suffix.lower().lstrip(".")
    return {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json"}.get(ext, "csv")


def open_output(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="", buffering=1)


def summary(rows_ok: int, rows_err: int, parasitized: int) -> str:
    pct = f"{100 * parasitized / rows_ok:.1f}%" if rows_ok else "n/a"
    return (f"{rows_ok + rows_err} inputs: {parasitized} Parasitized, {rows_ok - parasitized} Uninfected, "
            f"{rows_err} errors; parasitemia (parasitized / classified cells) {pct}")
