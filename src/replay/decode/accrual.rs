//! The accrual engine: one framed event in, text/reasoning/id/done deltas out, all driven by
//! the `ResponseSpec`. Every transport feeds it; it never sees bytes.
//!
//! Order of work per event: raw-data done signals, error rules, ids, the reasoning flag,
//! text accrual, then the done signals that need the event's JSON. After a done signal or an
//! in-band error the engine is stopped and ignores everything that follows.

use serde_json::Value;

use super::markup::Markup;
use super::patch::{Patch, PatchTarget};
use super::pointer::Pointer;
use super::select::Selection;
use super::{DecodeError, Delta};
use crate::flow::{Accrual, ErrorRule, ReasoningRule, ResponseSpec, Signal};

/// How the text (or the reasoning field) accrues in events.
#[derive(Debug)]
struct Rule {
    event: Option<String>,
    mode: Accrual,
    pointer: Pointer,
    /// `true` for the reasoning field rule: everything it finds is reasoning.
    reasoning: bool,
    /// Cumulative mode: the previous value, per output channel (text, reasoning); with markup,
    /// the text and the reasoning the previous value held.
    previous: [String; 2],
    /// Cumulative mode with markup: the last value, whole (its end may be a partial tag).
    last: String,
}

impl Rule {
    fn new(path: &str, mode: Accrual, event: &Option<String>, reasoning: bool) -> Self {
        Self {
            event: event.clone(),
            mode,
            pointer: Pointer::parse(path),
            reasoning,
            previous: Default::default(),
            last: String::new(),
        }
    }

    fn accepts(&self, name: Option<&str>) -> bool {
        self.event.as_deref().is_none_or(|want| name == Some(want))
    }
}

/// Where a reasoning flag is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagScope {
    /// On the event.
    Event,
    /// On the list element the text belongs to (append-patch `-1` paths, relative flag path).
    Element,
}

#[derive(Debug)]
pub(super) struct Flag {
    pointer: Pointer,
    scope: FlagScope,
    equals: Value,
    sticky: bool,
    /// The last seen state (sticky flags).
    last: bool,
    /// The state for the event being decoded (event scope).
    current: bool,
}

impl Flag {
    /// Whether the text from an event (or list element) with this flag `value` is reasoning.
    fn judge(&mut self, value: Option<&Value>) -> bool {
        match value.filter(|v| !v.is_null()) {
            Some(found) => {
                let reasoning = *found == self.equals;
                if self.sticky {
                    self.last = reasoning;
                }
                reasoning
            }
            None => self.sticky && self.last,
        }
    }
}

/// Where decoded text goes: the flag decides its channel, markup splits the text channel.
#[derive(Debug, Default)]
pub(super) struct Output {
    pub(super) flag: Option<Flag>,
    markup: Option<Markup>,
}

impl Output {
    /// Emits `piece` found by a rule; `element` is the list element it belongs to, if any.
    pub(super) fn emit(
        &mut self,
        rule_is_reasoning: bool,
        element: Option<&Value>,
        piece: &str,
        out: &mut Vec<Delta>,
    ) {
        let reasoning = rule_is_reasoning || self.flag_says_reasoning(element);
        self.emit_to(reasoning, piece, out);
    }

    pub(super) fn flag_says_reasoning(&mut self, element: Option<&Value>) -> bool {
        match &mut self.flag {
            None => false,
            Some(flag) if flag.scope == FlagScope::Element => {
                let found = element.and_then(|e| flag.pointer.get(e));
                flag.judge(found)
            }
            Some(flag) => flag.current,
        }
    }

    fn emit_to(&mut self, reasoning: bool, piece: &str, out: &mut Vec<Delta>) {
        if piece.is_empty() {
            return;
        }
        if reasoning {
            out.push(Delta::Reasoning(piece.to_owned()));
        } else if let Some(markup) = &mut self.markup {
            markup.push(piece, out);
        } else {
            out.push(Delta::Text(piece.to_owned()));
        }
    }

    fn flush(&mut self, out: &mut Vec<Delta>) {
        if let Some(markup) = &mut self.markup {
            markup.flush(out);
        }
    }

    /// One value of a cumulative stream with markup: every value is the whole marked-up text
    /// so far (its closing tags move as it grows), so it is split first and each channel is
    /// then diffed against what the previous value held. `last` is the end of the stream: a
    /// partial tag held back so far is text after all.
    fn cumulative_markup(
        &mut self,
        value: &str,
        previous: &mut [String; 2],
        last: bool,
        out: &mut Vec<Delta>,
    ) {
        let Some(markup) = &self.markup else {
            return;
        };
        let (text, reasoning) = markup.split_whole(value, last);
        for (channel, now) in [(1, reasoning), (0, text)] {
            let before = &mut previous[channel];
            if let Some(piece) = now.strip_prefix(before.as_str()) {
                emit_piece(channel == 1, piece, out);
            } else if before.starts_with(&now) {
                // Shorter than before (a partial tag held back): nothing new yet.
                continue;
            } else {
                // Not an extension: a new segment, as in plain cumulative accrual.
                emit_piece(channel == 1, &now, out);
            }
            *before = now;
        }
    }
}

#[derive(Debug)]
struct Condition {
    event: Option<String>,
    data: Option<String>,
    pointer: Option<Pointer>,
    equals: Option<Value>,
}

impl Condition {
    fn from_signal(signal: &Signal) -> Self {
        Self {
            event: signal.event.clone(),
            data: signal.data.clone(),
            pointer: signal.path.as_deref().map(Pointer::parse),
            equals: signal.equals.clone(),
        }
    }

    /// A condition that names nothing matches nothing (rather than every event).
    fn is_empty(&self) -> bool {
        self.event.is_none() && self.data.is_none() && self.pointer.is_none()
    }

    fn needs_json(&self) -> bool {
        self.pointer.is_some()
    }

    /// The value at the pointer when the event matches (`Null` when there is no pointer).
    fn matches<'v>(
        &self,
        name: Option<&str>,
        data: &str,
        value: Option<&'v Value>,
    ) -> Option<&'v Value> {
        if self.is_empty() {
            return None;
        }
        if let Some(want) = &self.event
            && name != Some(want.as_str())
        {
            return None;
        }
        if let Some(want) = &self.data
            && data.trim() != want.trim()
        {
            return None;
        }
        let Some(pointer) = &self.pointer else {
            return Some(&Value::Null);
        };
        let found = pointer.get(value?).filter(|v| !v.is_null())?;
        match &self.equals {
            Some(want) if found != want => None,
            _ => Some(found),
        }
    }
}

#[derive(Debug)]
struct ErrorCheck {
    when: Condition,
    message: Option<Pointer>,
}

impl ErrorCheck {
    fn new(rule: &ErrorRule) -> Self {
        Self {
            when: Condition {
                event: rule.event.clone(),
                data: None,
                pointer: rule.path.as_deref().map(Pointer::parse),
                equals: rule.equals.clone(),
            },
            message: rule.message.as_deref().map(Pointer::parse),
        }
    }

    fn check(&self, name: Option<&str>, data: &str, value: Option<&Value>) -> Option<String> {
        let at_path = self.when.matches(name, data, value)?;
        let from_message = self
            .message
            .as_ref()
            .zip(value)
            .and_then(|(pointer, value)| pointer.get(value))
            .filter(|v| !v.is_null());
        let message = match from_message {
            Some(found) => text_of(found),
            None if self.when.pointer.is_some() => text_of(at_path),
            None => data.trim().to_owned(),
        };
        Some(message)
    }
}

/// A string as is; anything else as compact JSON.
pub(super) fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) struct Engine {
    text: Rule,
    reasoning: Option<Rule>,
    output: Output,
    patch: Patch,
    done: Vec<Condition>,
    errors: Vec<ErrorCheck>,
    /// Name, pointer, whether already emitted.
    ids: Vec<(String, Pointer, bool)>,
    /// Whether events must be JSON (a non-JSON event is then `Malformed`).
    json_required: bool,
    /// The parts of each event the rules read.
    selection: Selection,
    finished_done: bool,
    stopped: bool,
}

impl Engine {
    pub(super) fn new(spec: &ResponseSpec, json_required: bool) -> Self {
        let text = Rule::new(&spec.text.path, spec.text.mode, &spec.text.event, false);
        let mut output = Output::default();
        let mut reasoning = None;
        match &spec.reasoning {
            None => {}
            Some(ReasoningRule::Field { path, mode, event }) => {
                reasoning = Some(Rule::new(path, *mode, event, true));
            }
            Some(ReasoningRule::Flag {
                path,
                equals,
                sticky,
            }) => {
                let relative = !path.starts_with('/');
                let element_scope = text.mode == Accrual::AppendPatch
                    && relative
                    && text.pointer.last_list_step().is_some();
                output.flag = Some(Flag {
                    pointer: Pointer::parse(path),
                    scope: if element_scope {
                        FlagScope::Element
                    } else {
                        FlagScope::Event
                    },
                    equals: equals.clone(),
                    sticky: *sticky,
                    last: false,
                    current: false,
                });
            }
            Some(rule @ ReasoningRule::Markup { .. }) => {
                output.markup = Markup::from_rule(rule);
            }
        }
        let mut targets = Vec::new();
        for rule in std::iter::once(&text).chain(reasoning.as_ref()) {
            if rule.mode == Accrual::AppendPatch {
                targets.push(PatchTarget::new(
                    rule.pointer.clone(),
                    rule.event.clone(),
                    rule.reasoning,
                ));
            }
        }
        let patch = Patch::new(targets);
        let done: Vec<Condition> = spec.done.iter().map(Condition::from_signal).collect();
        let errors: Vec<ErrorCheck> = spec.error.iter().map(ErrorCheck::new).collect();
        let ids: Vec<(String, Pointer, bool)> = spec
            .ids
            .iter()
            .map(|(name, path)| (name.clone(), Pointer::parse(path), false))
            .collect();
        // Patches address whatever the event names, so they need all of it.
        let selection = if patch.has_targets() {
            Selection::Everything
        } else {
            let rules = std::iter::once(&text).chain(reasoning.as_ref());
            Selection::of(
                rules
                    .map(|r| &r.pointer)
                    .chain(output.flag.as_ref().map(|f| &f.pointer))
                    .chain(ids.iter().map(|(_, p, _)| p))
                    .chain(done.iter().filter_map(|c| c.pointer.as_ref()))
                    .chain(errors.iter().filter_map(|e| e.when.pointer.as_ref()))
                    .chain(errors.iter().filter_map(|e| e.message.as_ref())),
            )
        };
        Self {
            text,
            reasoning,
            output,
            patch,
            done,
            errors,
            ids,
            json_required,
            selection,
            finished_done: false,
            stopped: false,
        }
    }

    /// A done signal was seen.
    pub(super) fn is_done(&self) -> bool {
        self.finished_done
    }

    /// Done, or failed: nothing more will be decoded.
    pub(super) fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Decodes one framed event. `name` is its event name (SSE `event:`, numbered-line tag,
    /// frame flag), `data` its payload.
    pub(super) fn on_event(
        &mut self,
        name: Option<&str>,
        data: &str,
        out: &mut Vec<Delta>,
    ) -> Result<(), DecodeError> {
        if self.stopped {
            return Ok(());
        }
        // Raw-data signals (`[DONE]`) first: such data is usually not JSON.
        if self
            .done
            .iter()
            .any(|c| !c.needs_json() && c.matches(name, data, None).is_some())
        {
            self.finish_done(out);
            return Ok(());
        }
        let value = match self.selection.parse(data) {
            Ok(value) => Some(value),
            Err(_) if !self.json_required => None,
            Err(e) => {
                self.stopped = true;
                return Err(DecodeError::Malformed(format!(
                    "event{} is not JSON ({e}): {}",
                    name.map(|n| format!(" `{n}`")).unwrap_or_default(),
                    snippet(data)
                )));
            }
        };
        self.on_value(name, data, value, out)
    }

    /// Decodes one event whose JSON is already parsed (`None` when it is not JSON).
    pub(super) fn on_value(
        &mut self,
        name: Option<&str>,
        data: &str,
        value: Option<Value>,
        out: &mut Vec<Delta>,
    ) -> Result<(), DecodeError> {
        if self.stopped {
            return Ok(());
        }
        if let Some(message) = self
            .errors
            .iter()
            .find_map(|rule| rule.check(name, data, value.as_ref()))
        {
            self.stopped = true;
            self.output.flush(out);
            return Err(DecodeError::Upstream(message));
        }
        let Some(value) = value else {
            if self
                .done
                .iter()
                .any(|c| c.matches(name, data, None).is_some())
            {
                self.finish_done(out);
            }
            return Ok(());
        };
        for (id_name, pointer, seen) in &mut self.ids {
            if *seen {
                continue;
            }
            let found = match pointer.get(&value) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            *seen = true;
            out.push(Delta::Id {
                name: id_name.clone(),
                value: found,
            });
        }
        if let Some(flag) = &mut self.output.flag
            && flag.scope == FlagScope::Event
        {
            let found = flag.pointer.get(&value);
            flag.current = flag.judge(found);
        }
        let is_done = self
            .done
            .iter()
            .any(|c| c.matches(name, data, Some(&value)).is_some());

        for rule in std::iter::once(&mut self.text).chain(self.reasoning.as_mut()) {
            if rule.mode != Accrual::AppendPatch && rule.accepts(name) {
                accrue(rule, &value, &mut self.output, out);
            }
        }
        if self.patch.has_targets() {
            self.patch.apply_event(name, value, &mut self.output, out);
        }
        if is_done {
            self.finish_done(out);
        }
        Ok(())
    }

    /// The end-of-stream frame of a length-prefixed body: decoded like any event (its JSON
    /// may be empty), then, unless a rule already decided, an `{"error": …}` in it is an
    /// upstream error (the Connect protocol's end-of-stream message) and otherwise the reply
    /// is done.
    pub(super) fn on_end_stream(
        &mut self,
        name: Option<&str>,
        data: &str,
        out: &mut Vec<Delta>,
    ) -> Result<(), DecodeError> {
        if self.stopped {
            return Ok(());
        }
        let value = if data.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str::<Value>(data).map_err(|e| {
                self.stopped = true;
                DecodeError::Malformed(format!(
                    "end-of-stream frame is not JSON ({e}): {}",
                    snippet(data)
                ))
            })?)
        };
        let error = value
            .as_ref()
            .and_then(|v| v.get("error"))
            .filter(|e| !e.is_null())
            .map(|e| match e.get("message") {
                Some(Value::String(message)) => message.clone(),
                _ => text_of(e),
            });
        self.on_value(name, data, value, out)?;
        if self.stopped {
            return Ok(());
        }
        if let Some(message) = error {
            self.stopped = true;
            self.output.flush(out);
            return Err(DecodeError::Upstream(message));
        }
        self.finish_done(out);
        Ok(())
    }

    /// The body itself is text (the `text` transport).
    pub(super) fn on_text(&mut self, piece: &str, out: &mut Vec<Delta>) {
        if !self.stopped {
            self.output.emit_to(false, piece, out);
        }
    }

    /// End of the body (or of the reply): pending markup state is flushed.
    pub(super) fn finish(&mut self, out: &mut Vec<Delta>) {
        if !self.stopped {
            self.flush(out);
            self.stopped = true;
        }
    }

    /// A done signal: flush, then `Done` once; everything after is ignored.
    pub(super) fn finish_done(&mut self, out: &mut Vec<Delta>) {
        if self.stopped {
            return;
        }
        self.flush(out);
        out.push(Delta::Done);
        self.finished_done = true;
        self.stopped = true;
    }

    /// Flushes what markup holds back, in the streaming splitter or in the last value of a
    /// cumulative stream.
    fn flush(&mut self, out: &mut Vec<Delta>) {
        self.output.flush(out);
        if self.text.mode == Accrual::Cumulative && !self.text.last.is_empty() {
            let last = std::mem::take(&mut self.text.last);
            self.output
                .cumulative_markup(&last, &mut self.text.previous, true, out);
        }
    }

    /// Marks the engine failed after a framing error.
    pub(super) fn fail(&mut self) {
        self.stopped = true;
    }
}

/// Delta and cumulative accrual of one rule over one event.
fn accrue(rule: &mut Rule, value: &Value, output: &mut Output, out: &mut Vec<Delta>) {
    let Some(Value::String(found)) = rule.pointer.get(value) else {
        return;
    };
    // An empty value carries nothing, and must not restart a cumulative text either.
    if found.is_empty() {
        return;
    }
    let reasoning = rule.reasoning || output.flag_says_reasoning(None);
    match rule.mode {
        Accrual::Delta => output.emit_to(reasoning, found, out),
        Accrual::Cumulative if !reasoning && output.markup.is_some() => {
            output.cumulative_markup(found, &mut rule.previous, false, out);
            rule.last.clear();
            rule.last.push_str(found);
        }
        Accrual::Cumulative => {
            let previous = &mut rule.previous[usize::from(reasoning)];
            let piece = found.strip_prefix(previous.as_str()).unwrap_or(found);
            output.emit_to(reasoning, piece, out);
            previous.clear();
            previous.push_str(found);
        }
        Accrual::AppendPatch => {}
    }
}

fn emit_piece(reasoning: bool, piece: &str, out: &mut Vec<Delta>) {
    if piece.is_empty() {
        return;
    }
    out.push(if reasoning {
        Delta::Reasoning(piece.to_owned())
    } else {
        Delta::Text(piece.to_owned())
    });
}

/// The start of `data`, for error messages.
pub(super) fn snippet(data: &str) -> String {
    const MAX: usize = 120;
    if data.len() <= MAX {
        return format!("`{data}`");
    }
    let mut end = MAX;
    while !data.is_char_boundary(end) {
        end -= 1;
    }
    format!("`{}…` ({} bytes)", &data[..end], data.len())
}
