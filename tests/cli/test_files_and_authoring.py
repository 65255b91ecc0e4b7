"""Files are written where asked and never overwritten without --force; authoring is reproducible
and says what it did (the real console script)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraflight.engine.authoring import builtin_dataset
from loraflight.engine.card import LoRACard
from loraflight.testing import make_card
from tests.authoring.helpers import MLP

from .helpers import run_cli

TRAIN = ("--model", "tiny", "--rank", "2", "--batch-size", "4", "--max-length", "16", "--threads", "1")


def _data(tmp_path: Path, n: int = 12) -> Path:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_dataset()[:n]))
    return data


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_train_twice_gives_the_same_bytes_and_created_is_controlled(tmp_path: Path) -> None:
    data = _data(tmp_path)
    outs = []
    for i in range(2):
        r = run_cli("train", str(data), "--name", "ops", "--out", str(tmp_path / f"run{i}/"), *TRAIN,
                    "--max-steps", "2", "--json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)  # --json: one document, no tables
        outs.append(Path(doc["path"]))
        assert outs[-1] == tmp_path / f"run{i}" / "ops-v1.lora.arrow" and doc["steps"] == 2
    assert _sha(outs[0]) == _sha(outs[1])
    r = run_cli("train", str(data), "--name", "ops", "--out", str(tmp_path / "sde"), *TRAIN, "--max-steps", "1",
                "--json", env={"SOURCE_DATE_EPOCH": "1700000000"})  # fmt: skip
    assert json.loads(r.stdout)["created"] == "2023-11-14T22:13:20Z"
    r = run_cli("train", str(data), "--name", "ops", "--out", str(tmp_path / "c"), *TRAIN, "--max-steps", "1",
                "--created", "2026-01-31T12:00:00Z", "--json", env={"SOURCE_DATE_EPOCH": "1700000000"})  # fmt: skip
    assert LoRACard.open(Path(json.loads(r.stdout)["path"])).header.created == "2026-01-31T12:00:00Z"


def test_max_steps_beyond_the_epochs_says_why_fewer_ran(tmp_path: Path) -> None:
    r = run_cli("train", str(_data(tmp_path, 8)), "--name", "ops", "--out", str(tmp_path), *TRAIN,
                "--max-steps", "10")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "step (max_steps 10 is only an upper bound" in r.stdout or "steps (max_steps 10 is only" in r.stdout
    )
    assert "raise epochs" in r.stdout
    assert "--max-steps" in run_cli("train", "--help").stdout


def test_out_folder_is_written_into_and_nothing_is_overwritten(tmp_path: Path) -> None:
    data = _data(tmp_path)
    r = run_cli(
        "train", str(data), "--name", "ops", "--out", str(tmp_path / "cards/"), *TRAIN, "--max-steps", "1"
    )
    assert r.returncode == 0, r.stderr
    card = tmp_path / "cards" / "ops-v1.lora.arrow"
    assert (tmp_path / "cards").is_dir() and card.is_file()
    before = _sha(card)
    r = run_cli(
        "train", str(data), "--name", "ops", "--out", str(tmp_path / "cards"), *TRAIN, "--max-steps", "2"
    )
    assert r.returncode == 1 and "already exists; pass --force" in r.stderr and "training ops" not in r.stdout
    assert _sha(card) == before
    r = run_cli("train", str(data), "--name", "ops", "--out", str(tmp_path / "cards"), *TRAIN, "--max-steps", "2",
                "--force")  # fmt: skip
    assert r.returncode == 0 and _sha(card) != before


def test_train_refuses_a_bad_name_before_loading_the_model(tmp_path: Path) -> None:
    r = run_cli("train", str(_data(tmp_path)), "--name", "bad name", *TRAIN)
    assert r.returncode == 1 and "bad name" in r.stderr and "Traceback" not in r.stderr
    assert "training" not in r.stdout


def test_card_files_are_not_overwritten_and_to_peft_picks_its_folder(tmp_path: Path) -> None:
    ex = tmp_path / "ex.lora.arrow"
    assert run_cli("card", "example", str(ex)).returncode == 0
    signed_before = _sha(ex)
    r = run_cli("card", "example", str(ex), "--seed", "3")
    assert r.returncode == 1 and "pass --force" in r.stderr and _sha(ex) == signed_before
    assert run_cli("card", "example", str(ex), "--seed", "3", "--force").returncode == 0
    # to-peft: a base-model folder (not empty, not an export) is refused even with --force
    model_dir = tmp_path / "base-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for extra in ((), ("--force",)):
        r = run_cli("card", "to-peft", str(ex), str(model_dir), *extra)
        assert r.returncode == 1 and "not a PEFT adapter folder" in r.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    peft_dir = tmp_path / "peft"
    r = run_cli("card", "to-peft", str(ex), str(peft_dir), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(peft_dir)
    r = run_cli("card", "to-peft", str(ex), str(peft_dir))
    assert r.returncode == 1 and "--force" in r.stderr
    assert run_cli("card", "to-peft", str(ex), str(peft_dir), "--force").returncode == 0
    # from-peft never replaces a card without --force
    back = tmp_path / "back.lora.arrow"
    r = run_cli("card", "from-peft", str(peft_dir), str(back), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(back)
    r = run_cli("card", "from-peft", str(peft_dir), str(back))
    assert r.returncode == 1 and "already exists" in r.stderr


def test_extract_hint_names_the_flag_and_compose_refuses_mixed_bases(tmp_path: Path) -> None:
    base, tuned = MLP(), MLP()
    with torch.no_grad():
        tuned.lin0.weight += 0.1
        tuned.lin0.bias += 0.1  # a changed non-Linear parameter
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_file(tuned.state_dict(), str(tmp_path / "tuned.safetensors"))
    args = ("extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--name", "d",
            "--rank", "1", "--out", str(tmp_path))  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 1 and "--allow-other-changes" in r.stderr
    r = run_cli(*args, "--allow-other-changes", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["name"] == "d" and Path(doc["path"]).is_file()

    a = make_card("a", 1, base_model="sentence-transformers/all-MiniLM-L6-v2")
    b = make_card("b", 1, base_model=None)
    for c in (a, b):
        c.write(tmp_path / f"{c.header.name}.lora.arrow")
    r = run_cli("compose", str(tmp_path / "a.lora.arrow"), str(tmp_path / "b.lora.arrow"), "--name", "ab",
                "--out", str(tmp_path / "ab.lora.arrow"))  # fmt: skip
    assert r.returncode == 1 and "different base models" in r.stderr and "b@1: no base model" in r.stderr
    r = run_cli("compose", str(tmp_path / "a.lora.arrow"), "--weight", "0.5", "--name", "half", "--out",
                str(tmp_path / "out/"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(tmp_path / "out" / "half-v1.lora.arrow")


def test_route_takes_the_output_of_ls_json(tmp_path: Path) -> None:
    header = {**make_card("sql-helper", 2).header.to_dict(), "description": "database joins and indexes"}
    ls_json = [{"name": "sql-helper", "version": 2, "digest": header["digest"], "locations": ["grpc://10.0.0.9:8815"],
                "header": header}]  # fmt: skip
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps(ls_json))
    r = run_cli("route", "how do I index a join", "--catalog", str(cat), "--embedder", "hashing", "--json")
    assert r.returncode == 0, r.stderr
    (route,) = json.loads(r.stdout)
    assert route["name"] == "sql-helper" and route["location"] == "grpc://10.0.0.9:8815"


def test_check_config_json(tmp_path: Path) -> None:
    good = tmp_path / "n.toml"
    good.write_text('fleet = "prod"\n')
    r = run_cli("node", "check-config", str(good), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "file": str(good),
        "ok": True,
        "fleet": "prod",
        "listen": "grpc://0.0.0.0:8815",
    }
    bad = tmp_path / "bad.toml"
    bad.write_text('fleet = ""\n')
    r = run_cli("node", "check-config", str(bad), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and any("fleet" in p for p in doc["problems"])
