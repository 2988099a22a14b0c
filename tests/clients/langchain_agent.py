"""LangChain's `ChatOpenAI` against ComputeTower: `bind_tools` yields `tool_calls`, and
`with_structured_output` returns the object (JSON schema and function-calling methods).

Usage: langchain_agent.py '{"base_url", "model"}'; prints {"checks": [...]}.
"""

import json
import sys

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

ARGS = json.loads(sys.argv[1])
llm = ChatOpenAI(model=ARGS["model"], base_url=ARGS["base_url"], api_key="unused", max_retries=0)
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@tool
def get_weather(city: str) -> str:
    """The weather now in a city."""
    return "sunny in " + city


class Person(BaseModel):
    """A person."""

    name: str
    age: int


@check
def bind_tools_gives_tool_calls():
    bound = llm.bind_tools([get_weather])
    question = HumanMessage("call get_weather with city Paris")
    reply = bound.invoke([question])
    assert len(reply.tool_calls) == 1, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}, call
    result = get_weather.invoke(call["args"])
    final = bound.invoke([question, reply, ToolMessage(result, tool_call_id=call["id"])])
    assert final.content == "Tool results: get_weather → sunny in Paris.", final.content
    assert not final.tool_calls
    streamed = None
    for chunk in bound.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["args"] == {"city": "Paris"}, streamed.tool_calls


@check
def structured_output_returns_the_object():
    # json_schema: response_format with the schema; function_calling: a named tool, which
    # the demo model only calls on the repair turn (it answers prose first).
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Person, method=method)
        person = structured.invoke("The person is name Ada and age 36.")
        assert person == Person(name="Ada", age=36), (method, person)


for fn in CHECKS:
    try:
        fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        raise SystemExit(f"check {fn.__name__} failed: {type(e).__name__}: {e}") from e
print(json.dumps({"checks": [fn.__name__ for fn in CHECKS]}))
