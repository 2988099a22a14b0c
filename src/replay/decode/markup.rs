//! Splits reasoning marked up inside the text (`<think>…</think>`, Open WebUI's
//! `<details type="reasoning">…</details>`) out of it, as the text streams.
//!
//! Invariants:
//! - Only what may still turn out to be markup is held back: a possible partial tag at the
//!   end of a piece, and whitespace at the end of a block (dropped if the block closes right
//!   after it). Streaming latency stays that of the site; no partial tag is ever emitted.
//! - Tags are never emitted. Whitespace right inside a block's tags, and right after a
//!   reasoning block, is layout, not text: it is dropped.
//! - Presentation inside the reasoning the page does not show as text is dropped when the
//!   rule says so: a `<summary>…</summary>` heading, and `> ` quote prefixes at line starts.
//! - [`Markup::split_whole`] reads a complete marked-up text (one event of a cumulative
//!   stream, whose closing tags move as it grows) with the same rules.

use super::Delta;
use crate::flow::{ReasoningRule, Tags};

/// The rule's configuration.
#[derive(Debug, Clone)]
struct Config {
    /// When it does not end with `>`, the opening tag runs on to the next `>` (attributes
    /// such as `<details type="reasoning" done="true">` vary from reply to reply).
    open: String,
    close: String,
    summary: bool,
    quoted: bool,
    answer: Option<Tags>,
}

#[derive(Debug, Clone)]
pub(super) struct Markup {
    config: Config,
    state: State,
    /// The tail of the last piece that may be the start of a tag searched for.
    held: String,
    /// Whitespace at the end of a block, emitted once non-whitespace follows.
    pending_ws: String,
    /// At the start of a block (or right after a reasoning block): whitespace is dropped.
    fresh: bool,
    /// At the start of a reasoning line (for `quoted`).
    line_start: bool,
    /// A quote marker `>` was dropped at the end of a piece: a space starting the next one
    /// belongs to it.
    after_quote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text,
    /// Inside the opening tag, skipping its attributes to `>`; then `then`.
    OpenTag {
        then: Block,
    },
    Reasoning,
    /// Inside a `<summary>` of the reasoning (dropped).
    Summary,
    Answer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Reasoning,
    Summary,
    Answer,
}

const SUMMARY_OPEN: &str = "<summary";
const SUMMARY_CLOSE: &str = "</summary>";

impl Markup {
    /// The splitter for a `Markup` rule (`None` for other rules).
    pub(super) fn from_rule(rule: &ReasoningRule) -> Option<Markup> {
        let ReasoningRule::Markup {
            open,
            close,
            summary,
            quoted,
            answer,
        } = rule
        else {
            return None;
        };
        Some(Markup {
            config: Config {
                open: open.clone(),
                close: close.clone(),
                summary: *summary,
                quoted: *quoted,
                answer: answer
                    .clone()
                    .filter(|a| !a.open.is_empty() && !a.close.is_empty()),
            },
            state: State::Text,
            held: String::new(),
            pending_ws: String::new(),
            fresh: false,
            line_start: false,
            after_quote: false,
        })
    }

    #[cfg(test)]
    pub(super) fn new(open: &str, close: &str) -> Self {
        Self::from_rule(&ReasoningRule::Markup {
            open: open.to_owned(),
            close: close.to_owned(),
            summary: false,
            quoted: false,
            answer: None,
        })
        .expect("a markup rule")
    }

    /// A fresh splitter with the same rule.
    fn restarted(&self) -> Markup {
        Markup {
            config: self.config.clone(),
            state: State::Text,
            held: String::new(),
            pending_ws: String::new(),
            fresh: false,
            line_start: false,
            after_quote: false,
        }
    }

    /// Splits the next piece of text into text and reasoning deltas.
    pub(super) fn push(&mut self, piece: &str, out: &mut Vec<Delta>) {
        if self.config.open.is_empty() || self.config.close.is_empty() {
            emit(false, piece, out);
            return;
        }
        let mut buffer = std::mem::take(&mut self.held);
        buffer.push_str(piece);
        let mut rest = buffer.as_str();
        loop {
            if let State::OpenTag { then } = self.state {
                match rest.find('>') {
                    Some(end) => {
                        rest = &rest[end + 1..];
                        self.enter(then);
                        continue;
                    }
                    None => return,
                }
            }
            // (where, tag length, next state, whether the tag is given whole), and how much of
            // the end may be the start of a tag.
            let (found, keep) = {
                let tags = self.tags();
                let found = tags
                    .iter()
                    .flatten()
                    .filter_map(|(tag, next)| {
                        rest.find(tag)
                            .map(|at| (at, tag.len(), *next, tag.ends_with('>')))
                    })
                    .min_by_key(|(at, ..)| *at);
                let keep = tags
                    .iter()
                    .flatten()
                    .map(|(tag, _)| partial_tag_len(rest, tag))
                    .max()
                    .unwrap_or(0);
                (found, keep)
            };
            if let Some((at, len, next, whole)) = found {
                let (before, after) = rest.split_at(at);
                self.content(before, out);
                rest = &after[len..];
                self.transition(next, whole);
                continue;
            }
            let (now, later) = rest.split_at(rest.len() - keep);
            self.content(now, out);
            self.held.push_str(later);
            return;
        }
    }

    /// End of the text: a held partial tag was text after all; whitespace held at the end of
    /// an unclosed block is dropped.
    pub(super) fn flush(&mut self, out: &mut Vec<Delta>) {
        let held = std::mem::take(&mut self.held);
        if !matches!(self.state, State::OpenTag { .. }) {
            self.content(&held, out);
        }
        self.pending_ws.clear();
    }

    /// (text, reasoning) of a complete marked-up text, read from its start with this rule.
    /// Unless it is the `last` text, a possible partial tag at its end is left out (the next,
    /// longer text will tell).
    pub(super) fn split_whole(&self, text: &str, last: bool) -> (String, String) {
        let mut fresh = self.restarted();
        let mut out = Vec::new();
        fresh.push(text, &mut out);
        if last {
            fresh.flush(&mut out);
        }
        super::collect_text(&out)
    }

    /// The tags to look for in the current state, with the state each leads to.
    fn tags(&self) -> [Option<(&str, Next)>; 2] {
        let c = &self.config;
        match self.state {
            State::Text => [
                Some((c.open.as_str(), Next::Open(Block::Reasoning))),
                c.answer
                    .as_ref()
                    .map(|a| (a.open.as_str(), Next::Open(Block::Answer))),
            ],
            State::Reasoning => [
                Some((c.close.as_str(), Next::Close)),
                c.summary
                    .then_some((SUMMARY_OPEN, Next::Open(Block::Summary))),
            ],
            State::Summary => [Some((SUMMARY_CLOSE, Next::EndSummary)), None],
            State::Answer => [
                c.answer.as_ref().map(|a| (a.close.as_str(), Next::Close)),
                None,
            ],
            State::OpenTag { .. } => [None, None],
        }
    }

    /// `whole`: the tag found ends with `>` (else it is a prefix that runs on to the next `>`,
    /// as `<details type="reasoning"` and `<summary` do).
    fn transition(&mut self, next: Next, whole: bool) {
        match next {
            Next::Open(block) => {
                if whole {
                    self.enter(block);
                } else {
                    self.state = State::OpenTag { then: block };
                }
            }
            Next::EndSummary => {
                self.state = State::Reasoning;
                self.fresh = true;
                self.line_start = true;
            }
            Next::Close => {
                // Whitespace before a closing tag is layout.
                self.pending_ws.clear();
                // After a reasoning block the answer's leading whitespace is layout too.
                self.fresh = self.state == State::Reasoning;
                self.state = State::Text;
            }
        }
    }

    fn enter(&mut self, block: Block) {
        self.state = match block {
            Block::Reasoning => State::Reasoning,
            Block::Summary => State::Summary,
            Block::Answer => State::Answer,
        };
        self.pending_ws.clear();
        self.fresh = true;
        self.line_start = true;
        self.after_quote = false;
    }

    /// Emits text found between tags, in the current state's channel.
    fn content(&mut self, text: &str, out: &mut Vec<Delta>) {
        if text.is_empty() || self.state == State::Summary {
            return;
        }
        let reasoning = self.state == State::Reasoning;
        let in_block = matches!(self.state, State::Reasoning | State::Answer);
        let quoted = reasoning && self.config.quoted;
        if !self.fresh && !in_block && !quoted {
            emit(false, text, out);
            return;
        }
        let mut piece = String::with_capacity(text.len());
        for c in text.chars() {
            if quoted {
                if self.after_quote {
                    self.after_quote = false;
                    if c == ' ' {
                        continue;
                    }
                }
                if self.line_start && c == '>' {
                    self.after_quote = true;
                    continue;
                }
            }
            if c.is_whitespace() {
                if c == '\n' {
                    self.line_start = true;
                } else if c != ' ' && c != '\t' {
                    self.line_start = false;
                }
                if self.fresh {
                    continue;
                }
                if in_block {
                    self.pending_ws.push(c);
                } else {
                    piece.push(c);
                }
                continue;
            }
            self.fresh = false;
            self.line_start = false;
            piece.push_str(&self.pending_ws);
            self.pending_ws.clear();
            piece.push(c);
        }
        emit(reasoning, &piece, out);
    }
}

#[derive(Debug, Clone, Copy)]
enum Next {
    Open(Block),
    EndSummary,
    Close,
}

/// The length of the longest end of `text` that is a proper beginning of `tag`.
fn partial_tag_len(text: &str, tag: &str) -> usize {
    let longest = tag.len().saturating_sub(1).min(text.len());
    (1..=longest)
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k)
                && text.as_bytes()[text.len() - k..] == tag.as_bytes()[..k]
        })
        .unwrap_or(0)
}

fn emit(reasoning: bool, piece: &str, out: &mut Vec<Delta>) {
    if piece.is_empty() {
        return;
    }
    out.push(if reasoning {
        Delta::Reasoning(piece.to_owned())
    } else {
        Delta::Text(piece.to_owned())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::decode::collect_text;

    fn split(open: &str, close: &str, pieces: &[&str]) -> (Vec<Delta>, (String, String)) {
        let mut markup = Markup::new(open, close);
        run(&mut markup, pieces)
    }

    fn run(markup: &mut Markup, pieces: &[&str]) -> (Vec<Delta>, (String, String)) {
        let mut out = Vec::new();
        for piece in pieces {
            markup.push(piece, &mut out);
        }
        markup.flush(&mut out);
        let joined = collect_text(&out);
        (out, joined)
    }

    fn open_webui() -> Markup {
        Markup::from_rule(&ReasoningRule::Markup {
            open: "<details type=\"reasoning\"".into(),
            close: "</details>".into(),
            summary: true,
            quoted: true,
            answer: Some(Tags {
                open: "<answer>".into(),
                close: "</answer>".into(),
            }),
        })
        .unwrap()
    }

    #[test]
    fn tags_split_across_pieces_are_found() {
        let (out, joined) = split(
            "<think>",
            "</think>",
            &["<th", "ink>Let me ", "see</th", "ink", ">Hi <", "b>!"],
        );
        assert_eq!(joined, ("Hi <b>!".to_owned(), "Let me see".to_owned()));
        assert_eq!(
            out,
            vec![
                Delta::Reasoning("Let me".into()),
                Delta::Reasoning(" see".into()),
                Delta::Text("Hi ".into()),
                Delta::Text("<b>!".into()),
            ]
        );
    }

    #[test]
    fn only_a_possible_tag_start_is_held_back() {
        let mut markup = Markup::new("<think>", "</think>");
        let mut out = Vec::new();
        markup.push("a < b <t", &mut out);
        assert_eq!(out, vec![Delta::Text("a < b ".into())]);
        markup.flush(&mut out);
        assert_eq!(out[1], Delta::Text("<t".into()));
    }

    #[test]
    fn open_tag_without_closing_bracket_skips_attributes() {
        let (_, joined) = split(
            "<details type=\"reasoning\"",
            "</details>",
            &[
                "<details type=\"reasoning\" done=\"tr",
                "ue\" duration=\"2\">\n<summary>Thought</summary>\nhmm",
                "</details>\nAnswer é",
            ],
        );
        assert_eq!(joined.0, "Answer é");
        assert_eq!(joined.1, "<summary>Thought</summary>\nhmm");
    }

    #[test]
    fn multibyte_text_next_to_tags_is_not_split() {
        let (_, joined) = split("<think>", "</think>", &["日本<th", "ink>語</think>é<"]);
        assert_eq!(joined, ("日本é<".to_owned(), "語".to_owned()));
    }

    #[test]
    fn open_webui_reasoning_loses_its_summary_quotes_and_answer_tags() {
        // The opening tag comes as a piece of its own, then quoted lines, then the answer.
        let pieces = [
            "<details type=\"reasoning\" done=\"false\">\n<summary>Thinking…</summary>\n",
            "> First ",
            "line\n",
            ">",
            " second line\n>\n> third",
            "\n</details>\n",
            "<answer>",
            "Hello > there\n",
            "\n> not a quote",
            "</answer>",
        ];
        let (out, joined) = run(&mut open_webui(), &pieces);
        assert_eq!(joined.1, "First line\nsecond line\n\nthird");
        assert_eq!(joined.0, "Hello > there\n\n> not a quote");
        // Nothing of a tag, and no layout whitespace, is ever emitted.
        for delta in &out {
            let (Delta::Text(t) | Delta::Reasoning(t)) = delta else {
                continue;
            };
            assert!(!t.contains('<') || t.contains("< "), "{out:?}");
        }
    }

    #[test]
    fn every_chunking_of_open_webui_markup_gives_the_same_split() {
        let whole = "<details type=\"reasoning\" done=\"true\" duration=\"1\">\n<summary>Thought for 1 second</summary>\n> Plan é.\n> Then act.\n</details>\n<answer>Done — ok.</answer>";
        let expected = ("Done — ok.".to_owned(), "Plan é.\nThen act.".to_owned());
        let chars: Vec<(usize, char)> = whole.char_indices().collect();
        for step in 1..12 {
            let mut pieces = Vec::new();
            let mut start = 0;
            for (n, (at, _)) in chars.iter().enumerate() {
                if n > 0 && n % step == 0 {
                    pieces.push(&whole[start..*at]);
                    start = *at;
                }
            }
            pieces.push(&whole[start..]);
            assert_eq!(run(&mut open_webui(), &pieces).1, expected, "step {step}");
        }
        assert_eq!(open_webui().split_whole(whole, false), expected);
    }

    #[test]
    fn a_whole_text_leaves_a_partial_tag_out() {
        let think = Markup::new("<think>", "</think>");
        assert_eq!(
            think.split_whole("<think>Let me</think>\n\nHel", false),
            ("Hel".to_owned(), "Let me".to_owned())
        );
        assert_eq!(
            think.split_whole("<think>Let me</thi", false),
            (String::new(), "Let me".to_owned())
        );
    }
}
