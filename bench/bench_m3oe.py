"""M3OE (P=12) train step / single LoRA (P=1) train step on the same FM and batch, measured in one run.

Target (../shared/DESIGN.md): ratio <= 1.5x, thanks to the batched experts (one [P*r, in] and one [out, P*r]
matmul per adapted layer, no loop over experts). Also prints injection throughput (training examples/s of the
server's M3OE step, and scoring examples/s) on the real all-MiniLM-L6-v2 with the given threads.

    python bench/bench_m3oe.py [--batch 16] [--tokens 6] [--repeats 7] [--threads 2]

The steps of the models are interleaved (P=12, P=1, P=0, scoring, P=12, ...) so that load from other processes
hits them alike; the ratio is the median of the per-round wall-time ratios (the ratio of median process CPU
times is printed too: it is less sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from secure_fedkim.data.tasks import TASKS
from secure_fedkim.fm import FMConfig, FoundationModel
from secure_fedkim.fm.m3oe import M3OEConfig


def make_batch(n: int, tokens: int, enc_dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train = [t for t in TASKS.values() if t.role == "train"]
    tasks = [train[i % len(train)] for i in range(n)]
    return dict(
        modality_tokens=torch.randn(n, tokens, enc_dim, generator=g),
        questions=[t.question for t in tasks],
        modality_descriptions=[t.modality_description for t in tasks],
        task_descriptions=[t.task_description for t in tasks],
        labels=torch.randint(0, 2, (n,), generator=g),
    )


def build(num_experts: int, seed: int = 0) -> tuple[FoundationModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m3 = M3OEConfig(num_experts=num_experts) if num_experts else None
    fm = FoundationModel(FMConfig(m3oe=m3)).train()
    with torch.no_grad():  # non-zero B, as after some training (the cost is the same either way)
        for n, p in fm.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.01)
    return fm, torch.optim.Adam(fm.trainable_parameters(), lr=1e-4)


def train_step(fm: FoundationModel, opt: torch.optim.Optimizer, batch: dict) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward + Adam step."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fm(**batch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def score_step(fm: FoundationModel, batch: dict) -> float:
    t0 = time.perf_counter()
    fm.predict(**{k: v for k, v in batch.items() if k != "labels"})
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=6, help="modality tokens per sample")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    batch = make_batch(args.batch, args.tokens)
    models = {P: build(P) for P in (12, 1, 0)}
    n_tr = {P: sum(p.numel() for p in fm.trainable_parameters()) for P, (fm, _) in models.items()}
    for P, (fm, opt) in models.items():  # warm-up
        for _ in range(2):
            train_step(fm, opt, batch)

    times = {P: [] for P in models}
    cpu = {P: [] for P in models}
    score = []
    score_step(models[12][0], batch)
    for _ in range(args.repeats):
        for P, (fm, opt) in models.items():
            w, c = train_step(fm, opt, batch)
            times[P].append(w)
            cpu[P].append(c)
        score.append(score_step(models[12][0], batch))
    med = {P: statistics.median(t) for P, t in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times[12], times[1]))
    cpu_ratio = statistics.median(cpu[12]) / statistics.median(cpu[1])
    score_s = statistics.median(score)
    fm12 = models[12][0]

    L = len(fm12._prompt("Tab", batch["questions"][0])[0]) + args.tokens + len(fm12._prompt("Tab", batch["questions"][0])[1])
    print(f"FM: all-MiniLM-L6-v2 (encoder), batch {args.batch}, {args.tokens} modality tokens, "
          f"sequence ~{L} tokens, torch threads {args.threads}, {args.repeats} interleaved rounds")
    for P, label in ((12, "M3OE P=12 (gate + 12 experts)"), (1, "single LoRA P=1 (FedPlug_L)"), (0, "no experts (FedPlug)")):
        print(f"  {label:34s} train step {1000 * med[P]:7.1f} ms (median)   trainable {n_tr[P]:>9,d}")
    print(f"M3OE(P=12) / LoRA(P=1) train step ratio: {ratio:.2f}x  (target <= 1.5x; median of per-round ratios; "
          f"ratio of medians {med[12] / med[1]:.2f}x; process-CPU-time ratio {cpu_ratio:.2f}x)")
    print(f"injection throughput (P=12 train): {args.batch / med[12]:.1f} examples/s on {args.threads} threads")
    print(f"scoring throughput (P=12 predict): {args.batch / score_s:.1f} examples/s on {args.threads} threads")


if __name__ == "__main__":
    main()
