"""A leaner per-step path for Opacus DP-SGD on small models (``grad_sample_mode="lean"``).

On the demo's client models (5k-40k parameters, 8-14 parameter tensors, batch 32 on one CPU thread)
Opacus's ``"hooks"`` mode spends more time in Python than in arithmetic: a full backward hook per layer
(``register_full_backward_hook`` wraps every layer's inputs and outputs in extra autograd nodes), a
zero-filled buffer per parameter and step that the per-sample gradient is then added into, and a
``DPOptimizer`` that loops over parameters several times per step (``accumulated_iterations`` alone is
recomputed once per parameter). This module keeps every privacy-relevant piece of Opacus and replaces
only that bookkeeping:

* :class:`LeanGradSampleModule` computes the same per-sample gradients with Opacus's own per-layer rules
  (``GradSampleModule.GRAD_SAMPLERS``: conv, group/layer norm, embedding; Linear's einsum is written as
  the equivalent single ``bmm``); it captures a layer's
  input with a forward hook and its output gradient with a tensor hook on the output, and stores the
  rule's result directly in ``p.grad_sample``. Layers without an Opacus rule are refused (no functorch
  fallback), as is gradient accumulation across backward passes (Poisson sampling forbids it anyway).
* :class:`FusedDPOptimizer` clips and noises all parameters at once: per-sample gradients are flattened
  into one ``[B, D]`` matrix, the per-sample norm is the norm of each row (= the norm of the per-parameter
  norms that Opacus computes), the clipped sum is one ``clip_factor @ G`` product, and the Gaussian noise
  is one ``N(0, (sigma*C)^2 I_D)`` draw (the same distribution as one draw per parameter). Secure mode,
  skipped (virtual) steps and mixed dtypes/devices use ``DPOptimizer``'s own per-parameter code.
* :class:`LeanPrivacyEngine` is ``opacus.PrivacyEngine`` with those two classes plugged in; the Poisson
  ``DPDataLoader``, the sample rate, the noise multiplier, ``max_grad_norm`` and the accountant's step
  hook all come from Opacus unchanged.

``tests/test_dp_fast.py`` checks the clipped sums against per-sample backward passes (noise off) and the
noise's scale.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

__all__ = ["LeanGradSampleModule", "FusedDPOptimizer", "LeanPrivacyEngine", "LEAN_MODE", "lean_supported"]

LEAN_MODE = "lean"


def _linear_rule(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> dict:
    """Opacus's ``compute_linear_grad_sample`` (``einsum("n...i,n...j->nij")``) as one batched matmul.

    Per record n: dW_n = sum over the middle axes of outer(backprop, input), db_n = sum of backprops.
    """
    a = activations[0].to(backprops.dtype)
    n = backprops.shape[0]
    b = backprops.reshape(n, -1, backprops.shape[-1])  # [n, positions, out]
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(b.transpose(1, 2), a.reshape(n, -1, a.shape[-1]))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=1)
    return ret


_OWN_RULES = {nn.Linear: _linear_rule}


def _rule(layer_type: type):
    """The per-layer rule "lean" uses: Opacus's registered one, except a cheaper call for Linear."""
    return _OWN_RULES.get(layer_type) or GradSampleModule.GRAD_SAMPLERS.get(layer_type)


def lean_supported(module: nn.Module) -> bool:
    """Whether every layer with its own trainable parameters has an Opacus per-sample rule."""
    return all(
        _rule(type(m)) is not None
        for m in module.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    )


class LeanGradSampleModule(GradSampleModule):
    """``GradSampleModule`` with cheaper hooks; same per-sample gradients in ``p.grad_sample``.

    One forward hook per layer that has trainable parameters saves the layer's (detached) inputs and puts
    a gradient hook on its output; that hook calls Opacus's per-sample gradient rule for the layer
    (``GRAD_SAMPLERS[type(layer)]``) with the output gradient, scaled by the batch size for a mean loss
    exactly as Opacus's ``rearrange_grad_samples`` does. A layer called several times in one forward pass
    gets the sum of its per-sample gradients (what the whole pass's per-sample gradient is). A second
    backward pass without ``zero_grad`` raises, as Opacus does under Poisson sampling.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean", strict: bool = True):
        self._pass = 0
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        if not batch_first or force_functorch:
            raise NotImplementedError("grad_sample_mode 'lean' needs batch_first=True and Opacus's own layer rules")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        handles: list = []
        self._module.autograd_grad_sample_hooks = handles
        self.autograd_grad_sample_hooks = handles
        for module in self.iterate_submodules(self._module):
            rule = _rule(type(module))
            if rule is None:
                raise NotImplementedError(
                    f"grad_sample_mode 'lean' has no per-sample gradient rule for {type(module).__name__}; "
                    f"use grad_sample_mode 'hooks'"
                )
            handles.append(module.register_forward_hook(self._forward_hook(rule, loss_reduction == "mean")))
        self.enable_hooks()

    def forward(self, *args, **kwargs):
        self._pass += 1
        return self._module(*args, **kwargs)

    def _forward_hook(self, rule: Callable, mean: bool):
        def hook(module: nn.Module, inputs, output) -> None:
            if not self.hooks_enabled or not module.training or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor):
                raise NotImplementedError(f"grad_sample_mode 'lean': {type(module).__name__} must return one tensor")
            if not output.requires_grad:
                return
            activations = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]
            pass_id = self._pass

            def on_grad(grad: torch.Tensor) -> None:
                backprops = grad.detach()
                if mean:
                    backprops = backprops * backprops.shape[0]
                for p, gs in rule(module, activations, backprops).items():
                    if not p.requires_grad:
                        continue
                    if p.grad_sample is None:
                        p.grad_sample, p._lean_pass = gs, pass_id
                    elif getattr(p, "_lean_pass", None) == pass_id:  # layer used twice in this pass
                        p.grad_sample = p.grad_sample + gs
                    else:
                        raise ValueError(
                            "Poisson sampling is not compatible with grad accumulation. You need to call "
                            "optimizer.step() (or zero_grad()) after every forward/backward pass"
                        )

            output.register_hook(on_grad)

        return hook


class FusedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose clipping, noise and scaling run over all parameters at once.

    Same algorithm as :class:`opacus.optimizers.DPOptimizer` (flat clipping): per-sample norm over all
    parameters, clip factor ``min(1, C / (norm + 1e-6))``, sum over the batch, add ``N(0, (sigma*C)^2)``
    to every coordinate, divide by ``expected_batch_size * accumulated_iterations`` for a mean loss, then
    the step hook (the accountant's) and the wrapped optimizer's step.
    """

    def _fusable(self, params: list) -> bool:
        if self.secure_mode or self._step_skip_queue or not params:
            return False
        first = params[0]
        for p in params:
            gs = getattr(p, "grad_sample", None)
            if not isinstance(gs, torch.Tensor) or getattr(p, "summed_grad", None) is not None:
                return False
            if p.dtype != first.dtype or p.device != first.device or gs.dtype != p.dtype or gs.device != p.device:
                return False
        return True

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        params = self.params
        if not self._fusable(params):
            return super().pre_step(closure)
        grad_samples = [p.grad_sample for p in params]
        for g in grad_samples:
            _check_processed_flag(g)
        batch = grad_samples[0].shape[0]
        if any(g.shape[0] != batch for g in grad_samples):
            raise ValueError("per-sample gradients of different batch sizes")
        flat = torch.cat([g.reshape(batch, -1) for g in grad_samples], dim=1)  # [B, D]
        if batch == 0:
            summed = flat.new_zeros(flat.shape[1])
        else:
            norms = torch.linalg.vector_norm(flat, dim=1)
            clip_factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            summed = clip_factor @ flat
        for g in grad_samples:
            _mark_as_processed(g)
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0:
            noise = torch.normal(0.0, std, size=summed.shape, device=summed.device, dtype=summed.dtype, generator=self.generator)
            grad = summed + noise
        else:
            grad = summed.clone()
        if self.loss_reduction == "mean":
            grad /= self.expected_batch_size * self.accumulated_iterations
        offset = 0
        for p in params:
            n = p.numel()
            p.summed_grad = summed[offset : offset + n].view_as(p)
            p.grad = grad[offset : offset + n].view_as(p)
            offset += n
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


class LeanPrivacyEngine(PrivacyEngine):
    """``opacus.PrivacyEngine`` that also accepts ``grad_sample_mode="lean"`` (see the module docstring)."""

    def _prepare_model(self, module, *, batch_first=True, max_grad_norm=1.0, loss_reduction="mean", grad_sample_mode="hooks", wrap_model=True):
        if grad_sample_mode != LEAN_MODE:
            return super()._prepare_model(
                module, batch_first=batch_first, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                grad_sample_mode=grad_sample_mode, wrap_model=wrap_model,
            )
        if not wrap_model:
            raise NotImplementedError("grad_sample_mode 'lean' wraps the model")
        self.validate(module=module, optimizer=None, data_loader=None)
        if isinstance(module, GradSampleModule):
            raise ValueError("grad_sample_mode 'lean' needs a plain nn.Module, not a GradSampleModule")
        return LeanGradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction)

    def _prepare_optimizer(self, *, optimizer, noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction="mean",
                           distributed=False, clipping="flat", noise_generator=None, grad_sample_mode="hooks", **kwargs):
        if grad_sample_mode != LEAN_MODE:
            return super()._prepare_optimizer(
                optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, distributed=distributed,
                clipping=clipping, noise_generator=noise_generator, grad_sample_mode=grad_sample_mode, **kwargs,
            )
        if distributed or clipping != "flat":
            raise NotImplementedError("grad_sample_mode 'lean' supports flat clipping on one process only")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        return FusedDPOptimizer(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=generator,
            secure_mode=self.secure_mode, **kwargs,
        )
