//! ComputeTower: serves the OpenAI API from web chat sites by replaying the internal chat
//! calls their own front ends make. `main.rs` only parses the command line; everything else
//! lives here. See README.md (Architecture) for the map.

pub mod account_pool;
pub mod api;
pub mod attachment;
pub mod browser;
pub mod chat;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod demo;
pub mod fallback;
pub mod flow;
pub mod gateway;
pub mod inline;
pub mod learn;
pub mod lease;
pub mod memory;
pub mod openai;
pub mod pinning;
pub mod recording;
pub mod renew;
pub mod replay;
pub mod role;
pub mod server;
pub mod session;
pub mod shared;
pub mod slots;
pub mod store;
pub mod telemetry;
pub mod tier_floor;
pub mod tokens;
pub mod vault;

/// Installs the TLS crypto provider once per process (reqwest is built without one). At the
/// root because every layer that opens a client needs it, and none of them should depend on
/// another for it.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
