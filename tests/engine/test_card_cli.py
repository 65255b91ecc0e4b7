"""`loraflight card ...` and `keys new` through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loraflight.engine.card import LoRACard
from loraflight.federation.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "ex.lora.arrow"
    rc, out, _ = _run(capsys, "card", "example", path)
    assert rc == 0 and "example@1" in out
    return path


def test_example_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for dtype in ("float32", "float16", "bfloat16"):
        p1, p2 = tmp_path / f"1-{dtype}.lora.arrow", tmp_path / f"2-{dtype}.lora.arrow"
        assert _run(capsys, "card", "example", p1, "--dtype", dtype)[0] == 0
        assert _run(capsys, "card", "example", p2, "--dtype", dtype)[0] == 0
        assert p1.read_bytes() == p2.read_bytes()
        card = LoRACard.open(p1)
        assert card.dtype == dtype and len(card) == 4
        card.verify()


def test_inspect_text_and_json(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "card", "inspect", example)
    assert rc == 0
    card = LoRACard.open(example)
    assert card.digest in out and "unsigned" in out
    assert "model.layers.1.self_attn.v_proj" in out and "base fingerprint" in out
    rc, out, _ = _run(capsys, "card", "inspect", example, "--json")
    doc = json.loads(out)
    assert doc["header"]["digest"] == card.digest and doc["verified"] is True
    assert [m["module"] for m in doc["modules"]] == [m.module for m in card]
    assert doc["tensor_bytes"] == card.tensor_nbytes


def test_verify_unsigned_signed_wrong_key(
    tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = _run(capsys, "card", "verify", example)
    assert rc == 0 and "unsigned" in out
    rc, _, err = _run(capsys, "card", "verify", example, "--require-signed")
    assert rc == 1 and "unsigned" in err and err.count("\n") == 1

    assert _run(capsys, "keys", "new", tmp_path / "k1")[0] == 0
    assert _run(capsys, "keys", "new", tmp_path / "k2")[0] == 0
    rc, _, err = _run(capsys, "keys", "new", tmp_path / "k1")
    assert rc == 1 and "refusing to overwrite" in err
    rc, _, err = _run(capsys, "card", "verify", example, "--key", tmp_path / "k1" / "loraflight.pub")
    assert rc == 1 and "unsigned" in err

    signed = tmp_path / "signed.lora.arrow"
    rc, out, _ = _run(
        capsys, "card", "sign", example, "--key", tmp_path / "k1" / "loraflight.key", "--out", signed
    )
    assert rc == 0 and signed.exists()
    assert LoRACard.open(example).header.signature is None  # --out leaves the source alone
    rc, out, _ = _run(capsys, "card", "verify", signed, "--key", tmp_path / "k1" / "loraflight.pub", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["signed"] and doc["trusted"]
    rc, _, err = _run(capsys, "card", "verify", signed, "--key", tmp_path / "k2" / "loraflight.pub")
    assert rc == 1 and "not a trusted key" in err and err.count("\n") == 1
    rc, out, _ = _run(capsys, "card", "verify", signed, "--key", tmp_path / "k2", "--json")
    assert rc == 1 and json.loads(out)["ok"] is False
    rc, out, _ = _run(capsys, "card", "verify", signed, "--require-signed")
    assert rc == 0 and "signed by" in out

    # sign in place (atomically), then the card verifies against the key
    rc, _, _ = _run(capsys, "card", "sign", example, "--key", tmp_path / "k2")
    assert rc == 0
    assert LoRACard.open(example).verify(require_signed=True).signed


def test_tampered_card_fails_with_one_line(
    tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = LoRACard.open(example)
    data = bytearray(example.read_bytes())
    pos = bytes(data).find(card.modules[2].b.tobytes())
    data[pos + 3] ^= 0x01
    bad = tmp_path / "bad.lora.arrow"
    bad.write_bytes(bytes(data))
    rc, _, err = _run(capsys, "card", "verify", bad)
    assert rc == 1 and "digest mismatch" in err and err.startswith("error: ") and err.count("\n") == 1
    rc, out, _ = _run(capsys, "card", "inspect", bad)
    assert rc == 0 and "FAILED" in out
    rc, _, err = _run(capsys, "card", "sign", bad, "--key", _keys(tmp_path, capsys))
    assert rc == 1 and "digest mismatch" in err
    rc, _, err = _run(capsys, "card", "verify", tmp_path / "nope.lora.arrow")
    assert rc == 1 and "no such card file" in err
    (tmp_path / "junk.lora.arrow").write_bytes(b"junk" * 100)
    rc, _, err = _run(capsys, "card", "inspect", tmp_path / "junk.lora.arrow")
    assert rc == 1 and "not an Arrow IPC file" in err


def _keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "kk"
    _run(capsys, "keys", "new", d)
    return d / "loraflight.key"


def test_peft_round_trip_via_cli(tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "peft"
    assert _run(capsys, "card", "to-peft", example, out_dir)[0] == 0
    assert (out_dir / "adapter_config.json").exists() and (out_dir / "adapter_model.safetensors").exists()
    back = tmp_path / "back.lora.arrow"
    rc, _, _ = _run(
        capsys,
        "card",
        "from-peft",
        out_dir,
        back,
        "--name",
        "back",
        "--version",
        "3",
        "--description",
        "round trip",
        "--tags",
        "a,b",
        "--tags",
        "c",
        "--base-model",
        "tiny/llama",
    )
    assert rc == 0
    a, b = LoRACard.open(example), LoRACard.open(back)
    h = b.header
    assert (h.name, h.version, h.description, h.tags, h.base_model) == (
        "back",
        3,
        "round trip",
        ("a", "b", "c"),
        "tiny/llama",
    )
    assert h.base_fingerprint == a.header.base_fingerprint
    for x, y in zip(a, b, strict=True):
        assert x.module == y.module and x.rank == y.rank and x.alpha == y.alpha
        assert np.array_equal(x.a, y.a) and np.array_equal(x.b, y.b)
    rc, _, err = _run(capsys, "card", "from-peft", tmp_path / "nowhere", tmp_path / "x.lora.arrow")
    assert rc == 1 and "not a directory" in err
    rc, _, err = _run(capsys, "card", "from-peft", out_dir, tmp_path / "y.lora.arrow", "--name", "../evil")
    assert rc == 1 and "escape" in err and not (tmp_path / "y.lora.arrow").exists()


def test_console_script_runs_without_torch(tmp_path: Path) -> None:
    """The card commands run as a real process, and never import torch or grpc."""
    code = (
        "import sys; from federation.cli import main; rc = main(['card', 'example', sys.argv[1]]); "
        "rc |= main(['card', 'verify', sys.argv[1]]); "
        "assert 'torch' not in sys.modules and 'grpc' not in sys.modules, 'heavy import'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "e.lora.arrow")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "unsigned" in proc.stdout


def test_bf16_example_is_the_float32_example_rounded() -> None:
    import numpy as np

    from loraflight.engine.authoring.arrays import to_float
    from loraflight.federation.cli.card_cmds import example_card

    f32, bf16 = example_card(dtype="float32"), example_card(dtype="bfloat16")
    for m32, m16 in zip(f32, bf16, strict=True):
        for x, w in ((m32.a, m16.a), (m32.b, m16.b)):
            back = to_float(w, "bfloat16")
            assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)  # nearest bf16: half an ulp
