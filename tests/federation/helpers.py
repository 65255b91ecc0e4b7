"""Shared helpers for federation tests: small real cards, servers on loopback, real certs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import numpy as np

from loraflight.engine.card import LoRACard, ModuleLoRA


def make_card(
    name: str = "skill",
    version: int = 1,
    *,
    nbytes: int = 64 * 1024,
    modules: int = 2,
    seed: int = 0,
    key=None,
    base_model: str | None = "tiny-base",
    tags=("demo",),
    lineage=(),
) -> LoRACard:
    """A float32 card of about `nbytes` tensor bytes split over `modules` rows."""
    rng = np.random.default_rng(seed + 1000 * version)
    rank = 4
    per = max(nbytes // modules // 4, 2 * rank)
    feat = max(per // (2 * rank), 1)
    mods = [
        ModuleLoRA(
            f"layers.{i}.proj",
            rank,
            8.0,
            rng.standard_normal((rank, feat), dtype=np.float32),
            rng.standard_normal((feat, rank), dtype=np.float32),
        )
        for i in range(modules)
    ]
    card = LoRACard.build(
        mods,
        name=name,
        version=version,
        description=f"{name} v{version}",
        tags=tags,
        base_model=base_model,
        created="2026-01-01T00:00:00Z",
        lineage=lineage,
    )
    return card.sign(key) if key is not None else card


def make_ca(tmp: Path, name: str = "ca"):
    """A CA plus a server cert for 127.0.0.1/localhost and a client cert; returns paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k, p: Path):
        p.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / f"{name}.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, server: bool):
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        role = "server" if server else "client"
        cp, kp = tmp / f"{name}-{role}.crt", tmp / f"{name}-{role}.key"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(k, kp)
        return cp, kp

    out["server_cert"], out["server_key"] = leaf("127.0.0.1", True)
    out["client_cert"], out["client_key"] = leaf("test client", False)
    return out
