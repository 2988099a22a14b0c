//! Flow template + prompt + session → one concrete HTTP request.
//!
//! Placeholders (`{{source}}`) are replaced in the URL, the header values and the string
//! leaves of the body first; then `slots` put typed values at their JSON pointers. That order
//! keeps a prompt that happens to contain `{{…}}` from being expanded.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use url::Url;

use crate::attachment::Attachment;
use crate::flow::{BodyKind, HttpTemplate};
use crate::pinning::{PinError, Pins};
use crate::role::Role;
use crate::session::SessionData;

/// The conversation to send, already reduced to text, and the files it carries.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub messages: Vec<(Role, String)>,
    pub model: String,
    /// The files of the user turns; a flow's upload steps send them before the chat call.
    pub attachments: Vec<PromptFile>,
}

/// A file of a prompt, and where it is.
#[derive(Debug, Clone)]
pub struct PromptFile {
    /// The index in `messages` of its turn.
    pub turn: usize,
    /// It is in the new turn (the user messages after the last assistant one), not in the
    /// history.
    pub new: bool,
    pub file: Arc<Attachment>,
}

impl Prompt {
    /// The last user message alone when it is the only message worth sending; otherwise the
    /// whole history, role-tagged, so the site sees the context.
    pub fn flattened(&self) -> String {
        match self.messages.as_slice() {
            [(Role::User, text)] => text.clone(),
            messages => {
                let mut out = String::new();
                for (role, text) in messages {
                    if !out.is_empty() {
                        out.push_str("\n\n");
                    }
                    out.push_str(role.label());
                    out.push_str(": ");
                    out.push_str(text);
                }
                out
            }
        }
    }

    /// The messages as a conversation's key sees them: each turn's files named by their hash
    /// after its text, so two histories that differ only in an image are two conversations.
    pub fn keyed_messages(&self) -> std::borrow::Cow<'_, [(Role, String)]> {
        if self.attachments.is_empty() {
            return std::borrow::Cow::Borrowed(&self.messages);
        }
        let mut messages = self.messages.clone();
        for attached in &self.attachments {
            if let Some((_, text)) = messages.get_mut(attached.turn) {
                text.push_str("\n[file sha256:");
                text.push_str(&attached.file.sha256);
                text.push(']');
            }
        }
        std::borrow::Cow::Owned(messages)
    }

    /// The prompt with its files as `[image]` / `[file]` text in their turns instead, for a
    /// flow that cannot send files.
    pub fn files_as_text(&self) -> Prompt {
        let mut prompt = Prompt {
            messages: self.messages.clone(),
            model: self.model.clone(),
            attachments: Vec::new(),
        };
        for attached in &self.attachments {
            if let Some((_, text)) = prompt.messages.get_mut(attached.turn) {
                let shown = match attached.file.mime.starts_with("image/") {
                    true => "[image]",
                    false => "[file]",
                };
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(shown);
            }
        }
        prompt
    }

    pub fn last_user(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|(role, _)| *role == Role::User)
            .map_or("", |(_, text)| text.as_str())
    }

    fn openai_messages(&self) -> Value {
        Value::Array(
            self.messages
                .iter()
                .map(|(role, text)| {
                    let role = match role {
                        Role::System | Role::Developer => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                        Role::Tool | Role::Function => "tool",
                    };
                    serde_json::json!({ "role": role, "content": text })
                })
                .collect(),
        )
    }
}

/// Everything a template may refer to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub prompt: &'a Prompt,
    pub session: &'a SessionData,
    pub preflight: &'a BTreeMap<String, String>,
    pub conversation: &'a BTreeMap<String, String>,
    /// Milliseconds since the epoch, fixed for the whole request.
    pub now_ms: i64,
    /// The origins this account's calls may reach (see `replay::pin`).
    pub pins: &'a Pins,
    /// The file an upload step sends (the `file.*` sources, `{{file}}` bodies).
    pub file: Option<&'a Attachment>,
    /// The uploaded files, as the chat call names them: put at this pointer of its body.
    pub attached: Option<(&'a str, &'a Value)>,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub method: String,
    pub url: Url,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Set when the template gives no `content-type` header.
    pub content_type: Option<Cow<'static, str>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The session lacks a value the flow needs: the session is stale or from another login.
    #[error("the session has no {0}")]
    MissingSession(String),
    #[error("no earlier step extracted `{0}`")]
    MissingPreflight(String),
    #[error("the flow refers to unknown source `{0}`")]
    UnknownSource(String),
    #[error("slot pointer `{0}` does not fit the request body")]
    BadPointer(String),
    #[error("request URL `{0}` is not valid")]
    BadUrl(String),
    #[error("`{{{{` without a closing `}}}}` in `{0}`")]
    Unclosed(String),
    /// The call would leave the account's origin: it is not sent.
    #[error(transparent)]
    Pinned(#[from] PinError),
}

/// Renders `template` against `base` (the account URL) and `ctx`.
pub fn render(
    template: &HttpTemplate,
    base: &Url,
    ctx: &Context<'_>,
) -> Result<Rendered, RenderError> {
    let url = pinned_url(template, base, ctx)?;
    let mut headers = Vec::with_capacity(template.headers.len());
    for (name, value) in &template.headers {
        headers.push((name.clone(), expand(value, ctx, Escape::None)?));
    }
    let has_content_type = template
        .headers
        .keys()
        .any(|k| k.eq_ignore_ascii_case("content-type"));
    let (body, content_type): (_, Option<Cow<'static, str>>) = match &template.body {
        _ if template.body_kind == BodyKind::File => {
            let file = ctx.file.ok_or_else(no_file)?;
            (Some(file.bytes.to_vec()), Some(file.mime.clone().into()))
        }
        None => (None, None),
        Some(body) => {
            let mut body = render_value(body, &template.slots, ctx)?;
            if let Some((pointer, value)) = ctx.attached {
                set_pointer(&mut body, pointer, value.clone())?;
            }
            match template.body_kind {
                BodyKind::Json => (
                    Some(serde_json::to_vec(&body).unwrap_or_default()),
                    Some("application/json".into()),
                ),
                BodyKind::Form => (
                    Some(form_encode(&body).into_bytes()),
                    Some("application/x-www-form-urlencoded".into()),
                ),
                BodyKind::Text => (
                    Some(value_text(&body).into_bytes()),
                    Some("text/plain;charset=UTF-8".into()),
                ),
                BodyKind::Multipart => {
                    let (bytes, content_type) = multipart(&body, ctx.file)?;
                    (Some(bytes), Some(content_type.into()))
                }
                BodyKind::File => (None, None),
            }
        }
    };
    Ok(Rendered {
        method: template.method.to_ascii_uppercase(),
        url,
        headers,
        body,
        content_type: content_type.filter(|_| !has_content_type),
    })
}

/// A JSON template with its placeholders expanded and its slots filled.
pub fn render_value(
    template: &Value,
    slots: &BTreeMap<String, String>,
    ctx: &Context<'_>,
) -> Result<Value, RenderError> {
    let mut value = expand_value(template, ctx)?;
    for (pointer, source) in slots {
        let found = resolve(source, ctx)?;
        set_pointer(&mut value, pointer, found)?;
    }
    Ok(value)
}

fn no_file() -> RenderError {
    RenderError::MissingPreflight("file (only an upload step sends one)".into())
}

/// A `multipart/form-data` body from `fields` (see `BodyKind::Multipart`), and its content
/// type with the boundary.
fn multipart(fields: &Value, file: Option<&Attachment>) -> Result<(Vec<u8>, String), RenderError> {
    let boundary = format!("----ComputeTower{}", uuid::Uuid::new_v4().simple());
    let mut out = Vec::new();
    let quoted = |text: &str| text.replace(['"', '\r', '\n'], "");
    for field in fields.as_array().into_iter().flatten() {
        let name = field.get("name").and_then(Value::as_str).unwrap_or("");
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        if field.get("file").is_some_and(|f| f != &Value::Bool(false)) {
            let file = file.ok_or_else(no_file)?;
            out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\n\
                     Content-Type: {}\r\n\r\n",
                    quoted(name),
                    quoted(&file.name),
                    file.mime
                )
                .as_bytes(),
            );
            out.extend_from_slice(&file.bytes);
        } else {
            let value = field.get("value").map(value_text).unwrap_or_default();
            out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{}\"\r\n\r\n{value}",
                    quoted(name)
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Ok((out, format!("multipart/form-data; boundary={boundary}")))
}

/// The call's URL, once its origin is known to be pinned. The origin is decided with session
/// values masked, so no session value is expanded for a call that is refused, and none can
/// reach a host name (and from there a DNS query).
fn pinned_url(template: &HttpTemplate, base: &Url, ctx: &Context<'_>) -> Result<Url, RenderError> {
    let join = |text: &str| {
        base.join(text)
            .map_err(|_| RenderError::BadUrl(template.url.clone()))
    };
    let refers_to_session = template.url.contains("{{session.");
    // A URL that is one earlier answer's value whole (an upload slot) is taken as it is; its
    // origin is checked like any other.
    let whole = template.url.starts_with("{{preflight.")
        && template.url.ends_with("}}")
        && template.url.matches("{{").count() == 1;
    let first = match (refers_to_session, whole) {
        (true, _) => expand_with(&template.url, ctx, Escape::Url, true)?,
        (false, true) => expand(&template.url, ctx, Escape::None)?,
        (false, false) => expand(&template.url, ctx, Escape::Url)?,
    };
    let first = join(&first)?;
    if refers_to_session && first.host_str().is_some_and(|h| h.contains(SESSION_MASK)) {
        return Err(PinError::HostFromSession.into());
    }
    ctx.pins.check(&first)?;
    if !refers_to_session {
        return Ok(first);
    }
    let url = join(&expand(&template.url, ctx, Escape::Url)?)?;
    // Expanded values are percent-encoded, so they cannot move the origin; checked anyway.
    ctx.pins.check(&url)?;
    if url.origin() != first.origin() {
        return Err(PinError::HostFromSession.into());
    }
    Ok(url)
}

/// What a session reference reads as while a URL's origin is decided.
const SESSION_MASK: &str = "ctsessionmask";

#[derive(Clone, Copy, PartialEq)]
enum Escape {
    None,
    /// Percent-encode substituted values (they land in a path segment or a query value).
    Url,
}

/// Replaces every `{{source}}` in `text`.
fn expand(text: &str, ctx: &Context<'_>, escape: Escape) -> Result<String, RenderError> {
    expand_with(text, ctx, escape, false)
}

/// As [`expand`]; with `mask_session`, session references read as [`SESSION_MASK`].
fn expand_with(
    text: &str,
    ctx: &Context<'_>,
    escape: Escape,
    mask_session: bool,
) -> Result<String, RenderError> {
    if !text.contains("{{") {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| RenderError::Unclosed(text.to_owned()))?;
        let source = after[..end].trim();
        let value = match mask_session && source.starts_with("session.") {
            true => SESSION_MASK.to_owned(),
            false => value_text(&resolve(source, ctx)?),
        };
        match escape {
            Escape::None => out.push_str(&value),
            Escape::Url => out.extend(percent_encoding::utf8_percent_encode(
                &value,
                percent_encoding::NON_ALPHANUMERIC,
            )),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_value(value: &Value, ctx: &Context<'_>) -> Result<Value, RenderError> {
    Ok(match value {
        Value::String(s) => Value::String(expand(s, ctx, Escape::None)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| expand_value(v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), expand_value(v, ctx)?)))
                .collect::<Result<_, RenderError>>()?,
        ),
        other => other.clone(),
    })
}

/// The value of one source (see `crate::flow`).
pub fn resolve(source: &str, ctx: &Context<'_>) -> Result<Value, RenderError> {
    let (base, inner) = match source.split_once('#') {
        Some((base, inner)) => (base, Some(inner)),
        None => (source, None),
    };
    let found: Value = match base {
        "prompt" => Value::String(ctx.prompt.flattened()),
        "last_user" => Value::String(ctx.prompt.last_user().to_owned()),
        "messages" => ctx.prompt.openai_messages(),
        "model" => Value::String(ctx.prompt.model.clone()),
        "uuid" => Value::String(uuid::Uuid::new_v4().to_string()),
        "now_ms" => Value::from(ctx.now_ms),
        "now_s" => Value::from(ctx.now_ms / 1000),
        counter if crate::flow::turn_counter(counter).is_some() => {
            let (scale, offset) = crate::flow::turn_counter(counter).unwrap_or((1, 0));
            let before: i64 = ctx
                .conversation
                .get(crate::flow::TURNS)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Value::from(scale * (before + 1) + offset)
        }
        file if file.starts_with("file.") => {
            let file_of = ctx.file.ok_or_else(no_file)?;
            match file {
                "file.name" => Value::String(file_of.name.clone()),
                "file.type" => Value::String(file_of.mime.clone()),
                "file.size" => Value::from(file_of.size() as u64),
                "file.sha256" => Value::String(file_of.sha256.clone()),
                "file.base64" => Value::String(file_of.base64()),
                "file.data_url" => Value::String(file_of.data_url()),
                _ => return Err(RenderError::UnknownSource(source.to_owned())),
            }
        }
        "session.user_agent" => Value::String(
            ctx.session
                .user_agent
                .clone()
                .ok_or_else(|| RenderError::MissingSession("user agent".into()))?,
        ),
        _ => {
            let text = if let Some(name) = base.strip_prefix("preflight.") {
                ctx.preflight
                    .get(name)
                    .ok_or_else(|| RenderError::MissingPreflight(name.to_owned()))?
                    .clone()
            } else if let Some(name) = base.strip_prefix("conversation.") {
                ctx.conversation
                    .get(name)
                    .ok_or_else(|| RenderError::MissingPreflight(format!("conversation.{name}")))?
                    .clone()
            } else if let Some(name) = base.strip_prefix("session.cookie.") {
                ctx.session
                    .cookies
                    .iter()
                    .find(|c| c.name == name)
                    .map(|c| c.value.clone())
                    .ok_or_else(|| RenderError::MissingSession(format!("cookie `{name}`")))?
            } else if let Some(key) = base.strip_prefix("session.local.") {
                ctx.session.local_storage.get(key).cloned().ok_or_else(|| {
                    RenderError::MissingSession(format!("localStorage key `{key}`"))
                })?
            } else if let Some(key) = base.strip_prefix("session.session.") {
                ctx.session
                    .session_storage
                    .get(key)
                    .cloned()
                    .ok_or_else(|| {
                        RenderError::MissingSession(format!("sessionStorage key `{key}`"))
                    })?
            } else {
                return Err(RenderError::UnknownSource(source.to_owned()));
            };
            Value::String(text)
        }
    };
    match inner {
        None => Ok(found),
        // Storage values are often JSON documents; `#/pointer` reads inside them.
        Some(pointer) => {
            let text = value_text(&found);
            let doc: Value = serde_json::from_str(&text)
                .map_err(|_| RenderError::MissingSession(format!("JSON in `{base}`")))?;
            doc.pointer(pointer)
                .cloned()
                .ok_or_else(|| RenderError::MissingSession(format!("`{pointer}` in `{base}`")))
        }
    }
}

/// A value as text: strings bare, anything else as compact JSON.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn set_pointer(body: &mut Value, pointer: &str, value: Value) -> Result<(), RenderError> {
    if pointer.is_empty() {
        *body = value;
        return Ok(());
    }
    if let Some(slot) = body.pointer_mut(pointer) {
        *slot = value;
        return Ok(());
    }
    // The leaf may be absent from the captured body; its parent must exist.
    let bad = || RenderError::BadPointer(pointer.to_owned());
    let (parent, leaf) = pointer.rsplit_once('/').ok_or_else(bad)?;
    let leaf = leaf.replace("~1", "/").replace("~0", "~");
    match body.pointer_mut(parent).ok_or_else(bad)? {
        Value::Object(map) => {
            map.insert(leaf, value);
            Ok(())
        }
        Value::Array(items) if leaf == "-" => {
            items.push(value);
            Ok(())
        }
        _ => Err(bad()),
    }
}

fn form_encode(body: &Value) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    if let Value::Object(map) = body {
        for (key, value) in map {
            form.append_pair(key, &value_text(value));
        }
    }
    form.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Cookie;

    fn session() -> SessionData {
        SessionData {
            cookies: vec![Cookie {
                name: "sid".into(),
                value: "c00k1e".into(),
                domain: "x.test".into(),
                path: "/".into(),
                expires: None,
                secure: false,
                http_only: true,
                host_only: true,
            }],
            local_storage: [
                ("token".to_owned(), "tok".to_owned()),
                ("auth".to_owned(), r#"{"access":{"jwt":"j1"}}"#.to_owned()),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn prompt(messages: &[(Role, &str)]) -> Prompt {
        Prompt {
            messages: messages
                .iter()
                .map(|(r, t)| (*r, (*t).to_owned()))
                .collect(),
            model: "svc".into(),
            attachments: Vec::new(),
        }
    }

    fn template(json: Value) -> HttpTemplate {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn renders_slots_placeholders_and_session_references() {
        let p = prompt(&[(Role::User, "hi {{uuid}} \"there\"")]);
        let s = session();
        let preflight = [("cid".to_owned(), "c 1/2".to_owned())].into();
        let ctx = Context {
            prompt: &p,
            session: &s,
            preflight: &preflight,
            conversation: &BTreeMap::new(),
            now_ms: 1_700_000_000_123,
            pins: &Pins::new(&Url::parse("https://x.test/").unwrap(), []),
            file: None,
            attached: None,
        };
        let t = template(serde_json::json!({
            "url": "/api/chat/{{preflight.cid}}?ts={{now_s}}",
            "headers": {"authorization": "Bearer {{session.local.token}}", "x-jwt": "{{session.local.auth#/access/jwt}}"},
            "body": {"q": "", "meta": {"id": "old", "ts": 0, "cid": "{{preflight.cid}}"}},
            "slots": {"/q": "prompt", "/meta/id": "uuid", "/meta/ts": "now_ms", "/new": "last_user"}
        }));
        let base = Url::parse("https://x.test/chat").unwrap();
        let r = render(&t, &base, &ctx).unwrap();
        assert_eq!(
            r.url.as_str(),
            "https://x.test/api/chat/c%201%2F2?ts=1700000000"
        );
        assert_eq!(
            r.headers,
            vec![
                ("authorization".to_owned(), "Bearer tok".to_owned()),
                ("x-jwt".to_owned(), "j1".to_owned())
            ]
        );
        let body: Value = serde_json::from_slice(&r.body.unwrap()).unwrap();
        // The prompt's own `{{uuid}}` is left alone.
        assert_eq!(body["q"], "hi {{uuid}} \"there\"");
        assert_eq!(body["new"], "hi {{uuid}} \"there\"");
        assert_eq!(body["meta"]["ts"], 1_700_000_000_123i64);
        assert_eq!(body["meta"]["cid"], "c 1/2");
        assert_eq!(body["meta"]["id"].as_str().unwrap().len(), 36);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn history_is_flattened_with_roles_or_sent_as_messages() {
        let p = prompt(&[
            (Role::System, "be brief"),
            (Role::User, "a"),
            (Role::Assistant, "b"),
            (Role::User, "c"),
        ]);
        assert_eq!(
            p.flattened(),
            "System: be brief\n\nUser: a\n\nAssistant: b\n\nUser: c"
        );
        assert_eq!(p.last_user(), "c");
        assert_eq!(p.openai_messages()[3]["content"], "c");
        assert_eq!(prompt(&[(Role::User, "only")]).flattened(), "only");
    }

    #[test]
    fn a_turn_counter_counts_the_conversation_s_turns() {
        let p = prompt(&[(Role::User, "next")]);
        let s = session();
        let t = template(serde_json::json!({
            "url": "/x", "body": {"a": 0, "b": 0}, "slots": {"/a": "turn", "/b": "turn*2-2"}
        }));
        let base = Url::parse("https://x.test/").unwrap();
        let pins = Pins::new(&base, []);
        for (before, expected) in [(None, (1, 0)), (Some("2"), (3, 4))] {
            let conversation: BTreeMap<String, String> = before
                .map(|n| (crate::flow::TURNS.to_owned(), n.to_owned()))
                .into_iter()
                .collect();
            let ctx = Context {
                prompt: &p,
                session: &s,
                preflight: &BTreeMap::new(),
                conversation: &conversation,
                now_ms: 0,
                pins: &pins,
                file: None,
                attached: None,
            };
            let body: Value =
                serde_json::from_slice(&render(&t, &base, &ctx).unwrap().body.unwrap()).unwrap();
            assert_eq!(
                (body["a"].as_i64().unwrap(), body["b"].as_i64().unwrap()),
                expected
            );
        }
    }

    #[test]
    fn form_body_and_missing_values() {
        let p = prompt(&[(Role::User, "a&b=c")]);
        let s = session();
        let ctx = Context {
            prompt: &p,
            session: &s,
            preflight: &BTreeMap::new(),
            conversation: &BTreeMap::new(),
            now_ms: 0,
            pins: &Pins::new(&Url::parse("https://x.test/").unwrap(), []),
            file: None,
            attached: None,
        };
        let base = Url::parse("https://x.test/").unwrap();
        let t = template(serde_json::json!({
            "url": "/ask", "body_kind": "form", "body": {"prompt": "", "n": 1}, "slots": {"/prompt": "prompt"}
        }));
        let r = render(&t, &base, &ctx).unwrap();
        assert_eq!(r.body.unwrap(), b"prompt=a%26b%3Dc&n=1");
        let t =
            template(serde_json::json!({"url": "/x", "headers": {"a": "{{session.local.nope}}"}}));
        let err = render(&t, &base, &ctx).unwrap_err();
        assert!(matches!(err, RenderError::MissingSession(_)));
        assert!(err.to_string().contains("nope") && !err.to_string().contains("tok"));
        let t = template(
            serde_json::json!({"url": "/x", "body": {"a": 1}, "slots": {"/b/c": "prompt"}}),
        );
        assert!(matches!(
            render(&t, &base, &ctx),
            Err(RenderError::BadPointer(_))
        ));
    }

    /// Two histories that differ only in an image are two site conversations; the site is
    /// sent the text alone.
    #[test]
    fn a_conversation_s_key_names_its_files() {
        let with = |bytes: &[u8]| {
            let mut p = prompt(&[(Role::User, "what is it?"), (Role::Assistant, "a cat")]);
            p.attachments.push(PromptFile {
                turn: 0,
                new: false,
                file: Arc::new(Attachment::new("m", None, "image/png", bytes.to_vec())),
            });
            p
        };
        let (a, b) = (with(b"one"), with(b"two"));
        assert_eq!(a.messages, b.messages);
        assert_ne!(a.keyed_messages(), b.keyed_messages());
        assert_eq!(a.keyed_messages(), with(b"one").keyed_messages());
        let plain = prompt(&[(Role::User, "what is it?")]);
        assert!(matches!(
            plain.keyed_messages(),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(a.files_as_text().messages[0].1, "what is it?\n[image]");
    }

    #[test]
    fn upload_bodies_carry_the_file_and_the_chat_call_names_it() {
        let p = prompt(&[(Role::User, "hi")]);
        let s = session();
        let file = Attachment::new(
            "m",
            Some("a\"b.png"),
            "image/png",
            b"\x89PNG-bytes".to_vec(),
        );
        let preflight: BTreeMap<String, String> = [(
            "url".to_owned(),
            "https://x.test/blob/t?sig=a%2Fb".to_owned(),
        )]
        .into();
        let pins = Pins::new(&Url::parse("https://x.test/").unwrap(), []);
        let attached = serde_json::json!([{"id": "file-1"}]);
        let ctx = Context {
            prompt: &p,
            session: &s,
            preflight: &preflight,
            conversation: &BTreeMap::new(),
            now_ms: 0,
            pins: &pins,
            file: Some(&file),
            attached: None,
        };
        let base = Url::parse("https://x.test/").unwrap();
        let t = template(
            serde_json::json!({"url": "/up", "body_kind": "multipart", "body": [
            {"name": "purpose", "value": "chat {{file.size}}"}, {"name": "file", "file": true}]}),
        );
        let r = render(&t, &base, &ctx).unwrap();
        let content_type = r.content_type.unwrap().into_owned();
        let boundary = content_type
            .strip_prefix("multipart/form-data; boundary=")
            .unwrap();
        let body = String::from_utf8_lossy(&r.body.unwrap()).into_owned();
        assert!(body.starts_with(&format!("--{boundary}\r\n")), "{body}");
        assert!(
            body.contains("name=\"purpose\"\r\n\r\nchat 10\r\n"),
            "{body}"
        );
        assert!(
            body.contains("name=\"file\"; filename=\"ab.png\"\r\nContent-Type: image/png\r\n\r\n\u{fffd}PNG-bytes\r\n"),
            "{body}"
        );
        assert!(body.ends_with(&format!("--{boundary}--\r\n")));
        // The raw bytes, to the URL an earlier answer gave whole (not re-encoded).
        let t = template(
            serde_json::json!({"method": "PUT", "url": "{{preflight.url}}", "body_kind": "file"}),
        );
        let r = render(&t, &base, &ctx).unwrap();
        assert_eq!(r.url.as_str(), "https://x.test/blob/t?sig=a%2Fb");
        assert_eq!(r.body.as_deref(), Some(&b"\x89PNG-bytes"[..]));
        assert_eq!(r.content_type.as_deref(), Some("image/png"));
        // The chat call gets the uploaded files' list at its attach point.
        let ctx = Context {
            attached: Some(("/files", &attached)),
            ..ctx
        };
        let t = template(
            serde_json::json!({"url": "/chat", "body": {"prompt": "", "files": []}, "slots": {"/prompt": "prompt"}}),
        );
        let body: Value =
            serde_json::from_slice(&render(&t, &base, &ctx).unwrap().body.unwrap()).unwrap();
        assert_eq!(body["files"], attached);
        // Without a file, a file source is an error, not an empty value.
        let ctx = Context { file: None, ..ctx };
        let t = template(serde_json::json!({"url": "/x", "body": {"n": "{{file.name}}"}}));
        assert!(render(&t, &base, &ctx).is_err());
    }

    /// A flow naming another origin is refused before any session value is expanded, and a
    /// host built from a session value is refused outright.
    #[test]
    fn calls_off_the_account_origin_are_refused() {
        let p = prompt(&[(Role::User, "hi")]);
        let s = session();
        let pins = Pins::new(&Url::parse("https://x.test/").unwrap(), []);
        let ctx = Context {
            prompt: &p,
            session: &s,
            preflight: &BTreeMap::new(),
            conversation: &BTreeMap::new(),
            now_ms: 0,
            pins: &pins,
            file: None,
            attached: None,
        };
        let base = Url::parse("https://x.test/chat").unwrap();
        for url in [
            "https://evil.test/x?t={{session.local.token}}",
            "//evil.test/x",
            "http://x.test/x",
            "https://{{session.local.token}}.evil.test/",
            "https://{{session.local.token}}/",
        ] {
            let t = template(serde_json::json!({
                "url": url, "headers": {"authorization": "Bearer {{session.local.token}}"}
            }));
            let err = render(&t, &base, &ctx).unwrap_err();
            assert!(matches!(err, RenderError::Pinned(_)), "{url}: {err}");
            assert!(!err.to_string().contains("tok"), "{err}");
        }
        let t = template(serde_json::json!({"url": "https://x.test/a?t={{session.local.token}}"}));
        assert_eq!(
            render(&t, &base, &ctx).unwrap().url.as_str(),
            "https://x.test/a?t=tok"
        );
    }
}
