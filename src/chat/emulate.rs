//! The emulation around one site reply, as a synchronous state machine fed the reply's
//! deltas: tool calls parsed out of the text, the answer cut at a stop sequence or at
//! `max_tokens`, a required call or a JSON answer checked, and what to do when a check fails
//! (one repair turn, then the reply as text). [`super::run`] drives it with the gateway.
//!
//! What goes out at once: reasoning, text outside tool-call blocks (but a tail that could begin
//! a tag or a stop sequence), and each call once its block is complete and checked. What is
//! held until the reply ends: the answer when it must be JSON, and the text while a required
//! call has not come, since a repair turn may replace them.

use serde_json::Value;

use super::calls::{CLOSE, CallParser, OPEN, Piece, parse_block, strip_fence};
use super::cut::{StopCutter, TokenLimit};
use super::reply::{Event, FinishReason};
use super::request::{OutputFormat, Request, Tool, ToolChoice};
use crate::replay::decode::Delta;
use crate::tokens::count_tokens;

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Continue,
    /// The answer is complete (a stop sequence or the token limit): stop the site's reply,
    /// then call [`Emulator::end`].
    Cut,
    /// The reply is over.
    End(FinishReason),
    /// Ask the site again, telling it this problem.
    Repair(String),
}

/// A check that failed, for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// `tool_call_invalid`, `tool_call_missing` or `json_invalid`.
    pub failure: &'static str,
    /// `repair` or `returned_as_text`.
    pub action: &'static str,
    pub problem: String,
}

#[derive(Debug)]
pub struct Emulator {
    tools: Vec<Tool>,
    parallel: bool,
    format: OutputFormat,
    /// `tool_choice` required or named: a reply without a call is repaired.
    required: Option<String>,
    parser: Option<CallParser>,
    stop: Option<StopCutter>,
    stops: Vec<String>,
    limit: Option<TokenLimit>,
    include_reasoning: bool,
    /// This reply as the site wrote it, for a repair turn (kept only when one may follow).
    raw: Option<String>,
    /// The answer held back (JSON, or text before a required call).
    held: Option<String>,
    /// Set on the repair turn: no further repair.
    repairing: bool,
    /// On the repair turn, text outside calls is dropped when the first reply's text already
    /// went out (the site repeats its preamble).
    drop_text: bool,
    /// An invalid block waiting for the repair's outcome.
    failed_block: Option<String>,
    calls: usize,
    text_sent: bool,
    cut: Option<FinishReason>,
    /// For usage: answer and reasoning text, kept only when usage is counted.
    answer: Option<String>,
    reasoning: Option<String>,
    notes: Vec<Note>,
}

impl Emulator {
    pub fn new(request: &Request) -> Self {
        let tools = request.offered_tools().to_vec();
        let json = request.format != OutputFormat::Text;
        let required = match &request.tool_choice {
            ToolChoice::Required if !tools.is_empty() => {
                Some("a tool call is required and the reply calls no tool".to_owned())
            }
            ToolChoice::Named(name) => Some(format!(
                "a call of the tool `{name}` is required and the reply does not call it"
            )),
            _ => None,
        };
        let repairable = !tools.is_empty() || json;
        Self {
            parser: (!tools.is_empty()).then(CallParser::default),
            parallel: request.parallel_tool_calls,
            format: request.format.clone(),
            held: (json || required.is_some()).then(String::new),
            required,
            tools,
            stop: (!request.stop.is_empty()).then(|| StopCutter::new(request.stop.clone())),
            stops: request.stop.clone(),
            limit: request.max_tokens.map(TokenLimit::new),
            include_reasoning: request.include_reasoning,
            raw: repairable.then(String::new),
            repairing: false,
            drop_text: false,
            failed_block: None,
            calls: 0,
            text_sent: false,
            cut: None,
            answer: request.count_usage.then(String::new),
            reasoning: request.count_usage.then(String::new),
            notes: Vec::new(),
        }
    }

    /// The emulator for the repair turn: the same rules, the token budget carried over.
    pub fn for_repair(&self) -> Self {
        Self {
            tools: self.tools.clone(),
            parallel: self.parallel,
            format: self.format.clone(),
            required: self.required.clone(),
            parser: self.parser.as_ref().map(|_| CallParser::default()),
            stop: self
                .stop
                .as_ref()
                .map(|_| StopCutter::new(self.stops.clone())),
            stops: self.stops.clone(),
            limit: self.limit.clone(),
            include_reasoning: self.include_reasoning,
            raw: None,
            held: self.held.as_ref().map(|_| String::new()),
            repairing: true,
            drop_text: self.text_sent,
            failed_block: self.failed_block.clone(),
            calls: self.calls,
            text_sent: self.text_sent,
            cut: None,
            answer: self.answer.clone(),
            reasoning: self.reasoning.clone(),
            notes: Vec::new(),
        }
    }

    /// The reply so far, as the site wrote it.
    pub fn raw(&self) -> &str {
        self.raw.as_deref().unwrap_or("")
    }

    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Tokens of the answer and of the reasoning, when usage is counted.
    pub fn completion_tokens(&self) -> Option<(u64, u64)> {
        let answer = self.answer.as_deref()?;
        let reasoning = self.reasoning.as_deref().unwrap_or("");
        Some((count_tokens(answer), count_tokens(reasoning)))
    }

    pub fn push(&mut self, delta: Delta, out: &mut Vec<Event>) -> Control {
        match delta {
            Delta::Text(text) if !text.is_empty() => {
                if let Some(raw) = &mut self.raw {
                    raw.push_str(&text);
                }
                let mut pieces = Vec::new();
                match &mut self.parser {
                    Some(parser) => parser.push(&text, &mut pieces),
                    None => pieces.push(Piece::Text(text)),
                }
                self.pieces(pieces, out)
            }
            Delta::Reasoning(text) if !text.is_empty() && self.include_reasoning => {
                if let Some(reasoning) = &mut self.reasoning {
                    reasoning.push_str(&text);
                }
                out.push(Event::Reasoning(text));
                Control::Continue
            }
            _ => Control::Continue,
        }
    }

    fn pieces(&mut self, pieces: Vec<Piece>, out: &mut Vec<Event>) -> Control {
        for piece in pieces {
            let control = match piece {
                Piece::Text(text) => self.text(&text, out),
                Piece::Block(block) => self.block(block, out),
            };
            if control != Control::Continue {
                return control;
            }
        }
        Control::Continue
    }

    /// Text outside calls: through the stop sequences and the token limit, then out or held.
    fn text(&mut self, text: &str, out: &mut Vec<Event>) -> Control {
        if self.cut.is_some() {
            return Control::Cut;
        }
        let (text, stopped) = match &mut self.stop {
            Some(stop) => {
                let cut = stop.push(text);
                (cut.text, cut.stopped)
            }
            None => (text.to_owned(), None),
        };
        let full = self.answer_text(&text, out);
        if let Some(stop) = stopped {
            self.cut = Some(FinishReason::StopSequence(stop));
            return Control::Cut;
        }
        if full {
            self.cut = Some(FinishReason::Length);
            return Control::Cut;
        }
        Control::Continue
    }

    /// Passes answer text on (or holds it); returns whether the token limit is reached.
    fn answer_text(&mut self, text: &str, out: &mut Vec<Event>) -> bool {
        // Blank lines between and after calls are layout, not an answer.
        if text.is_empty() || (self.calls > 0 && text.trim().is_empty()) {
            return false;
        }
        let (text, full) = match &mut self.limit {
            Some(limit) => limit.take(text),
            None => (text.to_owned(), false),
        };
        let holding = self.holding();
        if let Some(held) = self.held.as_mut().filter(|_| holding) {
            held.push_str(&text);
        } else if !self.drop_text && !text.is_empty() {
            self.emit_text(text, out);
        }
        full
    }

    /// Whether answer text is held: JSON until the end (unless a call came), text until a
    /// required call comes.
    fn holding(&self) -> bool {
        self.held.is_some() && self.calls == 0
    }

    fn emit_text(&mut self, text: String, out: &mut Vec<Event>) {
        if let Some(answer) = &mut self.answer {
            answer.push_str(&text);
        }
        self.text_sent = true;
        out.push(Event::Text(text));
    }

    fn block(&mut self, block: String, out: &mut Vec<Event>) -> Control {
        if self.cut.is_some() {
            return Control::Cut;
        }
        match parse_block(&block, &self.tools) {
            Ok(calls) => {
                if self.calls == 0 {
                    // Text before the first call goes out before it, JSON or not.
                    if let Some(held) = self.held.take().filter(|h| !h.trim().is_empty()) {
                        self.emit_text(held, out);
                    }
                    self.held = None;
                }
                for call in calls {
                    if !self.parallel && self.calls >= 1 {
                        break;
                    }
                    self.calls += 1;
                    if let Some(answer) = &mut self.answer {
                        answer.push_str(&call.name);
                        answer.push_str(&call.arguments);
                    }
                    let full = self
                        .limit
                        .as_mut()
                        .is_some_and(|l| l.spend(&call.arguments));
                    out.push(Event::ToolCall(call));
                    if full {
                        self.cut = Some(FinishReason::Length);
                        return Control::Cut;
                    }
                }
                Control::Continue
            }
            Err(problem) => {
                if !self.repairing {
                    let problem = match self.calls {
                        0 => problem,
                        n => format!(
                            "{problem} (the {n} call(s) before it were accepted: do not repeat \
                             them)"
                        ),
                    };
                    self.failed_block = Some(block);
                    self.note("tool_call_invalid", "repair", &problem);
                    return Control::Repair(problem);
                }
                self.note("tool_call_invalid", "returned_as_text", &problem);
                let text = format!("{OPEN}{block}{CLOSE}");
                let drop = std::mem::replace(&mut self.drop_text, false);
                let full = self.answer_text(&text, out);
                self.drop_text = drop;
                if full {
                    self.cut = Some(FinishReason::Length);
                    return Control::Cut;
                }
                Control::Continue
            }
        }
    }

    fn note(&mut self, failure: &'static str, action: &'static str, problem: &str) {
        self.notes.push(Note {
            failure,
            action,
            problem: problem.to_owned(),
        });
    }

    /// The end of the site's reply (or of the answer, after [`Control::Cut`]).
    pub fn end(&mut self, out: &mut Vec<Event>) -> Control {
        if self.cut.is_none() {
            let mut pieces = Vec::new();
            if let Some(parser) = &mut self.parser {
                parser.finish(&mut pieces);
            }
            match self.pieces(pieces, out) {
                Control::Repair(problem) => return Control::Repair(problem),
                Control::Continue | Control::Cut | Control::End(_) => {}
            }
            if self.cut.is_none()
                && let Some(stop) = &mut self.stop
            {
                let rest = stop.finish();
                if self.answer_text(&rest, out) {
                    self.cut = Some(FinishReason::Length);
                }
            }
        }
        if self.calls > 0 {
            return Control::End(match self.cut {
                Some(FinishReason::Length) => FinishReason::Length,
                _ => FinishReason::ToolCalls,
            });
        }
        let reason = self.cut.clone().unwrap_or(FinishReason::Stop);
        if let Some(problem) = self.required.clone() {
            return self.check_failed("tool_call_missing", problem, reason, out);
        }
        if self.format != OutputFormat::Text {
            let held = self.held.take().unwrap_or_default();
            if reason == FinishReason::Length {
                // Cut short: the truncated text, as OpenAI returns it, unchecked.
                self.emit_held(held, out);
                return Control::End(reason);
            }
            return match json_answer(&held, &self.format) {
                Ok(json) => {
                    self.emit_text(json.to_owned(), out);
                    Control::End(reason)
                }
                Err(problem) => {
                    self.held = Some(held);
                    self.check_failed("json_invalid", problem, reason, out)
                }
            };
        }
        Control::End(reason)
    }

    /// A required call or a JSON answer is missing: repair once, then the reply as text.
    fn check_failed(
        &mut self,
        failure: &'static str,
        problem: String,
        reason: FinishReason,
        out: &mut Vec<Event>,
    ) -> Control {
        if !self.repairing {
            self.note(failure, "repair", &problem);
            return Control::Repair(problem);
        }
        self.note(failure, "returned_as_text", &problem);
        let held = self.held.take().unwrap_or_default();
        self.emit_held(held, out);
        Control::End(reason)
    }

    fn emit_held(&mut self, held: String, out: &mut Vec<Event>) {
        if !held.is_empty() {
            self.emit_text(held, out);
        }
    }

    /// The repair turn could not be had: the reply is returned as it was.
    pub fn give_up(&mut self, out: &mut Vec<Event>) -> FinishReason {
        if let Some(block) = self.failed_block.take() {
            self.held = None;
            let text = format!("{OPEN}{block}{CLOSE}");
            self.emit_text(text, out);
        } else if let Some(held) = self.held.take() {
            self.emit_held(held, out);
        }
        if self.calls > 0 {
            FinishReason::ToolCalls
        } else {
            self.cut.clone().unwrap_or(FinishReason::Stop)
        }
    }
}

/// The JSON document in a reply (prose and code fences around it dropped), checked against
/// the format.
fn json_answer<'a>(text: &'a str, format: &OutputFormat) -> Result<&'a str, String> {
    let trimmed = strip_fence(text.trim());
    let (json, value) = match serde_json::from_str::<Value>(trimmed) {
        Ok(value) => (trimmed, value),
        Err(first) => {
            let start = text.find(['{', '[']);
            let end = text.rfind(['}', ']']);
            let inner = match (start, end) {
                (Some(s), Some(e)) if e > s => &text[s..=e],
                _ => return Err(format!("the reply is not JSON ({first})")),
            };
            let value = serde_json::from_str::<Value>(inner)
                .map_err(|e| format!("the reply is not valid JSON ({e})"))?;
            (inner, value)
        }
    };
    match format {
        OutputFormat::JsonObject if !value.is_object() => {
            Err("the reply must be one JSON object".into())
        }
        OutputFormat::JsonSchema { schema, .. } => super::schema::check(schema, &value)
            .map(|()| json)
            .map_err(|e| format!("the JSON does not fit the schema: {e}")),
        _ => Ok(json),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::chat::request::{Message, Part};

    fn request() -> Request {
        Request::new(
            "m",
            vec![Message::User {
                parts: vec![Part::text("hi")],
            }],
        )
    }

    fn weather(mut request: Request) -> Request {
        request.tools = vec![Tool {
            name: "get_weather".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}),
        }];
        request
    }

    /// Feeds `pieces` as text deltas, then the end; returns the events and the last control.
    fn run(emulator: &mut Emulator, pieces: &[&str]) -> (Vec<Event>, Control) {
        let mut out = Vec::new();
        for piece in pieces {
            match emulator.push(Delta::Text((*piece).to_owned()), &mut out) {
                Control::Continue => {}
                Control::Cut => break,
                other => return (out, other),
            }
        }
        let control = emulator.end(&mut out);
        (out, control)
    }

    fn text_of(events: &[Event]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    fn calls_of(events: &[Event]) -> Vec<(String, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::ToolCall(c) => Some((c.name.clone(), c.arguments.clone())),
                _ => None,
            })
            .collect()
    }

    const CALL: &str =
        "<tool_call>{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}</tool_call>";

    #[test]
    fn plain_replies_pass_through_untouched() {
        let mut e = Emulator::new(&request());
        let (events, control) = run(&mut e, &["Hel", "lo <tool_call>"]);
        assert_eq!(text_of(&events), "Hello <tool_call>");
        assert_eq!(control, Control::End(FinishReason::Stop));
    }

    #[test]
    fn text_streams_then_calls_finish_with_tool_calls() {
        let mut e = Emulator::new(&weather(request()));
        let mut out = Vec::new();
        e.push(Delta::Text("Checking. <tool".into()), &mut out);
        assert_eq!(
            out,
            vec![Event::Text("Checking. ".into())],
            "streamed at once"
        );
        let rest = &CALL[5..];
        let (events, control) = run(&mut e, &[rest, CALL]);
        assert_eq!(calls_of(&events).len(), 2);
        assert_eq!(calls_of(&events)[0].1, r#"{"city":"Paris"}"#);
        assert_eq!(control, Control::End(FinishReason::ToolCalls));
        let (answer, _) = e.completion_tokens().unwrap();
        assert!(answer > 5);
    }

    #[test]
    fn parallel_false_keeps_the_first_call() {
        let mut r = weather(request());
        r.parallel_tool_calls = false;
        let (events, _) = run(&mut Emulator::new(&r), &[CALL, CALL]);
        assert_eq!(calls_of(&events).len(), 1);
    }

    #[test]
    fn an_invalid_call_is_repaired_once_then_returned_as_text() {
        let r = weather(request());
        let mut first = Emulator::new(&r);
        let bad = "Sure. <tool_call>{\"name\":\"get_weather\",\"arguments\":{}}</tool_call> more";
        let (events, control) = run(&mut first, &[bad]);
        assert_eq!(text_of(&events), "Sure. ");
        let Control::Repair(problem) = control else {
            panic!("{control:?}")
        };
        assert!(problem.contains("`$.city` is required"), "{problem}");
        assert!(first.raw().contains("arguments\":{}"));
        assert_eq!(first.take_notes()[0].action, "repair");
        // The repair works: its preamble is not repeated, the call goes out.
        let mut second = first.for_repair();
        let (events, control) = run(&mut second, &["Sure. ", CALL]);
        assert_eq!(text_of(&events), "");
        assert_eq!(calls_of(&events).len(), 1);
        assert_eq!(control, Control::End(FinishReason::ToolCalls));
        // The repair fails too: the reply comes back as text, and that is noted.
        let mut second = first.for_repair();
        let (events, control) = run(&mut second, &[bad]);
        assert!(
            text_of(&events)
                .contains("<tool_call>{\"name\":\"get_weather\",\"arguments\":{}}</tool_call>")
        );
        assert_eq!(control, Control::End(FinishReason::Stop));
        assert_eq!(second.take_notes()[0].action, "returned_as_text");
    }

    #[test]
    fn a_required_call_holds_the_text_and_repairs_a_reply_without_one() {
        let mut r = weather(request());
        r.tool_choice = ToolChoice::Required;
        let mut first = Emulator::new(&r);
        let (events, control) = run(&mut first, &["It is sunny."]);
        assert!(events.is_empty(), "held: {events:?}");
        assert!(matches!(control, Control::Repair(p) if p.contains("required")));
        let mut second = first.for_repair();
        let (events, control) = run(&mut second, &["Let me look. ", CALL]);
        assert_eq!(text_of(&events), "Let me look. ");
        assert_eq!(control, Control::End(FinishReason::ToolCalls));
        let mut third = first.for_repair();
        let (events, control) = run(&mut third, &["Still sunny."]);
        assert_eq!(text_of(&events), "Still sunny.");
        assert_eq!(control, Control::End(FinishReason::Stop));
    }

    #[test]
    fn tool_choice_none_offers_and_parses_nothing() {
        let mut r = weather(request());
        r.tool_choice = ToolChoice::None;
        let (events, _) = run(&mut Emulator::new(&r), &[CALL]);
        assert_eq!(text_of(&events), CALL);
    }

    #[test]
    fn stop_sequences_and_max_tokens_cut_the_answer() {
        let mut r = request();
        r.stop = vec!["STOP".into()];
        let (events, control) = run(&mut Emulator::new(&r), &["one ST", "OP two"]);
        assert_eq!(text_of(&events), "one ");
        assert_eq!(
            control,
            Control::End(FinishReason::StopSequence("STOP".into()))
        );
        let mut r = request();
        r.max_tokens = Some(3);
        let mut e = Emulator::new(&r);
        let (events, control) = run(&mut e, &["one two three four five six"]);
        assert_eq!(count_tokens(&text_of(&events)), 3);
        assert_eq!(control, Control::End(FinishReason::Length));
        // Reasoning passes and is not limited.
        let mut out = Vec::new();
        let mut e = Emulator::new(&r);
        e.push(Delta::Reasoning("a long thought ".repeat(20)), &mut out);
        assert!(matches!(&out[0], Event::Reasoning(t) if t.len() > 100));
    }

    #[test]
    fn json_answers_are_extracted_checked_and_repaired() {
        let mut r = request();
        r.format = OutputFormat::JsonSchema {
            name: "p".into(),
            schema: json!({"type": "object", "properties": {"age": {"type": "integer"}},
                "required": ["age"]}),
        };
        let mut e = Emulator::new(&r);
        let (events, control) = run(&mut e, &["Here:\n```json\n{\"age\"", ": 36}\n```\nDone."]);
        assert_eq!(text_of(&events), "{\"age\": 36}");
        assert_eq!(control, Control::End(FinishReason::Stop));
        let mut e = Emulator::new(&r);
        let (events, control) = run(&mut e, &["{\"age\": \"old\"}"]);
        assert!(events.is_empty());
        assert!(matches!(control, Control::Repair(p) if p.contains("`$.age` must be an integer")));
        let mut again = e.for_repair();
        let (events, _) = run(&mut again, &["no json at all"]);
        assert_eq!(text_of(&events), "no json at all");
        r.format = OutputFormat::JsonObject;
        let (_, control) = run(&mut Emulator::new(&r), &["[1, 2]"]);
        assert!(matches!(control, Control::Repair(p) if p.contains("one JSON object")));
    }

    #[test]
    fn giving_up_returns_what_was_held() {
        let r = weather(request());
        let mut e = Emulator::new(&r);
        let (_, control) = run(&mut e, &["<tool_call>{bad</tool_call>"]);
        assert!(matches!(control, Control::Repair(_)));
        let mut out = Vec::new();
        assert_eq!(e.give_up(&mut out), FinishReason::Stop);
        assert_eq!(text_of(&out), "<tool_call>{bad</tool_call>");
    }
}
