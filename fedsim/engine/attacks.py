"""Omniscient attacks at the coordinator (``fedsim.attack_params``).

Attacks such as ALIE and IPM craft their update from the round's honest updates. In
simulation the coordinator plays the colluding attackers: it collects the round's
training replies unfolded (fedsim's workers neither pre-fold nor screen them then),
replaces each attacker's arrays with ``w_t`` plus the crafted update, and only then
validates, transforms and aggregates every reply, the same on both engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord

from fedsim.arrays import array_view, to_array
from fedsim.attack_params import AttackParams, Update
from fedsim.engine.fold import array_record, with_model
from fedsim.engine.validation import check_update
from fedsim.rng import np_rng

if TYPE_CHECKING:
    from fedsim.engine.coordinator import Replies


def craft_replies(
    attack: AttackParams,
    attackers: frozenset[int],
    replies: Replies,
    server_round: int,
    seed: int,
) -> None:
    """Replace the attackers' replies in ``replies.ordered`` with the crafted one."""
    base = array_record(replies.msgs[0].content) if replies.msgs else None
    if base is None:
        return
    floats = [k for k, a in base.items() if np.issubdtype(np.dtype(a.dtype), np.floating)]
    honest: list[Update] = []
    malicious: list[int] = []
    for i, (cid, r) in enumerate(zip(replies.cids, replies.ordered, strict=True)):
        if r is None or r.has_error():
            continue
        if cid in attackers:
            malicious.append(i)
            continue
        try:  # an honest reply that is invalid tells the attackers nothing
            update = check_update(array_record(r.content), base)
        except ValueError:
            continue
        honest.append({k: update[k] for k in floats})
    if not malicious:
        return
    rng = np_rng(seed, "attack.round", server_round)
    crafted = attack.craft_round(honest, len(malicious), len(malicious) + len(honest), rng)
    if crafted is None:
        return
    new = {}
    for k in floats:
        w = array_view(base[k])
        new[k] = to_array((w + crafted[k]).astype(w.dtype))
    for i in malicious:
        reply = replies.ordered[i]
        assert reply is not None
        own = array_record(reply.content)
        arrays = ArrayRecord({k: new.get(k, a) for k, a in (own or base).items()})
        reply.content = with_model(reply.content, arrays)
