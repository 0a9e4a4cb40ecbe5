"""FedProx Synthetic(alpha, beta): the generator of Li et al. 2020.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks" (FedProx), MLSys 2020, arXiv:1812.06127, section 5.1; the reference generator
is ``data/synthetic_*/generate_synthetic.py`` and ``data/synthetic_iid/generate_iid.py``
of github.com/litian96/FedProx. For user k (``N(m, s)`` has standard deviation ``s``,
as in ``numpy.random.normal``):

- ``n_k = int(lognormal(4, 2)) + 50`` samples;
- ``u_k ~ N(0, alpha)`` (mean of ``W_k`` and of ``b_k``), ``B_k ~ N(0, beta)``;
- ``v_k ~ N(B_k, 1)`` per feature, ``Sigma = diag(j^-1.2)``, ``j = 1..60``;
- ``W_k ~ N(u_k, 1)`` of shape (60, 10), ``b_k ~ N(u_k, 1)`` of shape (10,);
- ``x ~ N(v_k, Sigma)``, ``y = argmax(softmax(x W_k + b_k))``;
- shuffled, first ``int(0.9 * n_k)`` to train, the rest to test.

alpha controls how much the local models differ, beta how much the local inputs differ.
The IID variant follows ``generate_iid.py``: ``v_k = 0`` for every user and one global
``W, b ~ N(0, 1)``; alpha and beta are unused there.

Same distribution as the reference, not the same numbers: the reference draws from
numpy's global legacy generator; here every draw comes from the ``rng`` passed in, and
``x`` uses ``v + sqrt(diag Sigma) * z`` (equal in law to ``multivariate_normal`` for a
diagonal ``Sigma``). Labels use ``argmax`` of the logits (softmax is monotone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from fedsim.data.federation import DATASETS, Federation
from fedsim.rng import np_rng
from fedsim.sections import Section

#: Fraction of each user's samples that go to training, as in the reference repo.
TRAIN_FRACTION = 0.9


@dataclass(frozen=True, eq=False)
class SyntheticParams:
    """The drawn parameters of Synthetic(alpha, beta) for ``U`` users.

    Attributes:
        samples_per_user: int64 ``(U,)``, ``int(lognormal(4, 2)) + 50``.
        u: ``(U,)`` mean of each user's ``W_k`` and ``b_k`` entries.
        B: ``(U,)`` mean of each user's feature means ``v_k``.
        v: ``(U, d)`` feature means.
        W: ``(U, d, C)`` weights; ``b``: ``(U, C)`` biases.
        sigma_diag: ``(d,)`` the diagonal of the feature covariance, ``j^-1.2``.
    """

    samples_per_user: np.ndarray
    u: np.ndarray
    B: np.ndarray
    v: np.ndarray
    W: np.ndarray
    b: np.ndarray
    sigma_diag: np.ndarray

    @property
    def num_users(self) -> int:
        return int(self.samples_per_user.shape[0])


def draw_synthetic_params(
    *,
    alpha: float,
    beta: float,
    num_users: int,
    iid: bool,
    rng: np.random.Generator,
    dimension: int = 60,
    num_classes: int = 10,
) -> SyntheticParams:
    """Draw sizes, priors and per-user models (no samples) in the reference's order."""
    d, c = dimension, num_classes
    samples = rng.lognormal(4, 2, num_users).astype(np.int64) + 50
    sigma_diag = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2)
    if iid:
        u = np.zeros(num_users)
        big_b = np.zeros(num_users)
        v = np.zeros((num_users, d))
        w_global = rng.normal(0, 1, (d, c))
        b_global = rng.normal(0, 1, c)
        w = np.broadcast_to(w_global, (num_users, d, c))
        b = np.broadcast_to(b_global, (num_users, c))
    else:
        u = rng.normal(0, alpha, num_users)
        big_b = rng.normal(0, beta, num_users)
        v = rng.normal(big_b[:, None], 1, (num_users, d))
        w = rng.normal(u[:, None, None], 1, (num_users, d, c))
        b = rng.normal(u[:, None], 1, (num_users, c))
    return SyntheticParams(
        samples_per_user=samples, u=u, B=big_b, v=v, W=w, b=b, sigma_diag=sigma_diag
    )


def sample_user(
    params: SyntheticParams, k: int, *, rng: np.random.Generator, num_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw user ``k``'s examples: ``x ~ N(v_k, Sigma)``, ``y = argmax(x W_k + b_k)``.

    ``num_samples`` defaults to the user's drawn ``n_k``. Returns float64 ``x`` of shape
    ``(n, d)`` and int64 ``y`` of shape ``(n,)``.
    """
    n = int(params.samples_per_user[k]) if num_samples is None else num_samples
    d = params.sigma_diag.size
    x = params.v[k] + np.sqrt(params.sigma_diag) * rng.standard_normal((n, d))
    y = np.argmax(x @ params.W[k] + params.b[k], axis=1).astype(np.int64)
    return x, y


def generate_synthetic(
    *,
    alpha: float,
    beta: float,
    num_users: int,
    iid: bool,
    rng: np.random.Generator,
    dimension: int = 60,
    num_classes: int = 10,
) -> tuple[list[np.ndarray], list[np.ndarray], SyntheticParams]:
    """Synthetic(alpha, beta) of FedProx: per-user ``x`` (float64) and ``y`` (int64).

    Returns ``(xs, ys, params)``: one array per user, in user order, unshuffled.
    """
    params = draw_synthetic_params(
        alpha=alpha,
        beta=beta,
        num_users=num_users,
        iid=iid,
        rng=rng,
        dimension=dimension,
        num_classes=num_classes,
    )
    xs, ys = [], []
    for k in range(num_users):
        x, y = sample_user(params, k, rng=rng)
        xs.append(x)
        ys.append(y)
    return xs, ys, params


@DATASETS.register("synthetic")
class SyntheticData(Section):
    """FedProx Synthetic(alpha, beta) (arXiv:1812.06127): one client per generated user."""

    dataset: Literal["synthetic"] = Field(
        "synthetic", description="Dataset name: FedProx Synthetic(alpha, beta)."
    )
    num_clients: int = Field(30, ge=1, description="Number of users (= clients) to generate.")
    alpha: float = Field(
        1.0, ge=0, description="Std of u_k, the mean of each user's W_k and b_k (model skew)."
    )
    beta: float = Field(
        1.0, ge=0, description="Std of B_k, the mean of each user's feature means (input skew)."
    )
    iid: bool = Field(
        False,
        description="Synthetic-IID (generate_iid.py): zero feature means and one global "
        "W, b; alpha and beta are then unused.",
    )

    def load(self, *, seed: int) -> Federation:
        """Generate the users; each keeps its first 90% (after a shuffle) for training.

        The server test split is the concatenation of every user's 10% (copies).
        Randomness: ``np_rng(seed, "data.synthetic")`` for the generator and
        ``np_rng(seed, "data.synthetic.shuffle", k)`` for user k's shuffle.
        """
        xs, ys, _ = generate_synthetic(
            alpha=self.alpha,
            beta=self.beta,
            num_users=self.num_clients,
            iid=self.iid,
            rng=np_rng(seed, "data.synthetic"),
        )
        train_idx, test_idx = [], []
        offset = 0
        for k, x in enumerate(xs):
            n = x.shape[0]
            perm = np_rng(seed, "data.synthetic.shuffle", k).permutation(n)
            xs[k], ys[k] = x[perm], ys[k][perm]
            train_len = int(TRAIN_FRACTION * n)
            train_idx.append(np.arange(offset, offset + train_len, dtype=np.int64))
            test_idx.append(np.arange(offset + train_len, offset + n, dtype=np.int64))
            offset += n
        x_all = np.concatenate(xs).astype(np.float32)
        y_all = np.concatenate(ys)
        held = np.concatenate(test_idx)
        return Federation(
            x=x_all,
            y=y_all,
            train_idx=tuple(train_idx),
            test_idx=tuple(test_idx),
            x_test=x_all[held],
            y_test=y_all[held],
            num_classes=10,
            input_shape=(x_all.shape[1],),
        )
