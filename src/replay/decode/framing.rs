//! Framing: body bytes → events, per `Transport`, robust to any chunking.
//!
//! - `sse`: `sse.rs`'s push parser (`eventsource-stream`'s semantics, each chunk read in
//!   place). As the SSE spec says, an event not terminated by a blank line when the body ends
//!   is dropped.
//! - `ndjson` / `numbered_lines`: one event per line (`\n` or `\r\n`); a last line without a
//!   newline is decoded at the end of the body.
//! - `length_prefixed`: flag byte, u32 big-endian length, payload; the flag in decimal is the
//!   event name; flag bit `0x02` is the end-of-stream frame, bit `0x01` (compressed) is refused.
//! - `json`: one document, decoded as soon as its closing bracket arrives (a bare scalar at the
//!   end of the body).
//! - `text`: the body is the text; invalid UTF-8 becomes U+FFFD (the reply is still worth
//!   showing). Every other transport refuses invalid UTF-8 as `Malformed`.
//! - `websocket`: each `feed` is one whole message.
//!
//! No frame (SSE event, line, binary frame, JSON document) may exceed [`MAX_FRAME`].

use std::fmt::Write as _;

use super::accrual::snippet;
use super::sse::SseParser;
use super::{DecodeError, MAX_FRAME};
use crate::flow::Transport;

/// Where a framer puts what it finds in the bytes: the decoder's accrual engine, or the
/// events themselves ([`frame`], for the learner).
pub(super) trait Sink {
    /// One event: an SSE event, a line, a frame, a JSON document, a WebSocket message.
    fn on_event(&mut self, name: Option<&str>, data: &str) -> Result<(), DecodeError>;
    /// A length-prefixed end-of-stream frame (flag bit `0x02`).
    fn on_end_stream(&mut self, name: Option<&str>, data: &str) -> Result<(), DecodeError>;
    /// A piece of the `text` transport's body.
    fn on_text(&mut self, text: &str);
    /// Whether the sink wants no more (a decoder after its done signal or an error).
    fn is_stopped(&self) -> bool;
}

/// One event of a body as the framer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framed {
    /// SSE `event:` (`message` by default), numbered-line tag, frame flag in decimal.
    pub name: Option<String>,
    pub data: String,
    /// A length-prefixed end-of-stream frame.
    pub end_of_stream: bool,
}

/// The events `transport`'s framer finds in a whole `body`, exactly as the decoder frames it
/// (for `websocket`, `body` is one message; the `text` transport has none). The learner reads
/// recorded bodies with this, so what it proposes is what replay will read.
pub fn frame(transport: Transport, body: &[u8]) -> Result<Vec<Framed>, DecodeError> {
    #[derive(Default)]
    struct Collect(Vec<Framed>);
    impl Sink for Collect {
        fn on_event(&mut self, name: Option<&str>, data: &str) -> Result<(), DecodeError> {
            self.0.push(Framed {
                name: name.map(str::to_owned),
                data: data.to_owned(),
                end_of_stream: false,
            });
            Ok(())
        }
        fn on_end_stream(&mut self, name: Option<&str>, data: &str) -> Result<(), DecodeError> {
            self.0.push(Framed {
                name: name.map(str::to_owned),
                data: data.to_owned(),
                end_of_stream: true,
            });
            Ok(())
        }
        fn on_text(&mut self, _: &str) {}
        fn is_stopped(&self) -> bool {
            false
        }
    }
    let mut framer = Framer::new(transport);
    let mut events = Collect::default();
    framer.feed(body, &mut events)?;
    framer.finish(&mut events)?;
    Ok(events.0)
}

pub(super) enum Framer {
    Sse(Box<Sse>),
    Lines(Lines),
    LengthPrefixed(Frames),
    Json(JsonDoc),
    Text(Utf8Joiner),
    WebSocket,
}

impl Framer {
    pub(super) fn new(transport: Transport) -> Self {
        match transport {
            Transport::Sse => Framer::Sse(Box::new(Sse::new())),
            Transport::Ndjson => Framer::Lines(Lines::new(false)),
            Transport::NumberedLines => Framer::Lines(Lines::new(true)),
            Transport::LengthPrefixed => Framer::LengthPrefixed(Frames::default()),
            Transport::Json => Framer::Json(JsonDoc::default()),
            Transport::Text => Framer::Text(Utf8Joiner::default()),
            Transport::Websocket => Framer::WebSocket,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), DecodeError> {
        match self {
            Framer::Sse(sse) => sse.feed(chunk, sink),
            Framer::Lines(lines) => lines.feed(chunk, sink),
            Framer::LengthPrefixed(frames) => frames.feed(chunk, sink),
            Framer::Json(doc) => doc.feed(chunk, sink),
            Framer::Text(joiner) => {
                let mut text = String::new();
                joiner
                    .push(chunk, true, &mut text)
                    .map_err(DecodeError::Malformed)?;
                sink.on_text(&text);
                Ok(())
            }
            Framer::WebSocket => {
                let message = std::str::from_utf8(chunk).map_err(|e| {
                    DecodeError::Malformed(format!(
                        "WebSocket message is not UTF-8 (at byte {})",
                        e.valid_up_to()
                    ))
                })?;
                sink.on_event(None, message)
            }
        }
    }

    pub(super) fn finish(&mut self, sink: &mut impl Sink) -> Result<(), DecodeError> {
        match self {
            Framer::Sse(sse) => sse.finish(sink),
            Framer::Lines(lines) => lines.finish(sink),
            Framer::LengthPrefixed(frames) => frames.finish(),
            Framer::Json(doc) => doc.finish(sink),
            Framer::Text(joiner) => {
                let mut text = String::new();
                joiner
                    .finish(true, &mut text)
                    .map_err(DecodeError::Malformed)?;
                sink.on_text(&text);
                Ok(())
            }
            Framer::WebSocket => Ok(()),
        }
    }
}

/// Joins UTF-8 across chunk boundaries: a character split between two chunks is held until
/// its last byte arrives.
#[derive(Debug, Default)]
pub(super) struct Utf8Joiner {
    tail: Vec<u8>,
    /// Bytes seen so far, for error positions.
    seen: usize,
}

impl Utf8Joiner {
    /// `chunk` as text without a copy, when nothing is held and it is whole valid UTF-8.
    pub(super) fn borrow_whole<'a>(&mut self, chunk: &'a [u8]) -> Option<&'a str> {
        if !self.tail.is_empty() {
            return None;
        }
        let text = std::str::from_utf8(chunk).ok()?;
        self.seen += chunk.len();
        Some(text)
    }

    /// Appends the complete characters of the held bytes + `chunk` to `text`. Invalid bytes
    /// become U+FFFD when `lossy`, else an error naming their position.
    pub(super) fn push(
        &mut self,
        chunk: &[u8],
        lossy: bool,
        text: &mut String,
    ) -> Result<(), String> {
        let joined;
        let mut input = if self.tail.is_empty() {
            chunk
        } else {
            let mut bytes = std::mem::take(&mut self.tail);
            bytes.extend_from_slice(chunk);
            joined = bytes;
            joined.as_slice()
        };
        let start = self.seen - (input.len() - chunk.len());
        self.seen += chunk.len();
        let total = input.len();
        loop {
            match std::str::from_utf8(input) {
                Ok(valid) => {
                    text.push_str(valid);
                    return Ok(());
                }
                Err(e) => {
                    let (valid, rest) = input.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        None => {
                            self.tail.extend_from_slice(rest);
                            return Ok(());
                        }
                        Some(_) if !lossy => {
                            let at = start + total - rest.len();
                            return Err(format!("invalid UTF-8 at byte {at}"));
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            input = &rest[bad..];
                        }
                    }
                }
            }
        }
    }

    /// End of the body: a character still incomplete is invalid.
    pub(super) fn finish(&mut self, lossy: bool, text: &mut String) -> Result<(), String> {
        if self.tail.is_empty() {
            return Ok(());
        }
        self.tail.clear();
        if lossy {
            text.push(char::REPLACEMENT_CHARACTER);
            Ok(())
        } else {
            Err(format!(
                "the body ends inside a UTF-8 character (byte {})",
                self.seen
            ))
        }
    }
}

pub(super) struct Sse {
    parser: SseParser,
    utf8: Utf8Joiner,
    /// A chunk's text when it must be joined with the held bytes of a split character.
    joined: String,
}

impl Sse {
    fn new() -> Self {
        Self {
            parser: SseParser::default(),
            utf8: Utf8Joiner::default(),
            joined: String::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), DecodeError> {
        // Validated here so that invalid bytes fail at once. A chunk of whole characters (the
        // usual case) is parsed in place; one that ends or starts inside a character goes
        // through the joiner. The valid prefix is decoded first: bytes after a done signal are
        // not the reply's, so invalid ones there fail nothing (as when they come in a later
        // chunk).
        let (text, utf8) = match self.utf8.borrow_whole(chunk) {
            Some(text) => (text, Ok(())),
            None => {
                self.joined.clear();
                let utf8 = self.utf8.push(chunk, false, &mut self.joined);
                (self.joined.as_str(), utf8)
            }
        };
        push_events(&mut self.parser, text, sink)?;
        if self.parser.pending() > MAX_FRAME {
            return Err(DecodeError::Malformed(format!(
                "SSE event larger than {} MiB",
                MAX_FRAME >> 20
            )));
        }
        match utf8 {
            Err(e) if !sink.is_stopped() => Err(DecodeError::Malformed(format!("SSE body: {e}"))),
            _ => Ok(()),
        }
    }

    fn finish(&mut self, sink: &mut impl Sink) -> Result<(), DecodeError> {
        let mut rest = String::new();
        self.utf8
            .finish(false, &mut rest)
            .map_err(|e| DecodeError::Malformed(format!("SSE body: {e}")))?;
        // As the SSE spec says, an event the body did not end with a blank line is dropped.
        push_events(&mut self.parser, &rest, sink)
    }
}

/// Hands every event `text` completes to the sink, until the sink stops.
fn push_events(
    parser: &mut SseParser,
    text: &str,
    sink: &mut impl Sink,
) -> Result<(), DecodeError> {
    if sink.is_stopped() {
        return Ok(());
    }
    parser.push(text, &mut |name, data| {
        if sink.is_stopped() {
            return Ok(());
        }
        sink.on_event(Some(name), data)
    })
}

/// Line framing for `ndjson` and `numbered_lines`.
#[derive(Debug)]
pub(super) struct Lines {
    numbered: bool,
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no newline.
    scanned: usize,
    line: usize,
}

impl Lines {
    fn new(numbered: bool) -> Self {
        Self {
            numbered,
            buf: Vec::new(),
            scanned: 0,
            line: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), DecodeError> {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(at) = self.buf[from..].iter().position(|&b| b == b'\n') {
            let end = from + at;
            self.line += 1;
            decode_line(self.numbered, self.line, &self.buf[start..end], sink)?;
            start = end + 1;
            from = start;
            if sink.is_stopped() {
                break;
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_FRAME {
            return Err(DecodeError::Malformed(format!(
                "line {} is longer than {} MiB",
                self.line + 1,
                MAX_FRAME >> 20
            )));
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut impl Sink) -> Result<(), DecodeError> {
        let last = std::mem::take(&mut self.buf);
        self.line += 1;
        decode_line(self.numbered, self.line, &last, sink)
    }
}

fn decode_line(
    numbered: bool,
    number: usize,
    line: &[u8],
    sink: &mut impl Sink,
) -> Result<(), DecodeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.trim_ascii().is_empty() {
        return Ok(());
    }
    let text = std::str::from_utf8(line).map_err(|e| {
        DecodeError::Malformed(format!(
            "line {number} is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if !numbered {
        return sink.on_event(None, text);
    }
    let Some((tag, data)) = text.split_once(':') else {
        return Err(DecodeError::Malformed(format!(
            "line {number} has no `TAG:` prefix: {}",
            snippet(text)
        )));
    };
    sink.on_event(Some(tag.trim()), data).map_err(|e| match e {
        DecodeError::Malformed(m) => DecodeError::Malformed(format!("line {number}: {m}")),
        other => other,
    })
}

/// Length-prefixed binary frames.
#[derive(Debug, Default)]
pub(super) struct Frames {
    buf: Vec<u8>,
    /// Body offset of `buf[0]`.
    offset: usize,
    count: usize,
    name: String,
}

const HEADER: usize = 5;

impl Frames {
    fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), DecodeError> {
        self.buf.extend_from_slice(chunk);
        let mut at = 0;
        while self.buf.len() - at >= HEADER && !sink.is_stopped() {
            let flag = self.buf[at];
            let mut length = [0u8; 4];
            length.copy_from_slice(&self.buf[at + 1..at + HEADER]);
            let length = u32::from_be_bytes(length) as usize;
            if length > MAX_FRAME {
                return Err(DecodeError::Malformed(format!(
                    "frame {} at byte {}: length {length} exceeds the {} MiB limit",
                    self.count + 1,
                    self.offset + at,
                    MAX_FRAME >> 20
                )));
            }
            if self.buf.len() - at - HEADER < length {
                break;
            }
            self.count += 1;
            let payload = &self.buf[at + HEADER..at + HEADER + length];
            self.name.clear();
            let _ = write!(self.name, "{flag}");
            decode_frame(flag, &self.name, payload, self.count, sink)?;
            at += HEADER + length;
        }
        self.buf.drain(..at);
        self.offset += at;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let have = self.buf.len();
        let whole = if have >= HEADER {
            let mut length = [0u8; 4];
            length.copy_from_slice(&self.buf[1..HEADER]);
            format!(
                "a {}-byte frame",
                HEADER + u32::from_be_bytes(length) as usize
            )
        } else {
            format!("its {HEADER}-byte header")
        };
        self.buf.clear();
        Err(DecodeError::Malformed(format!(
            "the body ends inside frame {} (byte {}): {have} bytes of {whole}",
            self.count + 1,
            self.offset
        )))
    }
}

fn decode_frame(
    flag: u8,
    name: &str,
    payload: &[u8],
    number: usize,
    sink: &mut impl Sink,
) -> Result<(), DecodeError> {
    if flag & 0x01 != 0 {
        return Err(DecodeError::Malformed(format!(
            "frame {number} is compressed (flag {flag}); compressed frames are not supported"
        )));
    }
    let data = std::str::from_utf8(payload).map_err(|e| {
        DecodeError::Malformed(format!(
            "frame {number} is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    if flag & 0x02 != 0 {
        return sink.on_end_stream(Some(name), data);
    }
    if data.trim().is_empty() {
        return Ok(());
    }
    sink.on_event(Some(name), data).map_err(|e| match e {
        DecodeError::Malformed(m) => DecodeError::Malformed(format!("frame {number}: {m}")),
        other => other,
    })
}

/// A single JSON document, decoded as soon as it is complete.
#[derive(Debug, Default)]
pub(super) struct JsonDoc {
    buf: Vec<u8>,
    scan: Scan,
    decoded: bool,
}

/// Tracks brackets and strings to see where a JSON document ends.
#[derive(Debug, Default)]
struct Scan {
    started: bool,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A bare number or literal: its end is the end of the body.
    scalar: bool,
}

impl Scan {
    /// The position just after the end of the document in `bytes`, if it ends there.
    fn end(&mut self, bytes: &[u8]) -> Option<usize> {
        if self.scalar {
            return None;
        }
        for (i, &b) in bytes.iter().enumerate() {
            if !self.started {
                if b.is_ascii_whitespace() {
                    continue;
                }
                self.started = true;
                match b {
                    b'{' | b'[' => self.depth = 1,
                    b'"' => self.in_string = true,
                    _ => {
                        self.scalar = true;
                        return None;
                    }
                }
                continue;
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

impl JsonDoc {
    fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), DecodeError> {
        if self.decoded {
            return trailing(chunk);
        }
        let from = self.buf.len();
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_FRAME {
            return Err(DecodeError::Malformed(format!(
                "JSON body larger than {} MiB",
                MAX_FRAME >> 20
            )));
        }
        if let Some(end) = self.scan.end(&self.buf[from..]) {
            let end = from + end;
            trailing(&self.buf[end..])?;
            self.decoded = true;
            let doc = std::mem::take(&mut self.buf);
            return decode_document(&doc[..end], sink);
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut impl Sink) -> Result<(), DecodeError> {
        if self.decoded {
            return Ok(());
        }
        self.decoded = true;
        let doc = std::mem::take(&mut self.buf);
        if doc.trim_ascii().is_empty() {
            return Err(DecodeError::Malformed(
                "empty body where a JSON document was expected".into(),
            ));
        }
        decode_document(&doc, sink)
    }
}

fn trailing(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.trim_ascii().is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Malformed(format!(
            "bytes after the end of the JSON document: {}",
            snippet(&String::from_utf8_lossy(bytes))
        )))
    }
}

fn decode_document(doc: &[u8], sink: &mut impl Sink) -> Result<(), DecodeError> {
    let text = std::str::from_utf8(doc).map_err(|e| {
        DecodeError::Malformed(format!(
            "JSON body is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    sink.on_event(None, text.strip_prefix('\u{feff}').unwrap_or(text))
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    fn named(name: &str, data: &str) -> Framed {
        Framed {
            name: Some(name.to_owned()),
            data: data.to_owned(),
            end_of_stream: false,
        }
    }

    #[test]
    fn frame_gives_the_events_the_decoder_reads() {
        let sse = b"event: delta\ndata: {\"t\":1}\n\n: ping\n\ndata: [DONE]\n\ndata: cut";
        assert_eq!(
            frame(Transport::Sse, sse).unwrap(),
            [named("delta", "{\"t\":1}"), named("message", "[DONE]")]
        );
        let lines = b"0:\"he\"\r\n\n0:\"llo\"";
        assert_eq!(
            frame(Transport::NumberedLines, lines).unwrap(),
            [named("0", "\"he\""), named("0", "\"llo\"")]
        );
        let mut frames = vec![0u8, 0, 0, 0, 2];
        frames.extend_from_slice(b"{}");
        frames.extend_from_slice(&[2, 0, 0, 0, 0]);
        let framed = frame(Transport::LengthPrefixed, &frames).unwrap();
        assert_eq!(framed[0], named("0", "{}"));
        assert!(framed[1].end_of_stream, "{framed:?}");
        assert_eq!(frame(Transport::Json, b" {\"a\":[1]} ").unwrap().len(), 1);
        assert!(frame(Transport::Json, b"{} x").is_err());
        assert!(frame(Transport::Text, b"plain").unwrap().is_empty());
    }
}
