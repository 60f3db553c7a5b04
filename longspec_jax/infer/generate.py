"""`python -m infer.generate`: generate text with a target model, autoregressively or with the
LongSpec tree speculative decoder, and report honest timings.

    python -m infer.generate                                   # the embedded demo pair, offline, CPU is fine
    python -m infer.generate --prompt-tokens 8192 --compare-ar # 8k tokens of held-out code, speedup vs AR
    python -m infer.generate --model llama3-8b --prompt "..." --max-new-tokens 256
    python -m infer.generate --model llama3-8b --method tree --tree-shape 4 16 16 16 16

Model flags: `longspec_jax/infer/cli.py`. Timings are taken after `block_until_ready`; compile time is reported
apart from prefill and decode; decode tokens/s counts the tokens after the first (which the
prefill produced) over the decode loop's time.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
from flax import nnx

from longspec_jax.infer import cli, prompts, tiny_random
from longspec_jax.infer.cli import UsageError
from longspec_jax.infer.decoder import Decoder
from longspec_jax import demo
from longspec_jax.sampling import SamplingParams

# Its default prompt: the first DEMO_PROMPT_TOKENS tokens of a held-out package's code.
DEMO_PROMPT_TOKENS = 4096
# Streaming is opt-in: decoding the text between decode slices adds to the time per token.
STREAM_EVERY = 8
STREAM_INTERVAL_S = 0.25
# Prompts of at least this many chunks show prefill progress (tokens done / total, tokens/s).
PROGRESS_MIN_CHUNKS = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None,
                     help=f"prompt text (default: {prompts.DEFAULT_PROMPT!r}; for {demo.NAME}, the start of a "
                          "held-out package's code)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this text file")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help=f"keep the first N tokens of the prompt (default for {demo.NAME}'s own prompt: "
                        f"{DEMO_PROMPT_TOKENS}); a way to try context lengths with one long prompt")
    p.add_argument("--compare-ar", action="store_true",
                   help="--method tree: also run the target alone with the same settings and report the speedup "
                        "and whether the two outputs are identical")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens to generate (EOS included)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = disabled")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = disabled")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-chat-template", action="store_true", help="encode the raw prompt text")
    p.add_argument("--sample-drafts", action=argparse.BooleanOptionalAction, default=True,
                   help="--method tree at --temperature > 0: draw every node's children from the draft distribution "
                        "and verify by (block) rejection sampling; --no-sample-drafts keeps the beam search's drafts "
                        "and sample-and-match acceptance. Both are exact")
    p.add_argument("--verification", choices=("block", "token"), default="block",
                   help="how sampled drafts are verified at --temperature > 0: 'block' judges each path as a whole "
                        "(accepts at least as much as 'token', token-wise rejection sampling). Both are exact")
    p.add_argument("--cache-capacity", type=int, default=None,
                   help="KV cache slots per sequence (default: prompt + max-new-tokens, rounded up)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                   help="print text as it is produced")
    return p


def sampling_params(args) -> SamplingParams:
    """--temperature / --top-k / --top-p, refused with the flag's name."""
    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise UsageError(f"--{field.replace('_', '-')}{str(e)[len(field):]}") from None


def read_prompt(args) -> str:
    """The prompt text: --prompt-file, --prompt, the demo's held-out code, or the default prompt."""
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {args.prompt_file!r} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                             f"at offset {e.start}); convert it to UTF-8") from None
        if not text.strip():
            raise UsageError(f"--prompt-file {args.prompt_file!r} is empty{' (only whitespace)' if text else ''}; "
                             "write the text to continue into it, or pass --prompt TEXT")
        return text
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; pass the text to continue (e.g. --prompt 'def fib(n):'), or "
                             "--prompt-file FILE, or leave both out for the default prompt")
        return args.prompt
    if args.model == demo.NAME:
        return demo.heldout_prompts()[0]["text"]
    return prompts.DEFAULT_PROMPT


def check_lengths(n_prompt: int, cfg, args, shape) -> None:
    """Refuse a prompt plus --max-new-tokens beyond the model's position limit, or a --cache-capacity
    that cannot hold what the chosen method needs; `shape` is the --tree-shape (or None)."""
    n_new, limit = args.max_new_tokens, cfg.max_position_embeddings
    if n_prompt + n_new > limit:
        fixes = [f"--max-new-tokens {limit - n_prompt}"] if n_prompt < limit else []
        if n_new < limit:
            fixes.insert(0, f"--prompt-tokens {limit - n_new} (keeps the start of the prompt)")
        raise UsageError(
            f"the prompt ({n_prompt} tokens) plus --max-new-tokens ({n_new}) is {n_prompt + n_new} positions, more "
            f"than the {limit} that {args.model} supports (max_position_embeddings in its config); "
            + (f"pass {' or '.join(fixes)}" if fixes else f"lower --max-new-tokens below {limit}"))
    cap = args.cache_capacity
    if cap is None:
        return
    if args.method == "ar" and cap < n_prompt + n_new:
        raise UsageError(f"--cache-capacity {cap} cannot hold the prompt ({n_prompt} tokens) plus --max-new-tokens "
                         f"({n_new}); raise --cache-capacity to at least {n_prompt + n_new} or leave it unset")
    nodes = shape.num_nodes if shape is not None else 2  # the smallest tree: the root and one draft
    if args.method == "tree" and cap < n_prompt + nodes:
        raise UsageError(f"--cache-capacity {cap} cannot hold the prompt ({n_prompt} tokens) and one draft tree "
                         f"({nodes} nodes) after it; raise --cache-capacity to at least {n_prompt + nodes} "
                         f"({n_prompt + n_new + nodes} never stops early) or leave it unset")


def _rate(n, s):
    return f"{n / s:,.1f}" if s > 0 else "n/a"


def prefill_progress(n_tokens: int, chunk: int):
    """A tqdm bar over the prompt's tokens for long prompts (tokens/s shown), else None."""
    if n_tokens < PROGRESS_MIN_CHUNKS * chunk:
        return None
    from tqdm import tqdm

    bar = tqdm(total=n_tokens, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr)

    def update(done, total, seconds):
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def acceptance_rule(args) -> str:
    """How the tree method accepts drafts with these flags, in words (printed beside tau)."""
    if args.temperature == 0:
        return "greedy: drafts match the target's argmax"
    if args.sample_drafts:
        return f"sampled drafts, {args.verification} verification"
    return "beam drafts, sample-and-match"


def report(res, n_prompt: int, acceptance: str = "") -> None:
    """Stop reason, compile / prefill / decode timings and, for tree decoding, acceptance (`acceptance`: how)."""
    t = res.timings
    print("-" * 72)
    print(f"stopped on: {res.stop_reason[0]} after {len(res.tokens[0])} tokens")
    print(f"compile {t.compile_s:.2f} s (0 when already compiled) | prefill {n_prompt} tokens in {t.prefill_s:.3f} s "
          f"({_rate(n_prompt, t.prefill_s)} tok/s) | decode {t.decode_tokens} tokens in {t.decode_s:.3f} s "
          f"({_rate(t.decode_tokens, t.decode_s)} tok/s, {t.ms_per_step:.2f} ms/step)")
    if res.spec is not None:
        s = res.spec
        by_depth = ", ".join(f"{a / max(t.decode_steps, 1):.2f}" for a in s.accepted_by_depth)
        print(f"tau (tokens per target forward, bonus included) {s.tau:.3f} | tree {s.tree_shape} | draft vocab "
              f"{s.draft_vocab_size}" + (f" | {acceptance}" if acceptance else ""))
        print(f"accepted drafts by depth (share of {t.decode_steps} verifications): {by_depth}")


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own refusals (exit 2) and --help (exit 0), as a return code
        return e.code
    try:
        shape, vocab_ids = cli.check_model_flags(args, counts=(
            ("--max-new-tokens", args.max_new_tokens, ""), ("--prompt-tokens", args.prompt_tokens, ""),
            ("--cache-capacity", args.cache_capacity, " (KV slots per sequence; unset = sized from the prompt)")))
        sampling = sampling_params(args)
        args.dtype = cli.resolve_dtype(args.dtype)
        dtype = cli.DTYPES[args.dtype]
        if args.model == tiny_random.NAME:
            print(tiny_random.BANNER, flush=True)
        text = read_prompt(args)
        mesh = cli.tensor_parallel_mesh(args.tensor_parallel)  # before loading: fail fast on too few devices
        args.method = cli.choose_method(args)
        cli.check_method(args, shape, vocab_ids)
        if args.compare_ar and args.method != "tree":
            raise UsageError("--compare-ar compares the tree decoder with AR; it needs --method tree (and a draft)")
        cfg, tokenizer, ckpt = cli.open_target(args)
        if mesh is not None:
            from longspec_jax import sharding

            sharding.check_tensor_parallel(cfg, args.tensor_parallel, what=f"--tensor-parallel with {args.model}")
        ids, templated = prompts.encode_prompt(tokenizer, text, chat_template=not args.no_chat_template)
        limit = args.prompt_tokens
        if limit is None and args.model == demo.NAME and args.prompt is None and args.prompt_file is None:
            limit = DEMO_PROMPT_TOKENS
        short = args.prompt_tokens is not None and len(ids) < args.prompt_tokens
        if limit is not None:
            ids = ids[:limit]
        check_lengths(len(ids), cfg, args, shape)
        draft_path = draft_vocab = None
        if args.method == "tree":
            draft_path = cli.resolve_draft(args)
            draft_vocab = cli.choose_draft_vocab(args, vocab_ids, draft_path, cfg, shape)
        cli.setup_compile_cache(args)
        t_load = time.perf_counter()
        model = cli.load_target_weights(args, cfg, ckpt, dtype)
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        t_load = time.perf_counter() - t_load
        eos_ids = prompts.stop_ids(cfg, tokenizer, ckpt)
        print(f"model {args.model} | {args.dtype} | attention {args.attention_impl} | method {args.method} | "
              f"device {jax.devices()[0].device_kind}"
              + (f" x {args.tensor_parallel} (tensor parallel)" if mesh is not None else ""))
        print(f"weights: {cli.param_gb(model):.2f} GB loaded in {t_load:.1f} s")
        print(f"prompt: {len(ids)} tokens ({'chat template' if templated else 'raw text'}"
              f"{f'; --prompt-tokens {limit} asked for more than it has' if short else ''}); stop ids {list(eos_ids)}")
        print("-" * 72, flush=True)
        draft = cli.load_draft_model(args, draft_path, cfg, dtype) if args.method == "tree" else None
        decoder = Decoder(model, draft, tree_shape=shape, draft_vocab=draft_vocab, sample_drafts=args.sample_drafts,
                          verification=args.verification, prefill_chunk=args.prefill_chunk, mesh=mesh)
        run = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos_ids, seed=args.seed,
                   cache_capacity=args.cache_capacity)
        streamer = prompts.TextStreamer(tokenizer) if args.stream else None
        res = decoder.generate([ids], **run, stream_callback=streamer, stream_every=STREAM_EVERY,
                               stream_interval_s=STREAM_INTERVAL_S,
                               progress=prefill_progress(len(ids), args.prefill_chunk))
        if streamer is not None:
            streamer.finish(res.tokens[0])
        else:
            print(tokenizer.decode(res.tokens[0], skip_special_tokens=True))
        report(res, len(ids), acceptance_rule(args))
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        if peak:
            print(f"peak device memory: {peak / 2**30:.2f} GiB")
        if args.compare_ar:
            ar = Decoder(model, prefill_chunk=args.prefill_chunk, mesh=mesh).generate([ids], **run)
            t, tree_rate = ar.timings, res.timings.decode_tokens_per_s
            same = ar.tokens[0] == res.tokens[0]
            print(f"AR (target alone): decode {t.decode_tokens} tokens at {t.decode_tokens_per_s:,.1f} tok/s "
                  f"({t.ms_per_step:.2f} ms/token) | tree {tree_rate:,.1f} tok/s = "
                  f"{tree_rate / t.decode_tokens_per_s:.2f}x AR | "
                  + ("outputs identical" if same else
                     ("outputs differ (expected: sampling at T > 0 draws other tokens)" if args.temperature > 0
                      else "OUTPUTS DIFFER at temperature 0")))
    except ValueError as e:  # ConfigError, CheckpointError, UsageError and argument validation
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
