//! The flow: the recipe for one site's chat call, as data.
//!
//! Invariants:
//! - One schema for everything: `learn` writes it, `store::flows` keeps it, `replay` runs it,
//!   `/admin/flows` shows it and `flows/*.json` holds it.
//! - A flow never holds a secret. Cookie values, bearer tokens and CSRF tokens are references
//!   (`{{session.cookie.sid}}`, `{{session.local.token}}`, `{{preflight.csrf}}`) resolved at
//!   replay time, so a flow file can be shared and committed.
//! - Nothing here is site-specific: a site differs from another only by the values in its flow.
//!
//! Templating. Any string in `url`, `headers` and the string leaves of `body` may hold
//! `{{source}}` placeholders. `slots` maps a JSON pointer into `body` to a source whose value
//! replaces the whole leaf, keeping its JSON type (a number for `now_ms`, an array for
//! `messages`). Sources:
//! - `prompt`: the conversation as one text (the last user message alone when it is the only
//!   message, the role-tagged history otherwise); `last_user`: the last user message only;
//!   `messages`: the OpenAI message list `[{role, content}]`; `model`: the model the client asked;
//! - `uuid`, `now_ms`, `now_s`: fresh per request;
//! - `preflight.NAME`: a value extracted from an earlier step's response;
//! - `session.cookie.NAME`, `session.local.KEY`, `session.session.KEY`, `session.user_agent`:
//!   from the sealed session; a `#/json/pointer` suffix reads inside a JSON-encoded value;
//! - `conversation.NAME`: a value of the previous exchange of the same site conversation (a
//!   preflight value it used, or an id its reply returned);
//! - `turn`: the number of this turn in the site conversation (1 for the first); a counter the
//!   site keeps another way is `turn*K+N` / `turn*K-N` (`turn-1` counts from 0, `turn*2-2`
//!   counts both sides' messages).
//!
//! - `file.name`, `file.type`, `file.size`, `file.sha256`, `file.base64`, `file.data_url`: the
//!   file an upload step sends (see [`Upload`]).
//!
//! Conversations. `preflight` and `request` send a first turn. A later turn of the same site
//! conversation is sent by `follow_up` when the learner saw one (a second probe in the same
//! conversation): which calls it makes, which values of the previous exchange it reuses, and
//! whether it resends the history.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Current version of the flow file format.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// Stable id, `f_` + 16 hex digits; assigned on import when empty.
    #[serde(default)]
    pub id: String,
    /// Service name: the model id clients ask for.
    pub service: String,
    /// What the flow does on the service (`chat`).
    #[serde(default = "default_name")]
    pub name: String,
    /// Bumped each time the service's flow is re-learned or re-imported.
    #[serde(default = "default_version")]
    pub version: u32,
    /// The site origin the flow was learned on (informative). Relative URLs in the flow are
    /// resolved against the account's URL, so one flow serves every account of a service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Calls whose results the chat call needs, run in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preflight: Vec<Step>,
    /// The chat call.
    pub request: HttpTemplate,
    /// How to read the reply out of the chat call's response.
    pub response: ResponseSpec,
    /// Selectors for the browser tiers (filled by the learner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ui: Option<UiHints>,
    /// How a later turn of the same site conversation is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<FollowUp>,
    /// How the site takes a file (learned when its chat page has an attach control).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Upload>,
    /// Whether direct replay works for this flow.
    #[serde(default, skip_serializing_if = "ReplayPolicy::is_default")]
    pub replay: ReplayPolicy,
    #[serde(default)]
    pub stats: FlowStats,
}

fn default_name() -> String {
    "chat".to_owned()
}

fn default_version() -> u32 {
    1
}

/// One HTTP call, templated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpTemplate {
    #[serde(default = "default_method")]
    pub method: String,
    /// Absolute, or relative to the account's URL.
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body_kind: BodyKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// JSON pointer into `body` → source (see the module doc).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub slots: BTreeMap<String, String>,
}

fn default_method() -> String {
    "POST".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyKind {
    /// `body` is sent as JSON.
    #[default]
    Json,
    /// `body` is an object of string fields sent as `application/x-www-form-urlencoded`.
    Form,
    /// `body` is a string sent as is.
    Text,
    /// `multipart/form-data`: `body` is the list of fields in order, each
    /// `{"name", "value"}` (a templated string) or `{"name", "file": true}` (the file being
    /// uploaded, with its name and type).
    Multipart,
    /// The body is the bytes of the file being uploaded (`body` is unused).
    File,
}

/// How a site takes one file, and how the chat call then names it.
///
/// `steps` run once per file, after the flow's preflights and before the chat call, in a
/// context with the `file.*` sources (`file.name`, `file.type`, `file.size`, `file.sha256`,
/// `file.base64`, `file.data_url`) and every preflight value; their extracts (the file's id)
/// render `item`, one element per file, which is put at `attach` in the chat call's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub steps: Vec<Step>,
    /// JSON pointer into the chat call's body: a list, one `item` per file; or, with
    /// `single`, the value of the only file.
    pub attach: String,
    pub item: Value,
    /// JSON pointer into `item` → source, as `HttpTemplate::slots`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub item_slots: BTreeMap<String, String>,
    /// The chat call names one file by a plain value, not a list: more files are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single: bool,
    /// The types the site's file input accepts (its `accept` attribute: `image/*,.txt`);
    /// empty: any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub accept: String,
}

/// A preflight call and what to keep from its response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    #[serde(flatten)]
    pub http: HttpTemplate,
    /// Name → where its value is in the response; later steps use `{{preflight.NAME}}`.
    #[serde(default)]
    pub extract: BTreeMap<String, Extract>,
}

/// A later turn of a site conversation, as the site's own page sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUp {
    /// Calls a later turn makes before its chat call, in order (a first turn's
    /// create-conversation call is usually not among them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preflight: Vec<Step>,
    /// The later turn's chat call; its reply is read with the flow's `response`.
    pub request: HttpTemplate,
    /// The later turn resends the whole history (the `messages` source gets every message),
    /// not only the new turn.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resends_history: bool,
}

impl FollowUp {
    /// The values of the previous exchange a later turn renders with: all of them but those
    /// its own preflights extract (those steps run, or reuse their session-wide values, rather
    /// than being skipped as already known).
    pub fn carried(&self, values: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let own: Vec<&String> = self
            .preflight
            .iter()
            .flat_map(|s| s.extract.keys())
            .collect();
        values
            .iter()
            .filter(|(name, _)| !own.contains(name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The names of the previous exchange's values it sends (`conversation.NAME`).
    pub fn uses(&self) -> Vec<String> {
        let mut text = serde_json::to_string(&self.request).unwrap_or_default();
        for step in &self.preflight {
            text.push_str(&serde_json::to_string(&step.http).unwrap_or_default());
        }
        let mut names = Vec::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("conversation.") {
            rest = &rest[at + "conversation.".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// The key, in the values remembered of a site conversation, of how many turns it has had.
/// (`#` cannot start a preflight or id name.)
pub const TURNS: &str = "#turns";

/// Where a preflight value sits in a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Extract {
    /// A JSON pointer into the JSON response body.
    Pointer(String),
    /// The first capture group of a regex over the body text (a `<meta>` CSRF token, say).
    Regex { regex: String },
    /// A response header.
    Header { header: String },
}

/// How the reply text travels back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseSpec {
    pub transport: Transport,
    pub text: TextRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<ReasoningRule>,
    /// Any one of these ends the reply (besides the end of the body).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<Signal>,
    /// In-band errors (sites often send them with status 200).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error: Vec<ErrorRule>,
    /// Name → JSON pointer of ids worth keeping (conversation id, message id).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ids: BTreeMap<String, String>,
}

/// Framing of the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// `text/event-stream`: `data:` lines, optional `event:` names.
    Sse,
    /// One JSON document per line.
    Ndjson,
    /// `TAG:JSON` per line (`0:"tok"`, `15:{…}`); the tag is the event name.
    NumberedLines,
    /// Binary frames: 1 flag byte, 4-byte big-endian length, JSON payload (Connect-RPC style).
    /// The flag byte, in decimal, is the event name; flag 2 marks the end-of-stream frame.
    LengthPrefixed,
    /// One JSON document, not streamed.
    Json,
    /// The body is the reply text itself.
    Text,
    /// WebSocket frames, one JSON message each. The chat request's `url` is the socket's
    /// (`ws(s)://…`, or relative: the account URL's scheme is mapped to `ws`/`wss`), and its
    /// `body` is a JSON array of the messages to send after connecting, in order (an object is
    /// sent as JSON text, a string as is); slots point into that array (`/1/prompt`).
    Websocket,
}

/// Where the reply text is in each event and how it accrues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextRule {
    /// JSON pointer into each event (`""` = the event itself is a JSON string). In
    /// `append_patch` mode, the patch path (`/message/content/parts/0`,
    /// `response/fragments/-1/content`) that carries the text.
    #[serde(default)]
    pub path: String,
    pub mode: Accrual,
    /// Only events with this name (SSE `event:`, numbered-line tag, frame flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accrual {
    /// Each event carries the next piece.
    Delta,
    /// Each event carries the whole text so far; a value that is not an extension of the
    /// previous one starts a new segment.
    Cumulative,
    /// `{"p": path, "o": op, "v": value}` operations; `{"v": …}` continues the last path and
    /// op; batches (`"o": "patch"`/`"batch"` with a list `v`) are applied in order.
    AppendPatch,
}

/// How reasoning ("thinking") is told apart from the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningRule {
    /// A separate field carries it, accruing like the text.
    Field {
        path: String,
        mode: Accrual,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
    },
    /// Text from events whose value at `path` equals `equals` is reasoning. With `sticky`, an
    /// event without the field keeps the last seen state (a phase announced once).
    Flag {
        path: String,
        equals: Value,
        #[serde(default)]
        sticky: bool,
    },
    /// Reasoning is marked up inside the text: `<think>…</think>`, or Open WebUI's
    /// `<details type="reasoning" done="…">` (an `open` without `>` runs on to the next `>`,
    /// attributes included).
    Markup {
        open: String,
        close: String,
        /// A `<summary>…</summary>` inside the reasoning is its heading, not its text.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        summary: bool,
        /// Every line of the reasoning is quoted (`> `); the quote marks are not text.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quoted: bool,
        /// Tags around the answer (`<answer>…</answer>`), not part of it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<Tags>,
    },
}

/// An opening and a closing tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    pub open: String,
    pub close: String,
}

/// A condition on one event.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Signal {
    /// The event name must be this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The raw event data must be this (`[DONE]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The value at this pointer must exist (and equal `equals` when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
}

/// An in-band error: when the event matches, the reply failed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ErrorRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Pointer to the error message; the rule matches when a non-null value is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only when the value at `path` equals this (a status field turning `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
    /// Pointer to the message when `path` is a status field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Selectors for typing into the site's own page.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UiHints {
    #[serde(default)]
    pub page: Option<String>,
    #[serde(default)]
    pub input: Option<String>,
    #[serde(default)]
    pub submit: Option<String>,
    #[serde(default)]
    pub output: Option<String>,
}

/// Whether the flow may be replayed directly (tier 1).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReplayPolicy {
    /// Direct replay is known not to work (anti-replay material such as a signature).
    #[serde(default)]
    pub needs_browser: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The lowest browser tier worth trying: 3 when the page computes values per request
    /// (an in-page `fetch()` of the learned template would lack them), else 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tier: Option<u8>,
}

impl ReplayPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FlowStats {
    #[serde(default)]
    pub tested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<u64>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tested_at: Option<i64>,
}

impl Flow {
    /// Parses a flow file, naming the field at fault on error.
    pub fn from_json(text: &str) -> Result<Self, FlowError> {
        let flow: Flow = serde_json::from_str(text).map_err(|e| FlowError::Parse(e.to_string()))?;
        flow.validate()?;
        Ok(flow)
    }

    /// Checks what serde cannot, field by field, naming the field at fault: names fit for a
    /// model id, HTTP methods and header names that are tokens, no control characters where
    /// they would split a request, pointers and sources that resolve, regexes that compile,
    /// and sizes a shared file has no business exceeding.
    pub fn validate(&self) -> Result<(), FlowError> {
        let invalid = |message: String| Err(FlowError::Invalid(message));
        check_name("service", &self.service, MAX_NAME)?;
        check_name("name", &self.name, MAX_NAME)?;
        if !self.id.is_empty() {
            check_name("id", &self.id, MAX_NAME)?;
        }
        if let Some(origin) = &self.origin {
            check_text("origin", origin, MAX_URL)?;
        }
        // The first turn's calls, then a later turn's (`follow_up`).
        let mut turns = vec![("", &self.preflight, &self.request)];
        if let Some(follow_up) = &self.follow_up {
            turns.push(("follow_up.", &follow_up.preflight, &follow_up.request));
        }
        for (at, preflight, request) in turns {
            if preflight.len() > MAX_STEPS {
                return invalid(format!(
                    "`{at}preflight` has {} steps; at most {MAX_STEPS} are allowed",
                    preflight.len()
                ));
            }
            let templates = preflight
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{at}preflight[{i}]"), &s.http))
                .chain(std::iter::once((format!("{at}request"), request)));
            for (field, http) in templates {
                check_template(&field, http)?;
            }
            for (i, step) in preflight.iter().enumerate() {
                for (name, rule) in &step.extract {
                    let field = format!("{at}preflight[{i}].extract.{name}");
                    if name.is_empty()
                        || name.len() > MAX_NAME
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return invalid(format!(
                            "`{at}preflight[{i}].extract` has a bad name `{}`: use letters, \
                             digits and `_`",
                            shorten(name)
                        ));
                    }
                    match rule {
                        Extract::Pointer(p) => check_pointer(&field, p)?,
                        Extract::Regex { regex } => {
                            check_text(&field, regex, MAX_TEXT)?;
                            regex::Regex::new(regex).map_err(|e| {
                                FlowError::Invalid(format!("`{field}` is not a valid regex: {e}"))
                            })?;
                        }
                        Extract::Header { header } => check_header_name(&field, header)?,
                    }
                }
            }
        }
        let response = &self.response;
        check_pointer("response.text.path", &response.text.path)?;
        for (name, pointer) in &response.ids {
            check_name("response.ids", name, MAX_NAME)?;
            check_pointer(&format!("response.ids.{name}"), pointer)?;
        }
        if response.transport == Transport::Websocket
            && !self.request.body.as_ref().is_none_or(Value::is_array)
        {
            return invalid(
                "`request.body` of a websocket flow must be the list of messages to send".into(),
            );
        }
        if let Some(ui) = &self.ui {
            for (field, value) in [
                ("ui.page", &ui.page),
                ("ui.input", &ui.input),
                ("ui.submit", &ui.submit),
                ("ui.output", &ui.output),
            ] {
                if let Some(value) = value {
                    check_text(field, value, MAX_TEXT)?;
                }
            }
        }
        if let Some(upload) = &self.upload {
            check_upload(upload)?;
        }
        if self.replay.min_tier.is_some_and(|t| !(1..=3).contains(&t)) {
            return invalid("`replay.min_tier` must be 1, 2 or 3".into());
        }
        Ok(())
    }

    /// Every call template: the first turn's chat call and preflights, the follow-up's, then
    /// the upload's.
    pub fn templates(&self) -> impl Iterator<Item = &HttpTemplate> {
        let follow_up = self
            .follow_up
            .iter()
            .flat_map(|f| std::iter::once(&f.request).chain(f.preflight.iter().map(|s| &s.http)));
        let upload = self
            .upload
            .iter()
            .flat_map(|u| u.steps.iter().map(|s| &s.http));
        std::iter::once(&self.request)
            .chain(self.preflight.iter().map(|s| &s.http))
            .chain(follow_up)
            .chain(upload)
    }

    pub fn templates_mut(&mut self) -> impl Iterator<Item = &mut HttpTemplate> {
        let follow_up = self.follow_up.iter_mut().flat_map(|f| {
            std::iter::once(&mut f.request).chain(f.preflight.iter_mut().map(|s| &mut s.http))
        });
        let upload = self
            .upload
            .iter_mut()
            .flat_map(|u| u.steps.iter_mut().map(|s| &mut s.http));
        std::iter::once(&mut self.request)
            .chain(self.preflight.iter_mut().map(|s| &mut s.http))
            .chain(follow_up)
            .chain(upload)
    }

    /// The flow a later turn of a site conversation runs: the follow-up's calls, read with
    /// this flow's decoder. Its id differs, so values reused per flow and step are not
    /// mixed up with the first turn's.
    pub fn follow_up_flow(&self) -> Option<Flow> {
        let follow_up = self.follow_up.as_ref()?;
        Some(Flow {
            id: format!("{}+follow_up", self.id),
            preflight: follow_up.preflight.clone(),
            request: follow_up.request.clone(),
            follow_up: None,
            ..self.clone()
        })
    }

    /// The flow with any literal credential in a header masked. Learned flows hold only
    /// references; a hand-written one might not, and listings must never show it.
    pub fn redacted(&self) -> Flow {
        let mut flow = self.clone();
        for http in flow.templates_mut() {
            for (name, value) in http.headers.iter_mut() {
                if is_sensitive_header(name) && has_literal_secret(value) {
                    *value = REDACTED.to_owned();
                }
            }
        }
        flow
    }

    /// Names of headers that hold a literal credential instead of a reference.
    pub fn literal_secrets(&self) -> Vec<String> {
        self.templates()
            .flat_map(|http| http.headers.iter())
            .filter(|(name, value)| is_sensitive_header(name) && has_literal_secret(value))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Assigns a fresh id when the flow has none.
    pub fn ensure_id(&mut self) {
        if self.id.is_empty() {
            self.id = format!("f_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        }
    }
}

pub const REDACTED: &str = "<redacted>";

/// Limits on what a flow file may hold: generous for any real site, small enough that a
/// hostile file cannot bloat the store or a request.
const MAX_NAME: usize = 128;
const MAX_URL: usize = 8 * 1024;
const MAX_TEXT: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
const MAX_STEPS: usize = 16;

/// Long values are cut in messages, so an error never echoes a 100 KB field.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A service, flow name or id: what clients send as a model id.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), FlowError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || "-_.:/@".contains(c);
    if value.trim().is_empty() {
        return Err(FlowError::Invalid(format!("`{field}` is empty")));
    }
    if value.len() > max || !value.chars().all(fine) {
        return Err(FlowError::Invalid(format!(
            "`{field}` must be at most {max} letters, digits or `-_.:/@`; got `{}`",
            shorten(value)
        )));
    }
    Ok(())
}

/// Free text that must not split a request or a log line.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), FlowError> {
    if value.len() > max {
        return Err(FlowError::Invalid(format!(
            "`{field}` is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(FlowError::Invalid(format!(
            "`{field}` holds a control character (a line break, say)"
        )));
    }
    Ok(())
}

/// RFC 9110 `tchar`: what methods and header names are made of.
fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_header_name(field: &str, name: &str) -> Result<(), FlowError> {
    if name.len() > MAX_NAME || !is_token(name) {
        return Err(FlowError::Invalid(format!(
            "`{field}`: `{}` is not an HTTP header name",
            shorten(name)
        )));
    }
    Ok(())
}

fn check_pointer(field: &str, pointer: &str) -> Result<(), FlowError> {
    check_text(field, pointer, MAX_TEXT)
}

fn check_upload(upload: &Upload) -> Result<(), FlowError> {
    let invalid = |message: String| Err(FlowError::Invalid(message));
    if upload.steps.is_empty() || upload.steps.len() > MAX_STEPS {
        return invalid(format!(
            "`upload.steps` has {} steps; 1 to {MAX_STEPS} are allowed",
            upload.steps.len()
        ));
    }
    let mut sends_file = false;
    for (i, step) in upload.steps.iter().enumerate() {
        let field = format!("upload.steps[{i}]");
        check_template(&field, &step.http)?;
        sends_file |= match step.http.body_kind {
            BodyKind::File => true,
            BodyKind::Multipart => step
                .http
                .body
                .as_ref()
                .and_then(Value::as_array)
                .is_some_and(|fields| {
                    fields
                        .iter()
                        .any(|f| f.get("file").is_some_and(|v| v != &Value::Bool(false)))
                }),
            _ => serde_json::to_string(&step.http)
                .is_ok_and(|t| t.contains("file.base64") || t.contains("file.data_url")),
        };
        for (name, rule) in &step.extract {
            if let Extract::Pointer(p) = rule {
                check_pointer(&format!("{field}.extract.{name}"), p)?;
            }
        }
    }
    if !sends_file {
        return invalid("no step of `upload.steps` sends the file's bytes".into());
    }
    if !upload.attach.starts_with('/') {
        return invalid("`upload.attach` must point into the chat call's body (`/files`)".into());
    }
    check_pointer("upload.attach", &upload.attach)?;
    check_text("upload.accept", &upload.accept, MAX_TEXT)?;
    for (pointer, source) in &upload.item_slots {
        check_pointer("upload.item_slots", pointer)?;
        if !is_known_source(source) {
            return invalid(format!(
                "`upload.item_slots.{pointer}` has unknown source `{}`",
                shorten(source)
            ));
        }
    }
    Ok(())
}

fn check_template(field: &str, http: &HttpTemplate) -> Result<(), FlowError> {
    let invalid = |message: String| Err(FlowError::Invalid(message));
    if http.method.len() > 16 || !is_token(&http.method) {
        return invalid(format!(
            "`{field}.method` `{}` is not an HTTP method",
            shorten(&http.method)
        ));
    }
    if http.url.trim().is_empty() {
        return invalid(format!("`{field}.url` is empty"));
    }
    check_text(&format!("{field}.url"), &http.url, MAX_URL)?;
    if http.headers.len() > MAX_HEADERS {
        return invalid(format!(
            "`{field}.headers` has {} entries; at most {MAX_HEADERS} are allowed",
            http.headers.len()
        ));
    }
    for (name, value) in &http.headers {
        check_header_name(&format!("{field}.headers"), name)?;
        check_text(&format!("{field}.headers.{name}"), value, MAX_TEXT)?;
    }
    for (pointer, source) in &http.slots {
        if !pointer.is_empty() && !pointer.starts_with('/') {
            return invalid(format!(
                "`{field}.slots`: `{}` is not a JSON pointer (it must start with `/`)",
                shorten(pointer)
            ));
        }
        check_pointer(&format!("{field}.slots"), pointer)?;
        if !is_known_source(source) {
            return invalid(format!(
                "`{field}.slots.{pointer}` has unknown source `{}`",
                shorten(source)
            ));
        }
    }
    Ok(())
}

/// Whether a header name suggests it carries a credential.
pub fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "token",
        "csrf",
        "xsrf",
        "secret",
        "api-key",
        "apikey",
        "session",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// Whether a header value holds more than `{{references}}` and an auth scheme word.
fn has_literal_secret(value: &str) -> bool {
    let mut rest = value;
    let mut literal = String::new();
    while let Some(start) = rest.find("{{") {
        literal.push_str(&rest[..start]);
        match rest[start..].find("}}") {
            Some(end) => rest = &rest[start + end + 2..],
            None => {
                rest = "";
                literal.push('x');
            }
        }
    }
    literal.push_str(rest);
    literal.split_whitespace().any(|word| {
        !matches!(
            word.to_ascii_lowercase().as_str(),
            "bearer" | "basic" | "token"
        )
    })
}

/// The sources of an upload step or item: the file being uploaded.
pub const FILE_SOURCES: &[&str] = &[
    "file.name",
    "file.type",
    "file.size",
    "file.sha256",
    "file.base64",
    "file.data_url",
];

/// Whether `source` names something the renderer can produce.
pub fn is_known_source(source: &str) -> bool {
    let base = source.split('#').next().unwrap_or(source);
    matches!(
        base,
        "prompt" | "last_user" | "messages" | "model" | "uuid" | "now_ms" | "now_s"
    ) || base == "session.user_agent"
        || FILE_SOURCES.contains(&base)
        || turn_counter(base).is_some()
        || [
            "preflight.",
            "session.cookie.",
            "session.local.",
            "session.session.",
            "conversation.",
        ]
        .iter()
        .any(|prefix| {
            base.strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty())
        })
}

/// `turn`, `turn*K`, `turn+N`, `turn*K-N`…: the counter's (K, N), so that its value at turn
/// `t` (1-based) is `K * t + N`.
pub fn turn_counter(source: &str) -> Option<(i64, i64)> {
    let rest = source.strip_prefix("turn")?;
    let (scale, rest) = match rest.strip_prefix('*') {
        Some(after) => {
            let digits = after.chars().take_while(char::is_ascii_digit).count();
            (after[..digits].parse().ok()?, &after[digits..])
        }
        None => (1, rest),
    };
    let offset = match rest.chars().next() {
        None => 0,
        Some('+') => rest[1..].parse().ok()?,
        Some('-') => -rest[1..].parse::<i64>().ok()?,
        Some(_) => return None,
    };
    Some((scale, offset))
}

/// The source for a counter that is `first` at turn 1 and `second` at turn 2.
pub fn turn_source(first: i64, second: i64) -> Option<String> {
    let scale = second - first;
    if !(1..=2).contains(&scale) {
        return None;
    }
    let offset = first - scale;
    let mut source = "turn".to_owned();
    if scale != 1 {
        source.push_str(&format!("*{scale}"));
    }
    match offset {
        0 => {}
        n if n > 0 => source.push_str(&format!("+{n}")),
        n => source.push_str(&format!("{n}")),
    }
    Some(source)
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("flow file is not valid: {0}")]
    Parse(String),
    #[error("flow is not usable: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_flow_parses_with_defaults() {
        let flow = Flow::from_json(
            r#"{"service":"demo","request":{"url":"/api/chat","body":{"q":""},"slots":{"/q":"prompt"}},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        assert_eq!(flow.request.method, "POST");
        assert_eq!(flow.request.body_kind, BodyKind::Json);
        assert_eq!(flow.version, 1);
        assert!(!flow.replay.needs_browser);
    }

    #[test]
    fn unknown_slot_source_is_rejected_by_name() {
        let err = Flow::from_json(
            r#"{"service":"demo","request":{"url":"/x","slots":{"/q":"promt"}},
                "response":{"transport":"json","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("promt"), "{err}");
    }

    /// Every field of an imported flow is checked, and the message names the field.
    #[test]
    fn hostile_fields_are_refused_by_name() {
        let base: Value = serde_json::from_str(
            r#"{"service":"demo","name":"chat","request":{"method":"POST","url":"/x","headers":{"accept":"*/*"}},
                "preflight":[{"method":"GET","url":"/p","extract":{"id":"/data/id"}}],
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        Flow::from_json(&base.to_string()).unwrap();
        let long = "n".repeat(100_000);
        let cases: Vec<(&str, Value, &str)> = vec![
            ("/request/method", "GET\r\nX: y".into(), "request.method"),
            ("/service", "".into(), "service"),
            ("/service", "a b".into(), "service"),
            ("/name", long.clone().into(), "name"),
            ("/request/url", "/x\r\nHost: evil".into(), "request.url"),
            (
                "/request/headers",
                serde_json::json!({"x y": "1"}),
                "request.headers",
            ),
            (
                "/request/headers",
                serde_json::json!({"x": "a\r\nb: c"}),
                "request.headers.x",
            ),
            (
                "/preflight/0/extract",
                serde_json::json!({"id": {"regex": "("}}),
                "preflight[0].extract.id",
            ),
            (
                "/preflight/0/extract",
                serde_json::json!({"a-b": "/x"}),
                "preflight[0].extract",
            ),
            ("/preflight/0/method", "".into(), "preflight[0].method"),
        ];
        for (pointer, value, field) in cases {
            let mut flow = base.clone();
            *flow.pointer_mut(pointer).unwrap() = value;
            let err = Flow::from_json(&flow.to_string()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}")), "{pointer}: {err}");
            assert!(err.len() < 400, "the message echoes the value: {err}");
        }
    }

    #[test]
    fn literal_credentials_are_masked_references_kept() {
        let flow = Flow::from_json(
            r#"{"service":"demo","request":{"url":"/x","headers":{
                "authorization":"Bearer sk-live-123","x-csrf-token":"{{preflight.csrf}}",
                "x-auth":"Bearer {{session.local.token}}","accept":"text/event-stream"}},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        assert_eq!(flow.literal_secrets(), vec!["authorization".to_owned()]);
        let shown = flow.redacted();
        assert_eq!(shown.request.headers["authorization"], REDACTED);
        assert_eq!(shown.request.headers["x-csrf-token"], "{{preflight.csrf}}");
        assert_eq!(
            shown.request.headers["x-auth"],
            "Bearer {{session.local.token}}"
        );
        assert_eq!(shown.request.headers["accept"], "text/event-stream");
    }

    #[test]
    fn turn_counters_read_and_written() {
        assert_eq!(turn_counter("turn"), Some((1, 0)));
        assert_eq!(turn_counter("turn-1"), Some((1, -1)));
        assert_eq!(turn_counter("turn*2-2"), Some((2, -2)));
        assert_eq!(turn_counter("turn*2+1"), Some((2, 1)));
        assert_eq!(turn_counter("turns"), None);
        assert_eq!(turn_counter("turn*x"), None);
        for (first, second, source) in [(1, 2, "turn"), (0, 1, "turn-1"), (0, 2, "turn*2-2")] {
            let found = turn_source(first, second).unwrap();
            assert_eq!(found, source);
            let (k, n) = turn_counter(&found).unwrap();
            assert_eq!((k + n, 2 * k + n), (first, second));
        }
        assert_eq!(turn_source(3, 3), None);
        assert!(is_known_source("turn-1") && !is_known_source("turnover"));
    }

    #[test]
    fn a_follow_up_runs_as_its_own_flow_with_the_same_decoder() {
        let flow = Flow::from_json(
            r#"{"id":"f_1","service":"demo","preflight":[{"url":"/new","extract":{"c":"/id"}}],
                "request":{"url":"/chat","body":{"q":""},"slots":{"/q":"prompt"}},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}},
                "follow_up":{"request":{"url":"/chat/{{conversation.c}}","body":{"q":"","n":0},
                    "slots":{"/q":"prompt","/n":"turn-1"}}}}"#,
        )
        .unwrap();
        let next = flow.follow_up_flow().unwrap();
        assert_ne!(next.id, flow.id);
        assert!(next.preflight.is_empty() && next.follow_up.is_none());
        assert_eq!(next.request.url, "/chat/{{conversation.c}}");
        assert_eq!(next.response, flow.response);
        let bad = r#"{"service":"demo","request":{"url":"/x"},
            "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}},
            "follow_up":{"request":{"url":"/y","slots":{"/q":"promt"}}}}"#;
        assert!(
            Flow::from_json(bad)
                .unwrap_err()
                .to_string()
                .contains("promt")
        );
    }

    #[test]
    fn reasoning_rules_round_trip() {
        for rule in [
            r#"{"field":{"path":"/r","mode":"delta"}}"#,
            r#"{"flag":{"path":"/phase","equals":"think","sticky":true}}"#,
            r#"{"markup":{"open":"<think>","close":"</think>"}}"#,
            r#"{"markup":{"open":"<details type=\"reasoning\"","close":"</details>","summary":true,"quoted":true,"answer":{"open":"<answer>","close":"</answer>"}}}"#,
        ] {
            let parsed: ReasoningRule = serde_json::from_str(rule).unwrap();
            let again: ReasoningRule =
                serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
            assert_eq!(parsed, again);
        }
    }
}
