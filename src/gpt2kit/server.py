"""An OpenAI-compatible completions server (FastAPI + uvicorn).

Endpoints: `POST /v1/completions` (the legacy completions API: prompt as string, list of strings,
token ids or lists of token ids; max_tokens, temperature, top_p, n, stop, seed, logprobs, echo,
stream as server-sent events ending in `data: [DONE]`, presence_penalty, frequency_penalty,
logit_bias, best_of; `top_k`, `min_p` and `repetition_penalty` as extensions), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
`POST /v1/chat/completions` answers a 404 that points to the completions API (no chat format).

Concurrency: each request runs in a worker thread (torch releases the GIL in its kernels), at most
`max_concurrency` at once; the rest wait in line, and past `max_waiting` the server answers 429.
The event loop only moves events between the worker and the client, so it never blocks. A
client that goes away, streaming or not, sets the request's cancel flag: its worker stops at
the next token and frees the slot.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 400 for a
bad request (wrong type, out of range, prompt or max_tokens past the context, prompts x n x
(prompt + max_tokens) past `max_batch_tokens`, which bounds one request's memory), 401 for a missing
or wrong API key, 404 for an unknown model.
"""
from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Awaitable, Iterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .generate import TokenEvent, iter_generate, prompt_logprobs, sampling_params
from .tokenizer import InvalidTextError

if TYPE_CHECKING:
    from .model import GPT2
    from .tokenizer import Tokenizer

__all__ = ["create_app", "CompletionRequest", "APIError", "default_max_batch_tokens", "available_memory"]

log = logging.getLogger(__name__)

MAX_CHOICES = 128  # completions per request (prompts x n): they decode as one batch


# Of the memory free at startup, the share the token budget plans on: the rest is headroom for
# what the count below leaves out (a padded prompt's attention scores where no fused kernel takes
# the mask, the allocator's fragmentation and caches, the server's own growth).
MEMORY_FRACTION = 0.5
# Bytes per vocabulary entry of one row's logits and sampling buffers, alive together at a step:
# the logits and their float32 copy, top_p's sorted copy, int64 order, probabilities and sums,
# the masks, log-probabilities for `logprobs`; with every option on, the penalties' counts and
# their float copies, the bias row and min_p's log-probabilities too (measured: a step with all
# of them peaks 41 bytes above its logits and counts, one with top_p and top_k 33)
ROW_BYTES_PER_VOCAB = 56
_MEMINFO = "/proc/meminfo"
_CGROUP = "/sys/fs/cgroup"  # (v2) a container's limit, which MemAvailable does not show


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def available_memory(device: "torch.device | str") -> int | None:
    """Bytes that tensors on `device` may still take, or None where the system does not tell.
    CUDA: the driver's free memory and what torch's allocator holds unused; elsewhere (the CPU,
    and MPS, whose memory is the system's) MemAvailable, within a cgroup's limit."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = None
    for line in (_read(_MEMINFO) or "").splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024  # kB
    if available is None:  # no /proc, or a kernel before 3.14: the pages the OS calls free
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, KeyError):  # (macOS has no SC_AVPHYS_PAGES)
            return None
    limit, used = _read(os.path.join(_CGROUP, "memory.max")), _read(os.path.join(_CGROUP, "memory.current"))
    if limit and used and limit.strip().isdigit() and used.strip().isdigit():
        available = min(available, max(int(limit) - int(used), 0))
    return available


def default_max_batch_tokens(model: "GPT2", max_concurrency: int = 1, *, memory: int | None = None) -> int:
    """Token positions one request may hold at once unless told otherwise: `MEMORY_FRACTION` of
    the memory available on the model's device (`memory`, default `available_memory`; read once
    the weights are there) shared by `max_concurrency` requests, each of which may hold its
    budget at once, less the sampling buffers of the most rows a request can have, over the
    bytes a position holds: its keys and values in every layer in the KV cache's dtype, and one
    layer's activations while the prompt is read. At least one whole-context completion, at most
    what the largest request can ask for (`MAX_CHOICES` whole contexts). Where the memory is not
    known: a KV cache the size of the model's weights (from the shapes, not the parameters: an
    inference form keeps its weights outside them)."""
    c = model.config
    most = MAX_CHOICES * c.n_ctx
    if memory is None:
        memory = available_memory(model.transformer.wte.weight.device)
    if memory is None:
        return min(most, max(c.n_ctx, c.num_params() // (2 * c.n_layer * c.n_embd)))
    # the dtype new_kv_cache picks (float32 on CPU for a half-precision model): no wider than that
    # are the activations, which are the model's dtype
    itemsize = model.new_kv_cache(1, 1).k.element_size()
    # keys + values per layer; activations of one layer: residual, layer norm, q/k/v, attention
    # output, the MLP's 4x-wide hidden layer and its GELU
    per_position = (2 * c.n_layer + 12) * c.n_embd * itemsize
    share = memory * MEMORY_FRACTION / max_concurrency - MAX_CHOICES * c.vocab_size * ROW_BYTES_PER_VOCAB
    return min(most, max(c.n_ctx, int(share // per_position)))


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


# Fields whose explicit null means "the default", as OpenAI's API reads it (its client sends
# null for an argument passed as None); max_tokens' null keeps its own meaning (to the context).
_NULL_IS_DEFAULT = ("prompt", "temperature", "top_p", "n", "stream", "echo", "repetition_penalty",
                    "presence_penalty", "frequency_penalty")


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions. Unknown fields are refused rather than silently ignored;
    OpenAI's field that this server does not implement (suffix: GPT-2 only continues text) is
    accepted at its no-op values only (null or ""), which clients send by default."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator takes
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # token id (as a string: JSON's keys are) -> a value added to its logit, as OpenAI's API takes it
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # completions generated per prompt, of which the n with the highest mean log-probability per
    # token are returned (OpenAI's; null or 1: n, as clients that always send best_of 1 mean it)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in _NULL_IS_DEFAULT)}
        return data

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field asking for something this server does not do."""
        if self.suffix:
            return "suffix", "suffix: not supported by this server (only null or \"\")"
        return None

    @property
    def counted_by(self) -> str:
        """The field that says how many completions are generated per prompt: n or best_of."""
        return "n" if self.best_of in (None, 1) else "best_of"

    @property
    def candidates(self) -> int:
        """Completions generated per prompt: best_of, or n."""
        return self.n if self.best_of in (None, 1) else self.best_of


# ----------------------------------------------------------------------------- one request's work

def _token_str(tokenizer: "Tokenizer", token_id: int) -> str:
    """A token as text; a token holding part of a UTF-8 character is shown as OpenAI does."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class _Choice:
    """One choice being assembled: its text and, when asked, OpenAI's logprobs object."""

    text: str = ""
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    # log p of the tokens sampled (<|endoftext|> included) and their count: how best_of ranks
    logprob_sum: float = 0.0
    scored_tokens: int = 0

    def logprobs_json(self, start: int = 0) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


@dataclass
class _Job:
    """A validated request: token ids per prompt and everything `iter_generate` needs."""

    request: CompletionRequest
    prompts: list[list[int]]  # what the model is conditioned on: <|endoftext|> for an empty prompt
    sent: list[list[int]]  # what the client sent, token by token: what `echo` returns
    max_tokens: int
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    admitted: bool = False  # counted in _Engine.admitted until it joins the line (or is dropped)

    @property
    def n_choices(self) -> int:
        """Completions generated: prompts x best_of (or n)."""
        return len(self.prompts) * self.request.candidates


class _Offsets:
    """Character offsets of successive tokens in a text, decoding bytes incrementally."""

    def __init__(self, start: int = 0):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.position = start

    def next(self, raw: bytes) -> int:
        here = self.position
        self.position += len(self._decoder.decode(raw))
        return here


class _Engine:
    """The model, the tokenizer, and the slots that bound how many requests run at once."""

    def __init__(self, model: "GPT2", tokenizer: "Tokenizer", name: str, max_concurrency: int, max_waiting: int,
                 max_batch_tokens: int):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_batch_tokens = max_batch_tokens
        self.n_ctx = model.config.n_ctx
        # A token spells at most this many bytes of text: a longer text cannot fit the context,
        # and is refused without tokenizing it in the event loop (megabytes stall every request).
        self.max_token_bytes = max([len(t) for t in tokenizer.mergeable_ranks]
                                   + [len(t.encode("utf-8")) for t in tokenizer.special_tokens])
        self.max_concurrency, self.max_waiting = max_concurrency, max_waiting
        self.pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="gpt2kit-gen")
        self.active = 0
        self.waiting = 0
        # Requests let in but not yet in line: a burst's requests all pass `plan` before the
        # first of them reaches `run`, so the limit counts them too.
        self.admitted = 0
        self._slots: asyncio.Semaphore | None = None

    # -- validation

    def plan(self, req: CompletionRequest) -> _Job:
        """The request checked and tokenized, holding a place in the line (see `drop_admission`)."""
        texts = self._checked_prompts(req)
        return self._admit(req, self._prompt_ids(texts))

    async def plan_async(self, req: CompletionRequest) -> _Job:
        """`plan` for the event loop: the prompts are tokenized in a worker thread (the tokenizer
        releases the GIL), since megabytes of prompts that pass the checks before tokenizing would
        stall every other client for as long; what may be refused without tokenizing is refused first."""
        texts = self._checked_prompts(req)
        if any(isinstance(t, str) for t in texts):
            return self._admit(req, await asyncio.to_thread(self._prompt_ids, texts))
        return self._admit(req, self._prompt_ids(texts))

    def _checked_prompts(self, req: CompletionRequest) -> list[str | list[int]]:
        """The request's prompts, after every check that needs no tokenizing."""
        if req.model != self.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        unsupported = req.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0])
        self._check_logit_bias(req.logit_bias)
        if req.candidates < req.n:
            raise APIError(400, f"best_of: must be at least n ({req.n}), got {req.best_of}", param="best_of")
        if req.stream and req.candidates > req.n:  # the best are known only once all are done
            raise APIError(400, "best_of: cannot stream when best_of > n", param="best_of")
        if req.stream_options is not None and not req.stream:  # as OpenAI answers
            raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
        texts = self._prompt_list(req.prompt)
        # refused before anything is tokenized (on the event loop): what is sure not to fit
        what = req.counted_by
        if len(texts) * req.candidates > MAX_CHOICES:
            raise APIError(400, f"{what}: {len(texts)} prompts x {what}={req.candidates} asks for more than "
                                f"{MAX_CHOICES} completions in one request", param=what)
        for text in texts:
            if isinstance(text, str):
                self._check_text_can_fit(text)
        at_least = max(map(self._at_least_tokens, texts))
        if req.max_tokens and at_least + req.max_tokens > self.n_ctx:
            # past the context whatever the tokens: said as such before the batch check below, whose
            # advice (a larger --max-batch-tokens) could not help
            self._context_exceeded(at_least, req.max_tokens, at_least=any(isinstance(t, str) for t in texts))
        if req.max_tokens:
            self._check_batch_tokens(len(texts), req.candidates, at_least, req.max_tokens, at_least=True,
                                     what=req.counted_by)
        elif req.max_tokens is None and at_least < self.n_ctx:
            # null: every row decodes to the end of the context, rows x n_ctx positions whatever
            # the prompts' lengths; unless a prompt may already fill it (then nothing is decoded,
            # or the prompt is too long: both are told exactly once it is tokenized)
            self._check_to_the_context(len(texts), req.candidates, req.counted_by)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop: expected up to 4 non-empty strings", param="stop")
        self._check_not_busy()
        return texts

    def _check_logit_bias(self, bias: dict[str, float] | None) -> None:
        n_vocab = min(self.tokenizer.n_vocab, self.model.config.vocab_size)
        for key in bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) < 10 and int(key) < n_vocab):
                shown = key if len(key) <= 20 else key[:20] + "..."
                raise APIError(400, f"logit_bias: {shown!r} is not a token id; expected integers from 0 to "
                                    f"{n_vocab - 1} as keys", param="logit_bias")

    def _check_not_busy(self) -> None:
        if self.active + self.waiting + self.admitted >= self.max_concurrency + self.max_waiting:
            raise APIError(429, f"the server is busy ({self.waiting + self.admitted} requests waiting); retry later",
                           type="server_busy", code="rate_limit_exceeded")

    def _admit(self, req: CompletionRequest, sent: list[list[int]]) -> _Job:
        """The checks that need the prompts' tokens, then a place in the line: on the event loop
        (the admission count is not locked)."""
        # GPT-2 was trained with <|endoftext|> between documents: an empty prompt starts a new one
        prompts = [ids or [self.tokenizer.eot_token] for ids in sent]
        longest = max(len(p) for p in prompts)
        max_tokens = max(self.n_ctx - longest, 0) if req.max_tokens is None else req.max_tokens
        if longest + max_tokens > self.n_ctx or longest > self.n_ctx:
            self._context_exceeded(longest, max_tokens)
        self._check_batch_tokens(len(prompts), req.candidates, longest, max_tokens, what=req.counted_by)
        self._check_not_busy()  # again: others may have been admitted while this one was tokenized
        self.admitted += 1
        return _Job(req, prompts, sent, max_tokens, admitted=True)

    def _context_exceeded(self, longest: int, max_tokens: int, *, at_least: bool = False) -> None:
        """OpenAI's answer to a prompt + completion past the context. `at_least`: `longest` is a
        lower bound (the prompts are not tokenized yet)."""
        bound = "at least " if at_least else ""
        raise APIError(400, f"This model's maximum context length is {self.n_ctx} tokens, however you "
                            f"requested {bound}{longest + max_tokens} tokens ({bound}{longest} in your prompt; "
                            f"{max_tokens} for the completion). Please reduce your prompt or max_tokens.",
                       param="max_tokens" if longest < self.n_ctx else "prompt", code="context_length_exceeded")

    def drop_admission(self, job: _Job) -> None:
        """The job joined the line, or will never run: it no longer holds a place. Idempotent."""
        if job.admitted:
            job.admitted = False
            self.admitted -= 1

    def _check_batch_tokens(self, n_prompts: int, n: int, longest: int, max_tokens: int, *,
                            at_least: bool = False, what: str = "n") -> None:
        """Refuse a request whose decoding batch would hold more than `max_batch_tokens` positions:
        its prompts x n rows share one KV cache of (longest prompt + max_tokens) positions per row
        (`generate._Window`), allocated at once; too large a one would exhaust the memory of
        every client's server. max_tokens 0 decodes nothing: the echo scores prompts one by one.
        `at_least`: `longest` is a lower bound (the prompts are not tokenized yet). `what`: the
        field that asked for n completions per prompt (n, or best_of)."""
        rows = n_prompts * n
        need = rows * (longest + max_tokens)
        if max_tokens == 0 or need <= self.max_batch_tokens:
            return
        if n > 1:
            param = what
        elif n_prompts > 1 or longest >= self.max_batch_tokens:
            param = "prompt"
        else:
            param = "max_tokens"
        bound = "at least " if at_least else ""
        raise APIError(400, f"{param}: this request needs {rows} completion{'s' if rows > 1 else ''} "
                            f"({n_prompts} prompt{'s' if n_prompts > 1 else ''} x {what}={n}) x ({bound}{longest} "
                            f"{'longest ' if n_prompts > 1 else ''}prompt + "
                            f"{max_tokens} completion tokens) = {bound}{need:,} token positions at once, and this "
                            f"server allows {self.max_batch_tokens:,} per request. Reduce {what}, the prompts or max_tokens, "
                            f"or start the server with a larger --max-batch-tokens (create_app(max_batch_tokens=...))",
                       param=param, code="max_batch_tokens_exceeded")

    def _check_to_the_context(self, n_prompts: int, n: int, what: str = "n") -> None:
        """`_check_batch_tokens` for max_tokens null, before anything is tokenized."""
        rows = n_prompts * n
        need = rows * self.n_ctx
        if need <= self.max_batch_tokens:
            return
        param = what if n > 1 else "prompt" if n_prompts > 1 else "max_tokens"
        raise APIError(400, f"{param}: max_tokens null completes each of this request's {rows} completion"
                            f"{'s' if rows > 1 else ''} ({n_prompts} prompt{'s' if n_prompts > 1 else ''} x {what}={n}) "
                            f"to the end of the {self.n_ctx:,}-token context: {need:,} token positions at once, and "
                            f"this server allows {self.max_batch_tokens:,} per request. Give max_tokens, reduce {what} or "
                            f"the prompts, or start the server with a larger --max-batch-tokens "
                            f"(create_app(max_batch_tokens=...))", param=param, code="max_batch_tokens_exceeded")

    @staticmethod
    def _prompt_list(prompt: Any) -> list[str | list[int]]:
        """The request's prompts, each a string or a list of token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: expected a non-empty string, list of strings or list of token ids",
                           param="prompt")
        return prompt

    def _at_least_tokens(self, prompt: str | list[int]) -> int:
        """Tokens the prompt conditions on, at least, without tokenizing it (an empty one: 1)."""
        if not isinstance(prompt, str):
            return max(len(prompt), 1)
        return max(-(-len(prompt.encode("utf-8", errors="surrogatepass")) // self.max_token_bytes), 1)

    def _prompt_ids(self, prompt: list[str | list[int]]) -> list[list[int]]:
        rows = []
        # a model with fewer tokens than its tokenizer cannot embed the others (an IndexError, a 500)
        n_vocab = min(self.tokenizer.n_vocab, self.model.config.vocab_size)
        for i, p in enumerate(prompt):
            where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                try:
                    ids = self.tokenizer.encode(p, allowed_special="all")
                except InvalidTextError as e:  # a lone surrogate, which JSON can escape
                    raise APIError(400, f"{where}: {e}", param="prompt") from None
                if ids and max(ids) >= n_vocab:
                    raise APIError(400, f"{where}: its text encodes to token id {max(ids)}, but the model has "
                                        f"{self.model.config.vocab_size} tokens", param="prompt")
            else:
                bad = [t for t in p if not 0 <= t < n_vocab]
                if bad:
                    raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                        f"[0, {n_vocab})", param="prompt")
                ids = list(p)
            rows.append(ids)
        return rows

    def _check_text_can_fit(self, text: str) -> None:
        at_least = self._at_least_tokens(text)
        if at_least > self.n_ctx:
            n_bytes = len(text.encode("utf-8", errors="surrogatepass"))
            raise APIError(400, f"This model's maximum context length is {self.n_ctx} tokens, however your prompt "
                                f"is {n_bytes:,} bytes, at least {at_least:,} tokens. Please reduce your prompt.",
                           param="prompt", code="context_length_exceeded")

    # -- running

    def _work(self, job: _Job, cancel: threading.Event) -> Iterator[tuple[str, Any]]:
        """Runs in a worker thread: ("echo", (index, prompt tokens, logprobs, tops)) items, then
        ("token", TokenEvent) items."""
        req = job.request
        if req.echo:
            for p, ids in enumerate(job.sent):
                if cancel.is_set():  # the client went away: one forward pass per prompt is left undone
                    return
                scored = (prompt_logprobs(self.model, ids, req.logprobs or 0)
                          if req.logprobs is not None and ids else None)
                for j in range(req.candidates):
                    yield "echo", (p * req.candidates + j, ids, scored)
        if job.max_tokens == 0:
            for i in range(job.n_choices):
                yield "token", TokenEvent(i, "", None, None, None, "length")
            return
        params = sampling_params(temperature=req.temperature, top_k=1 if req.top_p == 0 else req.top_k,
                                 top_p=req.top_p if 0 < req.top_p < 1 else None,  # 0: the top token only
                                 min_p=req.min_p,
                                 repetition_penalty=req.repetition_penalty, do_sample=req.temperature > 0,
                                 presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                 logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()})
        for ev in iter_generate(self.model, self.tokenizer, job.prompts, max_new_tokens=job.max_tokens,
                                params=params, stop=req.stop, seed=req.seed, n=req.candidates,
                                top_logprobs=0 if req.logprobs is None and req.candidates > req.n else req.logprobs,
                                cancel=cancel):
            yield "token", ev
            if cancel.is_set():
                return

    async def run(self, job: _Job) -> AsyncIterator[tuple[str, Any]]:
        """Wait for a slot, run the job in a worker thread, and relay its items."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        self.drop_admission(job)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def release() -> None:
            self.active -= 1
            self._slots.release()

        def work() -> None:
            def send(item: Any) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            try:
                for item in self._work(job, cancel):
                    send(item)
            except BaseException as e:  # reported to the client, the server goes on
                send(("error", e))
            finally:
                try:
                    loop.call_soon_threadsafe(release)
                    send(("done", None))
                except RuntimeError:  # the event loop is gone: the server is shutting down
                    pass

        loop.run_in_executor(self.pool, work)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "done":
                    return
                if kind == "error":
                    if isinstance(item, APIError):
                        raise item
                    log.error("generation failed: %r", item, exc_info=item)
                    raise APIError(500, f"generation failed: {item}", type="server_error")
                yield kind, item
        finally:
            cancel.set()  # the client went away (or we are done): stop at the next token

    # -- assembling OpenAI's response objects

    def _echo(self, choice: _Choice, ids: list[int], scored, want_logprobs: bool) -> str:
        text = self.tokenizer.decode(ids)
        choice.text += text
        if want_logprobs and scored is not None:
            lps, tops = scored
            offsets = _Offsets()
            for t, lp, top in zip(ids, lps, tops):
                choice.tokens.append(_token_str(self.tokenizer, t))
                choice.token_logprobs.append(lp)
                choice.top_logprobs.append(None if lp is None else self._top(top or {}, t, lp))
                choice.text_offset.append(offsets.next(self.tokenizer.token_bytes(t)))
        return text

    def _top(self, top: dict[int, float], chosen: int, logprob: float) -> dict[str, float]:
        """The k best alternatives and, as OpenAI documents ("up to logprobs+1 elements"), the
        chosen token: a client may look its own token up there (with logprobs=0, it alone)."""
        return {_token_str(self.tokenizer, t): lp for t, lp in {**top, chosen: logprob}.items()}

    def _add_token(self, choice: _Choice, offsets: _Offsets, ev: TokenEvent, want_logprobs: bool) -> None:
        choice.text += ev.text
        if ev.logprob is not None:
            choice.logprob_sum += ev.logprob
            choice.scored_tokens += 1
        if ev.token_id is None:
            return
        choice.completion_tokens += 1
        if want_logprobs:
            choice.tokens.append(_token_str(self.tokenizer, ev.token_id))
            choice.token_logprobs.append(ev.logprob)
            choice.top_logprobs.append(self._top(ev.top_logprobs or {}, ev.token_id, ev.logprob))
            choice.text_offset.append(offsets.next(self.tokenizer.token_bytes(ev.token_id)))

    def _usage(self, job: _Job, choices: list[_Choice]) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in job.prompts)
        completion_tokens = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _offsets(self, job: _Job) -> list[_Offsets]:
        """Where each choice's text_offset counts from: as OpenAI's API does, the start of the
        prompt's text, also when the prompt is not echoed (an echo then advances it)."""
        if job.request.echo:
            return [_Offsets() for _ in range(job.n_choices)]
        lengths = [len(self.tokenizer.decode(ids)) for ids in job.sent] if job.request.logprobs is not None else None
        return [_Offsets(lengths[i // job.request.candidates] if lengths else 0) for i in range(job.n_choices)]

    async def complete(self, job: _Job) -> dict[str, Any]:
        want = job.request.logprobs is not None
        choices = [_Choice() for _ in range(job.n_choices)]
        offsets = self._offsets(job)
        async for kind, item in self.run(job):
            if kind == "echo":
                index, ids, scored = item
                offsets[index].position += len(self._echo(choices[index], ids, scored, want))
            else:
                self._add_token(choices[item.index], offsets[item.index], item, want)
                if item.finish_reason:
                    choices[item.index].finish_reason = item.finish_reason
        best = _best(choices, job.request.candidates, job.request.n)
        return {
            "id": job.id, "object": "text_completion", "created": job.created, "model": self.name,
            "choices": [{"text": c.text, "index": i, "logprobs": c.logprobs_json() if want else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(best)],
            "usage": self._usage(job, choices),  # every candidate's tokens, as OpenAI counts them
        }

    async def stream(self, job: _Job) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, then `data: [DONE]`."""
        want = job.request.logprobs is not None
        opts = job.request.stream_options
        usage = opts is not None and opts.include_usage
        choices = [_Choice() for _ in range(job.n_choices)]
        offsets = self._offsets(job)

        def chunk(index: int, text: str, finish_reason: str | None, start: int) -> str:
            c = choices[index]
            body = {"id": job.id, "object": "text_completion", "created": job.created, "model": self.name,
                    "choices": [{"text": text, "index": index,
                                 "logprobs": c.logprobs_json(start) if want else None,
                                 "finish_reason": finish_reason}]}
            if usage:  # OpenAI: null on every chunk but the last, which has the totals
                body["usage"] = None
            return _sse(body)

        try:
            async with contextlib.aclosing(self.run(job)) as items:
                async for kind, item in items:
                    if kind == "echo":
                        index, ids, scored = item
                        start = len(choices[index].tokens)
                        text = self._echo(choices[index], ids, scored, want)
                        offsets[index].position += len(text)
                        yield chunk(index, text, None, start)
                        continue
                    c = choices[item.index]
                    start = len(c.tokens)
                    self._add_token(c, offsets[item.index], item, want)
                    if item.text or item.finish_reason or len(c.tokens) > start:
                        yield chunk(item.index, item.text, item.finish_reason, start)
            if usage:
                yield _sse({"id": job.id, "object": "text_completion", "created": job.created,
                            "model": self.name, "choices": [], "usage": self._usage(job, choices)})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


def _best(choices: list[_Choice], candidates: int, n: int) -> list[_Choice]:
    """Each prompt's n candidates with the highest mean log-probability per sampled token (ties:
    the earlier one), in that order; all of them, in order, when there is nothing to choose."""
    if candidates == n:
        return choices
    best = []
    for start in range(0, len(choices), candidates):
        group = choices[start:start + candidates]
        ranked = sorted(range(candidates), key=lambda i: -group[i].logprob_sum / max(group[i].scored_tokens, 1))
        best += [group[i] for i in ranked[:n]]
    return best


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its event generator as soon as the response ends, also
    when the client went away mid-stream: that stops the worker and frees the slot now rather
    than whenever the abandoned generator gets garbage-collected. `on_close` runs then too (a
    generator closed before it started runs none of its own cleanup)."""

    def __init__(self, *args, on_close=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()


async def _unless_disconnected(work: Awaitable[dict[str, Any]], request: Request,
                               poll: float = 0.1) -> dict[str, Any] | Response:
    """`work`'s result, or, once the client has hung up, nothing: cancelling the work stops its
    worker at the next token and frees the slot (or its place in line), as for a stream. A client
    that timed out and retried would otherwise leave whole generations running for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return Response(status_code=499)  # nobody reads it
    finally:
        task.cancel()  # (a no-op once it is done) this handler itself cancelled: shutdown, a timeout


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _RequireKey:
    """ASGI middleware: every /v1 request needs `Authorization: Bearer <api_key>`. Checked before
    the body is read, so a wrong key gets 401 whatever the body holds, as OpenAI answers."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key.strip().encode()  # (as the client's token is read)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the path the app routes on: behind a mount or --root-path, scope["path"] keeps the prefix
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                error = APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc:  # no body, or not an object: FastAPI reads JSON only under a JSON content type
        return ("body: expected a JSON object (the completion's fields), sent with "
                "Content-Type: application/json"), None
    if e.get("type") == "extra_forbidden":
        return f"{'.'.join(loc)}: unknown or unsupported field", loc[0]
    # a union (prompt) reports one error per member: name the field and what it accepts
    if loc[0] == "prompt":
        return ("prompt: expected a string, a list of strings, a list of token ids or a list of lists of "
                "token ids"), "prompt"
    if loc[0] == "logit_bias" and len(loc) > 1:  # name the token whose value is wrong
        key = str(loc[1]) if len(str(loc[1])) <= 20 else str(loc[1])[:20] + "..."
        return f"logit_bias[{json.dumps(key)}]: {e.get('msg', 'invalid value')}", "logit_bias"
    # loc may go on with a union member's name ("stop", "str"): the field is what a client knows
    return f"{loc[0]}: {e.get('msg', 'invalid value')}", loc[0]


# ----------------------------------------------------------------------------- the app

def create_app(model: "GPT2", tokenizer: "Tokenizer", *, model_name: str = "gpt2", api_key: str | None = None,
               max_concurrency: int = 4, max_waiting: int = 256, max_batch_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving `model` under the name `model_name`. With `api_key`, every /v1
    request needs `Authorization: Bearer <api_key>`. A request whose prompts x n completions
    would hold more than `max_batch_tokens` token positions at once (each row: its longest
    prompt + max_tokens) is refused with a 400; default `default_max_batch_tokens(model,
    max_concurrency)`, from the memory free on the model's device now."""
    if api_key is not None and not api_key.strip():  # "Authorization: Bearer " with nothing after it would pass
        raise ValueError("api_key: empty; pass a key, or None for no key")
    if max_batch_tokens is None:
        max_batch_tokens = default_max_batch_tokens(model, max_concurrency)
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens: expected an integer >= 1, got {max_batch_tokens!r}")
    model.eval()
    engine = _Engine(model, tokenizer, model_name, max_concurrency, max_waiting, max_batch_tokens)
    app = FastAPI(title="gpt2kit", description="OpenAI-compatible completions for GPT-2 models")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        # a 429's Retry-After: OpenAI's clients wait that long before their automatic retry
        headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}.get(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes and methods: OpenAI's error shape too, not FastAPI's {"detail": ...}
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    if api_key is not None:
        app.add_middleware(_RequireKey, api_key=api_key)

    v1 = APIRouter(prefix="/v1")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "gpt2kit",
                "context_length": engine.n_ctx}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.active, "waiting": engine.waiting,
                "max_concurrency": engine.max_concurrency, "max_waiting": engine.max_waiting,
                "max_batch_tokens": engine.max_batch_tokens}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        job = await engine.plan_async(req)
        if req.stream:
            return _ClosingStream(engine.stream(job), media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache"}, on_close=lambda: engine.drop_admission(job))
        try:
            return await _unless_disconnected(engine.complete(job), request)
        finally:
            engine.drop_admission(job)

    @v1.post("/chat/completions")
    async def chat_completions() -> None:
        # GPT-2 was trained on plain web text, with no roles or chat template: rather than invent
        # one, say where the model's API is (a bare 404 leaves a chat client's user guessing)
        raise APIError(404, "POST /v1/chat/completions: GPT-2 models have no chat format; send the "
                       "conversation as text to POST /v1/completions", code="unsupported_endpoint")

    app.include_router(v1)
    return app
