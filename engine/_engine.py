"""`Engine`: hot-load LoRA cards into a live PyTorch model.

Theory of operation
-------------------
Loaded adapters live in a dict of immutable records (`Adapter`: per model
module an ``(A, B·scale)`` pair, already cast to the layer's dtype and moved to
its device). Every change (load, swap, unload, activate, merge) builds a
*candidate* adapter dict, derives from it a new immutable ``Snapshot`` (see
``engine._lora``) and any merged weights, and only then commits: new wrapped
layers are put into the model, the snapshot reference is swapped, and layers
no longer needed get their original module objects back. If anything fails
before the commit, nothing has changed.

Verification runs beside a load (``Verifying``, engine._verify): the card's digest is hashed
in a helper thread (``engine.card.DigestJob``) from the first step, while this
thread checks the fit, copies the tensors (checking the copies finite) and
builds the candidate snapshot; the digest and the trust decision are awaited
in ``_commit`` just before the swap (before any merged weight is computed from
the new tensors), so the full verification costs little more than the sha256.

A forward pre-hook on the model captures the snapshot once per forward; the
wrapped layers read that capture, so a forward sees one whole adapter set.
Putting original modules back is deferred while any forward is in flight
(a forward that started with an adapter must still find its wrapped layers);
the last forward to finish does it.

Lineage: a card whose header lists parent digests is loaded *on top of* its
parents. Each parent is an already-loaded adapter with that digest, or a card
returned by ``resolver(digest)``, which is then loaded inactive and marked
``auto``. A child's effect is its parents' deltas plus its own; activating
the child applies all of them (once each, even if a parent is also active).
Unloading a child also unloads the ``auto`` parents nothing else needs;
unloading a parent that still has loaded children is refused.

Leases (``engine._lease``): a request that resolved a digest holds it with
``lease()``; a swap or unload keeps the held weights addressable for its rows
until the last release, while new lookups by name see the change at once.

Module names: a card's module paths are relative to the model it was made
for. They are mapped onto the wrapped model by the first rule under which
*every* module resolves: (1) as written; (2) with a PEFT ``base_model.model.``
prefix removed; (3) with 1 to 3 leading components removed (the card says
``model.layers.0…``, you wrapped the inner ``model``); (4) with a prefix added
that the model has (the card says ``layers.0…``, you wrapped the whole
``LlamaForCausalLM``). If no rule resolves all of them, the error lists the
missing modules under the rule that resolved the most.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loraflight.errors import CardError, EngineError, LoraflightError

from ._lease import AdapterLease, digest_of_key, is_lease_key, lease_key
from ._lora import Delta, LoRALinear, Shared, Slot, Snapshot, merged_weight
from ._modmap import lookup, plan_card
from ._records import (
    MAX_LINEAGE_DEPTH,
    Adapter,
    Plan,
    as_card,
    chain_deltas,
    evict,
    free_name,
    lineage,
    remove,
    with_rows,
)
from ._verify import Verifying, finish_all
from .card import CardHeader, LoRACard, lora_scale
from .card.torch import TORCH_DTYPES, copy_card_tensors, dtype_name

log = logging.getLogger(__name__)


Resolver = Callable[[str], "LoRACard | str | os.PathLike[str] | None"]


class Engine:
    """Hot-load `.lora.arrow` cards into a live `torch.nn.Module` (see docs/engine.md)."""

    def __init__(
        self,
        model: nn.Module,
        base_model: str | None = None,
        *,
        max_adapters: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise EngineError(f"Engine wraps a torch.nn.Module, got {type(model).__name__}")
        if max_adapters is not None and (not isinstance(max_adapters, int) or max_adapters < 1):
            raise EngineError(f"max_adapters must be a positive integer or None, got {max_adapters!r}")
        self.model = model
        self.base_model = base_model
        self.max_adapters = max_adapters
        self.evictions = 0
        self._lock = threading.RLock()
        self._shared = Shared()
        self._mixed_var: contextvars.ContextVar[tuple[str | None, ...] | None] = contextvars.ContextVar(
            "loraflight_mixed", default=None
        )
        self._adapters: dict[str, Adapter] = {}
        self._merged: tuple[str, ...] = ()
        self._wrappers: dict[str, LoRALinear] = {}
        self._merged_cache: dict[str, tuple[tuple[int, ...], nn.Parameter]] = {}
        self._next_key = 0
        self._flight_lock = threading.Lock()
        self._inflight = 0
        self._pending: dict[str, LoRALinear] = {}
        self._leases: dict[str, int] = {}  # digest -> holds (see engine._lease)
        self._retained: dict[str, dict[str, tuple[Delta, ...]]] = {}  # leased, no longer loaded
        self._tls = threading.local()
        self._last_forward = 0.0
        self._hooks = [
            model.register_forward_pre_hook(self._pre_hook),
            model.register_forward_hook(self._post_hook, always_call=True),
        ]

    # ------------------------------------------------------------------ introspection
    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """name -> {ref, digest, version, modules, dtype, device, active, merged, last_used, ...}."""
        with self._lock:
            merged = self._merged_set(self._adapters, self._merged)
            out = {}
            for n, a in self._adapters.items():
                out[n] = {
                    "ref": a.ref,
                    "digest": a.digest,
                    "version": a.version,
                    "modules": tuple(a.deltas),
                    "dtype": a.dtype,
                    "card_dtype": a.card_dtype,
                    "device": a.device,
                    "active": a.active,
                    "merged": n in merged,
                    "last_used": self._used(a),
                    "parents": a.parents,
                    "auto": a.auto,
                    "nbytes": a.nbytes,
                }
            return out

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the active adapters (their lineage parents apply too)."""
        with self._lock:
            return tuple(n for n, a in self._adapters.items() if a.active)

    @property
    def merged(self) -> tuple[str, ...]:
        with self._lock:
            return self._merged

    @property
    def headers(self) -> dict[str, CardHeader]:
        """name -> the header of the card loaded under it (description, tags: what routers read)."""
        with self._lock:
            return {n: a.header for n, a in self._adapters.items()}

    @property
    def retained(self) -> tuple[str, ...]:
        """Digests no longer loaded under a name but kept resident for leases still held."""
        with self._lock:
            return tuple(self._retained)

    def __repr__(self) -> str:
        return f"Engine({type(self.model).__name__}, adapters={list(self._adapters)}, active={list(self.active)})"

    def _used(self, a: Adapter) -> float:
        return max(a.last_used, self._last_forward) if a.active else a.last_used

    # ------------------------------------------------------------------ load
    def load(
        self,
        card_or_path: LoRACard | str | os.PathLike[str],
        name: str | None = None,
        activate: bool = True,
        trust: Iterable[str] | None = None,
        resolver: Resolver | None = None,
    ) -> str:
        """Load a card (or a card file) and return the adapter's name (default: the card's name).

        The card is verified (finite values, digest; with `trust`, a signature by one of those
        keys or signer ids) and checked against the model before anything changes. A name
        already loaded is swapped in place. `resolver(digest)` supplies lineage parents.
        """
        card = as_card(card_or_path)
        trusted = None if trust is None else list(trust)
        with self._lock:
            cand = dict(self._adapters)
            checks: list[Verifying] = []
            try:
                name = self._load_into(
                    cand, card, name, activate, trusted, resolver, auto=False, depth=0, checks=checks
                )
                if self.max_adapters is not None:
                    self._evict(cand, keep=name)
                self._commit(cand, self._merged, checks=checks)
            except BaseException:
                for c in checks:
                    c.cancel()
                raise
            log.info("loaded %s as %r (%d modules)", card.ref, name, len(card))
            return name

    def _load_into(
        self,
        cand: dict[str, Adapter],
        card: LoRACard,
        name: str | None,
        activate: bool,
        trusted: list[str] | None,
        resolver: Resolver | None,
        *,
        auto: bool,
        depth: int,
        checks: list[Verifying],
    ) -> str:
        name = card.name if name is None else name
        if not isinstance(name, str) or not name or is_lease_key(name):
            raise EngineError(f"adapter name must be a non-empty string, got {name!r}")
        if depth > MAX_LINEAGE_DEPTH:
            raise EngineError(f"lineage of {card.ref} is deeper than {MAX_LINEAGE_DEPTH} levels")
        old = cand.get(name)
        now = time.monotonic()
        if old is not None and old.digest == card.digest and trusted is None:
            cand[name] = dataclasses.replace(
                old, active=old.active or activate, last_used=now, auto=old.auto and auto
            )
            return name
        # 0. verification starts first: the digest is hashed in a helper thread while the rest
        #    (fit, copies, the new snapshot) is prepared; it is awaited just before the commit
        verifying = Verifying(card, trusted)
        # 1. lineage parents: all found (loaded or from the resolver) before anything else
        parent_slots: list[str | LoRACard] = []
        missing = []
        for dg in card.header.lineage:
            found = next((n for n, a in cand.items() if a.digest == dg), None)
            if found is not None:
                if found == name:
                    raise EngineError(
                        f"card {card.ref} lists {cand[name].ref} (loaded as {name!r}) as a lineage parent; "
                        f"load the child under another name (name=...) so the parent stays loaded"
                    )
                parent_slots.append(found)
                continue
            got = resolver(dg) if resolver is not None else None
            if got is None:
                missing.append(dg)
                continue
            pc = as_card(got)
            if pc.digest != dg:
                raise EngineError(
                    f"resolver returned {pc.ref} (digest {pc.digest[:16]}…) for lineage parent {dg[:16]}… "
                    f"of {card.ref}; it must return the card with that digest"
                )
            parent_slots.append(pc)
        if missing:
            raise EngineError(
                f"card {card.ref} stacks on lineage parent(s) {', '.join(missing)} that are not loaded"
                + ("" if resolver is not None else " and no resolver= was given")
                + "; load the parents first or pass resolver=digest->card"
            )
        # 2. the child must fit before any parent is loaded
        plan = self._plan(card)
        # 3. parents (inactive, auto), then the child's tensors
        parents: list[str] = []
        for p in parent_slots:
            if isinstance(p, str):
                parents.append(p)
            else:
                pname = free_name(cand, p)
                parents.append(
                    self._load_into(
                        cand, p, pname, False, trusted, resolver, auto=True, depth=depth + 1, checks=checks
                    )
                )
        checks.append(verifying)  # after the parents': their errors come first
        deltas = self._prepare(card, plan, verifying)
        first = next(iter(deltas.values()))[0]
        cand[name] = Adapter(
            name=name,
            ref=card.ref,
            digest=card.digest,
            version=card.version,
            card_dtype=card.dtype,
            deltas=deltas,
            parents=tuple(dict.fromkeys(parents)),
            auto=auto if old is None else (old.auto and auto),
            active=activate or (old.active if old is not None else False),
            last_used=now,
            nbytes=sum(
                a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in deltas.values()
            ),
            device=str(first.device),
            dtype=dtype_name(first.dtype),
            header=card.header,
        )
        return name

    def _plan(self, card: LoRACard) -> Plan:
        """Check the card against the model; all problems in one EngineError."""
        return plan_card(self.model, self.base_model, card)

    def _prepare(self, card: LoRACard, plan: Plan, verifying: Verifying) -> dict[str, Delta]:
        """Copy the card's tensors to their layers (one copy per record batch and column).

        Unless the card is already known verified, every copied value is checked finite in
        the destination, which also catches a narrowing cast that overflows; the digest is
        still being hashed meanwhile (`verifying`).
        """
        narrowing = any(TORCH_DTYPES[card.dtype] != dt for _, dt in plan.targets.values())
        try:
            tensors = copy_card_tensors(card, plan.targets, check_finite=narrowing or not verifying.known)
        except LoraflightError:
            raise
        except Exception as e:  # a corrupt card must not crash the caller with a bare error
            raise CardError(f"{card.ref}: copying the tensors failed: {e}") from e
        scaling = card.header.scaling
        mapping = plan.mapping
        out: dict[str, Delta] = {}
        for run in card.runs:
            for cm, r, alpha in zip(run.names, run.ranks, run.alphas, strict=True):
                ab = tensors.get(cm)
                if ab is not None:  # the scale as ModuleLoRA.scale computes it
                    out[mapping[cm]] = (ab[0], ab[1], lora_scale(alpha, r, scaling))
        return out

    # ------------------------------------------------------------------ activate / unload / merge
    def activate(self, *names: str, exclusive: bool = False) -> None:
        """Make adapters active (added to the active set; `exclusive=True`: only these)."""
        with self._lock:
            self._check_names(names)
            now = time.monotonic()
            cand = {}
            for n, a in self._adapters.items():
                on = n in names or (a.active and not exclusive)
                cand[n] = dataclasses.replace(a, active=on, last_used=now if n in names else a.last_used)
            merged = tuple(m for m in self._merged if cand[m].active)
            self._commit(cand, merged)

    def deactivate(self, *names: str) -> None:
        """Deactivate adapters (no names: all). A merged adapter is unmerged first."""
        with self._lock:
            self._check_names(names)
            off = set(names) if names else set(self._adapters)
            cand = {
                n: dataclasses.replace(a, active=a.active and n not in off) for n, a in self._adapters.items()
            }
            merged = tuple(m for m in self._merged if m not in off)
            self._commit(cand, merged)

    def unload(self, name: str | None = None) -> None:
        """Unload one adapter (and the auto-loaded parents only it needed), or all (None).

        Once nothing is loaded, the model holds its original module objects again and
        its ``state_dict()`` is bitwise what it was before the engine touched it.
        """
        with self._lock:
            if name is None:
                self._commit({}, ())
                log.info("unloaded all adapters")
                return
            self._check_names((name,))
            children = [n for n, a in self._adapters.items() if name in a.parents]
            if children:
                raise EngineError(
                    f"adapter {name!r} is a lineage parent of {', '.join(map(repr, children))}; unload those first"
                )
            cand = dict(self._adapters)
            remove(cand, name)
            self._commit(cand, tuple(m for m in self._merged if m in cand))
            log.info("unloaded %r", name)

    def merge(self, name: str | None = None) -> None:
        """Merge an adapter (None: all active ones) into the weights for base-speed forwards.

        Safe: the merged weight is built in a copy (float32 for 16-bit layers), checked finite,
        then assigned; the original Parameter is kept, so unmerge/unload restore it bitwise.
        """
        with self._lock:
            if name is None:
                names = tuple(n for n, a in self._adapters.items() if a.active)
                if not names:
                    raise EngineError("merge(): no adapter is active; name one or activate one first")
            else:
                self._check_names((name,))
                names = (name,)
            cand = {
                n: dataclasses.replace(a, active=a.active or n in names) for n, a in self._adapters.items()
            }
            self._commit(cand, tuple(dict.fromkeys((*self._merged, *names))))

    def unmerge(self) -> None:
        """Put the original weights back; merged adapters stay active, unmerged."""
        with self._lock:
            self._commit(dict(self._adapters), ())

    def close(self) -> None:
        """Unload everything and remove the engine's hooks from the model."""
        with self._lock:
            self._commit({}, ())
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _check_names(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise EngineError(
                f"no adapter named {', '.join(map(repr, unknown))} is loaded; loaded: {sorted(self._adapters) or 'none'}"
            )

    def _evict(self, cand: dict[str, Adapter], keep: str) -> None:
        assert self.max_adapters is not None
        for victim in evict(cand, keep, self.max_adapters, self._used):
            self.evictions += 1
            log.info("max_adapters=%d: unloaded least recently used %r", self.max_adapters, victim)

    # ------------------------------------------------------------------ commit
    def _commit(
        self, cand: dict[str, Adapter], merged: tuple[str, ...], checks: Sequence[Verifying] = ()
    ) -> None:
        """Make `cand` the loaded set: build everything first, then swap it in.

        `checks` (verifications still running) are awaited before anything changes: before
        merged weights are computed from new tensors, else just before the swap, so the
        snapshot is built while the digest is still being hashed.
        """
        visible: dict[str, str] = {}  # digest -> the first loaded name with it
        for n, a in cand.items():
            visible.setdefault(a.digest, n)
        retained = {  # leased digests leaving (or already out of) the loaded set keep their deltas
            d: self._retained.get(d) or chain_deltas(self._adapters, self._name_of(d))
            for d in self._leases
            if d not in visible
        }
        needed = {m for a in cand.values() for m in a.deltas} | {m for c in retained.values() for m in c}
        new_wrappers: dict[str, LoRALinear] = {}
        revived: dict[str, LoRALinear] = {}
        with self._flight_lock:
            for m in needed:
                if m not in self._wrappers and m in self._pending:
                    revived[m] = self._pending[m]
        for m in sorted(needed):
            if m in self._wrappers or m in revived:
                continue
            base = lookup(self.model, m)
            if not isinstance(base, nn.Linear):
                raise EngineError(f"module {m!r} is a {type(base).__name__}, not an nn.Linear")
            new_wrappers[m] = LoRALinear(base, self._next_key + len(new_wrappers), self._shared)
        wrappers = {m: w for m, w in {**self._wrappers, **revived, **new_wrappers}.items() if m in needed}

        merged_all = self._merged_set(cand, merged)
        eff: dict[str, list[str]] = {n: lineage(cand, n) for n in cand}
        active_order = list(
            dict.fromkeys(x for n, a in cand.items() if a.active or n in merged_all for x in eff[n])
        )
        merged_order = [x for x in active_order if x in merged_all]
        unmerged = [x for x in active_order if x not in merged_all]

        if merged_order:  # merging reads the new tensors: only verified ones
            finish_all(checks)
            checks = ()
        # merged weights first: this is the step that can fail (non-finite)
        params: dict[str, nn.Parameter] = {}
        merged_cache: dict[str, tuple[tuple[int, ...], nn.Parameter]] = {}
        for m, w in wrappers.items():
            ds = [cand[n].deltas[m] for n in merged_order if m in cand[n].deltas]
            if not ds:
                continue
            ident = tuple(id(t) for d in ds for t in d[:2])
            cached = self._merged_cache.get(m)
            if cached is not None and cached[0] == ident:
                params[m] = cached[1]
            else:
                mw = merged_weight(w.base_layer.weight, ds)
                if not bool(torch.isfinite(mw).all()):
                    raise EngineError(
                        f"merging {', '.join(merged_order)} into {m!r} gives non-finite weights "
                        f"(overflow in {dtype_name(mw.dtype)}); nothing was changed"
                    )
                params[m] = nn.Parameter(mw, requires_grad=False)
            merged_cache[m] = (ident, params[m])

        # per module: each adapter's deltas there (lineage parents first); work ∝ loaded deltas
        per_module: dict[str, dict[str, tuple[Delta, ...]]] = {m: {} for m in wrappers}
        for n in cand:
            chain = eff[n]
            if len(chain) == 1:
                for m, d in cand[n].deltas.items():
                    per_module[m][n] = (d,)
                continue
            touched = dict.fromkeys(m for x in chain for m in cand[x].deltas)
            for m in touched:
                per_module[m][n] = tuple(cand[x].deltas[m] for x in chain if m in cand[x].deltas)
        for dg, nm in visible.items():  # every loaded digest is addressable by its lease key too
            key = lease_key(dg)
            for per in per_module.values():
                if nm in per:
                    per[key] = per[nm]
        for dg, held in retained.items():
            for m, chain_m in held.items():
                per_module[m][lease_key(dg)] = chain_m
        active_by_module: dict[str, list[Delta]] = {m: [] for m in wrappers}
        for n in unmerged:
            for m, d in cand[n].deltas.items():
                active_by_module[m].append(d)
        slots: dict[int, Slot] = {}
        for m, w in wrappers.items():
            weight = params.get(m, w.base_layer.weight)
            slots[w.key] = Slot(weight, w.base_layer.bias, tuple(active_by_module[m]), per_module[m])  # type: ignore[arg-type]
        keys = {lease_key(d) for d in (*visible, *retained)}
        snap = Snapshot(slots=slots, merged=bool(params), names=frozenset(cand) | keys)
        finish_all(checks)  # the digest (and trust) of every new card: the last step that may refuse

        # ---- commit: nothing below can fail on bad input
        with self._flight_lock:
            for m, w in revived.items():
                if self._pending.pop(m, None) is None:  # a finished forward put the original back
                    parent, attr = self._parent_of(m)
                    setattr(parent, attr, w)
        for m, w in new_wrappers.items():
            parent, attr = self._parent_of(m)
            setattr(parent, attr, w)
        self._next_key += len(new_wrappers)
        for m, w in wrappers.items():
            p = params.get(m, w.base_layer.weight)
            if w.weight is not p:
                w.weight = p
        released = {m: w for m, w in self._wrappers.items() if m not in needed}
        for w in released.values():
            if w.weight is not w.base_layer.weight:
                w.weight = w.base_layer.weight
        self._wrappers = wrappers
        self._adapters = cand
        self._retained = retained
        self._merged = tuple(m for m in merged if m in cand)
        self._merged_cache = merged_cache
        self._shared.state = snap
        if released:
            with self._flight_lock:
                self._pending.update(released)
                if self._inflight == 0:
                    self._restore_pending()

    @staticmethod
    def _merged_set(cand: dict[str, Adapter], merged: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for n in merged:
            if n in cand:
                out.update(lineage(cand, n))
        return out

    def _parent_of(self, path: str) -> tuple[nn.Module, str]:
        head, _, attr = path.rpartition(".")
        parent = lookup(self.model, head) if head else self.model
        if parent is None:
            raise EngineError(f"module {head!r} has gone from the model")
        return parent, attr

    def _restore_pending(self) -> None:
        """Put original modules back (caller holds _flight_lock and no forward is in flight)."""
        for m, w in self._pending.items():
            try:
                parent, attr = self._parent_of(m)
            except EngineError:  # the user removed the parent module: nothing to put back
                log.warning("cannot put the original %r back: its parent module is gone", m)
                continue
            if getattr(parent, attr, None) is w:
                setattr(parent, attr, w.base_layer)
        self._pending.clear()

    # ------------------------------------------------------------------ forward hooks
    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        rows = self._mixed_var.get()
        try:
            with self._flight_lock:
                snap = self._shared.state
                if rows is not None:
                    snap = with_rows(snap, rows)
                self._inflight += 1
        except BaseException:
            stack.append(None)  # the post hook still runs (always_call) and pops this
            raise
        stack.append(self._shared.var.set(snap))
        self._last_forward = time.monotonic()

    def _post_hook(self, module: nn.Module, args: Any, result: Any) -> None:
        stack = getattr(self._tls, "stack", None)
        if not stack:
            return
        token = stack.pop()
        if token is None:
            return
        self._shared.var.reset(token)
        with self._flight_lock:
            self._inflight -= 1
            if self._inflight == 0 and self._pending:
                self._restore_pending()

    # ------------------------------------------------------------------ leases
    def lease(self, digests: Iterable[str]) -> AdapterLease:
        """Hold these adapters (by digest) resident until the lease is released.

        While held, a swap or unload of their names keeps the old weights for the lease's
        rows (``lease.row(digest)`` in ``forward_mixed``); new lookups by name see the swap at
        once. Raises EngineError for a digest that is neither loaded nor already held.
        """
        ds = tuple(dict.fromkeys(digests))
        with self._lock:
            have = {a.digest for a in self._adapters.values()} | set(self._retained)
            missing = [d for d in ds if d not in have]
            if missing:
                raise EngineError(
                    f"no loaded adapter has digest {', '.join(d[:16] + '…' for d in missing)}; "
                    f"loaded: {sorted(self._adapters) or 'none'}"
                )
            for d in ds:
                self._leases[d] = self._leases.get(d, 0) + 1
        return AdapterLease(ds, self._release)

    def _release(self, digests: tuple[str, ...]) -> None:
        with self._lock:
            dropped = False
            for d in digests:
                left = self._leases.get(d, 0) - 1
                if left > 0:
                    self._leases[d] = left
                    continue
                self._leases.pop(d, None)
                dropped = dropped or d in self._retained
            if dropped:  # the last hold on a retained adapter: let it go
                self._commit(dict(self._adapters), self._merged)

    def _name_of(self, digest: str) -> str:
        return next(n for n, a in self._adapters.items() if a.digest == digest)

    # ------------------------------------------------------------------ mixed batches
    @contextlib.contextmanager
    def mixed(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within this block, row i of the model's batch uses adapter names[i] (None: base)."""
        rows = tuple(names)
        with self._lock:
            self._check_names([n for n in rows if n is not None and not is_lease_key(n)])
            unheld = {
                n for n in rows if n is not None and is_lease_key(n) and digest_of_key(n) not in self._leases
            }
            if unheld:
                raise EngineError(
                    f"mixed batch rows name {len(unheld)} digest(s) no lease holds; use engine.lease(...).row(digest)"
                )
            if self._merged:
                raise EngineError("mixed batches need unmerged adapters; call unmerge() first")
            now = time.monotonic()
            for n in set(rows) - {None}:
                if n is None or n not in self._adapters:
                    continue
                self._adapters[n] = dataclasses.replace(self._adapters[n], last_used=now)
        token = self._mixed_var.set(rows)
        try:
            yield
        finally:
            self._mixed_var.reset(token)

    def forward_mixed(self, names: Sequence[str | None], *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with row i using adapter names[i] (None: base)."""
        with self.mixed(names):
            return self.model(*args, **kwargs)


# ---------------------------------------------------------------------- helpers


__all__ = ["Engine", "Resolver"]
