"""Scale on Flower's deployment engine, on this machine: round time vs number of SuperNodes, and what one
hospital sends and receives per round in each mode.

Every measurement is a real deployment: a SuperLink (TLS, node authentication) and N SuperNodes as
processes on localhost, each hospital with its own keys, state dir and signed policy, one FEDKIM run.

* round time: (time round R's metrics were written - time round 1's were) / (R - 1), so the first
  round's join and process start-up are left out; printed with its ratio to the smallest N.
* bytes per round per client: Flower's own count of the run's network traffic at the SuperLink
  (`flwr list --run-id`: inbound = from the nodes, outbound = to the nodes), divided by rounds x N.
  This is the whole message (payload + Flower's framing + SecAgg+ protocol stages), next to the payload
  alone: plain 4 bytes per parameter; he the serialized signed CKKS ciphertext (measured); secagg the
  masked vector.
* server memory: peak resident set size (VmHWM) of the ServerApp process during the run.

    python bench/bench_deploy.py                     # N = 2, 4, 8 in he; bytes at N = 3 in plain, he, secagg
    python bench/bench_deploy.py --nodes 2 4 --rounds 3 --bytes-modes he

On a 2-core machine every ClientApp is a fresh Python process that imports torch: with N nodes on the same
2 cores, a round costs about N process start-ups, which is what grows here. On one machine per
hospital that cost is paid in parallel.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secure_fedkim.deploy import Deployment, default_policy, make_tls, prepare_hospital, tagged_pids  # noqa: E402


def config_text(n: int, mode: str, rounds: int) -> str:
    clients = ", ".join(f"h{i}" for i in range(n))
    return f"""
run: {{name: bench-{mode}-{n}, seed: 0, rounds: {rounds}}}
federation: {{clients: [{clients}], min_clients: 2, aggregation: {mode}, secagg: {{num_shares: {min(3, n)}, reconstruction_threshold: 2}}}}
tasks:
  max_test_records: 60
  train:
    - {{name: heart_disease, partition: iid}}
client: {{local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}}
baseline: {{single_hospital: false}}
"""


def _peak_rss_kib(tag: str) -> int:
    peak = 0
    for pid in tagged_pids(tag):
        try:
            if b"flwr-serverapp" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak


def deploy_once(base: Path, n: int, mode: str, rounds: int) -> dict:
    """One run with n SuperNodes; returns timings, traffic and the ServerApp's peak memory."""
    hospitals = [f"h{i}" for i in range(n)]
    d = Deployment(base / "fed", make_tls(base / "tls"))
    try:
        d.start_superlink()
        for h in hospitals:
            policy = prepare_hospital(h, base / "hospitals" / h, base / "keys",
                                      default_policy(h, privacy={"require_dp": False}, aggregation={"allowed_modes": [mode]}))
            node = d.add_hospital(h, base / "hospitals" / h, policy)
            d.register(node)
            d.start_supernode(node)
        d.wait_connected(n, timeout=300)
        cfg = base / "federation.yaml"
        cfg.write_text(config_text(n, mode, rounds))
        run_dir = base / "run"
        started = time.time()
        run_id = d.submit(cfg, run_dir, **{"keys-dir": str(base / "keys")})
        peak, deadline = 0, time.time() + 3600
        while True:
            peak = max(peak, _peak_rss_kib(d.superlink.tag))
            status = d.run_status(run_id)
            if status.startswith("finished"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"run did not finish: {status}")
            time.sleep(1.0)
        if status != "finished:completed":
            raise RuntimeError(f"{mode} with {n} nodes: {status}; see {run_dir / 'status.json'}")
        wall = time.time() - started
        info = d._json(d.flwr("list", d.connection, "--run-id", str(run_id), "--format", "json"))["runs"][0]
        traffic = info.get("network-traffic", {})
        stamps = [(run_dir / "metrics" / f"round_{r:03d}.json").stat().st_mtime for r in range(1, rounds + 1)]
        round_s = (stamps[-1] - stamps[0]) / (rounds - 1) if rounds > 1 else float("nan")
        return {
            "nodes": n, "mode": mode, "rounds": rounds, "run_s": wall, "round_s": round_s,
            "inbound": int(traffic.get("inbound-bytes", 0)), "outbound": int(traffic.get("outbound-bytes", 0)),
            "server_peak_mib": peak / 1024,
        }
    finally:
        d.close()


def payload_bytes(mode: str, n_clients: int = 3) -> tuple[int, int]:
    """(parameters of the client model, bytes of one hospital's update payload alone) in `mode`."""
    from privacy.he import KeyHolder, encrypt_update
    from privacy.keys import generate_signing_key, public_key_bytes
    from secure_fedkim.federation.aggregation import flatten_state
    from secure_fedkim.hospital.local_training import new_client_model
    from secure_fedkim.config import parse_config
    from secure_fedkim.plan import build_plan
    import yaml

    cfg = parse_config(yaml.safe_load(config_text(n_clients, mode, 2)))
    vec = flatten_state(new_client_model(cfg, build_plan(cfg)).state_dict())
    if mode == "plain":
        return vec.size, 4 * vec.size
    if mode == "secagg":  # flwr adds int64 masks to the int32-quantized values: the masked vector is int64
        return vec.size, 8 * vec.size
    key = generate_signing_key()
    holder = KeyHolder(min_clients=2, flooding_sigma=1e-5, ledger_append=lambda *a, **k: None,
                       client_verify_keys={"h0": public_key_bytes(key)}, run_id="bench")
    update = encrypt_update(vec, 100, holder.public_context(), key, run_id="bench", round=1, client="h0")
    return vec.size, len(update.to_bytes())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--mode", default="he", choices=["plain", "he", "secagg"], help="mode of the round-time runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bytes-modes", nargs="*", default=["plain", "he", "secagg"])
    p.add_argument("--bytes-nodes", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="keep the deployments here (default: a temp dir)")
    args = p.parse_args(argv)

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    results = []
    for n in args.nodes:
        print(f"... {args.mode}, {n} SuperNodes", flush=True)
        results.append(deploy_once(root / f"scale-{args.mode}-{n}", n, args.mode, args.rounds))
    base = results[0]["round_s"] if results else float("nan")
    print(f"\nround time vs SuperNodes ({args.mode}, {args.rounds} rounds, rounds 2..{args.rounds} timed, this machine)")
    print(f"{'nodes':>6}{'round s':>10}{'ratio':>8}{'run s':>9}{'server peak MiB':>17}")
    for r in results:
        print(f"{r['nodes']:>6}{r['round_s']:>10.1f}{r['round_s'] / base:>8.2f}{r['run_s']:>9.1f}{r['server_peak_mib']:>17.0f}")

    rows = []
    for mode in args.bytes_modes:
        same = [r for r in results if r["mode"] == mode and r["nodes"] == args.bytes_nodes]
        if same:
            r = same[0]
        else:
            print(f"... {mode}, {args.bytes_nodes} SuperNodes (bytes)", flush=True)
            r = deploy_once(root / f"bytes-{mode}-{args.bytes_nodes}", args.bytes_nodes, mode, 2)
        params, payload = payload_bytes(mode, args.bytes_nodes)
        rows.append((mode, params, payload, r))
    if rows:
        print(f"\nbytes per round per client ({args.bytes_nodes} SuperNodes; Flower's traffic count at the SuperLink / rounds / nodes)")
        print(f"{'mode':<8}{'params':>9}{'payload B':>12}{'payload/4B':>11}{'node->link B':>14}{'link->node B':>14}{'up/plain':>10}{'server MiB':>12}")
        plain_up = next((r["inbound"] / r["rounds"] / r["nodes"] for m, _, _, r in rows if m == "plain"), None)
        for mode, params, payload, r in rows:
            up = r["inbound"] / r["rounds"] / r["nodes"]
            down = r["outbound"] / r["rounds"] / r["nodes"]
            ratio = f"{up / plain_up:.2f}" if plain_up else "-"
            print(f"{mode:<8}{params:>9}{payload:>12}{payload / (4 * params):>11.2f}{up:>14.0f}{down:>14.0f}{ratio:>10}{r['server_peak_mib']:>12.0f}")
    (root / "bench_deploy.json").write_text(json.dumps({"scale": results, "bytes": [r for *_, r in rows]}, indent=2))
    print(f"\nresults written to {root / 'bench_deploy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
