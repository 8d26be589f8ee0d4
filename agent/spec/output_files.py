"""What the volume holds: file names (each its own), PKCS#12 keystore, fs-group."""

from __future__ import annotations

from agent.errors import InvalidArgument
from agent.spec.attribute_names import MAX_GROUP_ID
from agent.spec.attribute_state import Attr, ParseState, has_control, parse_bool, parse_int
from agent.spec.model import FileNames, Pkcs12Spec
from agent.spec.templating import quote


def fs_group(state: ParseState) -> int | None:
    attr = state.attrs.get("fs-group")
    return None if attr is None else parse_int(attr, 1, MAX_GROUP_ID, "group id")


def files_and_pkcs12(state: ParseState) -> tuple[FileNames, Pkcs12Spec | None]:
    enable_attr = state.attrs.get("pkcs12-enable")
    enabled = state.attempt(False, parse_bool, enable_attr)
    names: dict[str, str] = {}
    defaults = {
        "certificate-file": "tls.crt",
        "ca-file": "ca.crt",
        "privatekey-file": "tls.key",
        "pkcs12-filename": "keystore.p12",
    }
    for name, default in defaults.items():
        attr = state.attrs.get(name)
        names[name] = default if attr is None else state.attempt("", check_file_name, attr)
    bundle_attr = state.attrs.get("credential-bundle-file")
    if bundle_attr is not None:
        names["credential-bundle-file"] = state.attempt("", check_file_name, bundle_attr)
    pkcs12 = None
    enable_key = state.key_for("pkcs12-enable")
    if enabled:
        if "pkcs12-password" not in state.attrs:
            state.errors.append(
                InvalidArgument(
                    f"{state.key_for('pkcs12-password')} is required when {enable_key} is true",
                    state.key_for("pkcs12-password"),
                )
            )
        else:
            password = state.attrs["pkcs12-password"].raw
            pkcs12 = Pkcs12Spec(filename=names["pkcs12-filename"], password=password)
    else:
        del names["pkcs12-filename"]
        for name in ("pkcs12-password", "pkcs12-filename"):
            if name in state.attrs:
                state.errors.append(
                    InvalidArgument(
                        f"{state.key_for(name)} is set but {enable_key} is not true; "
                        f'set {enable_key}: "true" or remove it',
                        state.key_for(name),
                    )
                )
    by_file: dict[str, list[str]] = {}
    for name, file_name in names.items():
        if file_name:  # an invalid one is already reported
            by_file.setdefault(file_name, []).append(name)
    for file_name, users in by_file.items():
        if len(users) < 2:
            continue
        # Blame an attribute the user wrote, not a default.
        blamed = next((n for n in users if n in state.attrs), users[0])
        others = [
            state.key_for(n) if n in state.attrs else f"{n} (default)" for n in users if n != blamed
        ]
        state.errors.append(
            InvalidArgument(
                f"{state.key_for(blamed)}: {quote(file_name)} is also used by "
                f"{', '.join(others)}; every file in the volume needs its own name",
                state.key_for(blamed),
            )
        )
    files = FileNames(
        certificate=names["certificate-file"],
        ca=names["ca-file"],
        private_key=names["privatekey-file"],
        credential_bundle=names.get("credential-bundle-file") or None,
    )
    return files, pkcs12


def check_file_name(attr: Attr) -> str:
    name = attr.value
    problem = None
    if "/" in name:
        problem = "contains '/'"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif name != name.strip():
        problem = "has leading or trailing spaces"
    elif has_control(name):
        problem = "contains control characters"
    elif len(name.encode("utf-8")) > 255:
        problem = "is longer than 255 bytes"
    if problem is not None:
        attr.fail(
            f"{quote(name)} is not a plain file name: it {problem}; use a name such as tls.crt"
        )
    return name
