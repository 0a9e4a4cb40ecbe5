"""``fedsim run | validate | schema | credentials | node | export | app``: parse arguments, call the library, map errors to exits.

Exit codes: 0 success; 1 the run failed; 2 a bad scenario or bad arguments (one line per
problem, naming the file and key path); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim import __version__
from fedsim.errors import ScenarioError

if TYPE_CHECKING:
    from fedsim.runner import RunOutcome

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


EXIT_TERMINATED = 143


_terminated = False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the run directory is marked incomplete.

    A flag, not an exception subclass: Ray re-raises interrupts as plain KeyboardInterrupt.
    """
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _print_problems(source: str, exc: ScenarioError) -> None:
    for line in exc.lines():
        print(f"{source}: {line}" if source else f"fedsim: {line}", file=sys.stderr)


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (
        exc.__context__ is not None and not exc.__suppress_context__
    ):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsim", description="Federated learning simulator.")
    p.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario (default: scenarios/quickstart.toml)")
    run.add_argument("scenario", nargs="?", help="scenario TOML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set run.rounds=3 (repeatable)",
    )
    run.add_argument("--out", type=Path, help="run directory (default runs/<name>-<UTC time>)")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the unfinished run DIR (left as DIR.incomplete) from its last "
        "checkpoint and finish it into DIR; the scenario is the one in that folder",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no per-round progress")

    val = sub.add_parser("validate", help="check scenario files without running them")
    val.add_argument("files", nargs="+", help="scenario TOML files")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sch = sub.add_parser("schema", help="print the scenario JSON Schema")
    sch.add_argument("--out", type=Path, help="write to a file instead of stdout")
    sch.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="include a plug-in's registrations, as run.plugins does (repeatable)",
    )

    cred = sub.add_parser(
        "credentials",
        help="make a CA, the SuperLink's TLS certificate and SuperNode keys (a lab's)",
    )
    cred.add_argument("dir", type=Path, help="new folder to write (never overwritten)")
    cred.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a name or address the nodes dial the SuperLink at (repeatable; "
        "default 127.0.0.1 and localhost)",
    )
    cred.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs (default 3)")
    cred.add_argument("--days", type=int, default=365, help="validity (default 365 days)")

    node = sub.add_parser(
        "node", help="run a client node: a Flower SuperNode with fedsim's ClientApp"
    )
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="Fleet API")
    node.add_argument(
        "--partition-id",
        type=int,
        required=True,
        help="this node's client id: with the scenario's partitions, the partition it "
        "trains on; with --data, the id the coordinator knows it by",
    )
    node.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="train on this machine's own data folder (train.npz and test.npz with "
        "arrays x and y) instead of the scenario's partition; the coordinator's "
        "scenario must say deployment.client_data = 'local'",
    )
    node.add_argument("--root-certificates", type=Path, metavar="CA.pem", help="CA to trust")
    node.add_argument(
        "--key", type=Path, metavar="PRIVATE_KEY", help="the node's key (credentials nodes/node-K)"
    )
    node.add_argument(
        "--insecure", action="store_true", help="no TLS (a throw-away local test only)"
    )
    node.add_argument("--port", type=int, help="the node's local Runtime API port (default free)")
    node.add_argument(
        "--poll",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="how often an idle node asks the SuperLink for work (default 0.5; Flower's "
        "own SuperNode: 3, which adds seconds to every round)",
    )
    node.add_argument(
        "--rejoin-wait",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="how long a refused activation is tried again (a restarted node is still "
        "online for the SuperLink for about a minute; default 90)",
    )

    exp = sub.add_parser(
        "export",
        help="write clients' partitions of a scenario's dataset as data folders "
        "(what fedsim node --data reads)",
    )
    exp.add_argument("scenario", help="scenario TOML file")
    exp.add_argument("dir", type=Path, help="new folder to write: DIR/client-K per client")
    exp.add_argument(
        "--partition-id",
        dest="clients",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="a client to export (repeatable; default every client)",
    )
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    fapp = sub.add_parser(
        "app",
        help="write a Flower app directory that runs a scenario with Flower's own tools "
        "(flwr run DIR, on a flower-superlink you started)",
    )
    fapp.add_argument("scenario", help="scenario TOML file")
    fapp.add_argument(
        "dir", type=Path, help="new folder to write (its name: letters, digits, hyphens)"
    )
    fapp.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        metavar="DIR",
        help="where each run's folder goes on the machine that runs the ServerApp (the "
        "SuperLink's): DIR/<run.name>-<Flower run id> (default ./runs, made absolute)",
    )
    fapp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _cmd_export(args: argparse.Namespace) -> int:
    from fedsim.data import load_federation
    from fedsim.data.local import LocalDataError, export_client
    from fedsim.results import cannot_create
    from fedsim.scenario import load_scenario

    try:
        scn = load_scenario(args.scenario, args.overrides)
    except ScenarioError as exc:
        _print_problems(args.scenario, exc)
        return EXIT_BAD_INPUT
    n = scn.num_clients
    clients = args.clients or list(range(n))
    bad = [k for k in clients if not 0 <= k < n]
    if bad:
        print(
            f"fedsim export: --partition-id {bad[0]}: the scenario has clients 0..{n - 1}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.dir.exists():
        print(f"fedsim export: {args.dir}: exists already (nothing was written)", file=sys.stderr)
        return EXIT_BAD_INPUT
    why = cannot_create(args.dir)
    if why is not None:
        print(f"fedsim export: cannot create {args.dir}: {why}", file=sys.stderr)
        return EXIT_BAD_INPUT
    fed = load_federation(scn.data, seed=scn.run.seed)
    tmp = args.dir.with_name(f".{args.dir.name}.partial")
    try:
        for k in sorted(set(clients)):
            export_client(fed.train_data(k), fed.test_data(k), tmp / f"client-{k}")
        tmp.rename(args.dir)
    except (LocalDataError, OSError) as exc:
        print(f"fedsim export: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
    print(f"{args.dir}: {len(set(clients))} client data folder(s), client-K/{{train,test}}.npz")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    import re

    from fedsim.deploy.superlink import app_pyproject
    from fedsim.engine.server import reply_limit
    from fedsim.results import cannot_create
    from fedsim.runner import _calibrate, prepare, resolve_paths
    from fedsim.scenario import load_scenario

    name = args.dir.resolve().name
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,99}", name):
        print(
            f"fedsim app: {args.dir}: Flower needs the app folder's name to start with a "
            "letter and hold only letters, digits and hyphens",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.dir.is_dir() and any(args.dir.iterdir()):
        print(
            f"fedsim app: {args.dir}: exists and is not empty (nothing was written)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    why = cannot_create(args.dir)
    if why is not None:
        print(f"fedsim app: cannot create {args.dir}: {why}", file=sys.stderr)
        return EXIT_BAD_INPUT
    flower = ["simulation.engine=deployment", "deployment.superlink=flower"]
    try:
        scn = resolve_paths(load_scenario(args.scenario, [*args.overrides, *flower]))
        # The nodes read the scenario from the run config: a noise multiplier calibrated
        # to privacy.target_epsilon must be in it already.
        prep = prepare(scn)
        scn = _calibrate(scn, prep, None)
    except ScenarioError as exc:
        _print_problems(args.scenario, exc)
        return EXIT_BAD_INPUT
    limit = reply_limit(scn, prep.federation)
    text = app_pyproject(scn.model_dump_json(), name=name, runs=str(args.runs.resolve()))
    args.dir.mkdir(parents=True, exist_ok=True)
    tmp = args.dir / ".pyproject.toml.partial"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.dir / "pyproject.toml")
    print(
        f"{args.dir}/pyproject.toml: Flower app of scenario '{scn.run.name}' "
        f"({scn.num_clients} clients; run folders in {args.runs.resolve()}); start it with "
        f"`flwr run {args.dir} CONNECTION` (a SuperLink connection of Flower's config); "
        f"for a SuperLink that refuses replies over this scenario's limit, start it as "
        f"`python -m fedsim.deploy.fleet --max-message-bytes {limit}` followed by "
        "flower-superlink's flags"
    )
    return 0


def _cmd_credentials(args: argparse.Namespace) -> int:
    from fedsim.deploy.credentials import make_credentials
    from fedsim.results import cannot_create

    hosts = args.hosts or ["127.0.0.1", "localhost"]
    why = None if args.dir.exists() else cannot_create(args.dir)
    if why is not None:
        print(f"fedsim credentials: cannot create {args.dir}: {why}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        creds = make_credentials(args.dir, hosts=hosts, nodes=args.nodes, days=args.days)
    except (FileExistsError, ValueError) as exc:
        print(f"fedsim credentials: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"{creds.root}: CA ca.pem, SuperLink certificate superlink.pem for {', '.join(hosts)}, "
        f"{args.nodes} SuperNode key pairs in nodes/ (node-K private, node-K.pub to register)"
    )
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    import warnings

    from fedsim.data.local import LocalDataError, load_local_data
    from fedsim.deploy.config import split_address
    from fedsim.deploy.node import NodeOptions, problems, run_node

    if args.data is not None:
        try:
            local = load_local_data(args.data)
        except LocalDataError as exc:
            print(f"fedsim node: --data: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(
            f"fedsim node: data folder {local.folder}: {len(local.y)} training and "
            f"{len(local.y_test)} held-out examples of shape {list(local.input_shape)}",
            file=sys.stderr,
        )
    opts = NodeOptions(
        superlink=args.superlink,
        partition_id=args.partition_id,
        data_dir=None if args.data is None else args.data.resolve(),
        root_certificates=args.root_certificates,
        auth_key=args.key,
        insecure=args.insecure,
        port=args.port,
        rejoin_wait_s=args.rejoin_wait,
        idle_poll_s=args.poll,
    )
    bad = problems(opts)
    try:
        split_address(args.superlink)
    except ValueError as exc:
        bad.append(f"--superlink: {exc}")
    for line in bad:
        print(f"fedsim node: {line}", file=sys.stderr)
    if bad:
        return EXIT_BAD_INPUT
    if args.insecure:
        warnings.warn("fedsim node --insecure: no TLS, plain-text gRPC", stacklevel=1)
    code = run_node(opts)
    # A task cut short (its SuperNode gone mid-push) leaves Flower's HTTP retries in
    # pool threads that the interpreter would wait for at exit, a minute or more after
    # a SIGTERM. Every process the node started has ended by now: it leaves at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.runner import prepare, resolve_paths
    from fedsim.scenario import load_scenario

    bad = 0
    for f in args.files:
        try:
            prepare(resolve_paths(load_scenario(f, args.overrides)))
        except ScenarioError as exc:
            _print_problems(f, exc)
            bad += 1
        else:
            print(f"{f}: ok")
    return EXIT_BAD_INPUT if bad else 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from fedsim.plugins import load_plugins
    from fedsim.scenario import json_schema

    try:
        load_plugins(args.plugins, key="--plugin")
    except ScenarioError as exc:
        _print_problems("", exc)
        return EXIT_BAD_INPUT
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fedsim.progress import Progress, start_line
    from fedsim.results import check_out_dir
    from fedsim.runner import execute
    from fedsim.scenario import default_scenario_path, load_scenario

    if args.resume is not None:
        return _cmd_resume(args)
    source = args.scenario or str(default_scenario_path())
    try:
        if args.out is not None:
            check_out_dir(args.out)
    except ScenarioError as exc:
        _print_problems("", exc)
        return EXIT_BAD_INPUT
    try:
        scn = load_scenario(source, args.overrides)
    except ScenarioError as exc:
        _print_problems(source, exc)
        return EXIT_BAD_INPUT
    progress = Progress(scn.run.rounds, quiet=args.quiet)
    progress.message(start_line(scn, f"engine {scn.simulation.engine}"))
    try:
        outcome = execute(scn, out=args.out, progress=progress)
    except ScenarioError as exc:
        _print_problems(source, exc)
        return EXIT_BAD_INPUT
    _print_outcome(outcome)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from fedsim.progress import Progress
    from fedsim.runner import resume

    extra = [
        name
        for name, given in (
            ("a scenario file", args.scenario),
            ("--set", args.overrides),
            ("--out", args.out),
        )
        if given
    ]
    if extra:
        _print_problems(
            "",
            ScenarioError(
                [("--resume", f"takes the scenario and folder from DIR: drop {', '.join(extra)}")]
            ),
        )
        return EXIT_BAD_INPUT
    progress = Progress(0, quiet=args.quiet)
    try:
        outcome = resume(args.resume, progress=progress)
    except ScenarioError as exc:
        _print_problems("", exc)
        return EXIT_BAD_INPUT
    _print_outcome(outcome)
    return 0


def _print_outcome(outcome: RunOutcome) -> None:
    from fedsim.progress import headline

    s = outcome.summary
    acc, loss = headline(s)  # the summary uses the per-round record's key names
    if s["eval_accuracy"] is not None:
        kind = "centralized"
    elif acc is not None:
        kind = "client-side"
    else:
        kind = "no evaluation configured"
    shown = "n/a" if acc is None else f"{acc:.4f}"
    shown_loss = "n/a" if loss is None else f"{loss:.4f}"
    print(
        f"final accuracy {shown} ({kind}, loss {shown_loss}) after {s['rounds_completed']} "
        f"rounds in {s['wall_s']:.1f} s; results in {outcome.out_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = os.environ.get("FEDSIM_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        commands = {
            "run": _cmd_run,
            "validate": _cmd_validate,
            "schema": _cmd_schema,
            "credentials": _cmd_credentials,
            "node": _cmd_node,
            "export": _cmd_export,
            "app": _cmd_app,
        }
        return commands[args.command](args)
    except KeyboardInterrupt as exc:
        notes = " ".join(getattr(exc, "__notes__", []))
        terminated = _terminated
        print(
            f"fedsim: {'terminated' if terminated else 'interrupted'} {notes}".rstrip(),
            file=sys.stderr,
        )
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as exc:  # a failed run: one line, the traceback only on request
        if debug:
            raise
        notes = " ".join(getattr(exc, "__notes__", []))
        root = _innermost(exc)
        cause = f" (cause: {type(root).__name__}: {root})" if root is not exc else ""
        print(
            f"fedsim: error: {type(exc).__name__}: {exc}{cause} {notes}".rstrip(), file=sys.stderr
        )
        print("fedsim: set FEDSIM_DEBUG=1 for the traceback", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
