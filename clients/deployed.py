"""fedsim's ClientApp as a real Flower SuperNode loads it (``clients.deployed:app``).

A SuperNode imports one module-level ``ClientApp``; the scenario it must serve arrives
with each run (run config ``fedsim-scenario``, the coordinator's resolved scenario as
JSON), so one installed fedsim serves any scenario. The node's ``node_config`` says whose
data it holds: ``partition-id`` (a partition of the scenario's dataset, to test a
deployment against its simulation).
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import build_client_app

SCENARIO_KEY = "fedsim-scenario"  # (the coordinator writes it: fedsim.deploy.superlink)

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _app_for(spec_json: str) -> ClientApp:
    return build_client_app(spec_json)


def _scenario(context: Context) -> str:
    spec = context.run_config.get(SCENARIO_KEY)
    if not isinstance(spec, str) or not spec:
        raise RuntimeError(
            f"run config has no '{SCENARIO_KEY}': this ClientApp serves runs started by "
            "fedsim's coordinator (fedsim run with simulation.engine = 'deployment')"
        )
    return spec


def _serve(msg: Message, context: Context) -> Message:
    return _app_for(_scenario(context))(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _serve(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _serve(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _serve(msg, context)
