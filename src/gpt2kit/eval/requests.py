"""The three kinds of question a task can ask a language model, and their answers.

A task turns each document into a few requests; the scorer (`gpt2kit.eval.scoring`) answers
every request of a kind in length-sorted batches, across documents and tasks. Requests hold token
ids, so a task decides exactly how its text is split into context and continuation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Loglikelihood", "LoglikelihoodResult", "RollingLoglikelihood", "RollingResult",
           "GreedyGeneration", "Generation", "GenerationResult", "Request", "Result"]


@dataclass(frozen=True)
class Loglikelihood:
    """log p(continuation | context), and whether greedy decoding from the context would have
    produced exactly the continuation. `exclude` lists token ids that the greedy check may not
    pick (a stop-word filter, say): the argmax is taken over the other tokens."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    exclude: frozenset[int] = frozenset()


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass(frozen=True)
class RollingLoglikelihood:
    """log p(tokens) of a whole text of any length: the first token is conditioned on
    <|endoftext|>, and texts longer than the context go through a sliding window (every token is
    scored exactly once, with as much context as the window gives)."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class RollingResult:
    logprob: float
    n_tokens: int


@dataclass(frozen=True)
class GreedyGeneration:
    """Greedy decoding from `context` for at most `max_new_tokens` tokens, ending where the text
    first contains one of `stop` (literal strings) or a match of `stop_regex`; the text is cut
    there. `suppress_first` are token ids that may not be the first generated token."""

    context: tuple[int, ...]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stop_regex: str | None = None
    suppress_first: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class GenerationResult:
    """`text` is cut before the stop; `tokens` are the tokens whose text starts before the cut and
    `logprob` their summed log-probability under the model (without suppression)."""

    text: str
    tokens: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class Generation:
    """Decoding through `gpt2kit.generate.generate` (greedy or sampled), batched across documents.

    The prompt is `context + suffix`; when it leaves fewer than `max_new_tokens` free positions
    in the model's context, `context` loses tokens from its start (`truncate="left"`) or its end
    (`"right"`, e.g. an article before a fixed hint); `suffix` is always kept whole. The text ends
    before the first of `stop`. Requests with equal decoding options and `seed` share batches, and
    a batch draws from one generator seeded with `seed`, so sampled text is reproducible for the
    same requests and batch size. The answer's `tokens` are every generated token (the one that
    completed a stop string included) and `logprob` their summed log-probability."""

    context: tuple[int, ...]
    max_new_tokens: int
    suffix: tuple[int, ...] = ()
    truncate: str = "left"
    stop: tuple[str, ...] = ()
    do_sample: bool = False
    top_k: int | None = None
    temperature: float = 1.0
    seed: int | None = None


Request = Loglikelihood | RollingLoglikelihood | GreedyGeneration | Generation
Result = LoglikelihoodResult | RollingResult | GenerationResult
