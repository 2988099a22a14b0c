//! Tests against the demo site on a real socket.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::*;
use crate::flow::{Accrual, BodyKind, Extract, Flow, ReasoningRule, Transport};
use crate::replay::decode::{Decoder, Delta, collect_text, decode_all};

const PASSWORD: &str = "demo-password";
const PROMPT: &str = "Hello demo, what is `2 + 2`? ünïcödé ✓";

fn config(shape: Shape) -> DemoConfig {
    DemoConfig {
        shape,
        token_delay: Duration::ZERO,
        ..DemoConfig::default()
    }
}

async fn spawn(config: DemoConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, config));
    format!("http://{addr}")
}

fn client() -> reqwest::Client {
    http_client().unwrap()
}

/// What the browser holds after logging in and opening `/chat`.
#[derive(Clone)]
struct Browser {
    base: String,
    cookie: String,
    token: String,
    csrf: String,
    /// The signing key the chat page's inline script hides (signed shape).
    sign_key: String,
}

impl Browser {
    async fn login(base: &str, email: &str) -> Browser {
        let login = json_login(base, email, PASSWORD).await.unwrap();
        let cookie = login
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let token = login
            .local_storage
            .iter()
            .find_map(|(k, v)| match k.as_str() {
                TOKEN_KEY => Some(v.clone()),
                // The think shape's page keeps it wrapped.
                WRAPPED_TOKEN_KEY => serde_json::from_str::<Value>(v)
                    .ok()
                    .and_then(|w| w["value"].as_str().map(str::to_owned)),
                _ => None,
            })
            .unwrap();
        let page = client()
            .get(format!("{base}/chat"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        let html = page.text().await.unwrap();
        let csrf = meta_csrf(&html).unwrap();
        Browser {
            base: base.to_owned(),
            cookie,
            token,
            csrf,
            sign_key: page_sign_key(&html).unwrap_or_default(),
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        client()
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("authorization", format!("Bearer {}", self.token))
            .header(CSRF_HEADER, &self.csrf)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        client()
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("authorization", format!("Bearer {}", self.token))
            .header(CSRF_HEADER, &self.csrf)
    }

    /// The first chat call of a conversation, made the way `chat.js` makes it (for newchat,
    /// after the create call that carries the message).
    async fn first_chat(&self, shape: Shape, prompt: &str) -> reqwest::Response {
        if shape == Shape::Newchat {
            let chat = self.new_chat(prompt).await;
            return self
                .post("/api/chat")
                .json(&json!({ "chatId": chat, "mode": "start", "model": "demo" }))
                .send()
                .await
                .unwrap();
        }
        let conversation = self.create_conversation(shape).await;
        self.chat(shape, &conversation, prompt)
            .send()
            .await
            .unwrap()
    }

    /// newchat's create call, carrying the first message: the chat's id.
    async fn new_chat(&self, prompt: &str) -> String {
        let response = self
            .post("/api/trpc/message.newChat?batch=1")
            .json(&json!({ "0": { "json": {
                "content": prompt, "clientMessageId": uuid::Uuid::new_v4().to_string(), "model": "demo",
            } } }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert!(body.pointer("/0/result/data/json/messageId").is_some());
        str_at(&body, "/0/result/data/json/chatId").to_owned()
    }

    /// The conversation the chat call names; for Claude, `ORG/CONVERSATION` (both go in the
    /// path), looked up the way `chat.js` does. Empty for the shapes whose first chat call
    /// makes it (and for newchat, whose create call carries the message: see `first_chat`).
    async fn create_conversation(&self, shape: Shape) -> String {
        if shape.creates_on_first_chat() || shape == Shape::Newchat {
            return String::new();
        }
        if shape == Shape::Claude {
            let orgs: Value = self
                .get("/api/organizations")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let org = str_at(&orgs, "/0/uuid").to_owned();
            assert_eq!(orgs[0]["name"], "Personal");
            let client_uuid = uuid::Uuid::new_v4().to_string();
            let response = self
                .post(&format!("/api/organizations/{org}/chat_conversations"))
                .json(&json!({ "uuid": client_uuid, "name": "" }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.unwrap();
            let conversation = str_at(&body, "/uuid").to_owned();
            assert_ne!(conversation, client_uuid, "the server picks the id");
            return format!("{org}/{conversation}");
        }
        let response = self
            .post(shape.create_conversation_path())
            .json(&json!({ "title": "New chat", "timestamp": now_ms() }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        body.pointer("/data/id")
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    }

    /// The chat call, built the way `chat.js` builds it.
    fn chat(&self, shape: Shape, conversation: &str, prompt: &str) -> reqwest::RequestBuilder {
        let id = uuid::Uuid::new_v4().to_string();
        let ts = now_ms();
        let path = shape.chat_path();
        match shape {
            Shape::Openai => self.post(path).json(&json!({
                "model": "demo",
                "messages": [
                    { "role": "system", "content": "Be brief." },
                    { "role": "user", "content": prompt },
                ],
                "stream": true,
                "conversation_id": conversation,
                "client_request_id": id,
                "timestamp": ts,
            })),
            Shape::Patch => self.post(path).json(&json!({
                "action": "next",
                "conversation_id": conversation,
                "parent_message_id": uuid::Uuid::new_v4().to_string(),
                "messages": [{
                    "id": id,
                    "author": { "role": "user" },
                    "content": { "content_type": "text", "parts": [prompt] },
                }],
                "model": "demo",
                "timezone_offset_min": -60,
                "client_ts": ts,
            })),
            Shape::Cumulative => {
                self.post(&format!("{path}?chat_id={conversation}"))
                    .json(&json!({
                        "stream": true,
                        "chat_id": conversation,
                        "messages": [{ "role": "user", "content": prompt, "fid": id }],
                        "timestamp": ts,
                    }))
            }
            Shape::Ndjson => self.post(path).json(&json!({
                "message": { "blocks": [{ "type": "text", "text": { "content": prompt } }] },
                "conversation": { "id": conversation },
                "client_msg_id": id,
                "sent_at": ts,
            })),
            Shape::Numbered => self.post(path).json(&json!({
                "0": { "json": {
                    "conversationId": conversation,
                    "content": [{ "type": "text", "text": prompt }],
                    "messageId": id,
                    "ts": ts,
                } }
            })),
            Shape::Json => {
                let form = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("prompt", prompt)
                    .append_pair("conversation", conversation)
                    .append_pair("nonce", &id)
                    .append_pair("ts", &ts.to_string())
                    .finish();
                self.post(path)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form)
            }
            Shape::Frames => self.post(path).json(&json!({
                "conversationId": conversation,
                "prompt": prompt,
                "requestId": id,
                "sentAtMs": ts,
            })),
            Shape::Claude => {
                let (org, conversation) = conversation.split_once('/').unwrap();
                self.post(&format!(
                    "/api/organizations/{org}/chat_conversations/{conversation}/completion"
                ))
                .json(&json!({
                    "prompt": prompt,
                    "timezone": "UTC",
                    "attachments": [],
                    "files": [],
                    "rendering_mode": "messages",
                }))
            }
            Shape::Signed => {
                let body = json!({
                    "model": "demo",
                    "messages": [{ "role": "user", "content": prompt }],
                    "stream": true,
                    "conversation_id": conversation,
                    "client_request_id": id,
                    "timestamp": ts,
                })
                .to_string();
                self.signed(path, body, ts)
            }
            Shape::Ws => panic!("the ws shape chats over its WebSocket"),
            // A later turn: the message goes in the chat call.
            Shape::Newchat => self.post(path).json(&json!({
                "chatId": conversation, "mode": "append", "model": "demo",
                "messageInput": prompt, "messageId": id,
            })),
            // The first turn: no conversation yet.
            Shape::Batch => {
                let mut body = json!({
                    "action": "next",
                    "messages": [{
                        "id": id,
                        "author": { "role": "user" },
                        "content": { "content_type": "text", "parts": [prompt] },
                    }],
                    "parent_message_id": "client-created-root",
                    "model": "demo",
                    "client_ts": ts,
                });
                if !conversation.is_empty() {
                    body["conversation_id"] = json!(conversation);
                }
                self.post(path).json(&body)
            }
            Shape::Details => self.post(path).json(&json!({
                "model": "demo", "stream": true,
                "chat_id": Some(conversation).filter(|c| !c.is_empty()),
                "parent_id": null, "turn": 0,
                "messages": [{ "role": "user", "content": prompt }],
            })),
            Shape::Think => self
                .post(&format!("/api/v1/chats/{conversation}/completions"))
                .json(&json!({
                    "stream": true, "model": "demo", "parent_id": null,
                    "message": { "role": "user", "content": prompt, "id": id, "timestamp": ts },
                })),
            Shape::Fragile => self.post(path).json(&json!({
                "conversation_id": conversation, "message": prompt, "request_id": id, "model": "demo",
            })),
        }
    }

    /// A signed-shape call: `x-signature` over the key, `ts` and `body`, as `chat.js` signs.
    fn signed(&self, path: &str, body: String, ts: u64) -> reqwest::RequestBuilder {
        let ts = ts.to_string();
        let signature = sha256_hex(&format!("{}\n{ts}\n{body}", self.sign_key));
        self.post(path)
            .header("content-type", "application/json")
            .header("x-timestamp", ts)
            .header("x-signature", signature)
            .body(body)
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// The signing key, reassembled from the chat page's inline script the way its JS does:
/// `p` holds reversed pieces, `o` their order.
fn page_sign_key(html: &str) -> Option<String> {
    let start = html.find("var p=")? + "var p=".len();
    let rest = &html[start..];
    let pieces: Vec<String> = serde_json::from_str(&rest[..rest.find(",o=")?]).ok()?;
    let rest = &rest[rest.find(",o=")? + ",o=".len()..];
    let order: Vec<usize> = serde_json::from_str(&rest[..rest.find(';')?]).ok()?;
    Some(
        order
            .iter()
            .map(|&i| pieces[i].chars().rev().collect::<String>())
            .collect(),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn meta_csrf(html: &str) -> Option<String> {
    let start = html.find(r#"<meta name="csrf-token" content=""#)?;
    let rest = &html[start + r#"<meta name="csrf-token" content=""#.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

fn form_body(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Decoding the documented formats strictly, as the site's JS does.

fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (name, data.join("\n"))
        })
        .collect()
}

fn frames(bytes: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "truncated frame header");
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload: Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        out.push((rest[0], payload));
        rest = &rest[5 + len..];
    }
    out
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {p} in {v}"))
}

/// Decodes a chat response in `shape`'s documented format into (reasoning, content).
fn decode(shape: Shape, content_type: &str, bytes: &[u8]) -> (Option<String>, String) {
    let mut reasoning = String::new();
    let mut content = String::new();
    let text = String::from_utf8_lossy(bytes);
    match shape {
        Shape::Openai | Shape::Signed => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            assert_eq!(events.last().unwrap().1, "[DONE]");
            let mut finished = false;
            for (_, data) in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(v["object"], "chat.completion.chunk");
                let delta = &v["choices"][0]["delta"];
                if let Some(r) = delta["reasoning_content"].as_str() {
                    assert!(content.is_empty(), "reasoning after content");
                    reasoning.push_str(r);
                }
                if let Some(c) = delta["content"].as_str() {
                    content.push_str(c);
                }
                finished |= v["choices"][0]["finish_reason"] == "stop";
            }
            assert!(finished);
        }
        Shape::Patch => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            assert_eq!(events[0], (Some("delta_encoding".into()), "\"v1\"".into()));
            assert_eq!(events.last().unwrap().1, "[DONE]");
            let mut root = Value::Null;
            let (mut last_p, mut last_o) = (String::new(), String::new());
            let mut batched = false;
            let mut continuations = 0;
            let mut metadata = Vec::new();
            for (name, data) in &events[1..events.len() - 1] {
                let v: Value = serde_json::from_str(data).unwrap();
                if name.as_deref() != Some("delta") {
                    metadata.push(v["type"].as_str().unwrap().to_owned());
                    continue;
                }
                if v.get("p").is_none() {
                    continuations += 1;
                }
                batched |= v["o"] == "patch";
                apply_patch(&mut root, &v, &mut last_p, &mut last_o);
            }
            assert!(batched && continuations > 0);
            assert!(metadata.contains(&"title_generation".to_owned()));
            assert_eq!(metadata.last().unwrap(), "message_stream_complete");
            assert_eq!(root["message"]["status"], "finished_successfully");
            content = str_at(&root, "/message/content/parts/0").to_owned();
        }
        Shape::Cumulative => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            assert!(!text.contains("[DONE]"));
            let mut phase = "think";
            for (_, data) in &events[1..] {
                let v: Value = serde_json::from_str(data).unwrap();
                let delta = &v["choices"][0]["delta"];
                let now = str_at(delta, "/content");
                let this_phase = str_at(delta, "/phase");
                if this_phase != phase {
                    assert_eq!((phase, this_phase), ("think", "answer"));
                    phase = "answer";
                }
                let target = if phase == "think" {
                    &mut reasoning
                } else {
                    &mut content
                };
                assert!(now.starts_with(target.as_str()), "not cumulative");
                *target = now.to_owned();
            }
            let last: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
            assert_eq!(last["choices"][0]["delta"]["status"], "finished");
        }
        Shape::Ndjson => {
            assert_eq!(content_type, "application/x-ndjson");
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines[0]["type"], "meta");
            assert_eq!(lines.last().unwrap()["type"], "done");
            assert!(lines.iter().any(|l| l["type"] == "ping"));
            for line in &lines {
                if line["type"] == "token" {
                    content.push_str(str_at(line, "/data/delta/text"));
                }
            }
        }
        Shape::Numbered => {
            assert!(content_type.starts_with("text/plain"));
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(*lines.last().unwrap(), "8:null");
            for line in &lines {
                let (tag, json) = line.split_once(':').unwrap();
                let v: Value = serde_json::from_str(json).unwrap();
                if tag == "0" {
                    match str_at(&v, "/json/kind") {
                        "reasoning" => reasoning.push_str(str_at(&v, "/json/delta")),
                        "text" => content.push_str(str_at(&v, "/json/delta")),
                        other => panic!("kind {other}"),
                    }
                }
            }
        }
        Shape::Json => {
            assert!(content_type.starts_with("application/json"));
            let v: Value = serde_json::from_slice(bytes).unwrap();
            content = str_at(&v, "/data/answer/text").to_owned();
        }
        Shape::Frames => {
            assert_eq!(content_type, "application/connect+json");
            let frames = frames(bytes);
            assert_eq!(frames.last().unwrap(), &(2, json!({})));
            for (flag, v) in &frames[..frames.len() - 1] {
                assert_eq!(*flag, 0);
                if let Some(r) = v.pointer("/result/response") {
                    let token = str_at(r, "/token");
                    if r["isThinking"] == true {
                        reasoning.push_str(token);
                    } else {
                        content.push_str(token);
                    }
                }
            }
        }
        Shape::Claude => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
            assert_eq!(names[0], "message_start");
            assert_eq!(*names.last().unwrap(), "message_stop");
            assert!(names.contains(&"ping") && names.contains(&"message_delta"));
            let mut blocks = Vec::new();
            let mut open: Option<u64> = None;
            for (name, data) in &events {
                let v: Value = serde_json::from_str(data).unwrap();
                let name = name.as_deref().unwrap();
                assert_eq!(v["type"], name, "the type repeats the event name");
                match name {
                    "message_start" => {
                        str_at(&v, "/message/id");
                        str_at(&v, "/message/uuid");
                    }
                    "content_block_start" => {
                        assert_eq!(open, None);
                        open = v["index"].as_u64();
                        assert_eq!(open, Some(blocks.len() as u64));
                        blocks.push(str_at(&v, "/content_block/type").to_owned());
                    }
                    "content_block_delta" => {
                        assert_eq!(v["index"].as_u64(), open);
                        match str_at(&v, "/delta/type") {
                            "thinking_delta" => reasoning.push_str(str_at(&v, "/delta/thinking")),
                            "text_delta" => content.push_str(str_at(&v, "/delta/text")),
                            other => panic!("delta {other}"),
                        }
                    }
                    "content_block_stop" => {
                        assert_eq!(v["index"].as_u64(), open.take());
                    }
                    "message_delta" => assert_eq!(v["delta"]["stop_reason"], "end_turn"),
                    _ => {}
                }
            }
            assert_eq!(blocks, ["thinking", "text"]);
        }
        Shape::Ws => panic!("the ws shape has no HTTP body"),
        Shape::Newchat => {
            assert!(content_type.starts_with("text/plain"));
            let lines: Vec<&str> = text.lines().collect();
            assert!(lines[0].starts_with("f:{\"messageId\""), "{text}");
            assert!(lines.last().unwrap().starts_with("d:"));
            for line in &lines {
                let (tag, json) = line.split_once(':').unwrap();
                let v: Value = serde_json::from_str(json).unwrap();
                if tag == "0" {
                    content.push_str(v.as_str().unwrap());
                }
            }
        }
        Shape::Batch => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            assert_eq!(events.last().unwrap().1, "[DONE]");
            let mut root = Value::Null;
            let (mut last_p, mut last_o) = (String::new(), String::new());
            let mut pathless_batches = 0;
            for (name, data) in &events[1..events.len() - 1] {
                let v: Value = serde_json::from_str(data).unwrap();
                if name.as_deref() != Some("delta") {
                    continue;
                }
                if v.get("p").is_none() && v["v"].is_array() {
                    pathless_batches += 1;
                }
                apply_patch(&mut root, &v, &mut last_p, &mut last_o);
            }
            assert!(pathless_batches >= 2, "{text}");
            assert_eq!(root["message"]["status"], "finished_successfully");
            content = str_at(&root, "/message/content/parts/0").to_owned();
        }
        Shape::Details => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            assert_eq!(events.last().unwrap().1, "[DONE]");
            let mut raw = String::new();
            let mut phases = Vec::new();
            for (_, data) in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(data).unwrap();
                let delta = &v["choices"][0]["delta"];
                if let Some(piece) = delta["content"].as_str() {
                    raw.push_str(piece);
                    phases.push(delta["phase"].as_str().unwrap_or("").to_owned());
                }
            }
            // The opening tag is a piece of its own, without a phase.
            assert_eq!(phases[0], "");
            assert!(phases[1..].iter().all(|p| p == "thinking" || p == "answer"));
            (reasoning, content) = split_markup(&raw);
        }
        Shape::Think => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            let values: Vec<Value> = events
                .iter()
                .map(|(_, d)| serde_json::from_str(d).unwrap())
                .collect();
            str_at(&values[0], "/response_id");
            let texts: Vec<&str> = values[1..].iter().map(|v| str_at(v, "/text")).collect();
            // Cumulative, with the closing tag moving: no text extends the one before.
            assert!(texts.windows(2).any(|w| !w[1].starts_with(w[0])));
            assert_eq!(values.last().unwrap()["done"], true);
            (reasoning, content) = split_markup(texts.last().unwrap());
        }
        Shape::Fragile => {
            assert!(content_type.starts_with("text/event-stream"));
            let events = sse_events(&text);
            assert_eq!(events[0].0.as_deref(), Some("meta"));
            assert_eq!(events.last().unwrap().0.as_deref(), Some("done"));
            for (name, data) in &events {
                if name.as_deref() == Some("token") {
                    let v: Value = serde_json::from_str(data).unwrap();
                    content.push_str(str_at(&v, "/t"));
                }
            }
        }
    }
    ((!reasoning.is_empty()).then_some(reasoning), content)
}

/// Reasoning and answer of a text with reasoning markup, as the page shows them: the
/// reasoning without its `<summary>` and `> ` quote marks, the answer without its tags.
fn split_markup(raw: &str) -> (String, String) {
    let (open, close) = if raw.contains("<think>") {
        ("<think>", "</think>")
    } else {
        ("<details type=\"reasoning\"", "</details>")
    };
    let start = raw.find(open).unwrap();
    let inner = &raw[start + open.len()..];
    let inner = &inner[inner
        .find('>')
        .map_or(0, |i| if open.ends_with('>') { 0 } else { i + 1 })..];
    let end = inner.find(close).unwrap();
    let mut reasoning = inner[..end].to_owned();
    if let (Some(a), Some(b)) = (reasoning.find("<summary>"), reasoning.find("</summary>")) {
        reasoning.replace_range(a..b + "</summary>".len(), "");
    }
    let reasoning = reasoning
        .lines()
        .map(|l| l.strip_prefix("> ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let answer = inner[end + close.len()..]
        .replace("<answer>", "")
        .replace("</answer>", "");
    (reasoning.trim().to_owned(), answer.trim().to_owned())
}

/// Applies one patch event (ChatGPT `delta` encoding v1).
fn apply_patch(root: &mut Value, op: &Value, last_p: &mut String, last_o: &mut String) {
    let p = op
        .get("p")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| last_p.clone());
    let o = op
        .get("o")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| last_o.clone());
    let pathless_batch = op.get("p").is_none() && op.get("o").is_none() && op["v"].is_array();
    if o == "patch" || pathless_batch {
        for sub in op["v"].as_array().unwrap() {
            apply_patch(root, sub, last_p, last_o);
        }
        return;
    }
    *last_p = p.clone();
    *last_o = o.clone();
    if p.is_empty() {
        *root = op["v"].clone();
        return;
    }
    let target = root.pointer_mut(&p).unwrap();
    match o.as_str() {
        "append" => {
            let joined = format!("{}{}", target.as_str().unwrap(), op["v"].as_str().unwrap());
            *target = Value::String(joined);
        }
        "replace" | "add" => *target = op["v"].clone(),
        other => panic!("op {other}"),
    }
}

async fn chat_once(shape: Shape, browser: &Browser, prompt: &str) -> (Option<String>, String) {
    if shape == Shape::Ws {
        let conversation = browser.create_conversation(shape).await;
        let mut socket = browser.socket(&conversation).await;
        return (
            None,
            socket.chat(&browser.token, &conversation, prompt).await,
        );
    }
    let response = browser.first_chat(shape, prompt).await;
    assert_eq!(response.status(), StatusCode::OK, "{shape}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.bytes().await.unwrap();
    decode(shape, &content_type, &bytes)
}

// ---------------------------------------------------------------------------------------------
// Pure functions

#[test]
fn shapes_round_trip_their_names() {
    for shape in Shape::ALL {
        assert_eq!(shape.to_string().parse::<Shape>().unwrap(), shape);
    }
    assert_eq!("NDJSON".parse::<Shape>().unwrap(), Shape::Ndjson);
    let err = "xml".parse::<Shape>().unwrap_err().to_string();
    assert!(err.contains("cumulative"), "{err}");
    assert!(Shape::ALL.iter().filter(|s| s.has_reasoning()).count() >= 3);
}

#[test]
fn replies_are_deterministic_and_carry_the_message() {
    for shape in Shape::ALL {
        let reply = reply_for(shape, PROMPT);
        assert_eq!(reply, reply_for(shape, PROMPT));
        assert!(reply.content.contains(PROMPT));
        assert!(reply.content.contains("**") && reply.content.contains("\n- "));
        assert!(reply.content.contains(&format!("`{shape}`")));
        assert_eq!(reply.reasoning.is_some(), shape.has_reasoning());
        assert_eq!(reply, reply_for_turn(shape, PROMPT, 1));
        assert!(
            reply_for_turn(shape, PROMPT, 2)
                .content
                .contains("turn **2**")
        );
    }
}

#[test]
fn tokens_rebuild_the_text_in_small_pieces() {
    let text = reply_for(Shape::Patch, "a veryveryverylongword ünï\n\n- x").content;
    let toks = tokens(&text);
    assert_eq!(toks.concat(), text);
    assert!(toks.len() > 20);
    assert!(toks.iter().all(|t| !t.is_empty() && t.chars().count() <= 6));
    assert!(tokens("").is_empty());
}

fn flow_files() -> Vec<(Shape, &'static str)> {
    Shape::ALL.iter().map(|&s| (s, s.flow_file())).collect()
}

/// A flow URL with its `{{preflight.…}}` ids written the way the shape's routes name them.
fn as_route(url: &str) -> String {
    url.replace("{{preflight.org_id}}", "{org}")
        .replace("{{preflight.conversation_id}}", "{conversation}")
        .replace("{{conversation.conversation_id}}", "{conversation}")
}

#[test]
fn every_flow_file_parses_and_names_its_shape() {
    let files = flow_files();
    assert_eq!(files.len(), Shape::ALL.len());
    for (shape, text) in files {
        let on_disk = std::fs::read_to_string(format!(
            "{}/flows/demo-{shape}.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(text, on_disk, "{shape}");
        let flow = Flow::from_json(text).unwrap_or_else(|e| panic!("{shape}: {e}"));
        assert_eq!(flow.service, format!("demo-{shape}"));
        let url = as_route(&flow.request.url);
        assert_eq!(url.split('?').next(), Some(shape.chat_path()), "{shape}");
        assert_eq!(flow.response.reasoning.is_some(), shape.has_reasoning());
        assert!(flow.literal_secrets().is_empty(), "{shape}");
        assert_eq!(flow.preflight[0].http.url, "/chat", "{shape}");
        if shape.creates_on_first_chat() {
            // The first chat call makes the conversation; its reply names it.
            assert_eq!(flow.preflight.len(), 1, "{shape}");
            assert!(flow.response.ids.contains_key("conversation_id"), "{shape}");
        } else {
            let create = flow.preflight.last().unwrap();
            assert_eq!(
                as_route(&create.http.url).split('?').next(),
                Some(shape.create_conversation_path()),
                "{shape}"
            );
            let id = if shape == Shape::Newchat {
                "chat_id"
            } else {
                "conversation_id"
            };
            assert!(create.extract.contains_key(id), "{shape}");
            match shape {
                Shape::Claude => {
                    assert_eq!(flow.preflight.len(), 3);
                    assert_eq!(flow.preflight[1].http.url, "/api/organizations");
                    assert_eq!(flow.preflight[1].http.method, "GET");
                }
                _ => assert_eq!(flow.preflight.len(), 2, "{shape}"),
            }
        }
        assert_eq!(
            flow.response.transport == Transport::Websocket,
            shape == Shape::Ws
        );
        // Only the signed shape needs the page: its signature cannot be replayed.
        assert_eq!(flow.replay.needs_browser, shape == Shape::Signed, "{shape}");
        if shape == Shape::Signed {
            assert!(flow.replay.reason.is_some());
            assert!(flow.request.headers.contains_key("x-signature"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Login

#[tokio::test]
async fn form_login_sets_an_http_only_cookie_and_stores_the_token() {
    let base = spawn(config(Shape::Openai)).await;
    let root = client().get(&base).send().await.unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/login");
    let form = client()
        .get(format!("{base}/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"name="email""#,
        r#"type="password""#,
        r#"autocomplete="current-password""#,
        r#"type="submit""#,
        r#"<label for="email">"#,
    ] {
        assert!(form.contains(needle), "{needle}");
    }
    let response = client()
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("email", "ann@example.com"),
            ("password", PASSWORD),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookies = set_cookies(&response);
    let session = cookies
        .iter()
        .find(|c| c.starts_with(&format!("{SESSION_COOKIE}=")))
        .unwrap();
    assert!(session.contains("HttpOnly") && session.contains("Path=/"));
    assert!(session.contains("SameSite=Lax"));
    let page = response.text().await.unwrap();
    assert!(page.contains(&format!("localStorage.setItem(\"{TOKEN_KEY}\", \"dt_")));
    assert!(page.contains(r#"location.replace("/chat")"#));

    // The cookie opens the chat page.
    let sid = session.split(';').next().unwrap();
    let chat = client()
        .get(format!("{base}/chat"))
        .header("cookie", sid)
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), StatusCode::OK);
    let html = chat.text().await.unwrap();
    assert!(meta_csrf(&html).is_some_and(|t| t.len() >= 16));
    for needle in [
        "<textarea",
        r#"id="send""#,
        r#"id="messages""#,
        "/static/chat.js",
    ] {
        assert!(html.contains(needle), "{needle}");
    }
    let js = client()
        .get(format!("{base}/static/chat.js"))
        .send()
        .await
        .unwrap();
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert!(js.text().await.unwrap().contains("getReader"));
}

#[tokio::test]
async fn wrong_password_shows_the_message_and_sets_no_cookie() {
    let base = spawn(config(Shape::Openai)).await;
    let response = client()
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("email", "ann@example.com"),
            ("password", "nope"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(set_cookies(&response).is_empty());
    let page = response.text().await.unwrap();
    assert!(page.contains("Incorrect email or password."));
    assert!(page.contains(r#"value="ann@example.com""#));

    let err = json_login(&base, "ann@example.com", "nope")
        .await
        .unwrap_err();
    assert!(
        matches!(err, DemoError::Refused { status: 401, .. }),
        "{err}"
    );
    let raw = client()
        .post(format!("{base}/api/login"))
        .json(&json!({ "email": "ann@example.com", "password": "nope" }))
        .send()
        .await
        .unwrap();
    assert!(set_cookies(&raw).is_empty());
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["message"], "Incorrect email or password.");
}

#[tokio::test]
async fn json_login_returns_cookies_and_local_storage() {
    let base = spawn(config(Shape::Openai)).await;
    let login = json_login(&base, "bob@example.com", PASSWORD)
        .await
        .unwrap();
    let names: Vec<&str> = login.cookies.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&SESSION_COOKIE) && names.contains(&DEVICE_COOKIE));
    assert_eq!(login.local_storage.len(), 1);
    assert_eq!(login.local_storage[0].0, TOKEN_KEY);
    assert!(login.local_storage[0].1.starts_with("dt_"));
}

#[tokio::test]
async fn chat_page_without_a_session_redirects_to_login() {
    let base = spawn(config(Shape::Openai)).await;
    for cookie in ["", "demo_sid=unknown"] {
        let response = client()
            .get(format!("{base}/chat"))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_redirection());
        assert_eq!(response.headers()["location"], "/login");
    }
}

// ---------------------------------------------------------------------------------------------
// API checks

async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(body.pointer("/error/message").is_some_and(Value::is_string));
    (status, body["error"]["code"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn the_api_answers_401_403_404_and_400_like_real_sites() {
    let shape = Shape::Ndjson;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "carol@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    let chat = || browser.chat(shape, &conversation, "hi");

    // No cookie at all.
    let no_cookie = client()
        .post(format!("{base}{}", shape.chat_path()))
        .header("authorization", format!("Bearer {}", browser.token))
        .header(CSRF_HEADER, &browser.csrf)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(no_cookie).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    // Wrong bearer token.
    let bad_bearer = Browser {
        token: "nope".into(),
        ..browser.clone()
    };
    let response = bad_bearer
        .chat(shape, &conversation, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Wrong CSRF token.
    let bad_csrf = Browser {
        csrf: "nope".into(),
        ..browser.clone()
    };
    let response = bad_csrf
        .chat(shape, &conversation, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::FORBIDDEN, "csrf_failed".into())
    );
    // The preflight checks the same.
    let response = bad_csrf
        .post(shape.create_conversation_path())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Unknown conversation, and one of another session.
    let response = browser
        .chat(shape, "00000000-0000-4000-8000-000000000000", "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let other = Browser::login(&base, "carol@example.com").await;
    let response = other.chat(shape, &conversation, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // Malformed bodies.
    for body in ["{not json", r#"{"message":{}}"#] {
        let response = browser
            .post(shape.chat_path())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (StatusCode::BAD_REQUEST, "bad_request".into())
        );
    }
    // And the right call works.
    assert_eq!(chat().send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let shape = Shape::Json;
    let base = spawn(DemoConfig {
        rate_limit: Some(2),
        ..config(shape)
    })
    .await;
    let browser = Browser::login(&base, "dan@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    for _ in 0..2 {
        let response = browser
            .chat(shape, &conversation, "hi")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    // Per account: a second session of the same email is limited too.
    let again = Browser::login(&base, "DAN@example.com").await;
    let conversation2 = again.create_conversation(shape).await;
    let response = again
        .chat(shape, &conversation2, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(error_of(response).await.1, "rate_limited");
    // Another account is not limited.
    let erin = Browser::login(&base, "erin@example.com").await;
    let conversation3 = erin.create_conversation(shape).await;
    let response = erin.chat(shape, &conversation3, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn expired_and_revoked_sessions_get_401() {
    let shape = Shape::Openai;
    let base = spawn(config(shape)).await;
    let ann = Browser::login(&base, "ann@example.com").await;
    let bob = Browser::login(&base, "bob@example.com").await;
    let ann_conv = ann.create_conversation(shape).await;
    let bob_conv = bob.create_conversation(shape).await;

    let revoked: Value = client()
        .post(format!("{base}/__demo/revoke?email=ann@example.com"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(revoked["revoked"], 1);
    let response = ann.chat(shape, &ann_conv, "hi").send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    let response = bob.chat(shape, &bob_conv, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.bytes().await.unwrap();

    let expired = client()
        .post(format!("{base}/__demo/expire-sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), StatusCode::OK);
    let response = bob.chat(shape, &bob_conv, "hi").send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    let page = client()
        .get(format!("{base}/chat"))
        .header("cookie", &bob.cookie)
        .send()
        .await
        .unwrap();
    assert!(page.status().is_redirection());
    // A new login works again.
    let bob = Browser::login(&base, "bob@example.com").await;
    let conv = bob.create_conversation(shape).await;
    assert_eq!(
        bob.chat(shape, &conv, "hi").send().await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn sessions_expire_after_their_ttl() {
    let base = spawn(DemoConfig {
        session_ttl: Some(Duration::ZERO),
        ..config(Shape::Frames)
    })
    .await;
    let login = json_login(&base, "ann@example.com", PASSWORD)
        .await
        .unwrap();
    let (name, value) = &login.cookies[0];
    let response = client()
        .post(format!("{base}/api/conversations"))
        .header("cookie", format!("{name}={value}"))
        .header(
            "authorization",
            format!("Bearer {}", login.local_storage[0].1),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------------
// The shapes

#[tokio::test]
async fn every_shape_streams_exactly_the_reply() {
    for shape in Shape::ALL {
        let base = spawn(config(shape)).await;
        let browser = Browser::login(&base, "ann@example.com").await;
        let (reasoning, content) = chat_once(shape, &browser, PROMPT).await;
        let expected = reply_for(shape, PROMPT);
        assert_eq!(content, expected.content, "{shape}");
        assert_eq!(reasoning, expected.reasoning, "{shape}");
    }
}

#[tokio::test]
async fn later_turns_of_a_conversation_count() {
    for shape in [Shape::Patch, Shape::Frames, Shape::Claude, Shape::Signed] {
        let base = spawn(config(shape)).await;
        let browser = Browser::login(&base, "ann@example.com").await;
        let conversation = browser.create_conversation(shape).await;
        for turn in 1..=2 {
            let response = browser
                .chat(shape, &conversation, "again")
                .send()
                .await
                .unwrap();
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            let (_, content) = decode(shape, &content_type, &response.bytes().await.unwrap());
            assert_eq!(content, reply_for_turn(shape, "again", turn).content);
        }
    }
}

#[tokio::test]
async fn the_reply_is_streamed_not_buffered() {
    // With an hour between tokens, only the unbuffered head of the stream can arrive.
    for shape in [Shape::Openai, Shape::Frames, Shape::Numbered, Shape::Claude] {
        let base = spawn(DemoConfig {
            token_delay: Duration::from_secs(3600),
            ..config(shape)
        })
        .await;
        let browser = Browser::login(&base, "ann@example.com").await;
        let conversation = browser.create_conversation(shape).await;
        let mut response = browser
            .chat(shape, &conversation, "hi")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("the head of the stream did not arrive")
            .unwrap()
            .unwrap();
        assert!(!first.is_empty());
    }
}

#[tokio::test]
async fn openai_shape_without_stream_answers_one_completion() {
    let shape = Shape::Openai;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    let body: Value = browser
        .post(shape.chat_path())
        .json(&json!({
            "model": "demo",
            "messages": [{ "role": "user", "content": [{ "type": "text", "text": PROMPT }] }],
            "conversation_id": conversation,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = reply_for(shape, PROMPT);
    assert_eq!(body["choices"][0]["message"]["content"], expected.content);
    assert_eq!(
        body["choices"][0]["message"]["reasoning_content"].as_str(),
        expected.reasoning.as_deref()
    );
}

// ---------------------------------------------------------------------------------------------
// The flow files, replayed by a minimal stand-in for the replay engine.

struct Rendered {
    method: reqwest::Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<(BodyKind, Value)>,
}

fn fill_placeholders(text: &str, vars: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    assert!(!out.contains("{{"), "unresolved placeholder in {out}");
    out
}

fn fill_body(value: &mut Value, vars: &[(String, String)]) {
    match value {
        Value::String(s) => *s = fill_placeholders(s, vars),
        Value::Array(items) => items.iter_mut().for_each(|v| fill_body(v, vars)),
        Value::Object(map) => map.values_mut().for_each(|v| fill_body(v, vars)),
        _ => {}
    }
}

fn render(
    http: &crate::flow::HttpTemplate,
    base: &str,
    prompt: &str,
    vars: &[(String, String)],
) -> Rendered {
    let mut body = http.body.clone();
    if let Some(body) = body.as_mut() {
        fill_body(body, vars);
        for (pointer, source) in &http.slots {
            let value = match source.as_str() {
                "prompt" | "last_user" => json!(prompt),
                "messages" => json!([{ "role": "user", "content": prompt }]),
                "uuid" => json!(uuid::Uuid::new_v4().to_string()),
                "now_ms" => json!(now_ms()),
                "now_s" => json!(now_ms() / 1000),
                other => {
                    let name = other.strip_prefix("preflight.").unwrap();
                    let (_, v) = vars
                        .iter()
                        .find(|(k, _)| k == &format!("preflight.{name}"))
                        .unwrap();
                    json!(v)
                }
            };
            *body
                .pointer_mut(pointer)
                .unwrap_or_else(|| panic!("{pointer}")) = value;
        }
    }
    Rendered {
        method: http.method.parse().unwrap(),
        url: format!("{base}{}", fill_placeholders(&http.url, vars)),
        headers: http
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), fill_placeholders(v, vars)))
            .collect(),
        body: body.map(|b| (http.body_kind, b)),
    }
}

async fn send(rendered: Rendered, cookie: &str) -> reqwest::Response {
    let mut request = client()
        .request(rendered.method, &rendered.url)
        .header("cookie", cookie);
    for (k, v) in &rendered.headers {
        request = request.header(k, v);
    }
    request = match rendered.body {
        Some((BodyKind::Json, body)) => request.body(body.to_string()),
        Some((BodyKind::Form, body)) => {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in body.as_object().unwrap() {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                form.append_pair(k, &v);
            }
            request.body(form.finish())
        }
        Some((BodyKind::Text, body)) => request.body(body.as_str().unwrap().to_owned()),
        Some((BodyKind::Multipart | BodyKind::File, _)) => panic!("no chat call uploads"),
        None => request,
    };
    request.send().await.unwrap()
}

/// Events as (name, data) by the flow's transport.
fn events(transport: Transport, bytes: &[u8]) -> Vec<(Option<String>, String)> {
    let text = String::from_utf8_lossy(bytes).into_owned();
    match transport {
        Transport::Sse => sse_events(&text),
        Transport::Ndjson => text.lines().map(|l| (None, l.to_owned())).collect(),
        Transport::NumberedLines => text
            .lines()
            .map(|l| {
                let (tag, data) = l.split_once(':').unwrap();
                (Some(tag.to_owned()), data.to_owned())
            })
            .collect(),
        Transport::LengthPrefixed => frames(bytes)
            .into_iter()
            .map(|(flag, v)| (Some(flag.to_string()), v.to_string()))
            .collect(),
        Transport::Json | Transport::Text => vec![(None, text)],
        Transport::Websocket => panic!("WebSocket replies are frames, not a body"),
    }
}

#[derive(Default)]
struct Channel {
    text: String,
    last: String,
}

impl Channel {
    fn take(&mut self, mode: Accrual, piece: &str) {
        match mode {
            Accrual::Delta | Accrual::AppendPatch => self.text.push_str(piece),
            Accrual::Cumulative => {
                match piece.strip_prefix(self.last.as_str()) {
                    Some(new) => self.text.push_str(new),
                    None => self.text.push_str(piece),
                }
                self.last = piece.to_owned();
            }
        }
    }
}

/// Applies a flow's response spec to the bytes: (reasoning, content, ids).
fn decode_with_flow(flow: &Flow, bytes: &[u8]) -> (Option<String>, String, Vec<String>) {
    let spec = &flow.response;
    let (mut text, mut thinking) = (Channel::default(), Channel::default());
    let (mut last_p, mut last_o) = (String::new(), String::new());
    let mut ids = Vec::new();
    for (name, data) in events(spec.transport, bytes) {
        let json: Option<Value> = serde_json::from_str(&data).ok();
        let matches = |event: &Option<String>| event.is_none() || *event == name;
        for rule in &spec.error {
            if matches(&rule.event)
                && let (Some(path), Some(v)) = (&rule.path, &json)
            {
                let found = v.pointer(path).filter(|f| !f.is_null());
                let hit = match &rule.equals {
                    Some(eq) => found == Some(eq),
                    None => found.is_some(),
                };
                assert!(!hit, "in-band error in {data}");
            }
        }
        if spec.done.iter().any(|d| {
            matches(&d.event)
                && d.data.as_ref().is_none_or(|x| *x == data)
                && d.path.as_ref().is_none_or(|p| {
                    let found = json.as_ref().and_then(|v| v.pointer(p));
                    found.is_some() && d.equals.as_ref().is_none_or(|eq| found == Some(eq))
                })
        }) {
            break;
        }
        let Some(v) = json else { continue };
        for pointer in spec.ids.values() {
            if let Some(id) = v.pointer(pointer).and_then(Value::as_str) {
                ids.push(id.to_owned());
            }
        }
        let is_reasoning = match &spec.reasoning {
            Some(ReasoningRule::Flag { path, equals, .. }) => v.pointer(path) == Some(equals),
            Some(ReasoningRule::Field { path, mode, event }) => {
                if matches(event)
                    && let Some(r) = v.pointer(path).and_then(Value::as_str)
                {
                    thinking.take(*mode, r);
                }
                false
            }
            Some(ReasoningRule::Markup { .. }) => panic!("no markup shape"),
            None => false,
        };
        if !matches(&spec.text.event) {
            continue;
        }
        let channel = if is_reasoning {
            &mut thinking
        } else {
            &mut text
        };
        match spec.text.mode {
            Accrual::AppendPatch => {
                let mut ops = vec![v.clone()];
                while let Some(op) = ops.pop() {
                    let p = op.get("p").and_then(Value::as_str);
                    let o = op.get("o").and_then(Value::as_str);
                    if p.is_none() && o.is_none() && op.get("v").is_none() {
                        continue;
                    }
                    if o == Some("patch") {
                        let subs = op["v"].as_array().unwrap();
                        ops.extend(subs.iter().rev().cloned());
                        continue;
                    }
                    last_p = p.map(str::to_owned).unwrap_or(last_p);
                    last_o = o.map(str::to_owned).unwrap_or(last_o);
                    if last_p == spec.text.path
                        && last_o == "append"
                        && let Some(s) = op["v"].as_str()
                    {
                        channel.take(Accrual::AppendPatch, s);
                    }
                }
            }
            mode => {
                if let Some(s) = v.pointer(&spec.text.path).and_then(Value::as_str) {
                    channel.take(mode, s);
                }
            }
        }
    }
    (
        (!thinking.text.is_empty()).then_some(thinking.text),
        text.text,
        ids,
    )
}

async fn replay_flow(
    flow: &Flow,
    base: &str,
    prompt: &str,
) -> (Option<String>, String, Vec<String>) {
    let (cookie, vars) = run_preflights(flow, base, prompt).await;
    let rendered = render(&flow.request, base, prompt, &vars);
    if flow.response.transport == Transport::Websocket {
        return replay_socket(flow, rendered, &cookie).await;
    }
    let response = send(rendered, &cookie).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", flow.service);
    decode_with_flow(flow, &response.bytes().await.unwrap())
}

/// Logs in and runs the flow's preflights: the cookie header and the template variables.
async fn run_preflights(flow: &Flow, base: &str, prompt: &str) -> (String, Vec<(String, String)>) {
    let login = json_login(base, "flow@example.com", PASSWORD)
        .await
        .unwrap();
    let cookie = login
        .cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut vars: Vec<(String, String)> = login
        .local_storage
        .iter()
        .map(|(k, v)| (format!("session.local.{k}"), v.clone()))
        .collect();
    vars.push(("now_ms".into(), now_ms().to_string()));
    for step in &flow.preflight {
        let response = send(render(&step.http, base, prompt, &vars), &cookie).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", step.http.url);
        let body = response.text().await.unwrap();
        for (name, extract) in &step.extract {
            let value = match extract {
                Extract::Pointer(p) => {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    v.pointer(p).and_then(Value::as_str).unwrap().to_owned()
                }
                Extract::Regex { regex } => {
                    // Only the `LITERAL([^"]+)"` form the demo flows use.
                    let (prefix, _) = regex.split_once(r#"([^"]+)"#).unwrap();
                    let start = body.find(prefix).unwrap() + prefix.len();
                    let end = start + body[start..].find('"').unwrap();
                    body[start..end].to_owned()
                }
                Extract::Header { .. } => panic!("no header extract"),
            };
            vars.push((format!("preflight.{name}"), value));
        }
    }
    (cookie, vars)
}

/// A WebSocket flow: the body is the list of frames to send, in order; the reply is decoded
/// frame by frame with the real decoder.
async fn replay_socket(
    flow: &Flow,
    rendered: Rendered,
    cookie: &str,
) -> (Option<String>, String, Vec<String>) {
    assert_eq!(rendered.method, reqwest::Method::GET);
    let (base, path) = rendered.url.split_at(rendered.url.find("/api/").unwrap());
    let mut socket = RawSocket::connect(base, path, &[("cookie", cookie)])
        .await
        .unwrap();
    let (_, frames) = rendered.body.unwrap();
    for frame in frames.as_array().unwrap() {
        socket.send_text(&frame.to_string()).await;
    }
    let mut decoder = Decoder::new(&flow.response);
    let mut deltas = Vec::new();
    while !decoder.is_done() {
        let Some(WsMessage::Text(text)) = socket.recv().await else {
            panic!("the socket ended before the reply was done");
        };
        decoder.feed_message(None, &text, &mut deltas).unwrap();
    }
    let (text, reasoning) = collect_text(&deltas);
    let ids = deltas
        .iter()
        .filter_map(|d| match d {
            Delta::Id { value, .. } => Some(value.clone()),
            _ => None,
        })
        .collect();
    ((!reasoning.is_empty()).then_some(reasoning), text, ids)
}

#[tokio::test]
async fn every_flow_file_replays_against_its_shape() {
    for (shape, text) in flow_files() {
        let flow = Flow::from_json(text).unwrap();
        let base = spawn(config(shape)).await;
        if flow.replay.needs_browser {
            continue; // see `the_signed_flow_fails_direct_replay`
        }
        // This stand-in knows the first ten shapes' rules; the later shapes' flows (markup,
        // batches without a path, turn counters) are replayed by the real engine, in
        // `the_real_decoder_reads_every_shape_with_its_flow` and `tests/sdk.rs`.
        if matches!(
            shape,
            Shape::Newchat | Shape::Batch | Shape::Details | Shape::Think | Shape::Fragile
        ) {
            continue;
        }
        let (reasoning, content, ids) = replay_flow(&flow, &base, PROMPT).await;
        let expected = reply_for(shape, PROMPT);
        assert_eq!(content, expected.content, "{shape}");
        assert_eq!(reasoning, expected.reasoning, "{shape}");
        assert!(!ids.is_empty(), "{shape}: no ids found");
    }
}

// ---------------------------------------------------------------------------------------------
// Login patterns: the pages a browser walks from the site root to the chat

/// A small cookie-keeping browser that walks the HTML pages the way a person would.
struct Walker {
    base: String,
    cookies: Vec<(String, String)>,
}

/// A page the walker ended on.
struct Page {
    /// Path after following redirects.
    path: String,
    status: StatusCode,
    set_cookies: Vec<String>,
    html: String,
}

impl Walker {
    fn new(base: &str) -> Walker {
        Walker {
            base: base.to_owned(),
            cookies: Vec::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn absorb(&mut self, response: &reqwest::Response) -> Vec<String> {
        let set = set_cookies(response);
        for header in &set {
            let (name, value) = parse_set_cookie(header).unwrap();
            self.cookies.retain(|(k, _)| *k != name);
            if !header.contains("Max-Age=0") {
                self.cookies.push((name, value));
            }
        }
        set
    }

    /// Follows redirects from `response` (at `path`) the way a browser does, with GETs.
    async fn finish(&mut self, mut path: String, mut response: reqwest::Response) -> Page {
        let mut set = self.absorb(&response);
        for _ in 0..5 {
            if !response.status().is_redirection() {
                break;
            }
            path = response.headers()["location"].to_str().unwrap().to_owned();
            assert!(path.starts_with('/'), "{path}");
            response = client()
                .get(format!("{}{path}", self.base))
                .header("cookie", self.cookie_header())
                .send()
                .await
                .unwrap();
            set.extend(self.absorb(&response));
        }
        Page {
            path,
            status: response.status(),
            set_cookies: set,
            html: response.text().await.unwrap(),
        }
    }

    async fn open(&mut self, path: &str) -> Page {
        let response = client()
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(path.to_owned(), response).await
    }

    async fn submit(&mut self, action: &str, pairs: &[(&str, &str)]) -> Page {
        let response = client()
            .post(format!("{}{action}", self.base))
            .header("cookie", self.cookie_header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(pairs))
            .send()
            .await
            .unwrap();
        self.finish(action.to_owned(), response).await
    }

    /// Opens `/chat` with `token` (what the login page stored) and checks that a chat call
    /// made with the page's CSRF token gets the exact reply.
    async fn chat_works(&mut self, shape: Shape, token: &str) {
        let page = self.open("/chat").await;
        assert_eq!((page.path.as_str(), page.status), ("/chat", StatusCode::OK));
        assert!(page.html.contains("<textarea"));
        let browser = Browser {
            base: self.base.clone(),
            cookie: self.cookie_header(),
            token: token.to_owned(),
            csrf: meta_csrf(&page.html).unwrap(),
            sign_key: page_sign_key(&page.html).unwrap_or_default(),
        };
        let expected = reply_for(shape, PROMPT);
        let (reasoning, content) = chat_once(shape, &browser, PROMPT).await;
        assert_eq!(content, expected.content);
        assert_eq!(reasoning, expected.reasoning);
    }
}

fn pattern_config(login: LoginPattern) -> DemoConfig {
    DemoConfig {
        login,
        ..config(Shape::Openai)
    }
}

/// The `action` of the page's (first) form.
fn form_action(html: &str) -> &str {
    let form = &html[html.find("<form").unwrap()..];
    let rest = &form[form.find(r#"action=""#).unwrap() + r#"action=""#.len()..];
    &rest[..rest.find('"').unwrap()]
}

/// The token the logged-in page stores in `localStorage`.
fn stored_token(html: &str) -> String {
    let marker = format!("localStorage.setItem(\"{TOKEN_KEY}\", \"");
    let rest = &html[html.find(&marker).unwrap() + marker.len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

const ERROR_MARKUP: &str =
    r#"<p class="error" id="login-error" role="alert">Incorrect email or password.</p>"#;

#[test]
fn login_patterns_round_trip_their_names() {
    for pattern in LoginPattern::ALL {
        assert_eq!(
            pattern.to_string().parse::<LoginPattern>().unwrap(),
            pattern
        );
    }
    assert_eq!(
        "two_step".parse::<LoginPattern>().unwrap(),
        LoginPattern::TwoStep
    );
    assert_eq!(
        " Two-Step ".parse::<LoginPattern>().unwrap(),
        LoginPattern::TwoStep
    );
    assert_eq!(LoginPattern::TwoStep.to_string(), "two-step");
    assert_eq!(DemoConfig::default().login, LoginPattern::Direct);
    assert!("sso".parse::<LoginPattern>().is_err());
}

#[tokio::test]
async fn direct_root_leads_to_the_form_and_then_to_the_chat() {
    let base = spawn(pattern_config(LoginPattern::Direct)).await;
    let mut browser = Walker::new(&base);
    let form = browser.open("/").await;
    assert_eq!(form.path, "/login");
    for needle in [
        r#"type="email""#,
        r#"autocomplete="username""#,
        r#"type="password""#,
        r#"autocomplete="current-password""#,
        r#"<label for="email">Email address</label>"#,
        r#"type="submit">Continue</button>"#,
    ] {
        assert!(form.html.contains(needle), "{needle}");
    }
    let done = browser
        .submit(
            form_action(&form.html),
            &[("email", "ann@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(browser.cookie(SESSION_COOKIE).is_some());
    let token = stored_token(&done.html);
    assert!(done.html.contains(r#"location.replace("/chat")"#));

    // Back at the root with a session, the visitor lands on the chat.
    assert_eq!(browser.open("/").await.path, "/chat");
    browser.chat_works(Shape::Openai, &token).await;
}

#[tokio::test]
async fn landing_page_has_a_log_in_button_that_leads_to_the_form() {
    let base = spawn(pattern_config(LoginPattern::Landing)).await;
    let mut browser = Walker::new(&base);
    let landing = browser.open("/").await;
    assert_eq!(
        (landing.path.as_str(), landing.status),
        ("/", StatusCode::OK)
    );
    for needle in [
        "<h1>",
        ">Pricing</a>",
        ">Blog</a>",
        r#"<button type="button" class="ghost" data-action="login">Log in</button>"#,
        ">Sign up</button>",
        r#"login: "/login""#,
    ] {
        assert!(landing.html.contains(needle), "{needle}");
    }
    // No link to the form: only the button's script knows where it is.
    assert!(!landing.html.contains(r#"href="/login""#));
    let signup = browser.open("/signup").await;
    assert!(signup.html.contains("Sign-ups are closed"));
    assert!(!signup.html.contains(r#"type="password""#));
    assert_eq!(browser.open("/blog").await.status, StatusCode::OK);

    let form = browser.open("/login").await;
    assert!(form.html.contains(r#"type="password""#));
    let done = browser
        .submit(
            form_action(&form.html),
            &[("email", "ann@example.com"), ("password", PASSWORD)],
        )
        .await;
    let token = stored_token(&done.html);
    // Logged in or not, the root stays the landing page.
    let again = browser.open("/").await;
    assert_eq!((again.path.as_str(), again.status), ("/", StatusCode::OK));
    browser.chat_works(Shape::Openai, &token).await;
}

#[tokio::test]
async fn two_step_login_asks_for_the_email_then_the_password() {
    let shape = Shape::Cumulative;
    let base = spawn(DemoConfig {
        login: LoginPattern::TwoStep,
        ..config(shape)
    })
    .await;
    let mut browser = Walker::new(&base);
    let first = browser.open("/").await;
    assert_eq!(first.path, "/login");
    assert!(first.html.contains(r#"type="email""#));
    assert!(first.html.contains(r#"autocomplete="username""#));
    assert!(first.html.contains(">Continue</button>"));
    assert!(!first.html.contains(r#"type="password""#));
    assert_eq!(form_action(&first.html), "/login/email");

    // Not an email: the first step again, with a message.
    let bad = browser
        .submit("/login/email", &[("email", "not-an-email")])
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        bad.html
            .contains(r#"role="alert">Enter a valid email address.</p>"#)
    );
    assert!(!bad.html.contains(r#"type="password""#));

    let second = browser
        .submit(form_action(&first.html), &[("email", "dan@example.com")])
        .await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.set_cookies.is_empty());
    for needle in [
        r#"value="dan@example.com""#,
        "readonly",
        r#"type="password""#,
        r#"autocomplete="current-password""#,
        r#"type="submit">Sign in</button>"#,
    ] {
        assert!(second.html.contains(needle), "{needle}");
    }
    assert_eq!(form_action(&second.html), "/login");

    // A wrong password: the password step again, with the message.
    let wrong = browser
        .submit(
            form_action(&second.html),
            &[("email", "dan@example.com"), ("password", "nope")],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.set_cookies.is_empty());
    assert!(wrong.html.contains(ERROR_MARKUP));
    assert!(wrong.html.contains(r#"type="password""#));
    assert!(wrong.html.contains(r#"value="dan@example.com""#));

    let done = browser
        .submit(
            form_action(&second.html),
            &[("email", "dan@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert!(browser.cookie(SESSION_COOKIE).is_some());
    let token = stored_token(&done.html);
    assert_eq!(browser.open("/").await.path, "/chat");
    browser.chat_works(shape, &token).await;
}

#[tokio::test]
async fn open_site_hands_out_an_anonymous_session() {
    let shape = Shape::Ndjson;
    let base = spawn(DemoConfig {
        login: LoginPattern::Open,
        ..config(shape)
    })
    .await;
    let mut browser = Walker::new(&base);
    let chat = browser.open("/").await;
    assert_eq!((chat.path.as_str(), chat.status), ("/chat", StatusCode::OK));
    let session = chat
        .set_cookies
        .iter()
        .find(|c| c.starts_with(&format!("{SESSION_COOKIE}=")))
        .unwrap();
    assert!(session.contains("HttpOnly") && session.contains("Path=/"));
    // The page's script stores the token where the logged-in pages do.
    let token = site::bootstrap_token(&chat.html).unwrap();
    assert!(token.starts_with("dt_"));
    assert!(chat.html.contains(r#"<script id="session-bootstrap""#));
    let js = client()
        .get(format!("{base}/static/chat.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(js.contains(r#"getElementById("session-bootstrap")"#));
    assert!(js.contains("localStorage.setItem(TOKEN_KEY, boot.token)"));
    assert!(!chat.html.contains(r#"href="/login""#));

    // The same session on the next visit: no new cookie.
    let again = browser.open("/chat").await;
    assert!(again.set_cookies.is_empty());
    assert_eq!(site::bootstrap_token(&again.html).unwrap(), token);
    browser.chat_works(shape, &token).await;

    // The form still exists, unlinked.
    assert!(
        browser
            .open("/login")
            .await
            .html
            .contains(r#"type="password""#)
    );

    // `json_login` gets such a session too.
    let scripted = Browser::login(&base, "ignored@example.com").await;
    assert_ne!(scripted.token, token);
    let (_, content) = chat_once(shape, &scripted, PROMPT).await;
    assert_eq!(content, reply_for(shape, PROMPT).content);
}

async fn pending_captcha(base: &str) -> Value {
    let response = client()
        .get(format!("{base}/__demo/captcha"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn click(base: &str, cookie: &str, id: &str, x: f64, y: f64) -> reqwest::Response {
    client()
        .post(format!("{base}/login/challenge"))
        .header("cookie", cookie)
        .json(&json!({ "id": id, "x": x, "y": y }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn captcha_login_needs_a_click_on_the_green_circle() {
    let shape = Shape::Frames;
    let base = spawn(DemoConfig {
        login: LoginPattern::Captcha,
        ..config(shape)
    })
    .await;
    let mut browser = Walker::new(&base);
    let form = browser.open("/").await;
    assert_eq!(form.path, "/login");
    let challenge = browser
        .submit(
            form_action(&form.html),
            &[("email", "eve@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(challenge.status, StatusCode::OK);
    assert!(challenge.set_cookies.is_empty());
    assert!(browser.cookie(SESSION_COOKIE).is_none());
    for needle in [
        "<title>Verify you are human</title>",
        "<h1>Verify you are human</h1>",
        r#"<div class="captcha-widget" role="group" aria-label="Human verification challenge""#,
        "position:absolute;left:40px;top:120px;width:300px;height:200px",
        r#"<canvas width="300" height="200""#,
        "Click the green circle",
        "/static/challenge.js",
    ] {
        assert!(challenge.html.contains(needle), "{needle}");
    }
    let js = client()
        .get(format!("{base}/static/challenge.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(js.contains("/login/challenge") && js.contains("localStorage.setItem"));

    // Where a person would click, in page coordinates, and so in box coordinates.
    let target = pending_captcha(&base).await;
    let id = target["id"].as_str().unwrap().to_owned();
    assert!(challenge.html.contains(&id));
    let (x, y) = (target["x"].as_f64().unwrap(), target["y"].as_f64().unwrap());
    let b = CAPTCHA_BOX;
    let (bx, by) = (x - f64::from(b.left), y - f64::from(b.top));
    let r = f64::from(b.target_radius);
    assert!((r..=f64::from(b.width) - r).contains(&bx), "{target}");
    assert!((r..=f64::from(b.height) - r).contains(&by), "{target}");
    // The page can be reloaded.
    let reload = browser.open(&format!("/login/challenge?id={id}")).await;
    assert!(reload.html.contains("Click the green circle"));

    // A click far from the circle: "Try again", and the challenge stays.
    let miss_x = if bx < 150.0 { bx + 100.0 } else { bx - 100.0 };
    let miss = click(&base, &browser.cookie_header(), &id, miss_x, by).await;
    assert_eq!(miss.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(set_cookies(&miss).is_empty());
    let body: Value = miss.json().await.unwrap();
    assert_eq!(body["error"]["message"], "Try again");
    assert_eq!(pending_captcha(&base).await, target);

    // A click just inside the circle logs in like the form does.
    let hit = click(&base, &browser.cookie_header(), &id, bx + r - 1.0, by).await;
    assert_eq!(hit.status(), StatusCode::OK);
    let session = set_cookies(&hit)
        .into_iter()
        .find(|c| c.starts_with(&format!("{SESSION_COOKIE}=")))
        .unwrap();
    assert!(session.contains("HttpOnly"));
    browser.absorb(&hit);
    let body: Value = hit.json().await.unwrap();
    assert_eq!(body["redirect"], "/chat");
    let token = body["token"].as_str().unwrap().to_owned();
    browser.chat_works(shape, &token).await;

    // The challenge is spent.
    let replay = click(&base, "", &id, bx, by).await;
    assert_eq!(replay.status(), StatusCode::GONE);
    let none = client()
        .get(format!("{base}/__demo/captcha"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        browser
            .open(&format!("/login/challenge?id={id}"))
            .await
            .path,
        "/login"
    );
}

#[tokio::test]
async fn the_captcha_helper_points_at_the_latest_challenge() {
    let base = spawn(pattern_config(LoginPattern::Captcha)).await;
    let mut browser = Walker::new(&base);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let page = browser
            .submit(
                "/login",
                &[("email", "fay@example.com"), ("password", PASSWORD)],
            )
            .await;
        let id = pending_captcha(&base).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(page.html.contains(&id));
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    // An older challenge can still be asked for by id, and solved.
    let first = client()
        .get(format!("{base}/__demo/captcha?id={}", ids[0]))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let b = CAPTCHA_BOX;
    let hit = click(
        &base,
        "",
        &ids[0],
        first["x"].as_f64().unwrap() - f64::from(b.left),
        first["y"].as_f64().unwrap() - f64::from(b.top),
    )
    .await;
    assert_eq!(hit.status(), StatusCode::OK);
    assert_eq!(pending_captcha(&base).await["id"], ids[1].as_str());
}

#[test]
fn captcha_challenges_expire_after_ten_minutes() {
    let state = state::AppState::new(pattern_config(LoginPattern::Captcha));
    let (id, challenge) = state.new_challenge("gus@example.com");
    let (x, y) = (f64::from(challenge.target.0), f64::from(challenge.target.1));
    let later = std::time::Instant::now() + CAPTCHA_TTL + Duration::from_secs(1);
    assert_eq!(CAPTCHA_TTL, Duration::from_secs(600));
    assert_eq!(
        state.click_at(&id, x, y, later),
        state::ClickOutcome::Unknown
    );
    assert!(state.challenge(&id).is_none());

    let (id, challenge) = state.new_challenge("gus@example.com");
    let (x, y) = (f64::from(challenge.target.0), f64::from(challenge.target.1));
    let soon = std::time::Instant::now() + CAPTCHA_TTL - Duration::from_secs(5);
    assert_eq!(
        state.click_at(&id, x, y, soon),
        state::ClickOutcome::Passed {
            email: "gus@example.com".into()
        }
    );
}

#[test]
fn captcha_targets_stay_inside_the_box_and_clear_of_decoys() {
    let state = state::AppState::new(pattern_config(LoginPattern::Captcha));
    let b = CAPTCHA_BOX;
    let r = b.target_radius;
    for _ in 0..200 {
        let (_, c) = state.new_challenge("hal@example.com");
        let (x, y) = c.target;
        assert!((r..=b.width - r).contains(&x) && (r..=b.height - r).contains(&y));
        for &(dx, dy, colour) in &c.decoys {
            assert_ne!(colour, "#12b76a");
            let d2 =
                (f64::from(dx) - f64::from(x)).powi(2) + (f64::from(dy) - f64::from(y)).powi(2);
            assert!(d2 > f64::from(2 * r).powi(2), "a decoy overlaps the target");
        }
    }
}

#[tokio::test]
async fn a_wrong_password_shows_the_message_and_sets_no_cookie_in_every_pattern() {
    for pattern in LoginPattern::ALL {
        let base = spawn(pattern_config(pattern)).await;
        let mut browser = Walker::new(&base);
        let page = browser
            .submit(
                "/login",
                &[("email", "ann@example.com"), ("password", "nope")],
            )
            .await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{pattern}");
        assert!(page.set_cookies.is_empty(), "{pattern}");
        assert!(page.html.contains(ERROR_MARKUP), "{pattern}");
        assert!(page.html.contains(r#"type="password""#), "{pattern}");
        if pattern == LoginPattern::Captcha {
            let none = client()
                .get(format!("{base}/__demo/captcha"))
                .send()
                .await
                .unwrap();
            assert_eq!(none.status(), StatusCode::NOT_FOUND);
        }
    }
}

#[tokio::test]
async fn json_login_works_behind_every_pattern() {
    for pattern in LoginPattern::ALL {
        let shape = Shape::Json;
        let base = spawn(DemoConfig {
            login: pattern,
            ..config(shape)
        })
        .await;
        // For the captcha pattern, the JSON API skips the challenge.
        let browser = Browser::login(&base, "ivy@example.com").await;
        let (_, content) = chat_once(shape, &browser, PROMPT).await;
        assert_eq!(content, reply_for(shape, PROMPT).content, "{pattern}");
        if pattern != LoginPattern::Open {
            let err = json_login(&base, "ivy@example.com", "nope")
                .await
                .unwrap_err();
            assert!(
                matches!(err, DemoError::Refused { status: 401, .. }),
                "{pattern}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal WebSocket client over a raw TCP stream (RFC 6455: the upgrade, masked text frames
// out, unmasked frames in), enough to talk to the ws shape.

#[derive(Debug, PartialEq)]
enum WsMessage {
    Text(String),
    Close(Option<u16>),
}

struct RawSocket {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawSocket {
    /// Upgrades `GET path`; `Err((status, body))` when the server answers without upgrading.
    async fn connect(
        base: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<RawSocket, (u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = base.strip_prefix("http://").unwrap();
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut rest = buf[head_end..].to_vec();
        if status != 101 {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while rest.len() < length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                rest.extend_from_slice(&chunk[..n]);
            }
            return Err((status, String::from_utf8_lossy(&rest).into_owned()));
        }
        // The accept value RFC 6455 gives for its sample key.
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));
        Ok(RawSocket { stream, buf: rest })
    }

    async fn send_text(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        let payload = text.as_bytes();
        let mask = rand::random::<[u8; 4]>();
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn fill(&mut self, want: usize) -> bool {
        use tokio::io::AsyncReadExt;
        while self.buf.len() < want {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("no frame within 10 s")
            {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The next text or close message (pings and pongs skipped); `None` at the end.
    async fn recv(&mut self) -> Option<WsMessage> {
        loop {
            if !self.fill(2).await {
                return None;
            }
            let (b0, b1) = (self.buf[0], self.buf[1]);
            assert_eq!(b1 & 0x80, 0, "server frames are not masked");
            assert_ne!(b0 & 0x80, 0, "no fragmented frames expected");
            let (len, header) = match b1 & 0x7f {
                126 => {
                    assert!(self.fill(4).await);
                    (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                }
                127 => {
                    assert!(self.fill(10).await);
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&self.buf[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                n => (n as usize, 2),
            };
            assert!(self.fill(header + len).await, "truncated frame");
            let payload: Vec<u8> = self.buf.drain(..header + len).skip(header).collect();
            match b0 & 0x0f {
                1 => return Some(WsMessage::Text(String::from_utf8(payload).unwrap())),
                8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Some(WsMessage::Close(code));
                }
                9 | 10 => continue,
                other => panic!("unexpected opcode {other}"),
            }
        }
    }

    async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            Some(WsMessage::Text(text)) => serde_json::from_str(&text).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// One chat turn: sends the chat frame, returns the frames received up to `done` (or an
    /// error frame), raw.
    async fn turn(&mut self, conversation: &str, prompt: &str) -> Vec<String> {
        self.send_text(
            &json!({
                "type": "chat",
                "id": uuid::Uuid::new_v4().to_string(),
                "conversation_id": conversation,
                "prompt": prompt,
            })
            .to_string(),
        )
        .await;
        let mut frames = Vec::new();
        loop {
            let Some(WsMessage::Text(text)) = self.recv().await else {
                panic!("the socket ended mid-reply");
            };
            let kind = serde_json::from_str::<Value>(&text).unwrap()["type"].clone();
            frames.push(text);
            if kind == "done" || kind == "error" {
                return frames;
            }
        }
    }

    /// Authenticates, chats once, and decodes the frames strictly: the answer.
    async fn chat(&mut self, token: &str, conversation: &str, prompt: &str) -> String {
        self.send_text(&json!({ "type": "auth", "token": token }).to_string())
            .await;
        ws_content(&self.turn(conversation, prompt).await, conversation)
    }
}

/// The answer in the ws shape's documented frames: `start`, `token`s, `done`.
fn ws_content(frames: &[String], conversation: &str) -> String {
    let frames: Vec<Value> = frames
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(frames[0]["type"], "start", "{frames:?}");
    assert_eq!(frames[0]["conversation_id"], conversation);
    let message_id = str_at(&frames[0], "/message_id");
    let last = frames.last().unwrap();
    assert_eq!(last["type"], "done");
    assert_eq!(last["message_id"], message_id);
    frames[1..frames.len() - 1]
        .iter()
        .map(|f| {
            assert_eq!(f["type"], "token");
            str_at(f, "/text")
        })
        .collect()
}

impl Browser {
    /// The ws shape's socket, opened the way the page opens it (cookie, same origin).
    async fn socket(&self, conversation: &str) -> RawSocket {
        RawSocket::connect(
            &self.base,
            &format!("/api/ws?conversation={conversation}"),
            &[("cookie", &self.cookie), ("origin", &self.base)],
        )
        .await
        .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The claude, ws and signed shapes

#[tokio::test]
async fn the_real_decoder_reads_every_shape_with_its_flow() {
    for shape in Shape::ALL {
        let flow = Flow::from_json(shape.flow_file()).unwrap();
        let base = spawn(config(shape)).await;
        let browser = Browser::login(&base, "ann@example.com").await;
        let deltas = if shape == Shape::Ws {
            let conversation = browser.create_conversation(shape).await;
            let mut socket = browser.socket(&conversation).await;
            socket
                .send_text(&json!({ "type": "auth", "token": browser.token }).to_string())
                .await;
            let mut decoder = Decoder::new(&flow.response);
            let mut deltas = Vec::new();
            for frame in socket.turn(&conversation, PROMPT).await {
                decoder.feed_message(None, &frame, &mut deltas).unwrap();
            }
            assert!(decoder.is_done());
            deltas
        } else {
            let response = browser.first_chat(shape, PROMPT).await;
            assert_eq!(response.status(), StatusCode::OK, "{shape}");
            decode_all(&flow.response, &response.bytes().await.unwrap())
                .unwrap_or_else(|e| panic!("{shape}: {e}"))
        };
        let (text, reasoning) = collect_text(&deltas);
        let expected = reply_for(shape, PROMPT);
        assert_eq!(text, expected.content, "{shape}");
        assert_eq!(
            (!reasoning.is_empty()).then_some(reasoning),
            expected.reasoning,
            "{shape}"
        );
        // A single JSON answer ends with its body; every stream has a done signal.
        assert_eq!(
            deltas.contains(&Delta::Done),
            shape != Shape::Json,
            "{shape}: done signal"
        );
        assert!(
            deltas.iter().any(|d| matches!(d, Delta::Id { .. })),
            "{shape}: no ids"
        );
    }
}

#[tokio::test]
async fn claude_takes_the_org_then_a_server_picked_conversation_id_in_the_path() {
    let shape = Shape::Claude;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    // The organization lookup checks the session like every API call.
    let bad_csrf = Browser {
        csrf: "nope".into(),
        ..browser.clone()
    };
    let response = bad_csrf.get("/api/organizations").send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::FORBIDDEN, "csrf_failed".into())
    );
    let no_bearer = client()
        .get(format!("{base}/api/organizations"))
        .header("cookie", &browser.cookie)
        .header(CSRF_HEADER, &browser.csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(no_bearer.status(), StatusCode::UNAUTHORIZED);

    let ids = browser.create_conversation(shape).await;
    let (org, conversation) = ids.split_once('/').unwrap();
    // The client's own uuid is not a conversation; another org is not ours.
    let client_uuid = uuid::Uuid::new_v4().to_string();
    let created: Value = browser
        .post(&format!("/api/organizations/{org}/chat_conversations"))
        .json(&json!({ "uuid": client_uuid, "name": "" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(created["uuid"], client_uuid);
    let response = browser
        .chat(shape, &format!("{org}/{client_uuid}"), "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let other_org = uuid::Uuid::new_v4();
    let response = browser
        .chat(shape, &format!("{other_org}/{conversation}"), "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = browser
        .post(&format!(
            "/api/organizations/{other_org}/chat_conversations"
        ))
        .json(&json!({ "uuid": client_uuid, "name": "" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = browser
        .post(&format!("/api/organizations/{org}/chat_conversations"))
        .json(&json!({ "name": "" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // A body without the prompt.
    let response = browser
        .post(&format!(
            "/api/organizations/{org}/chat_conversations/{conversation}/completion"
        ))
        .json(&json!({ "timezone": "UTC" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
    // The right call streams the Anthropic-style events (checked strictly by `decode`).
    let response = browser.chat(shape, &ids, PROMPT).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let (reasoning, content) = decode(shape, &content_type, &response.bytes().await.unwrap());
    let expected = reply_for(shape, PROMPT);
    assert_eq!(content, expected.content);
    assert_eq!(reasoning, expected.reasoning);
}

#[tokio::test]
async fn ws_streams_frames_and_counts_turns_on_one_socket() {
    let shape = Shape::Ws;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    let mut socket = browser.socket(&conversation).await;
    let content = socket.chat(&browser.token, &conversation, PROMPT).await;
    assert_eq!(content, reply_for(shape, PROMPT).content);
    let frames = socket.turn(&conversation, "again").await;
    assert_eq!(
        ws_content(&frames, &conversation),
        reply_for_turn(shape, "again", 2).content
    );
    // A chat frame naming another conversation is refused in-band.
    let frames = socket.turn("someone-else", "hi").await;
    let error: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    // The socket still works after that.
    let frames = socket.turn(&conversation, "third").await;
    assert_eq!(
        ws_content(&frames, &conversation),
        reply_for_turn(shape, "third", 3).content
    );
}

#[tokio::test]
async fn ws_refuses_missing_sessions_foreign_origins_and_bad_tokens() {
    let shape = Shape::Ws;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    let path = format!("/api/ws?conversation={conversation}");
    let code = |body: &str| {
        serde_json::from_str::<Value>(body).unwrap()["error"]["code"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let Err((status, body)) = RawSocket::connect(&base, &path, &[]).await else {
        panic!("upgraded without a session");
    };
    assert_eq!((status, code(&body).as_str()), (401, "unauthenticated"));
    let headers = [
        ("cookie", browser.cookie.as_str()),
        ("origin", "http://evil.example"),
    ];
    let Err((status, body)) = RawSocket::connect(&base, &path, &headers).await else {
        panic!("upgraded from a foreign origin");
    };
    assert_eq!((status, code(&body).as_str()), (403, "bad_origin"));
    let other = Browser::login(&base, "bob@example.com").await;
    let headers = [("cookie", other.cookie.as_str())];
    let Err((status, _)) = RawSocket::connect(&base, &path, &headers).await else {
        panic!("upgraded into another session's conversation");
    };
    assert_eq!(status, 404);
    // A plain GET is not a socket.
    let response = client()
        .get(format!("{base}{path}"))
        .header("cookie", &browser.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);

    // A wrong token in the first frame: an error frame, then close 4401.
    for first in [
        json!({ "type": "auth", "token": "nope" }),
        json!({ "type": "chat", "id": "x", "conversation_id": conversation, "prompt": "hi" }),
    ] {
        let mut socket = browser.socket(&conversation).await;
        socket.send_text(&first.to_string()).await;
        let error = socket.recv_json().await;
        assert_eq!(error["type"], "error");
        assert_eq!(error["code"], "unauthenticated");
        assert_eq!(socket.recv().await, Some(WsMessage::Close(Some(4401))));
    }
}

/// The signed shape's chat call with explicit headers (for forging and replaying).
fn signed_call(
    browser: &Browser,
    body: &str,
    ts: &str,
    signature: &str,
) -> reqwest::RequestBuilder {
    browser
        .post(Shape::Signed.chat_path())
        .header("content-type", "application/json")
        .header("x-timestamp", ts)
        .header("x-signature", signature)
        .body(body.to_owned())
}

fn signed_body(conversation: &str, prompt: &str) -> String {
    json!({
        "model": "demo",
        "messages": [{ "role": "user", "content": prompt }],
        "stream": true,
        "conversation_id": conversation,
        "client_request_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": now_ms(),
    })
    .to_string()
}

async fn assert_bad_signature(response: reqwest::Response) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        json!({ "error": { "message": "invalid request signature", "code": "bad_signature" } })
    );
}

#[tokio::test]
async fn signed_calls_verify_once_and_only_when_fresh() {
    let shape = Shape::Signed;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    let key = browser.sign_key.clone();
    assert_eq!(key.len(), 32);

    // A fresh, valid signature works, once.
    let body = signed_body(&conversation, PROMPT);
    let ts = now_ms().to_string();
    let signature = sha256_hex(&format!("{key}\n{ts}\n{body}"));
    let call = signed_call(&browser, &body, &ts, &signature);
    let replay = call.try_clone().unwrap();
    let response = call.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (reasoning, content) = decode(shape, "text/event-stream", &response.bytes().await.unwrap());
    let expected = reply_for(shape, PROMPT);
    assert_eq!((reasoning, content), (expected.reasoning, expected.content));
    // The very same request again (a direct replay of a recording).
    assert_bad_signature(replay.send().await.unwrap()).await;
    // The recorded headers with a new prompt.
    let other = signed_body(&conversation, "another prompt");
    assert_bad_signature(
        signed_call(&browser, &other, &ts, &signature)
            .send()
            .await
            .unwrap(),
    )
    .await;
    // A wrong signature, a wrong key, no signature.
    let ts = now_ms().to_string();
    let wrong = sha256_hex("something else");
    assert_bad_signature(
        signed_call(&browser, &other, &ts, &wrong)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let wrong_key = sha256_hex(&format!("{key}x\n{ts}\n{other}"));
    assert_bad_signature(
        signed_call(&browser, &other, &ts, &wrong_key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let unsigned = browser
        .post(shape.chat_path())
        .header("content-type", "application/json")
        .body(other.clone())
        .send()
        .await
        .unwrap();
    assert_bad_signature(unsigned).await;
    // A right signature over a stale (31 s old) or far-future timestamp.
    for ts in [now_ms() - 31_000, now_ms() + 31_000] {
        let ts = ts.to_string();
        let signature = sha256_hex(&format!("{key}\n{ts}\n{other}"));
        assert_bad_signature(
            signed_call(&browser, &other, &ts, &signature)
                .send()
                .await
                .unwrap(),
        )
        .await;
    }
    // Another session's key does not sign for this one.
    let bob = Browser::login(&base, "bob@example.com").await;
    assert_ne!(bob.sign_key, key);
    let ts = now_ms().to_string();
    let signature = sha256_hex(&format!("{}\n{ts}\n{other}", bob.sign_key));
    assert_bad_signature(
        signed_call(&browser, &other, &ts, &signature)
            .send()
            .await
            .unwrap(),
    )
    .await;
    // The signature is checked after the session: a bad CSRF token is still a 403 csrf_failed.
    let bad_csrf = Browser {
        csrf: "nope".into(),
        ..browser.clone()
    };
    let response = bad_csrf
        .chat(shape, &conversation, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::FORBIDDEN, "csrf_failed".into())
    );
    // And a newly signed call works again.
    let response = browser
        .chat(shape, &conversation, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_signing_key_is_hidden_in_an_inline_script_of_the_signed_page_only() {
    let base = spawn(config(Shape::Signed)).await;
    let login = json_login(&base, "ann@example.com", PASSWORD)
        .await
        .unwrap();
    let cookie = login
        .cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let html = client()
        .get(format!("{base}/chat"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = page_sign_key(&html).unwrap();
    assert_eq!(key.len(), 32);
    assert!(!html.contains(&key), "the key is in the page as is");
    assert!(html.contains("__demoRt"));
    assert!(!login.cookies.iter().any(|(_, v)| v.contains(&key)));
    assert!(!login.local_storage.iter().any(|(_, v)| v.contains(&key)));
    // The key is the session's: the same page load after load.
    let again = client()
        .get(format!("{base}/chat"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page_sign_key(&again).as_deref(), Some(key.as_str()));
    // Other shapes' pages carry no key.
    let base = spawn(config(Shape::Openai)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    assert!(browser.sign_key.is_empty());
}

#[tokio::test]
async fn the_signed_flow_fails_direct_replay() {
    let shape = Shape::Signed;
    let flow = Flow::from_json(shape.flow_file()).unwrap();
    assert!(flow.replay.needs_browser);
    let base = spawn(config(shape)).await;
    let (cookie, vars) = run_preflights(&flow, &base, PROMPT).await;
    let response = send(render(&flow.request, &base, PROMPT, &vars), &cookie).await;
    assert_bad_signature(response).await;
}

// ---------------------------------------------------------------------------------------------
// Resilience modes: anti-bot, live shape switch, rate-limit holds, conversations, stats

/// POSTs a `/__demo/…` control and returns its JSON answer.
async fn control(base: &str, path_and_query: &str) -> Value {
    let response = client()
        .post(format!("{base}{path_and_query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path_and_query}");
    response.json().await.unwrap()
}

async fn demo_get(base: &str, path: &str) -> Value {
    client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Registers clearance token `token` the way the chat page does (cookie and body).
async fn register_clearance(base: &str, token: &str) -> reqwest::Response {
    client()
        .post(format!("{base}{}", antibot::CLEARANCE_PATH))
        .header("cookie", format!("{}={token}", antibot::CLEARANCE_COOKIE))
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap()
}

/// `browser` with the clearance cookie added to its cookies.
fn with_clearance_cookie(browser: &Browser, token: &str) -> Browser {
    Browser {
        cookie: format!("{}; {}={token}", browser.cookie, antibot::CLEARANCE_COOKIE),
        ..browser.clone()
    }
}

async fn assert_challenge(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{what}");
    let headers = response.headers().clone();
    assert_eq!(headers["cf-mitigated"], "challenge", "{what}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{what}"
    );
    let body = response.text().await.unwrap();
    assert!(body.contains("Just a moment..."), "{what}: {body}");
    assert!(body.contains("challenge-platform"), "{what}: {body}");
}

#[tokio::test]
async fn anti_bot_challenges_api_calls_without_the_page_clearance() {
    let shape = Shape::Openai;
    let base = spawn(DemoConfig {
        anti_bot: true,
        ..config(shape)
    })
    .await;
    // The scripts' login and the chat page are not guarded; the page asks for clearance.
    let plain = Browser::login(&base, "ann@example.com").await;
    let page = plain
        .get("/chat")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"<meta name="demo-clearance-ttl" content="60">"#));

    // Without clearance, the preflight and the chat call get the challenge.
    assert_challenge(
        plain
            .post("/api/conversations")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        "preflight without clearance",
    )
    .await;
    assert_challenge(
        plain.chat(shape, "any", PROMPT).send().await.unwrap(),
        "chat without clearance",
    )
    .await;

    // The page's registration: the cookie must hold the token.
    let token = "0123456789abcdef0123456789abcdef";
    let registered = register_clearance(&base, token).await;
    assert_eq!(registered.status(), StatusCode::OK);
    let registered: Value = registered.json().await.unwrap();
    assert_eq!(registered, json!({ "token": token, "expires_in": 60 }));
    let no_cookie = client()
        .post(format!("{base}/api/clearance"))
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(no_cookie).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );

    // Cookie and matching header: passes, the whole way.
    let cleared = with_clearance_cookie(&plain, token);
    let conversation = cleared
        .post("/api/conversations")
        .header(antibot::CLEARANCE_HEADER, token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(conversation.status(), StatusCode::OK);
    let conversation: Value = conversation.json().await.unwrap();
    let conversation = str_at(&conversation, "/data/id").to_owned();
    let response = cleared
        .chat(shape, &conversation, PROMPT)
        .header(antibot::CLEARANCE_HEADER, token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, content) = decode(shape, &content_type, &response.bytes().await.unwrap());
    assert_eq!(content, reply_for(shape, PROMPT).content);

    // Cookie and `sec-fetch-site: same-origin` (an in-page fetch()): passes without the header.
    let response = cleared
        .chat(shape, &conversation, "hi")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.bytes().await.unwrap();

    // Everything else is challenged.
    let stale = "ffffffffffffffffffffffffffffffff";
    assert_challenge(
        cleared
            .chat(shape, &conversation, "hi")
            .header(antibot::CLEARANCE_HEADER, stale)
            .send()
            .await
            .unwrap(),
        "header differing from the cookie",
    )
    .await;
    assert_challenge(
        cleared
            .chat(shape, &conversation, "hi")
            .header("sec-fetch-site", "cross-site")
            .send()
            .await
            .unwrap(),
        "a cross-site fetch",
    )
    .await;
    assert_challenge(
        plain
            .chat(shape, &conversation, "hi")
            .header(antibot::CLEARANCE_HEADER, token)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap(),
        "header without the cookie",
    )
    .await;
    assert_challenge(
        with_clearance_cookie(&plain, stale)
            .chat(shape, &conversation, "hi")
            .header(antibot::CLEARANCE_HEADER, stale)
            .send()
            .await
            .unwrap(),
        "an unregistered token",
    )
    .await;

    // Expired clearances are challenged (the recorded call replayed later).
    assert_eq!(
        control(&base, "/__demo/expire-clearances").await["expired"],
        1
    );
    assert_challenge(
        cleared
            .chat(shape, &conversation, "hi")
            .header(antibot::CLEARANCE_HEADER, token)
            .send()
            .await
            .unwrap(),
        "an expired token",
    )
    .await;

    // Off at runtime: no clearance needed; on again: challenged.
    assert_eq!(
        control(&base, "/__demo/anti-bot?on=false").await,
        json!({ "anti_bot": false })
    );
    assert_eq!(demo_get(&base, "/__demo/anti-bot").await["anti_bot"], false);
    let page = plain
        .get("/chat")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("demo-clearance-ttl"));
    let response = plain.chat(shape, &conversation, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.bytes().await.unwrap();
    control(&base, "/__demo/anti-bot?on=true").await;
    assert_challenge(
        plain.chat(shape, &conversation, "hi").send().await.unwrap(),
        "after turning it on again",
    )
    .await;
}

#[tokio::test]
async fn anti_bot_can_be_turned_on_while_running_and_guards_every_api_path() {
    let shape = Shape::Ws;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    control(&base, "/__demo/anti-bot?on=true").await;
    assert_challenge(
        browser
            .get(&format!("/api/ws?conversation={conversation}"))
            .send()
            .await
            .unwrap(),
        "the WebSocket upgrade",
    )
    .await;
    assert_challenge(
        browser.get("/api/organizations").send().await.unwrap(),
        "another shape's path",
    )
    .await;
    assert_challenge(
        browser
            .post("/backend-api/conversation")
            .send()
            .await
            .unwrap(),
        "a /backend-api/ path",
    )
    .await;
    // With clearance, the upgrade request reaches the site (which wants a real upgrade).
    let token = "abcdefabcdefabcdefabcdefabcdefab";
    assert_eq!(
        register_clearance(&base, token).await.status(),
        StatusCode::OK
    );
    let response = with_clearance_cookie(&browser, token)
        .get(&format!("/api/ws?conversation={conversation}"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::UPGRADE_REQUIRED, "upgrade_required".into())
    );
    // Browsers put no header on a WebSocket: the token may come in the query instead.
    let cleared = with_clearance_cookie(&browser, token);
    let response = cleared
        .get(&format!(
            "/api/ws?conversation={conversation}&clearance={token}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    assert_challenge(
        cleared
            .get(&format!(
                "/api/ws?conversation={conversation}&clearance=ffffffffffffffffffffffffffffffff"
            ))
            .send()
            .await
            .unwrap(),
        "a stale token in the query",
    )
    .await;
    // Logins stay open to scripts.
    json_login(&base, "bob@example.com", PASSWORD)
        .await
        .unwrap();
}

#[tokio::test]
async fn clearances_expire_after_their_ttl() {
    let shape = Shape::Ndjson;
    let base = spawn(DemoConfig {
        anti_bot: true,
        clearance_ttl: Duration::ZERO,
        ..config(shape)
    })
    .await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let token = "0123456789abcdef0123456789abcdef";
    let registered: Value = register_clearance(&base, token).await.json().await.unwrap();
    assert_eq!(registered["expires_in"], 0);
    assert_challenge(
        with_clearance_cookie(&browser, token)
            .post("/api/conversations")
            .header(antibot::CLEARANCE_HEADER, token)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap(),
        "an expired token",
    )
    .await;
}

#[tokio::test]
async fn switching_the_shape_moves_the_chat_endpoint_and_the_page() {
    let base = spawn(config(Shape::Openai)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(Shape::Openai).await;
    let response = browser
        .chat(Shape::Openai, &conversation, PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.bytes().await.unwrap();
    // Before the switch, other shapes' endpoints 404.
    let other = browser
        .chat(Shape::Patch, &conversation, PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);

    assert_eq!(
        control(&base, "/__demo/shape?to=patch").await,
        json!({ "shape": "patch", "previous": "openai" })
    );
    assert_eq!(demo_get(&base, "/__demo/shape").await["shape"], "patch");
    // The flow learned for openai now 404s; the patch call works, in the same conversation.
    let old = browser
        .chat(Shape::Openai, &conversation, PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), StatusCode::NOT_FOUND);
    let response = browser
        .chat(Shape::Patch, &conversation, PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, content) = decode(
        Shape::Patch,
        &content_type,
        &response.bytes().await.unwrap(),
    );
    assert_eq!(content, reply_for_turn(Shape::Patch, PROMPT, 2).content);
    // The next page load speaks the new shape.
    let page = browser
        .get("/chat")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"<meta name="demo-shape" content="patch">"#));

    // A shape with its own preflight: the shared one 404s, the new one works.
    control(&base, "/__demo/shape?to=cumulative").await;
    let shared = browser
        .post("/api/conversations")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(shared.status(), StatusCode::NOT_FOUND);
    let (_, content) = chat_once(Shape::Cumulative, &browser, PROMPT).await;
    assert_eq!(content, reply_for(Shape::Cumulative, PROMPT).content);

    // Every shape works after a switch to it.
    for shape in Shape::ALL {
        control(&base, &format!("/__demo/shape?to={shape}")).await;
        let browser = Browser::login(&base, "bob@example.com").await;
        let (reasoning, content) = chat_once(shape, &browser, PROMPT).await;
        let expected = reply_for(shape, PROMPT);
        assert_eq!(content, expected.content, "{shape}");
        if shape != Shape::Ws {
            assert_eq!(reasoning, expected.reasoning, "{shape}");
        }
    }
    let unknown = client()
        .post(format!("{base}/__demo/shape?to=smoke-signals"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(unknown).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
}

#[tokio::test]
async fn a_flow_learned_before_a_shape_switch_fails_after_it() {
    let flow = Flow::from_json(Shape::Ndjson.flow_file()).unwrap();
    let base = spawn(config(Shape::Ndjson)).await;
    let (_, content, _) = replay_flow(&flow, &base, PROMPT).await;
    assert_eq!(content, reply_for(Shape::Ndjson, PROMPT).content);
    control(&base, "/__demo/shape?to=numbered").await;
    let (cookie, vars) = run_preflights(&flow, &base, PROMPT).await;
    let response = send(render(&flow.request, &base, PROMPT, &vars), &cookie).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_rate_limit_hold_gives_one_account_429_with_the_seconds_left() {
    let shape = Shape::Openai;
    let base = spawn(config(shape)).await;
    let ann = Browser::login(&base, "ann@example.com").await;
    let bob = Browser::login(&base, "bob@example.com").await;
    let ann_conv = ann.create_conversation(shape).await;
    let bob_conv = bob.create_conversation(shape).await;
    assert_eq!(
        control(&base, "/__demo/rate-limit?email=ANN@example.com&seconds=30").await,
        json!({ "email": "ANN@example.com", "seconds": 30 })
    );
    let response = ann.chat(shape, &ann_conv, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&retry), "{retry}");
    assert_eq!(error_of(response).await.1, "rate_limited");
    // Only that account.
    let response = bob.chat(shape, &bob_conv, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.bytes().await.unwrap();
    // Lifted with seconds=0; the held call did not count as a turn.
    control(&base, "/__demo/rate-limit?email=ann@example.com&seconds=0").await;
    let response = ann.chat(shape, &ann_conv, "hi").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, content) = decode(shape, &content_type, &response.bytes().await.unwrap());
    assert_eq!(content, reply_for(shape, "hi").content);
    // The stats count the one call held at 429, per account.
    let stats = demo_get(&base, "/__demo/stats").await;
    assert_eq!(
        stats["rate_limited_by_email"],
        json!({ "ann@example.com": 1 })
    );
    let missing = client()
        .post(format!("{base}/__demo/rate-limit?email=ann@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_same_conversation_counts_turns_and_the_site_lists_them() {
    let shape = Shape::Openai;
    let base = spawn(config(shape)).await;
    let ann = Browser::login(&base, "ann@example.com").await;
    let first = ann.create_conversation(shape).await;
    let second = ann.create_conversation(shape).await;
    for turn in 1..=3 {
        let response = ann.chat(shape, &first, "again").send().await.unwrap();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let (reasoning, content) = decode(shape, &content_type, &response.bytes().await.unwrap());
        let expected = reply_for_turn(shape, "again", turn);
        assert_eq!(content, expected.content);
        assert_eq!(reasoning, expected.reasoning);
        if turn > 1 {
            assert!(content.contains(&format!("turn **{turn}**")));
        }
    }
    let response = ann.chat(shape, &second, "again").send().await.unwrap();
    let _ = response.bytes().await.unwrap();
    assert_eq!(
        demo_get(&base, "/__demo/conversations").await,
        json!([
            { "id": first, "turns": 3, "email": "ann@example.com" },
            { "id": second, "turns": 1, "email": "ann@example.com" },
        ])
    );
}

#[tokio::test]
async fn patch_continues_with_the_message_id_its_stream_returns() {
    let shape = Shape::Patch;
    let base = spawn(config(shape)).await;
    let ann = Browser::login(&base, "ann@example.com").await;
    let conversation = ann.create_conversation(shape).await;
    let mut parent = uuid::Uuid::new_v4().to_string();
    for turn in 1..=2 {
        let response = ann
            .post(shape.chat_path())
            .json(&json!({
                "action": "next",
                "conversation_id": conversation,
                "parent_message_id": parent,
                "messages": [{
                    "id": uuid::Uuid::new_v4().to_string(),
                    "author": { "role": "user" },
                    "content": { "content_type": "text", "parts": ["again"] },
                }],
                "model": "demo",
            }))
            .send()
            .await
            .unwrap();
        let body = response.text().await.unwrap();
        let (_, content) = decode(shape, "text/event-stream", body.as_bytes());
        assert_eq!(content, reply_for_turn(shape, "again", turn).content);
        // The assistant message's id, from the `add` delta: the next turn's parent.
        let added = sse_events(&body)
            .into_iter()
            .filter(|(name, _)| name.as_deref() == Some("delta"))
            .map(|(_, data)| serde_json::from_str::<Value>(&data).unwrap())
            .find(|d| d["o"] == "add")
            .unwrap();
        assert_eq!(added["v"]["conversation_id"], conversation.as_str());
        parent = str_at(&added, "/v/message/id").to_owned();
    }
}

#[tokio::test]
async fn stats_keep_high_water_marks_overall_and_per_account() {
    let shape = Shape::Openai;
    // With an hour between tokens, every reply stays open until dropped.
    let base = spawn(DemoConfig {
        token_delay: Duration::from_secs(3600),
        ..config(shape)
    })
    .await;
    let ann = Browser::login(&base, "ann@example.com").await;
    let bob = Browser::login(&base, "bob@example.com").await;
    let mut open = Vec::new();
    for (browser, n) in [(&ann, 2), (&bob, 1)] {
        for _ in 0..n {
            let conversation = browser.create_conversation(shape).await;
            let response = browser
                .chat(shape, &conversation, "hi")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            open.push(response);
        }
    }
    let stats = demo_get(&base, "/__demo/stats").await;
    assert_eq!(stats["active"], 3, "{stats}");
    assert_eq!(stats["max_active"], 3, "{stats}");
    assert_eq!(
        stats["logins_by_email"],
        json!({ "ann@example.com": 1, "bob@example.com": 1 })
    );
    assert_eq!(
        stats["max_active_by_email"],
        json!({ "ann@example.com": 2, "bob@example.com": 1 })
    );
    assert_eq!(
        stats["active_by_email"],
        json!({ "ann@example.com": 2, "bob@example.com": 1 })
    );
    drop(open);
    // The site sees the clients go away; the marks stay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = demo_get(&base, "/__demo/stats").await;
        if stats["active"] == 0 {
            break stats;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats}");
        tokio::task::yield_now().await;
    };
    assert_eq!(stats["cancelled"], 3, "{stats}");
    assert_eq!(stats["max_active"], 3, "{stats}");
    assert_eq!(stats["max_active_by_email"]["ann@example.com"], 2);
    assert_eq!(stats["active_by_email"], json!({}));
    // A reset lowers the marks to what streams now.
    let reset = control(&base, "/__demo/reset-stats").await;
    assert_eq!(reset["max_active"], 0, "{reset}");
    assert_eq!(reset["cancelled"], 0, "{reset}");
    assert_eq!(reset["max_active_by_email"], json!({}));
    assert_eq!(reset["logins_by_email"], json!({}));
}

#[tokio::test]
async fn revoked_and_expired_sessions_get_401_json_everywhere_until_a_fresh_login() {
    let shape = Shape::Claude;
    let base = spawn(config(shape)).await;
    let ann = Browser::login(&base, "ann@example.com").await;
    let ids = ann.create_conversation(shape).await;
    control(&base, "/__demo/revoke?email=ann@example.com").await;
    for response in [
        ann.get("/api/organizations").send().await.unwrap(),
        ann.chat(shape, &ids, "hi").send().await.unwrap(),
    ] {
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        assert_eq!(
            error_of(response).await,
            (StatusCode::UNAUTHORIZED, "unauthenticated".into())
        );
    }
    let ann = Browser::login(&base, "ann@example.com").await;
    let (_, content) = chat_once(shape, &ann, "hi").await;
    assert_eq!(content, reply_for(shape, "hi").content);
    control(&base, "/__demo/expire-sessions").await;
    let response = ann.get("/api/organizations").send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    let ann = Browser::login(&base, "ann@example.com").await;
    let (_, content) = chat_once(shape, &ann, "hi").await;
    assert_eq!(content, reply_for(shape, "hi").content);
}

// ---------------------------------------------------------------------------------------------
// The later shapes: a later turn continues only through what the replies said

/// The first SSE event of `bytes` whose JSON has a string at `pointer`.
fn first_at(bytes: &[u8], pointer: &str) -> String {
    sse_events(&String::from_utf8_lossy(bytes))
        .into_iter()
        .filter_map(|(_, data)| serde_json::from_str::<Value>(&data).ok())
        .find_map(|v| {
            v.pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no {pointer}"))
}

async fn content_of(shape: Shape, response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.bytes().await.unwrap();
    if status != StatusCode::OK {
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        return (status, str_at(&body, "/error/code").to_owned());
    }
    (status, decode(shape, &content_type, &bytes).1)
}

#[tokio::test]
async fn batch_conversations_continue_by_the_ids_the_reply_gave() {
    let shape = Shape::Batch;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    // No create call: the shared one is not there.
    let shared = browser.post("/api/conversations").send().await.unwrap();
    assert_eq!(shared.status(), StatusCode::NOT_FOUND);
    let first = browser
        .first_chat(shape, "one")
        .await
        .bytes()
        .await
        .unwrap();
    let conversation = first_at(&first, "/v/conversation_id");
    let parent = first_at(&first, "/v/message/id");
    let next = |parent: &str| {
        let mut body = json!({
            "action": "next", "conversation_id": conversation, "parent_message_id": parent,
            "messages": [{ "id": uuid::Uuid::new_v4().to_string(), "author": { "role": "user" },
                "content": { "content_type": "text", "parts": ["two"] } }],
        });
        body["model"] = json!("demo");
        browser.post(shape.chat_path()).json(&body)
    };
    let wrong = next(&uuid::Uuid::new_v4().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        content_of(shape, wrong).await,
        (StatusCode::BAD_REQUEST, "bad_parent".into())
    );
    let right = next(&parent).send().await.unwrap();
    assert_eq!(
        content_of(shape, right).await.1,
        reply_for_turn(shape, "two", 2).content
    );
}

#[tokio::test]
async fn details_conversations_need_the_chat_the_parent_and_the_turn() {
    let shape = Shape::Details;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let first = browser
        .first_chat(shape, "one")
        .await
        .bytes()
        .await
        .unwrap();
    let chat = first_at(&first, "/chat_id");
    let parent = first_at(&first, "/message_id");
    let next = |parent: &str, turn: i64| {
        browser.post(shape.chat_path()).json(&json!({
            "model": "demo", "stream": true, "chat_id": chat, "parent_id": parent, "turn": turn,
            "messages": [{ "role": "user", "content": "two" }],
        }))
    };
    for (call, refusal) in [
        (next("m-nope", 1), "bad_parent"),
        (next(&parent, 0), "bad_turn"),
    ] {
        let response = call.send().await.unwrap();
        assert_eq!(
            content_of(shape, response).await,
            (StatusCode::BAD_REQUEST, refusal.into())
        );
    }
    let right = next(&parent, 1).send().await.unwrap();
    assert_eq!(
        content_of(shape, right).await.1,
        reply_for_turn(shape, "two", 2).content
    );
}

#[tokio::test]
async fn think_tokens_appear_only_when_the_chat_page_loads() {
    let shape = Shape::Think;
    let base = spawn(config(shape)).await;
    let response = client()
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("email", "ann@example.com"),
            ("password", PASSWORD),
        ]))
        .send()
        .await
        .unwrap();
    let cookie = set_cookies(&response)
        .iter()
        .map(|c| c.split(';').next().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("; ");
    let page = response.text().await.unwrap();
    assert!(!page.contains("localStorage.setItem"), "{page}");
    let token: Value = client()
        .get(format!("{base}/api/v1/auths/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(str_at(&token, "/token").starts_with("dt_"));
    let login = json_login(&base, "bob@example.com", PASSWORD)
        .await
        .unwrap();
    let (key, wrapped) = &login.local_storage[0];
    assert_eq!(key, WRAPPED_TOKEN_KEY);
    let wrapped: Value = serde_json::from_str(wrapped).unwrap();
    assert_eq!(wrapped["__version"], "0");

    // Later turns name the previous reply's response id.
    let browser = Browser::login(&base, "ann@example.com").await;
    let conversation = browser.create_conversation(shape).await;
    let first = browser
        .chat(shape, &conversation, "one")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let parent = first_at(&first, "/response_id");
    let next = |parent: Value| {
        browser
            .post(&format!("/api/v1/chats/{conversation}/completions"))
            .json(&json!({ "stream": true, "parent_id": parent,
                "message": { "role": "user", "content": "two", "id": "m-2" } }))
    };
    let missing = next(Value::Null).send().await.unwrap();
    assert_eq!(
        content_of(shape, missing).await,
        (StatusCode::BAD_REQUEST, "bad_parent".into())
    );
    let right = next(json!(parent)).send().await.unwrap();
    assert_eq!(
        content_of(shape, right).await.1,
        reply_for_turn(shape, "two", 2).content
    );
}

#[tokio::test]
async fn newchat_takes_the_first_message_in_its_create_call() {
    let shape = Shape::Newchat;
    let base = spawn(config(shape)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let chat = browser.new_chat("one").await;
    let start = || {
        browser
            .post("/api/chat")
            .json(&json!({ "chatId": chat, "mode": "start" }))
    };
    let first = start().send().await.unwrap();
    assert_eq!(first.headers()["x-vercel-ai-data-stream"], "v1");
    assert_eq!(
        content_of(shape, first).await.1,
        reply_for(shape, "one").content
    );
    // Answered once only; a later turn sends its message in the chat call.
    let again = start().send().await.unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    let next = browser.chat(shape, &chat, "two").send().await.unwrap();
    assert_eq!(
        content_of(shape, next).await.1,
        reply_for_turn(shape, "two", 2).content
    );
}

#[tokio::test]
async fn a_native_form_submission_just_shows_the_chat_again() {
    let base = spawn(config(Shape::Fragile)).await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let response = client()
        .post(format!("{base}/chat"))
        .header("cookie", &browser.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("prompt=hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/chat");
    let page = browser
        .get("/chat")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"method="post" action="/chat""#));
}

#[tokio::test]
async fn a_signed_site_signs_every_shape_s_chat_call() {
    let base = spawn(DemoConfig {
        signed: true,
        ..config(Shape::Details)
    })
    .await;
    let browser = Browser::login(&base, "ann@example.com").await;
    let page = browser
        .get("/chat")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"<meta name="demo-signed" content="1">"#));
    let key = page_sign_key(&page).unwrap();
    let unsigned = browser.first_chat(Shape::Details, "hi").await;
    assert_eq!(
        error_of(unsigned).await,
        (StatusCode::FORBIDDEN, "bad_signature".into())
    );
    let body = json!({ "model": "demo", "stream": true, "chat_id": null, "parent_id": null,
        "turn": 0, "messages": [{ "role": "user", "content": "hi" }] })
    .to_string();
    let signer = Browser {
        sign_key: key,
        ..browser.clone()
    };
    let signed = signer
        .signed(Shape::Details.chat_path(), body, now_ms())
        .send()
        .await
        .unwrap();
    assert_eq!(
        content_of(Shape::Details, signed).await.1,
        reply_for(Shape::Details, "hi").content
    );
}

// ---------------------------------------------------------------------------------------------
// Uploads

const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
const BOUNDARY: &str = "----demoFormBoundary7MA4YWxkTrZu0gW";

fn uploads_config(uploads: UploadShape) -> DemoConfig {
    DemoConfig {
        uploads: Some(uploads),
        ..config(Shape::Openai)
    }
}

/// A `multipart/form-data` body as a browser's `FormData` sends it: `purpose`, then `file`.
fn multipart_body(name: &str, mime_type: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nchat\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: {mime_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

impl Browser {
    /// `POST /api/files` with a multipart body, as the multipart page sends it.
    async fn upload_file(&self, name: &str, mime_type: &str, bytes: &[u8]) -> reqwest::Response {
        self.post("/api/files")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(multipart_body(name, mime_type, bytes))
            .send()
            .await
            .unwrap()
    }

    /// `POST /api/uploads`, as the slot page sends it.
    async fn open_slot(&self, name: &str, mime_type: &str, size: usize) -> reqwest::Response {
        self.post("/api/uploads")
            .json(&json!({ "file_name": name, "mime_type": mime_type, "size": size }))
            .send()
            .await
            .unwrap()
    }

    /// The openai chat call of a new conversation, with `extra` (the attachments) in its body.
    async fn chat_with(&self, prompt: &str, extra: Value) -> reqwest::Response {
        let conversation = self.create_conversation(Shape::Openai).await;
        let mut body = json!({
            "model": "demo",
            "messages": [{ "role": "user", "content": prompt }],
            "stream": true,
            "conversation_id": conversation,
            "client_request_id": uuid::Uuid::new_v4().to_string(),
            "timestamp": now_ms(),
        });
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        self.post(Shape::Openai.chat_path())
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

/// A raw PUT to a slot's URL, with no session: only the URL's token counts.
async fn put_blob(url: &str, mime_type: &str, bytes: Vec<u8>) -> reqwest::Response {
    client()
        .put(url)
        .header("content-type", mime_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

fn is_hex_id(id: &str, prefix: &str, digits: usize) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == digits
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_uppercase())
    })
}

#[test]
fn replies_with_files_describe_each_file_then_answer() {
    let files: [(&str, &str, &[u8]); 2] = [
        ("a.png", "image/png", PNG),
        ("b.txt", "text/plain", b"hello"),
    ];
    let reply = reply_with_files(Shape::Openai, "look", 2, &files);
    let usual = reply_for_turn(Shape::Openai, "look", 2);
    assert_eq!(
        reply.content,
        format!(
            "{}\n{}\n\n{}",
            describe_file("a.png", "image/png", PNG),
            describe_file("b.txt", "text/plain", b"hello"),
            usual.content
        )
    );
    assert_eq!(reply.reasoning, usual.reasoning);
    assert_eq!(reply_with_files(Shape::Openai, "look", 2, &[]), usual);
    assert_eq!(
        describe_file("b.txt", "text/plain", b"hello"),
        "Received b.txt (text/plain, 5 bytes, sha256 2cf24dba5fb0a30e)."
    );
}

#[tokio::test]
async fn a_multipart_upload_is_described_in_the_reply() {
    let base = spawn(uploads_config(UploadShape::Multipart)).await;
    let browser = Browser::login(&base, "uma@example.com").await;
    let response = browser.upload_file("pixel.png", "image/png", PNG).await;
    assert_eq!(response.status(), StatusCode::OK);
    let file: Value = response.json().await.unwrap();
    let id = str_at(&file, "/id").to_owned();
    assert!(is_hex_id(&id, "file-", 16), "{id}");
    assert_eq!(file["name"], "pixel.png");
    assert_eq!(file["bytes"], PNG.len());
    assert_eq!(file["mime_type"], "image/png");

    let prompt = "What is in this picture?";
    let response = browser.chat_with(prompt, json!({ "files": [id] })).await;
    let (status, content) = content_of(Shape::Openai, response).await;
    assert_eq!(status, StatusCode::OK, "{content}");
    let line = describe_file("pixel.png", "image/png", PNG);
    assert!(content.starts_with(&format!("{line}\n\n")), "{content}");
    assert_eq!(
        content,
        reply_with_files(Shape::Openai, prompt, 1, &[("pixel.png", "image/png", PNG)]).content
    );
    let stats = demo_get(&base, "/__demo/stats").await;
    assert_eq!(
        (stats["uploads"].as_u64(), stats["files_in_chat"].as_u64()),
        (Some(1), Some(1))
    );

    // A chat call without files is answered as before, and counts none.
    let response = browser.chat_with(prompt, json!({})).await;
    assert_eq!(
        content_of(Shape::Openai, response).await.1,
        reply_for(Shape::Openai, prompt).content
    );
    let stats: Value = client()
        .post(format!("{base}/__demo/reset-stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (stats["uploads"].as_u64(), stats["files_in_chat"].as_u64()),
        (Some(0), Some(0))
    );
    // The slot shape's routes are not served.
    let response = browser.open_slot("a.txt", "text/plain", 3).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_slot_upload_takes_three_calls_and_is_described_in_the_reply() {
    let base = spawn(uploads_config(UploadShape::Slot)).await;
    let browser = Browser::login(&base, "sol@example.com").await;
    let bytes = b"notes: the demo takes files\n".to_vec();
    let response = browser
        .open_slot("notes.txt", "text/plain", bytes.len())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let slot: Value = response.json().await.unwrap();
    let upload_id = str_at(&slot, "/upload_id").to_owned();
    assert!(is_hex_id(&upload_id, "up_", 16), "{upload_id}");
    let url = str_at(&slot, "/upload_url").to_owned();
    let token = url.strip_prefix(&format!("{base}/blob/")).unwrap();
    assert!(is_hex_id(token, "", 32), "{url}");

    let confirm = |browser: Browser| {
        let upload_id = upload_id.clone();
        async move {
            browser
                .post(&format!("/api/uploads/{upload_id}/confirm"))
                .json(&json!({}))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        error_of(confirm(browser.clone()).await).await,
        (StatusCode::CONFLICT, "not_uploaded".into())
    );
    let short = put_blob(&url, "text/plain", bytes[1..].to_vec()).await;
    assert_eq!(
        error_of(short).await,
        (StatusCode::BAD_REQUEST, "size_mismatch".into())
    );
    let mut long = bytes.clone();
    long.push(b'!');
    assert_eq!(
        error_of(put_blob(&url, "text/plain", long).await).await,
        (StatusCode::BAD_REQUEST, "size_mismatch".into())
    );
    let put = put_blob(&url, "text/plain", bytes.clone()).await;
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(
        error_of(put_blob(&url, "text/plain", bytes.clone()).await).await,
        (StatusCode::CONFLICT, "already_uploaded".into())
    );
    // Another account cannot confirm the slot.
    let other = Browser::login(&base, "mallory@example.com").await;
    assert_eq!(
        error_of(confirm(other).await).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let response = confirm(browser.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let confirmed: Value = response.json().await.unwrap();
    let id = str_at(&confirmed, "/file/id").to_owned();
    assert!(is_hex_id(&id, "file-", 16), "{id}");
    assert_eq!(confirmed["file"]["status"], "ready");

    let prompt = "Summarize my notes.";
    let attachments = json!({ "attachments": [{
        "id": id, "name": "notes.txt", "mime_type": "text/plain", "size": bytes.len(),
    }] });
    let response = browser.chat_with(prompt, attachments).await;
    let (status, content) = content_of(Shape::Openai, response).await;
    assert_eq!(status, StatusCode::OK, "{content}");
    let line = describe_file("notes.txt", "text/plain", &bytes);
    assert!(content.starts_with(&format!("{line}\n\n")), "{content}");
    assert_eq!(
        content,
        reply_with_files(
            Shape::Openai,
            prompt,
            1,
            &[("notes.txt", "text/plain", &bytes)]
        )
        .content
    );
    let stats = demo_get(&base, "/__demo/stats").await;
    assert_eq!(
        (stats["uploads"].as_u64(), stats["files_in_chat"].as_u64()),
        (Some(1), Some(1))
    );
    // The multipart shape's route is not served.
    let response = browser.upload_file("a.txt", "text/plain", b"abc").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn uploads_refuse_big_files_other_types_and_other_accounts_files() {
    let big = vec![b'x'; 2 * MAX_UPLOAD_BYTES];
    let base = spawn(uploads_config(UploadShape::Multipart)).await;
    let browser = Browser::login(&base, "rey@example.com").await;
    assert_eq!(
        error_of(browser.upload_file("big.txt", "text/plain", &big).await).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large".into())
    );
    assert_eq!(
        error_of(
            browser
                .upload_file("a.zip", "application/zip", b"PK\x03\x04")
                .await
        )
        .await,
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_type".into()
        )
    );
    // No session: 401, like every API call.
    let anonymous = client()
        .post(format!("{base}/api/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart_body("a.txt", "text/plain", b"abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(anonymous).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    // Another account's file, and one that never was.
    let response = browser.upload_file("mine.txt", "text/plain", b"mine").await;
    let id = str_at(&response.json::<Value>().await.unwrap(), "/id").to_owned();
    let other = Browser::login(&base, "kylo@example.com").await;
    for named in [id.clone(), "file-0123456789abcdef".to_owned()] {
        let response = other.chat_with("hi", json!({ "files": [named] })).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "unknown_file");
        assert_eq!(
            body["error"]["message"],
            format!("file {named} is not yours or does not exist")
        );
    }
    let stats = demo_get(&base, "/__demo/stats").await;
    assert_eq!(
        (stats["uploads"].as_u64(), stats["files_in_chat"].as_u64()),
        (Some(1), Some(0))
    );

    let base = spawn(uploads_config(UploadShape::Slot)).await;
    let browser = Browser::login(&base, "rey@example.com").await;
    assert_eq!(
        error_of(browser.open_slot("big.png", "image/png", big.len()).await).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large".into())
    );
    assert_eq!(
        error_of(browser.open_slot("a.zip", "application/zip", 4).await).await,
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_type".into()
        )
    );
    let unknown = format!("{base}/blob/{}", "0".repeat(32));
    assert_eq!(
        error_of(put_blob(&unknown, "text/plain", b"x".to_vec()).await).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
}

#[tokio::test]
async fn the_chat_page_has_the_attach_control_only_with_uploads() {
    let attach = r#"<input type="file" id="attach""#;
    for (config, shown) in [
        (config(Shape::Openai), false),
        (uploads_config(UploadShape::Multipart), true),
        (uploads_config(UploadShape::Slot), true),
        (
            DemoConfig {
                uploads: Some(UploadShape::Slot),
                ..config(Shape::Ndjson)
            },
            false,
        ),
    ] {
        let uploads = config.uploads.filter(|_| shown);
        let base = spawn(config).await;
        let browser = Browser::login(&base, "page@example.com").await;
        let page = browser
            .get("/chat")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(page.contains(attach), shown, "{page}");
        assert_eq!(page.contains(r#"id="attach-button""#), shown);
        match uploads {
            Some(uploads) => {
                assert!(page.contains(r#"accept="image/*,text/plain" multiple"#));
                assert!(page.contains(&format!(
                    r#"<meta name="demo-uploads" content="{uploads}">"#
                )));
            }
            None => assert!(!page.contains("demo-uploads")),
        }
    }
}
