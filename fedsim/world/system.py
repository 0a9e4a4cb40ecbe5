"""Device heterogeneity and mid-round dropouts: how long each client's round takes in
virtual time, and who vanishes before replying.

A client's virtual round time is ``model_bytes / download + samples x epochs / speed
+ update_bytes / upload`` (FedScale's completion-time model: Lai et al., "FedScale:
Benchmarking Model and System Performance of Federated Learning at Scale", ICML 2022,
arXiv:2105.11367). Speeds and bandwidths are drawn once per client from the seed;
a fixed value costs no per-client memory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.rng import np_rng
from fedsim.world.config import DistSpec, DropoutSection, FixedDist, SystemSection, UniformDist

PROFILE_COLUMNS = ("samples_per_s", "download_Bps", "upload_Bps")

Value = float | np.ndarray  # one value for everyone, or one per client


def draw(dist: DistSpec, n: int, rng: np.random.Generator) -> Value:
    if isinstance(dist, FixedDist):
        return float(dist.value)
    if isinstance(dist, UniformDist):
        return rng.uniform(dist.low, dist.high, size=n)
    return dist.median * np.exp(dist.sigma * rng.standard_normal(n))


def beta_spread(p: float, concentration: float | None, n: int, rng: np.random.Generator) -> Value:
    """Per-client probabilities p_i ~ Beta(p c, (1 - p) c) (mean p), or p for everyone
    without a concentration (or when p is 0 or 1, where that Beta is degenerate)."""
    if concentration is None or not 0 < p < 1:
        return float(p)
    return rng.beta(p * concentration, (1 - p) * concentration, size=n)


def _pick(v: Value, cids: np.ndarray) -> np.ndarray:
    return np.full(len(cids), v) if isinstance(v, float) else v[cids]


def read_profiles(path: str, num_clients: int, seed: int) -> tuple[Value, Value, Value]:
    """Device profiles from CSV: one row per client (``client_id`` column) or a pool of
    rows each client draws from (seeded)."""
    key = "system.profiles"
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in PROFILE_COLUMNS if c not in cols]
            if missing:
                raise ScenarioError([(key, f"{path}: missing column(s) {', '.join(missing)}")])
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    vals = [float(row[c]) for c in PROFILE_COLUMNS]
                    cid = int(row["client_id"]) if "client_id" in cols else None
                except (TypeError, ValueError):
                    raise ScenarioError([(key, f"{path}: line {line}: not a number")]) from None
                if min(vals) <= 0:
                    raise ScenarioError([(key, f"{path}: line {line}: values must be > 0")])
                if cid is not None and not 0 <= cid < num_clients:
                    raise ScenarioError(
                        [(key, f"{path}: line {line}: client_id {cid} not in 0..{num_clients - 1}")]
                    )
                rows.append((cid, vals))
    except OSError as exc:
        raise ScenarioError([(key, f"{path}: {exc.strerror or exc}")]) from None
    if not rows:
        raise ScenarioError([(key, f"{path}: no rows")])
    table = np.array([v for _, v in rows])
    if "client_id" in cols:
        ids = np.array([c for c, _ in rows])
        if len(set(ids.tolist())) != num_clients:
            raise ScenarioError(
                [(key, f"{path}: needs exactly one row per client 0..{num_clients - 1}")]
            )
        per_client = np.empty_like(table)
        per_client[ids] = table
    else:
        per_client = table[np_rng(seed, "device-profile").integers(0, len(table), num_clients)]
    return per_client[:, 0], per_client[:, 1], per_client[:, 2]


@dataclass
class Timing:
    """Virtual seconds of each phase of a client's training task, per client."""

    download: np.ndarray
    compute: np.ndarray
    upload: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.download + self.compute + self.upload


class SystemModel:
    def __init__(self, spec: SystemSection, *, num_clients: int, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        if spec.profiles is not None:
            self.speed, self.down, self.up = read_profiles(spec.profiles, num_clients, seed)
        else:
            self.speed = draw(spec.speed, num_clients, np_rng(seed, "device-speed"))
            self.down = draw(spec.download, num_clients, np_rng(seed, "device-download"))
            self.up = draw(spec.upload, num_clients, np_rng(seed, "device-upload"))

    def timing(
        self,
        cids: np.ndarray,
        *,
        work: np.ndarray,
        model_bytes: int,
        update_bytes: int,
        server_round: int,
    ) -> Timing:
        """Phase durations of ``cids`` (sorted) doing ``work`` samples each this round."""
        compute = work / _pick(self.speed, cids)
        st = self.spec.stragglers
        if st.fraction > 0 and len(cids):
            rng = np_rng(self.seed, "stragglers", server_round)
            n = int(round(st.fraction * len(cids)))
            slow = rng.permutation(len(cids))[:n]
            compute[slow] *= rng.uniform(st.slowdown_min, st.slowdown_max, size=n)
        return Timing(
            download=model_bytes / _pick(self.down, cids),
            compute=compute,
            upload=update_bytes / _pick(self.up, cids),
        )


class DropoutModel:
    """Who vanishes mid-round: client i with probability p_i, independently per round.

    Each draw is keyed by (round, client) alone, so the ClientApp (which raises to
    simulate the dropout, on either engine) and the coordinator agree without talking.
    """

    def __init__(self, spec: DropoutSection, *, num_clients: int, seed: int) -> None:
        self.seed = seed
        self.p = beta_spread(spec.p, spec.concentration, num_clients, np_rng(seed, "dropout-p"))

    @property
    def active(self) -> bool:
        return not isinstance(self.p, float) or self.p > 0

    def dropped(self, cid: int, server_round: int) -> bool:
        if not self.active:
            return False
        p = self.p if isinstance(self.p, float) else float(self.p[cid])
        return bool(np_rng(self.seed, "dropout", server_round, cid).random() < p)

    def dropped_many(self, cids: np.ndarray, server_round: int) -> np.ndarray:
        if not self.active:
            return np.zeros(len(cids), dtype=bool)
        return np.array([self.dropped(int(c), server_round) for c in cids], dtype=bool)
