"""The simulated world of a run: who is online when, how long each client's task takes
in virtual time, and who drops out. Pure numpy models, consulted by the coordinator
(see ``fedsim.engine.policy``); nothing here knows Flower or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.world.system import DropoutModel, SystemModel, Timing

if TYPE_CHECKING:
    from fedsim.client_params import ClientParams
    from fedsim.world.config import ChurnSection, SystemSection


class World:
    """Availability x membership, device timing and dropouts of one scenario."""

    def __init__(
        self,
        churn: ChurnSection,
        system: SystemSection,
        client: ClientParams,
        *,
        num_clients: int,
        seed: int,
        train_sizes: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        """The world of a scenario's ``[churn]``, ``[system]`` and ``[client]`` tables
        (its virtual clock counts ``client.epochs`` and ``client.batch_size``). Built once
        per run (``fedsim.runner.prepare``): building reads trace and profile files."""
        from fedsim.world.availability import build_availability, build_membership

        n = num_clients
        self.num_clients = n
        self.availability = build_availability(churn.availability, num_clients=n, seed=seed)
        self.membership = build_membership(churn.membership, num_clients=n, seed=seed)
        self.system = SystemModel(system, num_clients=n, seed=seed)
        self.dropout = DropoutModel(churn.dropout, num_clients=n, seed=seed)
        self.epochs = client.epochs
        self.compute = system.compute
        self.batch_size = client.batch_size
        self.train_sizes = train_sizes
        self._queries = 0

    def state(self) -> dict[str, Any]:
        """What the world changed as the run went (availability draws), for a checkpoint."""
        return {"queries": self._queries, "availability": self.availability.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` of the same scenario's world."""
        self._queries = int(state["queries"])
        self.availability.restore(state["availability"])

    def online(self, t: float) -> np.ndarray | None:
        """Mask of the clients online at virtual time ``t`` (None: everyone)."""
        self._queries += 1
        avail = self.availability.online(t, self._queries)
        present = self.membership.present(t)
        if avail is None:
            return present
        if present is None:
            return avail
        return avail & present

    def timing(
        self, cids: np.ndarray, *, model_bytes: int, server_round: int
    ) -> tuple[Timing, np.ndarray]:
        """Phase durations of a full local training task, and the number of optimizer
        steps it takes, for each client in ``cids``."""
        n = self.train_sizes(cids).astype(np.float64)
        steps = self.epochs * np.ceil(n / self.batch_size)
        timing = self.system.timing(
            cids,
            work=n * self.epochs
            if self.compute == "samples"
            else np.full(len(n), 1.0 * self.epochs),
            model_bytes=model_bytes,
            update_bytes=model_bytes,
            server_round=server_round,
        )
        return timing, steps
