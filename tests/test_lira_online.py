"""Online LiRA (issue #30): why the demo's auditor game reported AUC intervals wholly below 0.5, and that it no longer
does where there is nothing to find.

The demo's audit had three game rows below chance (hungary lira_online: heart_disease 0.461 [0.439, 0.486], mortality
0.469 [0.439, 0.492], report_abnormal 0.447 [0.429, 0.469]). The scores are not inverted: on a non-private model that
overfits, online LiRA (against a released model and in the game) scores well above chance, and scores with the IN and
OUT references swapped, the inversion suspected, score below it. What was wrong is the game's interval: it resampled
the K x n (model, record) pairs as if independent, though every pair shares its model (which is also a reference of
every other target) and its record. Re-running the demo's hungary heart_disease game with fresh models 17 times gave
AUCs 0.459-0.535 around 0.504 (sd 0.019), twice what each interval assumed (se 0.012). Models that learn nothing at
all (lr 0, below) show the same: 3 games in 20 were "below chance". The game's interval is now a two-way bootstrap over
models and records (attacks.mia.game_auc_interval); the report still flags any attack whose interval lies wholly below
0.5 (check mia_below_chance).
"""

import numpy as np
import pytest
import torch

from attacks.metrics import bootstrap_auc_ci, roc_auc
from attacks.mia import (
    Records,
    ReferenceSet,
    ReferenceTraining,
    auditor_game,
    game_auc_interval,
    game_scores,
    lira_scores,
    membership_inference,
    signed_logit,
    target_logits,
    train_references,
)
from secure_fedkim.data import load_task
from secure_fedkim.hospital.models import ClientModel

pytestmark = pytest.mark.usefixtures("one_thread")


def factory(shape, dim=16, tokens=2):
    def make(seed):
        torch.manual_seed(seed)
        return ClientModel({"t": "tabular"}, {"tabular": shape}, dim, tokens).task_model("t")

    return make


@pytest.fixture(scope="module")
def heart():
    return load_task("heart_disease")


def swapped(refs: ReferenceSet) -> ReferenceSet:
    """The same reference models with IN and OUT exchanged: what a labelling mix-up would score."""
    return ReferenceSet(refs.mode, refs.phi_candidates, refs.phi_population, ~refs.in_candidates, refs.in_population)


def test_online_lira_scores_an_overfit_model_above_chance_and_an_inverted_one_would_not(heart):
    """100 heart_disease members, 60 epochs without DP: the target memorises them. Online LiRA against it (8 online
    references) is well above chance with its interval above 0.5; the same scores with IN and OUT swapped fall below
    0.5, so this test would catch the inversion that was suspected. Measured on 3 splits: 0.70-0.72 (loss attack
    0.56-0.64), swapped 0.28-0.30."""
    perm = np.random.default_rng(3).permutation(len(heart))
    take = lambda idx: Records(heart.x[idx], heart.y[idx])  # noqa: E731
    members, nonmembers, population = take(perm[:100]), take(perm[100:200]), take(perm[200:600])
    training = ReferenceTraining(factory(heart.x.shape[1:]), 100, epochs=60, batch_size=32, lr=5e-3)
    target = training.train(members.x, members.y, seed=11)
    cand = Records.concat([members, nonmembers])
    refs = train_references(cand, population, training, 8, "online", seed=5)
    res = membership_inference(target, members, nonmembers, population, training, attacks=("loss", "lira_online"),
                               references=refs)
    auc = roc_auc(res.scores["lira_online"], res.labels)
    lo, _ = bootstrap_auc_ci(res.scores["lira_online"], res.labels, 200, seed=0)
    assert auc > 0.6 and lo > 0.5, (auc, lo)
    phi = signed_logit(target_logits(target, cand.x), cand.y)
    inverted, _ = lira_scores(phi, swapped(refs), online=True)
    assert roc_auc(inverted, res.labels) < 0.45


def test_the_auditor_game_finds_an_overfitting_recipe_above_chance(heart):
    """The game with a recipe that overfits (100 records, 8 models, 30 epochs, no DP): AUC well above 0.5 and its
    two-way interval too, read from the scores of game_scores (one row per model played as the target). Measured:
    AUC 0.651, two-way interval [0.586, 0.724] (pairs as independent: [0.614, 0.698])."""
    shard = Records(heart.x[:100], heart.y[:100], np.arange(100))
    training = ReferenceTraining(factory(heart.x.shape[1:]), 50, epochs=30, batch_size=32, lr=3e-3)
    out = auditor_game(shard, training, 8, fprs=(0.01,), n_boot=100, seed=0)
    assert out["auc"] > 0.6 and out["auc_ci"][0] > 0.5, out["auc_ci"]
    assert out["auc_ci"] == out["auc_ci95"] and out["p_value"] < 1e-3
    refs = train_references(shard, Records(shard.x[:0], shard.y[:0], shard.ids[:0]), training, 8, "online", seed=0)
    s, y, _ = game_scores(refs, 1)
    assert s.shape == y.shape == (8, 100) and (y.sum(axis=0) == 4).all()  # each record IN for half the models
    assert roc_auc(s.reshape(-1), y.reshape(-1)) == pytest.approx(out["auc"])


def test_a_game_with_nothing_to_find_is_no_longer_below_chance(heart):
    """Models that learn nothing (lr 0: each is its random initialisation), 100 records, 8 models. Seeds 6, 9 and 16
    gave intervals wholly below 0.5 when the pairs were resampled as independent (the demo's audit fault, with no
    inverted score anywhere: there is no score to invert); the two-way interval contains 0.5 for every seed.
    Over 20 seeds: sd of the AUC 0.026, pairs-independent se 0.020, two-way se 0.035."""
    shard = Records(heart.x[:100], heart.y[:100], np.arange(100))
    training = ReferenceTraining(factory(heart.x.shape[1:]), 50, epochs=1, batch_size=32, lr=0.0)
    for seed in (6, 9, 16, 0):
        out = auditor_game(shard, training, 8, fprs=(0.01,), n_boot=100, seed=seed)
        pairs_lo, pairs_hi = out["auc_ci_pairs_independent"]
        lo, hi = out["auc_ci"]
        assert lo <= 0.5 <= hi, (seed, out["auc"], out["auc_ci"])
        assert hi - lo > pairs_hi - pairs_lo
        if seed != 0:
            assert pairs_hi < 0.5, (seed, out["auc"], out["auc_ci_pairs_independent"])
        assert out["p_value"] > 0.05


def test_the_game_interval_weighs_pairs_by_model_and_record():
    """game_auc_interval's AUC is the pooled AUC of every pair (ties count 1/2); one model whose pairs all score high
    moves the two-way interval much more than resampling pairs says it can."""
    rng = np.random.default_rng(0)
    k, n = 6, 40
    labels = np.zeros((k, n), np.int64)
    for i in range(n):
        labels[rng.permutation(k)[: k // 2], i] = 1
    scores = np.round(rng.normal(size=(k, n)), 1)  # ties on purpose
    g = game_auc_interval(scores, labels, n_boot=200, seed=1)
    assert g["auc"] == pytest.approx(roc_auc(scores.reshape(-1), labels.reshape(-1)))
    assert g["auc_ci"][0] <= g["auc"] <= g["auc_ci"][1] and 0 < g["p_value"] < 1
    # model 0's pairs are all shifted up, and model 0 holds more members than the others
    labels[0] = (np.arange(n) < 30).astype(np.int64)
    scores[0] += 3.0
    g = game_auc_interval(scores, labels, n_boot=200, seed=1)
    lo, hi = bootstrap_auc_ci(scores.reshape(-1), labels.reshape(-1), 200, seed=1)
    assert g["auc_ci"][1] - g["auc_ci"][0] > 1.5 * (hi - lo)
    with pytest.raises(ValueError, match=r"\[models, records\]"):
        game_auc_interval(scores.reshape(-1), labels.reshape(-1))
