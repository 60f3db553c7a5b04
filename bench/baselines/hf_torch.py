"""The PyTorch path users would otherwise take: Hugging Face transformers AR decoding at a workload's
shapes.

Random bf16 weights at the workload's target shapes, batch 1, a static KV cache with transformers'
own `generate(cache_implementation="static")` path (which compiles the decode step with
torch.compile), SDPA attention. Decode time per token is the difference between two `generate`
calls with different numbers of new tokens over the same prompt, so prefill and compilation cancel.

Run it in its own process: JAX preallocates most of the GPU's memory once it starts, so this module
never starts JAX's GPU client (the result header takes the device from torch).

    python -m bench.baselines.hf_torch --workload llama3-8b
    python -m bench.baselines.hf_torch --workload tiny          # a CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import common, workloads


def hf_config(cfg):
    """The transformers config of a `longspec_jax` ModelConfig (Llama or Qwen2 family)."""
    from transformers import LlamaConfig, Qwen2Config

    common_fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope.theta,
        max_position_embeddings=max(cfg.max_position_embeddings, 140_000), tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.family == "qwen2":
        return Qwen2Config(**common_fields)
    return LlamaConfig(**common_fields, attention_bias=cfg.attention_bias)


def dynamo_graphs():
    """How many graphs torch.compile built in this process (0: generate ran eagerly; None: unknown)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private API: report unknown rather than fail the benchmark
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines.hf_torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    workloads.add_workload_arg(p, "llama3-8b")
    p.add_argument("--contexts", type=int, nargs="+", help="default: the workload's")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="eager decoding instead of torch.compile")
    p.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")
    args = p.parse_args(argv)
    argv = ["python", "-m", "bench.baselines.hf_torch", *(sys.argv[1:] if argv is None else argv)]

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    wl = workloads.get(args.workload)
    if wl.model != "tiny" and not torch.cuda.is_available():
        raise SystemExit("hf_torch: no CUDA device for a real-shape workload; `--workload tiny` runs a CPU smoke test")
    dev = "cuda" if torch.cuda.is_available() and wl.model != "tiny" else "cpu"
    contexts = args.contexts or list(wl.contexts)
    cfg = hf_config(wl.configs()[0])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):  # from_config(dtype=...) sets the dtype; no process-wide default is changed
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"

    def run(prompt, n):
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if not args.no_compile:
            kwargs["cache_implementation"] = "static"
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, **kwargs)
        sync()
        return time.perf_counter() - t0

    record = common.header("hf-torch", args.workload, argv, device_kind=device, device_count=1)
    record.update(torch=torch.__version__, transformers=transformers.__version__, weights="random bf16",
                  attention="sdpa", compile=not args.no_compile, compiled_by=None, rows=[])
    path = common.result_path(args.out, "hf-torch", args.workload, device=common.device_slug(kind=device))
    for ctx in contexts:
        prompt = torch.randint(10, cfg.vocab_size - 10, (1, ctx), device=dev)
        try:
            first = run(prompt, 2)  # compiles (static cache + torch.compile) and warms up
            if not args.no_compile and dev == "cuda" and not dynamo_graphs():
                # This transformers version did not compile the static-cache decode by itself: do what its
                # docs show (compile the forward; CUDA graphs through "reduce-overhead").
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                record["compiled_by"] = "explicit torch.compile(model.forward, mode='reduce-overhead')"
                first += run(prompt, 2)
            elif not args.no_compile:
                record["compiled_by"] = record["compiled_by"] or "transformers generate (static cache auto-compile)"
            short = min(run(prompt, 2) for _ in range(2))
            long = min(run(prompt, 2 + args.new_tokens) for _ in range(2))
        except torch.OutOfMemoryError as e:  # report, keep the other contexts
            record["rows"].append({"context": ctx, "error": f"out of memory: {e}"})
            torch.cuda.empty_cache()
            continue
        if long <= short:  # the difference method needs the longer run to take longer
            record["rows"].append({"context": ctx, "error": f"no decode time resolved ({long:.4f} s <= {short:.4f} s)"})
            continue
        ms = (long - short) / args.new_tokens * 1e3
        record["rows"].append({"context": ctx, "decode_ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                               "first_call_s": first, "prefill_plus_2_tokens_s": short})
        record["dynamo_graphs_compiled"] = dynamo_graphs()
        common.write_json(path, record)
        common.log(f"HF transformers {args.workload} ctx={ctx}: {ms:.3f} ms/token ({1e3 / ms:.1f} tokens/s)")
    common.write_json(path, record)
    common.log(f"wrote {path}")
    return 1 if any("error" in r for r in record["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
