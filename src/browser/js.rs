//! The page scripts, one copy each, as `.js` files under `js/` (each says what it does and
//! what it returns at its top). Three forms:
//! - an expression evaluated as it is (`storage.js`, `login/summary.js`);
//! - a function expression called with one JSON argument by `page::call`
//!   (`restore_storage.js`, `check_visible.js`, `inpage/*`);
//! - a function body run by `chatbox::script` with the chat box helpers and its constants
//!   bound (`chatbox/*`); `login/select_content.js` is called on an element.
//!
//! Every script returns a string (JSON, mostly), since that is what `Runtime.evaluate`
//! hands back by value without surprises.

/// The page's URL, user agent, origin storage and `<meta>` pairs (see `page::read_storage`).
pub(crate) const STORAGE: &str = include_str!("js/storage.js");
/// Writes a session's storage into the page's origin.
pub(crate) const RESTORE_STORAGE: &str = include_str!("js/restore_storage.js");
/// Which selectors match a visible element.
pub(crate) const CHECK_VISIBLE: &str = include_str!("js/check_visible.js");

/// The login's page summary and the field clearing it types with.
pub(crate) mod login {
    pub(crate) const SUMMARY: &str = include_str!("js/login/summary.js");
    pub(crate) const SELECT_CONTENT: &str = include_str!("js/login/select_content.js");
}

/// The chat box scripts (`chatbox`), shared by the probe and tier 3.
pub(crate) mod chatbox {
    pub(crate) const HELPERS: &str = include_str!("js/chatbox/helpers.js");
    pub(crate) const FIND_COMPOSER: &str = include_str!("js/chatbox/find_composer.js");
    pub(crate) const COMPOSER_TEXT: &str = include_str!("js/chatbox/composer_text.js");
    pub(crate) const SET_TEXT: &str = include_str!("js/chatbox/set_text.js");
    pub(crate) const WATCH: &str = include_str!("js/chatbox/watch.js");
    pub(crate) const FIND_SEND: &str = include_str!("js/chatbox/find_send.js");
    pub(crate) const FOCUS: &str = include_str!("js/chatbox/focus.js");
    pub(crate) const CLICK_SEND: &str = include_str!("js/chatbox/click_send.js");
    pub(crate) const READ_REPLY: &str = include_str!("js/chatbox/read_reply.js");
    pub(crate) const CLEANUP: &str = include_str!("js/chatbox/cleanup.js");
}

/// Tier 2's calls made inside the page (`inpage`).
pub(crate) mod inpage {
    pub(crate) const FETCH_START: &str = include_str!("js/inpage/fetch_start.js");
    pub(crate) const FETCH_RESULT: &str = include_str!("js/inpage/fetch_result.js");
    pub(crate) const FETCH_REST: &str = include_str!("js/inpage/fetch_rest.js");
    pub(crate) const SOCKET_OPEN: &str = include_str!("js/inpage/socket_open.js");
    pub(crate) const CALL_ERROR: &str = include_str!("js/inpage/call_error.js");
    pub(crate) const CALL_STOP: &str = include_str!("js/inpage/call_stop.js");
}
