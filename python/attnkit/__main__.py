"""Command line.

``python -m attnkit bench [--quick] [--threads 1 2] [--json FILE] [--plot FILE.png]``: each kernel's speed against
NumPy and PyTorch. ``python -m attnkit demo [SENTENCE] [--plot FILE.png]``: static embeddings
become contextual ones through self-attention. ``python -m attnkit embed --model PATH [FILE] --out
OUT.npy``: sentence embeddings of the lines of FILE (or standard input) with a real checkpoint;
``python -m attnkit generate --model PATH "prompt" [--max-new-tokens N] [--temperature T --seed S]``:
a decoder continues the prompt, streaming (both need ``attnkit[models]``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


DTYPE_HELP = ("the matrix products' dtype: float32 (default: attnkit.F32Linear) or bfloat16 (attnkit.Bf16Linear: about twice as fast "
              "on CPUs with AVX512_BF16, about ten times slower on others)")


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
    demo.add_argument("--model", metavar="PATH", help="a real encoder's folder: one word in several sentences, its "
                      "static against its contextual embeddings (needs attnkit[models])")
    demo.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="with --model: " + DTYPE_HELP)
    demo.add_argument("--word", default="bank", help="with --model: the word to follow (default: bank)")
    demo.add_argument("--layer", type=int, default=None, help="with --model: the layer of the attention shown (default: last)")
    demo.add_argument("--head", type=int, default=0, help="with --model: the head of the attention shown (default: 0)")
    embed = commands.add_parser("embed", help="sentence embeddings of text lines, with a checkpoint folder")
    embed.add_argument("--model", required=True, metavar="PATH", help="the checkpoint's folder (attnkit.models.load)")
    embed.add_argument("file", nargs="?", help="one sentence per line (default: standard input)")
    embed.add_argument("--out", required=True, metavar="OUT.npy", help="where to save the (lines, hidden) float32 array")
    embed.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=DTYPE_HELP)
    embed.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default 32)")
    embed.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                       help="unit-length vectors (default: as the checkpoint says)")
    generate = commands.add_parser("generate", help="continue a prompt with a decoder checkpoint, streaming")
    generate.add_argument("--model", required=True, metavar="PATH", help="a folder or a .gguf file (attnkit.models.load)")
    generate.add_argument("prompt", help="the text to continue (apply the model's chat template yourself)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=DTYPE_HELP)
    generate.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampling")
    generate.add_argument("--seed", type=int, default=None, help="the sampler's seed")
    args = parser.parse_args(argv)

    if args.command == "embed":
        return _embed(args, parser)
    if args.command == "generate":
        return _generate(args, parser)

    if args.command == "demo":
        from attnkit import _demo

        if args.model:
            encoder = _load("demo", args.model, "encoder", args.dtype)
            if encoder is None:
                return 2
            return _demo.run_model(encoder, args.sentence, args.word, args.plot, args.layer, args.head)
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


def _load(command: str, path: str, kind: str, dtype: str) -> Any:
    """The checkpoint at ``path`` (its matrix products in ``dtype``) if it holds a model of
    ``kind`` ("encoder": BERT family, "decoder": LLaMA family); else None, after saying why on
    standard error."""
    from attnkit import models

    try:
        model = models.load(path, dtype=dtype)
    except (ValueError, ImportError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return None
    want, needs = ((models.BertEncoder, "an encoder (BERT family)") if kind == "encoder"
                   else (models.LlamaDecoder, "a decoder (LLaMA family)"))
    if not isinstance(model, want):
        print(f"{command}: {path} holds a {type(model).__name__}; {command} needs {needs}", file=sys.stderr)
        return None
    return model


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens: must be at least 0")
    if not args.temperature >= 0:
        parser.error("--temperature: must be at least 0")
    decoder = _load("generate", args.model, "decoder", args.dtype)
    if decoder is None:
        return 2
    prompt = decoder.tokenizer.encode(args.prompt).ids
    if not prompt:
        parser.error("prompt: the tokenizer gives no tokens for it")
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    first = None
    for step in decoder.stream_ids([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   seed=args.seed):
        if first is None:
            first = time.perf_counter()
        new.append(step[0])
        text = decoder.tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character whose bytes are still coming
            print(text[len(shown):], end="", flush=True)
            shown = text
    end = time.perf_counter()
    print(decoder.tokenizer.decode(new, skip_special_tokens=True)[len(shown):])  # bytes that never completed
    if new and first is not None:
        rate = (len(new) - 1) / (end - first) if len(new) > 1 else float("nan")
        print(f"{len(new)} tokens; prompt of {len(prompt)} tokens in {first - start:.2f} s, then {rate:.1f} tokens/s",
              file=sys.stderr)
    return 0


def _embed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np

    if args.batch_size < 1:
        parser.error("--batch-size: must be at least 1")
    encoder = _load("embed", args.model, "encoder", args.dtype)
    if encoder is None:
        return 2
    if args.file is None:
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            print(f"embed: {e}", file=sys.stderr)
            return 2
    lines = text.splitlines()
    out = np.empty((len(lines), encoder.config.hidden), np.float32)
    # Chunks of sentences, so that a long input shows its progress (on standard error).
    chunk = 32 * args.batch_size
    show = len(lines) > chunk
    for start in range(0, len(lines), chunk):
        out[start:start + chunk] = encoder.encode(lines[start:start + chunk], batch_size=args.batch_size,
                                                  normalize=args.normalize)
        if show:
            done = min(start + chunk, len(lines))
            bar = "#" * (30 * done // len(lines))
            print(f"\r[{bar:<30}] {done}/{len(lines)} sentences", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    np.save(args.out, out)
    print(f"{len(lines)} sentences -> {args.out} {out.shape} float32", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C: a long attnkit call stops within milliseconds; say so in one line, no traceback.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
