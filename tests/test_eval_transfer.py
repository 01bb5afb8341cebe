"""Transfer tasks (CoQA, CNN/DM, WMT14, NQ, Winograd, HellaSwag): metrics, prompts, scoring vs transformers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gpt2kit.eval import Generation, MissingDataError, Scorer, TaskError, evaluate, get_task
from gpt2kit.eval import transfer_metrics as tm
from gpt2kit.eval.tasks.coqa import coqa_prompt, parse_coqa
from gpt2kit.generate import generate
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.tokenizer import Tokenizer
from conftest import save_sharp_tiny_model

transformers = pytest.importorskip("transformers")  # a test dependency (the oracle)

TASKS = ["coqa", "cnndm", "wmt14-en-fr", "wmt14-fr-en", "nq", "winograd", "hellaswag"]

# ----------------------------------------------------------------------------- fixture files (official formats)

COQA = {"version": "1.0", "data": [
    {"source": "mctest", "id": "3dr23u6we5exclen4th8uq9rb42tel", "filename": "mc160.test.41",
     "story": "Once upon a time, in a barn near a farm house, there lived a little white kitten named Cotton.",
     "questions": [{"input_text": "what color was cotton?", "turn_id": 1},
                   {"input_text": "where did she live?", "turn_id": 2}],
     "answers": [{"span_start": 59, "span_end": 93, "span_text": "a little white kitten named Cotton",
                  "input_text": "white", "turn_id": 1},
                 {"span_start": 18, "span_end": 80, "span_text": "in a barn near a farm house",
                  "input_text": "in a barn", "turn_id": 2}],
     "additional_answers": {
         "0": [{"input_text": "white", "turn_id": 1}, {"input_text": "in a barn", "turn_id": 2}],
         "1": [{"input_text": "white kitten", "turn_id": 1}, {"input_text": "barn", "turn_id": 2}],
         "2": [{"input_text": "white", "turn_id": 1}, {"input_text": "near a farm house", "turn_id": 2}]}},
    {"source": "race", "id": "3azhrg4cu4ktme1zh7c2ro3pn2430d", "filename": "high1.txt",
     "story": "The Vatican Apostolic Library is the library of the Holy See, located in Vatican City.",
     "questions": [{"input_text": "When was the Vat formally opened?", "turn_id": 1}],
     "answers": [{"input_text": "It was formally established in 1475", "turn_id": 1}]},
    {"source": "wikipedia", "id": "third", "filename": "x",
     "story": "Paris is the capital of France.",
     "questions": [{"input_text": "What is the capital?", "turn_id": 1}],
     "answers": [{"input_text": "Paris", "turn_id": 1}]}]}

STORY = """(CNN) -- The city council met on Monday to discuss the new park. Residents asked for more trees.

The mayor said the plan would be ready by spring. Work starts in May!

@highlight

City council discussed the new park

@highlight

The plan will be ready by spring
"""

SGM_EN = """<srcset setid="newstest2014" srclang="any">
<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">
<p>
<seg id="1">Spectacular Wingsuit Jump Over Bogota</seg>
<seg id="2">Sportsman Jhonathan Florez jumped from a helicopter above Bogota &amp; the capital.</seg>
<seg id="3">Wearing a wingsuit, he flew past over the famous Monserrate Sanctuary.</seg>
<seg id="4">It was a record.</seg>
</p>
</doc>
</srcset>
"""
SGM_FR = """<refset setid="newstest2014" srclang="any" trglang="fr">
<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">
<p>
<seg id="1">Saut spectaculaire en wingsuit au-dessus de Bogota</seg>
<seg id="2">Le sportif Jhonathan Florez a sauté d'un hélicoptère au-dessus de Bogota &amp; la capitale.</seg>
<seg id="3">Vêtu d'une wingsuit, il est passé au-dessus du célèbre sanctuaire Monserrate.</seg>
<seg id="4">C'était un record.</seg>
</p>
</doc>
</refset>
"""

NQ = [{"question": "who sings does he love me with reba", "answer": ["Linda Davis"]},
      {"question": "where is the bowling hall of fame located", "answer": ["Arlington, Texas"]},
      {"question": "when was the last time anyone was on the moon", "answer": ["14 December 1972 UTC", "December 1972"]},
      {"question": "big little lies season 2 how many episodes", "answer": ["seven"]},
      {"question": "who plays the lead in the mask", "answer": ["Jim Carrey"]}]

WSC = [{"text": "The city councilmen refused the demonstrators a permit because they feared violence.",
        "pronoun": "they", "pronoun_loc": 63, "quote": "they feared violence", "quote_loc": 63,
        "options": ["The city councilmen", "The demonstrators"], "label": 0, "source": "(Winograd 1972)"},
       {"text": "The trophy doesn't fit into the brown suitcase because its handle is broken.",
        "pronoun": "its", "pronoun_loc": 55, "quote": "its handle", "quote_loc": 55,
        "options": ["the trophy", "the suitcase"], "label": 1, "source": "Hector Levesque"},
       {"text": "Joan made sure to thank Susan for all the help she had given.",
        "pronoun": "she", "pronoun_loc": 47, "quote": "she had given", "quote_loc": 47,
        "options": ["Joan", "Susan"], "label": 1, "source": "Hector Levesque"}]

HELLASWAG = [{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
              "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
              "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                          "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
              "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": 3},
             {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down "
              "and grabs the pole.", "ctx_b": "the lady", "ctx": "",
              "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                          "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
              "source_id": "x", "split": "val", "split_type": "zeroshot", "label": "3"},
             {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant a tree [title] Dig "
              "a hole.", "ctx_b": "", "ctx": "",
              "endings": ["[step] Put the tree in it.", "Eat it.", "Fly away [substeps] now.", "Sing loudly."],
              "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": 0}]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_transfer_datasets(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "coqa-dev-v1.0.json").write_text(json.dumps(COQA))
    (root / "cnndm").mkdir()
    (root / "cnndm" / "0001d1afc246a7964130f43ae940af6bc6c57f01.story").write_text(STORY)
    (root / "cnndm" / "0002.story").write_text("A short article about rain. It rained all day.\n\n@highlight\n\n"
                                              "It rained\n")
    (root / "newstest2014-fren-src.en.sgm").write_text(SGM_EN)
    (root / "newstest2014-fren-ref.fr.sgm").write_text(SGM_FR)
    (root / "newstest2014-fren-src.fr.sgm").write_text(SGM_FR.replace("refset", "srcset"))
    (root / "newstest2014-fren-ref.en.sgm").write_text(SGM_EN.replace("srcset", "refset"))
    (root / "NQ-open.dev.jsonl").write_text(_jsonl(NQ))
    (root / "wsc273.jsonl").write_text(_jsonl(WSC))
    (root / "hellaswag_val.jsonl").write_text(_jsonl(HELLASWAG))
    return root


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_sharp_tiny_model(tmp_path_factory.mktemp("tiny-transfer"), tokenizer,
                                 seed=4321, n_ctx=256, scale=6.0)


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT2.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_transfer_datasets(tmp_path_factory.mktemp("transfer-data") / "d")


def hf_logprob(hf, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    return sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def hf_greedy_line(hf, tokenizer, prompt_ids: list[int], max_new: int) -> str:
    """One example at a time, as a user would: transformers' greedy generate, cut at the newline."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                          pad_token_id=tokenizer.eot_token, eos_token_id=tokenizer.eot_token)
    new = [t for t in out[0, len(prompt_ids):].tolist()]
    if tokenizer.eot_token in new:
        new = new[:new.index(tokenizer.eot_token)]
    return tokenizer.decode(new).split("\n")[0]


# ----------------------------------------------------------------------------- metrics vs known values

def test_answer_normalization_and_f1_known_values():
    assert tm.normalize_answer("  The Eiffel Tower, in PARIS!  ") == "eiffel tower in paris"
    assert tm.normalize_answer("an apple a day") == "apple day"
    assert tm.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert tm.answer_f1("white kitten", "a white cat") == pytest.approx(0.5)  # P 1/2, R 1/2
    assert tm.answer_f1("in a barn", "barn near a farm house") == pytest.approx(1 / 3)  # P 1/4, R 1/2
    assert tm.answer_f1("the", "a") == 1.0  # both normalize to nothing
    assert tm.answer_f1("", "white") == 0.0
    assert tm.answer_em("The Cat.", "cat") == 1.0
    # a token counts as often as both answers have it: 2 shared "cat"s, P 2/3, R 2/2
    assert tm.answer_f1("the cat the cat", "cat cat cat") == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    # an article becomes a space, as in the official script (’ is not ASCII punctuation: it stays)
    assert tm.normalize_answer("rock’a’billy") == "rock’ ’billy"


def test_coqa_leave_one_out_known_values():
    # 4 human answers, prediction "white": leaving out "gray" -> max 1; leaving out any "white" -> the other
    # "white" still matches (1); leaving out "a white cat" -> 1  => F1 1.0
    assert tm.coqa_turn_scores(["white", "white", "a white cat", "gray"], "white") == (1.0, 1.0)
    # only one "white" among the 4: leaving it out leaves F1 max 2/3 ("white cat" vs "white")
    em, f1 = tm.coqa_turn_scores(["white", "white cat", "gray", "black"], "white")
    assert em == pytest.approx(3 / 4)
    assert f1 == pytest.approx((2 / 3 + 1 + 1 + 1) / 4)
    # a single gold answer: no leave-one-out
    assert tm.coqa_turn_scores(["in a barn"], "barn") == (0.0, pytest.approx(2 / 3))  # "in barn" vs "barn"
    assert tm.coqa_turn_scores(["a big red barn"], "barn") == (0.0, pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3)))


def test_nq_exact_match_normalization():
    assert tm.exact_match(["14 December 1972 UTC", "December 1972"], " december, 1972.") == 1.0
    assert tm.exact_match(["Jim Carrey"], "the jim carrey") == 1.0
    assert tm.exact_match(["Jim Carrey"], "Jim Carey") == 0.0
    assert tm.exact_match(["seven"], "7") == 0.0


def test_rouge_matches_the_packages_reference_example():
    r = tm.rouge_f1(["The quick brown fox jumps over the lazy dog"], ["The quick brown dog jumps on the log."])
    assert r["rouge1"] == pytest.approx(100 * 2 * 0.75 * (6 / 9) / (0.75 + 6 / 9))  # 6 shared unigrams of 8 / 9
    assert r["rouge2"] == pytest.approx(100 * 4 / 15)  # 2 shared bigrams: P 2/7, R 2/8
    assert r["rougeL"] == pytest.approx(100 * 0.5882352941176471)  # the rouge-score README's value
    assert tm.rouge_f1(["runs quickly"], ["running quick"])["rouge1"] == pytest.approx(50.0)  # stemming on
    assert all(math.isnan(v) for v in tm.rouge_f1([], []).values())  # nothing measured is not a score of 0


def test_rouge_logs_nothing(caplog):
    # rouge-score's implicitly made default tokenizer logged "Using default tokenizer." through
    # absl on every call: printed three times in an evaluation run, where INFO logging is on
    with caplog.at_level("DEBUG"):
        tm.rouge_f1(["a b"], ["a c"])
    assert [r.getMessage() for r in caplog.records] == []


def test_rouge_lsum_takes_the_reference_as_the_target():
    """ROUGE-Lsum (unlike R-1/2/L F1) is not symmetric: the highlights must be the target, the summary the prediction."""
    from rouge_score import rouge_scorer

    ref, pred = "bird ant cat bird", "cat\ncat cat dog ant\ndog"
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    right = scorer.score(target=ref, prediction=pred)["rougeLsum"].fmeasure
    assert right != pytest.approx(scorer.score(target=pred, prediction=ref)["rougeLsum"].fmeasure)
    assert tm.rouge_f1([ref], [pred])["rougeLsum"] == pytest.approx(100 * right)


def test_corpus_bleu_known_value_and_signature():
    out = tm.corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    assert out["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert "tok:13a" in out["signature"]
    assert tm.corpus_bleu(["A b c d e."], ["A b c d e."])["bleu"] == pytest.approx(100.0)
    # a translation shorter than its reference: every n-gram right, the brevity penalty exp(1 - 7/6) applies
    # (and reference and hypothesis are not interchangeable)
    short = tm.corpus_bleu(["the cat sat on the mat today"], ["the cat sat on the mat"])["bleu"]
    assert short == pytest.approx(100 * math.exp(1 - 7 / 6))
    # corpus BLEU pools the n-gram counts of all sentences (it is not the mean of sentence BLEUs: 100 and 0 here):
    # 1-grams 6/8, 2-grams 4/6, 3-grams 2/4, 4-grams 1/2
    pooled = tm.corpus_bleu(["a b c d", "e f g h"], ["a b c d", "e f x y"])["bleu"]
    assert pooled == pytest.approx(100 * (6 / 8 * 4 / 6 * 2 / 4 * 1 / 2) ** 0.25)


def test_first_sentences_and_confidence():
    text = 'The council met. "Why now?" she asked. Work starts in May! More text here.'
    assert tm.first_sentences(text, 3) == ["The council met.", '"Why now?" she asked.', "Work starts in May!"]
    assert tm.first_sentences("no end here", 3) == ["no end here"]
    assert tm.first_sentences("One. Two. Three", 0) == [] and tm.first_sentences("One. Two. Three", 1) == ["One."]
    assert tm.first_sentences("It cost $3.5 m. in 2010 vs. 2009. Then", 2) == [
        "It cost $3.5 m. in 2010 vs. 2009.", "Then"]
    assert tm.first_sentences("One.\nTwo\n\nThree. Four.", 3) == ["One.", "Two", "Three."]
    # closing quotes and brackets stay with the sentence they end
    assert tm.first_sentences('She said "Go home." (It rained.) Then he left.', 3) == [
        'She said "Go home."', "(It rained.)", "Then he left."]
    assert tm.top_confidence_accuracy([0.1, 0.9, 0.5, 0.3], [1, 1, 0, 0], 1) == 100.0  # ceil -> 1 answer
    assert tm.top_confidence_accuracy([0.1, 0.9, 0.5, 0.3], [1, 1, 0, 0], 75) == pytest.approx(100 / 3)
    # a fraction of an answer rounds up: 50% of 5 answers is the top 3, not the top 2
    assert tm.top_confidence_accuracy([0.9, 0.8, 0.7, 0.1, 0.2], [1, 1, 0, 0, 0], 50) == pytest.approx(200 / 3)


def test_answer_normalization_in_the_official_order_and_articles_as_whole_words():
    """The official script removes punctuation before articles ("the-end" is then one word, not an article), and
    an article is a whole word at both ends (a word ending in "a" keeps it)."""
    assert tm.normalize_answer("the-end") == "theend"
    assert tm.normalize_answer("A pizza, a banana") == "pizza banana"


def test_coqa_two_gold_answers_are_left_out_in_turn_and_none_is_an_error():
    # leaving out "white" leaves "gray" (0), leaving out "gray" leaves "white" (1): the mean, not the best
    assert tm.coqa_turn_scores(["white", "gray"], "white") == (0.5, 0.5)
    with pytest.raises(ValueError, match="at least one gold answer"):
        tm.coqa_turn_scores([], "white")


def test_first_sentences_end_at_question_marks_wide_spaces_and_curly_quotes():
    text = "Is it late?  Yes, it is. He said \u201cGo.\u201d \u201cNow?\u201d She left."
    assert tm.first_sentences(text, 9) == ["Is it late?", "Yes, it is.", "He said \u201cGo.\u201d", "\u201cNow?\u201d",
                                           "She left."]


def test_metrics_of_nothing_and_of_unpaired_lists():
    assert math.isnan(tm.top_confidence_accuracy([], [], 1))  # no answers: no accuracy, not 0%
    with pytest.raises(ValueError):  # a summary without its reference is an error, not silently dropped
        tm.rouge_f1(["a b", "c d"], ["a b"])


def test_corpus_bleu_is_case_sensitive_and_smoothed_as_mteval():
    # "The" is not "the" (sacrebleu's default, case:mixed): 1-grams 5/6, 2-grams 4/5, 3-grams 3/4, 4-grams 2/3
    assert tm.corpus_bleu(["the cat sat on the mat"], ["The cat sat on the mat"])["bleu"] == pytest.approx(
        100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)
    # no 4-gram right: the default 'exp' smoothing of mteval-v13a counts it as 1 / (2 * 2 4-grams), not as 0
    assert tm.corpus_bleu(["a b c x e"], ["a b c d e"])["bleu"] == pytest.approx(
        100 * (4 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25)


def test_paper_numbers_are_the_papers():
    """§3.5 (CoQA F1), Table 4 (CNN/DM, GPT-2 TL;DR: and the no-hint ablation), §3.7 (WMT14 BLEU), §3.8 (NQ exact
    match, accuracy on the 1% most confident), §3.4 (Winograd)."""
    assert tm.PAPER_TRANSFER == {
        "coqa": {"f1": 55.0},
        "cnndm": {"rouge1": 29.34, "rouge2": 8.27, "rougeL": 26.58, "nohint_rouge1": 21.58, "nohint_rouge2": 4.03,
                  "nohint_rougeL": 19.47},
        "wmt14-en-fr": {"bleu": 5.0}, "wmt14-fr-en": {"bleu": 11.5},
        "nq": {"em": 4.1, "acc_top1pct": 63.1},
        "winograd": {"acc_best": 70.70}}


def test_transfer_table_shows_the_papers_numbers_only_beside_its_largest_model():
    results = {"coqa": {"metrics": {"f1": 12.5, "em": math.nan, "questions": 3}},
               "lambada": {"metrics": {"ppl": 40.0}}}  # a Table 3 task: not in this table
    table = tm.format_transfer(results, model_name="mine", paper_size="1542M").split("\n")
    assert table == ["| task | metric | mine | paper 1542M |", "|---|---|---|---|", "| coqa | f1 | 12.50 | 55.00 |",
                     "| coqa | em | - | - |", "| coqa | questions | 3 | - |"]
    smaller = tm.format_transfer(results, model_name="mine", paper_size="117M").split("\n")
    assert smaller[2:] == ["| coqa | f1 | 12.50 | - |", "| coqa | em | - | - |", "| coqa | questions | 3 | - |"]
    assert tm.format_transfer({"lambada": results["lambada"]}) == ""


def test_transfer_table_leaves_out_what_is_not_a_number():
    table = tm.format_transfer({"coqa": {"metrics": {"f1": 12.5, "decoding": "greedy"}}})
    assert table.split("\n")[2:] == ["| coqa | f1 | 12.50 | - |"]


def test_a_missing_metric_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(tm.MissingExtraError, match=r"pip install 'gpt2kit\[eval\]'"):
        tm.corpus_bleu(["a"], ["a"])
    with pytest.raises(tm.MissingExtraError, match="'sacrebleu' package"):
        get_task("wmt14-en-fr")(tmp_path)  # before any generation
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(tm.MissingExtraError, match="'rouge-score' package"):
        get_task("cnndm")(tmp_path)


# ----------------------------------------------------------------------------- prompts, exactly as the paper

def _prompt(task, tokenizer, i=0):
    docs = task.documents()
    req = task.requests(docs[i], tokenizer)[0]
    return tokenizer.decode(list(req.context) + list(getattr(req, "suffix", ())))


def test_coqa_prompt_and_gold_answers(data_dir, tokenizer):
    convs = parse_coqa(data_dir / "coqa-dev-v1.0.json")
    assert convs[0].golds[1] == ("in a barn", "in a barn", "barn", "near a farm house")
    assert coqa_prompt(convs[0], 1) == (
        "Once upon a time, in a barn near a farm house, there lived a little white kitten named Cotton.\n\n"
        "Q: what color was cotton?\nA: white\nQ: where did she live?\nA:")
    # the history shows the official answer, not one of the additional ones
    import dataclasses

    other = dataclasses.replace(convs[0], golds=(("white", "white kitten", "a white cat"), convs[0].golds[1]))
    assert coqa_prompt(other, 1).endswith("Q: what color was cotton?\nA: white\nQ: where did she live?\nA:")
    task = get_task("coqa")(data_dir)
    reqs = task.requests(convs[0], tokenizer)
    assert len(reqs) == 2 and reqs[0].stop == ("\n",) and not reqs[0].do_sample
    assert tokenizer.decode(list(reqs[0].context)).endswith("Cotton.\n\nQ: what color was cotton?\nA:")


def test_cnndm_prompt_reads_story_files_and_jsonl(data_dir, tokenizer, tmp_path):
    task = get_task("cnndm")(data_dir)
    doc = task.documents()[0]
    assert doc.highlights == ("City council discussed the new park", "The plan will be ready by spring")
    assert doc.text.startswith("(CNN) -- The city council met") and "@highlight" not in doc.text
    hint, nohint = task.requests(doc, tokenizer)
    assert tokenizer.decode(list(hint.context) + list(hint.suffix)) == doc.text + "\nTL;DR:"
    assert tokenizer.decode(list(nohint.context) + list(nohint.suffix)) == doc.text
    assert (hint.do_sample, hint.top_k, hint.max_new_tokens, hint.truncate) == (True, 2, 100, "right")
    (tmp_path / "cnndm_test.jsonl").write_text(_jsonl([{"id": "a", "article": "Text one. Two.",
                                                         "highlights": "First.\nSecond."}]))
    assert get_task("cnndm")(tmp_path).documents()[0].highlights == ("First.", "Second.")


def test_wmt_prompt_pairs_from_sgm_and_examples_excluded(data_dir, tokenizer):
    task = get_task("wmt14-en-fr")(data_dir, shots=2)
    docs = task.documents()
    assert len(docs) == 2  # 4 pairs, the first 2 are the examples
    assert docs[0][0] == ("Spectacular Wingsuit Jump Over Bogota = Saut spectaculaire en wingsuit au-dessus de Bogota\n"
                          "Sportsman Jhonathan Florez jumped from a helicopter above Bogota & the capital. = Le sportif "
                          "Jhonathan Florez a sauté d'un hélicoptère au-dessus de Bogota & la capitale.\n"
                          "Wearing a wingsuit, he flew past over the famous Monserrate Sanctuary. =")
    assert docs[0][2] == "Vêtu d'une wingsuit, il est passé au-dessus du célèbre sanctuaire Monserrate."
    fr_en = get_task("wmt14-fr-en")(data_dir, shots=1).documents()
    assert fr_en[-1][0].endswith("\nC'était un record. =") and fr_en[-1][2] == "It was a record."
    assert task.protocol()["examples"] == "first 2 pairs of the test set (not scored)"


def test_wmt_plain_files_and_dev_examples(tmp_path):
    (tmp_path / "newstest2014.en").write_text("Hello.\nGood night.\n")
    (tmp_path / "newstest2014.fr").write_text("Bonjour.\nBonne nuit.\n")
    (tmp_path / "newstest2013.en").write_text("Yes.\n")
    (tmp_path / "newstest2013.fr").write_text("Oui.\n")
    docs = get_task("wmt14-en-fr")(tmp_path, shots=1).documents()
    assert [d[0] for d in docs] == ["Yes. = Oui.\nHello. =", "Yes. = Oui.\nGood night. ="]
    (tmp_path / "newstest2014.fr").write_text("Bonjour.\n")
    with pytest.raises(TaskError, match="has 2 sentences but .* has 1"):
        get_task("wmt14-en-fr")(tmp_path).documents()


def test_only_newlines_end_lines_of_line_oriented_files(tmp_path):
    """U+2028, U+0085 or a form feed inside a sentence or a JSON string is text, not a line end (str.splitlines
    would split there): the files stay aligned and JSON lines stay whole."""
    (tmp_path / "newstest2014.en").write_text("Hello\u2028there.\nGood\x85night.\nBye.\n")
    (tmp_path / "newstest2014.fr").write_text("Bonjour.\nBonne nuit.\nSalut.\n")
    docs = get_task("wmt14-en-fr")(tmp_path, shots=1).documents()
    assert [d[1:] for d in docs] == [("Good\x85night.", "Bonne nuit."), ("Bye.", "Salut.")]
    rows = [{**NQ[0], "question": "who sings\u2028does he love me"}, *NQ[1:3]]
    (tmp_path / "NQ-open.dev.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    docs = get_task("nq")(tmp_path, shots=1).documents()
    assert docs[0][0].startswith("Q: who sings\u2028does he love me\nA: Linda Davis\n\n") and len(docs) == 2
    row = {"article": "Rain\u2028fell.", "highlights": "It rained\u2028all day\nThen\x0cstopped"}
    (tmp_path / "cnndm_test.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    doc, = get_task("cnndm")(tmp_path).documents()
    assert doc.highlights == ("It rained\u2028all day", "Then\x0cstopped")


def test_wmt_and_nq_answers_are_one_greedy_line(data_dir, tokenizer):
    for task in (get_task("wmt14-en-fr")(data_dir, shots=1), get_task("nq")(data_dir, shots=1)):
        req, = task.requests(task.documents()[0], tokenizer)
        assert req.stop == ("\n",) and not req.do_sample, task.name


def test_nq_prompt(data_dir):
    docs = get_task("nq")(data_dir, shots=2).documents()
    assert len(docs) == 3
    assert docs[0][0] == ("Q: who sings does he love me with reba\nA: Linda Davis\n\n"
                          "Q: where is the bowling hall of fame located\nA: Arlington, Texas\n\n"
                          "Q: when was the last time anyone was on the moon\nA:")


def test_winograd_substitution_and_requests(data_dir, tokenizer):
    task = get_task("winograd")(data_dir)
    docs = task.documents()
    assert docs[0].options == ("the city councilmen", "the demonstrators")  # lower-cased inside the sentence
    assert docs[1].options == ("the trophy's", "the suitcase's")  # possessive pronoun
    assert docs[0].after == " feared violence."
    reqs = task.requests(docs[0], tokenizer)
    assert tokenizer.decode(list(reqs[0].continuation)) == ("The city councilmen refused the demonstrators a permit "
                                                           "because the city councilmen feared violence.")
    assert tokenizer.decode(list(reqs[3].context)).endswith("because the demonstrators")
    assert tokenizer.decode(list(reqs[3].continuation)) == " feared violence."


@pytest.mark.parametrize("text", ['{"version": "1.0"}', '{"data": {}}', '{"data": "abc"}'])
def test_coqa_file_without_a_data_list_is_an_error(tmp_path, text):
    (tmp_path / "coqa-dev-v1.0.json").write_text(text)
    with pytest.raises(TaskError, match="coqa-dev-v1.0.json: expected CoQA's JSON"):
        get_task("coqa")(tmp_path).documents()


def test_cnndm_story_files_keep_paragraph_lines_and_need_both_parts(tmp_path):
    folder = tmp_path / "cnndm"
    folder.mkdir()
    with pytest.raises(MissingDataError):  # a folder without .story files is not the dataset
        get_task("cnndm")(tmp_path).path  # noqa: B018
    (folder / "a.story").write_text(STORY)
    (tmp_path / "cnndm_test.jsonl").write_text(_jsonl([{"article": "From JSONL.", "highlights": "One."}]))
    assert get_task("cnndm")(tmp_path).documents()[0].text == "From JSONL."  # the JSONL split comes first
    (tmp_path / "cnndm_test.jsonl").unlink()
    assert get_task("cnndm")(tmp_path).documents()[0].text == (
        "(CNN) -- The city council met on Monday to discuss the new park. Residents asked for more trees.\n"
        "The mayor said the plan would be ready by spring. Work starts in May!")
    for text in ("An article without highlights.\n", "@highlight\n\nA highlight without an article\n"):
        (folder / "a.story").write_text(text)
        with pytest.raises(TaskError, match="a.story: expected a .story file"):
            get_task("cnndm")(tmp_path).documents()


def test_cnndm_story_files_are_read_in_name_order(tmp_path):
    (tmp_path / "cnndm").mkdir()
    names = ["e", "b", "d", "a", "c", "f"]
    for n in names:
        (tmp_path / "cnndm" / f"{n}.story").write_text(f"Article {n}.\n\n@highlight\n\nHighlight {n}\n")
    task = get_task("cnndm")(tmp_path)
    assert [d.id for d in task.documents()] == sorted(names)
    assert [d.id for d in task.documents(limit=2)] == ["a", "b"]


def test_cnndm_jsonl_drops_blank_highlight_lines(tmp_path):
    (tmp_path / "cnndm_test.jsonl").write_text(_jsonl([{"article": "Text.", "highlights": "First.\n\n Second. \n"},
                                                       {"article": "Text.", "highlights": ["One.", " ", "Two."]}]))
    docs = get_task("cnndm")(tmp_path).documents()
    assert [d.highlights for d in docs] == [("First.", "Second."), ("One.", "Two.")]


def test_cnndm_aggregate_scores_each_variant_and_averages_r1_r2_rl(data_dir):
    ref = "The park opens in May.\nTrees are planted."
    scores = [{"reference": ref, "hint": "The park opens.\nTrees in May.", "nohint": "Nothing here.",
               "lead3": "Trees are planted in the park."}]
    m = get_task("cnndm")(data_dir).aggregate(scores)
    for variant, prefix in (("hint", ""), ("nohint", "nohint_"), ("lead3", "lead3_")):
        r = tm.rouge_f1([ref], [scores[0][variant]])
        assert {k: m[prefix + k] for k in r} == pytest.approx(r), variant
        assert m[prefix + "avg"] == pytest.approx((r["rouge1"] + r["rouge2"] + r["rougeL"]) / 3), variant  # not Lsum
    assert m["rougeLsum"] != pytest.approx(m["rougeL"])


def test_wmt_files_in_the_archives_folders_crlf_and_blank_lines(tmp_path):
    """newstest2014 in test-full/ (test-full.tgz), newstest2013 in dev/ (dev.tgz); \\r and spaces around a
    sentence are not part of it, and a blank line pairs nothing."""
    (tmp_path / "test-full").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test-full" / "newstest2014-fren-src.en.sgm").write_text(SGM_EN.replace(">It was", "> It was"))
    (tmp_path / "test-full" / "newstest2014-fren-ref.fr.sgm").write_text(SGM_FR)
    (tmp_path / "dev" / "newstest2013.en").write_bytes(b"Yes. \r\n\r\nNo.\r\n")
    (tmp_path / "dev" / "newstest2013.fr").write_bytes(b" Oui.\r\n\r\nNon.\r\n")
    task = get_task("wmt14-en-fr")(tmp_path, shots=2)
    docs = task.documents()
    assert len(docs) == 4 and docs[3][0] == "Yes. = Oui.\nNo. = Non.\nIt was a record. ="
    assert task.protocol()["reference_file"] == str(tmp_path / "test-full" / "newstest2014-fren-ref.fr.sgm")
    with pytest.raises(TaskError, match=r"newstest2013.en: expected at least 3 sentence pairs"):
        get_task("wmt14-en-fr")(tmp_path, shots=3).documents()
    zero = get_task("wmt14-en-fr")(tmp_path, shots=0).documents()  # zero-shot: the sentence and " =" alone
    assert [d[0] for d in zero][:1] == ["Spectacular Wingsuit Jump Over Bogota ="] and len(zero) == 4
    for lang in ("en", "fr"):  # dev.tgz has newstest2013 as SGML too, named without "fren"
        (tmp_path / "dev" / f"newstest2013.{lang}").unlink()
    (tmp_path / "dev" / "newstest2013-src.en.sgm").write_text(SGM_EN.replace("2014", "2013"))
    (tmp_path / "dev" / "newstest2013-ref.fr.sgm").write_text(SGM_FR.replace("2014", "2013"))
    task = get_task("wmt14-en-fr")(tmp_path, shots=1)
    assert task.protocol()["examples"] == "first 1 pairs of newstest2013-src.en.sgm"
    assert task.documents()[0][0].startswith("Spectacular Wingsuit Jump Over Bogota = Saut spectaculaire")


def test_wmt_test_set_too_small_for_its_examples_or_without_segments(tmp_path, data_dir):
    with pytest.raises(TaskError, match="--shots must be at least 0, got -1"):
        get_task("wmt14-en-fr")(data_dir, shots=-1)
    with pytest.raises(TaskError, match="expected more than 4 sentence pairs"):  # 4 pairs, all examples
        get_task("wmt14-en-fr")(data_dir, shots=4).documents()
    (tmp_path / "newstest2014-fren-src.en.sgm").write_text("<srcset>\n</srcset>\n")
    (tmp_path / "newstest2014-fren-ref.fr.sgm").write_text(SGM_FR)
    with pytest.raises(TaskError, match="src.en.sgm: expected SGML with <seg"):
        get_task("wmt14-en-fr")(tmp_path, shots=1).documents()


def test_nq_examples_from_the_train_file_leave_every_dev_question_scored(tmp_path, data_dir):
    (tmp_path / "nq-open").mkdir()
    (tmp_path / "nq-open" / "NQ-open.train.jsonl").write_text(_jsonl([
        {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
        {"question": "unused", "answer": ["x"]}]))
    (tmp_path / "NQ-open.dev.jsonl").write_text(_jsonl(NQ[:2]))
    task = get_task("nq")(tmp_path, shots=1)
    assert [d[0] for d in task.documents()] == [  # the example shows the first gold answer
        "Q: who wrote hamlet\nA: Shakespeare\n\nQ: who sings does he love me with reba\nA:",
        "Q: who wrote hamlet\nA: Shakespeare\n\nQ: where is the bowling hall of fame located\nA:"]
    assert task.protocol()["examples"] == "first 1 questions of NQ-open.train.jsonl"
    zero = get_task("nq")(data_dir, shots=0).documents()
    assert len(zero) == 5 and zero[0][0] == "Q: who sings does he love me with reba\nA:"
    with pytest.raises(TaskError, match="expected more than 5 questions"):  # 5 dev questions, all examples
        get_task("nq")(data_dir, shots=5).documents()
    # a train file with fewer questions than the shots asked: an error, not a silently smaller K
    with pytest.raises(TaskError, match=r"NQ-open.train.jsonl: expected at least 3 questions for the examples"):
        get_task("nq")(tmp_path, shots=3).documents()


def test_nq_numeric_answers_are_read_as_text(tmp_path):
    (tmp_path / "NQ-open.dev.jsonl").write_text(_jsonl([{"question": "what year", "answer": [1972]}] * 2))
    assert get_task("nq")(tmp_path, shots=1).documents()[0][1] == ("1972",)


def test_nq_and_coqa_aggregates_of_no_questions(tmp_path):
    nq = get_task("nq")(tmp_path).aggregate([])
    assert set(nq) == {"em", "questions", "acc_top1pct", "acc_top5pct", "acc_top10pct", "acc_top25pct",
                       "acc_top50pct"}
    assert nq["questions"] == 0 and all(math.isnan(v) for k, v in nq.items() if k != "questions")
    coqa = get_task("coqa")(tmp_path).aggregate([])
    assert coqa["questions"] == 0 and math.isnan(coqa["f1"]) and math.isnan(coqa["em"])


def test_winograd_candidate_keeps_its_capital_at_a_sentence_start_only():
    from gpt2kit.eval.tasks.winograd import substitute

    assert substitute("He came back.", "He", 0, "The man") == "The man"  # the text's start
    assert substitute("Stop! He came back.", "He", 6, "The man") == "The man"
    assert substitute("The dog chased the cat. His owner laughed.", "His", 24, "The dog") == "The dog's"
    assert substitute("Joan thanked Anna because she helped.", "she", 26, "Anna") == "Anna"  # a name, not "A"
    assert substitute("Joan thanked Anna because she helped.", "she", 26, "An aunt") == "an aunt"
    # a sentence that ends inside its quotes or brackets still ends there; a quoted word does not
    assert substitute('He shouted "Stop." He ran.', "He", 19, "The man") == "The man"
    assert substitute("(It rained.) He ran.", "He", 13, "The man") == "The man"
    assert substitute('It was "odd" he said.', "he", 13, "The man") == "the man"
    assert substitute('"Why?" she asked the man.', "she", 7, "The woman") == "the woman"  # one sentence
    assert substitute('Bob left. "He was tired," Ann said.', "He", 11, "The man") == "The man"  # a quote opens one


def test_winograd_pronoun_found_whatever_its_case_and_aggregate(tmp_path):
    row = {"text": "Tom hid from Bob. He was scared.", "pronoun": "he", "pronoun_loc": 18, "options": ["Tom", "Bob"],
           "label": 0}
    (tmp_path / "wsc273.jsonl").write_text(_jsonl([row]))
    task = get_task("winograd")(tmp_path)
    assert task.documents()[0].options == ("Tom", "Bob") and task.documents()[0].after == " was scared."
    one = {"acc_full": 1.0, "acc_partial": 0.0}
    other = {"acc_full": 0.0, "acc_partial": 1.0}
    assert task.aggregate([one, one, other]) == {"acc_full": pytest.approx(200 / 3),
                                                 "acc_partial": pytest.approx(100 / 3),
                                                 "acc_best": pytest.approx(200 / 3), "schemas": 3}
    assert task.aggregate([other, other, one])["acc_best"] == pytest.approx(200 / 3)  # the better one, either way
    empty = task.aggregate([])
    assert empty["schemas"] == 0 and math.isnan(empty["acc_full"]) and math.isnan(empty["acc_best"])


def test_hellaswag_context_and_endings(data_dir):
    items = get_task("hellaswag")(data_dir).documents()
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].endings[3] == " starts pulling up roofing on a roof." and items[1].label == 3
    assert items[2].context == "Home and Garden: How to plant a tree. Dig a hole."
    assert items[2].endings[:3] == (" Put the tree in it.", " Eat it.", " Fly away now.")


# ----------------------------------------------------------------------------- scoring vs transformers

def test_winograd_full_and_partial_scoring_match_transformers(model, hf, tokenizer, data_dir):
    task = get_task("winograd")(data_dir)
    docs = task.documents()
    eot = tokenizer.eot_token
    full_right = partial_right = 0
    for d in docs:
        full, partial = [], []
        for o in d.options:
            full.append(hf_logprob(hf, [eot], tokenizer.encode_ordinary(d.before + o + d.after)))
            partial.append(hf_logprob(hf, tokenizer.encode_ordinary(d.before + o), tokenizer.encode_ordinary(d.after)))
        full_right += int(max(range(2), key=full.__getitem__) == d.label)
        partial_right += int(max(range(2), key=partial.__getitem__) == d.label)
        res = Scorer(model, tokenizer, progress=False).score(task.requests(d, tokenizer))
        assert [r.logprob for r in res] == pytest.approx(full + partial, abs=1e-3)
    m = evaluate(model, tokenizer, ["winograd"], data_dir, progress=False)["winograd"]["metrics"]
    assert m["acc_full"] == pytest.approx(100 * full_right / 3)
    assert m["acc_partial"] == pytest.approx(100 * partial_right / 3)
    assert m["acc_best"] == max(m["acc_full"], m["acc_partial"]) and m["schemas"] == 3


def test_hellaswag_length_normalized_choice_matches_an_independent_computation(model, hf, tokenizer, data_dir):
    items = get_task("hellaswag")(data_dir).documents()
    right = {"acc": 0, "acc_norm": 0, "acc_token_norm": 0}
    for it in items:
        ctx = tokenizer.encode_ordinary(it.context)
        lps = [hf_logprob(hf, ctx, tokenizer.encode_ordinary(e)) for e in it.endings]
        by = {"acc": lps, "acc_norm": [lp / len(e.encode()) for lp, e in zip(lps, it.endings)],
              "acc_token_norm": [lp / len(tokenizer.encode_ordinary(e)) for lp, e in zip(lps, it.endings)]}
        for k, v in by.items():
            right[k] += int(max(range(4), key=v.__getitem__) == it.label)
    m = evaluate(model, tokenizer, ["hellaswag"], data_dir, batch_size=3, progress=False)["hellaswag"]["metrics"]
    for k in right:
        assert m[k] == pytest.approx(100 * right[k] / 3), k


def test_winograd_full_and_partial_scores_pick_their_own_candidates(data_dir):
    """Full and partial scoring agree on the tiny fixture; here they disagree, and each accuracy follows its own."""
    from gpt2kit.eval.requests import LoglikelihoodResult

    doc = get_task("winograd")(data_dir).documents()[0]
    full, partial = [-30.0, -20.0], [-5.0, -9.0]   # full scoring picks option 1, partial option 0
    res = [LoglikelihoodResult(x, False, 5) for x in full + partial]
    scores = get_task("winograd")(data_dir).score(doc, res)
    assert (scores["acc_full"], scores["acc_partial"]) == (float(doc.label == 1), float(doc.label == 0))


def test_hellaswag_normalizes_by_utf8_bytes_not_characters(data_dir):
    from gpt2kit.eval.requests import LoglikelihoodResult
    from gpt2kit.eval.tasks.hellaswag import Item

    item = Item("Cooking: She", (" sautéed éé", " fried eggs"), 0)   # 14 bytes in 11 characters; 11 in 11
    res = [LoglikelihoodResult(-12.0, False, 10), LoglikelihoodResult(-11.5, False, 2)]
    # per byte -0.86 beats -1.05 (per character -1.09 would lose); raw -12 loses; per token -1.2 beats -5.75
    assert get_task("hellaswag")(data_dir).score(item, res) == {"acc": 0.0, "acc_norm": 1.0, "acc_token_norm": 1.0}


def test_generation_requests_match_transformers_greedy_one_by_one(model, hf, tokenizer, data_dir):
    """CoQA's batched greedy answers (through gpt2kit.generate) equal a per-example transformers loop."""
    task = get_task("coqa")(data_dir)
    reqs = [r for d in task.documents() for r in task.requests(d, tokenizer)]
    ours = Scorer(model, tokenizer, batch_size=3, progress=False).score(reqs)
    for r, res in zip(reqs, ours):
        assert res.text == hf_greedy_line(hf, tokenizer, list(r.context), r.max_new_tokens)
        assert res.logprob == pytest.approx(hf_logprob(hf, list(r.context), list(res.tokens)), abs=1e-3)


def test_coqa_and_nq_score_the_models_own_answers_as_right(model, tokenizer, tmp_path):
    """Gold answers set to what the model generates must score F1/EM 100 (and others 0)."""
    root = write_transfer_datasets(tmp_path / "d")
    coqa = get_task("coqa")(root)
    reqs = [r for d in coqa.documents() for r in coqa.requests(d, tokenizer)]
    answers = [c.text.strip() for c in generate(model, tokenizer, [list(r.context) for r in reqs],
                                                max_new_tokens=48, do_sample=False, stop="\n")]
    data = json.loads(json.dumps(COQA))
    # turn 1 right for 1 gold of 4 (leave-one-out); the history in turn 2's prompt stays the same
    data["data"][0]["additional_answers"]["0"][0]["input_text"] = answers[0]
    data["data"][1]["answers"][0]["input_text"] = answers[2]  # single gold: right
    data["data"][2]["answers"][0]["input_text"] = answers[3] + " zebra"
    (root / "coqa-dev-v1.0.json").write_text(json.dumps(data))
    m = evaluate(model, tokenizer, ["coqa"], root, progress=False)["coqa"]["metrics"]
    e1, f1 = tm.coqa_turn_scores(["white", answers[0], "white kitten", "white"], answers[0])
    e2, f2 = tm.coqa_turn_scores(["in a barn", "in a barn", "barn", "near a farm house"], answers[1])
    e4, f4 = tm.coqa_turn_scores([answers[3] + " zebra"], answers[3])
    assert m["questions"] == 4
    assert m["f1"] == pytest.approx(100 * (f1 + f2 + 1 + f4) / 4)
    assert m["em"] == pytest.approx(100 * (e1 + e2 + 1 + e4) / 4)

    nq = get_task("nq")(root, shots=1)
    docs = nq.documents()
    prompts = [list(nq.requests(d, tokenizer)[0].context) for d in docs]
    comps = generate(model, tokenizer, prompts, max_new_tokens=32, do_sample=False, stop="\n", top_logprobs=0)
    rows = [NQ[0]] + [{"question": q["question"], "answer": [c.text.strip() if i % 2 == 0 else "nothing like it"]}
                      for i, (q, c) in enumerate(zip(NQ[1:], comps))]
    (root / "NQ-open.dev.jsonl").write_text(_jsonl(rows))
    out = evaluate(model, tokenizer, ["nq"], root, progress=False, task_options={"shots": 1})["nq"]
    correct = [1.0 if i % 2 == 0 else 0.0 for i in range(4)]
    conf = [math.exp(sum(c.logprobs)) for c in comps]
    assert out["metrics"]["em"] == 50.0 and out["metrics"]["questions"] == 4
    assert out["metrics"]["acc_top1pct"] == 100.0 * correct[max(range(4), key=conf.__getitem__)]
    assert out["metrics"]["acc_top50pct"] == tm.top_confidence_accuracy(conf, correct, 50)
    assert out["protocol"]["shots"] == 1 and out["protocol"]["decoding"] == "greedy"


def test_cnndm_sampling_is_seeded_and_keeps_the_hint_when_truncating(model, tokenizer, data_dir, tmp_path):
    long_article = " ".join(f"Sentence number {i} says something about the park." for i in range(60))
    (tmp_path / "cnndm_test.jsonl").write_text(_jsonl([{"article": long_article, "highlights": ["Park news."]}]))
    task = get_task("cnndm")(tmp_path, seed=3)
    reqs = task.requests(task.documents()[0], tokenizer)
    assert len(reqs[0].context) > 256  # longer than the tiny model's context
    scorer = Scorer(model, tokenizer, batch_size=1, progress=False)  # a batch shares one seeded generator
    a = scorer.score(reqs)
    # the prompt the model saw: the article's start (it lost its end), then the hint
    kept = 256 - 100 - len(reqs[0].suffix)
    expected = generate(model, tokenizer, [list(reqs[0].context[:kept] + reqs[0].suffix)], max_new_tokens=100,
                        do_sample=True, top_k=2, seed=3)[0].text
    assert a[0].text == expected
    again = get_task("cnndm")(tmp_path, seed=3).requests(task.documents()[0], tokenizer)
    assert [r.text for r in scorer.score(again)] == [r.text for r in a]
    other = get_task("cnndm")(tmp_path, seed=4).requests(task.documents()[0], tokenizer)
    assert [r.text for r in scorer.score(other)] != [r.text for r in a]


def test_cnndm_metrics_are_rouge_of_the_first_three_sentences(model, tokenizer, data_dir):
    out = evaluate(model, tokenizer, ["cnndm"], data_dir, progress=False, task_options={"seed": 7})["cnndm"]
    task = get_task("cnndm")(data_dir, seed=7)
    docs = task.documents()
    reqs = [r for d in docs for r in task.requests(d, tokenizer)]
    res = Scorer(model, tokenizer, progress=False).score(reqs)
    refs = ["\n".join(d.highlights) for d in docs]
    hint = tm.rouge_f1(refs, ["\n".join(tm.first_sentences(r.text, 3)) for r in res[0::2]])
    lead = tm.rouge_f1(refs, ["\n".join(tm.first_sentences(d.text, 3)) for d in docs])
    assert out["metrics"]["rouge1"] == pytest.approx(hint["rouge1"])
    assert out["metrics"]["rougeL"] == pytest.approx(hint["rougeL"])
    assert out["metrics"]["lead3_rouge2"] == pytest.approx(lead["rouge2"]) and lead["rouge2"] > 0
    assert out["protocol"]["seed"] == 7 and out["protocol"]["decoding"] == "top-k 2 sampling"


def test_cnndm_summary_is_the_first_three_generated_sentences(data_dir):
    """The tiny model rarely writes three sentences, so the cut is checked on a text that has more."""
    from gpt2kit.eval.requests import GenerationResult

    task = get_task("cnndm")(data_dir, seed=7)
    doc = task.documents()[0]
    text = " The mayor spoke. Roads closed at noon! \"Why?\" asked one. A fourth sentence. A fifth."
    s = task.score(doc, [GenerationResult(text, (), 0.0), GenerationResult("One. Two. Three. Four.", (), 0.0)])
    assert s["hint"] == 'The mayor spoke.\nRoads closed at noon!\n"Why?" asked one.'
    assert s["nohint"] == "One.\nTwo.\nThree."
    assert s["lead3"] == "\n".join(tm.first_sentences(doc.text, 3)) and s["reference"] == "\n".join(doc.highlights)


def test_wmt_bleu_of_the_generated_lines(model, tokenizer, data_dir):
    out = evaluate(model, tokenizer, ["wmt14-fr-en"], data_dir, progress=False, task_options={"shots": 1})
    task = get_task("wmt14-fr-en")(data_dir, shots=1)
    docs = task.documents()
    comps = generate(model, tokenizer, [d[0] for d in docs], max_new_tokens=160, do_sample=False, stop="\n")
    expected = tm.corpus_bleu([d[2] for d in docs], [c.text.strip() for c in comps])["bleu"]
    assert out["wmt14-fr-en"]["metrics"] == {"bleu": pytest.approx(expected), "sentences": 3}
    assert out["wmt14-fr-en"]["protocol"]["bleu_signature"].startswith("nrefs:1")


def test_generation_requests_keep_the_end_of_a_long_context_and_their_own_seed(model, tokenizer):
    """A context too long for the prompt loses its start (`truncate="left"`, the default), the suffix stays whole,
    an empty prompt is <|endoftext|>; requests that differ only in their seed are sampled apart, each as it would
    be on its own."""
    n_ctx = model.config.n_ctx
    g = torch.Generator().manual_seed(5)
    long = tuple(torch.randint(0, 50000, (n_ctx + 40,), generator=g).tolist())
    short = tuple(tokenizer.encode_ordinary("Once upon a time"))
    sampled = dict(do_sample=True, top_k=5)
    reqs = [Generation(long, 20), Generation(long, 20, suffix=(13,)), Generation((), 20),
            Generation(short, 20, seed=1, **sampled), Generation(short, 20, seed=2, **sampled)]
    res = Scorer(model, tokenizer, batch_size=4, progress=False).score(reqs)
    prompts = [list(long[-(n_ctx - 20):]), list(long[-(n_ctx - 21):]) + [13], [tokenizer.eot_token]]
    for r, c in zip(res[:3], generate(model, tokenizer, prompts, max_new_tokens=20, do_sample=False, top_logprobs=0)):
        assert r.tokens == tuple(c.token_ids) and r.logprob == pytest.approx(sum(c.logprobs), rel=1e-4)
    for r, seed in zip(res[3:], (1, 2)):
        alone = generate(model, tokenizer, [list(short)], max_new_tokens=20, seed=seed, **sampled)[0]
        assert r.tokens == tuple(alone.token_ids)
    assert res[3].tokens != res[4].tokens


def test_generation_request_errors(model, tokenizer):
    scorer = Scorer(model, tokenizer, progress=False)
    with pytest.raises(Exception, match="max_new_tokens"):
        scorer.score([Generation((1, 2), 256)])
    with pytest.raises(Exception, match="truncate"):
        scorer.score([Generation((1, 2), 4, truncate="middle")])


# ----------------------------------------------------------------------------- errors, CLI

def test_missing_files_name_the_expected_file_and_source(tmp_path):
    expected = {"coqa": "coqa-dev-v1.0.json", "cnndm": "cnndm/*.story", "wmt14-en-fr": "newstest2014-fren-src.en.sgm",
                "wmt14-fr-en": "newstest2014.fr", "nq": "NQ-open.dev.jsonl", "winograd": "wsc273.jsonl",
                "hellaswag": "hellaswag_val.jsonl"}
    for name, file in expected.items():
        with pytest.raises(MissingDataError, match="normally obtained from") as e:
            get_task(name)(tmp_path).path  # noqa: B018
        assert file in str(e.value) and name in str(e.value)


def test_bad_files_name_the_line(tmp_path):
    (tmp_path / "wsc273.jsonl").write_text(json.dumps({**WSC[0], "pronoun_loc": 3}) + "\n")
    with pytest.raises(TaskError, match="line 1: \"pronoun_loc\" 3 does not point"):
        get_task("winograd")(tmp_path).documents()
    (tmp_path / "NQ-open.dev.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(TaskError, match="NQ-open.dev.jsonl: line 1"):
        get_task("nq")(tmp_path).documents()
    (tmp_path / "hellaswag_val.jsonl").write_text('{"ctx_a": 1}\n')
    with pytest.raises(TaskError, match="hellaswag_val.jsonl: line 1"):
        get_task("hellaswag")(tmp_path).documents()
    (tmp_path / "coqa-dev-v1.0.json").write_text("[]")
    with pytest.raises(TaskError, match="coqa-dev-v1.0.json: expected CoQA"):
        get_task("coqa")(tmp_path).documents()


@pytest.mark.parametrize("task, file, row, message", [
    # a question without its gold answer would only fail when scored, after every generation
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][0], "answers": COQA["data"][0]["answers"][:1]},
     r"story 0: expected one answer per question in \"answers\" \(2 questions, 1 answers\)"),
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][0], "additional_answers": [[]]},
     r"story 0: expected \"additional_answers\" to be an object of answer lists"),
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][0], "additional_answers": {"0": COQA["data"][0]["answers"][:1]}},
     r"story 0: expected one answer per question in \"additional_answers\" \"0\" \(2 questions, 1 answers\)"),
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][2], "questions": [{"input_text": None, "turn_id": 1}]},
     "story 0: expected"),
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][2], "story": 5}, "story 0: expected"),
    ("winograd", "wsc273.jsonl", {**WSC[0], "text": 5}, "wsc273.jsonl: line 1: expected"),
    ("winograd", "wsc273.jsonl", {**WSC[0], "options": "ab"}, "wsc273.jsonl: line 1: expected"),
    ("winograd", "wsc273.jsonl", {**WSC[0], "pronoun": None}, "wsc273.jsonl: line 1: expected"),
    ("hellaswag", "hellaswag_val.jsonl", {**HELLASWAG[0], "endings": [1, 2, 3, 4]}, "hellaswag_val.jsonl: line 1"),
    ("hellaswag", "hellaswag_val.jsonl", {**HELLASWAG[0], "endings": "abcd"}, "hellaswag_val.jsonl: line 1"),
    ("hellaswag", "hellaswag_val.jsonl", {**HELLASWAG[0], "ctx_a": None}, "hellaswag_val.jsonl: line 1"),
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][2], "answers": COQA["data"][2]["answers"] * 2},
     r"story 0: expected one answer per question in \"answers\" \(1 questions, 2 answers\)"),
    ("winograd", "wsc273.jsonl", {**WSC[2], "label": -1}, "line 1: expected at least two \"options\" and a \"label\""),
    ("winograd", "wsc273.jsonl", {**WSC[2], "label": 2}, "line 1: expected at least two \"options\" and a \"label\""),
    ("winograd", "wsc273.jsonl", {**WSC[2], "options": ["Susan"], "label": 0}, "line 1: expected at least two"),
    ("winograd", "wsc273.jsonl", {**WSC[2], "options": ["Joan", 2]}, "line 1: expected .* as strings"),
    ("winograd", "wsc273.jsonl", {**WSC[2], "pronoun": ""}, "line 1: expected .* as strings"),
    ("winograd", "wsc273.jsonl", {**WSC[2], "text": "Joan thanked Susan for all the help she", "pronoun_loc": 36},
     "line 1: nothing follows the pronoun"),
    ("nq", "NQ-open.dev.jsonl", {"question": "q", "answer": []}, "NQ-open.dev.jsonl: line 1: expected"),
    ("nq", "NQ-open.dev.jsonl", {"question": None, "answer": ["a"]}, "NQ-open.dev.jsonl: line 1: expected"),
    ("cnndm", "cnndm_test.jsonl", {"article": 5, "highlights": "One."}, "cnndm_test.jsonl: line 1: expected"),
    ("cnndm", "cnndm_test.jsonl", {"article": "Text.", "highlights": ["", " "]}, "cnndm_test.jsonl: line 1: expected"),
    ("cnndm", "cnndm_test.jsonl", {"article": "Text.", "highlights": [1]}, "cnndm_test.jsonl: line 1: expected"),
    ("coqa", "coqa-dev-v1.0.json", {**COQA["data"][2], "questions": ["What is the capital?"]}, "story 0: expected"),
    ("winograd", "wsc273.jsonl", {**WSC[2], "pronoun_loc": "x"}, "wsc273.jsonl: line 1: expected"),
])
def test_fields_of_the_wrong_type_name_the_story_or_line(tmp_path, task, file, row, message):
    """Wrong types and missing answers are one-line errors when the file is read, never a traceback and never
    text like "None" in a prompt."""
    text = json.dumps({"data": [row]}) if task == "coqa" else json.dumps(row) + "\n"
    (tmp_path / file).write_text(text)
    with pytest.raises(TaskError, match=message):
        get_task(task)(tmp_path).documents()


def test_cli_end_to_end_all_transfer_tasks(cli, model_dir, data_dir, tmp_path):
    out = tmp_path / "results.json"
    r = cli("eval", "--model", str(model_dir), "--tasks", ",".join(TASKS), "--data-dir", str(data_dir),
            "--limit", "2", "--batch-size", "4", "--shots", "1", "--seed", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| task | metric | tiny-transfer0 | paper 1542M |" in r.stdout and "| model |" not in r.stdout
    for row in ("| coqa | f1 |", "| cnndm | nohint_rougeL |", "| wmt14-en-fr | bleu |", "| nq | acc_top1pct |",
                "| winograd | acc_partial |", "| hellaswag | acc_norm |"):
        assert row in r.stdout, row
    doc = json.loads(out.read_text())
    assert doc["options"]["shots"] == 1 and doc["options"]["seed"] == 5 and doc["options"]["limit"] == 2
    tasks = doc["tasks"]
    assert set(tasks) == set(TASKS)
    assert tasks["coqa"]["counts"]["documents"] == 2 and tasks["coqa"]["metrics"]["questions"] == 3
    assert tasks["cnndm"]["protocol"]["seed"] == 5 and tasks["cnndm"]["protocol"]["max_new_tokens"] == 100
    assert tasks["wmt14-en-fr"]["protocol"]["shots"] == 1 and tasks["wmt14-en-fr"]["metrics"]["sentences"] == 2
    assert tasks["nq"]["protocol"]["shots"] == 1 and tasks["nq"]["counts"]["documents"] == 2
    assert tasks["winograd"]["counts"]["requests"] == 8 and tasks["hellaswag"]["counts"]["requests"] == 8
    for name in TASKS:
        assert all(isinstance(v, (int, float)) for v in tasks[name]["metrics"].values()), name


def test_cli_missing_transfer_file_is_one_line(model_dir, tmp_path, capsys):
    from gpt2kit.cli import main

    assert main(["eval", "--model", str(model_dir), "--tasks", "coqa", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2kit: error: task 'coqa': none of 'coqa-dev-v1.0.json'") and err.count("\n") == 1
    assert main(["eval", "--model", str(model_dir), "--tasks", "nq", "--shots", "-1", "--data-dir", str(tmp_path)]) == 2
    assert "--shots must be at least 0" in capsys.readouterr().err


def test_metric_docstring_examples():
    import doctest

    result = doctest.testmod(tm)
    assert result.attempted >= 4 and result.failed == 0


def test_a_task_decoding_past_the_context_is_named_before_any_work(tokenizer, tmp_path, monkeypatch):
    # WMT decodes up to 160 tokens: on a 128-token model the scorer stopped the whole run, midway,
    # with "max_new_tokens must be in [1, 128), got 160", naming neither the task nor the cause
    data_dir = write_transfer_datasets(tmp_path / "d")
    small = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=128, vocab_size=tokenizer.n_vocab)).eval()
    monkeypatch.setattr(Scorer, "score", lambda self, requests: pytest.fail("scored before the check"))
    with pytest.raises(TaskError, match=r"^wmt14-en-fr: its protocol decodes up to 160 new tokens, which a model "
                                        r"with a 128-token context cannot hold with a prompt; .* longer than 160 tokens$"):
        evaluate(small, tokenizer, ["coqa", "wmt14-en-fr"], data_dir, limit=1, progress=False,
                 task_options={"shots": 1})
    # CNN/DM: 100 new tokens after its 5-token "\nTL;DR:" suffix need a context of 105
    for n_ctx, refused in ((104, True), (105, False)):
        model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=n_ctx, vocab_size=tokenizer.n_vocab)).eval()
        if refused:
            with pytest.raises(TaskError, match=r"^cnndm: its protocol decodes up to 100 new tokens after its 5-token "
                                                r"prompt suffix, .* longer than 104 tokens$"):
                evaluate(model, tokenizer, ["nq", "cnndm"], data_dir, limit=1, progress=False, task_options={"shots": 1})
        else:
            with pytest.raises(pytest.fail.Exception, match="scored before the check"):  # passes the check
                evaluate(model, tokenizer, ["nq", "cnndm"], data_dir, limit=1, progress=False, task_options={"shots": 1})
