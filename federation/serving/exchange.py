"""The Flight ``do_exchange`` fast path: ``{"op": "embed", "model": ...}``.

The client streams record batches with a ``text`` column (and optionally a per-row
``adapter`` column: a model string per row, null for the command's ``model``); the node
answers each batch, in order, with the same rows plus an ``embedding`` column
(``fixed_size_list<float32>[dim]``) and app metadata ``{"model", "digests"}`` saying what the
batch ran on. Rows go through the same `EmbedService` as the HTTP API (admission, leases,
the cross-request batcher); a batch larger than the queue is embedded in parts. Errors are
loraflight errors, which the Flight server's edge turns into ``[lf:code]`` Flight errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from loraflight.errors import ConfigError

from .service import EmbedService

EMBED_OP = "embed"
ExchangeHandler = Callable[[Any, Any, Any, Any], None]


def parse_command(raw: bytes) -> str:
    """The ``model`` of an embed command, or ConfigError saying what is wrong with it."""
    try:
        cmd = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError('do_exchange: the command must be JSON {"op": "embed", "model": "..."}') from None
    if not isinstance(cmd, dict) or cmd.get("op") != EMBED_OP:
        op = cmd.get("op") if isinstance(cmd, dict) else None
        raise ConfigError(
            f'do_exchange: unknown op {op!r}; this node answers {{"op": "{EMBED_OP}", "model": ...}}'
        )
    extra = sorted(set(cmd) - {"op", "model"})
    if extra:
        raise ConfigError(f"do_exchange: unsupported field(s) {', '.join(map(repr, extra))} in the command")
    model = cmd.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(
            'do_exchange: "model" must be a non-empty string (an adapter, the base id or "auto")'
        )
    return model


def _column(batch: pa.RecordBatch, name: str, required: bool) -> list[Any] | None:
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        if required:
            raise ConfigError(f"do_exchange: batches need a string column {name!r}")
        return None
    col = batch.column(idx)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ConfigError(f"do_exchange: column {name!r} must be strings, not {col.type}")
    values = col.to_pylist()
    if required and col.null_count:
        raise ConfigError(f"do_exchange: column {name!r} has {col.null_count} null(s); every row needs text")
    return values


def embed_batch(
    service: EmbedService, model: str, batch: pa.RecordBatch
) -> tuple[np.ndarray, str, list[str]]:
    """(rows × dim float32, the model label, the digests) for one record batch."""
    texts = _column(batch, "text", True)
    assert texts is not None
    per_row = _column(batch, "adapter", False)
    step = max(1, min(service.max_inputs, service.batcher.queue))
    parts, labels, digests = [], [], []
    for s in range(0, len(texts), step):
        out, prep = service.embed(
            model, texts[s : s + step], None if per_row is None else per_row[s : s + step]
        )
        parts.append(out)
        labels.append(prep.model_label)
        digests.extend(prep.digests)
    if not parts:
        return np.zeros((0, service.dim), np.float32), "", []
    label = ",".join(dict.fromkeys(x for lab in labels for x in lab.split(",")))
    return np.concatenate(parts), label, list(dict.fromkeys(digests))


def make_exchange_handler(service: EmbedService) -> ExchangeHandler:
    """The ``do_exchange`` handler to give `CardServer(exchange=...)`."""
    import pyarrow.flight as flight

    def handle(context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise ConfigError('do_exchange: use a command descriptor {"op": "embed", "model": ...}')
        model = parse_command(descriptor.command)
        schema = reader.schema
        if schema.get_field_index("embedding") >= 0:
            raise ConfigError("do_exchange: the input already has an 'embedding' column; drop or rename it")
        out_schema: pa.Schema | None = None
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            batch = chunk.data
            if batch is None:
                continue
            emb, label, digests = embed_batch(service, model, batch)
            dim = emb.shape[1] if emb.size else service.dim
            if out_schema is None:
                out_schema = schema.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
                writer.begin(out_schema)
            col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), dim)
            out = pa.RecordBatch.from_arrays([*batch.columns, col], schema=out_schema)
            meta = json.dumps({"model": label, "digests": digests}).encode()
            writer.write_with_metadata(out, pa.py_buffer(meta))
        if out_schema is None:  # no batch came: answer the schema alone
            writer.begin(schema.append(pa.field("embedding", pa.list_(pa.float32(), service.dim))))

    return handle


__all__ = ["EMBED_OP", "ExchangeHandler", "embed_batch", "make_exchange_handler", "parse_command"]
