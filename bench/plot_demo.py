"""Plots of `bench.bench_demo` results: tau and speedup over AR against context length.

    python -m bench.plot_demo bench/results/demo_cpu.json bench/results/demo_NVIDIA_H100_80GB_HBM3.json

Writes one PNG per JSON beside it (same name, .png): left tau (T = 0 solid, T = 1 dashed, the
ablation drafts dotted), right speedup over AR measured in the same run. `--merge OUT.png` draws
the rows of several JSONs of one device (e.g. contexts run in separate calls) in one plot:

    python -m bench.plot_demo --merge bench/results/demo_H200.png bench/results/demo_H200_2k4k.json \
        bench/results/demo_H200_8k16k.json
"""

from __future__ import annotations

import json
import os
import sys


def plot(path: str | list[str], png: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [path] if isinstance(path, str) else list(path)
    loaded = []
    for p in paths:
        with open(p) as f:
            loaded.append(json.load(f))
    res = loaded[0]
    if len({r["device"] for r in loaded}) > 1:
        raise SystemExit(f"--merge: the files come from different devices {sorted({r['device'] for r in loaded})}")
    rows = [r for one in loaded for r in one["rows"] if r["method"] != "ar"]
    series = {}
    for r in rows:
        method = r["method"] + (f"+{r['draft_vocab']}" if r.get("draft_vocab") else "")  # one line per vocabulary
        series.setdefault((r["draft"], method, r["temperature"]), []).append(r)
    fig, (ax_tau, ax_sp) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (draft, method, temp), rs in sorted(series.items(), key=lambda kv: (kv[0][0] != "draft",) + kv[0]):
        rs = sorted(rs, key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        style = ":" if draft != "draft" else ("-" if temp == 0 else "--")
        label = (f"{method} T={temp:g}" if draft == "draft" else f"{draft} ({method}) T={temp:g}")
        ax_tau.plot(x, [r["tau"] for r in rs], style, marker="o", label=label)
        if draft == "draft":
            ax_sp.plot(x, [r["speedup"] for r in rs], style, marker="o", label=label)
    for ax, name in ((ax_tau, "tau (tokens per target forward)"), (ax_sp, "speedup over AR (decode tokens/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_sp.axhline(1.0, color="grey", lw=0.8)
    prec = res.get("matmul_precision")
    fig.suptitle(f"demo pair, held-out packages - {res['device']}, jax {res['jax_version']}, {res['dtype']}"
                 + (f", matmul precision {prec}" if prec else ""), fontsize=9)
    fig.tight_layout()
    png = png or os.path.splitext(paths[0])[0] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    if paths[0] == "--merge":
        if len(paths) < 3:
            print(__doc__)
            return 2
        print(plot(paths[2:], paths[1]))
        return 0
    for p in paths:
        print(plot(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
