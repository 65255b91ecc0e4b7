"""The `.lora.arrow` card: an Arrow IPC file holding one LoRA adapter.

A card is an uncompressed Arrow IPC *file* with one row per adapted module and these
columns (docs/format.md has the byte-exact definition):

    module: utf8, rank: int32, alpha: float64, in_features: int64,
    out_features: int64, lora_a: list<T>, lora_b: list<T>

where T is float32, float16 or uint16 (the raw words of bfloat16; the header records the
dtype). The header is canonical JSON in the schema metadata under the key ``loraflight``.

The package, by concern (the format core imports no torch):

- `header`: constants, limits, names, `CardHeader`, `CardMeta`, canonical JSON, `lora_scale`
- `batches`: `ModuleLoRA`, a record batch's structural checks, building batches
- `values`: storage dtypes and the finite-value check
- `digest`: format 1's digest stream, `CardDigest`, `compute_digest`, the threaded `DigestJob`
- `pieces`: format 2's BLAKE3 pieces, `verify_piece`, `header_digest`, the threaded `PieceJob`
- `signing`: `sign_header`, `verify_signature` (the one signature rule)
- `ipc`: the FlatBuffers pre-check, the file mapping, preadv
- `card`: `LoRACard` and `Verification`
- `torch`: the torch adapter (imported only by whoever needs torch)
"""

from __future__ import annotations

from .batches import BATCH_TARGET_BYTES, ModuleLoRA
from .card import LoRACard, Verification, check_digest_matches, open_card
from .digest import CardDigest, DigestJob, compute_digest
from .header import (
    CARD_SUFFIX,
    DTYPES,
    FORMAT1_VERSION,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    FORMAT_VERSION,
    MAX_DESCRIPTION,
    MAX_FEATURES,
    MAX_HEADER_BYTES,
    MAX_LINEAGE,
    MAX_MODULE_LEN,
    MAX_NAME_LEN,
    MAX_PIECES,
    MAX_RANK,
    MAX_ROWS,
    MAX_TAG_LEN,
    MAX_TAGS,
    METADATA_KEY,
    READ_MAJORS,
    SCALINGS,
    CardHeader,
    CardMeta,
    alpha_for_scale,
    base_fingerprint,
    canonical_json,
    card_schema,
    check_digest,
    check_module_name,
    check_name,
    lora_scale,
    upgrade_pair,
)
from .pieces import PieceJob, header_digest, piece_hash, verify_piece
from .signing import check_signature, sign_header, verify_signature

__all__ = [
    "BATCH_TARGET_BYTES",
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
    "CardDigest",
    "CardHeader",
    "CardMeta",
    "DigestJob",
    "LoRACard",
    "ModuleLoRA",
    "PieceJob",
    "Verification",
    "alpha_for_scale",
    "base_fingerprint",
    "canonical_json",
    "card_schema",
    "check_digest",
    "check_digest_matches",
    "check_module_name",
    "check_name",
    "check_signature",
    "compute_digest",
    "header_digest",
    "lora_scale",
    "open_card",
    "piece_hash",
    "sign_header",
    "upgrade_pair",
    "verify_piece",
    "verify_signature",
]
