"""The scenario's ``[deployment]`` table: how ``simulation.engine = "deployment"`` runs the
coordinator on a real SuperLink with the clients on real SuperNodes."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field

from fedsim.sections import Section

__all__ = ["DeploymentSection", "check_deployment", "split_address"]


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{address}' is not HOST:PORT")
    return host.strip("[]"), int(port)


class DeploymentSection(Section):
    superlink: Literal["fedsim", "flower"] = Field(
        "fedsim",
        description="Who starts the SuperLink and the run: 'fedsim' (`fedsim run` starts "
        "a SuperLink with the settings below and drives the run itself) or 'flower' "
        "(Flower's own tools: a `flower-superlink` you started, the run submitted with "
        "`flwr run` of the app directory `fedsim app` writes; the SuperLink's own flags "
        "then set TLS and node authentication, and the settings below up to node_keys "
        "are not used).",
    )
    fleet_address: str = Field(
        "127.0.0.1:9092",
        description="Where the SuperLink's Fleet API (gRPC) listens for SuperNodes, "
        "HOST:PORT: an address of the coordinator's machine that the client machines "
        "reach (0.0.0.0 for every interface). The SuperLink's HTTP API (Control and "
        "Runtime) is bound to 127.0.0.1 whatever this says.",
    )
    credentials: str | None = Field(
        None,
        description="Folder made by `fedsim credentials` (ca.pem, superlink.pem, "
        "superlink.key, nodes/*.pub): TLS for every link and the SuperNode keys to "
        "register. Required unless insecure = true.",
    )
    insecure: bool = Field(
        False,
        description="Run without TLS and without node authentication (plain-text gRPC, "
        "any node may join): for a throw-away test on one machine only; fedsim warns.",
    )
    node_auth: bool = Field(
        True,
        description="SuperNode authentication: only nodes whose public key is registered "
        "may join (Flower's node keys); keys are read from node_keys.",
    )
    node_keys: str | None = Field(
        None,
        description="Folder of the SuperNodes' public keys (*.pub, OpenSSH format) to "
        "register; default: the credentials folder's nodes/.",
    )
    client_data: Literal["partitions", "local"] = Field(
        "partitions",
        description="Whose data the nodes train on: 'partitions' (each node serves its "
        "`--partition-id` of the scenario's dataset: a deployment checked against its "
        "simulation) or 'local' (each node's own folder, `fedsim node --data DIR`: the "
        "real case). With 'local' the coordinator cannot know the nodes' data sizes, "
        "so coordinator.max_examples must cap the example counts they report, and "
        "[data] only declares the model's input shape and classes (and the server's "
        "test set).",
    )
    wait_for_nodes_s: float = Field(
        120.0,
        gt=0,
        description="Wall-clock seconds to wait for every client's node to connect before "
        "the first round; fewer ends the run with an error (exit 1).",
    )
    round_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Wall-clock seconds a round's phase waits for its replies; a node that "
        "has not replied by then (crashed, killed, disconnected, too slow) counts as "
        "dropped and the round goes on with the others.",
    )
    http_port: int | None = Field(
        None,
        ge=1,
        lt=65536,
        description="Port of the SuperLink's HTTP API on 127.0.0.1; default: a free one.",
    )


def check_deployment(d: DeploymentSection) -> list[tuple[str, str]]:
    """Problems of a ``[deployment]`` table that a run would meet (files included)."""
    problems: list[tuple[str, str]] = []
    if d.superlink == "flower":  # (Flower's SuperLink: its own flags say all that)
        return problems
    try:
        host, _ = split_address(d.fleet_address)
        if host not in ("localhost", "0.0.0.0", "::"):
            ipaddress.ip_address(host)
    except ValueError as e:
        problems.append(("deployment.fleet_address", f"{e} (an IP address and a port)"))
    if d.insecure:
        if d.credentials is not None:
            problems.append(("deployment.credentials", "not used with insecure = true"))
        return problems
    if d.credentials is None:
        problems.append(
            (
                "deployment.credentials",
                "required (make a folder with `fedsim credentials DIR`), or insecure = true",
            )
        )
        return problems
    root = Path(d.credentials)
    for name in ("ca.pem", "superlink.pem", "superlink.key"):
        if not (root / name).is_file():
            problems.append(("deployment.credentials", f"{root / name} does not exist"))
    keys = Path(d.node_keys) if d.node_keys is not None else root / "nodes"
    if d.node_auth and not any(keys.glob("*.pub")):
        problems.append(
            (
                "deployment.node_keys" if d.node_keys is not None else "deployment.credentials",
                f"no SuperNode public key (*.pub) in {keys}: no node could join",
            )
        )
    return problems
