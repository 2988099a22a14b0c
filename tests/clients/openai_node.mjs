// The official `openai` Node SDK against ComputeTower: a chat stream with tool calls, and a
// Responses stream. Usage: node openai_node.mjs '{"base_url", "model", "node_modules"}'.
// Prints {"checks": [...]} when every check passed; throws otherwise.
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const args = JSON.parse(process.argv[2]);
const require = createRequire(args.node_modules + "/");
const sdk = require("openai");
const OpenAI = sdk.OpenAI ?? sdk.default ?? sdk;
const client = new OpenAI({ baseURL: args.base_url, apiKey: "unused", maxRetries: 0 });
const tools = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "The weather now in a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  },
];
const checks = [];

async function chatStreamWithToolCalls() {
  const stream = await client.chat.completions.create({
    model: args.model,
    stream: true,
    messages: [{ role: "user", content: "call get_weather with city Paris" }],
    tools,
  });
  let content = "";
  let finish = null;
  const calls = {};
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      content += choice.delta.content ?? "";
      for (const tc of choice.delta.tool_calls ?? []) {
        const call = (calls[tc.index] ??= { id: "", name: "", arguments: "" });
        call.id ||= tc.id ?? "";
        call.name ||= tc.function?.name ?? "";
        call.arguments += tc.function?.arguments ?? "";
      }
      finish = choice.finish_reason ?? finish;
    }
  }
  assert.equal(finish, "tool_calls");
  assert.equal(content, "I will call get_weather.\n");
  assert.deepEqual(Object.keys(calls), ["0"]);
  assert.match(calls[0].id, /^call_/);
  assert.equal(calls[0].name, "get_weather");
  assert.deepEqual(JSON.parse(calls[0].arguments), { city: "Paris" });
  // The SDK's own accumulator agrees.
  const runner = client.chat.completions.stream({
    model: args.model,
    messages: [{ role: "user", content: "call get_weather with city Rome" }],
    tools,
  });
  const final = await runner.finalChatCompletion();
  assert.deepEqual(JSON.parse(final.choices[0].message.tool_calls[0].function.arguments), { city: "Rome" });
  checks.push("chat_stream_with_tool_calls");
}

async function responsesStream() {
  const stream = await client.responses.create({
    model: args.model,
    input: "call get_weather with city Oslo",
    tools: [{ type: "function", ...tools[0].function }],
    stream: true,
  });
  const types = [];
  let completed = null;
  let sequence = -1;
  for await (const event of stream) {
    types.push(event.type);
    assert.equal(event.sequence_number, sequence + 1);
    sequence = event.sequence_number;
    if (event.type === "response.completed") completed = event.response;
  }
  assert.equal(types[0], "response.created");
  assert.equal(types.at(-1), "response.completed");
  const call = completed.output.find((item) => item.type === "function_call");
  assert.equal(call.name, "get_weather");
  assert.deepEqual(JSON.parse(call.arguments), { city: "Oslo" });
  const answer = await client.responses.create({
    model: args.model,
    previous_response_id: completed.id,
    input: [{ type: "function_call_output", call_id: call.call_id, output: "cold" }],
    stream: true,
  });
  let text = "";
  for await (const event of answer) {
    if (event.type === "response.output_text.delta") text += event.delta;
  }
  assert.equal(text, "Tool results: get_weather → cold.");
  checks.push("responses_stream");
}

await chatStreamWithToolCalls();
await responsesStream();
console.log(JSON.stringify({ checks }));
