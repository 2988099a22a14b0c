//! The demo site's "model" for prompts that carry ComputeTower's tool or JSON instructions
//! ([`crate::chat::prompt`]): it reads them as a chat model would, deterministically, so tests
//! can check tool calling and structured output end to end.
//!
//! Given such a prompt (the conversation role-tagged, then `# Tools` and/or `# Answer format`):
//! - tool results after the last user turn (with or without instructions) → a text answer
//!   quoting them:
//!   `Tool results: NAME → RESULT.` (several joined by `; `);
//! - a user turn saying `call NAME with ARG VALUE …` (one or more, NAME among the tools) →
//!   `I will call NAME.` and one `<tool_call>` block per call (only the first when the
//!   instructions allow one call), the arguments read from the turn by the tool's schema
//!   (`ARG VALUE`, `ARG: VALUE`, `ARG is VALUE`, quoted values; required ones missing get
//!   `unknown`, 0, false);
//! - the word `badly` in the user turn → the first reply's block is broken JSON; the repair
//!   turn (whose message begins with the repair note) gets it right (`always badly`: it stays
//!   broken);
//! - a required or named call the user did not ask for → a plain answer first (so the repair
//!   turn is exercised), then the call on the repair turn;
//! - a JSON answer format → `Here is the JSON:` and the object in a ```json fence (values read
//!   from the user turn by the schema; without one, `{"you_said", "words"}`), broken JSON
//!   first when the turn says `badly`.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::chat::calls::{CLOSE, OPEN};
use crate::chat::prompt::{FORMAT_HEADER, REPAIR_NOTE, TOOLS_HEADER};

/// The answer to a prompt with instructions or tool results; `None` for any other prompt.
/// `plain` answers a user turn in the site's ordinary way.
pub fn answer(prompt: &str, plain: impl Fn(&str) -> String) -> Option<String> {
    let instructions = Instructions::find(prompt);
    let end = instructions.as_ref().map_or(prompt.len(), |i| i.start);
    let turns = turns(&prompt[..end]);
    let repairing = turns
        .iter()
        .rev()
        .find(|(role, _)| *role == "User")
        .is_some_and(|(_, text)| text.starts_with(REPAIR_NOTE));
    let request_at = turns
        .iter()
        .rposition(|(role, text)| *role == "User" && !text.starts_with(REPAIR_NOTE))?;
    let request = turns[request_at].1;
    let results: Vec<(String, String)> = turns[request_at + 1..]
        .iter()
        .filter(|(role, _)| *role == "Tool")
        .map(|(_, text)| tool_result(text))
        .collect();
    if !results.is_empty() {
        let shown: Vec<String> = results
            .iter()
            .map(|(name, result)| format!("{name} → {result}"))
            .collect();
        return Some(format!("Tool results: {}.", shown.join("; ")));
    }
    let instructions = instructions?;
    let lower = request.to_ascii_lowercase();
    let badly = lower.contains("always badly") || (lower.contains("badly") && !repairing);
    if !instructions.tools.is_empty() {
        let mut calls = asked_calls(request, &instructions.tools);
        if calls.is_empty()
            && repairing
            && let Some(name) = &instructions.required
        {
            let tool = instructions.tools.iter().find(|t| &t.0 == name);
            if let Some((name, schema)) = tool.or(instructions.tools.first()) {
                calls.push((name.clone(), arguments(schema, schema, request)));
            }
        }
        if !calls.is_empty() {
            if instructions.single_call {
                calls.truncate(1);
            }
            let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
            let mut text = format!("I will call {}.\n", names.join(" and "));
            for (i, (name, args)) in calls.iter().enumerate() {
                let body = if badly && i == 0 {
                    format!("{{\"name\": \"{name}\", \"arguments\": {{")
                } else {
                    json!({"name": name, "arguments": args}).to_string()
                };
                text.push_str(&format!("{OPEN}\n{body}\n{CLOSE}\n"));
            }
            return Some(text);
        }
    }
    if let Some(schema) = instructions.format {
        if badly {
            return Some("Sure! Here is the JSON: {\"answer\": ".into());
        }
        let value = match schema {
            Some(schema) => arguments(&schema, &schema, request),
            None => json!({
                "you_said": request,
                "words": request.split_whitespace().count(),
            }),
        };
        let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
        return Some(format!("Here is the JSON:\n```json\n{pretty}\n```"));
    }
    Some(plain(request))
}

struct Instructions {
    /// Where the instructions begin (the conversation is before).
    start: usize,
    /// `(name, parameters schema)` of each tool.
    tools: Vec<(String, Value)>,
    /// A tool that must be called (the first one when any call is required).
    required: Option<String>,
    single_call: bool,
    /// `Some(schema)` when the answer must be JSON (`Some(None)`: any object).
    format: Option<Option<Value>>,
}

impl Instructions {
    fn find(prompt: &str) -> Option<Self> {
        let tools_at = prompt
            .rfind(&format!("\n\n{TOOLS_HEADER}\n"))
            .map(|i| i + 2);
        let format_at = prompt.rfind(&format!("\n{FORMAT_HEADER}\n")).map(|i| i + 1);
        let start = match (tools_at, format_at) {
            (Some(t), Some(f)) => t.min(f),
            (t, f) => t.or(f)?,
        };
        let section = &prompt[start..];
        let tools: Vec<(String, Value)> = section
            .lines()
            .filter(|line| line.starts_with('{'))
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter_map(|tool| {
                let name = tool.get("name")?.as_str()?.to_owned();
                Some((name, tool.get("parameters")?.clone()))
            })
            .collect();
        let required = if section.contains("You must call at least one tool") {
            tools.first().map(|t| t.0.clone())
        } else {
            section
                .split_once("You must call the tool `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(name, _)| name.to_owned())
        };
        let format = format_at.map(|at| {
            prompt[at..]
                .split_once("It must fit this JSON Schema:\n")
                .and_then(|(_, rest)| serde_json::from_str(rest.lines().next()?).ok())
        });
        Some(Self {
            start,
            required,
            single_call: section.contains("Call at most one tool"),
            tools,
            format,
        })
    }
}

/// The role-tagged turns of the conversation: `(role, text)`.
fn turns(conversation: &str) -> Vec<(&'static str, &str)> {
    static LABEL: OnceLock<Regex> = OnceLock::new();
    let label = LABEL.get_or_init(|| {
        Regex::new(r"(?:^|\n\n)(System|User|Assistant|Tool): ")
            .unwrap_or_else(|_| unreachable!("the label pattern is valid"))
    });
    let marks: Vec<(usize, usize, &'static str)> = label
        .captures_iter(conversation)
        .filter_map(|c| {
            let whole = c.get(0)?;
            let role = match &c[1] {
                "System" => "System",
                "User" => "User",
                "Assistant" => "Assistant",
                _ => "Tool",
            };
            Some((whole.start(), whole.end(), role))
        })
        .collect();
    marks
        .iter()
        .enumerate()
        .map(|(i, (_, text_start, role))| {
            let end = marks.get(i + 1).map_or(conversation.len(), |m| m.0);
            (*role, conversation[*text_start..end].trim_end())
        })
        .collect()
}

/// `result of NAME (call ID):\nCONTENT` → `(NAME, CONTENT)`.
fn tool_result(text: &str) -> (String, String) {
    let (head, content) = text.split_once('\n').unwrap_or((text, ""));
    let name = head
        .strip_prefix("result of ")
        .and_then(|rest| rest.split(" (call ").next())
        .unwrap_or("tool");
    (name.to_owned(), content.trim().to_owned())
}

/// `call NAME …` clauses naming known tools, with their arguments.
fn asked_calls(request: &str, tools: &[(String, Value)]) -> Vec<(String, Value)> {
    static CALL: OnceLock<Regex> = OnceLock::new();
    let call = CALL.get_or_init(|| {
        Regex::new(r"(?i)\bcall\s+([A-Za-z0-9_-]+)")
            .unwrap_or_else(|_| unreachable!("the call pattern is valid"))
    });
    let found: Vec<(usize, usize, &str)> = call
        .captures_iter(request)
        .filter_map(|c| {
            let m = c.get(1)?;
            Some((c.get(0)?.start(), m.end(), m.as_str()))
        })
        .collect();
    let mut calls = Vec::new();
    for (i, (_, end, name)) in found.iter().enumerate() {
        let Some((name, schema)) = tools.iter().find(|t| t.0 == *name) else {
            continue;
        };
        let clause_end = found.get(i + 1).map_or(request.len(), |next| next.0);
        calls.push((
            name.clone(),
            arguments(schema, schema, &request[*end..clause_end]),
        ));
    }
    calls
}

/// A value fitting `schema`, read from `text` property by property.
fn arguments(root: &Value, schema: &Value, text: &str) -> Value {
    let schema = resolve(root, schema);
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return Value::Object(Map::new());
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = Map::new();
    for (name, sub) in properties {
        let sub = resolve(root, sub);
        match read_value(text, name, sub) {
            Some(value) => {
                out.insert(name.clone(), value);
            }
            None if required.contains(&name.as_str()) => {
                out.insert(name.clone(), placeholder(root, sub, text));
            }
            None => {}
        }
    }
    Value::Object(out)
}

fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    let target = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|pointer| root.pointer(pointer));
    if let Some(target) = target {
        return target;
    }
    // Optional fields (`anyOf: [X, null]`): the first non-null shape.
    schema
        .get("anyOf")
        .and_then(Value::as_array)
        .and_then(|options| {
            options
                .iter()
                .find(|o| o.get("type") != Some(&json!("null")))
        })
        .map_or(schema, |first| resolve(root, first))
}

fn type_of(schema: &Value) -> &str {
    match schema.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("string"),
        _ => "string",
    }
}

/// `NAME VALUE`, `NAME: VALUE`, `NAME is VALUE` or `NAME "quoted value"` in `text`.
fn read_value(text: &str, name: &str, schema: &Value) -> Option<Value> {
    let pattern = format!(
        r#"(?i)\b{}\b\s*(?:is\s+|=\s*|:\s*)?(?:"([^"]*)"|([^\s,;]+))"#,
        regex::escape(name)
    );
    let captures = Regex::new(&pattern).ok()?.captures(text)?;
    let raw = captures
        .get(1)
        .or_else(|| captures.get(2))?
        .as_str()
        .trim_end_matches(['.', '?', '!']);
    let value = match type_of(schema) {
        "integer" => Value::from(raw.parse::<i64>().ok()?),
        "number" => Value::from(raw.parse::<f64>().ok()?),
        "boolean" => Value::Bool(matches!(
            raw.to_ascii_lowercase().as_str(),
            "true" | "yes" | "on"
        )),
        "array" => Value::Array(raw.split('+').map(|s| Value::from(s.to_owned())).collect()),
        _ => Value::String(raw.to_owned()),
    };
    match schema.get("enum").and_then(Value::as_array) {
        Some(options) if !options.contains(&value) => options.first().cloned(),
        _ => Some(value),
    }
}

fn placeholder(root: &Value, schema: &Value, text: &str) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|o| o.first())
    {
        return first.clone();
    }
    match type_of(schema) {
        "integer" | "number" => Value::from(0),
        "boolean" => Value::Bool(false),
        "array" => Value::Array(Vec::new()),
        "object" => arguments(root, schema, text),
        _ => Value::from("unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::prompt::{prompt_of, repair_prompt};
    use crate::chat::{Message, OutputFormat, Part, Request, Tool, ToolCall, ToolChoice};

    fn request(text: &str) -> Request {
        let mut r = Request::new(
            "demo",
            vec![Message::User {
                parts: vec![Part::text(text)],
            }],
        );
        r.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"},
                    "days": {"type": "integer"}}, "required": ["city"]}),
            },
            Tool {
                name: "get_time".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"zone": {"type": "string"}},
                    "required": ["zone"]}),
            },
        ];
        r
    }

    fn ask(r: &Request) -> String {
        answer(&prompt_of(r).flattened(), |t| format!("plain: {t}")).unwrap()
    }

    #[test]
    fn asked_calls_become_blocks_with_arguments_from_the_turn() {
        let text = ask(&request(
            "Please call get_weather with city Paris and days 3.",
        ));
        let call = json!({"name": "get_weather", "arguments": {"city": "Paris", "days": 3}});
        assert_eq!(
            text,
            format!("I will call get_weather.\n{OPEN}\n{call}\n{CLOSE}\n")
        );
        let two = ask(&request(
            "call get_weather with city Oslo, then call get_time with zone CET",
        ));
        assert!(
            two.contains("\"city\":\"Oslo\"") && two.contains("\"zone\":\"CET\""),
            "{two}"
        );
        let mut single = request("call get_weather with city Oslo and call get_time with zone CET");
        single.parallel_tool_calls = false;
        assert_eq!(ask(&single).matches(OPEN).count(), 1);
        assert_eq!(ask(&request("hello there")), "plain: hello there");
    }

    #[test]
    fn badly_breaks_the_first_call_and_the_repair_fixes_it() {
        let r = request("call get_weather with city Rome, badly");
        let first = ask(&r);
        assert!(
            first.contains("{\"name\": \"get_weather\", \"arguments\": {\n"),
            "{first}"
        );
        let repair = repair_prompt(&r, &first, "the text inside <tool_call> is not valid JSON");
        let second = answer(&repair.flattened(), |t| t.to_owned()).unwrap();
        assert!(second.contains("\"city\":\"Rome\""), "{second}");
    }

    #[test]
    fn a_required_call_comes_on_the_repair_turn() {
        let mut r = request("What is the weather in city Lima?");
        r.tool_choice = ToolChoice::Named("get_weather".into());
        let first = ask(&r);
        assert!(first.starts_with("plain:"), "{first}");
        let repair = repair_prompt(&r, &first, "a call is required");
        let second = answer(&repair.flattened(), |t| t.to_owned()).unwrap();
        assert!(second.contains("\"city\":\"Lima\""), "{second}");
    }

    #[test]
    fn tool_results_are_quoted() {
        let mut r = request("call get_weather with city Paris");
        r.messages.push(Message::Assistant {
            text: String::new(),
            calls: vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }],
        });
        r.messages.push(Message::Tool {
            call_id: "call_1".into(),
            name: None,
            parts: vec![Part::text("sunny, 21 C")],
        });
        assert_eq!(ask(&r), "Tool results: get_weather → sunny, 21 C.");
    }

    #[test]
    fn json_answers_follow_the_schema() {
        let mut r = request("The person is name Ada and age 36.");
        r.tools.clear();
        r.format = OutputFormat::JsonSchema {
            name: "person".into(),
            schema: json!({"type": "object", "properties": {"name": {"type": "string"},
                "age": {"type": "integer"}, "email": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                "required": ["name", "age", "email"]}),
        };
        let text = ask(&r);
        let json_text = text
            .split("```json\n")
            .nth(1)
            .unwrap()
            .split("\n```")
            .next()
            .unwrap();
        let value: Value = serde_json::from_str(json_text).unwrap();
        assert_eq!(value, json!({"name": "Ada", "age": 36, "email": "unknown"}));
        r.format = OutputFormat::JsonObject;
        assert!(ask(&r).contains("\"you_said\""));
    }

    #[test]
    fn prompts_without_instructions_are_not_ours() {
        assert!(answer("User: call get_weather", |t| t.to_owned()).is_none());
    }
}
