"""Plots of acceptance and latency result files.

Acceptance: tau and speedup against context. Latency: where an iteration's time goes per context,
and verification cost against tree size.

The kind is read from the rows: rows with a "method" are acceptance results (tau, speedup over AR
measured in the same run; T = 0 solid, T > 0 dashed, ablation drafts dotted), rows with "ar_ms" are
latency results (bars per context: the AR step, its floor, verification, draft and iteration of the
69-node tree, with --baseline an HF transformers AR step from `bench.baselines.hf_torch`). Several
files of one device and kind are drawn into one figure (e.g. contexts measured in separate calls).

    python -m bench plot bench/results/h200/acceptance_demo-t0.json
    python -m bench plot bench/results/h100/latency_llama3-8b-*.json \
        --baseline bench/results/h100/hf-torch_llama3-8b.json
"""

from __future__ import annotations

import json
import os

LONGSPEC_TREE = "4 16 16 16 16"


def add_cli_args(parser) -> None:
    parser.add_argument("files", nargs="+", help="result JSONs of one device and one kind")
    parser.add_argument("--baseline", help="latency plots: an hf_torch result of the same shapes")
    parser.add_argument("--out", help="the PNG (default: the first file's path with .png)")


def dig(d, *keys):
    """d[k1][k2]..., or None where a key is missing."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def kind_of(record: dict) -> str:
    row = record["rows"][0]
    if "method" in row:
        return "acceptance"
    if "ar_ms" in row:
        return "latency"
    raise SystemExit(f"no plot for rows with fields {sorted(row)}: plot reads acceptance and latency results")


def plot_acceptance(records, fig):
    ax_tau, ax_sp = fig.subplots(1, 2)
    series = {}
    for r in (r for rec in records for r in rec["rows"] if r["method"] != "ar"):
        method = r["method"] + (f"+{r['draft_vocab']}" if r.get("draft_vocab") else "")
        series.setdefault((r["draft"], method, r["temperature"]), []).append(r)
    for (draft, method, temp), rs in sorted(series.items(), key=lambda kv: (kv[0][0] != "draft",) + kv[0]):
        rs = sorted(rs, key=lambda r: r["context"])
        style = ":" if draft != "draft" else ("-" if temp == 0 else "--")
        label = f"{method} T={temp:g}" if draft == "draft" else f"{draft} ({method}) T={temp:g}"
        ax_tau.plot([r["context"] for r in rs], [r["tau"] for r in rs], style, marker="o", label=label)
        if draft == "draft":
            ax_sp.plot([r["context"] for r in rs], [r["speedup"] for r in rs], style, marker="o", label=label)
    for ax, name in ((ax_tau, "tau (tokens per target forward)"), (ax_sp, "speedup over AR (decode tokens/s)")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="prompt length (tokens)", ylabel=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_sp.axhline(1.0, color="grey", lw=0.8)
    return f"demo pair, held-out prompts, {records[0].get('dtype', '')}, matmul precision " \
           f"{records[0].get('matmul_precision', 'default')}"


def plot_latency(records, fig, baseline):
    import numpy as np

    rows = {r["context"]: r for rec in records for r in rec["rows"]}
    hf = {r["context"]: r["decode_ms_per_token"] for r in (baseline or {}).get("rows", [])
          if "decode_ms_per_token" in r}
    series = [("HF transformers AR", lambda c, r: hf.get(c)), ("our AR step", lambda c, r: r["ar_ms"]),
              ("AR floor", lambda c, r: r["ar_floor_ms"]),
              ("verify, 69 nodes", lambda c, r: dig(r, "trees", LONGSPEC_TREE, "verify_ms")),
              ("draft, 5 levels", lambda c, r: dig(r, "trees", LONGSPEC_TREE, "draft_ms")),
              ("iteration, 69 nodes", lambda c, r: dig(r, "trees", LONGSPEC_TREE, "iteration_ms"))]
    vocab = sorted({v for r in rows.values() for v in dig(r, "trees", LONGSPEC_TREE, "draft_vocab") or {}})
    series += [(f"iteration, 69 nodes, draft vocab {v}",
                lambda c, r, v=v: dig(r, "trees", LONGSPEC_TREE, "draft_vocab", v, "iteration_ms")) for v in vocab]
    ax, ax2 = fig.subplots(1, 2)
    ctxs, w = sorted(rows), 0.8 / len(series)
    x = np.arange(len(ctxs))
    for i, (name, value) in enumerate(series):
        vals = [value(c, rows[c]) for c in ctxs]
        ax.bar(x + i * w, [v or 0 for v in vals], w, label=name)
        for xi, v in zip(x + i * w, vals):
            if v is None:
                ax.text(xi, 0.3, "not measured", rotation=90, ha="center", fontsize=6)
    ax.set_xticks(x + 0.4 - w / 2, [f"{c // 1024}k" for c in ctxs])
    ax.set(xlabel="context", ylabel="ms")
    ax.legend(fontsize=7)
    for c in ctxs:
        pts = sorted((t["nodes"], t["verify_ms"] / rows[c]["ar_ms"]) for t in rows[c]["trees"].values())
        ax2.plot([n for n, _ in pts], [v for _, v in pts], "o-", label=f"{c // 1024}k")
    ax2.axhline(1.3, color="grey", ls="--", lw=0.8)
    ax2.set(xlabel="tree nodes", ylabel="verification / AR step", title="verification cost against tree size")
    ax2.legend()
    return f"{records[0].get('model_shapes', records[0].get('workload', ''))} shapes, random weights"


def main(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for path in args.files:
        with open(path) as f:
            records.append(json.load(f))
    devices, kinds = {r["device"] for r in records}, {kind_of(r) for r in records}
    if len(devices) > 1 or len(kinds) > 1:
        raise SystemExit(f"one figure draws one device and one kind; these files hold {sorted(devices)} "
                         f"and {sorted(kinds)}: plot them separately")
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    fig = plt.figure(figsize=(12, 4.4))
    title = plot_acceptance(records, fig) if kinds == {"acceptance"} else plot_latency(records, fig, baseline)
    jax_version = records[0].get("jax") or records[0].get("jax_version")
    fig.suptitle(f"{title} - {records[0]['device']}, jax {jax_version}", fontsize=9)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.files[0])[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0
