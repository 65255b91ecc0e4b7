"""The [api] section and the engine's serving settings: flags, environment, validation, start-up."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import torch

from loraflight.errors import ConfigError
from loraflight.federation.config import KEYS_BY_PATH, load_config
from loraflight.federation.serving import start_api

from .helpers import tiny


def test_api_listen_from_flag_env_and_file(tmp_path: Path) -> None:
    k = KEYS_BY_PATH["api.listen"]
    assert k.flag == "--api-listen" and k.env == "LORAFLIGHT_API_LISTEN" and k.default == ""
    f = tmp_path / "n.toml"
    f.write_text('[api]\nlisten = "127.0.0.1:8001"\nmax_batch = 8\n')
    assert load_config(f, env={}).api.listen == "127.0.0.1:8001"
    assert load_config(f, env={"LORAFLIGHT_API_LISTEN": "127.0.0.1:8002"}).api.listen == "127.0.0.1:8002"
    cfg = load_config(f, env={"LORAFLIGHT_API_LISTEN": "x:1"}, flags={"api.listen": "[::1]:0"})
    assert cfg.api.listen == "[::1]:0" and cfg.api.max_batch == 8
    for name in ("max_batch", "max_wait_ms", "queue", "max_inputs", "max_input_tokens", "max_body_bytes"):
        assert KEYS_BY_PATH[f"api.{name}"].flag == "--api-" + name.replace("_", "-")
    assert KEYS_BY_PATH["engine.model_id"].flag == "--engine-model-id"


def test_every_api_problem_is_listed() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(
            env={},
            flags={
                "api.listen": "http://127.0.0.1:8000",
                "api.max_batch": 0,
                "api.max_wait_ms": -1.0,
                "api.queue": 0,
                "api.max_inputs": 0,
                "api.max_input_tokens": -5,
                "api.max_body_bytes": 0,
            },
        )
    msg = str(ei.value)
    assert "7 problems" in msg
    for part in ("api.listen", "api.max_batch", "api.max_wait_ms", "api.queue", "api.max_inputs"):
        assert part in msg
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(env={}, flags={"api.listen": "127.0.0.1"})
    with pytest.raises(ConfigError, match=r"port in 0\.\.65535"):
        load_config(env={}, flags={"api.listen": "127.0.0.1:70000"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_config_error_when_an_engine_is_configured() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_config(env={}, flags={"engine.base_model": "tiny", "engine.device": "cuda"})
    assert (
        load_config(env={}, flags={"engine.device": "cuda"}).engine.device == "cuda"
    )  # no engine: unchecked


def test_start_api_needs_an_engine_and_a_free_port() -> None:
    cfg = load_config(env={}, flags={"api.listen": "127.0.0.1:0"})
    with pytest.raises(ConfigError, match="needs an engine"):
        start_api(model=None, config=cfg)
    with pytest.raises(ConfigError, match=r"api\.listen is empty"):
        start_api(model=tiny(), config=load_config(env={}))
    first = start_api(model=tiny(), config=cfg)
    try:
        taken = load_config(env={}, flags={"api.listen": f"127.0.0.1:{first.port}"})
        with pytest.raises(ConfigError, match="cannot listen"):
            start_api(model=tiny(), config=taken)
    finally:
        first.stop()


def test_the_api_serves_on_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    server = start_api(model=tiny(), config=load_config(env={}, flags={"api.listen": path}))
    try:
        assert server.port is None and server.url == f"http+unix://{path}"
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://localhost") as c:
            r = c.post("/v1/embeddings", json={"model": "loraflight/tiny-encoder", "input": "x"})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64
    finally:
        server.stop()
    assert not os.path.exists(path)


def test_tls_from_the_nodes_certificate(tmp_path: Path) -> None:
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_p, key_p = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cfg = load_config(
        env={}, flags={"api.listen": "127.0.0.1:0", "tls.cert": str(cert_p), "tls.key": str(key_p)}
    )
    server = start_api(model=tiny(), config=cfg)
    try:
        assert server.url.startswith("https://")
        r = httpx.get(server.url + "/health", verify=ssl.create_default_context(cafile=str(cert_p)))
        assert r.status_code == 200
        with pytest.raises(httpx.TransportError):  # plain HTTP gets no answer
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5).raise_for_status()
    finally:
        server.stop()


def test_a_hugging_face_id_must_be_in_the_local_cache() -> None:
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        load_config(env={}, flags={"engine.base_model": "someone/not-cached-anywhere", "trust.engine": "any"})
    with pytest.raises(ConfigError, match="cached org/name id"):
        load_config(env={}, flags={"engine.base_model": "no such thing", "trust.engine": "any"})
