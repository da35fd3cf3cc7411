"""DP-SGD bugs planted on purpose, to show that the audits can fail (DESIGN.md: "Evidence must be able to fail").

Each bug is a context manager that patches the shipped classes only while it is active and restores them
on exit, so the default code path is never changed. They cover both per-step paths hospitals run:
``privacy.fast_dp.FusedDPOptimizer`` (``grad_sample_mode="lean"``) and Opacus's own ``DPOptimizer``
(``"hooks"``), and the ledger/accountant side of ``privacy.dp.HospitalDP``:

* ``no_noise``: (a) the Gaussian noise is never added;
* ``half_noise``: (b) the noise's standard deviation is half of ``sigma * C``;
* ``no_clipping``: (c) per-sample gradients are summed without clipping;
* ``reused_noise``: (d) one noise draw is reused at every step;
* ``ledger_half_steps``: (e) the ledger records half the steps taken;
* ``accountant_half_rate``: (f) the accountant is told half the Poisson loader's sample rate.

and the plumbing around them, where a run draws its randomness (``secure_fedkim.hospital.local_training.dp_randomness``,
the one place a session's :class:`privacy.randomness.DPRandomness` is made) or records its rounds; the run-level
audit (``attacks/runlevel.py``) and the ledger's fingerprints exist to catch these:

* ``rounds_reseeded``: every session's randomness from the run seed alone, as shipped before ea4bf7b (every
  round, task and hospital draws the same noise and batches);
* ``hospitals_alike``: every hospital seeded alike (rounds and tasks differ);
* ``baseline_replays_federation``: the single-hospital baseline draws the federation's randomness;
* ``resume_repeats_round``: the last round (as after a restart) draws the previous round's randomness;
* ``batches_repeated``: the Poisson samples repeat every round while the noise is fresh;
* ``round_not_recorded``: round 2 of the federation trains but is not written to the ledger.

``plant(name)`` returns the context manager for a name in :data:`BUGS`; ``plant("honest")`` patches nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator
from unittest import mock

import torch
from opacus.optimizers.optimizer import DPOptimizer, _mark_as_processed

from privacy.dp import HospitalDP
from privacy.fast_dp import FusedDPOptimizer
from privacy.randomness import DPRandomness, SourcedNoise

__all__ = ["BUGS", "PLUMBING_BUGS", "plant"]


def _patch_noise(make: Callable[[Callable], Callable]):
    """Patch the one noise method every DP optimizer draws through (``privacy.randomness.SourcedNoise._draw_noise``:
    the fused optimizer, Opacus's hooks and ghost optimizers, the patient-level one)."""
    return mock.patch.object(SourcedNoise, "_draw_noise", make(SourcedNoise._draw_noise))


@contextlib.contextmanager
def _both(*patches) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def no_noise():
    """(a) Clipped sums released without noise."""
    return _patch_noise(lambda orig: lambda self, std, like: torch.zeros_like(like))


def half_noise():
    """(b) Noise of standard deviation sigma * C / 2."""
    return _patch_noise(lambda orig: lambda self, std, like: orig(self, std / 2, like))


def reused_noise():
    """(d) The first noise draw (per tensor shape) is returned again at every later step."""
    cache: dict = {}

    def remember(key, draw):
        if key not in cache:
            cache[key] = draw()
        return cache[key].clone()

    return _patch_noise(lambda orig: lambda self, std, like: remember(tuple(like.shape), lambda: orig(self, std, like)))


def _unclipped_accumulate(self: DPOptimizer) -> None:
    for p in self.params:
        grad = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        _mark_as_processed(p.grad_sample)


def no_clipping():
    """(c) Per-sample gradients summed as they are (clip factor 1 for every record)."""
    return _both(
        mock.patch.object(DPOptimizer, "clip_and_accumulate", _unclipped_accumulate),
        mock.patch.object(FusedDPOptimizer, "_clip_factor", lambda self, sq: torch.ones_like(sq)),
    )


def _misreport(steps_factor: float = 1.0, rate_factor: float = 1.0):
    """``HospitalDP.record_round`` writing scaled steps / sample rate, its own understatement check fooled too."""
    original = HospitalDP.record_round

    def record_round(self, round, task, steps, sample_rate):
        if self._pending is not None:
            self._pending = {**self._pending, "steps": int(self._pending["steps"] * steps_factor),
                             "sample_rate": self._pending["sample_rate"] * rate_factor}
        return original(self, round, task, max(1, int(steps * steps_factor)), sample_rate * rate_factor)

    return mock.patch.object(HospitalDP, "record_round", record_round)


def ledger_half_steps():
    """(e) The ledger records half the DP-SGD steps the optimizer took."""
    return _misreport(steps_factor=0.5)


def accountant_half_rate():
    """(f) The accountant (through the ledger) is told half the Poisson loader's sample rate."""
    return _misreport(rate_factor=0.5)


def _session_key(make_key: Callable):
    """Patch ``local_training.dp_randomness``: each session's randomness reproducible from ``make_key(dp, cfg,
    client, round, task)`` (a tuple after the run seed), its label still the true session."""
    import secure_fedkim.hospital.local_training as local_training

    def dp_randomness(dp, cfg, client, server_round, task):
        return DPRandomness.reproducible(cfg.run.seed, *make_key(dp, cfg, client, server_round, task),
                                         label=(dp.run_id, client, server_round, task))

    return mock.patch.object(local_training, "dp_randomness", dp_randomness)


def rounds_reseeded():
    """Plumbing (a): every round, task and hospital reseeded to the run seed (the bug fixed in ea4bf7b)."""
    return _session_key(lambda dp, cfg, client, rnd, task: ())


def hospitals_alike():
    """Plumbing (b): every hospital seeded alike (the round and task still enter the seed)."""
    return _session_key(lambda dp, cfg, client, rnd, task: (dp.run_id.removeprefix("baseline-" + client), rnd, task))


def baseline_replays_federation():
    """Plumbing (c): the single-hospital baseline replays the federation's randomness."""
    return _session_key(lambda dp, cfg, client, rnd, task: (client, rnd, task))


def resume_repeats_round():
    """Plumbing (d): the last round, as after a restart, draws the previous round's randomness."""
    return _session_key(lambda dp, cfg, client, rnd, task: (
        dp.run_id, client, rnd - 1 if rnd == cfg.run.rounds and rnd > 1 else rnd, task))


def batches_repeated():
    """Plumbing (e): the Poisson samples of a hospital's task repeat every round; the noise stays fresh."""
    original = DPRandomness.poisson
    drawn: dict = {}

    def poisson(self, n, sample_rate):
        key = (tuple(self.label[:2]) + tuple(self.label[3:]), n, sample_rate, self.samples)  # no round
        if key not in drawn:
            drawn[key] = original(self, n, sample_rate)
            return drawn[key].clone()
        self.record_sample(n, sample_rate, drawn[key])
        return drawn[key].clone()

    return mock.patch.object(DPRandomness, "poisson", poisson)


def round_not_recorded():
    """Plumbing (f): round 2 of the federation trains and is released, but is not written to the ledger."""
    original = HospitalDP.record_round

    def record_round(self, round, task, steps, sample_rate):
        if round == 2 and not self.run_id.startswith("baseline-"):
            self._pending = None
            return self.spent_epsilon()
        return original(self, round, task, steps, sample_rate)

    return mock.patch.object(HospitalDP, "record_round", record_round)


#: bugs in how a run draws its randomness or records its rounds (the run-level audit's)
PLUMBING_BUGS: dict[str, Callable] = {
    "rounds_reseeded": rounds_reseeded,
    "hospitals_alike": hospitals_alike,
    "baseline_replays_federation": baseline_replays_federation,
    "resume_repeats_round": resume_repeats_round,
    "batches_repeated": batches_repeated,
    "round_not_recorded": round_not_recorded,
}

BUGS: dict[str, Callable] = {
    "no_noise": no_noise,
    "half_noise": half_noise,
    "no_clipping": no_clipping,
    "reused_noise": reused_noise,
    "ledger_half_steps": ledger_half_steps,
    "accountant_half_rate": accountant_half_rate,
}


def plant(name: str):
    """The context manager planting bug ``name`` (one of :data:`BUGS` or :data:`PLUMBING_BUGS`), or a no-op for
    ``"honest"``."""
    if name == "honest":
        return contextlib.nullcontext()
    known = {**BUGS, **PLUMBING_BUGS}
    if name not in known:
        raise ValueError(f"unknown planted bug {name!r}; expected 'honest' or one of {sorted(known)}")
    return known[name]()
