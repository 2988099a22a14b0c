//! Tier 1: a flow replayed as direct HTTP calls. `render` builds each request, `client` sends
//! it with the session's cookies, `decode` turns the reply bytes into text deltas, `failure`
//! says why a call failed (for every tier).

pub mod client;
pub mod decode;
pub mod failure;
pub mod plan;
pub mod render;
pub mod reuse;
pub mod tunnel;
pub mod uploads;
pub mod websocket;

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

use decode::Delta;
use failure::ReplayError;

/// The decoded reply of any tier, as it arrives.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, ReplayError>> + Send>>;

/// Timeouts for calls to sites.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
}
