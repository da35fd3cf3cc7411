"""The server's medical foundation model and how knowledge enters it.

``model``: :class:`FoundationModel` (a real small HF model, client-encoder tokens plugged into its input, M3OE
on its linear layers, adapter save/load); ``m3oe``: the mixture of LoRA experts shaped like a peft tuner
(``config``, ``layer``, ``model``); ``injection``: the server-side :class:`~secure_fedkim.fm.injection.Injector`
that trains encoders, projection, experts and gate on the public split after every round.
"""

from secure_fedkim.fm.model import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    DEFAULT_MODALITY_TAGS,
    KINDS,
    TRAINABLE,
    FMConfig,
    FoundationModel,
    default_fm_path,
    parse_answer,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_FILE", "DEFAULT_MODALITY_TAGS", "KINDS", "TRAINABLE", "FMConfig", "FoundationModel",
    "default_fm_path", "parse_answer",
]
