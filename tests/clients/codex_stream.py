"""A streaming Responses client that reads the raw SSE the way the Codex CLI does and checks
what it relies on: `sequence_number` starts at 0 and rises by one; `response.created` comes
first and `response.completed` last (nothing after it); every item is added before its deltas
and done after them, with the `output_index` it was added at; the function call's argument
deltas add up to the `done` arguments; the completed response lists the items in order.

Usage: codex_stream.py '{"base_url", "model"}'; prints {"checks": [...]}.
"""

import json
import sys

import httpx

ARGS = json.loads(sys.argv[1])
CHECKS = []
TOOLS = [
    {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}}},
            "required": ["command"],
        },
    }
]


def check(fn):
    CHECKS.append(fn)
    return fn


def sse(body):
    """Raw SSE events: (event name, data JSON)."""
    with httpx.stream("POST", ARGS["base_url"] + "/responses", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name, data = None, []
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                yield name, json.loads("\n".join(data))
                name, data = None, []


def codex_request(input_items):
    # What Codex sends: store false, the whole history each time, reasoning summaries asked.
    return {
        "model": ARGS["model"],
        "instructions": "You are a coding agent.",
        "input": input_items,
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc",
    }


def verify(events):
    assert events, "no events"
    for i, (name, data) in enumerate(events):
        assert data["sequence_number"] == i, (i, name, data)
        assert data["type"] == name, (name, data)
    assert events[0][0] == "response.created" and events[1][0] == "response.in_progress"
    assert events[-1][0] == "response.completed", events[-1]
    assert sum(1 for n, _ in events if n == "response.completed") == 1
    open_items, done_items = {}, []
    for name, data in events:
        if name == "response.output_item.added":
            index = data["output_index"]
            assert index == len(done_items) and index not in open_items, (index, done_items)
            open_items[index] = data["item"]
        elif name == "response.output_item.done":
            index = data["output_index"]
            assert open_items.pop(index)["id"] == data["item"]["id"]
            done_items.append(data["item"])
        elif "output_index" in data:
            assert data["output_index"] in open_items, (name, data, open_items)
    assert not open_items, open_items
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed"
    assert [i["id"] for i in completed["output"]] == [i["id"] for i in done_items]
    assert completed["usage"]["output_tokens"] > 0
    return done_items


@check
def function_call_then_answer():
    question = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "call shell with command ls"}]}
    events = list(sse(codex_request([question])))
    items = verify(events)
    calls = [i for i in items if i["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "shell", items
    deltas = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    done = [d["arguments"] for n, d in events if n == "response.function_call_arguments.done"]
    assert done == [deltas] == [calls[0]["arguments"]], (deltas, done)
    assert json.loads(deltas) == {"command": ["ls"]}
    history = [question, *[i for i in items if i["type"] != "message"]]
    history.append({"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "README.md"})
    events = list(sse(codex_request(history)))
    items = verify(events)
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == "Tool results: shell → README.md.", text
    message = [i for i in items if i["type"] == "message"][0]
    assert message["content"][0]["text"] == text
    summaries = [i for i in items if i["type"] == "reasoning"]
    assert summaries and summaries[0]["summary"][0]["text"], items


for fn in CHECKS:
    try:
        fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        raise SystemExit(f"check {fn.__name__} failed: {type(e).__name__}: {e}") from e
print(json.dumps({"checks": [fn.__name__ for fn in CHECKS]}))
