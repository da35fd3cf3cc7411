"""`secure-fedkim deploy ...` subcommands."""

from __future__ import annotations

import json
from pathlib import Path

from secure_fedkim.deploy.credentials import make_node_keys, make_tls
from secure_fedkim.deploy.hospital import default_policy, prepare_hospital
from secure_fedkim.deploy.layout import init_layout, run_local


def add_deploy_parser(sub) -> None:
    """`secure-fedkim deploy ...` (for secure_fedkim.cli: `add_deploy_parser(sub)` next to the other commands)."""
    p = sub.add_parser("deploy", help="Flower deployment engine: TLS, node keys, hospital policies, local runs")
    dsub = p.add_subparsers(dest="deploy_command", required=True)

    t = dsub.add_parser("tls", help="a private CA and the SuperLink's server certificate")
    t.add_argument("out", type=Path)
    t.add_argument("--host", action="append", help="address the hospitals dial (repeat); default 127.0.0.1, localhost")
    t.add_argument("--days", type=int, default=365)
    t.set_defaults(func=_cmd_tls)

    k = dsub.add_parser("node-keys", help="a SuperNode authentication key pair (EC P-384, OpenSSH format)")
    k.add_argument("out", type=Path)
    k.add_argument("name")
    k.set_defaults(func=_cmd_node_keys)

    h = dsub.add_parser("hospital", help="onboard a hospital: signing key, public key for the federation, signed policy")
    h.add_argument("name")
    h.add_argument("--home", type=Path, required=True, help="the hospital's state dir (keys, ledger)")
    h.add_argument("--server-keys", type=Path, help="copy the public signing key here (what the aggregator verifies)")
    h.add_argument("--policy", type=Path, help="sign this policy file instead of writing the default one")
    h.add_argument("--max-epsilon", type=float, default=8.0)
    h.add_argument("--max-delta", type=float, default=1e-5)
    h.add_argument("--modes", default="he,secagg", help="allowed aggregation modes, comma-separated")
    h.set_defaults(func=_cmd_hospital)

    c = dsub.add_parser("check-policy", help="verify a hospital's signed policy and print it")
    c.add_argument("policy", type=Path)
    c.add_argument("--home", type=Path, required=True, help="the hospital's state dir (its key verifies the policy)")
    c.set_defaults(func=_cmd_check_policy)

    dsub.add_parser("code-hash", help="sha256 of the installed secure_fedkim + privacy sources").set_defaults(func=_cmd_code_hash)

    i = dsub.add_parser("init", help="lay out TLS, node keys, hospitals and the flwr connection; print the commands")
    i.add_argument("config", type=Path, help="the federation's YAML config (its clients are the hospitals)")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--port", type=int, default=9093)
    i.add_argument("--host", action="append")
    i.set_defaults(func=_cmd_init)

    r = dsub.add_parser("local", help="run a federation on this machine's deployment engine (SuperLink + SuperNodes)")
    r.add_argument("config", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--timeout", type=float, default=3600.0)
    r.set_defaults(func=_cmd_local)


def _cmd_tls(args) -> int:
    files = make_tls(args.out, tuple(args.host or ("127.0.0.1", "localhost")), days=args.days)
    print(f"CA {files.ca_cert} (give to every SuperNode and to flwr), server certificate {files.server_cert}")
    print(f"TLS files written to {args.out}")
    return 0


def _cmd_node_keys(args) -> int:
    keys = make_node_keys(args.out, args.name)
    print(f"register with: flwr supernode register {keys.public_key} <connection>")
    print(f"node keys written to {keys.private_key} (private, keep on the node) and {keys.public_key}")
    return 0


def _cmd_hospital(args) -> int:
    from secure_fedkim.deploy.identity import load_signing_key
    from secure_fedkim.deploy.policy import sign_policy

    if args.policy is not None:
        prepare_hospital(args.name, args.home, args.server_keys)
        sign_policy(args.policy, load_signing_key(args.home))
        path = args.policy
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        policy = default_policy(args.name, privacy={"max_target_epsilon": args.max_epsilon, "max_delta": args.max_delta},
                                aggregation={"allowed_modes": modes, "min_clients": 2})
        path = prepare_hospital(args.name, args.home, args.server_keys, policy)
    print(f"policy {path} signed with the key in {args.home}; review it, and re-sign after any edit")
    print(f"hospital {args.name} written to {args.home}")
    return 0


def _cmd_check_policy(args) -> int:
    from secure_fedkim.deploy.identity import load_signing_key
    from secure_fedkim.deploy.policy import code_sha256, load_policy

    policy = load_policy(args.policy, load_signing_key(args.home).public_key())
    print(json.dumps(policy.model_dump(), indent=2))
    here = code_sha256()
    print(f"the code installed here ({here[:16]}...) is {'approved' if policy.approves(here) else 'NOT approved'}")
    print(f"policy {args.policy} verified (nothing written)")
    return 0


def _cmd_code_hash(args) -> int:
    from secure_fedkim.deploy.policy import code_sha256

    print(code_sha256())
    return 0


def _cmd_init(args) -> int:
    from secure_fedkim.config import load_config

    cfg, text = load_config(args.config)
    base = init_layout(args.out, list(cfg.federation.clients), tuple(args.host or ("127.0.0.1", "localhost")), args.port)
    (base / "federation.yaml").write_text(text)
    print((base / "COMMANDS.sh").read_text(), end="")
    print(f"deployment laid out in {base} (commands in {base / 'COMMANDS.sh'})")
    return 0


def _cmd_local(args) -> int:
    run_dir = run_local(args.config, args.out, timeout=args.timeout)
    print(f"run written to {run_dir}")
    return 0
