"""`meshgw tls ...`: the `consul tls ca create` / `consul tls cert create` commands.

Flags, defaults, file names and output lines follow consul, and so does the flag spelling: the
commands of Consul's docs (`-server -dc dc2`) run as pasted (`meshgw.tls.goflags`). The work is in
`meshgw.tls.certs`. Errors are one `meshgw: error: ...` line on stderr, never a traceback: exit
status 2 for a usage error (a bad flag or value, `CertInputError`), 1 for anything else
(a missing CA, a file that exists, a certificate outside the CA's constraints).
"""

from __future__ import annotations

from pathlib import Path

import click

from meshgw.tls.certs import (
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    DEFAULT_DC,
    DEFAULT_DOMAIN,
    CertError,
    CertInputError,
    CertKind,
    ca_paths,
    check_ca_absent,
    check_cert_request,
    create_ca,
    create_cert,
    load_ca,
    write_ca,
    write_cert,
)
from meshgw.tls.goflags import CommandError, CommandUsageError, GoFlagGroup

_SERVER_WARNING = """\
==> WARNING: Server Certificates grants authority to become a
    server and access all state in the cluster including root keys
    and all ACL tokens. Do not distribute them to production hosts
    that are not server nodes. Store them as securely as CA keys."""

_DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write into (created if missing). The project convention is `--dir certs`.",
)


def _refusal(error: CertError) -> CommandError:
    if isinstance(error, CertInputError):
        return CommandUsageError(str(error))
    return CommandError(str(error))


@click.group(
    "tls",
    cls=GoFlagGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
def tls_group() -> None:
    """Create the agent CA and agent certificates, like `consul tls`.

    Consul's spelling works too: `meshgw tls cert create -server -dc dc2 -node consul-server-0`
    (one dash or two, `-flag value` or `-flag=value`)."""


@tls_group.group("ca")
def ca_group() -> None:
    """The certificate authority that signs agent certificates."""


@ca_group.command("create")
@click.option("--domain", default=DEFAULT_DOMAIN, show_default=True, help="Consul domain.")
@click.option(
    "--days",
    type=int,  # range checked by the library, so the refusal is one line
    default=DEFAULT_CA_DAYS,
    show_default=True,
    help="Days the CA is valid from now.",
)
@click.option(
    "--name-constraint",
    is_flag=True,
    help="Permit only <domain>, localhost and --additional-name-constraint DNS names.",
)
@click.option(
    "--additional-name-constraint",
    "additional_name_constraints",
    multiple=True,
    metavar="NAME",
    help="Another permitted DNS name (repeatable; needs --name-constraint).",
)
@click.option("--common-name", default=None, help="CN instead of 'Consul Agent CA <serial>'.")
@click.option("--cluster-id", default=None, help="Adds the SAN URI spiffe://<cluster-id>.<domain>.")
@_DIR_OPTION
def ca_create(
    domain: str,
    days: int,
    name_constraint: bool,
    additional_name_constraints: tuple[str, ...],
    common_name: str | None,
    cluster_id: str | None,
    directory: Path,
) -> None:
    """Create <domain>-agent-ca.pem and <domain>-agent-ca-key.pem; never overwrites them."""
    try:
        # Checked first so that an existing CA is reported before any key is generated.
        check_ca_absent(directory, domain)
        issued = create_ca(
            domain,
            days,
            name_constraint=name_constraint,
            additional_constraints=additional_name_constraints,
            common_name=common_name,
            cluster_id=cluster_id,
        )
        cert_path, key_path = write_ca(issued, directory, domain)
    except CertError as exc:
        raise _refusal(exc) from None
    click.echo(f"==> Saved {cert_path}")
    click.echo(f"==> Saved {key_path}")


@tls_group.group("cert")
def cert_group() -> None:
    """Agent certificates signed by the CA."""


@cert_group.command("create")
@click.option("--server", is_flag=True, help="Server certificate.")
@click.option("--client", is_flag=True, help="Client certificate.")
@click.option("--cli", is_flag=True, help="CLI certificate.")
@click.option("--dc", default=DEFAULT_DC, show_default=True, help="Datacenter.")
@click.option(
    "--node",
    default=None,
    help="Server node name; adds <node>.server.<dc>.<domain> (needs --server).",
)
@click.option("--domain", default=DEFAULT_DOMAIN, show_default=True, help="Consul domain.")
@click.option(
    "--days",
    type=int,  # range checked by the library, so the refusal is one line
    default=DEFAULT_CERT_DAYS,
    show_default=True,
    help="Days the certificate is valid from now.",
)
@click.option(
    "--additional-dnsname",
    "additional_dnsnames",
    multiple=True,
    metavar="NAME",
    help="Extra DNS SAN, listed first (repeatable; localhost is always included).",
)
@click.option(
    "--additional-ipaddress",
    "additional_ips",
    multiple=True,
    metavar="IP",
    help="Extra IP SAN, listed first (repeatable; 127.0.0.1 is always included).",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA certificate.  [default: <dir>/<domain>-agent-ca.pem]",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA key.  [default: <dir>/<domain>-agent-ca-key.pem]",
)
@_DIR_OPTION
def cert_create(
    server: bool,
    client: bool,
    cli: bool,
    dc: str,
    node: str | None,
    domain: str,
    days: int,
    additional_dnsnames: tuple[str, ...],
    additional_ips: tuple[str, ...],
    ca_file: Path | None,
    key_file: Path | None,
    directory: Path,
) -> None:
    """Create <dc>-<kind>-<domain>-<n>.pem and its -key.pem with the first free n."""
    flags: tuple[tuple[CertKind, bool], ...] = (
        ("server", server),
        ("client", client),
        ("cli", cli),
    )
    chosen = [kind for kind, on in flags if on]
    try:
        if len(chosen) != 1:
            raise CertInputError("pass exactly one of --server, --client or --cli")
        kind = chosen[0]
        # Flag mistakes first, so they are not reported as a missing CA.
        check_cert_request(
            kind,
            dc=dc,
            domain=domain,
            node=node,
            days=days,
            additional_dnsnames=additional_dnsnames,
            additional_ips=additional_ips,
        )
        # The CA is looked up in --dir by default: with `--dir certs` for both commands the CA
        # made by `ca create` is found. Without --dir this is consul's ./<domain>-agent-ca.pem.
        default_ca, default_key = ca_paths(directory, domain)
        ca_path = ca_file or default_ca
        key_path = key_file or default_key
        ca = load_ca(ca_path, key_path)
        if kind == "server":
            click.echo(_SERVER_WARNING)
        click.echo(f"==> Using {ca_path} and {key_path}")
        issued = create_cert(
            ca,
            kind,
            dc=dc,
            domain=domain,
            node=node,
            days=days,
            additional_dnsnames=additional_dnsnames,
            additional_ips=additional_ips,
        )
        cert_path, cert_key_path = write_cert(issued, directory, kind, dc, domain)
    except CertError as exc:
        raise _refusal(exc) from None
    click.echo(f"==> Saved {cert_path}")
    click.echo(f"==> Saved {cert_key_path}")
