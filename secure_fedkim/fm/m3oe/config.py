"""M3OE's config (like peft's ``LoraConfig``): experts, rank, targets, gating, gate inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

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
