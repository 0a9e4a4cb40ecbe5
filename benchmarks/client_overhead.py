"""What a fedsim worker spends on a client beyond the work itself, in one process:
``python -m benchmarks.client_overhead [--workload tiny-100of1k] [--phases 30]``.

A ``ClientWorker`` (the Ray actor's body, here without Ray) runs a 100-client cohort's
training phase (folded, as the engine runs it) and its evaluation phase, ``--phases``
times each; the medians per client are set beside the work alone, done the way the
pure loop does it: load the global weights, draw the client's data, ``train_local``
(or draw the held-out data and ``evaluate_model``). ``--items`` also times the pieces
of the worker's path (each wrapped in a timer, which adds about a microsecond a call).
The process keeps freed model-sized buffers as a Ray worker does
(``fedsim.engine.malloc``); without that, every reply's buffers are mapped and unmapped
again (cnn: the update and its check 6.4 ms a client instead of 1.6).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _timed(totals: dict[str, float], name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    return timed


def _wrap_items(totals: dict[str, float]) -> None:
    import clients.app as app
    import clients.behaviour as behaviour
    import fedsim.engine.screening as screening
    import fedsim.engine.worker as worker

    for mod, name in (
        (app, "to_array_record"),
        (app, "_load_arrays"),
        (app, "_client_data"),
        (app, "instruction_config"),
        (app, "torch_generator"),
        (app, "Message"),
        (app, "MetricRecord"),
        (app, "RecordDict"),
        (behaviour, "train_local"),
        (behaviour, "evaluate_model"),
        (screening, "check_update"),
        (worker, "checked"),
    ):
        setattr(mod, name, _timed(totals, name, getattr(mod, name)))
    worker.ClientWorker.fold = staticmethod(_timed(totals, "fold", worker.ClientWorker.fold))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="tiny-100of1k")
    p.add_argument("--phases", type=int, default=30)
    p.add_argument("--items", action="store_true", help="time the worker path's pieces too")
    a = p.parse_args()

    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from benchmarks.workloads import WORKLOADS
    from clients.app import _env
    from clients.training import evaluate_model, train_local
    from fedsim.arrays import torch_state
    from fedsim.engine.coordinator import sample_clients
    from fedsim.engine.malloc import keep_freed_buffers
    from fedsim.engine.worker import ClientWorker
    from fedsim.rng import torch_generator

    keep_freed_buffers()  # (the workers' glibc thresholds: WORKER_ENV)
    totals: dict[str, float] = collections.defaultdict(float)
    if a.items:
        _wrap_items(totals)
    scn = WORKLOADS[a.workload].scenario(6)
    spec = scn.model_dump_json()
    worker = ClientWorker(spec, 1)
    worker.warm()
    env, c, seed = _env(spec), scn.client, scn.run.seed
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    cids = [int(k) for k in sample_clients(seed, 5, "train", scn.train_cohort, scn.num_clients)]
    record = ArrayRecord(env.model.state_dict())
    weights = torch_state(record)
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 5})})

    def phase(kind: str) -> list[tuple[int, Message]]:
        batch = []
        for cid in cids:
            m = Message(content, dst_node_id=cid, message_type=kind)
            m.metadata.__dict__["_message_id"] = f"m{cid}"
            batch.append((cid, m))
        return batch

    def train_alone() -> None:
        for cid in cids:
            env.model.load_state_dict(weights)
            x, y = env.federation.train_data(cid)
            g = torch_generator(seed, "batch", 5, cid)
            kw = {"lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay}
            train_local(
                env.model, x, y, epochs=c.epochs, batch_size=c.batch_size, generator=g, **kw
            )

    def evaluate_alone() -> None:
        env.model.load_state_dict(weights)
        for cid in cids:
            x, y = env.federation.test_data(cid)
            evaluate_model(env.model, x, y, batch_size=c.eval_batch_size)

    train, evaluate = phase(MessageType.TRAIN), phase(MessageType.EVALUATE)
    cases = {
        "training, worker": lambda: worker.run(0, scn.num_clients, train, 0),
        "training, the work alone": train_alone,
        "evaluation, worker": lambda: worker.run(0, scn.num_clients, evaluate),
        "evaluation, the work alone": evaluate_alone,
    }
    for f in cases.values():  # (warm)
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    items: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(a.phases):
        totals.clear()
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) / len(cids))
        for name, t in totals.items():
            items[name].append(t / len(cids))
    print(f"{a.workload}: median µs per client over {a.phases} phases of {len(cids)} clients")
    for name, ts in times.items():
        print(f"  {name:<28}{statistics.median(ts) * 1e6:8.0f}")
    if a.items:
        print("  the worker path's pieces (median µs per client, both phases' calls):")
        med = {name: statistics.median(ts) for name, ts in items.items()}
        for name, t in sorted(med.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<26}{t * 1e6:8.1f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
