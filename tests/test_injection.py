"""Knowledge injection wired into the federation's server: every baseline is one switch, and injection
trains the FM on the public split (never on a test split or an unseen task)."""

import pytest
import torch

from secure_fedkim.hospital.local_training import new_client_model
from secure_fedkim.config import parse_config
from secure_fedkim.fm.injection import Injector
from secure_fedkim.fm.m3oe import m3oe_layers
from secure_fedkim.plan import build_plan


def config(**injection):
    return parse_config({
        "run": {"rounds": 1, "seed": 0},
        "federation": {"clients": ["cleveland", "hungary", "switzerland", "va_long_beach"]},
        "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}], "unseen": [], "max_test_records": 80},
        "client": {"token_dim": 16, "num_tokens": 2},
        "injection": {"enabled": True, "max_public_per_task": 48, "lr": 3e-3, **injection},
    })


@pytest.mark.parametrize(
    "method, gate_inputs, experts, has_gate",
    [("fedkim", "both", 3, True), ("fedkim", "task_only", 3, True), ("fedplug", "both", 0, False), ("fedplug_l", "both", 1, False)],
)
def test_each_method_is_one_switch(method, gate_inputs, experts, has_gate):
    cfg = config(method=method, gate_inputs=gate_inputs, num_experts=3)
    inj = Injector(cfg, build_plan(cfg))
    layers = m3oe_layers(inj.fm.model)
    assert len(layers) == (0 if experts == 0 else 12)  # query and value of 6 BERT layers
    if experts:
        assert all(layer.lora_A.shape[0] == experts for layer in layers)
    assert (inj.fm.gate is not None) == has_gate
    if has_gate:
        assert inj.fm.gate.gate_inputs == gate_inputs
    base = [n for n, p in inj.fm.named_trainable_parameters() if "base_layer" in n or n.startswith("model.embeddings")]
    assert base == []  # as described: no FM base weight trains


def test_injection_learns_from_the_public_split_only():
    cfg = config(num_experts=2, epochs_per_round=4)
    plans = build_plan(cfg)
    inj = Injector(cfg, plans)
    model = new_client_model(cfg, plans)
    before = inj.evaluate(model)["heart_disease"]
    seen = []
    original = inj._inputs

    def spy(plan, data, idx):
        seen.append(data is not None and len(data) == len(plan.split.public))
        return original(plan, data, idx)

    inj._inputs = spy
    encoder_before = [p.detach().clone() for p in model.encoders.parameters()]
    stats = inj.inject(model)
    assert stats["steps"] > 0 and all(seen)  # every training batch came from the public split
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.encoders.parameters()))  # encoders train too
    after = inj.evaluate(model)["heart_disease"]
    assert after["auroc"] > before["auroc"] + 0.1, (before, after)


def test_study_variants_and_table():
    from secure_fedkim.drivers.study import format_study, variant_config

    cfg = config()
    wo_t = variant_config(cfg, "wo_t", 7)
    assert (wo_t.injection.method, wo_t.injection.gate_inputs, wo_t.run.seed) == ("fedkim", "modality_only", 7)
    assert variant_config(cfg, "fedplug", 1).injection.method == "fedplug"
    results = {
        "fedkim": {0: {"a": {"role": "train", "auroc": 0.8}, "b": {"role": "unseen", "auroc": 0.6}},
                   1: {"a": {"role": "train", "auroc": 0.6}, "b": {"role": "unseen", "auroc": 0.7}}},
    }
    table = format_study(results)
    assert "0.700 ± 0.100 (n=2)" in table and "0.650 ± 0.050 (n=2)" in table and "b *" in table
