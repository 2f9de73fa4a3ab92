"""The Connect CA: a trust domain and its roots (real self-signed P-256 certificates, made lazily
because key generation costs a few milliseconds)."""

from __future__ import annotations

import copy
import datetime
import uuid

from meshgw.simconsul.index import RaftIndex
from meshgw.simconsul.shapes import Json


def make_ca_root(trust_domain: str, index: int) -> dict[str, Json]:
    """One CARoot as /v1/connect/ca/roots lists it, with a certificate whose SAN is the domain."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pri-{serial % 10**7}.consul.ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()
    return {
        "ID": ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)),
        "Name": "Consul CA Primary Cert",
        "SerialNumber": serial % 2**63,
        "SigningKeyID": ":".join(ski[i : i + 2] for i in range(0, len(ski), 2)),
        "ExternalTrustDomain": trust_domain.split(".")[0],
        "NotBefore": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "NotAfter": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "RootCert": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "IntermediateCerts": None,
        "Active": True,
        "PrivateKeyType": "ec",
        "PrivateKeyBits": 256,
        "CreateIndex": index,
        "ModifyIndex": index,
    }


class ConnectCA:
    def __init__(self, raft: RaftIndex, trust_domain: str | None = None) -> None:
        self.raft = raft
        self._trust_domain = trust_domain or f"{uuid.uuid4()}.consul"
        self._roots: list[dict[str, Json]] | None = None

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def roots(self) -> list[dict[str, Json]]:
        with self.raft.lock:
            if self._roots is None:
                index = self.raft.stamp(("ca",)) or self.raft.commit(("ca",))
                self._roots = [make_ca_root(self._trust_domain, index)]
            return copy.deepcopy(self._roots)

    def set(self, *, trust_domain: str | None = None, rotate: bool = False) -> None:
        """Change the trust domain and/or rotate to a new active root (old roots stay, inactive)."""
        with self.raft.lock:
            if trust_domain is not None:
                self._trust_domain = trust_domain
            if self._roots is None:
                self.roots()
                return
            index = self.raft.commit(("ca",))
            if rotate or trust_domain is not None:
                for root in self._roots:
                    root["Active"] = False
                self._roots.append(make_ca_root(self._trust_domain, index))

    def view(self) -> tuple[int, dict[str, Json]]:
        """(index, body) of /v1/connect/ca/roots."""
        with self.raft.lock:
            roots = self.roots()
            active = next((r["ID"] for r in roots if r["Active"]), "")
            body = {"ActiveRootID": active, "TrustDomain": self._trust_domain, "Roots": roots}
            return self.raft.view(("ca",)), body
