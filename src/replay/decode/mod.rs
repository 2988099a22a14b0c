//! The response decoder: the raw bytes of a chat site's response → text, reasoning, id and
//! done deltas, incrementally, driven only by the flow's [`ResponseSpec`].
//!
//! Invariants:
//! - Nothing here knows a site: framing follows `transport`, accrual follows `text` and
//!   `reasoning`, the end and in-band errors follow `done` and `error`.
//! - Chunking never changes the result: events, lines, frames and UTF-8 characters may be
//!   split at any byte across `feed` calls (the text transport may only cut its text pieces
//!   differently). A delta never holds half a character.
//! - Both entry points, [`Decoder::feed`] (push) and [`decode_stream`] (a body stream), run the
//!   same framer and the same accrual engine.
//! - After a done signal, nothing more is emitted; after an error, nothing more is decoded.
//! - In a stream ([`decode_stream`]), a body that ends without any of the flow's end signals
//!   (when it has some) ends with [`DecodeError::Truncated`]: a cut reply is never passed
//!   off as complete.
//! - The SSE framer (`sse.rs`) has `eventsource-stream`'s semantics, checked against it: an
//!   event not terminated by a blank line when the body ends is dropped, as the SSE spec says.
//!
//! Rule details:
//! - Pointers may omit the leading `/`; `-1` names the last element of a list.
//! - A `Signal` or `ErrorRule` that names no condition at all matches nothing. A pointer
//!   condition needs a non-null value there (`"finish_reason": null` is not an end).
//! - SSE events without an `event:` line are named `message`, as in the browser.
//! - SSE and WebSocket data that is not JSON is ignored unless a signal or error rule matches
//!   it (heartbeats, `[DONE]`, socket pings); the other transports require JSON.
//! - Cumulative accrual ignores empty values: they neither emit nor restart the text.

mod accrual;
mod framing;
mod markup;
mod patch;
mod pointer;
mod select;
mod sse;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;

use self::accrual::Engine;
pub use self::framing::{Framed, frame};
use self::framing::{Framer, Sink};
pub(crate) use self::patch::is_op_list;
use crate::flow::{ResponseSpec, Transport};

/// The largest frame (SSE event, line, binary frame, JSON document) the decoder accepts.
pub const MAX_FRAME: usize = 16 << 20;

/// One piece of decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// The next piece of the answer.
    Text(String),
    /// The next piece of the reasoning ("thinking").
    Reasoning(String),
    /// An id the flow keeps (`ResponseSpec::ids`), the first time it is seen.
    Id { name: String, value: String },
    /// A done signal: the reply is complete.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The site reported an error in-band (message from the ErrorRule).
    #[error("the site reported an error: {0}")]
    Upstream(String),
    /// The bytes do not fit the spec (bad framing, invalid JSON where JSON is required, frame
    /// too large); the message says what and where.
    #[error("the response does not fit the flow's decoder: {0}")]
    Malformed(String),
    /// Reading the body failed (the underlying stream's error, as text).
    #[error("reading the response body failed: {0}")]
    Body(String),
    /// The body ended before any of the flow's end signals: the reply is cut short.
    #[error("the site closed the reply before its end marker; the reply is incomplete")]
    Truncated,
}

/// Incremental decoder: push bytes, get deltas.
pub struct Decoder {
    framer: Framer,
    engine: Engine,
    finished: bool,
}

impl Decoder {
    pub fn new(spec: &ResponseSpec) -> Decoder {
        let json_required = !matches!(spec.transport, Transport::Sse | Transport::Websocket);
        Decoder {
            framer: Framer::new(spec.transport),
            engine: Engine::new(spec, json_required),
            finished: false,
        }
    }

    /// Decodes the next bytes of the body, appending the deltas they complete to `out`. For
    /// the `websocket` transport each call is one whole message.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Delta>) -> Result<(), DecodeError> {
        if self.engine.is_stopped() || self.finished {
            return Ok(());
        }
        let result = self
            .framer
            .feed(chunk, &mut Decoding::new(&mut self.engine, out));
        self.fail_on_error(result)
    }

    /// One whole message (a WebSocket frame's text; also usable by callers that already have
    /// framed events): `event` is its name, `data` its payload.
    pub fn feed_message(
        &mut self,
        event: Option<&str>,
        data: &str,
        out: &mut Vec<Delta>,
    ) -> Result<(), DecodeError> {
        let result = self.engine.on_event(event, data, out);
        self.fail_on_error(result)
    }

    /// End of body: flushes what is pending (a last line without newline, a single JSON
    /// document, a held partial markup tag). An unterminated last SSE event is dropped.
    pub fn finish(&mut self, out: &mut Vec<Delta>) -> Result<(), DecodeError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        if !self.engine.is_stopped() {
            let result = self
                .framer
                .finish(&mut Decoding::new(&mut self.engine, out));
            self.fail_on_error(result)?;
        }
        self.engine.finish(out);
        Ok(())
    }

    /// Whether a done signal was seen.
    pub fn is_done(&self) -> bool {
        self.engine.is_done()
    }

    fn fail_on_error(&mut self, result: Result<(), DecodeError>) -> Result<(), DecodeError> {
        if result.is_err() {
            self.engine.fail();
        }
        result
    }
}

/// The accrual engine as the framer's sink, with the deltas it emits.
struct Decoding<'a> {
    engine: &'a mut Engine,
    out: &'a mut Vec<Delta>,
}

impl<'a> Decoding<'a> {
    fn new(engine: &'a mut Engine, out: &'a mut Vec<Delta>) -> Self {
        Self { engine, out }
    }
}

impl Sink for Decoding<'_> {
    fn on_event(&mut self, name: Option<&str>, data: &str) -> Result<(), DecodeError> {
        self.engine.on_event(name, data, self.out)
    }

    fn on_end_stream(&mut self, name: Option<&str>, data: &str) -> Result<(), DecodeError> {
        self.engine.on_end_stream(name, data, self.out)
    }

    fn on_text(&mut self, text: &str) {
        self.engine.on_text(text, self.out);
    }

    fn is_stopped(&self) -> bool {
        self.engine.is_stopped()
    }
}

/// Stream adapter used by the HTTP replay: body bytes in, deltas out, as they arrive. The body
/// is not read further once the reply is done or has failed.
pub fn decode_stream<S, B, E>(
    spec: &ResponseSpec,
    body: S,
) -> impl Stream<Item = Result<Delta, DecodeError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]> + Send,
    E: std::fmt::Display,
{
    DeltaStream {
        body: Some(Box::pin(body)),
        decoder: Decoder::new(spec),
        ready: VecDeque::new(),
        scratch: Vec::new(),
        expects_end: !spec.done.is_empty(),
    }
}

struct DeltaStream<S> {
    /// `None` once the body is over (ended, failed, or the reply is done).
    body: Option<Pin<Box<S>>>,
    /// Whether the flow knows an end signal: a body ending without one was cut short.
    expects_end: bool,
    decoder: Decoder,
    ready: VecDeque<Result<Delta, DecodeError>>,
    scratch: Vec<Delta>,
}

impl<S> DeltaStream<S> {
    /// Queues the deltas of one step, then its error, and stops reading on error or done.
    fn queue(&mut self, result: Result<(), DecodeError>) {
        self.ready.extend(self.scratch.drain(..).map(Ok));
        if let Err(e) = result {
            self.ready.push_back(Err(e));
            self.body = None;
        } else if self.decoder.is_done() {
            self.body = None;
        }
    }
}

impl<S, B, E> Stream for DeltaStream<S>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    type Item = Result<Delta, DecodeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is `Unpin` (the body is boxed).
        let this = self.get_mut();
        loop {
            if let Some(item) = this.ready.pop_front() {
                return Poll::Ready(Some(item));
            }
            let Some(body) = this.body.as_mut() else {
                return Poll::Ready(None);
            };
            let result = match body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    this.decoder.feed(chunk.as_ref(), &mut this.scratch)
                }
                Poll::Ready(Some(Err(e))) => Err(DecodeError::Body(e.to_string())),
                Poll::Ready(None) => {
                    this.body = None;
                    this.decoder.finish(&mut this.scratch).and_then(|()| {
                        match this.decoder.is_done() || !this.expects_end {
                            true => Ok(()),
                            false => Err(DecodeError::Truncated),
                        }
                    })
                }
            };
            this.queue(result);
        }
    }
}

/// Decodes a whole body (tests, and the learner trying candidate specs over recorded bytes).
pub fn decode_all(spec: &ResponseSpec, body: &[u8]) -> Result<Vec<Delta>, DecodeError> {
    let mut decoder = Decoder::new(spec);
    let mut out = Vec::new();
    decoder.feed(body, &mut out)?;
    decoder.finish(&mut out)?;
    Ok(out)
}

/// Joins the deltas of a decode into (text, reasoning).
pub fn collect_text(deltas: &[Delta]) -> (String, String) {
    let mut text = String::new();
    let mut reasoning = String::new();
    for delta in deltas {
        match delta {
            Delta::Text(piece) => text.push_str(piece),
            Delta::Reasoning(piece) => reasoning.push_str(piece),
            Delta::Id { .. } | Delta::Done => {}
        }
    }
    (text, reasoning)
}
