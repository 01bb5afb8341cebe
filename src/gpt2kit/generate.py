"""Text generation: batches of prompts, a KV cache, sampling filters, stop strings, streaming.

The decoding loop works on token ids (`generate_tokens`); text handling sits on top of it
(`iter_generate` yields one event per token, `generate` collects them, `stream_generate` yields
the text of one sample as it grows). Prompts of different lengths share a batch by left padding:
each row's real tokens sit at the right end, so every row's next token is the last column.

Past the context (n_ctx) the window slides: when a row's own context is full, its last 3/4 n_ctx
tokens are re-encoded from scratch (GPT-2's positions are absolute, so cached keys cannot be
shifted) and decoding goes on from there; the batch's other rows are re-encoded whole, so that a
row decodes as it would alone. A prompt longer than the context keeps its most recent
n_ctx tokens, with a warning.

The module itself is callable as `generate()`: `from gpt2kit import generate` (the README's
spelling) finds this submodule once anything has imported it, and must still generate.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import numbers
import operator
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import kernels
from .errors import GPT2KitError
from .model import GPT2
from .sampling import SamplingParams, as_integer, select_tokens

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["GenerationError", "InferenceFormError", "Completion", "TokenEvent", "StepOutput", "generate", "stream_generate",
           "iter_generate", "generate_tokens", "sampling_params", "prompt_logprobs", "load_for_inference",
           "quantize_int8", "optimize_for_cpu"]

log = logging.getLogger(__name__)


class GenerationError(GPT2KitError):
    """A generation option is invalid (e.g. max_new_tokens < 0, n < 1, a bad stop string)."""


@dataclass
class Completion:
    """One generated sample. `text` ends before any stop string; `token_ids` are the sampled
    tokens (without a final <|endoftext|>); with `top_logprobs` asked (0 included), `logprobs[i]`
    is log p(token_ids[i]) under the model (before temperature and filters), and for k > 0
    `top_logprobs[i]` the k most probable alternatives; else both stay empty (None)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string or <|endoftext|>), "length" (max_new_tokens)
    prompt_index: int
    prompt_token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class TokenEvent:
    """One step of one sample: the text it makes printable (possibly ""), the token behind it,
    and on its last event the finish reason. `index` is prompt_index * n + sample number. A sample
    ended by <|endoftext|> ends with an event whose token_id is None (the token is not part of the
    text) and whose logprob, when asked, is that token's."""

    index: int
    text: str
    token_id: int | None
    logprob: float | None
    top_logprobs: dict[int, float] | None
    finish_reason: str | None


@dataclass
class StepOutput:
    """The tokens chosen at one decoding step for every row, with their model log-probabilities."""

    tokens: list[int]
    logprobs: list[float] | None
    top: list[dict[int, float]] | None


def sampling_params(*, preset: str | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                    do_sample: bool | None = None, presence_penalty: float | None = None,
                    frequency_penalty: float | None = None,
                    logit_bias: dict[int, float] | None = None) -> SamplingParams:
    """A preset (default: plain sampling at T=1) with the options that are not None replaced."""
    base = SamplingParams.from_preset(preset) if preset else SamplingParams()
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                 do_sample=do_sample, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                 logit_bias=logit_bias)
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


# ----------------------------------------------------------------------------- the decoding loop

def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class _Window:
    """The model's view of a batch: the KV cache, the attention mask and each row's next position."""

    def __init__(self, model: "GPT2", rows: Sequence[Sequence[int]], pad_id: int, steps: int):
        self.model = model
        self.device = model.transformer.wte.weight.device
        ids, self.mask = _left_pad(rows, pad_id, self.device)  # (B, L)
        # room for the `steps` tokens still to come, up to the context: a batch of short
        # completions does not allocate (and zero) n_ctx positions per row
        self.cache = model.new_kv_cache(len(rows), min(model.config.n_ctx, ids.shape[1] + steps))
        # as in transformers' generate: real tokens count from 0, pads sit at position 1
        pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)  # (B, L)
        self.next_pos = self.mask.sum(-1, keepdim=True)  # (B, 1)
        h = model.hidden_states(ids, attention_mask=self.mask, position_ids=pos, kv_cache=self.cache)
        self.logits = model.lm_head(h[:, -1])  # (B, V): only the last position is needed

    @property
    def full(self) -> bool:
        return self.cache.length >= self.cache.max_len

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one new token per row (B,)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)  # (B, P+1)
        h = self.model.hidden_states(tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                                     kv_cache=self.cache)  # (B, 1, C)
        self.next_pos = self.next_pos + 1
        self.logits = self.model.lm_head(h[:, -1])  # (B, V)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """The model, and each of its modules, in eval mode (no dropout) for the block, then each back
    in the mode it was in: decoding and scoring from a model that is training, or was just built,
    must not sample dropout masks. (A model in training mode is then not for several threads at
    once: their blocks would switch its modes under each other.)"""
    if not getattr(model, "training", False):  # as loaded or served: nothing to switch (and no walk
        yield                                    # over its modules at every decoding step)
        return
    modes = [(m, m.training) for m in model.modules() if m.training]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _decoding(model):
    """What a decoding step runs under, entered anew for each step: a generator that kept it across
    its `yield`s would leave inference mode (and eval mode) on in the caller's code meanwhile."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(eval_mode(model))
    return stack


def generate_tokens(model: "GPT2", prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                    max_new_tokens: int, generator: torch.Generator | None = None, pad_id: int = 0,
                    top_logprobs: int | None = None, finished: Sequence[bool] | None = None,
                    cancel: threading.Event | None = None) -> Iterator[StepOutput]:
    """Decode up to `max_new_tokens` tokens for each prompt (token id lists, all non-empty and at
    most n_ctx long), yielding every step's tokens. The caller may set `finished[i]` (a mutable
    list) to say row i is done: the loop stops once every row is, or when `cancel` is set.
    `top_logprobs=k` also reports each step's log-probabilities (k > 0: and the k best tokens)."""
    n_ctx = model.config.n_ctx
    if any(len(p) == 0 or len(p) > n_ctx for p in prompts):
        raise GenerationError(f"generate_tokens: every prompt needs 1 to n_ctx={n_ctx} tokens")
    history = [list(p) for p in prompts]
    keep = n_ctx - max(1, n_ctx // 4)  # tokens per row kept when the window slides
    done = finished if finished is not None else [False] * len(prompts)
    with _decoding(model):
        window = _Window(model, history, pad_id, max_new_tokens)
        penalize = params.repetition_penalty != 1.0
        sampled = None  # (B, V) how often each row sampled each token: OpenAI's penalties count these
        if params.presence_penalty or params.frequency_penalty:
            sampled = torch.zeros(window.logits.shape, dtype=torch.int32, device=window.device)
    for step in range(max_new_tokens):
        with _decoding(model):
            previous = previous_mask = None
            if penalize:  # the repetition penalty looks at every row's real tokens so far
                previous, previous_mask = _left_pad(history, pad_id, window.device)
            tokens = select_tokens(window.logits, params, previous=previous, previous_mask=previous_mask,
                                   sampled_counts=sampled, generator=generator)  # (B,)
            if sampled is not None:
                sampled[torch.arange(len(history), device=window.device), tokens] += 1
            out = StepOutput(tokens.tolist(), None, None)
            if top_logprobs is not None:
                logp = torch.log_softmax(window.logits.float(), dim=-1)  # (B, V)
                out.logprobs = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
                if top_logprobs > 0:
                    vals, idx = logp.topk(top_logprobs, dim=-1)
                    out.top = [dict(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
            for row, t in zip(history, out.tokens):
                row.append(t)
        yield out
        if all(done) or step == max_new_tokens - 1 or (cancel is not None and cancel.is_set()):
            return
        with _decoding(model):
            if window.full:  # only ever at n_ctx: the cache has room for max_new_tokens otherwise
                # the window slides for the rows whose own context is full; shorter rows keep theirs,
                # as they would decoding alone (a row's text must not depend on its batch-mates)
                held = window.mask.sum(-1).tolist()  # each row's tokens in the window
                rows = [row[-keep:] if n >= n_ctx else row[-(n + 1):] for row, n in zip(history, held)]
                window = _Window(model, rows, pad_id, max_new_tokens - step - 1)
            else:
                window.advance(tokens)


def prompt_logprobs(model: "GPT2", token_ids: Sequence[int], top_logprobs: int = 0
                    ) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """log p(token_i | tokens before it) for every prompt token (None for the first, which has no
    context), and the `top_logprobs` best alternatives at each position: what the OpenAI API
    returns for an echoed prompt."""
    ids = torch.tensor([list(token_ids)], device=model.transformer.wte.weight.device)
    with torch.inference_mode(), eval_mode(model):
        logp = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # (T-1, V)
        chosen = logp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        top: list[dict[int, float] | None] = [None]
        if top_logprobs > 0:
            vals, idx = logp.topk(top_logprobs, dim=-1)
            top += [dict(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            top += [None] * len(chosen)
    return [None, *chosen], top


# ----------------------------------------------------------------------------- text on top

class _TextTracker:
    """The text of one sample as tokens arrive: bytes are decoded incrementally so that a
    character split across tokens comes out whole, and text that might be the start of a stop
    string is held back until it is known not to be one."""

    def __init__(self, tokenizer: "Tokenizer", stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.text += self._decoder.decode(self._tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)  # a dangling partial char -> U+FFFD
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # a stop string can only start in the held-back tail or later
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        piece = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        # the longest tail of the text that is a proper prefix of some stop string
        for k in range(min(len(self.text), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


def check_logit_bias(model: "GPT2", params: SamplingParams) -> None:
    """Refuse a logit bias for a token the model does not have, before any work."""
    too_big = [t for t, _ in params.logit_bias if t >= model.config.vocab_size]
    if too_big:
        raise GenerationError(f"logit_bias: token id {too_big[0]} is not in the model's vocabulary "
                              f"(ids 0 to {model.config.vocab_size - 1})")


def _prompt_ids(model: "GPT2", tokenizer: "Tokenizer", prompt: str | Sequence[int], index: int) -> list[int]:
    n_vocab = min(tokenizer.n_vocab, model.config.vocab_size)
    _refuse_bytes(prompt, f"prompt {index}")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allowed_special="all")
        if ids and max(ids) >= n_vocab:  # a model with fewer tokens than its tokenizer
            raise GenerationError(f"prompt {index}: its text encodes to token id {max(ids)}, but the model has "
                                  f"{model.config.vocab_size} tokens: the model and the tokenizer do not belong together")
    else:
        ids = _checked_token_ids(list(prompt), n_vocab, index)
    if not ids:  # GPT-2 was trained with <|endoftext|> between documents: it begins a new one
        ids = [tokenizer.eot_token]
    n_ctx = model.config.n_ctx
    if len(ids) > n_ctx:
        log.warning("prompt of %d tokens is longer than the context (%d): keeping its last %d tokens",
                    len(ids), n_ctx, n_ctx)
        ids = ids[-n_ctx:]
    return ids


def _checked_token_ids(ids: list, n_vocab: int, index: int) -> list[int]:
    """`ids` as Python ints (numpy and torch integers included), each a valid token id: the
    embedding would raise "index out of range in self", or take a float or a bool as an id."""
    out = []
    for t in ids:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            t = None
        if t is None or not 0 <= t < n_vocab:
            raise GenerationError(f"prompt {index}: token id {ids[len(out)]!r} is invalid; "
                                  f"expected an integer in [0, {n_vocab})")
        out.append(t)
    return out


def _is_id(x) -> bool:
    """Whether `x` stands for one token id (checked later): a number, numpy's too, or a 0-d tensor."""
    return isinstance(x, numbers.Number) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _is_array(x) -> bool:
    return isinstance(x, torch.Tensor) or (hasattr(x, "ndim") and hasattr(x, "tolist"))  # (numpy)


def _refuse_bytes(prompt, what: str) -> None:
    if isinstance(prompt, (bytes, bytearray, memoryview)):  # list() of them would be byte values as token ids
        raise GenerationError(f"{what}: expected a string or token ids, got {type(prompt).__name__}: decode the "
                              f"bytes to a string first")


def _as_list(prompts) -> list:
    """One prompt (a string, a list of token ids, a 1-D array or tensor of them) or several (a list
    of those, a 2-D array or tensor: one per row) -> a list of prompts."""
    _refuse_bytes(prompts, "prompts")
    if isinstance(prompts, str):
        return [prompts]
    if _is_array(prompts):
        if prompts.ndim not in (1, 2):
            raise GenerationError(f"prompts: expected a 1-D (one prompt) or 2-D (one per row) array of token "
                                  f"ids, got {prompts.ndim} dimensions")
        return [prompts.tolist()] if prompts.ndim == 1 else prompts.tolist()
    try:
        prompts = list(prompts)
    except TypeError:
        raise GenerationError(f"prompts: expected a string, a list of token ids or a list of them, "
                              f"got {type(prompts).__name__}") from None
    return [prompts] if prompts and _is_id(prompts[0]) else prompts


def _check_options(max_new_tokens: int, n: int, stop) -> tuple[list[str], int, int]:
    max_new_tokens, n = as_integer(max_new_tokens), as_integer(n)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GenerationError(f"n: expected an integer >= 1, got {n!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(f"stop: expected non-empty strings, got {stop!r}")
    return stops, max_new_tokens, n


def _checked_top_logprobs(top_logprobs, model: "GPT2") -> int | None:
    if top_logprobs is None:
        return None
    k = as_integer(top_logprobs)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= model.config.vocab_size:
        raise GenerationError(f"top_logprobs: expected an integer in [0, {model.config.vocab_size}] (or None), "
                              f"got {top_logprobs!r}")
    return k


def iter_generate(model: "GPT2", tokenizer: "Tokenizer", prompts: str | Sequence[str | Sequence[int]], *,
                  max_new_tokens: int = 64, params: SamplingParams | None = None,
                  stop: str | Iterable[str] | None = None, seed: int | None = None, n: int = 1,
                  stop_at_eot: bool = True, top_logprobs: int | None = None,
                  cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
    """One `TokenEvent` per sampled token of every sample, in decoding order; each sample's last
    event carries its finish_reason. Prompts are strings or token id lists."""
    params = params or SamplingParams()
    stops, max_new_tokens, n = _check_options(max_new_tokens, n, stop)
    rows = [_prompt_ids(model, tokenizer, p, i) for i, p in enumerate(_as_list(prompts)) for _ in range(n)]
    if model.config.vocab_size > tokenizer.n_vocab:
        raise GenerationError(f"the model has {model.config.vocab_size} output tokens but the tokenizer only "
                              f"{tokenizer.n_vocab}: they do not belong together")
    check_logit_bias(model, params)
    top_logprobs = _checked_top_logprobs(top_logprobs, model)
    if not rows:
        return
    if max_new_tokens == 0:
        for i in range(len(rows)):
            yield TokenEvent(i, "", None, None, None, "length")
        return
    generator = None
    if seed is not None:
        seed = as_integer(seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise GenerationError(f"seed: expected an integer in [-2**63, 2**64) (what torch's generator "
                                  f"takes), got {seed!r}")
        generator = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed)
    trackers = [_TextTracker(tokenizer, stops) for _ in rows]
    finished = [False] * len(rows)
    steps = generate_tokens(model, rows, params, max_new_tokens=max_new_tokens, generator=generator,
                            pad_id=tokenizer.eot_token, top_logprobs=top_logprobs, finished=finished,
                            cancel=cancel)
    for step, out in enumerate(steps, start=1):
        for i, token in enumerate(out.tokens):
            if finished[i]:
                continue
            lp = out.logprobs[i] if out.logprobs is not None else None
            top = out.top[i] if out.top is not None else None
            if stop_at_eot and token == tokenizer.eot_token:
                finished[i] = True
                yield TokenEvent(i, trackers[i].finish(), None, lp, None, "stop")
                continue
            piece = trackers[i].push(token)
            reason = "stop" if trackers[i].stopped else "length" if step == max_new_tokens else None
            if reason:
                finished[i] = True
                piece += trackers[i].finish()
            yield TokenEvent(i, piece, token, lp, top, reason)


def generate(model: "GPT2", tokenizer: "Tokenizer", prompts: str | Sequence[str | Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             do_sample: bool | None = None, preset: str | None = None,
             stop: str | Iterable[str] | None = None, seed: int | None = None, n: int = 1,
             stop_at_eot: bool = True, top_logprobs: int | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             logit_bias: dict[int, float] | None = None) -> list[Completion]:
    """Complete each prompt `n` times; returns len(prompts) * n `Completion`s, prompt by prompt.
    A prompt is a string or token ids (a list, a 1-D numpy array or tensor); several are a list of
    those or a 2-D array (a prompt per row).

    Sampling starts from `preset` ("paper" = top-k 40 as in the paper's samples, "greedy",
    "nucleus", "pure"; default: plain sampling at temperature 1) and the options given replace its
    fields; `do_sample=False` or `temperature=0` is greedy. `presence_penalty`, `frequency_penalty`
    and `logit_bias` ({token id: value}) are the OpenAI API's. The same `seed` with the same prompts
    and `n` gives the same text; a prompt sampled in another batch (other prompts, another `n`)
    draws other tokens, as every row's draws come from the one seeded generator.

    >>> generate(model, tok, "The meaning of life is", preset="paper", seed=0)[0].text  # doctest: +SKIP
    """
    params = sampling_params(preset=preset, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty, do_sample=do_sample,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             logit_bias=logit_bias)
    _, max_new_tokens, n = _check_options(max_new_tokens, n, stop)
    top_logprobs = _checked_top_logprobs(top_logprobs, model)
    prompt_ids = [_prompt_ids(model, tokenizer, p, i) for i, p in enumerate(_as_list(prompts))]
    results = [Completion("", [], "length", i // n, prompt_ids[i // n], top_logprobs=[] if top_logprobs else None)
               for i in range(len(prompt_ids) * n)]
    for ev in iter_generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, params=params,
                            stop=stop, seed=seed, n=n, stop_at_eot=stop_at_eot, top_logprobs=top_logprobs):
        c = results[ev.index]
        c.text += ev.text
        if ev.token_id is not None:
            c.token_ids.append(ev.token_id)
            if ev.logprob is not None:
                c.logprobs.append(ev.logprob)
            if c.top_logprobs is not None and ev.top_logprobs is not None:
                c.top_logprobs.append(ev.top_logprobs)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
    return results


def stream_generate(model: "GPT2", tokenizer: "Tokenizer", prompt: str | Sequence[int], *,
                    max_new_tokens: int = 64, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                    do_sample: bool | None = None, preset: str | None = None,
                    stop: str | Iterable[str] | None = None, seed: int | None = None,
                    stop_at_eot: bool = True, presence_penalty: float | None = None,
                    frequency_penalty: float | None = None,
                    logit_bias: dict[int, float] | None = None) -> Iterator[str]:
    """Yield the text of one completion of `prompt` piece by piece as it is generated; the pieces
    join to exactly `generate(...)[0].text` with the same options, and never split a character."""
    if _is_array(prompt) and prompt.ndim == 1:
        prompt = prompt.tolist()
    if _is_array(prompt) or (not isinstance(prompt, str) and prompt and not _is_id(prompt[0])):
        raise GenerationError("stream_generate: expected one prompt (a string, a list of token ids or a 1-D "
                              "array of them)")
    params = sampling_params(preset=preset, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty, do_sample=do_sample,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             logit_bias=logit_bias)
    for ev in iter_generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, params=params,
                            stop=stop, seed=seed, stop_at_eot=stop_at_eot):
        if ev.text:
            yield ev.text


# ----------------------------------------------------------------------------- loading

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _InputMajorLinear(torch.nn.Module):
    """`nn.Linear` with its weight stored transposed, (in, out) and contiguous: on CPU a one-row
    matmul (batch-1 decoding) streams this layout ~1.7x faster in fp32 (OpenAI's and HF's Conv1D
    layout). Same results up to float rounding."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


class _InputMajorEmbedding(torch.nn.Module):
    """The tied token embedding stored transposed, (C, V): rows are looked up as columns, and the
    output layer multiplies by it directly (see `_InputMajorLinear`)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight_t = torch.nn.Parameter(weight.detach()[:vocab_size].t().contiguous(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # (V, C) view: for code that asks the embedding's dtype/device
        return self.weight_t.t()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_t.t()[ids]  # (..., C)


class _InputMajorHead(torch.nn.Module):
    def __init__(self, embedding: _InputMajorEmbedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])  # (N, C)
        return (flat @ self.embedding.weight_t).view(*h.shape[:-1], -1)  # (..., V)


class _CPULinear(torch.nn.Module):
    """An `nn.Linear` (or the tied output layer) for inference on CPU. Up to `kernels.MAX_ROWS`
    rows (decoding) go through gpt2kit's matrix-vector kernel, which streams the weight at memory
    speed (`matvec`); more rows (a prompt) through PyTorch's GEMM, optionally on a copy of the
    weight pre-packed into the GEMM's blocked layout (`packed`): oneDNN's for bf16, where
    `F.linear` re-packs a bf16 weight on every call (~12% of a 1000-row product on an AMD EPYC);
    for fp32, MKL's on Intel CPUs (`kernels.MKLPackedLinear`), bit for bit `F.linear`'s product: on
    a Xeon the 50257-wide output layer's 1024-row product alone ran ~8% faster than `F.linear`'s,
    within the noise inside a whole prompt, where oneDNN's packed fp32 GEMM was 12% slower at
    4096 rows; on other CPUs, no packed copy where OpenBLAS's GEMM multiplies prompts (the plain
    weight, `kernels.linear`, 1.2-1.6x faster than `F.linear`'s on an AMD EPYC), else oneDNN's
    (1.4-1.75x faster there); see `kernels.gemm`.

    On a CPU without bf16 arithmetic (`kernels.native_bf16` false), PyTorch's bf16 GEMM emulates
    it several times slower than fp32: there a bf16 layer (`widen`) multiplies many rows in fp32,
    on fp32 copies of `_CHUNK_ROWS` weight rows at a time, and rounds each output to bf16 once.
    The products of bf16 numbers are exact in fp32 and oneDNN sums them in fp32 too, so this is
    the same arithmetic, only faster (and the GELU then runs before the rounding, not after).

    Inference only, on CPU: the weights are plain tensors, not Parameters, so `state_dict`,
    `num_params`, `.to()` and `copy.deepcopy` (of a packed copy) do not see them, and no
    gradient flows to them: differentiate the model itself, not its inference form. Under a
    torch.func transform or forward-mode AD a layer runs `F.linear` on its plain weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, matvec: bool, packed: bool,
                 gelu: bool = False, widen: bool = False):
        super().__init__()
        self.weight = weight.detach().contiguous()  # (out, in), shares the model's storage
        self.bias = None if bias is None else bias.detach()
        self.matvec = matvec
        if matvec:  # checked once here; forward checks what varies (see kernels.matvec_unchecked)
            kernels.matvec(torch.zeros(1, self.weight.shape[1], dtype=self.weight.dtype), self.weight, self.bias)
        self.widen = widen and self.weight.dtype == torch.bfloat16
        # fp32: MKL's own packed copy on Intel CPUs (oneDNN's fp32 GEMM was 12% slower than F.linear's at
        # 4096 rows on a Xeon); oneDNN's packed copy where its GEMM is the faster; none where OpenBLAS's
        # is (it multiplies the plain weight, `kernels.linear`); see kernels.gemm
        fp32 = self.weight.dtype == torch.float32
        self.mkl = (kernels.MKLPackedLinear(self.weight, self.bias)
                    if packed and fp32 and kernels.mkl_packing_works() and kernels.gemm() == "mkl" else None)
        self.packed = (torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)  # opaque
                       if packed and not self.widen and self.mkl is None
                       and not (fp32 and kernels.gemm() == "openblas") else None)
        self.gelu = gelu  # followed by the tanh GELU (for the packed GEMM, fused into it: one pass less)

    @property
    def plain_product(self) -> bool:
        """Whether `forward(x)` is `F.linear(x, weight, bias)` (up to float rounding): the model may
        then add the bias elsewhere (see gpt2kit.model.plain_product). Not for a subclass that
        overrides forward (an adapter, say), whose forward may add more."""
        return not self.gelu and not self.widen and type(self).forward is _CPULinear.forward

    @property
    def folds_gelu(self) -> bool:
        """Whether a following GELU costs no extra pass when done here (`gelu=True`): in the packed
        GEMM, as the widened product is rounded, or, fp32, with the bias in `kernels.bias_gelu`."""
        return (self.packed is not None or self.widen
                or (self.weight.dtype == torch.float32 and self.bias is not None and kernels.available(torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        rows, n_in = flat.shape
        out = self.weight.shape[0]
        if kernels.forward_ad_active():  # vmap/jvp wrappers have no data pointers for MKL or oneDNN
            y = F.linear(flat, self.weight, self.bias)
            y = F.gelu(y, approximate="tanh") if self.gelu else y
        elif (self.matvec and 1 <= rows <= kernels.MAX_ROWS and n_in == self.weight.shape[1]
                and flat.dtype == self.weight.dtype and flat.is_cpu):  # decoding
            y = kernels.matvec_unchecked(flat.contiguous(), self.weight, self.bias)
            y = kernels.gelu(y) if self.gelu else y
        elif self.mkl is not None and flat.dtype == torch.float32 and n_in == self.mkl.in_features and flat.is_cpu:
            y = self.mkl(flat)  # a prompt, fp32
            y = kernels.gelu(y) if self.gelu else y
        elif self.packed is not None:  # a prompt; the GEMM applies the GELU as it writes
            post_op = ("gelu", [], "tanh") if self.gelu else ("none", [], "")
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, *post_op)
        elif self.widen and flat.dtype == self.weight.dtype:  # (another dtype: F.linear's error below)
            y = self._widened(flat)
        elif self.gelu and kernels.bias_folds(flat, self.bias):  # the bias added in the GELU's pass
            y = kernels.linear(flat, self.weight)
            if torch.is_grad_enabled() and y.requires_grad:
                y = kernels.bias_gelu(y, self.bias)
            else:  # over the fresh product itself, as the model's MLP does: one (N, 4C) tensor, not two
                y = kernels.bias_gelu_(y, self.bias)
        else:
            y = kernels.linear(flat, self.weight, self.bias)  # not MKL's GEMM for a prompt where another is faster
            y = kernels.gelu(y) if self.gelu else y
        return y.view(*x.shape[:-1], out)  # (..., out)

    def _widened(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat.float()  # (N, in)
        out = self.weight.shape[0]
        y = torch.empty(x.shape[0], out, dtype=flat.dtype)  # (N, out)
        for start in range(0, out, _CHUNK_ROWS):
            w = self.weight[start:start + _CHUNK_ROWS].float()
            b = None if self.bias is None else self.bias[start:start + _CHUNK_ROWS].float()
            part = kernels.linear(x, w, b)  # gemm()'s GEMM
            y[:, start:start + len(w)] = kernels.gelu(part) if self.gelu else part  # rounded once
        return y


_CHUNK_ROWS = 4096  # weight rows widened at a time: 12 MB of fp32 for 768 inputs


class InferenceFormError(GenerationError):
    """Saving, training or converting a model in its CPU inference form."""


def _inference_form(model: "GPT2", form: str) -> "GPT2":
    """`model` (already converted) as an `_InferenceGPT2`: still a `GPT2`, but one that refuses
    what would silently lose or ignore its converted layers."""
    model.__class__ = _InferenceGPT2
    model.inference_form = form
    return model


class _InferenceGPT2(GPT2):
    """A GPT2 whose projections `optimize_for_cpu` or `quantize_int8` replaced by packed, int8 or
    transposed copies that are not the model's Parameters: `state_dict` and `parameters()` no
    longer hold them, `.to()` would convert only the rest. So it forwards and decodes, and
    refuses, naming what to do instead, to be saved, trained or converted."""

    inference_form = "optimize_for_cpu"

    def _refuse(self, what: str, instead: str) -> InferenceFormError:
        copies = "int8" if self.inference_form == "quantize_int8" else "packed"
        return InferenceFormError(
            f"{what}: this model is an inference form ({self.inference_form}, as load_for_inference returns it: "
            f"its layers are {copies} copies, not parameters); {instead}")

    def save_pretrained(self, folder: str, tokenizer: Any = None) -> None:
        raise self._refuse("save_pretrained", "save the model that GPT2.from_pretrained loads (or the one you trained)")

    def train(self, mode: bool = True) -> "GPT2":
        if mode:
            raise self._refuse("train()", "train the model that GPT2.from_pretrained loads")
        return super().train(False)

    def to(self, *args, **kwargs) -> "GPT2":
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        weight = self.transformer.wpe.weight
        if device is not None:  # "cpu" and "cpu:0" are one device
            device = torch.device(device)
            moves = device.type != weight.device.type or None not in (device.index, weight.device.index) and \
                device.index != weight.device.index
        if (device is not None and moves) or (dtype is not None and dtype != weight.dtype):
            raise self._refuse(f".to({device or dtype})", "load it in that form instead: load_for_inference(path, "
                               "dtype=..., device=...)")
        return self

    def cpu(self) -> "GPT2":
        return self.to("cpu")

    def float(self) -> "GPT2":
        return self.to(torch.float32)

    def bfloat16(self) -> "GPT2":
        return self.to(torch.bfloat16)

    def half(self) -> "GPT2":
        return self.to(torch.float16)

    def double(self) -> "GPT2":
        return self.to(torch.float64)

    def _apply(self, fn, recurse=True):  # .cuda(), .share_memory(), ...: any other conversion
        raise self._refuse("conversion", "load it in the form you need with load_for_inference(path, dtype=..., "
                           "device=...)")

    def num_params(self, *, include_embedding: bool = True) -> int:  # its own Parameters miss the layers
        return self.config.num_params(include_embedding=include_embedding)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    try:
        w = torch.ones(4, 4, dtype=dtype)
        return bool((_CPULinear(w, None, matvec=False, packed=True)(torch.ones(20, 4, dtype=dtype)) == 4).all())
    except (RuntimeError, AttributeError):  # a torch build without oneDNN
        return False


def optimize_for_cpu(model: "GPT2", *, inplace: bool = False) -> "GPT2":
    """The model with its projections and tied output layer in the forms CPU inference runs
    fastest (`_CPULinear`): gpt2kit's matrix-vector kernel for decoding where it builds, and
    packed weights for prompts (oneDNN's for every layer in bf16; MKL's for the output layer in
    fp32, when the kernel is there: this keeps a second, packed copy of those weights); on a CPU
    without bf16 arithmetic, bf16 prompts multiply in fp32 and attention runs in fp32. Without the kernel,
    fp32 weights are stored input-major for decoding instead (`_InputMajorLinear`). Inference
    only: the result refuses `save_pretrained`, `train()` and dtype/device conversions (see
    `_InferenceGPT2`). Logits equal the original's up to float rounding. A model in another dtype
    or on a GPU is returned as is."""
    import copy

    weight = model.transformer.wte.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return model
    bf16 = weight.dtype == torch.bfloat16
    widen = kernels.bf16_on_fp32_units(weight.dtype, "cpu")  # see _CPULinear
    matvec, packed = kernels.available(weight.dtype), _packing_works(weight.dtype) and not widen
    if bf16 and not (matvec or packed or widen):
        return model
    fast = model if inplace else copy.deepcopy(model)
    fast.eval()
    if matvec:  # the weights that decoding streams, on transparent huge pages (see kernels.huge_page_copies)
        params = {id(p): p for m in fast.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
        params = [*params.values(), fast.transformer.wte.weight]
        with torch.no_grad():
            for p, moved in zip(params, kernels.huge_page_copies([p.detach() for p in params])):
                p.data = moved
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, _CPULinear(child.weight, child.bias, matvec=matvec, packed=bf16 and packed,
                                                 widen=widen) if matvec or bf16 else _InputMajorLinear(child))
    for block in fast.transformer.h:  # fold the MLP's GELU into its first projection (applied as it writes)
        if widen:  # SDPA's bf16 kernel multiplies in bf16 too
            block.attn.compute_dtype = torch.float32
        c_fc = block.mlp.c_fc
        if isinstance(c_fc, _CPULinear) and c_fc.folds_gelu and not c_fc.gelu:
            c_fc.gelu, block.mlp.act = True, torch.nn.Identity()
    if matvec or bf16:  # the output layer reads the embedding's first vocab_size rows as they are
        head = _CPULinear(fast.transformer.wte.weight[: fast.config.vocab_size], None, matvec=matvec, packed=packed,
                          widen=widen)
    else:
        embedding = _InputMajorEmbedding(fast.transformer.wte.weight, fast.config.vocab_size)
        fast.transformer.wte = embedding
        head = _InputMajorHead(embedding)
    fast.lm_head = head
    for module in list(fast.modules()):  # eval mode: a dropout is an identity, and a cheaper call
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(module, name, torch.nn.Identity())
    return _inference_form(fast, "optimize_for_cpu")


def quantize_int8(model: "GPT2") -> "GPT2":
    """A copy of `model` whose Linear layers, the output layer included, hold int8 weights
    (dynamic quantization: activations are quantized on the fly per batch). On CPU, batch-1
    decoding reads a quarter of the fp32 bytes per token; logits move by ~1e-2, not exactly
    the fp32 model's. Inference only."""
    import copy

    from torch import nn

    qmodel = copy.deepcopy(model).float().eval()
    # the tied head is a plain matmul with the embedding: give it its own Linear to quantize
    head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
    head.weight = nn.Parameter(qmodel.transformer.wte.weight[: model.config.vocab_size].detach().clone())
    qmodel.lm_head = head
    for m in qmodel.modules():  # quantize_dynamic swaps exact nn.Linear types only
        if isinstance(m, nn.Linear):
            m.__class__ = nn.Linear
    with warnings.catch_warnings():  # torch.ao announces its move to torchao; the API still works
        warnings.simplefilter("ignore")
        return _inference_form(torch.ao.quantization.quantize_dynamic(qmodel, {nn.Linear}, dtype=torch.qint8),
                               "quantize_int8")


def load_for_inference(name_or_path: str, *, dtype: str | None = None, device: str | None = None,
                       quantize: str | None = None) -> tuple["GPT2", "Tokenizer"]:
    """The model and tokenizer of a checkpoint (any folder or name `GPT2.from_pretrained` reads),
    in eval mode; `dtype` "float32" | "bfloat16" | "float16" (default: as stored, except that
    float16 weights run in float32 on a CPU, which has no float16 arithmetic), `quantize` None |
    "int8" (CPU). On a CPU the model is an inference form (`optimize_for_cpu`, `quantize_int8`):
    it runs and generates, but to save, train or convert, load with `GPT2.from_pretrained`."""
    from .model import GPT2
    from .tokenizer import Tokenizer

    if dtype is not None and dtype not in _DTYPES:
        raise GenerationError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    if quantize not in (None, "int8"):
        raise GenerationError(f"quantize: expected 'int8' (or nothing), got {quantize!r}")
    model = GPT2.from_pretrained(name_or_path, dtype=_DTYPES[dtype] if dtype else "auto", device=device).eval()
    weight = model.transformer.wte.weight
    if dtype is None and weight.dtype == torch.float16 and weight.device.type == "cpu":
        model = model.float()  # (PyTorch's CPU float16 products ran 4x slower than float32 here)
    try:
        tokenizer = Tokenizer.from_pretrained(name_or_path)
    except GPT2KitError:
        if model.config.vocab_size != 50257:
            raise
        log.warning("%s holds no tokenizer files: using GPT-2's released vocabulary", name_or_path)
        tokenizer = Tokenizer.gpt2()
    if quantize == "int8":
        model = quantize_int8(model)
    else:
        model = optimize_for_cpu(model, inplace=True)
    return model, tokenizer


class _CallableModule(types.ModuleType):
    """This module, which calling runs `generate`. A package attribute that shares its name with
    a submodule is the submodule as soon as the import system has loaded it (and `import
    gpt2kit.generate as G` reads that same attribute), so `from gpt2kit import generate` can only
    be both the function and the module if the module can be called."""

    def __call__(self, *args, **kwargs) -> list[Completion]:
        return generate(*args, **kwargs)

    def __reduce__(self):  # pickled by name (a process pool's target), as the function would be
        return importlib.import_module, (self.__name__,)


__signature__ = inspect.signature(generate)  # what help() and IDEs show for the callable module
sys.modules[__name__].__class__ = _CallableModule
