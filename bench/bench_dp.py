"""DP-SGD local epoch time / non-private local epoch time, same model and data, measured in one run.

Target (DESIGN.md): <= 1.5x. Models: a small MLP on 32 features, and a small CNN with GroupNorm on
1x32x32 images. DP-SGD runs through ``privacy.dp.HospitalDP.make_private`` (Opacus 1.6, Poisson sampling,
noise 1.0, clip 1.0) with grad_sample_mode ``hooks`` and ``ghost``. Plain, hooks and ghost epochs are
interleaved (one of each per repeat, after a warm-up epoch each); seconds are medians over ``--repeats``
and the ratio is the median of the per-repeat ratios, so background load skews it less. The Opacus
wrapping (``make_private``) is timed separately. The DP steps taken here are not recorded in a ledger:
this is a timing harness, not a release.

Run: ``python bench/bench_dp.py`` (``--threads``, ``--repeats``, ``--records``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
        nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
        nn.Flatten(), nn.Linear(16 * 8 * 8, 2),
    )


def run_epoch(model, optimizer, loader, criterion) -> float:
    t0 = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - t0


def bench_one(name, factory, x, y, batch, repeats, workdir: Path) -> list[dict]:
    """Interleave plain / hooks / ghost epochs so that load from other processes hits all of them alike."""
    data = TensorDataset(x, y)
    n = len(data)
    crit = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plain_loader = DataLoader(data, batch_size=batch, shuffle=True)
    steps = len(plain_loader)
    runners = {"plain": (model, opt, plain_loader, crit)}
    rows = []
    setups = {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        model = factory()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        hdp = HospitalDP(
            PrivacyProfile(target_epsilon=1e3), PrivacyLedger(workdir / f"{name}-{mode}.jsonl"),
            f"bench-{name}-{mode}", [(batch / n, steps)], 1, n_records=n, noise_multiplier=1.0,
        )
        t0 = time.perf_counter()
        try:
            out = hdp.make_private(model, opt, DataLoader(data, batch_size=batch), grad_sample_mode=mode)
        except Exception as exc:  # report, do not hide, a mode that does not work
            rows.append({"model": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
            continue
        setups[mode] = time.perf_counter() - t0
        if mode == "ghost":
            m, o, c, l = out
        else:
            (m, o, l), c = out, crit
        runners[mode] = (m, o, l, c)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for k, r in runners.items():  # warm-up
        run_epoch(*r)
    for _ in range(repeats):
        for k, r in runners.items():
            times[k].append(run_epoch(*r))
    plain = statistics.median(times["plain"])
    for mode in ("hooks", "ghost"):
        if mode not in runners:
            continue
        ratios = [d / p for d, p in zip(times[mode], times["plain"])]
        rows.append({"model": name, "mode": mode, "plain_s": plain, "dp_s": statistics.median(times[mode]),
                     "ratio": statistics.median(ratios), "setup_s": setups[mode], "steps": steps})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--records", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.records
    cases = [
        ("mlp32", mlp, torch.randn(n, 32, generator=g)),
        ("cnn_gn_32x32", cnn, torch.randn(n, 1, 32, 32, generator=g)),
    ]
    y = torch.randint(0, 2, (n,), generator=g)
    import opacus

    print(f"torch {torch.__version__}, opacus {opacus.__version__}, threads {args.threads}, "
          f"{n} records, batch {args.batch}, noise 1.0, clip 1.0, median of {args.repeats} epochs")
    print(f"{'model':<14} {'mode':<6} {'plain s/epoch':>13} {'DP s/epoch':>11} {'DP/plain':>9}  {'make_private s':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory, x in cases:
            for r in bench_one(name, factory, x, y, args.batch, args.repeats, Path(tmp)):
                if "error" in r:
                    print(f"{r['model']:<14} {r['mode']:<6} not available: {r['error']}")
                else:
                    print(f"{r['model']:<14} {r['mode']:<6} {r['plain_s']:>13.4f} {r['dp_s']:>11.4f} "
                          f"{r['ratio']:>8.2f}x {r['setup_s']:>15.4f}")
    print("target: DP/plain <= 1.5x (DESIGN.md)")


if __name__ == "__main__":
    main()
