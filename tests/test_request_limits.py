"""Bad requests and busy agents over the real socket: undecodable bytes, huge inputs, Probe."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from agent.csi import csi_pb2, csi_pb2_grpc
from agent.csi.service import MAX_MESSAGE_CHARS
from agent.errors import MAX_QUOTED_CHARS
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.volumes import issue as issue_module
from tests.conftest import RunningAgent
from tests.test_renewal_limits import sample

WAIT = 30.0  # a bound for what must happen; only reached when the agent is broken


def raw_call(agent: RunningAgent, method: str, payload: bytes) -> grpc.RpcError:
    """A unary call with hand-made request bytes (what a broken or hostile client sends)."""
    with grpc.insecure_channel(agent.config.endpoint) as channel:
        call = channel.unary_unary(method)  # no serializer: the bytes go out as they are
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=WAIT)
    return info.value


def field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (lengths below 128 only)."""
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


# ------------------------------------------------------------------------------- invalid UTF-8


def test_invalid_utf8_is_invalid_argument_and_counted(agent: RunningAgent) -> None:
    # NodePublishVolumeRequest.volume_id (field 1) holding bytes that are not UTF-8.
    error = raw_call(agent, "/csi.v1.Node/NodePublishVolume", field(1, b"vol-\xff\xfe"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "not a valid csi.v1.NodePublishVolumeRequest" in details
    assert "UTF-8" in details
    # A map entry of volume_context (field 6: key 1, value 2) with a bad value, on unpublish's
    # neighbour too: every method decodes through the same path.
    entry = field(1, b"csi.cert-agent.io/dns-names") + field(2, b"\xc3\x28")
    error = raw_call(agent, "/csi.v1.Node/NodePublishVolume", field(6, entry))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = raw_call(agent, "/csi.v1.Node/NodeUnpublishVolume", field(2, b"/tmp/\xff"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        sample(
            agent,
            "cert_agent_grpc_requests_total",
            method="NodePublishVolume",
            code="INVALID_ARGUMENT",
        )
        == 2.0
    )
    assert (
        sample(
            agent,
            "cert_agent_grpc_requests_total",
            method="NodeUnpublishVolume",
            code="INVALID_ARGUMENT",
        )
        == 1.0
    )
    # The agent still serves.
    assert agent.client.plugin_info().name == "csi.cert-agent.io"


# ------------------------------------------------------------------------------- long inputs


def test_error_messages_quote_long_inputs_shortened(agent: RunningAgent) -> None:
    # Each request carries one 10 KB input; each answer must stay far below a client's metadata
    # limit, quoting at most MAX_QUOTED_CHARS of the input and its size.
    def long_key() -> None:
        agent.client.publish(agent.pod("key").request({"k" * 10_000: "x"}))

    def long_value() -> None:
        agent.client.publish(agent.pod("value").request({"example.com/team": "v" * 10_000}))

    def long_mount_group() -> None:
        request = agent.pod("group").request({"csi.cert-agent.io/dns-names": "a.default.svc"})
        request.volume_capability.mount.volume_mount_group = "g" * 10_000
        agent.client.publish(request)

    for attempt, char in ((long_key, "k"), (long_value, "v"), (long_mount_group, "g")):
        with pytest.raises(grpc.RpcError) as info:
            attempt()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert len(details) < 600, details
        assert char * (MAX_QUOTED_CHARS + 1) not in details
        assert "10000 bytes" in details, details


def test_no_error_message_is_bigger_than_the_cap(agent: RunningAgent) -> None:
    # A 10 KB target path on unpublish gave a 10 KB message on main. Whatever check answers it,
    # the servicer caps every message (the target path rules themselves are not this test's).
    with pytest.raises(grpc.RpcError) as info:
        agent.client.unpublish("vol-1", "/" + "p" * 10_000)
    details = info.value.details() or ""
    assert len(details) <= MAX_MESSAGE_CHARS + 20
    assert "(10001 bytes)" in details  # the path is quoted shortened, with its size


# ------------------------------------------------------------------------- Probe under load


class BlockingIssuer:
    """The local issuer, held at a gate: each issue waits until the test opens it."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.name = "local"
        self.gate = threading.Event()
        self.cond = threading.Condition()
        self.waiting = 0

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()
        self.gate.wait(WAIT)
        return self.real.issue(request, timeout_seconds)  # type: ignore[attr-defined, no-any-return]

    def ready(self) -> tuple[bool, str]:
        return self.real.ready()  # type: ignore[attr-defined, no-any-return]

    def wait_for_waiting(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.waiting >= count, WAIT), self.waiting


def test_probe_and_node_info_answer_while_publishes_fill_every_worker(
    agent_factory: object,
) -> None:
    # On main 8 slow publishes (RSA-8192 there; a held issuer here) took every gRPC worker, and
    # the livenessprobe's Probe waited behind them past its 3 s timeout.
    workers = 3
    agent: RunningAgent = agent_factory(grpc_workers=workers)  # type: ignore[operator]
    blocking = BlockingIssuer(agent.agent.issuers.local)
    agent.agent.issuers.local = blocking  # type: ignore[assignment]
    attrs = {"csi.cert-agent.io/dns-names": "app.default.svc"}
    pool = ThreadPoolExecutor(workers)
    try:
        pods = [agent.pod(f"app-{i}") for i in range(workers)]
        publishes = [pool.submit(agent.publish, pod, attrs) for pod in pods]
        blocking.wait_for_waiting(workers)
        with grpc.insecure_channel(agent.config.endpoint) as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            node = csi_pb2_grpc.NodeStub(channel)
            # Deadlines only bound a failure: on main these calls never get a worker.
            for _ in range(5):
                probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
                assert probe.ready.value
                assert identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5).name
                node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=5)
                node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
            # One more volume operation is refused at once, not queued behind the others.
            with pytest.raises(grpc.RpcError) as info:
                agent.publish(agent.pod("one-too-many"), attrs)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in (info.value.details() or "")
        blocking.gate.set()
        for publish in publishes:
            publish.result(WAIT)
    finally:
        blocking.gate.set()
        pool.shutdown()
    # Once the publishes are done the next one is served again.
    agent.publish(agent.pod("after"), attrs)
    assert (
        sample(
            agent,
            "cert_agent_grpc_requests_total",
            method="NodePublishVolume",
            code="RESOURCE_EXHAUSTED",
        )
        == 1.0
    )


def test_key_generation_runs_at_most_keygen_workers_at_once(
    agent_factory: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent: RunningAgent = agent_factory(keygen_workers=2)  # type: ignore[operator]
    limit = agent.agent.manager.keygen
    gate = threading.Event()
    inside: list[int] = []
    real_generate = issue_module.generate_private_key

    def slow_generate(spec: object) -> object:
        inside.append(limit.running)
        gate.wait(WAIT)
        return real_generate(spec)  # type: ignore[arg-type]

    monkeypatch.setattr(issue_module, "generate_private_key", slow_generate)
    attrs = {"csi.cert-agent.io/dns-names": "app.default.svc"}
    with ThreadPoolExecutor(5) as pool:
        try:
            futures = [pool.submit(agent.publish, agent.pod(f"k-{i}"), attrs) for i in range(5)]
            # Two generate, three wait their turn (all five hold a volume-operation slot).
            assert limit.wait_until(lambda running, waiting: running == 2 and waiting == 3, WAIT)
            assert len(inside) == 2
        finally:
            gate.set()
        for future in futures:
            future.result(WAIT)
    assert len(inside) == 5
    assert max(inside) <= 2
