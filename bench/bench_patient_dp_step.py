"""Patient-level DP-SGD step / record-level DP-SGD step on the lean path, same records per batch, one run.

    python bench/bench_patient_dp_step.py [--patients 1024] [--records-per-patient 4] [--batch 64] [--steps 300] [--repeats 5]

Both use ``HospitalDP.make_private`` with ``grad_sample_mode="lean"`` and noise (sigma 1): record level
samples each record with rate ``batch/n_records``; patient level samples each patient with rate
``(batch/records_per_patient)/n_patients`` and takes all of a sampled patient's records
(``max_records_per_patient_step = records_per_patient``), so both steps see ``batch`` records on average.
A step is the loader's next batch, forward, backward and the optimizer step (clip, noise, update); the
"compute" figure leaves the loader out (forward, backward, per-patient grouping, clip, noise, update).
Record and patient runs alternate to share the machine's load fairly; prints the median milliseconds per
step and the ratio patient/record per model, for the whole step and for the compute alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import HospitalDP, PrivacyProfile
from privacy.ledger import PrivacyLedger


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1), nn.Flatten(0))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 8, 5), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv1d(8, 8, 5), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 24, 32), nn.ReLU(), nn.Linear(32, 1), nn.Flatten(0))


MODELS = {"mlp": (mlp, (32,)), "conv1d": (conv, (4, 32))}


def seconds_per_step(make, shape, unit: str, args, workdir: Path, run: str) -> tuple[float, float]:
    """(seconds per whole step, seconds per step without the loader) over ``args.steps`` steps after 20."""
    n = args.patients * args.records_per_patient
    x, y = torch.randn(n, *shape), torch.randint(0, 2, (n,)).float()
    groups = np.repeat(np.arange(args.patients), args.records_per_patient)
    patient = unit == "patient"
    batch = args.batch // args.records_per_patient if patient else args.batch
    profile = PrivacyProfile(target_epsilon=10.0, unit=unit, max_records_per_patient_step=args.records_per_patient)
    dp = HospitalDP(profile, PrivacyLedger(workdir / f"{run}.jsonl"), run, [(batch / (args.patients if patient else n), 1)], 1,
                    n_records=n, n_patients=args.patients if patient else None, noise_multiplier=1.0)
    model = make()
    loss_fn = nn.BCEWithLogitsLoss()
    module, opt, loader = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.01),
                                          DataLoader(TensorDataset(x, y), batch_size=batch), criterion=loss_fn,
                                          groups=groups if patient else None, grad_sample_mode="lean")
    done, start, compute = 0, None, 0.0
    while done < args.steps + 20:
        for xb, yb in loader:
            if done == 20:
                start, compute = time.perf_counter(), 0.0
            t0 = time.perf_counter()
            if len(xb):
                opt.zero_grad(set_to_none=True)
                loss_fn(module(xb), yb).backward()
                opt.step()
            compute += time.perf_counter() - t0
            done += 1
            if done == args.steps + 20:
                break
    elapsed = time.perf_counter() - start
    module._close()
    return elapsed / args.steps, compute / args.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1024)
    ap.add_argument("--records-per-patient", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="expected records per batch (both units)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, shape) in MODELS.items():
            times = {"record": [], "patient": []}
            for r in range(args.repeats):
                for unit in times:
                    times[unit].append(seconds_per_step(make, shape, unit, args, Path(tmp), f"{name}-{unit}-{r}"))
            for i, what in enumerate(("step", "compute")):
                rec = statistics.median(t[i] for t in times["record"])
                pat = statistics.median(t[i] for t in times["patient"])
                print(f"{name:<7} {what:<8} record {rec * 1e3:7.3f} ms  patient {pat * 1e3:7.3f} ms  "
                      f"ratio patient/record {pat / rec:.3f}  ({args.batch} records per batch, lean)")


if __name__ == "__main__":
    main()
