"""Card fuzzer: mutate valid cards and drive each through open -> touch every tensor -> verify.

Run it in a subprocess, so a crash in native code fails the caller instead of killing it:

    python -m tests.engine.fuzz_driver --cases 2000 --seed 0 [--progress FILE]

Every case must end in `ok` (the mutation changed nothing that matters: verify passed) or a
`CardError`; anything else, or a case running past its deadline, is a failure. Targeted cases
(a lying shape, a NaN, a hostile name, a metadata bomb, ...) must also name their defect.
Prints one JSON summary line; exit status 0 when there was no failure, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import loraflight.engine.card as cardmod
import loraflight.engine.card.batches as batchmod
from loraflight.engine.card import (
    METADATA_KEY,
    CardDigest,
    CardHeader,
    LoRACard,
    ModuleLoRA,
    card_schema,
    header_digest,
)
from loraflight.engine.card.pieces import rows_piece_hash
from loraflight.engine.keys import generate
from loraflight.errors import CardError

CASE_DEADLINE_S = 5.0


class Hang(Exception):
    """A case ran past its deadline."""


# --------------------------------------------------------------------------- corpus


def _mods(rng: np.random.Generator, dtype: str, n: int, rank: int, fin: int, fout: int) -> list[ModuleLoRA]:
    out = []
    for i in range(n):
        a = rng.standard_normal((rank, fin)).astype(np.float32)
        b = rng.standard_normal((fout, rank)).astype(np.float32)
        if dtype == "bfloat16":
            a, b = (a.view(np.uint32) >> 16).astype(np.uint16), (b.view(np.uint32) >> 16).astype(np.uint16)
        else:
            a, b = a.astype(dtype), b.astype(dtype)
        out.append(ModuleLoRA(f"model.layers.{i}.self_attn.q_proj", rank, float(2 * rank), a, b))
    return out


def corpus() -> list[bytes]:
    """A few small valid cards: each dtype, several batches (format 2: several pieces), a signed
    one, an upgraded one, and format-1 cards (what older nodes wrote)."""
    rng = np.random.default_rng(1234)
    saved = batchmod.BATCH_TARGET_BYTES
    try:
        cards = [
            LoRACard.build(
                _mods(rng, "float32", 3, 4, 16, 8), name="fz32", description="fuzz me", tags=("a",)
            ),
            LoRACard.build(_mods(rng, "bfloat16", 2, 2, 8, 12), name="fzbf", dtype="bfloat16"),
        ]
        batchmod.BATCH_TARGET_BYTES = 200  # force one batch per module: multi-piece format-2 cards
        cards.append(LoRACard.build(_mods(rng, "float16", 4, 3, 8, 8), name="fz16", lineage=("ab" * 32,)))
        cards.append(
            LoRACard.build(_mods(rng, "float32", 3, 2, 8, 8), name="fz32m", description="fuzz me").sign(
                generate()
            )
        )
        v1 = LoRACard.build(_mods(rng, "float16", 3, 3, 8, 8), name="fz1m", major=1)
        cards += [v1, v1.upgrade(generate())]
    finally:
        batchmod.BATCH_TARGET_BYTES = saved
    cards.append(cards[0].sign(generate()))
    cards.append(
        LoRACard.build(_mods(rng, "float32", 2, 4, 16, 8), name="fz1", description="fuzz me", major=1).sign(
            generate()
        )
    )
    return [c.to_bytes() for c in cards]


def _raw(
    header: dict[str, Any],
    rows: list[tuple[str, int, float, int, int, np.ndarray, np.ndarray]],
    *,
    digest: bool = True,
) -> bytes:
    """A card file written without `build`'s checks: the way to make targeted bad input."""
    dtype = header["dtype"]
    base = {
        "format": "1.0",
        "version": 1,
        "description": "",
        "tags": [],
        "lineage": [],
        "scaling": "standard",
    }
    h = {**base, **header}
    if digest and h["format"].startswith("2.") and "pieces" not in h:
        try:  # one piece: all the rows (the writer's own layout for a small card)
            mods = [
                ModuleLoRA(m, r, al, np.ascontiguousarray(a), np.ascontiguousarray(b))
                for m, r, al, fi, fo, a, b in rows
            ]
            h["pieces"] = [[0, len(rows), rows_piece_hash(0, 0, dtype, mods)]]
            h["digest"] = header_digest(CardHeader.from_dict({**h, "digest": ""}))
        except (CardError, Exception):
            h["digest"] = "0" * 64
    elif digest:
        try:
            ch = CardHeader.from_dict({**h, "digest": ""})
            d = CardDigest(ch, len(rows))
            for m, r, al, fi, fo, a, b in rows:
                d.update_row(m, r, al, fi, fo, np.ascontiguousarray(a), np.ascontiguousarray(b))
            h["digest"] = d.hexdigest()
        except (CardError, Exception):  # the header itself is the defect: no digest needed
            h["digest"] = "0" * 64
    meta = json.dumps(h).encode()
    schema = card_schema(dtype if dtype in cardmod.DTYPES else "float32", {METADATA_KEY: meta})
    vt = schema.field("lora_a").type.value_type
    cols = [
        pa.array([r[0] for r in rows], pa.utf8()),
        pa.array([r[1] for r in rows], pa.int32()),
        pa.array([r[2] for r in rows], pa.float64()),
        pa.array([r[3] for r in rows], pa.int64()),
        pa.array([r[4] for r in rows], pa.int64()),
    ]
    for k in (5, 6):
        parts = [np.ascontiguousarray(r[k]).reshape(-1) for r in rows]
        off = np.concatenate([[0], np.cumsum([p.size for p in parts])]).astype(np.int32)
        flat = np.concatenate(parts) if parts else np.empty(0)
        values = pa.array(flat.view(cardmod.DTYPES.get(dtype, np.dtype("<f4"))), type=vt)
        cols.append(pa.ListArray.from_arrays(pa.array(off, pa.int32()), values, type=schema.field(k).type))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch(cols, schema=schema))
    return sink.getvalue().to_pybytes()


def _row(name: str = "model.layers.0.mlp.up_proj", r: int = 2, fi: int = 4, fo: int = 3, alpha: float = 4.0):
    rng = np.random.default_rng(7)
    return (
        name,
        r,
        alpha,
        fi,
        fo,
        rng.standard_normal((r, fi)).astype(np.float32),
        rng.standard_normal((fo, r)).astype(np.float32),
    )


def targeted() -> list[tuple[str, bytes, str | None]]:
    """(label, file bytes, substring the CardError must contain; None: must open and verify)."""
    f32 = {"name": "t", "dtype": "float32"}
    good = _row()
    nan_a = good[5].copy()
    nan_a[1, 2] = np.nan
    inf_b = good[6].copy()
    inf_b[0, 0] = np.inf
    lie_in = (*good[:3], 5, *good[4:])  # in_features says 5, A holds 2*4 values
    lie_out = (*good[:4], 9, *good[5:])
    lie_rank = (good[0], 3, *good[2:])
    cases: list[tuple[str, bytes, str | None]] = [
        ("shape-in", _raw(f32, [good, ("model.x", *lie_in[1:])]), "shape disagrees"),
        ("shape-out", _raw(f32, [lie_out]), "shape disagrees"),
        ("shape-rank", _raw(f32, [lie_rank]), "shape disagrees"),
        (
            "rank-0",
            _raw(f32, [("m.a", 0, 1.0, 4, 3, np.empty((0, 4), np.float32), np.empty((3, 0), np.float32))]),
            "rank 0",
        ),
        (
            "rank-absurd",
            _raw(f32, [("m.a", 1 << 20, 1.0, 1, 1, np.empty(0, np.float32), np.empty(0, np.float32))]),
            "absurd",
        ),
        (
            "features-absurd",
            _raw(f32, [("m.a", 1, 1.0, 1 << 40, 1, np.empty(0, np.float32), np.empty(0, np.float32))]),
            "out of range",
        ),
        ("nan", _raw(f32, [(*good[:5], nan_a, good[6])]), "NaN or Inf"),
        ("inf", _raw(f32, [(*good[:6], inf_b)]), "NaN or Inf"),
        ("alpha-nan", _raw(f32, [(good[0], good[1], float("nan"), *good[3:])]), "alpha is not finite"),
        ("name-escape", _raw({**f32, "name": "../../etc/passwd"}, [good]), "escape"),
        ("name-slash", _raw({**f32, "name": "a/b"}, [good]), "escape"),
        ("name-unprintable", _raw({**f32, "name": "a\x07b"}, [good]), "non-printable"),
        ("name-too-long", _raw({**f32, "name": "a" * 300}, [good]), "limit"),
        ("module-escape", _raw(f32, [("../x", *good[1:])]), "not a module path"),
        ("module-dup", _raw(f32, [good, good]), "appears twice"),
        ("major", _raw({**f32, "format": "3.0"}, [good]), "major"),
        ("v2-no-pieces", _raw({**f32, "format": "2.0", "pieces": None}, [good]), "pieces"),
        (
            "v2-piece-gap",
            _raw({**f32, "format": "2.0", "pieces": [[1, 1, "0" * 64]]}, [good]),
            "pieces must cover",
        ),
        ("v2-piece-rows", _raw({**f32, "format": "2.0", "pieces": [[0, 2, "0" * 64]]}, [good]), "piece 0"),
        (
            "v2-piece-hash",
            _raw({**f32, "format": "2.0", "pieces": [[0, 1, "0" * 64]]}, [good]),
            "piece 0 of 1",
        ),
        (
            "v2-two-pieces",
            _raw(
                {**f32, "format": "2.0", "pieces": [[0, 1, "0" * 64], [1, 1, "0" * 64]]},
                [good, ("model.y", *good[1:])],
            ),
            "2 pieces",
        ),
        ("v2-upgraded-bad", _raw({**f32, "format": "2.0", "upgraded_from": "xyz"}, [good]), "upgraded_from"),
        (
            "v2-ok",
            _raw({**f32, "format": "2.3", "upgraded_from": "cd" * 32, "future_key": [1]}, [good]),
            None,
        ),
        ("no-format", _raw({**f32, "format": "x"}, [good]), "format version"),
        ("dtype", _raw({**f32, "dtype": "float64"}, [good]), "dtype"),
        ("version-0", _raw({**f32, "version": 0}, [good]), "positive integer"),
        ("scaling", _raw({**f32, "scaling": "weird"}, [good]), "scaling"),
        (
            "metadata-bomb",
            _raw({**f32, "description": "x" * (cardmod.MAX_HEADER_BYTES + 10)}, [good]),
            "too large",
        ),
        ("header-not-json", _raw_meta(b"{not json"), "not valid UTF-8 JSON"),
        ("header-dup-key", _raw_meta(b'{"format":"1.0","format":"1.0"}'), "duplicate key"),
        ("header-nan", _raw_meta(b'{"format":"1.0","x":NaN}'), "not allowed"),
        ("header-deep", _raw_meta(b"[" * 100_000 + b"]" * 100_000), "header"),
        ("no-header", _no_header(), "no 'loraflight' header"),
        ("no-modules", _raw(f32, []), "no modules"),
        ("digest", _raw({**f32, "description": "z"}, [good], digest=False), "digest"),
        ("compressed", _compressed(), "compressed"),
        ("empty", b"", "not an Arrow IPC file"),
        ("random", bytes(range(256)) * 4, "not an Arrow IPC file"),
        ("newer-minor", _raw({**f32, "format": "1.9", "future_key": {"x": [1, 2]}}, [good]), None),
    ]
    return cases


def _raw_meta(meta: bytes) -> bytes:
    schema = card_schema("float32", {METADATA_KEY: meta})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema):
        pass
    return sink.getvalue().to_pybytes()


def _no_header() -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, card_schema("float32")):
        pass
    return sink.getvalue().to_pybytes()


def _compressed() -> bytes:
    card = LoRACard.build(_mods(np.random.default_rng(5), "float32", 2, 2, 64, 64), name="comp")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, card.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        for b in card.batches:
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------- mutations

_EXTREMES = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 1 << 40, 0x7FFFFFF8]


def _flip(d: bytearray, lo: int, hi: int, rng: random.Random) -> None:
    if hi <= lo:
        return
    for _ in range(rng.randint(1, 3)):
        p = rng.randrange(lo, hi)
        d[p] ^= 1 << rng.randrange(8)


def _footer_span(d: bytes) -> tuple[int, int]:
    if len(d) < 10:
        return 0, len(d)
    (flen,) = struct.unpack_from("<i", d, len(d) - 10)
    lo = max(0, len(d) - 10 - max(0, min(flen, len(d))))
    return lo, len(d)


def _header_spans(d: bytes) -> list[tuple[int, int]]:
    spans = []
    start = 0
    while True:
        i = d.find(b'{"', start)
        if i < 0:
            break
        j = d.find(b"}\x00", i)
        j = j + 1 if j > 0 else min(len(d), i + 512)
        spans.append((max(0, i - 64), min(len(d), j + 64)))
        start = j
    return spans or [(0, min(len(d), 512))]


def mutate(d0: bytes, others: list[bytes], rng: random.Random) -> tuple[str, bytes, str | None]:
    """One mutation of a valid card: (kind, bytes, required message substring or None)."""
    d = bytearray(d0)
    kind = rng.choice(
        [
            "truncate",
            "truncate",
            "flip_footer",
            "flip_header",
            "flip_any",
            "flip_tensor",
            "lie_int",
            "lie_int",
            "random",
            "splice",
            "header_field",
            "zero_run",
            "extend",
        ]
    )
    need: str | None = None
    if kind == "truncate":
        cut = rng.randrange(len(d)) if rng.random() < 0.7 else len(d) - rng.randint(1, 64)
        d = d[: max(0, cut)]
    elif kind == "flip_footer":
        _flip(d, *_footer_span(d0), rng)
    elif kind == "flip_header":
        _flip(d, *rng.choice(_header_spans(d0)), rng)
    elif kind == "flip_any":
        _flip(d, 0, len(d), rng)
    elif kind == "flip_tensor":
        card = LoRACard.from_table(pa.ipc.open_file(pa.py_buffer(d0)).read_all())
        m = rng.choice(card.modules)
        raw = (m.a if rng.random() < 0.5 else m.b).tobytes()
        pos = d0.find(raw)
        if pos >= 0:
            p = pos + rng.randrange(len(raw))
            d[p] ^= 1 << rng.randrange(8)
            need = "digest|NaN or Inf"
    elif kind == "lie_int":
        width = rng.choice([4, 8])
        lo, hi = rng.choice([_footer_span(d0), *_header_spans(d0), (0, len(d0))])
        p = rng.randrange(lo, max(lo + 1, hi - width)) & ~(width - 1)
        v = rng.choice(_EXTREMES)
        d[p : p + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    elif kind == "random":
        n = rng.randrange(0, 4096)
        body = rng.randbytes(n)
        d = bytearray(b"ARROW1\x00\x00" + body + b"ARROW1" if rng.random() < 0.5 else body)
    elif kind == "splice":
        o = rng.choice(others)
        a, b = sorted(rng.randrange(len(o)) for _ in range(2))
        p = rng.randrange(len(d))
        d[p : p + (b - a)] = o[a:b]
    elif kind == "header_field":
        # change one character of the description, in every copy of the header: digest must catch it
        if b'"description":"fuzz me"' in d0:
            d = bytearray(d0.replace(b'"description":"fuzz me"', b'"description":"fuzz mf"'))
            need = "digest"
        else:
            _flip(d, *rng.choice(_header_spans(d0)), rng)
    elif kind == "zero_run":
        p = rng.randrange(len(d))
        n = rng.randint(1, 64)
        d[p : p + n] = bytes(min(n, len(d) - p))
    elif kind == "extend":
        d += rng.randbytes(rng.randint(1, 256))
    return kind, bytes(d), need


# --------------------------------------------------------------------------- running


def _touch(arr: np.ndarray) -> int:
    return int(np.bitwise_xor.reduce(arr.reshape(-1).view(np.uint8))) if arr.size else 0


def run_case(data: bytes, path: Path) -> tuple[str, str]:
    """('ok' | 'CardError' | 'other' | 'hang', message)."""
    path.write_bytes(data)
    signal.setitimer(signal.ITIMER_REAL, CASE_DEADLINE_S)
    try:
        card = LoRACard.open(path)
        for m in card:
            _touch(m.a)
            _touch(m.b)
        card.verify()
        return "ok", ""
    except CardError as e:
        return "CardError", str(e)
    except Hang:
        return "hang", "case ran past its deadline"
    except Exception as e:
        return "other", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@dataclasses.dataclass
class Summary:
    cases: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    kinds: Counter[str] = dataclasses.field(default_factory=Counter)
    verified: Counter[str] = dataclasses.field(
        default_factory=Counter
    )  # per kind: mutations that changed nothing
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "cases": self.cases,
                "outcomes": dict(self.outcomes),
                "kinds": dict(self.kinds),
                "verified": dict(self.verified),
                "failures": self.failures[:20],
                "failed": len(self.failures),
                "seconds": round(self.seconds, 2),
            }
        )


def check_outcome(kind: str, outcome: str, msg: str, need: str | None, must_fail: bool) -> str | None:
    """None when the outcome is acceptable, else why not."""
    if outcome in ("other", "hang"):
        return msg
    if need is None and not must_fail:
        return None
    if outcome == "ok":
        return (
            None if not must_fail else f"{kind}: expected a CardError naming {need!r}, but the card verified"
        )
    if need and not any(n.lower() in msg.lower() for n in need.split("|")):
        return f"{kind}: CardError does not name the defect {need!r}: {msg}"
    return None


def run(
    cases: int, seed: int, progress: Path | None = None, tick: Callable[[int], None] | None = None
) -> Summary:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(seed)
    seeds = corpus()
    fixed = targeted()
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="lf-fuzz-", dir=base))
    prog = None
    if progress is not None:
        progress.write_bytes(b"\0" * 8)
        fd = os.open(progress, os.O_RDWR)
        prog = mmap.mmap(fd, 8)
        os.close(fd)
    s = Summary()
    t0 = time.monotonic()
    try:
        path = work / "case.lora.arrow"
        for i in range(cases):
            if prog is not None:
                prog[:8] = struct.pack("<q", i)
            if i % 25 == 0:  # every targeted case recurs, so short runs cover all of them
                label, data, need = fixed[(i // 25) % len(fixed)]
                kind, must_fail = f"targeted:{label}", need is not None
                if need is None:  # positive case: must open, verify and keep the unknown key
                    outcome, msg = run_case(data, path)
                    if outcome == "ok" and "future_key" not in LoRACard.open(path).header.extra:
                        outcome, msg = "other", "newer-minor key was not kept"
                    if outcome != "ok":
                        s.failures.append({"case": i, "kind": kind, "outcome": outcome, "why": msg})
                    s.cases += 1
                    s.outcomes[outcome] += 1
                    s.kinds[kind] += 1
                    continue
            else:
                src = rng.randrange(len(seeds))
                kind, data, need = mutate(seeds[src], seeds, rng)
                must_fail = need is not None
            outcome, msg = run_case(data, path)
            why = check_outcome(kind, outcome, msg, need, must_fail)
            s.cases += 1
            s.outcomes[outcome] += 1
            s.kinds[kind] += 1
            if outcome == "ok":
                s.verified[kind] += 1
            if why is not None:
                s.failures.append({"case": i, "kind": kind, "outcome": outcome, "why": why[:2000]})
            if tick is not None:
                tick(i)
    finally:
        s.seconds = time.monotonic() - t0
        shutil.rmtree(work, ignore_errors=True)
        if prog is not None:
            prog.close()
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", type=Path, default=None, help="file holding the current case number")
    args = ap.parse_args(argv)
    import faulthandler

    faulthandler.enable()
    s = run(args.cases, args.seed, args.progress)
    sys.stdout.write(s.to_json() + "\n")
    return 0 if not s.failures else 1


__all__ = [
    "CASE_DEADLINE_S",
    "Hang",
    "Summary",
    "check_outcome",
    "corpus",
    "main",
    "mutate",
    "run",
    "run_case",
    "targeted",
]

if __name__ == "__main__":
    sys.exit(main())
