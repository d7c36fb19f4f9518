"""Command line.

``python -m attnkit bench [--quick] [--threads 1 2] [--json FILE] [--plot FILE.png]``: each kernel's speed against
NumPy and PyTorch. ``python -m attnkit demo [SENTENCE] [--plot FILE.png]``: static embeddings
become contextual ones through self-attention.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="each kernel's speed against NumPy and PyTorch")
    bench.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (about a minute)")
    bench.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    bench.add_argument("--json", metavar="FILE", help="save the figures as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw the ratios to PyTorch, and the decode latency per "
                       "token to FILE-latency.png (needs matplotlib)")
    demo = commands.add_parser("demo", help="self-attention on the words of a sentence")
    demo.add_argument("sentence", nargs="?", help="the sentence (default: a sentence with two kinds of bank)")
    demo.add_argument("--plot", metavar="FILE.png", help="save the attention map (needs matplotlib)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from attnkit import _demo

        return _demo.run(args.sentence, args.plot)

    if args.command == "bench":
        from attnkit import _bench

        if any(n < 1 for n in args.threads):
            parser.error("--threads: thread counts must be positive")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                parser.error("--plot needs matplotlib (pip install matplotlib)")
        _bench.run(quick=args.quick, threads=tuple(args.threads), json_path=args.json, plot_path=args.plot)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C: a long attnkit call stops within milliseconds; say so in one line, no traceback.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
