"""Zero-shot evaluation throughput: gpt2kit's batched scorers vs a straightforward transformers loop.

Both sides use the gpt2 shape (124M) with the same random weights and compute the same LAMBADA
metrics per passage: the last word's log-probability, the last-token accuracy with and without
the stop-word filter, and the whole last word greedily generated with and without the filter.
The loop does what a user writes by hand: one forward pass of the passage, then two
`generate` calls that stop at the end of the word. Rolling perplexity: gpt2kit's sliding window
vs the usual per-window `labels=-100` recipe, same stride.

    .venv/bin/python benchmarks/eval.py [--passages 32] [--rolling-tokens 4096] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import re
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


def interleaved(runs: dict, rounds: list) -> dict:
    """Seconds per implementation, summed over rounds; within a round every implementation runs
    on the same input, one after the other, so a change in the machine's load hits them alike."""
    total = {name: 0.0 for name in runs}
    results: dict = {name: [] for name in runs}
    for k, chunk in enumerate(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            results[name].append(fn(chunk))
            total[name] += time.perf_counter() - t0
            print(f"  round {k + 1}/{len(rounds)} {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return {name: (total[name], results[name]) for name in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=32)
    ap.add_argument("--rolling-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the inputs are split among them)")
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
    per_round = -(-len(texts) // args.rounds)
    stop_ids = sorted(stop_word_tokens(tok))
    with tempfile.TemporaryDirectory() as d:
        def ours_on(model):
            def run(chunk):
                folder = Path(d) / str(abs(hash(tuple(chunk))))
                folder.mkdir(exist_ok=True)
                (folder / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
                return evaluate(model, tok, ["lambada"], folder, batch_size=args.batch_size,
                                progress=False)["lambada"]["metrics"]
            return run

        lam = interleaved({"hf": lambda chunk: hf_lambada(hf, tok, chunk, stop_ids), "fp32": ours_on(ours),
                           "bf16": ours_on(ours_bf16)},
                          [texts[i:i + per_round] for i in range(0, len(texts), per_round)])
    for m_hf, m_ours in zip(lam["hf"][1], lam["fp32"][1]):  # same metrics, or the comparison is void
        for k in m_hf:
            assert math.isclose(m_hf[k], m_ours[k], rel_tol=1e-3), (k, m_hf[k], m_ours[k])
    ppl_dev = max(abs(b["ppl"] / a["ppl"] - 1) for a, b in zip(lam["fp32"][1], lam["bf16"][1]))
    n = len(texts)
    rows = [("LAMBADA passages/s", label, n / lam[key][0], lam["hf"][0] / lam[key][0])
            for key, label in (("hf", "transformers loop (fp32)"), ("fp32", "gpt2kit (fp32)"),
                               ("bf16", "gpt2kit (bf16)"))]

    ids = tok.encode_ordinary(" ".join(passages(max(1, args.rolling_tokens // 60), 80)))[:args.rolling_tokens]
    stride = 512
    pieces = [ids[i:i + len(ids) // args.rounds] for i in range(0, len(ids), len(ids) // args.rounds)][:args.rounds]

    def ours_rolling(model):
        scorer = Scorer(model, tok, batch_size=4, stride=stride, progress=False)
        return lambda piece: scorer.rolling([RollingLoglikelihood(tuple(piece))])[0].logprob

    rol = interleaved({"hf": lambda piece: hf_rolling(hf, piece, tok.eot_token, 1024, stride),
                       "fp32": ours_rolling(ours), "bf16": ours_rolling(ours_bf16)}, pieces)
    for a, b in zip(rol["hf"][1], rol["fp32"][1]):
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)
    lp_dev = max(abs(b / a - 1) for a, b in zip(rol["fp32"][1], rol["bf16"][1]))
    n_tok = sum(map(len, pieces))
    rows += [("rolling PPL tokens/s", label, n_tok / rol[key][0], rol["hf"][0] / rol[key][0])
             for key, label in (("hf", "transformers loop (fp32)"), ("fp32", "gpt2kit (fp32)"),
                                ("bf16", "gpt2kit (bf16)"))]

    print(f"gpt2 shape, random weights, {args.threads} threads, {n} passages, {n_tok} tokens (stride {stride}), "
          f"batch {args.batch_size}; {args.rounds} interleaved rounds")
    print("| workload | implementation | throughput | vs transformers |")
    print("|---|---|---|---|")
    for w, impl, thr, ratio in rows:
        print(f"| {w} | {impl} | {thr:.2f} | {ratio:.2f}x |")
    acc = [(a[k], b[k]) for a, b in zip(lam["fp32"][1], lam["bf16"][1]) for k in a if k.startswith("acc")]
    print(f"bf16 vs fp32 (largest difference over rounds): LAMBADA word PPL {ppl_dev:.3%}, rolling log-prob "
          f"{lp_dev:.3%}; LAMBADA accuracies {'equal' if all(x == y for x, y in acc) else 'differ'}")


if __name__ == "__main__":
    main()
