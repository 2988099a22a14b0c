//! The site's memory: sessions, conversations, rate-limit windows, anti-bot clearances, the
//! current shape, the uploaded files and the stream counters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{CAPTCHA_BOX, CAPTCHA_TTL, DemoConfig, Shape};

pub(crate) struct AppState {
    pub config: DemoConfig,
    pub streams: std::sync::Arc<StreamStats>,
    /// Index in [`Shape::ALL`] of the shape served now (`/__demo/shape` changes it).
    shape: AtomicUsize,
    /// Whether the anti-bot interstitial is on (`/__demo/anti-bot` changes it).
    anti_bot: AtomicBool,
    /// Chat calls left to answer with an unexpected HTML page (`/__demo/garbage`).
    garbage: AtomicUsize,
    /// Replies left to cut short, without their end marker (`/__demo/truncate`).
    truncate: AtomicUsize,
    /// Uploaded files and upload slots ([`DemoConfig::uploads`]).
    pub uploads: super::uploads::Store,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Session id (cookie value) → session.
    sessions: HashMap<String, Session>,
    /// Conversation id → conversation.
    conversations: HashMap<String, Conversation>,
    /// Email → times of recent chat calls.
    calls: HashMap<String, VecDeque<Instant>>,
    /// Challenge id → pending captcha challenge.
    challenges: HashMap<String, Challenge>,
    /// Request signatures already accepted (signed shape) → when.
    signatures: HashMap<String, Instant>,
    /// Email (lower case) → until when `/__demo/rate-limit` holds it at 429.
    blocked: HashMap<String, Instant>,
    /// `Retry-After` values sent verbatim instead of the seconds left (`/__demo/rate-limit`).
    retry_after_text: HashMap<String, String>,
    /// Anti-bot clearance token → when it was registered.
    clearances: HashMap<String, Instant>,
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub email: String,
    pub token: String,
    pub csrf: String,
    /// Opened without login (the open pattern's visitors).
    pub anonymous: bool,
    /// The session's organization id (Claude shape: `GET /api/organizations`).
    pub org: String,
    /// The key the signed shape's page signs requests with (hidden in an inline script).
    pub sign_key: String,
    created: Instant,
    expired: bool,
}

/// A captcha challenge: a password that was right, waiting for a click on the target.
#[derive(Debug, Clone)]
pub(crate) struct Challenge {
    pub email: String,
    /// Centre of the green target, in box coordinates.
    pub target: (u32, u32),
    /// Decoys drawn around it: `(x, y, colour)`, box coordinates.
    pub decoys: Vec<(u32, u32, &'static str)>,
    created: Instant,
}

/// What a click on a challenge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClickOutcome {
    /// On target: the challenge is gone and the email may log in.
    Passed { email: String },
    /// Off target: the challenge stays.
    Missed,
    /// No such challenge, or it is older than [`CAPTCHA_TTL`].
    Unknown,
}

/// Pending challenges kept at most (the oldest go first).
const MAX_CHALLENGES: usize = 1000;

struct Conversation {
    session_id: String,
    email: String,
    turns: u32,
    created: Instant,
    /// The id of the last reply (the shapes whose later turns name it as their parent).
    reply_id: Option<String>,
    /// A user message waiting for its reply (newchat: sent in the create call).
    pending: Option<String>,
}

/// What `/__demo/conversations` lists about a conversation.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ConversationInfo {
    pub id: String,
    /// Chat calls answered in it so far.
    pub turns: u32,
    /// The email of the session that created it.
    pub email: String,
}

/// Why a session is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionProblem {
    Missing,
    Expired,
}

const WINDOW: Duration = Duration::from_secs(60);

/// Registered anti-bot clearances kept at most (expired ones go first, then the oldest).
const MAX_CLEARANCES: usize = 10_000;

/// How long a used request signature is remembered: more than twice the timestamp skew the
/// signed shape accepts, so a signature can never be used again while its timestamp is fresh.
pub(crate) const SIGNATURE_MEMORY: Duration = Duration::from_secs(90);

impl AppState {
    pub fn new(config: DemoConfig) -> Self {
        let shape = shape_index(config.shape);
        let anti_bot = config.anti_bot;
        Self {
            config,
            streams: std::sync::Arc::default(),
            shape: AtomicUsize::new(shape),
            anti_bot: AtomicBool::new(anti_bot),
            garbage: AtomicUsize::new(0),
            truncate: AtomicUsize::new(0),
            uploads: super::uploads::Store::default(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The shape served now.
    pub fn shape(&self) -> Shape {
        Shape::ALL
            .get(self.shape.load(Ordering::SeqCst))
            .copied()
            .unwrap_or(self.config.shape)
    }

    /// Serves `shape` from now on; returns the shape served before.
    pub fn set_shape(&self, shape: Shape) -> Shape {
        let before = self.shape.swap(shape_index(shape), Ordering::SeqCst);
        Shape::ALL.get(before).copied().unwrap_or(self.config.shape)
    }

    /// Whether the anti-bot interstitial is on.
    /// The next `count` chat calls get an unexpected page instead of a reply.
    pub fn set_garbage(&self, count: usize) {
        self.garbage.store(count, Ordering::SeqCst);
    }

    /// Whether this chat call gets garbage (using up one of the count).
    pub fn take_garbage(&self) -> bool {
        self.garbage
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The next `count` replies stop after a few pieces, without their end marker.
    pub fn set_truncate(&self, count: usize) {
        self.truncate.store(count, Ordering::SeqCst);
    }

    /// Whether this reply is cut short (using up one of the count).
    pub fn take_truncate(&self) -> bool {
        self.truncate
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub fn anti_bot(&self) -> bool {
        self.anti_bot.load(Ordering::SeqCst)
    }

    pub fn set_anti_bot(&self, on: bool) {
        self.anti_bot.store(on, Ordering::SeqCst);
    }

    /// Registers anti-bot clearance `token`, valid for the configured clearance TTL from now.
    pub fn register_clearance(&self, token: &str) {
        let now = Instant::now();
        let ttl = self.config.clearance_ttl;
        let mut inner = self.lock();
        if inner.clearances.len() >= MAX_CLEARANCES {
            inner
                .clearances
                .retain(|_, at| now.saturating_duration_since(*at) < ttl);
        }
        while inner.clearances.len() >= MAX_CLEARANCES {
            let oldest = inner
                .clearances
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, _)| t.clone());
            match oldest {
                Some(oldest) => inner.clearances.remove(&oldest),
                None => break,
            };
        }
        inner.clearances.insert(token.to_owned(), now);
    }

    /// Whether `token` is a registered clearance younger than the clearance TTL.
    pub fn clearance_valid(&self, token: &str) -> bool {
        let ttl = self.config.clearance_ttl;
        self.lock()
            .clearances
            .get(token)
            .is_some_and(|at| at.elapsed() < ttl)
    }

    /// Forgets every clearance; returns how many there were.
    pub fn expire_clearances(&self) -> usize {
        let mut inner = self.lock();
        let n = inner.clearances.len();
        inner.clearances.clear();
        n
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a session for `email`: returns the session id (cookie value) and the session.
    pub fn login(&self, email: &str) -> (String, Session) {
        self.streams.login(email);
        self.open_session(email.to_owned(), false)
    }

    /// Opens a session for a visitor who did not log in (a fresh `guest-…` email of its own).
    pub fn login_anonymous(&self) -> (String, Session) {
        let email = format!("guest-{}@anonymous.invalid", random_token(6));
        self.open_session(email, true)
    }

    fn open_session(&self, email: String, anonymous: bool) -> (String, Session) {
        let sid = random_token(24);
        let session = Session {
            email,
            token: format!("dt_{}", random_token(24)),
            csrf: random_token(16),
            anonymous,
            org: uuid::Uuid::new_v4().to_string(),
            sign_key: random_token(16),
            created: Instant::now(),
            expired: false,
        };
        self.lock().sessions.insert(sid.clone(), session.clone());
        (sid, session)
    }

    /// Poses a captcha challenge to `email`: a target at a random place in the box, and a few
    /// decoys away from it. Returns its id and the challenge.
    pub fn new_challenge(&self, email: &str) -> (String, Challenge) {
        let r = CAPTCHA_BOX.target_radius;
        let random_point = || {
            (
                rand::random_range(r..=CAPTCHA_BOX.width - r),
                rand::random_range(r..=CAPTCHA_BOX.height - r),
            )
        };
        let target = random_point();
        let mut decoys = Vec::new();
        for colour in ["#d92d20", "#1570ef", "#98a2b3"] {
            // Tries a few places; a decoy never covers the target.
            let far = (0..20)
                .map(|_| random_point())
                .find(|&(x, y)| distance2((x, y), target) > f64::from(3 * r).powi(2));
            if let Some((x, y)) = far {
                decoys.push((x, y, colour));
            }
        }
        let id = random_token(12);
        let challenge = Challenge {
            email: email.to_owned(),
            target,
            decoys,
            created: Instant::now(),
        };
        let mut inner = self.lock();
        inner
            .challenges
            .retain(|_, c| c.created.elapsed() < CAPTCHA_TTL);
        while inner.challenges.len() >= MAX_CHALLENGES {
            let oldest = inner
                .challenges
                .iter()
                .min_by_key(|(_, c)| c.created)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => inner.challenges.remove(&oldest),
                None => break,
            };
        }
        inner.challenges.insert(id.clone(), challenge.clone());
        (id, challenge)
    }

    /// The pending challenge `id`.
    pub fn challenge(&self, id: &str) -> Option<Challenge> {
        self.challenge_at(id, Instant::now())
    }

    fn challenge_at(&self, id: &str, now: Instant) -> Option<Challenge> {
        let inner = self.lock();
        let challenge = inner.challenges.get(id)?;
        (now.saturating_duration_since(challenge.created) < CAPTCHA_TTL).then(|| challenge.clone())
    }

    /// The most recently posed challenge still pending: its id and the challenge.
    pub fn latest_challenge(&self) -> Option<(String, Challenge)> {
        let inner = self.lock();
        inner
            .challenges
            .iter()
            .filter(|(_, c)| c.created.elapsed() < CAPTCHA_TTL)
            .max_by_key(|(_, c)| c.created)
            .map(|(id, c)| (id.clone(), c.clone()))
    }

    /// A click at `(x, y)` (box coordinates) on challenge `id`.
    pub fn click(&self, id: &str, x: f64, y: f64) -> ClickOutcome {
        self.click_at(id, x, y, Instant::now())
    }

    pub(crate) fn click_at(&self, id: &str, x: f64, y: f64, now: Instant) -> ClickOutcome {
        let mut inner = self.lock();
        let Some(challenge) = inner.challenges.get(id) else {
            return ClickOutcome::Unknown;
        };
        if now.saturating_duration_since(challenge.created) >= CAPTCHA_TTL {
            inner.challenges.remove(id);
            return ClickOutcome::Unknown;
        }
        let (cx, cy) = challenge.target;
        let dx = x - f64::from(cx);
        let dy = y - f64::from(cy);
        let r = f64::from(CAPTCHA_BOX.target_radius);
        let hit = dx * dx + dy * dy <= r * r;
        if !hit {
            return ClickOutcome::Missed;
        }
        match inner.challenges.remove(id) {
            Some(challenge) => ClickOutcome::Passed {
                email: challenge.email,
            },
            None => ClickOutcome::Unknown,
        }
    }

    /// The live session with id `sid`.
    pub fn session(&self, sid: &str) -> Result<Session, SessionProblem> {
        let inner = self.lock();
        let session = inner.sessions.get(sid).ok_or(SessionProblem::Missing)?;
        let too_old = self
            .config
            .session_ttl
            .is_some_and(|ttl| session.created.elapsed() >= ttl);
        if session.expired || too_old {
            return Err(SessionProblem::Expired);
        }
        Ok(session.clone())
    }

    pub fn logout(&self, sid: &str) {
        self.lock().sessions.remove(sid);
    }

    /// Marks every session expired; returns how many there were.
    /// Gives every session a new CSRF token, as sites do now and then: pages read before
    /// carry a stale one.
    pub fn rotate_csrf(&self) -> usize {
        let mut inner = self.lock();
        for session in inner.sessions.values_mut() {
            session.csrf = random_token(16);
        }
        inner.sessions.len()
    }

    pub fn expire_all(&self) -> usize {
        let mut inner = self.lock();
        for session in inner.sessions.values_mut() {
            session.expired = true;
        }
        inner.sessions.len()
    }

    /// Drops every session of `email`; returns how many.
    pub fn revoke(&self, email: &str) -> usize {
        let mut inner = self.lock();
        let before = inner.sessions.len();
        inner
            .sessions
            .retain(|_, s| !s.email.eq_ignore_ascii_case(email));
        before - inner.sessions.len()
    }

    /// Creates a conversation owned by session `sid` of `email`; returns its id.
    pub fn create_conversation(&self, sid: &str, email: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.lock().conversations.insert(
            id.clone(),
            Conversation {
                session_id: sid.to_owned(),
                email: email.to_owned(),
                turns: 0,
                created: Instant::now(),
                reply_id: None,
                pending: None,
            },
        );
        id
    }

    /// How many turns conversation `id` had (`None`: no such conversation).
    pub fn turns(&self, id: &str) -> Option<u32> {
        self.lock().conversations.get(id).map(|c| c.turns)
    }

    /// The id of the last reply in conversation `id`.
    pub fn reply_id(&self, id: &str) -> Option<String> {
        self.lock()
            .conversations
            .get(id)
            .and_then(|c| c.reply_id.clone())
    }

    /// Records the id of the reply being sent in conversation `id` (from its first byte: a
    /// reply cut short is still the conversation's last).
    pub fn set_reply_id(&self, id: &str, reply_id: &str) {
        if let Some(c) = self.lock().conversations.get_mut(id) {
            c.reply_id = Some(reply_id.to_owned());
        }
    }

    /// Keeps a user message for the next chat call of conversation `id` to answer.
    pub fn set_pending(&self, id: &str, message: &str) {
        if let Some(c) = self.lock().conversations.get_mut(id) {
            c.pending = Some(message.to_owned());
        }
    }

    /// The user message waiting in conversation `id`, taken.
    pub fn take_pending(&self, id: &str) -> Option<String> {
        self.lock()
            .conversations
            .get_mut(id)
            .and_then(|c| c.pending.take())
    }

    /// Every conversation, oldest first.
    pub fn conversations(&self) -> Vec<ConversationInfo> {
        let inner = self.lock();
        let mut all: Vec<(&Instant, ConversationInfo)> = inner
            .conversations
            .iter()
            .map(|(id, c)| {
                let info = ConversationInfo {
                    id: id.clone(),
                    turns: c.turns,
                    email: c.email.clone(),
                };
                (&c.created, info)
            })
            .collect();
        all.sort_by_key(|(created, _)| **created);
        all.into_iter().map(|(_, info)| info).collect()
    }

    /// Whether conversation `id` exists and belongs to session `sid`.
    pub fn owns_conversation(&self, sid: &str, id: &str) -> bool {
        self.lock()
            .conversations
            .get(id)
            .is_some_and(|c| c.session_id == sid)
    }

    /// Counts a new turn in conversation `id`; returns its number (1-based).
    pub fn next_turn(&self, id: &str) -> u32 {
        let mut inner = self.lock();
        match inner.conversations.get_mut(id) {
            Some(c) => {
                c.turns = c.turns.saturating_add(1);
                c.turns
            }
            None => 1,
        }
    }

    /// Records `signature` as used; `false` when it was used before (a replay). Signatures are
    /// remembered for [`SIGNATURE_MEMORY`], longer than a timestamp stays acceptable.
    pub fn use_signature(&self, signature: &str) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .signatures
            .retain(|_, at| now.duration_since(*at) < SIGNATURE_MEMORY);
        if inner.signatures.contains_key(signature) {
            return false;
        }
        inner.signatures.insert(signature.to_owned(), now);
        true
    }

    /// Holds `email` at 429 for `seconds` from now (0 lifts a hold); `retry_after`, when
    /// given, is sent as the `Retry-After` header verbatim (as a misbehaving site might).
    pub fn block(&self, email: &str, seconds: u64, retry_after: Option<String>) {
        let key = email.trim().to_ascii_lowercase();
        let mut inner = self.lock();
        if seconds == 0 {
            inner.blocked.remove(&key);
            inner.retry_after_text.remove(&key);
        } else {
            let now = Instant::now();
            // A century stands for "longer than this process lives" without overflowing.
            let until = now
                .checked_add(Duration::from_secs(seconds))
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400));
            inner.blocked.insert(key.clone(), until);
            match retry_after {
                Some(text) => inner.retry_after_text.insert(key, text),
                None => inner.retry_after_text.remove(&key),
            };
        }
    }

    /// The verbatim `Retry-After` set for `email`'s hold, if any.
    pub fn retry_after_text(&self, email: &str) -> Option<String> {
        self.lock()
            .retry_after_text
            .get(&email.to_ascii_lowercase())
            .cloned()
    }

    /// Records a chat call of `email` if neither a hold (`/__demo/rate-limit`) nor the rate
    /// limit stops it; otherwise returns the seconds to wait (at least 1, rounded up).
    pub fn take_rate(&self, email: &str) -> Result<(), u64> {
        let now = Instant::now();
        let key = email.to_ascii_lowercase();
        let mut inner = self.lock();
        if let Some(until) = inner.blocked.get(&key).copied() {
            if until > now {
                self.streams.rate_limited(&key);
                return Err(ceil_secs(until - now));
            }
            inner.blocked.remove(&key);
        }
        let Some(limit) = self.config.rate_limit else {
            return Ok(());
        };
        let calls = inner.calls.entry(key.clone()).or_default();
        while calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            calls.pop_front();
        }
        if calls.len() >= limit as usize {
            let wait = calls
                .front()
                .map(|t| WINDOW.saturating_sub(now.duration_since(*t)))
                .unwrap_or(WINDOW);
            self.streams.rate_limited(&key);
            return Err(ceil_secs(wait));
        }
        calls.push_back(now);
        Ok(())
    }
}

/// Whole seconds in `wait`, rounded up, at least 1 (a `Retry-After` value).
fn ceil_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

fn shape_index(shape: Shape) -> usize {
    Shape::ALL.iter().position(|s| *s == shape).unwrap_or(0)
}

fn distance2(a: (u32, u32), b: (u32, u32)) -> f64 {
    let dx = f64::from(a.0) - f64::from(b.0);
    let dy = f64::from(a.1) - f64::from(b.1);
    dx * dx + dy * dy
}

/// `len` random bytes, hex-encoded.
pub(crate) fn random_token(len: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    hex::encode(bytes)
}

/// Chat replies: how many are streaming, ran to their end, or were dropped early, and the most
/// that streamed at once, overall and per account.
#[derive(Debug, Default)]
pub(crate) struct StreamStats {
    active: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    /// High-water mark of `active`.
    max_active: AtomicU64,
    /// Chat pages served (each one a read of the CSRF token, by a browser or a preflight).
    pages: AtomicU64,
    /// Email (lower case) → (active, high-water mark).
    by_email: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Email (lower case) → logins (any login page or `/api/login`).
    logins: Mutex<BTreeMap<String, u64>>,
    /// Email (lower case) → chat calls answered 429.
    rate_limited: Mutex<BTreeMap<String, u64>>,
    /// Files whose bytes the site accepted (multipart POSTs and slot PUTs).
    uploads: AtomicU64,
    /// File references carried by chat calls that got a reply.
    files_in_chat: AtomicU64,
    /// Told when a reply ends (for `/__demo/stats?wait_idle_ms=`).
    ended: tokio::sync::Notify,
}

impl StreamStats {
    /// Counts a reply to `email` as streaming until the guard is dropped.
    pub fn start(self: &std::sync::Arc<Self>, email: &str) -> StreamGuard {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        let email = email.to_ascii_lowercase();
        {
            let mut by_email = self.lock_by_email();
            let entry = by_email.entry(email.clone()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
        }
        StreamGuard {
            stats: self.clone(),
            email,
            finished: false,
        }
    }

    fn lock_by_email(&self) -> MutexGuard<'_, BTreeMap<String, (u64, u64)>> {
        self.by_email
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a chat page served.
    pub fn page(&self) {
        self.pages.fetch_add(1, Ordering::SeqCst);
    }

    fn count(map: &Mutex<BTreeMap<String, u64>>, email: &str) {
        *map.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(email.to_ascii_lowercase())
            .or_default() += 1;
    }

    fn counts(map: &Mutex<BTreeMap<String, u64>>) -> serde_json::Value {
        let map = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        serde_json::Value::Object(
            map.iter()
                .map(|(email, n)| (email.clone(), (*n).into()))
                .collect(),
        )
    }

    /// Counts a login of `email`.
    pub fn login(&self, email: &str) {
        Self::count(&self.logins, email);
    }

    /// Counts a chat call of `email` answered 429.
    pub fn rate_limited(&self, email: &str) {
        Self::count(&self.rate_limited, email);
    }

    /// Counts a file whose bytes the site accepted.
    pub fn uploaded(&self) {
        self.uploads.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts the `n` file references of a chat call answered.
    pub fn files_in_chat(&self, n: usize) {
        self.files_in_chat
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// `{active, completed, cancelled, max_active, pages, active_by_email, max_active_by_email,
    /// logins_by_email, rate_limited_by_email, uploads, files_in_chat}`.
    pub fn snapshot(&self) -> serde_json::Value {
        let by_email = self.lock_by_email();
        let active_by_email: serde_json::Map<String, serde_json::Value> = by_email
            .iter()
            .filter(|(_, (active, _))| *active > 0)
            .map(|(email, (active, _))| (email.clone(), (*active).into()))
            .collect();
        let max_by_email: serde_json::Map<String, serde_json::Value> = by_email
            .iter()
            .map(|(email, (_, max))| (email.clone(), (*max).into()))
            .collect();
        serde_json::json!({
            "active": self.active.load(Ordering::SeqCst),
            "completed": self.completed.load(Ordering::SeqCst),
            "cancelled": self.cancelled.load(Ordering::SeqCst),
            "max_active": self.max_active.load(Ordering::SeqCst),
            "pages": self.pages.load(Ordering::SeqCst),
            "active_by_email": active_by_email,
            "max_active_by_email": max_by_email,
            "logins_by_email": Self::counts(&self.logins),
            "rate_limited_by_email": Self::counts(&self.rate_limited),
            "uploads": self.uploads.load(Ordering::SeqCst),
            "files_in_chat": self.files_in_chat.load(Ordering::SeqCst),
        })
    }

    /// Waits until no reply streams, for at most `limit` (a test waits on the site's state
    /// instead of polling it).
    pub async fn wait_idle(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return;
            }
        }
    }

    /// Zeroes the end counters (and the upload counts) and lowers the high-water marks to what streams now.
    pub fn reset(&self) {
        let mut by_email = self.lock_by_email();
        self.completed.store(0, Ordering::SeqCst);
        self.cancelled.store(0, Ordering::SeqCst);
        self.pages.store(0, Ordering::SeqCst);
        self.uploads.store(0, Ordering::SeqCst);
        self.files_in_chat.store(0, Ordering::SeqCst);
        for map in [&self.logins, &self.rate_limited] {
            map.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
        self.max_active
            .store(self.active.load(Ordering::SeqCst), Ordering::SeqCst);
        by_email.retain(|_, (active, _)| *active > 0);
        for (active, max) in by_email.values_mut() {
            *max = *active;
        }
    }
}

/// Held by one reply; records how it ended when dropped.
pub(crate) struct StreamGuard {
    stats: std::sync::Arc<StreamStats>,
    email: String,
    pub finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ended = if self.finished {
            &self.stats.completed
        } else {
            &self.stats.cancelled
        };
        ended.fetch_add(1, Ordering::SeqCst);
        {
            let mut by_email = self.stats.lock_by_email();
            if let Some(entry) = by_email.get_mut(&self.email) {
                entry.0 = entry.0.saturating_sub(1);
            }
        }
        self.stats.active.fetch_sub(1, Ordering::SeqCst);
        self.stats.ended.notify_waiters();
    }
}
