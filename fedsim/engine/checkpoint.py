"""What a run must keep to continue after round r exactly as if it had never stopped.

The coordinator takes a :class:`Snapshot` once round r's model is final and before round
r + 1 begins: the global model, the strategy's state (server momentum, FedAdam/Yogi
moments: whatever the strategy object changed as it ran), the DP mechanism's state
(adaptive clipping's C_t), the virtual clock, the world's state (availability draws),
the clients' persistent states (fedsim's engine) and how many rounds are done; ``fedsim.results`` writes it once round
r's record is written too, in JSON and safetensors (``fedsim.state``). Everything else a
round draws comes from the run seed keyed by round and client, so nothing else is needed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedsim.arrays import array_view
from fedsim.state import Encoder, StateError, decode


@dataclass
class Snapshot:
    """A run's state after round ``round`` (encoded at once: later rounds may change the
    objects it was taken from)."""

    round: int
    clock: float
    tree: dict[str, Any]  # JSON: strategy, world, client states, ...
    arrays: dict[str, np.ndarray]  # the tree's arrays
    model: dict[str, np.ndarray]  # the global model, by state_dict name
    records: list[dict[str, Any]] = field(default_factory=list)  # rounds 1..round
    initial_eval: dict[str, float] | None = None


def take(
    server_round: int,
    *,
    model: ArrayRecord,
    clock: float,
    strategy: Strategy,
    world: Any | None,
    client_states: dict[int, RecordDict] | None,
    initial_eval: dict[str, float] | None,
    privacy: dict[str, Any] | None = None,
) -> Snapshot:
    """Encode the run's state now (raises StateError naming what cannot be saved)."""
    enc = Encoder()
    tree = {
        "strategy": enc.encode(strategy_state(strategy), "strategy"),
        "world": None if world is None else enc.encode(world.state(), "world"),
        "clients": None
        if client_states is None
        else {str(c): enc.encode(s, f"client {c}") for c, s in sorted(client_states.items())},
        "privacy": None if privacy is None else enc.encode(privacy, "privacy"),
    }
    weights = {k: np.array(array_view(a)) for k, a in model.items()}
    return Snapshot(server_round, clock, tree, enc.arrays, weights, initial_eval=initial_eval)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy object's attributes, less its functions: its settings (rebuilt from
    the scenario anyway) and what it changed as it ran. A wrapped strategy (Flower's DP
    wrappers keep theirs in ``.strategy``) is walked too."""
    out: dict[str, Any] = {}
    for name, value in sorted(vars(strategy).items()):
        if isinstance(value, Strategy):
            out[name] = {"strategy": strategy_state(value)}
        elif callable(value) or inspect.ismodule(value):
            continue
        else:
            out[name] = {"value": value}
    return out


def restore_strategy(strategy: Strategy, state: dict[str, Any]) -> None:
    """Set a freshly built strategy's attributes to a :func:`strategy_state`."""
    for name, entry in state.items():
        if not isinstance(entry, dict) or len(entry) != 1:
            raise StateError(f"strategy.{name}: malformed entry")
        if "strategy" in entry:
            inner = getattr(strategy, name, None)
            if not isinstance(inner, Strategy):
                raise StateError(f"strategy.{name}: not a wrapped strategy here")
            restore_strategy(inner, entry["strategy"])
        elif "value" in entry:
            setattr(strategy, name, entry["value"])
        else:
            raise StateError(f"strategy.{name}: malformed entry")


def decode_tree(snap: Snapshot) -> dict[str, Any]:
    """The snapshot's state tree with its arrays in place."""
    return {
        "strategy": decode(snap.tree["strategy"], snap.arrays),
        "world": None
        if snap.tree.get("world") is None
        else decode(snap.tree["world"], snap.arrays),
        "clients": None
        if snap.tree.get("clients") is None
        else {int(c): decode(s, snap.arrays) for c, s in snap.tree["clients"].items()},
        "privacy": None
        if snap.tree.get("privacy") is None
        else decode(snap.tree["privacy"], snap.arrays),
    }
