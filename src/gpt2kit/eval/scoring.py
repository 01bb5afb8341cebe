"""One batched scorer per request type (see `requests.py`).

Work is cut into items (a unique token sequence, a sliding-window span, a unique generation
context), sorted by length so that a batch wastes little padding, and spread round-robin over
the ranks of a `torch.distributed` group; the answers are gathered on every rank. Only the
positions a request needs go through the output layer (`lm_head` is a (C x 50257) matmul per
position: for short continuations most of a full forward's cost), and log-softmax runs in
float32 whatever the model's dtype.

Work is shared where requests overlap: identical sequences run once; continuations of one
context run the context once and fork its KV cache (`KVCache.reorder`); loglikelihood requests
whose context is also a generation's context are teacher-forced inside the generation batch, so
a LAMBADA passage (word log-prob, last-token checks, two greedy decodes) costs one prompt pass.

Shape legend: B rows in a batch, L padded length, C n_embd, P selected positions, V vocab.
"""
from __future__ import annotations

import codecs
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch

from ..errors import GPT2KitError
from .requests import (Generation, GenerationResult, GreedyGeneration, Loglikelihood, LoglikelihoodResult, Request,
                       Result, RollingLoglikelihood, RollingResult)

__all__ = ["Scorer", "rolling_windows", "ScoringError"]

log = logging.getLogger(__name__)
I = TypeVar("I")
LOGIT_CHUNK = 2048  # positions per lm_head call: bounds the (P, V) float32 logits to ~400 MB


class ScoringError(GPT2KitError):
    """A request the model cannot answer (e.g. a continuation longer than the context)."""


def rolling_windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over x = [<|endoftext|>] + tokens (n_tokens targets x[1..n_tokens]).

    Each window (begin, end, n_new) feeds x[begin:end] (at most `max_len` tokens), which predicts
    x[begin+1 .. end]; its last `n_new` predictions are the targets no earlier window scored.
    Windows end every `stride` tokens, the last one at the text's end, and each holds the
    `max_len` tokens before its end (fewer only at the start): after the first window every
    target sees at least max_len - stride tokens of context, the last window's as many as
    fit, and every target is scored exactly once.

    >>> rolling_windows(10, 4, 2)
    [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    >>> rolling_windows(11, 4, 4)
    [(0, 4, 4), (4, 8, 4), (7, 11, 3)]
    """
    if not 1 <= stride <= max_len:
        raise ScoringError(f"--stride must be between 1 and the context length {max_len}, got {stride}")
    windows, scored, end = [], 0, max_len
    while scored < n_tokens:
        last = min(end, n_tokens)
        windows.append((max(0, last - max_len), last, last - scored))
        scored = last
        end += stride
    return windows


@dataclass
class _Sequence:
    """A unique input sequence for loglikelihood requests and the positions they read."""

    ids: tuple[int, ...]
    users: list[tuple[int, int, tuple[int, ...], frozenset[int]]] = field(default_factory=list)
    # (request index, first position, target ids, excluded ids)


@dataclass
class _Path:
    """A greedy decoding path shared by the generation requests it serves."""

    requests: list[int]
    tokens: list[int]
    logprobs: list[float]
    done: dict[int, GenerationResult] = field(default_factory=dict)


class Scorer:
    """Answers requests with `model` (a `gpt2kit.model.GPT2`) and `tokenizer`.

    `batch_size` rows per forward; `stride` for sliding windows (default half the context);
    `progress` shows tqdm bars (only on rank 0; a number: redrawn at most every that many
    seconds, for a log file rather than a terminal); `journal` (a `gpt2kit.eval.journal.Journal`)
    supplies the answers of batches an interrupted run finished and records the new ones."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, stride: int | None = None,
                 progress: bool | float = True, journal: Any = None):
        if batch_size < 1:
            raise ScoringError(f"--batch-size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.eot = tokenizer.eot_token
        self.n_ctx = model.config.n_ctx
        self.batch_size = batch_size
        self.stride = stride if stride is not None else max(1, self.n_ctx // 2)
        rolling_windows(0, self.n_ctx, self.stride)  # validates the stride
        self.device = model.transformer.wte.weight.device
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.progress = progress is not False and self.rank == 0
        self.redraw = 0.1 if isinstance(progress, bool) else float(progress)  # tqdm's default, or the given
        self.journal = journal
        self._maps = 0  # _map calls so far: with the batch's index, a journal key stable across reruns

    # ------------------------------------------------------------------------- dispatch

    def score(self, requests: Sequence[Request]) -> list[Result]:
        """Answers in request order, each kind batched by its own scorer."""
        kinds: dict[type, list[int]] = {}
        for i, r in enumerate(requests):
            kinds.setdefault(type(r), []).append(i)
        scorers: dict[type, Callable[[list[Any]], list[Any]]] = {
            Loglikelihood: self.loglikelihood, RollingLoglikelihood: self.rolling, GreedyGeneration: self.greedy,
            Generation: self.generation}
        out: list[Any] = [None] * len(requests)
        if Loglikelihood in kinds and GreedyGeneration in kinds:
            # Loglikelihood requests whose context is a generation's context ride along in the
            # generation's batch (fed their continuation instead of the argmax): one prompt pass.
            ll, gen = kinds.pop(Loglikelihood), kinds.pop(GreedyGeneration)
            gen_out, ll_out = self._greedy([requests[i] for i in gen], self._sequences([requests[i] for i in ll]))
            for i, res in zip(gen, gen_out):
                out[i] = res
            for j, res in ll_out:
                out[ll[j]] = res
        for kind, idx in kinds.items():
            for i, res in zip(idx, scorers[kind]([requests[i] for i in idx])):
                out[i] = res
        return out

    def _map(self, items: Sequence[I], length: Callable[[I], int], run: Callable[[list[I]], list[Any]],
             desc: str, rows: Callable[[I], int] = lambda _: 1) -> list[Any]:
        """run() over length-sorted batches of this rank's share of the items; answers gathered.
        A batch holds items until their `rows` reach the batch size."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        mine = order[self.rank::self.world]
        batches: list[list[int]] = []
        filled = self.batch_size
        for i in mine:
            if filled >= self.batch_size:
                batches.append([])
                filled = 0
            batches[-1].append(i)
            filled += rows(items[i])
        answers: dict[int, Any] = {}
        from tqdm.auto import tqdm

        call, self._maps = self._maps, self._maps + 1
        from ..generate import eval_mode

        with torch.inference_mode(), eval_mode(self.model):
            for b, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not self.progress or not batches,
                                           leave=False, mininterval=self.redraw)):
                key = f"{call}:{b}"
                done = self.journal.get(key) if self.journal is not None else None
                if done is None:
                    done = run([items[i] for i in batch])
                    if self.journal is not None:
                        self.journal.put(key, done)
                answers.update(zip(batch, done))
        if self.distributed:
            parts: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(parts, answers)
            answers = {k: v for part in parts for k, v in part.items()}
        return [answers[i] for i in range(len(items))]

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """(P, C) hidden states -> (P, V) float32 log-probabilities."""
        return torch.log_softmax(self.model.lm_head(h).float(), dim=-1)

    def _right_padded(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        # Right padding needs no attention mask: causal attention never lets a real position see
        # a later pad, and pad positions are never read.
        ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(self.device)

    # ------------------------------------------------------------------------- loglikelihood

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]:
        out: list[Any] = [None] * len(requests)
        for i, res in self._loglikelihood_sequences(self._sequences(requests)):
            out[i] = res
        return out

    def _sequences(self, requests: Sequence[Loglikelihood]) -> list[_Sequence]:
        """The unique input sequences of the requests (a request reads one of them)."""
        seqs: dict[tuple[int, ...], _Sequence] = {}
        for i, r in enumerate(requests):
            cont = tuple(r.continuation)
            if not cont:
                raise ScoringError("a loglikelihood request has an empty continuation")
            if len(cont) > self.n_ctx:
                raise ScoringError(f"a continuation of {len(cont)} tokens does not fit the context of {self.n_ctx}")
            full = (tuple(r.context) or (self.eot,)) + cont
            full = full[-(self.n_ctx + 1):]  # keep the most recent context that fits
            ids = full[:-1]
            seq = seqs.setdefault(ids, _Sequence(ids))
            seq.users.append((i, len(ids) - len(cont), cont, frozenset(r.exclude)))
        return list(seqs.values())

    def _loglikelihood_sequences(self, seqs: list[_Sequence]) -> list[tuple[int, LoglikelihoodResult]]:
        # Sequences that differ only after a common context (CBT's 10 candidates after one story)
        # share it: the context runs once, its KV cache is copied to one row per continuation.
        groups: dict[tuple[int, ...], list[_Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.ids[:min(u[1] for u in seq.users)], []).append(seq)
        single = [seq for p, g in groups.items() if len(g) == 1 or not p for seq in g]
        shared = [(p, g) for p, g in groups.items() if p and len(g) > 1]
        answers = self._map(single, lambda s: len(s.ids), self._loglikelihood_batch, "loglikelihood")
        answers += self._map(shared, lambda it: len(it[1][0].ids), self._shared_context_batch, "loglikelihood",
                             rows=lambda it: len(it[1]))
        return [pair for ans in answers for group in ans for pair in group]

    def _loglikelihood_batch(self, batch: list[_Sequence]) -> list[list[list[tuple[int, LoglikelihoodResult]]]]:
        h = self.model.hidden_states(self._right_padded([s.ids for s in batch]))  # (B, L, C)
        rows, cols, spans = [], [], []
        for b, s in enumerate(batch):
            first = min(u[1] for u in s.users)
            spans.append((len(rows), first))
            rows += [b] * (len(s.ids) - first)
            cols += range(first, len(s.ids))
        logp = self._logprobs(h[rows, cols])  # (P, V)
        return [[self._answers(s, logp[offset:offset + len(s.ids) - first], first)] for s, (offset, first) in zip(batch, spans)]

    def _shared_context_batch(self, batch: list[tuple[tuple[int, ...], list[_Sequence]]]
                              ) -> list[list[list[tuple[int, LoglikelihoodResult]]]]:
        model = self.model
        prefixes = [p for p, _ in batch]
        width = max(map(len, prefixes))
        if len(batch) > 1 and width + max(len(s.ids) - len(p) for p, seqs in batch for s in seqs) > self.n_ctx:
            # left padding to the longest context, then the longest continuation, would overrun the
            # model's context (each group alone fits: its sequences do): score the halves apart
            half = len(batch) // 2
            return self._shared_context_batch(batch[:half]) + self._shared_context_batch(batch[half:])
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W), left padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, p in enumerate(prefixes):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        tails = [(b, s.ids[len(p):]) for b, (p, seqs) in enumerate(batch) for s in seqs]
        cache = model.new_kv_cache(len(batch), width + max(len(t) for _, t in tails))
        model.hidden_states(ids.to(self.device), attention_mask=mask.to(self.device), kv_cache=cache)
        rows = [b for b, _ in tails]
        cache.reorder(torch.tensor(rows))  # one row per continuation
        tail_ids = self._right_padded([t for _, t in tails])  # (R, T)
        tail_mask = (self._right_padded([[1] * len(t) for _, t in tails]) > 0).long()
        full_mask = torch.cat([mask.to(self.device)[rows], tail_mask], dim=1)  # (R, W+T)
        h = model.hidden_states(tail_ids, attention_mask=full_mask, kv_cache=cache)  # (R, T, C)
        out: list[list[list[tuple[int, LoglikelihoodResult]]]] = [[] for _ in batch]
        r = 0
        for b, (p, seqs) in enumerate(batch):
            for s in seqs:
                first = min(u[1] for u in s.users)
                logp = self._logprobs(h[r, first - len(p):len(s.ids) - len(p)])  # (n, V)
                out[b].append(self._answers(s, logp, first))
                r += 1
        return out

    @staticmethod
    def _answers(s: _Sequence, logp: torch.Tensor, first: int) -> list[tuple[int, LoglikelihoodResult]]:
        """The results of the requests reading sequence `s`, from the log-probs of its positions
        first, first+1, ..., end."""
        answers = []
        for i, pos, target, exclude in s.users:
            lp = logp[pos - first: pos - first + len(target)]  # (n, V)
            tgt = torch.tensor(target, device=lp.device)
            pick = lp
            if exclude:
                pick = lp.clone()
                pick[:, sorted(exclude)] = -math.inf
            greedy = bool((pick.argmax(-1) == tgt).all())
            total = float(lp.gather(1, tgt[:, None]).double().sum())
            answers.append((i, LoglikelihoodResult(total, greedy, len(target))))
        return answers

    # ------------------------------------------------------------------------- rolling

    def rolling(self, requests: Sequence[RollingLoglikelihood]) -> list[RollingResult]:
        items = []  # (request index, input ids, targets of the last n_new positions)
        for i, r in enumerate(requests):
            x = (self.eot, *r.tokens)
            for begin, end, n_new in rolling_windows(len(r.tokens), self.n_ctx, self.stride):
                items.append((i, x[begin:end], x[end - n_new + 1:end + 1]))
        answers = self._map(items, lambda it: len(it[1]), self._rolling_batch, "rolling loglikelihood")
        totals = [0.0] * len(requests)
        for (i, _, _), lp in zip(items, answers):
            totals[i] += lp
        return [RollingResult(t, len(r.tokens)) for t, r in zip(totals, requests)]

    def _rolling_batch(self, batch: list[tuple[int, tuple[int, ...], tuple[int, ...]]]) -> list[float]:
        h = self.model.hidden_states(self._right_padded([ids for _, ids, _ in batch]))  # (B, L, C)
        rows, cols, targets = [], [], []
        for b, (_, ids, tgt) in enumerate(batch):
            rows += [b] * len(tgt)
            cols += range(len(ids) - len(tgt), len(ids))
            targets += tgt
        sel = h[rows, cols]  # (P, C)
        tgt_t = torch.tensor(targets, device=sel.device)
        picked = torch.cat([self._logprobs(sel[j:j + LOGIT_CHUNK]).gather(1, tgt_t[j:j + LOGIT_CHUNK, None])[:, 0]
                            for j in range(0, len(targets), LOGIT_CHUNK)]).double()  # (P,)
        sums, j = [], 0
        for _, _, tgt in batch:
            sums.append(float(picked[j:j + len(tgt)].sum()))
            j += len(tgt)
        return sums

    # ------------------------------------------------------------------------- greedy generation

    def greedy(self, requests: Sequence[GreedyGeneration]) -> list[GenerationResult]:
        return self._greedy(requests, [])[0]

    def _greedy(self, requests: Sequence[GreedyGeneration], seqs: list[_Sequence]
                ) -> tuple[list[GenerationResult], list[tuple[int, LoglikelihoodResult]]]:
        """Generation results, and the answers of the loglikelihood sequences `seqs` (those whose
        context is a generation context are teacher-forced in the same batch, the others are
        scored on their own)."""
        # Keyed by (context, max_new_tokens) and batched apart by max_new_tokens: a batch keeps the
        # last n_ctx - max_new context tokens of every row, as each request alone would.
        contexts: dict[tuple[tuple[int, ...], int], tuple[list[int], list[_Sequence]]] = {}
        for i, r in enumerate(requests):
            if r.max_new_tokens < 1 or r.max_new_tokens >= self.n_ctx:
                raise ScoringError(f"max_new_tokens must be in [1, {self.n_ctx}), got {r.max_new_tokens}")
            contexts.setdefault((tuple(r.context) or (self.eot,), r.max_new_tokens), ([], []))[0].append(i)
        by_context: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
        for key in contexts:
            by_context.setdefault(key[0], key)
        alone = []
        for seq in seqs:
            first = min(u[1] for u in seq.users)
            key = by_context.get(seq.ids[:first + 1])
            if key is not None and first + 1 + key[1] <= self.n_ctx:
                contexts[key][1].append(seq)
            else:
                alone.append(seq)
        answers = []
        for max_new in sorted({key[1] for key in contexts}):
            items = [(ctx, users, forced) for (ctx, m), (users, forced) in contexts.items() if m == max_new]
            answers += self._map(items, lambda it: len(it[0]),
                                 lambda batch: self._greedy_batch(batch, requests), "greedy generation")
        out: list[Any] = [None] * len(requests)
        ll_out = self._loglikelihood_sequences(alone)
        for gen, ll in answers:
            for i, res in gen.items():
                out[i] = res
            ll_out += ll
        return out, ll_out

    def _greedy_batch(self, batch: list[tuple[tuple[int, ...], list[int], list[_Sequence]]],
                      requests: Sequence[GreedyGeneration]
                      ) -> list[tuple[dict[int, GenerationResult], list[tuple[int, LoglikelihoodResult]]]]:
        model = self.model
        max_new = max(requests[i].max_new_tokens for _, users, _ in batch for i in users)
        rows = [ctx[-(self.n_ctx - max_new):] for ctx, _, _ in batch]
        width = max(map(len, rows))
        # teacher-forced sequences: (item, sequence, tokens to feed after the context)
        forced = [(b, s, s.ids[len(ctx):]) for b, (ctx, _, seqs) in enumerate(batch) for s in seqs]
        if len(batch) > 1 and width + max([max_new] + [len(f) for _, _, f in forced]) > self.n_ctx:
            # the longest context's padding, then the longest forced continuation (of a shorter context),
            # would overrun the model's context, though each row alone fits: decode the halves apart
            half = len(batch) // 2
            return self._greedy_batch(batch[:half], requests) + self._greedy_batch(batch[half:], requests)
        ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L), left padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = model.new_kv_cache(len(rows), width + max([max_new] + [len(f) for _, _, f in forced]))
        h = model.hidden_states(ids, attention_mask=mask, kv_cache=cache)[:, -1]  # (B, C)
        logp = self._logprobs(h)  # (B, V)

        # The first token may differ between requests on one context (`suppress_first`); from
        # then on decoding is plain greedy, so requests that agree on it share one path.
        paths: list[_Path] = []
        path_rows: list[int] = []
        first_tokens: list[int] = []
        for b, (_, users, _) in enumerate(batch):
            by_token: dict[int, _Path] = {}
            for i in users:
                row = logp[b]
                if requests[i].suppress_first:
                    row = row.clone()
                    row[sorted(requests[i].suppress_first)] = -math.inf
                tok = int(row.argmax())
                if tok not in by_token:
                    by_token[tok] = _Path([], [tok], [float(logp[b, tok])])
                    paths.append(by_token[tok])
                    path_rows.append(b)
                    first_tokens.append(tok)
                by_token[tok].requests.append(i)
        seen = [[logp[b]] for b, _, _ in forced]  # log-prob rows at each forced position
        feeding = [k for k, (_, _, f) in enumerate(forced) if f]
        all_rows = path_rows + [forced[k][0] for k in feeding]
        if all_rows != list(range(len(rows))):
            cache.reorder(torch.tensor(all_rows))
            mask = mask[all_rows]
        for p in paths:
            self._check_finished(p, requests)
        step = 0
        tokens = torch.tensor(first_tokens + [forced[k][2][0] for k in feeding], device=self.device)  # (B',)
        while (not all(len(p.done) == len(p.requests) for p in paths)
               or any(step < len(forced[k][2]) for k in feeding)):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B', P+1)
            h = model.hidden_states(tokens[:, None], attention_mask=mask, kv_cache=cache)[:, -1]  # (B', C)
            logp = self._logprobs(h)  # (B', V)
            step += 1
            nxt = logp.argmax(-1)
            for b, p in enumerate(paths):
                if len(p.done) < len(p.requests):
                    tok = int(nxt[b])
                    p.tokens.append(tok)
                    p.logprobs.append(float(logp[b, tok]))
                    self._check_finished(p, requests)
            for j, k in enumerate(feeding):
                feed = forced[k][2]
                if step <= len(feed):
                    seen[k].append(logp[len(paths) + j])
                if step < len(feed):
                    nxt[len(paths) + j] = feed[step]
            tokens = nxt
        out: list[tuple[dict[int, GenerationResult], list[tuple[int, LoglikelihoodResult]]]] = [
            ({}, []) for _ in batch]
        owner = {i: b for b, (_, users, _) in enumerate(batch) for i in users}
        for p in paths:
            for i, res in p.done.items():
                out[owner[i]][0][i] = res
        for (b, s, feed), rows_k in zip(forced, seen):
            out[b][1].extend(self._answers(s, torch.stack(rows_k), len(batch[b][0]) - 1))
        return out

    def _check_finished(self, path: _Path, requests: Sequence[GreedyGeneration]) -> None:
        """Record the answer of every request on `path` that its newest token finished."""
        ended = path.tokens[-1] == self.eot
        tokens = path.tokens[:-1] if ended else path.tokens
        text = self.tokenizer.decode(tokens)
        for i in path.requests:
            if i in path.done:
                continue
            r = requests[i]
            cut = min([k for k in (text.find(s) for s in r.stop) if k >= 0], default=-1)
            if r.stop_regex is not None:
                m = re.search(r.stop_regex, text)
                if m and (cut < 0 or m.start() < cut):
                    cut = m.start()
            if cut < 0 and not ended and len(path.tokens) < r.max_new_tokens:
                continue
            n = len(tokens[:r.max_new_tokens])
            if cut >= 0:
                text_i = text[:cut]
                # the tokens whose text starts before the cut (every byte of a character split across
                # tokens: a prefix ending inside one leaves it out, where decode() would count a U+FFFD)
                n = next((k for k in range(1, len(tokens) + 1)
                          if len(self._whole_characters(tokens[:k])) >= cut), len(tokens))
                n = n if cut > 0 else 0
            else:
                text_i = self.tokenizer.decode(tokens[:n])
            path.done[i] = GenerationResult(text_i, tuple(tokens[:n]), float(sum(path.logprobs[:n])))

    def _whole_characters(self, tokens: list[int]) -> str:
        """The text of `tokens` without a character that their last bytes only begin."""
        return codecs.getincrementaldecoder("utf-8")("replace").decode(self.tokenizer.decode_bytes(tokens))

    # ------------------------------------------------------------------------- generation (generate.py)

    def generation(self, requests: Sequence[Generation]) -> list[GenerationResult]:
        groups: dict[tuple[Any, ...], list[tuple[int, tuple[int, ...]]]] = {}
        for i, r in enumerate(requests):
            if not 1 <= r.max_new_tokens < self.n_ctx:
                raise ScoringError(f"max_new_tokens must be in [1, {self.n_ctx}), got {r.max_new_tokens}")
            if r.truncate not in ("left", "right"):
                raise ScoringError(f"truncate: expected 'left' or 'right', got {r.truncate!r}")
            room = self.n_ctx - r.max_new_tokens - len(r.suffix)
            if room < 0 or (room == 0 and not r.suffix):
                raise ScoringError(f"a generation prompt suffix of {len(r.suffix)} tokens leaves no room in the "
                                   f"context of {self.n_ctx} for {r.max_new_tokens} new tokens")
            context = tuple(r.context)
            if len(context) > room:
                context = context[len(context) - room:] if r.truncate == "left" else context[:room]
            prompt = (context + tuple(r.suffix)) or (self.eot,)
            key = (r.max_new_tokens, r.stop, r.do_sample, r.top_k, r.temperature, r.seed)
            groups.setdefault(key, []).append((i, prompt))
        out: list[Any] = [None] * len(requests)
        for items in groups.values():
            first = requests[items[0][0]]
            answers = self._map(items, lambda it: len(it[1]),
                                lambda batch: self._generation_batch([p for _, p in batch], first), "generation")
            for (i, _), res in zip(items, answers):
                out[i] = res
        return out

    def _generation_batch(self, prompts: list[tuple[int, ...]], r: Generation) -> list[GenerationResult]:
        from ..generate import generate

        completions = generate(self.model, self.tokenizer, [list(p) for p in prompts], max_new_tokens=r.max_new_tokens,
                               do_sample=r.do_sample, top_k=r.top_k, temperature=r.temperature,
                               stop=list(r.stop) or None, seed=r.seed, top_logprobs=0)
        return [GenerationResult(c.text, tuple(c.token_ids), float(sum(c.logprobs))) for c in completions]
