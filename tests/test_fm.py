"""The foundation-model wrapper: the real MiniLM encoder offline, a tiny random causal LM, adapters on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from secure_fedkim.data.tasks import TASKS
from secure_fedkim.fm import FMConfig, FoundationModel, default_fm_path, parse_answer
from secure_fedkim.fm.m3oe import M3OEConfig, m3oe_layers

torch.set_num_threads(2)

TASK_A, TASK_B = TASKS["heart_disease"], TASKS["ecg_irregular"]


def toy_batch(n: int, seed: int, T: int = 4, mixed: bool = True):
    """Modality tokens whose mean sign is the label; samples alternate between two tasks (two modalities)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 * torch.randn(n, T, 64, generator=g) + 0.5 * (2 * y - 1).float()[:, None, None]
    tasks = [TASK_B if (mixed and i % 2) else TASK_A for i in range(n)]
    return (x, [t.question for t in tasks], [t.modality_description for t in tasks],
            [t.task_description for t in tasks], y)


def train(fm: FoundationModel, steps: int, lr: float, batch: int = 16, seed: int = 100):
    opt = torch.optim.Adam(fm.trainable_parameters(), lr=lr)
    fm.train()
    losses = []
    for s in range(steps):
        x, q, m, d, y = toy_batch(batch, seed + s)
        out = fm(x, q, m, d, labels=y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def accuracy(fm: FoundationModel, n: int = 48, seed: int = 7) -> float:
    x, q, m, d, y = toy_batch(n, seed)
    pred, prob = fm.predict(x, q, m, d)
    assert pred.shape == prob.shape == (n,) and set(np.unique(pred)) <= {0, 1}
    assert np.all((prob >= 0) & (prob <= 1)) and np.array_equal(pred, (prob > 0.5).astype(int))
    return float((pred == y.numpy()).mean())


# --------------------------------------------------------------------------- encoder: the real MiniLM
@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return FoundationModel(FMConfig(m3oe=M3OEConfig(num_experts=4)))


def test_minilm_loads_offline_and_prompt_shape(minilm):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert minilm.path == default_fm_path() and os.path.isdir(minilm.path)
    assert minilm.hidden_size == 384 and len(minilm.adapted_modules) == 12
    pre, post = minilm._prompt(minilm.tag_for(TASK_B.modality_description), TASK_B.question)
    toks = minilm.tokenizer.convert_ids_to_tokens(pre + post)
    text = " ".join(toks)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]"
    assert "human : < ec ##g >" in text and "< / ec ##g >" in text and text.endswith("assistant : [SEP]")
    # the tokenisation of repeated strings is cached
    assert minilm._prompt("ECG", TASK_B.question) is minilm._prompt("ECG", TASK_B.question)
    with pytest.raises(FileNotFoundError):
        FoundationModel(FMConfig(path="sentence-transformers/all-MiniLM-L6-v2"))  # a hub id, not a directory


def test_minilm_modality_tokens_are_spliced(minilm):
    x, q, m, d, _ = toy_batch(2, 0)
    seqs = [minilm._prompt(minilm.tag_for(mm), qq) for mm, qq in zip(m, q)]
    emb, attn, lens = minilm._embed_sequences(x, seqs)
    n_pre = len(seqs[0][0])
    proj = minilm.proj(x[0])
    assert torch.allclose(emb[0, n_pre : n_pre + 4], proj)
    word = minilm.model.get_input_embeddings()
    assert torch.allclose(emb[0, :n_pre], word(torch.tensor(seqs[0][0])))
    assert int(attn[1].sum()) == int(lens[1])


def test_minilm_encoder_learns_toy_task(minilm):
    acc0 = accuracy(minilm, n=32)
    losses = train(minilm, steps=6, lr=3e-3, batch=12)
    acc = accuracy(minilm, n=32)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert acc >= 0.85 and acc > acc0 + 0.2, (acc0, acc)


# --------------------------------------------------------------------------- causal: a tiny random LM
@pytest.fixture(scope="module")
def tiny_causal_dir(tmp_path_factory):
    """A tiny randomly initialised Llama with the (local) MiniLM WordPiece tokenizer: vocab sizes match."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_fm_path(), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def causal_fm(path, **kw):
    torch.manual_seed(0)
    m3 = M3OEConfig(num_experts=4, target_modules=["q_proj", "v_proj"])
    return FoundationModel(FMConfig(path=path, kind="causal", m3oe=m3, **kw))


def test_causal_learns_toy_task_and_generates(tiny_causal_dir):
    fm = causal_fm(tiny_causal_dir)
    assert len(fm.adapted_modules) == 4
    acc0 = accuracy(fm)
    train(fm, steps=15, lr=1e-2)
    acc = accuracy(fm)
    assert acc >= 0.85 and acc > acc0 + 0.2, (acc0, acc)
    x, q, m, d, y = toy_batch(16, 7)
    texts, parsed = fm.generate_answers(x, q, m, d)
    assert len(texts) == 16 and parsed.shape == (16,)
    assert np.mean(parsed == y.numpy()) >= 0.85, list(zip(texts, y.tolist()))
    # left padding in batched generation: same texts as one sample at a time (the two tasks differ in length)
    one = [fm.generate_answers(x[i : i + 1], q[i : i + 1], m[i : i + 1], d[i : i + 1])[0][0] for i in range(2)]
    assert one == texts[:2]


def test_causal_fast_path_equals_general_path(tiny_causal_dir):
    fm = causal_fm(tiny_causal_dir).eval()
    with torch.no_grad():
        for layer in m3oe_layers(fm.model):
            layer.lora_B.normal_(0, 0.1)
    x, q, m, d, y = toy_batch(6, 3)
    with torch.no_grad():
        fast = fm(x, q, m, d, labels=y)
        fm._single_token_fast_path = False
        slow = fm(x, q, m, d, labels=y)
        multi = fm(x, q, m, d, labels=y, answers=("No way", "Yes indeed"))  # multi-token candidates
    assert torch.allclose(fast["logits"], slow["logits"], atol=1e-4)
    assert torch.allclose(fast["loss"], slow["loss"], atol=1e-5)
    # loss = next-token loss on the answer tokens only
    assert torch.allclose(fast["loss"], -fast["logits"].gather(1, y[:, None]).mean(), atol=1e-5)
    assert multi["logits"].shape == (6, 2) and torch.isfinite(multi["loss"])


def test_as_published_trains_embeddings_and_head(tiny_causal_dir):
    fm = causal_fm(tiny_causal_dir, trainable="as_published")
    names = {n for n, _ in fm.named_trainable_parameters()}
    assert "model.model.embed_tokens.weight" in names  # tied to lm_head: listed once
    assert not any(".base_layer." in n or "layers.0.mlp" in n for n in names)
    assert fm.model.lm_head.weight.requires_grad


def test_parse_answer():
    assert parse_answer("yes yes") == 1 and parse_answer("No.") == 0
    assert parse_answer("the answer is no, not yes") == 0
    assert parse_answer("maybe") == -1 and parse_answer("yesterday") == -1


# --------------------------------------------------------------------------- adapters on disk
def test_adapter_roundtrip(tiny_causal_dir, tmp_path):
    a = causal_fm(tiny_causal_dir, trainable="as_published")
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    a.save_adapter(tmp_path)
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    b = causal_fm(tiny_causal_dir, trainable="as_published")
    x, q, m, d, _ = toy_batch(4, 5)
    assert not torch.allclose(a.eval()(x, q, m, d)["logits"], b.eval()(x, q, m, d)["logits"])
    b.load_adapter(tmp_path)
    for (na, pa), (nb, pb) in zip(a.named_trainable_parameters(), b.named_trainable_parameters()):
        assert na == nb and torch.equal(pa, pb)
    with torch.no_grad():
        assert torch.equal(a(x, q, m, d)["logits"], b(x, q, m, d)["logits"])
    # an adapter for another trainable set does not load silently
    c = causal_fm(tiny_causal_dir)
    with pytest.raises(ValueError, match="does not fit"):
        c.load_adapter(tmp_path)
