"""`pdserve router`: flags -> RouterConfig -> run_router. Registered into the main CLI by
``add_router_parser(subparsers)``; heavy imports wait until the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from pdserve.common.secret import add_cluster_secret_flags, secret_from_args
from pdserve.router.config import (
    POLICY_NAMES,
    AdmissionConfig,
    HealthConfig,
    PolicyConfig,
    RegistryConfig,
    RetryConfig,
    RouterConfig,
    default_model_dir,
)
from pdserve.router.tool_calls import TOOL_CALL_PARSERS


def add_router_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("router", help="the OpenAI-compatible router (nodes register with it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--model", type=Path, default=None, help="HF model directory: tokenizer, chat template")
    p.add_argument("--model-name", default="pdserve-demo", help="the model id clients ask for")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--api-key", action="append", default=[], help="required API key (repeatable)")
    p.add_argument("--api-key-is-cluster-secret", action="store_true",
                   help="also take the cluster secret as an API key (keeps it off the command line)")
    p.add_argument("--registry", default="embedded", help="'embedded' or redis://host:port/db")
    p.add_argument("--heartbeat-ttl", type=float, default=10.0, help="seconds a node entry lives unrenewed")
    p.add_argument("--prefill-policy", default="prefix_aware", choices=POLICY_NAMES)
    p.add_argument("--decode-policy", default="power_of_two", choices=POLICY_NAMES)
    p.add_argument("--block-size", type=int, default=16, help="the nodes' KV block size (prefix hashing)")
    p.add_argument("--max-inflight-requests", type=int, default=256)
    p.add_argument("--max-queued-requests", type=int, default=512)
    p.add_argument("--queue-per-slot", type=float, default=1.0,
                   help="the queue holds at most this many requests per slot of the cluster")
    p.add_argument("--max-inflight-tokens", type=int, default=1 << 20)
    p.add_argument("--kv-overcommit", type=float, default=1.0,
                   help="admit prompt + max_tokens up to this many times the nodes' KV (>1: preemption)")
    p.add_argument("--retry-attempts", type=int, default=3)
    p.add_argument("--max-migrations", type=int, default=3,
                   help="times a stream that fails mid-way continues on another node pair")
    p.add_argument("--health-interval", type=float, default=2.0)
    p.add_argument("--ping-interval", type=float, default=0.25,
                   help="seconds between HTTP/2 pings on a node connection with calls open")
    p.add_argument("--ping-timeout", type=float, default=1.0,
                   help="a node that leaves a ping unanswered this long fails its streams (they migrate)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
                   help="how the model writes tool calls (vLLM's flag); without it tools are refused")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="SIGTERM: seconds in-flight requests get to finish (new ones get 503)")
    p.add_argument("--workers", type=int, default=1,
                   help="router processes sharing the port (admission limits are per worker)")
    add_cluster_secret_flags(p)
    p.set_defaults(handler=_run)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    secret = secret_from_args(args)
    api_keys = tuple(args.api_key)
    if args.api_key_is_cluster_secret:
        if secret is None:
            raise ValueError("--api-key-is-cluster-secret needs a cluster secret")
        api_keys += (secret.value.decode(),)
    return RouterConfig(
        host=args.host, port=args.port, model_name=args.model_name,
        model_dir=args.model or default_model_dir(), max_model_len=args.max_model_len,
        api_keys=api_keys,
        admission=AdmissionConfig(max_inflight_requests=args.max_inflight_requests,
                                  max_queued_requests=args.max_queued_requests,
                                  queue_per_slot=args.queue_per_slot, kv_overcommit=args.kv_overcommit,
                                  max_inflight_tokens=args.max_inflight_tokens),
        retry=RetryConfig(attempts=args.retry_attempts, migrations=args.max_migrations),
        health=HealthConfig(interval_s=args.health_interval, ping_interval_s=args.ping_interval,
                            ping_timeout_s=args.ping_timeout),
        registry=RegistryConfig(backend=args.registry, heartbeat_ttl_s=args.heartbeat_ttl),
        policy=PolicyConfig(prefill=args.prefill_policy, decode=args.decode_policy,
                            block_size=args.block_size),
        log_level=args.log_level, workers=args.workers, tool_call_parser=args.tool_call_parser,
        drain_timeout_s=args.drain_timeout, cluster_secret=secret, insecure=args.insecure,
    )


def _run(args: argparse.Namespace) -> int:
    from pdserve.router.server import run_router

    return run_router(config_from_args(args))
