"""From a validated scenario to a finished run directory."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data import AnyFederation as Federation
from fedsim.data import load_federation, partition_summary
from fedsim.errors import ScenarioError
from fedsim.models import build_model, count_parameters
from fedsim.plots import plot_curves, plot_label_heatmap
from fedsim.progress import Progress
from fedsim.results import (
    MODEL_FILE,
    SUMMARY_FILE,
    RunDir,
    check_out_dir,
    default_out_dir,
    versions,
)
from fedsim.scenario import Scenario


@dataclass
class RunOutcome:
    out_dir: Path
    summary: dict[str, Any]


def resolve_paths(scn: Scenario) -> Scenario:
    """Make file paths absolute, so the resolved scenario reruns from any directory."""
    path = getattr(scn.data, "path", None)
    if path is None:
        return scn
    data = scn.data.model_copy(update={"path": str(Path(path).expanduser().resolve())})
    return scn.model_copy(update={"data": data})


def prepare(scn: Scenario) -> tuple[Federation, int]:
    """Load the data and build the model once: catches what only real data reveals.

    Returns the federation and the model's parameter count. Raises ScenarioError.
    """
    fed = load_federation(scn.data, seed=scn.run.seed)
    try:
        model = build_model(
            scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=scn.run.seed
        )
    except ValueError as exc:
        raise ScenarioError([("model.name", str(exc))]) from None
    empty = np.flatnonzero(fed.train_sizes() == 0)
    if empty.size:
        raise ScenarioError(
            [("data.partition", f"{empty.size} client(s) get no training data (e.g. {empty[0]})")]
        )
    return fed, count_parameters(model)


def _final(records: list[dict[str, Any]], key: str) -> float | None:
    for rec in reversed(records):
        if rec.get(key) is not None:
            return rec[key]
    return None


def execute(
    scn: Scenario, *, out: Path | None = None, progress: Progress | None = None
) -> RunOutcome:
    """Run ``scn`` and write its run directory; a failure leaves ``<out>.incomplete``."""
    from fedsim.engine.run import Engine  # imports Ray: only when running

    t_start = time.perf_counter()
    scn = resolve_paths(scn)
    out = out if out is not None else default_out_dir(scn.run.name)
    check_out_dir(out)
    fed, n_params = prepare(scn)
    with Engine(scn) as engine:  # ScenarioError here still leaves nothing on disk
        return _execute(scn, fed, n_params, engine, RunDir(out), progress, t_start)


def _execute(
    scn: Scenario,
    fed: Federation,
    n_params: int,
    engine: Any,
    run_dir: RunDir,
    progress: Progress | None,
    t_start: float,
) -> RunOutcome:
    progress = progress or Progress(scn.run.rounds, quiet=True)
    try:
        toml_text = scn.to_toml()
        run_dir.write_text("scenario.toml", toml_text)
        parts = partition_summary(fed)
        run_dir.write_json("partitions.json", parts)
        plot_label_heatmap(parts, run_dir.path("label_heatmap.png"))

        def on_round(rec: dict[str, Any]) -> None:
            run_dir.append_round(rec)
            progress.update(rec)

        with progress:
            result = engine.run(fed, on_round)
        records = result.coordinator.rounds
        arrays = {k: v.numpy() for k, v in result.coordinator.arrays.items()}
        run_dir.write_model(arrays)
        plot_curves(records, run_dir.tmp, scn.run.name)
        init = result.coordinator.initial_eval or {}
        summary = {
            "name": scn.run.name,
            "seed": scn.run.seed,
            "engine": scn.simulation.engine,
            "rounds_completed": len(records),
            "eval_accuracy": _final(records, "eval_accuracy"),
            "eval_loss": _final(records, "eval_loss"),
            "client_eval_accuracy": _final(records, "client_eval_accuracy"),
            "client_eval_loss": _final(records, "client_eval_loss"),
            "train_loss": _final(records, "train_loss"),
            "initial_eval_accuracy": init.get("eval_accuracy"),
            "initial_eval_loss": init.get("eval_loss"),
            "num_clients": scn.num_clients,
            "model_parameters": n_params,
            "model_sha256": hashlib.sha256(run_dir.path(MODEL_FILE).read_bytes()).hexdigest(),
            "scenario_sha256": hashlib.sha256(toml_text.encode()).hexdigest(),
            "wall_s": time.perf_counter() - t_start,
            **result.timings,
            "versions": versions(),
        }
        run_dir.write_json(SUMMARY_FILE, summary)
        return RunOutcome(run_dir.commit(), summary)
    except BaseException as exc:
        dest = run_dir.abandon(exc)
        exc.add_note(f"partial output kept in {dest}")
        raise
