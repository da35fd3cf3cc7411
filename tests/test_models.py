"""Every client encoder makes modality tokens, has no BatchNorm, and gets per-sample gradients under Opacus."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from secure_fedkim.hospital.models import ClientModel, TaskHead, TaskModel, build_encoder

SHAPES = {"tabular": (30,), "timeseries": (8, 14), "signal": (1, 1080), "image": (1, 32, 32), "text": (128,)}


def batch(modality, n=5):
    if modality == "text":
        ids = torch.randint(1, 30000, (n, 128))
        ids[:, 100:] = 0
        return ids
    return torch.randn(n, *SHAPES[modality])


@pytest.mark.parametrize("modality", list(SHAPES))
def test_encoder_tokens_and_per_sample_gradients(modality):
    torch.manual_seed(0)
    enc = build_encoder(modality, SHAPES[modality], dim=16, num_tokens=4)
    assert ModuleValidator.validate(enc, strict=False) == []
    x = batch(modality)
    assert enc(x).shape == (5, 4, 16)
    gsm = GradSampleModule(TaskModel(enc, TaskHead(16)), loss_reduction="sum")
    gsm(x).sum().backward()
    for name, p in gsm.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 5, name
    # per-sample gradients sum to the batch gradient
    for name, p in gsm.named_parameters():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-4, atol=1e-5, msg=name)
    gsm._close()


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = build_encoder("text", (128,), dim=16, num_tokens=4).eval()
    ids = torch.randint(1, 30000, (1, 128))
    ids[:, 50:] = 0
    longer = ids.clone()
    longer[:, 60:] = 0  # more padding, same tokens
    other = ids.clone()
    other[:, 60:70] = 7  # extra real tokens change the output
    assert torch.allclose(enc(ids), enc(longer))
    assert not torch.allclose(enc(ids), enc(other))


def test_client_model_shares_encoders_between_tasks_of_a_modality():
    m = ClientModel({"a": "text", "b": "text", "c": "tabular"}, {"text": (128,), "tabular": (30,)}, 16, 4)
    assert set(m.encoders) == {"text", "tabular"} and set(m.heads) == {"a", "b", "c"}
    assert m.task_model("a").encoder is m.task_model("b").encoder
    with pytest.raises(ValueError, match="square"):
        build_encoder("image", (1, 32, 32), 16, 3)
