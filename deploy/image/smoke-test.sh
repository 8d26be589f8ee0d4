#!/bin/bash
# Run the built image for real, as kubelet would use it, and measure it:
#
#   deploy/image/smoke-test.sh IMAGE        # as root, from the repository root (make image-smoke)
#
# Starts `IMAGE --standalone` privileged with the host network, its data root, CSI socket
# directory and a kubelet root bind-mounted from a temp dir (the kubelet root shared, so the
# agent's bind mounts reach the host as they reach pods); publishes a volume through the socket
# with the host's cert-agent client (.venv/bin/cert-agent); checks the certificate with openssl;
# stops the container with SIGTERM and requires exit 0. Prints the image's size, the seconds from
# the container's start to "agent serving" and to the first Probe answered, and the largest
# packages in the image. Leaves no container, mount or file behind.
set -euo pipefail

IMAGE=${1:?usage: $0 IMAGE}
CLIENT=${CERT_AGENT:-.venv/bin/cert-agent}
PYTHON=${PYTHON:-.venv/bin/python}
NAME=cert-agent-smoke-$$
T=$(mktemp -d /tmp/cert-agent-smoke.XXXXXX)
ENDPOINT=unix://$T/csi/csi.sock

cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    # Mounts outlive the agent on purpose (pods keep their files); detach ours, deepest first.
    awk -v p="$T/" 'index($5, p) == 1 || $5 == substr(p, 1, length(p) - 1) { print $5 }' \
        /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
    rm -rf "$T"
}
trap cleanup EXIT

mkdir -p "$T/data" "$T/csi" "$T/kubelet"
# Bidirectional propagation (as the DaemonSet's mountPropagation) needs a shared source mount.
mount --bind "$T/kubelet" "$T/kubelet"
mount --make-shared "$T/kubelet"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# The first Probe answered ready, polled from the host through the socket. Started before the
# container, so that the client's own start-up does not count; it prints the time.
"$PYTHON" - "$ENDPOINT" >"$T/probed" <<'EOF' &
import sys, time
import grpc
from agent.csi import csi_pb2, csi_pb2_grpc
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    # A fresh channel for each try: a channel that failed to connect waits out a back-off.
    with grpc.insecure_channel(sys.argv[1]) as channel:
        try:
            probe = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=1)
            if probe.ready.value:
                break
        except grpc.RpcError:
            pass
    time.sleep(0.005)
else:
    sys.exit("the agent never answered Probe")
print(time.time())
EOF
prober=$!

# The DaemonSet runs the agent privileged. A host that is itself a sandbox may lack a capability
# --privileged asks for (runc: "unable to apply caps"); then grant what the agent uses: mount(2)
# (CAP_SYS_ADMIN, unconfined by seccomp and AppArmor) and the default set.
privilege=(--privileged)
if ! docker run --rm --privileged --entrypoint true "$IMAGE" 2>/dev/null; then
    privilege=(--cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined)
    echo "--privileged refused on this host; running with ${privilege[*]}"
fi
# Like the DaemonSet: a read-only root and a memory emptyDir at /tmp, where the agent probes
# whether it may mount (without it the agent would write payloads directly, as when unprivileged).
docker run -d --name "$NAME" --network host "${privilege[@]}" --read-only --tmpfs /tmp \
    --mount "type=bind,source=$T/data,target=$T/data" \
    --mount "type=bind,source=$T/csi,target=$T/csi" \
    --mount "type=bind,source=$T/kubelet,target=$T/kubelet,bind-propagation=rshared" \
    "$IMAGE" --standalone --endpoint "$ENDPOINT" --data-root "$T/data" \
    --kubelet-root "$T/kubelet" --node-id smoke --metrics-address "127.0.0.1:$port" \
    --log-format json >/dev/null
wait "$prober"
probed=$(cat "$T/probed")

uid=6c1f2d4e-0000-4000-8000-00000000cafe
target=$T/kubelet/pods/$uid/volumes/kubernetes.io~csi/tls/mount
mkdir -p "$(dirname "$target")"
"$CLIENT" publish --endpoint "$ENDPOINT" --target "$target" --pod-name es-0 \
    --pod-namespace elastic --pod-uid "$uid" \
    --attr 'csi.cert-agent.io/dns-names=${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local'
mountpoint -q "$target"  # a read-only bind mount of the agent's tmpfs, as pods get it
openssl verify -CAfile "$target/ca.crt" -untrusted "$target/tls.crt" "$target/tls.crt"
openssl x509 -noout -subject -ext subjectAltName -in "$target/tls.crt"
"$CLIENT" unpublish --endpoint "$ENDPOINT" --target "$target"
test ! -e "$target/tls.key"

docker stop --time 30 "$NAME" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$NAME")
started=$(docker inspect --format '{{.State.StartedAt}}' "$NAME")
serving=$(docker logs "$NAME" 2>&1 | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("msg") == "agent serving":
        print(entry["ts"])
        break
')
python3 - "$started" "$serving" "$probed" <<'EOF'
import datetime as dt, sys
def when(text):
    text = text.replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    frac, zone = (rest[:-6], rest[-6:]) if rest else ("0", "+00:00")
    return dt.datetime.fromisoformat(f"{head}.{frac[:6].ljust(6, '0')}{zone}").timestamp()
started = when(sys.argv[1])
print(f"start-up: 'agent serving' after {when(sys.argv[2]) - started:.3f} s, "
      f"first Probe answered after {float(sys.argv[3]) - started:.3f} s (from the container's start)")
EOF
echo "exit code after SIGTERM: $code"
echo "image size: $(docker image inspect --format '{{.Size}}' "$IMAGE") bytes"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-100
docker run --rm --entrypoint sh "$IMAGE" -c \
    'cd /opt/cert-agent/lib/python3*/site-packages && du -sk -- * | sort -rn | head -12'
test "$code" = 0
