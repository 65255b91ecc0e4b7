"""The card header and the format's rules: names, limits, schema, canonical JSON, LoRA scale.

Pure rules, no I/O and no threads: `CardHeader` (the schema metadata under ``loraflight``),
`CardMeta` (the descriptive fields an author gives), the Arrow schema of a card, the checks
on names, rows and digests, the base fingerprint, and `lora_scale` (the one home of the
alpha/r and alpha/sqrt(r) rule). See docs/format.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from loraflight.errors import CardError

FORMAT_MAJOR = 2  # what writers write: pieces hashed with BLAKE3 (docs/format.md, section 11)
FORMAT_MINOR = 0
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
READ_MAJORS = (1, 2)  # the format majors this loraflight reads and verifies (node-info lists them)
FORMAT1_VERSION = "1.0"  # what `LoRACard.build(major=1)` writes (compatibility tests, benchmarks)
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
MAX_PIECES = 8192  # format 2: record batches (pieces) per card; 8192 x 4 MiB = 32 GiB


SCALINGS = ("standard", "rslora")  # alpha/r and alpha/sqrt(r): see lora_scale
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw 16-bit words; torch views them as bfloat16
}
ARROW_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_MODULES_RE = re.compile(rf"(?:[A-Za-z0-9_][A-Za-z0-9_.\-]{{0,{MAX_MODULE_LEN - 1}}}\n)+\Z")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


_PLAIN: dict[str, pa.Schema] = {}  # dtype -> its schema without metadata (immutable, built once)


def card_schema(dtype: str, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    """The Arrow schema of a card of `dtype` (metadata optional)."""
    if not metadata:
        plain = _PLAIN.get(dtype)
        if plain is None:
            plain = _PLAIN[dtype] = _build_schema(dtype, None)
        return plain
    return _build_schema(dtype, metadata)


def _build_schema(dtype: str, metadata: Mapping[bytes, bytes] | None) -> pa.Schema:
    value = ARROW_VALUE_TYPES[dtype]
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


# Bidi embedding, override and isolate controls: they reorder what a terminal shows after them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def text_problem(what: str, text: str, *, multiline: bool = False) -> str | None:
    """Why `text` may not go into a new header (control or bidi characters), or None.

    Refused: C0 and C1 control characters and DEL (ESC sequences, CR overwrites, OSC 8
    hyperlinks) and bidi controls (U+202A..U+202E, U+2066..U+2069); a `multiline` field (the
    description) may hold newlines and tabs. Other Unicode (emoji, accents, CJK) is fine.
    """
    allowed = "\n\t" if multiline else ""
    for i, c in enumerate(text):
        if (c in _BIDI_CONTROLS or unicodedata.category(c) == "Cc") and c not in allowed:
            return (
                f"{what} holds the control character {c.encode('unicode_escape').decode('ascii')} at "
                f"position {i}; remove it (terminal escapes, carriage returns and bidi overrides are refused)"
            )
    return None


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


def utc_now() -> str:
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
    format: str = FORMAT1_VERSION  # a header built by hand; writers (LoRACard.build) set 2.0
    digest: str = ""
    signature: str | None = None
    signer: str | None = None
    signer_key: str | None = None
    pieces: tuple[tuple[int, int, str], ...] = ()  # format 2: (first row, rows, BLAKE3 hex)
    upgraded_from: str | None = None  # format 2: the format-1 digest this card was upgraded from
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def major(self) -> int:
        """The format major of this header (1: sha256 over the rows; 2: BLAKE3 pieces)."""
        return int(self.format.split(".")[0])

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
            d["peft"] = plain_json(self.peft)
        if self.major >= 2:
            d["pieces"] = [[first, rows, h] for first, rows, h in self.pieces]
            if self.upgraded_from is not None:
                d["upgraded_from"] = self.upgraded_from
        return d

    def to_dict(self) -> dict[str, Any]:
        d = self.signed_part()
        d["digest"] = self.digest
        if self.signature is not None:
            d.update(signature=self.signature, signer=self.signer, signer_key=self.signer_key)
        return d

    def to_json(self) -> bytes:
        """The canonical JSON of this header (computed once: a header is immutable)."""
        cached = self.__dict__.get("_json")
        if cached is None:
            cached = canonical_json(self.to_dict())
            object.__setattr__(self, "_json", cached)  # not a field: equality and replace ignore it
        return cached

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
        if major not in READ_MAJORS:
            raise CardError(
                f"card format {fmt} has major version {major}; this loraflight reads majors "
                f"{', '.join(map(str, READ_MAJORS))}: upgrade loraflight to read it"
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
        if not digest and (why := text_problem("description", description, multiline=True)):
            # A header without a digest is one being written (LoRACard.build, CardMeta): refused.
            # Cards already written keep reading; the CLI prints their strings escaped.
            problems.append(why)
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
        pieces: tuple[tuple[int, int, str], ...] = ()
        upgraded_from = None
        if major >= 2:
            pieces = _pieces(raw.get("pieces"), problems)
            upgraded_from = want("upgraded_from", str)
            if upgraded_from is not None and not _DIGEST_RE.match(upgraded_from):
                problems.append("upgraded_from must be a digest (64 lowercase hex characters)")
        if problems:
            raise CardError("invalid card header: " + "; ".join(problems))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if major < 2:  # format 1 has no such fields: a key of that name is an extension
            known -= {"pieces", "upgraded_from"}
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
            pieces=pieces,
            upgraded_from=upgraded_from,
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


def upgrade_pair(a: CardHeader, b: CardHeader) -> bool:
    """Whether two headers are one card before and after `card upgrade`: the same name@version,
    one naming the other's digest in `upgraded_from`, and the same signer key (or both unsigned).

    A store keeps one card of such a pair and does not call it a conflict; another signer's
    "upgrade" is still a conflict (an upgrade is re-signed by the card's owner).
    """
    if (a.name, a.version) != (b.name, b.version) or a.digest == b.digest:
        return False
    linked = (a.upgraded_from is not None and a.upgraded_from == b.digest) or (
        b.upgraded_from is not None and b.upgraded_from == a.digest
    )
    return linked and a.signer_key == b.signer_key


def _pieces(raw: Any, problems: list[str]) -> tuple[tuple[int, int, str], ...]:
    """A format-2 header's piece list: [[first row, rows, BLAKE3 hex], ...], contiguous from 0."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PIECES:
        problems.append(
            f"a format-2 header needs 'pieces': a list of 1..{MAX_PIECES} [first row, rows, hash]"
        )
        return ()
    out: list[tuple[int, int, str]] = []
    nxt = 0
    for i, p in enumerate(raw):
        ok = (
            isinstance(p, list)
            and len(p) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in p[:2])
            and isinstance(p[2], str)
            and _DIGEST_RE.match(p[2]) is not None
        )
        if not ok:
            problems.append(f"piece {i} is not [first row, rows, 64-hex BLAKE3 hash]")
            return ()
        first, rows, h = p
        if first != nxt or not 1 <= rows <= MAX_ROWS or first + rows > MAX_ROWS:
            problems.append(
                f"piece {i} covers rows {first}..{first + rows - 1}; pieces must cover the rows in order "
                f"from 0 without gaps, each 1..{MAX_ROWS} rows"
            )
            return ()
        nxt = first + rows
        out.append((first, rows, h))
    return tuple(out)


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


def plain_json(obj: Any) -> Any:
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


def check_rows(
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


def header_from_schema(schema: pa.Schema, *, expect: CardHeader | None = None) -> CardHeader:
    """The header a card's schema carries, checked; `expect` is returned as it is when the
    metadata holds exactly its canonical JSON (a header already parsed and checked once)."""
    meta = schema.metadata or {}
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise CardError("not a loraflight card: the schema metadata has no 'loraflight' header")
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_HEADER_BYTES + 4096:
        raise CardError(f"schema metadata is larger than {MAX_HEADER_BYTES} bytes (metadata too large)")
    header = expect if expect is not None and raw == expect.to_json() else CardHeader.from_json(raw)
    plain = card_schema(header.dtype)
    if not schema.remove_metadata().equals(plain):
        raise CardError(
            f"wrong schema for a {header.dtype} card: got ({schema_str(schema)}), "
            f"expected ({schema_str(plain)})"
        )
    return header


def schema_str(schema: pa.Schema) -> str:
    parts = []
    for i in range(len(schema)):
        try:
            f = schema.field(i)
            parts.append(f"{f.name}: {f.type}")
        except (UnicodeDecodeError, pa.ArrowException, ValueError):
            parts.append(f"<field {i} with an undecodable name>")
    return ", ".join(parts)


# --------------------------------------------------------------------------- LoRA scale


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """The factor a module's B·A is multiplied by: alpha/r, or alpha/sqrt(r) for rsLoRA.

    The one home of this rule (card, engine, training and composition all call it).
    """
    if scaling not in SCALINGS:
        raise CardError(f"scaling {scaling!r} is not one of {', '.join(SCALINGS)}")
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise CardError(f"rank must be a positive integer, got {rank!r}")
    return alpha / math.sqrt(rank) if scaling == "rslora" else alpha / rank


def alpha_for_scale(scale: float, rank: int, scaling: str = "standard") -> float:
    """The inverse of `lora_scale`: the alpha that gives `scale` at `rank` under `scaling`."""
    lora_scale(1.0, rank, scaling)  # the same checks
    return scale * (math.sqrt(rank) if scaling == "rslora" else rank)


# --------------------------------------------------------------------------- author metadata


@dataclasses.dataclass(frozen=True)
class CardMeta:
    """What an author says about a card: its name, version and descriptive header fields.

    One value carries them from the CLI through training, extraction and composition to
    `LoRACard.build`. Validated on construction by the header's own rules, so a bad name,
    version or tag fails at once (before minutes of training), with the CardError the final
    build would raise.
    """

    name: str
    version: int = 1
    description: str = ""
    tags: tuple[str, ...] = ()
    base_model: str | None = None
    author: str = ""

    def __post_init__(self) -> None:
        tags = self.tags
        if isinstance(tags, str) or not isinstance(tags, Iterable):
            raise CardError(f"tags must be a list of strings, got {tags!r}")
        object.__setattr__(self, "tags", tuple(tags))
        check_name(self.name)  # the header accepts an empty name; an author may not give one
        CardHeader.from_dict({"format": FORMAT1_VERSION, "dtype": "float32", **self.as_kwargs()})

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of `LoRACard.build`."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "tags": list(self.tags),
            "base_model": self.base_model,
            "author": self.author,
        }

    @classmethod
    def given(cls, meta: CardMeta | None, name: str | None = None) -> CardMeta:
        """`meta`, or ``CardMeta(name)`` when only a name is given: the authoring functions'
        shorthand (``make_child(parent, rows, name="tone")``). Exactly one of the two."""
        if meta is not None and name is not None:
            raise CardError("give the card's metadata as meta=CardMeta(...) or just name=, not both")
        if meta is not None:
            if not isinstance(meta, CardMeta):
                raise CardError(f"meta must be a CardMeta, got {type(meta).__name__}")
            return meta
        if name is None:
            raise CardError("the card needs a name: pass meta=CardMeta(name=...) (or name=)")
        return cls(name)

    def replace(self, **changes: Any) -> CardMeta:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


__all__ = [
    "ARROW_VALUE_TYPES",
    "CARD_SUFFIX",
    "DTYPES",
    "FORMAT1_VERSION",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "FORMAT_VERSION",
    "MAX_DESCRIPTION",
    "MAX_FEATURES",
    "MAX_HEADER_BYTES",
    "MAX_LINEAGE",
    "MAX_MODULE_LEN",
    "MAX_NAME_LEN",
    "MAX_PIECES",
    "MAX_RANK",
    "MAX_ROWS",
    "MAX_TAGS",
    "MAX_TAG_LEN",
    "METADATA_KEY",
    "READ_MAJORS",
    "SCALINGS",
    "CardHeader",
    "CardMeta",
    "alpha_for_scale",
    "base_fingerprint",
    "canonical_json",
    "card_schema",
    "check_digest",
    "check_module_name",
    "check_name",
    "check_rows",
    "header_from_schema",
    "lora_scale",
    "plain_json",
    "schema_str",
    "text_problem",
    "upgrade_pair",
    "utc_now",
]
