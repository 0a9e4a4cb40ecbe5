"""Scenario tables of the simulated world: ``[churn]`` (who is online, who drops out,
who joins and leaves) and ``[system]`` (how fast each device computes and communicates).

The engine's grid simulates them on a virtual clock (``fedsim.world``); the
``[coordinator]`` table (``fedsim.engine.policy``) says what the coordinator does about it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedsim.registry import Registry, Variants
from fedsim.sections import Section

# ---------------------------------------------------------------- availability models


class AlwaysAvailability(Section):
    """Every client that is a member of the population is online all the time."""

    kind: Literal["always"] = "always"


class BernoulliAvailability(Section):
    """Each client is online at each round's start with probability p, independently."""

    kind: Literal["bernoulli"] = "bernoulli"
    p_online: float = Field(0.5, gt=0, le=1, description="Mean probability of being online.")
    concentration: float | None = Field(
        None,
        gt=0,
        description="Per-client heterogeneity: client i's p_i ~ Beta(p*c, (1-p)*c) (mean p; "
        "smaller c = more spread). Default: every client has p_online.",
    )


class MarkovAvailability(Section):
    """Two-state on/off process in virtual time with exponential on and off durations."""

    kind: Literal["markov"] = "markov"
    mean_on_s: float = Field(3600.0, gt=0, description="Mean online duration (virtual seconds).")
    mean_off_s: float = Field(3600.0, gt=0, description="Mean offline duration (virtual seconds).")
    spread: float = Field(
        0.0,
        ge=0,
        description="Per-client heterogeneity: each client's mean durations are the configured "
        "means times a lognormal factor with this sigma (mean 1). 0 = identical clients.",
    )


class DiurnalAvailability(Section):
    """Online probability follows a daily cycle shifted by each client's phase (time zone)."""

    kind: Literal["diurnal"] = "diurnal"
    period_s: float = Field(86400.0, gt=0, description="Cycle length (virtual seconds).")
    p_min: float = Field(0.1, ge=0, le=1, description="Online probability at the cycle's trough.")
    p_max: float = Field(0.9, ge=0, le=1, description="Online probability at the cycle's peak.")
    peak_h: float = Field(
        3.0, ge=0, lt=24, description="Local hour of the peak (e.g. 3 = at night, charging)."
    )
    phase: Literal["uniform", "normal"] = Field(
        "uniform",
        description="Distribution of client phases (time-zone offsets): 'uniform' over the "
        "cycle, or 'normal' around phase_mean_h with phase_std_h.",
    )
    phase_mean_h: float = Field(0.0, description="Mean offset (hours) for phase = 'normal'.")
    phase_std_h: float = Field(3.0, ge=0, description="Offset spread (hours) for phase = 'normal'.")
    slot_s: float = Field(
        900.0,
        gt=0,
        description="A client's on/off draw holds for a slot of this many virtual seconds.",
    )

    @model_validator(mode="after")
    def _order(self) -> DiurnalAvailability:
        if self.p_min > self.p_max:
            raise ValueError(f"p_min ({self.p_min}) > p_max ({self.p_max})")
        return self


class TraceAvailability(Section):
    """Online intervals read from a file (a relative path is from the working directory)."""

    kind: Literal["trace"] = "trace"
    path: str = Field(
        description="CSV with a header 'client_id,online_start_s,online_end_s' (one row per "
        "online interval; clients without rows are never online), or a FedScale client "
        "behaviour trace converted to JSON ({id: {active: [...], inactive: [...], "
        "finish_time: s}}; client i uses the i-th entry, cyclically, as FedScale does)."
    )


# Availability models (``fedsim.world.availability``) register under their ``kind``;
# each names its parameter class (above) as ``params``.
AVAILABILITY: Registry[Any] = Registry(
    "availability model", key="kind", default="always", params=lambda model: model.params
)
# The [churn.availability] table: a union of every registered availability model.
AvailabilitySpec = Annotated[Section, Variants(AVAILABILITY)]


class DropoutSection(Section):
    p: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a client that took a training task vanishes before "
        "replying; its reply fails at the moment it would have arrived.",
    )
    concentration: float | None = Field(
        None,
        gt=0,
        description="Per-client heterogeneity: client i's p_i ~ Beta(p*c, (1-p)*c). "
        "Default: every client has p.",
    )


class MembershipSection(Section):
    """Clients that join the population late or leave it for good."""

    initial_fraction: float = Field(
        1.0, gt=0, le=1, description="Fraction of clients present at virtual time 0."
    )
    join_window_s: float = Field(
        0.0,
        ge=0,
        description="The other clients join at times uniform over [0, join_window_s].",
    )
    mean_lifetime_s: float | None = Field(
        None,
        gt=0,
        description="Each client leaves for good after an exponential lifetime with this mean "
        "(from its join time). Default: nobody leaves.",
    )
    schedule: str | None = Field(
        None,
        description="CSV 'client_id,join_s,leave_s' (leave_s empty = never) overriding the "
        "above for the clients it lists.",
    )


class ChurnSection(Section):
    """Client churn: availability, mid-round dropouts, joins and leaves."""

    availability: AvailabilitySpec = Field(default_factory=AlwaysAvailability)
    dropout: DropoutSection = Field(default_factory=DropoutSection)
    membership: MembershipSection = Field(default_factory=MembershipSection)

    @property
    def active(self) -> bool:
        """Anything but the always-online, never-failing, fixed population."""
        m = self.membership
        return (
            self.availability.kind != "always"
            or self.dropout.p > 0
            or m.initial_fraction < 1
            or m.mean_lifetime_s is not None
            or m.schedule is not None
        )


# ---------------------------------------------------------------- device heterogeneity


class FixedDist(Section):
    kind: Literal["fixed"] = "fixed"
    value: float = Field(gt=0, description="The same value for every client.")


class UniformDist(Section):
    kind: Literal["uniform"] = "uniform"
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> UniformDist:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        return self


class LognormalDist(Section):
    kind: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0, description="Median value.")
    sigma: float = Field(1.0, ge=0, description="Standard deviation of the log.")


DISTRIBUTIONS: Registry[type[Section]] = Registry("distribution", key="kind", default="fixed")
for _name, _cls in (("fixed", FixedDist), ("uniform", UniformDist), ("lognormal", LognormalDist)):
    DISTRIBUTIONS.add(_name, _cls)
DistSpec = Annotated[Section, Variants(DISTRIBUTIONS)]


class StragglerSection(Section):
    """Transient slowness: each round a fraction of the selected clients runs slower."""

    fraction: float = Field(
        0.0, ge=0, le=1, description="Fraction of each round's selected clients that straggle."
    )
    slowdown_min: float = Field(1.0, ge=1, description="Smallest slowdown factor.")
    slowdown_max: float = Field(
        1.0, ge=1, description="Largest slowdown factor (uniform between min and max)."
    )

    @model_validator(mode="after")
    def _order(self) -> StragglerSection:
        if self.slowdown_min > self.slowdown_max:
            raise ValueError(
                f"slowdown_min ({self.slowdown_min}) > slowdown_max ({self.slowdown_max})"
            )
        return self


class SystemSection(Section):
    """Device heterogeneity. A client's virtual round time is
    model_bytes / download + samples x epochs / speed + update_bytes / upload."""

    compute: Literal["samples", "epochs"] = Field(
        "samples",
        description="'samples': compute time = samples x epochs / speed (speed in samples/s). "
        "'epochs': compute time = epochs / speed (speed in local epochs/s, whatever the "
        "client's data size), as in the FedProx paper's straggler simulation.",
    )
    speed: DistSpec = Field(
        default_factory=lambda: FixedDist(value=1000.0),
        description="Training speed: samples (or epochs, see compute) per second.",
    )
    download: DistSpec = Field(
        default_factory=lambda: FixedDist(value=1e7),
        description="Download bandwidth in bytes per second.",
    )
    upload: DistSpec = Field(
        default_factory=lambda: FixedDist(value=1e7),
        description="Upload bandwidth in bytes per second.",
    )
    profiles: str | None = Field(
        None,
        description="CSV of device profiles with columns samples_per_s, download_Bps, "
        "upload_Bps and optionally client_id; without client_id each client draws a row "
        "(seeded). Overrides speed/download/upload.",
    )
    stragglers: StragglerSection = Field(default_factory=StragglerSection)


# ---------------------------------------------------------------- coordinator policies


class CoordinatorSection(Section):
    """Policies the coordinator wraps around any strategy (times are virtual seconds)."""

    sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="How training clients are drawn each round among the online ones: "
        "'fixed', K distinct clients uniformly (without replacement); 'poisson', each "
        "independently with probability q = K / data.num_clients, so the cohort's size "
        "varies (the sampling DP accounting amplifies best). K = strategy.clients_per_round "
        "(times over_commit).",
    )
    over_commit: float = Field(
        1.0,
        ge=1,
        description="Select ceil(K x over_commit) online clients and aggregate the first K "
        "replies to arrive (K = strategy.clients_per_round).",
    )
    deadline_s: float | None = Field(
        None, gt=0, description="Round deadline; replies after it are stragglers ('late')."
    )
    straggler_policy: Literal["drop", "partial"] = Field(
        "drop",
        description="'drop': late clients are not aggregated. 'partial': a client that cannot "
        "finish by the deadline returns the local steps it completed by then (FedProx-style "
        "variable local work); one that completes none is late.",
    )
    min_replies: int = Field(
        1,
        ge=1,
        description="Fewer aggregated replies than this skips the round (model unchanged).",
    )
    min_round_s: float = Field(
        0.0,
        ge=0,
        description="A round lasts at least this long (a server that starts rounds on a schedule).",
    )
    max_wait_s: float = Field(
        86400.0,
        gt=0,
        description="Longest virtual wait for min_replies clients to be online; then the run "
        "ends with an error.",
    )
    wait_step_s: float = Field(
        60.0, gt=0, description="How often a waiting coordinator checks who is online again."
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        description="Largest num-examples a client's reply may claim; a reply above it is "
        "rejected. Simulation also caps each client at its own shard size.",
    )
    max_reply_bytes: int | None = Field(
        None,
        ge=1024,
        description="Largest reply in bytes; a larger one is rejected ('exceeds the "
        "limit') where it arrives, before its contents are read (fedsim's workers: before "
        "it is sent to the coordinator). Default: the model's size plus 1 MiB.",
    )

    @property
    def active(self) -> bool:
        return (
            self.over_commit > 1
            or self.deadline_s is not None
            or self.min_replies > 1
            or self.min_round_s > 0
        )
