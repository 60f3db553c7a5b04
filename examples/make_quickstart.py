"""Write examples/quickstart.ipynb (the cells live here so the notebook's source is reviewable).

    python examples/make_quickstart.py && jupyter nbconvert --execute --to notebook --inplace examples/quickstart.ipynb
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# longspec-jax quickstart

Speculative decoding with the demo pair shipped in the package: a 22M-parameter code model trained
from scratch on Python packages and its LongSpec draft (one decoder block with a constant-size
sliding-window cache and cross-attention to the target's last-layer cache). The prompt is the start
of a package that neither model saw in training. Runs on a CPU in about a minute."""),
    new_code_cell("""import jax
import jax.numpy as jnp
import numpy as np

from longspec_jax import demo, draft_weights, weights
from longspec_jax.infer.decoder import Decoder

dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
target, cfg, tok = weights.load_target(demo.TARGET_DIR, dtype=dtype)
draft = draft_weights.load_draft(demo.DRAFT_DIR, cfg, dtype=dtype)
print(cfg.num_layers, "layers, vocab", cfg.vocab_size, "| draft window", draft.cfg.window)"""),
    new_markdown_cell("A long prompt: the first 2048 tokens of a held-out package (`asyncio`)."),
    new_code_cell("""record = demo.heldout_prompts()[0]
prompt = tok(record["text"])["input_ids"][:2048]   # BOS + code
print(record["package"], len(prompt), "tokens; ends with:")
print(tok.decode(prompt[-60:]))"""),
    new_markdown_cell("The target alone (greedy), then the tree speculative decoder. At temperature 0 the "
                      "outputs must be identical: speculative decoding is lossless."),
    new_code_cell("""NEW = 128
ar_res = Decoder(target).generate([prompt], max_new_tokens=NEW, eos_ids=())
ar_tokens = ar_res.tokens[0]

decoder = Decoder(target, draft)          # tree shape chosen from the context length and the device
spec = decoder.generate([prompt], max_new_tokens=NEW, eos_ids=())
assert spec.tokens[0] == ar_tokens, "speculative output differs from the target's greedy output"
print(tok.decode(spec.tokens[0]))"""),
    new_code_cell("""s = spec.spec
forwards = spec.timings.decode_steps
ar_rate = ar_res.timings.decode_tokens_per_s
tree_rate = spec.timings.decode_tokens_per_s
print(f"tree shape {s.tree_shape}: tau = {s.tau:.2f} tokens per target forward")
print(f"AR {ar_rate:.1f} tok/s | tree {tree_rate:.1f} tok/s | speedup {tree_rate / ar_rate:.2f}x "
      "(decode only; compilation excluded)")"""),
    new_markdown_cell("How deep the accepted drafts go: the share of verifications that accepted a drafted "
                      "token at each depth of the tree."),
    new_code_cell("""import matplotlib
import matplotlib.pyplot as plt

depth_share = np.asarray(s.accepted_by_depth) / forwards
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(np.arange(1, len(depth_share) + 1), depth_share)
ax.set_xlabel("tree depth")
ax.set_ylabel("accepted (share of verifications)")
ax.set_ylim(0, 1)
ax.set_title(f"tau = {s.tau:.2f}")
plt.show()"""),
    new_markdown_cell("Sampling at temperature 1: the tokens differ from a sampled AR run, but their "
                      "distribution is the target's (tests/test_verify.py checks it statistically)."),
    new_code_cell("""from longspec_jax.sampling import SamplingParams

hot = decoder.generate([prompt], max_new_tokens=NEW, eos_ids=(), sampling=SamplingParams(temperature=1.0), seed=1)
print(f"T=1: tau = {hot.spec.tau:.2f}")
print(tok.decode(hot.tokens[0])[:400])"""),
    new_markdown_cell("Several requests at once: the serving engine (the same decode step) keeps a few slots "
                      "decoding, admits requests between steps, and keeps finished sequences resident so a "
                      "follow-up that extends one prefills only its new tokens. Each output is still exactly "
                      "the target's greedy output."),
    new_code_cell("""from longspec_jax.infer.engine import Engine

engine = Engine(target, draft, max_slots=2, max_context=4096)
first, second = engine.generate([prompt[:1024], prompt[:1536]], max_new_tokens=32, stop_ids=())
follow_up = prompt[:1024] + first + prompt[1536:1600]          # the next turn over the first context
(third,) = engine.generate([follow_up], max_new_tokens=32, stop_ids=())
assert third == Decoder(target).generate([follow_up], max_new_tokens=32, eos_ids=()).tokens[0]
print("reused", engine.stats["reused_tokens"], "of", len(follow_up), "prompt tokens")"""),
]


def main():
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.ipynb")
    nbformat.write(nb, path)
    print(path)


if __name__ == "__main__":
    main()
