"""M3OE: Multimodal Multi-task Mixture of LoRA Experts (FEDKIM, ../shared/METHOD.md).

Layout follows peft's LoRA tuner, one module each: ``config`` (:class:`M3OEConfig`); ``layer`` (the adapted
layer :class:`M3OELinear`, which wraps the frozen base ``nn.Linear`` with parameters named ``base_layer``,
``lora_A``, ``lora_B``, ``lora_dropout`` like peft's, the shared :class:`M3OERouting` and the
:class:`M3OEGate`); ``model`` (:func:`inject_m3oe`, which replaces the target modules in place, and the
routing helpers).

Every adapted layer computes, for sample ``b``::

    y = W x + s * sum_p alpha[b, p] * B_p A_p dropout(x),     s = lora_alpha / r  (or 1, see apply_scaling)

with all P experts in one batched product (no Python loop over experts): ``A`` is viewed as one
``[P*r, in]`` matrix, the rank-``P*r`` hidden is scaled by the per-sample gate weights repeated per rank, and
one ``[out, P*r]`` matrix maps it back. The gate weights ``alpha [batch, P]`` are shared by all adapted layers
and all token positions; they live in one :class:`M3OERouting` object that :func:`inject_m3oe` gives to every
layer, set through :func:`set_m3oe_alpha` or the context manager :func:`m3oe_alpha` before the FM's forward.

:class:`M3OEGate` computes alpha from the FM's input-embedding lookups of the modality description (M) and the
task description (T): single-head cross-attention Q = M Wq, K = T Wk, V = T Wv, beta = softmax(QK^T/sqrt(d)) V,
z = masked mean over the rows of beta, alpha = softmax(Wg z).

Ablations (``gate_inputs``):
* ``"both"`` (FEDKIM): queries from M, keys/values from T, as above.
* ``"task_only"`` (w/o M): the gate never sees M; it runs the same single-head attention as *self*-attention
  within T (Q = T Wq, K = T Wk, V = T Wv) and mean-pools over T's rows.
* ``"modality_only"`` (w/o T): the same self-attention within M.
The ablated gates keep the same parameter shapes, so the comparison isolates the information the gate sees.

Baselines: ``num_experts=0`` (or no config) injects nothing (FedPlug); ``num_experts=1`` is a single LoRA whose
weight is fixed to 1 and needs no gate (FedPlug_L).
"""

from __future__ import annotations

from secure_fedkim.fm.m3oe.config import GATE_INPUTS, GATINGS, M3OEConfig
from secure_fedkim.fm.m3oe.layer import M3OEGate, M3OELinear, M3OERouting
from secure_fedkim.fm.m3oe.model import (
    get_m3oe_routing,
    inject_m3oe,
    m3oe_alpha,
    m3oe_disabled,
    m3oe_layers,
    set_m3oe_alpha,
)

__all__ = [
    "GATE_INPUTS",
    "GATINGS",
    "M3OEConfig",
    "M3OERouting",
    "M3OELinear",
    "M3OEGate",
    "inject_m3oe",
    "m3oe_layers",
    "get_m3oe_routing",
    "set_m3oe_alpha",
    "m3oe_alpha",
    "m3oe_disabled",
]
