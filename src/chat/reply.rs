//! The internal reply stream every front door translates from.

use serde::Serialize;

use super::request::ToolCall;

/// One item of a reply, in order. The last is always [`Event::Finish`] (or an error).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Answer text, as it streams.
    Text(String),
    /// The site's reasoning ("thinking"), as it streams.
    Reasoning(String),
    /// A complete, validated tool call.
    ToolCall(ToolCall),
    Finish(Finish),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// Counted when the request asked for it.
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The site ended its reply.
    Stop,
    /// The answer reached this stop sequence (which is not part of it).
    StopSequence(String),
    /// The answer reached `max_tokens`.
    Length,
    /// The reply ends with tool calls.
    ToolCalls,
}

impl FinishReason {
    /// The OpenAI chat completions name.
    pub fn openai(&self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopSequence(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }

    /// The Anthropic Messages name.
    pub fn anthropic(&self) -> &'static str {
        match self {
            FinishReason::Stop => "end_turn",
            FinishReason::StopSequence(_) => "stop_sequence",
            FinishReason::Length => "max_tokens",
            FinishReason::ToolCalls => "tool_use",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    /// Answer, tool calls and reasoning.
    pub completion_tokens: u64,
    /// The reasoning part of `completion_tokens`.
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}
