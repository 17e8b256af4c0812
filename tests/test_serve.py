"""`lmforge serve`: the real server on a free loopback port, driven by the real `openai` client.

Most tests share one server (in a thread) over a tiny random Llama with SmolLM2's tokenizer and the packaged
all-MiniLM-L6-v2; the references are lmforge's own generation run alone (no batching), full forwards without a
cache, and transformers for the embeddings. The slow test starts `lmforge serve` as a process with SmolLM2 and
checks greedy text against `lmforge generate`, then a graceful SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import signal
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

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.io import load_model, save_model
from lmforge.models import Decoder
from lmforge.serve import Embedder, Engine, create_app
from lmforge.tokenizer import Tokenizer

KEY = "sk-test"
TIMEOUT = 60.0  # every wait in this file is bounded by this many seconds


def _until(check, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free loopback port, held until the server takes it
    return sock


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.for_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory) -> tuple[str, Decoder]:
    """A tiny random Llama over SmolLM2's vocabulary, saved with the tokenizer: (folder, model)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, max_seq_len=4096,
                                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    folder = tmp_path_factory.mktemp("tiny-serve")
    save_model(Decoder(cfg), folder)
    tokenizer.save(folder)
    return str(folder), load_model(folder)


@pytest.fixture(scope="module")
def server(tiny, tokenizer, minilm_dir):
    """The shared server: the tiny decoder (batch of 4 rows, 2 queued requests) and MiniLM, with an API key."""
    engine = Engine(load_model(tiny[0]), tokenizer, max_batch=4, max_queue=2, context=4096)
    embedder = Embedder(load_model(minilm_dir), Tokenizer.for_model(minilm_dir))
    app = create_app({tiny[0]: engine}, {"minilm": embedder}, api_key=KEY, shutdown_timeout=5)
    sock = _bound_socket()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _until(lambda: srv.started, "the server to start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    srv.should_exit = True
    thread.join(TIMEOUT)
    assert not thread.is_alive()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


# --- generation ----------------------------------------------------------------------------------------------

def test_health_models_and_metrics(server, client, tiny):
    assert httpx.get(server[0] + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    assert sorted(m.id for m in client.models.list().data) == sorted([tiny[0], "minilm"])
    text = httpx.get(server[0] + "/metrics", timeout=TIMEOUT).text
    for name in ("lmforge_queue_depth", "lmforge_batch_occupancy", "lmforge_requests_total"):
        assert f"# TYPE {name}" in text


def test_greedy_completion_equals_generate_alone(client, tiny, tokenizer):
    folder, model = tiny
    out = client.completions.create(model=folder, prompt="The moon is", max_tokens=12, temperature=0)
    expected = lmforge.generate(model, tokenizer, "The moon is", max_new_tokens=12)[0]
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode("The moon is"))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_concurrent_requests_each_equal_running_alone(client, tiny, tokenizer):
    """Requests joining and leaving the running batch at different positions (more requests than rows, so
    some queue) each get the text of running alone."""
    folder, model = tiny
    prompts = [("Hello there", 5), ("A much longer prompt about the sea and the sky", 23), ("x", 9),
               ("Tell me", 17), ("One two three four", 3), ("Bonjour", 11)]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        p, n = prompts[i]
        results[i] = client.completions.create(model=folder, prompt=p, max_tokens=n, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for i, (p, n) in enumerate(prompts):
        assert results[i] == lmforge.generate(model, tokenizer, p, max_new_tokens=n)[0], p


def test_chat_and_streaming(client, tiny, tokenizer):
    folder, model = tiny
    messages = [{"role": "user", "content": "Write a haiku"}]
    out = client.chat.completions.create(model=folder, messages=messages, max_tokens=10, temperature=0)
    expected = lmforge.generate(model, tokenizer, "Write a haiku", chat=True, max_new_tokens=10)[0]
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    chunks = list(client.chat.completions.create(model=folder, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    out = client.chat.completions.create(model=folder, messages=messages, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6) for c in content)  # greedy


def test_n_seed_and_stream_agree(client, tiny):
    folder = tiny[0]
    kw = dict(model=folder, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=7)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(set(a)) == 3  # same seed, same texts; the n sequences differ
    assert a != [c.text for c in client.completions.create(**{**kw, "seed": 8}).choices]
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == a


def test_stop_strings(client, tiny):
    folder = tiny[0]
    full = client.completions.create(model=folder, prompt="Stop here", max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and stop in full
    out = client.completions.create(model=folder, prompt="Stop here", max_tokens=20, temperature=0, stop=[stop, "\x00"])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=folder, prompt="Stop here", max_tokens=20, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_logprobs_and_penalties_against_full_forwards(client, tiny, tokenizer):
    """Log-probabilities equal log_softmax of a plain forward over prompt + tokens (no cache); with a
    frequency/presence penalty the greedy tokens follow OpenAI's formula applied to those forwards."""
    folder, model = tiny
    prompt = tokenizer.encode("Penalties and logprobs")
    out = client.completions.create(model=folder, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                    frequency_penalty=1.5, presence_penalty=0.5)
    lp = out.choices[0].logprobs
    ids = list(prompt)
    counts = torch.zeros(tokenizer.vocab_size)
    with torch.no_grad():
        for step in range(6):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int((logits - 1.5 * counts - 0.5 * (counts > 0)).argmax())
            logprobs = torch.log_softmax(logits, -1)
            assert math.isclose(lp.token_logprobs[step], float(logprobs[token]), abs_tol=1e-4)
            assert max(lp.top_logprobs[step].values()) == pytest.approx(float(logprobs.max()), abs=1e-4)
            ids.append(token)
            counts[token] += 1
    assert out.choices[0].text == tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)


# --- embeddings ----------------------------------------------------------------------------------------------

def test_embeddings_equal_transformers_mean_pooling(client, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    texts = ["The cat sat on the mat.", "Continuous batching keeps every row busy while requests come and go."]
    out = client.embeddings.create(model="minilm", input=texts)
    got = torch.tensor([d.embedding for d in out.data])
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ref = AutoModel.from_pretrained(minilm_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert out.usage.prompt_tokens == int(batch["attention_mask"].sum())


# --- errors, back-pressure, cancellation --------------------------------------------------------------------

def _error(fn, status: int, param: str | None = None, code: str | None = None):
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    err = info.value
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if param is not None:
        assert body["param"] == param, body
    if code is not None:
        assert body["code"] == code, body
    return body


def test_errors_in_openai_shape(server, client, tiny):
    folder = tiny[0]
    comp = client.completions.create
    _error(lambda: comp(model="no-such-model", prompt="hi", max_tokens=2), 404, "model", "model_not_found")
    _error(lambda: comp(model=folder, prompt="hi", max_tokens=2, temperature="hot"), 400, "temperature")
    _error(lambda: comp(model=folder, prompt="hi", max_tokens="ten"), 400, "max_tokens")
    _error(lambda: comp(model=folder, prompt="hi", max_tokens=2, n=5), 400, "n")  # the batch has 4 rows
    _error(lambda: comp(model=folder, prompt="hi", max_tokens=0), 400, "max_tokens")
    _error(lambda: comp(model=folder, prompt="hi " * 5000, max_tokens=2), 400, "prompt", "context_length_exceeded")
    _error(lambda: comp(model=folder, prompt="hi", max_tokens=4096), 400, "prompt", "context_length_exceeded")
    _error(lambda: client.chat.completions.create(model=folder, messages=[{"role": "wizard", "content": "x"}]),
           400)
    _error(lambda: client.embeddings.create(model=folder, input="x"), 400, "model")
    _error(lambda: comp(model=folder, prompt="hi", max_tokens=2, logit_bias={"5": 10}), 400, "logit_bias",
           "unsupported_parameter")
    _error(lambda: comp(model=folder, prompt="hi", max_tokens=2, echo=True), 400, "echo")
    bad_key = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    _error(lambda: bad_key.completions.create(model=folder, prompt="hi", max_tokens=2), 401, code="invalid_api_key")
    r = httpx.post(server[0] + "/v1/completions", content=b'{"model": "x", "prompt": ', timeout=TIMEOUT,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.completions.create(model=folder, prompt="still alive", max_tokens=2).usage.completion_tokens == 2


def test_a_failing_step_answers_500_and_the_server_goes_on(server, client, tiny, monkeypatch):
    engine, folder = server[1], tiny[0]
    forward = engine.model.forward

    def broken(*args, **kwargs):
        monkeypatch.setattr(engine.model, "forward", forward)  # fails once
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine.model, "forward", broken)
    body = _error(lambda: client.completions.create(model=folder, prompt="boom", max_tokens=3), 500,
                  code="generation_failed")
    assert "simulated kernel failure" in body["message"]
    assert client.completions.create(model=folder, prompt="after", max_tokens=3).usage.completion_tokens == 3


def test_full_queue_429_and_disconnect_frees_rows(server, client, tiny):
    """A request holding all 4 rows, 2 more waiting (max_queue): the next gets 429 with Retry-After. Closing
    the first one's stream cancels it: its rows are freed and the waiting requests run."""
    url, engine = server
    folder = tiny[0]
    cancelled = _metric(url, 'lmforge_sequences_total{reason="cancelled"}')
    stream = client.completions.create(model=folder, prompt="long", max_tokens=4000, n=4, temperature=1.0,
                                       stream=True)
    next(iter(stream))
    _until(lambda: _metric(url, "lmforge_batch_occupancy") == 4, "the batch to fill")
    done: list[int] = []
    waiting = [threading.Thread(target=lambda: done.append(client.completions.create(
        model=folder, prompt="queued", max_tokens=2).usage.completion_tokens)) for _ in range(2)]
    for t in waiting:
        t.start()
    _until(lambda: _metric(url, "lmforge_queue_depth") == 2, "two queued requests")
    r = httpx.post(url + "/v1/completions", json={"model": folder, "prompt": "one too many", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    stream.close()  # the client goes away mid-stream
    for t in waiting:
        t.join(TIMEOUT)
    assert done == [2, 2]
    _until(lambda: not engine.busy, "the engine to be idle")
    assert _metric(url, 'lmforge_sequences_total{reason="cancelled"}') == cancelled + 4


def test_prompts_arriving_together_prefill_in_one_forward_and_equal_running_alone(tiny, tokenizer, monkeypatch):
    """Requests queued before the loop starts are admitted together: one right-padded prefill for all (the
    forward is counted), then each one's text equals running it alone; n=2 rows copy their prompt's row."""
    from lmforge.serve.engine import Request, SamplingParams

    folder, model = tiny
    engine = Engine(load_model(folder), tokenizer, max_batch=6, max_queue=0, context=256)
    prompts = [("Short", 7, 1), ("A rather longer prompt than the others here", 4, 2), ("Mid length one", 9, 1)]
    texts: dict[tuple[int, int], str] = {}
    ended = []

    def sink(p: int):
        def take(e):
            texts[(p, e.index)] = texts.get((p, e.index), "") + e.text
            if e.finish_reason:
                ended.append((p, e.index))
        return take

    for p, (text, n_new, n) in enumerate(prompts):
        engine.submit(Request(tokenizer.encode(text), SamplingParams(max_tokens=n_new, temperature=0), sink(p), n))
    shapes = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward",
                        lambda ids, **kw: shapes.append(tuple(ids.shape)) or forward(ids, **kw))
    engine.start()
    _until(lambda: len(ended) == 4, "the four sequences")
    engine.shutdown(timeout=5)
    assert shapes[0] == (3, len(tokenizer.encode(prompts[1][0])))  # one prefill, the three prompts padded
    for p, (text, n_new, n) in enumerate(prompts):
        expected = lmforge.generate(model, tokenizer, text, max_new_tokens=n_new)[0]
        assert [texts[(p, i)] for i in range(n)] == [expected] * n


def test_shutdown_ends_what_cannot_finish_in_time(tiny, tokenizer):
    """Engine.shutdown(timeout): no new requests; a request still running at the deadline gets an error event
    ("shutting_down") and the loop stops."""
    from lmforge.serve.engine import Request, SamplingParams, ShuttingDown

    engine = Engine(load_model(tiny[0]), tokenizer, max_batch=2, max_queue=1, context=4096)
    engine.start()
    events = []
    engine.submit(Request(tokenizer.encode("long"), SamplingParams(max_tokens=4000), events.append))
    _until(lambda: events, "the first token")
    start = time.monotonic()
    engine.shutdown(timeout=0.2)
    assert time.monotonic() - start < 15
    assert events[-1].error_code == "shutting_down" and events[-1].finish_reason is None
    assert 0 < sum(len(e.token_ids) for e in events) < 4000
    with pytest.raises(ShuttingDown):
        engine.submit(Request(tokenizer.encode("late"), SamplingParams(max_tokens=2), events.append))


# --- the command line: SmolLM2 served by `lmforge serve`, graceful shutdown ---------------------------------

@pytest.mark.slow
def test_cli_serve_smollm2_greedy_equals_generate_and_graceful_shutdown(capsys):
    prompt, n = "The capital of France is", 16
    assert main(["generate", prompt, "--model", "smollm2-135m-instruct", "--dtype", "float32",
                 "--max-new-tokens", str(n), "--json"]) == 0
    expected = prompt + json.loads(capsys.readouterr().out)["outputs"][0]["text"]
    sock = _bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", "smollm2-135m-instruct",
                             "--dtype", "float32", "--port", str(port), "--max-batch", "2", "--context", "256",
                             "--shutdown-timeout", "30"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parent)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        _until(up, "lmforge serve to start", timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        out = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=n, temperature=0)
        assert prompt + out.choices[0].text == expected
        # SIGTERM while a stream is running: it still ends normally, then the process exits cleanly
        stream = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1]
        assert finish == "length" and rest[-1].usage.completion_tokens == 24
        # uvicorn re-raises the signal after its graceful shutdown, so a clean exit reports SIGTERM
        assert proc.wait(TIMEOUT) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
