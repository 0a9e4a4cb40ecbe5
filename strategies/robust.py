"""Byzantine-robust aggregation rules (Flower implementations).

Papers:

- FedMedian, FedTrimmedAvg: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
- Krum, Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, arXiv:1703.02757.
- Bulyan: El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed
  Learning in Byzantium", ICML 2018, arXiv:1802.07927.

Assumptions: n clients reply per round (the cohort), of which at most f =
``num_malicious_nodes`` are Byzantine. All rules here ignore "num-examples" when
combining models (they are order statistics or selections, so ``weighted_mean`` is
False); the train metrics are still "num-examples"-weighted means (over the selected
replies for the Krum family and Bulyan). Flower's median, trimmed mean and Bulyan pop
the arrays out of the reply messages while aggregating.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from pydantic import Field

from .base import SAMPLE_ALL_SHOWN_NODES, STRATEGIES, FlowerStrategyParams

_F_DESCRIPTION = "Number f of Byzantine (malicious) clients the rule must tolerate per round."


def _krum_problems(*, name: str, f: int, cohort_size: int) -> list[tuple[str, str]]:
    # Krum scores each update by its n - f - 2 nearest neighbours; Blanchard et al.
    # prove resilience only for 2f + 2 < n. (Flower silently uses one neighbour instead.)
    if cohort_size > 2 * f + 2:
        return []
    return [
        (
            "strategy.num_malicious_nodes",
            f"{name} with num_malicious_nodes = {f} needs more than 2f + 2 = {2 * f + 2} "
            f"clients replying per round (Blanchard et al. 2017), but the cohort is "
            f"{cohort_size}",
        )
    ]


@STRATEGIES.register("fedmedian")
class FedMedianParams(FlowerStrategyParams):
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498).

    Each coordinate of the new model is the (unweighted) median of that coordinate over
    the n client models; with n even, the mean of the two middle values.
    """

    weighted_mean: ClassVar[bool] = False

    name: Literal["fedmedian"] = Field("fedmedian", description="Coordinate-wise median.")

    def build(self, *, client_lr: float) -> Strategy:
        return FedMedian(**SAMPLE_ALL_SHOWN_NODES)


@STRATEGIES.register("fedtrimmedavg")
class FedTrimmedAvgParams(FlowerStrategyParams):
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv:1803.01498).

    For each coordinate, drop the floor(beta n) largest and floor(beta n) smallest client
    values and average the rest (unweighted). With beta n < 1 nothing is trimmed.
    """

    weighted_mean: ClassVar[bool] = False

    name: Literal["fedtrimmedavg"] = Field(
        "fedtrimmedavg", description="Coordinate-wise trimmed mean."
    )
    beta: float = Field(
        0.2,
        ge=0.0,
        lt=0.5,
        description="Fraction beta of client values cut from each tail, in [0, 0.5).",
    )

    def build(self, *, client_lr: float) -> Strategy:
        return FedTrimmedAvg(**SAMPLE_ALL_SHOWN_NODES, beta=self.beta)


@STRATEGIES.register("krum")
class KrumParams(FlowerStrategyParams):
    """Krum (Blanchard et al. 2017, arXiv:1703.02757).

    Scores each client model by the sum of squared distances to its n - f - 2 nearest
    other models and returns the model with the lowest score. Requires n > 2f + 2.
    """

    weighted_mean: ClassVar[bool] = False

    name: Literal["krum"] = Field("krum", description="Krum selection of one client model.")
    num_malicious_nodes: int = Field(0, ge=0, description=_F_DESCRIPTION)

    def build(self, *, client_lr: float) -> Strategy:
        return Krum(**SAMPLE_ALL_SHOWN_NODES, num_malicious_nodes=self.num_malicious_nodes)

    def check(self, *, cohort_size: int) -> list[tuple[str, str]]:
        return super().check(cohort_size=cohort_size) + _krum_problems(
            name=self.name, f=self.num_malicious_nodes, cohort_size=cohort_size
        )


@STRATEGIES.register("multikrum")
class MultiKrumParams(FlowerStrategyParams):
    """Multi-Krum (Blanchard et al. 2017, arXiv:1703.02757).

    Scores client models as Krum does and returns the "num-examples"-weighted mean of the
    m = ``num_nodes_to_select`` best-scoring ones (m = 1 is Krum). Requires n > 2f + 2
    and m <= n.
    """

    weighted_mean: ClassVar[bool] = False

    name: Literal["multikrum"] = Field(
        "multikrum", description="Multi-Krum: average of the m best Krum-scored models."
    )
    num_malicious_nodes: int = Field(0, ge=0, description=_F_DESCRIPTION)
    num_nodes_to_select: int = Field(
        1,
        ge=1,
        description="Number m of best-scoring client models averaged (1 = Krum).",
    )

    def build(self, *, client_lr: float) -> Strategy:
        return MultiKrum(
            **SAMPLE_ALL_SHOWN_NODES,
            num_malicious_nodes=self.num_malicious_nodes,
            num_nodes_to_select=self.num_nodes_to_select,
        )

    def check(self, *, cohort_size: int) -> list[tuple[str, str]]:
        problems = super().check(cohort_size=cohort_size) + _krum_problems(
            name=self.name, f=self.num_malicious_nodes, cohort_size=cohort_size
        )
        if self.num_nodes_to_select > cohort_size:
            problems.append(
                (
                    "strategy.num_nodes_to_select",
                    f"multikrum cannot select {self.num_nodes_to_select} client models "
                    f"when only {cohort_size} reply per round",
                )
            )
        return problems


@STRATEGIES.register("bulyan")
class BulyanParams(FlowerStrategyParams):
    """Bulyan (El Mhamdi et al. 2018, arXiv:1802.07927).

    Selects theta = n - 2f models by Krum score, then for each coordinate averages the
    beta = theta - 2f = n - 4f selected values closest to their coordinate-wise median
    (unweighted). Requires n >= 4f + 3; below that Flower returns no aggregate.
    Deviation from the paper, inherited from Flower: the theta models are the theta best
    single-pass Krum scores (Multi-Krum), not theta iterated Krum selections with removal.
    """

    weighted_mean: ClassVar[bool] = False

    name: Literal["bulyan"] = Field("bulyan", description="Bulyan robust aggregation.")
    num_malicious_nodes: int = Field(0, ge=0, description=_F_DESCRIPTION)

    def build(self, *, client_lr: float) -> Strategy:
        return Bulyan(**SAMPLE_ALL_SHOWN_NODES, num_malicious_nodes=self.num_malicious_nodes)

    def check(self, *, cohort_size: int) -> list[tuple[str, str]]:
        problems = super().check(cohort_size=cohort_size)
        f = self.num_malicious_nodes
        if cohort_size < 4 * f + 3:
            problems.append(
                (
                    "strategy.num_malicious_nodes",
                    f"bulyan with num_malicious_nodes = {f} needs at least 4f + 3 = "
                    f"{4 * f + 3} clients replying per round (El Mhamdi et al. 2018), "
                    f"but the cohort is {cohort_size}",
                )
            )
        return problems
