"""X.509 name constraints for the node CA: built from the permitted lists, checked on every leaf.

The node CA asks its issuer to put these constraints into its certificate, so that relying parties
(OpenSSL, Go, Java) refuse any leaf outside them whatever the node does. An issuer may drop them;
then the agent applies the same rules itself before it signs (``violations``).

Matching follows RFC 5280 4.2.1.10 as OpenSSL implements it (the stricter of the common verifiers):

- DNS ``svc.cluster.local`` permits that name and every name below it; ``.example.com`` only names
  below it.
- URI constraints name a *host*: ``cluster.local`` permits exactly that host
  (``spiffe://cluster.local/ns/a/sa/b``), ``.example.com`` hosts below it. A constraint written as
  a URI (``spiffe://…``) would reject every URI SAN in OpenSSL and Go, so it is refused here.
- email ``user@example.com`` one mailbox, ``example.com`` mailboxes at that host, ``.example.com``
  mailboxes at hosts below it.
- IP: a CIDR network. With no permitted network the CA excludes ``0.0.0.0/0`` and ``::/0``, so it
  can never vouch for an IP address (without a subtree of a type, RFC 5280 leaves that type open).
- A name type without permitted subtrees is unconstrained; otherNames are never constrained.
- A subject CN that looks like a host name is checked as a DNS name when the leaf has no DNS SAN
  (OpenSSL does this for legacy clients that still read the CN).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^\.?{_LABEL}(\.{_LABEL})*$")
_HOSTNAME_CN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})+$")
_MAILBOX = re.compile(r"^[^@\s]+@[^@\s]+$")

ALL_IPV4 = ipaddress.ip_network("0.0.0.0/0")
ALL_IPV6 = ipaddress.ip_network("::/0")


class ConstraintError(ValueError):
    """A permitted value is not a valid constraint; the message says why and what to write."""


@dataclass(frozen=True)
class PermittedNames:
    """What a node CA may vouch for; ``extension()`` turns it into a NameConstraints extension."""

    dns: tuple[str, ...] = ()
    uri_hosts: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    ip_networks: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        dns: Iterable[str] = (),
        uri_hosts: Iterable[str] = (),
        emails: Iterable[str] = (),
        ip_networks: Iterable[str] = (),
    ) -> PermittedNames:
        """Validated and normalised (lower case, networks in canonical form)."""
        return cls(
            dns=tuple(_check_domain(d, "DNS") for d in dns),
            uri_hosts=tuple(_check_uri_host(u) for u in uri_hosts),
            emails=tuple(_check_email(e) for e in emails),
            ip_networks=tuple(_check_network(n) for n in ip_networks),
        )

    def extension(self) -> x509.NameConstraints:
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        permitted += [x509.UniformResourceIdentifier(u) for u in self.uri_hosts]
        permitted += [x509.RFC822Name(e) for e in self.emails]
        permitted += [x509.IPAddress(ipaddress.ip_network(n)) for n in self.ip_networks]
        excluded: list[x509.GeneralName] | None = None
        if not self.ip_networks:
            excluded = [x509.IPAddress(ALL_IPV4), x509.IPAddress(ALL_IPV6)]
        return x509.NameConstraints(
            permitted_subtrees=permitted or None, excluded_subtrees=excluded
        )

    def describe(self) -> str:
        parts = [
            f"DNS {', '.join(self.dns) or '(any)'}",
            f"URI hosts {', '.join(self.uri_hosts) or '(any)'}",
            f"email {', '.join(self.emails) or '(any)'}",
            f"IP {', '.join(self.ip_networks) or '(none)'}",
        ]
        return "; ".join(parts)


def constraints_of(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def carries(cert: x509.Certificate, wanted: x509.NameConstraints) -> bool:
    """Whether ``cert`` holds exactly the constraints asked for (an issuer may drop them)."""
    have = constraints_of(cert)
    if have is None:
        return False
    return set(have.permitted_subtrees or ()) == set(wanted.permitted_subtrees or ()) and set(
        have.excluded_subtrees or ()
    ) == set(wanted.excluded_subtrees or ())


def violations(
    constraints: x509.NameConstraints, subject: x509.Name, sans: Iterable[x509.GeneralName]
) -> list[str]:
    """Every name of a leaf that ``constraints`` forbid, as ``"DNS evil.google.com"`` etc."""
    names = list(sans)
    if not any(isinstance(n, x509.DNSName) for n in names):
        for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value if isinstance(attribute.value, str) else ""
            if _HOSTNAME_CN.match(value.lower()):
                names.append(x509.DNSName(value))
    permitted = list(constraints.permitted_subtrees or ())
    excluded = list(constraints.excluded_subtrees or ())
    found: list[str] = []
    for name in names:
        kind = type(name)
        if kind not in _MATCHERS:
            continue  # otherName, directoryName, ...: not constrained here
        same = [c for c in permitted if type(c) is kind]
        outside = bool(same) and not any(_MATCHERS[kind](name, c) for c in same)
        if outside or any(_MATCHERS[kind](name, c) for c in excluded if type(c) is kind):
            found.append(_describe(name))
    return found


# ---- matching


def _dns_match(name: x509.GeneralName, constraint: x509.GeneralName) -> bool:
    assert isinstance(name, x509.DNSName) and isinstance(constraint, x509.DNSName)
    return _domain_match(name.value.lower().rstrip("."), constraint.value.lower(), below=True)


def _uri_match(name: x509.GeneralName, constraint: x509.GeneralName) -> bool:
    assert isinstance(name, x509.UniformResourceIdentifier)
    assert isinstance(constraint, x509.UniformResourceIdentifier)
    try:
        host = urlsplit(name.value).hostname
    except ValueError:
        return False
    if not host:
        return False  # OpenSSL and Go reject a URI without a host under URI constraints
    return _domain_match(host.lower(), constraint.value.lower(), below=False)


def _email_match(name: x509.GeneralName, constraint: x509.GeneralName) -> bool:
    assert isinstance(name, x509.RFC822Name) and isinstance(constraint, x509.RFC822Name)
    mailbox, want = name.value, constraint.value
    local, _, domain = mailbox.rpartition("@")
    if "@" in want:
        want_local, _, want_domain = want.rpartition("@")
        return local == want_local and domain.lower() == want_domain.lower()
    return _domain_match(domain.lower(), want.lower(), below=False)


def _ip_match(name: x509.GeneralName, constraint: x509.GeneralName) -> bool:
    assert isinstance(name, x509.IPAddress) and isinstance(constraint, x509.IPAddress)
    address, network = name.value, constraint.value
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return False
    if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return False
    return address.version == network.version and address in network


def _domain_match(host: str, constraint: str, *, below: bool) -> bool:
    """``.x`` matches hosts under x; ``x`` matches x itself, and names under it when ``below``
    (DNS constraints; URI and email host constraints name one host)."""
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint or (below and host.endswith("." + constraint))


_MATCHERS = {
    x509.DNSName: _dns_match,
    x509.UniformResourceIdentifier: _uri_match,
    x509.RFC822Name: _email_match,
    x509.IPAddress: _ip_match,
}


def _describe(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS {name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI {name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email {name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP {name.value}"
    return str(name)


# ---- parsing


def _check_domain(value: str, what: str) -> str:
    text = value.strip().lower()
    if not _DOMAIN.match(text) or len(text) > 253:
        raise ConstraintError(
            f"{value!r} is not a {what} name constraint: write a domain such as "
            "svc.cluster.local (itself and every name below it) or .example.com (only below it)"
        )
    return text


def _check_uri_host(value: str) -> str:
    if "://" in value or "/" in value:
        raise ConstraintError(
            f"{value!r} is not a URI name constraint: RFC 5280 URI constraints name a host, not a "
            "URI prefix (a constraint written as spiffe://… rejects every URI SAN in OpenSSL and "
            "Go); for SPIFFE IDs spiffe://cluster.local/… write cluster.local"
        )
    return _check_domain(value, "URI host")


def _check_email(value: str) -> str:
    text = value.strip()
    if "@" in text:
        if not _MAILBOX.match(text):
            raise ConstraintError(f"{value!r} is not an email name constraint (user@example.com)")
        local, _, domain = text.rpartition("@")
        return f"{local}@{_check_domain(domain, 'email')}"
    return _check_domain(text, "email")


def _check_network(value: str) -> str:
    try:
        return ipaddress.ip_network(value.strip(), strict=True).compressed
    except ValueError as exc:
        raise ConstraintError(
            f"{value!r} is not an IP name constraint: write a network such as 10.0.0.0/8 ({exc})"
        ) from exc
