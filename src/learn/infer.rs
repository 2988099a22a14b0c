//! Inference: one [`Recording`] of a probe → a replayable [`Flow`].
//!
//! Invariant: nothing here knows a site. Every decision comes from the recording:
//! - **The chat call** is the exchange whose request (URL, body, or a sent WebSocket frame)
//!   carries the probe's marker and whose response yields the rendered reply (checked with
//!   `decoder`). When the marker travels in one call and the reply comes back from a later
//!   one, the later one is the chat call and the carrier becomes a preflight (with the
//!   `prompt` slot). A page load carrying the marker (a form submitted natively) is never it.
//! - **Later turns** are `follow_up`'s job: a second probe in the same conversation, templated
//!   with the first exchange's values as one more source.
//! - **Templates.** In the chat call and every preflight, each value is explained, in order:
//!   the probe (→ the `prompt` slot, or `messages` for an OpenAI-like `{role, content}` list);
//!   a value that first appeared in an earlier response (→ `{{preflight.NAME}}`, that
//!   exchange a preflight step, recursively); a cookie (`{{session.cookie.NAME}}`); a
//!   `<meta>` of the chat page (→ a `GET` of the page with a regex extract); a storage entry
//!   (`{{session.local.KEY}}`, `#/pointer` inside JSON entries); a UUID (`uuid`); the current
//!   time in ms or s (`now_ms` / `now_s`). What stays unexplained but looks like a token or a
//!   signature is reported as suspicious.
//! - **Headers**: browser-managed and hop-by-hop ones are dropped (cookies come from the
//!   session's jar, the user agent from the session), the others kept, templated like values.
//! - **URLs** are relative when same-origin with the chat page, with ids in the path or query
//!   templated.
//! - **The response** is `decoder`'s job.

mod follow_up;
pub(crate) mod provenance;
#[cfg(test)]
mod tests;
mod upload;
pub(crate) mod values;

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use url::Url;

use self::provenance::{Origin, Sources, meta_regex};
use self::values::{
    TimeUnit, describe_secretly, is_high_entropy, is_id_like, is_uuid, numeric_string, snake_case,
    timestamp_unit,
};
use crate::flow::{BodyKind, Extract, Flow, FlowStats, HttpTemplate, ReplayPolicy, Step, UiHints};
use crate::learn::decoder::{self, Hints, describe_call, frame_text};
use crate::recording::{Exchange, Recording};

/// What inference produced.
#[derive(Debug, Clone)]
pub struct Learned {
    pub flow: Flow,
    /// Human-readable: what was inferred and why.
    pub notes: Vec<String>,
    /// Per-request values that could not be explained (possible signatures, proof-of-work,
    /// one-time tokens). Values themselves are never quoted.
    pub suspicious: Vec<String>,
    /// The chat call's index in the recording's exchanges.
    pub(crate) chat_index: usize,
    /// (extract name, the value it had in the recording) of every preflight value.
    pub(crate) observed: Vec<(String, String)>,
    /// Exchange index → the names the flow extracts from it (its preflight steps).
    pub(crate) uses: BTreeMap<usize, Vec<String>>,
}

/// Why no flow could be inferred. Messages are for the user and never quote cookie values or
/// tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    #[error("the recording captured no network request around the probe")]
    Empty,
    #[error("the recording has no probe marker")]
    NoMarker,
    #[error(
        "no request carried the probe marker: the site may send messages over a channel the \
         recorder cannot see (a WebSocket opened before recording, a service worker, a \
         non-HTTP transport)"
    )]
    MarkerNotSent,
    #[error("the request carrying the probe ({call}) was found, but {reason}")]
    NoReply { call: String, reason: String },
    #[error("the chat page URL is not a valid URL")]
    BadPageUrl,
    #[error("the inferred flow is not valid: {0}")]
    Invalid(String),
    /// The probe attached a file and no upload can be learned from it: probe without one.
    #[error("no upload could be learned from the attached file: {0}")]
    Upload(String),
}

/// Infers the flow of `service` from one recorded probe.
pub fn infer(recording: &Recording, service: &str) -> Result<Learned, InferError> {
    if recording.exchanges.is_empty() {
        return Err(InferError::Empty);
    }
    if recording.marker.trim().is_empty() {
        return Err(InferError::NoMarker);
    }
    let page = Url::parse(&recording.page_url).map_err(|_| InferError::BadPageUrl)?;
    let learner = Learner::new(recording, page.clone());
    let chat = learner.find_chat_call()?;
    let mut learned = learner.build(chat, service)?;
    if let Some(second) = recording.follow_up.as_deref() {
        follow_up::learn(recording, second, page, &mut learned);
    }
    Ok(learned)
}

/// Why each recorded call was or was not taken, one line per call, in the recording's order
/// (`computetower learn --explain`). Never quotes bodies or header values.
pub fn explain(recording: &Recording) -> Vec<String> {
    let learned = infer(recording, "explain").ok();
    let reply = recording.rendered_reply.as_str();
    let reasoning = recording.rendered_reasoning.as_deref();
    let marker = recording.marker.as_str();
    let first_carrier = recording
        .exchanges
        .iter()
        .position(|e| !follow_up::is_navigation(e) && exchange_carries(e, marker));
    let mut out = Vec::new();
    for (i, exchange) in recording.exchanges.iter().enumerate() {
        let call = format!("{:>3}. {}", i + 1, describe_call(exchange));
        let carries = exchange_carries(exchange, marker);
        let kind = exchange.resource_type.to_ascii_lowercase();
        let verdict = if learned.as_ref().is_some_and(|l| l.chat_index == i) {
            "taken: the chat call, its response reads as the reply".to_owned()
        } else if let Some(names) = learned.as_ref().and_then(|l| l.uses.get(&i)) {
            format!(
                "taken: a preflight{}, the flow reads {} from it",
                if carries { " carrying the probe" } else { "" },
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if follow_up::is_navigation(exchange) {
            if carries {
                "not taken: a page load carrying the probe (the page's form was submitted \
                 natively), never a chat call"
                    .to_owned()
            } else {
                "not taken: a page load".to_owned()
            }
        } else if matches!(
            kind.as_str(),
            "script" | "stylesheet" | "image" | "font" | "media" | "manifest"
        ) {
            "not taken: a static resource".to_owned()
        } else if first_carrier.is_none_or(|f| i < f) && !carries {
            if learned.is_some() {
                "not taken: nothing the chat call sends came from it".to_owned()
            } else {
                "not taken: made before the call carrying the probe (no chat call was found to \
                 need it)"
                    .to_owned()
            }
        } else if decoder::input_of(exchange).is_none() {
            "not taken: no response to read a reply from".to_owned()
        } else {
            match decoder::infer_response_with(exchange, reply, reasoning, &Hints::default()) {
                Ok(_) => {
                    "not taken: its response reads as the reply too, but another call was chosen"
                        .to_owned()
                }
                Err(e) => format!(
                    "not taken{}: {}",
                    if carries {
                        " (it carries the probe)"
                    } else {
                        ""
                    },
                    lowercase_first(&e.to_string())
                ),
            }
        };
        out.push(format!("{call}: {verdict}"));
    }
    out
}

/// Whether the exchange's URL, body or sent frames carry `marker`.
fn exchange_carries(exchange: &Exchange, marker: &str) -> bool {
    let url = percent_encoding::percent_decode_str(&exchange.url.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned();
    url.contains(marker)
        || exchange
            .request_body
            .as_ref()
            .is_some_and(|b| String::from_utf8_lossy(&b.0).contains(marker))
        || exchange
            .frames
            .iter()
            .filter(|f| f.sent)
            .filter_map(frame_text)
            .any(|t| t.contains(marker))
}

/// Where a preflight step comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum StepKey {
    /// A `GET` of the chat page for its `<meta>` tags (its load was not recorded).
    Page,
    Exchange(usize),
}

#[derive(Debug, Default)]
struct StepPlan {
    extract: BTreeMap<String, Extract>,
}

/// How one value of a request is to be sent.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// As captured.
    Keep,
    /// The whole value is the probe.
    Prompt,
    /// The probe inside other text.
    PromptInside { template: String },
    /// From a source (`preflight.x`, `session.cookie.y`, `uuid`, `now_ms`, …).
    Source(String),
}

/// Where a value sits, for naming and notes.
#[derive(Debug, Clone)]
struct Spot {
    /// `body /a/b`, `query q`, `header x-token`, `path segment 3`.
    label: String,
    /// A name the site gives the value (JSON key, query name, header name).
    key: Option<String>,
}

struct Chosen {
    index: usize,
    /// Exchanges that carried the probe before the chat call (they become preflights).
    carriers: Vec<usize>,
}

struct Learner<'r> {
    recording: &'r Recording,
    page: Url,
    sources: Sources<'r>,
    /// Unix ms at recording time 0, from the responses' `Date` headers.
    clock_ms: Option<f64>,
    steps: BTreeMap<StepKey, StepPlan>,
    /// Extract name → (step, extract), for unique names.
    names: BTreeMap<String, (StepKey, Extract)>,
    /// Exchanges whose templates are still to be built.
    pending: Vec<usize>,
    /// Values the chat call takes from preflights (conversation ids, for the decoder).
    preflight_values: Vec<String>,
    /// Whether the exchange being templated is the chat call.
    templating_chat: bool,
    /// Fresh UUIDs of the request being templated, with where they were first seen.
    fresh_uuids: Vec<(String, String)>,
    notes: Vec<String>,
    suspicious: Vec<String>,
    /// (extract name, value) of every preflight value planned.
    observed: Vec<(String, String)>,
    /// Templating a later turn: what the first turn left to reuse, and what was found.
    follow_up: Option<follow_up::Context>,
    /// The file the probe chose in the page's file input (see `upload`).
    attached: Option<&'r crate::recording::AttachedFile>,
    /// The preflights' keys, in the order `template_calls` returned them.
    step_keys: Vec<StepKey>,
}

impl<'r> Learner<'r> {
    fn new(recording: &'r Recording, page: Url) -> Self {
        Self {
            recording,
            page,
            sources: Sources::new(recording),
            clock_ms: clock(recording),
            steps: BTreeMap::new(),
            names: BTreeMap::new(),
            pending: Vec::new(),
            preflight_values: Vec::new(),
            templating_chat: false,
            fresh_uuids: Vec::new(),
            notes: Vec::new(),
            suspicious: Vec::new(),
            observed: Vec::new(),
            follow_up: None,
            attached: recording.attached.as_ref(),
            step_keys: Vec::new(),
        }
    }

    fn exchanges(&self) -> &'r [Exchange] {
        &self.recording.exchanges
    }

    fn carries_marker(&self, exchange: &Exchange) -> bool {
        exchange_carries(exchange, &self.recording.marker)
    }

    fn default_hints(&self, exchange: &Exchange) -> Hints {
        let mut hints = Hints::from_request(exchange, Some(&self.recording.marker));
        hints.echo.push(self.recording.probe.clone());
        hints.echo.retain(|e| !e.trim().is_empty());
        hints
    }

    /// The chat call: a marker carrier whose response yields the reply; else a later
    /// exchange whose response does (the marker then travelled in a preflight).
    fn find_chat_call(&self) -> Result<Chosen, InferError> {
        // A navigation carrying the probe is the page's form submitted natively (the page
        // reloaded): never the chat call.
        let carriers: Vec<usize> = self
            .exchanges()
            .iter()
            .enumerate()
            .filter(|(_, e)| !follow_up::is_navigation(e) && self.carries_marker(e))
            .map(|(i, _)| i)
            .collect();
        let Some(&first) = carriers.first() else {
            return Err(InferError::MarkerNotSent);
        };
        let reasoning = self.recording.rendered_reasoning.as_deref();
        let reply = self.recording.rendered_reply.as_str();
        let mut first_error: Option<(usize, String)> = None;
        let with_response: Vec<usize> = carriers
            .iter()
            .copied()
            .filter(|i| decoder::input_of(&self.exchanges()[*i]).is_some())
            .collect();
        // The last carrier with a response first: a page that retries sends the probe twice.
        for &i in with_response.iter().rev() {
            let exchange = &self.exchanges()[i];
            match decoder::infer_response_with(
                exchange,
                reply,
                reasoning,
                &self.default_hints(exchange),
            ) {
                Ok(_) => {
                    return Ok(Chosen {
                        index: i,
                        carriers: carriers.iter().copied().filter(|c| *c < i).collect(),
                    });
                }
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some((i, e.to_string()));
                    }
                }
            }
        }
        for (i, exchange) in self.exchanges().iter().enumerate().skip(first + 1) {
            if carriers.contains(&i) || decoder::input_of(exchange).is_none() {
                continue;
            }
            if decoder::infer_response_with(exchange, reply, reasoning, &Hints::default()).is_ok() {
                return Ok(Chosen {
                    index: i,
                    carriers: carriers.iter().copied().filter(|c| *c < i).collect(),
                });
            }
        }
        let (at, reason) = match first_error {
            Some((i, message)) => (i, message),
            None => (
                first,
                "neither it nor any later request got a response to read the reply from".into(),
            ),
        };
        Err(InferError::NoReply {
            call: describe_call(&self.exchanges()[at]),
            reason: lowercase_first(&reason),
        })
    }

    fn build(mut self, chosen: Chosen, service: &str) -> Result<Learned, InferError> {
        let chat_exchange = &self.exchanges()[chosen.index];
        self.notes.push(format!(
            "chat call: {} (request {} of {}), the one carrying the probe marker{}",
            describe_call(chat_exchange),
            chosen.index + 1,
            self.exchanges().len(),
            if chosen.carriers.is_empty() {
                String::new()
            } else {
                " in an earlier call".to_owned()
            }
        ));
        let (request, preflight) = self.template_calls(&chosen);
        let keys = std::mem::take(&mut self.step_keys);

        let mut hints = self.default_hints(chat_exchange);
        hints.conversation_values = self.preflight_values.clone();
        let found = decoder::infer_response_with(
            chat_exchange,
            &self.recording.rendered_reply,
            self.recording.rendered_reasoning.as_deref(),
            &hints,
        )
        .map_err(|e| InferError::NoReply {
            call: describe_call(chat_exchange),
            reason: lowercase_first(&e.to_string()),
        })?;
        self.notes.extend(found.notes);
        let mut flow = Flow {
            id: String::new(),
            service: service.to_owned(),
            name: "chat".to_owned(),
            version: 1,
            origin: Some(self.page.origin().ascii_serialization()),
            preflight,
            request,
            response: found.spec,
            ui: Some(UiHints {
                page: Some(self.url_of_page()),
                ..UiHints::default()
            }),
            follow_up: None,
            upload: None,
            replay: ReplayPolicy::default(),
            stats: FlowStats::default(),
        };
        if let Some(note) = upload::split(&self, &mut flow, &keys).map_err(InferError::Upload)? {
            self.notes.push(note);
        }
        flow.validate()
            .map_err(|e| InferError::Invalid(e.to_string()))?;
        drop_literal_secrets(&mut flow, &mut self.suspicious);
        Ok(Learned {
            flow,
            notes: self.notes,
            suspicious: self.suspicious,
            chat_index: chosen.index,
            observed: self.observed,
            uses: self
                .names
                .iter()
                .filter_map(|(name, (key, _))| match key {
                    StepKey::Exchange(i) => Some((*i, name.clone())),
                    StepKey::Page => None,
                })
                .fold(BTreeMap::new(), |mut uses, (i, name)| {
                    uses.entry(i).or_insert_with(Vec::new).push(name);
                    uses
                }),
        })
    }

    /// Templates the chat call of `chosen` and the preflights it needs (its carriers, and the
    /// calls its values came from, recursively), in the order the page made them.
    fn template_calls(&mut self, chosen: &Chosen) -> (HttpTemplate, Vec<Step>) {
        self.templating_chat = true;
        let request = self.template(chosen.index);
        self.templating_chat = false;
        // The calls that sent the attached file: nothing reads their answers, but the upload
        // needs them.
        for carrier in self.file_carriers() {
            self.steps.entry(StepKey::Exchange(carrier)).or_default();
            self.pending.push(carrier);
        }
        for carrier in &chosen.carriers {
            self.notes.push(format!(
                "{} carries the probe before the chat call: kept as a preflight",
                describe_call(&self.exchanges()[*carrier])
            ));
            self.steps.entry(StepKey::Exchange(*carrier)).or_default();
            self.pending.push(*carrier);
        }
        let mut templates: BTreeMap<usize, HttpTemplate> = BTreeMap::new();
        while let Some(index) = self.pending.pop() {
            if templates.contains_key(&index) {
                continue;
            }
            let template = self.template(index);
            templates.insert(index, template);
        }

        let steps = std::mem::take(&mut self.steps);
        let mut preflight = Vec::new();
        for (key, plan) in steps {
            let http = match key {
                StepKey::Page => HttpTemplate {
                    method: "GET".to_owned(),
                    url: self.url_of_page(),
                    headers: [("accept".to_owned(), "text/html".to_owned())].into(),
                    body_kind: BodyKind::Json,
                    body: None,
                    slots: BTreeMap::new(),
                },
                StepKey::Exchange(index) => match templates.remove(&index) {
                    Some(template) => template,
                    None => continue,
                },
            };
            preflight.push(Step {
                http,
                extract: plan.extract,
            });
            self.step_keys.push(key);
        }
        (request, preflight)
    }

    fn url_of_page(&self) -> String {
        let mut url = self.page.path().to_owned();
        if let Some(query) = self.page.query() {
            url.push('?');
            url.push_str(query);
        }
        url
    }

    /// Unix ms when exchange `index` was sent, if the recording tells.
    fn expected_ms(&self, at_ms: f64) -> Option<f64> {
        self.clock_ms.map(|base| base + at_ms)
    }

    // -----------------------------------------------------------------------------------------
    // Templates

    fn template(&mut self, index: usize) -> HttpTemplate {
        self.fresh_uuids.clear();
        let exchange = &self.exchanges()[index];
        let at = exchange.started_ms;
        let websocket = is_websocket(exchange);
        // A socket's messages are sent after it opened: values may come from later calls.
        let frames_at = exchange
            .frames
            .iter()
            .filter(|f| f.sent)
            .map(|f| f.at_ms)
            .fold(at, f64::max);
        let url = self.template_url(index, exchange, at);
        let headers = self.template_headers(index, exchange, at, websocket);
        let mut slots = BTreeMap::new();
        let (body_kind, body) = if websocket {
            let mut messages = self.sent_messages(exchange);
            if let Some(messages) = &mut messages {
                self.template_json(index, frames_at, messages, &mut slots);
            }
            let messages = messages.map(|m| {
                let (m, s) = self.with_socket_prefix(exchange, m, std::mem::take(&mut slots));
                slots = s;
                m
            });
            (BodyKind::Json, messages)
        } else if self.carries_file(index) {
            self.template_file_body(index, at)
        } else {
            self.template_body(index, exchange, at, &mut slots)
        };
        let mut headers = headers;
        if body_kind == BodyKind::Multipart {
            // The boundary is made anew for every body.
            headers.remove("content-type");
        }
        HttpTemplate {
            method: exchange.method.to_ascii_uppercase(),
            url,
            headers,
            body_kind,
            body,
            slots,
        }
    }

    /// The messages a WebSocket sent, up to the one carrying the probe, as a JSON list.
    fn sent_messages(&self, exchange: &Exchange) -> Option<Value> {
        let marker = self.recording.marker.as_str();
        let mut out = Vec::new();
        for frame in exchange.frames.iter().filter(|f| f.sent) {
            let Some(text) = frame_text(frame) else {
                continue;
            };
            let carries = text.contains(marker);
            out.push(serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)));
            if carries {
                break;
            }
        }
        (!out.is_empty()).then_some(Value::Array(out))
    }

    fn template_url(&mut self, index: usize, exchange: &Exchange, at: f64) -> String {
        let Ok(url) = Url::parse(&exchange.url) else {
            return exchange.url.clone();
        };
        // An upload URL an earlier answer gave whole (an upload slot, a presigned URL) is
        // sent as given: its host and signature are the site's to choose.
        if self.in_upload_window(index)
            && let Some(origin @ Origin::Response { .. }) =
                self.sources.find(&exchange.url, index, at)
        {
            let spot = Spot {
                label: "the URL".to_owned(),
                key: Some("url".to_owned()),
            };
            let source = self.source_for(origin, &exchange.url, &spot, index);
            return format!("{{{{{source}}}}}");
        }
        let mut out = if same_origin(&url, &self.page) {
            String::new()
        } else {
            let mut origin = url.origin().ascii_serialization();
            if origin == "null" {
                origin = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
            }
            origin
        };
        let segments: Vec<&str> = url.path().split('/').collect();
        let mut path = Vec::with_capacity(segments.len());
        for (i, raw) in segments.iter().enumerate() {
            let decoded = percent_encoding::percent_decode_str(raw)
                .decode_utf8_lossy()
                .into_owned();
            let previous = i
                .checked_sub(1)
                .and_then(|p| segments.get(p))
                .map(|s| singular(s));
            let spot = Spot {
                label: format!("URL path segment {i}"),
                key: previous,
            };
            path.push(match self.plan_string(index, at, &decoded, &spot) {
                Plan::Keep => (*raw).to_owned(),
                Plan::Prompt | Plan::PromptInside { .. } => "{{prompt}}".to_owned(),
                Plan::Source(source) => format!("{{{{{source}}}}}"),
            });
        }
        out.push_str(&path.join("/"));
        if let Some(query) = url.query() {
            let mut pieces = Vec::new();
            for piece in query.split('&') {
                let (key, raw) = piece.split_once('=').unwrap_or((piece, ""));
                let decoded = form_decode(raw);
                let spot = Spot {
                    label: format!("query parameter `{}`", form_decode(key)),
                    key: Some(form_decode(key)),
                };
                let value = match self.plan_string(index, at, &decoded, &spot) {
                    Plan::Keep => raw.to_owned(),
                    Plan::Prompt | Plan::PromptInside { .. } => "{{prompt}}".to_owned(),
                    Plan::Source(source) => format!("{{{{{source}}}}}"),
                };
                if piece.contains('=') {
                    pieces.push(format!("{key}={value}"));
                } else {
                    pieces.push(key.to_owned());
                }
            }
            out.push('?');
            out.push_str(&pieces.join("&"));
        }
        out
    }

    fn template_headers(
        &mut self,
        index: usize,
        exchange: &Exchange,
        at: f64,
        websocket: bool,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut dropped_cookie = false;
        for (name, value) in &exchange.request_headers {
            let name = name.to_ascii_lowercase();
            if name == "cookie" {
                dropped_cookie = true;
                continue;
            }
            if is_browser_managed(&name)
                || (websocket && (name.starts_with("sec-websocket") || name == "upgrade"))
            {
                continue;
            }
            if self
                .recording
                .storage
                .user_agent
                .as_deref()
                .is_some_and(|ua| ua == value)
            {
                out.insert(name, "{{session.user_agent}}".to_owned());
                continue;
            }
            let (scheme, rest) = split_scheme(value);
            let spot = Spot {
                label: format!("header `{name}`"),
                key: Some(name.clone()),
            };
            match self.plan_string(index, at, rest, &spot) {
                Plan::Source(source) => {
                    out.insert(name, format!("{scheme}{{{{{source}}}}}"));
                }
                Plan::Prompt | Plan::PromptInside { .. } => {
                    out.insert(name, format!("{scheme}{{{{prompt}}}}"));
                }
                Plan::Keep => {
                    let unexplained = is_high_entropy(rest) || is_id_like(rest);
                    if crate::flow::is_sensitive_header(&name) && unexplained {
                        push_unique(
                            &mut self.suspicious,
                            format!(
                                "header `{name}` of {} holds a credential ({}) found in no \
                                 storage, cookie or earlier response; it was left out of the \
                                 flow",
                                describe_call(exchange),
                                describe_secretly(rest)
                            ),
                        );
                        continue;
                    }
                    out.insert(name, value.clone());
                }
            }
        }
        if dropped_cookie && self.templating_chat {
            self.notes.push(
                "the `cookie` header is dropped: replay sends cookies from the session's jar"
                    .to_owned(),
            );
        }
        out
    }

    fn template_body(
        &mut self,
        index: usize,
        exchange: &Exchange,
        at: f64,
        slots: &mut BTreeMap<String, String>,
    ) -> (BodyKind, Option<Value>) {
        let Some(body) = exchange.request_body.as_ref().filter(|b| !b.0.is_empty()) else {
            return (BodyKind::Json, None);
        };
        let content_type = exchange
            .request_header("content-type")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let text = String::from_utf8_lossy(&body.0).into_owned();
        if !content_type.contains("x-www-form-urlencoded")
            && let Ok(mut value) = serde_json::from_str::<Value>(&text)
            && (value.is_object() || value.is_array())
        {
            self.template_json(index, at, &mut value, slots);
            return (BodyKind::Json, Some(value));
        }
        if content_type.contains("x-www-form-urlencoded") || looks_like_form(&text) {
            let mut form = Map::new();
            for (key, value) in form_urlencoded::parse(text.as_bytes()) {
                if form.contains_key(key.as_ref()) {
                    self.notes.push(format!(
                        "form field `{key}` of {} is repeated; only its first value is kept",
                        describe_call(exchange)
                    ));
                    continue;
                }
                form.insert(key.into_owned(), Value::String(value.into_owned()));
            }
            let mut value = Value::Object(form);
            self.template_json(index, at, &mut value, slots);
            return (BodyKind::Form, Some(value));
        }
        let spot = Spot {
            label: "the text body".to_owned(),
            key: None,
        };
        let value = match self.plan_string(index, at, &text, &spot) {
            Plan::Prompt => {
                slots.insert(String::new(), "prompt".to_owned());
                Value::String(String::new())
            }
            Plan::PromptInside { template } => Value::String(template),
            Plan::Source(source) => {
                slots.insert(String::new(), source);
                Value::String(String::new())
            }
            Plan::Keep => Value::String(text),
        };
        (BodyKind::Text, Some(value))
    }

    /// Templates the leaves of a JSON (or form) body in place, filling `slots`. Slots keep
    /// their source's JSON type, so a timestamp sent as a string becomes a `{{now_ms}}`
    /// placeholder instead, to stay a string.
    fn template_json(
        &mut self,
        index: usize,
        at: f64,
        body: &mut Value,
        slots: &mut BTreeMap<String, String>,
    ) {
        let marker = self.recording.marker.as_str();
        // OpenAI-like message lists first: the whole list becomes the `messages` source.
        let mut handled: Vec<String> = Vec::new();
        for (pointer, _) in decoder::strings(body)
            .into_iter()
            .filter(|(_, s)| s.contains(marker))
            .map(|(p, s)| (p, s.to_owned()))
            .collect::<Vec<_>>()
        {
            if let Some(list) = openai_messages_list(body, &pointer) {
                let count = body
                    .pointer(&list)
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                if count > 1 {
                    if let Some(context) = &mut self.follow_up {
                        context.resends_history = true;
                    }
                    self.notes.push(format!(
                        "the request resends the conversation: `{list}` is an OpenAI-like \
                         message list ({count} messages)"
                    ));
                } else {
                    self.notes.push(format!(
                        "`{list}` is an OpenAI-like message list: sent as the `messages` source"
                    ));
                }
                if let Some(slot) = body.pointer_mut(&list) {
                    *slot = serde_json::json!([{ "role": "user", "content": "" }]);
                }
                slots.insert(list.clone(), "messages".to_owned());
                handled.push(list);
            }
        }
        let leaves: Vec<(String, Value)> = decoder::scalars(body)
            .into_iter()
            .filter(|(p, _)| {
                !handled
                    .iter()
                    .any(|h| p == h || p.starts_with(&format!("{h}/")))
            })
            .map(|(p, v)| (p, v.clone()))
            .collect();
        for (pointer, leaf) in leaves {
            let spot = Spot {
                label: format!("body `{pointer}`"),
                key: key_of(&pointer),
            };
            match leaf {
                Value::String(s) => {
                    let plan = self.plan_string(index, at, &s, &spot);
                    let Some(slot) = body.pointer_mut(&pointer) else {
                        continue;
                    };
                    match plan {
                        Plan::Keep => {}
                        Plan::Prompt => {
                            *slot = Value::String(String::new());
                            slots.insert(pointer.clone(), "prompt".to_owned());
                            self.note_prompt(&pointer, index);
                        }
                        Plan::PromptInside { template } => {
                            *slot = Value::String(template);
                        }
                        Plan::Source(source)
                            if source == "now_ms"
                                || source == "now_s"
                                || source.starts_with("session.")
                                || source.starts_with("file.") =>
                        {
                            // A string stays a string; session values are strings.
                            *slot = Value::String(format!("{{{{{source}}}}}"));
                        }
                        Plan::Source(source) => {
                            *slot = Value::String(String::new());
                            slots.insert(pointer.clone(), source);
                        }
                    }
                }
                Value::Number(n) => {
                    let Some(number) = n.as_f64() else { continue };
                    if self.file_source(index, &n.to_string()) == Some("file.size") {
                        if let Some(slot) = body.pointer_mut(&pointer) {
                            *slot = Value::from(0);
                        }
                        slots.insert(pointer.clone(), "file.size".to_owned());
                        continue;
                    }
                    if let Some(source) = self.counter(&pointer, number) {
                        if let Some(slot) = body.pointer_mut(&pointer) {
                            *slot = Value::from(0);
                        }
                        slots.insert(pointer.clone(), source);
                        continue;
                    }
                    if let Some(unit) = timestamp_unit(number, self.expected_ms(at)) {
                        if let Some(slot) = body.pointer_mut(&pointer) {
                            *slot = Value::from(0);
                        }
                        slots.insert(pointer.clone(), unit.source().to_owned());
                        self.note_time(&spot, unit, index);
                    }
                }
                _ => {}
            }
        }
    }

    fn note_prompt(&mut self, pointer: &str, index: usize) {
        // A list index below the top level (the top level of a WebSocket body is the list of
        // messages sent).
        let list_position = pointer
            .split('/')
            .skip(2)
            .filter_map(|t| t.parse::<usize>().ok())
            .last()
            .unwrap_or(0);
        let mut note = format!(
            "the probe is at body `{pointer}` of {}: the `prompt` slot",
            describe_call(&self.exchanges()[index])
        );
        if list_position > 0 {
            note.push_str(&format!(
                " (element {list_position} of a list: the site may resend history)"
            ));
        }
        self.notes.push(note);
    }

    fn note_time(&mut self, spot: &Spot, unit: TimeUnit, index: usize) {
        self.notes.push(format!(
            "{} of {} is the current time in {}: `{}`",
            spot.label,
            describe_call(&self.exchanges()[index]),
            match unit {
                TimeUnit::Millis => "milliseconds",
                TimeUnit::Seconds => "seconds",
            },
            unit.source()
        ));
    }

    /// How a string value sent by exchange `index` at `at` is to be sent at replay time.
    fn plan_string(&mut self, index: usize, at: f64, value: &str, spot: &Spot) -> Plan {
        let probe = self.recording.probe.as_str();
        let marker = self.recording.marker.as_str();
        if value.contains(marker) {
            if value == probe || value.trim() == probe.trim() {
                return Plan::Prompt;
            }
            if !probe.is_empty() && value.contains(probe) && !value.contains("{{") {
                self.notes.push(format!(
                    "{} of {} holds the probe inside other text: the rest is kept around a \
                     `{{{{prompt}}}}` placeholder",
                    spot.label,
                    describe_call(&self.exchanges()[index])
                ));
                return Plan::PromptInside {
                    template: value.replace(probe, "{{prompt}}"),
                };
            }
            self.notes.push(format!(
                "{} of {} holds the probe marker but not the probe as typed: the whole value \
                 becomes the `prompt`",
                spot.label,
                describe_call(&self.exchanges()[index])
            ));
            return Plan::Prompt;
        }
        if let Some(source) = self.file_source(index, value) {
            self.notes.push(format!(
                "{} of {} is the attached file's {}: `{source}`",
                spot.label,
                describe_call(&self.exchanges()[index]),
                source.trim_start_matches("file.")
            ));
            return Plan::Source(source.to_owned());
        }
        if self.follow_up.is_some()
            && let Some(plan) = self.plan_from_first_turn(index, at, value, spot)
        {
            return plan;
        }
        if (is_id_like(value) || is_high_entropy(value))
            && let Some(origin) = self.sources.find(value, index, at)
        {
            let source = self.source_for(origin, value, spot, index);
            return Plan::Source(source);
        }
        if is_uuid(value) {
            let call = describe_call(&self.exchanges()[index]);
            if let Some((_, first)) = self.fresh_uuids.iter().find(|(v, _)| v == value) {
                self.notes.push(format!(
                    "{} of {call} repeats the fresh UUID sent at {first}: replay sends a \
                     different UUID at each place (flows have no named per-request values)",
                    spot.label
                ));
            } else {
                self.fresh_uuids
                    .push((value.to_owned(), spot.label.clone()));
                self.notes
                    .push(format!("{} of {call} is a fresh UUID: `uuid`", spot.label));
            }
            return Plan::Source("uuid".to_owned());
        }
        if let Some(number) = numeric_string(value)
            && let Some(unit) = timestamp_unit(number, self.expected_ms(at))
        {
            self.note_time(spot, unit, index);
            return Plan::Source(unit.source().to_owned());
        }
        if is_high_entropy(value) {
            let message = format!(
                "{} of {} ({}) is explained by no storage, cookie, earlier response, UUID or \
                 time pattern: possibly a signature, proof of work or one-time token",
                spot.label,
                describe_call(&self.exchanges()[index]),
                describe_secretly(value)
            );
            push_unique(&mut self.suspicious, message);
        }
        Plan::Keep
    }

    /// The template source for a value of known origin, planning the preflight it needs.
    fn source_for(&mut self, origin: Origin, value: &str, spot: &Spot, consumer: usize) -> String {
        let call = describe_call(&self.exchanges()[consumer]);
        let (key, extract, hint, described) = match origin {
            Origin::Cookie(name) => {
                self.notes.push(format!(
                    "{} of {call} comes from the cookie `{name}`",
                    spot.label
                ));
                return format!("session.cookie.{name}");
            }
            storage @ Origin::Storage { .. } => {
                let source = storage.session_source().unwrap_or_default();
                self.notes.push(format!(
                    "{} of {call} comes from the page's storage: `{{{{{source}}}}}`",
                    spot.label
                ));
                return source;
            }
            Origin::Meta(name) => (
                StepKey::Page,
                Extract::Regex {
                    regex: meta_regex(&name),
                },
                meta_name(&name),
                format!("the chat page's <meta name=\"{name}\"> (a GET of the page)"),
            ),
            Origin::Response {
                exchange,
                extract,
                key,
            } => {
                let name = match (&extract, key.as_deref()) {
                    (Extract::Regex { .. }, Some(key)) => meta_name(key),
                    _ => self.name_hint(key.as_deref(), spot, value),
                };
                let producer = describe_call(&self.exchanges()[exchange]);
                let described = match &extract {
                    Extract::Pointer(p) => format!("the response of {producer} at `{p}`"),
                    Extract::Header { header } => {
                        format!("the response header `{header}` of {producer}")
                    }
                    Extract::Regex { regex } => {
                        format!("the response of {producer}, read by the regex `{regex}`")
                    }
                };
                (StepKey::Exchange(exchange), extract, name, described)
            }
        };
        let name = self.extract_name(key, &extract, &hint);
        if !self.observed.iter().any(|(n, _)| *n == name) {
            self.observed.push((name.clone(), value.to_owned()));
        }
        if let StepKey::Exchange(index) = key
            && !self.steps.contains_key(&key)
        {
            self.pending.push(index);
        }
        let plan = self.steps.entry(key).or_default();
        plan.extract.insert(name.clone(), extract);
        self.notes.push(format!(
            "{} of {call} comes from {described}: `{{{{preflight.{name}}}}}`",
            spot.label
        ));
        if self.templating_chat && !matches!(key, StepKey::Page) {
            self.preflight_values.push(value.to_owned());
        }
        format!("preflight.{name}")
    }

    /// A readable name for an extracted value: the response key when it says what the value
    /// is, else the key the consumer sends it under, else a generic name.
    fn name_hint(&self, response_key: Option<&str>, spot: &Spot, value: &str) -> String {
        let id_suffix = |name: String| {
            if is_uuid(value) && !name.ends_with("id") {
                format!("{name}_id")
            } else {
                name
            }
        };
        if let Some(key) = response_key
            && is_informative(key)
        {
            return snake_case(key);
        }
        if let Some(key) = &spot.key
            && is_informative(key)
        {
            return id_suffix(snake_case(key));
        }
        "value".to_owned()
    }

    /// A unique extract name for `(step, extract)`, reusing the existing one.
    fn extract_name(&mut self, key: StepKey, extract: &Extract, hint: &str) -> String {
        if let Some((name, _)) = self
            .names
            .iter()
            .find(|(_, (k, e))| *k == key && e == extract)
        {
            return name.clone();
        }
        let base = if hint.is_empty() { "value" } else { hint };
        let mut name = base.to_owned();
        let mut n = 2;
        while self.names.contains_key(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.names.insert(name.clone(), (key, extract.clone()));
        name
    }
}

/// Never ships a literal credential: drops those headers and says so.
fn drop_literal_secrets(flow: &mut Flow, suspicious: &mut Vec<String>) {
    let secrets = flow.literal_secrets();
    if secrets.is_empty() {
        return;
    }
    for http in flow.templates_mut() {
        http.headers.retain(|name, _| !secrets.contains(name));
    }
    for name in secrets {
        push_unique(
            suspicious,
            format!(
                "header `{name}` holds a credential found in no storage, cookie or earlier \
                 response; it was left out of the flow"
            ),
        );
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// Unix ms at recording time 0, from the first response with a `Date` header.
fn clock(recording: &Recording) -> Option<f64> {
    recording.exchanges.iter().find_map(|e| {
        let date = e.response_header("date")?;
        let at = httpdate::parse_http_date(date).ok()?;
        let unix_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as f64;
        let received = e.first_byte_ms.unwrap_or(e.started_ms);
        Some(unix_ms - received)
    })
}

fn same_origin(a: &Url, b: &Url) -> bool {
    let http = |u: &Url| match u.scheme() {
        "ws" => "http".to_owned(),
        "wss" => "https".to_owned(),
        other => other.to_owned(),
    };
    http(a) == http(b) && a.host_str() == b.host_str() && effective_port(a) == effective_port(b)
}

fn effective_port(url: &Url) -> Option<u16> {
    url.port().or_else(|| match url.scheme() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    })
}

fn is_websocket(exchange: &Exchange) -> bool {
    exchange.resource_type.eq_ignore_ascii_case("websocket")
        || exchange.url.starts_with("ws://")
        || exchange.url.starts_with("wss://")
        || !exchange.frames.is_empty()
}

/// Headers the browser or the HTTP stack manages; replay sets its own.
fn is_browser_managed(name: &str) -> bool {
    name.starts_with(':')
        || name.starts_with("sec-")
        || name.starts_with("proxy-")
        || matches!(
            name,
            "host"
                | "content-length"
                | "connection"
                | "keep-alive"
                | "accept-encoding"
                | "accept-language"
                | "user-agent"
                | "priority"
                | "origin"
                | "referer"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "upgrade-insecure-requests"
                | "pragma"
                | "cache-control"
                | "dnt"
                | "if-none-match"
                | "if-modified-since"
                | "purpose"
                | "x-client-data"
        )
}

/// `Bearer abc` → (`Bearer `, `abc`); anything else → (``, value).
fn split_scheme(value: &str) -> (&str, &str) {
    if let Some((scheme, rest)) = value.split_once(' ')
        && !scheme.is_empty()
        && scheme.len() <= 16
        && scheme.chars().all(|c| c.is_ascii_alphabetic())
        && !rest.is_empty()
        && !rest.contains(' ')
    {
        return (&value[..scheme.len() + 1], rest);
    }
    ("", value)
}

fn form_decode(text: &str) -> String {
    form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn looks_like_form(text: &str) -> bool {
    !text.is_empty()
        && !text.contains(char::is_whitespace)
        && text.split('&').all(|pair| {
            pair.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']' | '%')
                    })
            })
        })
}

/// The JSON key of a pointer's last meaningful token (`/conversation/id` → `conversation_id`).
fn key_of(pointer: &str) -> Option<String> {
    let tokens: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let mut suffix = "";
    for token in tokens.iter().rev() {
        if token.parse::<usize>().is_ok() {
            continue;
        }
        if is_informative(token) {
            return Some(format!("{token}{suffix}"));
        }
        if suffix.is_empty() && matches!(token.to_ascii_lowercase().as_str(), "id" | "uuid") {
            suffix = "_id";
        }
    }
    None
}

/// Whether a key says what its value is (not `id`, `data`, `value`, an index…).
fn is_informative(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    !lower.is_empty()
        && lower.parse::<usize>().is_err()
        && !matches!(
            lower.as_str(),
            "id" | "uuid"
                | "value"
                | "data"
                | "result"
                | "results"
                | "item"
                | "items"
                | "payload"
                | "body"
                | "response"
                | "json"
                | "v"
        )
}

/// A name for a `<meta>` value: its name without a `-token` suffix (`request-token` → `request`).
fn meta_name(name: &str) -> String {
    let snake = snake_case(name);
    match snake.strip_suffix("_token") {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => snake,
    }
}

/// A path segment as a noun for naming the id after it (`organizations` → `organization`).
fn singular(segment: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
    let s = decoded.strip_suffix('s').unwrap_or(&decoded);
    format!("{s}_id")
}

/// When `pointer` (a leaf holding the probe) is the `content` of a `{role, content}` user
/// message in a list of such messages, the list's pointer.
fn openai_messages_list(body: &Value, pointer: &str) -> Option<String> {
    let (element, key) = pointer.rsplit_once('/')?;
    if key != "content" {
        return None;
    }
    let (list, index) = element.rsplit_once('/')?;
    index.parse::<usize>().ok()?;
    let items = body.pointer(list)?.as_array()?;
    let is_message = |item: &Value| {
        item.as_object().is_some_and(|m| {
            m.len() == 2
                && m.get("role").is_some_and(Value::is_string)
                && m.get("content").is_some_and(Value::is_string)
        })
    };
    let this = body.pointer(element)?;
    (items.iter().all(is_message) && this.get("role").and_then(Value::as_str) == Some("user"))
        .then(|| list.to_owned())
}
