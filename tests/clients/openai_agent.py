"""What an agent needs from chat completions and the Responses API, through the official
`openai` Python SDK, against a running ComputeTower serving the demo site.

Usage: openai_agent.py '{"base_url", "server", "site", "model", "plain_prompt", "plain_reply"}'
Each check asserts; on success prints {"checks": [names of the checks that ran]}.
The demo site follows tool and JSON instructions deterministically (src/demo/model.rs).
"""

import json
import sys
import time

import httpx
import openai
from openai import OpenAI
from pydantic import BaseModel

ARGS = json.loads(sys.argv[1])
MODEL = ARGS["model"]
client = OpenAI(base_url=ARGS["base_url"], api_key="unused-on-loopback", max_retries=0)
CHECKS = []

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


def check(fn):
    CHECKS.append(fn)
    return fn


def user(text):
    return [{"role": "user", "content": text}]


def decisions():
    return httpx.get(ARGS["server"] + "/admin/decisions?limit=200").json()["data"]


def site_stats():
    return httpx.get(ARGS["site"] + "/__demo/stats").json()


def wait_for(what, condition, limit=30.0):
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.02)


def stream_calls(**kwargs):
    """Streams a completion; returns content, {index: (id, name, arguments)}, finish, chunks."""
    content, calls, finish, chunks = "", {}, None, []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        chunks.append(chunk)
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, [None, None, ""])
                if tc.id:
                    entry[0] = tc.id
                if tc.function and tc.function.name:
                    entry[1] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry[2] += tc.function.arguments
            finish = choice.finish_reason or finish
    return content, calls, finish, chunks


@check
def tool_auto_nonstream():
    r = client.chat.completions.create(
        model=MODEL, messages=user("Please call get_weather with city Paris."), tools=[WEATHER, TIME]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == "I will call get_weather.\n", repr(choice.message.content)
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_"), call
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}, call.function.arguments


@check
def tool_auto_stream():
    content, calls, finish, chunks = stream_calls(
        messages=user("call get_weather with city Paris and days 2"), tools=[WEATHER]
    )
    assert finish == "tool_calls"
    assert content == "I will call get_weather.\n", repr(content)
    assert list(calls) == [0], calls
    call_id, name, arguments = calls[0]
    assert call_id.startswith("call_") and name == "get_weather"
    assert json.loads(arguments) == {"city": "Paris", "days": 2}
    # The id and name come first, the arguments in a later chunk, as OpenAI streams them.
    deltas = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name and not deltas[0].function.arguments
    assert deltas[1].id is None and deltas[1].function.arguments


@check
def tool_parallel_and_not():
    prompt = user("call get_weather with city Oslo and call get_time with zone CET")
    r = client.chat.completions.create(model=MODEL, messages=prompt, tools=[WEATHER, TIME])
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"], calls
    assert json.loads(calls[1].function.arguments) == {"zone": "CET"}
    assert len({c.id for c in calls}) == 2
    _, streamed, finish, _ = stream_calls(messages=prompt, tools=[WEATHER, TIME])
    assert sorted(streamed) == [0, 1] and finish == "tool_calls", streamed
    assert [streamed[i][1] for i in (0, 1)] == ["get_weather", "get_time"]
    r = client.chat.completions.create(
        model=MODEL, messages=prompt, tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    assert len(r.choices[0].message.tool_calls) == 1


@check
def tool_named():
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("call get_time with zone UTC"),
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "UTC"}


@check
def tool_required_gets_a_repair_turn():
    before = len([d for d in decisions() if d["failure"] == "tool_call_missing"])
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("What is the weather in city Lima?"),
        tools=[WEATHER],
        tool_choice="required",
    )
    assert r.choices[0].finish_reason == "tool_calls", r
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Lima"}
    # The first reply (prose, no call) was held back, not sent: only the repair turn's text.
    assert r.choices[0].message.content == "I will call get_weather.\n", r.choices[0].message.content
    found = [d for d in decisions() if d["failure"] == "tool_call_missing"]
    assert len(found) == before + 1 and found[0]["action"] == "repair", found


@check
def malformed_call_is_repaired():
    before = len([d for d in decisions() if d["failure"] == "tool_call_invalid"])
    for stream in (False, True):
        messages = user("call get_weather with city Rome, badly")
        if stream:
            content, calls, finish, _ = stream_calls(messages=messages, tools=[WEATHER])
            args = calls[0][2]
        else:
            r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
            finish, args = r.choices[0].finish_reason, r.choices[0].message.tool_calls[0].function.arguments
            content = r.choices[0].message.content
        assert finish == "tool_calls"
        assert json.loads(args) == {"city": "Rome"}, args
        assert content == "I will call get_weather.\n", repr(content)
    found = [d for d in decisions() if d["failure"] == "tool_call_invalid"]
    assert len(found) == before + 2 and all(d["action"] == "repair" for d in found[:2]), found


@check
def a_call_still_broken_after_the_repair_comes_back_as_text():
    r = client.chat.completions.create(
        model=MODEL, messages=user("call get_weather with city Rome, always badly"), tools=[WEATHER]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
    assert '<tool_call>\n{"name": "get_weather", "arguments": {' in choice.message.content, choice.message.content
    assert decisions()[0]["failure"] == "tool_call_invalid" and decisions()[0]["action"] == "returned_as_text"


@check
def tool_results_in_history():
    messages = user("call get_weather with city Paris") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "Tool results: get_weather → sunny, 21 C.", r.choices[0].message.content
    assert not r.choices[0].message.tool_calls


@check
def tool_choice_none_sends_no_tools():
    r = client.chat.completions.create(
        model=MODEL, messages=user("call get_weather with city Paris"), tools=[WEATHER], tool_choice="none"
    )
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("You said: call get_weather with city Paris")


@check
def max_tokens_cuts_and_cancels_the_site():
    full = ARGS["plain_reply"]
    for kwargs in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        cancelled = site_stats()["cancelled"]
        r = client.chat.completions.create(model=MODEL, messages=user(ARGS["plain_prompt"]), **kwargs)
        assert r.choices[0].finish_reason == "length", r
        text = r.choices[0].message.content
        assert text and full.startswith(text) and len(text) < 40, repr(text)
        wait_for("the site's reply to be cancelled", lambda: site_stats()["cancelled"] > cancelled)
        event = httpx.get(ARGS["server"] + "/admin/events?limit=1").json()["data"][0]
        assert event["outcome"] == "ok" and "cut short" in event["detail"], event
    content, _, finish, _ = stream_calls(messages=user(ARGS["plain_prompt"]), max_tokens=5)
    assert finish == "length" and full.startswith(content) and len(content) < 40, repr(content)


@check
def stop_sequences_cut():
    full = ARGS["plain_reply"]
    r = client.chat.completions.create(model=MODEL, messages=user(ARGS["plain_prompt"]), stop=["characters", "zzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full.split("characters")[0], repr(r.choices[0].message.content)
    content, _, finish, _ = stream_calls(messages=user(ARGS["plain_prompt"]), stop="noticed")
    assert finish == "stop" and content == full.split("noticed")[0], repr(content)


@check
def json_object():
    r = client.chat.completions.create(
        model=MODEL, messages=user("Describe Paris"), response_format={"type": "json_object"}
    )
    # The site wraps it in prose and a code fence; the content is the JSON alone.
    value = json.loads(r.choices[0].message.content)
    assert value == {"you_said": "Describe Paris", "words": 2}, value


class Person(BaseModel):
    name: str
    age: int


@check
def json_schema_parse():
    r = client.chat.completions.parse(
        model=MODEL, messages=user("The person is name Ada and age 36."), response_format=Person
    )
    assert r.choices[0].message.parsed == Person(name="Ada", age=36), r.choices[0].message
    # A broken first answer is repaired.
    r = client.chat.completions.parse(
        model=MODEL, messages=user("name Alan age 41, badly"), response_format=Person
    )
    assert r.choices[0].message.parsed == Person(name="Alan", age=41)


@check
def models_retrieve():
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.owned_by == "127.0.0.1", model
    assert MODEL in [m.id for m in client.models.list()]
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("expected 404")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found"


@check
def parameters_refused_or_ignored():
    for kwargs, param in (({"temperature": 3}, "temperature"), ({"logprobs": True}, "logprobs"), ({"n": 2}, "n")):
        try:
            client.chat.completions.create(model=MODEL, messages=user("hi"), **kwargs)
            raise AssertionError(f"{kwargs} accepted")
        except openai.BadRequestError as e:
            assert e.body["param"] == param, e.body
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("hi"),
        temperature=0.3,
        top_p=0.9,
        seed=7,
        user="u1",
        metadata={"k": "v"},
        presence_penalty=0.1,
        extra_body={"some_unknown_field": {"librechat": True}},
    )
    assert r.choices[0].message.content.startswith("You said: hi")


@check
def images_only_refused_in_the_new_turn():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    try:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]
        )
        raise AssertionError("image accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "messages[0].content[1]", e.body
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "thanks"},
        ],
    )
    assert r.choices[0].message.content.startswith("You said: thanks")


@check
def responses_function_call_round_trip():
    tools = [{"type": "function", **WEATHER["function"]}]
    first = client.responses.create(model=MODEL, input="call get_weather with city Paris", tools=tools)
    assert first.status == "completed", first
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", first.output
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=tools,
    )
    assert second.output_text == "Tool results: get_weather → sunny.", second.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text


@check
def responses_stream_round_trip():
    tools = [{"type": "function", **WEATHER["function"]}]
    kinds, call, completed = [], None, None
    with client.responses.stream(model=MODEL, input="call get_weather with city Oslo", tools=tools) as stream:
        for event in stream:
            kinds.append(event.type)
        completed = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed", kinds
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds, kinds
    call = [item for item in completed.output if item.type == "function_call"][0]
    # A full history instead of previous_response_id, as clients with store=false send it.
    history = [
        {"role": "user", "content": "call get_weather with city Oslo"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "snow"},
    ]
    text = ""
    with client.responses.stream(model=MODEL, input=history, tools=tools, store=False) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert text == final.output_text == "Tool results: get_weather → snow.", (text, final.output_text)
    try:
        client.responses.retrieve(final.id)
        raise AssertionError("a store=false response was stored")
    except openai.NotFoundError:
        pass


@check
def responses_previous_response_id_continues_the_site_conversation():
    first = client.responses.create(model=MODEL, input="hello", instructions="Be kind.")
    assert first.output_text.startswith("You said: hello"), first.output_text
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "message"], kinds
    assert first.output[0].summary[0].text, first.output[0]
    second = client.responses.create(model=MODEL, input="again", previous_response_id=first.id, instructions="Be kind.")
    # The site continued its own conversation: its second turn says so.
    assert "This is turn **2**" in second.output_text, second.output_text
    assert second.previous_response_id == first.id
    try:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope")
        raise AssertionError("unknown previous_response_id accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "previous_response_id", e.body


for fn in CHECKS:
    try:
        fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        raise SystemExit(f"check {fn.__name__} failed: {type(e).__name__}: {e}") from e
print(json.dumps({"checks": [fn.__name__ for fn in CHECKS]}))
