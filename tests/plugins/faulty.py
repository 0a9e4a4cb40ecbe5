"""A client behaviour ("faulty") whose named clients reply what a broken or hostile
client could: non-finite or misshapen arrays, wrong dtypes, missing or extra arrays,
bad example counts, non-finite metrics. A plug-in file (``run.plugins``) shared by the
validation tests of every engine, deployment included."""

from typing import Literal

import numpy as np
from pydantic import Field

from clients.behaviour import Outcome, SgdClient
from fedsim.client_params import CLIENTS


def _broken(arrays, fault):
    first = next(iter(arrays))
    a = arrays[first]
    if fault == "nan":
        a.flat[0] = np.nan
    elif fault == "inf":
        a.flat[-1] = np.inf
    elif fault == "shape (1,)":
        arrays[first] = np.ones(1, a.dtype)
    elif fault == "shape ()":
        arrays[first] = np.asarray(1.0, a.dtype)
    elif fault == "float64":
        arrays[first] = a.astype(np.float64)
    elif fault == "complex":
        arrays[first] = a.astype(np.complex64)
    elif fault == "missing":
        del arrays[first]
    elif fault == "extra":
        arrays["bogus"] = np.ones(2, np.float32)
    return arrays


WEIGHTS = {"negative": -299, "zero": 0, "1e12": 1e12, "fraction": 2.5}


@CLIENTS.register("faulty")
class FaultyClient(SgdClient):
    """Local SGD, except that the clients named in ``faults`` reply what it says, or
    fail (raise) instead when ``fail_instead``: the run without their replies."""

    behaviour: Literal["faulty"] = "faulty"
    faults: dict[str, str] = Field(default_factory=dict)
    fail_instead: bool = False

    def train(self, task):
        out = super().train(task)
        fault = self.faults.get(str(task.cid), "")
        if not fault or fault.startswith("eval "):
            return out
        if self.fail_instead:
            raise RuntimeError("left out")
        state = task.model.state_dict()
        arrays = {k: v.detach().numpy().copy() for k, v in state.items()}
        metrics = dict(out.metrics)
        if fault == "metric nan":
            metrics["train_loss"] = float("nan")
        n = WEIGHTS.get(fault, out.num_examples)
        return Outcome(n, metrics, arrays=_broken(arrays, fault))

    def evaluate(self, task):
        out = super().evaluate(task)
        fault = self.faults.get(str(task.cid), "")
        if not fault.startswith("eval "):
            return out
        if self.fail_instead:
            raise RuntimeError("left out")
        if fault == "eval nan":
            return Outcome(out.num_examples, {**out.metrics, "eval_loss": float("nan")})
        return Outcome(10**6, out.metrics)  # eval huge
