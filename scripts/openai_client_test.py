"""The official `openai` client against `hearth serve`: every call a user of the client
would make first. Prints a `test result:` line that scripts/test counts."""
import json
import sys
import time

import openai
import pydantic
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


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False},
    "strict": True}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def tools():
    r = client.chat.completions.create(model=model, messages=ASK, tools=WEATHER,
                                       tool_choice="required", temperature=0, max_tokens=100)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "unit"}, call
    # The same call streamed, assembled as the client's users do.
    calls, finish = {}, None
    for chunk in client.chat.completions.create(model=model, messages=ASK, tools=WEATHER,
                                                tool_choice="required", temperature=0,
                                                max_tokens=100, stream=True):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls", finish
    assert [(v["name"], v["arguments"]) for v in calls.values()] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls], calls
    # The result goes back and the model answers in text.
    r2 = client.chat.completions.create(
        model=model, tools=WEATHER, max_tokens=30, temperature=0,
        messages=ASK + [c.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id,
                         "content": json.dumps({"temperature": 21})}])
    assert r2.choices[0].message.content, r2


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


def structured():
    # The client's own parse() helper: a pydantic model becomes a strict json_schema.
    r = client.beta.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City, temperature=0, max_tokens=100)
    city = r.choices[0].message.parsed
    assert isinstance(city, City), r
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a JSON object with the name and age of Alice, who is 30."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert isinstance(json.loads(r.choices[0].message.content), dict), r


def embeddings():
    # A second server with the embedding model; the client asks for base64 by default
    # and decodes it itself.
    e = OpenAI(base_url=sys.argv[3], api_key=key, max_retries=0)
    for _ in range(600):
        try:
            e.models.list()
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(0.1)
    name = e.models.list().data[0].id
    r = e.embeddings.create(model=name, input=["The hearth is warm.", "A cold night."])
    assert [d.index for d in r.data] == [0, 1], r
    v = r.data[0].embedding
    assert len(v) == 384 and abs(sum(x * x for x in v) - 1.0) < 1e-4, len(v)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
    f = e.embeddings.create(model=name, input="The hearth is warm.", encoding_format="float", dimensions=384)
    assert max(abs(a - b) for a, b in zip(f.data[0].embedding, v)) < 1e-6
    try:
        e.embeddings.create(model=name, input="x", dimensions=64)
        raise AssertionError("dimensions 64 accepted")
    except openai.BadRequestError as err:
        assert err.body["param"] == "dimensions", err.body


tests = [("models", models), ("chat", chat), ("chat stream", chat_stream),
         ("chat logprobs, n, stop", chat_logprobs_n_stop),
         ("completions", completions), ("errors", errors),
         ("tool calls, streamed and back", tools), ("structured output", structured)]
if len(sys.argv) > 3:
    tests.append(("embeddings", embeddings))
for name, fn in tests:
    check(name, fn)
print(f"openai {openai.__version__} client")
print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed")
sys.exit(1 if failed else 0)
