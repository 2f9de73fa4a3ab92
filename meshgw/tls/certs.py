"""Agent TLS material made the way `consul tls ca create` / `consul tls cert create` make it.

A pure library: no click, no printing. `create_ca` and `create_cert` return PEM bytes in an
`Issued` value; `write_ca` / `write_cert` put them on disk with consul's file names. Every error a
user can cause is a `CertError` whose message names the input and the fix, so the CLI only has to
print it.

Fidelity notes (see docs/consul.md#tls-material): ECDSA P-256 keys as SEC1 `EC PRIVATE KEY`, random
serials below 2**128, SubjectKeyId = SHA-256 of the PKIX public key DER (raw 32 bytes, as newer
consul does), the same subject, extensions and SAN order as consul, and the new certificate is
verified against the CA before anyone sees it -- with the checks Go's x509.Verify makes for
consul, not a stricter verifier: a datacenter such as `dc_1` is a valid Consul name, and its
underscore must not make the check refuse a certificate consul would write.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgw.wire.names import is_valid_datacenter

CertKind = Literal["server", "client", "cli"]
CERT_KINDS: tuple[CertKind, ...] = get_args(CertKind)

DEFAULT_DOMAIN = "consul"
DEFAULT_DC = "dc1"
DEFAULT_CA_DAYS = 1825
DEFAULT_CERT_DAYS = 365

KEY_MODE = 0o600
# A fixed 0644 rather than 0666 & umask: reading the umask means setting it, which races with
# other threads of the same process.
CERT_MODE = 0o644

_SERIAL_LIMIT = 1 << 128
_MAX_INDEX = 10000  # consul gives up on finding a free file name after the same number of tries
_LOCALHOST = "localhost"
_MAX_COMMON_NAME = 64  # RFC 5280's ub-common-name; cryptography refuses a longer CN
_LOOPBACK = ipaddress.ip_address("127.0.0.1")

# One DNS label. Underscores are tolerated because consul tolerates them in node names.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")

_AnyIP = ipaddress.IPv4Address | ipaddress.IPv6Address
_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertError(Exception):
    """A problem the user can fix; the message names the input and the fix."""


class CertInputError(CertError):
    """The request itself is wrong (a flag value, or flags that do not go together): a usage
    error, whatever the files on disk hold."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


# --------------------------------------------------------------------------- validation


def _check_days(days: int) -> None:
    if days < 1:
        raise CertInputError(
            f"--days {days} is not a positive number of days; pass --days 1 or more"
        )
    try:
        dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
    except OverflowError:
        raise CertInputError(
            f"--days {days} ends after the year 9999, the last date a certificate can hold; "
            "pass fewer days"
        ) from None


def _check_label(value: str, flag: str, example: str) -> None:
    if "." in value:
        raise CertInputError(
            f"{flag} {value!r} contains a dot; pass a single DNS label, e.g. {flag} {example}"
        )
    if not _LABEL.match(value):
        raise CertInputError(
            f"{flag} {value!r} is not a DNS label; use letters, digits and '-', "
            f"e.g. {flag} {example}"
        )


def check_datacenter(dc: str) -> None:
    """Exactly the names a Consul agent accepts for `datacenter` (docs/consul.md#server-settings),
    capped at one DNS label because the name is a label of every federation SNI."""
    if is_valid_datacenter(dc):
        return
    if "." in dc:
        raise CertInputError(
            f"--dc {dc!r} contains a dot; Consul datacenter names are one label, e.g. --dc dc1"
        )
    raise CertInputError(
        f"--dc {dc!r} is not a Consul datacenter name: lower-case letters, digits, '-' and '_' "
        "only, at most 63 characters, e.g. --dc dc1"
    )


def _check_domain(value: str, flag: str, example: str, *, prefixes: tuple[str, ...] = ()) -> None:
    body = value
    for prefix in prefixes:
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    if not body or not all(_LABEL.match(label) for label in body.split(".")):
        raise CertInputError(
            f"{flag} {value!r} is not a DNS name; use dot-separated labels of letters, "
            f"digits and '-' (e.g. {example!r})"
        )


def _clean_names(values: Iterable[str]) -> list[str]:
    # Like consul: surrounding blanks are trimmed and empty values skipped.
    return [v.strip() for v in values if v.strip()]


def _parse_ips(values: Iterable[str]) -> list[_AnyIP]:
    ips: list[_AnyIP] = []
    for value in _clean_names(values):
        try:
            ips.append(ipaddress.ip_address(value))
        except ValueError:
            raise CertInputError(
                f"--additional-ipaddress {value!r} is not an IP address; "
                "pass an IPv4 or IPv6 address such as 10.0.0.5"
            ) from None
    return ips


def check_cert_request(
    kind: str,
    *,
    dc: str = DEFAULT_DC,
    domain: str = DEFAULT_DOMAIN,
    node: str | None = None,
    days: int = DEFAULT_CERT_DAYS,
    additional_dnsnames: Iterable[str] = (),
    additional_ips: Iterable[str] = (),
) -> None:
    """Raise `CertError` for a request `create_cert` would refuse, without touching any file.

    The CLI calls it before loading the CA so that a flag mistake is reported as such rather than
    as a missing CA file.
    """
    if kind not in CERT_KINDS:
        raise CertInputError(
            f"unknown certificate kind {kind!r}; pass one of --server, --client, --cli"
        )
    if node and kind != "server":
        raise CertInputError(
            f"--node requires --server; drop --node or pass --server instead of --{kind}"
        )
    check_datacenter(dc)
    _check_domain(domain, "--domain", "consul")
    name = f"{kind}.{dc}.{domain}"
    if len(name) > _MAX_COMMON_NAME:
        raise CertInputError(
            f"the certificate's name {name} has {len(name)} characters; an X.509 common name "
            f"holds at most {_MAX_COMMON_NAME}: shorten --dc or --domain"
        )
    if node:
        _check_label(node, "--node", node.split(".", 1)[0] or "server1")
    _check_days(days)
    dnsnames = _clean_names(additional_dnsnames)
    ips = _parse_ips(additional_ips)
    if kind == "cli" and (dnsnames or ips):
        flag = "--additional-dnsname" if dnsnames else "--additional-ipaddress"
        raise CertInputError(
            f"{flag} applies to --server and --client certificates only; "
            "a --cli certificate names just cli.<dc>.<domain> and localhost"
        )
    for name in dnsnames:
        # A leading '*.' is allowed: servers accept *.server.<dc>.<domain>
        # (docs/consul.md#tls-material).
        _check_domain(name, "--additional-dnsname", "gw.example.com", prefixes=("*.",))


# --------------------------------------------------------------------------- building blocks


def _serial() -> int:
    # Random below 2**128 like consul; zero is skipped because RFC 5280 wants a positive serial.
    return secrets.randbelow(_SERIAL_LIMIT - 1) + 1


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # TraditionalOpenSSL on an EC key is SEC1, i.e. PEM type "EC PRIVATE KEY", as consul writes.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def key_id(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the PKIX (SubjectPublicKeyInfo) DER: consul's SubjectKeyId / AuthorityKeyId."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Whole seconds: the certificate stores seconds, and the verification time must not precede
    # NotBefore because of a dropped fraction.
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return now, now + dt.timedelta(days=days)


def _ca_subject(common_name: str) -> x509.Name:
    # Go's pkix.Name order: C, ST, L, STREET, POSTALCODE, O, CN.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "San Francisco"),
            x509.NameAttribute(NameOID.STREET_ADDRESS, "101 Second Street"),
            x509.NameAttribute(NameOID.POSTAL_CODE, "94105"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HashiCorp Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _parse_ca(ca: Issued) -> tuple[x509.Certificate, _SigningKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
    except ValueError:
        raise CertError(
            "the CA certificate is not a PEM certificate; pass the *-agent-ca.pem file with --ca"
        ) from None
    try:
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError):
        raise CertError(
            "the CA key is not an unencrypted PEM private key; "
            "pass the *-agent-ca-key.pem file with --key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertError(
            "the CA key is neither ECDSA nor RSA; recreate it with `meshgw tls ca create`"
        )
    if key.public_key() != cert.public_key():
        raise CertError(
            "the CA key does not belong to the CA certificate; pass the matching --ca and --key"
        )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(
            f"the certificate {cert.subject.rfc4514_string()!r} is not a CA; "
            "pass the *-agent-ca.pem file with --ca"
        )
    return cert, key


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Go copies the parent's SubjectKeyId; a CA without one gets consul's hash of its key.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ca_pub = ca_cert.public_key()
        if not isinstance(ca_pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CertError("the CA key is neither ECDSA nor RSA") from None
        return x509.AuthorityKeyIdentifier(key_id(ca_pub), None, None)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _verify(
    ca_cert: x509.Certificate, leaf: x509.Certificate, name: str, when: dt.datetime
) -> None:
    """consul runs Go's x509.Verify with DNSName = CN before writing; these are the checks it
    makes on a one-link chain: signature, validity, name constraints and the name itself."""
    problem = _verify_problem(ca_cert, leaf, name, when)
    if problem is not None:
        raise CertError(
            f"the new certificate for {name} does not verify against the CA ({problem}); "
            "check --domain and --additional-dnsname against the CA's name constraints"
        )


def _verify_problem(
    ca_cert: x509.Certificate, leaf: x509.Certificate, name: str, when: dt.datetime
) -> str | None:
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "the CA's signature does not verify"
    for cert in (ca_cert, leaf):
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            return f"{cert.subject.rfc4514_string()} is not valid at {when.isoformat()}"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = san.get_values_for_type(x509.DNSName)
    if name.lower() not in (n.lower() for n in dns_names):
        return f"{name} is not among its DNS names"
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    for value in dns_names:
        if not _dns_allowed(value, constraints):
            return f"the CA's name constraints do not permit {value}"
    for ip in san.get_values_for_type(x509.IPAddress):
        if isinstance(ip, _IP_TYPES) and not _ip_allowed(ip, constraints):
            return f"the CA's name constraints do not permit {ip}"
    return None


def _reverse_labels(name: str) -> list[str] | None:
    """Go's domainToReverseLabels: labels last first; None for an empty label or a byte
    outside printable ASCII. Underscores are fine, as they are for Go."""
    labels = name.split(".")[::-1]
    if any(not label or any(not 33 <= ord(c) <= 126 for c in label) for label in labels):
        return None
    return labels


def _dns_within(name: str, constraint: str) -> bool:
    """Go's matchDomainConstraint: `example.com` permits itself and every name below it,
    `.example.com` only the names below it; labels compare case-insensitively."""
    if not constraint:
        return True
    must_have_subdomains = constraint.startswith(".")
    labels = _reverse_labels(name)
    wanted = _reverse_labels(constraint.removeprefix("."))
    if labels is None or wanted is None:
        return False
    if len(labels) < len(wanted) or (must_have_subdomains and len(labels) == len(wanted)):
        return False
    return all(a.lower() == b.lower() for a, b in zip(wanted, labels, strict=False))


def _dns_allowed(name: str, constraints: x509.NameConstraints) -> bool:
    excluded = [c.value for c in constraints.excluded_subtrees or () if isinstance(c, x509.DNSName)]
    if any(_dns_within(name, c) for c in excluded):
        return False
    permitted = [
        c.value for c in constraints.permitted_subtrees or () if isinstance(c, x509.DNSName)
    ]
    return not permitted or any(_dns_within(name, c) for c in permitted)


def _ip_allowed(ip: _AnyIP, constraints: x509.NameConstraints) -> bool:
    def networks(subtrees: Iterable[x509.GeneralName] | None) -> list[Any]:
        return [c.value for c in subtrees or () if isinstance(c, x509.IPAddress)]

    if any(ip in net for net in networks(constraints.excluded_subtrees)):
        return False
    permitted = networks(constraints.permitted_subtrees)
    return not permitted or any(ip in net for net in permitted)


# --------------------------------------------------------------------------- public API


def create_ca(
    domain: str = DEFAULT_DOMAIN,
    days: int = DEFAULT_CA_DAYS,
    *,
    name_constraint: bool = False,
    additional_constraints: Iterable[str] = (),
    common_name: str | None = None,
    cluster_id: str | None = None,
) -> Issued:
    """A self-signed agent CA like `consul tls ca create`."""
    _check_domain(domain, "--domain", "consul")
    _check_days(days)
    extra = _clean_names(additional_constraints)
    if extra and not name_constraint:
        # consul silently ignores them; a CA without the constraint the user asked for is worse.
        raise CertInputError(
            "--additional-name-constraint only takes effect with --name-constraint; "
            "add --name-constraint or drop --additional-name-constraint"
        )
    for constraint in extra:
        # A leading '.' is Go's "subdomains only" form.
        _check_domain(
            constraint, "--additional-name-constraint", "example.com", prefixes=(".", "*.")
        )
    if cluster_id:
        _check_domain(cluster_id, "--cluster-id", "8f7ad6c8-4bc1-4d5e-9a6b-3c2d1e0f9a8b")
    if common_name and len(common_name) > _MAX_COMMON_NAME:
        raise CertInputError(
            f"--common-name has {len(common_name)} characters; an X.509 common name holds at "
            f"most {_MAX_COMMON_NAME}"
        )

    key = _new_key()
    serial = _serial()
    subject = _ca_subject(common_name or f"Consul Agent CA {serial}")
    kid = key_id(key.public_key())
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(kid), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(kid, None, None), critical=False)
    )
    if cluster_id:
        spiffe = f"spiffe://{cluster_id}.{domain}"
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=False
        )
    if name_constraint:
        permitted = [*extra, domain, _LOCALHOST]
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(n) for n in permitted], excluded_subtrees=None
            ),
            critical=True,
        )
    cert = builder.sign(key, hashes.SHA256())
    return Issued(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def create_cert(
    ca: Issued,
    kind: CertKind,
    *,
    dc: str = DEFAULT_DC,
    domain: str = DEFAULT_DOMAIN,
    node: str | None = None,
    days: int = DEFAULT_CERT_DAYS,
    additional_dnsnames: Iterable[str] = (),
    additional_ips: Iterable[str] = (),
) -> Issued:
    """A server, client or CLI certificate signed by `ca`, like `consul tls cert create`.

    Raises `CertError` for bad input, an unusable CA, or a result that does not verify against the
    CA (for instance a --domain outside the CA's name constraints).
    """
    dnsnames = _clean_names(additional_dnsnames)
    ip_values = _clean_names(additional_ips)
    check_cert_request(
        kind,
        dc=dc,
        domain=domain,
        node=node,
        days=days,
        additional_dnsnames=dnsnames,
        additional_ips=ip_values,
    )
    ips = _parse_ips(ip_values)
    ca_cert, ca_key = _parse_ca(ca)

    name = f"{kind}.{dc}.{domain}"
    eku: list[x509.ObjectIdentifier] = []
    if kind == "server":
        node_names = [f"{node}.server.{dc}.{domain}"] if node else []
        dns = [*dnsnames, *node_names, name, _LOCALHOST]
        ips = [*ips, _LOOPBACK]
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    elif kind == "client":
        dns = [*dnsnames, name, _LOCALHOST]
        ips = [*ips, _LOOPBACK]
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]  # consul's order
    else:
        dns = [name, _LOCALHOST]

    key = _new_key()
    not_before, not_after = _validity(days)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(key_id(key.public_key())), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    _verify(ca_cert, cert, name, not_before)
    return Issued(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def ca_paths(directory: str | os.PathLike[str], domain: str) -> tuple[Path, Path]:
    """Where `write_ca` puts the CA: `<domain>-agent-ca.pem` and `<domain>-agent-ca-key.pem`."""
    base = Path(directory)
    return base / f"{domain}-agent-ca.pem", base / f"{domain}-agent-ca-key.pem"


def cert_paths(
    directory: str | os.PathLike[str], kind: CertKind, dc: str, domain: str, index: int
) -> tuple[Path, Path]:
    """`<dc>-<kind>-<domain>-<index>.pem` and `...-<index>-key.pem`, consul's names."""
    stem = f"{dc}-{kind}-{domain}-{index}"
    base = Path(directory)
    return base / f"{stem}.pem", base / f"{stem}-key.pem"


def check_ca_absent(directory: str | os.PathLike[str], domain: str) -> tuple[Path, Path]:
    """Raise `CertError` if either CA file exists in `directory`; return both paths otherwise."""
    _check_domain(domain, "--domain", "consul")
    paths = ca_paths(directory, domain)
    for path in paths:
        if os.path.lexists(path):
            raise CertError(_exists_message(path))
    return paths


def write_ca(issued: Issued, directory: str | os.PathLike[str], domain: str) -> tuple[Path, Path]:
    """Write the CA certificate (0644) and key (0600); refuse to overwrite either file."""
    cert_path, key_path = check_ca_absent(directory, domain)
    _ensure_dir(Path(directory))
    try:
        _publish(issued, cert_path, key_path)
    except FileExistsError as exc:
        # Lost a race with another writer between the check above and the link.
        raise CertError(_exists_message(Path(exc.filename or cert_path))) from None
    return cert_path, key_path


def write_cert(
    issued: Issued, directory: str | os.PathLike[str], kind: CertKind, dc: str, domain: str
) -> tuple[Path, Path]:
    """Write a certificate (0644) and key (0600) under the first index whose two files are free."""
    if kind not in CERT_KINDS:
        raise CertInputError(
            f"unknown certificate kind {kind!r}; pass one of {', '.join(CERT_KINDS)}"
        )
    check_datacenter(dc)
    _check_domain(domain, "--domain", "consul")
    _ensure_dir(Path(directory))
    for index in range(_MAX_INDEX + 1):
        cert_path, key_path = cert_paths(directory, kind, dc, domain, index)
        if os.path.lexists(cert_path) or os.path.lexists(key_path):
            continue
        try:
            _publish(issued, cert_path, key_path)
        except FileExistsError:
            continue  # somebody took this index meanwhile; try the next one
        return cert_path, key_path
    raise CertError(
        f"no free file name {dc}-{kind}-{domain}-<n>.pem for n up to {_MAX_INDEX} in "
        f"{directory}; clean up old certificates or pick another --dir"
    )


def load_ca(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Issued:
    """Read a CA written by `write_ca` (or by consul) and check that the key matches."""
    cert_pem = _read(cert_path, "CA certificate", "--ca")
    key_pem = _read(key_path, "CA key", "--key")
    issued = Issued(cert_pem=cert_pem, key_pem=key_pem)
    try:
        _parse_ca(issued)
    except CertError as exc:
        raise CertError(f"{cert_path} / {key_path}: {exc}") from None
    return issued


# --------------------------------------------------------------------------- files


def _exists_message(path: Path) -> str:
    return f"{path} already exists; refusing to overwrite it: move it away or pick another --dir"


def _read(path: str | os.PathLike[str], what: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(
            f"{what} {path} not found; create one with `meshgw tls ca create` "
            f"(same --domain and --dir) or point {flag} at it"
        ) from None
    except OSError as exc:
        raise CertError(f"cannot read {what} {path}: {exc.strerror}; fix {flag}") from None


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(
            f"cannot create directory {directory}: {exc.strerror}; pick a writable --dir"
        ) from None


def _publish(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Atomically create both files, never replacing an existing one.

    Each file is staged fully (data, mode, fsync) in a temporary file of the target directory and
    hard-linked to its name: a link fails if the name exists, so no reader ever sees a partial
    file and no concurrent writer's file is clobbered. If the certificate cannot be placed, the key
    placed a moment before is removed again.
    """
    directory = cert_path.parent
    staged: list[Path] = []
    try:
        key_tmp = _stage(directory, issued.key_pem, KEY_MODE)
        staged.append(key_tmp)
        cert_tmp = _stage(directory, issued.cert_pem, CERT_MODE)
        staged.append(cert_tmp)
        _link_new(key_tmp, key_path)
        try:
            _link_new(cert_tmp, cert_path)
        except BaseException:
            key_path.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
    except FileExistsError:
        raise
    except OSError as exc:
        raise CertError(
            f"cannot write into {directory}: {exc.strerror}; pick a writable --dir"
        ) from None
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def _stage(directory: Path, data: bytes, mode: int) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".meshgw-tls-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # before the data, so a key is never group-readable
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _link_new(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        # os.link names the source first; report the name the user cares about.
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
    except OSError as exc:
        # Some filesystems (vfat, some network mounts) have no hard links: fall back to a rename,
        # atomic too, guarded by an existence check that is only racy there.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


def _fsync_dir(directory: Path) -> None:
    # Makes the new names durable; best effort because not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
