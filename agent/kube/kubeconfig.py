"""Where the API server is and who the agent is to it: in-cluster service account or kubeconfig.

In a pod (``KUBERNETES_SERVICE_HOST`` set, no ``--kubeconfig``): ``https://<host>:<port>`` (an
IPv6 host in brackets), the service account's ``ca.crt`` as the only trusted CA, and its
``token`` file re-read when it changes (bound tokens rotate; kubelet swaps the file about every
hour, client-go re-reads it every minute; we stat it per request and re-read on change).

Otherwise a kubeconfig: ``--kubeconfig``, else the FIRST file of ``$KUBECONFIG`` (no merging of
several files), else ``~/.kube/config``; its current-context's cluster and user. Supported: server,
certificate-authority(-data), insecure-skip-tls-verify, tls-server-name; token, tokenFile,
client-certificate(-data) + client-key(-data). Relative paths are relative to the kubeconfig's
directory, as kubectl resolves them. Anything else that changes who we are or how we connect
(exec, auth-provider, username/password, impersonation, proxy-url) is refused by name rather
than ignored.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.errors import FailedPrecondition
from agent.kube.rest import Credentials, Endpoint, StaticToken

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0

# Fields we do not implement; each would change the identity or the route, so refuse them.
UNSUPPORTED_USER_FIELDS = {
    "exec": "exec credential plugins are not supported: use a token, tokenFile or client "
    "certificate (or run in the cluster with the service account)",
    "auth-provider": "auth-provider plugins are not supported: use a token, tokenFile or client "
    "certificate",
    "username": "basic authentication (username/password) is not supported",
    "password": "basic authentication (username/password) is not supported",
    "as": "impersonation is not supported",
    "as-uid": "impersonation is not supported",
    "as-groups": "impersonation is not supported",
    "as-user-extra": "impersonation is not supported",
}
UNSUPPORTED_CLUSTER_FIELDS = {
    "proxy-url": "proxy-url is not supported: the agent connects to the server directly",
}


@dataclass
class ClientConfig:
    endpoint: Endpoint
    credentials: Credentials
    source: str  # for messages: "in-cluster service account" or the kubeconfig's path


class FileToken:
    """A bearer token read from a file, re-read when the file changes and at least every
    ``reread_seconds``: one ``stat`` per request, a read only after a rotation."""

    def __init__(
        self,
        path: Path,
        *,
        reread_seconds: float = TOKEN_REREAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._reread = reread_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._value: str | None = None
        self._signature: tuple[int, int, int] | None = None
        self._read_at = 0.0
        self.token()  # a missing or empty file is a configuration error now, not on first use

    def token(self) -> str | None:
        with self._lock:
            try:
                info = self.path.stat()  # follows kubelet's ..data symlink swap
                signature = (info.st_ino, info.st_mtime_ns, info.st_size)
                now = self._clock()
                if signature != self._signature or now - self._read_at >= self._reread:
                    value = self.path.read_text().strip()
                    if not value:
                        raise OSError(f"{self.path} is empty")
                    self._value, self._signature, self._read_at = value, signature, now
            except OSError as exc:
                if self._value is None:
                    raise FailedPrecondition(f"cannot read the API token file: {exc}") from exc
                # A transient failure mid-rotation: the last token read is still the best bet.
            return self._value


# ---------------------------------------------------------------------------- in-cluster


def in_cluster(
    env: Mapping[str, str] = os.environ, account_dir: Path | None = None
) -> ClientConfig:
    account_dir = account_dir or SERVICE_ACCOUNT_DIR
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise FailedPrecondition(
            "not running in a pod: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    ca = account_dir / "ca.crt"
    context = tls_context(ca_file=ca, insecure=False, what=f"the service account's CA {ca}")
    token = FileToken(account_dir / "token")
    return ClientConfig(
        Endpoint(f"https://{host}:{port}", context), token, "the in-cluster service account"
    )


# ---------------------------------------------------------------------------- kubeconfig


def kubeconfig_path(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path:
    if explicit:
        return Path(explicit)
    for entry in env.get("KUBECONFIG", "").split(os.pathsep):
        if entry:
            return Path(entry)  # the first file only: we do not merge several kubeconfigs
    return Path.home() / ".kube" / "config"


def from_kubeconfig(path: Path) -> ClientConfig:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FailedPrecondition(f"cannot read the kubeconfig {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise FailedPrecondition(f"the kubeconfig {path} is not a YAML mapping")
    base = path.parent
    name = document.get("current-context")
    if not name:
        raise FailedPrecondition(f"the kubeconfig {path} has no current-context")
    context = _named(document, "contexts", "context", name, path)
    cluster = _named(document, "clusters", "cluster", context.get("cluster"), path)
    user = (
        _named(document, "users", "user", context.get("user"), path) if context.get("user") else {}
    )
    where = f"kubeconfig {path}"
    for key, why in {**UNSUPPORTED_CLUSTER_FIELDS}.items():
        if cluster.get(key):
            raise FailedPrecondition(f"{where}: cluster field {key!r}: {why}")
    for key, why in UNSUPPORTED_USER_FIELDS.items():
        if user.get(key):
            raise FailedPrecondition(f"{where}: user field {key!r}: {why}")
    server = str(cluster.get("server") or "")
    if not server.startswith(("https://", "http://")):
        raise FailedPrecondition(f"{where}: cluster server {server!r} is not an http(s) URL")

    credentials: Credentials = StaticToken(str(user["token"]) if user.get("token") else None)
    if user.get("tokenFile"):  # as client-go: a token file wins over an inline token
        credentials = FileToken(_resolve(base, user["tokenFile"]))

    if not server.startswith("https://"):
        return ClientConfig(Endpoint(server), credentials, str(path))
    insecure = bool(cluster.get("insecure-skip-tls-verify"))
    ca_data = _data(cluster, "certificate-authority-data", where)
    ca_file = (
        _resolve(base, cluster["certificate-authority"])
        if cluster.get("certificate-authority")
        else None
    )
    if insecure and (ca_data or ca_file):
        raise FailedPrecondition(
            f"{where}: insecure-skip-tls-verify together with a certificate-authority is "
            "contradictory (client-go refuses it too); drop one"
        )
    cert_data = _data(user, "client-certificate-data", where)
    key_data = _data(user, "client-key-data", where)
    cert_file = (
        _resolve(base, user["client-certificate"]) if user.get("client-certificate") else None
    )
    key_file = _resolve(base, user["client-key"]) if user.get("client-key") else None
    has_cert = bool(cert_data or cert_file)
    if has_cert != bool(key_data or key_file):
        raise FailedPrecondition(
            f"{where}: a client certificate needs both client-certificate(-data) and "
            "client-key(-data)"
        )

    def build(with_cert: bool) -> ssl.SSLContext:
        ctx = tls_context(
            ca_pem=ca_data,
            ca_file=ca_file,
            insecure=insecure,
            what=f"the certificate-authority of {where}",
        )
        if with_cert:
            load_client_certificate(ctx, cert_data, cert_file, key_data, key_file, where)
        return ctx

    endpoint = Endpoint(
        server,
        build(has_cert),
        tls_server_name=cluster.get("tls-server-name") or None,
        insecure=insecure,
        trust_context=build(False) if has_cert else None,
    )
    return ClientConfig(endpoint, credentials, str(path))


def _named(document: dict[str, Any], section: str, key: str, name: Any, path: Path) -> Any:
    for entry in document.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key)
            if not isinstance(value, dict):
                break
            return value
    raise FailedPrecondition(f"the kubeconfig {path} has no {key} named {name!r} in {section}")


def _resolve(base: Path, value: Any) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else base / path


def _data(section: dict[str, Any], key: str, where: str) -> bytes | None:
    value = section.get(key)
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FailedPrecondition(f"{where}: {key} is not valid base64: {exc}") from exc


# ---------------------------------------------------------------------------- TLS


def tls_context(
    *,
    ca_pem: bytes | None = None,
    ca_file: Path | None = None,
    insecure: bool,
    what: str,
) -> ssl.SSLContext:
    """Verification as client-go: only the given CA when there is one, else the system's roots;
    the server's name is checked; TLS 1.2 at least."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        if ca_pem is not None:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        elif ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise FailedPrecondition(f"cannot load {what}: {exc}") from exc
    return ctx


def load_client_certificate(
    ctx: ssl.SSLContext,
    cert_data: bytes | None,
    cert_file: Path | None,
    key_data: bytes | None,
    key_file: Path | None,
    where: str,
) -> None:
    """Load the client certificate and key into ``ctx``; inline data never touches a disk.

    ``SSLContext.load_cert_chain`` only takes file names, so inline data goes into an anonymous
    memory file (memfd_create: no path in any filesystem, gone when closed) read back through
    ``/proc/self/fd``; the key is never written to disk or a named temporary file."""
    fds: list[int] = []
    try:
        cert_path = str(cert_file) if cert_file is not None else _memfd(cert_data or b"", fds)
        key_path = str(key_file) if key_file is not None else _memfd(key_data or b"", fds)
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise FailedPrecondition(
            f"{where}: cannot load the client certificate and key: {exc}"
        ) from exc
    finally:
        for fd in fds:
            os.close(fd)


def _memfd(data: bytes, fds: list[int]) -> str:
    fd = os.memfd_create("kube-client-credential", os.MFD_CLOEXEC)
    fds.append(fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return f"/proc/self/fd/{fd}"
