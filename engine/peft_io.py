"""Hugging Face PEFT adapter folders <-> cards, exactly (imports no torch).

A PEFT LoRA folder is `adapter_config.json` plus `adapter_model.safetensors` with tensors
named `base_model.model.<module>.lora_A.weight` (rank, in_features) and
`...lora_B.weight` (out_features, rank). The safetensors file is parsed and written here
directly (it is an 8-byte length, a JSON header and raw little-endian bytes), so bfloat16
needs no torch: its 16-bit words go into the card untouched.

What a card cannot represent is refused with the config key or tensor named, never dropped:
DoRA, `modules_to_save`, trained biases, embedding or convolution LoRA, and any config key
this module does not understand that is set to a non-default value.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loraflight.errors import CardError
from loraflight.files import atomic_write, replace

from .card import (
    MAX_MODULE_LEN,
    MAX_NAME_LEN,
    CardMeta,
    LoRACard,
    ModuleLoRA,
    base_fingerprint,
    canonical_json,
)
from .peft_match import PatternError, compile_pattern, is_plain_path, peft_key_pattern, suffix_matches

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
MAX_ST_HEADER = 100_000_000
# Regex patterns (keys that are not plain module paths) a config may hold in all: each is run
# by the linear-time matcher against every module path, so their total bounds the work.
MAX_PATTERN_CHARS = 1024  # the safetensors format's own limit on its JSON header

_ST_DTYPES: dict[str, tuple[str, np.dtype[Any]]] = {
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2")),
}
_CARD_TO_ST = {card: st for st, (card, _) in _ST_DTYPES.items()}
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight\Z")

# adapter_config.json keys that are handled here or do not change what the adapter computes.
_HANDLED_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "lora_dropout",  # training only
        "init_lora_weights",  # checked below: some initialisations rewrite base weights
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "peft_version",
        "megatron_core",  # a module path, only used together with megatron_config
        "qalora_group_size",  # only used together with use_qalora
        "ensure_weight_tying",
        "bias",  # checked below
        "use_dora",  # checked below
        "modules_to_save",  # checked below
    }
)
# Keys whose non-default value a card cannot represent, with the reason given to the user.
_REFUSED_KEYS = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector per module; a card holds plain LoRA only",
    "modules_to_save": "modules_to_save trains whole modules besides LoRA; a card holds LoRA A/B only",
    "lora_bias": "lora_bias trains a bias on lora_B; a card holds no biases",
    "fan_in_fan_out": "fan_in_fan_out marks Conv1D (GPT-2 style) targets; a card targets nn.Linear",
    "layer_replication": "layer_replication changes the base model's layers",
    "trainable_token_indices": "trainable_token_indices trains embedding rows; a card holds LoRA A/B only",
    "target_parameters": "target_parameters adapts raw parameters, not nn.Linear modules",
    "use_qalora": "QA-LoRA (use_qalora) pools inputs; a card holds plain LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) changes when the adapter applies",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters; a card holds one",
    "megatron_config": "megatron_config targets Megatron parallel layers, not nn.Linear",
}
# init_lora_weights values that rewrite the base model's weights when the adapter is created.
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


# --------------------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, tuple[str, np.ndarray]]:
    """{key: (safetensors dtype, array)} from a safetensors file, bf16 as uint16 words (copies)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CardError(f"{p}: not a safetensors file (shorter than 8 bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CardError(f"{p}: no such file") from None
    except OSError as e:
        raise CardError(f"{p}: cannot read: {e.strerror}") from None
    try:
        (n,) = struct.unpack_from("<Q", mm, 0)
        if n > MAX_ST_HEADER or 8 + n > size:
            raise CardError(f"{p}: safetensors header length {n} is larger than the file or the format limit")
        try:
            header = json.loads(bytes(mm[8 : 8 + n]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CardError(f"{p}: safetensors header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise CardError(f"{p}: safetensors header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        out: dict[str, tuple[str, np.ndarray]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info, dict):
                raise CardError(f"{p}: tensor {key!r} has no description")
            st_dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if st_dtype not in _ST_DTYPES:
                raise CardError(
                    f"{p}: tensor {key!r} has dtype {st_dtype!r}; a card holds F32, F16 or BF16 "
                    "(convert the adapter to one of them first)"
                )
            if (
                not isinstance(shape, list)
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**40 for x in shape)
                or not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in offs)
            ):
                raise CardError(f"{p}: tensor {key!r} has a malformed shape or data_offsets")
            npdt = _ST_DTYPES[st_dtype][1]
            begin, end = offs
            count = math.prod(shape)
            if not 0 <= begin <= end <= data_len or end - begin != count * npdt.itemsize:
                raise CardError(
                    f"{p}: tensor {key!r} of shape {shape} ({st_dtype}) does not fit its byte range "
                    f"{begin}..{end} of {data_len} data bytes"
                )
            arr = np.frombuffer(mm, dtype=npdt, count=count, offset=data_start + begin).reshape(shape).copy()
            out[key] = (st_dtype, arr)
        return out
    finally:
        mm.close()


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write {key: (safetensors dtype, array)} as a safetensors file, atomically."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    order = sorted(tensors)
    for key in order:
        st_dtype, arr = tensors[key]
        nbytes = arr.size * _ST_DTYPES[st_dtype][1].itemsize
        header[key] = {"dtype": st_dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned

    def body(f: Any) -> None:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key in order:
            st_dtype, arr = tensors[key]
            f.write(np.ascontiguousarray(arr, dtype=_ST_DTYPES[st_dtype][1]).tobytes())

    return atomic_write(path, body)


# --------------------------------------------------------------------------- config rules


def _key_matcher(key: str) -> Callable[[str], bool]:
    """How PEFT's `(.*\\.)?(key)$` rule applies `key`: a suffix test for a plain dotted path,
    else the linear-time matcher (PatternError for what it does not support)."""
    if is_plain_path(key):
        return lambda path: suffix_matches(path, key)
    return peft_key_pattern(key).fullmatch


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching the key's end.

    No regex is compiled from the keys (see loraflight.engine.peft_match); a key outside the
    supported subset raises PatternError.
    """
    for key in pattern_keys:
        if _key_matcher(key)(key_to_match):
            return key
    return key_to_match


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module` under `config` (rank_pattern / alpha_pattern)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern, module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
    return int(r), float(alpha)


def _pattern_refusal(where: str, key: str, e: PatternError) -> CardError:
    if e.invalid:
        return CardError(f"adapter_config.json {where} key {key!r} is not a valid pattern: {e.why}")
    return CardError(
        f"adapter_config.json {where} key {key!r} uses {e.why}, which loraflight does not evaluate "
        "(it matches plain module paths as suffixes and a linear-time regex subset: . [] () | * + ? "
        "{m,n} ^ $); replace the key with the module path(s) it means"
    )


def check_patterns(config: Mapping[str, Any]) -> None:
    """Every pattern in `config` parses within the supported subset and limits (CardError naming it)."""
    total = 0
    for where in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(where) or {}
        if not isinstance(pattern, dict):
            raise CardError(f"adapter_config.json {where} must be an object")
        for k in pattern:
            if is_plain_path(k):
                continue
            total += len(k)
            try:
                peft_key_pattern(k)
            except PatternError as e:
                raise _pattern_refusal(where, k, e) from None
    t = config.get("target_modules")
    if isinstance(t, str) and t != "all-linear":
        total += len(t)
        try:
            compile_pattern(t)
        except PatternError as e:
            raise _pattern_refusal("target_modules", t, e) from None
    if total > MAX_PATTERN_CHARS:
        raise CardError(
            f"adapter_config.json holds {total} characters of regex patterns (more than {MAX_PATTERN_CHARS}); "
            "list the module paths instead"
        )


def _truthy(v: Any) -> bool:
    return v not in (None, False, "", [], {}, 0)


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse, naming the key, what a card cannot represent exactly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise CardError(f"adapter is peft_type={config.get('peft_type')!r}; a card holds LoRA adapters only")
    for key, why in _REFUSED_KEYS.items():
        if _truthy(config.get(key)):
            raise CardError(f"cannot convert: {key}={config.get(key)!r}: {why}")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise CardError(f"cannot convert: bias={bias!r} trains biases; a card holds LoRA A/B only")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CardError(
            f"cannot convert: init_lora_weights={init!r} rewrites the base model's weights when the adapter "
            "loads; convert it to plain LoRA first (PEFT save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    unknown = sorted(k for k in config if k not in _HANDLED_KEYS and k not in _REFUSED_KEYS)
    for k in unknown:
        if _truthy(config[k]):
            raise CardError(
                f"cannot convert: adapter_config.json sets {k}={config[k]!r}, which this loraflight does not "
                "understand; refusing rather than dropping it"
            )
    _check_number("r", config.get("r", 8), rank=True)
    _check_number("lora_alpha", config.get("lora_alpha", 8), rank=False)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise CardError(f"adapter_config.json {key} must be an object")
        for k, v in pattern.items():
            _check_number(f"{key}[{k!r}]", v, rank=key == "rank_pattern")
    check_patterns(config)


def _check_number(what: str, v: Any, *, rank: bool) -> None:
    """A rank must be a positive whole number, an alpha a finite number (CardError otherwise)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise CardError(f"adapter_config.json {what}={v!r} is not a number")
    if rank and (v < 1 or not float(v).is_integer()):
        raise CardError(f"adapter_config.json {what}={v!r} is not a positive whole number (a LoRA rank)")


_REFUSAL_ORDER = ("lora_magnitude_vector", "lora_embedding_", "modules_to_save", ".bias")


def _refusal_rank(key: str) -> tuple[int, str]:
    return next((i for i, s in enumerate(_REFUSAL_ORDER) if s in key), len(_REFUSAL_ORDER)), key


def _refuse_tensor(key: str) -> CardError:
    if "lora_magnitude_vector" in key:
        return CardError(f"cannot convert: tensor {key!r} is a DoRA magnitude vector (use_dora); refused")
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        return CardError(f"cannot convert: tensor {key!r} is an embedding LoRA (non-Linear target); refused")
    if key.endswith(".bias"):
        return CardError(f"cannot convert: tensor {key!r} is a trained bias; a card holds no biases")
    if "modules_to_save" in key:
        return CardError(f"cannot convert: tensor {key!r} belongs to modules_to_save; refused")
    return CardError(
        f"cannot convert: tensor {key!r} is not a LoRA A/B weight of a Linear module "
        f"({KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight); refused rather than dropped"
    )


# --------------------------------------------------------------------------- import


def sanitize_name(raw: str) -> str:
    """A safe card name from a folder name: other characters become '-'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
    s = re.sub(r"\.{2,}", ".", s).strip("._-")[:MAX_NAME_LEN].rstrip("._-")
    return s or "adapter"


def _load_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CardError(f"{path}: no such file: a PEFT adapter folder has {CONFIG_NAME}") from None
    except OSError as e:
        raise CardError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise CardError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CardError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CardError(f"{path} is not a JSON object")
    return cfg


def from_peft(
    directory: str | os.PathLike[str],
    *,
    meta: CardMeta | None = None,
    name: str | None = None,
    created: str | None = None,
    lineage: Iterable[str] = (),
) -> LoRACard:
    """Import a PEFT LoRA adapter folder as a card (exactly, or not at all).

    `meta` names and describes the card (``name=`` alone is shorthand for ``CardMeta(name)``;
    neither: the folder's name, sanitised); without a base model in `meta`, the one in
    adapter_config.json is recorded.
    """
    d = Path(directory)
    if meta is None and name is None:
        meta = CardMeta(sanitize_name(d.resolve().name))
    meta = CardMeta.given(meta, name)
    if not d.is_dir():
        raise CardError(f"{d} is not a directory (expected a PEFT adapter folder)")
    cfg = _load_config(d / CONFIG_NAME)
    check_config(cfg)
    weights = d / WEIGHTS_NAME
    if not weights.exists():
        if (d / "adapter_model.bin").exists():
            raise CardError(
                f"{d} holds adapter_model.bin (pickle), which loraflight never loads; "
                "re-save the adapter with safe_serialization=True"
            )
        raise CardError(f"{d}: no {WEIGHTS_NAME}")
    tensors = read_safetensors(weights)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    dtypes: set[str] = set()
    bad = [key for key in tensors if _KEY_RE.match(key) is None]
    if bad:
        # The most telling key first (a DoRA vector says more than the base weights saved beside it).
        raise _refuse_tensor(min(bad, key=_refusal_rank))
    for key, (st_dtype, arr) in tensors.items():
        m = _KEY_RE.match(key)
        assert m is not None
        if arr.ndim != 2:
            raise CardError(
                f"cannot convert: tensor {key!r} has shape {list(arr.shape)}: a convolution LoRA "
                "(non-Linear target); a card holds nn.Linear LoRA only"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = arr
        dtypes.add(st_dtype)
    if not pairs:
        raise CardError(f"{weights} holds no LoRA tensors")
    if len(dtypes) != 1:
        raise CardError(f"{weights} mixes dtypes {sorted(dtypes)}; a card holds one dtype")
    card_dtype = _ST_DTYPES[dtypes.pop()][0]
    rslora = bool(cfg.get("use_rslora", False))
    modules = []
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CardError(f"{weights}: module {module!r} has no {missing} tensor")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise CardError(
                f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on rank"
            )
        if len(module) > MAX_MODULE_LEN:
            raise CardError(
                f"{weights}: module path {module[:60]!r}... is longer than {MAX_MODULE_LEN} characters"
            )
        # The rank is the tensors' (rank_pattern is only checked against it); alpha is the config's.
        r = int(a.shape[0])
        cfg_r, alpha = module_rank_alpha(cfg, module)
        if cfg_r != r:
            raise CardError(
                f"module {module!r}: tensors have rank {r} but adapter_config.json gives r={cfg_r} "
                "(r / rank_pattern); the folder is inconsistent"
            )
        modules.append(ModuleLoRA(module, r, alpha, a, b))
    peft_cfg = {k: v for k, v in cfg.items() if k != "base_model_name_or_path"}
    shapes = [(m.module, m.in_features, m.out_features) for m in modules]
    card = LoRACard.build(
        modules,
        **{**meta.as_kwargs(), "base_model": meta.base_model or cfg.get("base_model_name_or_path") or None},
        dtype=card_dtype,
        base_fingerprint=base_fingerprint(shapes),
        scaling="rslora" if rslora else "standard",
        created=created,
        lineage=lineage,
        peft=peft_cfg,
    )
    card.check_values()
    return card


# --------------------------------------------------------------------------- export


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Iterable[float]) -> float:
    counts = Counter(values)
    return min(counts, key=lambda k: (-counts[k], k))


def _explicit_pattern(card: LoRACard, value: Callable[[ModuleLoRA], int | float]) -> dict[str, int | float]:
    """{module path: value} for every module, most specific path first.

    PEFT takes the first key whose regex matches the end of a module's path, so a module's own
    full path must come before any shorter path that is a dotted suffix of it; and every module
    is listed, so none falls through to a suffix key meant for another.
    """
    order = sorted(card, key=lambda m: (-m.module.count("."), -len(m.module), m.module))
    return {m.module: value(m) for m in order}


def peft_config_for(card: LoRACard) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT build exactly this card's modules.

    Always generated from the card's modules, never copied from the stored `peft` header (its
    patterns came from whoever made the card): `target_modules` lists every module path,
    `rank_pattern` / `alpha_pattern` give every module its rank and alpha under its plain path.
    """
    stored = card.header.peft or {}
    r = int(_most_common(m.rank for m in card))
    alpha = _most_common(m.alpha for m in card)
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": _num(alpha),
        "rank_pattern": _explicit_pattern(card, lambda m: m.rank),
        "alpha_pattern": _explicit_pattern(card, lambda m: _num(m.alpha)),
        "target_modules": sorted(m.module for m in card),
        "use_rslora": card.header.scaling == "rslora",
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    task = stored.get("task_type")
    if isinstance(task, str) and 0 < len(task) <= 40 and all(c.isupper() or c == "_" for c in task):
        cfg["task_type"] = task  # which PeftModel class loads it; no effect on the tensors
    cfg["base_model_name_or_path"] = card.header.base_model
    return cfg


def _config_text(cfg: Mapping[str, Any]) -> str:
    """adapter_config.json text: top-level keys sorted, pattern keys in their (significant) order."""
    plain = json.loads(canonical_json(dict(cfg)))
    for k in ("rank_pattern", "alpha_pattern"):
        if isinstance(cfg.get(k), dict):
            plain[k] = dict(cfg[k])
    return json.dumps({k: plain[k] for k in sorted(plain)}, indent=2, ensure_ascii=False) + "\n"


def to_peft(
    card: LoRACard, directory: str | os.PathLike[str], *, verify: bool = True, base_model: str | None = None
) -> Path:
    """Write `card` as a PEFT adapter folder that `PeftModel.from_pretrained` loads to the same tensors.

    The card is verified first (values, digest, signature if signed) unless `verify=False`.
    `base_model` (when given) is written as ``base_model_name_or_path`` instead of the card's.
    Each file is written to a temporary name and renamed; returns the folder.
    """
    if verify:
        card.verify()
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CardError(f"{d} exists and is not a directory")
    st_dtype = _CARD_TO_ST[card.dtype]
    tensors = {}
    for m in card:
        tensors[f"{KEY_PREFIX}{m.module}.lora_A.weight"] = (st_dtype, m.a)
        tensors[f"{KEY_PREFIX}{m.module}.lora_B.weight"] = (st_dtype, m.b)
    cfg = peft_config_for(card)
    if base_model:
        cfg["base_model_name_or_path"] = base_model
    text = _config_text(cfg)
    if d.exists():  # each file replaced atomically
        write_safetensors(d / WEIGHTS_NAME, tensors, {"format": "pt"})
        atomic_write(d / CONFIG_NAME, text.encode())
        return d
    # a new folder appears whole or not at all: built beside it, then renamed into place
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-peft-", dir=d.parent))
    try:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
        atomic_write(tmp / CONFIG_NAME, text.encode())
        os.chmod(tmp, 0o755)
        replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


__all__ = [
    "CONFIG_NAME",
    "MAX_PATTERN_CHARS",
    "WEIGHTS_NAME",
    "check_config",
    "check_patterns",
    "from_peft",
    "get_pattern_key",
    "module_rank_alpha",
    "peft_config_for",
    "read_safetensors",
    "sanitize_name",
    "to_peft",
    "write_safetensors",
]
