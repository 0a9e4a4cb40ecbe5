"""fedsim's ServerApp (``fedsim.deploy.serverapp:app``), for a run that Flower's own tools
start: ``flwr run`` of the app directory ``fedsim app`` writes, on a ``flower-superlink``
the user started.

It reads the scenario from the run config (``fedsim-scenario``: JSON, never pickle) and
runs fedsim's coordinator on the grid Flower gives it: same coordinator, policies,
strategy, metrics and run folder as ``fedsim run``. The run folder goes to
``<fedsim-runs>/<run.name>-<run id>`` on the machine where Flower runs the ServerApp
(the SuperLink's). Runs that ``fedsim run`` starts claim their ServerApp task
themselves, so Flower never starts this app for them.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedsim.deploy.superlink import RUNS_KEY, SCENARIO_KEY
    from fedsim.errors import ScenarioError
    from fedsim.progress import Progress, start_line
    from fedsim.runner import execute
    from fedsim.scenario import scenario_from_json

    spec = context.run_config.get(SCENARIO_KEY)
    if not isinstance(spec, str) or not spec:
        raise RuntimeError(
            f"the run config has no '{SCENARIO_KEY}': make the app directory with "
            "`fedsim app SCENARIO DIR`, then `flwr run DIR`"
        )
    scn = scenario_from_json(spec)
    runs = Path(str(context.run_config.get(RUNS_KEY) or "runs"))
    out = runs / f"{scn.run.name}-{context.run_id}"
    progress = Progress(scn.run.rounds, quiet=False)
    progress.message(start_line(scn, f"Flower run {context.run_id}; run folder {out}"))
    try:
        outcome = execute(scn, out=out, progress=progress, grid=grid, run_id=context.run_id)
    except ScenarioError as exc:  # (one line per problem, in Flower's run log)
        raise RuntimeError(str(exc)) from None
    progress.message(f"fedsim: run folder {outcome.out_dir}")
