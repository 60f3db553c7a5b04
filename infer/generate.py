"""`python -m infer.generate`: generate text with a target model, autoregressively or with the
LongSpec tree speculative decoder, and report honest timings.

    python -m infer.generate                                   # the embedded demo pair, offline, CPU is fine
    python -m infer.generate --prompt-tokens 8192 --compare-ar # 8k tokens of held-out code, speedup vs AR
    python -m infer.generate --model llama3-8b --prompt "..." --max-new-tokens 256
    python -m infer.generate --model llama3-8b --method tree --tree-shape 4 16 16 16 16

--model takes an exact preset name (`longspec_jax.configs.PRESETS`; weights come from --checkpoint
DIR or the preset's Hugging Face repo in the local cache), `longspec-demo` (the small code model and
draft trained here and shipped in longspec_jax/demo; its default prompt is the start of a held-out
package) or `tiny-random`. Timings are taken after
`block_until_ready`; compile time is reported apart from prefill and decode.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from infer import prompts, tiny_random
from longspec_jax import demo
from longspec_jax.sampling import SamplingParams

# The model used when --model is not given: the demo pair shipped in the package.
DEFAULT_MODEL = demo.NAME
# Its default prompt: the first DEMO_PROMPT_TOKENS tokens of a held-out package's code.
DEMO_PROMPT_TOKENS = 4096

# Streaming is opt-in: decoding the text between decode slices adds to the time per token.
STREAM_BY_DEFAULT = False
STREAM_EVERY = 8
STREAM_INTERVAL_S = 0.25
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def resolve_dtype(name: str) -> str:
    """--dtype auto: bf16 on accelerators, f32 on CPUs (most CPUs have no fast bf16 matmul)."""
    if name != "auto":
        return name
    return "f32" if jax.default_backend() == "cpu" else "bf16"


class UsageError(ValueError):
    """A problem with the command line or the environment that the user can fix."""


def build_parser() -> argparse.ArgumentParser:
    from longspec_jax.configs import PRESETS

    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset name ({', '.join(sorted(PRESETS))}), {demo.NAME!r} or {tiny_random.NAME!r}")
    p.add_argument("--checkpoint", default=None,
                   help="local HF checkpoint directory to load instead of the preset's repo")
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
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="parameter and compute dtype (auto: f32 on CPU, bf16 on GPUs)")
    p.add_argument("--attention-impl", choices=("auto", "xla", "pallas"), default="auto",
                   help="attention kernels: pallas (Hopper GPUs), xla (anywhere), auto picks")
    p.add_argument("--method", choices=("ar", "tree"), default=None,
                   help="ar: one token per forward; tree: LongSpec tree speculative decoding")
    p.add_argument("--draft", default=None,
                   help="--method tree: draft checkpoint DIR or HF repo (default: the preset's draft repo)")
    p.add_argument("--tree-shape", nargs="+", type=int, default=None,
                   help="--method tree: nodes per depth, e.g. 4 16 16 16 16 (default: by context length and "
                        "temperature, longspec_jax.tree.default_tree_for_context: a sampled chain at T > 0)")
    p.add_argument("--draft-vocab", default=None, metavar="FILE",
                   help="--method tree: draft vocabulary, a .npy or .json list of token ids "
                        "(scripts/draft_vocab.py); the draft scores only these tokens, output unchanged. "
                        "Default: the draft's own draft_vocab.json when its directory ships one (the "
                        f"{demo.NAME} draft ships 2048 ids), else none; 'none' scores the full vocabulary")
    p.add_argument("--sample-drafts", action=argparse.BooleanOptionalAction, default=True,
                   help="--method tree, chain shapes at --temperature > 0: draw drafts from the draft distribution and "
                        "accept by speculative sampling (min(1, p/q), residual draw); --no-sample-drafts takes the "
                        "draft's argmax and accepts by sample-and-match, as trees do. Both are exact")
    p.add_argument("--cache-capacity", type=int, default=None,
                   help="KV cache slots per sequence (default: prompt + max-new-tokens, rounded up)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the target (and draft) over the first N devices: attention heads, MLP and "
                        "vocabulary over a 'tensor' mesh axis, KV cache over kv heads; N must divide the kv heads")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=STREAM_BY_DEFAULT,
                   help="print text as it is produced (--method ar)")
    return p


def check_flags(args):
    """Refuse flag values that cannot work, before any other file is read or any weight is loaded.
    Returns (--tree-shape as a `TreeShape` or None, the ids in --draft-vocab FILE or None); the ids
    are checked against the vocabulary once the target's config is read."""
    from longspec_jax import draft_vocab
    from longspec_jax.tree import TreeShape

    for flag, value, hint in (("--max-new-tokens", args.max_new_tokens, ""),
                              ("--prompt-tokens", args.prompt_tokens, ""),
                              ("--prefill-chunk", args.prefill_chunk, " (prompt tokens per prefill forward)"),
                              ("--cache-capacity", args.cache_capacity, " (KV slots per sequence; unset = sized "
                                                                        "from the prompt)"),
                              ("--tensor-parallel", args.tensor_parallel, " (1 = one device)")):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1{hint}, got {value}")
    try:
        shape = None if args.tree_shape is None else TreeShape.parse(args.tree_shape)
    except ValueError as e:
        raise UsageError(f"--tree-shape {' '.join(map(str, args.tree_shape))}: {e}") from None
    if args.draft_vocab is None or args.draft_vocab.lower() == "none":
        return shape, None
    try:
        return shape, draft_vocab.read(args.draft_vocab)
    except ValueError as e:
        raise UsageError(f"--draft-vocab: {e}") from None


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


def open_target(args):
    """(cfg, tokenizer, checkpoint dir or None) of --model / --checkpoint: config.json and the
    tokenizer only, which load in well under a second, so that the prompt is checked before the
    weights load."""
    if args.model == tiny_random.NAME:
        if args.checkpoint:
            raise UsageError(f"--checkpoint cannot be combined with --model {tiny_random.NAME}; "
                             "pass --model PRESET --checkpoint DIR")
        return tiny_random.config(), tiny_random.tokenizer(), None
    from longspec_jax import hub, weights
    from longspec_jax.configs import get_preset

    preset = None
    if args.model == demo.NAME:
        if not demo.available():
            raise UsageError(f"the demo pair is missing from {demo.HERE} (target/ and draft/); reinstall the "
                             f"package, or pass --model {tiny_random.NAME} or a preset")
        path = hub.resolve_checkpoint(args.checkpoint or demo.TARGET_DIR)
    else:
        preset = get_preset(args.model)  # ConfigError listing every valid name
        path = hub.resolve_checkpoint(args.checkpoint or preset.target_repo)
    cfg = weights.read_config(path)
    tokenizer = weights.load_tokenizer(path, cfg)
    if preset is not None:
        mismatched = [f for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
                      if getattr(cfg, f) != getattr(preset.config, f)]
        if mismatched:
            print(f"warning: checkpoint {path} differs from preset {args.model} in {mismatched}; "
                  "using the checkpoint's config.", file=sys.stderr)
    return cfg, tokenizer, path


def load_target_weights(args, cfg, path, dtype):
    """The target model of `open_target`'s config and checkpoint (random weights for tiny-random)."""
    if path is None:
        model, _, _ = tiny_random.build(dtype=dtype, attention_impl=args.attention_impl, seed=0)
        return model
    from longspec_jax import weights

    model = weights.abstract_target(cfg, dtype=dtype, attention_impl=args.attention_impl)
    return weights.load_params(model, path, cfg)


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


def resolve_draft(args) -> str | None:
    """Local path of the draft for --method tree: --draft (a directory, a weight file, or a repo in
    the local Hugging Face cache), else the demo's or the preset's draft; None for tiny-random,
    which drafts with a random block."""
    from longspec_jax import hub

    name = args.draft
    if name is None and args.model == tiny_random.NAME:
        return None
    if name is None and args.model == demo.NAME:
        name = demo.DRAFT_DIR
    if name is None:
        from longspec_jax.configs import get_preset

        name = get_preset(args.model).draft_repo
        if name is None:
            raise UsageError(f"preset {args.model} has no released draft; pass --draft DIR")
    return hub.resolve_checkpoint(name, kind="draft")


def choose_draft_vocab(args, ids, draft_path, cfg, shape):
    """The draft vocabulary for --method tree, checked against the target's vocabulary and the
    --tree-shape: --draft-vocab FILE (`ids`), else the one the draft ships (unless --draft-vocab
    none), else None."""
    from longspec_jax import draft_vocab

    source = "--draft-vocab"
    if ids is None and args.draft_vocab is None and draft_path is not None:
        shipped = draft_vocab.find(draft_path)
        if shipped is not None:
            source, ids = shipped, draft_vocab.read(shipped)
            print(f"draft vocabulary: {len(ids)} ids shipped with the draft ({os.path.basename(shipped)}; "
                  "--draft-vocab none for the full vocabulary)")
    try:
        ids = None if ids is None else draft_vocab.validate(ids, cfg.vocab_size)
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from None
    if shape is not None:
        try:
            shape.check_vocab(cfg.vocab_size if ids is None else ids.size)
        except ValueError as e:
            raise UsageError(f"--tree-shape {shape}"
                             + (f" with the {ids.size}-id draft vocabulary of {source}" if ids is not None else "")
                             + f": {e}") from None
    return ids


def load_draft_model(args, path, cfg, dtype):
    """The draft at `resolve_draft`'s path, checked against the target; a random one for None."""
    from longspec_jax.configs import DraftConfig

    if path is None:
        from flax import nnx

        from longspec_jax.draft import Draft

        print("[tiny-random] using a random-weight draft as well: expect almost no accepted tokens.")
        return Draft(DraftConfig.from_target(cfg), cfg.rope, rngs=nnx.Rngs(1), dtype=dtype, param_dtype=dtype,
                     attention_impl=args.attention_impl)
    from longspec_jax.draft_weights import load_draft

    draft = load_draft(path, cfg, dtype=dtype, attention_impl=args.attention_impl)
    draft.cfg.check_matches(cfg, source=f"draft {path}")
    return draft


def tensor_parallel_mesh(n: int):
    """The --tensor-parallel mesh over the first n devices, or None for n == 1 (single device)."""
    if n == 1:
        return None
    if n > jax.device_count():
        raise UsageError(f"--tensor-parallel {n} needs {n} devices but JAX sees {jax.device_count()} "
                         f"({jax.devices()[0].platform}); pass at most {jax.device_count()} "
                         "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)")
    from longspec_jax import sharding

    return sharding.tensor_parallel_mesh(n)


def run_tree(args, model, draft, ids, sampling, eos_ids, shape, draft_vocab, mesh=None):
    """--method tree: the LongSpec tree speculative decoder (`infer.speculative`)."""
    from infer import speculative

    res = speculative.generate_tree(model, draft, [ids], tree_shape=shape, max_new_tokens=args.max_new_tokens,
                                    sampling=sampling, eos_ids=eos_ids, seed=args.seed,
                                    cache_capacity=args.cache_capacity, prefill_chunk=args.prefill_chunk,
                                    draft_vocab=draft_vocab, sample_drafts=args.sample_drafts,
                                    mesh=mesh)
    return res.tokens[0], res.stop_reason[0], res.stats


def choose_method(args) -> str:
    """--method default: tree when a draft is available (--draft, or the preset's released draft
    found in the local Hugging Face cache), else the AR baseline."""
    if args.method is not None:
        return args.method
    if args.draft is not None or args.model == demo.NAME:
        return "tree"
    from longspec_jax.configs import PRESETS

    preset = PRESETS.get(args.model)
    if preset is None or preset.draft_repo is None:
        return "ar"
    from longspec_jax.hub import CheckpointError, resolve_checkpoint

    try:
        resolve_checkpoint(preset.draft_repo, kind="draft")
    except CheckpointError:  # not downloaded: fall back to AR and say so
        print(f"(draft {preset.draft_repo} is not in the local cache: using --method ar; for speculative decoding "
              f"download it with `huggingface-cli download {preset.draft_repo} --local-dir DIR` and pass "
              "--draft DIR)")
        return "ar"
    return "tree"


def _rate(n, s):
    return f"{n / s:,.1f}" if s > 0 else "n/a"


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own refusals (exit 2) and --help (exit 0), as a return code
        return e.code
    try:
        shape, vocab_ids = check_flags(args)
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
        args.dtype = resolve_dtype(args.dtype)
        dtype = DTYPES[args.dtype]
        if args.model == tiny_random.NAME:
            print(tiny_random.BANNER, flush=True)
        text = read_prompt(args)
        mesh = tensor_parallel_mesh(args.tensor_parallel)  # before loading: fail fast on too few devices
        args.method = choose_method(args)
        if args.compare_ar and args.method != "tree":
            raise UsageError("--compare-ar compares the tree decoder with AR; it needs --method tree (and a draft)")
        cfg, tokenizer, ckpt = open_target(args)
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
            draft_path = resolve_draft(args)
            draft_vocab = choose_draft_vocab(args, vocab_ids, draft_path, cfg, shape)
        model = load_target_weights(args, cfg, ckpt, dtype)
        eos_ids = prompts.stop_ids(cfg, tokenizer, ckpt)
        print(f"model {args.model} | {args.dtype} | attention {args.attention_impl} | method {args.method} | "
              f"device {jax.devices()[0].device_kind}"
              + (f" x {args.tensor_parallel} (tensor parallel)" if mesh is not None else ""))
        print(f"prompt: {len(ids)} tokens ({'chat template' if templated else 'raw text'}"
              f"{f'; --prompt-tokens {limit} asked for more than it has' if short else ''}); stop ids {list(eos_ids)}")
        print("-" * 72, flush=True)

        if args.method == "tree":
            draft = load_draft_model(args, draft_path, cfg, dtype)
            tokens, reason, stats = run_tree(args, model, draft, ids, sampling, eos_ids, shape, draft_vocab, mesh)
            print(tokenizer.decode(tokens, skip_special_tokens=True))
            print("-" * 72)
            print(f"stopped on: {reason}")
            n = len(tokens)
            print(f"compile {stats['compile_time_s']:.2f} s | prefill {stats['prefill_time_s']:.3f} s "
                  f"({_rate(len(ids), stats['prefill_time_s'])} tok/s) | decode {n} tokens in "
                  f"{stats['decode_time_s']:.3f} s ({stats['decode_tokens_per_s']:,.1f} tok/s, prefill excluded)")
            forwards = sum(stats['target_forwards'])
            by_depth = ", ".join(f"{a / max(forwards, 1):.2f}" for a in stats["accepted_by_depth"])
            print(f"tau (tokens per target forward, bonus included) {stats['tau']:.3f} | tree {stats['tree_shape']} "
                  f"| draft vocab {stats['draft_vocab_size']}")
            print(f"accepted drafts by depth (share of {forwards} verifications): {by_depth}")
            if args.compare_ar:
                from infer.ar import generate_ar

                res = generate_ar(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                                  seed=args.seed, cache_capacity=args.cache_capacity,
                                  prefill_chunk=args.prefill_chunk, mesh=mesh)
                t = res.timings
                # Tree decode time covers the tokens after the prefill's first one, like AR's decode loop.
                tree_rate = (n - 1) / stats["decode_time_s"] if stats["decode_time_s"] > 0 else float("nan")
                ar_rate = t.decode_tokens_per_s
                same = res.sequences()[0] == list(tokens)
                print(f"AR (target alone): decode {t.decode_tokens} tokens at {ar_rate:,.1f} tok/s "
                      f"({t.ms_per_step:.2f} ms/token) | tree {tree_rate:,.1f} tok/s = {tree_rate / ar_rate:.2f}x AR | "
                      + ("outputs identical" if same else
                         ("outputs differ (expected: sampling at T > 0 draws other tokens)" if args.temperature > 0
                          else "OUTPUTS DIFFER at temperature 0")))
            return 0

        from infer.ar import generate_ar

        streamer = prompts.TextStreamer(tokenizer) if args.stream else None
        res = generate_ar(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                          seed=args.seed, cache_capacity=args.cache_capacity, prefill_chunk=args.prefill_chunk,
                          stream_callback=streamer, stream_every=STREAM_EVERY,
                          stream_interval_s=STREAM_INTERVAL_S, mesh=mesh)
        tokens = res.sequences()[0]
        if streamer is not None:
            streamer.finish(tokens)
        else:
            print(tokenizer.decode(tokens, skip_special_tokens=True))
    except ValueError as e:  # ConfigError, CheckpointError, UsageError and argument validation
        print(f"error: {e}", file=sys.stderr)
        return 2

    t = res.timings
    print("-" * 72)
    print(f"stopped on: {'eos' if res.stopped_on_eos[0] else 'max-new-tokens'} after {res.num_tokens[0]} tokens")
    print(f"compile: {t.compile_s:.2f} s (executables for these shapes; 0 when already compiled)")
    print(f"prefill: {t.prefill_tokens} tokens in {t.prefill_s * 1e3:.1f} ms = {_rate(t.prefill_tokens, t.prefill_s)} "
          "tok/s (includes sampling the first new token)")
    print(f"decode:  {t.decode_tokens} tokens in {t.decode_s * 1e3:.1f} ms = {_rate(t.decode_tokens, t.decode_s)} "
          f"tok/s ({t.ms_per_step:.2f} ms/token{', streamed' if args.stream else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
