"""The deployment subcommands of `pdserve`: host, status and systemd, all driven by a cluster spec
(deploy/spec.py). Registered into the main CLI by ``add_deploy_parsers(subparsers)``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    host = sub.add_parser("host", help="start this host's router and nodes from a cluster spec")
    host.add_argument("--spec", type=Path, required=True, help="the cluster spec (YAML)")
    host.add_argument("--host", required=True, help="which host of the spec this is")
    host.set_defaults(handler=_host)

    status = sub.add_parser("status", help="every router and node of a cluster spec, and its health")
    status.add_argument("--spec", type=Path, required=True, help="the cluster spec (YAML)")
    status.set_defaults(handler=_status)

    unit = sub.add_parser("systemd", help="print a systemd unit that runs one host of a cluster spec")
    unit.add_argument("--spec", type=Path, required=True, help="the cluster spec (YAML)")
    unit.add_argument("--host", required=True, help="which host of the spec the unit runs")
    unit.set_defaults(handler=_systemd)


def _host(args: argparse.Namespace) -> int:
    from pdserve.deploy.host import run_host
    from pdserve.deploy.spec import load_spec

    return run_host(load_spec(args.spec), args.host)


def _status(args: argparse.Namespace) -> int:
    from pdserve.deploy.spec import load_spec
    from pdserve.deploy.status import run_status

    return run_status(load_spec(args.spec))


def _systemd(args: argparse.Namespace) -> int:
    from pdserve.deploy.spec import load_spec
    from pdserve.deploy.systemd import render_unit

    print(render_unit(load_spec(args.spec), args.host), end="")
    return 0
