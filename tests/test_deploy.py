"""Deployment helpers: TLS material, node keys in Flower's formats, the Flower App, process cleanup,
checkpoints, and (one real SuperLink) node authentication."""

from __future__ import annotations

import signal
import socket
import ssl
import sys
import threading
import time

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from secure_fedkim.deploy import (
    APP_DIR,
    APP_PYPROJECT,
    Deployment,
    commands,
    default_policy,
    descendants,
    init_layout,
    make_node_keys,
    make_tls,
    prepare_hospital,
    tagged_pids,
    write_app,
)
from secure_fedkim.federation.checkpoint import load_checkpoint, save_checkpoint
from secure_fedkim.federation.transports.secagg import is_secagg_message
from secure_fedkim.deploy.identity import load_signing_key
from secure_fedkim.deploy.policy import code_sha256, load_policy


def test_tls_certificate_chains_to_the_ca_and_serves_tls_on_localhost(tmp_path):
    files = make_tls(tmp_path, ("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(files.server_key.stat().st_mode & 0o777) == "0o600" and oct(files.ca_key.stat().st_mode & 0o777) == "0o600"

    # a real TLS handshake: a client trusting only our CA accepts the server at 127.0.0.1 and localhost
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(3)
    port = listener.getsockname()[1]

    def serve():
        for _ in range(3):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
        for name in ("127.0.0.1", "localhost"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=name) as s:
                    assert s.recv(2) == b"ok"
        other = make_tls(tmp_path / "other")  # a client that trusts another CA refuses the server
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                ssl.create_default_context(cafile=str(other.ca_cert)).wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        listener.close()
        thread.join(timeout=10)


def test_node_keys_are_what_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    keys = make_node_keys(tmp_path, "north")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert oct(keys.private_key.stat().st_mode & 0o777) == "0o600"
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    public = try_load_public_key(keys.public_key)  # what `flwr supernode register` does
    assert public == private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_flower_app_is_valid_and_names_our_apps(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    assert (APP_DIR / "pyproject.toml").read_text() == APP_PYPROJECT  # the example copy stays in sync
    app = write_app(tmp_path / "app")
    config = tomli.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "secure_fedkim.drivers.deploy_app:server", "clientapp": "secure_fedkim.drivers.deploy_app:client",
    }
    assert {"config", "run-dir", "keys-dir", "fault-crash-after-round"} <= set(config["tool"]["flwr"]["app"]["config"])


def test_client_routes_secagg_protocol_messages_and_message_api_ones(flower_identity):
    plain = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type="train")
    stage = Message(RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}), dst_node_id=1, message_type="train")
    fit = Message(RecordDict({"fitins.config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    assert not is_secagg_message(plain) and is_secagg_message(stage) and is_secagg_message(fit)


def test_checkpoint_round_trip_and_a_corrupt_one_is_refused(tmp_path):
    template = {"b.weight": torch.zeros(3), "a.bias": torch.zeros(2, 2)}
    state = {"b.weight": torch.arange(3.0), "a.bias": torch.ones(2, 2)}
    save_checkpoint(tmp_path, 2, ArrayRecord(state))
    r, arrays, meta = load_checkpoint(tmp_path, template)
    assert r == 2 and meta["run_id"] == tmp_path.name
    loaded = arrays.to_torch_state_dict()
    assert list(loaded) == list(template) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert load_checkpoint(tmp_path / "none", template) is None
    (tmp_path / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="does not match"):
        load_checkpoint(tmp_path, template)


def test_init_lays_out_a_deployment_and_its_commands(tmp_path):
    base = init_layout(tmp_path / "dep", ["north", "south"], port=9300)
    for h in ("north", "south"):
        assert (base / "node_keys" / f"{h}_auth").is_file() and (base / "server_keys" / f"{h}.pub").is_file()
        policy = load_policy(base / "hospitals" / h / "policy.yaml", load_signing_key(base / "hospitals" / h).public_key())
        assert policy.hospital == h and policy.approves(code_sha256())
    assert (base / "app" / "pyproject.toml").read_text() == APP_PYPROJECT
    text = (base / "COMMANDS.sh").read_text()
    assert text == commands(base, ["north", "south"], 9300)
    for flag in ("--enable-supernode-auth", "--ssl-certfile", "--root-certificates", "--auth-supernode-private-key",
                 "flwr supernode register", "flwr run"):
        assert flag in text
    assert 'policy="' in text and "127.0.0.1:9300" in (base / "cli" / "config.toml").read_text()


def test_process_cleanup_reaches_detached_descendants(tmp_path):
    """What Flower does (SuperExec in its own session) is what Deployment must still clean up."""
    d = Deployment(tmp_path, make_tls(tmp_path / "tls"))
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    try:
        proc = d._spawn("tree", [sys.executable, "-c", script], tmp_path / "home")
        deadline = time.time() + 30
        while len(descendants(proc.pid)) < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert len(tagged_pids(proc.tag)) == 2  # the process and its detached child carry the tag
        child = descendants(proc.pid)[0]
        proc.popen.send_signal(signal.SIGKILL)  # the parent dies first: the child is orphaned ...
        proc.popen.wait(timeout=10)
        assert tagged_pids(d.tag) == [child]  # ... and still found by its tag
    finally:
        d.close()
    assert tagged_pids(d.tag) == []


@pytest.fixture
def superlink(tmp_path):
    d = Deployment(tmp_path / "fed", make_tls(tmp_path / "tls"))
    try:
        d.start_superlink()
        yield d
    finally:
        d.close()
    assert tagged_pids(d.tag) == []


def test_superlink_admits_a_registered_node_and_refuses_an_unregistered_one(superlink, tmp_path):
    d = superlink
    home = tmp_path / "hospitals" / "north"
    policy = prepare_hospital("north", home, tmp_path / "keys", default_policy("north"))
    north = d.add_hospital("north", home, policy)
    node_id = d.register(north)
    d.start_supernode(north)
    online = d.wait_connected(1)
    assert [int(n["node-id"]) for n in online] == [node_id]

    stranger = d.add_hospital("mallory", tmp_path / "hospitals" / "mallory")  # keys made, never registered
    d.start_supernode(stranger)
    assert stranger.proc.popen.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in stranger.proc.log_tail(80)
    assert [int(n["node-id"]) for n in d.wait_connected(1, names=["north"])] == [node_id]


def test_a_tampered_policy_stops_the_node_before_it_starts(tmp_path):
    from secure_fedkim.deploy.policy import PolicySignatureError

    d = Deployment(tmp_path / "fed", make_tls(tmp_path / "tls"))
    try:
        home = tmp_path / "hospitals" / "south"
        policy = prepare_hospital("south", home, None, default_policy("south"))
        policy.write_text(policy.read_text().replace("max_target_epsilon: 8.0", "max_target_epsilon: 80.0"))
        node = d.add_hospital("south", home, policy)
        with pytest.raises(PolicySignatureError, match="changed after it was signed"):
            d.start_supernode(node)
        assert node.proc is None
    finally:
        d.close()


def test_deploy_commands_write_what_they_say(tmp_path, capsys):
    """`secure-fedkim deploy ...` subcommands (secure_fedkim.cli adds them with add_deploy_parser)."""
    import argparse

    from secure_fedkim.deploy import add_deploy_parser

    parser = argparse.ArgumentParser(prog="secure-fedkim")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv) -> list[str]:
        args = parser.parse_args(["deploy", *argv])
        assert args.func(args) == 0
        return capsys.readouterr().out.strip().splitlines()

    assert run("tls", str(tmp_path / "tls"))[-1] == f"TLS files written to {tmp_path / 'tls'}"
    assert run("node-keys", str(tmp_path / "keys"), "north")[-1].startswith("node keys written to")
    home = tmp_path / "north"
    out = run("hospital", "north", "--home", str(home), "--server-keys", str(tmp_path / "server"), "--max-epsilon", "3")
    assert out[-1] == f"hospital north written to {home}"
    assert (tmp_path / "server" / "north.pub").read_bytes() == load_signing_key(home).public_key().public_bytes_raw()
    out = run("check-policy", str(home / "policy.yaml"), "--home", str(home))
    assert "is approved" in out[-2] and '"max_target_epsilon": 3.0' in "\n".join(out)
    assert run("code-hash") == [code_sha256()]
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(
        "federation: {clients: [north, south], aggregation: he}\n"
        "tasks: {train: [{name: heart_disease, partition: iid}]}\n"
    )
    out = run("init", str(cfg), "--out", str(tmp_path / "dep"))
    assert out[-1].startswith(f"deployment laid out in {tmp_path / 'dep'}")
    assert (tmp_path / "dep" / "federation.yaml").read_text() == cfg.read_text()
