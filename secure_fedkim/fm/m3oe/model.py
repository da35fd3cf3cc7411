"""Applying M3OE to a model (like peft's ``lora/model.py``): inject into target Linears, find the layers,
set or disable the routing weights."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from secure_fedkim.fm.m3oe.config import M3OEConfig
from secure_fedkim.fm.m3oe.layer import M3OELinear, M3OERouting


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
