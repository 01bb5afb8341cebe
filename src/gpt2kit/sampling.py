"""Turning next-token logits into a token: pure functions, applied in a fixed order.

    logits (B, V) -> logit bias -> repetition penalty -> presence/frequency penalties
                  -> temperature -> top-k -> top-p -> min-p -> sample | argmax

Each filter takes and returns a (B, V) float tensor and never modifies its input; filtered-out
tokens get -inf. The model knows nothing of them (STYLE.md, principle 6). The order is the one
of OpenAI's released sampler (temperature, then top-k) and of `transformers` (penalties first,
min-p last).
The logit bias and the presence/frequency penalties are the OpenAI API's: additive, in logit
units, the penalties counting the tokens sampled so far (not the prompt's).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from dataclasses import dataclass

import torch

from .errors import GPT2KitError

__all__ = [
    "SamplingError", "SamplingParams", "PRESETS", "apply_logit_bias", "apply_repetition_penalty",
    "apply_presence_frequency", "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter",
    "process_logits",
    "sample", "select_tokens",
]


class SamplingError(GPT2KitError):
    """A sampling option is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token. `do_sample=False` or `temperature=0` means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # keep the tokens at least min_p times as probable as the most probable one (Nguyen et al., 2024)
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True
    # OpenAI's: minus presence_penalty once, and frequency_penalty per occurrence, for every token
    # sampled so far (negative values favour repeats)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> a number added to its logit (OpenAI's logit_bias: -100 bans a token, 100
    # forces it); a dict given here is kept as sorted (id, bias) pairs, so params stay hashable
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        # numpy and 0-d torch scalars (a sweep over np.linspace, say) are taken as the numbers they hold
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, as_real(getattr(self, name)))
        object.__setattr__(self, "top_k", as_integer(self.top_k))
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise SamplingError(f"temperature: expected a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise SamplingError(f"top_k: expected an integer >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p: expected a number in (0, 1] (or None), got {self.top_p!r}")
        if self.min_p is not None and (isinstance(self.min_p, bool)
                                       or not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1)):
            raise SamplingError(f"min_p: expected a number in [0, 1] (or None), got {self.min_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            raise SamplingError(f"repetition_penalty: expected a number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and abs(value) <= _MAX_SHIFT):
                raise SamplingError(f"{name}: expected a number from {-_MAX_SHIFT:g} to {_MAX_SHIFT:g}, got {value!r}")
        object.__setattr__(self, "logit_bias", _checked_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SamplingParams":
        """A named preset with some fields replaced, e.g. `from_preset("paper", temperature=0.7)`."""
        if name not in PRESETS:
            raise SamplingError(f"sampling preset: expected one of {', '.join(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)


def as_real(value):
    """A real number given as a numpy or 0-d torch scalar, as a Python float; anything else
    (None, a bool, a string, a Python number) as it is, for the caller's check to judge."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, numbers.Real):  # numpy's numbers register as such; numpy's bool does not
        return float(value)
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.dtype.is_complex):
        return float(value.item())
    return value


def as_integer(value):
    """An integer given as a numpy or 0-d torch integer, as a Python int; anything else as it is."""
    if isinstance(value, (bool, int)) or value is None:
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


# The largest logit bias or presence/frequency penalty taken: far past any logit's range (OpenAI
# allows +-100 and +-2), while the shifted logits stay far from float32's overflow (a bias of
# 1e39 made the softmax's input inf, and sampling raised).
_MAX_SHIFT = 1e6


class _Bias(tuple):
    """Checked (token id, value) pairs, sorted by id, hashed once: a decoding looks its bias
    tensors up by them at every step, and rehashing 50k pairs (a bias over the whole vocabulary)
    took ~3 ms a token."""

    def __hash__(self) -> int:
        h = self.__dict__.get("hash")
        if h is None:
            h = self.__dict__["hash"] = tuple.__hash__(self)
        return h


def _checked_bias(bias) -> _Bias:
    if isinstance(bias, _Bias):
        return bias
    pairs = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = list(pairs)
    except TypeError:
        raise SamplingError(f"logit_bias: expected a mapping of token id to number, got {bias!r}") from None
    out: dict[int, float] = {}
    for pair in pairs:
        raw, value = pair if isinstance(pair, tuple) and len(pair) == 2 else (pair, None)
        try:  # numpy and torch integers too (ids from argsort or topk), not bools
            if isinstance(raw, bool) or (isinstance(raw, torch.Tensor) and raw.dtype == torch.bool):
                raise TypeError
            token = operator.index(raw)
        except TypeError:
            token = -1
        if token < 0:
            raise SamplingError(f"logit_bias: token ids must be integers >= 0, got {raw!r}")
        number = (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
            isinstance(value, torch.Tensor) and value.numel() == 1
            and not (value.dtype.is_complex or value.dtype == torch.bool))
        if not (number and abs(float(value)) <= _MAX_SHIFT):
            raise SamplingError(f"logit_bias[{token}]: expected a number from {-_MAX_SHIFT:g} to {_MAX_SHIFT:g}, "
                                f"got {value!r}")
        out[token] = float(value)
    return _Bias(sorted(out.items()))


PRESETS: dict[str, SamplingParams] = {
    # The paper's samples (and its memorization analysis, §4) were drawn with top-k 40, T = 1.
    "paper": SamplingParams(top_k=40),
    "greedy": SamplingParams(do_sample=False),
    # Plain ancestral sampling: what the OpenAI API does with its defaults.
    "pure": SamplingParams(),
    # Nucleus sampling (Holtzman et al., 2019) with its recommended p.
    "nucleus": SamplingParams(top_p=0.95),
}


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float,
                             previous_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Make every token that already occurs in `previous` (B, L) less likely (CTRL, Keskar et al.
    2019): a positive logit is divided by `penalty`, a negative one multiplied, so `penalty > 1`
    always lowers it. `previous_mask` (B, L), 1 = real token, excludes padding."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    real = torch.ones_like(previous, dtype=torch.int32) if previous_mask is None else previous_mask.to(torch.int32)
    # a token counts as seen if any of its occurrences is a real (non-pad) one
    counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device).scatter_add_(1, previous, real)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    out = torch.where(counts > 0, penalized, logits)
    top = out.amax(dim=-1)
    if not ((top > -_HUGE) & (top < _HUGE)).all():
        # an extreme penalty overflowed a row's best logit to +-inf (or near it, where the
        # temperature's division would): the same sums in float64, clamped to its range, then
        # shifted so that each row's best is 0 (the same distribution), float32 again
        wide = logits.double()
        wide = torch.where(counts > 0, torch.where(wide > 0, wide / penalty, wide * penalty), wide)
        wide = wide.clamp(-torch.finfo(torch.float64).max, torch.finfo(torch.float64).max)
        out = (wide - wide.amax(dim=-1, keepdim=True)).to(logits.dtype)
    return out


def apply_logit_bias(logits: torch.Tensor, bias) -> torch.Tensor:
    """Add each (token id, value) of `bias` (pairs or a mapping, as `SamplingParams.logit_bias`)
    to that token's logit in every row."""
    if not bias:
        return logits
    bias = _checked_bias(bias)  # (a no-op for SamplingParams' own, checked once)
    if bias[-1][0] >= logits.shape[-1]:  # (pairs sorted by id, none negative)
        raise SamplingError(f"logit_bias: token id {bias[-1][0]} is not in the vocabulary "
                            f"({logits.shape[-1]} tokens)")
    return logits + _dense_bias(bias, logits.shape[-1], logits.dtype, logits.device)


@functools.lru_cache(maxsize=8)
def _dense_bias(bias: _Bias, n_vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # (V,) zeros but the biased ids, built once per decoding: adding it is one pass over a row,
    # where index_add of 50k pairs took ~5 ms a step on a CPU
    dense = torch.zeros(n_vocab, dtype=dtype)
    dense[torch.tensor([t for t, _ in bias])] = torch.tensor([v for _, v in bias], dtype=dtype)
    return dense.to(device)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit[j] - counts[j] * frequency - (counts[j] > 0) * presence, where
    `counts` (B, V) says how often each token was sampled so far in that row."""
    if presence == 0 and frequency == 0:
        return logits
    penalty = counts.to(logits.dtype) * frequency + (counts > 0).to(logits.dtype) * presence
    return logits - penalty


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise SamplingError(f"temperature: expected > 0 for sampling, got {temperature!r}")
    if temperature < _COLD:
        # logits / 1e-40 overflow to inf, and the softmax of inf - inf is nan: shifted first, the
        # best logit becomes 0 and the others at most 0 (the same distribution, without the
        # overflow), divided in float64, where 5e-324 is not 0 as it would be in float32
        shifted = (logits - logits.amax(dim=-1, keepdim=True)).double()
        return (shifted / temperature).to(logits.dtype)
    return logits if temperature == 1.0 else logits / temperature


_HUGE = 1e30  # a best logit past this (either sign) is re-centred (see apply_repetition_penalty)
_COLD = 1e-4  # temperatures below which logits are shifted before the division (see apply_temperature)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too), -inf elsewhere."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Keep the nucleus: the fewest most probable tokens whose probabilities sum to >= p
    (always at least the most probable one), -inf elsewhere."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # mass strictly before each token: a token is needed while that mass is still below p
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Keep the tokens whose probability is at least `min_p` times the most probable one's (which
    always stays), -inf elsewhere."""
    if not min_p:
        return logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    # in log space: p < min_p * p_max for tokens far below the best, where probabilities underflow
    drop = logp < logp.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor | None = None,
                   previous_mask: torch.Tensor | None = None, sampled_counts: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """All filters of `params`, in order, on float32 logits (B, V). Greedy skips temperature and the
    truncation filters (they cannot change the argmax) but keeps the bias and the penalties.
    `previous` (B, L) holds each row's tokens so far (the repetition penalty's), `sampled_counts`
    (B, V) how often each token was sampled so far (the presence/frequency penalties')."""
    logits = apply_logit_bias(logits.float(), params.logit_bias)
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, params.repetition_penalty, previous_mask)
    if sampled_counts is not None:
        logits = apply_presence_frequency(logits, sampled_counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) -> (B,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    # (multinomial's own error is a traceback; on CUDA, a device assert.) A NaN or inf logit makes its
    # whole row NaN: one column tells.
    if bool(probs[:, 0].isnan().any()):
        raise SamplingError("the next-token probabilities are NaN: the model's logits are NaN or infinite "
                            "(damaged or diverged weights?)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def select_tokens(logits: torch.Tensor, params: SamplingParams, *, previous: torch.Tensor | None = None,
                  previous_mask: torch.Tensor | None = None, sampled_counts: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row (B,): argmax when greedy, else a draw after the filters."""
    processed = process_logits(logits, params, previous, previous_mask, sampled_counts)
    if params.greedy:
        tokens = processed.argmax(dim=-1)  # argmax takes a NaN for the largest: nonsense text, no error
        if bool(processed.gather(-1, tokens[:, None]).isnan().any()):
            raise SamplingError("the model's logits are NaN (damaged or diverged weights?)")
        return tokens
    return sample(processed, generator)
