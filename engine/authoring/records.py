"""Training records: read and validate a JSONL dataset, split it for held-out evaluation (no torch).

`load_dataset` reports every bad line together; `parse_jsonl` is the JSONL reader (also used
for the built-in datasets); `split_records` is the seeded train/held-out split.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from loraflight.errors import TrainingError

from .config import KINDS, problems_error

MAX_RECORDS = 1_000_000
MAX_LINE_BYTES = 1 << 20


FIELDS = {"pairs": ({"anchor", "positive"}, {"negative"}), "completion": ({"prompt", "completion"}, set())}


def load_dataset(
    path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]], kind: str = "pairs"
) -> list[dict[str, str]]:
    """Read and validate a JSONL file (or an iterable of dicts): every bad line is reported together.

    pairs: {"anchor": str, "positive": str, "negative"?: str}; completion: {"prompt": str, "completion": str}.
    Blank lines are skipped. Raises TrainingError naming each problem with its line number.
    """
    if kind not in KINDS:
        raise TrainingError(f"dataset kind {kind!r} is not one of {', '.join(KINDS)}")
    problems: list[str] = []
    out: list[dict[str, str]] = []
    if isinstance(path_or_records, str | os.PathLike):
        path = Path(path_or_records)
        source = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TrainingError(f"{path}: no such dataset file") from None
        except OSError as e:
            raise TrainingError(f"{path}: cannot read the dataset: {e}") from None
        items: Iterator[tuple[str, Any]] = parse_jsonl(data, problems)
    else:
        source = "records"
        items = ((f"record {i}", r) for i, r in enumerate(path_or_records, 1))
    required, optional = FIELDS[kind]
    count = 0
    for where, rec in items:
        count += 1
        if count > MAX_RECORDS:
            problems.append(f"more than {MAX_RECORDS} records; split the dataset")
            break
        if not isinstance(rec, Mapping):
            problems.append(
                f"{where}: expected a JSON object with {', '.join(sorted(required))}, got {type(rec).__name__}"
            )
            continue
        bad = False
        missing = sorted(required - set(rec))
        if missing:
            problems.append(
                f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
            )
            bad = True
        unknown = sorted(set(map(str, rec)) - required - optional)
        if unknown:
            allowed = ", ".join(sorted(required | optional))
            problems.append(
                f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (a {kind} record has {allowed})"
            )
            bad = True
        for k in sorted((required | optional) & set(rec)):
            v = rec[k]
            if not isinstance(v, str):
                problems.append(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
                bad = True
            elif not v.strip():
                problems.append(f"{where}: field {k!r} is empty")
                bad = True
        if not bad:
            out.append({k: rec[k] for k in (required | optional) if k in rec})
    if not problems and not out:
        raise TrainingError(f"{source}: the dataset is empty: expected one JSON object per line")
    if problems:
        raise problems_error(f"{source}: bad training data", problems)
    return out


def parse_jsonl(data: bytes, problems: list[str]) -> Iterator[tuple[str, Any]]:
    """(where, value) per non-blank JSONL line; a bad line is appended to `problems` and skipped."""
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        if len(line) > MAX_LINE_BYTES:
            problems.append(f"{where}: longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{where}: not valid UTF-8")
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            problems.append(f"{where}: malformed JSON ({msg})")


def split_records(
    records: Sequence[Mapping[str, str]], eval_fraction: float, seed: int, kind: str = "pairs"
) -> tuple[list[Any], list[Any]]:
    """(train, held_out), a seeded shuffle; both sides large enough for `kind`."""
    need = 2 if kind == "pairs" else 1
    n = len(records)
    if n < 2 * need:
        raise TrainingError(
            f"{n} record(s) is too few: need at least {2 * need} to hold out an evaluation split "
            f"({'pairs need 2 per side for negatives' if kind == 'pairs' else '1 per side'})"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(need, round(n * eval_fraction)), n - need)
    held = [records[i] for i in order[:n_eval]]
    train = [records[i] for i in order[n_eval:]]
    return train, held


EPOCH_0 = "1970-01-01T00:00:00Z"


def creation_time(
    created: str | None = None,
    data: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The `created` header of a card made from `data`, so the same inputs give the same card bytes.

    `created` (ISO 8601 UTC, ``YYYY-MM-DDTHH:MM:SSZ``) when given; else ``SOURCE_DATE_EPOCH``
    (seconds, the reproducible-builds convention); else the data file's modification time; else
    (data in memory) the Unix epoch.
    """
    import datetime as dt

    def iso(seconds: float) -> str:
        return dt.datetime.fromtimestamp(int(seconds), dt.UTC).isoformat().replace("+00:00", "Z")

    if created is not None:
        try:
            when = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise TrainingError(
                f"created {created!r} is not an ISO 8601 UTC time like 2026-01-31T12:00:00Z"
            ) from None
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")
    sde = (os.environ if env is None else env).get("SOURCE_DATE_EPOCH")
    if sde:
        if not sde.strip().isdigit():
            raise TrainingError(f"SOURCE_DATE_EPOCH={sde!r} is not a whole number of seconds")
        return iso(int(sde))
    if data is not None and Path(data).is_file():
        return iso(Path(data).stat().st_mtime)
    return EPOCH_0


__all__ = [
    "EPOCH_0",
    "FIELDS",
    "MAX_LINE_BYTES",
    "MAX_RECORDS",
    "creation_time",
    "load_dataset",
    "parse_jsonl",
    "split_records",
]
