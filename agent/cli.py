"""``cert-agent``: serve the CSI socket, or act as kubelet against a running agent."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__

if TYPE_CHECKING:
    import grpc

# The modules a command needs (grpc, cryptography, the agent's own) are imported by the function
# that needs them, under main's pause of the cyclic garbage collector (see _serve).

# uuid5 namespace of the UIDs `publish` makes up for its targets (any fixed UUID would do). Kept
# as text: `serve` has no use for the uuid module (and its import of platform) before it serves.
_POD_UID_NAMESPACE = "6f1d2c9e-8a4b-5e3f-9c7d-2b1a0e4f6d83"


def _stable_uid(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.UUID(_POD_UID_NAMESPACE), name))


def build_parser() -> argparse.ArgumentParser:
    from agent.config import DEFAULT_ENDPOINT, add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="cert-agent",
        description="A CSI node plugin that gives every pod its own TLS key and certificate.",
    )
    parser.add_argument("--version", action="version", version=f"cert-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the agent (the DaemonSet's entrypoint)")
    add_serve_arguments(serve)

    endpoint_help = "the agent's CSI endpoint [env CERT_AGENT_ENDPOINT]"
    default_endpoint = os.environ.get("CERT_AGENT_ENDPOINT", DEFAULT_ENDPOINT)

    publish = commands.add_parser(
        "publish", help="mount a certificate volume into a directory, as kubelet would"
    )
    publish.add_argument("--endpoint", default=default_endpoint, help=endpoint_help)
    publish.add_argument(
        "--target",
        required=True,
        help="directory to publish the volume at: the agent accepts only kubelet's shape, "
        "<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount",
    )
    publish.add_argument("--pod-name", default="standalone")
    publish.add_argument("--pod-namespace", default="default")
    publish.add_argument(
        "--pod-uid",
        default="",
        help="default: a UUID derived from the target, so rerunning the same command is a no-op",
    )
    publish.add_argument("--service-account", default="default")
    publish.add_argument("--volume-id", help="default: kubelet's csi-<sha256> id for the target")
    publish.add_argument("--fs-group", type=int, help="the pod's fsGroup (volume_mount_group)")
    publish.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a volume attribute; keys without a prefix get csi.cert-agent.io/",
    )

    policy = commands.add_parser("policy", help="work with issuance policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_commands.add_parser(
        "check",
        help="say whether a policy allows a volume's attributes (no running agent needed)",
        description="Exit status: 0 allowed, 1 denied, 2 invalid attributes or policy file.",
    )
    check.add_argument(
        "--policy", metavar="FILE", help="the policy file (default: the built-in default policy)"
    )
    check.add_argument("--namespace", required=True, help="the pod's namespace")
    check.add_argument("--pod-name", required=True)
    check.add_argument("--service-account", default="default")
    check.add_argument("--pod-uid", default="", help="default: a UUID derived from the pod's name")
    check.add_argument("--cluster-domain", default="cluster.local", help="${CLUSTER_DOMAIN}")
    check.add_argument("--trust-domain", default="cluster.local", help="${TRUST_DOMAIN}")
    check.add_argument(
        "--node-name", default=os.uname().nodename, help="${NODE_NAME} in attributes (the node)"
    )
    check.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a volume attribute, as for publish; keys without a prefix get csi.cert-agent.io/",
    )

    policy_commands.add_parser(
        "default", help="print the built-in default policy (a starting point for a policy file)"
    )

    unpublish = commands.add_parser("unpublish", help="unmount and remove a published volume")
    unpublish.add_argument("--endpoint", default=default_endpoint, help=endpoint_help)
    unpublish.add_argument("--target", required=True)
    unpublish.add_argument("--volume-id", help="default: the id `publish` derived for the target")

    status = commands.add_parser(
        "status",
        help="list this node's volumes, soonest expiry first (asks the running agent)",
        description="One line per volume: pod, issuer, key, serial, expiry, next renewal, state, "
        "failures. Exit code 1 when a shown certificate is past its renewal time, 2 when the "
        "agent cannot be reached.",
    )
    status.add_argument(
        "--data-root",
        default=os.environ.get("CERT_AGENT_DATA_ROOT"),
        help="the agent's data root [env CERT_AGENT_DATA_ROOT] "
        "(default /var/lib/kubelet/plugins/<driver-name>/data)",
    )
    status.add_argument("--socket", help="the status socket (default <data-root>/status.sock)")
    status.add_argument("--json", action="store_true", help="print the JSON document")
    status.add_argument("--pod", help="only volumes of this pod")
    status.add_argument("--namespace", help="only volumes in this namespace")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    collecting = gc.isenabled()
    gc.disable()  # while the modules load (see _serve)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            return _serve(args, collecting)
    finally:
        if collecting:
            gc.enable()
    if args.command == "publish":
        return _publish(args)
    if args.command == "status":
        from agent.status_view import run_status

        return run_status(args)
    if args.command == "policy":
        if args.policy_command == "default":
            from agent.pki.policy_loader import DEFAULT_POLICY_YAML

            print(DEFAULT_POLICY_YAML, end="")
            return 0
        return _policy_check(args)
    return _unpublish(args)


def _serve(args: argparse.Namespace, collecting: bool) -> int:
    from agent.config import ConfigError, resolve
    from agent.observe.logs import configure_logging
    from agent.observe.startup import TIMELINE

    TIMELINE.mark("imports: cli, cryptography.x509")
    try:
        config = resolve(args)
        configure_logging(config.log_level, config.log_format)
    except (ConfigError, ValueError) as exc:
        print(f"cert-agent: {exc}", file=sys.stderr)
        return 2
    TIMELINE.mark("configuration")
    from agent.server import serve

    TIMELINE.mark("imports: agent, grpc, prometheus_client, protobuf")
    if collecting:
        # The collector is paused from main on: a start creates ~60,000 objects (modules,
        # classes, functions, descriptors) that live as long as the process, and traversing
        # them again and again while they pile up took ~12 ms of the ~150 ms until the socket
        # served. Frozen now, no collection traverses them again; new objects are collected
        # as before.
        gc.freeze()
        gc.enable()

    code = serve(config)
    # The agent has stopped and said so. A CSI call or renewal still waiting on an issuer would
    # hold the interpreter's exit (it joins worker threads) for up to --issue-timeout: do not
    # wait for it. Its volume is recorded as unfinished and is completed on the next start.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _target(args: argparse.Namespace) -> Path:
    # As kubelet does: the parent is a real directory path (symlinks in the working directory
    # resolved), since the agent accepts no symlink below its --kubelet-root.
    target = Path(os.path.abspath(args.target))
    return Path(os.path.realpath(target.parent)) / target.name


def _default_volume_id(target: Path) -> str:
    from agent.client import kubelet_volume_id

    return kubelet_volume_id(str(target.parent), target.name)


def _attributes(items: Sequence[str]) -> dict[str, str] | None:
    """``--attr KEY=VALUE`` options as volume attributes (None after printing a problem)."""
    attributes: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"cert-agent: --attr {item!r} must be KEY=VALUE", file=sys.stderr)
            return None
        attributes[key if "/" in key else f"csi.cert-agent.io/{key}"] = value
    return attributes


def _publish(args: argparse.Namespace) -> int:
    import grpc

    from agent.client import CSIClient, PodIdentity, pod_volume_context, publish_request

    attributes = _attributes(args.attr)
    if attributes is None:
        return 2
    target = _target(args)
    pod = PodIdentity(
        args.pod_name,
        args.pod_namespace,
        args.pod_uid or _default_pod_uid(target),
        args.service_account,
    )
    volume_id = args.volume_id or _default_volume_id(target)
    request = publish_request(
        volume_id=volume_id,
        target_path=str(target),
        volume_context=pod_volume_context(pod, attributes),
        fs_group=args.fs_group,
    )
    created = _make_parents(target)  # kubelet creates the parent, the plugin the target
    with CSIClient(args.endpoint) as client:
        try:
            client.publish(request)
        except grpc.RpcError as exc:
            _remove_empty(created)
            return _rpc_failed("publish", exc)
    print(f"published volume {volume_id} at {target}")
    for entry in sorted(os.listdir(target)):
        if not entry.startswith(".."):
            print(f"  {target / entry}")
    return 0


def _default_pod_uid(target: Path) -> str:
    """A stable stand-in for the pod's UID, as kubelet's is for one pod: the same target always
    gives the same UID (and so the same volume attributes), so a repeated publish is idempotent
    instead of ALREADY_EXISTS."""
    return _stable_uid(str(target))


def _make_parents(target: Path) -> list[Path]:
    """Create the target's missing parent directories; returns them, deepest first."""
    missing: list[Path] = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Undo ``_make_parents`` after a failed publish: nothing of it stays behind."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or gone): leave it and everything above it


def _policy_check(args: argparse.Namespace) -> int:
    """Parse the attributes exactly as the agent does, then ask the policy about them."""
    from agent.client import PodIdentity, pod_volume_context
    from agent.errors import AgentError
    from agent.issuers.local import format_duration
    from agent.pki.policy import PolicyRequest, PolicyViolation
    from agent.pki.policy_loader import PolicyError, default_policy, load_policy_file
    from agent.spec.attributes import parse_volume_context

    attributes = _attributes(args.attr)
    if attributes is None:
        return 2
    try:
        if args.policy:
            policy = load_policy_file(Path(args.policy), args.cluster_domain, args.trust_domain)
        else:
            policy = default_policy(args.cluster_domain, args.trust_domain)
    except PolicyError as exc:
        print(f"cert-agent: invalid policy: {exc}", file=sys.stderr)
        return 2
    # A stable stand-in UID (only ${POD_UID} patterns see it), as `publish` makes one.
    uid = args.pod_uid or _stable_uid(f"{args.namespace}/{args.pod_name}")
    pod = PodIdentity(args.pod_name, args.namespace, uid, args.service_account)
    try:
        context = pod_volume_context(pod, attributes)
        spec, pod_info = parse_volume_context(context, args.node_name)
    except AgentError as exc:
        print(f"cert-agent: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    if not spec.issuer.is_local:
        print(
            f"note: {spec.issuer.describe()} is a cert-manager issuer; the agent applies the "
            "policy to it only with --policy-for-cert-manager"
        )
    try:
        decision = policy.check(PolicyRequest.from_spec(pod_info, spec))
    except PolicyViolation as exc:
        print(f"denied (PERMISSION_DENIED): {exc.message}")
        return 1
    cap = ""
    if decision.max_duration_seconds is not None:
        cap = f"; its max-duration is {format_duration(decision.max_duration_seconds)}"
    print(f"allowed by rule {decision.rule!r} of the policy ({policy.source}){cap}")
    return 0


def _unpublish(args: argparse.Namespace) -> int:
    import grpc

    from agent.client import CSIClient

    target = _target(args)
    volume_id = args.volume_id or _default_volume_id(target)
    with CSIClient(args.endpoint) as client:
        try:
            client.unpublish(volume_id, str(target))
        except grpc.RpcError as exc:
            return _rpc_failed("unpublish", exc)
    print(f"unpublished volume {volume_id} from {target}")
    return 0


def _rpc_failed(what: str, exc: grpc.RpcError) -> int:
    import grpc

    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    print(f"cert-agent: {what} failed: {name}: {details}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
