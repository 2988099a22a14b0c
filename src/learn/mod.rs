//! Learning a site's chat flow from one probe message: `probe` types a message carrying a
//! unique marker while `browser::recorder` captures the network; `infer` finds the chat call,
//! templates it and finds its preflights; `decoder` infers how to read the reply; `verify`
//! replays the result once directly.
//!
//! Invariant: nothing here knows any site. Every decision comes from the recording: where
//! the marker is, which values came from where, which reading of the bytes yields the text
//! the page rendered.

pub mod recording;
