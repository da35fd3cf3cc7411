"""FEDKIM's lightweight multimodal client model: one encoder per modality, one binary head per task.

Every encoder turns a batch of its modality into a short sequence of modality tokens [B, T, d]; those
tokens are what the server later splices into the foundation model. No BatchNorm anywhere (DP-SGD needs
per-sample gradients) and no `nn.MultiheadAttention` (Opacus rejects it): GroupNorm, LayerNorm, and
attention pooling built from Linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

# Input shapes the data layer produces for each modality (see secure_fedkim.data).
TEXT_VOCAB_BUCKETS = 1024  # FM tokenizer ids hashed into this many rows: small to send, cheap per-sample gradients


class TabularEncoder(nn.Module):
    """x [B, F] -> MLP -> T tokens."""

    def __init__(self, in_features: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.mlp = nn.Sequential(nn.Linear(in_features, 128), nn.GELU(), nn.Linear(128, num_tokens * dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.mlp(x).view(x.shape[0], self.num_tokens, self.dim))


class TimeSeriesEncoder(nn.Module):
    """x [B, L, C] (time steps first) -> per-step MLP, then a learned mix of the L steps into T tokens.

    The mixing layer's weights are per time step, so it carries position without a position embedding
    (a bare nn.Parameter would have no per-sample gradient rule in Opacus).
    """

    def __init__(self, channels: int, steps: int, dim: int, num_tokens: int):
        super().__init__()
        self.step = nn.Sequential(nn.Linear(channels, dim), nn.GELU(), nn.Linear(dim, dim))
        self.mix = nn.Linear(steps, num_tokens)  # token mixing across time, MLP-Mixer style
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.step(x)  # [B, L, d]
        return self.norm(self.mix(h.transpose(1, 2)).transpose(1, 2))


class SignalEncoder(nn.Module):
    """x [B, C, L] (leads first) -> 1-D convolutions over time -> T tokens."""

    def __init__(self, leads: int, dim: int, num_tokens: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(leads, 16, 7, stride=3), nn.GroupNorm(4, 16), nn.GELU(),
            nn.Conv1d(16, 32, 7, stride=3), nn.GroupNorm(8, 32), nn.GELU(),
            nn.Conv1d(32, dim, 5, stride=2), nn.GroupNorm(8, dim), nn.GELU(),
            nn.AdaptiveAvgPool1d(num_tokens),
        )

    def forward(self, x):
        return self.conv(x).transpose(1, 2)


class ImageEncoder(nn.Module):
    """x [B, 1, H, W] -> small CNN -> a grid of patch tokens (T must be a square number)."""

    def __init__(self, channels: int, dim: int, num_tokens: int):
        super().__init__()
        side = round(num_tokens**0.5)
        if side * side != num_tokens:
            raise ValueError(f"image encoder: num_tokens must be a square number, not {num_tokens}")
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.GELU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.GroupNorm(8, dim), nn.GELU(),
            nn.AdaptiveAvgPool2d(side),
        )

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


class TextEncoder(nn.Module):
    """ids [B, L] (0 = padding) -> hashed embedding -> attention pooling with T learned queries."""

    def __init__(self, dim: int, num_tokens: int, embed_dim: int = 16, buckets: int = TEXT_VOCAB_BUCKETS):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, embed_dim, padding_idx=0)
        self.proj = nn.Sequential(nn.Linear(embed_dim, dim), nn.GELU())
        self.score = nn.Linear(dim, num_tokens)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids):
        pad = ids == 0
        h = self.proj(self.embed(torch.where(pad, 0, ids % (self.buckets - 1) + 1)))  # [B, L, d]
        scores = self.score(h).masked_fill(pad.unsqueeze(-1), -1e4)  # [B, L, T]
        weights = torch.softmax(scores, dim=1)
        return self.norm(torch.einsum("blt,bld->btd", weights, h))


def build_encoder(modality: str, input_shape: tuple[int, ...], dim: int, num_tokens: int) -> nn.Module:
    """The encoder for one modality, sized from one sample's shape (without the batch axis)."""
    if modality == "tabular":
        return TabularEncoder(input_shape[0], dim, num_tokens)
    if modality == "timeseries":
        steps, channels = input_shape
        return TimeSeriesEncoder(channels, steps, dim, num_tokens)
    if modality == "signal":
        return SignalEncoder(input_shape[0], dim, num_tokens)
    if modality == "image":
        return ImageEncoder(input_shape[0], dim, num_tokens)
    if modality == "text":
        return TextEncoder(dim, num_tokens)
    raise ValueError(f"no encoder for modality {modality!r}")


class TaskHead(nn.Module):
    """Mean of the modality tokens -> one logit (binary task, BCE loss)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, tokens):
        return self.linear(tokens.mean(dim=1)).squeeze(-1)


class TaskModel(nn.Module):
    """One task's path through the client model; shares its parameters with the ClientModel."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


class ClientModel(nn.Module):
    """All encoders (keyed by modality) and heads (keyed by task) a hospital trains and sends."""

    def __init__(self, task_modalities: dict[str, str], input_shapes: dict[str, tuple[int, ...]], dim: int, num_tokens: int):
        super().__init__()
        self.task_modalities = dict(task_modalities)
        self.encoders = nn.ModuleDict(
            {m: build_encoder(m, input_shapes[m], dim, num_tokens) for m in sorted(set(task_modalities.values()))}
        )
        self.heads = nn.ModuleDict({t: TaskHead(dim) for t in sorted(task_modalities)})

    def task_model(self, task: str) -> TaskModel:
        return TaskModel(self.encoders[self.task_modalities[task]], self.heads[task])

    def forward(self, x, task: str):
        return self.task_model(task)(x)
