"""Running the federation on Flower's deployment engine: one SuperLink, one SuperNode per hospital.

What this module gives (all with `cryptography` and the `flwr` commands of flwr 1.42):

* TLS material: a private CA (`ca.pem`), and a SuperLink server certificate for the addresses the
  hospitals dial (`127.0.0.1`/`localhost` by default), signed by that CA (`make_tls`).
* Node authentication keys as Flower 1.42 expects them: one NIST P-384 EC key pair per hospital, the
  private key in OpenSSH format (`flower-supernode --auth-supernode-private-key`), the public key as an
  OpenSSH `ecdsa-sha2-nistp384 ...` line (`flwr supernode register <key.pub>`) (`make_node_keys`).
* Process helpers that start a SuperLink (`--enable-supernode-auth`, TLS on all its APIs), register
  the hospitals' public keys, start SuperNodes with their own keys and node config
  (`hospital=<name> state-dir=<dir> policy=<path>`), submit a run with `flwr run`, and stop every
  process they started (`Deployment`).

In flwr 1.42 the Fleet, Control and Runtime APIs are served over HTTPS on one port of the SuperLink
(`--host/--port`); a SuperNode authenticates every Fleet request by signing a timestamp with its EC
key, and the SuperLink accepts only public keys registered through the Control API.

Modules: ``credentials`` (TLS and node keys), ``hospital`` (code snapshot, policy, a hospital's home),
``processes`` (process trees), ``federation`` (:class:`Deployment`), ``app`` (the Flower App),
``layout`` (directory layout, COMMANDS.sh, :func:`run_local`) and ``cli`` (``secure-fedkim deploy``).
"""

from secure_fedkim.deploy.app import APP_DIR, APP_PYPROJECT, write_app
from secure_fedkim.deploy.cli import add_deploy_parser
from secure_fedkim.deploy.credentials import NodeKeys, TLSFiles, make_node_keys, make_tls
from secure_fedkim.deploy.federation import Deployment, HospitalNode
from secure_fedkim.deploy.hospital import default_policy, prepare_hospital, snapshot_code
from secure_fedkim.deploy.layout import commands, init_layout, run_local
from secure_fedkim.deploy.processes import DeployError, Proc, descendants, free_port, tagged_pids

__all__ = [
    "APP_DIR", "APP_PYPROJECT", "DeployError", "Deployment", "HospitalNode", "NodeKeys", "Proc", "TLSFiles",
    "add_deploy_parser", "commands", "default_policy", "descendants", "free_port", "init_layout",
    "make_node_keys", "make_tls", "prepare_hospital", "run_local", "snapshot_code", "tagged_pids", "write_app",
]
