"""The injection methods and the study variants, in one place.

``METHODS``: what ``injection.method`` may be, and how many M3OE experts each trains. ``VARIANTS``: what
``study.variants`` may list, each the ``injection.method`` and ``injection.gate_inputs`` it runs with. The
config's allowed names (``secure_fedkim.config``), the study (``secure_fedkim.drivers.study``) and the server's
foundation model (``secure_fedkim.fm.injection``) all read these, so a new variant is one line here.

No torch or transformers import: the config module imports this.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    experts: int | None  # M3OE experts; None = the configured injection.num_experts, 0 = none
    description: str


@dataclass(frozen=True)
class Variant:
    method: str  # the injection.method it runs with
    gate_inputs: str | None  # the injection.gate_inputs it runs with; None keeps the configured one (no gate)
    description: str

    def injection_settings(self) -> dict:
        """The injection keys this variant sets."""
        return {"method": self.method} | ({} if self.gate_inputs is None else {"gate_inputs": self.gate_inputs})


METHODS: dict[str, Method] = {
    "fedkim": Method(None, "M3OE: LoRA experts mixed by a gate that reads the task and modality"),
    "fedplug": Method(0, "no experts: encoders + projection into the frozen FM"),
    "fedplug_l": Method(1, "one LoRA: FedPlug + one LoRA adapter"),
    "fedkim_pub": Method(None, "no clients: M3OE, encoders trained on public data only"),
}

VARIANTS: dict[str, Variant] = {
    "fedkim": Variant("fedkim", "both", "FEDKIM (M3OE)"),
    "fedplug": Variant("fedplug", None, "FedPlug (no experts)"),
    "fedplug_l": Variant("fedplug_l", None, "FedPlug_L (one LoRA)"),
    "fedkim_pub": Variant("fedkim_pub", "both", "FEDKIM_pub (no clients)"),
    "wo_t": Variant("fedkim", "modality_only", "w/o T: the gate never sees the task description"),
    "wo_m": Variant("fedkim", "task_only", "w/o M: the gate never sees the modality description"),
}

assert all(v.method in METHODS for v in VARIANTS.values()), "every variant runs a known injection method"
