"""What a config and a hospital's policy need to know of each transport: its name, its config section and the
checks it makes of a federation (the light half of a transport: pydantic only, no torch, no Flower).

`secure_fedkim.config` takes the names `federation.aggregation` may give, and each transport's checks, from
`SPECS`; so does a hospital's policy (`secure_fedkim.deploy.policy`, `allowed_modes`). The transport itself (its
hospital's reply, aggregation, rounds, report evidence) is a `secure_fedkim.federation.transports.Transport`
whose `spec` is one of these; `transports.register_transport` registers both halves, and registers the spec
here. The built-in specs are registered below, when this module is imported.

Adding a transport: a `TransportSpec` (here for a built-in, anywhere for a plug-in) and a `Transport` subclass
naming it, registered with `register_transport`. A transport with its own config section also gives it a field
of `config.FederationSection` (the run config's keys are fixed; see `HESection`, `SecAggSection`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from secure_fedkim.config import FederationSection

__all__ = ["SPECS", "CKKSSpec", "HESection", "PlainSpec", "SecAggSection", "SecAggSpec", "TransportSpec",
           "check_federation", "register_spec", "transport_names", "unknown_transport"]


class TransportSpec:
    """A transport as the config sees it. Subclass it and set `name`; override `check` for the federations
    this transport refuses (one `ValueError` line that starts with the key, as `config_errors` places it)."""

    #: the value of `federation.aggregation` (and of a policy's `allowed_modes`) that selects this transport
    name: ClassVar[str]

    @classmethod
    def check(cls, fed: FederationSection) -> None:
        """Raise ValueError when this transport cannot run the federation `fed` (its clients, min_clients and
        its own section)."""


#: every registered transport's spec, by name
SPECS: dict[str, type[TransportSpec]] = {}


def register_spec(spec: type[TransportSpec], *, replace: bool = False) -> type[TransportSpec]:
    """Make `spec.name` a name configs and policies accept. Registering the same spec again does nothing;
    another spec under a registered name needs `replace=True`."""
    if not (isinstance(spec, type) and issubclass(spec, TransportSpec)):
        raise TypeError(f"{spec!r} is not a TransportSpec subclass")
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{spec.__name__}: a transport spec needs a non-empty `name`")
    if SPECS.get(name, spec) is not spec and not replace:
        raise ValueError(f"transport {name!r} is already registered ({SPECS[name].__qualname__})")
    SPECS[name] = spec
    return spec


def transport_names() -> list[str]:
    """The registered transports' names, sorted."""
    return sorted(SPECS)


def unknown_transport(name: str) -> str | None:
    """None when `name` is a registered transport, else the one line saying which are."""
    if name in SPECS:
        return None
    return f"unknown transport {name!r}; registered: {', '.join(transport_names())}"


def check_federation(fed: FederationSection) -> None:
    """The checks of the transport `fed.aggregation` names (ValueError naming the key)."""
    SPECS[fed.aggregation].check(fed)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- plain ---------------------------------------------------------------------------------------------


class PlainSpec(TransportSpec):
    name = "plain"


# --- he: CKKS, with a separate key holder ---------------------------------------------------------------


class HESection(_Section):
    """CKKS mode: the key holder's noise flooding of each released aggregate (privacy.he)."""

    flooding_sigma: float = Field(1e-5, gt=0.0)


class CKKSSpec(TransportSpec):
    name = "he"

    @classmethod
    def check(cls, fed):
        if fed.min_clients < 2:
            raise ValueError("min_clients: he mode needs at least 2 (decrypting a sum of one update releases it)")


# --- secagg: Flower's SecAgg+ --------------------------------------------------------------------------


class SecAggSection(_Section):
    """Flower SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow); see secure_fedkim.federation.transports.secagg for the error."""

    num_shares: int = Field(3, ge=3)  # Flower: an integer count must be > 2; odd unless every client
    reconstruction_threshold: int = Field(2, ge=2)
    clipping_range: float = Field(8.0, gt=0.0)  # model weights are clipped to [-range, range] before masking
    quantization_range: int = Field(4194304, ge=2)
    max_weight: float = Field(5000.0, gt=0.0)  # an upper bound on any hospital's num_examples
    timeout: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _check(self):
        if self.reconstruction_threshold > self.num_shares:
            raise ValueError("reconstruction_threshold: cannot exceed num_shares")
        return self


class SecAggSpec(TransportSpec):
    name = "secagg"

    @classmethod
    def check(cls, fed):
        shares, n = fed.secagg.num_shares, len(fed.clients)
        if shares > n:
            raise ValueError(f"secagg.num_shares: {shares} is more than the {n} clients")
        if shares % 2 == 0 and shares != n:
            # Flower 1.42 sends an even share count smaller than the sample to the clients, then makes it odd for
            # itself: every round dies inside secaggplus_mod._share_keys with an IndexError. Refuse it here.
            raise ValueError(f"secagg.num_shares: {shares} is even and fewer than the {n} clients; "
                             f"Flower's SecAgg+ needs an odd count (use {shares - 1} or {shares + 1}) or every client")


for _spec in (PlainSpec, CKKSSpec, SecAggSpec):
    register_spec(_spec)
