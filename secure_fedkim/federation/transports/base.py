"""What a transport is: how a hospital's update travels to the server and becomes one aggregate.

A transport knows both sides of one wire format: the hospital's reply (`reply`, or its own protocol's ClientApp),
what the server must set up first (`open` / `close`, e.g. a key holder), how a round's contributions become
the weighted mean (`aggregate`), how the rounds are driven (`run_rounds`), what the run directory's
summary says about it (`facts`) and what a compliance report reads there as its evidence (`report_evidence`).
Its config half (name, config section, checks) is its `spec` (`secure_fedkim.federation.transport_specs`,
torch- and Flower-free, for config parsing). The strategy (`secure_fedkim.federation.strategy.FedKIM`) does
the rest, the same for every transport.

`Transport` is abstract: a subclass that is not itself marked `abstract=True` must give `spec` (or `name`, for a
transport with no config checks), the report's words (`REQUIRED_WORDS`), `report_evidence`, and one of two
protocols: Flower's Message API (`reply` and `aggregate`; the ClientApp is `node.message_app`) or its own
(`protocol_app` and `run_rounds`, as SecAgg+). Every hospital runs one ClientApp
(`secure_fedkim.hospital.client_app.app`), which asks each transport's `protocol_app` whether a message is its own. `register_transport` makes it available under its
name.
"""

from __future__ import annotations

import abc
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord

from secure_fedkim.federation.transport_specs import SPECS, TransportSpec, register_spec

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from secure_fedkim.config import RunConfig
    from secure_fedkim.federation.strategy import FedKIM
    from secure_fedkim.report.collect import Finding, RunFacts


class Transport(abc.ABC):
    #: the config's half of this transport: its name, config section and checks (transport_specs)
    spec: ClassVar[type[TransportSpec]]
    #: `spec.name`: the value of `federation.aggregation` that selects this transport (set from `spec`)
    name: ClassVar[str]
    #: one line for people: what the server can see of one hospital's update
    server_sees: ClassVar[str]
    #: what the aggregator holds instead of one hospital's update; None when it sees the update in clear
    update_held_as: ClassVar[str | None] = None
    #: hospitals sign their updates, so each registers a public signing key before round 1
    signs_updates: ClassVar[bool] = False

    # --- what a compliance report says about this transport (secure_fedkim.report asks, never branches) ---
    #: the report's name for the mode, and the protection in words
    report_mode: ClassVar[str]
    title: ClassVar[str]
    #: the form one hospital's update takes on the wire
    update_form: ClassVar[str]
    #: what keeps one hospital's update from the server (None: nothing but DP), and what does not
    protects_one_update: ClassVar[str | None] = None
    exposes_one_update: ClassVar[str] = "the update itself: the server sees it in the clear"
    #: the summary's sentence about how updates reached the server
    summary_sentence: ClassVar[str]
    #: what this confidentiality does not cover (None: nothing to add)
    not_covered: ClassVar[str | None] = None
    #: the compliance-report checks (names in secure_fedkim.report.checks.CHECKS) that only runs of a transport with
    #: this check have; on any other transport's run they are "not applicable"
    report_checks: ClassVar[tuple[str, ...]] = ()
    #: the key of the report's `aggregation` section that this transport's evidence fills in (null on the runs of
    #: every other transport; None: it has none)
    report_section: ClassVar[str | None] = None
    #: other parties this transport adds: (party, role); and threat rows: (adversary, asset, protected_by, not_protected)
    parties: ClassVar[tuple[tuple[str, str], ...]] = ()
    threats: ClassVar[tuple[tuple[str, str, str, str], ...]] = ()

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # --- the hospital's side ---------------------------------------------------------------------------
    @classmethod
    def protocol_app(cls, message) -> ClientApp | None:
        """The ClientApp for `message` when it belongs to this transport's own protocol (a deployed hospital's
        one ClientApp asks every transport; None: not one of its messages, e.g. a Message-API one)."""
        return None

    def reply(self, model_state: dict, num_examples: float, config, home: Path, client: str) -> dict[str, Any]:
        """The records a hospital adds to its reply for this round's update (Message API transports)."""
        raise NotImplementedError

    # --- the server's side -------------------------------------------------------------------------------
    def open(self, run_dir: Path, keys_dir: Path | None) -> dict[str, Any]:
        """Set up what the server needs before round 1; returns train-config entries every hospital gets."""
        return {}

    def close(self) -> None:
        """Stop what `open` started."""

    def aggregate(self, strategy: FedKIM, server_round: int, contributions: list[tuple[str, float, RecordDict]]) -> np.ndarray:
        """The weighted mean (flat float32) of the contributions (hospital, weight, reply content)."""
        raise NotImplementedError

    def run_rounds(
        self, strategy: FedKIM, grid: Grid, context: Context, initial: ArrayRecord, train_config: dict,
        num_rounds: int, round_timeout: float,
    ) -> ArrayRecord:
        """Rounds offset+1 .. offset+num_rounds through Flower's Message API; returns the final global arrays."""
        offset = strategy.offset
        result = strategy.start(
            grid, initial, num_rounds=num_rounds, timeout=round_timeout, train_config=ConfigRecord(train_config),
            evaluate_fn=lambda r, arrays: strategy.evaluate(r + offset, arrays) if r > 0 else None,
        )
        return result.arrays

    def facts(self) -> dict[str, Any]:
        """What summary.json records about this run's aggregation."""
        return {"mode": self.name}

    # --- what a compliance report reads in the run directory ----------------------------------------------
    @abc.abstractmethod
    def report_evidence(self, run: RunFacts, out: dict[str, Any], findings: dict[str, list[Finding]]) -> None:
        """Fill the report's `aggregation` section `out` (its `mode` and defaults are set) with what the run
        directory `run` shows of this transport, and add `findings` by check name (`report.collect.Finding`)."""

    # --- what every transport must say ------------------------------------------------------------------
    #: the class attributes a concrete transport must set (one line each, for people)
    REQUIRED_WORDS: ClassVar[tuple[str, ...]] = ("server_sees", "report_mode", "title", "update_form", "summary_sentence")

    def __init_subclass__(cls, abstract: bool = False, **kwargs):
        """Check a concrete transport when its class is made: its spec, its words and one whole protocol."""
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        spec = cls.__dict__.get("spec")
        if spec is None and isinstance(cls.__dict__.get("name"), str):  # no config checks: a bare spec of that name
            spec = cls.spec = type(f"{cls.__name__}Spec", (TransportSpec,), {"name": cls.name, "__module__": cls.__module__})
        spec = getattr(cls, "spec", None)
        if not (isinstance(spec, type) and issubclass(spec, TransportSpec) and isinstance(getattr(spec, "name", None), str)):
            raise TypeError(f"{cls.__qualname__}: a transport needs `spec`, a TransportSpec with a name "
                            f"(secure_fedkim.federation.transport_specs), or a `name`")
        if cls.__dict__.get("name", spec.name) != spec.name:
            raise TypeError(f"{cls.__qualname__}: name {cls.name!r} is not its spec's {spec.name!r}")
        cls.name = spec.name
        missing = [a for a in cls.REQUIRED_WORDS if not isinstance(getattr(cls, a, None), str)]
        if missing:
            raise TypeError(f"{cls.__qualname__}: a transport must say {', '.join(missing)} (see Transport)")
        own = {m for m in _PROTOCOL_METHODS if _own(cls, m)}
        if not ({"reply", "aggregate"} <= own or {"protocol_app", "run_rounds"} <= own):
            raise TypeError(f"{cls.__qualname__}: a transport implements reply and aggregate (Flower's Message API) "
                            f"or protocol_app and run_rounds (its own protocol); it overrides only {sorted(own)}")


_PROTOCOL_METHODS = ("reply", "aggregate", "protocol_app", "run_rounds")


def _own(cls: type, method: str) -> bool:
    """Whether `cls` overrides `Transport.method` (a classmethod compared by its function)."""
    mine, base = inspect.getattr_static(cls, method), inspect.getattr_static(Transport, method)
    return getattr(mine, "__func__", mine) is not getattr(base, "__func__", base)


#: every registered transport, by name (the config's `federation.aggregation`)
TRANSPORTS: dict[str, type[Transport]] = {}


def register_transport(cls: type[Transport], *, replace: bool = False) -> type[Transport]:
    """Make the transport `cls` available under `cls.name`: to run configs and hospital policies (its spec),
    the engine, the hospitals and the report (like Opacus's `register_accountant`). Returns `cls`, so it can
    decorate the class. Registering the same class again does nothing; another class under a registered name
    needs `replace=True`."""
    if not (isinstance(cls, type) and issubclass(cls, Transport)) or inspect.isabstract(cls):
        raise TypeError(f"{cls!r} is not a concrete Transport subclass (abstract: "
                        f"{sorted(getattr(cls, '__abstractmethods__', ()))})")
    if TRANSPORTS.get(cls.name, cls) is not cls and not replace:
        raise ValueError(f"transport {cls.name!r} is already registered ({TRANSPORTS[cls.name].__qualname__})")
    register_spec(cls.spec, replace=replace)
    TRANSPORTS[cls.name] = cls
    return cls


def unregister_transport(name: str) -> None:
    """Forget the transport `name` (tests that register a toy one)."""
    TRANSPORTS.pop(name, None)
    SPECS.pop(name, None)


def transport_for(cfg: RunConfig) -> Transport:
    """The transport the config's `federation.aggregation` names."""
    name = cfg.federation.aggregation
    if name not in TRANSPORTS:
        raise ValueError(f"federation.aggregation: unknown transport {name!r}; one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](cfg)
