//! OpenAI wire types (chat completions) and the streaming chunk encoder.
//!
//! The chunk encoder is on the hot path: it writes each SSE frame straight into bytes from a
//! prefix rendered once per response, escaping only the delta text.

use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; only `1` is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Whether to include reasoning deltas; on unless the client says otherwise.
    #[serde(default)]
    pub include_reasoning: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// A string, a list of content parts, or null (assistant tool calls).
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "System",
            Role::User => "User",
            Role::Assistant => "Assistant",
            Role::Tool | Role::Function => "Tool",
        }
    }
}

impl ChatMessage {
    /// The message's text: a string, or the text parts of a part list joined. Errors name
    /// what is not supported.
    pub fn text(&self) -> Result<String, String> {
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Array(parts) => {
                let mut text = String::new();
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let piece = part.get("text").and_then(Value::as_str).ok_or(
                                "a content part of type `text` needs a string `text`".to_owned(),
                            )?;
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(piece);
                        }
                        Some(other) => {
                            return Err(format!(
                                "content parts of type `{other}` are not supported; send text"
                            ));
                        }
                        None => return Err("a content part lacks `type`".to_owned()),
                    }
                }
                Ok(text)
            }
            _ => Err("`content` must be a string or a list of content parts".to_owned()),
        }
    }
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
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
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
    pub owned_by: &'static str,
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

/// Tokens of `text` in the o200k encoding. The tokenizer is built on first use (it is large),
/// so an idle server does not carry it.
pub fn count_tokens(text: &str) -> u64 {
    match bpe() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        // Unreachable in practice (the table is embedded); a rough count beats no usage.
        None => text.len().div_ceil(4) as u64,
    }
}

fn bpe() -> Option<&'static tiktoken_rs::CoreBPE> {
    static BPE: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

/// The text of the first `n` tokens of `text` (fewer when the `n`th ends inside a character).
pub fn token_prefix(text: &str, n: usize) -> String {
    let Some(bpe) = bpe() else {
        let end = (n * 4).min(text.len());
        let end = (0..=end)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        return text[..end].to_owned();
    };
    let tokens = bpe.encode_ordinary(text);
    (0..=n.min(tokens.len()))
        .rev()
        .find_map(|k| bpe.decode(&tokens[..k]).ok())
        .unwrap_or_default()
}

/// Prompt tokens the way OpenAI counts chat messages: a few tokens of framing per message.
pub fn count_prompt_tokens(messages: &[(Role, String)]) -> u64 {
    3 + messages
        .iter()
        .map(|(role, text)| 3 + count_tokens(role.label()) + count_tokens(text))
        .sum::<u64>()
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
    fn message_text_from_parts_and_errors() {
        let msg: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user", "content": [{"type":"text","text":"a"},{"type":"text","text":"b"}]
        }))
        .unwrap();
        assert_eq!(msg.text().unwrap(), "a\nb");
        let img: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user", "content": [{"type":"image_url","image_url":{"url":"x"}}]
        }))
        .unwrap();
        assert!(img.text().unwrap_err().contains("image_url"));
    }

    #[test]
    fn token_counts_are_plausible() {
        assert_eq!(count_tokens(""), 0);
        let n = count_tokens("Hello, world! This is a test.");
        assert!((5..=12).contains(&n), "{n}");
    }
}
