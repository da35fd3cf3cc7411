"""What a transport is: how a hospital's update travels to the server and becomes one aggregate.

A transport knows both sides of one wire format: the hospital's reply (`reply`, or its own ClientApp),
what the server must set up first (`open` / `close`, e.g. a key holder), how a round's contributions become
the weighted mean (`aggregate`), how the rounds are driven (`run_rounds`), and what the run directory's
summary says about it (`facts`). The strategy (`secure_fedkim.federation.strategy.FedKIM`) does the rest,
the same for every transport.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from secure_fedkim.config import RunConfig
    from secure_fedkim.federation.strategy import FedKIM


class Transport:
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
    #: the compliance-report checks (secure_fedkim.report.text.CHECKS names) that only runs of a transport with
    #: this check have; on any other transport's run they are "not applicable"
    report_checks: ClassVar[tuple[str, ...]] = ()
    #: other parties this transport adds: (party, role); and threat rows: (adversary, asset, protected_by, not_protected)
    parties: ClassVar[tuple[tuple[str, str], ...]] = ()
    threats: ClassVar[tuple[tuple[str, str, str, str], ...]] = ()

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # --- the hospital's side ---------------------------------------------------------------------------
    def client_app(self) -> ClientApp:
        """The ClientApp hospitals run in this transport: by default Flower's Message API, which trains one round
        and replies with `reply`'s records (`secure_fedkim.federation.node.message_app`)."""
        from secure_fedkim.federation.node import message_app  # torch and the training stack, only when used

        return message_app(type(self))

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
