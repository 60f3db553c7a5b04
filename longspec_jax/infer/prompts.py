"""Prompt encoding, stop tokens and incremental text output for `python -m infer.generate`."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TextIO

import numpy as np

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


def encode_prompt(tokenizer, text: str, *, chat_template: bool = True) -> tuple[list[int], bool]:
    """Token ids of `text` as one user turn.

    Args:
      tokenizer: a transformers tokenizer.
      text: the user's message.
      chat_template: apply the tokenizer's chat template when it has one (with the assistant
        generation prompt appended); otherwise encode the raw text with the tokenizer's special
        tokens (BOS).

    Returns:
      (ids, whether the chat template was applied).
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        # Render to text, then encode without adding special tokens: the template already holds
        # BOS where the model expects it (encoding it again would double it).
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"]), True
    return list(tokenizer(text)["input_ids"]), False


def stop_ids(cfg, tokenizer=None, checkpoint_dir: str | None = None) -> tuple[int, ...]:
    """Every id that ends generation: the model config's EOS ids, the checkpoint's
    generation_config.json `eos_token_id` (chat models often list the end-of-turn token only there,
    e.g. Llama-3's <|eot_id|>) and the tokenizer's EOS token; sorted, without duplicates, within
    the vocabulary."""
    ids = set(cfg.eos_token_ids)
    if checkpoint_dir and os.path.isfile(os.path.join(checkpoint_dir, "generation_config.json")):
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(checkpoint_dir, local_files_only=True).eos_token_id
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(i for i in ids if 0 <= i < cfg.vocab_size))


class TextStreamer:
    """Prints the decoded text of row 0 as tokens arrive (an `infer.ar` stream callback).

    Decodes the whole prefix each time and prints only the new suffix, so multi-token characters
    and tokenizers that merge spaces across tokens print correctly; a trailing U+FFFD (an
    incomplete UTF-8 sequence) is held back until its remaining bytes arrive.
    """

    def __init__(self, tokenizer, out: TextIO | None = None):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.printed = ""

    def text(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def __call__(self, tokens: np.ndarray, num_tokens: np.ndarray) -> None:
        text = self.text(tokens[0, : int(num_tokens[0])].tolist())
        if text.endswith("\ufffd"):
            text = text[:-1]
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self, tokens: Iterable[int]) -> None:
        """Print whatever is left of the final text (including held-back bytes) and a newline."""
        text = self.text(tokens)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:  # the tokenizer re-segmented earlier text; print the final version in full
            self.out.write("\n" + text)
        self.out.write("\n")
        self.out.flush()
        self.printed = text
