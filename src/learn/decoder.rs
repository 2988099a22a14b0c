//! Response-shape inference: which [`ResponseSpec`] reads, out of the chat call's recorded
//! response, the reply the page rendered.
//!
//! Invariant: nothing here knows a site. Candidates come from the bytes (every transport the
//! framing allows, every string leaf of every event, every patch path), and a candidate is
//! accepted only when the replay decoder itself (`replay::decode`), run over the recorded
//! bytes, yields the rendered reply (and reasoning) after normalization.
//!
//! Search order:
//! 1. Transports: the content type's first, then what the framing looks like (SSE fields,
//!    `TAG:JSON` lines, flag + length frames, JSON lines, one JSON document), `text` last.
//! 2. Readings of the text: every patch path (append-patch streams), every JSON path read as
//!    delta and as cumulative, restricted to the event name the text came in when the stream
//!    has several names.
//! 3. A reading equal to the reply is the text rule; reasoning is then a second reading equal
//!    to the rendered reasoning (`Field`). A reading equal to reasoning + reply is split by a
//!    flag (a leaf whose value marks the reasoning events, or the list element a patch path's
//!    `-1` names) or by markup inside the text (`<think>`, `<details …>`).
//! 4. Done signals, error rules and ids are added conservatively (see [`finish_spec`]), and
//!    the final spec is checked once more.

mod events;
mod normalize;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

pub(crate) use self::events::{
    Event, Input, escape_token, frame_text, input_of, scalars, split as split_events, strings,
};
pub(crate) use self::normalize::normalize;
use crate::flow::{
    Accrual, ErrorRule, ReasoningRule, ResponseSpec, Signal, Tags, TextRule, Transport,
};
use crate::recording::Exchange;
use crate::replay::decode::{Decoder, Delta, collect_text, decode_all, is_op_list};

/// Why no decoder could be inferred. Messages are meant for the user; they never quote
/// response bytes (which may hold tokens).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecoderError {
    #[error("the chat call ({0}) got no response body or WebSocket message to read the reply from")]
    NoResponse(String),
    #[error("the page showed no reply text to look for in the response")]
    NoReply,
    #[error(
        "no reading of the chat call's response ({call}) yields the reply the page showed; {detail}"
    )]
    NoMatch { call: String, detail: String },
}

/// Infers how to read the reply out of the chat call's response, by checking which reading of
/// the recorded bytes yields the text the page rendered.
pub fn infer_response(
    chat: &Exchange,
    rendered_reply: &str,
    rendered_reasoning: Option<&str>,
) -> Result<ResponseSpec, DecoderError> {
    let hints = Hints::from_request(chat, None);
    infer_response_with(chat, rendered_reply, rendered_reasoning, &hints).map(|found| found.spec)
}

/// What the caller knows about the chat request beyond the exchange itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hints {
    /// Values the chat request carries that identify the site conversation (from preflights);
    /// a response leaf equal to one of them is the conversation id.
    pub(crate) conversation_values: Vec<String>,
    /// Every id-like value the chat request carries (never a message id of the reply).
    pub(crate) request_values: Vec<String>,
    /// Strings whose presence marks an event as an echo of the user's message.
    pub(crate) echo: Vec<String>,
}

impl Hints {
    /// Hints read from the request alone: its id-like values, and its prose (the prompt) as
    /// echo markers. `marker`, when known, is an echo marker too.
    pub(crate) fn from_request(chat: &Exchange, marker: Option<&str>) -> Self {
        let mut values: Vec<String> = Vec::new();
        let mut prose: Vec<String> = marker.map(str::to_owned).into_iter().collect();
        let mut take = |s: &str| {
            if crate::learn::infer::values::is_id_like(s) {
                values.push(s.to_owned());
            } else if s.chars().count() >= 8 && s.contains(char::is_whitespace) {
                prose.push(s.to_owned());
            }
        };
        if let Ok(url) = url::Url::parse(&chat.url) {
            if let Some(segments) = url.path_segments() {
                for segment in segments {
                    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
                    take(&decoded);
                }
            }
            for (_, v) in url.query_pairs() {
                take(&v);
            }
        }
        let body = chat.request_body.as_ref().and_then(|b| b.as_str());
        let sent: Vec<String> = chat
            .frames
            .iter()
            .filter(|f| f.sent)
            .filter_map(frame_text)
            .collect();
        for text in body.into_iter().map(str::to_owned).chain(sent) {
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                for (_, s) in strings(&value) {
                    take(s);
                }
            } else {
                for (_, v) in form_urlencoded::parse(text.as_bytes()) {
                    take(&v);
                }
            }
        }
        Hints {
            conversation_values: values.clone(),
            request_values: values,
            echo: prose,
        }
    }
}

/// An inferred spec and what was inferred, in words.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) spec: ResponseSpec,
    pub(crate) notes: Vec<String>,
}

/// [`infer_response`] with hints from the caller, explaining itself.
pub(crate) fn infer_response_with(
    chat: &Exchange,
    rendered_reply: &str,
    rendered_reasoning: Option<&str>,
    hints: &Hints,
) -> Result<Found, DecoderError> {
    let call = describe_call(chat);
    let input = input_of(chat).ok_or_else(|| DecoderError::NoResponse(call.clone()))?;
    let target = Target {
        reply: normalize(rendered_reply),
        reasoning: rendered_reasoning.map(normalize).filter(|r| !r.is_empty()),
    };
    if target.reply.is_empty() {
        return Err(DecoderError::NoReply);
    }
    let content_type = chat.response_header("content-type").unwrap_or_default();
    let transports = events::candidate_transports(content_type, &input);
    let mut closest: Option<(usize, String)> = None;
    for transport in &transports {
        let Some(events) = events::split(*transport, &input) else {
            continue;
        };
        let search = Search {
            transport: *transport,
            events: &events,
            input: &input,
            target: &target,
            patch_like: is_patch_like(&events),
        };
        if let Some((spec, mut notes)) = search.run(&mut closest) {
            let spec = finish_spec(spec, &search, hints, &mut notes);
            return Ok(Found { spec, notes });
        }
    }
    let tried: Vec<String> = transports.iter().map(|t| transport_name(*t)).collect();
    let detail = match closest {
        Some((_, what)) => format!(
            "tried transports {}; the closest reading was {what}",
            tried.join(", ")
        ),
        None => format!("tried transports {}", tried.join(", ")),
    };
    Err(DecoderError::NoMatch { call, detail })
}

/// `POST /path` (no query string: it may hold tokens).
pub(crate) fn describe_call(chat: &Exchange) -> String {
    let path = url::Url::parse(&chat.url)
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|_| chat.url.split('?').next().unwrap_or_default().to_owned());
    format!("{} {path}", chat.method)
}

pub(crate) fn transport_name(transport: Transport) -> String {
    match serde_json::to_value(transport) {
        Ok(Value::String(s)) => s,
        _ => format!("{transport:?}"),
    }
}

fn accrual_name(mode: Accrual) -> String {
    match serde_json::to_value(mode) {
        Ok(Value::String(s)) => s,
        _ => format!("{mode:?}"),
    }
}

/// What the decoded text must be, normalized.
struct Target {
    reply: String,
    reasoning: Option<String>,
}

impl Target {
    /// Whether a decode yields the reply (and the rendered reasoning, or some reasoning when
    /// `need_reasoning`).
    fn accepts(&self, decoded: &(String, String), need_reasoning: bool) -> bool {
        if normalize(&decoded.0) != self.reply {
            return false;
        }
        match &self.reasoning {
            Some(want) => normalize(&decoded.1) == *want,
            None => !need_reasoning || !decoded.1.trim().is_empty(),
        }
    }
}

/// The deltas the replay decoder reads out of an exchange's recorded response with `spec`
/// (`None` when there is no response or the spec does not fit it).
pub(crate) fn decode_exchange(spec: &ResponseSpec, exchange: &Exchange) -> Option<Vec<Delta>> {
    deltas(spec, &input_of(exchange)?)
}

/// Runs the replay decoder over the recorded response: (text, reasoning), or `None` when the
/// spec does not fit the bytes.
fn run(spec: &ResponseSpec, input: &Input) -> Option<(String, String)> {
    Some(collect_text(&deltas(spec, input)?))
}

fn deltas(spec: &ResponseSpec, input: &Input) -> Option<Vec<Delta>> {
    let deltas = match input {
        Input::Body(body) => decode_all(spec, body).ok()?,
        Input::Messages(messages) => {
            let mut decoder = Decoder::new(spec);
            let mut out = Vec::new();
            for message in messages {
                decoder.feed_message(None, message, &mut out).ok()?;
            }
            decoder.finish(&mut out).ok()?;
            out
        }
    };
    Some(deltas)
}

fn bare_spec(transport: Transport, rule: TextRule) -> ResponseSpec {
    ResponseSpec {
        transport,
        text: rule,
        reasoning: None,
        done: Vec::new(),
        error: Vec::new(),
        ids: BTreeMap::new(),
    }
}

/// One way of reading text out of the events.
#[derive(Debug, Clone)]
struct Reading {
    rule: TextRule,
    /// What it reads, raw.
    text: String,
    normalized: String,
}

/// How a reading relates to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fit {
    /// It is the reply.
    Reply,
    /// It is the rendered reasoning followed by the reply: a flag or markup splits it.
    ReasoningThenReply,
    /// It ends with the reply (no reasoning was rendered; the rest may be hidden reasoning).
    EndsWithReply,
    /// It holds the reply and markup.
    HoldsReplyAndMarkup,
}

struct Search<'a> {
    transport: Transport,
    events: &'a [Event],
    input: &'a Input,
    target: &'a Target,
    patch_like: bool,
}

impl Search<'_> {
    fn run(&self, closest: &mut Option<(usize, String)>) -> Option<(ResponseSpec, Vec<String>)> {
        let readings = self.readings();
        for reading in &readings {
            self.remember_closest(reading, closest);
        }
        let mut fitting: Vec<(Fit, usize, &Reading)> = readings
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.fit(r).map(|f| (f, i, r)))
            .collect();
        fitting.sort_by_key(|(fit, i, r)| (*fit, self.mode_rank(r.rule.mode), *i));
        let mut fallback = None;
        for (fit, _, reading) in &fitting {
            let spec = bare_spec(self.transport, reading.rule.clone());
            let Some(decoded) = run(&spec, self.input) else {
                continue;
            };
            match fit {
                Fit::Reply => {
                    if normalize(&decoded.0) != self.target.reply {
                        continue;
                    }
                    let mut notes = vec![self.describe_text(reading)];
                    if self.target.reasoning.is_none() {
                        return Some((spec, notes));
                    }
                    if let Some((with, note)) = self.reasoning_field(&spec, &readings) {
                        notes.push(note);
                        return Some((with, notes));
                    }
                    if fallback.is_none() {
                        fallback = Some((spec, notes));
                    }
                }
                Fit::ReasoningThenReply | Fit::EndsWithReply | Fit::HoldsReplyAndMarkup => {
                    if let Some((with, note)) = self.split_reasoning(&spec, reading) {
                        return Some((with, vec![self.describe_text(reading), note]));
                    }
                }
            }
        }
        fallback.map(|(spec, mut notes)| {
            notes.push(
                "the page showed reasoning, but no field, flag or markup in the response \
                 yields it; the reply is read without reasoning"
                    .to_owned(),
            );
            (spec, notes)
        })
    }

    fn remember_closest(&self, reading: &Reading, closest: &mut Option<(usize, String)>) {
        let score = common_prefix(&reading.normalized, &self.target.reply);
        if score > 0 && closest.as_ref().is_none_or(|(best, _)| score > *best) {
            let total = self.target.reply.chars().count();
            *closest = Some((
                score,
                format!(
                    "{} read as {} over the {} transport, matching the first {score} of {total} \
                     visible characters",
                    path_label(&reading.rule.path),
                    accrual_name(reading.rule.mode),
                    transport_name(self.transport),
                ),
            ));
        }
    }

    fn describe_text(&self, reading: &Reading) -> String {
        let event = reading
            .rule
            .event
            .as_deref()
            .map(|e| format!(" in `{e}` events"))
            .unwrap_or_default();
        format!(
            "reply text: {} read as {}{event} over the {} transport",
            path_label(&reading.rule.path),
            accrual_name(reading.rule.mode),
            transport_name(self.transport)
        )
    }

    fn mode_rank(&self, mode: Accrual) -> u8 {
        match (self.patch_like, mode) {
            (true, Accrual::AppendPatch) | (false, Accrual::Delta) => 0,
            (true, Accrual::Delta) | (false, Accrual::Cumulative) => 1,
            _ => 2,
        }
    }

    fn fit(&self, reading: &Reading) -> Option<Fit> {
        let n = &reading.normalized;
        let reply = &self.target.reply;
        if n.is_empty() {
            return None;
        }
        if n == reply {
            return Some(Fit::Reply);
        }
        if let Some(reasoning) = &self.target.reasoning
            && n.len() == reasoning.len() + reply.len()
            && n.starts_with(reasoning.as_str())
            && n.ends_with(reply.as_str())
        {
            return Some(Fit::ReasoningThenReply);
        }
        if self.target.reasoning.is_none() && n.ends_with(reply.as_str()) {
            return Some(Fit::EndsWithReply);
        }
        if n.contains(reply.as_str()) && reading.text.contains('<') && reading.text.contains("</") {
            return Some(Fit::HoldsReplyAndMarkup);
        }
        None
    }

    /// Every reading of the events: patch paths first (in append-patch streams), then every
    /// JSON path as delta and as cumulative.
    fn readings(&self) -> Vec<Reading> {
        let mut out = Vec::new();
        if self.transport == Transport::Text {
            if let Input::Body(body) = self.input {
                let text = String::from_utf8_lossy(body).into_owned();
                out.push(reading(
                    TextRule {
                        path: String::new(),
                        mode: Accrual::Delta,
                        event: None,
                    },
                    text,
                ));
            }
            return out;
        }
        if self.patch_like {
            out.extend(self.patch_readings());
        }
        out.extend(self.plain_readings());
        out
    }

    fn stream_names(&self) -> BTreeSet<&str> {
        self.events
            .iter()
            .filter_map(|e| e.name.as_deref())
            .collect()
    }

    /// The event name to restrict a rule to, when the stream has several and `names` is one
    /// (not SSE's default `message`: that is an unnamed event, and naming it says nothing).
    fn event_filter(&self, names: &BTreeSet<&str>) -> Option<String> {
        let only = names.iter().next().filter(|_| names.len() == 1)?;
        let default_sse = self.transport == Transport::Sse && *only == "message";
        (self.stream_names().len() > 1 && !default_sse).then(|| (*only).to_owned())
    }

    fn plain_readings(&self) -> Vec<Reading> {
        let mut order: Vec<String> = Vec::new();
        let mut values: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (i, event) in self.events.iter().enumerate() {
            let Some(value) = &event.value else { continue };
            for (path, s) in strings(value) {
                let entry = values.entry(path.clone()).or_default();
                if entry.is_empty() {
                    order.push(path);
                }
                entry.push((i, s.to_owned()));
            }
        }
        let mut out = Vec::new();
        for path in order {
            let items = &values[&path];
            let names: BTreeSet<&str> = items
                .iter()
                .filter(|(_, s)| !s.is_empty())
                .filter_map(|(i, _)| self.events[*i].name.as_deref())
                .collect();
            // The path read in every event (restricted to its one name when it has one), and,
            // when several names carry it, in each name's events alone (text in `event: text`,
            // reasoning in `event: thinking`, at the same path).
            let mut filters = vec![self.event_filter(&names)];
            if names.len() > 1 && names.len() <= 8 {
                filters.extend(names.iter().map(|n| Some((*n).to_owned())));
            }
            for event in filters {
                let pieces: Vec<&str> = items
                    .iter()
                    .filter(|(i, _)| {
                        event.is_none() || self.events[*i].name.as_deref() == event.as_deref()
                    })
                    .map(|(_, s)| s.as_str())
                    .collect();
                let delta: String = pieces.concat();
                let cumulative = cumulative_text(&pieces);
                let rule = |mode| TextRule {
                    path: path.clone(),
                    mode,
                    event: event.clone(),
                };
                // A cumulative stream of marked-up text moves its closing tags as it grows, so
                // no value extends the previous one: its last value is the whole text.
                let last = pieces.iter().rev().find(|p| !p.is_empty()).copied();
                if let Some(last) = last
                    && pieces.len() > 1
                    && last.contains("</")
                    && last != cumulative
                    && last != delta
                {
                    out.push(reading(rule(Accrual::Cumulative), last.to_owned()));
                }
                if cumulative != delta {
                    out.push(reading(rule(Accrual::Cumulative), cumulative));
                }
                out.push(reading(rule(Accrual::Delta), delta));
            }
        }
        out
    }

    fn patch_readings(&self) -> Vec<Reading> {
        let names: BTreeSet<&str> = self
            .events
            .iter()
            .filter(|e| e.value.as_ref().is_some_and(is_patch_op_or_batch))
            .filter_map(|e| e.name.as_deref())
            .collect();
        let event = self.event_filter(&names);
        let mut out = Vec::new();
        for path in patch_paths(self.events) {
            let rule = TextRule {
                path,
                mode: Accrual::AppendPatch,
                event: event.clone(),
            };
            let spec = bare_spec(self.transport, rule.clone());
            if let Some((text, _)) = run(&spec, self.input)
                && !text.trim().is_empty()
            {
                out.push(reading(rule, text));
            }
        }
        out
    }

    /// A second reading that yields the rendered reasoning.
    fn reasoning_field(
        &self,
        spec: &ResponseSpec,
        readings: &[Reading],
    ) -> Option<(ResponseSpec, String)> {
        let want = self.target.reasoning.as_ref()?;
        let mut candidates: Vec<(usize, &Reading)> = readings
            .iter()
            .filter(|r| {
                r.normalized == *want
                    && (r.rule.path != spec.text.path || r.rule.event != spec.text.event)
            })
            .enumerate()
            .collect();
        candidates.sort_by_key(|(i, r)| (self.mode_rank(r.rule.mode), *i));
        for (_, candidate) in candidates {
            let mut with = spec.clone();
            with.reasoning = Some(ReasoningRule::Field {
                path: candidate.rule.path.clone(),
                mode: candidate.rule.mode,
                event: candidate.rule.event.clone(),
            });
            if run(&with, self.input).is_some_and(|d| self.target.accepts(&d, true)) {
                let note = format!(
                    "reasoning: a separate field, {} read as {}",
                    path_label(&candidate.rule.path),
                    accrual_name(candidate.rule.mode)
                );
                return Some((with, note));
            }
        }
        None
    }

    /// Splits a reading that holds reasoning and reply: by a flag, else by markup.
    fn split_reasoning(
        &self,
        spec: &ResponseSpec,
        reading: &Reading,
    ) -> Option<(ResponseSpec, String)> {
        let flags = self.flag_candidates(&reading.rule);
        for sticky in [false, true] {
            for (path, equals) in &flags {
                let mut with = spec.clone();
                with.reasoning = Some(ReasoningRule::Flag {
                    path: path.clone(),
                    equals: equals.clone(),
                    sticky,
                });
                if run(&with, self.input).is_some_and(|d| self.target.accepts(&d, true)) {
                    let scope = if path.starts_with('/') {
                        "of the event"
                    } else {
                        "of the list element the text belongs to"
                    };
                    let note = format!(
                        "reasoning: text from events whose {} {scope} is {equals}{}",
                        path_label(path),
                        if sticky {
                            " (the flag holds until it changes)"
                        } else {
                            ""
                        }
                    );
                    return Some((with, note));
                }
            }
        }
        for rule in markup_rules(&reading.text) {
            let mut with = spec.clone();
            with.reasoning = Some(rule);
            if run(&with, self.input).is_some_and(|d| self.target.accepts(&d, true)) {
                let note = with
                    .reasoning
                    .as_ref()
                    .map(describe_markup)
                    .unwrap_or_default();
                return Some((with, note));
            }
        }
        None
    }

    /// Leaves that may flag reasoning events: scalars of the events (absolute paths) with few
    /// distinct values, and for a patch path with a `-1` step, the scalars of the list
    /// elements (relative paths).
    fn flag_candidates(&self, rule: &TextRule) -> Vec<(String, Value)> {
        const MAX_VALUES: usize = 6;
        const MAX_CANDIDATES: usize = 160;
        let mut order: Vec<String> = Vec::new();
        let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut add = |path: String, value: &Value| {
            if let Value::String(s) = value
                && (s.is_empty() || s.chars().count() > 40)
            {
                return;
            }
            let entry = seen.entry(path.clone()).or_default();
            if entry.is_empty() {
                order.push(path);
            }
            if !entry.contains(value) && entry.len() <= MAX_VALUES {
                entry.push(value.clone());
            }
        };
        let element_key = element_key(&rule.path);
        for event in self.events {
            let Some(value) = &event.value else { continue };
            if let Some(key) = &element_key {
                for element in elements_with(value, key) {
                    for (path, leaf) in scalars(element) {
                        let relative = path.trim_start_matches('/').to_owned();
                        if relative != key.join("/") {
                            add(relative, leaf);
                        }
                    }
                }
            }
            if rule.mode == Accrual::AppendPatch && is_patch_op_or_batch(value) {
                continue;
            }
            for (path, leaf) in scalars(value) {
                if path != rule.path {
                    add(path, leaf);
                }
            }
        }
        let mut out = Vec::new();
        for path in order {
            let values = &seen[&path];
            // Ids and counters are not flags, however well they happen to split.
            if values.len() > MAX_VALUES || id_named(&path) {
                continue;
            }
            for value in values {
                out.push((path.clone(), value.clone()));
            }
        }
        // Relative (element) paths first: they are the precise reading for `-1` paths. Then
        // booleans, then strings (`type`, `kind`), numbers last.
        out.sort_by_key(|(path, value)| {
            let kind = match value {
                Value::Bool(_) => 0,
                Value::String(_) => 1,
                _ => 2,
            };
            (path.starts_with('/'), kind)
        });
        out.truncate(MAX_CANDIDATES);
        out
    }
}

fn reading(rule: TextRule, text: String) -> Reading {
    let normalized = normalize(&text);
    Reading {
        rule,
        text,
        normalized,
    }
}

fn path_label(path: &str) -> String {
    if path.is_empty() {
        "the whole event".to_owned()
    } else {
        format!("`{path}`")
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// What the replay decoder's cumulative accrual yields for these values.
fn cumulative_text(values: &[&str]) -> String {
    let mut out = String::new();
    let mut previous = "";
    for value in values.iter().copied().filter(|v| !v.is_empty()) {
        out.push_str(value.strip_prefix(previous).unwrap_or(value));
        previous = value;
    }
    out
}

/// `{"p":…, "o":…, "v":…}`, `{"v":…}`, or a list of such.
fn is_patch_op_or_batch(value: &Value) -> bool {
    match value {
        Value::Object(map) => {
            map.contains_key("v")
                && map
                    .keys()
                    .all(|k| matches!(k.as_str(), "p" | "o" | "v" | "c"))
        }
        Value::Array(items) => !items.is_empty() && items.iter().all(is_patch_op_or_batch),
        _ => false,
    }
}

/// Whether the stream is made of patch operations (most JSON events are ops).
fn is_patch_like(events: &[Event]) -> bool {
    let json: Vec<&Value> = events.iter().filter_map(|e| e.value.as_ref()).collect();
    let ops = json.iter().filter(|v| is_patch_op_or_batch(v)).count();
    ops >= 2 && ops * 10 >= json.len() * 3
}

/// Patch paths that may carry text: every op path with a string value, every string leaf of
/// a set value below its path, and `list/-1/key` for lists of objects.
fn patch_paths(events: &[Event]) -> Vec<String> {
    const MAX_PATHS: usize = 64;
    let mut collector = PathCollector::default();
    for event in events {
        if let Some(value) = &event.value
            && is_patch_op_or_batch(value)
        {
            collector.ops(value, "");
        }
    }
    let slash = collector.slashed * 2 >= collector.total.max(1);
    let mut out: Vec<String> = Vec::new();
    for tokens in collector.paths {
        let joined = tokens.join("/");
        let path = if slash || joined.is_empty() {
            format!("/{joined}")
        } else {
            joined
        };
        if !out.contains(&path) {
            out.push(path);
        }
        if out.len() >= MAX_PATHS {
            break;
        }
    }
    out
}

#[derive(Default)]
struct PathCollector {
    /// Escaped tokens of each candidate path.
    paths: Vec<Vec<String>>,
    slashed: usize,
    total: usize,
}

impl PathCollector {
    fn ops(&mut self, value: &Value, prefix: &str) {
        match value {
            Value::Array(items) => {
                for item in items {
                    self.ops(item, prefix);
                }
            }
            Value::Object(op) => {
                let p = op.get("p").and_then(Value::as_str);
                if let Some(p) = p
                    && !p.is_empty()
                {
                    self.total += 1;
                    if p.starts_with('/') {
                        self.slashed += 1;
                    }
                }
                let rel = p.unwrap_or("").trim_start_matches('/');
                let path = match (prefix.is_empty(), rel.is_empty()) {
                    (true, _) => rel.to_owned(),
                    (false, true) => prefix.to_owned(),
                    (false, false) => format!("{prefix}/{rel}"),
                };
                let o = op.get("o").and_then(Value::as_str).unwrap_or("");
                let Some(v) = op.get("v") else { return };
                let batch = o.eq_ignore_ascii_case("patch")
                    || o.eq_ignore_ascii_case("batch")
                    || (p.is_none() && !op.contains_key("o") && is_op_list(v));
                if batch {
                    self.ops(v, &path);
                    return;
                }
                let base: Vec<String> = if path.is_empty() {
                    Vec::new()
                } else {
                    path.split('/').map(str::to_owned).collect()
                };
                match v {
                    Value::String(_) if p.is_some() => self.paths.push(base),
                    Value::Object(_) | Value::Array(_) => {
                        let appended_list = o.eq_ignore_ascii_case("append");
                        self.within(&base, v, appended_list);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Paths below `base` inside the value `v` set (or appended, when `appended_list`) there.
    fn within(&mut self, base: &[String], v: &Value, appended_list: bool) {
        if appended_list {
            let elements: Vec<&Value> = match v {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for element in elements {
                self.last_element_paths(base, element);
            }
            return;
        }
        for (path, _) in strings(v) {
            let mut tokens = base.to_vec();
            tokens.extend(path.trim_start_matches('/').split('/').map(str::to_owned));
            self.paths.push(tokens);
        }
        self.lists_within(base, v);
    }

    /// `list/-1/key` for every list of objects inside `v`.
    fn lists_within(&mut self, base: &[String], v: &Value) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let mut tokens = base.to_vec();
                    tokens.push(escape_token(k));
                    self.lists_within(&tokens, child);
                }
            }
            Value::Array(items) => {
                for item in items.iter().filter(|i| i.is_object()) {
                    self.last_element_paths(base, item);
                }
                for (i, item) in items.iter().enumerate() {
                    let mut tokens = base.to_vec();
                    tokens.push(i.to_string());
                    self.lists_within(&tokens, item);
                }
            }
            _ => {}
        }
    }

    fn last_element_paths(&mut self, list: &[String], element: &Value) {
        if !element.is_object() {
            return;
        }
        for (path, _) in strings(element) {
            let mut tokens = list.to_vec();
            tokens.push("-1".to_owned());
            tokens.extend(path.trim_start_matches('/').split('/').map(str::to_owned));
            self.paths.push(tokens);
        }
    }
}

/// For a patch path with a `-1` step, the (escaped) tokens after the last `-1`.
fn element_key(path: &str) -> Option<Vec<String>> {
    let tokens: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let last = tokens.iter().rposition(|t| *t == "-1")?;
    let rest: Vec<String> = tokens[last + 1..].iter().map(|t| (*t).to_owned()).collect();
    (!rest.is_empty()).then_some(rest)
}

/// Objects anywhere in `value` that have a string at `key` (escaped tokens).
fn elements_with<'v>(value: &'v Value, key: &[String]) -> Vec<&'v Value> {
    fn walk<'v>(value: &'v Value, pointer: &str, out: &mut Vec<&'v Value>) {
        match value {
            Value::Object(map) => {
                if value.pointer(pointer).is_some_and(Value::is_string) {
                    out.push(value);
                }
                for child in map.values() {
                    walk(child, pointer, out);
                }
            }
            Value::Array(items) => {
                for child in items {
                    walk(child, pointer, out);
                }
            }
            _ => {}
        }
    }
    let pointer = format!("/{}", key.join("/"));
    let mut out = Vec::new();
    walk(value, &pointer, &mut out);
    out
}

/// `(open, close)` pairs for tags found in `text` that are closed later.
fn markup_candidates(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        rest = after;
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        let Some(end) = after.find('>') else { break };
        let close = format!("</{name}>");
        if !after[end..].contains(&close) {
            continue;
        }
        let attrs = &after[name.len()..end];
        let mut opens = Vec::new();
        if attrs.trim().is_empty() {
            opens.push(format!("<{name}>"));
        } else {
            if let Some(first) = first_attribute(attrs) {
                opens.push(format!("<{name} {first}"));
            }
            opens.push(format!("<{name}"));
        }
        for open in opens {
            let pair = (open, close.clone());
            if !out.contains(&pair) {
                out.push(pair);
            }
        }
    }
    out
}

/// Markup rules worth trying on a text that holds reasoning and reply: every tag pair as
/// the reasoning's, the most specific reading first. The comparison with the page ignores
/// quote marks at line starts, so a rule that drops them must be tried before one that keeps
/// them; a `<summary>` and answer tags (other pairs) are tried when the text has them.
fn markup_rules(text: &str) -> Vec<ReasoningRule> {
    let pairs = markup_candidates(text);
    let has_summary = text.contains("<summary");
    let has_quotes = text.lines().any(|line| line.trim_start().starts_with('>'));
    let mut out = Vec::new();
    for (open, close) in &pairs {
        if open.starts_with("<summary") {
            continue;
        }
        let mut answers: Vec<Option<Tags>> = pairs
            .iter()
            .filter(|(o, c)| o != open && c != close && o.ends_with('>') && o != "<summary>")
            .map(|(o, c)| {
                Some(Tags {
                    open: o.clone(),
                    close: c.clone(),
                })
            })
            .collect();
        answers.push(None);
        for answer in answers {
            for summary in [has_summary, false] {
                for quoted in [has_quotes, false] {
                    let rule = ReasoningRule::Markup {
                        open: open.clone(),
                        close: close.clone(),
                        summary,
                        quoted,
                        answer: answer.clone(),
                    };
                    if !out.contains(&rule) {
                        out.push(rule);
                    }
                }
            }
        }
    }
    out
}

fn describe_markup(rule: &ReasoningRule) -> String {
    let ReasoningRule::Markup {
        open,
        close,
        summary,
        quoted,
        answer,
    } = rule
    else {
        return String::new();
    };
    let mut note = format!("reasoning: marked up inside the text as {open}…{close}");
    if *summary {
        note.push_str(", its <summary> a heading");
    }
    if *quoted {
        note.push_str(", its lines quoted with `> `");
    }
    if let Some(answer) = answer {
        note.push_str(&format!(
            "; the answer inside {}…{}",
            answer.open, answer.close
        ));
    }
    note
}

/// The first `name="value"` (or bare `name`) of a tag's attribute text.
fn first_attribute(attrs: &str) -> Option<String> {
    let attrs = attrs.trim_start();
    let mut end = 0;
    let mut quote = None;
    for (i, c) in attrs.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() || c == '/' => break,
            _ => {}
        }
        end = i + c.len_utf8();
    }
    let first = &attrs[..end];
    (!first.is_empty()).then(|| first.to_owned())
}

/// Adds done signals, error rules and ids to a spec that reads the reply, keeping only what
/// still decodes the recorded response to the reply.
///
/// - Done: raw non-JSON data that ends an SSE/WebSocket stream (`[DONE]`); an event name seen
///   only on the last event of a stream with several names (`close`, `message_stop`, a
///   numbered line's or a frame's end tag); a leaf of the last JSON event whose value is new
///   at a path seen earlier with other values (a status turning `finished`, a `type` `done`),
///   unless that event is a patch op, whose fields carry everything.
/// - Errors (a success shows none, so this is a conservative default that no recorded event
///   matches): a non-null top-level `error` (its `message` when it is an object), and for
///   SSE an event named `error`.
/// - Ids: a leaf of the early events whose value is an id the request carried from a
///   preflight is `conversation_id`; the first id-named leaf (`…id`, `…Id`, `uuid`) with a
///   new value in the events up to the first text, echoes of the user message excluded, is
///   `message_id`.
fn finish_spec(
    mut spec: ResponseSpec,
    search: &Search<'_>,
    hints: &Hints,
    notes: &mut Vec<String>,
) -> ResponseSpec {
    let events = search.events;
    spec.done = done_signals(search, &spec);
    spec.error = error_rules(search.transport, events);
    spec.ids = ids(search, &spec, hints);
    let check = |spec: &ResponseSpec| {
        run(spec, search.input).is_some_and(|d| {
            search.target.accepts(
                &d,
                matches!(spec.reasoning, Some(ReasoningRule::Flag { .. })),
            ) || (normalize(&d.0) == search.target.reply && spec.reasoning.is_none())
        })
    };
    let baseline = ResponseSpec {
        done: Vec::new(),
        error: Vec::new(),
        ids: BTreeMap::new(),
        ..spec.clone()
    };
    if !check(&spec) && check(&baseline) {
        // Drop what breaks the reading: done signals one at a time, then error rules.
        while !spec.done.is_empty() && !check(&spec) {
            spec.done.pop();
        }
        if !check(&spec) {
            spec.error.clear();
        }
    }
    for signal in &spec.done {
        notes.push(format!("end of reply: {}", describe_signal(signal)));
    }
    for (name, path) in &spec.ids {
        notes.push(format!("id `{name}` read from `{path}`"));
    }
    spec
}

fn describe_signal(signal: &Signal) -> String {
    let mut parts = Vec::new();
    if let Some(event) = &signal.event {
        parts.push(format!("an event named `{event}`"));
    }
    if let Some(data) = &signal.data {
        parts.push(format!("data `{data}`"));
    }
    if let Some(path) = &signal.path {
        match &signal.equals {
            Some(value) => parts.push(format!("`{path}` = {value}")),
            None => parts.push(format!("a value at `{path}`")),
        }
    }
    parts.join(", ")
}

fn done_signals(search: &Search<'_>, spec: &ResponseSpec) -> Vec<Signal> {
    let events = search.events;
    let mut out = Vec::new();
    let Some((last, earlier)) = events.split_last() else {
        return out;
    };
    let transport = search.transport;
    let mut rest = events;
    let mut named_last = false;
    let raw = last.data.trim();
    if matches!(transport, Transport::Sse | Transport::Websocket)
        && last.value.is_none()
        && !raw.is_empty()
        && raw.len() <= 40
        && earlier.iter().all(|e| e.data.trim() != raw)
    {
        out.push(Signal {
            data: Some(raw.to_owned()),
            ..Signal::default()
        });
        rest = earlier;
    } else if let Some(name) = &last.name
        && matches!(
            transport,
            Transport::Sse | Transport::NumberedLines | Transport::LengthPrefixed
        )
        && search.stream_names().len() > 1
        && earlier.iter().all(|e| e.name.as_ref() != Some(name))
    {
        out.push(Signal {
            event: Some(name.clone()),
            ..Signal::default()
        });
        named_last = true;
    }
    let Some(position) = rest.iter().rposition(|e| e.value.is_some()) else {
        return out;
    };
    if named_last && position + 1 == events.len() {
        return out;
    }
    let Some(final_value) = &rest[position].value else {
        return out;
    };
    // Patch ops carry everything in `p`/`o`/`v`: a value new there says nothing.
    if search.patch_like && is_patch_op_or_batch(final_value) {
        return out;
    }
    let reasoning_path = match &spec.reasoning {
        Some(ReasoningRule::Field { path, .. }) => Some(path.as_str()),
        _ => None,
    };
    for (path, value) in scalars(final_value) {
        if path == spec.text.path || Some(path.as_str()) == reasoning_path {
            continue;
        }
        let fresh = match value {
            Value::String(s) => !s.is_empty() && s.chars().count() <= 40,
            Value::Bool(b) => *b,
            _ => false,
        };
        if !fresh {
            continue;
        }
        let before: Vec<&Value> = rest[..position]
            .iter()
            .filter_map(|e| e.value.as_ref()?.pointer(&path))
            .filter(|v| !v.is_null())
            .collect();
        if !before.is_empty() && before.iter().all(|v| *v != value) {
            out.push(Signal {
                path: Some(path),
                equals: Some(value.clone()),
                ..Signal::default()
            });
            break;
        }
    }
    out
}

fn error_rules(transport: Transport, events: &[Event]) -> Vec<ErrorRule> {
    let mut out = Vec::new();
    if transport == Transport::Text {
        return out;
    }
    let has_error_field = events.iter().any(|e| {
        e.value
            .as_ref()
            .and_then(|v| v.get("error"))
            .is_some_and(|v| !v.is_null())
    });
    if !has_error_field {
        out.push(ErrorRule {
            path: Some("/error".to_owned()),
            message: Some("/error/message".to_owned()),
            ..ErrorRule::default()
        });
    }
    if transport == Transport::Sse && !events.iter().any(|e| e.name.as_deref() == Some("error")) {
        out.push(ErrorRule {
            event: Some("error".to_owned()),
            ..ErrorRule::default()
        });
    }
    out
}

fn ids(search: &Search<'_>, spec: &ResponseSpec, hints: &Hints) -> BTreeMap<String, String> {
    let events = search.events;
    // An echo of the user's message carries the prompt somewhere else than where the reply
    // text is (replies may quote the prompt; patch ops carry the reply).
    let is_echo = |value: &Value| {
        !is_patch_op_or_batch(value)
            && strings(value).iter().any(|(path, s)| {
                *path != spec.text.path
                    && hints
                        .echo
                        .iter()
                        .any(|e| !e.is_empty() && s.contains(e.as_str()))
            })
    };
    let first_text = first_text_event(events, spec).unwrap_or(events.len().saturating_sub(1));
    let early: Vec<&Value> = events
        .iter()
        .take(first_text + 1)
        .filter_map(|e| e.value.as_ref())
        .filter(|v| !is_echo(v))
        .collect();
    let mut out = BTreeMap::new();
    let fresh_id = |path: &str, s: &str| {
        id_named(path)
            && s.chars().count() >= 6
            && !s.contains(char::is_whitespace)
            && !hints.request_values.iter().any(|r| r == s)
            && !hints.conversation_values.iter().any(|r| r == s)
    };
    // The conversation: a value the request took from a preflight; else, when no call made
    // it before (the first chat call does), an id whose key names a conversation.
    let conversation = early
        .iter()
        .find_map(|value| {
            strings(value)
                .into_iter()
                .find(|(_, s)| hints.conversation_values.iter().any(|c| c == s))
                .map(|(path, _)| path)
        })
        .or_else(|| {
            early.iter().find_map(|value| {
                strings(value)
                    .into_iter()
                    .find(|(path, s)| fresh_id(path, s) && names_conversation(path))
                    .map(|(path, _)| path)
            })
        });
    // The message: in the first event with other id-named leaves, one whose path names a
    // message or response first, then a UUID (sites thread replies by UUIDs), else the first
    // in document order.
    let message = early.iter().find_map(|value| {
        let candidates: Vec<(String, &str)> = strings(value)
            .into_iter()
            .filter(|(path, s)| fresh_id(path, s) && Some(path) != conversation.as_ref())
            .collect();
        let rank = |(path, s): &(String, &str)| {
            (
                !names_message(path),
                !crate::learn::infer::values::is_uuid(s),
            )
        };
        candidates
            .iter()
            .enumerate()
            .min_by_key(|(i, c)| (rank(c), *i))
            .map(|(_, (path, _))| path.clone())
    });
    if let Some(path) = conversation {
        out.insert("conversation_id".to_owned(), path);
    }
    if let Some(path) = message {
        out.insert("message_id".to_owned(), path);
    }
    out
}

/// Whether the last key of `path` names a conversation (`conversation_id`, `chatId`,
/// `thread_id`).
fn names_conversation(path: &str) -> bool {
    let key = path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    ["conversation", "chat", "thread", "dialog"]
        .iter()
        .any(|word| key.contains(word))
}

/// Whether `path` names a message or a response (`/message/id`, `response_id`, `msgId`).
fn names_message(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ["message", "msg", "response", "reply", "answer", "turn"]
        .iter()
        .any(|word| lower.contains(word))
}

/// Whether the last key of `path` names an id (`id`, `message_id`, `messageId`, `uuid`).
fn id_named(path: &str) -> bool {
    let key = path.rsplit('/').next().unwrap_or_default();
    let lower = key.to_ascii_lowercase();
    lower == "id"
        || lower == "uuid"
        || lower.ends_with("_id")
        || lower.ends_with("-id")
        || key.ends_with("Id")
        || key.ends_with("ID")
}

/// The index of the first event that carries text for `spec`'s rule.
fn first_text_event(events: &[Event], spec: &ResponseSpec) -> Option<usize> {
    events.iter().position(|e| {
        let Some(value) = &e.value else { return false };
        if spec
            .text
            .event
            .as_deref()
            .is_some_and(|want| e.name.as_deref() != Some(want))
        {
            return false;
        }
        match spec.text.mode {
            Accrual::AppendPatch => {
                is_patch_op_or_batch(value)
                    && strings(value)
                        .iter()
                        .any(|(p, s)| p.ends_with("/v") && !s.trim().is_empty())
            }
            _ => value
                .pointer(&spec.text.path)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
        }
    })
}
