"""The run directory: resolved scenario, metrics, summary, model file, plots.

Everything is written into a private ``.<name>.*.partial`` beside the requested folder and renamed
into place only when the run completed, so a folder under its final name is always a
finished result. A run that fails leaves ``<name>.incomplete`` (with ``error.txt``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import ScenarioError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
PARTICIPATION_FILE = "participation.csv"
TIMING_FIELDS = ("round_wall_s",)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("fedsim", "flwr", "ray", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def default_out_dir(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path("runs") / f"{name}-{stamp}"
    n = 1
    while out.exists() or any(out.parent.glob(f".{out.name}.*.partial")):
        n += 1
        out = Path("runs") / f"{name}-{stamp}-{n}"
    return out


def check_out_dir(out: Path) -> None:
    """ScenarioError unless ``out`` is absent or an empty folder."""
    if out.exists() and not out.is_dir():
        raise ScenarioError([("--out", f"{out} is a file, not a folder")])
    if out.exists() and any(out.iterdir()):
        raise ScenarioError([("--out", f"{out} already exists and is not empty")])


def _json_safe(obj: Any) -> Any:
    """NaN and infinities (a diverged run) become null: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


class RunDir:
    def __init__(self, out: Path) -> None:
        self.final = Path(out)
        check_out_dir(self.final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        # A private temporary folder: concurrent runs aimed at one name never collide.
        self.tmp = Path(
            tempfile.mkdtemp(
                dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".partial"
            )
        )
        self._metrics = (self.tmp / METRICS_FILE).open("w", encoding="utf-8")

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")

    def append_round(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._metrics.flush()

    def write_model(self, arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        # One metadata key only: safetensors writes metadata from a hash map, so several
        # keys come out in a per-process order and the file bytes would differ run to run.
        save_file(tensors, str(self.path(MODEL_FILE)), metadata={"format": "pt"})

    def commit(self) -> Path:
        self._metrics.close()
        try:
            check_out_dir(self.final)  # something may have appeared there meanwhile
            if self.final.exists():
                self.final.rmdir()
            os.rename(self.tmp, self.final)
        except (ScenarioError, OSError) as exc:
            raise RuntimeError(f"cannot move the finished run to {self.final}: {exc}") from None
        return self.final

    def abandon(self, exc: BaseException) -> Path:
        self._metrics.close()
        self.write_text("error.txt", "".join(traceback.format_exception(exc)))
        dest = self.final.with_name(f"{self.final.name}.incomplete")
        n = 1
        while dest.exists():
            n += 1
            dest = self.final.with_name(f"{self.final.name}.incomplete-{n}")
        os.rename(self.tmp, dest)
        return dest


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with (Path(run_dir) / METRICS_FILE).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
