"""M3OE: Multimodal Multi-task Mixture of LoRA Experts (FEDKIM, ../shared/METHOD.md).

Layout follows peft's LoRA tuner: a config dataclass (:class:`M3OEConfig`), a layer that wraps the frozen base
``nn.Linear`` (:class:`M3OELinear`, parameters named ``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``
like peft's), and an injection function (:func:`inject_m3oe`) that replaces the target modules in place.

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

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
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

GATINGS = ("dense", "topk")
GATE_INPUTS = ("both", "task_only", "modality_only")


@dataclass
class M3OEConfig:
    """Switches of M3OE. Defaults are FEDKIM's final runs (P=12, r=8, dropout 0.1, dense gate)."""

    num_experts: int = 12
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    apply_scaling: bool = True  # False mimics the published code, which never applies lora_alpha / r
    gating: str = "dense"  # "dense" softmax (the paper) or "topk" (renormalised top-k, a switch)
    top_k: int = 2
    gate_inputs: str = "both"  # "both" | "task_only" (w/o M) | "modality_only" (w/o T)
    gate_dim: int | None = None  # width of Wq/Wk/Wv; None = the FM's hidden size (the paper)
    gate_norm: bool = True  # RMS-normalise the description embeddings before Wq/Wk/Wv (see M3OEGate)

    def __post_init__(self):
        if self.num_experts < 0:
            raise ValueError(f"M3OEConfig.num_experts must be >= 0, not {self.num_experts}")
        if self.r < 1:
            raise ValueError(f"M3OEConfig.r must be >= 1, not {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"M3OEConfig.lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if self.gating not in GATINGS:
            raise ValueError(f"M3OEConfig.gating must be one of {GATINGS}, not {self.gating!r}")
        if self.gate_inputs not in GATE_INPUTS:
            raise ValueError(f"M3OEConfig.gate_inputs must be one of {GATE_INPUTS}, not {self.gate_inputs!r}")
        if self.gating == "topk" and not 1 <= self.top_k <= max(self.num_experts, 1):
            raise ValueError(f"M3OEConfig.top_k must be in [1, num_experts={self.num_experts}], not {self.top_k}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r if self.apply_scaling else 1.0

    @property
    def needs_gate(self) -> bool:
        return self.num_experts > 1


class M3OERouting:
    """The per-sample expert weights shared by every adapted layer of one model (a plain object, no params).

    ``alpha`` is ``None`` (uniform 1/P over experts; for P=1 that is the plain LoRA), a ``[P]`` tensor (same
    weights for every sample) or a ``[batch, P]`` tensor. ``enabled=False`` makes every layer return the base
    layer's output only (the base FM), skipping the expert computation.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.alpha: torch.Tensor | None = None
        self.enabled = True

    def set(self, alpha: torch.Tensor | None) -> None:
        if alpha is not None:
            if alpha.dim() not in (1, 2) or alpha.shape[-1] != self.num_experts:
                raise ValueError(
                    f"M3OE alpha must have shape [P] or [batch, P] with P={self.num_experts}, "
                    f"not {tuple(alpha.shape)}"
                )
        self.alpha = alpha


class M3OELinear(nn.Module):
    """A frozen ``nn.Linear`` plus P LoRA experts mixed per sample by the shared routing weights.

    ``lora_A``: ``[P, r, in]`` (kaiming-uniform with a=sqrt(5), as peft), ``lora_B``: ``[P, out, r]`` zeros, so
    the adapted layer equals the base layer at init.
    """

    def __init__(self, base_layer: nn.Linear, config: M3OEConfig, routing: M3OERouting):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"M3OELinear wraps nn.Linear, not {type(base_layer).__name__}")
        if config.num_experts < 1:
            raise ValueError("M3OELinear needs num_experts >= 1")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = config.num_experts
        self.r = config.r
        self.scaling = config.scaling
        self.routing = routing
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.num_experts, self.out_features, self.r, **factory))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # per expert exactly as peft's nn.Linear-style init of lora_A ([r, in] per expert); B = 0
        for p in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[p], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # peft-style delegation so code that reads layer.weight / layer.bias keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _alpha_for(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.routing.alpha
        P = self.num_experts
        if alpha is None:
            alpha = x.new_full((1, P), 1.0 / P)
        elif alpha.dim() == 1:
            alpha = alpha.unsqueeze(0)
        if alpha.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"M3OE alpha has batch {alpha.shape[0]} but the layer input has batch {x.shape[0]}; "
                "set the gate weights for this batch before the forward"
            )
        return alpha.to(dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.routing.enabled:
            return result
        P, r = self.num_experts, self.r
        alpha = self._alpha_for(x)  # [b, P]
        # one [P*r, in] matmul for all experts' A, then one [out, P*r] matmul for all experts' B
        h = F.linear(self.lora_dropout(x), self.lora_A.reshape(P * r, self.in_features))  # [..., P*r]
        w = (alpha * self.scaling).repeat_interleave(r, dim=-1)  # [b, P*r]
        w = w.reshape(w.shape[0], *([1] * (x.dim() - 2)), P * r) if x.dim() >= 2 else w.reshape(P * r)
        B = self.lora_B.permute(1, 0, 2).reshape(self.out_features, P * r)  # [out, P*r], col p*r+k = B[p,:,k]
        return result + F.linear(h * w, B).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, r={self.r}, s={self.scaling}"


class M3OEGate(nn.Module):
    """Per-sample expert weights from the modality (M) and task (T) description embeddings.

    ``forward(M, M_mask, T, T_mask) -> alpha [B, P]``, each row a simplex (dense softmax, or top-k renormalised).
    M: ``[B, Lm, d]``, T: ``[B, Lt, d]``, masks ``[B, L]`` (1 = real token). See the module docstring for the
    ablations.

    Scale: raw embedding lookups are small (MiniLM: entries of std 0.055, while inside the FM a LayerNorm
    brings them to unit scale). Fed raw into default-initialised Wq/Wk, the attention scores are ~1e-3, the
    attention is uniform, and the modality description changes alpha by ~1e-6 at init (its only path into
    the gate is through the attention weights), which also starves Wq/Wk of gradient. With ``gate_norm``
    (default) each description token vector is RMS-normalised (no parameters) and Wq/Wk are initialised with
    std 1/sqrt(d_model), so the scores start with unit variance, as in a transformer layer.
    ``gate_norm=False`` gives the formula on the raw lookups with PyTorch's default Linear init.
    """

    def __init__(self, d_model: int, config: M3OEConfig):
        super().__init__()
        if not config.needs_gate:
            raise ValueError("M3OEGate needs num_experts >= 2 (P=1 is a plain LoRA with weight 1)")
        d = config.gate_dim or d_model
        self.d = d
        self.num_experts = config.num_experts
        self.gating = config.gating
        self.top_k = config.top_k
        self.gate_inputs = config.gate_inputs
        self.Wq = nn.Linear(d_model, d, bias=False)
        self.Wk = nn.Linear(d_model, d, bias=False)
        self.Wv = nn.Linear(d_model, d, bias=False)
        self.Wg = nn.Linear(d, config.num_experts)
        self.norm = config.gate_norm
        if self.norm:
            nn.init.normal_(self.Wq.weight, std=d_model**-0.5)
            nn.init.normal_(self.Wk.weight, std=d_model**-0.5)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def logits(self, M, M_mask, T, T_mask) -> torch.Tensor:
        if self.gate_inputs == "both":
            Xq, q_mask, Xkv, kv_mask = M, M_mask, T, T_mask
        elif self.gate_inputs == "task_only":
            Xq, q_mask, Xkv, kv_mask = T, T_mask, T, T_mask
        else:  # modality_only
            Xq, q_mask, Xkv, kv_mask = M, M_mask, M, M_mask
        dt = self.Wq.weight.dtype
        Xq, Xkv = Xq.to(dt), Xkv.to(dt)
        if self.norm:
            Xq, Xkv = self._rms(Xq), self._rms(Xkv)
        Q, K, V = self.Wq(Xq), self.Wk(Xkv), self.Wv(Xkv)
        scores = Q @ K.transpose(1, 2) / math.sqrt(self.d)  # [B, Lq, Lkv]
        scores = scores.masked_fill(~kv_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
        beta = torch.softmax(scores, dim=-1) @ V  # [B, Lq, d]
        qm = q_mask.to(beta.dtype).unsqueeze(-1)
        z = (beta * qm).sum(1) / qm.sum(1).clamp(min=1.0)  # masked mean over query rows
        return self.Wg(z)

    def forward(self, M, M_mask, T, T_mask) -> torch.Tensor:
        probs = torch.softmax(self.logits(M, M_mask, T, T_mask), dim=-1)
        if self.gating == "dense":
            return probs
        top = probs.topk(self.top_k, dim=-1).indices
        keep = torch.zeros_like(probs).scatter_(-1, top, 1.0)
        kept = probs * keep
        alpha = kept / kept.sum(-1, keepdim=True)
        if self.top_k == 1:
            # renormalising one weight gives a constant 1 and no gradient to the gate; use the switch
            # transformer's straight-through form: value one-hot, gradient that of the chosen probability
            alpha = alpha + kept - kept.detach()
        return alpha


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_m3oe(model: nn.Module, config: M3OEConfig) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with one of ``config.target_modules`` by an
    :class:`M3OELinear` (in place) and return the replaced names. ``num_experts=0`` injects nothing.

    All replaced layers share one :class:`M3OERouting` (see :func:`get_m3oe_routing`).
    Raises if target modules are given but none matches a Linear (listing the Linear names it saw).
    """
    if config.num_experts == 0:
        return []
    if m3oe_layers(model):
        raise ValueError("model already has M3OE layers; inject once")
    routing = M3OERouting(config.num_experts)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _matches(name, config.target_modules)
    ]
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no nn.Linear module matches target_modules={config.target_modules}; "
            f"Linear module names in this model end with: {linear}"
        )
    names = []
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, M3OELinear(mod, config, routing))
        names.append(name)
    return names


def m3oe_layers(model: nn.Module) -> list[M3OELinear]:
    return [m for m in model.modules() if isinstance(m, M3OELinear)]


def get_m3oe_routing(model: nn.Module) -> M3OERouting | None:
    """The routing object shared by the model's M3OE layers (None if the model has none)."""
    for m in model.modules():
        if isinstance(m, M3OELinear):
            return m.routing
    return None


def _routing_of(model_or_routing) -> M3OERouting | None:
    if model_or_routing is None or isinstance(model_or_routing, M3OERouting):
        return model_or_routing
    return get_m3oe_routing(model_or_routing)


def set_m3oe_alpha(model_or_routing: nn.Module | M3OERouting | None, alpha: torch.Tensor | None) -> None:
    """Set the expert weights (``[P]`` or ``[batch, P]``, or None for uniform) for all layers at once."""
    routing = _routing_of(model_or_routing)
    if routing is None:
        if alpha is not None:
            raise ValueError("model has no M3OE layers")
        return
    routing.set(alpha)


@contextlib.contextmanager
def m3oe_alpha(model_or_routing: nn.Module | M3OERouting | None, alpha: torch.Tensor | None):
    """``with m3oe_alpha(model, alpha): model(...)`` sets the gate weights and restores the previous ones."""
    routing = _routing_of(model_or_routing)
    if routing is None:
        if alpha is not None:
            raise ValueError("model has no M3OE layers")
        yield
        return
    prev = routing.alpha
    routing.set(alpha)
    try:
        yield
    finally:
        routing.alpha = prev


@contextlib.contextmanager
def m3oe_disabled(model_or_routing: nn.Module | M3OERouting | None):
    """Run the base FM: every M3OE layer returns only its frozen base layer's output."""
    routing = _routing_of(model_or_routing)
    if routing is None:
        yield
        return
    prev = routing.enabled
    routing.enabled = False
    try:
        yield
    finally:
        routing.enabled = prev
