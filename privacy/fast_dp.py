"""A leaner per-step path for Opacus DP-SGD on small models (``grad_sample_mode="lean"``).

On the demo's client models (5k-40k parameters, 8-14 parameter tensors, batch 32 on one CPU thread)
Opacus's ``"hooks"`` mode spends more time in Python than in arithmetic: a full backward hook per layer
(``register_full_backward_hook`` wraps every layer's inputs and outputs in extra autograd nodes), a
zero-filled buffer per parameter and step that the per-sample gradient is then added into, and a
``DPOptimizer`` that loops over parameters several times per step (``accumulated_iterations`` alone is
recomputed once per parameter). This module keeps every privacy-relevant piece of Opacus and replaces
only that bookkeeping:

* :class:`LeanGradSampleModule` computes the same per-sample gradients with Opacus's own per-layer rules
  (``GradSampleModule.GRAD_SAMPLERS``: group/layer norm, embedding; Linear's and ungrouped Conv1d/2d's
  einsums are written as the equivalent single ``bmm``); it captures a layer's
  input with a forward hook and its output gradient with a tensor hook on the output, and stores the
  rule's result directly in ``p.grad_sample``. Layers without an Opacus rule are refused (no functorch
  fallback), as is gradient accumulation across backward passes (Poisson sampling forbids it anyway).
  A wide Linear weight's per-sample gradient is kept factored (inputs and output gradients) instead of
  built as a ``[B, out, in]`` tensor (see the class). The output's tensor hook also sees the gradient of
  the output as the layer produced it when a later op modifies it in place (where Opacus's full backward
  hook raises).
* :class:`FusedDPOptimizer` clips and noises all parameters at once: small per-sample gradients are
  flattened into one ``[B, D]`` matrix (large ones are used in place, factored ones through their
  factors), the per-sample norm over all parameters is the square root of the summed squared row norms
  (= the norm of the per-parameter norms that Opacus computes), the clipped sum is ``clip_factor @ G``,
  and the Gaussian noise is one ``N(0, (sigma*C)^2 I_D)`` draw over all D coordinates (the same
  distribution as one draw per parameter). Secure mode, skipped (virtual) steps and mixed dtypes/devices
  build any factored gradients and use ``DPOptimizer``'s own per-parameter code.
* :class:`LeanPrivacyEngine` is ``opacus.PrivacyEngine`` with those two classes plugged in; the Poisson
  ``DPDataLoader``, the sample rate, the noise multiplier, ``max_grad_norm`` and the accountant's step
  hook all come from Opacus unchanged. With ``groups=`` it runs patient-level DP-SGD (:mod:`privacy.patient`):
  the patient Poisson loader, and per-patient sums of the per-sample gradients (factored ones stay
  factored) before the same clipping, in this fused optimizer or in Opacus's own (``"hooks"``).

``tests/test_dp_fast.py`` checks the clipped sums against one backward pass per record (noise off) on every
encoder of the demo's client models, and the noise's scale.

For auditing only, :func:`add_canary_rows` adds records with a one-coordinate gradient to the next step
(clipped, summed and noised by the optimizer's own code; ``attacks/whitebox.py``, ``attacks/mechanism.py``).
Clipping factors and noise draws are the methods ``FusedDPOptimizer._clip_factor`` and ``_draw_noise`` so
``attacks/planted_bugs.py`` can break them on purpose in tests; nothing changes unless they are called.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from .patient import PatientDPOptimizer, PatientPoissonLoader, group_per_sample_grads
from . import randomness as randomness_module
from .randomness import DPRandomness, PoissonLoader, SourcedNoise

__all__ = [
    "LeanGradSampleModule", "FusedDPOptimizer", "LeanPrivacyEngine", "LEAN_MODE", "lean_supported", "add_canary_rows",
]

LEAN_MODE = "lean"
_BIG = 16384  # parameters in one tensor above which a per-sample gradient is worth not copying or building


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


def _conv_rule(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
    """Opacus's ``compute_conv_grad_sample`` for ungrouped, zero-padded Conv1d/Conv2d, as unfold + one bmm.

    Per record n: dW_n = B_n X_n^T with X_n the unfolded input patches [C*k, L] and B_n the output
    gradients [out, L]; db_n = B_n summed over positions. Other convolutions use Opacus's rule.
    """
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    a = activations[0].to(backprops.dtype)
    n = a.shape[0]
    if isinstance(layer, nn.Conv1d):
        cols = F.unfold(
            a.unsqueeze(-2), kernel_size=(1, layer.kernel_size[0]), dilation=(1, layer.dilation[0]),
            padding=(0, layer.padding[0]), stride=(1, layer.stride[0]),
        )
    else:
        cols = F.unfold(a, kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    b = backprops.reshape(n, backprops.shape[1], -1)  # [n, out, L]
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(b, cols.transpose(1, 2)).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum(dim=2)
    return ret


_OWN_RULES = {nn.Linear: _linear_rule, nn.Conv1d: _conv_rule, nn.Conv2d: _conv_rule}


def _rule(layer_type: type):
    """The per-layer rule "lean" uses: Opacus's registered one, except cheaper calls for Linear and Conv."""
    return _OWN_RULES.get(layer_type) or GradSampleModule.GRAD_SAMPLERS.get(layer_type)


def lean_supported(module: nn.Module) -> bool:
    """Whether every layer with its own trainable parameters has an Opacus per-sample rule."""
    return all(
        _rule(type(m)) is not None
        for m in module.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    )


class LeanGradSampleModule(GradSampleModule):
    """``GradSampleModule`` with cheaper hooks; the same per-sample gradients, some kept factored.

    One forward hook per layer that has trainable parameters saves the layer's (detached) inputs and puts
    a gradient hook on its output; that hook calls the layer's per-sample gradient rule (Opacus's
    ``GRAD_SAMPLERS[type(layer)]``) with the output gradient, scaled by the batch size for a mean loss
    exactly as Opacus's ``rearrange_grad_samples`` does, and stores the result in ``p.grad_sample``.

    A Linear weight's per-sample gradient is ``G_n = B_n^T A_n`` (``A_n`` [T, in]: record n's inputs at
    its T positions, ``B_n`` [T, out]: the output gradients). For a large weight (``in*out >= 16384``;
    smaller ones are cheap to build) with ``T*(in+out) <= in*out`` it is not built:
    ``(A, B)`` is kept in ``p._lean_factors`` and :class:`FusedDPOptimizer` uses
    ``||G_n||^2 = sum((A_n A_n^T) * (B_n B_n^T))`` for the norm and ``sum_n c_n G_n = (c*B)^T A`` for the
    clipped sum (the "book-keeping" form of per-sample clipping; exact, one backward pass).

    A layer called several times in one forward pass gets the sum of its per-sample gradients (what the
    whole pass's per-sample gradient is). A second backward pass without ``zero_grad`` raises, as Opacus
    does under Poisson sampling.
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
            wide = type(module) is nn.Linear and module.weight.requires_grad and module.weight.numel() >= _BIG
            handles.append(module.register_forward_hook(self._forward_hook(rule, loss_reduction == "mean", wide)))
        for p in self._module.parameters():
            p._lean_factors = None
        self.enable_hooks()

    def cleanup(self):
        super().cleanup()
        for p in self._module.parameters():
            for attr in ("_lean_factors", "_lean_pass", "_lean_processed"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def set_grad_sample_to_none(self):
        super().set_grad_sample_to_none()
        for p in self._module.parameters():
            p._lean_factors = None

    def forward(self, *args, **kwargs):
        self._pass += 1
        return self._module(*args, **kwargs)

    @staticmethod
    def _accept(p: torch.Tensor, pass_id: int) -> bool:
        """True if p already holds this pass's per-sample gradient (layer used twice); raise if an older one."""
        if p.grad_sample is None and p._lean_factors is None:
            p._lean_pass = pass_id
            return False
        if getattr(p, "_lean_pass", None) == pass_id:
            return True
        raise ValueError(
            "Poisson sampling is not compatible with grad accumulation. You need to call "
            "optimizer.step() (or zero_grad()) after every forward/backward pass"
        )

    def _forward_hook(self, rule: Callable, mean: bool, wide: bool):
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
                if wide:  # a Linear weight with in*out >= _BIG
                    n = backprops.shape[0]
                    b = backprops.reshape(n, -1, backprops.shape[-1])  # [n, T, out]
                    a = activations[0].to(b.dtype).reshape(n, -1, module.in_features)  # [n, T, in]
                    t, i, o = b.shape[1], module.in_features, module.out_features
                    if t * (i + o) <= i * o:  # the Gram matrices cost less than building G_n
                        w = module.weight
                        if self._accept(w, pass_id):
                            if w._lean_factors is None:  # materialised by an earlier call in this pass
                                w.grad_sample = w.grad_sample + torch.bmm(b.transpose(1, 2), a)
                            else:  # sum of B_j^T A_j = [B_1 B_2]^T [A_1 A_2] (positions concatenated)
                                a0, b0 = w._lean_factors
                                w._lean_factors = (torch.cat([a0, a], 1), torch.cat([b0, b], 1))
                        else:
                            w._lean_factors, w._lean_processed = (a, b), False
                        if module.bias is not None and module.bias.requires_grad:
                            self._store(module.bias, b.sum(dim=1), pass_id)
                        return
                for p, gs in rule(module, activations, backprops).items():
                    if p.requires_grad:
                        self._store(p, gs, pass_id)

            output.register_hook(on_grad)

        return hook

    def _store(self, p: torch.Tensor, gs: torch.Tensor, pass_id: int) -> None:
        if not self._accept(p, pass_id):
            p.grad_sample = gs
        elif p._lean_factors is not None:  # factored by an earlier call in this pass: materialise both
            a, b = p._lean_factors
            p._lean_factors, p.grad_sample = None, torch.bmm(b.transpose(1, 2), a) + gs
        else:
            p.grad_sample = p.grad_sample + gs


def materialize(p: torch.Tensor) -> None:
    """Turn a factored Linear weight's per-sample gradient into ``p.grad_sample`` ([B, out, in])."""
    factors = getattr(p, "_lean_factors", None)
    if factors is not None:
        a, b = factors
        p._lean_factors, p.grad_sample = None, torch.bmm(b.transpose(1, 2), a)


class FusedDPOptimizer(SourcedNoise, DPOptimizer):
    """``DPOptimizer`` whose clipping, noise and scaling run over all parameters at once.

    Same algorithm as :class:`opacus.optimizers.DPOptimizer` (flat clipping): per-sample norm over all
    parameters, clip factor ``min(1, C / (norm + 1e-6))``, sum over the batch, add ``N(0, (sigma*C)^2)``
    to every coordinate, divide by ``expected_batch_size * accumulated_iterations`` for a mean loss, then
    the step hook (the accountant's) and the wrapped optimizer's step. Factored Linear weights
    (:class:`LeanGradSampleModule`) enter the norm and the clipped sum without being built. With
    ``patient_batches`` set (patient-level DP-SGD, :mod:`privacy.patient`), the per-sample gradients are
    first summed per patient of that loader's last batch, so each patient's sum is what gets clipped.
    """

    _lean_fused = False  # True inside a fused step (LeanGradSampleModule refuses accumulation: 1 pass)
    _canary_rows = None  # auditing only (see add_canary_rows): (flat coordinates, values) of extra records
    patient_batches = None  # patient-level DP-SGD: the PatientPoissonLoader whose last batch is being stepped

    @property
    def accumulated_iterations(self) -> int:
        if self._lean_fused:
            return 1
        for p in self.params:
            if getattr(p, "_lean_factors", None) is not None and p.grad_sample is None:
                return 1  # factors exist only for one pass: accumulation raises in the hooks
        return super().accumulated_iterations

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none)
        for p in self.params:
            if getattr(p, "_lean_factors", None) is not None:
                p._lean_factors = None

    def _split(self, params: list):
        """(small, big, factored) parameter lists for the fused step, or None to use DPOptimizer's own."""
        if self.secure_mode or self._step_skip_queue or not params:
            return None
        small, big, factored = [], [], []
        dtype, device = params[0].dtype, params[0].device
        for p in params:
            gs, factors = getattr(p, "grad_sample", None), getattr(p, "_lean_factors", None)
            if getattr(p, "summed_grad", None) is not None or (gs is None) == (factors is None) or p.dtype != dtype or p.device != device:
                return None
            ref = factors[0] if gs is None else gs
            if not isinstance(ref, torch.Tensor) or ref.dtype != dtype or ref.device != device:
                return None
            (factored if gs is None else big if p.numel() >= _BIG else small).append(p)
        return small, big, factored

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        params = self.params
        if self.patient_batches is not None:  # one row per sampled patient: the sum of its records' rows
            group_per_sample_grads(params, self.patient_batches)
        split = self._split(params)
        if split is None:
            for p in params:
                materialize(p)
            if self._canary_rows is not None:
                _append_dense_rows(params, *self._canary_rows)
                self._canary_rows = None
            return super().pre_step(closure)
        # small per-sample gradients are concatenated into one [B, D] matrix; large ones (copying them would
        # cost more than the extra calls) are used in place; factored Linear weights are never built
        small, big, factored = split
        self._lean_fused = True
        try:
            return self._fused_step(params, small, big, factored)
        finally:
            self._lean_fused = False

    def _fused_step(self, params: list, small: list, big: list, factored: list) -> bool:
        if any(p._lean_processed for p in factored):
            raise ValueError("this step's per-sample gradients were already clipped and noised; run a new backward pass")
        for p in small + big:
            _check_processed_flag(p.grad_sample)
        batches = {p.grad_sample.shape[0] for p in small + big} | {p._lean_factors[0].shape[0] for p in factored}
        if len(batches) != 1:
            raise ValueError("per-sample gradients of different batch sizes")
        batch = batches.pop()
        flat = torch.cat([p.grad_sample.reshape(batch, -1) for p in small], dim=1) if small else None  # [B, D]
        sq = torch.linalg.vector_norm(flat, dim=1).square() if small else torch.zeros(batch, dtype=params[0].dtype, device=params[0].device)
        for p in big:
            sq = sq + torch.linalg.vector_norm(p.grad_sample.reshape(batch, -1), dim=1).square()
        for p in factored:
            a, b = p._lean_factors
            if a.shape[1] == 1:  # one position: ||b a^T|| = ||a|| ||b||
                sq = sq + a.pow(2).sum(dim=(1, 2)) * b.pow(2).sum(dim=(1, 2))
            else:
                sq = sq + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum(dim=(1, 2))
        canary, self._canary_rows = self._canary_rows, None
        audit = randomness_module.OBSERVER
        if canary is None and audit is not None and hasattr(audit, "canary_rows"):
            canary = audit.canary_rows(self)  # the run-level audit's canaries (attacks/runlevel.py), or None
        if canary is not None:  # one-coordinate records: their squared norm is their value squared
            sq = torch.cat([sq, canary[1].square()])
        clip_factor = self._clip_factor(sq)
        if canary is not None:
            clip_factor, canary_clip = clip_factor[:batch], clip_factor[batch:]
        if not big and not factored:  # all in flat, in the optimizer's parameter order
            summed = clip_factor @ flat
        else:
            sums = dict(zip(small, (clip_factor @ flat).split([p.numel() for p in small]))) if small else {}
            for p in big:
                sums[p] = clip_factor @ p.grad_sample.reshape(batch, -1)
            for p in factored:
                a, b = p._lean_factors
                sums[p] = ((b * clip_factor[:, None, None]).reshape(-1, b.shape[-1]).t() @ a.reshape(-1, a.shape[-1])).reshape(-1)
            summed = torch.cat([sums[p] for p in params])
        records = summed  # the records' clipped sum alone: what an audit's tap subtracts from the release
        if canary is not None:
            summed = summed.index_add(0, canary[0], canary_clip * canary[1])
        for p in small + big:
            _mark_as_processed(p.grad_sample)
        for p in factored:
            p._lean_processed = True
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0:
            grad = summed + self._draw_noise(std, summed)
        else:
            grad = summed.clone()
        if audit is not None:  # an audit watching the run (attacks/runlevel.py): the noise plus any canary rows
            audit.noise(self.randomness, grad - records, std)
        if self.loss_reduction == "mean":
            grad /= self.expected_batch_size  # accumulated_iterations is 1 (a single backward pass)
        sizes = [p.numel() for p in params]
        for p, s, g in zip(params, summed.split(sizes), grad.split(sizes)):
            p.summed_grad, p.grad = s.view_as(p), g.view_as(p)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _clip_factor(self, sq_norms: torch.Tensor) -> torch.Tensor:
        """Per-sample clip factors ``min(1, C / (norm + 1e-6))`` from squared norms (Opacus's formula)."""
        return (self.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def add_canary_rows(optimizer: DPOptimizer, index: torch.Tensor, values: torch.Tensor) -> None:
    """AUDITING ONLY: add ``len(index)`` records to the current step, record k's per-sample gradient being
    ``values[k]`` at flat coordinate ``index[k]`` (coordinates of the optimizer's parameters concatenated in
    ``optimizer.params`` order) and 0 elsewhere.

    Call after ``loss.backward()`` and before ``optimizer.step()``. The rows are clipped, summed and noised
    with the batch's own records by the optimizer's own code: :class:`FusedDPOptimizer` takes them into its
    fused clip (never building them), Opacus's ``DPOptimizer`` gets them appended to every ``p.grad_sample``.
    Nothing is added unless this is called (``attacks/whitebox.py`` and ``attacks/mechanism.py`` do) or, in the
    fused step, an audit observing the run (``privacy.randomness.observed``) has a ``canary_rows(optimizer)``
    that returns them (``attacks/runlevel.py``: canaries in every step of a re-executed run).
    """
    index = torch.as_tensor(index, dtype=torch.long)
    values = torch.as_tensor(values, dtype=optimizer.params[0].dtype)
    if index.shape != values.shape or index.dim() != 1:
        raise ValueError(f"index and values must be 1-d and of the same length, got {tuple(index.shape)} and {tuple(values.shape)}")
    total = sum(p.numel() for p in optimizer.params)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= total):
        raise ValueError(f"canary coordinates must be in [0, {total}), the optimizer's parameter count")
    if isinstance(optimizer, FusedDPOptimizer):
        optimizer._canary_rows = (index, values)
    else:
        _append_dense_rows(optimizer.params, index, values)


def _append_dense_rows(params: list, index: torch.Tensor, values: torch.Tensor) -> None:
    """Append one per-sample gradient row per canary to every ``p.grad_sample`` (Opacus's layout)."""
    start = 0
    for p in params:
        rows = torch.zeros((len(index), p.numel()), dtype=p.grad_sample.dtype, device=p.grad_sample.device)
        mine = (index >= start) & (index < start + p.numel())
        rows[mine.nonzero().squeeze(1), index[mine] - start] = values[mine].to(rows.dtype)
        p.grad_sample = torch.cat([p.grad_sample, rows.view(len(index), *p.shape)])
        start += p.numel()


class LeanPrivacyEngine(PrivacyEngine):
    """``opacus.PrivacyEngine`` that also accepts ``grad_sample_mode="lean"`` (see the module docstring),
    and patient-level DP-SGD (``groups=``, see :meth:`make_private`).

    Every random draw of a session comes from the ``randomness=`` passed to :meth:`make_private` (a
    :class:`~privacy.randomness.DPRandomness`; a secure one if none is given): the Poisson sample of
    records (:class:`~privacy.randomness.PoissonLoader`) or patients, and the noise of every optimizer it
    makes (:class:`~privacy.randomness.SourcedNoise`). Opacus's own ``secure_mode`` (torchcsprng) and
    ``noise_generator`` (a torch generator) are refused: nothing is drawn from a torch generator.
    """

    _patient_loader = None
    _randomness: DPRandomness | None = None

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        if secure_mode:
            raise ValueError("Opacus's secure_mode needs torchcsprng; pass randomness=DPRandomness.secure() to make_private")
        import warnings

        with warnings.catch_warnings():  # Opacus's "Secure RNG turned off": its RNG is not used here
            warnings.simplefilter("ignore")
            super().__init__(accountant=accountant, secure_mode=False)

    def make_private(self, *, module, optimizer, data_loader, randomness: DPRandomness | None = None, groups=None,
                     patients_per_batch=None, max_records_per_patient=None, grad_sample_mode="hooks",
                     noise_generator=None, **kwargs):
        """``PrivacyEngine.make_private`` with every draw from ``randomness`` (default ``DPRandomness.secure()``);
        with ``groups`` (one patient id per record of ``data_loader.dataset``), patient-level DP-SGD
        (:mod:`privacy.patient`).

        Patient level: the returned loader is a :class:`~privacy.patient.PatientPoissonLoader` (patients
        sampled with rate ``q = 1/ceil(n_patients/patients_per_batch)``, default ``patients_per_batch`` =
        ``data_loader.batch_size``; at most ``max_records_per_patient`` records each); the optimizer
        (``FusedDPOptimizer`` for ``"lean"``, :class:`~privacy.patient.PatientDPOptimizer` for ``"hooks"``)
        clips each patient's summed gradient, divides by ``int(q * n_patients)`` for a mean loss, and the
        accountant's hook steps with ``q``. ``"ghost"`` clipping cannot clip per patient and is refused.
        """
        if noise_generator is not None:
            raise ValueError("noise_generator (a torch generator) is refused: every DP draw comes from "
                             "randomness= (privacy.randomness.DPRandomness)")
        if randomness is not None and not isinstance(randomness, DPRandomness):
            raise TypeError(f"randomness must be a privacy.randomness.DPRandomness, got {type(randomness).__name__}")
        self._randomness = randomness if randomness is not None else DPRandomness.secure()
        try:
            if groups is None:
                return super().make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                            grad_sample_mode=grad_sample_mode, **kwargs)
            return self._make_private_patients(module, optimizer, data_loader, groups, patients_per_batch,
                                               max_records_per_patient, grad_sample_mode, kwargs)
        finally:
            self._randomness = None

    def _make_private_patients(self, module, optimizer, data_loader, groups, patients_per_batch,
                               max_records_per_patient, grad_sample_mode, kwargs):
        if grad_sample_mode not in (LEAN_MODE, "hooks"):
            raise NotImplementedError(f"patient-level DP-SGD supports grad_sample_mode 'lean' or 'hooks', not {grad_sample_mode!r}")
        if kwargs.get("poisson_sampling", True) is False:
            raise ValueError("patient-level DP-SGD samples patients by Poisson sampling; poisson_sampling=False is refused")
        if max_records_per_patient is None:
            raise ValueError("patient-level DP-SGD needs max_records_per_patient")
        loader = PatientPoissonLoader(
            data_loader.dataset, groups, patients_per_batch or data_loader.batch_size, max_records_per_patient,
            self._randomness, collate_fn=data_loader.collate_fn,
        )
        self._patient_loader = loader
        try:
            module, optimizer, loader = super().make_private(
                module=module, optimizer=optimizer, data_loader=loader, grad_sample_mode=grad_sample_mode,
                **{**kwargs, "poisson_sampling": False},
            )
        finally:
            self._patient_loader = None
        module.forbid_grad_accumulation()
        optimizer.expected_batch_size = loader.expected_batch_size
        optimizer.patient_batches = loader
        return module, optimizer, loader

    def _prepare_data_loader(self, data_loader, *, poisson_sampling: bool, distributed: bool, **kwargs):
        if isinstance(data_loader, PatientPoissonLoader):
            self.dataset = data_loader.dataset
            return data_loader
        if poisson_sampling:
            if distributed:
                raise NotImplementedError("Poisson sampling here runs on one process only")
            self.dataset = data_loader.dataset
            return PoissonLoader.like(data_loader, self._randomness)
        return super()._prepare_data_loader(data_loader, poisson_sampling=False, distributed=distributed, **kwargs)

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
        if distributed or clipping != "flat":
            raise NotImplementedError(f"grad_sample_mode {grad_sample_mode!r} here supports flat clipping on one process only")
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        if grad_sample_mode == LEAN_MODE:
            optim_class = FusedDPOptimizer
        elif self._patient_loader is not None:
            optim_class = PatientDPOptimizer
        else:
            optim_class = SourcedGhostDPOptimizer if grad_sample_mode == "ghost" else SourcedDPOptimizer
        dp_optimizer = optim_class(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=None,
            secure_mode=False, **kwargs,
        )
        dp_optimizer.randomness = self._randomness
        return dp_optimizer


class SourcedDPOptimizer(SourcedNoise, DPOptimizer):
    """Opacus's ``DPOptimizer`` (``"hooks"``) with its noise from the session's DPRandomness."""


class SourcedGhostDPOptimizer(SourcedNoise, DPOptimizerFastGradientClipping):
    """Opacus's ghost-clipping optimizer with its noise from the session's DPRandomness."""
