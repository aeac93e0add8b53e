"""`pdserve systemd --spec FILE --host NAME`: a systemd unit that runs one host of a cluster spec.

The unit runs `pdserve host`, which starts and stops the host's processes in order; systemd only
signals the launcher (KillMode=mixed: SIGTERM to it, SIGKILL to whatever is left once
TimeoutStopSec has passed) and restarts the host if any of its processes fails.
"""

from __future__ import annotations

import shlex
import sys

from pdserve.deploy.spec import ClusterFile

# The launcher stops nodes, then the router, each group within drain_timeout_s: room for both.
STOP_MARGIN_S = 10


def unit_name(spec: ClusterFile, host_name: str) -> str:
    return f"pdserve-{spec.name}-{host_name}.service"


def render_unit(spec: ClusterFile, host_name: str, python: str = sys.executable) -> str:
    host = spec.host(host_name)
    parts = (["router"] if host.router else []) + [node.node_id for node in host.nodes]
    command = shlex.join([python, "-m", "pdserve.cli", "host", "--spec", str(spec.path.resolve()),
                          "--host", host.name])
    lines = [
        "[Unit]",
        f"Description=pdserve cluster {spec.name}, host {host.name}: {', '.join(parts)}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={command}",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={2 * int(spec.drain_timeout_s + 0.5) + STOP_MARGIN_S}",
        "Restart=on-failure",
        "RestartSec=5",
    ]
    if spec.secret is not None and spec.secret.env is not None:
        lines.append(f"# the cluster secret is read from ${spec.secret.env}: set it in a drop-in, e.g.")
        lines.append(f"# EnvironmentFile=/etc/pdserve/{spec.name}.env")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
