"""``conec-trio certs ca`` / ``conec-trio certs issue``: make a CA, and certificates it signs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..certs import CA_CERT_FILE, CA_KEY_FILE, issue_cert, load_ca, save_pair, write_ca
from ..forward.console import error, show

__all__ = ["add_certs_command", "issue_paths"]


def add_certs_command(subparsers: Any) -> None:
    """Register ``conec-trio certs`` and its actions."""
    parser = subparsers.add_parser(
        "certs",
        help="make a CA, and certificates signed by it",
        description="Make the certificates a deployment needs: a CA (certs ca), and "
        "certificates it signs for a coordinator or for clients (certs issue).",
    )
    certs_sub = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    ca = certs_sub.add_parser(
        "ca",
        help="make a CA in DIR",
        description=f"Make a certificate authority in DIR (created if needed): "
        f"{CA_CERT_FILE} is what clients pass as --ca and a coordinator as --client-ca; "
        f"{CA_KEY_FILE} signs certificates and must stay secret. An existing CA is never "
        "replaced.",
    )
    ca.add_argument("dir", metavar="DIR", type=Path)
    ca.add_argument(
        "--common-name",
        help="the CA's name (default: 'conec-trio CA' and a random tag, unique to this CA)",
    )
    ca.add_argument("--days", type=int, default=3650, help="validity (default: 3650)")
    ca.set_defaults(run=_run_certs_ca)

    issue = certs_sub.add_parser(
        "issue",
        help="issue a certificate for NAME, signed by the CA in DIR",
        description="Issue a certificate for NAME signed by the CA in --ca DIR, good for a "
        "coordinator (NAME: its host name or IP address) or a client (NAME: its client id). "
        "OUT is a path prefix: the certificate goes to OUT.pem and its private key to OUT.key "
        "(an OUT ending in .pem is taken as the certificate file itself). Existing files are "
        "not overwritten without --force.",
    )
    issue.add_argument("--ca", metavar="DIR", type=Path, required=True, help="the CA directory")
    issue.add_argument("name", metavar="NAME", help="client id, host name or IP address")
    issue.add_argument("out", metavar="OUT", help="path prefix of the files written")
    issue.add_argument(
        "--alt-name",
        metavar="NAME",
        action="append",
        default=[],
        help="one more name the certificate is valid for (repeatable), e.g. a coordinator's "
        "IP address next to its host name",
    )
    issue.add_argument("--days", type=int, default=825, help="validity (default: 825)")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(run=_run_certs_issue)


def _run_certs_ca(args: argparse.Namespace) -> int:
    try:
        cert_path, key_path = write_ca(args.dir, args.common_name, days=args.days)
    except (OSError, ValueError) as exc:
        return error(str(exc))
    show(f"CA certificate: {cert_path} (clients: --ca; coordinator: --client-ca)")
    show(f"CA key:         {key_path} (keep it secret: it signs certificates for any name)")
    return 0


def issue_paths(out: str) -> tuple[Path, Path]:
    """``(cert_path, key_path)`` that ``certs issue`` writes for the prefix ``out``."""
    base = out[: -len(".pem")] if out.endswith(".pem") else out
    return Path(base + ".pem"), Path(base + ".key")


def _run_certs_issue(args: argparse.Namespace) -> int:
    cert_path, key_path = issue_paths(args.out)
    if not args.force:
        for path in (cert_path, key_path):
            if path.exists():
                return error(f"{path} already exists (use --force to overwrite it)")
    try:
        ca_cert, ca_key = load_ca(args.ca)
        cert_pem, key_pem = issue_cert(ca_cert, ca_key, [args.name, *args.alt_name], days=args.days)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        save_pair(cert_pem, key_pem, cert_path, key_path)
    except (OSError, ValueError) as exc:
        return error(str(exc))
    names = ", ".join([args.name, *args.alt_name])
    show(f"certificate: {cert_path} (for {names}, signed by {args.ca / CA_CERT_FILE})")
    show(f"key:         {key_path}")
    return 0
