//! The built-in demo chat site: a small but real web chat site that `computetower demo` and the
//! tests learn and replay.
//!
//! It behaves on the wire like real chat sites do, in one of several [`Shape`]s (OpenAI-like
//! SSE deltas, ChatGPT-like JSON patches, Qwen-like cumulative SSE, NDJSON, tRPC-like numbered
//! lines, a plain JSON answer, Connect-like length-prefixed frames, Claude-like ids in the path
//! with Anthropic SSE events, a WebSocket, signed anti-replay requests, the prompt in a tRPC
//! create call, path-less patch batches, Open WebUI and `<think>` reasoning markup, a send that
//! reloads the page), behind one of several
//! [`LoginPattern`]s (a login form, a landing page, a two-step form, no login, a captcha).
//! Whatever the shape:
//! - An account's URL is the site root; from there a browser reaches `/chat` by generic means.
//! - `GET /login` is an HTML login form; `POST /login` sets the HttpOnly [`SESSION_COOKIE`] and
//!   a page whose script stores the bearer token in `localStorage[`[`TOKEN_KEY`]`]`, then goes
//!   to `/chat` (for [`LoginPattern::Captcha`], after the challenge). `POST /api/login` does
//!   the same for scripts, answering `{"token": …}`.
//! - `GET /chat` is the chat page, with the per-session CSRF token in
//!   `<meta name="csrf-token" content="…">`; its script creates a conversation (the preflight),
//!   then calls the shape's chat endpoint with `authorization: Bearer …` and `x-csrf-token`,
//!   and renders the streamed reply (reasoning in a `<details>`).
//!   Some shapes differ: [`Shape::Claude`] fetches the organization first and puts both ids in
//!   the path; [`Shape::Ws`] chats over a WebSocket (bearer token in the first frame);
//!   [`Shape::Signed`] signs each chat call with a per-session key hidden in an inline script,
//!   and refuses stale or reused signatures (403 `bad_signature`), as every shape does with
//!   [`DemoConfig::signed`]; [`Shape::Newchat`] sends the first message in its create call;
//!   [`Shape::Batch`] and [`Shape::Details`] make no create call (the first chat call makes the
//!   conversation); [`Shape::Think`]'s login stores no token, its chat page does when it
//!   loads; [`Shape::Fragile`]'s page lets its form submit natively the first time.
//! - The API answers 401 (no, expired or revoked session; bad bearer), 403 (bad CSRF token),
//!   404 (unknown conversation), 429 with `Retry-After` (rate limit) and 400 (bad body) with
//!   `{"error":{"message","code"}}`.
//!
//! The reply is deterministic ([`reply_for`]), so tests compare decoded text with it exactly.
//! A prompt carrying ComputeTower's tool or JSON instructions is answered as they ask
//! ([`model`]): tool calls, a first malformed call that a repair turn fixes, JSON.
//!
//! # Conversations
//!
//! The preflight creates a conversation on the server; every chat call naming it again is its
//! next turn, and replies after the first say so ([`reply_for_turn`]). The server reads only
//! the conversation id (never a history or a parent id), from where each shape puts it:
//!
//! | shape | conversation id from | a later turn sends |
//! | --- | --- | --- |
//! | `openai`, `signed` | `POST /api/conversations` → `data.id` | body `conversation_id` (the page also resends the whole `messages` history; only the last user message is read) |
//! | `patch` | `POST /api/conversations` → `data.id` | body `conversation_id`, plus `parent_message_id` = the assistant message id of the previous reply (the `delta` event with `"o":"add"`, at `v.message.id`); the page sends it, the server does not check it |
//! | `cumulative` | `POST /api/v2/chats/new` → `data.id` | query `chat_id` (and the same `chat_id` in the body) |
//! | `ndjson` | `POST /api/conversations` → `data.id` | body `conversation.id` |
//! | `numbered` | `POST /api/conversations` → `data.id` | body `0.json.conversationId` |
//! | `json` | `POST /api/conversations` → `data.id` | form field `conversation` |
//! | `frames` | `POST /api/conversations` → `data.id` | body `conversationId` |
//! | `claude` | `POST /api/organizations/{org}/chat_conversations` → `uuid` | both ids in the completion path |
//! | `ws` | `POST /api/conversations` → `data.id` | the same socket (`/api/ws?conversation=ID`), `conversation_id` in each `chat` frame; a new socket for the same id continues it too |
//! | `newchat` | the tRPC `message.newChat` call that carries the first message → `chatId` | `/api/chat` with `chatId`, `mode: "append"` and the message |
//! | `batch` | the first chat call (no `conversation_id`) → the `add` event's `v.conversation_id` | `conversation_id` and `parent_message_id` = the previous reply's `v.message.id`, both checked |
//! | `details` | the first chat call (`chat_id: null`) → the first event's `chat_id` | `chat_id`, `parent_id` = the previous reply's `message_id`, `turn` = turns so far, all checked |
//! | `think` | `POST /api/v1/chats/new` → `data.id`, in the path | `parent_id` = the previous reply's `response_id` (checked) |
//! | `fragile` | `POST /api/conversations` → `data.id` | body `conversation_id` |
//!
//! The chat page keeps one conversation per page load. Where a later turn names the previous
//! reply, a wrong or missing one is refused with 400 `bad_parent` (a wrong `turn` with 400
//! `bad_turn`): such conversations continue only through what the replies said.
//!
//! # Uploads
//!
//! Every chat page has a profile-photo `<input type="file" id="avatar">` in its top bar, before
//! the composer, that does nothing: the file input a learner must not take for the composer's.
//!
//! With [`DemoConfig::uploads`] (`demo-site --uploads multipart|slot`) the chat page of the
//! `openai` and `signed` shapes (the others ignore it) gets an "Attach" button opening a hidden
//! `<input type="file" id="attach" accept="image/*,text/plain" multiple>`. Files are uploaded
//! as soon as they are chosen (a chip per file: `NAME ✓`, or the error), and the next chat
//! call names them (a send waits for uploads still running). Upload calls carry the API's
//! usual `authorization` and `x-csrf-token` headers and session cookie, except the slot
//! shape's raw `PUT`. Only the configured shape's routes answer; the others 404.
//!
//! | shape | calls | the chat body carries |
//! | --- | --- | --- |
//! | `multipart` | `POST /api/files`, `multipart/form-data` with `purpose` = `chat` and `file` → `{"id":"file-<16 hex>","name","bytes","mime_type"}` | `"files": ["file-…", …]` |
//! | `slot` | `POST /api/uploads` `{"file_name","mime_type","size"}` → `{"upload_id":"up_<16 hex>","upload_url":"http://HOST/blob/<32 hex>"}`; `PUT` of the raw bytes to `upload_url` with `content-type` and no session (the token is the authority; 200, empty body, an `ETag`); `POST /api/uploads/{upload_id}/confirm` `{}` → `{"file":{"id":"file-<16 hex>","status":"ready"}}` | `"attachments": [{"id","name","mime_type","size"}, …]` (only `id` is read) |
//!
//! Without files the key is left out. Refusals, in the usual error shape: no session 401 (CSRF
//! 403); a file over [`MAX_UPLOAD_BYTES`] (1 MiB) 413 `file_too_large`; a type neither
//! `image/*` nor `text/plain` 415 `unsupported_type` (the slot shape's from the declared type);
//! a PUT whose length is not the declared size 400 `size_mismatch` (the token stays usable), an
//! unknown token 404 `not_found`, a used one 409 `already_uploaded`; a confirm before the PUT
//! 409 `not_uploaded`, of another account's slot 404; a chat call naming a file that is unknown,
//! unconfirmed or another account's 400 `unknown_file` (`file ID is not yours or does not
//! exist`). A file belongs to the account (email) that uploaded it. The site holds at most 256
//! files and 64 MiB (the oldest go first) and 256 open slots.
//!
//! A reply to a call naming files starts with one [`describe_file`] line per file, in the
//! order named (`Received NAME (TYPE, N bytes, sha256 <first 16 hex>).`), then a blank line,
//! then the usual reply ([`reply_with_files`]); it streams like any other reply.
//!
//! # Test controls (`/__demo/…`)
//!
//! - `POST /__demo/expire-sessions`, `POST /__demo/revoke?email=E`: sessions break; every API
//!   call of theirs then answers 401 `{"error":{"code":"unauthenticated",…}}`, `/chat`
//!   redirects to the login, and a fresh login works ([`DemoConfig::session_ttl`] expires
//!   them by age).
//! - `POST /__demo/rotate-csrf`: every session gets a new CSRF token; calls with the old one
//!   get 403 `csrf_failed` until the chat page is read again.
//! - `POST /__demo/rate-limit?email=E&seconds=S`: account `E` gets 429 on every chat call
//!   for `S` seconds (`seconds=0` lifts it), `Retry-After` = the seconds left, rounded up
//!   (or `&retry_after=TEXT` sent verbatim, as a misbehaving site might); other accounts are
//!   untouched. [`DemoConfig::rate_limit`] is the per-minute limit.
//! - `POST /__demo/anti-bot?on=true|false` (`GET` reads it), `POST
//!   /__demo/expire-clearances`: the Cloudflare-like interstitial, see [`antibot`] for the
//!   exact rule.
//! - `POST /__demo/garbage?count=N`: the next `N` chat calls answer 200 with an HTML page
//!   instead of a reply (a site that answers garbage, then recovers).
//! - `POST /__demo/truncate?count=N`: the next `N` replies stop after a few pieces, without
//!   their end marker (a connection dropped mid-reply).
//! - `POST /__demo/shape?to=SHAPE` (`GET` reads it): serves another [`Shape`] from now on.
//!   Every shape's preflight and chat routes exist, but only the current shape's answer;
//!   the others 404 like unknown paths (the shared `/api/conversations` preflight stays
//!   when both shapes use it). The chat page loaded next speaks the new shape. Sessions and
//!   conversations carry over.
//! - `GET /__demo/conversations`: `[{"id","turns","email"}]`, oldest first.
//! - `GET /__demo/stats`: chat replies `{"active","completed","cancelled","max_active",
//!   "pages","active_by_email":{E:n},"max_active_by_email":{E:n},"logins_by_email":{E:n},
//!   "rate_limited_by_email":{E:n},"uploads","files_in_chat"}` (`pages`: chat pages served to
//!   a session; emails in lower case; a reply counts as active from the moment the site
//!   starts answering until its body ends or the client drops it; logins by any page or
//!   `/api/login`; chat calls answered 429; `uploads`: files whose bytes the site accepted,
//!   multipart POSTs plus slot PUTs; `files_in_chat`: file references carried by chat calls
//!   that got a reply); `?wait_idle_ms=N` answers once no reply streams (at most N ms later),
//!   so a test waits on the site instead of polling it; `POST /__demo/reset-stats` zeroes the end counts, the pages, the
//!   logins, the 429s and the upload counts, and lowers the high-water marks to what streams
//!   now.
//! - `GET /__demo/captcha` tells where to click on the latest captcha challenge.

pub mod antibot;
mod chat;
pub mod model;
mod shapes;
mod site;
mod state;
#[cfg(test)]
mod tests;
mod uploads;
mod ws;

pub use uploads::{MAX_UPLOAD_BYTES, describe_file};

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Name of the HttpOnly session cookie.
pub const SESSION_COOKIE: &str = "demo_sid";
/// Name of a second, non-HttpOnly cookie the site sets (not checked; real sites set several).
pub const DEVICE_COOKIE: &str = "demo_device";
/// `localStorage` key under which the login page stores the bearer token.
pub const TOKEN_KEY: &str = "demo_token";
/// Header carrying the CSRF token from the chat page's `<meta name="csrf-token">`.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// `localStorage` key under which the think shape's chat page stores the bearer token when it
/// loads, as `{"value": TOKEN, "__version": "0"}` (its login stores nothing).
pub const WRAPPED_TOKEN_KEY: &str = "userToken";

/// The wire format the site's chat endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `POST /api/openai/v1/chat/completions`, SSE chunks with `delta.content` /
    /// `delta.reasoning_content`, `data: [DONE]`.
    Openai,
    /// `POST /backend-api/conversation`, ChatGPT-like SSE of JSON-patch deltas.
    Patch,
    /// `POST /api/v2/chat/completions?chat_id=…`, Qwen-like SSE with cumulative text per phase.
    Cumulative,
    /// `POST /api/stream`, `application/x-ndjson` token lines.
    Ndjson,
    /// `POST /api/trpc/chat.send`, `TAG:JSON` lines ending with `8:null`.
    Numbered,
    /// `POST /api/ask`, form-encoded request, one JSON answer.
    Json,
    /// `POST /api/connect/chat.v1.ChatService/Stream`, Connect-like length-prefixed frames.
    Frames,
    /// Claude-like: `GET /api/organizations`, then `POST /api/organizations/{org}/
    /// chat_conversations` (the server picks the conversation id), then `POST …/
    /// chat_conversations/{conversation}/completion`, Anthropic-style SSE events
    /// (`content_block_delta` with `thinking_delta` / `text_delta`, `message_stop`).
    Claude,
    /// `GET /api/ws?conversation=…` upgraded to a WebSocket: `{"type":"auth"}` then
    /// `{"type":"chat"}` frames in, `start` / `token` / `done` frames out.
    Ws,
    /// `POST /api/signed/v1/chat/completions`: the OpenAI-like call and stream, signed with
    /// `x-signature` = hex SHA-256 of `KEY\nTIMESTAMP\nBODY` and `x-timestamp` (ms); stale or
    /// reused signatures get 403 `bad_signature`, so direct replay fails.
    Signed,
    /// Le Chat-like, the prompt in a preflight: the first message goes in a tRPC "new chat"
    /// call (`POST /api/trpc/message.newChat?batch=1`, body `{"0":{"json":{…}}}`) answered
    /// with ids only; the reply streams from `POST /api/chat` carrying only the chat id
    /// (`mode: "start"`), as AI-SDK data-stream lines (`f:`, `0:"text"`, `e:`, `d:`). A later
    /// turn sends its message in `/api/chat` itself (`mode: "append"`).
    Newchat,
    /// ChatGPT-like without a create call: the first turn names no conversation, the first
    /// patch event names the one the server made and the reply's message id; a later turn
    /// must send both (`conversation_id`, `parent_message_id`). Operations come in batches
    /// `{"v": [ops]}` with no path of their own, the last words of the reply included.
    Batch,
    /// Open WebUI-like reasoning markup in a delta stream: `<details type="reasoning"
    /// done="false">` as a piece of its own, then pieces with a `phase`, the reasoning quoted
    /// line by line under a `<summary>`, the answer in `<answer>…</answer>`. No create call:
    /// the first event names the chat and the reply; a later turn sends `chat_id`, the
    /// previous reply's id as `parent_id`, and a `turn` counter.
    Details,
    /// A cumulative stream of `<think>` markup whose closing tag moves as the text grows. The
    /// bearer token is written to localStorage (`userToken`, wrapped as
    /// `{"value":…,"__version":"0"}`) only when the chat page loads, never at login. A later
    /// turn names the previous reply's `response_id` as `parent_id`.
    Think,
    /// A front end whose send control natively submits the form (and so reloads the page) the
    /// first time, before its script took over; retyped, it works. SSE with named events.
    Fragile,
}

impl Shape {
    pub const ALL: [Shape; 15] = [
        Shape::Openai,
        Shape::Patch,
        Shape::Cumulative,
        Shape::Ndjson,
        Shape::Numbered,
        Shape::Json,
        Shape::Frames,
        Shape::Claude,
        Shape::Ws,
        Shape::Signed,
        Shape::Newchat,
        Shape::Batch,
        Shape::Details,
        Shape::Think,
        Shape::Fragile,
    ];

    /// The kebab-case name (`openai`, `patch`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Openai => "openai",
            Shape::Patch => "patch",
            Shape::Cumulative => "cumulative",
            Shape::Ndjson => "ndjson",
            Shape::Numbered => "numbered",
            Shape::Json => "json",
            Shape::Frames => "frames",
            Shape::Claude => "claude",
            Shape::Ws => "ws",
            Shape::Signed => "signed",
            Shape::Newchat => "newchat",
            Shape::Batch => "batch",
            Shape::Details => "details",
            Shape::Think => "think",
            Shape::Fragile => "fragile",
        }
    }

    /// Whether replies in this shape carry a reasoning ("thinking") phase.
    pub fn has_reasoning(self) -> bool {
        matches!(
            self,
            Shape::Openai
                | Shape::Cumulative
                | Shape::Numbered
                | Shape::Frames
                | Shape::Claude
                | Shape::Signed
                | Shape::Details
                | Shape::Think
        )
    }

    /// Whether the first chat call creates the conversation (no call before it does): its
    /// reply names the conversation.
    pub fn creates_on_first_chat(self) -> bool {
        matches!(self, Shape::Batch | Shape::Details)
    }

    /// Path of the chat endpoint (without query string), as a route: `{org}` and
    /// `{conversation}` stand for ids (Claude); the WebSocket shape's is the upgrade path.
    pub fn chat_path(self) -> &'static str {
        match self {
            Shape::Openai => "/api/openai/v1/chat/completions",
            Shape::Patch => "/backend-api/conversation",
            Shape::Cumulative => "/api/v2/chat/completions",
            Shape::Ndjson => "/api/stream",
            Shape::Numbered => "/api/trpc/chat.send",
            Shape::Json => "/api/ask",
            Shape::Frames => "/api/connect/chat.v1.ChatService/Stream",
            Shape::Claude => {
                "/api/organizations/{org}/chat_conversations/{conversation}/completion"
            }
            Shape::Ws => "/api/ws",
            Shape::Signed => "/api/signed/v1/chat/completions",
            Shape::Newchat => "/api/chat",
            Shape::Batch => "/backend-api/f/conversation",
            Shape::Details => "/api/chat/completions",
            Shape::Think => "/api/v1/chats/{conversation}/completions",
            Shape::Fragile => "/api/fragile/chat",
        }
    }

    /// Path of the "create conversation" preflight; it answers `{"data":{"id":…}}`, except
    /// for Claude, whose route (`{org}` standing for the organization id) answers
    /// `{"uuid":…}`, and for newchat, whose tRPC call carries the first message and answers
    /// `[{"result":{"data":{"json":{"chatId",…}}}}]`. Shapes that
    /// [create the conversation on the first chat](Shape::creates_on_first_chat) have none
    /// (the shared path is answered 404 when they are served).
    pub fn create_conversation_path(self) -> &'static str {
        match self {
            Shape::Cumulative => "/api/v2/chats/new",
            Shape::Claude => "/api/organizations/{org}/chat_conversations",
            Shape::Think => "/api/v1/chats/new",
            Shape::Newchat => "/api/trpc/message.newChat",
            _ => "/api/conversations",
        }
    }

    /// The hand-written flow of this shape (`flows/demo-SHAPE.json`).
    pub fn flow_file(self) -> &'static str {
        match self {
            Shape::Openai => include_str!("../../flows/demo-openai.json"),
            Shape::Patch => include_str!("../../flows/demo-patch.json"),
            Shape::Cumulative => include_str!("../../flows/demo-cumulative.json"),
            Shape::Ndjson => include_str!("../../flows/demo-ndjson.json"),
            Shape::Numbered => include_str!("../../flows/demo-numbered.json"),
            Shape::Json => include_str!("../../flows/demo-json.json"),
            Shape::Frames => include_str!("../../flows/demo-frames.json"),
            Shape::Claude => include_str!("../../flows/demo-claude.json"),
            Shape::Ws => include_str!("../../flows/demo-ws.json"),
            Shape::Signed => include_str!("../../flows/demo-signed.json"),
            Shape::Newchat => include_str!("../../flows/demo-newchat.json"),
            Shape::Batch => include_str!("../../flows/demo-batch.json"),
            Shape::Details => include_str!("../../flows/demo-details.json"),
            Shape::Think => include_str!("../../flows/demo-think.json"),
            Shape::Fragile => include_str!("../../flows/demo-fragile.json"),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Shape {
    type Err = DemoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Shape::ALL
            .into_iter()
            .find(|shape| shape.as_str() == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = Shape::ALL.iter().map(|s| s.as_str()).collect();
                DemoError::UnknownShape(format!("`{s}` (known: {})", known.join(", ")))
            })
    }
}

/// How a visitor gets from the site root (an account's URL, `http://HOST:PORT/`) to a
/// logged-in chat page. Every pattern uses the same session cookie, bearer token and chat API;
/// only the pages in front of `/chat` differ.
///
/// The pages are meant for a generic login bot, so nothing depends on ids: fields carry
/// `<label>`s, `type` and `autocomplete` (`username` / `current-password`), controls are
/// `<button>`s named by their visible text, and a refused password shows
/// `<p class="error" id="login-error" role="alert">Incorrect email or password.</p>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LoginPattern {
    /// `GET /` redirects to `/login`, one form with email, password and a "Continue" button.
    #[default]
    Direct,
    /// `GET /` is a marketing page (hero, features, "Pricing" and "Blog" links) with a
    /// "Log in" `<button>` whose script goes to `/login` (the one-page form), and a "Sign up"
    /// button that leads to `/signup` ("Sign-ups are closed").
    Landing,
    /// `GET /` redirects to `/login`: an email field and a "Continue" button (posting to
    /// `/login/email`), then a page with the email read-only, a password field and a
    /// "Sign in" button (posting to `/login`).
    TwoStep,
    /// No login: `GET /` redirects to `/chat`, which gives a visitor without a session an
    /// anonymous one (the same cookie; the page stores the token under [`TOKEN_KEY`]).
    Open,
    /// Like [`LoginPattern::Direct`], but a correct password leads to a "Verify you are human"
    /// page first: a canvas at a fixed place (see [`CAPTCHA_BOX`]) showing a green circle to
    /// click. `GET /__demo/captcha` tells tests where it is.
    Captcha,
}

impl LoginPattern {
    pub const ALL: [LoginPattern; 5] = [
        LoginPattern::Direct,
        LoginPattern::Landing,
        LoginPattern::TwoStep,
        LoginPattern::Open,
        LoginPattern::Captcha,
    ];

    /// The kebab-case name (`direct`, `landing`, `two-step`, `open`, `captcha`).
    pub fn as_str(self) -> &'static str {
        match self {
            LoginPattern::Direct => "direct",
            LoginPattern::Landing => "landing",
            LoginPattern::TwoStep => "two-step",
            LoginPattern::Open => "open",
            LoginPattern::Captcha => "captcha",
        }
    }
}

impl fmt::Display for LoginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LoginPattern {
    type Err = DemoError;

    /// Parses the kebab-case name, case-insensitively; `_` may stand for `-` (`two_step`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        LoginPattern::ALL
            .into_iter()
            .find(|pattern| pattern.as_str() == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = LoginPattern::ALL.iter().map(|p| p.as_str()).collect();
                DemoError::UnknownLogin(format!("`{s}` (known: {})", known.join(", ")))
            })
    }
}

/// Where the captcha pattern's challenge box sits on its page, in CSS pixels from the top-left
/// corner of the document (= of the viewport at scroll 0): the box is absolutely positioned
/// there and the page is short enough never to scroll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptchaBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
    /// Radius of the green target circle; a click within it (box coordinates) passes.
    pub target_radius: u32,
}

/// The captcha challenge box: 300×200 at (40, 120), target circles 40px across.
pub const CAPTCHA_BOX: CaptchaBox = CaptchaBox {
    left: 40,
    top: 120,
    width: 300,
    height: 200,
    target_radius: 20,
};

/// Unsolved captcha challenges are forgotten this long after they were shown.
pub const CAPTCHA_TTL: Duration = Duration::from_secs(10 * 60);

/// How long an anti-bot clearance stays valid unless configured otherwise.
pub const DEFAULT_CLEARANCE_TTL: Duration = Duration::from_secs(60);

/// How the demo site behaves.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub shape: Shape,
    /// What stands between the site root and the chat page.
    pub login: LoginPattern,
    /// Delay between streamed tokens (for `json`, the total delay is this times the tokens).
    pub token_delay: Duration,
    /// Sessions expire this long after login (`None` = never); the API then answers 401.
    pub session_ttl: Option<Duration>,
    /// At most this many chat calls per account per minute; more get 429 with `Retry-After`.
    pub rate_limit: Option<u32>,
    /// Any email logs in with this password.
    pub password: String,
    /// Whether the anti-bot interstitial starts on (see [`antibot`]; `/__demo/anti-bot`
    /// toggles it while running).
    pub anti_bot: bool,
    /// How long an anti-bot clearance token stays valid after the page registered it.
    pub clearance_ttl: Duration,
    /// Every chat call is signed by the page like the signed shape's (whatever the shape), and
    /// refused without a fresh signature: only the browser tiers can use the site.
    pub signed: bool,
    /// The page shows this after every reply, as if it were part of it (a site whose page
    /// renders more than its API sends: no reading of the wire yields what it shows, so
    /// learning it fails).
    pub render_suffix: Option<String>,
    /// The chat page's attach control and the upload calls behind it (`None`: no control,
    /// no upload routes). Only the `openai` and `signed` shapes' pages show it and their chat
    /// calls carry the files; the other shapes ignore it.
    pub uploads: Option<UploadShape>,
}

/// How the chat page uploads an attached file before the chat call names it (see the module
/// docs' "Uploads").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum UploadShape {
    /// One `POST /api/files` with a `multipart/form-data` body; the chat call carries
    /// `"files": [id, …]`.
    Multipart,
    /// A slot (`POST /api/uploads`), a raw `PUT` to its presigned-like URL, a confirm call;
    /// the chat call carries `"attachments": [{"id","name","mime_type","size"}, …]`.
    Slot,
}

impl UploadShape {
    /// The name on the command line (`multipart`, `slot`).
    pub fn as_str(self) -> &'static str {
        match self {
            UploadShape::Multipart => "multipart",
            UploadShape::Slot => "slot",
        }
    }
}

impl fmt::Display for UploadShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            shape: Shape::Openai,
            login: LoginPattern::Direct,
            token_delay: Duration::from_millis(20),
            session_ttl: None,
            rate_limit: None,
            password: "demo-password".to_owned(),
            anti_bot: false,
            clearance_ttl: DEFAULT_CLEARANCE_TTL,
            signed: false,
            render_suffix: None,
            uploads: None,
        }
    }
}

/// The reply the site gives to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The thinking text, for shapes that stream one.
    pub reasoning: Option<String>,
    /// The answer, markdown.
    pub content: String,
}

/// The exact reply the site gives to `last_message` in the first turn of a conversation.
pub fn reply_for(shape: Shape, last_message: &str) -> Reply {
    reply_for_turn(shape, last_message, 1)
}

/// The exact reply the site gives to `last_message` in turn `turn` (1-based) of a
/// conversation: the turn number appears in replies after the first.
pub fn reply_for_turn(shape: Shape, last_message: &str, turn: u32) -> Reply {
    // A prompt with tool or JSON instructions gets the answer they ask for (see `model`).
    if let Some(content) = model::answer(last_message, |request| {
        plain_reply(shape, request, turn).content
    }) {
        let reasoning = shape.has_reasoning().then(|| {
            "The message carries instructions; I answer in the form they ask for.".to_owned()
        });
        return Reply { reasoning, content };
    }
    plain_reply(shape, last_message, turn)
}

/// The exact reply the site gives to `last_message` in turn `turn` when the chat call names
/// uploaded files, each `(name, mime type, bytes)` as the site holds it, in the order named:
/// one [`describe_file`] line per file, a blank line, then [`reply_for_turn`]'s content (the
/// reasoning is [`reply_for_turn`]'s). Without files it is [`reply_for_turn`].
pub fn reply_with_files(
    shape: Shape,
    last_message: &str,
    turn: u32,
    files: &[(&str, &str, &[u8])],
) -> Reply {
    let mut reply = reply_for_turn(shape, last_message, turn);
    if files.is_empty() {
        return reply;
    }
    let mut content: String = files
        .iter()
        .map(|(name, mime_type, bytes)| describe_file(name, mime_type, bytes) + "\n")
        .collect();
    content.push('\n');
    content.push_str(&reply.content);
    reply.content = content;
    reply
}

fn plain_reply(shape: Shape, last_message: &str, turn: u32) -> Reply {
    let chars = last_message.chars().count();
    let words = last_message.split_whitespace().count();
    let mut content = format!(
        "You said: {last_message}\n\nHere is what I noticed:\n\n\
         - It is **{chars} characters** long.\n\
         - It has **{words} words**.\n\
         - This reply travels in the `{shape}` wire format.\n"
    );
    if turn > 1 {
        content.push_str(&format!("- This is turn **{turn}** of our conversation.\n"));
    }
    content.push_str("\nThanks for trying the **ComputeTower demo**.");
    let reasoning = shape.has_reasoning().then(|| {
        let mut text = format!(
            "The user sent {chars} characters in {words} words. \
             I will echo the message, describe it in a short list, and name the wire format."
        );
        if turn > 1 {
            text.push_str(&format!(" We are at turn {turn}."));
        }
        text
    });
    Reply { reasoning, content }
}

/// Splits `text` into the small pieces the site streams: runs of word characters or of
/// whitespace, at most 6 characters each. Their concatenation is `text`.
pub(crate) fn tokens(text: &str) -> Vec<String> {
    const MAX: usize = 6;
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut current_len = 0;
    let mut current_ws: Option<bool> = None;
    for c in text.chars() {
        let ws = c.is_whitespace();
        if current_ws.is_some_and(|k| k != ws) || current_len >= MAX {
            out.push(std::mem::take(&mut current));
            current_len = 0;
        }
        current.push(c);
        current_len += 1;
        current_ws = Some(ws);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Builds the site.
pub fn router(config: DemoConfig) -> axum::Router {
    let state = Arc::new(state::AppState::new(config));
    site::routes(state)
}

/// Serves the site on `listener` until the task is dropped or the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, config: DemoConfig) -> std::io::Result<()> {
    axum::serve(
        crate::server::no_delay(listener),
        router(config).into_make_service(),
    )
    .await
}

/// What a login leaves in the browser: cookies and `localStorage` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoLogin {
    /// `(name, value)` of every cookie the site set (the HttpOnly session cookie included).
    pub cookies: Vec<(String, String)>,
    /// `(key, value)` the login page stores in `localStorage` (the bearer token).
    pub local_storage: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("unknown demo shape {0}")]
    UnknownShape(String),
    #[error("unknown demo login pattern {0}")]
    UnknownLogin(String),
    #[error("bad demo site URL `{0}`")]
    BadUrl(String),
    #[error("demo login request failed: {0}")]
    Http(String),
    #[error("demo login refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected demo login response: {0}")]
    BadResponse(String),
}

/// The HTTP client used by [`json_login`] (and the tests).
///
/// Note for the real crate: reqwest is built with `rustls-no-provider` there, so a rustls
/// crypto provider must be installed before this is called (reqwest panics otherwise).
pub(crate) fn http_client() -> Result<reqwest::Client, DemoError> {
    crate::install_tls_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| DemoError::Http(e.to_string()))
}

/// Logs in the way a script would and returns what a browser would hold once logged in on the
/// chat page: the cookies the site set and the bearer token under [`TOKEN_KEY`] (for the think
/// shape, wrapped under [`WRAPPED_TOKEN_KEY`], as its chat page stores it).
///
/// For every pattern with a password this is `POST /api/login`, which — like the API login of
/// many real sites — skips what the browser pages put in front: the landing page, the two
/// steps and the captcha challenge ([`LoginPattern::Captcha`] is *not* enforced here).
/// For [`LoginPattern::Open`], recognized by `GET /chat` handing out a session without any
/// login, it returns that anonymous session, and `email` and `password` are unused.
pub async fn json_login(
    base_url: &str,
    email: &str,
    password: &str,
) -> Result<DemoLogin, DemoError> {
    let base = url::Url::parse(base_url).map_err(|_| DemoError::BadUrl(base_url.to_owned()))?;
    let join = |path: &str| {
        base.join(path)
            .map_err(|_| DemoError::BadUrl(base_url.to_owned()))
    };
    let client = http_client()?;
    if let Some(login) = anonymous_login(&client, join("/chat")?).await? {
        return Ok(login);
    }
    let response = client
        .post(join("/api/login")?)
        .json(&serde_json::json!({ "email": email, "password": password }))
        .send()
        .await
        .map_err(|e| DemoError::Http(e.to_string()))?;
    let status = response.status();
    let cookies = response_cookies(&response);
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| DemoError::BadResponse(e.to_string()))?;
    if !status.is_success() {
        let message = body
            .pointer("/error/message")
            .and_then(|m| m.as_str())
            .unwrap_or("login failed")
            .to_owned();
        return Err(DemoError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let token = body
        .get("token")
        .and_then(|t| t.as_str())
        .ok_or_else(|| DemoError::BadResponse("no `token` in the login answer".into()))?;
    if !cookies.iter().any(|(name, _)| name == SESSION_COOKIE) {
        return Err(DemoError::BadResponse(format!(
            "the login answer set no `{SESSION_COOKIE}` cookie"
        )));
    }
    // A site whose chat page fetches and stores the token itself (the think shape): what the
    // browser holds once that page has loaded.
    if let Some(wrapped) = page_token(&client, join("/api/v1/auths/")?, &cookies).await? {
        return Ok(DemoLogin {
            cookies,
            local_storage: vec![(WRAPPED_TOKEN_KEY.to_owned(), wrapped)],
        });
    }
    Ok(DemoLogin {
        cookies,
        local_storage: vec![(TOKEN_KEY.to_owned(), token.to_owned())],
    })
}

/// The token the think shape's chat page stores when it loads, wrapped as it stores it
/// (`Ok(None)` for the other shapes, whose pages store nothing).
async fn page_token(
    client: &reqwest::Client,
    url: url::Url,
    cookies: &[(String, String)],
) -> Result<Option<String>, DemoError> {
    let cookie = cookies
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("; ");
    let response = client
        .get(url)
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await
        .map_err(|e| DemoError::Http(e.to_string()))?;
    if !response.status().is_success() {
        return Ok(None);
    }
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| DemoError::BadResponse(e.to_string()))?;
    Ok(body
        .get("token")
        .and_then(|t| t.as_str())
        .map(|token| serde_json::json!({ "value": token, "__version": "0" }).to_string()))
}

/// The anonymous session `GET /chat` hands out when the site needs no login (`Ok(None)` when
/// it redirects to a login page instead).
async fn anonymous_login(
    client: &reqwest::Client,
    chat_url: url::Url,
) -> Result<Option<DemoLogin>, DemoError> {
    let response = client
        .get(chat_url)
        .send()
        .await
        .map_err(|e| DemoError::Http(e.to_string()))?;
    let cookies = response_cookies(&response);
    if !response.status().is_success() || !cookies.iter().any(|(name, _)| name == SESSION_COOKIE) {
        return Ok(None);
    }
    let html = response
        .text()
        .await
        .map_err(|e| DemoError::Http(e.to_string()))?;
    let token = site::bootstrap_token(&html).ok_or_else(|| {
        DemoError::BadResponse("the anonymous chat page carries no session token".into())
    })?;
    Ok(Some(DemoLogin {
        cookies,
        local_storage: vec![(TOKEN_KEY.to_owned(), token)],
    }))
}

/// `(name, value)` of every cookie a response sets.
fn response_cookies(response: &reqwest::Response) -> Vec<(String, String)> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(parse_set_cookie)
        .collect()
}

/// `name=value; Path=/; …` → `(name, value)`.
fn parse_set_cookie(header: &str) -> Option<(String, String)> {
    let pair = header.split(';').next()?;
    let (name, value) = pair.split_once('=')?;
    let name = name.trim();
    (!name.is_empty()).then(|| (name.to_owned(), value.trim().to_owned()))
}
