"""The `dzjax` command line: `dzjax demo`, `dzjax generate`."""

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dzjax", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build (once) a tiny model and generate text with it")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the demo model is kept (default: $DZJAX_CACHE or ~/.cache/dzjax)")
    demo.add_argument("--rebuild", action="store_true", help="train the demo model again")
    demo.add_argument("--max-tokens", type=int, default=40)
    demo.set_defaults(run=_demo)

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
