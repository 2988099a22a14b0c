//! Splits reasoning marked up inside the text (`<think>…</think>`) out of it, as the text
//! streams. Only a possible partial tag at the end of a piece is held back, so streaming
//! latency stays that of the site.

use super::Delta;

#[derive(Debug)]
pub(super) struct Markup {
    open: String,
    close: String,
    /// `open` does not end with `>`: the opening tag runs on to the next `>` (attributes such
    /// as `<details type="reasoning" done="true">` vary from reply to reply).
    open_is_prefix: bool,
    state: State,
    /// The tail of the last piece that may be the start of the tag searched for.
    held: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text,
    /// Inside the opening tag, skipping to its `>`.
    OpenTag,
    Reasoning,
}

impl Markup {
    pub(super) fn new(open: &str, close: &str) -> Self {
        Self {
            open: open.to_owned(),
            close: close.to_owned(),
            open_is_prefix: !open.ends_with('>'),
            state: State::Text,
            held: String::new(),
        }
    }

    /// Splits the next piece of text into text and reasoning deltas.
    pub(super) fn push(&mut self, piece: &str, out: &mut Vec<Delta>) {
        if self.open.is_empty() || self.close.is_empty() {
            emit(false, piece, out);
            return;
        }
        let joined;
        let mut rest = if self.held.is_empty() {
            piece
        } else {
            let mut held = std::mem::take(&mut self.held);
            held.push_str(piece);
            joined = held;
            joined.as_str()
        };
        loop {
            match self.state {
                State::OpenTag => match rest.find('>') {
                    Some(end) => {
                        rest = &rest[end + 1..];
                        self.state = State::Reasoning;
                    }
                    None => return,
                },
                State::Text | State::Reasoning => {
                    let reasoning = self.state == State::Reasoning;
                    let tag = if reasoning { &self.close } else { &self.open };
                    if let Some(at) = rest.find(tag.as_str()) {
                        emit(reasoning, &rest[..at], out);
                        rest = &rest[at + tag.len()..];
                        self.state = match self.state {
                            State::Reasoning => State::Text,
                            _ if self.open_is_prefix => State::OpenTag,
                            _ => State::Reasoning,
                        };
                        continue;
                    }
                    let keep = partial_tag_len(rest, tag);
                    let (now, later) = rest.split_at(rest.len() - keep);
                    emit(reasoning, now, out);
                    self.held.push_str(later);
                    return;
                }
            }
        }
    }

    /// End of the text: a held partial tag was text after all.
    pub(super) fn flush(&mut self, out: &mut Vec<Delta>) {
        let held = std::mem::take(&mut self.held);
        emit(self.state == State::Reasoning, &held, out);
    }
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
        let mut out = Vec::new();
        for piece in pieces {
            markup.push(piece, &mut out);
        }
        markup.flush(&mut out);
        let joined = collect_text(&out);
        (out, joined)
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
                Delta::Reasoning("Let me ".into()),
                Delta::Reasoning("see".into()),
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
        assert_eq!(joined.0, "\nAnswer é");
        assert_eq!(joined.1, "\n<summary>Thought</summary>\nhmm");
    }

    #[test]
    fn multibyte_text_next_to_tags_is_not_split() {
        let (_, joined) = split("<think>", "</think>", &["日本<th", "ink>語</think>é<"]);
        assert_eq!(joined, ("日本é<".to_owned(), "語".to_owned()));
    }
}
