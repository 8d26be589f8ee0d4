"""The volume attribute vocabulary: prefixes, names, which are templated or lists, and limits.

Data only, shared by the parser (``spec/attributes``) and its attribute families.
"""

from __future__ import annotations

from agent.spec.trust import TRUST_ATTRIBUTES

OWN_PREFIX = "csi.cert-agent.io/"
COMPAT_PREFIX = "csi.cert-manager.io/"
POD_INFO_PREFIX = "csi.storage.k8s.io/"
MAX_VALUE_BYTES = 4096
# Limits on what one volume may store in its metadata on the node's tmpfs (issue 8: 1,000
# annotations of 3.9 KB each filled it). An annotation key is at most a 253-character prefix, '/'
# and a 63-character name; cert-manager itself allows 256 KiB of annotations per object, far more
# than a per-pod CertificateRequest needs.
MAX_KEY_CHARS = 253 + 1 + 63
MAX_ANNOTATIONS = 32
MAX_ANNOTATION_BYTES = 8 * 1024
MAX_CONTEXT_BYTES = 32 * 1024
# 4294967295 is (gid_t)-1, which chown(2) reads as "leave the group alone": the files would stay
# root-owned and unreadable to the pod, so the largest usable group id is one less.
MAX_GROUP_ID = 4294967294


# Subject list attributes -> (SubjectSpec field, upper bound in characters from RFC 5280 / X.520).
SUBJECT_LISTS: dict[str, tuple[str, int]] = {
    "organizations": ("organizations", 64),
    "organizationalunits": ("organizational_units", 64),
    "countries": ("countries", 2),
    "provinces": ("provinces", 128),
    "localities": ("localities", 128),
    "streetaddresses": ("street_addresses", 128),
    "postalcodes": ("postal_codes", 40),
}

TEMPLATED_ATTRIBUTES: frozenset[str] = frozenset(
    {"common-name", "dns-names", "uri-sans", "email-sans", "other-names", "literal-subject"}
    | set(SUBJECT_LISTS)
)

ATTRIBUTE_NAMES: frozenset[str] = (
    TEMPLATED_ATTRIBUTES
    | {
        "issuer-name",
        "issuer-kind",
        "issuer-group",
        "ip-sans",
        "serialnumber",
        "duration",
        "renew-before",
        "key-algorithm",
        "key-size",
        "key-encoding",
        "reuse-private-key",
        "key-usages",
        "is-ca",
        "certificate-file",
        "ca-file",
        "privatekey-file",
        "fs-group",
        "pkcs12-enable",
        "pkcs12-filename",
        "pkcs12-password",
        "credential-bundle-file",
    }
    | TRUST_ATTRIBUTES
)

# At least one of these must be present or the certificate names nothing.
IDENTITY_ATTRIBUTES = (
    "common-name",
    "dns-names",
    "uri-sans",
    "email-sans",
    "ip-sans",
    "other-names",
    "literal-subject",
)
# Of these, only "" means "not set": a password of spaces is still a password.
SECRET_ATTRIBUTES = frozenset({"pkcs12-password"})
# Templated attributes that hold comma-separated lists: split before expanding, so a value that
# comes from the pod (even one that got past the name rules) can never add an entry.
LIST_ATTRIBUTES = frozenset({"dns-names", "uri-sans", "email-sans", "other-names"}) | frozenset(
    {"organizations", "organizationalunits", "countries", "provinces", "localities"}
    | {"streetaddresses", "postalcodes"}
)
