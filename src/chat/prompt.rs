//! What the site is sent: the conversation as text, and, when the client offers tools or asks
//! for JSON, the instructions that make a chat model answer in a form [`super::calls`] and
//! [`super::emulate`] can read.
//!
//! Without tools, tool traffic in the history or a JSON format, the messages keep their roles
//! (so the gateway can continue the site's own conversation). With any of them, the whole
//! conversation and the instructions go as one self-contained user turn, a fresh site
//! conversation: whatever part of a request a site's flow sends (only the last user message,
//! say), the instructions and every tool result reach the model.

use std::sync::Arc;

use serde_json::Value;

use super::calls::{CLOSE, OPEN};
use super::request::{Media, Message, OutputFormat, Part, Request, ToolCall, ToolChoice};
use crate::replay::render::{Prompt, PromptFile};
use crate::role::Role;

/// Heads the tool instructions.
pub const TOOLS_HEADER: &str = "# Tools";
/// Heads the JSON answer instructions.
pub const FORMAT_HEADER: &str = "# Answer format";
/// Begins the message of a repair turn.
pub const REPAIR_NOTE: &str = "Your last reply could not be used:";

/// The prompt for `request`.
pub fn prompt_of(request: &Request) -> Prompt {
    if !request.emulated() && !has_tool_traffic(&request.messages) {
        return Prompt {
            messages: turns(&request.messages),
            model: request.model.clone(),
            attachments: attachments(&request.messages, false),
        };
    }
    let mut prompt = folded(request, &turns(&request.messages));
    prompt.attachments = attachments(&request.messages, true);
    prompt
}

/// The user turns' files, each with the index of its turn among the prompt's messages (0 for
/// all of them when the conversation is `folded` into one turn). A URL not fetched is not a
/// file yet: `api::front` fetches or refuses those before a prompt is made.
fn attachments(messages: &[Message], folded: bool) -> Vec<PromptFile> {
    let new_from = messages
        .iter()
        .rposition(|m| matches!(m, Message::Assistant { .. }))
        .map_or(0, |i| i + 1);
    let mut out = Vec::new();
    let mut index = 0;
    for (at, message) in messages.iter().enumerate() {
        if matches!(message, Message::System { text } if text.trim().is_empty()) {
            continue;
        }
        if let Message::User { parts } = message {
            for part in parts {
                if let Part::Image {
                    media: Media::Inline { file },
                    ..
                }
                | Part::File {
                    media: Media::Inline { file },
                    ..
                } = part
                {
                    out.push(PromptFile {
                        turn: if folded { 0 } else { index },
                        new: at >= new_from,
                        file: Arc::new(file.clone()),
                    });
                }
            }
        }
        index += 1;
    }
    out
}

/// The prompt of a repair turn: the conversation, the reply that could not be used, what was
/// wrong with it, and the instructions again.
pub fn repair_prompt(request: &Request, reply: &str, problem: &str) -> Prompt {
    let mut messages = turns(&request.messages);
    messages.push((Role::Assistant, reply.to_owned()));
    messages.push((
        Role::User,
        format!("{REPAIR_NOTE} {problem}. Reply again, following the instructions below exactly."),
    ));
    let mut prompt = folded(request, &messages);
    // The repair is a new site conversation: the files go again.
    prompt.attachments = attachments(&request.messages, true);
    prompt
}

/// Tool calls or results in the history: sites know no such roles, so they travel as text.
fn has_tool_traffic(messages: &[Message]) -> bool {
    messages.iter().any(|m| match m {
        Message::Assistant { calls, .. } => !calls.is_empty(),
        Message::Tool { .. } => true,
        _ => false,
    })
}

fn folded(request: &Request, messages: &[(Role, String)]) -> Prompt {
    let mut text = String::new();
    for (role, content) in messages {
        text.push_str(role.label());
        text.push_str(": ");
        text.push_str(content);
        text.push_str("\n\n");
    }
    text.push_str(&instructions(request));
    text.truncate(text.trim_end().len());
    Prompt {
        messages: vec![(Role::User, text)],
        model: request.model.clone(),
        attachments: Vec::new(),
    }
}

/// Each message as one role-tagged text. Tool calls and results keep their names, ids and
/// arguments; a user turn's files travel as files (`Prompt::attachments`), a tool result's
/// and a URL not fetched become `[image]` and `[file]`.
fn turns(messages: &[Message]) -> Vec<(Role, String)> {
    let mut out = Vec::with_capacity(messages.len());
    for message in messages {
        match message {
            Message::System { text } if text.trim().is_empty() => {}
            Message::System { text } => out.push((Role::System, text.clone())),
            Message::User { parts } => out.push((Role::User, parts_text(parts, true))),
            Message::Assistant { text, calls } => {
                let mut content = text.clone();
                for call in calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&call_block(call));
                }
                out.push((Role::Assistant, content));
            }
            Message::Tool {
                call_id,
                name,
                parts,
            } => {
                let name = name
                    .clone()
                    .or_else(|| name_of_call(messages, call_id))
                    .unwrap_or_else(|| "the tool".to_owned());
                out.push((
                    Role::Tool,
                    format!(
                        "result of {name} (call {call_id}):\n{}",
                        parts_text(parts, false)
                    ),
                ));
            }
        }
    }
    out
}

fn name_of_call(messages: &[Message], call_id: &str) -> Option<String> {
    messages.iter().find_map(|m| match m {
        Message::Assistant { calls, .. } => calls
            .iter()
            .find(|c| c.id == call_id)
            .map(|c| c.name.clone()),
        _ => None,
    })
}

/// The parts as text; with `attached`, inline files are left out (they travel as files).
fn parts_text(parts: &[Part], attached: bool) -> String {
    let mut text = String::new();
    for part in parts {
        let piece = match part {
            Part::Text { text } => text.as_str(),
            // Their bytes travel as files (or as this text again, `Prompt::files_as_text`).
            Part::Image {
                media: Media::Inline { .. },
                ..
            }
            | Part::File {
                media: Media::Inline { .. },
                ..
            } if attached => continue,
            Part::Image { .. } => "[image]",
            Part::File { .. } => "[file]",
        };
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(piece);
    }
    text
}

/// A call as the site is told to write one.
pub fn call_block(call: &ToolCall) -> String {
    let arguments = serde_json::from_str::<Value>(&call.arguments)
        .unwrap_or_else(|_| Value::String(call.arguments.clone()));
    let body = serde_json::json!({ "name": call.name, "arguments": arguments });
    format!("{OPEN}\n{body}\n{CLOSE}")
}

fn instructions(request: &Request) -> String {
    let mut text = String::new();
    let tools = request.offered_tools();
    if !tools.is_empty() {
        text.push_str(TOOLS_HEADER);
        text.push_str(
            "\nYou can call the tools below. Each line is one tool: its name, what it does, and \
             a JSON Schema of its arguments.\n",
        );
        for tool in tools {
            let mut line = serde_json::Map::new();
            line.insert("name".into(), Value::String(tool.name.clone()));
            if let Some(description) = &tool.description {
                line.insert("description".into(), Value::String(description.clone()));
            }
            line.insert("parameters".into(), tool.parameters.clone());
            text.push_str(&Value::Object(line).to_string());
            text.push('\n');
        }
        text.push_str(&format!(
            "\nTo call a tool, write this block, with one JSON object inside: the tool's name \
             and its arguments.\n{OPEN}\n{{\"name\": \"TOOL_NAME\", \"arguments\": {{\"ARGUMENT\": \
             \"VALUE\"}}}}\n{CLOSE}\nRules:\n- The arguments must fit the tool's schema.\n"
        ));
        text.push_str(if request.parallel_tool_calls {
            "- To call several tools at once, write one block per call.\n"
        } else {
            "- Call at most one tool in a reply.\n"
        });
        text.push_str(
            "- Stop after the last block: the results come back in the next message, as \
             `Tool: result of …`.\n",
        );
        text.push_str(&match &request.tool_choice {
            ToolChoice::Required => "- You must call at least one tool in this reply.\n".into(),
            ToolChoice::Named(name) => {
                format!("- You must call the tool `{name}` in this reply.\n")
            }
            _ => "- Call a tool only when it is needed; otherwise answer in plain text, without \
                  a block.\n"
                .into(),
        });
    }
    let format = match &request.format {
        OutputFormat::Text => None,
        OutputFormat::JsonObject => Some(String::new()),
        OutputFormat::JsonSchema { schema, .. } => {
            Some(format!(" It must fit this JSON Schema:\n{schema}"))
        }
    };
    if let Some(schema) = format {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(FORMAT_HEADER);
        text.push('\n');
        if !tools.is_empty() {
            text.push_str("When you answer without calling a tool: ");
        }
        text.push_str(
            "answer with one JSON object and nothing else: no text before or after it, no code \
             fence.",
        );
        text.push_str(&schema);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::chat::request::Tool;

    fn user(text: &str) -> Message {
        Message::User {
            parts: vec![Part::text(text)],
        }
    }

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather now".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }
    }

    fn round_trip() -> Vec<Message> {
        vec![
            Message::System {
                text: "Be brief.".into(),
            },
            user("Weather in Paris?"),
            Message::Assistant {
                text: String::new(),
                calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
            },
            Message::Tool {
                call_id: "call_1".into(),
                name: None,
                parts: vec![
                    Part::text("sunny"),
                    Part::Image {
                        at: "x".into(),
                        media: Media::Url {
                            url: "https://x/y.png".into(),
                            name: None,
                        },
                    },
                ],
            },
        ]
    }

    #[test]
    fn tool_history_keeps_calls_and_results_as_one_turn() {
        let request = Request::new("m", round_trip());
        let prompt = prompt_of(&request);
        assert_eq!(prompt.messages.len(), 1, "sites know no tool roles");
        assert_eq!(
            prompt.flattened(),
            "System: Be brief.\n\nUser: Weather in Paris?\n\nAssistant: <tool_call>\n\
             {\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>\n\n\
             Tool: result of get_weather (call call_1):\nsunny\n[image]"
        );
    }

    #[test]
    fn a_plain_history_keeps_its_roles() {
        let request = Request::new(
            "m",
            vec![
                user("a"),
                Message::Assistant {
                    text: "b".into(),
                    calls: vec![],
                },
                user("c"),
            ],
        );
        let prompt = prompt_of(&request);
        assert_eq!(prompt.messages.len(), 3);
        assert_eq!(prompt.messages[2], (Role::User, "c".to_owned()));
    }

    #[test]
    fn tools_fold_everything_into_one_turn_with_instructions() {
        let mut request = Request::new("m", round_trip());
        request.tools = vec![weather()];
        let prompt = prompt_of(&request);
        assert_eq!(prompt.messages.len(), 1);
        let (role, text) = &prompt.messages[0];
        assert_eq!(*role, Role::User);
        assert!(
            text.starts_with("System: Be brief.\n\nUser: Weather in Paris?"),
            "{text}"
        );
        assert!(text.contains("Tool: result of get_weather (call call_1):\nsunny"));
        assert!(text.contains(
            r#"{"name":"get_weather","description":"Weather now","parameters":{"type":"object""#
        ));
        assert!(text.contains("one block per call"));
        assert!(text.contains("only when it is needed"));
        request.parallel_tool_calls = false;
        request.tool_choice = ToolChoice::Named("get_weather".into());
        let text = prompt_of(&request).flattened();
        assert!(text.contains("at most one tool"));
        assert!(text.contains("You must call the tool `get_weather`"));
        request.tool_choice = ToolChoice::None;
        let text = prompt_of(&request).flattened();
        assert!(!text.contains(TOOLS_HEADER), "no tools offered: {text}");
    }

    #[test]
    fn json_formats_and_the_repair_turn() {
        let mut request = Request::new("m", vec![user("Ada, 36")]);
        request.format = OutputFormat::JsonSchema {
            name: "person".into(),
            schema: json!({"type": "object"}),
        };
        let text = prompt_of(&request).flattened();
        assert!(
            text.starts_with("User: Ada, 36\n\n# Answer format\n"),
            "{text}"
        );
        assert!(text.contains("fit this JSON Schema:\n{\"type\":\"object\"}"));
        let repair = repair_prompt(&request, "Sure! {bad", "it is not valid JSON").flattened();
        assert!(repair.contains("Assistant: Sure! {bad\n\nUser: Your last reply could not be used: it is not valid JSON."));
        assert!(repair.ends_with("fit this JSON Schema:\n{\"type\":\"object\"}"));
    }
}
