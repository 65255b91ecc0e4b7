"""`loraflight train | extract | compose | route` end to end on tiny models (real files, real keys)."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

from loraflight.engine import keys
from loraflight.engine.authoring import builtin_dataset, delta_weights
from loraflight.engine.card import LoRACard
from loraflight.federation.cli import main

from .helpers import MLP


def test_train_cli_writes_a_signed_card(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_dataset()[:20]))
    keys.write_keypair(tmp_path / "k")
    out = tmp_path / "cards"
    out.mkdir()
    rc = main(
        [
            "train", str(data), "--name", "ops", "--out", str(out), "--model", "tiny", "--rank", "2",
            "--max-steps", "3", "--batch-size", "4", "--max-length", "16", "--description", "alerts to runbooks",
            "--key", str(tmp_path / "k" / "loraflight.key"), "--threads", "2",
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "held-out margin" in text and "trainable" in text and "margin *" in text
    card = LoRACard.open(out / "ops-v1.lora.arrow")
    assert card.verify(trusted=[keys.public_b64_from_file(tmp_path / "k" / "loraflight.pub")]).signed
    assert (
        card.header.description == "alerts to runbooks"
        and card.header.base_model == "loraflight/tiny-encoder"
    )


def test_train_cli_reports_every_bad_line_and_config_problem(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"anchor": "a"}\nnot json\n')
    assert main(["train", str(data), "--name", "x", "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "line 1: missing field 'positive'" in err
        and "line 2: malformed JSON" in err
    )
    assert main(["train", str(data), "--name", "x", "--rank", "0", "--lr", "5"]) == 1
    err = capsys.readouterr().err
    assert "rank must be" in err and "learning_rate must be" in err


def test_extract_compose_route_cli(tmp_path, capsys):
    base, tuned = MLP(), MLP()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        tuned.lin0.weight += (
            torch.from_numpy(rng.standard_normal((24, 2)) @ rng.standard_normal((2, 12))).float() * 0.1
        )
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_file(tuned.state_dict(), str(tmp_path / "tuned.safetensors"))
    a = tmp_path / "a.lora.arrow"
    rc = main(
        ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--name", "delta",
         "--energy", "0.9999", "--out", str(a), "--description", "database joins and indexes"]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "lin0" in text and "unchanged" in text
    ca = LoRACard.open(a)
    assert ca["lin0"].rank == 2

    half = tmp_path / "half.lora.arrow"
    assert (
        main(
            [
                "compose",
                str(a),
                "--weight",
                "0.5",
                "--name",
                "half",
                "--out",
                str(half),
                "--description",
                "poems and lyrics",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(
        delta_weights(LoRACard.open(half))["lin0"], 0.5 * delta_weights(ca)["lin0"], rtol=1e-6, atol=1e-9
    )
    child = tmp_path / "child.lora.arrow"
    assert main(["compose", str(half), "--child-of", str(a), "--name", "kid", "--out", str(child)]) == 0
    assert LoRACard.open(child).header.lineage == (ca.digest,)
    capsys.readouterr()

    catalog = tmp_path / "peer.json"
    peer_card = LoRACard.open(half).header.to_dict() | {
        "name": "remote-chef",
        "description": "cooking recipes and meals",
    }
    catalog.write_text(json.dumps([peer_card]))
    rc = main(
        ["route", "recipes for meals", str(a), str(half), "--catalog", str(catalog), "--peer", "grpc://peer:1",
         "--embedder", "hashing", "--json", "--threshold", "0"]
    )  # fmt: skip
    routes = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (
        routes[0]["name"] == "remote-chef"
        and routes[0]["local"] is False
        and routes[0]["location"] == "grpc://peer:1"
    )
    assert main(["route", "anything", "--embedder", "nope"]) == 1


def test_train_cli_completion_from_config_file(tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"n{i}:", "completion": " ok"}) + "\n" for i in range(8)))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"kind": "completion", "rank": 2, "max_steps": 2, "batch_size": 4}))
    out = tmp_path / "lm.lora.arrow"
    rc = main(
        ["train", str(data), "--name", "lm", "--config", str(cfg), "--model", "tiny-llama", "--out", str(out)]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "held-out loss" in text
    card = LoRACard.open(out)
    assert (
        card.header.extra["training"]["kind"] == "completion" and card.header.extra["training"]["steps"] == 2
    )


def test_train_cli_bad_out_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(
        [
            "train", "builtin:ops-runbook", "--name", "ops", "--out", str(tmp_path / "file" / "ops.lora.arrow"),
            "--model", "tiny", "--max-steps", "1", "--max-length", "16",
        ]
    )  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 1 and "cannot create the folder" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert "training ops" not in cap.out  # refused before the model was even loaded
