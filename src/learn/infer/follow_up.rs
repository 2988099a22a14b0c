//! Learning how a later turn continues the site's conversation, from a second probe sent in
//! the same conversation once the first reply was complete.
//!
//! The follow-up's chat call is the call after the second probe whose response the first
//! turn's decoder reads text from. It and its preflights are templated like the first turn's,
//! with the values of the first exchange as one more source, tried after the session's own
//! (cookies, storage, `<meta>`: session-wide, not the conversation's) and before later
//! responses:
//! - a value the first turn's preflights produced (the conversation's id) or its reply's ids
//!   returned → `conversation.NAME`;
//! - a value found in the first reply's events and not yet among its ids (the previous
//!   reply's message id, a response id) → a new id of the flow's decoder, `conversation.NAME`;
//! - a number at the same place as in the first turn's request, one or two more → a turn
//!   counter (`turn`, `turn-1`, `turn*2-2`…);
//! - an OpenAI-like message list holding the first exchange → the history is resent.
//!
//! What the follow-up does not make (the create-conversation call) is simply not in it. A
//! follow-up that reuses nothing of the first exchange, or that resends the first messages in
//! a form no source can produce, is not kept: such a site gets a new conversation per request.

use std::collections::BTreeMap;

use serde_json::Value;
use url::Url;

use super::values::{is_high_entropy, is_id_like};
use super::{Chosen, Learned, Learner, Plan, Spot, drop_literal_secrets, key_of};
use crate::flow::{FollowUp, turn_source};
use crate::learn::decoder::{
    self, decode_exchange, describe_call, input_of, normalize, scalars, strings,
};
use crate::recording::{Exchange, Recording};
use crate::replay::decode::Delta;

/// What the first turn left for a follow-up to reuse, and what templating the follow-up
/// found.
#[derive(Debug, Default)]
pub(super) struct Context {
    /// (value, name): values of the first exchange (preflight values, reply ids).
    values: Vec<(String, String)>,
    /// (value, JSON pointer into its event): id-like leaves of the first reply's events.
    reply_leaves: Vec<(String, String)>,
    /// JSON pointer → number, in the first turn's requests.
    numbers: BTreeMap<String, f64>,
    /// A WebSocket chat call: the messages the first turn sent before its prompt (sent again
    /// on a new socket), with their slots.
    socket_prefix: Vec<Value>,
    socket_prefix_slots: BTreeMap<String, String>,
    /// The first probe's marker and the first reply, normalized: their presence in a
    /// follow-up means it resends the history.
    marker: String,
    reply: String,
    /// When the second probe was sent (recording time).
    sent_ms: f64,
    /// Names of the first exchange's values and ids (a new id gets another).
    reserved: Vec<String>,
    pub(super) resends_history: bool,
    /// The first exchange's messages were found in a form no source produces.
    history_unplanned: bool,
    /// Whether any value of the first exchange is reused.
    reuses: bool,
    /// New ids of the decoder: name → pointer.
    new_ids: BTreeMap<String, String>,
    /// (pointer, source) of turn counters.
    counters: Vec<(String, String)>,
}

/// Adds what the second probe shows to `learned`: the flow's `follow_up`, ids its decoder
/// must now keep, turn counters in the first turn's request. When no follow-up can be
/// learned, a note says why and the flow keeps starting a new conversation per request.
pub(super) fn learn(first: &Recording, second: &Recording, page: Url, learned: &mut Learned) {
    match infer(first, second, page, learned) {
        Ok(found) => {
            let flow = &mut learned.flow;
            for (name, path) in found.ids {
                flow.response.ids.insert(name, path);
            }
            for (pointer, source) in &found.counters {
                let literal = flow
                    .request
                    .body
                    .as_ref()
                    .and_then(|b| b.pointer(pointer))
                    .is_some_and(Value::is_number);
                if literal {
                    flow.request.slots.insert(pointer.clone(), source.clone());
                }
            }
            flow.follow_up = Some(found.follow_up);
            drop_literal_secrets(flow, &mut learned.suspicious);
            learned.notes.extend(found.notes);
        }
        Err(reason) => learned.notes.push(format!(
            "later turns: {reason}; each request starts a new site conversation, the history \
             flattened into the prompt"
        )),
    }
}

struct Found {
    follow_up: FollowUp,
    ids: BTreeMap<String, String>,
    counters: Vec<(String, String)>,
    notes: Vec<String>,
}

fn infer(
    first: &Recording,
    second: &Recording,
    page: Url,
    learned: &Learned,
) -> Result<Found, String> {
    if second.exchanges.is_empty() {
        return Err("the second probe recorded no request".into());
    }
    let context = context(first, second, learned);
    let mut learner = Learner::new(second, page);
    learner.follow_up = Some(context);
    let chosen = learner.find_follow_up_call(&learned.flow.response)?;
    let call = describe_call(&second.exchanges[chosen.index]);
    let (request, preflight) = learner.template_calls(&chosen);
    let context = learner.follow_up.take().unwrap_or_default();
    if context.history_unplanned {
        return Err(format!(
            "{call} resends the earlier messages in a form the learner cannot produce"
        ));
    }
    if !context.reuses && !context.resends_history {
        return Err(format!(
            "{call} of the second message named nothing of the first exchange (no \
             conversation the learner can continue)"
        ));
    }
    let mut notes = vec![format!(
        "later turns: {call}{}, with {}",
        if preflight.is_empty() {
            String::new()
        } else {
            format!(
                " after {}",
                preflight
                    .iter()
                    .map(|s| format!("{} {}", s.http.method, s.http.url))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        if context.resends_history {
            "the whole history resent"
        } else {
            "only the new message sent"
        }
    )];
    notes.extend(
        learner
            .notes
            .into_iter()
            .map(|n| format!("later turns: {n}")),
    );
    for finding in learner.suspicious {
        notes.push(format!("later turns: {finding}"));
    }
    Ok(Found {
        follow_up: FollowUp {
            preflight,
            request,
            resends_history: context.resends_history,
        },
        ids: context.new_ids,
        counters: context.counters,
        notes,
    })
}

/// What the first exchange offers a follow-up.
fn context(first: &Recording, second: &Recording, learned: &Learned) -> Context {
    let flow = &learned.flow;
    let chat = &first.exchanges[learned.chat_index];
    let mut context = Context {
        marker: first.marker.clone(),
        reply: normalize(&first.rendered_reply),
        sent_ms: second.sent_ms.unwrap_or(f64::MIN),
        ..Context::default()
    };
    for (name, value) in &learned.observed {
        context.values.push((value.clone(), name.clone()));
        context.reserved.push(name.clone());
    }
    let deltas = decode_exchange(&flow.response, chat).unwrap_or_default();
    for delta in deltas {
        if let Delta::Id { name, value } = delta {
            context.values.push((value, name.clone()));
            context.reserved.push(name);
        }
    }
    context.reserved.extend(flow.response.ids.keys().cloned());
    if let Some(input) = input_of(chat)
        && let Some(events) = decoder::split_events(flow.response.transport, &input)
    {
        for value in events.iter().filter_map(|e| e.value.as_ref()) {
            for (path, leaf) in strings(value) {
                if is_id_like(leaf) && !context.reply_leaves.iter().any(|(v, _)| v == leaf) {
                    context.reply_leaves.push((leaf.to_owned(), path));
                }
            }
        }
    }
    for (i, exchange) in first.exchanges.iter().enumerate() {
        let carries = exchange
            .request_body
            .as_ref()
            .is_some_and(|b| String::from_utf8_lossy(&b.0).contains(&first.marker));
        if i != learned.chat_index && !carries {
            continue;
        }
        let body = exchange
            .request_body
            .as_ref()
            .and_then(|b| serde_json::from_slice::<Value>(&b.0).ok());
        for (pointer, leaf) in body.iter().flat_map(scalars) {
            if let Some(n) = leaf.as_f64() {
                context.numbers.entry(pointer).or_insert(n);
            }
        }
    }
    if let Some(Value::Array(messages)) = &flow.request.body {
        let prompt_at = flow.request.slots.iter().find_map(|(pointer, source)| {
            matches!(source.as_str(), "prompt" | "last_user" | "messages")
                .then(|| pointer.split('/').nth(1)?.parse::<usize>().ok())
                .flatten()
        });
        if let Some(at) = prompt_at {
            context.socket_prefix = messages[..at.min(messages.len())].to_vec();
            context.socket_prefix_slots = flow
                .request
                .slots
                .iter()
                .filter(|(pointer, _)| {
                    pointer
                        .split('/')
                        .nth(1)
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i < at)
                })
                .map(|(p, s)| (p.clone(), s.clone()))
                .collect();
        }
    }
    context
}

impl Learner<'_> {
    /// The follow-up's chat call: a carrier of the second probe whose response the first
    /// turn's decoder reads text from (the last such), else a later call whose response does.
    fn find_follow_up_call(&self, spec: &crate::flow::ResponseSpec) -> Result<Chosen, String> {
        let carriers: Vec<usize> = self
            .exchanges()
            .iter()
            .enumerate()
            .filter(|(_, e)| !is_navigation(e) && self.carries_marker(e))
            .map(|(i, _)| i)
            .collect();
        let Some(&first) = carriers.first() else {
            return Err("no request carried the second message".into());
        };
        let reads_text = |e: &Exchange| {
            decode_exchange(spec, e).is_some_and(|d| {
                d.iter().any(|d| match d {
                    Delta::Text(t) | Delta::Reasoning(t) => !t.trim().is_empty(),
                    _ => false,
                })
            })
        };
        let chosen = carriers
            .iter()
            .rev()
            .copied()
            .find(|i| reads_text(&self.exchanges()[*i]))
            .or_else(|| {
                (first + 1..self.exchanges().len())
                    .find(|i| !carriers.contains(i) && reads_text(&self.exchanges()[*i]))
            });
        let Some(index) = chosen else {
            return Err(format!(
                "no call after the second message ({} first) answered in the first reply's \
                 format",
                describe_call(&self.exchanges()[first])
            ));
        };
        Ok(Chosen {
            index,
            carriers: carriers.iter().copied().filter(|c| *c < index).collect(),
        })
    }

    /// How a value of the follow-up is sent, when the first turn explains it (see the module
    /// docs); `None` leaves it to the usual sources.
    pub(super) fn plan_from_first_turn(
        &mut self,
        index: usize,
        _at: f64,
        value: &str,
        spot: &Spot,
    ) -> Option<Plan> {
        let context = self.follow_up.as_mut()?;
        let normalized = normalize(value);
        let is_history = value.contains(&context.marker)
            || (normalized.chars().count() >= 20 && context.reply.contains(&normalized));
        if is_history {
            context.history_unplanned = true;
            return Some(Plan::Keep);
        }
        if !(is_id_like(value) || is_high_entropy(value)) {
            return None;
        }
        if self.sources.find_in_session(value).is_some() {
            // Session-wide (a cookie, a stored token, the page's CSRF token): the usual way.
            return None;
        }
        let call = describe_call(&self.exchanges()[index]);
        let context = self.follow_up.as_mut()?;
        if let Some((_, name)) = context.values.iter().find(|(v, _)| v == value) {
            let name = name.clone();
            context.reuses = true;
            self.notes.push(format!(
                "{} of {call} is `{name}` of the previous exchange: `{{{{conversation.{name}}}}}`",
                spot.label
            ));
            return Some(Plan::Source(format!("conversation.{name}")));
        }
        let path = context
            .reply_leaves
            .iter()
            .find(|(v, _)| v == value)
            .map(|(_, p)| p.clone())?;
        let base = key_of(&path).unwrap_or_else(|| "reply_id".to_owned());
        let mut name = crate::learn::infer::values::snake_case(&base);
        let mut n = 2;
        while context.reserved.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        context.reserved.push(name.clone());
        context.values.push((value.to_owned(), name.clone()));
        context.new_ids.insert(name.clone(), path.clone());
        context.reuses = true;
        self.notes.push(format!(
            "{} of {call} is the previous reply's `{path}`: kept as the id `{name}`, sent as \
             `{{{{conversation.{name}}}}}`",
            spot.label
        ));
        Some(Plan::Source(format!("conversation.{name}")))
    }

    /// A turn counter: `number` at `pointer` of the follow-up, where the first turn sent one
    /// or two less.
    pub(super) fn counter(&mut self, pointer: &str, number: f64) -> Option<String> {
        let context = self.follow_up.as_mut()?;
        let first = *context.numbers.get(pointer)?;
        if first.fract() != 0.0 || number.fract() != 0.0 || !(0.0..1e6).contains(&first) {
            return None;
        }
        let source = turn_source(first as i64, number as i64)?;
        context.counters.push((pointer.to_owned(), source.clone()));
        context.reuses = true;
        self.notes.push(format!(
            "body `{pointer}` counts the turns ({first} then {number}): `{source}`"
        ));
        Some(source)
    }

    /// A follow-up on a WebSocket the first turn opened sends only its new message there; on
    /// a new socket the first turn's messages before the prompt (an auth frame) go first.
    pub(super) fn with_socket_prefix(
        &self,
        exchange: &Exchange,
        messages: Value,
        slots: BTreeMap<String, String>,
    ) -> (Value, BTreeMap<String, String>) {
        let Some(context) = &self.follow_up else {
            return (messages, slots);
        };
        let reused = exchange.started_ms < context.sent_ms;
        let Value::Array(sent) = messages else {
            return (messages, slots);
        };
        if !reused || context.socket_prefix.is_empty() {
            return (Value::Array(sent), slots);
        }
        let shift = context.socket_prefix.len();
        let mut all = context.socket_prefix.clone();
        all.extend(sent);
        let mut shifted = context.socket_prefix_slots.clone();
        for (pointer, source) in slots {
            let mut tokens: Vec<String> = pointer.split('/').map(str::to_owned).collect();
            if let Some(i) = tokens.get(1).and_then(|t| t.parse::<usize>().ok()) {
                tokens[1] = (i + shift).to_string();
            }
            shifted.insert(tokens.join("/"), source);
        }
        (Value::Array(all), shifted)
    }
}

/// A page navigation (a form submitted natively): never a chat call.
pub(crate) fn is_navigation(exchange: &Exchange) -> bool {
    exchange.resource_type.eq_ignore_ascii_case("document")
}
