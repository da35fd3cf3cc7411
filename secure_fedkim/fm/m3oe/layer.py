"""M3OE's layers (like peft's ``lora/layer.py``): the shared routing weights, the adapted Linear with P batched
LoRA experts, and the gate that computes the weights from the task and modality descriptions."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from secure_fedkim.fm.m3oe.config import M3OEConfig


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
