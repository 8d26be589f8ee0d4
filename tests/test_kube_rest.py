"""The agent's own Kubernetes client (kube/rest.py, kube/kubeconfig.py) over real HTTP and TLS.

The fake API server (tests/fakekube.py) serves HTTPS here with certificates made by `openssl`:
a cluster CA, a server certificate for 127.0.0.1, a client certificate the fake maps to a user
(x509 authentication), and a second CA nobody trusts.
"""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import __version__
from agent.errors import FailedPrecondition, Unavailable
from agent.kube.client import (
    KubeSettings,
    bearer_token_client,
    make_api_client,
    map_api_error,
    retry_after_seconds,
    with_retries,
)
from agent.kube.kubeconfig import FileToken, from_kubeconfig, in_cluster, kubeconfig_path
from agent.kube.rest import MERGE_PATCH, ApiClient, KubeApiError, KubeUnreachable
from tests.conftest import REPO
from tests.fakekube import AGENT_TOKEN, AGENT_USER, FakeKube

CERT_USER = "system:node:node-1"
SECRETS = "/api/v1/namespaces/apps/secrets"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def _leaf(directory: Path, name: str, subject: str, ext: str) -> None:
    (directory / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other")
    _leaf(d, "server", "/CN=kube-apiserver", "subjectAltName=IP:127.0.0.1\n")
    _leaf(d, "client", f"/O=system:nodes/CN={CERT_USER}", "extendedKeyUsage=clientAuth\n")
    return Pki(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
        d / "other.crt",
    )  # fmt: skip


@pytest.fixture
def tls_fake(pki: Pki) -> Iterator[FakeKube]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_OPTIONAL  # as kube-apiserver: a token or a client cert
    fake = FakeKube()
    fake.cert_users[CERT_USER] = CERT_USER
    fake.start(tls=context)
    yield fake
    fake.stop()


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


def write_kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [
                    {"name": "other", "context": {"cluster": "missing", "user": "u"}},
                    {"name": "ctx", "context": {"cluster": "c", "user": "u"}},
                ],
                "current-context": "ctx",
            }
        )
    )
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def client_for(kubeconfig: Path, **settings: Any) -> ApiClient:
    return make_api_client(KubeSettings(kubeconfig=str(kubeconfig), **settings))


def last_record(fake: FakeKube) -> Any:
    return fake.requests[-1]


# ---------------------------------------------------------------- kubeconfig variants


def test_token_over_tls_with_inline_ca(tls_fake: FakeKube, pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc",
        {"server": tls_fake.url, "certificate-authority-data": b64(pki.ca)},
        {"token": AGENT_TOKEN},
    )
    api = client_for(kc)
    tls_fake.put_secret("apps", "s1", {"a": b"1"})
    body = api.get(SECRETS, {"fieldSelector": "metadata.name=s1"})
    assert [i["metadata"]["name"] for i in body["items"]] == ["s1"]
    record = last_record(tls_fake)
    assert record.user == AGENT_USER and record.client_cert is None
    assert record.query == {"fieldSelector": "metadata.name=s1"}
    assert record.headers["Accept"] == "application/json"
    assert record.headers["User-Agent"] == f"cert-agent/{__version__}"


def test_client_certificate_data_authenticates_over_tls(
    tls_fake: FakeKube, pki: Pki, tmp_path: Path
) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc",
        {"server": tls_fake.url, "certificate-authority-data": b64(pki.ca)},
        {"client-certificate-data": b64(pki.client_cert), "client-key-data": b64(pki.client_key)},
    )
    before = set(tmp_path.iterdir())
    api = client_for(kc)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {}}
    api.request("POST", SECRETS, body=secret)
    record = last_record(tls_fake)
    assert (record.user, record.client_cert) == (CERT_USER, CERT_USER)
    assert "Authorization" not in record.headers
    assert record.headers["Content-Type"] == "application/json"
    assert set(tmp_path.iterdir()) == before  # the key went to no file next to the kubeconfig

    # On behalf of a pod: its token only, never the agent's certificate; same limiter.
    tls_fake.users["pod-token"] = "system:serviceaccount:apps:web"
    pod_api = bearer_token_client(api, "pod-token")
    assert pod_api.limiter is api.limiter
    pod_api.get(SECRETS)
    record = last_record(tls_fake)
    assert (record.user, record.client_cert) == ("system:serviceaccount:apps:web", None)
    api.get(SECRETS)  # the agent's own client still presents its certificate
    assert last_record(tls_fake).client_cert == CERT_USER


def test_relative_file_paths_resolve_against_the_kubeconfig_directory(
    tls_fake: FakeKube, pki: Pki, tmp_path: Path
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    for source, name in ((pki.ca, "ca.crt"), (pki.client_cert, "c.crt"), (pki.client_key, "c.key")):
        (folder / name).write_bytes(source.read_bytes())
    kc = write_kubeconfig(
        folder / "config",
        {"server": tls_fake.url, "certificate-authority": "ca.crt"},
        {"client-certificate": "c.crt", "client-key": "c.key"},
    )
    client_for(kc).get(SECRETS)
    assert last_record(tls_fake).user == CERT_USER


def test_token_file_is_read_again_after_rotation(fake: FakeKube, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(AGENT_TOKEN + "\n")
    kc = write_kubeconfig(tmp_path / "kc", {"server": fake.url}, {"tokenFile": "token"})
    api = client_for(kc)
    api.get(SECRETS)
    assert last_record(fake).user == AGENT_USER
    fake.users["rotated"] = "rotated-user"
    token.write_text("rotated")
    api.get(SECRETS)
    assert last_record(fake).user == "rotated-user"


def test_in_cluster_with_a_rotated_token(tls_fake: FakeKube, pki: Pki, tmp_path: Path) -> None:
    """kubelet's projected token: ``token`` -> ``..data/token``, ``..data`` swapped atomically."""
    account = tmp_path / "serviceaccount"
    first = account / "..2026_01"
    first.mkdir(parents=True)
    (first / "token").write_text(AGENT_TOKEN)
    (first / "ca.crt").write_bytes(pki.ca.read_bytes())
    (account / "..data").symlink_to(first.name)
    for name in ("token", "ca.crt"):
        (account / name).symlink_to(f"..data/{name}")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(tls_fake.port)}
    config = in_cluster(env, account)
    assert config.endpoint.server == f"https://127.0.0.1:{tls_fake.port}"
    api = ApiClient(config.endpoint, config.credentials, _Unlimited(), 10)
    api.get(SECRETS)
    assert last_record(tls_fake).user == AGENT_USER

    tls_fake.users["bound-2"] = "rotated-user"
    second = account / "..2026_02"
    second.mkdir()
    (second / "token").write_text("bound-2")
    (second / "ca.crt").write_bytes(pki.ca.read_bytes())
    (account / "..data_tmp").symlink_to(second.name)
    os.rename(account / "..data_tmp", account / "..data")
    api.get(SECRETS)
    assert last_record(tls_fake).user == "rotated-user"


def test_in_cluster_ipv6_host_goes_in_brackets(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    env = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster(env, tmp_path).endpoint.server == "https://[fd00:10:96::1]:443"


def test_in_cluster_without_a_token_is_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(FailedPrecondition, match="cannot read the API token file"):
        in_cluster(env, tmp_path)


def test_token_file_reread_period_without_a_visible_change(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one")
    now = [0.0]
    token = FileToken(path, reread_seconds=60, clock=lambda: now[0])
    info = path.stat()
    path.write_text("two")  # same size; put the old mtime back: stat cannot tell
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert token.token() == "one"
    now[0] = 60.0
    assert token.token() == "two"
    path.unlink()  # gone mid-rotation: the last token read is still used
    assert token.token() == "two"


def test_kubeconfig_path_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    env = {"KUBECONFIG": f"{os.pathsep}{first}{os.pathsep}{second}"}
    assert kubeconfig_path("/explicit", env) == Path("/explicit")
    assert kubeconfig_path(None, env) == first
    assert kubeconfig_path(None, {}) == Path.home() / ".kube" / "config"


@pytest.mark.parametrize(
    ("where", "field", "value", "says"),
    [
        ("user", "exec", {"command": "aws"}, "exec credential plugins are not supported"),
        ("user", "auth-provider", {"name": "oidc"}, "auth-provider plugins are not supported"),
        ("user", "username", "admin", "basic authentication"),
        ("user", "as", "someone", "impersonation"),
        ("cluster", "proxy-url", "http://proxy:3128", "proxy-url is not supported"),
    ],
)  # fmt: skip
def test_unsupported_kubeconfig_fields_are_refused_by_name(
    tmp_path: Path, where: str, field: str, value: Any, says: str
) -> None:
    cluster: dict[str, Any] = {"server": "https://127.0.0.1:6443"}
    user: dict[str, Any] = {"token": "t"}
    (user if where == "user" else cluster)[field] = value
    kc = write_kubeconfig(tmp_path / "kc", cluster, user)
    with pytest.raises(FailedPrecondition) as info:
        client_for(kc)
    assert f"{where} field {field!r}" in info.value.message
    assert says in info.value.message
    assert str(kc) in info.value.message


def test_broken_kubeconfigs_are_clear_errors(tmp_path: Path, pki: Pki) -> None:
    server = {"server": "https://x"}
    cert = {"client-certificate-data": b64(pki.client_cert)}
    not_a_key = {**cert, "client-key-data": b64(pki.other_ca)}
    ca = {"certificate-authority-data": b64(pki.ca)}
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({**server, "certificate-authority-data": "%%%"}, {}, "not valid base64"),
        ({**server, **ca, "insecure-skip-tls-verify": True}, {}, "contradictory"),
        (server, cert, "needs both"),
        (server, not_a_key, "cannot load the client certificate"),
        ({"server": "ftp://x"}, {}, "is not an http(s) URL"),
        (
            {**server, "certificate-authority": "nope.crt"},
            {},
            "cannot load the certificate-authority",
        ),
    ]
    for cluster, user, says in cases:
        kc = write_kubeconfig(tmp_path / "kc", cluster, user)
        with pytest.raises(FailedPrecondition) as info:
            from_kubeconfig(kc)
        assert says in info.value.message, (cluster, user, info.value.message)


def test_ca_verification_failure_is_a_clear_unavailable(
    tls_fake: FakeKube, pki: Pki, tmp_path: Path
) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc",
        {"server": tls_fake.url, "certificate-authority-data": b64(pki.other_ca)},
        {"token": AGENT_TOKEN},
    )
    api = client_for(kc)
    with pytest.raises(KubeUnreachable) as info:
        api.get(SECRETS)
    assert "TLS verification of the API server" in str(info.value)
    now = [0.0]
    with pytest.raises(Unavailable) as mapped:
        with_retries(
            lambda: api.get(SECRETS),
            what="list secrets",
            deadline=1.0,
            clock=lambda: now[0],
            sleep=lambda d: now.__setitem__(0, now[0] + d),
        )
    assert "certificate-authority" in mapped.value.message
    assert "list secrets" in mapped.value.message


def test_tls_server_name_is_the_name_verified(tls_fake: FakeKube, pki: Pki, tmp_path: Path) -> None:
    cluster = {
        "server": tls_fake.url,
        "certificate-authority-data": b64(pki.ca),
        "tls-server-name": "kube.other.test",
    }
    api = client_for(write_kubeconfig(tmp_path / "kc", cluster, {"token": AGENT_TOKEN}))
    with pytest.raises(KubeUnreachable, match=r"kube\.other\.test"):
        api.get(SECRETS)


def test_insecure_skip_tls_verify_connects_without_a_ca(tls_fake: FakeKube, tmp_path: Path) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc",
        {"server": tls_fake.url, "insecure-skip-tls-verify": True},
        {"token": AGENT_TOKEN},
    )
    client_for(kc).get(SECRETS)
    assert last_record(tls_fake).user == AGENT_USER


# ---------------------------------------------------------------- requests and errors


def test_status_errors_carry_status_reason_body_and_headers(fake: FakeKube, tmp_path: Path) -> None:
    api = client_for(fake.write_kubeconfig(tmp_path / "kc"))
    fake.fail_next(1, 429, retry_after=7)
    with pytest.raises(KubeApiError) as info:
        api.get(SECRETS)
    exc = info.value
    assert (exc.status, exc.reason) == (429, "Too Many Requests")
    assert retry_after_seconds(exc) == 7.0
    assert '"reason": "TooManyRequests"' in exc.body or '"reason":"TooManyRequests"' in exc.body

    fake.fail_next(1, 429, retry_after=3)
    slept: list[float] = []
    assert "items" in with_retries(
        lambda: api.get(SECRETS), what="list", deadline=1e9, sleep=slept.append
    )
    assert slept == [3.0]

    with pytest.raises(KubeApiError) as missing:
        api.get("/api/v1/namespaces/apps/secrets/nope")
    error = map_api_error(missing.value, 'get secrets "nope"')
    assert error.message.startswith(
        'cannot get secrets "nope": not found (secrets "nope" not found'
    )


def test_merge_patch_sends_its_content_type(fake: FakeKube, tmp_path: Path) -> None:
    api = client_for(fake.write_kubeconfig(tmp_path / "kc"))
    fake.put_configmap("apps", "cm", {"a": "1"})
    patched = api.request(
        "PATCH",
        "/api/v1/namespaces/apps/configmaps/cm",
        body={"data": {"b": "2"}},
        content_type=MERGE_PATCH,
    )
    assert patched["data"] == {"a": "1", "b": "2"}
    assert last_record(fake).headers["Content-Type"] == MERGE_PATCH


def test_a_refused_connection_is_retryable_unavailable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = write_kubeconfig(tmp_path / "kc", {"server": f"http://127.0.0.1:{port}"}, {"token": "t"})
    api = client_for(kc)
    with pytest.raises(KubeUnreachable) as info:
        api.get(SECRETS)
    assert isinstance(map_api_error(info.value, "list"), Unavailable)


# ---------------------------------------------------------------- watches


def test_watch_streams_events_and_sends_the_watch_parameters(
    fake: FakeKube, tmp_path: Path
) -> None:
    api = client_for(fake.write_kubeconfig(tmp_path / "kc"))
    listed = api.get(SECRETS)
    watch = api.watch(
        SECRETS, resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=5
    )
    events: list[tuple[str, str]] = []

    def consume() -> None:
        for event in watch:
            events.append((event["type"], event["object"]["metadata"]["name"]))
            if len(events) == 2:
                watch.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    fake.wait_for_watch(1, "secrets")
    fake.put_secret("apps", "a", {"k": b"1"})
    fake.put_secret("apps", "b", {"k": b"1"})
    thread.join(10)
    assert not thread.is_alive()
    assert events == [("ADDED", "a"), ("ADDED", "b")]
    query = next(r for r in fake.requests if r.query.get("watch")).query
    assert query["watch"] == "true" and query["allowWatchBookmarks"] == "true"
    assert (
        query["timeoutSeconds"] == "5"
        and query["resourceVersion"] == listed["metadata"]["resourceVersion"]
    )


def test_watch_error_410_raises_gone(fake: FakeKube, tmp_path: Path) -> None:
    api = client_for(fake.write_kubeconfig(tmp_path / "kc"))
    fake.gone_next_watches(1)
    with pytest.raises(KubeApiError) as info:
        list(api.watch(SECRETS, resource_version="101", timeout_seconds=5))
    assert info.value.status == 410
    assert "too old resource version" in info.value.body


@pytest.mark.parametrize("tls", [False, True])
def test_watch_stop_from_another_thread_ends_a_quiet_stream(
    tls: bool, pki: Pki, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fake: FakeKube = request.getfixturevalue("tls_fake" if tls else "fake")
    cluster: dict[str, Any] = {"server": fake.url}
    if tls:
        cluster["certificate-authority-data"] = b64(pki.ca)
    api = client_for(write_kubeconfig(tmp_path / "kc", cluster, {"token": AGENT_TOKEN}))
    watch = api.watch(SECRETS, timeout_seconds=600)
    ended, first = threading.Event(), threading.Event()
    seen: list[Any] = []

    def consume() -> None:
        for event in watch:  # one event, then the server sends nothing for 600 s
            seen.append(event["object"]["metadata"]["name"])
            first.set()
        ended.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    fake.wait_for_watch(1, "secrets")
    fake.put_secret("apps", "a", {"k": b"1"})
    assert first.wait(10)  # the reader is now blocked inside the stream, past the headers
    watch.stop()
    assert ended.wait(10), "stop() did not end the stream"
    assert seen == ["a"]


def test_a_dropped_watch_raises_unreachable(fake: FakeKube, tmp_path: Path) -> None:
    api = client_for(fake.write_kubeconfig(tmp_path / "kc"))
    fake.put_secret("apps", "a", {"k": b"1"})
    fake.drop_watches(after_events=1)
    received: list[str] = []
    with pytest.raises(KubeUnreachable, match="dropped"):
        for event in api.watch(SECRETS, timeout_seconds=5):
            received.append(event["type"])
    assert received == ["ADDED"]


# ---------------------------------------------------------------- no kubernetes package


def test_no_agent_module_imports_the_kubernetes_package() -> None:
    """Every module under agent/ imports with `kubernetes` made unimportable."""
    code = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "kubernetes" or name.startswith("kubernetes."):
            raise ImportError("kubernetes is blocked in this test")
sys.meta_path.insert(0, Block())
import agent
names = [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")]
for name in names:
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] == "kubernetes"]
print(len(names))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 100  # it did walk the whole package


class _Unlimited:
    def acquire(self) -> None:
        pass
