"""Code corpus collection (scripts/collect_corpus.py) and the demo tokenizer (scripts/train_tokenizer.py)."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO, "longspec_jax", "demo", "tokenizer")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


cc = _load_script("collect_corpus")
tt = _load_script("train_tokenizer")

HELD_TEXT = "def shared_helper(x):\n    return [x * i for i in range(10)]  # a long enough line for overlap\n" * 8


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


@pytest.fixture()
def site_dir(tmp_path):
    """A fake site-packages with the cases the collector must handle."""
    root = tmp_path / "site"
    _write(root / "alpha" / "__init__.py", "from .core import f\n")
    _write(root / "alpha" / "core.py", "def f():\r\n    return 1")  # CRLF, no final newline
    _write(root / "alpha" / "Zed.py", "Z = 1\n")  # uppercase sorts before lowercase
    _write(root / "alpha" / "sub" / "mod.py", "\ufeffX = 'héllo'\n")  # BOM
    _write(root / "alpha" / "tests" / "test_core.py", "def test_f():\n    pass\n")
    _write(root / "alpha" / "big.py", "x = 1\n" * 200)  # over the test's max_file_bytes
    _write(root / "alpha" / "latin1.py", b"s = '\xe9'\n")
    _write(root / "alpha" / "__pycache__" / "core.cpython-311.py", "junk\n")
    _write(root / "beta.py", "import alpha\n")
    _write(root / "gamma" / "__init__.py", "")
    _write(root / "gamma" / "copy_of_held.py", HELD_TEXT)  # a vendored copy under another name
    _write(root / "gamma" / "_vendor" / "heldpkg" / "__init__.py", HELD_TEXT)
    _write(root / "heldpkg" / "__init__.py", HELD_TEXT)
    _write(root / "heldpkg" / "extra.py", "VALUE = 3\n")
    _write(root / "longspec_jax" / "__init__.py", "OURS = 1\n")  # this project: never collected
    _write(root / "alpha-1.0.dist-info" / "METADATA", "Name: alpha\n")
    _write(root / "datadir" / "x.txt", "not python\n")
    return str(root)


@pytest.fixture()
def split_file(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"heldout": ["heldpkg", "notinstalled"]}))
    return str(path)


def _collect(site_dir, out, split_file, *extra):
    return cc.main(["collect", "--site-dir", site_dir, "--stdlib-dir", "none", "--out", str(out),
                    "--split", split_file, "--max-file-bytes", "1000", "--jsonl", *extra])


def _manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def test_collect_documents_and_rules(site_dir, split_file, tmp_path):
    assert _collect(site_dir, tmp_path / "c", split_file) == 0
    m = _manifest(tmp_path / "c")
    by_name = {e["name"]: e for e in m["packages"]}
    assert set(by_name) == {"alpha", "beta", "gamma", "heldpkg"}  # no project code, dist-info, data dirs
    alpha = by_name["alpha"]
    assert alpha["files"] == ["alpha/Zed.py", "alpha/__init__.py", "alpha/core.py", "alpha/sub/mod.py"]
    assert alpha["skipped"] == {"too_large": ["alpha/big.py"], "non_utf8": ["alpha/latin1.py"]}
    with open(tmp_path / "c" / "train" / "alpha.txt", encoding="utf-8", newline="") as f:
        text = f.read()
    assert text == ("# file: alpha/Zed.py\nZ = 1\n# file: alpha/__init__.py\nfrom .core import f\n"
                    "# file: alpha/core.py\ndef f():\n    return 1\n# file: alpha/sub/mod.py\nX = 'héllo'\n")
    assert cc.sha256_text(text) == alpha["sha256"]
    assert alpha["n_bytes"] == len(text.encode("utf-8"))
    # The vendored copy is not walked, the renamed copy is dropped as a held-out duplicate.
    assert by_name["gamma"]["files"] == ["gamma/__init__.py"]
    assert by_name["gamma"]["skipped"] == {"heldout_duplicate": ["gamma/copy_of_held.py"]}
    # jsonl: one document per line with field "text", same text as the .txt files.
    with open(tmp_path / "c" / "train.jsonl", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    assert [r["name"] for r in recs] == ["alpha", "beta", "gamma"]
    assert recs[0]["text"] == text
    assert not any(p.endswith(".partial") for p in os.listdir(tmp_path / "c"))


def test_tests_dirs_optional(site_dir, split_file, tmp_path):
    assert _collect(site_dir, tmp_path / "c", split_file, "--include-tests", "--packages", "alpha") == 0
    (alpha,) = _manifest(tmp_path / "c")["packages"]
    assert "alpha/tests/test_core.py" in alpha["files"]
    assert _manifest(tmp_path / "c")["options"]["include_tests"] is True


def test_split_disjoint(site_dir, split_file, tmp_path):
    assert _collect(site_dir, tmp_path / "c", split_file) == 0
    train = {f[:-4] for f in os.listdir(tmp_path / "c" / "train")}
    heldout = {f[:-4] for f in os.listdir(tmp_path / "c" / "heldout")}
    assert heldout == {"heldpkg"} and train == {"alpha", "beta", "gamma"}
    m = _manifest(tmp_path / "c")
    assert {e["name"] for e in m["packages"] if e["split"] == "heldout"} == heldout
    assert m["heldout_train_line_overlap"] == {"heldpkg": 0.0}


def test_deterministic(site_dir, split_file, tmp_path):
    assert _collect(site_dir, tmp_path / "a", split_file) == 0
    assert _collect(site_dir, tmp_path / "b", split_file) == 0
    pa, pb = _manifest(tmp_path / "a")["packages"], _manifest(tmp_path / "b")["packages"]
    assert [(e["name"], e["sha256"]) for e in pa] == [(e["name"], e["sha256"]) for e in pb]
    for split in ("train", "heldout"):
        for f in os.listdir(tmp_path / "a" / split):
            assert (tmp_path / "a" / split / f).read_bytes() == (tmp_path / "b" / split / f).read_bytes()


def test_real_stdlib_packages_deterministic(tmp_path, split_file):
    """Two real (small) standard-library packages, collected twice."""
    stdlib, _ = cc.default_roots()
    os.makedirs(tmp_path / "nosite")
    shas = []
    for out in ("a", "b"):
        assert cc.main(["collect", "--site-dir", str(tmp_path / "nosite"), "--stdlib-dir", stdlib,
                        "--out", str(tmp_path / out), "--split", split_file,
                        "--packages", "json", "tomllib"]) == 0
        m = _manifest(tmp_path / out)
        assert [e["name"] for e in m["packages"]] == ["json", "tomllib"]
        assert all(e["version"].startswith("python-3.") and e["source"] == "stdlib" for e in m["packages"])
        assert "json/__init__.py" in m["packages"][0]["files"]
        shas.append([e["sha256"] for e in m["packages"]])
    assert shas[0] == shas[1]


def test_manifest_round_trip(site_dir, split_file, tmp_path, capsys):
    assert _collect(site_dir, tmp_path / "c", split_file) == 0
    manifest = str(tmp_path / "c" / "manifest.json")
    capsys.readouterr()
    rebuild = ["rebuild", "--manifest", manifest, "--site-dir", site_dir, "--stdlib-dir", "none",
               "--split", split_file, "--out", str(tmp_path / "r")]
    assert cc.main(rebuild) == 0
    out, err = capsys.readouterr()
    assert "identical to" in out and "mismatch" not in err and "differs" not in err
    assert [e["sha256"] for e in _manifest(tmp_path / "r")["packages"]] == \
           [e["sha256"] for e in _manifest(tmp_path / "c")["packages"]]
    # The manifest's options win over defaults: big.py stays skipped without --max-file-bytes.
    assert _manifest(tmp_path / "r")["options"]["max_file_bytes"] == 1000

    # Another machine: changed text warns, a different recorded version warns, nothing crashes.
    with open(os.path.join(site_dir, "beta.py"), "a") as f:
        f.write("# patched\n")
    with open(manifest) as f:
        m = json.load(f)
    m["python"] = "2.7.18"
    for e in m["packages"]:
        if e["name"] == "alpha":
            e["version"] = "0.0.1"
    with open(manifest, "w") as f:
        json.dump(m, f)
    assert cc.main(rebuild) == 0
    out, err = capsys.readouterr()
    assert "beta: same version" in err and "sha256 differs" in err
    assert "alpha: version mismatch" in err and "Python 2.7.18" in err
    assert "2 difference(s)" in out

    # Held-out only (what the benchmark needs on CI): train is not written.
    assert cc.main(rebuild[:-1] + [str(tmp_path / "h"), "--splits", "heldout"]) == 0
    assert os.listdir(tmp_path / "h" / "heldout") == ["heldpkg.txt"]
    assert not os.path.exists(tmp_path / "h" / "train")


def test_bad_split_file_is_refused(site_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"heldout": "yaml"}))
    assert _collect(site_dir, tmp_path / "c", str(bad)) == 2
    assert "'heldout' must be a list" in capsys.readouterr().err
    assert cc.main(["rebuild", "--manifest", str(tmp_path / "none.json"), "--site-dir", site_dir,
                    "--stdlib-dir", "none", "--split", str(bad), "--out", str(tmp_path / "r")]) == 2
    with open(tmp_path / "ok.json", "w") as f:
        json.dump({"heldout": []}, f)
    assert cc.main(["rebuild", "--manifest", str(tmp_path / "none.json"), "--site-dir", site_dir,
                    "--stdlib-dir", "none", "--split", str(tmp_path / "ok.json"), "--out", str(tmp_path / "r")]) == 2
    assert "none.json not found" in capsys.readouterr().err


def test_committed_split_and_manifest_agree():
    split = cc.load_split(os.path.join(REPO, "data", "split.json"))
    with open(os.path.join(REPO, "data", "corpus_manifest.json")) as f:
        m = json.load(f)
    train = {e["name"] for e in m["packages"] if e["split"] == "train"}
    heldout = {e["name"] for e in m["packages"] if e["split"] == "heldout"}
    assert heldout == split and not train & heldout
    assert not train & cc.PROJECT_NAMES


# ----------------------------------------------------------------------------- tokenizer

ROUND_TRIP = [
    "def f(x):\n\treturn x  # tab\n",
    "    indented = {'a': [1, 2, 3]}\n\n\n",
    "s = \"<|endoftext|> and <|bos|> inside a string\"\n",
    "unicode: héllo wörld — 你好 🚀 \u00a0nbsp\r\nCRLF\rCR",
    "",
    " leading space",
    "x" * 3000,
]


def _check_tokenizer(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == 0 and tok.bos_token == "<|bos|>" and tok.bos_token_id == 1
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok(text)["input_ids"] == [tok.bos_token_id] + ids  # BOS first, as in training (like Llama)
    # A literal special-token string in source code is text, not the EOS id.
    assert 0 not in tok(ROUND_TRIP[2])["input_ids"]
    assert tok.decode([5, 0]).endswith("<|endoftext|>")


def test_demo_tokenizer_loads_and_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    assert len(tok) == 8192
    _check_tokenizer(tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.exists(os.path.join(DEMO_TOKENIZER, name))
    heldout_doc = os.path.join(REPO, "data", "corpus", "heldout", "yaml.txt")  # present once collected
    with open(heldout_doc if os.path.exists(heldout_doc) else __file__, encoding="utf-8", newline="") as f:
        text = f.read()
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_train_tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    corpus = ["# file: p/a.py\nimport os\n\ndef main():\n    print(os.getcwd())\n" * 50,
              "class A:\n    def __init__(self):\n        self.x = 1\n" * 50]
    tok = tt.build_tokenizer(300, 2, iter(corpus))
    tt.save_hf(tok, str(tmp_path / "tok"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(hf) == 300
    _check_tokenizer(hf)
    assert len(hf(corpus[1])["input_ids"]) < len(corpus[1].encode()) / 2  # merges were learned


def test_corpus_subset_is_deterministic_and_within_budget(tmp_path, capsys):
    """scripts/corpus_subset.py: same seed, same lines; the budget holds; whole lines only; an
    impossible budget is refused with a message naming the fix."""
    import random

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import corpus_subset

    rng = random.Random(7)
    lines = [json.dumps({"name": f"p{i}", "text": "x" * rng.randint(10, 200)}) + "\n" for i in range(50)]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(lines))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert corpus_subset.main([str(src), str(a), "--max-chars", "2000", "--seed", "3"]) == 0
    assert corpus_subset.main([str(src), str(b), "--max-chars", "2000", "--seed", "3"]) == 0
    kept = a.read_text().splitlines(keepends=True)
    assert a.read_text() == b.read_text()
    assert 0 < len(kept) < len(lines) and sum(map(len, kept)) <= 2000
    assert set(kept) <= set(lines)
    assert kept != corpus_subset.subset(lines, 2000, 4)  # another seed, another subset
    with pytest.raises(SystemExit):
        corpus_subset.main([str(src), str(tmp_path / "c.jsonl"), "--max-chars", "5"])
    assert "raise it" in capsys.readouterr().err
