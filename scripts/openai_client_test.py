"""The official `openai` client against `hearth serve`: every call a user of the client
would make first. Prints a `test result:` line that scripts/test counts."""
import sys
import time

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        failed += 1
        print(f"FAIL  {name}: {type(e).__name__}: {e}")


def wait_ready():
    for _ in range(600):
        try:
            client.models.list()
            return
        except openai.APIStatusError as e:
            if e.status_code != 503:
                raise
        except openai.APIConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server never got ready")


wait_ready()
model = client.models.list().data[0].id


def models():
    m = client.models.list()
    assert len(m.data) == 1 and m.data[0].object == "model", m
    assert client.models.retrieve(model).id == model


def chat():
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is the capital of Germany?"}],
        max_tokens=32, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and "Berlin" in c.message.content, c
    assert c.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def chat_stream():
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=24, temperature=0).choices[0].message.content
    text, usage, finish = "", None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == whole, (text, whole)
    assert usage and usage.completion_tokens > 0 and finish in ("stop", "length")


def chat_logprobs_n_stop():
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count: one, two, three"}],
        max_tokens=16, temperature=0.7, seed=1, n=2, logprobs=True, top_logprobs=2, stop=["five"])
    assert len(r.choices) == 2
    for c in r.choices:
        assert "five" not in c.message.content
        assert c.logprobs.content and len(c.logprobs.content[0].top_logprobs) == 2


def completions():
    r = client.completions.create(model=model, prompt="The capital of France is",
                                  max_tokens=8, temperature=0, logprobs=1)
    assert "Paris" in r.choices[0].text, r
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert text == r.choices[0].text, (text, r.choices[0].text)


def errors():
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    try:
        client.completions.create(model=model, prompt="hearth " * 9000, max_tokens=4)
        raise AssertionError("a prompt beyond the context was accepted")
    except openai.BadRequestError as e:
        assert e.body["code"] == "context_length_exceeded", e.body
    try:
        OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401


for name, fn in [("models", models), ("chat", chat), ("chat stream", chat_stream),
                 ("chat logprobs, n, stop", chat_logprobs_n_stop),
                 ("completions", completions), ("errors", errors)]:
    check(name, fn)
print(f"openai {openai.__version__} client")
print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed")
sys.exit(1 if failed else 0)
