"""`meshgw tls`: CA and agent certificates as `consul tls` makes them (docs/consul.md#tls-material).

Fields are read back with `cryptography`; the certificates are then used for real: a Python `ssl`
mutual-TLS handshake over loopback and `openssl verify`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgw.tls.certs import (
    CertError,
    Issued,
    create_ca,
    create_cert,
    load_ca,
    write_ca,
    write_cert,
)
from meshgw.tls.cli import tls_group

pytestmark = pytest.mark.timeout(30)

IO_TIMEOUT = 5.0  # every socket operation and thread join in the handshake tests


# --------------------------------------------------------------------------- helpers


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _load(path: Path) -> x509.Certificate:
    return _cert(path.read_bytes())


def _ext(cert: x509.Certificate, cls: type[Any]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(cls)


def _has_ext(cert: x509.Certificate, cls: type[Any]) -> bool:
    try:
        cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return False
    return True


def _spki_sha256(cert: x509.Certificate) -> bytes:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _dns(cert: x509.Certificate) -> list[str]:
    return _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def _ips(cert: x509.Certificate) -> list[str]:
    san = _ext(cert, x509.SubjectAlternativeName).value
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _assert_p256_sec1(key_pem: bytes) -> None:
    assert key_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----\n")
    assert b"ENCRYPTED" not in key_pem
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def _validity_days(cert: x509.Certificate) -> dt.timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def _assert_fresh(cert: x509.Certificate) -> None:
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=1) <= cert.not_valid_before_utc <= now


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leaf_common(cert: x509.Certificate, ca: x509.Certificate, cn: str, days: int) -> None:
    """Fields every consul agent certificate has, whatever its kind."""
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert 0 < cert.serial_number < 2**128
    assert _validity_days(cert) == dt.timedelta(days=days)
    _assert_fresh(cert)

    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.content_commitment)
    assert _ext(cert, x509.SubjectKeyIdentifier).value.digest == _spki_sha256(cert)
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert aki.key_identifier == _spki_sha256(ca)


def _invoke(args: list[str], cwd: Path | None = None) -> Result:
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(tls_group, args, catch_exceptions=False)
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(tls_group, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def _assert_refused(result: Result, *needles: str, status: int = 1) -> None:
    """One `meshgw: error:` line on stderr, exit `status` (2: a usage error), no traceback,
    nothing on stdout."""
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshgw: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def ca() -> Issued:
    return create_ca()


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    """A --dir holding a CA made by the CLI, as the project convention `--dir certs` does."""
    directory = tmp_path / "certs"
    result = _invoke(["ca", "create", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


# --------------------------------------------------------------------------- CA


def test_ca_defaults(ca: Issued) -> None:
    cert = ca.certificate()
    _assert_p256_sec1(ca.key_pem)
    assert 0 < cert.serial_number < 2**128
    assert cert.subject == cert.issuer
    # Go's pkix.Name order, as `openssl x509 -text` shows for a consul CA.
    assert [(a.oid, a.value) for a in cert.subject] == [
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        (NameOID.LOCALITY_NAME, "San Francisco"),
        (NameOID.STREET_ADDRESS, "101 Second Street"),
        (NameOID.POSTAL_CODE, "94105"),
        (NameOID.ORGANIZATION_NAME, "HashiCorp Inc."),
        (NameOID.COMMON_NAME, f"Consul Agent CA {cert.serial_number}"),
    ]
    assert _validity_days(cert) == dt.timedelta(days=1825)
    _assert_fresh(cert)

    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length is None
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
    assert not (ku.value.key_encipherment or ku.value.content_commitment)
    ski = _ext(cert, x509.SubjectKeyIdentifier).value.digest
    assert ski == _spki_sha256(cert) and len(ski) == 32  # raw bytes, not colon-hex
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert not _has_ext(cert, x509.NameConstraints)
    assert not _has_ext(cert, x509.SubjectAlternativeName)
    assert not _has_ext(cert, x509.ExtendedKeyUsage)
    cert.verify_directly_issued_by(cert)


def test_ca_options() -> None:
    issued = create_ca(
        "foo",
        365,
        name_constraint=True,
        additional_constraints=["bar", " ", "baz.example"],
        common_name="My CA",
        cluster_id="11111111-2222-3333-4444-555555555555",
    )
    cert = issued.certificate()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "My CA"
    assert _validity_days(cert) == dt.timedelta(days=365)
    nc = _ext(cert, x509.NameConstraints)
    assert nc.critical
    assert nc.value.excluded_subtrees is None
    assert nc.value.permitted_subtrees == [
        x509.DNSName("bar"),
        x509.DNSName("baz.example"),
        x509.DNSName("foo"),
        x509.DNSName("localhost"),
    ]
    san = _ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://11111111-2222-3333-4444-555555555555.foo"
    ]


def test_ca_name_constraint_defaults() -> None:
    nc = _ext(create_ca(name_constraint=True).certificate(), x509.NameConstraints).value
    assert nc.permitted_subtrees == [x509.DNSName("consul"), x509.DNSName("localhost")]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"additional_constraints": ["bar"]}, "--name-constraint"),
        ({"domain": "bad domain"}, "--domain"),
        ({"domain": "consul."}, "--domain"),
        ({"days": 0}, "--days"),
        ({"cluster_id": "a/b"}, "--cluster-id"),
    ],
)
def test_ca_refuses_bad_input(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(CertError, match=needle):
        create_ca(**kwargs)


# --------------------------------------------------------------------------- certificates


def test_server_cert_fields(ca: Issued) -> None:
    issued = create_cert(
        ca,
        "server",
        dc="dc2",
        node="node-1",
        days=30,
        additional_dnsnames=["gw.example.com", " *.server.dc2.consul "],
        additional_ips=["10.1.2.3", "fd00::1"],
    )
    cert = issued.certificate()
    _assert_p256_sec1(issued.key_pem)
    _leaf_common(cert, ca.certificate(), "server.dc2.consul", 30)
    assert _dns(cert) == [
        "gw.example.com",
        "*.server.dc2.consul",
        "node-1.server.dc2.consul",
        "server.dc2.consul",
        "localhost",
    ]
    assert _ips(cert) == ["10.1.2.3", "fd00::1", "127.0.0.1"]
    assert _ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )


def test_server_cert_defaults(ca: Issued) -> None:
    cert = create_cert(ca, "server").certificate()
    _leaf_common(cert, ca.certificate(), "server.dc1.consul", 365)
    assert _dns(cert) == ["server.dc1.consul", "localhost"]
    assert _ips(cert) == ["127.0.0.1"]


def test_client_cert_fields(ca: Issued) -> None:
    issued = create_cert(ca, "client", domain="consul", additional_dnsnames=["c.example"])
    cert = issued.certificate()
    _assert_p256_sec1(issued.key_pem)
    _leaf_common(cert, ca.certificate(), "client.dc1.consul", 365)
    assert _dns(cert) == ["c.example", "client.dc1.consul", "localhost"]
    assert _ips(cert) == ["127.0.0.1"]
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]


def test_cli_cert_fields(ca: Issued) -> None:
    issued = create_cert(ca, "cli", dc="east")
    cert = issued.certificate()
    _assert_p256_sec1(issued.key_pem)
    _leaf_common(cert, ca.certificate(), "cli.east.consul", 365)
    assert _dns(cert) == ["cli.east.consul", "localhost"]
    assert _ips(cert) == []
    assert not _has_ext(cert, x509.ExtendedKeyUsage)


def test_every_cert_has_its_own_key_and_serial(ca: Issued) -> None:
    a, b = create_cert(ca, "server"), create_cert(ca, "server")
    assert a.key_pem != b.key_pem
    assert a.certificate().serial_number != b.certificate().serial_number


@pytest.mark.parametrize(
    ("kind", "kwargs", "needles"),
    [
        ("server", {"node": "web.example"}, ("--node", "dot", "--node web")),
        ("client", {"node": "n1"}, ("--node requires --server",)),
        ("cli", {"node": "n1"}, ("--node requires --server",)),
        ("server", {"dc": "dc.1"}, ("--dc", "dot")),
        ("server", {"dc": "dc 1"}, ("--dc",)),
        ("server", {"domain": "con sul"}, ("--domain",)),
        ("server", {"days": 0}, ("--days",)),
        ("server", {"additional_ips": ["300.1.1.1"]}, ("--additional-ipaddress", "300.1.1.1")),
        ("server", {"additional_dnsnames": ["bad name"]}, ("--additional-dnsname",)),
        ("cli", {"additional_dnsnames": ["x.example"]}, ("--additional-dnsname", "--cli")),
        ("cli", {"additional_ips": ["10.0.0.1"]}, ("--additional-ipaddress", "--cli")),
        ("peer", {}, ("--server",)),
    ],
)
def test_cert_refuses_bad_input(
    ca: Issued, kind: Any, kwargs: dict[str, Any], needles: tuple[str, ...]
) -> None:
    with pytest.raises(CertError) as info:
        create_cert(ca, kind, **kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_cert_outside_name_constraints_is_refused() -> None:
    constrained = create_ca(name_constraint=True)
    create_cert(constrained, "server", node="n1")  # inside "consul": fine
    with pytest.raises(CertError, match="does not verify against the CA"):
        create_cert(constrained, "server", domain="other")
    with pytest.raises(CertError, match="does not verify against the CA"):
        create_cert(constrained, "server", additional_dnsnames=["gw.example.com"])


def test_cert_refuses_a_non_ca_or_mismatched_key(ca: Issued) -> None:
    leaf = create_cert(ca, "server")
    with pytest.raises(CertError, match="not a CA"):
        create_cert(leaf, "server")
    other = create_ca()
    with pytest.raises(CertError, match="does not belong"):
        create_cert(Issued(cert_pem=ca.cert_pem, key_pem=other.key_pem), "server")


# --------------------------------------------------------------------------- files


def test_write_ca_modes_and_refusal(ca: Issued, tmp_path: Path) -> None:
    directory = tmp_path / "new" / "certs"  # created on demand
    cert_path, key_path = write_ca(ca, directory, "consul")
    assert cert_path == directory / "consul-agent-ca.pem"
    assert key_path == directory / "consul-agent-ca-key.pem"
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644
    assert cert_path.read_bytes() == ca.cert_pem and key_path.read_bytes() == ca.key_pem

    with pytest.raises(CertError, match=r"consul-agent-ca\.pem already exists"):
        write_ca(create_ca(), directory, "consul")
    assert cert_path.read_bytes() == ca.cert_pem  # untouched

    cert_path.unlink()  # the key alone also blocks a new CA
    with pytest.raises(CertError, match=r"consul-agent-ca-key\.pem already exists"):
        write_ca(create_ca(), directory, "consul")
    assert not cert_path.exists()

    assert write_ca(ca, directory, "foo")[0].name == "foo-agent-ca.pem"
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []


def test_write_cert_first_free_index(ca: Issued, tmp_path: Path) -> None:
    issued = create_cert(ca, "server")
    names = [write_cert(issued, tmp_path, "server", "dc1", "consul") for _ in range(3)]
    assert [(c.name, k.name) for c, k in names] == [
        (f"dc1-server-consul-{n}.pem", f"dc1-server-consul-{n}-key.pem") for n in range(3)
    ]
    for cert_path, key_path in names:
        assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644

    # An index is free only when both of its files are (consul's rule).
    names[0][0].unlink()
    names[0][1].unlink()
    names[1][1].unlink()
    assert write_cert(issued, tmp_path, "server", "dc1", "consul")[0].name == (
        "dc1-server-consul-0.pem"
    )
    assert write_cert(issued, tmp_path, "server", "dc1", "consul")[0].name == (
        "dc1-server-consul-3.pem"
    )
    # Kinds, datacenters and domains count separately.
    assert write_cert(issued, tmp_path, "client", "dc1", "consul")[0].name == (
        "dc1-client-consul-0.pem"
    )
    assert write_cert(issued, tmp_path, "cli", "dc2", "foo")[1].name == "dc2-cli-foo-0-key.pem"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_ca_round_trip_and_errors(ca: Issued, tmp_path: Path) -> None:
    cert_path, key_path = write_ca(ca, tmp_path, "consul")
    assert load_ca(cert_path, key_path) == ca

    with pytest.raises(CertError) as info:
        load_ca(tmp_path / "missing-agent-ca.pem", key_path)
    message = str(info.value)
    assert "missing-agent-ca.pem" in message and "meshgw tls ca create" in message

    with pytest.raises(CertError, match=r"missing-key\.pem"):
        load_ca(cert_path, tmp_path / "missing-key.pem")

    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(create_ca().key_pem)
    with pytest.raises(CertError, match="does not belong"):
        load_ca(cert_path, other_key)

    with pytest.raises(CertError, match="not a PEM certificate"):
        load_ca(key_path, key_path)


# --------------------------------------------------------------------------- CLI


def test_cli_ca_create_in_current_directory(tmp_path: Path) -> None:
    result = _invoke(["ca", "create"], cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "==> Saved consul-agent-ca.pem",
        "==> Saved consul-agent-ca-key.pem",
    ]
    assert _mode(tmp_path / "consul-agent-ca-key.pem") == 0o600
    cert = _load(tmp_path / "consul-agent-ca.pem")
    assert _validity_days(cert) == dt.timedelta(days=1825)

    again = _invoke(["ca", "create"], cwd=tmp_path)
    _assert_refused(again, "consul-agent-ca.pem already exists")
    assert _load(tmp_path / "consul-agent-ca.pem") == cert


def test_cli_ca_create_options(tmp_path: Path) -> None:
    result = _invoke(
        [
            "ca",
            "create",
            "--domain",
            "foo",
            "--days",
            "10",
            "--name-constraint",
            "--additional-name-constraint",
            "bar",
            "--additional-name-constraint",
            "baz",
            "--common-name",
            "Test CA",
            "--cluster-id",
            "abc",
            "--dir",
            str(tmp_path),
        ]
    )
    assert result.exit_code == 0, result.output
    cert = _load(tmp_path / "foo-agent-ca.pem")
    assert (tmp_path / "foo-agent-ca-key.pem").exists()
    assert _validity_days(cert) == dt.timedelta(days=10)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert [n.value for n in _ext(cert, x509.NameConstraints).value.permitted_subtrees or []] == [
        "bar",
        "baz",
        "foo",
        "localhost",
    ]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://abc.foo"]

    refused = _invoke(["ca", "create", "--additional-name-constraint", "x", "--dir", str(tmp_path)])
    _assert_refused(refused, "--name-constraint", status=2)
    days = _invoke(["ca", "create", "--days", "0", "--dir", str(tmp_path)])
    _assert_refused(days, "--days", status=2)


def test_cli_cert_create_server(cert_dir: Path) -> None:
    args = ["cert", "create", "--server", "--node", "n1", "--dir", str(cert_dir)]
    result = _invoke([*args, "--additional-dnsname", "gw.example", "--additional-ipaddress", "::1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("==> WARNING: Server Certificates grants authority")
    assert lines[-3:] == [
        f"==> Using {cert_dir / 'consul-agent-ca.pem'} and {cert_dir / 'consul-agent-ca-key.pem'}",
        f"==> Saved {cert_dir / 'dc1-server-consul-0.pem'}",
        f"==> Saved {cert_dir / 'dc1-server-consul-0-key.pem'}",
    ]
    cert = _load(cert_dir / "dc1-server-consul-0.pem")
    _leaf_common(cert, _load(cert_dir / "consul-agent-ca.pem"), "server.dc1.consul", 365)
    assert _dns(cert) == ["gw.example", "n1.server.dc1.consul", "server.dc1.consul", "localhost"]
    assert _ips(cert) == ["::1", "127.0.0.1"]
    assert _mode(cert_dir / "dc1-server-consul-0-key.pem") == 0o600
    _assert_p256_sec1((cert_dir / "dc1-server-consul-0-key.pem").read_bytes())

    second = _invoke(args)
    assert second.exit_code == 0, second.output
    assert second.stdout.splitlines()[-2:] == [
        f"==> Saved {cert_dir / 'dc1-server-consul-1.pem'}",
        f"==> Saved {cert_dir / 'dc1-server-consul-1-key.pem'}",
    ]


def test_cli_cert_create_client_and_cli(cert_dir: Path) -> None:
    client = _invoke(["cert", "create", "--client", "--dc", "dc2", "--dir", str(cert_dir)])
    assert client.exit_code == 0, client.output
    assert "WARNING" not in client.stdout
    cert = _load(cert_dir / "dc2-client-consul-0.pem")
    assert _dns(cert) == ["client.dc2.consul", "localhost"]
    assert _ips(cert) == ["127.0.0.1"]

    cli = _invoke(["cert", "create", "--cli", "--days", "7", "--dir", str(cert_dir)])
    assert cli.exit_code == 0, cli.output
    cert = _load(cert_dir / "dc1-cli-consul-0.pem")
    assert _dns(cert) == ["cli.dc1.consul", "localhost"]
    assert not _has_ext(cert, x509.ExtendedKeyUsage)
    assert _validity_days(cert) == dt.timedelta(days=7)


def test_cli_cert_create_with_explicit_ca(cert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(
        [
            "cert",
            "create",
            "--client",
            "--ca",
            str(cert_dir / "consul-agent-ca.pem"),
            "--key",
            str(cert_dir / "consul-agent-ca-key.pem"),
            "--dir",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    assert (out / "dc1-client-consul-0.pem").exists()


@pytest.mark.parametrize(
    ("args", "needles", "status"),
    [
        ([], ("exactly one of --server, --client or --cli",), 2),
        (["--server", "--client"], ("exactly one of",), 2),
        (["--server", "--client", "--cli"], ("exactly one of",), 2),
        (["--client", "--node", "n1"], ("--node requires --server",), 2),
        (["--cli", "--node", "n1"], ("--node requires --server",), 2),
        (["--server", "--node", "n1.dc1"], ("--node", "contains a dot", "--node n1"), 2),
        (["--server", "--days", "0"], ("--days 0",), 2),
        (["--server", "--dc", "a.b"], ("--dc 'a.b' contains a dot", "--dc dc1"), 2),
        (["--server", "--additional-ipaddress", "nope"], ("--additional-ipaddress", "'nope'"), 2),
        (["--server", "--domain", "other"], ("other-agent-ca.pem", "meshgw tls ca create"), 1),
        # click's own usage errors: one line too, never the usage block.
        (["--server", "--days", "x"], ("'--days': 'x' is not a valid integer",), 2),
        (["--server", "--dc"], ("Option '--dc' requires an argument",), 2),
        (["--server", "--bogus"], ("No such option '--bogus'", "--help"), 2),
        (["-server", "-bogus"], ("No such option '--bogus'",), 2),
        (["-server=maybe"], ("invalid boolean value 'maybe' for --server",), 2),
    ],
)
def test_cli_cert_create_refusals(
    cert_dir: Path, args: list[str], needles: tuple[str, ...], status: int
) -> None:
    result = _invoke(["cert", "create", "--dir", str(cert_dir), *args])
    _assert_refused(result, *needles, status=status)
    assert not list(cert_dir.glob("dc1-*"))  # nothing written


def test_cli_cert_create_without_ca(tmp_path: Path) -> None:
    result = _invoke(["cert", "create", "--server"], cwd=tmp_path)
    _assert_refused(result, "consul-agent-ca.pem not found", "meshgw tls ca create")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- real TLS


def _server_context(cert_dir: Path, stem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default in Python 3.13+
    ctx.load_cert_chain(cert_dir / f"{stem}.pem", cert_dir / f"{stem}-key.pem")
    ctx.load_verify_locations(cert_dir / "consul-agent-ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_context(cert_dir: Path, stem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_dir / f"{stem}.pem", cert_dir / f"{stem}-key.pem")
    ctx.load_verify_locations(cert_dir / "consul-agent-ca.pem")
    return ctx


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> dict[str, Any]:
    """Mutual TLS over loopback; returns the client cert the server saw. Raises client errors."""
    seen: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                seen["error"] = exc
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                try:
                    with server.wrap_socket(conn, server_side=True) as tls:
                        seen["peer"] = tls.getpeercert()
                        tls.sendall(b"ok")
                except OSError as exc:  # ssl.SSLError is an OSError
                    seen["error"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
                client.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                assert tls.recv(2) == b"ok"
                seen["server_cert"] = tls.getpeercert()
        finally:
            thread.join(IO_TIMEOUT)
            assert not thread.is_alive()
    return seen


@pytest.fixture
def tls_dir(cert_dir: Path) -> Iterator[Path]:
    for args in (["--server", "--dc", "dc1", "--node", "n1"], ["--client", "--dc", "dc1"]):
        result = _invoke(["cert", "create", *args, "--dir", str(cert_dir)])
        assert result.exit_code == 0, result.output
    yield cert_dir


@pytest.mark.parametrize("hostname", ["n1.server.dc1.consul", "server.dc1.consul"])
def test_mutual_tls_handshake(tls_dir: Path, hostname: str) -> None:
    seen = _handshake(
        _server_context(tls_dir, "dc1-server-consul-0"),
        _client_context(tls_dir, "dc1-client-consul-0"),
        hostname,
    )
    assert "error" not in seen
    assert seen["peer"]["subject"] == ((("commonName", "client.dc1.consul"),),)
    assert seen["server_cert"]["subject"] == ((("commonName", "server.dc1.consul"),),)


def test_mutual_tls_wrong_name_fails(tls_dir: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _handshake(
            _server_context(tls_dir, "dc1-server-consul-0"),
            _client_context(tls_dir, "dc1-client-consul-0"),
            "other.server.dc2.consul",
        )
    assert "other.server.dc2.consul" in str(info.value) or "mismatch" in str(info.value)


def test_mutual_tls_foreign_ca_fails(tls_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    assert _invoke(["ca", "create", "--dir", str(foreign)]).exit_code == 0
    assert _invoke(["cert", "create", "--client", "--dir", str(foreign)]).exit_code == 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(
        foreign / "dc1-client-consul-0.pem", foreign / "dc1-client-consul-0-key.pem"
    )
    client.load_verify_locations(tls_dir / "consul-agent-ca.pem")
    # TLS 1.3 lets the client finish first, so the server's refusal shows up as the server's error
    # or as a read error on the client, depending on timing.
    try:
        seen = _handshake(
            _server_context(tls_dir, "dc1-server-consul-0"), client, "server.dc1.consul"
        )
    except (ssl.SSLError, OSError):
        return
    assert isinstance(seen.get("error"), ssl.SSLError)


# --------------------------------------------------------------------------- openssl


def _openssl_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verify(tls_dir: Path) -> None:
    ca_file = str(tls_dir / "consul-agent-ca.pem")
    assert _invoke(["cert", "create", "--cli", "--dir", str(tls_dir)]).exit_code == 0
    server = str(tls_dir / "dc1-server-consul-0.pem")
    client = str(tls_dir / "dc1-client-consul-0.pem")
    cli = str(tls_dir / "dc1-cli-consul-0.pem")

    for name in ("n1.server.dc1.consul", "server.dc1.consul", "localhost"):
        ok = _openssl_verify(
            "-CAfile", ca_file, "-purpose", "sslserver", "-verify_hostname", name, server
        )
        assert ok.returncode == 0 and ok.stdout.strip() == f"{server}: OK", ok.stderr
    ok = _openssl_verify("-CAfile", ca_file, "-purpose", "sslclient", client)
    assert ok.returncode == 0, ok.stderr
    ok = _openssl_verify("-CAfile", ca_file, "-verify_hostname", "cli.dc1.consul", cli)
    assert ok.returncode == 0, ok.stderr
    ok = _openssl_verify("-CAfile", ca_file, "-verify_ip", "127.0.0.1", server)
    assert ok.returncode == 0, ok.stderr

    bad = _openssl_verify("-CAfile", ca_file, "-verify_hostname", "other.server.dc2.consul", server)
    assert bad.returncode != 0

    foreign = create_ca()
    foreign_ca = tls_dir / "foreign-ca.pem"
    foreign_ca.write_bytes(foreign.cert_pem)
    bad = _openssl_verify("-CAfile", str(foreign_ca), server)
    assert bad.returncode != 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verify_name_constrained_ca(tmp_path: Path) -> None:
    ca = create_ca(name_constraint=True, additional_constraints=["example.com"])
    cert = create_cert(ca, "server", node="n1", additional_dnsnames=["gw.example.com"])
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca_file.write_bytes(ca.cert_pem)
    cert_file.write_bytes(cert.cert_pem)
    ok = _openssl_verify(
        "-CAfile", str(ca_file), "-verify_hostname", "gw.example.com", str(cert_file)
    )
    assert ok.returncode == 0, ok.stderr
    assert ipaddress.ip_address(_ips(cert.certificate())[0]).is_loopback


# --------------------------------------------------------------------------- Consul's spelling


def test_consul_single_dash_spelling_as_pasted_from_consul_docs(tmp_path: Path) -> None:
    """`consul tls ...` commands as Consul's docs write them, with `meshgw` in front."""
    ca = _invoke(
        [
            *("ca", "create", "-domain", "consul", "-days=30", "-name-constraint"),
            *("-additional-name-constraint", "example.com", "-common-name", "Ops CA"),
            *("-cluster-id", "abc", "-dir", str(tmp_path)),
        ]
    )
    assert ca.exit_code == 0, ca.output
    ca_cert = _load(tmp_path / "consul-agent-ca.pem")
    assert _validity_days(ca_cert) == dt.timedelta(days=30)
    assert ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Ops CA"
    permitted = _ext(ca_cert, x509.NameConstraints).value.permitted_subtrees or []
    assert [n.value for n in permitted] == ["example.com", "consul", "localhost"]

    server = _invoke(
        [
            *("cert", "create", "-server", "-dc", "dc2", "-node", "consul-server-0"),
            *("-additional-dnsname", "*.server.dc2.consul", "-additional-ipaddress=10.0.0.7"),
            *("-days", "7", "-domain", "consul"),
            *("-ca", str(tmp_path / "consul-agent-ca.pem")),
            *("-key", str(tmp_path / "consul-agent-ca-key.pem"), "-dir", str(tmp_path)),
        ]
    )
    assert server.exit_code == 0, server.output
    cert = _load(tmp_path / "dc2-server-consul-0.pem")
    assert _dns(cert) == [
        "*.server.dc2.consul",
        "consul-server-0.server.dc2.consul",
        "server.dc2.consul",
        "localhost",
    ]
    assert _ips(cert) == ["10.0.0.7", "127.0.0.1"]
    assert _validity_days(cert) == dt.timedelta(days=7)

    # Go's boolean forms, and the two other kinds.
    for args, stem in (
        (["-client", "-dc=dc2"], "dc2-client-consul-0"),
        (["-cli=true", "-server=false", "-dc", "dc2"], "dc2-cli-consul-0"),
        (["--client=1", "--dc", "dc2"], "dc2-client-consul-1"),
    ):
        result = _invoke(["cert", "create", *args, "-dir", str(tmp_path)])
        assert result.exit_code == 0, (args, result.output)
        assert (tmp_path / f"{stem}.pem").exists(), args


def test_a_flag_value_that_starts_with_a_dash_stays_a_value(cert_dir: Path) -> None:
    result = _invoke(["cert", "create", "-server", "-additional-dnsname", "-dc", "-dir", "x"])
    # '-dc' is the DNS name given, not the --dc flag; and it is no DNS name.
    _assert_refused(result, "--additional-dnsname '-dc' is not a DNS name", status=2)
    assert not Path("x").exists()


@pytest.mark.parametrize("dc", ["dc_1", "dc-1", "east_us-2", "0", "a" * 50])
def test_every_datacenter_name_consul_accepts(tmp_path: Path, dc: str) -> None:
    """Consul's agent accepts `^[a-z0-9_-]+$`; so does `tls cert create`, name-constrained CA
    or not, and the certificate verifies with OpenSSL too."""
    for constrained in (False, True):
        folder = tmp_path / str(constrained)
        ca_args = ["ca", "create", "-dir", str(folder)]
        assert _invoke(ca_args + (["-name-constraint"] if constrained else [])).exit_code == 0
        args = ["cert", "create", "-server", "-dc", dc, "-node", "n_1", "-dir", str(folder)]
        result = _invoke(args)
        assert result.exit_code == 0, result.output
        cert_file = folder / f"{dc}-server-consul-0.pem"
        cert = _load(cert_file)
        assert _dns(cert) == [f"n_1.server.{dc}.consul", f"server.{dc}.consul", "localhost"]
        if shutil.which("openssl") is not None:
            ok = _openssl_verify("-CAfile", str(folder / "consul-agent-ca.pem"), str(cert_file))
            assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    ("dc", "needle"),
    [
        ("DC1", "--dc 'DC1' is not a Consul datacenter name: lower-case letters"),
        ("dc 1", "--dc 'dc 1' is not a Consul datacenter name"),
        ("dc.1", "--dc 'dc.1' contains a dot"),
        ("", "--dc '' is not a Consul datacenter name"),
        ("a" * 64, "at most 63 characters"),
        # Consul takes it, but server.<dc>.consul must fit a common name.
        ("a" * 51, "has 65 characters; an X.509 common name holds at most 64"),
        ("dcé", "--dc 'dcé' is not a Consul datacenter name"),
    ],
)
def test_datacenter_names_consul_refuses(cert_dir: Path, dc: str, needle: str) -> None:
    result = _invoke(["cert", "create", "-dir", str(cert_dir), "-server", "-dc", dc])
    _assert_refused(result, needle, status=2)
    assert sorted(p.name for p in cert_dir.iterdir()) == [
        "consul-agent-ca-key.pem",
        "consul-agent-ca.pem",
    ]


@pytest.mark.parametrize(
    ("name", "constraint", "within"),
    [
        ("server.dc_1.consul", "consul", True),
        ("consul", "consul", True),
        ("consul", ".consul", False),  # a leading dot: names below it only
        ("a.consul", ".consul", True),
        ("SERVER.dc1.Consul", "consul", True),
        ("notconsul", "consul", False),
        ("consul.example", "consul", False),
        ("*.server.dc1.consul", "consul", True),
        ("anything.at.all", "", True),
    ],
)
def test_name_constraints_match_as_go_does(name: str, constraint: str, within: bool) -> None:
    from meshgw.tls.certs import _dns_within

    assert _dns_within(name, constraint) is within


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-common-name", "x" * 65], "--common-name has 65 characters"),
        (["-days", "99999999"], "--days 99999999 ends after the year 9999"),
        (["-days", "-1"], "--days -1 is not a positive number"),
        (["-domain", "a..b"], "--domain 'a..b' is not a DNS name"),
        (["-nope"], "No such option '--nope'"),
    ],
)
def test_cli_ca_create_refusals(tmp_path: Path, args: list[str], needle: str) -> None:
    _assert_refused(_invoke(["ca", "create", "-dir", str(tmp_path), *args]), needle, status=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_cert_create_days_beyond_9999(cert_dir: Path) -> None:
    result = _invoke(["cert", "create", "-dir", str(cert_dir), "-server", "-days", "9" * 14])
    _assert_refused(result, "ends after the year 9999", status=2)


def test_go_style_rewrites_only_where_a_flag_can_stand() -> None:
    from meshgw.tls.goflags import go_style

    takes = {"--dc": True, "--server": False}
    assert go_style(["-server", "-dc", "-x", "-dc=dc2"], takes) == [
        "--server",
        "--dc",
        "-x",
        "--dc=dc2",
    ]
    assert go_style(["-server=false", "-server=T", "--", "-dc"], takes) == ["--server", "--", "-dc"]
    # A group stops at its subcommand: what follows is the subcommand's to rewrite.
    assert go_style(["-help", "cert", "-dc", "x"], {}, stop_at_word=True) == [
        "--help",
        "cert",
        "-dc",
        "x",
    ]
