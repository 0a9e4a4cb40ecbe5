"""A run's privacy ledger: which event the accountant is told, epsilon after each
round, the budget, and what the summary says about it.

Central DP accounts once per round for the whole population (user level): every round
is one application of the mechanism to whoever was sampled, so epsilon after r rounds is
``epsilon(event, r)``, whether or not a given client took part. Local DP accounts each
client on its own (``per_client``): a client's epsilon counts the rounds it took part
in, and the run's epsilon is the largest of them. The event follows the
sampling the coordinator actually performs (``fedsim.privacy.accounting``); under churn
(availability, dropout, membership) the cohort is drawn among the clients online at the
time, not uniformly from the population, so no amplification is assumed unless the user
opts in with ``privacy.assume_sampling``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.privacy.accounting import Mechanism, calibrate, epsilon, steps_per_epoch
from fedsim.privacy.config import CentralDp, adaptive_problems
from fedsim.privacy.mechanisms import AdaptiveClip, adaptive_clip
from fedsim.state import StateError

if TYPE_CHECKING:
    from fedsim.scenario import Scenario

log = logging.getLogger("fedsim")

ASSUMPTIONS = {
    "poisson": "Poisson sampling: each client joins a round independently with probability "
    "q (add/remove-one neighbours)",
    "fixed": "fixed-size sampling: k of N clients uniformly without replacement "
    "(replace-one neighbours)",
    "none": "no amplification by sampling: every round counts in full for every client",
    "sample": "record-level DP-SGD: each local step is a Poisson-subsampled Gaussian "
    "(q = 1 / ceil(n_i / B) of the client's shard), accounted per client for every step it "
    "ran",
    "local": "local DP: each client's noised update is a Gaussian mechanism of "
    "sensitivity 2C (any two datasets of the client), accounted per client for each round "
    "it took part in, without amplification by sampling",
}


@dataclass
class Ledger:
    accountant: str
    delta: float
    mechanism: Mechanism
    clip_norm: float
    assumption: str  # 'poisson', 'fixed' or 'none'
    assumed_under_churn: bool = False
    calibrated: bool = False
    target_epsilon: float | None = None
    stop_at_budget: bool = False
    # Adaptive clipping's clip norm, which moves as the run goes (the coordinator's
    # state, in its checkpoints); None with a fixed clip norm.
    clip: AdaptiveClip | None = None
    mode: str = "central"
    # Per-client accounting: how many times each client's data was released (local DP:
    # rounds taken part in); None when accounted once for the population.
    counts: np.ndarray | None = None
    # DP-SGD: each client's sampling rate q_i, and the steps it runs at most per round.
    rates: np.ndarray | None = None
    steps_per_round: np.ndarray | None = None
    _eps: np.ndarray | None = None  # per-client epsilon, kept up to date with counts

    def __post_init__(self) -> None:
        if self.counts is not None:
            self._eps = np.zeros(len(self.counts))
            self._refresh(np.flatnonzero(self.counts))

    @classmethod
    def of(
        cls,
        scn: Scenario,
        *,
        noise_multiplier: float | None = None,
        shard_sizes: np.ndarray | None = None,
    ) -> Ledger | None:
        """The ledger of the scenario's DP mechanism (None without DP); with
        ``target_epsilon`` and no noise multiplier, the one that spends the budget.
        ``shard_sizes`` (the clients' training examples) is needed by record-level DP."""
        p = scn.privacy
        dp: Any = p.dp
        if not p.active:
            return None
        churn = scn.churn.active
        sampling = scn.coordinator.sampling
        rates = per_round = None
        if dp.mode == "sample":
            if shard_sizes is None:
                raise ValueError("record-level DP needs the clients' shard sizes")
            assumption = "sample"
            b, epochs = scn.client.batch_size, scn.client.epochs
            spe = np.array([steps_per_epoch(int(s), b) for s in shard_sizes], np.int64)
            rates = np.where(spe > 0, 1.0 / np.maximum(spe, 1), 0.0)
            per_round = spe * epochs
        elif dp.per_client:
            assumption = "local"
        else:
            assumption = (p.assume_sampling or "none") if churn else sampling
        n = scn.num_clients
        k = min(math.ceil(scn.train_cohort * scn.coordinator.over_commit - 1e-9), n)

        def make(z: float) -> Mechanism:
            if assumption == "local":  # noise zC on a sensitivity of 2C
                return Mechanism(z / 2, "none")
            if assumption == "sample":  # the client with the fewest examples, for calibration
                return Mechanism(z, "poisson", q=float(rates.max()))  # type: ignore[union-attr]
            if assumption == "poisson":
                return Mechanism(z, "poisson", q=k / n)
            if assumption == "fixed":
                return Mechanism(z, "fixed", k=k, n=n)
            return Mechanism(z, "none")

        z = noise_multiplier if noise_multiplier is not None else dp.noise_multiplier
        if z is None:
            count = scn.run.rounds
            if per_round is not None:  # the smallest shard, in every round
                count *= int(per_round[int(np.argmax(rates))])  # type: ignore[arg-type]
            z = calibrate(p.accountant, make, count, p.delta, p.target_epsilon)
        # (a target with a fixed z is refused unless it is a stopping budget, so a
        # target without stop_at_budget means z was, or will be, calibrated)
        calibrated = p.target_epsilon is not None and not p.stop_at_budget
        if isinstance(dp, CentralDp) and (
            problems := adaptive_problems(dp, z, scn.expected_cohort)
        ):
            raise ScenarioError([(k, f"{msg} (z = {z:.4g}, calibrated)") for k, msg in problems])
        if churn and p.assume_sampling is not None:
            log.warning(
                "privacy.assume_sampling = '%s': epsilon assumes amplification by sampling "
                "although churn means the cohort is drawn among the clients online, not "
                "uniformly from the population",
                p.assume_sampling,
            )
        return cls(
            accountant=p.accountant,
            delta=p.delta,
            mechanism=make(z),
            clip_norm=dp.clip_norm,
            assumption=assumption,
            assumed_under_churn=churn and p.assume_sampling is not None,
            calibrated=calibrated,
            target_epsilon=p.target_epsilon,
            stop_at_budget=p.stop_at_budget,
            clip=adaptive_clip(scn, z),
            mode=dp.mode,
            counts=np.zeros(n, np.int64) if dp.per_client else None,
            rates=rates,
            steps_per_round=per_round,
        )

    @property
    def noise_multiplier(self) -> float:
        """The configured z (local DP: each client's noise std over C)."""
        z = self.mechanism.noise_multiplier
        return 2 * z if self.assumption == "local" else z

    def client_mechanism(self, cid: int) -> Mechanism:
        """What one release of client ``cid``'s data is (per-client accounting)."""
        if self.rates is None:
            return self.mechanism
        return Mechanism(self.mechanism.noise_multiplier, "poisson", q=float(self.rates[cid]))

    def _refresh(self, cids: np.ndarray) -> None:
        assert self.counts is not None and self._eps is not None
        for c in cids:
            self._eps[c] = epsilon(
                self.accountant,  # type: ignore[arg-type]
                self.client_mechanism(int(c)),
                int(self.counts[c]),
                self.delta,
            )

    # -- the coordinator's side ----------------------------------------------------
    def round_config(self) -> dict[str, Any]:
        """What every training instruction of the next round carries (C_t)."""
        return {} if self.clip is None else self.clip.config()

    def observe(
        self,
        server_round: int,
        *,
        released: list[int],
        clipped: int | None,
        aggregated: int,
        skipped: bool,
        steps: dict[int, int] | None = None,
    ) -> None:
        """After round ``server_round``: ``released`` the clients whose (noised) update
        left them; of the ``aggregated`` updates folded, ``clipped`` were clipped;
        ``steps``: the DP-SGD steps each client says it ran. The adaptive clip norm
        takes its step (not after a skipped round); per-client counts grow (DP-SGD: by
        the steps run, or by the most a client can run in a round where its reply says
        nothing, e.g. a rejected one)."""
        if self.counts is not None and released:
            ids = np.asarray(released, dtype=np.int64)
            if self.steps_per_round is None:
                self.counts[ids] += 1
            else:
                steps = steps or {}
                for c in released:
                    most = int(self.steps_per_round[c])
                    self.counts[c] += min(steps.get(c, most), most)
            self._refresh(ids)
        if self.clip is not None and not skipped and clipped is not None and aggregated > 0:
            self.clip.step(server_round, clipped, aggregated)

    def round_epsilon(self, server_round: int) -> float:
        """Epsilon after round ``server_round`` (per client: the largest)."""
        if self._eps is None:
            return self.epsilon(server_round)
        return float(self._eps.max(initial=0.0))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (central epsilon is a function of the rounds done)."""
        out: dict[str, Any] = {}
        if self.clip is not None:
            out["clip"] = self.clip.state()
        if self.counts is not None:
            out["counts"] = self.counts.copy()
        return out

    def restore(self, state: dict[str, Any]) -> None:
        if self.counts is not None:
            counts = state.get("counts")
            if not isinstance(counts, np.ndarray) or counts.shape != self.counts.shape:
                raise StateError("privacy: the checkpoint has no per-client counts")
            self.counts = counts.astype(np.int64)
            self.__post_init__()
        if self.clip is not None:
            if "clip" not in state:
                raise StateError("privacy: the checkpoint has no adaptive clip norm")
            self.clip.restore(state["clip"])

    def epsilon(self, rounds: int) -> float:
        """Epsilon at delta after ``rounds`` rounds."""
        return epsilon(self.accountant, self.mechanism, rounds, self.delta)  # type: ignore[arg-type]

    def max_rounds(self, rounds: int) -> int:
        """The rounds the run may take: all of them, or with ``stop_at_budget`` the
        most whose epsilon stays within the target (epsilon grows with rounds)."""
        if not self.stop_at_budget or self.target_epsilon is None or self.counts is not None:
            return rounds
        if self.epsilon(rounds) <= self.target_epsilon:
            return rounds
        lo, hi = 0, rounds  # epsilon(lo) <= target < epsilon(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def summary(self, records: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
        """What summary.json says about privacy."""
        done = len(records)
        m = self.mechanism
        clipped = [r.get("dp_clipped_fraction") for r in records]
        return {
            "dp_mode": self.mode,
            "dp_epsilon": self.round_epsilon(done),
            **self.per_client_summary(),
            "dp_delta": self.delta,
            "dp_accountant": self.accountant,
            "dp_sampling_assumption": self.assumption,
            "dp_sampling_assumption_text": ASSUMPTIONS[self.assumption]
            + (
                " (assumed by privacy.assume_sampling despite churn)"
                if self.assumed_under_churn
                else ""
            ),
            "dp_sampling_rate": m.q
            if self.assumption in ("poisson", "sample")
            else (m.k / m.n if self.assumption == "fixed" else None),
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_multiplier_calibrated": self.calibrated,
            "dp_clip_norm": self.clip_norm,
            "dp_clipping": "fixed" if self.clip is None else "adaptive",
            "dp_accounting": "per client" if self.counts is not None else "population",
            # adaptive: C of the last round (dp_clip_norm is C_0)
            "dp_clip_norm_last": _last(records, "dp_clip_norm") or self.clip_norm,
            "dp_target_epsilon": self.target_epsilon,
            "dp_stopped_at_budget": self.stop_at_budget and done < rounds,
            "dp_clipped_fraction_per_round": clipped,
        }

    def per_client_summary(self) -> dict[str, Any]:
        """Per-client accounting: the distribution of epsilon over the clients that took
        part (empty without per-client accounting)."""
        if self.counts is None or self._eps is None:
            return {}
        took_part = self.counts > 0
        eps = self._eps[took_part]
        dist = (
            {
                "min": float(eps.min()),
                "median": float(np.median(eps)),
                "p90": float(np.quantile(eps, 0.9)),
                "max": float(eps.max()),
                "mean": float(eps.mean()),
            }
            if len(eps)
            else None
        )
        return {
            "dp_clients_accounted": int(took_part.sum()),
            "dp_epsilon_per_client": dist,
            # rounds taken part in (local) or DP-SGD steps run (sample)
            "dp_releases_per_client_max": int(self.counts.max(initial=0)),
        }

    def client_epsilons(self) -> list[tuple[int, int, float]]:
        """(client, releases, epsilon) for every client that took part."""
        if self.counts is None or self._eps is None:
            return []
        return [
            (int(c), int(self.counts[c]), float(self._eps[c])) for c in np.flatnonzero(self.counts)
        ]


def calibrated(
    scn: Scenario, shard_sizes: np.ndarray | None = None
) -> tuple[Scenario, float | None]:
    """The scenario with its noise multiplier calibrated to privacy.target_epsilon
    (where it asks for that), and the calibrated z (None when nothing was calibrated)."""
    dp: Any = scn.privacy.dp
    if not scn.privacy.active or dp.noise_multiplier is not None:
        return scn, None
    ledger = Ledger.of(scn, shard_sizes=shard_sizes)
    assert ledger is not None
    z = ledger.noise_multiplier
    new_dp = dp.model_copy(update={"noise_multiplier": z})
    privacy = scn.privacy.model_copy(update={"dp": new_dp})
    return scn.model_copy(update={"privacy": privacy}), z


def _last(records: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None
