"""The ServerApp a fedsim run's Flower App Bundle names (``fedsim.deploy.serverapp:app``).

fedsim's coordinator claims its run's ServerApp task itself (``fedsim run`` with
``simulation.engine = "deployment"``), so Flower never starts this app for a fedsim run.
Started by Flower's own tools instead (``flwr run`` of that bundle), it says so and
fails the run, rather than running something else.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    raise RuntimeError(
        "fedsim's coordinator drives its own runs: start them with `fedsim run SCENARIO "
        "--set simulation.engine=deployment` (running fedsim's ServerApp under `flwr run` "
        "is not supported yet)"
    )
