"""One exception hierarchy for loraflight, rooted in `LoraflightError`: whose fault it was, and what to do.

Every error loraflight raises on purpose lives here (one module, one root); `loraflight`
re-exports them all. Each also subclasses the builtin a caller would expect (PEFT does this).
"""

from __future__ import annotations


class LoraflightError(Exception):
    """Root of every error loraflight raises on purpose."""


class CardError(LoraflightError, ValueError):
    """A card (file, bytes or header) is malformed, corrupt or fails verification."""


class TrustError(CardError):
    """A card is intact but its signature is missing, invalid or not by a trusted key."""


class ConflictError(LoraflightError, ValueError):
    """The same name@version already exists with another digest (cards are immutable)."""


class EngineError(LoraflightError, ValueError):
    """A card does not fit the model it is being loaded into, or the engine was misused."""


class ConfigError(LoraflightError, ValueError):
    """A configuration value is invalid; the message lists every problem."""


class PeerError(LoraflightError, ConnectionError):
    """A peer misbehaved, is unreachable, or speaks an incompatible protocol."""


class StoreError(LoraflightError, OSError):
    """The local card store could not complete an operation (disk full, permissions)."""


class AuthError(LoraflightError, PermissionError):
    """A call was refused for lack of a valid token or client certificate."""


class TrainingError(LoraflightError, ValueError):
    """Training data or a training configuration is invalid; lists every problem."""


class CardNotFound(LoraflightError, LookupError):
    """No card with that name, version or digest in the store or on the peer."""


class BusyError(PeerError):
    """The peer is at its limit of concurrent transfers; retry later or elsewhere."""


__all__ = [
    "AuthError",
    "BusyError",
    "CardError",
    "CardNotFound",
    "ConfigError",
    "ConflictError",
    "EngineError",
    "LoraflightError",
    "PeerError",
    "StoreError",
    "TrainingError",
    "TrustError",
]
