"""Benchmark workloads: each is a scenario (as --set overrides of bench_tiny.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedsim.scenario import Scenario, load_scenario

BENCH_TINY = Path(__file__).resolve().parents[1] / "scenarios" / "bench_tiny.toml"


@dataclass(frozen=True)
class Workload:
    name: str
    overrides: tuple[str, ...] = ()
    contenders: tuple[str, ...] = ("pure", "pure2", "fedsim", "flower")
    note: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # Rounds per run when --rounds is not given (default: ``base``'s, else 6).
    rounds: int | None = None
    # A workload whose fedsim round time is read as a ratio to ``base``'s: the harness
    # runs the two side by side in every repetition (in alternating order), and the
    # ratio is the median of the per-repetition ratios, so drift in the machine's speed
    # over a long run cannot pass for a cost.
    base: str | None = None

    def default_rounds(self) -> int | None:
        """Rounds per run when --rounds is not given: its own, else its base's."""
        return self.rounds or (WORKLOADS[self.base].rounds if self.base else None)

    def scenario(self, rounds: int, engine: str = "fedsim") -> Scenario:
        return load_scenario(
            BENCH_TINY, [*self.overrides, f"run.rounds={rounds}", f"simulation.engine={engine}"]
        )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "tiny-100of1k",
            note="logreg 784-10, 50 ex/client, B=10, E=1; 100 of 1,000",
            # 10 steady rounds a run (a round takes ~0.1 s), so one slow round moves
            # the median of a run less than with 4; so for the workloads read against it.
            rounds=12,
        ),
        Workload(
            "tiny-1kof1k",
            ("strategy.clients_per_round=1000",),
            contenders=("pure", "fedsim", "flower"),
            note="as tiny, all 1,000 clients every round",
        ),
        Workload(
            "mlp",
            ("model.name=mlp", "model.hidden=[128]"),
            contenders=("pure", "fedsim", "flower"),
            note="MLP 784-128-10, otherwise as tiny-100of1k",
        ),
        Workload(
            "cnn",
            (
                "model.name=cnn",
                "data.input_shape=[1,28,28]",
                "data.num_clients=100",
                "strategy.clients_per_round=20",
            ),
            contenders=("pure", "pure2", "fedsim"),
            note="McMahan CNN on 28x28, 50 ex/client, B=10, E=1; 20 of 100 (compute-bound)",
            # Rounds of two busy cores vary by +-5% here: more of them steady the median.
            rounds=10,
        ),
        Workload(
            "tiny-100of1M",
            ("data.num_clients=1000000",),
            contenders=("fedsim",),
            note="as tiny-100of1k with a population of 1,000,000",
            base="tiny-100of1k",
        ),
        Workload(
            "tiny-dp",
            (
                "privacy.dp.mode=central",
                "privacy.dp.clip_norm=1.0",
                "privacy.dp.noise_multiplier=1.0",
                "privacy.delta=1e-5",
            ),
            contenders=("fedsim",),
            note="as tiny-100of1k with central DP (clip, equal weights, noise, RDP per "
            "round); the same fixed-size cohorts, so its round time compares with tiny's",
            base="tiny-100of1k",
        ),
        Workload(
            "mlp-dpsgd",
            (
                "model.name=mlp",
                "model.hidden=[128]",
                "privacy.dp.mode=sample",
                "privacy.dp.clip_norm=1.0",
                "privacy.dp.noise_multiplier=1.0",
                "privacy.delta=1e-5",
            ),
            contenders=("fedsim",),
            note="as mlp with record-level DP-SGD (Opacus) in every client's training: "
            "`dpsgd_over_mlp` is its round time over mlp's",
            base="mlp",
        ),
        Workload(
            "fixed",
            (
                "strategy.clients_per_round=2",
                "data.samples_per_client=1",
                "data.test_samples_per_client=1",
            ),
            contenders=("fedsim",),
            note="2 clients of 1,000 with 1 example each: the round time is the fixed cost",
        ),
        Workload(
            "smoke",
            ("data.num_clients=4", "strategy.clients_per_round=2"),
            note="CI smoke test of the harness: 2 of 4 clients",
        ),
    )
}

QUICK = ("tiny-100of1k", "tiny-1kof1k", "cnn", "tiny-100of1M", "fixed")
FULL = (
    "tiny-100of1k",
    "tiny-1kof1k",
    "mlp",
    "cnn",
    "tiny-100of1M",
    "fixed",
    "tiny-dp",
    "mlp-dpsgd",
)
