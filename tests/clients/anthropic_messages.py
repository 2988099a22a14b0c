"""The official `anthropic` Python SDK against ComputeTower's `/v1/messages`, as Claude Code
and Anthropic SDK users reach it with ANTHROPIC_BASE_URL: text, streaming (thinking and text
deltas), a tool use round trip, stop sequences, and errors in Anthropic's shape.

Usage: anthropic_messages.py '{"base_url", "model", "api_key", "plain_prompt", "plain_reply"}'
Prints {"checks": [...]} when every check passed.
"""

import json
import sys

import anthropic

ARGS = json.loads(sys.argv[1])
MODEL = ARGS["model"]
client = anthropic.Anthropic(base_url=ARGS["base_url"], api_key=ARGS["api_key"], max_retries=0)
CHECKS = []
WEATHER = {
    "name": "get_weather",
    "description": "The weather now in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def text():
    m = client.messages.create(model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": ARGS["plain_prompt"]}])
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "end_turn", m
    texts = [b.text for b in m.content if b.type == "text"]
    assert texts == [ARGS["plain_reply"]], texts
    thinking = [b for b in m.content if b.type == "thinking"]
    assert len(thinking) == 1 and thinking[0].thinking, m.content
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m.usage
    # The system prompt reaches the site (this shape's flow sends the role-tagged history).
    m = client.messages.create(
        model=MODEL,
        max_tokens=1024,
        system=[{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}],
    )
    assert m.content[-1].text.startswith("You said: System: Be kind.\n\nUser: hi\n"), m.content


@check
def stream():
    kinds, text, thinking = [], "", ""
    with client.messages.stream(
        model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": ARGS["plain_prompt"]}]
    ) as s:
        for event in s:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                thinking += event.delta.thinking
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    assert "message_delta" in kinds and kinds.count("content_block_start") == 2, kinds
    assert text == ARGS["plain_reply"] and thinking, (text, thinking)
    assert final.stop_reason == "end_turn" and final.content[-1].text == text


@check
def tool_use_round_trip():
    question = {"role": "user", "content": "call get_weather with city Paris"}
    m = client.messages.create(model=MODEL, max_tokens=1024, tools=[WEATHER], messages=[question])
    assert m.stop_reason == "tool_use", m
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}, use
    answer = client.messages.create(
        model=MODEL,
        max_tokens=1024,
        tools=[WEATHER],
        messages=[
            question,
            {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ],
    )
    assert answer.stop_reason == "end_turn"
    assert [b.text for b in answer.content if b.type == "text"] == ["Tool results: get_weather → sunny."], answer.content
    # Streamed, the call arrives as input_json_delta.
    partial = ""
    with client.messages.stream(model=MODEL, max_tokens=1024, tools=[WEATHER], messages=[question]) as s:
        for event in s:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial += event.delta.partial_json
        final = s.get_final_message()
    assert json.loads(partial) == {"city": "Paris"} and final.stop_reason == "tool_use", partial


@check
def stop_sequences_and_max_tokens():
    m = client.messages.create(
        model=MODEL,
        max_tokens=1024,
        stop_sequences=["noticed"],
        messages=[{"role": "user", "content": ARGS["plain_prompt"]}],
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "noticed", m
    assert m.content[-1].text == ARGS["plain_reply"].split("noticed")[0]
    m = client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": ARGS["plain_prompt"]}])
    assert m.stop_reason == "max_tokens", m
    assert ARGS["plain_reply"].startswith(m.content[-1].text)


@check
def errors_in_anthropic_shape():
    try:
        client.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("unknown model accepted")
    except anthropic.NotFoundError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body
    try:
        client.messages.create(model=MODEL, max_tokens=10, temperature=1.5, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("temperature 1.5 accepted")
    except anthropic.BadRequestError as e:
        assert e.body["error"]["type"] == "invalid_request_error", e.body
    bad_key = anthropic.Anthropic(base_url=ARGS["base_url"], api_key="wrong", max_retries=0)
    try:
        bad_key.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        assert e.body["error"]["type"] == "authentication_error", e.body


@check
def count_tokens():
    n = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    assert 3 < n.input_tokens < 50, n


for fn in CHECKS:
    try:
        fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        raise SystemExit(f"check {fn.__name__} failed: {type(e).__name__}: {e}") from e
print(json.dumps({"checks": [fn.__name__ for fn in CHECKS]}))
