//! Tool calls in a streamed reply: the site is told to write each call as
//! `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (see [`super::prompt`]); this finds
//! those blocks as the text streams and checks them against the tools offered.
//!
//! Invariant: text outside blocks is passed on at once, except a tail that could be the start
//! of an opening tag (at most its length minus one), held until the next piece decides.

use serde_json::Value;

use super::request::{Tool, ToolCall, new_call_id};

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";
/// A block longer than this is taken as finished (and will fail to parse): a reply that
/// opens a block and never closes it must not grow without bound.
const MAX_BLOCK: usize = 1 << 20;

/// What the parser found in the text.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// The inside of one block, as written.
    Block(String),
}

#[derive(Debug, Default)]
pub struct CallParser {
    pending: String,
    /// The inside of the block being read.
    block: Option<String>,
}

impl CallParser {
    pub fn push(&mut self, text: &str, out: &mut Vec<Piece>) {
        self.pending.push_str(text);
        loop {
            match &mut self.block {
                None => {
                    if let Some(at) = self.pending.find(OPEN) {
                        push_text(out, &self.pending[..at]);
                        self.pending.drain(..at + OPEN.len());
                        self.block = Some(String::new());
                        continue;
                    }
                    let keep = partial_tag(&self.pending, OPEN);
                    let cut = self.pending.len() - keep;
                    push_text(out, &self.pending[..cut]);
                    self.pending.drain(..cut);
                    return;
                }
                Some(block) => {
                    if let Some(at) = self.pending.find(CLOSE) {
                        block.push_str(&self.pending[..at]);
                        out.push(Piece::Block(std::mem::take(block)));
                        self.block = None;
                        self.pending.drain(..at + CLOSE.len());
                        continue;
                    }
                    let keep = partial_tag(&self.pending, CLOSE);
                    let cut = self.pending.len() - keep;
                    block.push_str(&self.pending[..cut]);
                    self.pending.drain(..cut);
                    if block.len() > MAX_BLOCK {
                        out.push(Piece::Block(std::mem::take(block)));
                        self.block = None;
                    }
                    return;
                }
            }
        }
    }

    /// The end of the reply: what was held is text, and an unclosed block still counts (models
    /// often leave the closing tag out).
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        match self.block.take() {
            Some(mut block) => {
                block.push_str(&self.pending);
                out.push(Piece::Block(block));
            }
            None => push_text(out, &self.pending),
        }
        self.pending.clear();
    }
}

fn push_text(out: &mut Vec<Piece>, text: &str) {
    if !text.is_empty() {
        out.push(Piece::Text(text.to_owned()));
    }
}

/// The length of the longest tail of `text` that is a proper prefix of `tag` (ASCII).
pub fn partial_tag(text: &str, tag: &str) -> usize {
    let bytes = text.as_bytes();
    (1..tag.len().min(bytes.len() + 1))
        .rev()
        .find(|&k| bytes.ends_with(&tag.as_bytes()[..k]))
        .unwrap_or(0)
}

/// The calls a block holds, checked against `tools`: one object, or a list of them. The error
/// says what to fix, for the repair turn.
pub fn parse_block(block: &str, tools: &[Tool]) -> Result<Vec<ToolCall>, String> {
    let body = strip_fence(block.trim());
    let value: Value = serde_json::from_str(body)
        .map_err(|e| format!("the text inside {OPEN} is not valid JSON ({e})"))?;
    match value {
        Value::Array(items) if !items.is_empty() => {
            items.iter().map(|item| parse_call(item, tools)).collect()
        }
        other => Ok(vec![parse_call(&other, tools)?]),
    }
}

fn parse_call(value: &Value, tools: &[Tool]) -> Result<ToolCall, String> {
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a tool call must be a JSON object with a string `name`")?;
    let tool = tools.iter().find(|t| t.name == name).ok_or_else(|| {
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
        format!(
            "there is no tool named `{name}`; the tools are: {}",
            names.join(", ")
        )
    })?;
    let arguments = ["arguments", "parameters", "input"]
        .iter()
        .find_map(|key| value.get(*key))
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    // Some models write the arguments as a JSON string, as OpenAI's wire format does.
    let arguments = match arguments {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| format!("the arguments of `{name}` are not a JSON object ({e})"))?,
        other => other,
    };
    if !arguments.is_object() {
        return Err(format!("the arguments of `{name}` must be a JSON object"));
    }
    super::schema::check(&tool.parameters, &arguments)
        .map_err(|e| format!("the arguments of `{name}` do not fit its schema: {e}"))?;
    Ok(ToolCall {
        id: new_call_id(),
        name: name.to_owned(),
        arguments: arguments.to_string(),
    })
}

/// The JSON inside a Markdown code fence, if it is fenced.
pub fn strip_fence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    // Drop the info string (```json).
    let rest = rest.split_once('\n').map_or("", |(_, body)| body);
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn feed(pieces: &[&str]) -> Vec<Piece> {
        let mut parser = CallParser::default();
        let mut out = Vec::new();
        for piece in pieces {
            parser.push(piece, &mut out);
        }
        parser.finish(&mut out);
        out
    }

    fn tools() -> Vec<Tool> {
        vec![Tool {
            name: "get_weather".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}),
        }]
    }

    #[test]
    fn text_streams_and_blocks_split_anywhere_are_found() {
        let reply = "Let me check.\n<tool_call>\n{\"name\": \"a\"}\n</tool_call>\nok <b>";
        let expected = vec![
            Piece::Text("Let me check.\n".into()),
            Piece::Block("\n{\"name\": \"a\"}\n".into()),
            Piece::Text("\nok <b>".into()),
        ];
        // Every split point of the reply into two pieces, and one character at a time.
        for at in 0..=reply.len() {
            let got = feed(&[&reply[..at], &reply[at..]]);
            assert_eq!(merge(got), expected, "split at {at}");
        }
        let chars: Vec<String> = reply.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(merge(feed(&refs)), expected);
    }

    /// Adjacent text pieces joined, so splits compare equal.
    fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for piece in pieces {
            match (out.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, piece) => out.push(piece),
            }
        }
        out
    }

    #[test]
    fn only_a_possible_tag_start_is_held_back() {
        let mut parser = CallParser::default();
        let mut out = Vec::new();
        parser.push("a < b and <tool", &mut out);
        assert_eq!(out, vec![Piece::Text("a < b and ".into())]);
        out.clear();
        parser.push("box>", &mut out);
        assert_eq!(out, vec![Piece::Text("<toolbox>".into())]);
        assert_eq!(partial_tag("x<tool_cal", OPEN), 9);
        assert_eq!(partial_tag("x<", OPEN), 1);
        assert_eq!(partial_tag("é", OPEN), 0);
    }

    #[test]
    fn an_unclosed_block_at_the_end_still_counts() {
        let got = feed(&["<tool_call>{\"name\":\"get_weather\",\"arguments\":{\"city\":\"P\"}}"]);
        let Piece::Block(block) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(parse_block(block, &tools()).unwrap()[0].name, "get_weather");
    }

    #[test]
    fn blocks_are_parsed_leniently_and_checked_strictly() {
        let t = tools();
        let fenced =
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```";
        let call = &parse_block(fenced, &t).unwrap()[0];
        assert_eq!(call.arguments, r#"{"city":"Paris"}"#);
        assert!(call.id.starts_with("call_"));
        let as_string = r#"{"name":"get_weather","arguments":"{\"city\":\"Rome\"}"}"#;
        assert_eq!(
            parse_block(as_string, &t).unwrap()[0].arguments,
            r#"{"city":"Rome"}"#
        );
        let list = r#"[{"name":"get_weather","arguments":{"city":"A"}},{"name":"get_weather","arguments":{"city":"B"}}]"#;
        assert_eq!(parse_block(list, &t).unwrap().len(), 2);
        let errors = [
            (
                r#"{"name": "get_weather", "arguments": {"city": "P""#,
                "not valid JSON",
            ),
            (r#"{"arguments": {}}"#, "string `name`"),
            (
                r#"{"name": "nope"}"#,
                "no tool named `nope`; the tools are: get_weather",
            ),
            (
                r#"{"name": "get_weather", "arguments": {}}"#,
                "`$.city` is required",
            ),
            (
                r#"{"name": "get_weather", "arguments": [1]}"#,
                "must be a JSON object",
            ),
        ];
        for (block, expected) in errors {
            let err = parse_block(block, &t).unwrap_err();
            assert!(err.contains(expected), "{block}: {err}");
        }
    }
}
