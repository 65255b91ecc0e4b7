"""Sync: a pure planner (catalogs + policy -> fetches) and an executor with bounded concurrency.

Planner rules (docs/protocol.md, "Sync"): keep the cards matching the policy (base models,
tags, name globs); per name the newest version wins, and so does the newest version this
node's trust policy admits (`admits`), so a refused higher version never shadows an admitted
lower one; a digest is fetched once, from the peers that list it and the vetted locations
their listings name (at most `MAX_LOCATIONS` a card: a listing may name any host:port, and
only confirmed peers are tried); the lineage parents of a chosen card come with it (parents
first); nothing already held locally is fetched.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from loraflight.engine.card import READ_MAJORS, upgrade_pair
from loraflight.errors import ConflictError, LoraflightError, PeerError, TrustError

from .protocol import CatalogEntry, dedupe
from .security import ClientTLS
from .store import Store

if TYPE_CHECKING:
    from .swarm import SwarmService

log = logging.getLogger(__name__)
MAX_LINEAGE_DEPTH = 64
MAX_LOCATIONS = 3  # locations tried per card: the listing peers first among them


@dataclasses.dataclass(frozen=True)
class SyncPolicy:
    """What to pull from peers; empty filters match everything."""

    base_models: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # a card matches if it has any of these tags
    names: tuple[str, ...] = ()  # globs over card names
    include_lineage: bool = True  # also fetch the parents a chosen card names
    latest_only: bool = True  # per name only the newest version

    def matches(self, entry: CatalogEntry) -> bool:
        h = entry.header
        if self.base_models and h.base_model not in self.base_models:
            return False
        if self.tags and not set(self.tags) & set(h.tags):
            return False
        return not self.names or any(fnmatch.fnmatchcase(h.name, g) for g in self.names)


@dataclasses.dataclass(frozen=True)
class Fetch:
    """One card to fetch and every location known to hold it."""

    entry: CatalogEntry
    locations: tuple[str, ...]
    reason: str = "policy"  # "policy" or "lineage of <ref>"

    @property
    def digest(self) -> str:
        return self.entry.digest

    @property
    def ref(self) -> str:
        return self.entry.ref


def plan_sync(
    local_entries: Iterable[CatalogEntry],
    peer_catalogs: Mapping[str, Sequence[CatalogEntry]],
    policy: SyncPolicy,
    skipped: dict[str, int] | None = None,
    withdrawn: Collection[tuple[str, int]] = (),
    *,
    vetted: Callable[[str], bool] | None = None,
    admits: Callable[[CatalogEntry], bool] | None = None,
) -> list[Fetch]:
    """The fetches that bring the local catalog up to date with the peers' (pure).

    `vetted(uri)`: whether a location a listing names may be tried (a confirmed peer); None:
    only the peers that list a card are its locations. `admits(entry)`: whether this node's
    trust policy would serve the card (hot-load, export); per name the newest admitted version
    is fetched too, and only admitted local versions count as "we hold something newer".

    Cards of a format this node cannot read, and the other card of an upgrade pair already
    held (`engine.card.upgrade_pair`), are not fetched; `skipped` counts them by reason.
    `withdrawn`: (name, version) pairs this node honoured a withdrawal of; never fetched,
    whoever lists them.
    """
    local = list(local_entries)
    have = {e.digest for e in local}
    held_ref = {(e.name, e.version): e.header for e in local}
    skip = skipped if skipped is not None else {}

    def skips(e: CatalogEntry) -> bool:
        why = None
        if e.header.major not in READ_MAJORS:
            why = f"format {e.header.major}: this node reads {', '.join(map(str, READ_MAJORS))}"
        else:
            mine = held_ref.get((e.name, e.version))
            if mine is not None and upgrade_pair(mine, e.header):
                why = "the other card of an upgrade pair is held"
        if why is not None:
            skip[why] = skip.get(why, 0) + 1
        return why is not None

    # every digest the peers list, with its listers and the vetted locations named for it
    by_digest: dict[str, CatalogEntry] = {}
    listers: dict[str, list[str]] = {}
    named: dict[str, list[str]] = {}
    gone = set(withdrawn)
    for peer, entries in peer_catalogs.items():
        for e in entries:
            if (e.name, e.version) in gone:
                continue
            by_digest.setdefault(e.digest, e)
            listers.setdefault(e.digest, []).append(peer)
            if vetted is not None:
                named.setdefault(e.digest, []).extend(u for u in e.locations if u != peer and vetted(u))

    def locations(d: str) -> tuple[str, ...]:
        own = dedupe(listers.get(d, []))
        others = [u for u in dedupe(named.get(d, [])) if u not in own]
        return tuple([*others[: max(0, MAX_LOCATIONS - len(own))], *own][:MAX_LOCATIONS] or own[:1])

    candidates = [
        (d, e)
        for d, e in sorted(by_digest.items(), key=lambda kv: (kv[1].name, -kv[1].version, kv[0]))
        if d not in have and policy.matches(e) and not skips(e)
    ]
    chosen: dict[str, CatalogEntry] = {}
    # per name: the newest version, and (when the trust policy refuses it) the newest admitted one
    passes = [(None, "")] if admits is None else [(None, ""), (admits, "admitted:")]
    for ok, prefix in passes:
        local_newest: dict[str, int] = {}
        for e in local:
            if ok is None or ok(e):
                local_newest[e.name] = max(local_newest.get(e.name, 0), e.version)
        best: dict[str, CatalogEntry] = {}
        for d, e in candidates:
            if ok is not None and not ok(e):
                continue
            if policy.latest_only:
                b = best.get(e.name)
                if b is not None and b.version >= e.version:
                    continue
                if local_newest.get(e.name, 0) > e.version:
                    continue  # we hold something newer
            best[e.name if policy.latest_only else d] = e
        for k, e in best.items():
            chosen.setdefault(e.digest if prefix else k, e)
    plan: list[Fetch] = []
    planned: set[str] = set()

    def add(e: CatalogEntry, reason: str, depth: int) -> None:
        if e.digest in planned or e.digest in have or depth > MAX_LINEAGE_DEPTH:
            return
        planned.add(e.digest)
        if policy.include_lineage:
            for parent in e.header.lineage:
                pe = by_digest.get(parent)
                if pe is not None:
                    add(pe, f"lineage of {e.ref}", depth + 1)
        plan.append(Fetch(e, locations(e.digest), reason))

    unique = {e.digest: e for e in chosen.values()}
    for e in sorted(unique.values(), key=lambda x: (x.name, x.version)):
        add(e, "policy", 0)
    return plan


BUNDLE_CARDS = 64  # cards per bundle (one stream, one group commit) at most
BUNDLE_BYTES = 64 << 20  # and about this many bytes


def bundle_sizes(
    cards: int, nbytes: int, slots: int, *, max_cards: int = BUNDLE_CARDS, max_bytes: int = BUNDLE_BYTES
) -> list[int]:
    """Cards per bundle for `cards` cards of `nbytes` in all from one location that runs `slots`
    bundles at once (pure): whole rounds of `slots` bundles, as few rounds as keep each bundle
    within `max_cards` and (for cards of the average size) `max_bytes`, the cards split evenly
    (sizes differ by one at most). So no bundle runs alone after the others, as a straggler would."""
    if cards <= 0:
        return []
    slots = max(1, slots)
    per = max(1, min(max_cards, max_bytes * cards // max(1, nbytes)))  # cards a bundle may hold
    n = min(cards, slots * -(-cards // (slots * per)))
    return [cards // n + (i < cards % n) for i in range(n)]


def plan_bundles(
    fetches: Sequence[Fetch],
    concurrency: int,
    bundled: Callable[[str], bool],
    *,
    streams: Callable[[str], int] | None = None,
    max_cards: int = BUNDLE_CARDS,
    max_bytes: int = BUNDLE_BYTES,
) -> tuple[list[Fetch], list[list[Fetch]]]:
    """Split fetches into single fetches and bundles (pure but for `bundled`, which says
    whether a location serves bundles, and `streams`, how many bundles it lets this client run
    at once: its `get_streams`, 0 when it does not say). A bundle holds cards of one first
    location, at most `max_cards` and about `max_bytes`; a location's cards are cut into whole
    rounds of as many bundles as run there at once, `min(concurrency, streams)` (`concurrency`
    when not said), evenly (`bundle_sizes`), so every slot is busy and none runs alone."""
    by_loc: dict[str, list[Fetch]] = {}
    singles: list[Fetch] = []
    for f in fetches:
        if f.locations and bundled(f.locations[0]):
            by_loc.setdefault(f.locations[0], []).append(f)
        else:
            singles.append(f)
    groups: list[list[Fetch]] = []
    for loc, fs in by_loc.items():
        if len(fs) < 2:
            singles.extend(fs)
            continue
        said = streams(loc) if streams is not None else 0
        slots = min(max(1, concurrency), said if said > 0 else concurrency)
        sizes = bundle_sizes(
            len(fs), sum(f.entry.size for f in fs), slots, max_cards=max_cards, max_bytes=max_bytes
        )
        mine: list[list[Fetch]] = []
        group: list[Fetch] = []
        size = 0
        for f in fs:  # a bundle ends at its planned size, or early when the next card is too big
            cap = sizes[len(mine)] if len(mine) < len(sizes) else max_cards
            if group and (len(group) >= cap or size + f.entry.size > max_bytes):
                mine.append(group)
                group, size = [], 0
            group.append(f)
            size += f.entry.size
        groups.extend([*mine, group])
    return singles, groups


@dataclasses.dataclass(frozen=True)
class SyncProgress:
    ref: str
    state: str  # "start", "progress", "done", "error"
    bytes_done: int
    bytes_total: int
    error: str | None = None


@dataclasses.dataclass
class SyncReport:
    """What a sync did: fetched entries, per-card errors, peers that could not be listed."""

    fetched: list[CatalogEntry] = dataclasses.field(default_factory=list)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # ref -> message
    peer_errors: dict[str, str] = dataclasses.field(default_factory=dict)  # uri -> message
    planned: list[Fetch] = dataclasses.field(default_factory=list)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> cards not fetched
    withdrawn: list[str] = dataclasses.field(default_factory=list)  # refs newly withdrawn here

    @property
    def ok(self) -> bool:
        return not self.errors and not self.peer_errors


def sync(
    peers: Iterable[str],
    policy: SyncPolicy | None,
    store: Store,
    *,
    concurrency: int = 4,
    progress: Callable[[SyncProgress], None] | None = None,
    token: str | None = None,
    tls: ClientTLS | None = None,
    trusted: Iterable[str] | None = None,
    require_signed: bool = False,
    timeout: float = 30.0,
    catalogs: Mapping[str, Sequence[CatalogEntry]] | None = None,
    withdrawals: bool = True,
    bundle_cards: int = BUNDLE_CARDS,
    connect: Callable[[str], Any] | None = None,
    vetted: Callable[[str], bool] | None = None,
    admits: Callable[[CatalogEntry], bool] | None = None,
    swarm: SwarmService | None = None,
) -> SyncReport:
    """List the peers, plan, and fetch with at most `concurrency` transfers at once.

    Per-card and per-peer errors are collected in the report, not raised. `catalogs` lets a
    caller that already listed the peers skip the listing. With `withdrawals`, each peer's
    withdrawals are listed too and honoured first (`pull_withdrawals`): the plan then skips
    every withdrawn name@version. A peer whose `health` advertises bundles (`get_many`) sends
    its cards in bundles of at most `bundle_cards` (one stream, one group commit each, see
    `plan_bundles`, which sizes them to the `get_streams` its health advertises); any other
    peer, and whatever a bundle did not deliver, go card by card.

    `connect(uri) -> Client` (a node's one rule for token and TLS) replaces the default client;
    `vetted` and `admits` go to `plan_sync`.
    With `swarm` (a node's `server.swarm`), a format-2 card that more than one peer may hold
    is fetched piece by piece from several holders at once (`swarm.swarm_fetch`); when that
    fails it is fetched whole as any other card.
    """
    from .client import Client
    from .swarm import swarm_fetch, wants_swarm

    policy = policy or SyncPolicy()
    report = SyncReport()
    clients: dict[str, Client] = {}
    lock = threading.Lock()
    peer_list = dedupe(peers)

    def client(uri: str) -> Client:
        with lock:
            c = clients.get(uri)
            if c is None:
                c = clients[uri] = (
                    connect(uri)
                    if connect is not None
                    else Client(uri, token=token, tls=tls, timeout=timeout)
                )
            return c

    slots: dict[str, int] = {}
    streams: dict[str, threading.BoundedSemaphore] = {}

    def stream_slots(uri: str) -> int:
        """Bundles this sync runs at once to `uri`: its `get_streams`, at most `concurrency` (a
        stream beyond it would wait for a slot on the peer, and be refused as busy after the
        peer's wait). `plan_bundles` sizes the bundles to it, `streams_to` holds to it."""
        with lock:
            n = slots.get(uri)
        if n is None:
            n = max(1, min(client(uri).get_streams() or concurrency, concurrency))
            with lock:
                n = slots.setdefault(uri, n)
        return n

    def streams_to(uri: str) -> threading.BoundedSemaphore:
        n = stream_slots(uri)
        with lock:
            return streams.setdefault(uri, threading.BoundedSemaphore(n))

    try:
        cats: dict[str, Sequence[CatalogEntry]] = dict(catalogs or {})
        for uri in peer_list:
            if uri in cats:
                continue
            try:
                cats[uri] = client(uri).list()
            except LoraflightError as e:
                report.peer_errors[uri] = str(e)
                log.warning("sync: cannot list %s: %s", uri, e)
        if withdrawals:
            for uri in peer_list:
                if uri not in report.peer_errors:
                    report.withdrawn.extend(pull_withdrawals(client(uri), store))
        gone = {(w.name, w.version) for w in store.withdrawals()}
        plan = plan_sync(
            store.list(), cats, policy, report.skipped, withdrawn=gone, vetted=vetted, admits=admits
        )
        report.planned = plan
        if not plan:
            return report
        trusted_set = None if trusted is None else set(trusted)

        def run(f: Fetch) -> None:
            total = f.entry.size
            if progress is not None:
                progress(SyncProgress(f.ref, "start", 0, total))

            def cb(done: int, tot: int) -> None:
                if progress is not None:
                    progress(SyncProgress(f.ref, "progress", done, tot))

            first = f.locations[0] if f.locations else (peer_list[0] if peer_list else "")
            try:
                if not first:
                    raise PeerError(f"no location holds {f.ref}")
                if swarm is not None and wants_swarm(swarm, f.entry, f.locations):
                    try:
                        got = swarm_fetch(
                            swarm,
                            f.entry,
                            client,
                            locations=f.locations,
                            trusted=trusted_set,
                            require_signed=require_signed,
                        )
                    except (TrustError, ConflictError):
                        raise
                    except LoraflightError as e:
                        log.warning("sync: swarm fetch of %s failed (%s); fetching it whole", f.ref, e)
                    else:
                        with lock:
                            report.fetched.append(got)
                        if progress is not None:
                            progress(SyncProgress(f.ref, "done", total, total))
                        return
                _card, entry = client(first).fetch_entry_stored(
                    f.entry,
                    store=store,
                    trusted=trusted_set,
                    require_signed=require_signed,
                    progress=cb if progress is not None else None,
                    locations=f.locations,
                )
                if entry is not None:
                    with lock:
                        report.fetched.append(entry)
                if progress is not None:
                    progress(SyncProgress(f.ref, "done", total, total))
            except LoraflightError as e:
                with lock:
                    report.errors[f.ref] = str(e)
                log.warning("sync: %s failed: %s", f.ref, e)
                if progress is not None:
                    progress(SyncProgress(f.ref, "error", 0, total, str(e)))

        def run_group(group: list[Fetch]) -> None:
            """One bundle from the group's first location; what fails there goes card by card
            (with failover across every location)."""
            uri = group[0].locations[0]
            if progress is not None:
                for f in group:
                    progress(SyncProgress(f.ref, "start", 0, f.entry.size))
            try:
                with streams_to(uri):
                    got = client(uri).fetch_bundle(
                        [f.entry for f in group],
                        store=store,
                        trusted=trusted_set,
                        require_signed=require_signed,
                        locations={f.digest: f.locations for f in group},
                    )
            except LoraflightError as e:
                log.info("sync: bundle of %d cards from %s failed (%s); card by card", len(group), uri, e)
                got = {}
            for f in group:
                res = got.get(f.digest)
                if isinstance(res, CatalogEntry):
                    with lock:
                        report.fetched.append(res)
                    if progress is not None:
                        progress(SyncProgress(f.ref, "done", f.entry.size, f.entry.size))
                elif isinstance(res, TrustError | ConflictError):
                    with lock:
                        report.errors[f.ref] = str(res)
                    if progress is not None:
                        progress(SyncProgress(f.ref, "error", 0, f.entry.size, str(res)))
                else:
                    run(f)

        def bundled(uri: str) -> bool:
            try:
                return client(uri).get_many() > 1
            except LoraflightError:
                return False

        # parents come before children in the plan; run lineage parents first, then the rest
        parents = [f for f in plan if f.reason != "policy"]
        rest = [f for f in plan if f.reason == "policy"]
        with ThreadPoolExecutor(
            max_workers=max(1, concurrency), thread_name_prefix="ThreadPoolExecutor-sync"
        ) as ex:
            for batch in (parents, rest):
                swarmed = [f for f in batch if wants_swarm(swarm, f.entry, f.locations)]  # never bundled
                whole = [f for f in batch if f not in swarmed]
                singles, groups = plan_bundles(
                    whole, concurrency, bundled, streams=stream_slots, max_cards=bundle_cards
                )
                futs = [ex.submit(run_group, g) for g in groups] + [
                    ex.submit(run, f) for f in swarmed + singles
                ]
                for fut in futs:
                    fut.result()
        return report
    finally:
        for c in clients.values():
            c.close()


def pull_withdrawals(client: Any, store: Store) -> list[str]:
    """Honour the withdrawals a peer lists that this store does not keep yet; the refs newly
    withdrawn. Untrusted ones are refused (the store logs each once); a peer older than
    withdrawals lists none."""
    try:
        records = client.withdrawals()
    except LoraflightError as e:
        log.info("sync: cannot list withdrawals of %s: %s", client.uri, e)
        return []
    done = []
    for w in records:
        if store.withdrawal(w.name, w.version) is not None:
            continue
        try:
            if store.withdraw(w).new:
                done.append(w.ref)
        except TrustError:
            continue  # logged by the store, once per record
        except LoraflightError as e:
            log.warning("sync: withdrawal of %s from %s failed: %s", w.ref, client.uri, e)
    return done


def sync_from(peer: str, store: Store, **kw: Any) -> SyncReport:
    """sync() from one peer (convenience)."""
    return sync([peer], kw.pop("policy", None), store, **kw)


__all__ = [
    "BUNDLE_BYTES",
    "BUNDLE_CARDS",
    "MAX_LOCATIONS",
    "Fetch",
    "SyncPolicy",
    "SyncProgress",
    "SyncReport",
    "bundle_sizes",
    "plan_bundles",
    "plan_sync",
    "pull_withdrawals",
    "sync",
    "sync_from",
]
