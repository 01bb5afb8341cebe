"""Zero-shot evaluation throughput: gpt2kit's batched scorers vs a straightforward transformers loop.

Both sides use the gpt2 shape (124M) with the same random weights and compute the same LAMBADA
metrics per passage: the last word's log-probability, the last-token accuracy with and without
the stop-word filter, and the whole last word greedily generated with and without the filter.
The loop does what a user writes by hand: one forward pass of the passage, then two
`generate` calls that stop at the end of the word. Rolling perplexity: gpt2kit's sliding window
vs the usual per-window `labels=-100` recipe, same stride.

    .venv/bin/python benchmarks/eval.py [--passages 32] [--rolling-tokens 4096] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def passages(n: int, words: int = 70) -> list[str]:
    """LAMBADA-shaped passages (about 70 words, ending in a word) cut from the default corpus."""
    from gpt2kit.corpus import read_text, shakespeare, strip_gutenberg

    text = " ".join(strip_gutenberg(read_text(p)) for p in shakespeare()[:3])
    toks = [w for w in text.split() if w.isascii()]
    out = []
    for i in range(n):
        chunk = toks[5000 + i * 997: 5000 + i * 997 + words]
        chunk[-1] = re.sub(r"\W+", "", chunk[-1]) or "word"
        out.append(" ".join(chunk))
    return out


def hf_lambada(hf, tokenizer, texts: list[str], stop_ids: list[int]) -> dict[str, float]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class WordEnd(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            return bool(re.search(r"(?<=\w)[^\w']", tokenizer.decode(input_ids[0, self.start:].tolist())))

    logprob, hits = 0.0, {"acc_word": 0, "acc_word_stopfilter": 0, "acc_token": 0, "acc_token_stopfilter": 0}
    with torch.inference_mode():
        for text in texts:
            context, word = text.rsplit(" ", 1)
            ctx = tokenizer.encode_ordinary(context)
            ids = tokenizer.encode_ordinary(text)
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
            logprob += sum(float(logp[p - 1, ids[p]]) for p in range(len(ctx), len(ids)))
            hits["acc_token"] += int(logp[-2].argmax()) == ids[-1]
            filtered = logp[-2].clone()
            filtered[stop_ids] = -math.inf
            hits["acc_token_stopfilter"] += int(filtered.argmax()) == ids[-1]
            for key, suppress in (("acc_word", None), ("acc_word_stopfilter", stop_ids)):
                out = hf.generate(torch.tensor([ctx]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  begin_suppress_tokens=suppress,
                                  stopping_criteria=StoppingCriteriaList([WordEnd(len(ctx))]))
                gen = tokenizer.decode(out[0, len(ctx):].tolist())
                m = re.match(r"\s*([\w']+)", gen)
                hits[key] += bool(m) and m.group(1) == word
    n = len(texts)
    return {"ppl": math.exp(-logprob / n), **{k: 100.0 * v / n for k, v in hits.items()}}


def hf_rolling(hf, ids: list[int], eot: int, max_len: int, stride: int) -> float:
    """One window at a time, full logits, the new targets' log-probabilities summed."""
    x = torch.tensor([eot] + ids)
    total, prev_end, begin = 0.0, 0, 0
    with torch.inference_mode():
        while prev_end < len(ids):
            end = min(begin + max_len, len(ids))
            logp = torch.log_softmax(hf(x[begin:end][None]).logits[0].float(), -1)
            n_new = end - prev_end
            total += float(logp[-n_new:].gather(1, x[end - n_new + 1:end + 1, None]).sum())
            prev_end, begin = end, begin + stride
    return total


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        print(f"  {getattr(fn, '__name__', 'run')}: {times[-1]:.1f}s", file=sys.stderr, flush=True)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=32)
    ap.add_argument("--rolling-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from gpt2kit.eval import RollingLoglikelihood, Scorer, evaluate
    from gpt2kit.eval.tasks.lambada import stop_word_tokens
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer
    from gpt2kit.weights import to_hf_state_dict

    torch.manual_seed(0)
    tok = Tokenizer.gpt2()
    ours = GPT2(GPT2Config.from_preset("gpt2")).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    hf.tie_weights()
    ours_bf16 = GPT2(GPT2Config.from_preset("gpt2")).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16 = ours_bf16.to(torch.bfloat16)

    texts = passages(args.passages)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        t_hf, m_hf = timed(lambda: hf_lambada(hf, tok, texts, sorted(stop_word_tokens(tok))), args.repeats)
        t_ours, m_ours = timed(lambda: evaluate(ours, tok, ["lambada"], d, batch_size=args.batch_size,
                                                progress=False)["lambada"]["metrics"], args.repeats)
        t_bf, m_bf = timed(lambda: evaluate(ours_bf16, tok, ["lambada"], d, batch_size=args.batch_size,
                                            progress=False)["lambada"]["metrics"], args.repeats)
    for k in m_hf:  # same metrics, or the comparison is void
        assert math.isclose(m_hf[k], m_ours[k], rel_tol=1e-3), (k, m_hf[k], m_ours[k])
    n = len(texts)
    rows.append(("LAMBADA passages/s", "transformers loop (fp32)", n / t_hf, 1.0))
    rows.append(("LAMBADA passages/s", "gpt2kit (fp32)", n / t_ours, t_hf / t_ours))
    rows.append(("LAMBADA passages/s", "gpt2kit (bf16)", n / t_bf, t_hf / t_bf))
    ppl_dev = abs(m_bf["ppl"] / m_ours["ppl"] - 1)

    ids = tok.encode_ordinary(" ".join(passages(max(1, args.rolling_tokens // 60), 80)))[:args.rolling_tokens]
    stride = 512
    t_hf_r, lp_hf = timed(lambda: hf_rolling(hf, ids, tok.eot_token, 1024, stride), args.repeats)
    scorer = Scorer(ours, tok, batch_size=4, stride=stride, progress=False)
    t_r, res = timed(lambda: scorer.rolling([RollingLoglikelihood(tuple(ids))])[0], args.repeats)
    assert math.isclose(res.logprob, lp_hf, rel_tol=1e-4), (res.logprob, lp_hf)
    scorer_bf = Scorer(ours_bf16, tok, batch_size=4, stride=stride, progress=False)
    t_rb, res_bf = timed(lambda: scorer_bf.rolling([RollingLoglikelihood(tuple(ids))])[0], args.repeats)
    rows.append(("rolling PPL tokens/s", "transformers loop (fp32)", len(ids) / t_hf_r, 1.0))
    rows.append(("rolling PPL tokens/s", "gpt2kit (fp32)", len(ids) / t_r, t_hf_r / t_r))
    rows.append(("rolling PPL tokens/s", "gpt2kit (bf16)", len(ids) / t_rb, t_hf_r / t_rb))

    print(f"gpt2 shape, random weights, {args.threads} threads, {n} passages, "
          f"{len(ids)} tokens (stride {stride}), batch {args.batch_size}; median of {args.repeats}")
    print("| workload | implementation | throughput | vs transformers |")
    print("|---|---|---|---|")
    for w, impl, thr, ratio in rows:
        print(f"| {w} | {impl} | {thr:.2f} | {ratio:.2f}x |")
    print(f"bf16 vs fp32: LAMBADA word PPL {ppl_dev:.3%} apart, rolling log-prob "
          f"{abs(res_bf.logprob / res.logprob - 1):.3%} apart; LAMBADA accuracies fp32 {m_ours} bf16 {m_bf}")


if __name__ == "__main__":
    main()
