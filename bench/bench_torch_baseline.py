"""The PyTorch path users would otherwise take: Hugging Face transformers AR decoding.

Random bf16 weights at a preset's real shapes (Llama-3-8B by default), a static KV cache,
torch.compile of the decode step (transformers' own `generate(cache_implementation="static")`
path), SDPA attention. Decode time per token is measured as the difference between two
`generate` calls with different numbers of new tokens over the same prompt, so prefill and
compilation cancel out. Writes JSON to bench/results/.

    python bench/bench_torch_baseline.py --model llama3-8b --contexts 4096 32768 --out bench/results

Run it in its own process (the JAX benchmark preallocates GPU memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _hf_config(preset_cfg):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=preset_cfg.vocab_size, hidden_size=preset_cfg.hidden_size,
        intermediate_size=preset_cfg.intermediate_size, num_hidden_layers=preset_cfg.num_layers,
        num_attention_heads=preset_cfg.num_heads, num_key_value_heads=preset_cfg.num_kv_heads,
        head_dim=preset_cfg.head_dim, rms_norm_eps=preset_cfg.rms_norm_eps,
        max_position_embeddings=max(preset_cfg.max_position_embeddings, 140_000),
        rope_theta=preset_cfg.rope.theta, tie_word_embeddings=preset_cfg.tie_word_embeddings,
    )
    if preset_cfg.family == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common, attention_bias=preset_cfg.attention_bias)


def _dynamo_graphs():
    """How many graphs torch.compile built in this process (0 = generate ran eagerly)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # private API: report unknown rather than fail the benchmark
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="eager decoding instead of torch.compile")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: a smoke test of this script")
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from longspec_jax.configs import get_preset

    if args.tiny:
        from longspec_jax.configs import tiny_config

        dev, model_cfg, args.model = "cpu", tiny_config(vocab_size=512), "tiny"
        args.contexts = [c for c in args.contexts if c <= 512] or [64, 256]
        args.new_tokens = min(args.new_tokens, 16)
    elif not torch.cuda.is_available():
        print("bench_torch_baseline: no CUDA device; nothing to measure (--tiny runs a CPU smoke test)",
              file=sys.stderr)
        return 1
    else:
        dev, model_cfg = "cuda", get_preset(args.model).config
    cfg = _hf_config(model_cfg)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    init_s = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"

    def run(prompt, n):
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if not args.no_compile:
            kwargs["cache_implementation"] = "static"
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, **kwargs)
        sync()
        return time.perf_counter() - t

    rows = []
    compiled_by = None
    for ctx in args.contexts:
        prompt = torch.randint(10, cfg.vocab_size - 10, (1, ctx), device=dev)
        try:
            first = run(prompt, 2)  # compiles (static cache + torch.compile) and warms up
            if not args.no_compile and dev == "cuda" and not _dynamo_graphs():
                # This transformers version did not compile the static-cache decode by itself: do what
                # its docs show (compile the forward; CUDA graphs via "reduce-overhead").
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                compiled_by = "explicit torch.compile(model.forward, mode='reduce-overhead')"
                first += run(prompt, 2)
            elif not args.no_compile:
                compiled_by = compiled_by or "transformers generate (static cache auto-compile)"
            short = min(run(prompt, 2) for _ in range(2))
            long = min(run(prompt, 2 + args.new_tokens) for _ in range(2))
        except torch.OutOfMemoryError as e:  # report, keep the other contexts
            rows.append({"context": ctx, "error": f"OOM: {e}"})
            torch.cuda.empty_cache()
            continue
        if long <= short:  # the difference method needs the longer run to take longer
            rows.append({"context": ctx, "error": f"no decode time resolved ({long:.4f} s <= {short:.4f} s)"})
            continue
        ms = (long - short) / args.new_tokens * 1e3
        rows.append({"context": ctx, "decode_ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                     "first_call_s": first, "prefill_plus_2_tokens_s": short})
        print(f"torch HF {args.model} ctx={ctx}: {ms:.3f} ms/token ({1e3 / ms:.1f} tok/s)", flush=True)
        del prompt
        if dev == "cuda":
            torch.cuda.empty_cache()

    result = {
        "benchmark": "torch_hf_ar_decode",
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model_shapes": args.model,
        "weights": "random bf16",
        "compile": not args.no_compile,
        "generation": "model.generate(cache_implementation='static'), greedy; transformers compiles the "
                      "decode forward with torch.compile for a static cache",
        "attention": "sdpa",
        "init_s": init_s,
        "dynamo_graphs_compiled": _dynamo_graphs(),
        "compiled_by": compiled_by,
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"torch_baseline_{args.model}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
