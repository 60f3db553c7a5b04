"""Collect a repository-level Python code corpus from the packages installed on this machine.

Each *package* is one top-level importable name of the standard library or of a site-packages
directory (`email`, `yaml`, `torch`, a single-file module such as `six`). Its *document* is the
concatenation of its `.py` files in sorted path order, each preceded by a header line
`# file: <path relative to the root>`:

    # file: yaml/__init__.py
    <text of yaml/__init__.py>
    # file: yaml/composer.py
    ...

Packages are split by name (`data/split.json`): the held-out packages feed the long-context
benchmark and are never seen by the tokenizer, the target or the draft. A file of a training
package whose text equals a held-out file (a vendored copy) is dropped from the training split,
and the share of held-out lines that also occur in the training split is reported.

Reproducibility: the manifest records for every package its name, source, distributions and
versions (the Python version for the standard library), file list and the sha256 of its
document. `rebuild` re-collects the manifest's packages with the manifest's options on another
machine, and warns (never fails) where a version or a hash differs: a machine with another Python
or other package versions yields different text, but the same split by package name.

Usage:
    python scripts/collect_corpus.py collect --jsonl --manifest data/corpus_manifest.json
    python scripts/collect_corpus.py rebuild --manifest data/corpus_manifest.json --jsonl
    python scripts/collect_corpus.py rebuild --manifest data/corpus_manifest.json --splits heldout

Outputs (gitignored): <out>/{train,heldout}/<name>.txt, with --jsonl <out>/{train,heldout}.jsonl
(one document per line: {"name", "text"}), and <out>/manifest.json unless --manifest is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
from typing import Iterable, Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SPLIT = os.path.join(REPO_ROOT, "data", "split.json")
DEFAULT_OUT = os.path.join(REPO_ROOT, "data", "corpus")
SPLITS = ("train", "heldout")
MANIFEST_FORMAT = 1

# The sources module sits beside this script; loading this file by path (the tests) needs it found too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus_sources import (  # noqa: E402, F401 (PROJECT_NAMES, sha256_text: the tests read them here)
    CorpusError, DUPLICATE_MIN_BYTES, OVERLAP_MIN_LINE, Options, Package, collect_package, default_roots, discover_packages, load_split, warn, PROJECT_NAMES, sha256_text,
)

@dataclasses.dataclass
class Report:
    """What a collection produced, for the manifest and the console."""

    documents: dict[str, list[dict]]
    heldout_line_overlap: dict[str, float]
    missing: list[str]
    seconds: float


def _significant_lines(text: str) -> Iterator[str]:
    for line in text.split("\n"):
        s = line.strip()
        if len(s) >= OVERLAP_MIN_LINE and not s.startswith("# file: "):
            yield s


def build_corpus(packages: dict[str, Package], heldout_names: frozenset[str], out_dir: str,
                 opts: Options, *, splits: Iterable[str] = SPLITS, jsonl: bool = False,
                 overlap_check: bool = True, only: Iterable[str] | None = None) -> Report:
    """Collect `packages` into `out_dir/{train,heldout}`; returns the per-document manifest entries.

    Held-out documents are built first: their file hashes decide which training files are
    vendored copies. Each split is written to `<split>.partial` and renamed when complete, so an
    interrupted run leaves the previous corpus intact.
    """
    t0 = time.time()
    splits = tuple(splits)
    for s in splits:
        if s not in SPLITS:
            raise CorpusError(f"unknown split {s!r}; choose from {SPLITS}")
    names = sorted(packages) if only is None else sorted(only)
    missing = [n for n in names if n not in packages]
    names = [n for n in names if n in packages]
    heldout = [n for n in names if n in heldout_names]
    train = [n for n in names if n not in heldout_names]

    os.makedirs(out_dir, exist_ok=True)
    entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
    overlap: dict[str, float] = {}

    def open_split(split):
        partial = os.path.join(out_dir, split + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        jf = open(os.path.join(out_dir, split + ".jsonl.partial"), "w", encoding="utf-8") if jsonl else None
        return partial, jf

    def write_doc(partial, jf, doc):
        with open(os.path.join(partial, doc.package.name + ".txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(doc.text)
        if jf is not None:
            jf.write(json.dumps({"name": doc.package.name, "text": doc.text}, ensure_ascii=False) + "\n")

    def close_split(split, partial, jf):
        final = os.path.join(out_dir, split)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        if jf is not None:
            jf.close()
            os.replace(os.path.join(out_dir, split + ".jsonl.partial"), os.path.join(out_dir, split + ".jsonl"))

    # Held-out first (always collected: it defines the duplicate filter for training).
    heldout_hashes: set[str] = set()
    heldout_lines: dict[int, set[str]] = {}
    line_total: dict[str, int] = {}
    hw = open_split("heldout") if "heldout" in splits else None
    for n in heldout:
        doc = collect_package(packages[n], "heldout", opts)
        if not doc.files:
            warn(f"held-out package {n} has no usable .py files; skipped")
            continue
        for rel, h in zip(doc.files, doc.file_hashes):
            if os.path.getsize(os.path.join(doc.package.root, rel)) >= DUPLICATE_MIN_BYTES:
                heldout_hashes.add(h)
        if overlap_check:
            lines = set(_significant_lines(doc.text))
            line_total[n] = len(lines)
            for s in lines:
                heldout_lines.setdefault(hash(s), set()).add(n)
        entries["heldout"].append(doc.manifest_entry())
        if hw:
            write_doc(*hw, doc)
    if hw:
        close_split("heldout", *hw)

    if "train" in splits:
        found: dict[str, set[int]] = {n: set() for n in line_total}
        tw = open_split("train")
        drop = frozenset(heldout_hashes)
        for n in train:
            doc = collect_package(packages[n], "train", opts, drop)
            if doc.skipped["heldout_duplicate"]:
                warn(f"{n}: dropped {len(doc.skipped['heldout_duplicate'])} file(s) identical to held-out "
                     f"files: {doc.skipped['heldout_duplicate'][:3]}")
            if not doc.files:
                continue
            if overlap_check and heldout_lines:
                for s in _significant_lines(doc.text):
                    hs = hash(s)
                    if hs in heldout_lines:
                        for hn in heldout_lines[hs]:
                            found[hn].add(hs)
            entries["train"].append(doc.manifest_entry())
            write_doc(*tw, doc)
        close_split("train", *tw)
        overlap = {n: round(len(found[n]) / max(line_total[n], 1), 4) for n in sorted(line_total)}
    return Report(entries, overlap, missing, time.time() - t0)


def write_manifest(path: str, report: Report, opts: Options, split_path: str, splits: Iterable[str]) -> dict:
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_by": "scripts/collect_corpus.py",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": sysconfig.get_platform(),
        "options": opts.to_json(),
        "split_file": os.path.relpath(os.path.abspath(split_path), REPO_ROOT),
        "splits_written": list(splits),
        "totals": {s: {"documents": len(report.documents[s]),
                       "files": sum(e["n_files"] for e in report.documents[s]),
                       "bytes": sum(e["n_bytes"] for e in report.documents[s])} for s in SPLITS},
        "heldout_train_line_overlap": report.heldout_line_overlap,
        "packages": report.documents["heldout"] + report.documents["train"],
    }
    tmp = path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return manifest


def load_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"manifest {path} not found; run `collect` first or pass --manifest") from None
    if m.get("format") != MANIFEST_FORMAT:
        raise CorpusError(f"{path}: manifest format {m.get('format')!r}, this script reads {MANIFEST_FORMAT}")
    return m


def compare_with_manifest(old: dict, report: Report, heldout_names: frozenset[str]) -> int:
    """Warn about every difference between a rebuilt corpus and the manifest; returns the count.

    Under another Python version every standard-library document differs: that is expected and
    summarized in one warning instead of one per package.
    """
    n_warn = 0
    other_python = old["python"] != platform.python_version()
    new = {e["name"]: e for s in SPLITS for e in report.documents[s]}
    stdlib_changed = []
    for e in old["packages"]:
        name = e["name"]
        want_split = "heldout" if name in heldout_names else "train"
        if e["split"] != want_split:
            warn(f"{name}: manifest puts it in {e['split']}, the split file in {want_split}; following the split file")
            n_warn += 1
        if name not in new:
            continue  # reported as missing
        cur = new[name]
        if other_python and e["source"] == "stdlib":
            if cur["sha256"] != e["sha256"]:
                stdlib_changed.append(name)
                n_warn += 1
            continue
        if cur["version"] != e["version"]:
            same = "same text" if cur["sha256"] == e["sha256"] else "text differs"
            warn(f"{name}: version mismatch, manifest {e['version']} vs this machine {cur['version']}; "
                 f"{same} ({e['n_bytes']} -> {cur['n_bytes']} bytes)")
        elif cur["sha256"] == e["sha256"]:
            continue
        else:
            added = sorted(set(cur["files"]) - set(e["files"]))
            removed = sorted(set(e["files"]) - set(cur["files"]))
            warn(f"{name}: same version {e['version']} but sha256 differs "
                 f"(+{len(added)} / -{len(removed)} files, {e['n_bytes']} -> {cur['n_bytes']} bytes)")
        n_warn += 1
    if other_python:
        warn(f"manifest was built with Python {old['python']}, this is {platform.python_version()}: "
             f"{len(stdlib_changed)} standard-library documents differ (expected; the split is by name)")
    return n_warn


# ----------------------------------------------------------------------------- CLI


def _summary(report: Report) -> str:
    lines = []
    for s in SPLITS:
        docs = report.documents[s]
        if docs:
            nb = sum(e["n_bytes"] for e in docs)
            lines.append(f"{s}: {len(docs)} documents, {sum(e['n_files'] for e in docs)} files, {nb / 1e6:.1f} MB")
    worst = sorted(report.heldout_line_overlap.items(), key=lambda kv: -kv[1])[:5]
    if worst:
        lines.append("held-out lines (>= %d chars) also in train, worst: %s"
                     % (OVERLAP_MIN_LINE, ", ".join(f"{n} {v:.1%}" for n, v in worst)))
    lines.append(f"took {report.seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("collect", "collect every installed package (split by --split)"),
                        ("rebuild", "re-collect the packages of a manifest and check versions and hashes")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--out", default=DEFAULT_OUT, help="output directory (default data/corpus)")
        q.add_argument("--split", default=DEFAULT_SPLIT, help="split file with the held-out names")
        q.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to write")
        q.add_argument("--jsonl", action="store_true", help="also write <out>/<split>.jsonl")
        q.add_argument("--no-overlap-check", action="store_true", help="skip the held-out/train line overlap")
        q.add_argument("--site-dir", action="append", help="site-packages dirs to scan (default: this Python's)")
        q.add_argument("--stdlib-dir", help="standard library dir (default: this Python's; 'none' to skip)")
        if name == "collect":
            q.add_argument("--manifest", help="where to write the manifest (default <out>/manifest.json)")
            q.add_argument("--packages", nargs="+", help="only these package names")
            q.add_argument("--include-tests", action="store_true", help="keep test/ and tests/ directories")
            q.add_argument("--max-file-bytes", type=int, default=Options.max_file_bytes)
        else:
            q.add_argument("--manifest", required=True, help="manifest to reproduce (e.g. data/corpus_manifest.json)")
            q.add_argument("--manifest-out", help="where to write the new manifest (default <out>/manifest.json)")
    a = p.parse_args(argv)

    stdlib, sites = default_roots()
    if a.stdlib_dir:
        stdlib = None if a.stdlib_dir == "none" else a.stdlib_dir
    if a.site_dir:
        sites = a.site_dir
    packages = discover_packages(stdlib, sites)
    print(f"Python {platform.python_version()}; stdlib {stdlib}; site dirs {sites}; "
          f"{len(packages)} packages found", flush=True)

    try:
        heldout = load_split(a.split)
        absent = sorted(heldout - set(packages))
        if absent and not getattr(a, "packages", None):
            warn(f"held-out packages not installed here (no benchmark documents for them): {absent}")
        if a.cmd == "collect":
            opts = Options(max_file_bytes=a.max_file_bytes, include_tests=a.include_tests)
            report = build_corpus(packages, heldout, a.out, opts, splits=a.splits, jsonl=a.jsonl,
                                  overlap_check=not a.no_overlap_check, only=a.packages)
            if report.missing:
                warn(f"requested packages not found: {report.missing}")
            manifest_path = a.manifest or os.path.join(a.out, "manifest.json")
        else:
            old = load_manifest(a.manifest)
            opts = Options.from_json(old["options"])
            names = [e["name"] for e in old["packages"]
                     if ("heldout" if e["name"] in heldout else "train") in a.splits or e["name"] in heldout]
            report = build_corpus(packages, heldout, a.out, opts, splits=a.splits, jsonl=a.jsonl,
                                  overlap_check=not a.no_overlap_check, only=names)
            if report.missing:
                warn(f"{len(report.missing)} manifest packages are not installed here and were skipped: "
                     f"{report.missing[:20]}{' ...' if len(report.missing) > 20 else ''}")
            n = compare_with_manifest(old, report, heldout)
            print(f"{n} difference(s) with {a.manifest}" if n else f"identical to {a.manifest}")
            manifest_path = a.manifest_out or os.path.join(a.out, "manifest.json")
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_manifest(manifest_path, report, opts, a.split, a.splits)
    print(_summary(report))
    print(f"manifest: {manifest_path}; corpus: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
