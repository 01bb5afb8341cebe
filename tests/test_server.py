"""The OpenAI-compatible server, live on 127.0.0.1, spoken to by the real `openai` client."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from starlette.requests import ClientDisconnect

from gpt2kit.generate import generate, iter_generate, prompt_logprobs
from gpt2kit.model import GPT2, GPT2Config, PRESETS
from gpt2kit.sampling import SamplingParams
from gpt2kit import server
from gpt2kit.server import create_app
from gpt2kit.tokenizer import Tokenizer

KEY = "test-key-123"
NAME = "tiny-gpt2"


@contextlib.contextmanager
def live(app):
    """Run `app` under uvicorn in a thread, on a free port of 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class SlowGPT2(GPT2):
    """Takes 50 ms per forward step: long enough to see a request still running."""

    def hidden_states(self, *args, **kwargs):
        time.sleep(0.05)
        return super().hidden_states(*args, **kwargs)


def tiny_model(cls=GPT2) -> GPT2:
    torch.manual_seed(0)
    model = cls(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)  # sharp distributions: greedy is not decided by rounding
    return model


def counting_tokenizer() -> tuple[Tokenizer, list[int]]:
    """A GPT-2 tokenizer that records the length of every text it encodes."""
    tok = Tokenizer.gpt2()
    encoded = []
    encode = tok.encode
    tok.encode = lambda text, **kw: encoded.append(len(text)) or encode(text, **kw)
    return tok, encoded


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def url(model, tok):
    with live(create_app(model, tok, model_name=NAME, api_key=KEY, max_concurrency=4)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def test_completion(client, model, tok):
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=8, temperature=0)
    want = generate(model, tok, "Hello world", max_new_tokens=8, do_sample=False)[0]
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 8 and r.usage.total_tokens == 10
    assert [m.id for m in client.models.list().data] == [NAME]


def test_streamed_completion(client, url):
    stream = client.completions.create(model=NAME, prompt="Stream this", max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    plain = client.completions.create(model=NAME, prompt="Stream this", max_tokens=20, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    body = {"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stream_options_include_usage_as_openai_documents(client, url):
    # OpenAI: a last chunk with empty choices and the usage, and "usage": null on every other chunk
    stream = client.completions.create(model=NAME, prompt="Count me", max_tokens=6, temperature=0, n=2, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    plain = client.completions.create(model=NAME, prompt="Count me", max_tokens=6, temperature=0, n=2)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    events = [json.loads(e[6:]) for e in httpx.post(f"{url}/v1/completions", json=body, headers=headers).text.split("\n\n")
              if e.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["completion_tokens"] == 3
    # only with stream: true, as OpenAI answers
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    assert "stream_options" in r.json()["error"]["message"]


def test_n_samples_seed_and_stop(client, model, tok):
    r = client.completions.create(model=NAME, prompt="Two", max_tokens=10, n=2, seed=7)
    again = client.completions.create(model=NAME, prompt="Two", max_tokens=10, n=2, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert r.choices[0].text != r.choices[1].text
    full = client.completions.create(model=NAME, prompt="Stop", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model=NAME, prompt="Stop", max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_and_echo(client, url, model, tok):
    r = client.completions.create(model=NAME, prompt="Score every token", max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = tok.encode("Score every token")
    want, _ = prompt_logprobs(model, ids)
    assert c.text == "Score every token"
    assert c.logprobs.tokens == [tok.decode([t]) for t in ids]
    assert c.logprobs.token_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert c.logprobs.text_offset == [0, 5, 11]
    g = client.completions.create(model=NAME, prompt="Hi", max_tokens=4, temperature=0, logprobs=1).choices[0]
    assert len(g.logprobs.tokens) == 4 and "".join(g.logprobs.tokens) == g.text
    # offsets count from the start of the prompt's text, echoed or not (as OpenAI's API does)
    assert g.logprobs.text_offset == [2 + len("".join(g.logprobs.tokens[:i])) for i in range(4)]
    for stream in (False, True):
        body = {"model": NAME, "prompt": [tok.encode("Hi"), [40, 1101, 257]], "max_tokens": 3, "temperature": 0, "logprobs": 0,
                "n": 2, "stream": stream}
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")] if stream else [r.json()]
        offsets = {}
        for e in events:
            for c in e["choices"]:
                offsets.setdefault(c["index"], []).extend(c["logprobs"]["text_offset"])
        firsts = {i: o[0] for i, o in offsets.items()}
        assert firsts == {0: 2, 1: 2, 2: len(tok.decode([40, 1101, 257])), 3: len(tok.decode([40, 1101, 257]))}
    # greedy: each chosen token is its step's most probable one
    assert all(lp == pytest.approx(max(top.values())) for lp, top in zip(g.logprobs.token_logprobs, g.logprobs.top_logprobs))


def test_bad_requests_get_clear_errors(client, url):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
        client.completions.create(model=NAME, prompt="Hello", max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        client.completions.create(model=NAME, prompt="word " * 70, max_tokens=1)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="temperature: Input should be less than or equal to 2"):
        client.completions.create(model=NAME, prompt="Hello", temperature=5)
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="Hello")
    with pytest.raises(openai.BadRequestError, match="frequency_penalty: Input should be less than or equal to 2"):
        client.completions.create(model=NAME, prompt="Hello", frequency_penalty=2.5)
    with pytest.raises(openai.BadRequestError, match="presence_penalty: Input should be greater than or equal to -2"):
        client.completions.create(model=NAME, prompt="Hello", presence_penalty=-3)
    with pytest.raises(openai.BadRequestError, match=r"best_of: must be at least n \(3\), got 2"):
        client.completions.create(model=NAME, prompt="Hello", best_of=2, n=3)
    with pytest.raises(openai.BadRequestError, match="colour: unknown or unsupported field"):
        client.completions.create(model=NAME, prompt="Hello", extra_body={"colour": "blue"})
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": "many"}, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens" and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": [[1, 99999]]}, headers=headers)
    assert r.status_code == 400 and "token id 99999 is outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={**headers, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # a prompt past the context with max_tokens null (to the end of the context): 400, not 500
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "word " * 70, "max_tokens": None},
                   headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"
    # numbers out of range are the client's error, named
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "seed": 2**64}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "%s", "prompt": "x", "repetition_penalty": Infinity}'
                   % NAME.encode(), headers={**headers, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
    # unknown routes and methods answer in OpenAI's error shape
    r = httpx.get(f"{url}/v1/completions", headers=headers)
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={}, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/completions" in r.json()["error"]["message"]  # says where to go instead
    r = httpx.post(f"{url}/v1/embeddings", json={}, headers=headers)
    assert r.status_code == 404 and "Not Found" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # still serving


def test_penalties_and_logit_bias_are_openais(client, url, model, tok):
    plain = generate(model, tok, "Hello world", max_new_tokens=12, do_sample=False)[0]
    for extra in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0, "frequency_penalty": -0.5},
                  {"logit_bias": {str(plain.token_ids[0]): -100, "13": 4.0}}):
        r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0, **extra)
        bias = {int(k): v for k, v in extra.get("logit_bias", {}).items()}
        want = generate(model, tok, "Hello world", max_new_tokens=12, do_sample=False,
                        presence_penalty=extra.get("presence_penalty"),
                        frequency_penalty=extra.get("frequency_penalty"), logit_bias=bias or None)[0]
        assert r.choices[0].text == want.text
        assert want.text != plain.text, extra  # each option changes this model's greedy text
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=8, seed=5, extra_body={"min_p": 0.3})
    assert r.choices[0].text == generate(model, tok, "Hi", max_new_tokens=8, seed=5, min_p=0.3)[0].text
    assert r.choices[0].text != generate(model, tok, "Hi", max_new_tokens=8, seed=5)[0].text
    forced = client.completions.create(model=NAME, prompt="Hi", max_tokens=3, seed=1, logit_bias={"1000": 100})
    assert forced.choices[0].text == tok.decode([1000] * 3)
    headers = {"Authorization": f"Bearer {KEY}"}
    for bias, message in (({"abc": 1}, "logit_bias: 'abc' is not a token id; expected integers from 0 to 50256"),
                          ({"50257": 1}, "logit_bias: '50257' is not a token id"),
                          ({"-1": 1}, "logit_bias: '-1' is not a token id"),
                          ({"9" * 5000: 1}, "logit_bias: '9999"),
                          ({"5": 101}, 'logit_bias["5"]: Input should be less than or equal to 100'),
                          ({"5": "x"}, 'logit_bias["5"]: Input should be a valid number'),
                          ([5], "logit_bias: Input should be a valid dictionary")):
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "logit_bias": bias},
                       headers=headers)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
        assert r.json()["error"]["param"] == "logit_bias"


def _mean_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """The ranking best_of documents, computed here from one forward pass over the whole text."""
    logprobs, _ = prompt_logprobs(model, prompt + completion)
    return sum(logprobs[len(prompt):]) / len(completion)


def test_best_of_returns_the_most_probable_candidates(client, url, model, tok):
    prompt = tok.encode("Once upon a time")
    for seed in range(20):  # a seed whose best candidate is not the first: the choice is visible
        cands = generate(model, tok, prompt, n=5, max_new_tokens=6, seed=seed, temperature=1.5, stop_at_eot=False)
        scores = [_mean_logprob(model, prompt, c.token_ids) for c in cands]
        order = sorted(range(5), key=lambda i: -scores[i])
        if order[0] != 0:
            break
    else:
        pytest.fail("no seed puts another candidate than the first on top")
    assert len(set(scores)) == 5
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, seed=seed, temperature=1.5,
                                  best_of=5, n=2, logprobs=1)
    assert [c.text for c in r.choices] == [cands[i].text for i in order[:2]]
    assert [c.index for c in r.choices] == [0, 1]
    for c, i in zip(r.choices, order):
        assert c.logprobs.token_logprobs == pytest.approx(prompt_logprobs(model, prompt + cands[i].token_ids)[0][-6:],
                                                          abs=1e-4)
    assert r.usage.completion_tokens == 5 * 6  # every candidate's tokens count
    one = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, seed=seed,
                                    temperature=1.5, best_of=5)  # n 1, no logprobs asked
    assert [c.text for c in one.choices] == [cands[order[0]].text] and one.choices[0].logprobs is None
    echo = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, seed=seed,
                                     temperature=1.5, best_of=5, echo=True)
    assert echo.choices[0].text == "Once upon a time" + cands[order[0]].text
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, message in (({"best_of": 3, "stream": True}, "best_of: cannot stream when best_of > n"),
                          ({"best_of": 0}, "best_of: Input should be greater than or equal to 1"),
                          ({"best_of": 65, "prompt": ["a", "b"]},
                           "best_of: 2 prompts x best_of=65 asks for more than 128 completions")):
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", **body}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
        assert r.json()["error"]["param"] == "best_of"
    # best_of == n chooses nothing, and may stream; best_of 1 (which some clients always send) is n
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=4, seed=2, best_of=1, n=3)
    assert [c.text for c in r.choices] == [c.text for c in generate(model, tok, "Hi", max_new_tokens=4, seed=2, n=3)]
    streamed = client.completions.create(model=NAME, prompt="Hi", max_tokens=4, temperature=0, best_of=1, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == generate(model, tok, "Hi", max_new_tokens=4,
                                                                    do_sample=False)[0].text


def test_best_of_ranks_candidates_of_other_lengths_with_their_end_of_text(client, model, tok):
    # candidates that <|endoftext|> ends early are ranked by the mean over their tokens and that one
    eot, prompt = tok.eot_token, tok.encode("Once upon a time")

    def mean(c, with_eot):
        ids = c.token_ids + ([eot] if with_eot and c.finish_reason == "stop" else [])
        return sum(prompt_logprobs(model, prompt + ids)[0][len(prompt):]) / max(len(ids), 1)

    bias = {eot: 9.0}  # (the bias steers the sampling; the ranking reads the model's own log-probabilities)
    for seed in range(40):
        cands = generate(model, tok, prompt, n=6, max_new_tokens=8, seed=seed, logit_bias=bias)
        best = max(range(6), key=lambda i: (mean(cands[i], True), -i))
        # the case that tells the rules apart: without the <|endoftext|>, or in total, another would win
        if (best != max(range(6), key=lambda i: (mean(cands[i], False), -i))
                and len({len(c.token_ids) for c in cands}) > 1):
            break
    else:
        pytest.fail("no seed gives candidates whose ranking depends on their <|endoftext|>")
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, seed=seed, best_of=6,
                                  logit_bias={str(eot): 9.0})
    assert r.choices[0].text == cands[best].text and r.choices[0].finish_reason == cands[best].finish_reason
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in cands)


def test_best_of_counts_the_end_of_text_token(model, tok):
    # a candidate ended by <|endoftext|> is ranked with that token's log-probability too: an
    # empty completion is not "perfect" (mean 0 over no tokens)
    from gpt2kit.server import _best, _Choice

    one, two = _Choice(text="a", logprob_sum=-3.0, scored_tokens=1), _Choice(text="b", logprob_sum=-4.0, scored_tokens=2)
    assert _best([one, two], 2, 1) == [two]  # per token: -2 beats -3 (in total, -3 would beat -4)
    assert _best([one, two, two, one], 2, 1) == [two, two]  # prompt by prompt
    events = list(iter_generate(model, tok, "x", max_new_tokens=3, top_logprobs=0, seed=0,
                                params=SamplingParams(logit_bias={tok.eot_token: 100.0})))
    assert len(events) == 1 and events[0].token_id is None and events[0].finish_reason == "stop"
    assert events[0].logprob == pytest.approx(prompt_logprobs(model, tok.encode("x") + [tok.eot_token])[0][-1])


def test_a_prompt_that_is_not_unicode_is_a_400(url):
    # JSON may escape a lone surrogate (\ud800), which no UTF-8 text holds: it was a 500 and a traceback
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for prompt, where in ((b'"a\\ud800b"', "prompt"), (b'["ok", "a\\udfffb"]', "prompt[1]")):
        r = httpx.post(f"{url}/v1/completions", headers=headers,
                       content=b'{"model": "%s", "max_tokens": 2, "prompt": %s}' % (NAME.encode(), prompt))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt" and error["message"].startswith(f"{where}: ") and "surrogate" in error["message"]


def test_what_clients_send_by_default_is_accepted(client, model, tok):
    # LangChain sends penalties 0 and logit_bias null; openai's client sends null for None
    greedy = generate(model, tok, "Hello world", max_new_tokens=5, do_sample=False)[0].text
    for extra in ({"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": None, "best_of": 1, "suffix": None},
                  {"logit_bias": {}, "presence_penalty": None, "frequency_penalty": None, "suffix": ""}):
        r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=5, temperature=0, extra_body=extra)
        assert r.choices[0].text == greedy
    # null is the default: temperature 1, top_p 1, n 1, no echo, not streamed
    default = client.completions.create(model=NAME, prompt="Hello world", max_tokens=5, seed=3)
    nulls = client.completions.create(model=NAME, prompt="Hello world", max_tokens=5, seed=3,
                                      extra_body={"temperature": None, "top_p": None, "n": None, "echo": None,
                                                  "stream": None})
    assert nulls.choices[0].text == default.choices[0].text != greedy and len(nulls.choices) == 1
    # top_p 0 keeps only the most probable token: greedy
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=5, top_p=0, seed=5)
    assert r.choices[0].text == greedy


def test_wrong_api_key_is_401(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        bad.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    # the key is checked first, whatever the body holds
    r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                   headers={"Authorization": "Bearer wrong", "content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key


def test_the_key_is_required_behind_a_mount_too(model, tok):
    # an app embedding ours under a prefix (or run with a root path) must not serve /v1 without the key
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/api", create_app(model, tok, model_name=NAME, api_key=KEY))
    with live(outer) as url:
        assert httpx.get(f"{url}/api/v1/models").status_code == 401
        r = httpx.post(f"{url}/api/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 401
        ok = httpx.get(f"{url}/api/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == NAME
        assert httpx.get(f"{url}/api/health").status_code == 200


def test_32_concurrent_requests(url, model, tok):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        prompts = [f"Request number {i}" for i in range(32)]
        calls = [aclient.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0) for p in prompts]
        rs = await asyncio.gather(*calls)
        await aclient.close()
        return prompts, rs

    prompts, rs = asyncio.run(main())
    want = generate(model, tok, prompts, max_new_tokens=6, do_sample=False)
    assert [r.choices[0].text for r in rs] == [w.text for w in want]


def assert_slot_comes_back(url: str) -> None:
    """The single slot is free long before the abandoned 60 tokens (~3 s) would have ended, and
    serves the next request."""
    start = time.time()
    while httpx.get(f"{url}/health").json()["active"] != 0:
        assert time.time() - start < 1.5, "the abandoned request still holds its slot"
        time.sleep(0.05)
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "next", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_disconnected_stream_frees_its_slot(tok):
    app = create_app(tiny_model(SlowGPT2), tok, model_name=NAME, max_concurrency=1)
    with live(app) as url:
        body = {"model": NAME, "prompt": "slow", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ") and json.loads(first[6:])["choices"]
            assert httpx.get(f"{url}/health").json()["active"] == 1
            r.close()  # hang up mid-stream
        assert_slot_comes_back(url)


def test_disconnected_request_frees_its_slot(tok):
    # not streamed: a client that times out (and maybe retries) must not leave its generation running
    app = create_app(tiny_model(SlowGPT2), tok, model_name=NAME, max_concurrency=1)
    with live(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "slow", "max_tokens": 60}, timeout=0.5)
        assert_slot_comes_back(url)


def test_a_cancelled_handler_cancels_its_work():
    # server shutdown (or a timeout around the app) cancels the handler: the generation must stop too
    from gpt2kit.server import _unless_disconnected

    class Connected:
        async def is_disconnected(self):
            return False

    async def main():
        stopped = asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(30)
            finally:
                stopped.set()

        handler = asyncio.ensure_future(_unless_disconnected(work(), Connected(), poll=0.01))
        await asyncio.sleep(0.1)
        handler.cancel()
        await asyncio.wait_for(stopped.wait(), 5)

    asyncio.run(main())


def test_serve_command(tmp_path, model, tok):
    """`gpt2kit serve` on a saved checkpoint, as a user starts it."""
    folder = tmp_path / "tiny"
    model.save_pretrained(str(folder), tok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--model", str(folder), "--port", str(port),
                             "--api-key", KEY, "--max-concurrency", "2", "--max-waiting", "3", "--max-batch-tokens", "70"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.time() < deadline, "gpt2kit serve did not come up"
            time.sleep(0.2)
        health = httpx.get(f"{url}/health").json()
        assert (health["max_concurrency"], health["max_waiting"], health["max_batch_tokens"]) == (2, 3, 70)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]  # named after the folder
        r = client.completions.create(model="tiny", prompt="Served", max_tokens=6, temperature=0)
        assert r.choices[0].text == generate(model, tok, "Served", max_new_tokens=6, do_sample=False)[0].text
        with pytest.raises(openai.BadRequestError, match="allows 70 per request") as e:  # 2 x (1 + 35)
            client.completions.create(model="tiny", prompt="Served", max_tokens=35, n=2)
        assert e.value.body["param"] == "n"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    # the limits in force, the budget included (its default is derived from the model)
    assert "2 requests at once, 3 waiting, 70 token positions per request (--max-batch-tokens)" in stderr, stderr


def test_served_name_is_the_folders_even_for_dot(tmp_path, monkeypatch):
    from gpt2kit.cli.serve import served_name

    folder = tmp_path / "ckpt"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert [served_name(a) for a in (".", "./", str(folder) + "/", "../ckpt")] == ["ckpt"] * 4
    (tmp_path / "best").symlink_to(folder)
    assert served_name(str(tmp_path / "best")) == "best"  # the name given, not the link's target
    assert served_name("gpt2") == "gpt2" and served_name("openai-community/gpt2-medium") == "gpt2-medium"


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, cli):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        # the model folder does not exist: a port error first means the port was checked first
        done = cli("serve", "--model", str(tmp_path / "no-model"), "--port", str(port))
    finally:
        taken.close()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"gpt2kit: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"]
    done = cli("serve", "--model", str(tmp_path / "no-model"), "--host", "no.such.host.invalid")
    assert done.returncode == 2 and done.stderr.startswith("gpt2kit: error: --host no.such.host.invalid: ")


def test_an_empty_api_key_is_refused(tmp_path, cli):
    # `--api-key "$KEY"` with KEY unset: the server would log "API key required" yet let in anyone
    # sending "Authorization: Bearer " with nothing after it
    for env in ({}, {"GPT2KIT_API_KEY": " "}):
        args = ("--api-key", "") if not env else ()
        done = cli("serve", "--model", str(tmp_path / "no-model"), *args, env=env)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            "gpt2kit: error: --api-key: empty; give a key (is the variable set?), or leave the option out"]
    done = cli("serve", "--model", str(tmp_path / "no-model"), "--max-waiting", "-1")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpt2kit: error: --max-waiting: expected an integer >= 0, got -1"]
    done = cli("serve", "--model", str(tmp_path / "no-model"), "--max-batch-tokens", "0")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpt2kit: error: --max-batch-tokens: expected an integer >= 1, got 0"]
    assert "--max-batch-tokens" in cli("serve", "--help").stdout
    with pytest.raises(ValueError, match="api_key: empty"):
        create_app(GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=8)), Tokenizer.gpt2(), api_key="")


def test_serving_beyond_this_machine_without_a_key_warns(tmp_path, cli):
    done = cli("serve", "--model", str(tmp_path / "no-model"), "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2  # (no model there: the warning comes first)
    assert "warning: --host 0.0.0.0 without --api-key: anyone who can reach this machine can use the model" in done.stderr
    done = cli("serve", "--model", str(tmp_path / "no-model"), "--host", "0.0.0.0", "--port", "0", "--api-key", "k")
    assert "warning" not in done.stderr
    done = cli("serve", "--model", str(tmp_path / "no-model"), "--port", "0")
    assert "warning" not in done.stderr  # loopback


def test_a_burst_past_the_queue_gets_429(tok):
    # every request of a burst passed the check before any of them was counted as waiting: the
    # queue grew without bound and nobody got 429
    app = create_app(tiny_model(SlowGPT2), tok, model_name=NAME, max_concurrency=1, max_waiting=2)
    with live(app) as url:
        async def one(client, i):
            body = {"model": NAME, "prompt": f"burst {i}", "max_tokens": 30, "stream": i % 2 == 1}
            r = await client.post(f"{url}/v1/completions", json=body, timeout=60)
            if r.status_code == 429:  # OpenAI's clients wait this long before they retry
                assert r.headers.get("retry-after") == "1", r.headers
            return r.status_code, (r.json() if r.status_code != 200 else None)

        async def burst():
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:
                return await asyncio.gather(*[one(client, i) for i in range(10)])

        results = asyncio.run(burst())
        codes = [code for code, _ in results]
        # 1 running + 2 in line; (one more only if the burst took longer than a whole request, ~1.5 s)
        assert set(codes) == {200, 429} and 3 <= codes.count(200) <= 4, codes
        assert all(body["error"]["code"] == "rate_limit_exceeded" for code, body in results if code == 429)
        # nothing is left counted: the next requests are served
        for _ in range(3):
            r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "after", "max_tokens": 1}, timeout=30)
            assert r.status_code == 200
        assert httpx.get(f"{url}/health").json()["waiting"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_in_line_gives_its_place_back(tok, stream):
    app = create_app(tiny_model(SlowGPT2), tok, model_name=NAME, max_concurrency=1, max_waiting=1)
    with live(app) as url:
        async def main():
            async with httpx.AsyncClient() as client:
                body = {"model": NAME, "prompt": "long", "max_tokens": 40}
                running = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=body, timeout=60))
                await asyncio.sleep(0.5)
                queued = asyncio.ensure_future(client.post(f"{url}/v1/completions", json={**body, "stream": stream},
                                                           timeout=60))
                await asyncio.sleep(0.3)
                queued.cancel()  # hangs up while in line
                with contextlib.suppress(asyncio.CancelledError):
                    await queued
                await asyncio.sleep(0.3)
                assert not running.done()
                # its place in line is free again: the next one waits instead of getting 429
                again = await client.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60)
                assert again.status_code == 200, again.text
                assert (await running).status_code == 200

        asyncio.run(main())


def test_a_huge_prompt_is_refused_without_tokenizing_it_on_the_event_loop(model):
    # tokenizing megabytes in the request handler stalled every other request (6 MB: /health
    # answered after 1 s); no text of more bytes than n_ctx tokens of the longest token can fit
    tok, encoded = counting_tokenizer()
    with live(create_app(model, tok, model_name=NAME)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["short", "word " * 400_000]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "prompt" and "maximum context length is 64 tokens" in r.json()["error"]["message"]
        assert max(encoded, default=0) < 100_000
        # a prompt that tokenizes to just past the context is still measured in tokens
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "word " * 70, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and "(71 in your prompt" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_of_an_empty_prompt_is_empty(url, model, tok, stream):
    # the model is conditioned on <|endoftext|> (GPT-2's start of a document), but the user sent
    # "": the echo must be "", and the logprobs' tokens and text_offset must describe the text
    headers = {"Authorization": f"Bearer {KEY}"}
    for prompt in ("", [""], [[]]):
        body = {"model": NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1,
                "stream": stream}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        if stream:
            events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            text = "".join(e["choices"][0]["text"] for e in events)
            logprobs = {k: sum((e["choices"][0]["logprobs"][k] for e in events), []) for k in
                        ("tokens", "token_logprobs", "text_offset")}
        else:
            text = r.json()["choices"][0]["text"]
            logprobs = r.json()["choices"][0]["logprobs"]
        want = generate(model, tok, "", max_new_tokens=4, do_sample=False, top_logprobs=1)[0]
        assert text == want.text and "<|endoftext|>" not in text
        assert logprobs["tokens"] == [tok.decode([t]) for t in want.token_ids]
        assert logprobs["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-4)
        assert logprobs["text_offset"] == [len(tok.decode(want.token_ids[:i])) for i in range(len(want.token_ids))]
    # a prompt that is "" beside others: each echo is what was sent
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=30,
                   json={"model": NAME, "prompt": ["", "Hi"], "max_tokens": 0, "echo": True, "stream": stream})
    if stream:
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in (0, 1)]
    else:
        texts = [c["text"] for c in r.json()["choices"]]
    assert texts == ["", "Hi"]


class CacheSizeGPT2(GPT2):
    """Records the positions (rows x length) of every KV cache it makes."""

    def new_kv_cache(self, batch_size, max_len=None, **kwargs):
        self.positions.append(batch_size * (max_len or self.config.n_ctx))
        return super().new_kv_cache(batch_size, max_len, **kwargs)


def test_a_request_past_the_batch_token_budget_is_refused(tok):
    # prompts x n rows decode as one batch whose KV cache holds prompt + max_tokens positions per
    # row: a request asking for more than the budget is refused before anything is allocated
    headers = {"Authorization": f"Bearer {KEY}"}
    model = tiny_model(CacheSizeGPT2)
    model.positions = []
    with live(create_app(model, tok, model_name=NAME, api_key=KEY, max_batch_tokens=100)) as url:
        assert httpx.get(f"{url}/health").json()["max_batch_tokens"] == 100
        five = [1, 2, 3, 4, 5]

        def post(**body):
            return httpx.post(f"{url}/v1/completions", headers=headers, timeout=30,
                              json={"model": NAME, "prompt": [five, five], "n": 2, **body})

        # 2 prompts x n=2 x (5 + 20) = 100 positions: exactly the budget
        r = post(max_tokens=20, temperature=0)
        assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 4
        assert model.positions == [100]  # what the budget counts is what the batch allocates
        for stream in (False, True):
            r = post(max_tokens=21, stream=stream)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "n" and error["type"] == "invalid_request_error"
            assert "104 token positions" in error["message"] and "allows 100" in error["message"]
            assert "--max-batch-tokens" in error["message"]
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=30,
                       json={"model": NAME, "prompt": [five] * 5, "max_tokens": 16})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        # max_tokens 0 decodes nothing (an echo scores the prompts one by one): not refused
        r = post(max_tokens=0, echo=True, logprobs=0, n=8)
        assert r.status_code == 200 and len(r.json()["choices"]) == 16
        assert httpx.get(f"{url}/health").json()["active"] == 0  # nothing was left counted
        assert model.positions == [100]
    with live(create_app(model, tok, model_name=NAME, max_batch_tokens=60)) as url:
        # one row: the field to reduce is max_tokens (null: to the end of the context), or the prompt
        for prompt, max_tokens, param in ((five, 56, "max_tokens"), (five, None, "max_tokens"), ([7] * 61, 1, "prompt")):
            r = httpx.post(f"{url}/v1/completions", timeout=30,
                           json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = httpx.post(f"{url}/v1/completions", timeout=30, json={"model": NAME, "prompt": five, "max_tokens": 55})
        assert r.status_code == 200
        # best_of decides how many rows decode: the error names it, with the number the client sent
        for max_tokens, tokens_said in ((20, "x best_of=4) x (at least 5"), (None, "x best_of=4) to the end")):
            r = httpx.post(f"{url}/v1/completions", timeout=30,
                           json={"model": NAME, "prompt": five, "max_tokens": max_tokens, "best_of": 4, "n": 2})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "best_of", r.text
            assert tokens_said in error["message"] and "Reduce best_of" in error["message"].replace("reduce", "Reduce")
    with pytest.raises(ValueError, match="max_batch_tokens: expected an integer >= 1, got 0"):
        create_app(model, tok, model_name=NAME, max_batch_tokens=0)


def test_the_default_batch_token_budget_comes_from_the_memory_at_hand(tok, monkeypatch):
    # default: the memory free at startup, a safety fraction of it shared by --max-concurrency
    # requests (each may hold its budget at once), less the sampling buffers of the most rows a
    # request may have, over the bytes one position holds; it was a KV cache the size of the
    # weights (6,751 positions for gpt2), which refused n=7 with max_tokens null on any machine
    config = GPT2Config(n_layer=4, n_head=2, n_embd=64, n_ctx=512)
    model = GPT2(config).eval()
    position = (2 * 4 * 64 + 12 * 64) * 4  # float32 keys and values of 4 layers, one layer's activations
    rows = server.MAX_CHOICES * config.vocab_size * 56  # each row's logits and sampling buffers
    gib = 2**30
    assert server.default_max_batch_tokens(model, 4, memory=4 * gib) == int((4 * gib * 0.5 / 4 - rows) // position)
    assert server.default_max_batch_tokens(model, 8, memory=7 * gib) == int((7 * gib * 0.5 / 8 - rows) // position)
    # at least one whole-context completion, at most what the largest request can ask for
    assert server.default_max_batch_tokens(model, 4, memory=gib) == 512
    assert server.default_max_batch_tokens(model, 1, memory=1024 * gib) == server.MAX_CHOICES * 512
    # a bf16 model's cache is bf16 where it runs (not on CPU, where new_kv_cache widens it to fp32)
    half = GPT2(config).to(torch.bfloat16).eval()
    assert server.default_max_batch_tokens(half, 8, memory=7 * gib) == server.default_max_batch_tokens(
        model, 8, memory=7 * gib)
    monkeypatch.setattr(half, "new_kv_cache", lambda *a, **kw: GPT2.new_kv_cache(half, *a, dtype=torch.bfloat16, **kw))
    assert server.default_max_batch_tokens(half, 8, memory=7 * gib) == int((7 * gib * 0.5 / 8 - rows) // (position // 2))
    # create_app asks the device: here the CPU, as /health and the refusals then tell
    monkeypatch.setattr(server, "available_memory", lambda device: 3 * gib if torch.device(device).type == "cpu" else 0)
    want = int((3 * gib * 0.5 / 4 - rows) // position)
    with live(create_app(model, tok, model_name=NAME)) as url:
        assert httpx.get(f"{url}/health").json()["max_batch_tokens"] == want
        r = httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"model": NAME, "prompt": ["Hi"] * 16, "n": 4, "max_tokens": None})  # 32,768 positions
        assert want < 32768 and r.status_code == 400 and f"allows {want:,}" in r.json()["error"]["message"], r.text
    # the figure the README and `serve --help` give (built on the meta device: shapes only)
    with torch.device("meta"):
        gpt2 = GPT2(PRESETS["gpt2"]).eval()
    said = round(server.default_max_batch_tokens(gpt2, 4, memory=20 * gib), -3)
    assert said == 21000 and said >= 20 * 1024  # "enough for n=20 to the end of the context"
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"gpt2 in fp32 with 20 GiB free gets ~{said:,} positions" in readme
    from gpt2kit.cli import build_parser
    serve_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
                      if "--max-batch-tokens" in a.option_strings).help
    assert f"gpt2 in fp32 with 20 GiB free: ~{said:,}" in serve_help
    # where the memory is not known, the earlier rule: a KV cache the size of the weights
    monkeypatch.setattr(server, "available_memory", lambda device: None)
    assert create_app(model, tok).state.engine.max_batch_tokens == config.num_params() // (2 * 4 * 64) == 6736


def test_the_memory_at_hand_is_read_from_the_device(tmp_path, monkeypatch):
    gib = 2**30
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.setattr(server, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(server, "_CGROUP", str(tmp_path / "no-cgroup"))
    assert server.available_memory("cpu") == 20000000 * 1024
    # a container's memory limit is what the server may use, not the host's
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{3 * gib}\n")
    (cgroup / "memory.current").write_text(f"{gib}\n")
    monkeypatch.setattr(server, "_CGROUP", str(cgroup))
    assert server.available_memory("cpu") == 2 * gib
    (cgroup / "memory.max").write_text("max\n")
    assert server.available_memory("cpu") == 20000000 * 1024
    # no MemAvailable (an old kernel, another system): the free pages the OS tells, else None
    meminfo.write_text("MemTotal:       24000000 kB\n")
    sysconf = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(server.os, "sysconf", lambda name: sysconf[name])
    assert server.available_memory("cpu") == 4096 * 1000
    monkeypatch.setattr(server, "_MEMINFO", str(tmp_path / "absent"))
    assert server.available_memory("cpu") == 4096 * 1000
    del sysconf["SC_AVPHYS_PAGES"]
    assert server.available_memory("cpu") is None
    # CUDA: the driver's free memory and what torch's allocator holds unused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    assert server.available_memory("cuda:0") == 11 * gib


def test_the_startup_line_says_where_the_default_budget_comes_from(model, tok, monkeypatch, caplog):
    import argparse
    import logging

    import gpt2kit.generate
    from gpt2kit.cli import serve

    monkeypatch.setattr(gpt2kit.generate, "load_for_inference", lambda *a, **kw: (model, tok))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: sockets[0].close())
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    for memory, basis in ((3 * 2**30, "default: from 50% of the 3.0 GiB free on cpu"),
                          (None, "default: the memory free is unknown, a KV cache the size of the weights")):
        monkeypatch.setattr(server, "available_memory", lambda device: memory)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gpt2kit.cli.serve"):
            assert serve.run(parser.parse_args(["serve", "--model", "m", "--port", "0"])) == 0
        want = server.default_max_batch_tokens(model, 4, memory=memory)
        assert f"4 requests at once, 256 waiting, {want:,} token positions per request (--max-batch-tokens; {basis})" \
            in caplog.text, caplog.text


def test_ordinary_requests_pass_the_default_budget(tok, monkeypatch):
    # what a KV cache the size of the weights refused (here 3,400 positions): n=7 to the end of the
    # context, n=64 short completions of a 100-token prompt; a tiny model leaves them room on any
    # machine with 4 GiB free (as this one is said to have, whatever the machine running the test)
    monkeypatch.setattr(server, "available_memory", lambda device: 4 * 2**30)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=8, n_head=2, n_embd=32, n_ctx=1024)
    assert config.num_params() // (2 * 8 * 32) < 7 * 1024
    with live(create_app(GPT2(config).eval(), tok, model_name=NAME)) as url:
        for prompt, n, max_tokens in (([7] * 1020, 7, None), ([7] * 100, 64, 16), ("Hi", 64, 2)):
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": NAME, "prompt": prompt, "n": n, "max_tokens": max_tokens})
            assert r.status_code == 200 and len(r.json()["choices"]) == n, r.text


def test_top_logprobs_always_hold_the_chosen_token(client):
    # OpenAI: "The API will always return the logprob of the sampled token, so there may be up to
    # logprobs+1 elements"; a client reads top_logprobs[i][tokens[i]] (a KeyError for an unlikely draw)
    r = client.completions.create(model=NAME, prompt="Sampled tokens", max_tokens=12, temperature=2, seed=11,
                                  logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs[0] is None  # the first prompt token has no context
    outside = 0
    for token, chosen, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(chosen) and 1 <= len(top) <= 2
        outside += len(top) == 2
    assert outside >= 3  # (T=2 draws outside the top token most of the time: the case is exercised)
    streamed = client.completions.create(model=NAME, prompt="Sampled tokens", max_tokens=12, temperature=2, seed=11,
                                         logprobs=1, echo=True, stream=True)
    tops = [t for c in streamed for t in c.choices[0].logprobs.top_logprobs]
    assert tops == lp.top_logprobs


def test_too_many_prompts_are_refused_before_they_are_tokenized(model):
    # each prompt is checked against the context before it is tokenized, but thousands of them
    # (or a batch sure to pass the token budget) were all tokenized on the event loop first,
    # stalling every other request, and then refused
    tok, encoded = counting_tokenizer()
    with live(create_app(model, tok, model_name=NAME, max_batch_tokens=100)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["word " * 10] * 2000}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "more than 128 completions" in r.json()["error"]["message"]
        # 10 prompts of 1,000 bytes are at least 8 tokens each: 10 x (8 + 16) > 100 positions
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["word " * 200] * 10, "max_tokens": 16},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_batch_tokens_exceeded", r.text
        assert r.json()["error"]["param"] == "prompt" and "at least 240 token positions" in r.json()["error"]["message"]
        assert encoded == []
        # what may fit is tokenized and measured exactly: 10 x (1 + 9) = 100
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["word"] * 10, "max_tokens": 9},
                       timeout=60)
        assert r.status_code == 200 and len(encoded) == 10, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_its_prompts_are_scored_frees_its_slot(tok, stream):
    # echo + logprobs scores the prompts one forward pass each before any token is drawn: a client
    # that hung up there kept the slot until every prompt was scored (60 x 50 ms here)
    app = create_app(tiny_model(SlowGPT2), tok, model_name=NAME, max_concurrency=1)
    with live(app) as url:
        body = {"model": NAME, "prompt": [f"prompt {i}" for i in range(60)], "max_tokens": 0, "echo": True,
                "logprobs": 0, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                assert next(r.iter_lines()).startswith("data: {")
                r.close()  # hang up after the first echo
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        assert_slot_comes_back(url)


def test_a_body_that_is_not_a_json_object_says_what_is_expected(url):
    # `curl -d '{...}'` sends form content-type: FastAPI then reads no JSON, and the client was told
    # "body: Input should be a valid dictionary or object to extract fields from"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 1})
    for content, content_type in ((body, "application/x-www-form-urlencoded"), (body, None),
                                  ("[1, 2]", "application/json"), ("", "application/json")):
        r = httpx.post(f"{url}/v1/completions", content=content,
                       headers={**headers, **({"content-type": content_type} if content_type else {})})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == ("body: expected a JSON object (the completion's fields), "
                                                "sent with Content-Type: application/json"), r.text


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_0_gives_the_chosen_token_alone(client, stream):
    # "up to logprobs+1 elements": with logprobs=0, each top_logprobs entry is the chosen token
    # alone (vLLM answers the same); it was null, a TypeError for a client indexing it
    r = client.completions.create(model=NAME, prompt="Zero alternatives", max_tokens=5, temperature=1.5, seed=2,
                                  logprobs=0, echo=True, stream=stream)
    lps = [c.choices[0].logprobs for c in r] if stream else [r.choices[0].logprobs]
    tokens, chosen, tops = ([x for lp in lps for x in getattr(lp, k)] for k in ("tokens", "token_logprobs", "top_logprobs"))
    assert len(tokens) == len(tops) == 2 + 5 and tops[0] is None  # (the first prompt token has no context)
    assert tops[1:] == [{t: lp} for t, lp in zip(tokens[1:], chosen[1:])]


def test_a_null_max_tokens_batch_past_the_budget_is_refused_before_tokenizing(model):
    # max_tokens null completes every row to the end of the context: prompts x n x n_ctx positions,
    # known before any prompt is tokenized; the budget was checked only for a given max_tokens, so
    # 128 prompts of 100 KB were all tokenized on the event loop (~1 s stall) and then refused
    tok, encoded = counting_tokenizer()
    with live(create_app(model, tok, model_name=NAME, max_batch_tokens=100)) as url:
        assert model.config.n_ctx == 64
        for prompt, n, param in ((["word " * 10] * 2, 1, "prompt"), ("word " * 10, 2, "n"), ("word", 2, "n")):
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": NAME, "prompt": prompt, "n": n, "max_tokens": None})
            assert r.status_code == 400 and r.json()["error"]["code"] == "max_batch_tokens_exceeded", r.text
            assert encoded == []
            error = r.json()["error"]
            assert error["param"] == param and "128 token positions" in error["message"], error
            assert "max_tokens null" in error["message"] and "allows 100" in error["message"], error
        # one row to the end of the context fits: tokenized, and answered
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": NAME, "prompt": "word " * 60, "max_tokens": None, "temperature": 0})
        assert r.status_code == 200 and len(encoded) == 1, r.text
        assert r.json()["usage"]["total_tokens"] == 64
        # token ids are measured without tokenizing: prompts that fill the context leave nothing to
        # decode, and an echo of them is scored one by one (no batch), as before
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": NAME, "prompt": [[7] * 64] * 2, "max_tokens": None, "echo": True, "logprobs": 0})
        assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 2, r.text


def test_prompts_are_tokenized_off_the_event_loop(model):
    # 128 prompts of 100 KB each fit the context check and the budget, so they must be tokenized
    # to be measured: on the event loop that stalled every other client for ~1 s
    import asyncio

    tok = Tokenizer.gpt2()
    encode, on_loop = tok.encode, []

    def recording_encode(text, **kw):
        try:
            asyncio.get_running_loop()
            on_loop.append(len(text))
        except RuntimeError:  # no loop running in this thread: a worker's
            pass
        return encode(text, **kw)

    tok.encode = recording_encode
    with live(create_app(model, tok, model_name=NAME)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["Hello world", "Hi"], "max_tokens": 2,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["Hello", "word " * 70],
                                                      "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and "(71 in your prompt" in r.json()["error"]["message"]
    assert on_loop == []


def test_echoed_best_of_candidates_keep_their_prompt_and_offsets(url, tok):
    # best_of > n with echo: each prompt's candidates are echoed that prompt, and the completion's
    # text_offset goes on from the end of the echoed text (not from 0 again)
    prompts = ["Hi", "Hello there", "Hey"]
    body = {"model": NAME, "prompt": prompts, "max_tokens": 3, "temperature": 0, "logprobs": 0, "best_of": 3, "n": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    plain = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30).json()["choices"]
    r = httpx.post(f"{url}/v1/completions", json={**body, "echo": True}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == len(plain) == 6
    for i, (prompt, c) in enumerate(zip([p for p in prompts for _ in range(2)], choices)):
        assert c["text"] == prompt + plain[i]["text"]
        offsets, n_prompt = c["logprobs"]["text_offset"], len(tok.encode(prompt))
        assert len(offsets) == n_prompt + 3
        assert offsets[0] == 0 and offsets[n_prompt:] == plain[i]["logprobs"]["text_offset"], offsets


@pytest.mark.parametrize("stream", [False, True])
def test_a_token_without_text_of_its_own_still_gets_its_logprobs(url, tok, stream):
    # a lone lead byte of a UTF-8 character prints nothing until the next token: its chunk is
    # still sent (with its logprobs), or a streaming client loses the token
    lead = tok.mergeable_ranks[b"\xe2"]
    body = {"model": NAME, "prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 0,
            "logit_bias": {str(lead): 100}, "stream": stream}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")] if stream else [r.json()]
    tokens = [t for e in events for c in e["choices"] for t in c["logprobs"]["tokens"]]
    assert tokens == ["bytes:\\xe2"] * 3


def test_the_line_admits_exactly_max_concurrency_plus_max_waiting(model, tok):
    engine = create_app(model, tok, model_name=NAME, max_concurrency=1, max_waiting=2).state.engine
    req = server.CompletionRequest(model=NAME, prompt="x", max_tokens=1)
    engine.active, engine.waiting = 1, 1  # one place left
    engine.drop_admission(engine.plan(req))
    engine.waiting = 2  # none left
    with pytest.raises(server.APIError) as e:
        engine.plan(req)
    assert e.value.status == 429 and engine.admitted == 0


def test_boundaries_of_the_request_checks(url, tok):
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(**fields):
        return httpx.post(f"{url}/v1/completions", json={"model": NAME, **fields}, headers=headers, timeout=60)

    r = post(prompt="Hello", best_of=2, n=3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    # exactly MAX_CHOICES completions are allowed, one more is not
    r = post(prompt=["a", "b"], n=64, max_tokens=0)
    assert r.status_code == 200 and len(r.json()["choices"]) == 128, r.text
    r = post(prompt=["a", "b", "c"], n=43, max_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(prompt=[[5, -1]], max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "token id -1" in r.text
    # digits of other scripts are not a token id (int() would read "\u0661" as 1)
    r = post(prompt="x", max_tokens=1, logit_bias={"\u0661": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    # top_p 0 keeps only the most probable token (OpenAI's reading): greedy whatever the temperature
    greedy = post(prompt="Once", max_tokens=8, temperature=0).json()["choices"][0]["text"]
    for seed in range(3):
        assert post(prompt="Once", max_tokens=8, temperature=1.5, top_p=0, seed=seed).json()["choices"][0]["text"] == greedy


def test_a_text_one_byte_past_what_the_context_can_hold_is_not_tokenized(model):
    tok, encoded = counting_tokenizer()
    longest = max(len(t) for t in tok.mergeable_ranks)  # bytes in GPT-2's longest token
    with live(create_app(model, tok, model_name=NAME)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "a" * (64 * longest + 1)}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "at least 65 tokens" in r.json()["error"]["message"] and encoded == []


def test_each_sampling_field_reaches_the_decoding(client, model, tok):
    # the server's result equals generate()'s with the same option (generate's own are checked
    # against transformers), and differs without it: a field that is dropped or swapped fails
    favoured = tok.encode(" dog")[0]
    bias = {favoured: 12.0}
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0,
                                  frequency_penalty=1.5, logit_bias={str(favoured): 12.0})
    want = generate(model, tok, "Hello world", max_new_tokens=12, do_sample=False, frequency_penalty=1.5, logit_bias=bias)
    other = generate(model, tok, "Hello world", max_new_tokens=12, do_sample=False, presence_penalty=1.5, logit_bias=bias)
    assert r.choices[0].text == want[0].text != other[0].text
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0,
                                  extra_body={"repetition_penalty": 3.0})
    want = generate(model, tok, "Hello world", max_new_tokens=12, do_sample=False, repetition_penalty=3.0)[0].text
    assert r.choices[0].text == want != generate(model, tok, "Hello world", max_new_tokens=12, do_sample=False)[0].text
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=8, seed=5, temperature=1.5, extra_body={"top_k": 3})
    want = generate(model, tok, "Hi", max_new_tokens=8, seed=5, temperature=1.5, top_k=3)[0].text
    assert r.choices[0].text == want != generate(model, tok, "Hi", max_new_tokens=8, seed=5, temperature=1.5)[0].text


def test_a_stream_that_never_starts_gives_its_place_back(model, tok):
    # the client is gone before the response starts: the event generator never runs (so never
    # joins the line), and only the response's own cleanup can drop the job's admission
    engine = create_app(model, tok, model_name=NAME, max_concurrency=1, max_waiting=0).state.engine
    job = engine.plan(server.CompletionRequest(model=NAME, prompt="x", max_tokens=1, stream=True))
    assert engine.admitted == 1
    response = server._ClosingStream(engine.stream(job), media_type="text/event-stream",
                                     on_close=lambda: engine.drop_admission(job))

    async def send(message):
        raise OSError("the connection is gone")

    async def receive():
        return {"type": "http.disconnect"}

    with pytest.raises(ClientDisconnect):  # (starlette's name for the OSError a send raised)
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert engine.admitted == 0 and engine.active == 0
    engine.drop_admission(engine.plan(server.CompletionRequest(model=NAME, prompt="x", max_tokens=1)))  # no 429


def test_the_context_error_names_the_prompt_only_when_it_leaves_no_room(url):
    # a prompt that fills the 64-token context alone is the prompt's fault; one token less, max_tokens'
    headers = {"Authorization": f"Bearer {KEY}"}
    for length, param in ((64, "prompt"), (63, "max_tokens")):
        body = {"model": NAME, "prompt": [40] * length, "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == param, r.text
        assert f"requested {length + 2} tokens ({length} in your prompt; 2 for the completion)" in error["message"]


def test_max_tokens_past_the_context_is_a_context_error_before_tokenizing(model):
    # max_tokens 100000 on a 64-token model was answered "start the server with a larger
    # --max-batch-tokens", which cannot help: the batch check ran before the context's
    tok, encoded = counting_tokenizer()
    with live(create_app(model, tok, model_name=NAME, max_batch_tokens=1000)) as url:
        for prompt in ("x", ["word " * 40] * 2):
            r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 100000},
                           timeout=30)
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
            assert error["param"] == "max_tokens" and "maximum context length is 64 tokens" in error["message"]
            assert "100000 for the completion" in error["message"] and "--max-batch-tokens" not in error["message"]
        assert encoded == []  # refused before tokenizing
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 100000}, timeout=30)
        assert "requested at least 100001 tokens (at least 1 in your prompt;" in r.json()["error"]["message"]
        # within the context, the batch budget still speaks: 20 x (1 + 60) > 1000
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": ["x"] * 20, "max_tokens": 60}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_batch_tokens_exceeded", r.text


def test_each_field_past_its_bounds_is_a_400_naming_it(url):
    # the bounds OpenAI documents (and those the decoding needs), each one step past its edge;
    # strict types: a number sent as a string, or a bool for an integer, is refused, not coerced
    headers = {"Authorization": f"Bearer {KEY}"}
    for fields, param, message in (
            ({"temperature": -0.1}, "temperature", "temperature: Input should be greater than or equal to 0"),
            ({"top_p": 1.01}, "top_p", "top_p: Input should be less than or equal to 1"),
            ({"top_k": 0}, "top_k", "top_k: Input should be greater than or equal to 1"),
            ({"min_p": 1.01}, "min_p", "min_p: Input should be less than or equal to 1"),
            ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty: Input should be greater than 0"),
            ({"n": 0}, "n", "n: Input should be greater than or equal to 1"),
            ({"n": 65}, "n", "n: Input should be less than or equal to 64"),
            ({"logprobs": 21}, "logprobs", "logprobs: Input should be less than or equal to 20"),
            ({"seed": -(2**63) - 1}, "seed", "seed: Input should be greater than or equal to -9223372036854775808"),
            ({"logit_bias": {"5": -100.5}}, "logit_bias", 'logit_bias["5"]: Input should be greater than or equal to -100'),
            ({"best_of": 129}, "best_of", "best_of: Input should be less than or equal to 128"),
            ({"max_tokens": "5"}, "max_tokens", "max_tokens: Input should be a valid integer"),
            ({"temperature": "0.5"}, "temperature", "temperature: Input should be a valid number"),
            ({"n": True}, "n", "n: Input should be a valid integer"),
            ({"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options",
             "stream_options.extra: unknown or unsupported field"),
            ({"suffix": "and then"}, "suffix", 'suffix: not supported by this server (only null or "")'),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop: expected up to 4 non-empty strings"),
            ({"stop": ["a", ""]}, "stop", "stop: expected up to 4 non-empty strings"),
            ({"prompt": []}, "prompt", "prompt: expected a non-empty string, list of strings or list of token ids"),
            ({"prompt": 5}, "prompt", "prompt: expected a string, a list of strings, a list of token ids or a list "
                                      "of lists of token ids"),
            ({"prompt": [[1, 50257]]}, "prompt", "prompt: token id 50257 is outside the vocabulary [0, 50257)")):
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1, **fields},
                       headers=headers, timeout=30)
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"] == message, (fields, r.text)
    # at the edges themselves, and null for the fields whose null is their default: accepted
    for fields in ({"temperature": 0, "top_p": 1, "top_k": 1, "min_p": 1, "logprobs": 20, "seed": -(2**63),
                    "logit_bias": {"5": -100}, "stop": ["a", "b", "c", "d"]},
                   {"prompt": None, "repetition_penalty": None, "n": 64, "best_of": 128, "max_tokens": 0}):
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1, **fields},
                       headers=headers, timeout=30)
        assert r.status_code == 200, (fields, r.text)


def test_models_and_the_key_check_at_their_edges(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{url}/v1/models/{NAME}", headers=headers)
    assert r.json() == {"id": NAME, "object": "model", "created": 0, "owned_by": "gpt2kit", "context_length": 64}
    r = httpx.get(f"{url}/v1/models/gpt-4", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    # the scheme is case-insensitive (RFC 7235), the token read stripped
    for authorization in (f"bearer {KEY}", f"BEARER  {KEY}"):
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": authorization})
        assert r.status_code == 200, authorization
    assert httpx.get(f"{url}/v1").status_code == 401  # /v1 itself is behind the key too
    # a wrong method says which ones the route takes
    r = httpx.get(f"{url}/v1/completions", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    with pytest.raises(ValueError, match="max_batch_tokens: expected an integer >= 1, got True"):
        create_app(GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=8)), Tokenizer.gpt2(), max_batch_tokens=True)


def test_the_memory_at_hand_is_never_negative_and_its_fallback_is_bounded(tmp_path, monkeypatch):
    # a container using more than its limit (memory.current past memory.max, as happens while the
    # kernel reclaims) has nothing to spare, not a negative amount
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("1000\n")
    (cgroup / "memory.current").write_text("1500\n")
    monkeypatch.setattr(server, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(server, "_CGROUP", str(cgroup))
    assert server.available_memory("cpu") == 0
    # memory unknown: a KV cache the size of the weights, still at least one whole-context
    # completion and at most MAX_CHOICES of them
    monkeypatch.setattr(server, "available_memory", lambda device: None)
    small = GPT2(GPT2Config(vocab_size=16, n_layer=4, n_head=1, n_embd=8, n_ctx=1024))
    assert small.config.num_params() // (2 * 4 * 8) < 1024
    assert server.default_max_batch_tokens(small) == 1024
    wide = GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=8))
    assert wide.config.num_params() // (2 * 1 * 8) > server.MAX_CHOICES * 8
    assert server.default_max_batch_tokens(wide) == server.MAX_CHOICES * 8


def test_text_offset_of_a_character_split_across_tokens(url, tok):
    # "€" is three byte tokens: they all start where the character does, and the next token
    # after it (offsets count characters of the text, decoded incrementally)
    euro = [tok.mergeable_ranks[bytes([b])] for b in "€".encode()]
    x = tok.encode("x")
    body = {"model": NAME, "prompt": [euro + x], "max_tokens": 0, "echo": True, "logprobs": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    c = r.json()["choices"][0]
    assert c["text"] == "€x" and c["logprobs"]["text_offset"] == [0, 0, 0, 1], r.text


def test_a_busy_server_refuses_before_tokenizing(model):
    tok, encoded = counting_tokenizer()
    engine = create_app(model, tok, model_name=NAME, max_concurrency=1, max_waiting=0).state.engine
    engine.active = 1
    with pytest.raises(server.APIError) as e:
        engine.plan(server.CompletionRequest(model=NAME, prompt="x " * 20, max_tokens=1))
    assert e.value.status == 429 and encoded == [] and engine.admitted == 0


def test_the_context_and_budget_errors_at_their_edges(model, tok):
    headers = {"Authorization": f"Bearer {KEY}"}
    with live(create_app(model, tok, model_name=NAME, api_key=KEY, max_batch_tokens=64)) as url:
        def post(**body):
            return httpx.post(f"{url}/v1/completions", json={"model": NAME, **body}, headers=headers, timeout=30)

        # max_tokens null with a prompt past the context: nothing is left for the completion (not a
        # negative number of tokens)
        r = post(prompt=[7] * 70, max_tokens=None)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "requested 70 tokens (70 in your prompt; 0 for the completion)" in r.json()["error"]["message"], r.text
        # one row to the end of the context is exactly the budget's 64 positions: allowed
        r = post(prompt="Hi", max_tokens=None, temperature=0)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 64, r.text
    # a prompt as long as the budget leaves no room for any completion: the prompt's fault
    with live(create_app(model, tok, model_name=NAME, api_key=KEY, max_batch_tokens=60)) as url:
        for prompt, param in (([7] * 60, "prompt"), ([7] * 59, "max_tokens")):
            r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 2},
                           headers=headers, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_top_p_reaches_the_decoding(client, model, tok):
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=8, seed=5, temperature=1.5, top_p=0.5)
    want = generate(model, tok, "Hi", max_new_tokens=8, seed=5, temperature=1.5, top_p=0.5)[0].text
    assert r.choices[0].text == want != generate(model, tok, "Hi", max_new_tokens=8, seed=5, temperature=1.5)[0].text


def test_usage_counts_every_prompt(client, tok):
    # an empty prompt is conditioned on <|endoftext|>: one token read
    r = client.completions.create(model=NAME, prompt=["Hello world", "", "Hi"], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 2 + 1 + 1 and r.usage.completion_tokens == 9 and r.usage.total_tokens == 13


class BrokenGPT2(GPT2):
    def hidden_states(self, *args, **kwargs):
        raise RuntimeError("the device fell over")


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_generation_is_a_500_and_frees_its_slot(tok, stream):
    app = create_app(tiny_model(BrokenGPT2), tok, model_name=NAME, max_concurrency=1)
    with live(app) as url:
        for _ in range(2):  # the slot came back: the second one is answered too
            r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2, "stream": stream},
                           timeout=30)
            if stream:  # the response had started: the error is the last event before [DONE]
                assert r.status_code == 200
                events = r.text.split("\n\n")
                assert events[-2:] == ["data: [DONE]", ""]
                error = json.loads(events[-3][6:])["error"]
            else:
                assert r.status_code == 500
                error = r.json()["error"]
            assert error["type"] == "server_error"
            assert error["message"] == "generation failed: the device fell over"
        assert httpx.get(f"{url}/health").json()["active"] == 0


def test_serve_options_checked_and_passed_on(model, tok, monkeypatch, caplog, capsys):
    import logging

    import gpt2kit.generate
    from gpt2kit.cli import main

    for flags, message in ((["--port", "65536"], "--port: expected 0..65535, got 65536"),
                           (["--port", "-1"], "--port: expected 0..65535, got -1"),
                           (["--max-concurrency", "0"], "--max-concurrency: expected an integer >= 1, got 0")):
        assert main(["serve", "--model", "no-model", *flags]) == 2  # (before any model is loaded)
        assert capsys.readouterr().err == f"gpt2kit: error: {message}\n"
    monkeypatch.setattr(gpt2kit.generate, "load_for_inference", lambda *a, **kw: (model, tok))
    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: bound.append(
        (sockets[0].family, sockets[0].getsockname()[0], self.config.app.state.engine.name)) or sockets[0].close())
    with caplog.at_level(logging.INFO, logger="gpt2kit.cli.serve"):
        assert main(["serve", "--model", "some/folder", "--host", "::1", "--port", "0", "--model-name", "custom",
                     "--api-key", "k", "--max-waiting", "0", "--max-batch-tokens", "99"]) == 0
    assert bound == [(socket.AF_INET6, "::1", "custom")]
    assert "serving some/folder as 'custom' on http://::1:" in caplog.text, caplog.text
    assert "/v1 (API key required); 4 requests at once, 0 waiting, 99 token positions per request" in caplog.text


def test_served_requests_leave_nothing_counted(model, tok):
    # a job's place is given back both when it joins the line and when its response ends: the
    # second time must not give back a place it no longer holds (the line would then admit more)
    app = create_app(model, tok, model_name=NAME, max_concurrency=1, max_waiting=0)
    engine = app.state.engine
    with live(app) as url:
        for stream in (False, True, False):
            r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2, "stream": stream},
                           timeout=30)
            assert r.status_code == 200, r.text
        assert (engine.admitted, engine.waiting, engine.active) == (0, 0, 0)
    job = engine.plan(server.CompletionRequest(model=NAME, prompt="x", max_tokens=1))
    engine.drop_admission(job)
    engine.drop_admission(job)
    assert engine.admitted == 0


def test_n_choices_keep_their_order_when_nothing_is_chosen(url, model, tok):
    # best_of ranks candidates by their mean log-probability; with best_of null (or == n) there is
    # nothing to choose, and the n samples come back in the order drawn, even with logprobs asked
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 6, "seed": 3, "temperature": 1.5, "n": 4, "logprobs": 0}
    want = generate(model, tok, "Hi", max_new_tokens=6, seed=3, temperature=1.5, n=4, top_logprobs=0)
    means = [sum(c.logprobs) / len(c.logprobs) for c in want]
    assert means != sorted(means, reverse=True)  # (ranked, they would come back in another order)
    for extra in ({}, {"best_of": 4}):
        r = httpx.post(f"{url}/v1/completions", json={**body, **extra}, headers=headers, timeout=30)
        assert [c["text"] for c in r.json()["choices"]] == [c.text for c in want], r.text


def test_the_app_serves_the_model_in_eval_mode(tok):
    # dropout left on would make greedy decoding random
    model = GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=8, dropout=0.5)).train()
    create_app(model, tok, model_name=NAME, max_batch_tokens=8)
    assert not model.training and not any(m.training for m in model.modules())


def test_a_huge_prompt_with_a_lone_surrogate_is_measured_not_a_500(url, tok):
    # refused for its length before tokenizing; its size counts the surrogate's bytes as they are
    longest = max(len(t) for t in tok.mergeable_ranks)
    prompt = "\ud800" + "a" * (64 * longest)
    r = httpx.post(f"{url}/v1/completions", content=json.dumps({"model": NAME, "prompt": prompt}), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})  # (as \ud800)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert f"your prompt is {3 + 64 * longest:,} bytes, at least 65 tokens" in r.json()["error"]["message"]


def test_the_servers_key_is_read_stripped(model, tok):
    # a key read from a file or a variable often ends in a newline; the client's token is stripped too
    with live(create_app(model, tok, model_name=NAME, api_key=f" {KEY}\n")) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer other"}).status_code == 401


def test_a_stream_ended_by_end_of_text_says_so(url, tok):
    # <|endoftext|> adds no text: its event still carries the finish_reason, or a streaming client
    # never learns why (nor that) the choice ended
    body = {"model": NAME, "prompt": "x", "max_tokens": 5, "logit_bias": {str(tok.eot_token): 100}, "n": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    plain = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30).json()
    assert [(c["text"], c["finish_reason"]) for c in plain["choices"]] == [("", "stop")] * 2
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, headers=headers, timeout=30)
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert sorted((c["index"], c["text"], c["finish_reason"]) for e in events for c in e["choices"]) == [
        (0, "", "stop"), (1, "", "stop")]


def test_usage_only_when_asked_and_the_401s_challenge(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    for options in ({"include_usage": False}, {}):  # (false by default)
        body = {"model": NAME, "prompt": "x", "max_tokens": 2, "stream": True, "stream_options": options}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        assert events and all(e["choices"] and "usage" not in e for e in events), events
    # a 401 names the scheme it expects (RFC 7235), as OpenAI's does
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_a_model_with_fewer_tokens_than_its_tokenizer_gets_400s_not_500s(tok):
    # ids the tokenizer makes but the model cannot embed failed inside the worker: "generation failed"
    torch.manual_seed(0)
    small = GPT2(GPT2Config(vocab_size=300, n_layer=1, n_head=1, n_embd=8, n_ctx=32)).eval()
    headers = {"Authorization": f"Bearer {KEY}"}
    with live(create_app(small, tok, model_name=NAME, api_key=KEY)) as url:
        def post(**body):
            return httpx.post(f"{url}/v1/completions", json={"model": NAME, "max_tokens": 2, **body},
                              headers=headers, timeout=30)

        r = post(prompt=["a", "Hello"])  # "Hello" is token 15496
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert r.json()["error"]["message"] == "prompt[1]: its text encodes to token id 15496, but the model has 300 tokens"
        r = post(prompt=[[299], [300]])
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "prompt: token id 300 is outside the vocabulary [0, 300)"
        assert max(tok.encode("a b")) < 300
        r = post(prompt="a b", temperature=0)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_a_bad_logit_bias_value_names_its_key_briefly(url):
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 1,
                                                  "logit_bias": {"A" * 100_000: "x"}},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "logit_bias", r.text
    assert error["message"].startswith('logit_bias["' + "A" * 20 + '..."]: ') and len(error["message"]) < 200
