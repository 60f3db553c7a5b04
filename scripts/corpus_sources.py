"""Finding and reading the Python sources of the packages installed on this machine: the rules,
the package and document records, and the split file (`collect_corpus.py` builds the corpus)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import site
import sys
import sysconfig
from importlib import metadata
from typing import Iterable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Never collected: this project's own top-level names, names that only a broken install puts at top
# level, and CPython's regression-test package `test` (123 MB of fixtures, odd encodings).
PROJECT_NAMES = frozenset({"longspec_jax", "pallas_kernels", "train", "infer", "bench", "tests", "test",
                           "scripts", "examples"})
# Never descended into: caches, and vendored copies of other packages (which could duplicate a
# held-out package inside a training one).
SKIP_DIRS = frozenset({"__pycache__", "_vendor", "_vendored", "vendor", "site-packages", "dist-packages",
                       "lib-dynload"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Files shorter than this are not used for the vendored-copy check (empty __init__.py and the like).
DUPLICATE_MIN_BYTES = 512
# Lines shorter than this (after strip) are idioms, not evidence of a copy.
OVERLAP_MIN_LINE = 40


class CorpusError(RuntimeError):
    """A refusal the user can act on; the message names the file, package or option."""


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Options:
    """Collection rules; stored in the manifest so that `rebuild` applies the same ones."""

    max_file_bytes: int = 1 << 20
    include_tests: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Options":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CorpusError(f"manifest options has unknown fields {sorted(unknown)}; "
                              "it was written by a newer collect_corpus.py")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Package:
    """A top-level importable name found on this machine."""

    name: str
    source: str  # "stdlib" or "site-packages"
    root: str  # directory that holds it (the stdlib dir or a site-packages dir)
    is_module: bool  # a single `<name>.py` file rather than a directory


@dataclasses.dataclass
class Document:
    """One package's document and its provenance."""

    package: Package
    split: str
    text: str
    files: list[str]
    file_hashes: list[str]
    skipped: dict[str, list[str]]
    distributions: dict[str, str]

    @property
    def version(self) -> str:
        if self.package.source == "stdlib":
            return f"python-{platform.python_version()}"
        return ",".join(self.distributions[d] for d in sorted(self.distributions)) or "unknown"

    def manifest_entry(self) -> dict:
        entry = {
            "name": self.package.name,
            "split": self.split,
            "source": self.package.source,
            "version": self.version,
            "distributions": dict(sorted(self.distributions.items())),
            "n_files": len(self.files),
            "n_bytes": len(self.text.encode("utf-8")),
            "sha256": sha256_text(self.text),
            "files": self.files,
        }
        skipped = {k: v for k, v in self.skipped.items() if v}
        if skipped:
            entry["skipped"] = skipped
        return entry


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- discovery


def default_roots() -> tuple[str, list[str]]:
    """The standard library directory and the site-packages directories, in import order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sites: list[str] = []
    candidates = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    candidates += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    # sys.path order decides which copy of a name is imported; follow it, then add the rest.
    order = {os.path.realpath(p): i for i, p in enumerate(sys.path)}
    seen = set()
    for p in sorted(candidates, key=lambda p: order.get(os.path.realpath(p), len(order))):
        rp = os.path.realpath(p)
        if os.path.isdir(rp) and rp not in seen:
            seen.add(rp)
            sites.append(rp)
    return os.path.realpath(stdlib), sites


def _has_py(path: str) -> bool:
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        if any(f.endswith(".py") for f in filenames):
            return True
    return False


def discover_packages(stdlib_dir: str | None, site_dirs: Iterable[str]) -> dict[str, Package]:
    """Top-level names with Python source under each root; the first root that has a name wins."""
    found: dict[str, Package] = {}
    roots = ([(stdlib_dir, "stdlib")] if stdlib_dir else []) + [(d, "site-packages") for d in site_dirs]
    repo_real = os.path.realpath(REPO_ROOT)
    for root, source in roots:
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if os.path.isdir(path):
                name, is_module = entry, False
            elif entry.endswith(".py"):
                name, is_module = entry[:-3], True
            else:
                continue
            if (not name.isidentifier() or name in PROJECT_NAMES or name in SKIP_DIRS
                    or name.startswith("__editable__") or name in found):
                continue
            if os.path.realpath(path).startswith(repo_real + os.sep):
                continue  # this project's own code, e.g. through a symlink
            if not is_module and not _has_py(path):
                continue
            found[name] = Package(name=name, source=source, root=root, is_module=is_module)
    return found


_DISTS_CACHE: dict[str, list[str]] | None = None


def distributions_of(name: str) -> dict[str, str]:
    """{distribution name: version} of the installed distributions that provide a top-level name."""
    global _DISTS_CACHE
    if _DISTS_CACHE is None:
        _DISTS_CACHE = metadata.packages_distributions()
    out = {}
    for dist in _DISTS_CACHE.get(name, []):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


# ----------------------------------------------------------------------------- collection


def list_files(pkg: Package, opts: Options) -> list[str]:
    """Paths of the package's .py files relative to its root, '/'-separated and sorted."""
    if pkg.is_module:
        return [pkg.name + ".py"]
    rels = []
    top = os.path.join(pkg.root, pkg.name)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and (opts.include_tests or d not in TEST_DIRS)]
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), pkg.root)
                rels.append(rel.replace(os.sep, "/"))
    return sorted(rels)


def read_source(path: str, max_bytes: int) -> tuple[str | None, str]:
    """(normalized text, "") or (None, reason). Normalization: no BOM, '\\n' line ends, final '\\n'."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return None, f"unreadable ({e.__class__.__name__})"
    if size > max_bytes:
        return None, "too_large"
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        return None, "non_utf8"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    return text, ""


def collect_package(pkg: Package, split: str, opts: Options,
                    drop_hashes: frozenset[str] = frozenset()) -> Document:
    """Build one package's document. Files whose sha256 is in `drop_hashes` are left out."""
    parts, files, hashes = [], [], []
    skipped: dict[str, list[str]] = {"too_large": [], "non_utf8": [], "unreadable": [], "heldout_duplicate": []}
    for rel in list_files(pkg, opts):
        text, reason = read_source(os.path.join(pkg.root, rel), opts.max_file_bytes)
        if text is None:
            skipped["unreadable" if reason.startswith("unreadable") else reason].append(rel)
            continue
        h = sha256_text(text)
        if h in drop_hashes:
            skipped["heldout_duplicate"].append(rel)
            continue
        parts.append(f"# file: {rel}\n{text}")
        files.append(rel)
        hashes.append(h)
    return Document(pkg, split, "".join(parts), files, hashes, skipped, distributions_of(pkg.name))


def load_split(path: str) -> frozenset[str]:
    """The held-out package names of a split file; every other collected package is training."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"split file {path} not found; pass --split or restore data/split.json") from None
    if not isinstance(d.get("heldout"), list) or not all(isinstance(n, str) for n in d["heldout"]):
        raise CorpusError(f"{path}: field 'heldout' must be a list of package names")
    return frozenset(d["heldout"])
