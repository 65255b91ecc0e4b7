"""The `.lora.arrow` card: an Arrow IPC file holding one LoRA adapter.

Theory of operation
-------------------
A card is an uncompressed Arrow IPC *file* with one row per adapted module and
these columns (see docs/format.md for the byte-exact definition):

    module: utf8, rank: int32, alpha: float64, in_features: int64,
    out_features: int64, lora_a: list<T>, lora_b: list<T>

where T is float32, float16 or uint16 (the raw words of bfloat16; the header
records the dtype). The header is canonical JSON in the schema metadata under
the key ``loraflight``.

``LoRACard.open`` maps the file and checks structure only (schema, offsets,
every shape against its buffer, header limits); tensors come out as numpy
views into the mapping. ``verify`` checks values (finite), the digest, and a
signature when asked. Nothing here imports torch; ``torch_tensors`` imports it
lazily.
"""

from __future__ import annotations

import _thread
import base64
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import json
import math
import mmap
import operator
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from loraflight.errors import CardError, TrustError
from loraflight.files import fsync_dir

FORMAT_MAJOR = 1
FORMAT_MINOR = 0
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
METADATA_KEY = b"loraflight"
CARD_SUFFIX = ".lora.arrow"

# Limits: a reader never trusts a count it has not checked against these.
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of header JSON
MAX_ROWS = 100_000
MAX_RANK = 4096
MAX_FEATURES = 1 << 20
MAX_NAME_LEN = 128
MAX_MODULE_LEN = 512
MAX_TAGS = 64
MAX_TAG_LEN = 64
MAX_DESCRIPTION = 64 * 1024
MAX_LINEAGE = 64
BATCH_TARGET_BYTES = 4 << 20  # 4 MiB record batches: Flight's sweet spot here
_PARALLEL_VERIFY_BYTES = 16 << 20  # from this size verify scans values and hashes in parallel

SCALINGS = ("standard", "rslora")  # alpha/r and alpha/sqrt(r)
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw 16-bit words; torch views them as bfloat16
}
_ARROW_VALUE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_MODULES_RE = re.compile(rf"(?:[A-Za-z0-9_][A-Za-z0-9_.\-]{{0,{MAX_MODULE_LEN - 1}}}\n)+\Z")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_DOMAIN = b"loraflight-card-v1\x00"
_SIGN_DOMAIN = b"loraflight-sig-v1\x00"
_UNSIGNED_KEYS = ("digest", "signature", "signer", "signer_key")


def card_schema(dtype: str, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    """The Arrow schema of a card of `dtype` (metadata optional)."""
    value = _ARROW_VALUE[dtype]
    fields = [
        pa.field("module", pa.utf8(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("alpha", pa.float64(), nullable=False),
        pa.field("in_features", pa.int64(), nullable=False),
        pa.field("out_features", pa.int64(), nullable=False),
        pa.field("lora_a", pa.list_(pa.field("item", value, nullable=False)), nullable=False),
        pa.field("lora_b", pa.list_(pa.field("item", value, nullable=False)), nullable=False),
    ]
    return pa.schema(fields, metadata=dict(metadata) if metadata else None)


# --------------------------------------------------------------------------- names


def check_name(name: object, what: str = "card name") -> str:
    """Return `name` if it is a safe card name, else raise CardError saying why."""
    if not isinstance(name, str) or not name:
        raise CardError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LEN:
        raise CardError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LEN}")
    if not name.isprintable() or not name.isascii():
        raise CardError(
            f"{what} {name!r} has non-printable or non-ASCII characters; use letters, digits, '.', '_', '-'"
        )
    if not _NAME_RE.match(name) or ".." in name:
        raise CardError(
            f"{what} {name!r} could escape a directory or is not allowed: use letters, digits, '.', '_', '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


def check_module_name(module: object) -> str:
    if not isinstance(module, str) or not module:
        raise CardError(f"module name must be a non-empty string, got {module!r}")
    if len(module) > MAX_MODULE_LEN:
        raise CardError(f"module name of {len(module)} characters exceeds the limit of {MAX_MODULE_LEN}")
    if not module.isascii() or not module.isprintable() or not _MODULE_RE.match(module):
        raise CardError(f"module name {module!r} is not a module path (letters, digits, '_', '.', '-')")
    return module


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise CardError(f"digest {digest!r} is not 64 lowercase hex characters")
    return digest


# --------------------------------------------------------------------------- fingerprint


def base_fingerprint(shapes: Iterable[tuple[str, int, int]]) -> str:
    """Hash of the targeted modules' names and shapes: (module, in_features, out_features).

    Order does not matter; see docs/format.md for the exact encoding.
    """
    h = hashlib.sha256(b"loraflight-base-v1\x00")
    for module, fin, fout in sorted((m, int(i), int(o)) for m, i, o in shapes):
        h.update(f"{module}\x00{fin}\x00{fout}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- header


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class CardHeader:
    """The card's header (schema metadata). `extra` keeps keys a newer minor version added."""

    name: str
    version: int
    dtype: str
    description: str = ""
    tags: tuple[str, ...] = ()
    base_model: str | None = None
    base_fingerprint: str | None = None
    scaling: str = "standard"
    author: str = ""
    created: str = ""
    lineage: tuple[str, ...] = ()
    peft: Mapping[str, Any] | None = None  # PEFT config fields kept for an exact export
    format: str = FORMAT_VERSION
    digest: str = ""
    signature: str | None = None
    signer: str | None = None
    signer_key: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # -- (de)serialisation
    def signed_part(self) -> dict[str, Any]:
        """The header as hashed by the digest: everything but digest and signature fields."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            format=self.format,
            name=self.name,
            version=self.version,
            dtype=self.dtype,
            description=self.description,
            tags=list(self.tags),
            base_model=self.base_model,
            base_fingerprint=self.base_fingerprint,
            scaling=self.scaling,
            author=self.author,
            created=self.created,
            lineage=list(self.lineage),
        )
        if self.peft is not None:
            d["peft"] = _plain(self.peft)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = self.signed_part()
        d["digest"] = self.digest
        if self.signature is not None:
            d.update(signature=self.signature, signer=self.signer, signer_key=self.signer_key)
        return d

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CardHeader:
        """Validate a header dict; every problem is reported together."""
        if not isinstance(raw, Mapping):
            raise CardError("card header is not a JSON object")
        problems: list[str] = []
        fmt = raw.get("format")
        if not isinstance(fmt, str) or not re.match(r"^\d+\.\d+$", fmt):
            raise CardError(f"card header has no valid format version (got {fmt!r}); expected 'major.minor'")
        major = int(fmt.split(".")[0])
        if major != FORMAT_MAJOR:
            raise CardError(
                f"card format {fmt} has major version {major}; this loraflight reads major {FORMAT_MAJOR}: "
                "upgrade loraflight to read it"
            )

        def want(key: str, typ: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
            if key not in raw:
                if required:
                    problems.append(f"header field {key!r} is missing")
                return default
            v = raw[key]
            if v is None and not required:
                return default
            if (typ is int and isinstance(v, bool)) or not isinstance(v, typ):
                problems.append(
                    f"header field {key!r} has type {type(v).__name__}, expected {_typename(typ)}"
                )
                return default
            return v

        name = want("name", str, "", required=True)
        version = want("version", int, 0, required=True)
        dtype = want("dtype", str, "", required=True)
        description = want("description", str, "")
        tags = want("tags", list, [])
        base_model = want("base_model", str)
        fingerprint = want("base_fingerprint", str)
        scaling = want("scaling", str, "standard")
        author = want("author", str, "")
        created = want("created", str, "")
        lineage = want("lineage", list, [])
        peft = want("peft", dict)
        digest = want("digest", str, "")
        signature = want("signature", str)
        signer = want("signer", str)
        signer_key = want("signer_key", str)

        if name:
            try:
                check_name(name)
            except CardError as e:
                problems.append(str(e))
        if "version" in raw and isinstance(version, int) and not 1 <= version < 2**53:
            problems.append(f"version must be a positive integer, got {version}")
        if dtype and dtype not in DTYPES:
            problems.append(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if len(description) > MAX_DESCRIPTION:
            problems.append(f"description is {len(description)} characters; the limit is {MAX_DESCRIPTION}")
        if len(tags) > MAX_TAGS or not all(
            isinstance(t, str) and 0 < len(t) <= MAX_TAG_LEN and t.isprintable() for t in tags
        ):
            problems.append(
                f"tags must be at most {MAX_TAGS} printable strings of 1..{MAX_TAG_LEN} characters"
            )
        if scaling not in SCALINGS:
            problems.append(f"scaling {scaling!r} is not one of {', '.join(SCALINGS)}")
        if len(lineage) > MAX_LINEAGE or not all(isinstance(x, str) and _DIGEST_RE.match(x) for x in lineage):
            problems.append(f"lineage must be at most {MAX_LINEAGE} digests (64 lowercase hex characters)")
        if fingerprint is not None and not _DIGEST_RE.match(fingerprint):
            problems.append("base_fingerprint must be 64 lowercase hex characters")
        if digest and not _DIGEST_RE.match(digest):
            problems.append("digest must be 64 lowercase hex characters")
        for key, v in (("base_model", base_model), ("author", author), ("created", created)):
            if v is not None and (len(v) > 1024 or not v.isprintable()):
                problems.append(f"header field {key!r} must be printable and at most 1024 characters")
        if (signature is None) != (signer_key is None):
            problems.append("signature and signer_key must both be present or both absent")
        if problems:
            raise CardError("invalid card header: " + "; ".join(problems))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(
            name=name,
            version=version,
            dtype=dtype,
            description=description,
            tags=tuple(tags),
            base_model=base_model,
            base_fingerprint=fingerprint,
            scaling=scaling,
            author=author,
            created=created,
            lineage=tuple(lineage),
            peft=peft,
            format=fmt,
            digest=digest,
            signature=signature,
            signer=signer,
            signer_key=signer_key,
            extra=extra,
        )

    @classmethod
    def from_json(cls, data: bytes) -> CardHeader:
        if len(data) > MAX_HEADER_BYTES:
            raise CardError(
                f"card header is {len(data)} bytes; the limit is {MAX_HEADER_BYTES} (metadata too large)"
            )
        try:
            raw = json.loads(
                data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_object
            )
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CardError(f"card header is not valid UTF-8 JSON: {e}") from None
        except ValueError as e:  # duplicate keys, NaN/Infinity, absurdly long integers
            raise CardError(f"card header is not canonical-encodable JSON: {e}") from None
        header = cls.from_dict(raw)
        header.to_json()  # raises CardError for what canonical JSON cannot encode (lone surrogates)
        return header

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def unsigned(self) -> CardHeader:
        return dataclasses.replace(self, signature=None, signer=None, signer_key=None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a card header")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r} in a JSON object")
    return d


def _typename(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so a header compares equal after reading."""
    return json.loads(canonical_json(obj))


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8, no NaN (docs/format.md)."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except (TypeError, ValueError) as e:
        raise CardError(f"header cannot be encoded as canonical JSON: {e}") from None


# --------------------------------------------------------------------------- module rows


@dataclasses.dataclass(frozen=True)
class ModuleLoRA:
    """One adapted Linear: A (rank, in_features) and B (out_features, rank) as numpy arrays.

    For bfloat16 cards the arrays hold the raw 16-bit words (dtype uint16).
    Arrays of an opened card are read-only views into the mapped file.
    """

    module: str
    rank: int
    alpha: float
    a: np.ndarray
    b: np.ndarray

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    def scale(self, scaling: str) -> float:
        return self.alpha / math.sqrt(self.rank) if scaling == "rslora" else self.alpha / self.rank


# --------------------------------------------------------------------------- digest


class CardDigest:
    """Incremental canonical digest: header first, then record batches in order.

    Lets a receiver hash a card while it arrives (docs/format.md, "Digest").
    """

    def __init__(self, header: CardHeader, num_rows: int) -> None:
        self._h = hashlib.sha256(_DIGEST_DOMAIN)
        head = canonical_json(header.signed_part())
        self._h.update(struct.pack("<Q", len(head)))
        self._h.update(head)
        self._h.update(struct.pack("<Q", num_rows))
        self._dtype = header.dtype.encode()
        self._schema: pa.Schema | None = None

    def update_row(self, module: str, rank: int, alpha: float, fin: int, fout: int, a: Any, b: Any) -> None:
        h = self._h
        name = module.encode()
        h.update(struct.pack("<I", len(name)))
        h.update(name)
        h.update(struct.pack("<IdQQ", rank, alpha, fin, fout))
        h.update(struct.pack("<B", len(self._dtype)))
        h.update(self._dtype)
        for t in (a, b):
            mv = memoryview(t).cast("B")
            h.update(struct.pack("<Q", mv.nbytes))
            h.update(mv)

    def update_batch(self, batch: pa.RecordBatch) -> None:
        """Check one received batch (schema, structure) and hash its rows."""
        if self._schema is None:
            self._schema = card_schema(self._dtype.decode())
        if not batch.schema.equals(self._schema, check_metadata=False):
            raise CardError(
                f"record batch has schema ({_schema_str(batch.schema)}), expected ({_schema_str(self._schema)})"
            )
        for m in _batch_rows(batch, self._dtype.decode()):
            self.update_row(m.module, m.rank, m.alpha, m.in_features, m.out_features, _c(m.a), _c(m.b))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _c(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def compute_digest(header: CardHeader, modules: Sequence[ModuleLoRA]) -> str:
    h = hashlib.sha256()
    for piece in _digest_pieces(header, modules)[0]:
        h.update(piece)
    return h.hexdigest()


def _digest_pieces(header: CardHeader, modules: Sequence[ModuleLoRA]) -> tuple[list[Any], int]:
    """The digest's byte stream (docs/format.md, "Digest") as pieces, and its length in bytes.

    Pieces alternate between small `bytes` (the framing: header, row fields, lengths) and
    zero-copy byte views of each row's A and B, so the stream is hashed (or gathered) without
    copying a tensor.
    """
    head = canonical_json(header.signed_part())
    dt = header.dtype.encode()
    pre: list[bytes] = [_DIGEST_DOMAIN, struct.pack("<Q", len(head)), head, struct.pack("<Q", len(modules))]
    pieces: list[Any] = []
    total = 0
    pack_row = struct.Struct("<IdQQB").pack
    pack_u32 = struct.Struct("<I").pack
    pack_u64 = struct.Struct("<Q").pack
    for m in modules:
        name = m.module.encode()
        a = _c(m.a).data.cast("B")
        b = _c(m.b).data.cast("B")
        pre += (
            pack_u32(len(name)),
            name,
            pack_row(m.rank, m.alpha, m.in_features, m.out_features, len(dt)),
            dt,
            pack_u64(a.nbytes),
        )
        small = b"".join(pre)
        mid = pack_u64(b.nbytes)
        pieces += (small, a, mid, b)
        total += len(small) + a.nbytes + len(mid) + b.nbytes
        pre = []
    if pre:  # a card without rows (never valid, but hashable)
        small = b"".join(pre)
        pieces.append(small)
        total += len(small)
    return pieces, total


def _run_pieces(header: CardHeader, runs: Sequence[_Run]) -> tuple[list[Any], int]:
    """`_digest_pieces` from a card's batch runs: byte slices of each batch's flat arrays."""
    head = canonical_json(header.signed_part())
    dt = header.dtype.encode()
    n = sum(len(r.names) for r in runs)
    pre: list[bytes] = [_DIGEST_DOMAIN, struct.pack("<Q", len(head)), head, struct.pack("<Q", n)]
    pieces: list[Any] = []
    total = 0
    pack_row = struct.Struct("<IdQQB").pack
    pack_u32 = struct.Struct("<I").pack
    pack_u64 = struct.Struct("<Q").pack
    for run in runs:
        mva = _c(run.flat_a).data.cast("B")
        mvb = _c(run.flat_b).data.cast("B")
        isz = run.flat_a.itemsize
        oa, ob = run.oa, run.ob
        for i, name in enumerate(run.names):
            nb = name.encode()
            a = mva[oa[i] * isz : oa[i + 1] * isz]
            b = mvb[ob[i] * isz : ob[i + 1] * isz]
            pre += (
                pack_u32(len(nb)),
                nb,
                pack_row(run.ranks[i], run.alphas[i], run.fins[i], run.fouts[i], len(dt)),
                dt,
                pack_u64(a.nbytes),
            )
            small = b"".join(pre)
            mid = pack_u64(b.nbytes)
            pieces += (small, a, mid, b)
            total += len(small) + a.nbytes + len(mid) + b.nbytes
            pre = []
    if pre:
        small = b"".join(pre)
        pieces.append(small)
        total += len(small)
    return pieces, total


_THREAD_HASH_BYTES = 256 << 10  # from this size DigestJob hashes in a helper thread
_GATHER_BYTES = 8 << 20  # default: the first 8 MiB of the stream are gathered for a GIL-free start
_HASH_TIMEOUT_S = 60.0  # plus 1 s per 100 MB: a bound on waiting for the helper, never reached


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_CPUS = _cpus()


def _spare_core() -> bool:
    """Whether a helper thread would find a core of its own right now.

    Linux's /proc/loadavg counts the tasks running or runnable at this instant (this thread
    included). When every core is taken, a helper only adds two context switches and a
    wake-up delay, so the caller hashes inline instead.
    """
    if _CPUS < 2:
        return False
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running < _CPUS


class DigestJob:
    """A card's digest, computed in a helper thread while the caller does other work.

    Theory: hashlib releases the GIL while it hashes a buffer of 2 KiB or more, so sha256
    runs on another core beside Python work. But a helper that hashes tensor by tensor must
    re-take the GIL after each call, and while the calling thread runs Python that wait lasts
    up to the interpreter's switch interval (5 ms) *per call*. So the caller first gathers the
    start of the stream (`gather` bytes, 8 MiB by default: all of a typical card) into one
    contiguous buffer, a memcpy at a fraction of the hash's cost, and the helper hashes it in
    one call that never needs the GIL; the rest of a bigger stream is hashed piece by piece
    (its GIL waits are bounded by the caller's Python time, small against such a hash). A
    caller that only runs GIL-light numpy work meanwhile (`LoRACard.verify`) passes
    ``gather=0``: the helper starts hashing at once.

    Small streams (below 256 KiB), a single core, or no idle core at this moment (every core
    running something, by /proc/loadavg): hashed right here, in the constructor.
    `result()` waits (bounded) and returns the hex digest; `cancel()` stops a job whose result
    is no longer wanted (between pieces).
    """

    def __init__(
        self,
        header: CardHeader,
        modules: Sequence[ModuleLoRA],
        *,
        threaded: bool | None = None,
        gather: int = _GATHER_BYTES,
        pieces: tuple[list[Any], int] | None = None,
    ) -> None:
        pieces_, total = _digest_pieces(header, modules) if pieces is None else pieces
        pieces = None
        self.nbytes = total
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._threaded = False
        if threaded is None:
            threaded = total >= _THREAD_HASH_BYTES and _spare_core()
        if not threaded:
            h = hashlib.sha256()
            for piece in pieces_:
                h.update(piece)
            self._digest = h.hexdigest()
            return
        k, size = 0, 0
        while k < len(pieces_) and size < gather:
            piece = pieces_[k]
            size += len(piece) if isinstance(piece, bytes) else piece.nbytes
            k += 1
        first = b"".join(pieces_[:k]) if k > 1 else (pieces_[0] if k else b"")
        # A bare thread: threading.Thread.start() would block this thread until the new one
        # has been scheduled, which on a busy host costs milliseconds; this way the helper
        # starts hashing as soon as it gets a core and this thread next releases the GIL.
        self._done = threading.Event()
        started = _thread.allocate_lock()
        started.acquire()
        _thread.start_new_thread(self._run, (first, pieces_[k:], started))
        self._threaded = True
        # Hand the GIL over: wait (GIL released) until the helper is inside its first hash call.
        # Else it waits for this thread to release the GIL long enough, which Python code does
        # only every few calls (or after the 5 ms switch interval). Bounded; the helper's
        # scheduling delay is all it costs, and this thread's work is shorter than the hash.
        started.acquire(timeout=0.005)

    def _run(self, first: Any, rest: list[Any], started: Any) -> None:
        try:
            h = hashlib.sha256()
            started.release()  # the caller may go on: this thread holds the GIL until update()
            h.update(first)  # one call: the GIL stays released for the whole buffer
            for piece in rest:
                if self._cancelled:
                    return
                h.update(piece)
            self._digest = h.hexdigest()
        except BaseException as e:  # handed to the caller by result()
            self._error = e
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._cancelled = True

    def result(self) -> str:
        """The hex digest (waits for the helper, bounded by a generous timeout)."""
        if self._threaded and not self._done.wait(_HASH_TIMEOUT_S + self.nbytes / 100e6):
            raise CardError(f"hashing {self.nbytes} bytes did not finish in time; the machine is overloaded")
        if self._error is not None:
            raise CardError(f"hashing the card failed: {self._error}") from self._error
        if self._digest is None:
            raise CardError("the digest job was cancelled")
        return self._digest


# --------------------------------------------------------------------------- batches


def _column_values(
    col: pa.ListArray, npdt: np.dtype[Any], n: int, label: str
) -> tuple[list[int], np.ndarray]:
    """(offsets as Python ints, the flat values as a zero-copy numpy view) of a list column."""
    try:
        offs = col.offsets.to_pylist()
        vals = col.values.to_numpy()
    except (pa.ArrowException, ValueError) as e:
        raise CardError(f"{label}: cannot view the column without copying: {e}") from None
    if len(offs) != n + 1:
        raise CardError(f"{label}: {len(offs)} offsets for {n} rows")
    if vals.dtype != npdt:
        raise CardError(f"{label}: values are {vals.dtype}, expected {npdt}")
    if n and (offs[0] < 0 or offs[-1] > len(vals)):
        raise CardError(f"{label}: offsets point past the data buffer")
    if vals.size and not vals.flags.aligned:
        raise CardError(f"{label}: tensor data is not aligned to its {npdt.itemsize}-byte element size")
    return offs, vals


class _Run:
    """One record batch's rows after the structural checks: the row fields as Python lists, and
    all A values (all B values) of the batch as one flat zero-copy array, rows end to end;
    `oa`/`ob` are each row's start in it (plus the end). Rows as `ModuleLoRA` are built on demand.
    """

    __slots__ = ("alphas", "fins", "flat_a", "flat_b", "fouts", "names", "oa", "ob", "ranks")

    def __init__(
        self,
        names: list[str],
        ranks: list[int],
        alphas: list[float],
        fins: list[int],
        fouts: list[int],
        oa: list[int],
        ob: list[int],
        flat_a: np.ndarray,
        flat_b: np.ndarray,
    ) -> None:
        self.names, self.ranks, self.alphas, self.fins, self.fouts = names, ranks, alphas, fins, fouts
        self.oa, self.ob, self.flat_a, self.flat_b = oa, ob, flat_a, flat_b

    def rows(self) -> list[ModuleLoRA]:
        # A frozen dataclass's __init__ sets each field through object.__setattr__; filling
        # __dict__ directly builds the same object at a third of the cost.
        new = object.__new__
        fa, fb, oa, ob = self.flat_a, self.flat_b, self.oa, self.ob
        out: list[ModuleLoRA] = []
        for i, name in enumerate(self.names):
            r, fi, fo = self.ranks[i], self.fins[i], self.fouts[i]
            row = new(ModuleLoRA)
            row.__dict__.update(
                module=name,
                rank=r,
                alpha=self.alphas[i],
                a=fa[oa[i] : oa[i + 1]].reshape(r, fi),
                b=fb[ob[i] : ob[i + 1]].reshape(fo, r),
            )
            out.append(row)
        return out

    def shapes_a(self) -> list[tuple[int, int]]:
        return list(zip(self.ranks, self.fins, strict=True))

    def shapes_b(self) -> list[tuple[int, int]]:
        return list(zip(self.fouts, self.ranks, strict=True))


def _batch_rows(batch: pa.RecordBatch, dtype: str) -> list[ModuleLoRA]:
    """Structural checks of one batch and zero-copy numpy views of its rows."""
    return _batch_run(batch, dtype).rows()


def _batch_run(batch: pa.RecordBatch, dtype: str) -> _Run:
    """Structural checks of one batch (no tensor byte is read); its rows as a `_Run`.

    Each row's value counts are checked against its shape here, vectorised over the batch.
    """
    try:
        # Arrow's full validation (offsets monotonic and in bounds, UTF-8 valid) is what makes the
        # views below safe; it is cheap (no tensor byte is read) and batches may come from a peer.
        batch.validate(full=True)
    except (pa.ArrowException, ValueError) as e:
        raise CardError(f"record batch is corrupt: {e}") from None
    n = batch.num_rows
    cols = batch.columns
    if len(cols) != 7:
        raise CardError(f"record batch has {len(cols)} columns; a card has 7")
    for i, c in enumerate(cols):
        if c.null_count:
            raise CardError(f"column {batch.schema.field(i).name!r} has nulls; a card has none")
    modules = cols[0].to_pylist()
    rl = cols[1].to_pylist()
    al = cols[2].to_pylist()
    fil = cols[3].to_pylist()
    fol = cols[4].to_pylist()
    if n:
        _check_rows(modules, rl, al, fil, fol)
    npdt = DTYPES[dtype]
    oa, fa = _column_values(cols[5], npdt, n, "lora_a")
    ob, fb = _column_values(cols[6], npdt, n, "lora_b")
    sizes_ok = [oa[i + 1] - oa[i] for i in range(n)] == list(map(operator.mul, rl, fil)) and [
        ob[i + 1] - ob[i] for i in range(n)
    ] == list(map(operator.mul, fol, rl))
    for i in range(0 if sizes_ok else n):  # find the row to report
        r = rl[i]
        if oa[i + 1] - oa[i] != r * fil[i] or ob[i + 1] - ob[i] != fol[i] * r:
            got_a = oa[i + 1] - oa[i]
            label, got, shape = (
                ("lora_a", got_a, (r, fil[i]))
                if got_a != r * fil[i]
                else ("lora_b", ob[i + 1] - ob[i], (fol[i], r))
            )
            raise CardError(
                f"module {modules[i]!r}: {label} holds {got} values but its shape {shape} needs "
                f"{shape[0] * shape[1]} (shape disagrees with its bytes)"
            )
    a0, b0 = oa[0], ob[0]
    fa, fb = fa[a0 : oa[-1]], fb[b0 : ob[-1]]
    if a0:
        oa = [o - a0 for o in oa]
    if b0:
        ob = [o - b0 for o in ob]
    return _Run(modules, rl, al, fil, fol, oa, ob, fa, fb)


def _check_rows(
    modules: list[Any], ranks: list[int], alphas: list[float], fins: list[int], fouts: list[int]
) -> None:
    """Names, ranks, shapes and alphas of one batch's rows against the limits."""
    # one regex over all the names (each on its own line) instead of one call per name
    try:
        ok = _MODULES_RE.match("\n".join(modules) + "\n") is not None
    except TypeError:  # not all strings
        ok = False
    if not ok:
        match = _MODULE_RE.match
        for module in modules:
            if not isinstance(module, str) or len(module) > MAX_MODULE_LEN or not match(module):
                check_module_name(module)
    if min(ranks) < 1 or max(ranks) > MAX_RANK:
        i = next(i for i, r in enumerate(ranks) if not 1 <= r <= MAX_RANK)
        raise CardError(f"module {modules[i]!r}: rank {ranks[i]} is 0, negative or absurd (limit {MAX_RANK})")
    if min(min(fins), min(fouts)) < 1 or max(max(fins), max(fouts)) > MAX_FEATURES:
        i = next(
            i
            for i in range(len(fins))
            if not (1 <= fins[i] <= MAX_FEATURES and 1 <= fouts[i] <= MAX_FEATURES)
        )
        raise CardError(
            f"module {modules[i]!r}: shape in={fins[i]} out={fouts[i]} is out of range 1..{MAX_FEATURES}"
        )
    if not all(map(math.isfinite, alphas)):
        i = next(i for i, a in enumerate(alphas) if not math.isfinite(a))
        raise CardError(f"module {modules[i]!r}: alpha is not finite")


def _check_schema(schema: pa.Schema) -> CardHeader:
    meta = schema.metadata or {}
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise CardError("not a loraflight card: the schema metadata has no 'loraflight' header")
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_HEADER_BYTES + 4096:
        raise CardError(f"schema metadata is larger than {MAX_HEADER_BYTES} bytes (metadata too large)")
    header = CardHeader.from_json(raw)
    expect = card_schema(header.dtype)
    if not schema.remove_metadata().equals(expect):
        raise CardError(
            f"wrong schema for a {header.dtype} card: got ({_schema_str(schema)}), "
            f"expected ({_schema_str(expect)})"
        )
    return header


def _schema_str(schema: pa.Schema) -> str:
    parts = []
    for i in range(len(schema)):
        try:
            f = schema.field(i)
            parts.append(f"{f.name}: {f.type}")
        except (UnicodeDecodeError, pa.ArrowException, ValueError):
            parts.append(f"<field {i} with an undecodable name>")
    return ", ".join(parts)


# --------------------------------------------------------------------------- the card


@dataclasses.dataclass(frozen=True)
class Verification:
    """What `LoRACard.verify` established."""

    digest: str
    signed: bool
    signer: str | None
    trusted: bool | None  # None: no trust decision was asked for

    @property
    def status(self) -> str:
        if not self.signed:
            return "unsigned"
        if self.trusted is None:
            return f"signed by {self.signer} (signature valid)"
        return f"signed by {self.signer} ({'trusted' if self.trusted else 'NOT trusted'})"


class LoRACard:
    """An immutable LoRA adapter card: a header plus one row per adapted module."""

    def __init__(
        self, header: CardHeader, batches: Sequence[pa.RecordBatch], path: Path | None = None
    ) -> None:
        self._header = header
        self._batches = list(batches)
        self._path = path
        expect = card_schema(header.dtype)
        for i, b in enumerate(self._batches):
            if not b.schema.equals(expect, check_metadata=False):
                raise CardError(
                    f"record batch {i} has schema ({_schema_str(b.schema)}), expected ({_schema_str(expect)})"
                )
        runs = [_batch_run(b, header.dtype) for b in self._batches]
        names = [n for r in runs for n in r.names]
        if len(names) > MAX_ROWS:
            raise CardError(f"card has {len(names)} modules; the limit is {MAX_ROWS}")
        if not names:
            raise CardError("card has no modules")
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise CardError(f"module {dup!r} appears twice")
        self._runs_ = runs
        self._rows: list[ModuleLoRA] | None = None
        self._n = len(names)
        self._map: pa.Buffer | None = None  # the whole mapped file, for an opened card
        self._ident: tuple[int, ...] | None = None  # that file's (device, inode, size, times)

    @property
    def _modules(self) -> list[ModuleLoRA]:
        """The rows as `ModuleLoRA` (numpy views), built on first use: opening does not need them."""
        rows = self._rows
        if rows is None:
            rows = [m for r in self._runs_ for m in r.rows()]
            self._rows = rows
        return rows

    # -- construction
    @classmethod
    def build(
        cls,
        modules: Iterable[ModuleLoRA],
        *,
        name: str,
        version: int = 1,
        dtype: str | None = None,
        description: str = "",
        tags: Iterable[str] = (),
        base_model: str | None = None,
        base_fingerprint: str | None = None,
        scaling: str = "standard",
        author: str = "",
        created: str | None = None,
        lineage: Iterable[str] = (),
        peft: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> LoRACard:
        """Make a card in memory from numpy arrays (bfloat16 as uint16 words with dtype='bfloat16')."""
        mods = list(modules)
        if not mods:
            raise CardError("a card needs at least one module")
        if dtype is None:
            dts = {m.a.dtype.str for m in mods} | {m.b.dtype.str for m in mods}
            inferred = [k for k, v in DTYPES.items() if v.str in dts and k != "bfloat16"]
            if len(dts) != 1 or len(inferred) != 1:
                raise CardError(f"cannot infer one dtype from arrays of {sorted(dts)}; pass dtype=")
            dtype = inferred[0]
        if dtype not in DTYPES:
            raise CardError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        norm: list[ModuleLoRA] = []
        for m in mods:
            check_module_name(m.module)
            a, b = np.asarray(m.a), np.asarray(m.b)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != m.rank or b.shape[1] != m.rank:
                raise CardError(
                    f"module {m.module!r}: A {a.shape} and B {b.shape} do not fit rank {m.rank} "
                    "(A must be (rank, in_features), B (out_features, rank))"
                )
            norm.append(
                ModuleLoRA(
                    m.module,
                    int(m.rank),
                    float(m.alpha),
                    _as_storage(a, dtype, f"module {m.module!r} lora_a"),
                    _as_storage(b, dtype, f"module {m.module!r} lora_b"),
                )
            )
        header = CardHeader.from_dict(
            {
                **(dict(extra) if extra else {}),
                "format": FORMAT_VERSION,
                "name": name,
                "version": version,
                "dtype": dtype,
                "description": description,
                "tags": list(tags),
                "base_model": base_model,
                "base_fingerprint": base_fingerprint,
                "scaling": scaling,
                "author": author,
                "created": created if created is not None else _now(),
                "lineage": list(lineage),
                "peft": _plain(peft) if peft is not None else None,
            }
        )
        header = dataclasses.replace(header, digest=compute_digest(header, norm))
        return cls(header, _to_batches(norm, header))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LoRACard:
        """Map a card file and check its structure; no tensor byte is read or copied."""
        p = Path(path)
        buf, ident = _map_file(p)
        size = buf.size
        base = buf.address
        compressed = _compressed_batch(memoryview(buf))
        if compressed is not None:
            raise CardError(
                f"{p}: record batch {compressed} is compressed; cards are uncompressed Arrow IPC files "
                "(a compressed body would be inflated into memory instead of mapped)"
            )
        try:
            reader = pa.ipc.open_file(pa.BufferReader(buf))
            schema = reader.schema
        except (pa.ArrowException, OSError, ValueError) as e:
            raise CardError(f"{p}: not an Arrow IPC file or truncated: {e}") from None
        try:
            header = _check_schema(schema)
        except CardError as e:
            raise CardError(f"{p}: {e}") from None
        # The file repeats the schema (with the header) at its start; Arrow's file reader uses the
        # footer's copy only. Both must agree, so a flipped bit in either copy is reported.
        try:
            leading = pa.ipc.read_schema(buf.slice(8))
            same = leading.equals(schema, check_metadata=True)
        except (pa.ArrowException, OSError, ValueError, IndexError):
            same = False
        if not same:
            raise CardError(
                f"{p}: the schema and header at the start of the file differ from the footer's copy; "
                "the file is corrupt or was tampered with"
            )
        n = reader.num_record_batches
        if n > MAX_ROWS:
            raise CardError(f"{p}: footer lists {n} record batches; the limit is {MAX_ROWS}")
        batches = []
        for i in range(n):
            try:
                b = reader.get_batch(i)  # fully validated below, in LoRACard() (_batch_run)
            except (pa.ArrowException, OSError, ValueError, IndexError) as e:
                raise CardError(f"{p}: record batch {i} is corrupt or truncated: {e}") from None
            # Tensors must be views of the mapping: a compressed (or otherwise copied) body is refused.
            for col in (5, 6):
                vb = b.column(col).values.buffers()
                vbuf = vb[1] if len(vb) > 1 else None
                if vbuf is not None and vbuf.size and not base <= vbuf.address <= base + size - vbuf.size:
                    raise CardError(
                        f"{p}: record batch {i} is compressed or not memory-mappable; "
                        "cards are uncompressed Arrow IPC files"
                    )
            batches.append(b)
        if sum(b.num_rows for b in batches) > MAX_ROWS:
            raise CardError(f"{p}: more than {MAX_ROWS} module rows")
        try:
            card = cls(header, batches, path=p)
            card._map, card._ident = buf, ident
            return card
        except CardError as e:
            raise CardError(f"{p}: {e}") from None

    @classmethod
    def from_table(
        cls, table: pa.Table | Sequence[pa.RecordBatch], schema: pa.Schema | None = None
    ) -> LoRACard:
        """Structurally check batches received from elsewhere (e.g. Flight) and wrap them."""
        if isinstance(table, pa.Table):
            schema = table.schema
            batches = table.to_batches()
        else:
            batches = list(table)
            if schema is None:
                if not batches:
                    raise CardError("no record batches and no schema")
                schema = batches[0].schema
        header = _check_schema(schema)
        if len(batches) > MAX_ROWS:
            raise CardError(f"{len(batches)} record batches; the limit is {MAX_ROWS}")
        plain = schema.remove_metadata()
        checked = []
        for i, b in enumerate(batches):
            try:
                if not b.schema.remove_metadata().equals(plain):
                    raise CardError(f"record batch {i} has a schema other than the card's")
                b.validate(full=True)
                checked.append(pa.record_batch(b.columns, schema=schema))
            except (pa.ArrowException, ValueError, IndexError) as e:
                if isinstance(e, CardError):
                    raise
                raise CardError(f"record batch {i} is corrupt: {e}") from None
        return cls(header, checked)

    # -- accessors
    @property
    def header(self) -> CardHeader:
        return self._header

    @property
    def name(self) -> str:
        return self._header.name

    @property
    def version(self) -> int:
        return self._header.version

    @property
    def ref(self) -> str:
        return self._header.ref

    @property
    def digest(self) -> str:
        return self._header.digest

    @property
    def dtype(self) -> str:
        return self._header.dtype

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def modules(self) -> list[ModuleLoRA]:
        return list(self._modules)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[ModuleLoRA]:
        return iter(self._modules)

    def __getitem__(self, module: str) -> ModuleLoRA:
        for m in self._modules:
            if m.module == module:
                return m
        raise KeyError(module)

    @property
    def batches(self) -> list[pa.RecordBatch]:
        return list(self._batches)

    @property
    def schema(self) -> pa.Schema:
        return card_schema(self.dtype, {METADATA_KEY: self._header.to_json()})

    def table(self) -> pa.Table:
        return pa.Table.from_batches(self._batches, schema=self.schema)

    @property
    def tensor_nbytes(self) -> int:
        return sum(r.flat_a.nbytes + r.flat_b.nbytes for r in self._runs_)

    @property
    def shapes(self) -> list[tuple[str, int, int]]:
        """(module, in_features, out_features) per row: what the base fingerprint hashes."""
        return [t for r in self._runs_ for t in zip(r.names, r.fins, r.fouts, strict=True)]

    def __repr__(self) -> str:
        return f"LoRACard({self.ref}, {len(self)} modules, {self.dtype}, digest={self.digest[:12]})"

    # -- verification
    def compute_digest(self) -> str:
        h = hashlib.sha256()
        for piece in _run_pieces(self._header, self._runs_)[0]:
            h.update(piece)
        return h.hexdigest()

    def check_values(self) -> None:
        """Raise CardError naming the first module with a NaN or Inf.

        One scan per record batch and column (a batch's A matrices lie end to end); only a
        batch that fails is scanned module by module, to name the culprit.
        """
        dtype = self.dtype
        for run in self._runs_:
            if _all_finite(run.flat_a, dtype) and _all_finite(run.flat_b, dtype):
                continue
            for m in run.rows():
                for label, arr in (("lora_a", m.a), ("lora_b", m.b)):
                    if not _all_finite(arr, dtype):
                        raise CardError(f"module {m.module!r}: {label} has NaN or Inf values")

    def digest_job(self, *, threaded: bool | None = None, gather: int = _GATHER_BYTES) -> DigestJob:
        """Start computing this card's digest (in a helper thread when big); see `DigestJob`."""
        return DigestJob(
            self._header, (), threaded=threaded, gather=gather, pieces=_run_pieces(self._header, self._runs_)
        )

    def _values_and_digest(self) -> str:
        """check_values() and compute_digest(); the hash runs in a helper thread (DigestJob)
        while this thread scans the values, so verify costs about one sha256 pass."""
        job = self.digest_job(gather=0)  # this thread only scans values with numpy (GIL-light)
        try:
            self.check_values()
        except BaseException:
            job.cancel()
            raise
        return job.result()

    def verify(
        self,
        *,
        trusted: Iterable[str] | None = None,
        require_signed: bool = False,
    ) -> Verification:
        """Check values, digest and (when present or required) the signature.

        `trusted` is a set of public keys (base64 raw Ed25519) or signer ids; when given,
        the card must be signed by one of them.
        """
        digest = self._values_and_digest()
        check_digest_matches(self, digest)
        trusted_ok = check_signature(self._header, trusted, require_signed=require_signed)
        return Verification(digest, self._header.signature is not None, self._header.signer, trusted_ok)

    # -- signing
    def sign(self, key: Any) -> LoRACard:
        """A copy of this card signed with an Ed25519 private key (see `engine.keys`)."""
        from .keys import public_key_b64, signer_id

        sig = key.sign(_SIGN_DOMAIN + bytes.fromhex(self.digest))
        pub = public_key_b64(key.public_key())
        header = dataclasses.replace(
            self._header,
            signature=base64.b64encode(sig).decode(),
            signer=signer_id(pub),
            signer_key=pub,
        )
        return self._with_header(header)

    def _with_header(self, header: CardHeader) -> LoRACard:
        schema = card_schema(header.dtype, {METADATA_KEY: header.to_json()})
        batches = [pa.record_batch(b.columns, schema=schema) for b in self._batches]
        card = LoRACard.__new__(LoRACard)
        card._header, card._batches, card._path = header, batches, None
        card._runs_, card._rows, card._n, card._map = self._runs_, self._rows, self._n, self._map
        card._ident = None  # no file of its own: read_into copies from the buffers
        return card

    # -- writing
    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: temp file in the same directory, fsync, rename, fsync the directory."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=CARD_SUFFIX, dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                self.write_to(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            fsync_dir(p.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return p

    def write_to(self, f: Any) -> None:
        """Write the IPC file bytes to a binary file object (not atomic; see `write`)."""
        schema = self.schema
        opts = pa.ipc.IpcWriteOptions(compression=None)
        with pa.ipc.new_file(f, schema, options=opts) as w:
            for b in self._batches:
                w.write_batch(pa.record_batch(b.columns, schema=schema))

    def to_bytes(self) -> bytes:
        sink = pa.BufferOutputStream()
        self.write_to(sink)
        return sink.getvalue().to_pybytes()

    # -- torch (lazy)
    def torch_tensors(self, module: str | None = None) -> dict[str, tuple[Any, Any]]:
        """{module: (A, B)} as torch tensors sharing memory with the card (zero copy).

        The tensors are views into the card's buffers (for an opened card: the read-only file
        mapping). Never write into them: writing into a read-only mapping crashes the process.
        Copy (``.clone()``, ``.to(...)``) to get tensors you may modify. One ``from_numpy`` per
        record batch and column, then one ``split`` (or ``unbind`` when the rows share a shape)
        and a ``view`` per tensor.
        """
        import torch

        bf16 = self.dtype == "bfloat16"
        out: dict[str, tuple[Any, Any]] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffers: we only read
            if module is not None:
                if not any(module in r.names for r in self._runs_):
                    return out
                m = self[module]
                a, b = torch.from_numpy(m.a), torch.from_numpy(m.b)
                if bf16:
                    a, b = a.view(torch.bfloat16), b.view(torch.bfloat16)
                return {m.module: (a, b)}
            whole, base = None, 0
            if self._map is not None:  # one tensor over the whole mapping, sliced per batch
                whole = torch.from_numpy(np.frombuffer(self._map, np.uint8))
                base = self._map.address
            tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]
            for run in self._runs_:
                fa, fb = run.flat_a, run.flat_b
                if whole is not None:
                    oa, ob = fa.ctypes.data - base, fb.ctypes.data - base
                    ta = whole[oa : oa + fa.nbytes].view(tdt)
                    tb = whole[ob : ob + fb.nbytes].view(tdt)
                else:
                    ta, tb = torch.from_numpy(fa), torch.from_numpy(fb)
                    if bf16:
                        ta, tb = ta.view(torch.bfloat16), tb.view(torch.bfloat16)
                out.update(
                    zip(
                        run.names,
                        zip(_split_views(ta, run.shapes_a()), _split_views(tb, run.shapes_b()), strict=True),
                        strict=True,
                    )
                )
        return out

    def read_into(self, dst: Mapping[str, tuple[Any, Any]]) -> None:
        """Copy every module's A and B into existing arrays: ``dst[module] = (A, B)``.

        The destinations are writable, C-contiguous numpy arrays or CPU torch tensors of the
        card's shapes and dtype (bfloat16: torch.bfloat16 tensors, or uint16/int16 arrays of the
        raw words); all are checked before the first byte is written. For an opened card whose
        file is unchanged since `open` (same device, inode, size, times), each record batch
        column is read with one ``os.preadv`` straight from the file into the destinations'
        memory: no page faults through the mapping, no intermediate buffer (measured 1.1 to 1.2x
        faster than copying from the mapping; bench/bench_card.py). Otherwise the bytes are
        copied from the card's buffers. Values are not checked here: `verify()` first when the
        card is untrusted.
        """
        views: dict[str, tuple[memoryview, memoryview]] = {}
        for run in self._runs_:
            for name, sa, sb in zip(run.names, run.shapes_a(), run.shapes_b(), strict=True):
                got = dst.get(name)
                if got is None:
                    raise CardError(f"read_into: no destination for module {name!r}")
                views[name] = (
                    _writable_bytes(got[0], sa, self.dtype, f"{name} A"),
                    _writable_bytes(got[1], sb, self.dtype, f"{name} B"),
                )
        fd = -1
        if self._path is not None and self._map is not None and self._ident is not None:
            try:
                fd = os.open(self._path, os.O_RDONLY)
                if _identity(os.fstat(fd)) != self._ident:  # replaced or changed: use the map
                    os.close(fd)
                    fd = -1
            except OSError:
                fd = -1
        try:
            base = self._map.address if self._map is not None else 0
            for run in self._runs_:
                for col, flat in ((0, run.flat_a), (1, run.flat_b)):
                    targets = [views[n][col] for n in run.names]
                    if fd >= 0:
                        _preadv_all(fd, targets, flat.ctypes.data - base, self._path)
                        continue
                    src = np.frombuffer(_c(flat).data.cast("B"), np.uint8)
                    pos = 0
                    for t in targets:
                        np.copyto(np.frombuffer(t, np.uint8), src[pos : pos + t.nbytes])
                        pos += t.nbytes
        finally:
            if fd >= 0:
                os.close(fd)

    def matches(self, pattern: str) -> bool:
        return fnmatch.fnmatchcase(self.name, pattern)


# Exponent bits all ones means Inf or NaN, for each storage type (as unsigned words).
_EXP_MASK: dict[str, tuple[np.dtype[Any], int]] = {
    "float32": (np.dtype("<u4"), 0x7F800000),
    "float16": (np.dtype("<u2"), 0x7C00),
    "bfloat16": (np.dtype("<u2"), 0x7F80),
}
_FINITE_CHUNK = 1 << 18  # elements per pass: bounded scratch memory, stays in cache


def _as_storage(arr: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """`arr` in the card's storage dtype, never converting values between kinds.

    float32/float16 take float arrays of that width (any byte order); bfloat16 takes the raw
    16-bit words (uint16 or int16), since numpy has no bfloat16.
    """
    npdt = DTYPES[dtype]
    if dtype == "bfloat16":
        if arr.dtype.kind not in "ui" or arr.dtype.itemsize != 2:
            raise CardError(
                f"{what}: a bfloat16 card takes the raw 16-bit words as uint16, got {arr.dtype} "
                "(from torch: tensor.view(torch.uint16).numpy() or .view(torch.int16))"
            )
        return arr.view(arr.dtype.str[0] + "u2").astype(npdt, copy=False)
    if arr.dtype.kind != "f" or arr.dtype.itemsize != npdt.itemsize:
        raise CardError(f"{what}: array of {arr.dtype} does not match the card dtype {dtype}")
    return arr.astype(npdt, copy=False)


def _all_finite(arr: np.ndarray, dtype: str) -> bool:
    """True when no element is NaN or Inf; scans in chunks with one small scratch buffer.

    float32 uses numpy's vectorised isfinite; the 16-bit kinds test the exponent bits (numpy's
    float16 isfinite is ten times slower, and bfloat16 is raw words).
    """
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.size == 0:
        return True
    n = min(flat.size, _FINITE_CHUNK)
    if dtype == "float32":
        vals = flat.view(np.float32)
        ok = np.empty(n, np.bool_)
        for i in range(0, flat.size, _FINITE_CHUNK):
            chunk = vals[i : i + _FINITE_CHUNK]
            out = ok[: chunk.size]
            np.isfinite(chunk, out=out)
            if not out.all():
                return False
        return True
    wdt, mask = _EXP_MASK[dtype]
    words = flat.view(wdt)
    scratch = np.empty(n, wdt)
    for i in range(0, words.size, _FINITE_CHUNK):
        chunk = words[i : i + _FINITE_CHUNK]
        out = scratch[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if int(out.max()) == mask:
            return False
    return True


def _verify_signature(header: CardHeader) -> None:
    from cryptography.exceptions import InvalidSignature

    from .keys import load_public_b64, signer_id

    assert header.signature is not None and header.signer_key is not None
    try:
        pub = load_public_b64(header.signer_key)
        sig = base64.b64decode(header.signature, validate=True)
    except (ValueError, TypeError) as e:
        raise TrustError(f"{header.ref}: signature or signer key is malformed: {e}") from None
    if header.signer != signer_id(header.signer_key):
        raise TrustError(f"{header.ref}: signer id {header.signer!r} does not match the signer key")
    try:
        pub.verify(sig, _SIGN_DOMAIN + bytes.fromhex(header.digest))
    except InvalidSignature:
        raise TrustError(
            f"{header.ref}: bad signature: it does not match the digest and signer key"
        ) from None


def check_digest_matches(card: LoRACard, digest: str) -> None:
    """Raise CardError when `digest` (recomputed from the content) differs from the header's."""
    if digest != card.header.digest:
        raise CardError(
            f"{card.ref}: digest mismatch: the header says {card.header.digest[:16]}… but the content "
            f"hashes to {digest[:16]}…; the card was tampered with or corrupted"
        )


def check_signature(
    header: CardHeader, trusted: Iterable[str] | None, *, require_signed: bool = False
) -> bool | None:
    """The signature half of `LoRACard.verify`, for a header whose digest is established.

    A present signature must be valid; with `trusted` (public keys or signer ids) or
    `require_signed` one must be present, and with `trusted` it must be by one of them.
    Returns the trust decision (None when none was asked for).
    """
    if header.signature is not None:
        _verify_signature(header)
    elif require_signed or trusted is not None:
        raise TrustError(f"{header.ref} is unsigned, but a signature by a trusted key is required")
    if trusted is None:
        return None
    tset = trusted if isinstance(trusted, (set, frozenset)) else set(trusted)
    if header.signer_key not in tset and header.signer not in tset:
        raise TrustError(
            f"{header.ref} is signed by {header.signer}, which is not a trusted key; "
            "add its public key with 'loraflight trust add' if you trust it"
        )
    return True


def _split_views(flat: Any, shapes: Sequence[tuple[int, ...]]) -> Sequence[Any]:
    """Views of consecutive 2-D tensors laid end to end in the 1-D torch tensor `flat`."""
    first = shapes[0]
    if all(s == first for s in shapes):
        return flat.view(len(shapes), *first).unbind(0)
    return [t.view(s) for t, s in zip(flat.split([s[0] * s[1] for s in shapes]), shapes, strict=True)]


_IOV_MAX = 1024  # iovecs per preadv call (Linux's limit)


def _preadv_all(fd: int, targets: list[memoryview], offset: int, path: Any) -> None:
    """Fill `targets` (in order) from the file at `offset`; short reads are resumed."""
    for i in range(0, len(targets), _IOV_MAX):
        bufs = targets[i : i + _IOV_MAX]
        want = sum(b.nbytes for b in bufs)
        done = 0
        for _ in range(want // 4096 + 2):  # each pass reads at least a byte or stops
            if done == want:
                break
            got = os.preadv(fd, _skip(bufs, done), offset + done)
            if got <= 0:
                break
            done += got
        if done != want:
            raise CardError(f"{path}: the file ended early while reading tensors (truncated since open?)")
        offset += want


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """`bufs` without their first `n` bytes."""
    if n == 0:
        return bufs
    out = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
            continue
        out.append(b[n:])
        n = 0
    return out


def _writable_bytes(obj: Any, shape: tuple[int, int], dtype: str, what: str) -> memoryview:
    """A writable byte view of a destination array/tensor, checked against shape and dtype."""
    if not isinstance(obj, np.ndarray):  # a torch tensor: torch is imported if one exists
        torch: Any = sys.modules.get("torch")
        if torch is None or not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            raise CardError(f"read_into: {what}: need a numpy array or a CPU torch tensor")
        if str(obj.dtype) != "torch." + dtype:
            raise CardError(f"read_into: {what}: dtype {obj.dtype}, the card holds {dtype}")
        if obj.requires_grad:
            obj = obj.detach()
        arr = obj.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else obj.numpy()
    else:
        arr = obj
        ok = (
            (arr.dtype.kind in "ui" and arr.dtype.itemsize == 2)
            if dtype == "bfloat16"
            else (arr.dtype == DTYPES[dtype])
        )
        if not ok:
            raise CardError(f"read_into: {what}: dtype {arr.dtype}, the card holds {dtype}")
    if tuple(arr.shape) != tuple(shape) or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise CardError(
            f"read_into: {what}: need a writable C-contiguous array of shape {tuple(shape)}, "
            f"got shape {tuple(arr.shape)}"
        )
    return arr.data.cast("B")


def _get_a(m: ModuleLoRA) -> np.ndarray:
    return m.a


def _get_b(m: ModuleLoRA) -> np.ndarray:
    return m.b


def _to_batches(mods: Sequence[ModuleLoRA], header: CardHeader) -> list[pa.RecordBatch]:
    schema = card_schema(header.dtype, {METADATA_KEY: header.to_json()})
    value_type = _ARROW_VALUE[header.dtype]
    groups: list[list[ModuleLoRA]] = [[]]
    size = 0
    for m in mods:
        nb = m.a.nbytes + m.b.nbytes
        if groups[-1] and size + nb > BATCH_TARGET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(m)
        size += nb
    batches = []
    for g in groups:
        cols: list[pa.Array] = [
            pa.array([m.module for m in g], pa.utf8()),
            pa.array([m.rank for m in g], pa.int32()),
            pa.array([m.alpha for m in g], pa.float64()),
            pa.array([m.in_features for m in g], pa.int64()),
            pa.array([m.out_features for m in g], pa.int64()),
        ]
        for get in (lambda m: m.a, lambda m: m.b):
            parts = [np.ascontiguousarray(get(m)).reshape(-1) for m in g]
            off = np.zeros(len(g) + 1, dtype=np.int32)
            np.cumsum([p.size for p in parts], out=off[1:])
            if off[-1] >= 2**31 - 1:
                raise CardError("one record batch would exceed 2^31 values; reduce module sizes")
            flat = np.concatenate(parts) if parts else np.empty(0, DTYPES[header.dtype])
            values = pa.array(flat.view(DTYPES[header.dtype]), type=value_type)
            cols.append(
                pa.ListArray.from_arrays(pa.array(off, pa.int32()), values, type=schema.field(len(cols)).type)
            )
        batches.append(pa.record_batch(cols, schema=schema))
    return batches


# --------------------------------------------------------------------------- IPC pre-check
# A compressed record batch makes Arrow allocate the uncompressed size its body claims before it
# decompresses (a few kB of zstd can claim gigabytes), so compression is refused by reading the
# footer and each batch's message header (FlatBuffers, format/File.fbs and Message.fbs) before
# Arrow touches a body. Anything this walk cannot parse is left to Arrow, which then reports it.

_FB_MAX_BATCHES = MAX_ROWS


def _fb_table(mv: memoryview, pos: int) -> tuple[int, int, int]:
    """(table position, vtable position, vtable size) of the table at `pos`."""
    vt = pos - struct.unpack_from("<i", mv, pos)[0]
    (vt_size,) = struct.unpack_from("<H", mv, vt)
    return pos, vt, vt_size


def _fb_field(mv: memoryview, table: tuple[int, int, int], index: int) -> int | None:
    """Position of field `index` of a table, or None when absent."""
    pos, vt, vt_size = table
    slot = 4 + 2 * index
    if slot + 2 > vt_size:
        return None
    (off,) = struct.unpack_from("<H", mv, vt + slot)
    return pos + off if off else None


def _fb_deref(mv: memoryview, pos: int) -> int:
    return pos + struct.unpack_from("<I", mv, pos)[0]


def _compressed_batch(mv: memoryview) -> int | None:
    """Index of the first record batch whose message declares body compression, if any."""
    try:
        n = len(mv)
        (footer_len,) = struct.unpack_from("<i", mv, n - 10)
        start = n - 10 - footer_len
        if footer_len <= 0 or start < 8:
            return None
        footer = mv[start : n - 10]
        root = _fb_table(footer, _fb_deref(footer, 0))
        batches_at = _fb_field(footer, root, 3)  # Footer.recordBatches: [Block]
        if batches_at is None:
            return None
        vec = _fb_deref(footer, batches_at)
        (count,) = struct.unpack_from("<I", footer, vec)
        for i in range(min(count, _FB_MAX_BATCHES)):
            offset, meta_len, _pad, _body = struct.unpack_from("<qiiq", footer, vec + 4 + 24 * i)
            if offset < 0 or meta_len <= 0 or offset + meta_len > n:
                return None
            msg = mv[offset : offset + meta_len]
            head = 8 if struct.unpack_from("<I", msg, 0)[0] == 0xFFFFFFFF else 4
            fb = msg[head:]
            message = _fb_table(fb, _fb_deref(fb, 0))
            htype = _fb_field(fb, message, 1)  # Message.header_type
            header = _fb_field(fb, message, 2)  # Message.header
            if htype is None or header is None or fb[htype] != 3:  # 3 = RecordBatch
                continue
            batch = _fb_table(fb, _fb_deref(fb, header))
            if _fb_field(fb, batch, 3) is not None:  # RecordBatch.compression
                return i
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _map_file(p: Path) -> tuple[pa.Buffer, tuple[int, ...]]:
    """The whole file as a read-only memory map wrapped in an Arrow buffer (no copy).

    A Python mmap read through `pa.BufferReader` rather than `pa.memory_map`: Arrow's memory-mapped
    file advises the kernel on every read (madvise WILLNEED over each batch), which costs more than
    the rest of opening a card. The map lives as long as any array viewing it.
    """
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise CardError(f"{p}: not an Arrow IPC file or truncated: the file is empty")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CardError(f"{p}: no such card file") from None
    except (OSError, ValueError) as e:
        raise CardError(f"{p}: cannot map the file: {e}") from None
    return pa.py_buffer(mm), _identity(st)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_card(path: str | os.PathLike[str]) -> LoRACard:
    return LoRACard.open(path)
