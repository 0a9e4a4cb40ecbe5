"""`fedsim credentials` and the checks of a deployment's settings (no processes)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsim.deploy.credentials import make_credentials, node_public_keys
from fedsim.deploy.node import NodeOptions, node_argv
from fedsim.deploy.superlink import SCENARIO_KEY, fab_bytes
from fedsim.errors import ScenarioError
from fedsim.scenario import load_scenario

from .conftest import cli


def test_the_lab_credentials_chain_and_keys(tmp_path):
    creds = make_credentials(tmp_path / "c", hosts=["10.1.2.3", "coord.lab"], nodes=2)
    ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),  # where the coordinator reaches it
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.lab", "localhost"}
    key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (creds.server_key, tmp_path / "c" / "ca.key", creds.node_key(0)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # Node keys: OpenSSH, ECDSA P-384, as Flower's SuperNode and `flwr supernode register`
    # read them; the public half is what the SuperLink registers.
    node = serialization.load_ssh_private_key(creds.node_key(1).read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    pems = node_public_keys(tmp_path / "c" / "nodes")
    assert sorted(pems) == ["node-0", "node-1"]
    registered = serialization.load_pem_public_key(pems["node-1"])
    assert registered.public_numbers() == node.public_key().public_numbers()


def test_credentials_are_never_overwritten_nor_left_half_written(tmp_path):
    make_credentials(tmp_path / "c", hosts=["127.0.0.1"], nodes=1)
    before = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError):
        make_credentials(tmp_path / "c", hosts=["127.0.0.1"], nodes=1)
    assert before == {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    with pytest.raises(ValueError):
        make_credentials(tmp_path / "d", hosts=["127.0.0.1"], nodes=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_public_key_that_flower_would_not_take_is_named(tmp_path):
    (tmp_path / "bad.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKz...\n")
    with pytest.raises(ValueError, match="bad.pub"):
        node_public_keys(tmp_path)


def test_the_credentials_command(tmp_path):
    r = cli("credentials", "lab", "--host", "10.0.0.5", "--nodes", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "lab" / "nodes").iterdir()) == [
        "node-0",
        "node-0.pub",
        "node-1",
        "node-1.pub",
    ]
    r = cli("credentials", "lab", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "fedsim credentials: lab already exists (credentials are never overwritten)"
    ]


BAD = [
    (["deployment.insecure=false"], "deployment.credentials", "required"),
    (["deployment.credentials=nowhere"], "deployment.credentials", "does not exist"),
    (["deployment.fleet_address=example"], "deployment.fleet_address", "HOST:PORT"),
    (["deployment.insecure=true", "deployment.credentials=x"], "deployment.credentials", ""),
    (["churn.availability.kind=diurnal"], "churn.availability.kind", "no virtual clock"),
    (["simulation.num_workers=2", "deployment.insecure=true"], "simulation.num_workers", ""),
]


@pytest.mark.parametrize(("sets", "key", "words"), BAD)
def test_bad_deployment_settings_name_their_key(sets, key, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScenarioError) as e:
        load_scenario(None, ["simulation.engine=deployment", *sets])
    assert any(p == key and words in m for p, m in e.value.problems), e.value.problems


def test_deployment_keys_are_ignored_by_the_other_engines():
    # (so the file that is deployed can be simulated unchanged; its [deployment]
    # settings are only checked with the deployment engine)
    scn = load_scenario(None, ["deployment.insecure=true", "deployment.fleet_address=bad"])
    assert scn.simulation.engine == "fedsim" and scn.deployment.insecure


def test_a_node_with_no_ca_or_a_missing_key_exits_2(tmp_path):
    r = cli("node", "--superlink", "127.0.0.1:9092", "--partition-id", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "fedsim node: --root-certificates CA.pem is required (or --insecure, for a test)"
    )
    r = cli(
        "node",
        "--superlink",
        "127.0.0.1",
        "--partition-id",
        "0",
        "--root-certificates",
        "ca.pem",
        "--key",
        "k",
        "--port",
        "70000",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "fedsim node: --root-certificates: ca.pem does not exist",
        "fedsim node: --key: k does not exist",
        "fedsim node: --port must be between 1 and 65535, got 70000",
        "fedsim node: --superlink: '127.0.0.1' is not HOST:PORT",
    ]


def test_the_node_runs_its_tasks_in_process_with_tls_and_its_key(tmp_path):
    argv = node_argv(
        NodeOptions(
            superlink="10.0.0.1:9092",
            partition_id=4,
            root_certificates=tmp_path / "ca.pem",
            auth_key=tmp_path / "node-4",
            port=9100,
        )
    )
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[argv.index("--node-config") + 1] == "partition-id=4"
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node-4")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" not in argv


def test_the_run_bundle_carries_the_scenario_as_text(tmp_path):
    import io
    import json
    import tomllib
    import zipfile

    scn = load_scenario(None, ["simulation.engine=deployment", "deployment.insecure=true"])
    spec = scn.model_dump_json()
    with zipfile.ZipFile(io.BytesIO(fab_bytes(spec))) as z:
        names = z.namelist()
        pyproject = tomllib.loads(z.read("pyproject.toml").decode())
    assert "pyproject.toml" in names and not any(n.endswith((".py", ".pkl")) for n in names)
    apps = pyproject["tool"]["flwr"]["app"]
    assert apps["components"]["clientapp"] == "clients.deployed:app"
    assert json.loads(apps["config"][SCENARIO_KEY]) == json.loads(spec)


def test_the_supernodes_idle_wait_is_shortened_in_the_pinned_flower():
    """fedsim node's SuperNode asks for work every --poll seconds, not Flower's 3: the
    two waits it shortens must still be where fedsim.deploy.supernode expects them."""
    code = (
        "import time\n"
        "from fedsim.deploy.supernode import patch\n"
        "assert patch(0.2)\n"
        "import flwr.supernode.start_client_internal as sci\n"
        "t = time.perf_counter(); sci.time.sleep(3); idle = time.perf_counter() - t\n"
        "t = time.perf_counter(); sci.time.sleep(0.5); reply = time.perf_counter() - t\n"
        "assert 0.2 <= idle < 1 and reply < 0.1, (idle, reply)\n"
        "assert sci.time.monotonic() > 0  # the rest of time is time's\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_sigusr1_prints_the_supernodes_stacks_and_it_goes_on(tmp_path):
    """``kill -USR1`` on a SuperNode of fedsim node's prints every thread's stack on its
    output (how to see what a node that stopped taking work waits on), and the SuperNode
    keeps running. (It dials a port where nothing listens: it retries for ever.)"""
    import os
    import signal
    import time

    from fedsim.deploy.processes import free_port

    log = tmp_path / "supernode.log"
    argv = [sys.executable, "-m", "fedsim.deploy.supernode", "--idle-poll", "0.5"]
    argv += ["--insecure", "--superlink", f"127.0.0.1:{free_port()}"]
    argv += ["--port", str(free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Connection attempt failed" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while "most recent call first" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert "Current thread" in text and "start_client_internal" in text, text[-3000:]
        time.sleep(1)
        assert proc.poll() is None, "the SuperNode ended after SIGUSR1"
    finally:
        proc.kill()
        proc.wait(timeout=30)
