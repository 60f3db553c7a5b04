"""Requests, events and the slot table of the serving engine (`longspec_jax/infer/engine.py`): host-side
bookkeeping only. Which prefix a request reuses: the longest any slot holds, a free slot's resident
sequence or a running request's. Which free slot it takes: the one whose whole sequence it extends,
else the one worth least (`choose_slot`), so that a shared document stays resident.
Which waiting request goes first: the one that reuses the longest prefix (SGLang's
longest-prefix-match order), else the oldest, so that a cold request does not evict an agent's
context while the agent's next turn waits behind it. Which lane prefills it: the main lane takes
any request; the fast lane, while the main lane loads a long prompt, only one with little left to
prefill after reuse (`Lane`), a question over a document another request holds included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from longspec_jax.sampling import SamplingParams


@dataclasses.dataclass
class Request:
    """One generation request.

    Attributes:
      prompt: token ids (at least one).
      max_tokens: most tokens to generate (stop ids included).
      sampling: temperature / top-k / top-p.
      stop_ids: ids that end the request (default: the model's EOS ids).
      seed: PRNG seed (None: the engine draws one); the same seed and prompt give the same tokens.
      session: optional id that pins the request's sequence to its slot after it finishes, so the
        session's next turn finds it even under memory pressure (evicted only when no other slot is free).
      id: set by `submit` when empty.
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_ids: Sequence[int] | None = None
    seed: int | None = None
    session: str | None = None
    id: str = ""


@dataclasses.dataclass
class Event:
    """What one engine step produced for one request: new tokens, and whether it finished.

    finish_reason: None while running; then "eos", "max_new_tokens", "cache_full", "cancelled" or
    "error" (with `error` set). cached_tokens: prompt tokens reused from a resident sequence.
    """

    request_id: str
    tokens: list
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class Slot:
    index: int
    request: Request | None = None   # running (or being prefilled)
    tokens: list = dataclasses.field(default_factory=list)  # resident sequence: prompt + emitted
    valid: int = 0                   # leading tokens whose KV in the slot is valid
    emitted: int = 0                 # tokens already handed out for the running request
    iters: int = 0                   # decode steps of the running request seen so far
    last_used: float = 0.0
    session: str | None = None

    def clear(self) -> None:
        """Free the slot and forget its sequence (its KV is no longer valid)."""
        self.request, self.tokens, self.valid, self.session = None, [], 0, None


@dataclasses.dataclass
class Prefill:
    request: Request
    slot: Slot
    rows: np.ndarray                 # [1, padded] the prompt from `start`, right-padded to chunks
    start: int                       # first position to prefill (= reused tokens)
    next_chunk: int = 0

    def chunks_left(self, chunk: int) -> int:
        """Prefill forwards still to run (`rows` is padded to whole chunks but its last)."""
        return -(-self.rows.shape[1] // chunk) - self.next_chunk


@dataclasses.dataclass
class Lane:
    """A batch-1 staging cache and the prompt prefilling into it, the engine's
    `prefill_tokens_per_step` a step (whole chunks). The
    engine's main lane takes any request; its fast lane (a second staging cache) only one whose
    prompt left to prefill after reuse is at most `max_suffix` tokens, so that an agent's short
    next turn starts while a long cold prompt is still loading instead of waiting behind it."""

    staging: Any                     # KVCache [1, capacity + chunk]
    max_suffix: int | None = None    # None: the main lane
    job: Prefill | None = None
    admitting: Request | None = None  # popped from the waiting list, not yet running
    hidden: Any = None               # the last prompt position's hidden state, once prefilled

    def clear(self) -> None:
        """Drop the prompt in progress and free its slot."""
        if self.job is not None:
            self.job.slot.clear()
        self.job = self.admitting = None


def check_request(req: Request, *, max_context: int, vocab_size: int, eos_ids: Sequence[int], eos_slots: int):
    """Refuse a request an engine cannot run (ValueError naming the limit and the fix)."""
    n = len(req.prompt)
    if n == 0:
        raise ValueError("the prompt is empty; send at least one token")
    if req.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
    if n + req.max_tokens > max_context:
        raise ValueError(f"this server's maximum context length is {max_context} tokens; the request has "
                         f"{n} prompt tokens and asks for {req.max_tokens} more ({n + req.max_tokens} in all): "
                         "shorten the prompt or lower max_tokens")
    ids = np.asarray(req.prompt)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    stop = eos_ids if req.stop_ids is None else req.stop_ids
    if len(stop) > eos_slots:
        raise ValueError(f"at most {eos_slots} stop token ids per request, got {len(stop)}")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


PROBE = 32  # leading tokens compared first when matching waiting prompts against resident sequences


def next_request(waiting: Sequence[Request], free: Sequence[Slot], *, head_passes: int = 0, patience: int = 8,
                 window: int = 16, max_suffix: int | None = None,
                 busy: Sequence[tuple[Slot, int]] = ()) -> int | None:
    """Index in `waiting` of the request to admit next: among the first `window`, the one that
    reuses the longest prefix (`choose_slot`: a free slot's resident sequence or a running request's,
    `busy`; ties: the oldest), else 0; always 0 once the oldest has been passed over `patience` times
    (`head_passes`). Only prompts whose first `PROBE` tokens equal a held sequence's are compared in full.

    With `max_suffix` (a fast lane) only requests with at most that many prompt tokens left to
    prefill after reuse are candidates, and None is returned when none is; once the oldest has been
    passed over `patience` times, only the oldest is."""
    fast = max_suffix is not None
    if head_passes >= patience:
        if not fast:
            return 0
        waiting = waiting[:1]
    heads = {tuple(s.tokens[:PROBE]) for s in free if s.valid >= PROBE} | {
        tuple(s.tokens[:PROBE]) for s, n in busy if n >= PROBE}
    best, most = (None, -1) if fast else (0, 0)
    for i, req in enumerate(waiting[:window] if heads or fast else ()):
        reuse = 0
        if len(req.prompt) > PROBE and tuple(req.prompt[:PROBE]) in heads:
            reuse = choose_slot(free, np.asarray(req.prompt), req.session, busy)[1]
        if fast and len(req.prompt) - reuse > max_suffix:
            continue
        if reuse > most:
            best, most = i, reuse
    return best


def choose_slot(free: Sequence[Slot], prompt: np.ndarray, session: str | None,
                busy: Sequence[tuple[Slot, int]] = ()) -> tuple[Slot, int, Slot]:
    """(slot the request takes, prompt tokens it reuses, slot whose KV holds them) among the free
    slots; the reused prefix may also come from a running request's sequence (`busy`: its slot and
    how many leading tokens' KV are committed). The last prompt token is never reused: its logits
    draw the first new token.

    A request that extends a free slot's whole resident sequence (an agent's next turn) takes that
    slot: its new sequence supersedes the old. One that shares only part of a sequence (another
    question over the same document) copies that part into the free slot worth least, so the
    sequence it shares stays resident for its own next turn: not pinned to another session, the
    request's own session's, empty, least recently used, in that order. A session's pinned slot is
    taken over only by that session, or when no other slot is free."""
    limit = prompt.size - 1
    valid = {s.index: s.valid for s in free} | {s.index: n for s, n in busy}
    sources = list(free) + [s for s, _ in busy]
    reuse = {s.index: min(common_prefix(prompt, s.tokens[:valid[s.index]]), limit) for s in sources}
    is_free = {s.index for s in free}
    mine = lambda s: s.session is None or s.session == session  # noqa: E731 (not pinned to another session)
    takes = lambda s: s.index in is_free and reuse[s.index] == valid[s.index] and mine(s)  # noqa: E731
    source = max(sources, key=lambda s: (reuse[s.index], takes(s), s.session == session, s.last_used))
    start = reuse[source.index]
    if takes(source):
        return source, start, source
    superseded = [s for s in free if takes(s) and s.valid > 0]  # the new sequence will hold all of it
    if superseded:
        return max(superseded, key=lambda s: s.valid), start, source
    others = [s for s in free if s is not source or start == 0] or list(free)
    dest = min(others, key=lambda s: (not mine(s), s.session != session, s.valid > 0, s.last_used))
    return dest, start, source
