"""Plots of the scale benchmark: where a speculative iteration's time goes per context, against the
AR step, its floor and the PyTorch baseline; and verification cost against tree size.

    python -m bench.plot_e2e bench/results/e2e_llama3-8b_H100_*.json \
        --torch bench/results/torch_baseline_llama3-8b_H100.json --out bench/results/e2e_llama3-8b_H100.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT = "4 16 16 16 16"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--torch", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows, device, jaxv = {}, None, None
    for f in a.files:
        d = json.load(open(f))
        device, jaxv = d["device"], d["jax"]
        for r in d["rows"]:
            rows[r["context"]] = r
    torch_ms = {}
    if a.torch:
        t = json.load(open(a.torch))
        torch_ms = {r["context"]: r["decode_ms_per_token"] for r in t["rows"] if "decode_ms_per_token" in r}
    ctxs = sorted(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = [
        ("HF transformers AR (torch.compile, static cache)", lambda c, r: torch_ms.get(c)),
        ("our AR step", lambda c, r: r["ar_ms"]),
        ("AR floor (bytes / copy bw)", lambda c, r: r["ar_floor_ms"]),
        ("verify, 69 nodes", lambda c, r: r["trees"].get(DEFAULT, {}).get("verify_ms")),
        ("draft, 5 levels", lambda c, r: r["trees"].get(DEFAULT, {}).get("draft_ms")),
        ("iteration, 69 nodes", lambda c, r: r["trees"].get(DEFAULT, {}).get("iteration_ms")),
        ("iteration, 69 nodes, draft vocab 32k",
         lambda c, r: r["trees"].get(DEFAULT, {}).get("draft_vocab", {}).get("32768", {}).get("iteration_ms")),
    ]
    w = 0.8 / len(series)
    x = np.arange(len(ctxs))
    for i, (name, fn) in enumerate(series):
        vals = [fn(c, rows[c]) for c in ctxs]
        ax.bar(x + i * w, [v if v is not None else 0 for v in vals], w, label=name)
        for xi, v in zip(x + i * w, vals):
            if v is None:
                ax.text(xi, 0.3, "n/m", rotation=90, ha="center", fontsize=7)
    ax.set_xticks(x + 0.4 - w / 2, [f"{c // 1024}k" for c in ctxs])
    ax.set_xlabel("context")
    ax.set_ylabel("ms")
    ax.set_title(f"Llama-3-8B shapes, {device}, jax {jaxv}")
    ax.legend(fontsize=7)
    for c in ctxs:
        trees = rows[c]["trees"]
        pts = sorted((tr["nodes"], tr["verify_ms"] / rows[c]["ar_ms"]) for tr in trees.values())
        ax2.plot([n for n, _ in pts], [v for _, v in pts], "o-", label=f"{c // 1024}k")
    ax2.axhline(1.3, color="grey", ls="--", lw=0.8)
    ax2.set_xlabel("tree nodes")
    ax2.set_ylabel("verification / AR step")
    ax2.set_title("verification cost against tree size")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
