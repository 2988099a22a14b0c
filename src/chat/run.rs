//! Runs a [`Request`] through the gateway with the emulation around its reply: the prompt is
//! rendered, the site's reply is fed to the [`Emulator`], a cut stops the site's call (the
//! reply is dropped, which cancels it), and a failed check gets one repair turn.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};

use super::emulate::{Control, Emulator};
use super::prompt::{prompt_of, repair_prompt};
use super::reply::{Event, Finish, FinishReason, Usage};
use super::request::Request;
use crate::gateway::{Gateway, GatewayError, Reply};
use crate::replay::decode::Delta;
use crate::store::events::Record;
use crate::tokens::count_prompt_tokens;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, GatewayError>> + Send>>;

/// A reply under way: the site's first token has arrived.
pub struct Started {
    /// The tier that serves it.
    pub tier: u8,
    /// Tokens of the prompt sent (0 unless the request counts usage).
    pub prompt_tokens: u64,
    pub events: EventStream,
}

/// Starts `request`; errors before the site's first token come back here.
pub async fn start(
    gateway: Arc<Gateway>,
    request: Request,
    request_id: &str,
    forced_tier: Option<u8>,
) -> Result<Started, GatewayError> {
    let prompt = prompt_of(&request);
    let reply = gateway.chat(&prompt, request_id, forced_tier).await?;
    let prompt_tokens = match request.count_usage {
        true => count_prompt_tokens(&prompt.messages),
        false => 0,
    };
    let tier = reply.tier();
    let driver = Driver {
        account_id: reply.account_id().map(str::to_owned),
        emulator: Emulator::new(&request),
        gateway,
        request,
        request_id: request_id.to_owned(),
        forced_tier,
        reply: Some(reply),
        queue: VecDeque::new(),
        prompt_tokens,
        done: false,
    };
    let events = futures_util::stream::unfold(driver, |mut driver| async move {
        let item = driver.next().await?;
        Some((item, driver))
    });
    Ok(Started {
        tier,
        prompt_tokens,
        events: Box::pin(events),
    })
}

struct Driver {
    gateway: Arc<Gateway>,
    request: Request,
    request_id: String,
    forced_tier: Option<u8>,
    reply: Option<Reply>,
    /// The account of the reply, for the record (the reply forgets it when it ends).
    account_id: Option<String>,
    emulator: Emulator,
    queue: VecDeque<Event>,
    prompt_tokens: u64,
    done: bool,
}

impl Driver {
    async fn next(&mut self) -> Option<Result<Event, GatewayError>> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let mut out = Vec::new();
            let control = match self.reply.as_mut() {
                None => self.emulator.end(&mut out),
                Some(reply) => match reply.next().await {
                    Some(Ok(Delta::Done)) | None => self.emulator.end(&mut out),
                    Some(Ok(delta)) => self.emulator.push(delta, &mut out),
                    Some(Err(source)) => {
                        self.done = true;
                        self.reply = None;
                        return Some(Err(GatewayError::Upstream {
                            service: self.request.model.clone(),
                            source,
                        }));
                    }
                },
            };
            self.queue.extend(out);
            self.record_notes();
            match control {
                Control::Continue => {}
                // Dropping the reply cancels the site's call; `end` runs on the next turn.
                Control::Cut => {
                    if let Some(reply) = self.reply.take() {
                        reply.end_early("cut short for the client (a stop sequence or max_tokens)");
                    }
                }
                Control::End(reason) => self.finish(reason),
                Control::Repair(problem) => self.repair(&problem).await,
            }
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        self.reply = None;
        self.done = true;
        let usage = self
            .emulator
            .completion_tokens()
            .map(|(answer, reasoning)| Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: answer + reasoning,
                reasoning_tokens: reasoning,
            });
        self.queue
            .push_back(Event::Finish(Finish { reason, usage }));
    }

    /// One more turn on the site with the problem stated; if it cannot start, the reply is
    /// returned as it was.
    async fn repair(&mut self, problem: &str) {
        if let Some(reply) = self.reply.take() {
            reply.end_early("cut for a repair turn (the reply could not be used)");
        }
        let prompt = repair_prompt(&self.request, self.emulator.raw(), problem);
        let id = format!("{}-repair", self.request_id);
        match self.gateway.chat(&prompt, &id, self.forced_tier).await {
            Ok(reply) => {
                self.emulator = self.emulator.for_repair();
                self.account_id = reply.account_id().map(str::to_owned);
                self.reply = Some(reply);
            }
            Err(e) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "the repair turn could not start");
                let mut out = Vec::new();
                let reason = self.emulator.give_up(&mut out);
                self.queue.extend(out);
                self.finish(reason);
            }
        }
    }

    fn record_notes(&mut self) {
        for note in self.emulator.take_notes() {
            tracing::info!(
                request_id = %self.request_id,
                failure = note.failure,
                action = note.action,
                problem = %note.problem,
                "emulated output check failed"
            );
            self.gateway.events().record(Record::Decision {
                request_id: self.request_id.clone(),
                service: self.request.model.clone(),
                account_id: self.account_id.clone(),
                failure: note.failure.to_owned(),
                action: note.action.to_owned(),
            });
        }
    }
}

/// A whole reply, for clients that do not stream.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub reasoning: String,
    pub calls: Vec<super::request::ToolCall>,
    pub finish: Option<Finish>,
}

/// Reads a reply to its end.
pub async fn collect(mut events: EventStream) -> Result<Collected, GatewayError> {
    let mut collected = Collected::default();
    while let Some(event) = events.next().await {
        match event? {
            Event::Text(text) => collected.text.push_str(&text),
            Event::Reasoning(text) => collected.reasoning.push_str(&text),
            Event::ToolCall(call) => collected.calls.push(call),
            Event::Finish(finish) => collected.finish = Some(finish),
        }
    }
    Ok(collected)
}

/// Every event of a reply, for clients that do not stream.
pub async fn collect_events(mut events: EventStream) -> Result<Vec<Event>, GatewayError> {
    let mut out = Vec::new();
    while let Some(event) = events.next().await {
        out.push(event?);
    }
    Ok(out)
}
