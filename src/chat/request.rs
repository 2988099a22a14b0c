//! The internal request every front door translates to: the conversation (tool calls and
//! tool results included), the tools offered, and the limits and output format asked for.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attachment::Attachment;

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    /// System or developer instructions.
    System {
        text: String,
    },
    User {
        parts: Vec<Part>,
    },
    Assistant {
        text: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        calls: Vec<ToolCall>,
    },
    /// The result of one tool call.
    Tool {
        call_id: String,
        /// The tool's name, when the client says it (or the call it answers does).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        parts: Vec<Part>,
    },
}

/// A piece of a user turn or a tool result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    /// An image; `at` names where it was in the client's request (for errors).
    Image {
        at: String,
        media: Media,
    },
    /// A file or document attachment.
    File {
        at: String,
        media: Media,
    },
}

/// What an image or file part holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Media {
    /// The bytes came with the request (a `data:` URL, base64).
    Inline { file: Attachment },
    /// An `http(s)` URL, fetched by the server only when `[api] fetch_image_urls` is on.
    Url {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl Media {
    /// The same media, said to be at `place` of the client's request.
    pub fn at(self, place: &str) -> Media {
        match self {
            Media::Inline { mut file } => {
                file.at = place.to_owned();
                Media::Inline { file }
            }
            url => url,
        }
    }
}

impl Part {
    pub fn text(text: impl Into<String>) -> Self {
        Part::Text { text: text.into() }
    }
}

/// A call the assistant made (in the history) or makes (in the reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments (an object schema).
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    #[default]
    Auto,
    /// No tools are offered to the site at all.
    None,
    /// At least one call.
    Required,
    /// A call of this tool.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum OutputFormat {
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// A JSON value that fits `schema`.
    JsonSchema { name: String, schema: Value },
}

impl Message {
    /// The message's own text, in every part that holds text.
    fn texts_mut(&mut self) -> Vec<&mut String> {
        match self {
            Message::System { text } | Message::Assistant { text, .. } => vec![text],
            Message::User { parts } | Message::Tool { parts, .. } => parts
                .iter_mut()
                .filter_map(|p| match p {
                    Part::Text { text } => Some(text),
                    _ => None,
                })
                .collect(),
        }
    }

    /// A system or user message with nothing but whitespace left.
    fn is_blank(&self) -> bool {
        let blank = |parts: &[Part]| {
            parts
                .iter()
                .all(|p| matches!(p, Part::Text { text } if text.trim().is_empty()))
        };
        match self {
            Message::System { text } => text.trim().is_empty(),
            Message::User { parts } => blank(parts),
            Message::Assistant { .. } | Message::Tool { .. } => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: String,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    /// Whether several calls may come in one reply.
    pub parallel_tool_calls: bool,
    /// Most answer tokens (text and tool calls; the site's reasoning is not limited).
    pub max_tokens: Option<u64>,
    /// Stop sequences: the answer is cut before the first one.
    pub stop: Vec<String>,
    pub format: OutputFormat,
    /// Whether reasoning is passed on.
    pub include_reasoning: bool,
    /// Whether the reply's usage is counted (costs a tokenizer pass over the reply).
    pub count_usage: bool,
}

impl Request {
    /// Takes every inline credentials line out of the messages (see `inline`) and returns
    /// the first credentials found. A message left with no text is removed.
    pub fn take_inline_credentials(&mut self) -> Option<crate::inline::InlineCredentials> {
        let mut first = None;
        for message in &mut self.messages {
            for text in message.texts_mut() {
                if let Some(found) = crate::inline::take_from(text) {
                    first.get_or_insert(found);
                }
            }
        }
        if first.is_some() {
            self.messages.retain(|m| !m.is_blank());
        }
        first
    }

    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: true,
            max_tokens: None,
            stop: Vec::new(),
            format: OutputFormat::Text,
            include_reasoning: true,
            count_usage: true,
        }
    }

    /// The tools the site is told about: none with `tool_choice: none`.
    pub fn offered_tools(&self) -> &[Tool] {
        match self.tool_choice {
            ToolChoice::None => &[],
            _ => &self.tools,
        }
    }

    /// Whether the reply needs the emulation's instructions and parser.
    pub fn emulated(&self) -> bool {
        !self.offered_tools().is_empty() || self.format != OutputFormat::Text
    }

    /// Checks what holds across front doors. Errors are `(param, message)`; `param` is the
    /// same name in every API or the wire location a [`Part`] recorded.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.model.trim().is_empty() {
            return Err(("model".into(), "`model` must not be empty.".into()));
        }
        if !self
            .messages
            .iter()
            .any(|m| matches!(m, Message::User { .. } | Message::Tool { .. }))
        {
            return Err((
                "messages".into(),
                "The conversation must include a user message.".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            if !valid_tool_name(&tool.name) {
                return Err((
                    format!("tools[{i}].name"),
                    format!(
                        "Invalid tool name `{}`: use 1 to 64 letters, digits, `_` or `-`.",
                        tool.name
                    ),
                ));
            }
            if !seen.insert(tool.name.as_str()) {
                return Err((
                    format!("tools[{i}].name"),
                    format!("The tool name `{}` is used twice.", tool.name),
                ));
            }
            if !tool.parameters.is_object() {
                return Err((
                    format!("tools[{i}].parameters"),
                    "A tool's parameters must be a JSON Schema object.".into(),
                ));
            }
        }
        match &self.tool_choice {
            ToolChoice::Named(name) if !self.tools.iter().any(|t| &t.name == name) => {
                return Err((
                    "tool_choice".into(),
                    format!("`tool_choice` names the tool `{name}`, which is not among `tools`."),
                ));
            }
            ToolChoice::Required if self.tools.is_empty() => {
                return Err((
                    "tool_choice".into(),
                    "`tool_choice` requires a tool call, but no `tools` are given.".into(),
                ));
            }
            _ => {}
        }
        if let OutputFormat::JsonSchema { schema, .. } = &self.format
            && !schema.is_object()
        {
            return Err((
                "response_format".into(),
                "The JSON schema must be an object.".into(),
            ));
        }
        Ok(())
    }

    /// Every image and file of the user turns (tool results' images stay `[image]` text, so
    /// an agent's screenshot tool does not need an upload), in order.
    /// With each, whether it is in the new turn (the user messages after the last assistant
    /// one).
    pub fn media_mut(&mut self) -> impl Iterator<Item = (&str, &mut Media, bool)> {
        let new_from = self
            .messages
            .iter()
            .rposition(|m| matches!(m, Message::Assistant { .. }))
            .map_or(0, |i| i + 1);
        self.messages
            .iter_mut()
            .enumerate()
            .filter_map(move |(i, m)| match m {
                Message::User { parts } => Some(parts.iter_mut().map(move |p| (i >= new_from, p))),
                _ => None,
            })
            .flatten()
            .filter_map(|(new, p)| match p {
                Part::Image { at, media } | Part::File { at, media } => {
                    Some((at.as_str(), media, new))
                }
                Part::Text { .. } => None,
            })
    }
}

fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A fresh tool call id (`call_` and 24 letters and digits, as OpenAI's look).
pub fn new_call_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("call_{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Message {
        Message::User {
            parts: vec![Part::text(text)],
        }
    }

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
        }
    }

    #[test]
    fn tool_choice_must_name_a_tool_and_required_needs_tools() {
        let mut request = Request::new("m", vec![user("hi")]);
        request.tools = vec![tool("get_weather")];
        request.tool_choice = ToolChoice::Named("nope".into());
        assert_eq!(request.check().unwrap_err().0, "tool_choice");
        request.tool_choice = ToolChoice::Named("get_weather".into());
        assert!(request.check().is_ok());
        request.tools.clear();
        request.tool_choice = ToolChoice::Required;
        assert_eq!(request.check().unwrap_err().0, "tool_choice");
    }

    #[test]
    fn tool_names_are_checked() {
        let mut request = Request::new("m", vec![user("hi")]);
        request.tools = vec![tool("a b")];
        assert_eq!(request.check().unwrap_err().0, "tools[0].name");
        request.tools = vec![tool("a"), tool("a")];
        assert_eq!(request.check().unwrap_err().0, "tools[1].name");
    }

    #[test]
    fn call_ids_look_like_openai_ones() {
        let id = new_call_id();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert_ne!(id, new_call_id());
    }
}
