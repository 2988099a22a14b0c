//! Tier 1: a flow replayed as direct HTTP calls. `render` builds each request, `client` sends
//! it with the session's cookies, `decode` turns the reply bytes into text deltas.

pub mod client;
pub mod decode;
pub mod render;
pub mod reuse;
pub mod tunnel;
pub mod websocket;
