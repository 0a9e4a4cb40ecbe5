"""From a validated scenario to a finished run directory."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from fedsim.data import AnyFederation as Federation
from fedsim.data import load_federation, partition_summary
from fedsim.errors import ScenarioError
from fedsim.models import MAX_PARAMETERS, build_model, count_parameters, planned_parameters
from fedsim.plots import (
    plot_curves,
    plot_label_heatmap,
    plot_online,
    plot_participation,
    plot_privacy,
)
from fedsim.plugins import is_file
from fedsim.privacy.config import SampleDp
from fedsim.privacy.ledger import Ledger, calibrated
from fedsim.progress import Progress
from fedsim.results import (
    MODEL_FILE,
    PARTICIPATION_FILE,
    PRIVACY_CLIENTS_FILE,
    SCENARIO_FILE,
    SUMMARY_FILE,
    RunDir,
    check_out_dir,
    default_out_dir,
    read_checkpoint,
    resume_target,
    versions,
)
from fedsim.scenario import Scenario, load_scenario
from fedsim.world import World
from fedsim.world.participation import ParticipationLog

if TYPE_CHECKING:
    from fedsim.engine.checkpoint import Snapshot


@dataclass
class RunOutcome:
    out_dir: Path
    summary: dict[str, Any]


def resolve_paths(scn: Scenario) -> Scenario:
    """Make file paths absolute, so the resolved scenario reruns from any directory."""

    def absolute(section: Any, key: str) -> Any:
        path = getattr(section, key, None)
        if path is None:
            return section
        return section.model_copy(update={key: str(Path(path).expanduser().resolve())})

    run = scn.run.model_copy(
        update={
            "plugins": [
                str(Path(p).expanduser().resolve()) if is_file(p) else p for p in scn.run.plugins
            ]
        }
    )
    ch = scn.churn
    churn = ch.model_copy(
        update={
            "availability": absolute(ch.availability, "path"),
            "membership": absolute(ch.membership, "schedule"),
        }
    )
    return scn.model_copy(
        update={
            "run": run,
            "data": absolute(scn.data, "path"),
            "churn": churn,
            "system": absolute(scn.system, "profiles"),
            "deployment": absolute(absolute(scn.deployment, "credentials"), "node_keys"),
        }
    )


@dataclass
class Prepared:
    """What a scenario needs before any round runs, each built once per run."""

    federation: Federation
    world: World
    model_parameters: int


def build_world(scn: Scenario, train_sizes: np.ndarray) -> World:
    """The scenario's simulated world (churn, system heterogeneity, the virtual clock)
    for clients holding ``train_sizes[cid]`` training examples."""
    return World(
        scn.churn,
        scn.system,
        scn.client,
        num_clients=scn.num_clients,
        seed=scn.run.seed,
        train_sizes=lambda cids: train_sizes[cids],
    )


def prepare(scn: Scenario) -> Prepared:
    """Load the data, build the simulated world and the model once: catches what only
    real data and files reveal. Raises ScenarioError.
    """
    fed = load_federation(scn.data, seed=scn.run.seed)
    sizes = fed.train_sizes()
    # Reads trace and profile files: a bad one is a ScenarioError before anything runs.
    world = build_world(scn, sizes)
    shape = {"input_shape": fed.input_shape, "num_classes": fed.num_classes}
    try:
        planned = planned_parameters(scn.model, **shape)
        if planned > MAX_PARAMETERS:
            raise ScenarioError(
                [
                    (
                        "model",
                        f"{planned:,} parameters: more than the {MAX_PARAMETERS:,} fedsim "
                        "builds (each worker holds copies)",
                    )
                ]
            )
        model = build_model(scn.model, **shape, seed=scn.run.seed)
    except ValueError as exc:
        raise ScenarioError([("model.name", str(exc))]) from None
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        raise ScenarioError(
            [("data.partition", f"{empty.size} client(s) get no training data (e.g. {empty[0]})")]
        )
    if isinstance(scn.privacy.dp, SampleDp):
        _check_dp_sgd(scn, model, sizes)
    return Prepared(fed, world, count_parameters(model))


def _check_dp_sgd(scn: Scenario, model: Any, sizes: np.ndarray) -> None:
    """What record-level DP needs of the data and the model (both known only now)."""
    from clients.dpsgd import dp_problems  # imports Opacus: only for DP-SGD

    problems: list[tuple[str, str]] = []
    delta, largest = scn.privacy.delta, int(sizes.max())
    if delta is not None and delta >= 1 / largest:
        problems.append(
            (
                "privacy.delta",
                f"{delta:g} is not below 1/(largest shard) = 1/{largest}: a mechanism that "
                "reveals one example outright would satisfy it",
            )
        )
    layers = dp_problems(model)
    if layers:
        problems.append(
            (
                "model.name",
                f"'{scn.model.name}' cannot be trained with DP-SGD: " + "; ".join(layers),
            )
        )
    if problems:
        raise ScenarioError(problems)


def _final(records: list[dict[str, Any]], key: str) -> float | None:
    for rec in reversed(records):
        if rec.get(key) is not None:
            return rec[key]
    return None


def _target(records: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """When test accuracy (centralized, else client-side) first reached run.target_accuracy."""
    if target is None:
        return {}
    key = (
        "eval_accuracy"
        if any(r.get("eval_accuracy") is not None for r in records)
        else ("client_eval_accuracy")
    )
    for r in records:
        if r.get(key) is not None and r[key] >= target:
            return {
                "target_accuracy": target,
                "target_metric": key,
                "target_round": r["round"],
                "virtual_time_to_target_s": r.get("virtual_time_s"),
            }
    return {
        "target_accuracy": target,
        "target_metric": key,
        "target_round": None,
        "virtual_time_to_target_s": None,
    }


def _check_grid(scn: Scenario, grid: Any) -> None:
    """A scenario for Flower's own SuperLink runs on the grid ``flwr run`` gives, and
    only such a scenario takes one."""
    flower_link = scn.simulation.engine == "deployment" and scn.deployment.superlink == "flower"
    if flower_link and grid is None:
        raise ScenarioError(
            [
                (
                    "deployment.superlink",
                    "'flower': Flower's own `flwr run` starts this run on your SuperLink "
                    "(`fedsim app SCENARIO DIR` writes its app directory); `fedsim run` "
                    "starts its own SuperLink with superlink = 'fedsim'",
                )
            ]
        )
    if grid is not None and not flower_link:
        raise ScenarioError(
            [
                (
                    "deployment.superlink",
                    "a run started by Flower's `flwr run` needs simulation.engine = "
                    "'deployment' and deployment.superlink = 'flower' (`fedsim app` sets both)",
                )
            ]
        )


def execute(
    scn: Scenario,
    *,
    out: Path | None = None,
    progress: Progress | None = None,
    grid: Any = None,
    run_id: int = 0,
) -> RunOutcome:
    """Run ``scn`` and write its run directory; a failure leaves ``<out>.incomplete``.

    ``grid``: the Flower grid of a run that Flower's ``flwr run`` started (fedsim's
    ServerApp, ``deployment.superlink = "flower"``); only such a scenario takes one."""
    from fedsim.engine.run import Engine  # imports Ray: only when running

    t_start = time.perf_counter()
    _check_grid(scn, grid)
    scn = resolve_paths(scn)
    out = out if out is not None else default_out_dir(scn.run.name)
    check_out_dir(out)
    prep = prepare(scn)
    text = scn.to_toml()  # what the user asked for (a calibrated z is derived from it)
    scn = _calibrate(scn, prep, progress)
    with Engine(
        scn, grid=grid, run_id=run_id, fed=prep.federation
    ) as engine:  # (a ScenarioError here leaves no files)
        run_dir = RunDir(out)
        try:
            run_dir.write_text(SCENARIO_FILE, text)
        except BaseException as exc:
            _abandon(run_dir, exc)
        return _execute(scn, text, prep, engine, run_dir, progress, t_start, None)


def _calibrate(scn: Scenario, prep: Prepared, progress: Progress | None) -> Scenario:
    """The scenario with privacy.target_epsilon turned into a noise multiplier."""
    scn, z = calibrated(scn, prep.federation.train_sizes())
    if z is not None and progress is not None:
        p = scn.privacy
        progress.message(
            f"privacy: noise multiplier z = {z:.4f} spends epsilon {p.target_epsilon:g} "
            f"(delta {p.delta:g}, {p.accountant}) over {scn.run.rounds} rounds"
        )
    return scn


def resume(target: Path, *, progress: Progress | None = None) -> RunOutcome:
    """Continue the unfinished run ``target`` (``DIR`` or ``DIR.incomplete``) from its
    last checkpoint (from the start without one) and finish it into ``DIR``. Raises
    ScenarioError (one line, key ``--resume``) for a finished run, a foreign folder, a
    folder in use, a scenario that no longer validates, or a corrupt or foreign
    checkpoint; nothing in the folder is changed then."""
    from fedsim.engine.run import Engine  # imports Ray: only when running

    t_start = time.perf_counter()
    out = resume_target(target)
    run_dir = RunDir(out, resume=True)  # checks the folder and locks it
    try:
        path = run_dir.path(SCENARIO_FILE)
        text = path.read_text(encoding="utf-8")
        try:
            scn = load_scenario(path)
        except ScenarioError as exc:
            raise ScenarioError([("--resume", f"{path}: {line}") for line in exc.lines()]) from None
        _check_grid(scn, None)  # (a run of Flower's SuperLink is not resumed here)
        snap = read_checkpoint(run_dir.tmp, hashlib.sha256(text.encode()).hexdigest())
        prep = prepare(scn)
        scn = _calibrate(scn, prep, progress)
        # What stopped the run is history once it continues.
        run_dir.path("error.txt").unlink(missing_ok=True)
        if progress is not None:
            progress.total = scn.run.rounds
            done = 0 if snap is None else snap.round
            progress.message(
                f"fedsim: resuming {run_dir.tmp} after round {done} of {scn.run.rounds}"
                + ("" if snap else " (no checkpoint: from the start)")
            )
        engine = Engine(scn, fed=prep.federation).__enter__()
    except BaseException:
        run_dir.release()
        raise
    try:
        outcome = _execute(scn, text, prep, engine, run_dir, progress, t_start, snap)
    except BaseException as exc:  # (the engine keeps what a failed run leaves: its logs)
        engine.__exit__(type(exc), exc, exc.__traceback__)
        raise
    engine.__exit__(None, None, None)
    return outcome


def _privacy(
    scn: Scenario, records: list[dict[str, Any]], ledger: Ledger | None, run_dir: RunDir
) -> dict[str, Any]:
    """The summary's privacy keys; per-client accounting also writes
    privacy_clients.csv (client_id, releases, epsilon of every client that took part)."""
    if ledger is None:
        return {"dp_mode": "none"}
    if ledger.counts is not None:
        rows = "".join(f"{c},{n},{e!r}\n" for c, n, e in ledger.client_epsilons())
        run_dir.write_text(PRIVACY_CLIENTS_FILE, "client_id,releases,epsilon\n" + rows)
    return ledger.summary(records, scn.run.rounds)


def _abandon(run_dir: RunDir, exc: BaseException) -> NoReturn:
    dest = run_dir.abandon(exc)
    exc.add_note(
        f"partial output kept in {dest} (continue it with `fedsim run --resume {run_dir.final}`)"
    )
    raise exc


def _execute(
    scn: Scenario,
    toml_text: str,
    prep: Prepared,
    engine: Any,
    run_dir: RunDir,
    progress: Progress | None,
    t_start: float,
    snap: Snapshot | None,
) -> RunOutcome:
    progress = progress or Progress(scn.run.rounds, quiet=True)
    try:
        scenario_sha256 = hashlib.sha256(toml_text.encode()).hexdigest()
        parts = partition_summary(prep.federation)
        run_dir.write_json("partitions.json", parts)
        plot_label_heatmap(parts, run_dir.path("label_heatmap.png"))
        run_dir.open_metrics(None if snap is None else snap.records)

        def on_round(rec: dict[str, Any]) -> None:
            run_dir.append_round(rec)
            progress.update(rec)

        def on_checkpoint(s: Snapshot) -> None:
            run_dir.write_checkpoint(s, scenario_sha256)

        with (
            progress,
            ParticipationLog(
                run_dir.path(PARTICIPATION_FILE),
                scn.num_clients,
                keep_rounds=None if snap is None else snap.round,
            ) as plog,
        ):
            result = engine.run(
                prep.federation,
                prep.world,
                on_round,
                plog.add_round,
                on_checkpoint=on_checkpoint,
                resume=snap,
            )
        records = result.coordinator.rounds
        arrays = {k: v.numpy() for k, v in result.coordinator.arrays.items()}
        run_dir.write_model(arrays)
        plot_curves(records, run_dir.tmp, scn.run.name)
        plot_participation(
            run_dir.path(PARTICIPATION_FILE), run_dir.path("participation.png"), scn.num_clients
        )
        plot_online(records, run_dir.path("online.png"))
        plot_privacy(records, run_dir.path("privacy.png"), scn.run.name)
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
            "virtual_time_s": _final(records, "virtual_time_s"),
            **_target(records, scn.run.target_accuracy),
            "initial_eval_accuracy": init.get("eval_accuracy"),
            "initial_eval_loss": init.get("eval_loss"),
            "num_clients": scn.num_clients,
            "model_parameters": prep.model_parameters,
            "model_sha256": hashlib.sha256(run_dir.path(MODEL_FILE).read_bytes()).hexdigest(),
            "scenario_sha256": scenario_sha256,
            "resumed_after_round": None if snap is None else snap.round,
            **_privacy(scn, records, result.coordinator.ledger, run_dir),
            "wall_s": time.perf_counter() - t_start,
            **result.timings,
            "versions": versions(),
        }
        run_dir.write_json(SUMMARY_FILE, summary)
        return RunOutcome(run_dir.commit(), summary)
    except BaseException as exc:
        _abandon(run_dir, exc)
