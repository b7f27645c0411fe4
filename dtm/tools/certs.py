"""Generate a local test CA and one certificate per identity, for TLS and mutual TLS.

    python -m dtm.tools.certs --out certs/          (or: make certs)

Writes, under the output directory:

    ca.pem, ca-key.pem                  the test CA (its key signs every certificate below)
    IDENTITY.pem, IDENTITY-key.pem      one per identity: coordinator, inventory, orders,
                                        payment, notification, client, operator

Each certificate's Common Name is its identity, which is what authorization checks
(`dtm.security`). Its subject alternative names are DNS:IDENTITY (so a caller can demand a
given peer with `ssl_target_name_override`), DNS:localhost and IP:127.0.0.1 (so hostname
verification passes on loopback). Keys are EC P-256: generating eight is instant, where RSA
would make every test run pay seconds. Key files are written 0600.

A CA already in the output directory signs the new certificates (--new-ca replaces it,
orphaning what it signed), so one more identity can be added to a directory in use. A CA
that has expired (or is not valid yet) is refused, naming --new-ca: certificates it signed
would fail every handshake. A certificate never outlives the CA that signs it: each is
valid VALID_DAYS, or until the CA expires if that comes first, and the tool warns (stderr)
when the CA it reuses expires within CA_EXPIRY_WARNING.

For local development and tests only: a real deployment takes its certificates from its own
PKI, and this CA key must never sign anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dtm.limits import PARTICIPANT_NAME_PATTERN as IDENTITY_PATTERN

IDENTITIES = (
    "coordinator",
    "inventory",
    "orders",
    "payment",
    "notification",
    "client",
    "operator",
)
CA_NAME = "dtm local test CA"
VALID_DAYS = 365
# Clock skew between the machine that generates and the one that verifies must not make a
# fresh certificate "not yet valid".
BACKDATE = datetime.timedelta(hours=1)
# A reused CA this close to its expiry gets a warning: what it signs expires with it.
CA_EXPIRY_WARNING = datetime.timedelta(days=30)


def ca_path(out: Path) -> Path:
    return out / "ca.pem"


def cert_path(out: Path, identity: str) -> Path:
    return out / f"{identity}.pem"


def key_path(out: Path, identity: str) -> Path:
    return out / f"{identity}-key.pem"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create the file with `mode` from the start: a chmod after writing leaves a window."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _write_pair(key_file: Path, key_pem: bytes, cert_file: Path, cert_pem: bytes) -> None:
    """Replace a key (written 0600) and its certificate together, or leave both as they were.

    Written one after the other in place, a failure between the two (a directory in the way,
    a full disk) left a new key beside the old certificate: a pair that fails every handshake.
    Both are written to temporary files first, then renamed over the old ones. OSError names
    the file that could not be written."""
    staged = [(key_file, key_pem, 0o600), (cert_file, cert_pem, 0o644)]
    temporaries = [final.with_name(f".{final.name}.tmp") for final, _, _ in staged]
    try:
        for (final, data, mode), temporary in zip(staged, temporaries, strict=True):
            if final.is_dir():  # a rename onto it would fail after the first one succeeded
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(final))
            try:
                _write_new(temporary, data, mode)
            except OSError as error:
                raise OSError(error.errno, error.strerror, str(final)) from None
        for (final, _, _), temporary in zip(staged, temporaries, strict=True):
            os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dtm (test)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _day(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _new_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    identity: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    # Not past the CA's own expiry: a chain is only valid while every certificate in it is.
    expires = min(now + datetime.timedelta(days=VALID_DAYS), ca_cert.not_valid_after_utc)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(identity),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        # Every process is both a server and a client (participants call the coordinator).
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def generate(
    out: Path,
    identities: Sequence[str] = IDENTITIES,
    *,
    new_ca: bool = False,
    now: datetime.datetime | None = None,
) -> Path:
    """One certificate per identity under `out` (created if missing), signed by the CA already
    there (ca.pem and ca-key.pem), else by a new one; `new_ca` makes a new one anyway, which
    orphans every certificate the old one signed. Files of those identities are replaced.
    Returns `out`. ValueError for a bad identity, or a CA there that cannot be used (half
    there, unreadable, expired or not valid yet). `now` (tests) is the time they are made at."""
    now = _now() if now is None else now
    for identity in identities:
        # An identity names files and appears in authorization messages: keep it plain.
        if not IDENTITY_PATTERN.fullmatch(identity) or identity == "ca":
            raise ValueError(f"identity {identity!r}: use 1..64 characters of [a-z0-9_-], not 'ca'")
    out.mkdir(parents=True, exist_ok=True)
    existing = None if new_ca else _existing_ca(out, now)
    if existing is None:
        ca_key, ca_cert = _new_ca(now)
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        _write_pair(key_path(out, "ca"), _key_pem(ca_key), ca_path(out), ca_pem)
    else:
        ca_key, ca_cert = existing
    for identity in identities:
        key, cert = _issue(identity, ca_key, ca_cert, now)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_pair(key_path(out, identity), _key_pem(key), cert_path(out, identity), cert_pem)
    return out


def _existing_ca(
    out: Path, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The CA `generate` wrote in `out` before, or None when there is none. ValueError when
    only half of it is there, it is not one this tool can sign with, or it is not valid at
    `now` (what it signed would fail every handshake)."""
    cert_file, key_file = ca_path(out), key_path(out, "ca")
    if not cert_file.exists() and not key_file.exists():
        return None
    again = "; pass --new-ca to make a new CA (the certificates the old one signed stop working)"
    if not (cert_file.is_file() and key_file.is_file()):
        present, absent = (cert_file, key_file) if cert_file.exists() else (key_file, cert_file)
        raise ValueError(f"{present} is there but {absent} is not{again}")
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"the CA in {out} cannot be read ({error}){again}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file} is not an EC key as this tool makes{again}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"{key_file} is not the key of {cert_file}{again}")
    if cert.not_valid_after_utc <= now:
        raise ValueError(
            f"the test CA {cert_file} expired on {_day(cert.not_valid_after_utc)}{again}"
        )
    if now < cert.not_valid_before_utc:
        raise ValueError(
            f"the test CA {cert_file} is not valid before {_day(cert.not_valid_before_utc)} "
            f"(is this machine's clock right?){again}"
        )
    return key, cert


def ca_expiry(out: Path) -> datetime.datetime:
    """When the CA in `out` (as `generate` left it) expires."""
    return x509.load_pem_x509_certificate(ca_path(out).read_bytes()).not_valid_after_utc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dtm.tools.certs",
        description="Generate a local test CA and certificates (development and tests only). "
        "A CA already in the output directory (ca.pem, ca-key.pem) signs the new certificates, "
        "so the others there keep working; an expired one is refused (use --new-ca), and no "
        "certificate is valid past its CA's expiry.",
    )
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output directory")
    parser.add_argument(
        "--identity",
        action="append",
        default=None,
        help=f"identity to issue a certificate for (repeatable; default: {', '.join(IDENTITIES)})",
    )
    parser.add_argument(
        "--new-ca",
        action="store_true",
        help="replace the CA in the output directory with a new one (the certificates the old "
        "one signed, there or elsewhere, stop working)",
    )
    options = parser.parse_args(argv)
    identities = options.identity or list(IDENTITIES)
    reused = not options.new_ca and ca_path(options.out).exists()
    try:
        out = generate(options.out, identities, new_ca=options.new_ca)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        # The file or directory that failed (a directory in the way of one certificate).
        where = error.filename or options.out
        parser.error(f"cannot write to {where}: {error.strerror or error}")
    signer = f"the test CA already in {out}" if reused else "a new test CA"
    expires = ca_expiry(out)
    until = min(_now() + datetime.timedelta(days=VALID_DAYS), expires)
    print(
        f"certificates for {', '.join(identities)} signed by {signer}, written to {out}/ "
        f"(valid until {_day(until)})"
    )
    if reused and expires - _now() < CA_EXPIRY_WARNING:
        print(
            f"warning: the test CA in {out} expires on {_day(expires)}, and these certificates "
            "with it; --new-ca makes a new CA (then regenerate every certificate it signed)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
