"""The `pdserve` command line. Each subcommand parses its flags and hands off to one module."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pdserve.common.secret import add_cluster_secret_flags, secret_from_args
from pdserve.deploy.cli import add_deploy_parsers
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.router.cli import add_router_parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", type=Path, default=None,
                       help="HF model directory (default: the bundled demo)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--num-blocks", type=int, default=1024, help="KV cache blocks")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step")
    group.add_argument("--max-model-len", type=int, default=2048)
    group.add_argument("--threads", type=int, default=2,
                       help="OMP threads of each engine process (each rank under tensor parallelism)")
    group.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="engine rank processes sharing the model by attention heads")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    text = getattr(args, "speculative_config", None)
    speculative = SpeculativeConfig.from_json(text) if text is not None else None
    return EngineConfig(
        cache=CacheConfig(num_blocks=args.num_blocks, block_size=args.block_size),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
        ),
        speculative=speculative,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Prefill/decode disaggregated LLM serving")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue prompts offline through one engine")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--logprobs", type=int, default=None, help="top-k logprobs per token (0-20)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--speculative-config", default=None, help="JSON, FastDeploy's format")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    _add_engine_flags(gen)
    gen.set_defaults(handler=_generate)

    for role, helptext in (("mixed", "a node that prefills and decodes (the single-node baseline)"),
                           ("decode", "a decode node: takes KV from prefill nodes, decodes, streams"),
                           ("prefill", "a prefill node: prefills prompts, pushes KV to decode nodes")):
        node = sub.add_parser(role, help=helptext)
        _add_node_flags(node)
        _add_engine_flags(node)
        add_cluster_secret_flags(node)
        node.set_defaults(handler=_run_node, role=role)

    up = sub.add_parser("up", help="a local cluster: router + prefill/decode/mixed nodes")
    up.add_argument("--config", type=Path, default=None, help="YAML file with the same keys as the flags")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None, help="the router's HTTP port (default 8000)")
    up.add_argument("--prefill", type=int, default=None, help="prefill nodes (default 1)")
    up.add_argument("--decode", type=int, default=None, help="decode nodes (default 1)")
    up.add_argument("--mixed", type=int, default=None, help="mixed nodes (default 0)")
    up.add_argument("--model", default=None, help="HF model directory (default: the bundled demo)")
    up.add_argument("--model-name", default=None)
    up.add_argument("--speculative-config", default=None, help="JSON, FastDeploy's format")
    up.add_argument("--tool-call-parser", default=None, help="the router's tool-call parser (e.g. hermes)")
    up.add_argument("--registry", default=None, help="'embedded' (default) or redis://host:port")
    up.add_argument("--api-key", action="append", default=None, help="required API key (repeatable)")
    up.add_argument("--threads-per-node", type=int, default=None)
    up.add_argument("--num-blocks", type=int, default=None, help="KV blocks per node")
    up.add_argument("--tensor-parallel-size", type=int, default=None,
                    help="engine ranks per node (default 1)")
    up.add_argument("--prefill-tensor-parallel-size", type=int, default=None, help="overrides it for prefill")
    up.add_argument("--decode-tensor-parallel-size", type=int, default=None, help="overrides it for decode")
    up.add_argument("--drain-timeout", type=float, default=None,
                    help="SIGTERM: seconds in-flight requests get to finish (default 30)")
    up.add_argument("--engine-stall-timeout", type=float, default=None,
                    help="seconds a node lets its engine stay silent before killing it (default 30)")
    up.add_argument("--cluster-secret-file", default=None,
                    help="the cluster secret (mode 0600); default: a fresh one in the run directory")
    up.add_argument("--insecure", action="store_true", default=None,
                    help="run the cluster without a secret: internal traffic NOT authenticated")
    up.set_defaults(handler=_up)
    add_router_parser(sub)
    add_deploy_parsers(sub)
    return parser


def _up(args: argparse.Namespace) -> int:
    from pdserve.deploy.cluster import ClusterSpec, run_cluster

    overrides = {
        "host": args.host, "port": args.port, "prefill": args.prefill, "decode": args.decode,
        "mixed": args.mixed, "model": args.model, "model_name": args.model_name,
        "speculative_config": args.speculative_config, "registry": args.registry,
        "tool_call_parser": args.tool_call_parser, "api_keys": tuple(args.api_key) if args.api_key else None,
        "threads_per_node": args.threads_per_node, "num_blocks": args.num_blocks,
        "tensor_parallel_size": args.tensor_parallel_size,
        "prefill_tensor_parallel_size": args.prefill_tensor_parallel_size,
        "decode_tensor_parallel_size": args.decode_tensor_parallel_size,
        "drain_timeout_s": args.drain_timeout, "engine_stall_timeout_s": args.engine_stall_timeout,
        "log_level": args.log_level, "cluster_secret_file": args.cluster_secret_file,
        "insecure": args.insecure,
    }
    if args.config is not None:
        spec = ClusterSpec.from_yaml(args.config, **overrides)
    else:
        spec = ClusterSpec(**{k: v for k, v in overrides.items() if v is not None})
    return run_cluster(spec)


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("node")
    group.add_argument("--node-id", default=None, help="unique name (default: ROLE-PID)")
    group.add_argument("--host", default="127.0.0.1", help="interface every socket of the node binds")
    group.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    group.add_argument("--data-port", type=int, default=0, help="KV data-plane port (0: any free port)")
    group.add_argument("--metrics-port", type=int, default=None,
                       help="Prometheus port (default: none; 0: one the OS picks, in the ready line)")
    group.add_argument("--model-name", default="pdserve-demo", help="the name clients ask for")
    group.add_argument("--registry", default=None,
                       help="router URL (http://...) or redis://... to register with")
    group.add_argument("--registry-api-key", default=None,
                       help="API key for registering with a router that requires one")
    group.add_argument("--registry-api-key-is-cluster-secret", action="store_true",
                       help="register with the cluster secret as the router's API key")
    group.add_argument("--speculative-config", default=None, help="JSON, FastDeploy's format")
    group.add_argument("--transport", default="auto", choices=["auto", "shm", "zmq"],
                       help="prefill node: how KV reaches the decode node (auto: shm on the same host)")
    group.add_argument("--prefill-timeout", type=float, default=120.0,
                       help="decode node: seconds to wait for a prefill peer's first token")
    group.add_argument("--kv-lease", type=float, default=10.0, help="KV reservation lease, seconds")
    group.add_argument("--prefill-fallback", default="fail", choices=["fail", "local"],
                       help="decode node when its prefill peer fails: fail the request or prefill here")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="SIGTERM: seconds in-flight requests get to finish before the node exits")
    group.add_argument("--stop-timeout", type=float, default=30.0,
                       help="seconds after the drain the node's orderly stop may take; past them the node "
                            "writes every thread's stack to its log and exits with status 1")
    group.add_argument("--engine-stall-timeout", type=float, default=30.0,
                       help="seconds without a record from a running engine (stopped, or hung in a step) "
                            "before the node kills it and fails its requests as a dead engine's; must "
                            "exceed the longest step")


def _node_config(args: argparse.Namespace):
    import os

    from pdserve.models.loader import default_model_dir
    from pdserve.models.tokenizer import Tokenizer
    from pdserve.node.server import NodeConfig

    model_dir = args.model or default_model_dir()
    secret = secret_from_args(args)
    registry_api_key = args.registry_api_key
    if args.registry_api_key_is_cluster_secret:
        if secret is None:
            raise ValueError("--registry-api-key-is-cluster-secret needs a cluster secret")
        registry_api_key = secret.value.decode()
    return NodeConfig(
        role=args.role, node_id=args.node_id or f"{args.role}-{os.getpid()}", model_dir=str(model_dir),
        engine=_engine_config(args), model_name=args.model_name, host=args.host, grpc_port=args.port,
        data_port=args.data_port, metrics_port=args.metrics_port, omp_num_threads=args.threads,
        tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
        eos_token_ids=Tokenizer.from_dir(model_dir).eos_token_ids, registry_url=args.registry,
        registry_api_key=registry_api_key,
        transport=args.transport, prefill_timeout_s=args.prefill_timeout, kv_lease_s=args.kv_lease,
        prefill_fallback=args.prefill_fallback, drain_timeout_s=args.drain_timeout,
        stop_timeout_s=args.stop_timeout, engine_stall_timeout_s=args.engine_stall_timeout,
        log_level=args.log_level, cluster_secret=secret,
        insecure=args.insecure,
    )


def _run_node(args: argparse.Namespace) -> int:
    from pdserve.node.server import run_node
    from pdserve.rpc.registry import Role

    config = _node_config(args)
    if config.role is Role.PREFILL:
        from pdserve.prefill_node.server import PrefillNodeServer as server_class
    else:
        from pdserve.decode_node.server import DecodeNodeServer as server_class
    return run_node(server_class(config))


def _generate(args: argparse.Namespace) -> int:
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.models.loader import default_model_dir
    from pdserve.models.tokenizer import Tokenizer
    from pdserve.node.engine_client import EngineClient, EngineClientConfig
    from pdserve.node.offline import generate

    engine_config = _engine_config(args)  # validates --speculative-config before anything starts
    model_dir = args.model or default_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, logprobs=args.logprobs, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    config = EngineClientConfig(model_dir=str(model_dir), engine=engine_config,
                                eos_token_ids=tokenizer.eos_token_ids, dtype=args.dtype,
                                omp_num_threads=args.threads, log_level=args.log_level,
                                tensor_parallel_size=args.tensor_parallel_size)
    with EngineClient(config) as client:
        results = generate(client, tokenizer, args.prompt, params, speculative=engine_config.speculative)
    for result in results:
        if args.json:
            print(json.dumps(result.to_json()))
        else:
            print(f"{result.prompt}\033[1m{result.text}\033[0m  [{result.finish_reason}]\n")
    return 0 if all(r.error is None for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pdserve.node.engine_client import EngineError

    try:
        return args.handler(args)
    except ValueError as exc:  # config and parameter validation: a clear message, not a traceback
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:  # the engine could not start (pdserve generate): say why, no traceback
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
