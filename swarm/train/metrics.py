"""Per-step metrics as JSON Lines: one object per optimizer step, appended and flushed as it happens.

Benchmarks and the status page read these files, possibly while a run is writing them, so a
record is written in one `write` call and a torn last line is ignored by the reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

# Keys every step record carries; `eval_loss` is added on steps that evaluated.
STEP_KEYS = ("step", "loss", "lm_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


class MetricsWriter:
    """Appends step records to a JSONL file.

    With `resume_step`, records of steps after it (written after the checkpoint by a run that then
    died) are dropped first, so the file again describes exactly one run history.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(_line(r) for r in kept))
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        self._file.write(_line(record))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file, in file order (a torn final line is skipped)."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if lineno == len(lines):
                break  # a writer is mid-line
            raise ValueError(f"{path}:{lineno}: not a JSON object") from None
    return records


def _line(record: dict[str, Any]) -> str:
    # JSON has no NaN/inf; write them as null so every reader can parse the file.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, separators=(",", ":")) + "\n"
