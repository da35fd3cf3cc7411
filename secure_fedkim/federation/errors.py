"""Why a federation stops: raised by the strategy and by the transports' aggregation, caught by the drivers.

Imports nothing: the transports (`he`, `secagg`) raise `RoundFailed` without importing the strategy that
imports them.
"""

from __future__ import annotations


class RoundFailed(RuntimeError):
    """Too few clients answered a round; the run stops with what it has recorded so far."""


class BudgetExhausted(RuntimeError):
    """A hospital's privacy budget cannot pay for another round and the config says to stop the run."""
