"""Which piece to ask of which holder next: the pure rules of a swarm fetch (no threads, no
sockets; `fetch` applies them).

- **Rarest first, random among equals**: of the pieces still missing and not in flight, one
  held by the fewest holders known, ties broken by the scheduler's `random.Random`.
- **Spread the load**: among a piece's holders, a random one of those that are not an
  origin (the holders that had the whole card when the fetch started) and are free now; an
  origin only when no other holder has the piece or every other holder of it answered
  'busy' just now, and never as its `last` holder while another holder has the piece (an
  origin refers a piece it sent until it has sent every piece once, then sends a few again:
  `SwarmLimits.origin_extra`).
- **Bounded**: at most `per_peer` requests in flight to one holder and `total` in all.
- **Refusals**: a holder that leaves a piece out (it refers the asker elsewhere) is not asked
  for it again for `referral_wait_s`, and then with ``last`` set (it must serve it or is
  avoided); a busy holder is not asked for anything for `retry_after_s`. The fetch shortens
  the referral wait to a few times what a piece takes (`referral_wait_s` attribute).
- **Avoided for good** (for the rest of the fetch): a holder that sent a piece that does not
  verify, stalled mid-piece, or left out a piece it was asked for with ``last``; also one that
  failed `max_errors` times otherwise (unreachable).
- **Endgame**: only when every missing piece is in flight, a piece in flight from one holder
  is asked of a second that is not an origin (the first to verify wins; the fetch cancels
  the other: `cancelled`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

OUTCOMES = ("ok", "missing", "busy", "bad", "stall", "error", "cancelled")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    per_peer: int = 1  # requests in flight to one holder (a holder serves one asker one piece at a time)
    total: int = 4  # requests in flight in all
    retry_after_s: float = 0.15  # 'busy' or an error keeps a holder out this long
    # a holder that left a piece out is asked for it again (as its last holder) only after this:
    # long enough for whoever got the piece to receive it and say so
    referral_wait_s: float = 1.0
    max_errors: int = 3  # transport errors before a holder is avoided for the rest of the fetch

    def __post_init__(self) -> None:
        if self.per_peer < 1 or self.total < 1 or self.max_errors < 1:
            raise ValueError("per_peer, total and max_errors must be >= 1")
        if self.retry_after_s < 0 or self.referral_wait_s < 0:
            raise ValueError("retry_after_s and referral_wait_s must be >= 0")


@dataclasses.dataclass(frozen=True)
class Request:
    """Ask `peer` for `piece`; `last`: no other holder is left for it (it must not refer);
    `duplicate`: an endgame copy of a request already in flight elsewhere."""

    peer: str
    piece: int
    last: bool = False
    duplicate: bool = False


class PieceScheduler:
    """The state of one swarm fetch: pieces held, in flight, holders and their standing."""

    def __init__(
        self,
        count: int,
        *,
        have: Iterable[int] = (),
        origins: Iterable[str] = (),
        config: SchedulerConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("a card has at least one piece")
        self.count = count
        self.config = config or SchedulerConfig()
        self.rng = rng or random.Random()
        self.have: set[int] = set(have)
        self.origins: set[str] = set(origins)
        self.holders: dict[str, set[int]] = {}
        self.inflight: dict[int, set[str]] = {}  # piece -> peers asked for it now
        self.peer_load: dict[str, int] = {}
        self.avoided: dict[str, str] = {}  # peer -> why (for the rest of the fetch)
        self.refused: dict[tuple[str, int], float] = {}  # (peer, piece) -> when it left the piece out
        self.busy_until: dict[str, float] = {}
        self.errors: dict[str, int] = {}
        self.bad_pieces: list[tuple[str, int, str]] = []  # (peer, piece, outcome) of every refusal for good
        self.sources: dict[int, str] = {}  # piece -> the holder it came from
        # the referral wait in force: the fetch may shorten it to what pieces take here
        self.referral_wait_s = self.config.referral_wait_s

    # -- holders
    def add_holder(self, peer: str, pieces: Iterable[int], *, origin: bool = False) -> None:
        """What `peer` holds now (pieces only grow: a later, smaller bitfield adds nothing)."""
        got = {i for i in pieces if 0 <= i < self.count}
        self.holders.setdefault(peer, set()).update(got)
        if origin:
            self.origins.add(peer)

    def drop_holder(self, peer: str, why: str) -> None:
        """Avoid `peer` for the rest of the fetch."""
        self.avoided.setdefault(peer, why)

    def usable(self, peer: str) -> bool:
        return peer not in self.avoided

    # -- state
    @property
    def complete(self) -> bool:
        return len(self.have) == self.count

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.have]

    def in_flight(self) -> int:
        return sum(self.peer_load.values())

    def holders_of(self, piece: int) -> list[str]:
        return [p for p, s in self.holders.items() if piece in s and p not in self.avoided]

    def unavailable(self) -> list[int]:
        """Missing pieces no usable holder is known to have (the fetch waits for news of them)."""
        return [i for i in self.missing if not self.holders_of(i)]

    # -- choosing
    def _free(self, peer: str, piece: int, now: float) -> bool:
        if self.peer_load.get(peer, 0) >= self.config.per_peer or self.busy_until.get(peer, 0.0) > now:
            return False
        t = self.refused.get((peer, piece))
        return t is None or now - t >= self.referral_wait_s

    def _pick_peer(self, piece: int, now: float, exclude: set[str]) -> Request | None:
        every = self.holders_of(piece)
        holders = [p for p in every if p not in exclude]
        others = [p for p in holders if p not in self.origins]
        free = [p for p in others if self._free(p, piece, now)]
        if not free and all(self.busy_until.get(p, 0.0) > now for p in others):
            # an origin only when every other holder of the piece answered 'busy' just now (not
            # while one serves us something else or must answer for a piece it left out), and
            # never as its last holder while another holder has it (that one serves it later)
            others_hold = any(p not in self.origins for p in every)
            free = [
                p
                for p in holders
                if p in self.origins
                and self._free(p, piece, now)
                and not (others_hold and (p, piece) in self.refused)
            ]
        if not free:
            return None
        peer = self.rng.choice(sorted(free))
        return Request(peer, piece, last=(peer, piece) in self.refused)

    def next_requests(self, now: float) -> list[Request]:
        """The requests to start now (each is `started`), within the concurrency bounds."""
        out: list[Request] = []
        while self.in_flight() < self.config.total:
            req = self._next_one(now)
            if req is None:
                break
            self.started(req)
            out.append(req)
        return out

    def _next_one(self, now: float) -> Request | None:
        todo = [i for i in self.missing if not self.inflight.get(i)]
        if todo:
            rarity: dict[int, int] = {}
            for i in todo:
                n = len(self.holders_of(i))
                if n:
                    rarity[i] = n
            order = sorted(rarity, key=lambda i: (rarity[i], self.rng.random()))
            for i in order:
                req = self._pick_peer(i, now, set())
                if req is not None:
                    return req
            return None
        # endgame: every missing piece is in flight; ask a second holder for one asked of only one
        # (never an origin: a copy it streams counts against its 1.5 card sizes, cancelled or not)
        flying = [i for i in self.missing if len(self.inflight.get(i, ())) == 1]
        self.rng.shuffle(flying)
        for i in flying:
            req = self._pick_peer(i, now, set(self.inflight[i]) | self.origins)
            if req is not None:
                return dataclasses.replace(req, duplicate=True)
        return None

    # -- outcomes
    def started(self, req: Request) -> None:
        self.inflight.setdefault(req.piece, set()).add(req.peer)
        self.peer_load[req.peer] = self.peer_load.get(req.peer, 0) + 1

    def finished(self, req: Request, outcome: str, now: float, detail: str = "") -> bool:
        """Record how `req` ended; True when it brought a piece this fetch did not have yet."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        flying = self.inflight.get(req.piece)
        if flying is not None:
            flying.discard(req.peer)
            if not flying:
                del self.inflight[req.piece]
        self.peer_load[req.peer] = max(0, self.peer_load.get(req.peer, 0) - 1)
        if outcome == "cancelled":  # the fetch ended it: another copy of the piece came first
            return False
        if outcome == "ok":
            new = req.piece not in self.have
            self.have.add(req.piece)
            self.sources.setdefault(req.piece, req.peer)
            self.errors.pop(req.peer, None)
            return new
        if outcome == "missing":
            if req.last:  # it listed the piece and was told it is the last holder: a lie
                self._avoid(req, outcome, detail or "left out a piece it listed, asked as its last holder")
            else:
                self.refused[(req.peer, req.piece)] = now
        elif outcome == "busy":
            self.busy_until[req.peer] = now + self.config.retry_after_s
        elif outcome in ("bad", "stall"):
            self._avoid(req, outcome, detail or outcome)
        else:
            self.errors[req.peer] = self.errors.get(req.peer, 0) + 1
            self.busy_until[req.peer] = now + self.config.retry_after_s
            if self.errors[req.peer] >= self.config.max_errors:
                self._avoid(req, outcome, detail or "unreachable")
        return False

    def _avoid(self, req: Request, outcome: str, why: str) -> None:
        self.bad_pieces.append((req.peer, req.piece, outcome))
        self.avoided.setdefault(req.peer, f"piece {req.piece}: {why}")


__all__ = ["OUTCOMES", "PieceScheduler", "Request", "SchedulerConfig"]
