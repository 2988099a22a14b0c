//! Cutting the answer short: at the first stop sequence, or at `max_tokens`.
//!
//! Invariant: a stop sequence split across pieces is still found, and the only text held
//! back is a tail that could begin one.

use crate::tokens::{count_tokens, token_prefix};

/// Finds the first stop sequence in streamed text.
#[derive(Debug)]
pub struct StopCutter {
    stops: Vec<String>,
    held: String,
}

/// What one piece of text comes to.
#[derive(Debug, PartialEq, Eq)]
pub struct Cut {
    /// Text that may go out now.
    pub text: String,
    /// The stop sequence reached; the answer ends with `text`.
    pub stopped: Option<String>,
}

impl StopCutter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Cut {
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()).map(|at| (at, stop)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = first {
            let stop = stop.clone();
            self.held.truncate(at);
            return Cut {
                text: std::mem::take(&mut self.held),
                stopped: Some(stop),
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|stop| partial_suffix(&self.held, stop))
            .max()
            .unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        Cut {
            text: std::mem::replace(&mut self.held, rest),
            stopped: None,
        }
    }

    /// The end of the answer: what was held goes out.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length in bytes of the longest tail of `text` that is a proper prefix of `stop`, on a
/// character boundary.
fn partial_suffix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            let start = text.len() - k;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

/// Counts answer tokens as they stream and cuts at the limit.
#[derive(Debug, Clone)]
pub struct TokenLimit {
    max: u64,
    used: u64,
}

impl TokenLimit {
    pub fn new(max: u64) -> Self {
        Self { max, used: 0 }
    }

    /// The part of `piece` within the limit, and whether the limit is now reached.
    /// Pieces are counted one by one (tiktoken o200k), which can only count a token split
    /// across two pieces twice: the answer never exceeds the limit.
    pub fn take(&mut self, piece: &str) -> (String, bool) {
        let left = self.max.saturating_sub(self.used);
        let tokens = count_tokens(piece);
        if tokens <= left {
            self.used += tokens;
            return (piece.to_owned(), self.used >= self.max);
        }
        self.used = self.max;
        (token_prefix(piece, left as usize), true)
    }

    /// Counts text that is not cut (a tool call): it uses up the limit all the same.
    pub fn spend(&mut self, text: &str) -> bool {
        self.used = self.used.saturating_add(count_tokens(text));
        self.used >= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut cutter = StopCutter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let cut = cutter.push(piece);
            out.push_str(&cut.text);
            if cut.stopped.is_some() {
                return (out, cut.stopped);
            }
        }
        out.push_str(&cutter.finish());
        (out, None)
    }

    #[test]
    fn cuts_at_the_first_stop_even_across_pieces() {
        let text = "one two END three";
        for at in 0..=text.len() {
            let (out, stopped) = run(&["END", "three"], &[&text[..at], &text[at..]]);
            assert_eq!(out, "one two ", "split at {at}");
            assert_eq!(stopped.as_deref(), Some("END"));
        }
        assert_eq!(run(&["zz"], &["a z", "b"]), ("a zb".into(), None));
    }

    #[test]
    fn holds_back_only_what_could_begin_a_stop() {
        let mut cutter = StopCutter::new(vec!["\n\nUser:".into()]);
        assert_eq!(cutter.push("Hello\n").text, "Hello");
        assert_eq!(cutter.push("\nUs").text, "");
        assert_eq!(cutter.push("ually").text, "\n\nUsually");
        let mut cutter = StopCutter::new(vec!["éa".into()]);
        assert_eq!(cutter.push("café").text, "caf");
        assert_eq!(cutter.finish(), "é");
    }

    #[test]
    fn the_token_limit_cuts_inside_a_piece() {
        let mut limit = TokenLimit::new(5);
        let (first, done) = limit.take("Hello");
        assert_eq!((first.as_str(), done), ("Hello", false));
        let (second, done) = limit.take(" world, this is a long piece of text");
        assert!(done);
        assert!(!second.is_empty() && second.len() < 20, "{second:?}");
        assert_eq!(count_tokens(&format!("{first}{second}")), 5);
        assert_eq!(limit.take("more"), (String::new(), true));
    }
}
