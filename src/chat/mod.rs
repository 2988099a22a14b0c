//! The one internal chat request and reply stream between the API front doors (OpenAI chat
//! completions, OpenAI Responses, Anthropic Messages) and the gateway, and the emulation of
//! what chat sites lack, wrapped once around the gateway's reply.
//!
//! Invariants:
//! - Front doors only translate their wire format to a [`Request`] and [`Event`]s back; every
//!   feature a site lacks (tools, `max_tokens`, `stop`, JSON output) is emulated here.
//! - Text streams as it arrives; the only text held back is what could begin a tool call or
//!   a stop sequence, plus, when the client asked for it, what must be checked before it is
//!   sent (a required tool call, a JSON answer), since a repair turn may replace it.

pub mod calls;
pub mod cut;
pub mod emulate;
pub mod ignored;
pub mod prompt;
pub mod reply;
pub mod request;
pub mod run;
pub mod schema;

pub use reply::{Event, FinishReason, Usage};
pub use request::{Message, OutputFormat, Part, Request, Tool, ToolCall, ToolChoice};
pub use run::{Started, start};
