"""Sends an image through the official `openai` SDK as a `data:` URL in an `image_url` part.

Usage: openai_image.py '{"base_url", "model", "prompt", "image_path", "mime", "tier"?, "stream"?}'
Prints {"content": ..., "chunks": N} on success, {"status": S, "error": {...}} on an API error.
"""

import base64
import json
import sys

import openai
from openai import OpenAI


def main():
    args = json.loads(sys.argv[1])
    client = OpenAI(base_url=args["base_url"], api_key=args.get("api_key", "unused"), max_retries=0)
    with open(args["image_path"], "rb") as f:
        image_b64 = base64.b64encode(f.read()).decode()
    headers = {"x-computetower-tier": str(args["tier"])} if args.get("tier") else None
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": args["prompt"]},
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:{args['mime']};base64,{image_b64}"},
                },
            ],
        }
    ]
    try:
        if args.get("stream"):
            content, chunks = "", 0
            stream = client.chat.completions.create(
                model=args["model"], messages=messages, stream=True, extra_headers=headers
            )
            for chunk in stream:
                chunks += 1
                if chunk.choices and chunk.choices[0].delta.content:
                    content += chunk.choices[0].delta.content
            print(json.dumps({"content": content, "chunks": chunks}))
        else:
            r = client.chat.completions.create(
                model=args["model"], messages=messages, extra_headers=headers
            )
            print(json.dumps({"content": r.choices[0].message.content, "chunks": 1}))
    except openai.APIStatusError as e:
        print(json.dumps({"status": e.status_code, "error": e.body}))


if __name__ == "__main__":
    main()
