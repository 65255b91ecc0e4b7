"""`LoRACard`: an immutable card (header plus record batches), opened, built, verified, written.

Theory of operation
-------------------
``LoRACard.open`` maps the file and checks structure only (schema, offsets, every shape
against its buffer, header limits); tensors come out as numpy views into the mapping.
``verify`` checks values (finite), the digest, and a signature when asked. The rules live
beside this module (`header`, `batches`, `values`, `digest`, `signing`, `ipc`); this module
applies them. Nothing here imports torch; ``torch_tensors`` loads the torch adapter lazily.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from loraflight.errors import CardError
from loraflight.files import atomic_write

from .batches import BatchRun, ModuleLoRA, batch_runs, contiguous, group_rows, to_batches
from .digest import GATHER_BYTES, DigestJob, compute_digest, run_pieces
from .header import (
    CARD_SUFFIX,
    DTYPES,
    FORMAT1_VERSION,
    FORMAT_MAJOR,
    FORMAT_VERSION,
    MAX_ROWS,
    METADATA_KEY,
    CardHeader,
    card_schema,
    check_module_name,
    header_from_schema,
    plain_json,
    schema_str,
    utc_now,
)
from .ipc import compressed_batch, file_identity, map_file, preadv_all, writable_bytes
from .pieces import CPUS, PieceJob, check_layout, header_digest, piece_hash, pieces_of
from .signing import sign_header, verify_signature
from .values import as_storage, check_finite

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
                    f"record batch {i} has schema ({schema_str(b.schema)}), expected ({schema_str(expect)})"
                )
        runs = batch_runs(self._batches, header.dtype)
        names = [n for r in runs for n in r.names]
        if len(names) > MAX_ROWS:
            raise CardError(f"card has {len(names)} modules; the limit is {MAX_ROWS}")
        if not names:
            raise CardError("card has no modules")
        if header.major >= 2:
            check_layout(header, [len(r.names) for r in runs])
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise CardError(f"module {dup!r} appears twice")
        self._runs = runs
        self._rows: list[ModuleLoRA] | None = None
        self._n = len(names)
        self._map: pa.Buffer | None = None  # the whole mapped file, for an opened card
        self._ident: tuple[int, ...] | None = None  # that file's (device, inode, size, times)

    @property
    def _modules(self) -> list[ModuleLoRA]:
        """The rows as `ModuleLoRA` (numpy views), built on first use: opening does not need them."""
        rows = self._rows
        if rows is None:
            rows = [m for r in self._runs for m in r.rows()]
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
        upgraded_from: str | None = None,
        major: int = FORMAT_MAJOR,
    ) -> LoRACard:
        """Make a card in memory from numpy arrays (bfloat16 as uint16 words with dtype='bfloat16').

        Writes format 2 (BLAKE3 pieces); ``major=1`` writes format 1 (sha256), for
        compatibility tests and benchmarks against older nodes.
        """
        if major not in (1, 2):
            raise CardError(f"major must be 1 or 2 (the formats this loraflight writes), got {major!r}")
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
                    as_storage(a, dtype, f"module {m.module!r} lora_a"),
                    as_storage(b, dtype, f"module {m.module!r} lora_b"),
                )
            )
        groups = group_rows(norm)
        header = CardHeader.from_dict(
            {
                **(dict(extra) if extra else {}),
                **(
                    {"pieces": [list(p) for p in pieces_of(groups, dtype)], "upgraded_from": upgraded_from}
                    if major >= 2
                    else {}
                ),
                "format": FORMAT_VERSION if major >= 2 else FORMAT1_VERSION,
                "name": name,
                "version": version,
                "dtype": dtype,
                "description": description,
                "tags": list(tags),
                "base_model": base_model,
                "base_fingerprint": base_fingerprint,
                "scaling": scaling,
                "author": author,
                "created": created if created is not None else utc_now(),
                "lineage": list(lineage),
                "peft": plain_json(peft) if peft is not None else None,
            }
        )
        digest = header_digest(header) if major >= 2 else compute_digest(header, norm)
        header = dataclasses.replace(header, digest=digest)
        return cls(header, to_batches(norm, header, groups))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LoRACard:
        """Map a card file and check its structure; no tensor byte is read or copied."""
        p = Path(path)
        buf, ident = map_file(p)
        card = cls._open_buffer(buf, p)
        card._ident = ident
        return card

    @classmethod
    def open_buffer(
        cls, buf: pa.Buffer, path: str | os.PathLike[str], *, expect: CardHeader | None = None
    ) -> LoRACard:
        """`open` of a card file's bytes already in memory (e.g. just received and written to
        `path`), with the same checks and no copy; errors name `path`. With `expect` (the header
        a listing named), a header whose bytes are that header's canonical JSON is not parsed
        again (any other header is parsed and checked as usual)."""
        return cls._open_buffer(buf, Path(path), expect=expect)

    @classmethod
    def _open_buffer(cls, buf: pa.Buffer, p: Path, *, expect: CardHeader | None = None) -> LoRACard:
        size = buf.size
        if size == 0:
            raise CardError(f"{p}: not an Arrow IPC file or truncated: the file is empty")
        base = buf.address
        compressed = compressed_batch(memoryview(buf))
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
            header = header_from_schema(schema, expect=expect)
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
                b = reader.get_batch(i)  # fully validated below, in LoRACard() (batch_runs)
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
            card._map = buf
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
        header = header_from_schema(schema)
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
    def format_major(self) -> int:
        """1: one sha256 digest over the rows; 2: BLAKE3 pieces (one per record batch)."""
        return self._header.major

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
    def runs(self) -> list[BatchRun]:
        """The record batches after their structural checks: flat A/B values and row fields."""
        return list(self._runs)

    @property
    def mapping(self) -> pa.Buffer | None:
        """The whole mapped file of an opened card (its tensors are views into it), else None."""
        return self._map

    @property
    def tensor_nbytes(self) -> int:
        return sum(r.flat_a.nbytes + r.flat_b.nbytes for r in self._runs)

    @property
    def shapes(self) -> list[tuple[str, int, int]]:
        """(module, in_features, out_features) per row: what the base fingerprint hashes."""
        return [t for r in self._runs for t in zip(r.names, r.fins, r.fouts, strict=True)]

    def __repr__(self) -> str:
        return f"LoRACard({self.ref}, {len(self)} modules, {self.dtype}, digest={self.digest[:12]})"

    # -- verification
    def compute_digest(self) -> str:
        """The digest the content gives (format 2: the header's, with every piece rehashed)."""
        if self._header.major >= 2:
            return self.content_header().digest
        h = hashlib.sha256()
        for piece in run_pieces(self._header, self._runs)[0]:
            h.update(piece)
        return h.hexdigest()

    def content_header(self) -> CardHeader:
        """The header with what the content determines recomputed: format 2's piece list (one
        piece per record batch, as laid out) and the digest. Other fields, signature included,
        are kept; `verify()` judges the result (tools and tests that forge or repair cards)."""
        if self._header.major < 2:
            return dataclasses.replace(self._header, digest=self.compute_digest())
        header = dataclasses.replace(self._header, pieces=self._piece_list())
        return dataclasses.replace(header, digest=header_digest(header))

    def _piece_list(self) -> tuple[tuple[int, int, str], ...]:
        """(first row, rows, BLAKE3 hash) of every record batch as a format-2 piece."""
        pieces = []
        first = 0
        for i, r in enumerate(self._runs):
            pieces.append((first, len(r.names), piece_hash(i, first, self.dtype, r, max_threads=CPUS)))
            first += len(r.names)
        return tuple(pieces)

    def check_values(self) -> None:
        """Raise CardError naming the first module with a NaN or Inf (see `values.check_finite`)."""
        check_finite(self._runs, self.dtype)

    def digest_job(self, *, threaded: bool | None = None, gather: int = GATHER_BYTES) -> DigestJob | PieceJob:
        """Start computing this card's digest (in a helper thread when big); see `DigestJob`.

        Format 2: a `PieceJob` (same interface) whose `result()` names every bad piece.
        """
        if self._header.major >= 2:
            return PieceJob(self._header, self._runs, threaded=threaded)
        return DigestJob(
            self._header, (), threaded=threaded, gather=gather, pieces=run_pieces(self._header, self._runs)
        )

    def _values_and_digest(self) -> str:
        """check_values() and compute_digest(); the hash runs in a helper thread (DigestJob)
        while this thread scans the values, so verify costs about one sha256 pass.

        Format 2: each piece hashed and scanned finite, chunk by chunk, by whichever thread
        takes it (`PieceJob(finite=True)`), so neither the scan nor the hash is left for last
        on one thread; on every core (as ``blake3(buf, max_threads=cores)`` uses), not only on the
        cores /proc/loadavg calls idle at this instant: the caller waits for the answer, and a
        spinning thread pool or a brief burst elsewhere made that reading say "none" and hash
        the whole card on this one thread (bench/bench_card.py, same run: 0.44x of blake3's
        two threads that way, 0.79x on every core)."""
        if self._header.major >= 2:  # values scanned piece by piece by the hashing threads
            return PieceJob(self._header, self._runs, threads=CPUS, finite=True).result()
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
        trusted_ok = verify_signature(self._header, trusted, require_signed=require_signed)
        return Verification(digest, self._header.signature is not None, self._header.signer, trusted_ok)

    # -- signing
    def sign(self, key: Ed25519PrivateKey) -> LoRACard:
        """A copy of this card signed with an Ed25519 private key (see `engine.keys`)."""
        return self.with_header(sign_header(self._header, key))

    def with_header(self, header: CardHeader) -> LoRACard:
        """A copy of this card with another header; the rows are shared, nothing is rechecked.

        The digest is *not* recomputed and no signature is checked: the copy carries whatever
        `header` says, so `verify()` judges it like a card received from anyone (this is how
        tests build forged cards). The header's dtype must be this card's.
        """
        if header.dtype != self.dtype:
            raise CardError(
                f"with_header: the header is for a {header.dtype} card, this card is {self.dtype}"
            )
        schema = card_schema(header.dtype, {METADATA_KEY: header.to_json()})
        batches = [pa.record_batch(b.columns, schema=schema) for b in self._batches]
        card = LoRACard.__new__(LoRACard)
        card._header, card._batches, card._path = header, batches, None
        card._runs, card._rows, card._n, card._map = self._runs, self._rows, self._n, self._map
        card._ident = None  # no file of its own: read_into copies from the buffers
        if header.major >= 2:
            check_layout(header, [len(r.names) for r in self._runs])
        return card

    def upgrade(self, key: Ed25519PrivateKey | None = None) -> LoRACard:
        """This format-1 card as format 2: the same rows and batches (each batch a piece), the
        same header fields, a new digest, ``upgraded_from`` naming the old one; signed by `key`
        when given (the old signature signed the old digest and does not carry over).

        Verify the card first: the upgrade vouches for what it hashes.
        """
        if self._header.major >= 2:
            raise CardError(f"{self.ref} is already format {self._header.format}; nothing to upgrade")
        dt = self.dtype
        header = dataclasses.replace(
            self._header.unsigned(),
            format=FORMAT_VERSION,
            pieces=self._piece_list(),
            upgraded_from=self.digest,
        )
        header = dataclasses.replace(header, digest=header_digest(header))
        if key is not None:
            header = sign_header(header, key)
        schema = card_schema(dt, {METADATA_KEY: header.to_json()})
        return LoRACard(header, [pa.record_batch(b.columns, schema=schema) for b in self._batches])

    # -- writing
    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: temp file in the same directory, fsync, rename, fsync the directory."""
        return atomic_write(path, self.write_to, suffix=CARD_SUFFIX)

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
        from .torch import card_views

        return card_views(self, module)

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
        for run in self._runs:
            for name, sa, sb in zip(run.names, run.shapes_a(), run.shapes_b(), strict=True):
                got = dst.get(name)
                if got is None:
                    raise CardError(f"read_into: no destination for module {name!r}")
                views[name] = (
                    writable_bytes(got[0], sa, self.dtype, f"{name} A"),
                    writable_bytes(got[1], sb, self.dtype, f"{name} B"),
                )
        fd = -1
        if self._path is not None and self._map is not None and self._ident is not None:
            try:
                fd = os.open(self._path, os.O_RDONLY)
                if file_identity(os.fstat(fd)) != self._ident:  # replaced or changed: use the map
                    os.close(fd)
                    fd = -1
            except OSError:
                fd = -1
        try:
            base = self._map.address if self._map is not None else 0
            for run in self._runs:
                for col, flat in ((0, run.flat_a), (1, run.flat_b)):
                    targets = [views[n][col] for n in run.names]
                    if fd >= 0:
                        preadv_all(fd, targets, flat.ctypes.data - base, self._path)
                        continue
                    src = np.frombuffer(contiguous(flat).data.cast("B"), np.uint8)
                    pos = 0
                    for t in targets:
                        np.copyto(np.frombuffer(t, np.uint8), src[pos : pos + t.nbytes])
                        pos += t.nbytes
        finally:
            if fd >= 0:
                os.close(fd)

    def matches(self, pattern: str) -> bool:
        return fnmatch.fnmatchcase(self.name, pattern)


def check_digest_matches(card: LoRACard, digest: str) -> None:
    """Raise CardError when `digest` (recomputed from the content) differs from the header's."""
    if digest != card.header.digest:
        raise CardError(
            f"{card.ref}: digest mismatch: the header says {card.header.digest[:16]}… but the content "
            f"hashes to {digest[:16]}…; the card was tampered with or corrupted"
        )


def open_card(path: str | os.PathLike[str]) -> LoRACard:
    return LoRACard.open(path)


__all__ = ["LoRACard", "Verification", "check_digest_matches", "open_card"]
