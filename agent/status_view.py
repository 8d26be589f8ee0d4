"""`cert-agent status`: read the agent's status socket and show one line per volume."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from agent import DEFAULT_DRIVER_NAME
from agent.observe.status_socket import STATUS_SOCKET, read_status

EXIT_PAST_RENEWAL = 1
EXIT_UNREACHABLE = 2
COLUMNS = (
    "NAMESPACE",
    "POD",
    "ISSUER",
    "KEY",
    "SERIAL",
    "NOT AFTER (LEFT)",
    "NEXT RENEWAL",
    "STATE",
    "FAILURES",
    "LAST ERROR",
)


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    data_root = args.data_root
    if not data_root:
        driver = os.environ.get("CERT_AGENT_DRIVER_NAME", DEFAULT_DRIVER_NAME)
        data_root = f"/var/lib/kubelet/plugins/{driver}/data"
    return Path(data_root) / STATUS_SOCKET


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    path = socket_path(args)
    try:
        document = read_status(path)
    except (OSError, ValueError) as exc:
        print(
            f"cert-agent: cannot read the agent's status at {path}: {exc} "
            "(is the agent running on this node? run this inside the agent's container, "
            "or give --data-root)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    if "error" in document:
        print(f"cert-agent: {document['error']}", file=sys.stderr)
        return EXIT_UNREACHABLE
    volumes = [
        v
        for v in document.get("volumes", [])
        if (args.pod is None or v.get("pod") == args.pod)
        and (args.namespace is None or v.get("namespace") == args.namespace)
    ]
    if args.json:
        json.dump({**document, "volumes": volumes}, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        render_table(volumes, float(document.get("time") or 0.0), out)
    return EXIT_PAST_RENEWAL if any(v.get("past_renewal") for v in volumes) else 0


def render_table(volumes: list[dict[str, Any]], now: float, out: TextIO) -> None:
    rows = [COLUMNS] + [_row(v, now) for v in volumes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def _row(volume: dict[str, Any], now: float) -> tuple[str, ...]:
    not_after = volume.get("not_after")
    left = "" if not_after is None else f"{_when(not_after)} ({duration(not_after - now)})"
    next_renewal = volume.get("next_renewal")
    renewal_time = volume.get("renewal_time")
    if volume.get("past_renewal") and renewal_time is not None:
        retry = ""
        if next_renewal is not None and next_renewal > now:
            retry = f", retry in {duration(next_renewal - now)}"
        renew = f"{_when(renewal_time)} (overdue{retry})"
    elif next_renewal is None:
        renew = ""
    elif next_renewal <= now:
        renew = f"{_when(next_renewal)} (due)"
    else:
        renew = f"{_when(next_renewal)} (in {duration(next_renewal - now)})"
    error = " ".join(str(volume.get("last_error") or "").split())
    return (
        str(volume.get("namespace", "")),
        str(volume.get("pod", "")),
        str(volume.get("issuer", "")),
        str(volume.get("key_type", "")),
        str(volume.get("serial", "")) or "-",
        left or "-",
        renew or "-",
        str(volume.get("state", "")),
        str(volume.get("consecutive_failures", 0)),
        error[:200] if error else "-",
    )


def duration(seconds: float) -> str:
    """A short human duration: 89d 23h, 5h 02m, 4m 10s, -3m 05s (past)."""
    sign = "-" if seconds < 0 else ""
    total = int(abs(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    return f"{sign}{minutes}m {secs:02d}s"


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
