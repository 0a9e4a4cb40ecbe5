"""Who is online when: client availability models and population membership.

Every model answers ``online(t, query)`` with a boolean mask over all clients at virtual
time ``t`` (seconds), or ``None`` for "everyone", which costs nothing at any population
size. Calls come with non-decreasing ``t``; ``query`` counts calls (1, 2, ...). Every
random draw derives from the run's root seed (:mod:`fedsim.rng`), so a seed and a
sequence of query times give the same masks on any machine.

Models (``[churn.availability] kind = ...``):

- ``always``: everyone is online; returns ``None``.
- ``bernoulli``: client i is online with probability p_i at each call, independently
  across calls and clients. p_i = ``p_online``, or with ``concentration`` c,
  p_i ~ Beta(p c, (1 - p) c), drawn once (mean p, variance p (1 - p) / (c + 1)).
- ``markov``: a continuous-time two-state (on/off) Markov chain per client with
  exponential durations of means ``mean_on_s`` f_i and ``mean_off_s`` g_i, where f_i, g_i
  are lognormal factors exp(sigma z - sigma^2 / 2) (mean 1, sigma = ``spread``). Each
  chain starts in its stationary law (on w.p. on / (on + off), exponential residual
  time) and is advanced lazily to each queried time. A client whose next switch lies
  more than 50 mean cycles behind ``t`` is restarted from the stationary law at ``t``:
  the chain forgets its state at rate 1/on + 1/off >= 4 / (on + off), so this is exact
  to within e^-200 and bounds the work of a long jump.
- ``diurnal``: p_i(t) = p_min + (p_max - p_min) (1 + cos(2 pi (h_i(t) - peak_h) / 24)) / 2
  with the local hour h_i(t) = (24 t / period_s + o_i) mod 24, i.e. the cycle of
  ``period_s`` seconds read as a 24-hour clock (for the default 86,400 s: local time
  t + 3600 o_i). Phase offsets o_i (hours) are uniform over [0, 24) or
  Normal(phase_mean_h, phase_std_h). Time is cut into slots of ``slot_s``: within a
  slot a client's state holds (one uniform per client per slot, p evaluated at the
  slot's start).
- ``trace``: replayed intervals. CSV ``client_id,online_start_s,online_end_s``, one row
  per online interval [start, end) (``inf`` ends are allowed); clients without rows
  are never online. Or the client behaviour trace of FedScale (Lai et al., "FedScale:
  Benchmarking Model and System Performance of Federated Learning at Scale", ICML
  2022, arXiv:2105.11367) converted from its pickle to JSON:
  ``{"<id>": {"active": [...], "inactive": [...], "finish_time": T, ...}}``; a client is
  online while active[k] <= (t mod T) < inactive[k], and client i replays the i-th
  entry by integer id, cyclically (i mod entries), as FedScale assigns traces. Pickle
  files are refused: unpickling runs arbitrary code.

Membership (``[churn.membership]``): a seeded round(f N) clients are present at time 0,
the others join at times uniform over [0, join_window_s]; with ``mean_lifetime_s`` each
leaves for good an Exponential(mean) time after joining; a schedule CSV
``client_id,join_s,leave_s`` (empty leave_s = never) overrides the clients it lists.
A client is present on [join, leave).

File problems raise :class:`~fedsim.errors.ScenarioError` naming the scenario key and
the file line.
"""

from __future__ import annotations

import csv
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.rng import np_rng
from fedsim.sections import Section
from fedsim.world.config import (
    AVAILABILITY,
    AlwaysAvailability,
    AvailabilitySpec,
    BernoulliAvailability,
    DiurnalAvailability,
    MarkovAvailability,
    MembershipSection,
    TraceAvailability,
)
from fedsim.world.system import beta_spread

TRACE_KEY = "churn.availability.path"
SCHEDULE_KEY = "churn.membership.schedule"
TRACE_COLUMNS = ("client_id", "online_start_s", "online_end_s")
SCHEDULE_COLUMNS = ("client_id", "join_s", "leave_s")

#: A Markov chain this many mean cycles past its next switch restarts from stationarity.
MARKOV_MIX_CYCLES = 50.0


class AvailabilityModel(ABC):
    """Base class: which clients are online at virtual time ``t``."""

    def __init__(self, spec: Section, *, num_clients: int, seed: int) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.seed = seed

    @abstractmethod
    def online(self, t: float, query: int) -> np.ndarray | None:
        """Boolean mask, shape (num_clients,), of the clients online at virtual time ``t``
        (seconds); ``None`` means every client. ``t`` never decreases between calls;
        ``query`` grows by one per call."""

    def state(self) -> dict[str, Any]:
        """What ``online`` changed since construction, for a checkpoint: numpy arrays,
        numbers and plain containers (``fedsim.state``). A model whose ``online`` keeps
        state between calls must override this and :meth:`restore`."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` of a model built from the same spec and seed."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


def build_availability(spec: AvailabilitySpec, *, num_clients: int, seed: int) -> AvailabilityModel:
    """The availability model a ``[churn.availability]`` table selects by ``kind``."""
    return AVAILABILITY.get(spec.kind)(spec, num_clients=num_clients, seed=seed)


@AVAILABILITY.register("always")
class AlwaysOnline(AvailabilityModel):
    params = AlwaysAvailability

    def __init__(self, spec: AlwaysAvailability, *, num_clients: int, seed: int) -> None:
        super().__init__(spec, num_clients=num_clients, seed=seed)

    def online(self, t: float, query: int) -> np.ndarray | None:
        return None


@AVAILABILITY.register("bernoulli")
class BernoulliOnline(AvailabilityModel):
    params = BernoulliAvailability

    def __init__(self, spec: BernoulliAvailability, *, num_clients: int, seed: int) -> None:
        super().__init__(spec, num_clients=num_clients, seed=seed)
        rng = np_rng(seed, "bernoulli_p")
        self.p = beta_spread(spec.p_online, spec.concentration, num_clients, rng)

    def online(self, t: float, query: int) -> np.ndarray | None:
        return np_rng(self.seed, "bernoulli", query).random(self.num_clients) < self.p


@AVAILABILITY.register("markov")
class MarkovOnline(AvailabilityModel):
    params = MarkovAvailability

    def __init__(self, spec: MarkovAvailability, *, num_clients: int, seed: int) -> None:
        super().__init__(spec, num_clients=num_clients, seed=seed)
        n, s = num_clients, spec.spread
        rng = np_rng(seed, "markov_init")
        f = np.exp(s * rng.standard_normal(n) - s * s / 2) if s > 0 else np.ones(n)
        g = np.exp(s * rng.standard_normal(n) - s * s / 2) if s > 0 else np.ones(n)
        #: Per-client mean online / offline durations (virtual seconds).
        self.mean_on_s = spec.mean_on_s * f
        self.mean_off_s = spec.mean_off_s * g
        self._on, self._next = self._stationary(rng, np.arange(n), 0.0)
        self._rng = np_rng(seed, "markov_step")
        self._t = 0.0

    def _stationary(
        self, rng: np.random.Generator, idx: np.ndarray, t: float
    ) -> tuple[np.ndarray, np.ndarray]:
        on_s, off_s = self.mean_on_s[idx], self.mean_off_s[idx]
        on = rng.random(idx.size) < on_s / (on_s + off_s)
        return on, t + rng.exponential(1.0, idx.size) * np.where(on, on_s, off_s)

    def online(self, t: float, query: int) -> np.ndarray | None:
        if t < self._t:
            raise ValueError(f"markov availability queried at t={t} after t={self._t}")
        self._t = t
        far = np.flatnonzero(
            self._next < t - MARKOV_MIX_CYCLES * (self.mean_on_s + self.mean_off_s)
        )
        if far.size:
            self._on[far], self._next[far] = self._stationary(self._rng, far, t)
        idx = np.flatnonzero(self._next <= t)
        while idx.size:
            on = ~self._on[idx]
            self._on[idx] = on
            mean = np.where(on, self.mean_on_s[idx], self.mean_off_s[idx])
            self._next[idx] += self._rng.exponential(1.0, idx.size) * mean
            idx = idx[self._next[idx] <= t]
        return self._on.copy()

    def state(self) -> dict[str, Any]:
        return {
            "on": self._on,
            "next": self._next,
            "t": self._t,
            "rng": self._rng.bit_generator.state,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._on = np.asarray(state["on"], dtype=bool).copy()
        self._next = np.asarray(state["next"], dtype=np.float64).copy()
        self._t = float(state["t"])
        self._rng.bit_generator.state = state["rng"]


@AVAILABILITY.register("diurnal")
class DiurnalOnline(AvailabilityModel):
    params = DiurnalAvailability

    def __init__(self, spec: DiurnalAvailability, *, num_clients: int, seed: int) -> None:
        super().__init__(spec, num_clients=num_clients, seed=seed)
        self.spec = spec
        rng = np_rng(seed, "diurnal_phase")
        if spec.phase == "uniform":
            self.offset_h = rng.uniform(0.0, 24.0, size=num_clients)
        else:
            self.offset_h = spec.phase_mean_h + spec.phase_std_h * rng.standard_normal(num_clients)
        self._slot: int | None = None
        self._mask = np.zeros(0, dtype=bool)

    def p_online(self, t: float) -> np.ndarray:
        """Each client's online probability at virtual time ``t``."""
        s = self.spec
        hour = 24.0 * t / s.period_s + self.offset_h
        wave = (1.0 + np.cos(2.0 * np.pi * (hour - s.peak_h) / 24.0)) / 2.0
        return s.p_min + (s.p_max - s.p_min) * wave

    def online(self, t: float, query: int) -> np.ndarray | None:
        slot = math.floor(t / self.spec.slot_s)
        if slot != self._slot:  # the coordinator often asks several times per slot
            u = np_rng(self.seed, "diurnal", slot).random(self.num_clients)
            self._slot, self._mask = slot, u < self.p_online(slot * self.spec.slot_s)
        return self._mask.copy()


@AVAILABILITY.register("trace")
class TraceOnline(AvailabilityModel):
    """Replays online intervals; the query is vectorised over all intervals."""

    params = TraceAvailability

    def __init__(self, spec: TraceAvailability, *, num_clients: int, seed: int) -> None:
        super().__init__(spec, num_clients=num_clients, seed=seed)
        path = spec.path
        suffix = Path(path).suffix.lower()
        if suffix in (".pkl", ".pickle"):
            _fail(
                TRACE_KEY,
                f"{path}: pickle files are refused (fedsim never unpickles: it can run "
                "arbitrary code); convert the trace to JSON",
            )
        if suffix not in (".csv", ".json"):
            _fail(TRACE_KEY, f"{path}: expected a .csv or .json trace")
        # Interval i belongs to row owner[i]: a client (CSV) or a trace entry (JSON).
        self._period: np.ndarray | None = None  # per interval, JSON only
        if suffix == ".csv":
            self._owner, self._start, self._end = _read_trace_csv(path, num_clients)
            self._entries = num_clients
        else:
            self._owner, self._start, self._end, self._period, self._entries = _read_trace_json(
                path
            )

    def online(self, t: float, query: int) -> np.ndarray | None:
        x = t if self._period is None else np.mod(t, self._period)
        hit = self._owner[(self._start <= x) & (x < self._end)]
        on = np.zeros(self._entries, dtype=bool)
        on[hit] = True
        if self._entries == self.num_clients:
            return on
        return np.resize(on, self.num_clients)  # cyclic: client i uses entry i mod n


# ---------------------------------------------------------------- membership


class Membership:
    """Clients present in the population (joined and not yet left) at virtual time t."""

    def __init__(self, join_s: np.ndarray | None = None, leave_s: np.ndarray | None = None) -> None:
        self.join_s = join_s
        self.leave_s = leave_s

    def present(self, t: float) -> np.ndarray | None:
        """Boolean mask of the present clients; ``None`` means every client."""
        if self.join_s is None or self.leave_s is None:
            return None
        return (self.join_s <= t) & (t < self.leave_s)


def build_membership(spec: MembershipSection, *, num_clients: int, seed: int) -> Membership:
    """Join and leave times of every client, drawn once from the seed."""
    f, life, schedule = spec.initial_fraction, spec.mean_lifetime_s, spec.schedule
    if f >= 1 and life is None and schedule is None:
        return Membership()
    n = num_clients
    join = np.zeros(n)
    late = n - int(math.floor(f * n + 0.5))
    if late > 0:
        rng = np_rng(seed, "membership_join")
        join[rng.permutation(n)[:late]] = rng.uniform(0.0, spec.join_window_s, size=late)
    leave = np.full(n, np.inf)
    if life is not None:
        leave = join + np_rng(seed, "membership_leave").exponential(life, size=n)
    if schedule is not None:
        for cid, j, lv in _read_schedule(schedule, n):
            join[cid], leave[cid] = j, lv
    return Membership(join, leave)


# ---------------------------------------------------------------- file readers


def _fail(key: str, message: str) -> NoReturn:
    raise ScenarioError([(key, message)]) from None  # one line for people, no chained context


def _csv_rows(path: str, key: str, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells in ``columns`` order) for each non-blank data row."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            if sorted(header) != sorted(columns):
                _fail(
                    key,
                    f"{path}: line 1: header must be {','.join(columns)}, got "
                    f"{','.join(header) or '(empty)'}",
                )
            order = [header.index(c) for c in columns]
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(columns):
                    _fail(
                        key,
                        f"{path}: line {reader.line_num}: expected {len(columns)} fields, "
                        f"got {len(row)}",
                    )
                yield reader.line_num, [row[i].strip() for i in order]
    except FileNotFoundError:
        _fail(key, f"{path}: no such file")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        _fail(key, f"{path}: cannot read: {exc}")


def _client_id(text: str, num_clients: int, where: str, key: str) -> int:
    try:
        cid = int(text)
    except ValueError:
        _fail(key, f"{where}: client_id '{text}' is not an integer")
    if not 0 <= cid < num_clients:
        _fail(key, f"{where}: client_id {cid} out of range 0..{num_clients - 1}")
    return cid


def _seconds(text: str, name: str, where: str, key: str, *, allow_inf: bool = False) -> float:
    try:
        x = float(text)
    except ValueError:
        _fail(key, f"{where}: {name} '{text}' is not a number")
    if math.isnan(x) or (math.isinf(x) and not (allow_inf and x > 0)):
        _fail(key, f"{where}: {name} must be a finite number, got '{text}'")
    if x < 0:
        _fail(key, f"{where}: {name} must be >= 0, got {text}")
    return x


def _read_trace_csv(path: str, num_clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    owner: list[int] = []
    start: list[float] = []
    end: list[float] = []
    for line, (c, s, e) in _csv_rows(path, TRACE_KEY, TRACE_COLUMNS):
        where = f"{path}: line {line}"
        cid = _client_id(c, num_clients, where, TRACE_KEY)
        a = _seconds(s, "online_start_s", where, TRACE_KEY)
        b = _seconds(e, "online_end_s", where, TRACE_KEY, allow_inf=True)
        if a >= b:
            _fail(TRACE_KEY, f"{where}: online_start_s ({s}) must be < online_end_s ({e})")
        owner.append(cid)
        start.append(a)
        end.append(b)
    return np.asarray(owner, dtype=np.int64), np.asarray(start), np.asarray(end)


def _read_trace_json(
    path: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(TRACE_KEY, f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(TRACE_KEY, f"{path}: cannot read: {exc}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(TRACE_KEY, f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}")
    if not isinstance(raw, dict) or not raw:
        _fail(TRACE_KEY, f"{path}: line 1: expected a non-empty object {{client id: trace}}")

    def where(k: str) -> str:
        pos = text.find(json.dumps(k))
        return f"{path}: line {text.count(chr(10), 0, max(pos, 0)) + 1}: client '{k}'"

    ids: list[tuple[int, str]] = []
    for k in raw:
        try:
            ids.append((int(k), k))
        except ValueError:
            _fail(TRACE_KEY, f"{where(k)}: id is not an integer")
    ids.sort()
    owner: list[np.ndarray] = []
    start: list[np.ndarray] = []
    end: list[np.ndarray] = []
    period: list[np.ndarray] = []
    for entry, (_, k) in enumerate(ids):
        rec = raw[k]
        if not isinstance(rec, dict) or not {"active", "inactive", "finish_time"} <= set(rec):
            _fail(TRACE_KEY, f"{where(k)}: needs 'active', 'inactive' and 'finish_time'")
        try:
            a = np.asarray(rec["active"], dtype=np.float64)
            b = np.asarray(rec["inactive"], dtype=np.float64)
            fin = float(rec["finish_time"])
        except (TypeError, ValueError):
            _fail(TRACE_KEY, f"{where(k)}: 'active', 'inactive', 'finish_time' must be numbers")
        if a.ndim != 1 or a.shape != b.shape:
            _fail(TRACE_KEY, f"{where(k)}: 'active' and 'inactive' must be lists of equal length")
        if not (math.isfinite(fin) and fin > 0):
            _fail(TRACE_KEY, f"{where(k)}: 'finish_time' must be > 0")
        if not (np.isfinite(a).all() and np.isfinite(b).all()) or (a < 0).any():
            _fail(TRACE_KEY, f"{where(k)}: times must be finite and >= 0")
        if (a > b).any():
            _fail(TRACE_KEY, f"{where(k)}: an 'active' time exceeds its 'inactive' time")
        owner.append(np.full(a.size, entry, dtype=np.int64))
        start.append(a)
        end.append(b)
        period.append(np.full(a.size, fin))
    return (
        np.concatenate(owner),
        np.concatenate(start),
        np.concatenate(end),
        np.concatenate(period),
        len(ids),
    )


def _read_schedule(path: str, num_clients: int) -> list[tuple[int, float, float]]:
    rows: list[tuple[int, float, float]] = []
    seen: set[int] = set()
    for line, (c, j, lv) in _csv_rows(path, SCHEDULE_KEY, SCHEDULE_COLUMNS):
        where = f"{path}: line {line}"
        cid = _client_id(c, num_clients, where, SCHEDULE_KEY)
        if cid in seen:
            _fail(SCHEDULE_KEY, f"{where}: client_id {cid} listed twice")
        seen.add(cid)
        join = _seconds(j, "join_s", where, SCHEDULE_KEY)
        leave = _seconds(lv, "leave_s", where, SCHEDULE_KEY, allow_inf=True) if lv else math.inf
        if leave <= join:
            _fail(SCHEDULE_KEY, f"{where}: leave_s ({lv}) must be > join_s ({j})")
        rows.append((cid, join, leave))
    return rows
