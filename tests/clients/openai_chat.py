"""Black-box client of a running ComputeTower, through the official `openai` SDK.

Usage: openai_chat.py '{"base_url": ..., "api_key": ..., "model": ..., "prompt": ..., "mode": ...}'
Prints one JSON object with what the SDK saw. Modes:
  chat   — one non-streamed and one streamed completion (with usage)
  error  — one non-streamed completion expected to fail: status and error body
"""

import json
import sys

import openai
from openai import OpenAI


def reasoning_of(obj):
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("reasoning_content")


def chat(client, args):
    messages = [{"role": "user", "content": args["prompt"]}]
    out = {}
    r = client.chat.completions.create(model=args["model"], messages=messages)
    out["nonstream"] = {
        "content": r.choices[0].message.content,
        "reasoning": reasoning_of(r.choices[0].message),
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump() if r.usage else None,
        "object": r.object,
    }
    content, reasoning, usage, chunks, finish = "", "", None, 0, None
    stream = client.chat.completions.create(
        model=args["model"],
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += reasoning_of(choice.delta) or ""
            finish = choice.finish_reason or finish
    out["stream"] = {
        "content": content,
        "reasoning": reasoning or None,
        "usage": usage,
        "chunks": chunks,
        "finish_reason": finish,
    }
    plain = client.chat.completions.create(model=args["model"], messages=messages, stream=True)
    out["stream_without_usage"] = {"usage_seen": any(c.usage is not None for c in plain)}
    return out


def error(client, args):
    try:
        client.chat.completions.create(
            model=args["model"], messages=[{"role": "user", "content": args["prompt"]}]
        )
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": e.body, "type": type(e).__name__}
    return {"status": 200}


def conversation(client, args):
    """Three turns, each resending the whole history; then the same third turn with an edited
    first message."""
    history, replies = [], []
    for turn in args["turns"]:
        history.append({"role": "user", "content": turn})
        r = client.chat.completions.create(model=args["model"], messages=history)
        reply = r.choices[0].message.content
        replies.append(reply)
        history.append({"role": "assistant", "content": reply})
    edited = [dict(m) for m in history[:-1]]
    edited[0]["content"] = edited[0]["content"] + " (edited)"
    r = client.chat.completions.create(model=args["model"], messages=edited)
    return {"replies": replies, "edited": r.choices[0].message.content}


def concurrent(client, args):
    """N streams at once through the async client; what each one received."""
    import asyncio
    from openai import AsyncOpenAI

    async def one(aclient, i):
        try:
            stream = await aclient.chat.completions.create(
                model=args["model"],
                messages=[{"role": "user", "content": f"{args['prompt']} {i}"}],
                stream=True,
            )
            text = ""
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
            return {"i": i, "content": text}
        except openai.APIError as e:
            return {"i": i, "error": str(e), "status": getattr(e, "status_code", None)}

    async def run():
        aclient = AsyncOpenAI(base_url=args["base_url"], api_key=args.get("api_key") or "unused",
                              max_retries=0, timeout=120)
        return await asyncio.gather(*(one(aclient, i) for i in range(args["n"])))

    return {"results": asyncio.run(run())}


def main():
    args = json.loads(sys.argv[1])
    client = OpenAI(base_url=args["base_url"], api_key=args.get("api_key") or "unused", max_retries=0)
    modes = {"chat": chat, "error": error, "conversation": conversation, "concurrent": concurrent}
    result = modes[args["mode"]](client, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
