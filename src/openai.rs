//! OpenAI wire types (chat completions) and the streaming chunk encoder.
//!
//! The chunk encoder is on the hot path: it writes each SSE frame straight into bytes from a
//! prefix rendered once per response, escaping only the delta text.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::role::Role;

/// `POST /v1/chat/completions`. Unknown fields are accepted (clients send many); the ones
/// named here are honoured, checked or refused by `api::openai`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only `1` is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Whether to include reasoning deltas; on unless the client says otherwise.
    #[serde(default)]
    pub include_reasoning: Option<bool>,
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    /// `auto`, `none`, `required`, or `{"type":"function","function":{"name":…}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// The legacy form of `tools`.
    #[serde(default)]
    pub functions: Option<Vec<FunctionDef>>,
    /// The legacy form of `tool_choice`: `auto`, `none` or `{"name":…}`.
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// A string or up to 4 strings.
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ToolDef {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<FunctionDef>,
}

fn function_type() -> String {
    "function".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// A string, a list of content parts, or null (assistant tool calls).
    #[serde(default)]
    pub content: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The legacy form of `tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<WireFunction>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireToolCall {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: WireFunction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireFunction {
    #[serde(default)]
    pub name: String,
    /// JSON text (some clients send the object itself).
    #[serde(default)]
    pub arguments: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
    pub logprobs: Option<()>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// Null when the reply is only tool calls, as OpenAI sends it.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_call: Option<WireFunction>,
    pub refusal: Option<()>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens_details: None,
        }
    }
}

impl From<crate::chat::Usage> for Usage {
    fn from(usage: crate::chat::Usage) -> Self {
        Self {
            completion_tokens_details: Some(CompletionDetails {
                reasoning_tokens: usage.reasoning_tokens,
            }),
            ..Self::new(usage.prompt_tokens, usage.completion_tokens)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    /// The site that serves it (its host).
    pub owned_by: String,
}

/// Writes `chat.completion.chunk` SSE frames for one response.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    /// `data: {"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":`
    head: Bytes,
}

impl ChunkEncoder {
    pub fn new(id: &str, created: i64, model: &str) -> Self {
        let mut head = BytesMut::with_capacity(96 + id.len() + model.len());
        head.put_slice(b"data: {\"id\":");
        write_json_string(&mut head, id);
        head.put_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        head.put_slice(created.to_string().as_bytes());
        head.put_slice(b",\"model\":");
        write_json_string(&mut head, model);
        head.put_slice(b",\"choices\":");
        Self {
            head: head.freeze(),
        }
    }

    fn frame(&self, capacity: usize, body: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut out = BytesMut::with_capacity(self.head.len() + capacity + 64);
        out.put_slice(&self.head);
        body(&mut out);
        out.put_slice(b"}\n\n");
        out.freeze()
    }

    /// The first chunk: the assistant role, empty content.
    pub fn role(&self) -> Bytes {
        self.frame(0, |out| {
            out.put_slice(
                br#"[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]"#,
            )
        })
    }

    /// A content delta.
    pub fn content(&self, text: &str) -> Bytes {
        self.delta("content", text)
    }

    /// A reasoning delta (`reasoning_content`, as OpenAI-compatible reasoning APIs send it).
    pub fn reasoning(&self, text: &str) -> Bytes {
        self.delta("reasoning_content", text)
    }

    fn delta(&self, field: &str, text: &str) -> Bytes {
        self.frame(text.len() + 8, |out| {
            out.put_slice(b"[{\"index\":0,\"delta\":{\"");
            out.put_slice(field.as_bytes());
            out.put_slice(b"\":");
            write_json_string(out, text);
            out.put_slice(b"},\"finish_reason\":null}]");
        })
    }

    /// A tool call, as OpenAI streams one: its id and name, then its arguments.
    pub fn tool_call(&self, index: usize, call: &crate::chat::ToolCall) -> [Bytes; 2] {
        let head = serde_json::json!([{"index": 0, "delta": {"tool_calls": [{
            "index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": ""}}]}, "finish_reason": null}]);
        let args = serde_json::json!([{"index": 0, "delta": {"tool_calls": [{
            "index": index, "function": {"arguments": call.arguments}}]}, "finish_reason": null}]);
        [self.json_frame(&head), self.json_frame(&args)]
    }

    /// A call in the legacy `function_call` form (for requests that sent `functions`).
    pub fn function_call(&self, call: &crate::chat::ToolCall) -> [Bytes; 2] {
        let head = serde_json::json!([{"index": 0, "delta": {"function_call": {
            "name": call.name, "arguments": ""}}, "finish_reason": null}]);
        let args = serde_json::json!([{"index": 0, "delta": {"function_call": {
            "arguments": call.arguments}}, "finish_reason": null}]);
        [self.json_frame(&head), self.json_frame(&args)]
    }

    fn json_frame(&self, choices: &Value) -> Bytes {
        let body = serde_json::to_vec(choices).unwrap_or_default();
        self.frame(body.len(), |out| out.put_slice(&body))
    }

    /// The last choice chunk.
    pub fn finish(&self, reason: &str) -> Bytes {
        self.frame(16, |out| {
            out.put_slice(b"[{\"index\":0,\"delta\":{},\"finish_reason\":");
            write_json_string(out, reason);
            out.put_slice(b"}]");
        })
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage(&self, usage: Usage) -> Bytes {
        self.frame(96, |out| {
            out.put_slice(b"[],\"usage\":");
            out.put_slice(&serde_json::to_vec(&usage).unwrap_or_default());
        })
    }

    pub fn done() -> Bytes {
        Bytes::from_static(b"data: [DONE]\n\n")
    }
}

/// An SSE frame carrying an OpenAI error object, for failures after the stream began.
pub fn error_frame(body: &Value) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(b"data: ");
    out.put_slice(&serde_json::to_vec(body).unwrap_or_default());
    out.put_slice(b"\n\n");
    out.freeze()
}

/// Writes `s` as a JSON string literal.
pub fn write_json_string(out: &mut BytesMut, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.put_u8(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.put_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.put_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.put_slice(escape);
        }
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
    out.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(frame: &Bytes) -> Value {
        let text = std::str::from_utf8(frame).unwrap();
        let json = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn chunks_are_valid_json_with_escaped_text() {
        let enc = ChunkEncoder::new("chatcmpl-1", 1700000000, "demo\"x");
        let tricky = "a \"quote\" \\ back\nline\u{1}é🙂";
        let chunk = parse(&enc.content(tricky));
        assert_eq!(chunk["choices"][0]["delta"]["content"], tricky);
        assert_eq!(chunk["model"], "demo\"x");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        let reasoning = parse(&enc.reasoning("hmm"));
        assert_eq!(reasoning["choices"][0]["delta"]["reasoning_content"], "hmm");
        let finish = parse(&enc.finish("stop"));
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        let usage = parse(&enc.usage(Usage::new(3, 4)));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(
            parse(&enc.role())["choices"][0]["delta"]["role"],
            "assistant"
        );
    }

    #[test]
    fn tool_call_chunks_carry_id_and_name_then_arguments() {
        let enc = ChunkEncoder::new("c", 1, "m");
        let call = crate::chat::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        };
        let [head, args] = enc.tool_call(2, &call);
        let head = parse(&head);
        let delta = &head["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(delta["index"], 2);
        assert_eq!(delta["id"], "call_1");
        assert_eq!(delta["function"]["name"], "get_weather");
        let args = parse(&args);
        assert_eq!(
            args["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
    }
}
