"""The `dzjax` command line: `dzjax demo`, `convert`, `generate`, `serve` and `bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def _demo(args) -> None:
    from dzjax import demo

    demo.run(cache_dir=args.cache_dir, rebuild=args.rebuild, max_tokens=args.max_tokens)


def _generate(args) -> None:
    import jax.numpy as jnp

    import dzjax

    base = dzjax.load_base(args.base, dtype=jnp.dtype(args.weights_dtype))
    texts = dzjax.generate(base, args.prompt, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           dtype=jnp.dtype(args.dtype))
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")


def _sparsity(text: str):
    if text.lower() in ("none", "dense"):
        return None
    return text if ":" in text else float(text)


def _convert(args) -> None:
    import dzjax
    from dzjax.compress.pipeline import report_json, report_text

    delta = dzjax.convert(
        args.base, args.finetune, args.out, bits=args.bits, sparsity=args.sparsity,
        group_size=None if args.group_size == 0 else args.group_size,
        calibration=args.calibration, name=args.name, symmetric=args.symmetric,
        act_order=args.act_order, method=args.method, damp=args.damp,
        compress_embeddings=not args.keep_embeddings, zstd=args.zstd, n_samples=args.n_samples,
        seq_len=args.seq_len, seed=args.seed, progress=not args.quiet)
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
    conv.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8, 16))
    conv.add_argument("--sparsity", type=_sparsity, default="2:4",
                      help="'n:m' (default 2:4), a fraction for unstructured, or 'none'")
    conv.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    conv.add_argument("--symmetric", action="store_true")
    conv.add_argument("--act-order", action="store_true")
    conv.add_argument("--method", choices=("obs", "rtn"), default="obs")
    conv.add_argument("--damp", type=float, default=0.01)
    conv.add_argument("--keep-embeddings", action="store_true",
                      help="store the embedding and lm_head deltas exactly")
    conv.add_argument("--zstd", action="store_true",
                      help="lossless zstd stage at rest (about 15-25%% smaller files)")
    conv.add_argument("--calibration", default=None,
                      help="a .txt or .jsonl file (default: the embedded corpus)")
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
    gen.add_argument("--dtype", choices=_DTYPES, default="float32", help="activation dtype")
    gen.add_argument("--weights-dtype", choices=_DTYPES, default="bfloat16")
    gen.set_defaults(run=_generate)

    from dzjax.serving import bench, http

    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server for a base and deltas")
    http.add_arguments(srv)
    srv.set_defaults(run=http.run)

    bch = commands.add_parser("bench", help="serving throughput against the swap baseline")
    bench.add_arguments(bch)
    bch.set_defaults(run=bench.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from dzjax.errors import DzjaxError

    args = parser().parse_args(argv)
    try:
        args.run(args)
    except DzjaxError as e:  # bad input: the message says what is wrong, no traceback
        print(f"dzjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
