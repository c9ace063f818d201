"""The `dzjax` command line: `dzjax demo`, `convert`, `generate`, `serve` and `bench`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def _demo(args) -> None:
    from dzjax.demo import run

    run(cache_dir=args.cache_dir, rebuild=args.rebuild, max_tokens=args.max_tokens)


def _generate(args) -> None:
    import jax.numpy as jnp

    from dzjax.models.generate import generate
    from dzjax.models.loading import load_base

    base = load_base(args.base, dtype=jnp.dtype(args.weights_dtype))
    texts = generate(base, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed, dtype=args.dtype)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")


def _sparsity(text: str):
    from dzjax.pallas_kernels.formats import parse_sparsity

    try:
        return parse_sparsity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _or_same(parse):
    """A value parsed by `parse`, or "same" (the blocks' setting)."""
    def read(text: str):
        return "same" if text == "same" else parse(text)
    return read


def _group(text: str):
    size = int(text)
    return None if size == 0 else size


def _convert(args) -> None:
    from dzjax.compress.pipeline import convert, report_json, report_text

    delta = convert(
        args.base, args.finetune, args.out, bits=args.bits, sparsity=args.sparsity,
        group_size=args.group_size, embedding_bits=args.embedding_bits,
        embedding_sparsity=args.embedding_sparsity,
        embedding_group_size=args.embedding_group_size,
        calibration=args.calibration, name=args.name, symmetric=args.symmetric,
        act_order=args.act_order, method=args.method, damp=args.damp,
        compress_embeddings=not args.keep_embeddings, zstd=args.zstd, n_samples=args.n_samples,
        seq_len=args.seq_len, seed=args.seed, progress=not args.quiet,
        refine_steps=args.refine_steps, target_bits=args.target_bits, allocation=args.allocation,
        checkpoint_every=None if args.no_checkpoint else args.checkpoint_every)
    report = delta.metadata["report"]
    print(report_json(report) if args.json else f"wrote {args.out}\n{report_text(report)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dzjax", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build (once) a tiny model and generate text with it")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the demo model is kept (default: $DZJAX_CACHE or ~/.cache/dzjax)")
    demo.add_argument("--rebuild", action="store_true", help="train the demo model again")
    demo.add_argument("--max-tokens", type=int, default=40)
    demo.set_defaults(run=_demo)

    conv = commands.add_parser("convert", help="compress a fine-tune's delta from its base")
    conv.add_argument("base", type=Path, help="base HF checkpoint directory")
    conv.add_argument("finetune", type=Path, help="fine-tuned HF checkpoint directory")
    conv.add_argument("-o", "--out", type=Path, required=True, help="delta file to write")
    conv.add_argument("--bits", type=int, default=2, choices=(2, 3, 4, 8, 16))
    conv.add_argument("--sparsity", type=_sparsity, default=None,
                      help="'n:m' (e.g. 2:4), a fraction for unstructured, or 'none' (default)")
    conv.add_argument("--group-size", type=_group, default=128, help="0 = per output channel")
    conv.add_argument("--embedding-bits", type=_or_same(int), default=4,
                      help="bits of the embedding and lm_head deltas, or 'same' as --bits")
    conv.add_argument("--embedding-sparsity", type=_or_same(_sparsity), default=None,
                      help="their sparsity (default none), or 'same'")
    conv.add_argument("--embedding-group-size", type=_or_same(_group), default=None,
                      help="their group size (default: per row), 0 = per row, or 'same'")
    conv.add_argument("--symmetric", action="store_true")
    conv.add_argument("--act-order", action="store_true")
    conv.add_argument("--method", choices=("obs", "rtn"), default="obs")
    conv.add_argument("--damp", type=float, default=0.01)
    conv.add_argument("--keep-embeddings", action="store_true",
                      help="store the embedding and lm_head deltas exactly")
    conv.add_argument("--zstd", action="store_true",
                      help="lossless zstd stage at rest (about 15-25%% smaller files)")
    conv.add_argument("--target-bits", type=float, default=None,
                      help="bits per weight of the whole delta to fit, choosing bits and sparsity "
                      "per matrix from measured sensitivity (instead of --bits/--sparsity)")
    conv.add_argument("--allocation", type=Path, default=None,
                      help="reuse the per-matrix choice of a delta file made with --target-bits "
                      "(or a JSON allocation): fine-tunes of one base then share one layout")
    conv.add_argument("--refine-steps", type=int, default=0,
                      help="Adam steps on each layer's scales after OBS (default 0: none)")
    conv.add_argument("--calibration", default=None,
                      help="a .txt or .jsonl file (default: the embedded corpus)")
    conv.add_argument("--checkpoint-every", type=float, default=60.0,
                      help="seconds between progress checkpoints (0: every layer; a killed "
                      "convert run again resumes)")
    conv.add_argument("--no-checkpoint", action="store_true", help="never checkpoint")
    conv.add_argument("--n-samples", type=int, default=128)
    conv.add_argument("--seq-len", type=int, default=512)
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--name", default=None, help="the fine-tune's name in the file")
    conv.add_argument("--json", action="store_true", help="print the report as JSON")
    conv.add_argument("--quiet", action="store_true", help="no progress lines")
    conv.set_defaults(run=_convert)

    gen = commands.add_parser("generate", help="generate continuations with a HF checkpoint")
    gen.add_argument("base", type=Path, help="HF checkpoint directory (with a tokenizer)")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="activations and KV cache (default: bfloat16 on a GPU, else float32)")
    gen.add_argument("--weights-dtype", choices=_DTYPES, default="bfloat16")
    gen.set_defaults(run=_generate)

    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server for a base and deltas")
    _serve_arguments(srv)
    srv.set_defaults(run=_serve)

    from dzjax.bench import cli as bench_cli

    bch = commands.add_parser("bench", help="serving throughput against the swap baseline")
    bench_cli.add_arguments(bch)
    bch.set_defaults(run=bench_cli.run)
    return p


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from dzjax.paths import named_path

    parser.add_argument("base", type=Path, help="base HF checkpoint directory (with a tokenizer)")
    parser.add_argument("--delta", type=named_path, action="append", default=[],
                        metavar="NAME=PATH", help="a delta file to serve as model NAME "
                        "(repeat for more; a bare PATH is named after its file)")
    parser.add_argument("--delta-dir", type=Path, default=None, metavar="DIR",
                        help="allow loading and unloading deltas over HTTP (/v1/load_delta, "
                        "/v1/unload_delta), for delta files inside DIR only (default: off)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' of every request but /health "
                        "and /metrics (default: $DZJAX_API_KEY; none if unset)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--base-name", default=None,
                        help="the model name of base-only requests (default: base)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="batch slots: requests decoded together (default: 8)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt + output tokens per request (default: min(context, 1024))")
    parser.add_argument("--max-resident-deltas", type=int, default=None,
                        help="deltas held on the device at once (default: 8)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="activations and KV cache (default: bfloat16 on a GPU, else float32)")
    parser.add_argument("--page-size", type=int, default=None,
                        help="positions per KV page (default: 16)")
    parser.add_argument("--kv-pages", type=int, default=None,
                        help="KV pages in the pool (default: every row at max-seq-len)")
    for flag, what in [("fuse-projections", "q/k/v and gate/up as separate matmuls"),
                       ("pipeline-decode", "read each decode step's tokens before the next"),
                       ("prefix-sharing", "no KV pages shared between requests' prefixes")]:
        parser.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_const",
                            const=False, default=None, help=f"{what} (default: on)")
    parser.add_argument("--weights-dtype", choices=_DTYPES, default="bfloat16",
                        help="dtype the base weights are held in")
    parser.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                        help="split the model over the first N devices (a tensor-parallel "
                        "mesh; with --replicas, over N devices of each replica)")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="serve one model over the devices of several processes "
                        "(jax.distributed; with --num-processes and --process-id): process 0 "
                        "serves HTTP, the others follow it (default: one process)")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N")
    parser.add_argument("--process-id", type=int, default=None, metavar="I")
    parser.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                        help="with --coordinator: a process silent this long stops the server "
                        "(default: 10)")
    parser.add_argument("--max-request-bytes", type=int, default=8 << 20,
                        help="largest request body; larger ones get 413 (default: 8 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGINT/SIGTERM, how long running requests may finish")
    parser.add_argument("--delta-read-timeout", type=float, default=None, metavar="SECONDS",
                        help="a delta read from disk that takes longer fails (default: 120)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="serve with N replicas on Ray Serve, each request routed to a "
                        "replica holding its delta (needs dzjax[ray]; default: one process)")
    parser.add_argument("--autoscaling-config", type=json.loads, default=None, metavar="JSON",
                        help="Ray Serve autoscaling settings, passed as they are (instead of "
                        "--replicas), e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")


def serve_options(args: argparse.Namespace, *, mesh: bool = True) -> dict:
    """The `dzjax.serve` options that the serve command's arguments set (mesh=False: not the
    mesh, which replicas build for themselves)."""
    options = {"base_name": args.base_name, "max_batch": args.max_batch,
               "max_seq_len": args.max_seq_len, "max_resident_deltas": args.max_resident_deltas,
               "dtype": args.dtype, "delta_read_timeout_s": args.delta_read_timeout,
               "page_size": args.page_size, "kv_pages": args.kv_pages,
               "fuse_projections": args.fuse_projections,
               "pipeline_decode": args.pipeline_decode, "prefix_sharing": args.prefix_sharing,
               "worker_timeout_s": getattr(args, "worker_timeout", None)}
    # With --coordinator, a mesh always (None: every device of every process).
    if mesh and (args.tensor_parallel or getattr(args, "coordinator", None) is not None):
        from dzjax.models.sharding import make_mesh
        options["mesh"] = make_mesh(args.tensor_parallel)
    return {k: v for k, v in options.items() if v is not None}


def _serve(args) -> None:
    """`dzjax serve`: load the base, start the engine, serve HTTP until interrupted."""
    import jax.numpy as jnp

    from dzjax.errors import DzjaxError
    from dzjax.models.loading import load_base
    from dzjax.serving.server import serve

    deltas = dict(args.delta)
    if len(deltas) != len(args.delta):
        raise DzjaxError("two --delta options give the same name")
    if args.coordinator is not None or args.num_processes is not None \
            or args.process_id is not None:
        return _serve_processes(args, deltas)
    if args.worker_timeout is not None:
        raise DzjaxError("--worker-timeout goes with --coordinator (several processes)")
    if args.replicas is not None or args.autoscaling_config is not None:
        return _serve_replicas(args, deltas)
    base = load_base(args.base, dtype=jnp.dtype(args.weights_dtype))
    _run_http(serve(base, deltas, **serve_options(args)), args)


def _run_http(server, args) -> None:
    """Serve `server` over HTTP as the serve command's arguments say, until interrupted."""
    from dzjax.serving.http import run_server

    run_server(server, host=args.host, port=args.port, log_level=args.log_level,
               max_request_bytes=args.max_request_bytes, shutdown_timeout_s=args.shutdown_timeout,
               api_key=_api_key(args),
               delta_dir=args.delta_dir)


def _serve_processes(args, deltas: dict) -> None:
    """`dzjax serve --coordinator H:P --num-processes N --process-id I`: one model over the
    devices of N processes; process 0 serves HTTP, the others follow it until it stops."""
    import jax
    import jax.numpy as jnp

    from dzjax.errors import DzjaxError
    from dzjax.models.loading import load_base
    from dzjax.serving.server import serve

    if None in (args.coordinator, args.num_processes, args.process_id):
        raise DzjaxError("--coordinator, --num-processes and --process-id go together")
    if args.replicas is not None or args.autoscaling_config is not None:
        raise DzjaxError("--replicas and --coordinator cannot be combined")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (CPU devices; no effect
    # on GPUs, whose collectives are NCCL's)
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    try:
        options = serve_options(args)
        processes = {d.process_index for d in options["mesh"].devices.flat}
        if len(processes) != args.num_processes:
            raise DzjaxError(f"the mesh of --tensor-parallel {args.tensor_parallel} devices "
                             f"spans {len(processes)} of the {args.num_processes} processes; "
                             f"it must span them all")
        base = load_base(args.base, dtype=jnp.dtype(args.weights_dtype))
        if args.process_id != 0:  # a follower stops when process 0 does (which drains first)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server = serve(base, deltas, **options)
        if server is not None:  # process 0
            _run_http(server, args)
    except DzjaxError as e:  # a process lost: jax.distributed's shutdown would wait for it
        print(f"dzjax serve: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    jax.distributed.shutdown()


def _api_key(args) -> str | None:
    """--api-key, else $DZJAX_API_KEY, else None (no key)."""
    return args.api_key or os.environ.get("DZJAX_API_KEY") or None


def _serve_replicas(args, deltas: dict) -> None:
    """`dzjax serve --replicas N`: the same server as N replicas on Ray Serve."""
    from dzjax.errors import DzjaxError

    if args.replicas is not None and args.autoscaling_config is not None:
        raise DzjaxError("give --replicas or --autoscaling-config, not both")
    from dzjax.serving import admin, ray_serve

    key = _api_key(args)
    admin.warn_if_open(args.host, args.port, key, args.delta_dir)
    app = ray_serve.application(
        args.base, deltas, num_replicas=args.replicas,
        autoscaling_config=args.autoscaling_config, weights_dtype=args.weights_dtype,
        max_request_bytes=args.max_request_bytes, shutdown_timeout_s=args.shutdown_timeout,
        api_key=key, delta_dir=args.delta_dir, tensor_parallel=args.tensor_parallel,
        **serve_options(args, mesh=False))  # (each replica builds its own mesh)
    ray_serve.run(app, host=args.host, port=args.port)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from dzjax.errors import DzjaxError

    args = parser().parse_args(argv)
    if args.command != "serve":  # (serve shuts down gracefully on its own)
        # SIGTERM as an exception, so that a killed convert removes its temporary file.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        args.run(args)
    except DzjaxError as e:  # bad input: the message says what is wrong, no traceback
        print(f"dzjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
