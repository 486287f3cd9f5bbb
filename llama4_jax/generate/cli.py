"""`llama4-jax generate CHECKPOINT --prompt ...` (streaming) and `llama4-jax eval CHECKPOINT DATA`."""

from __future__ import annotations

import argparse
import sys
import time


def add_generate_parsers(subparsers) -> None:
    """Registers the `generate` and `eval` subcommands on an argparse subparsers object."""
    gen = subparsers.add_parser(
        "generate", help="generate text from a checkpoint, streaming tokens as they come",
        description="CHECKPOINT: a Hugging Face directory, an Orbax model checkpoint or a training workdir.")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: one batch)")
    gen.add_argument("--prompt-ids", action="append", default=[], metavar="ID,ID,...",
                     help="prompt as comma-separated token ids (repeatable; no tokenizer needed)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off (Llama 4 instruct uses 0.9 at temperature 0.6)")
    gen.add_argument("--stop-token", type=int, action="append", default=None,
                     help="stop token id (repeatable; default: the config's eos ids, plus Llama 4 instruct's "
                          "200001, 200007, 200008 for the Llama 4 vocabulary)")
    gen.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's bos token to text prompts")
    _common(gen)
    gen.set_defaults(func=_generate)

    ev = subparsers.add_parser("eval", help="loss and perplexity of a checkpoint on a data source",
                               description="DATA: any data.source (embedded, tfds:NAME[:SPLIT], *.jsonl, *.txt, "
                                           "*.parquet, ArrayRecord); documents are packed as in training.")
    ev.add_argument("checkpoint")
    ev.add_argument("data")
    ev.add_argument("--split", choices=("train", "eval"), default="eval",
                    help="'eval' reads the held-out split of sources without their own (default); "
                         "'train' reads every document of a file")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=None, help="default: one pass over the data")
    ev.add_argument("--text-field", default="text", help="jsonl / parquet / tfds field holding the text")
    _common(ev)
    ev.set_defaults(func=_eval)


def _common(parser) -> None:
    parser.add_argument("--tokenizer", default=None,
                        help="'bpe:embedded', 'llama4' or a tokenizer.json (default: the checkpoint's own)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: as stored")
    parser.add_argument("--seed", type=int, default=0)


def _tokenizer(spec: str | None, loaded):
    from llama4_jax.data import DataConfig, load_tokenizer

    spec = spec or loaded.tokenizer
    if spec is None:
        raise ValueError("no tokenizer: the checkpoint has none (no tokenizer.json); pass --tokenizer, or "
                         "--prompt-ids for generate")
    return load_tokenizer(DataConfig(tokenizer=spec))


def _stop_tokens(args, config) -> tuple[int, ...]:
    from llama4_jax.generate import LLAMA4_STOP_TOKENS

    if args.stop_token is not None:
        return tuple(args.stop_token)
    eos = config.eos_token_id
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    if config.vocab_size > max(LLAMA4_STOP_TOKENS):
        stops |= set(LLAMA4_STOP_TOKENS)
    return tuple(sorted(stops))


def _prompts(args, loaded) -> tuple[list[list[int]], object]:
    if not args.prompt and not args.prompt_ids:
        raise ValueError("give at least one --prompt or --prompt-ids")
    prompts, tokenizer = [], None
    for text in args.prompt_ids:
        try:
            prompts.append([int(t) for t in text.split(",") if t.strip()])
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if args.prompt:
        tokenizer = _tokenizer(args.tokenizer, loaded)
        bos = [] if args.no_bos else [tokenizer.bos_id]
        prompts += [bos + tokenizer.encode(text) for text in args.prompt]
    elif args.tokenizer or loaded.tokenizer:
        tokenizer = _tokenizer(args.tokenizer, loaded)
    return prompts, tokenizer


class _Stream:
    """Prints a single prompt's new text as it arrives (decoding the whole continuation each time, so tokens
    that only form a character together print correctly), or token ids without a tokenizer."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout is looked up now, not when the module was imported (it may have been replaced since).
        self.tokenizer, self.out, self.ids, self.printed, self.done = tokenizer, out or sys.stdout, [], "", False

    def __call__(self, step, tokens, finished) -> None:
        if self.done:  # after its stop token a row still gets (meaningless) tokens
            return
        self.done = bool(finished[0])
        self.ids.append(int(tokens[0]))
        if self.tokenizer is None:
            self.out.write(f"{tokens[0]} ")
        else:
            text = self.tokenizer.decode(self.ids)
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                self.out.write(text[len(self.printed):])
                self.printed = text
        self.out.flush()


def _generate(args: argparse.Namespace) -> int:
    import jax

    from llama4_jax.generate import Generator, SamplingConfig
    from llama4_jax.generate.loading import load_model

    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        loaded = load_model(args.checkpoint, dtype=args.dtype)
        prompts, tokenizer = _prompts(args, loaded)
        config = loaded.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        gen = Generator(loaded.model, sampling=sampling, stop_tokens=_stop_tokens(args, config), pad_id=pad)
        stream = _Stream(tokenizer) if len(prompts) == 1 else None
        start = time.perf_counter()
        outputs = gen.generate(prompts, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                               on_step=stream)
    except ValueError as e:
        print(f"llama4-jax generate: error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if stream is None:
        for i, out in enumerate(outputs):
            text = tokenizer.decode(out) if tokenizer else " ".join(map(str, out))
            print(f"--- [{i}] {text}")
    else:
        print()
    total = sum(len(o) for o in outputs)
    print(f"[{total} tokens in {seconds:.2f}s incl. compilation, {len(prompts)} prompt(s)]", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import jax

    from llama4_jax.data import DataConfig, make_iterator
    from llama4_jax.evaluate import evaluate
    from llama4_jax.generate.loading import load_model

    try:
        loaded = load_model(args.checkpoint, dtype=args.dtype)
        tokenizer = _tokenizer(args.tokenizer, loaded)
        fraction = {} if args.split == "eval" else {"eval_fraction": 0.0}
        data = DataConfig(source=args.data, tokenizer=args.tokenizer or loaded.tokenizer, shuffle=False,
                          text_field=args.text_field, seed=args.seed, **fraction)
        batches = make_iterator(data, split=args.split, seq_len=args.seq_len, batch_size=args.batch_size,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                tokenizer=tokenizer, vocab_size=loaded.model.config.vocab_size, num_epochs=1)
        result = evaluate(loaded.model, batches, max_batches=args.max_batches)
    except ValueError as e:
        print(f"llama4-jax eval: error: {e}", file=sys.stderr)
        return 1
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  accuracy {result.accuracy:.4f}  "
          f"({result.tokens} tokens, {result.batches} batches of {args.batch_size} x {args.seq_len})")
    return 0
