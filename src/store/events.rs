//! Execution events, fallback decisions and remembered conversations, written off the
//! request path.
//!
//! A request hands its record to [`EventWriter`], which gathers records over a 50 ms window
//! (or 256 records, or until a reply's end waits for its record) and writes each table's share
//! as one multi-row INSERT, on either engine: the hot path never waits on the database except
//! for a reply's own record at its end. When the queue is full the record is dropped and
//! counted, rather than slowing requests down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::history::Continuation;
use super::{Op, Store, StoreError, now, on_pool};

/// One request's outcome, as stored in `execution_events`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ExecutionEvent {
    pub request_id: String,
    pub service: String,
    pub account_id: Option<String>,
    pub flow_id: Option<String>,
    pub tier: Option<i64>,
    /// `ok`, or the failure kind.
    pub outcome: String,
    pub status: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub latency_ms: Option<i64>,
    /// Time spent waiting for a slot on the account.
    pub queue_ms: Option<i64>,
    pub detail: Option<String>,
}

/// A stored fallback decision.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Decision {
    pub request_id: String,
    pub service: String,
    pub account_id: Option<String>,
    pub failure: String,
    pub action: String,
    pub detail: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub enum Record {
    Execution(ExecutionEvent),
    /// A fallback decision: what failed and what was done about it.
    Decision {
        request_id: String,
        service: String,
        account_id: Option<String>,
        failure: String,
        action: String,
    },
    /// A finished exchange's site conversation (sealed when written).
    Conversation {
        request_id: String,
        service: String,
        key: String,
        continuation: Arc<Continuation>,
    },
}

/// What a watcher of live traffic sees: requests and fallback decisions as they are
/// recorded (before they are written), never remembered conversations (they hold site ids).
#[derive(Debug, Clone)]
pub enum Observed {
    Execution {
        /// Unix milliseconds when it was recorded.
        at_ms: i64,
        event: ExecutionEvent,
    },
    Decision(Decision),
}

const QUEUE: usize = 4096;
/// Live records a slow watcher may fall behind by before it misses some.
const LIVE_BACKLOG: usize = 1024;
const BATCH: usize = 256;
/// How long a batch gathers records before it is written.
const WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// Queues records for a background task that writes them in batches.
#[derive(Debug, Clone)]
pub struct EventWriter {
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
    health: Arc<WriteHealth>,
    /// Live watchers (`/admin/stream`); sending costs nothing while nobody watches.
    live: tokio::sync::broadcast::Sender<Observed>,
}

/// Whether the store's last write succeeded: a full disk or a failing database shows here
/// (and in `/health`) while serving goes on.
#[derive(Debug, Default)]
pub struct WriteHealth {
    failing: std::sync::atomic::AtomicBool,
    error: std::sync::Mutex<Option<String>>,
}

impl WriteHealth {
    fn failed(&self, error: &StoreError) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        self.failing.store(true, Ordering::SeqCst);
    }

    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::SeqCst) {
            tracing::info!("the store writes again");
        }
    }

    /// `None` while writes succeed, else the last error.
    pub fn failure(&self) -> Option<String> {
        if !self.failing.load(Ordering::SeqCst) {
            return None;
        }
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Debug)]
enum Message {
    Record(Record),
    /// A record whose writer waits until it is written (or its write failed): written at
    /// once, with whatever else is queued.
    Durable(Record, oneshot::Sender<()>),
    /// Write what is queued now, then answer.
    Flush(oneshot::Sender<()>),
}

impl EventWriter {
    /// Starts the writer task. It ends when every `EventWriter` clone is dropped, after
    /// writing what is queued.
    pub fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let health = Arc::new(WriteHealth::default());
        let (task_dropped, task_health) = (dropped.clone(), health.clone());
        let handle = tokio::spawn(async move {
            let mut messages = Vec::with_capacity(BATCH);
            let mut records = Vec::with_capacity(BATCH);
            let mut flushes = Vec::new();
            while rx.recv_many(&mut messages, BATCH).await > 0 {
                // Gather what arrives over a short window: one write per window
                // instead of one per request (each costs round trips to SQLite's thread).
                let window = tokio::time::Instant::now() + WINDOW;
                let mut seen = 0;
                loop {
                    let flush = messages[seen..]
                        .iter()
                        .any(|m| matches!(m, Message::Flush(_) | Message::Durable(..)));
                    seen = messages.len();
                    if flush || messages.len() >= BATCH {
                        break;
                    }
                    let room = BATCH - messages.len();
                    let more = rx.recv_many(&mut messages, room);
                    match tokio::time::timeout_at(window, more).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                for message in messages.drain(..) {
                    match message {
                        Message::Record(record) => records.push(record),
                        Message::Durable(record, done) => {
                            records.push(record);
                            flushes.push(done);
                        }
                        Message::Flush(done) => flushes.push(done),
                    }
                }
                if !records.is_empty() {
                    match store.write_records(&records).await {
                        Ok(()) => task_health.succeeded(),
                        Err(e) => {
                            // Lost, and counted: retrying would only grow the backlog while
                            // the cause (a full disk, say) lasts.
                            task_dropped.fetch_add(records.len() as u64, Ordering::Relaxed);
                            tracing::warn!(error = %e, records = records.len(), "could not store events");
                            task_health.failed(&e);
                        }
                    }
                }
                records.clear();
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        let writer = Self {
            tx,
            dropped,
            health,
            live: tokio::sync::broadcast::channel(LIVE_BACKLOG).0,
        };
        (writer, handle)
    }

    /// Every execution event and decision recorded from now on, as it is recorded.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Observed> {
        self.live.subscribe()
    }

    fn observe(&self, record: &Record) {
        if self.live.receiver_count() == 0 {
            return;
        }
        let observed = match record {
            Record::Execution(event) => Observed::Execution {
                at_ms: now_ms(),
                event: event.clone(),
            },
            Record::Decision {
                request_id,
                service,
                account_id,
                failure,
                action,
            } => Observed::Decision(Decision {
                request_id: request_id.clone(),
                service: service.clone(),
                account_id: account_id.clone(),
                failure: failure.clone(),
                action: action.clone(),
                detail: None,
                created_at: now(),
            }),
            Record::Conversation { .. } => return,
        };
        let _ = self.live.send(observed);
    }

    pub fn record(&self, record: Record) {
        self.observe(&record);
        if self.tx.try_send(Message::Record(record)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues `record` to be written at once; the receiver completes once it is written (or
    /// its write failed), so a reply can end only after its record is safe. `None` when the
    /// queue is full (the record is dropped and counted, as with [`EventWriter::record`]).
    pub fn record_durably(&self, record: Record) -> Option<oneshot::Receiver<()>> {
        self.observe(&record);
        let (done, written) = oneshot::channel();
        match self.tx.try_send(Message::Durable(record, done)) {
            Ok(()) => Some(written),
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Waits until every record queued before this call is written (for readers that must
    /// see them, such as `/admin/events`).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The store's write health (`None` while writes succeed).
    pub fn write_failure(&self) -> Option<String> {
        self.health.failure()
    }
}

/// Rows per multi-row INSERT: 12 columns × 64 stays far below SQLite's bound-parameter limit.
const ROWS_PER_INSERT: usize = 64;

struct DecisionRow<'a> {
    request_id: &'a str,
    service: &'a str,
    account_id: &'a Option<String>,
    failure: &'a str,
    action: &'a str,
}

struct ConversationRow<'a> {
    request_id: &'a str,
    service: &'a str,
    account_id: &'a str,
    key: &'a str,
    sealed: Vec<u8>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Writes `records`: one multi-row INSERT per table and chunk, each its own commit. A
    /// transaction around them would add two round trips to SQLite's worker thread (`BEGIN`,
    /// `COMMIT`), and every reply's end waits for its batch. The tables are independent, so a
    /// batch may be written in part; the caller then counts all of it as dropped.
    /// On failure (a full disk, say) the connection is closed rather than returned to the
    /// pool: a statement SQLite could not roll back must not keep the write lock and leave
    /// every later write `database is locked`.
    pub(super) async fn write_records(&self, records: &[Record]) -> Result<(), StoreError> {
        // Sealed and sorted by table before the first statement.
        let created_at = now();
        let mut executions = Vec::new();
        let mut decisions = Vec::new();
        let mut conversations = Vec::new();
        for record in records {
            match record {
                Record::Execution(e) => executions.push(e),
                Record::Decision {
                    request_id,
                    service,
                    account_id,
                    failure,
                    action,
                } => decisions.push(DecisionRow {
                    request_id,
                    service,
                    account_id,
                    failure,
                    action,
                }),
                Record::Conversation {
                    request_id,
                    service,
                    key,
                    continuation,
                } => conversations.push(ConversationRow {
                    request_id,
                    service,
                    account_id: &continuation.account_id,
                    key,
                    sealed: self.seal_continuation(request_id, continuation)?,
                }),
            }
        }
        on_pool!(self, Op::Events, |pool| {
            use sqlx::Connection;
            let mut conn = pool.acquire().await?;
            let result = async {
                let db = &mut *conn;
                // One multi-row INSERT per table and chunk: each statement is a round trip to
                // SQLite's worker thread, so a row per statement cost a thread wake-up per row.
                // A macro, not a function: the engines' connection types differ, and sqlx's
                // bounds for a generic builder would outweigh the three calls.
                macro_rules! insert_chunks {
                    ($rows:expr, $head:literal, |$row:ident, $item:ident| $bind:expr) => {
                        for chunk in $rows.chunks(ROWS_PER_INSERT) {
                            let mut insert = sqlx::QueryBuilder::new($head);
                            insert.push_values(chunk, |mut $row, $item| {
                                $bind;
                                $row.push_bind(created_at);
                            });
                            // Not cached: every batch size is its own statement text.
                            insert.build().persistent(false).execute(&mut *db).await?;
                        }
                    };
                }
                insert_chunks!(
                    executions,
                    "INSERT INTO execution_events (request_id, service, account_id, flow_id, tier, outcome, status, ttft_ms, latency_ms, queue_ms, detail, created_at) ",
                    |row, e| row
                        .push_bind(&e.request_id)
                        .push_bind(&e.service)
                        .push_bind(&e.account_id)
                        .push_bind(&e.flow_id)
                        .push_bind(e.tier)
                        .push_bind(&e.outcome)
                        .push_bind(e.status)
                        .push_bind(e.ttft_ms)
                        .push_bind(e.latency_ms)
                        .push_bind(e.queue_ms)
                        .push_bind(&e.detail)
                );
                insert_chunks!(
                    decisions,
                    "INSERT INTO fallback_decisions (request_id, service, account_id, failure, action, created_at) ",
                    |row, d| row
                        .push_bind(d.request_id)
                        .push_bind(d.service)
                        .push_bind(d.account_id)
                        .push_bind(d.failure)
                        .push_bind(d.action)
                );
                insert_chunks!(
                    conversations,
                    "INSERT INTO chat_history (request_id, service, account_id, prefix_hash, site_conversation, created_at) ",
                    |row, c| row
                        .push_bind(c.request_id)
                        .push_bind(c.service)
                        .push_bind(c.account_id)
                        .push_bind(c.key)
                        .push_bind(&c.sealed)
                );
                Ok::<_, sqlx::Error>(())
            }
            .await;
            if result.is_err() {
                let _ = conn.detach().close().await;
            }
            Ok(result?)
        })
        .await
    }

    /// The newest fallback decisions, newest first.
    pub async fn recent_decisions(&self, limit: i64) -> Result<Vec<Decision>, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT request_id, service, account_id, failure, action, detail, created_at
                 FROM fallback_decisions ORDER BY id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
        .await
    }

    /// The newest execution events, newest first.
    pub async fn recent_events(&self, limit: i64) -> Result<Vec<ExecutionEvent>, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT request_id, service, account_id, flow_id, tier, outcome, status, ttft_ms,
                        latency_ms, queue_ms, detail
                 FROM execution_events ORDER BY id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_both_engines;

    on_both_engines! {
        async fn queued_records_are_written_when_the_writer_closes(_db, store) {
            let (writer, task) = EventWriter::start(store.clone());
            for i in 0..300 {
                writer.record(Record::Execution(ExecutionEvent {
                    request_id: format!("r{i}"),
                    service: "svc".into(),
                    account_id: None,
                    flow_id: None,
                    tier: Some(1),
                    outcome: "ok".into(),
                    status: Some(200),
                    ttft_ms: Some(1),
                    latency_ms: Some(2),
                    queue_ms: None,
                    detail: None,
                }));
            }
            drop(writer);
            task.await.unwrap();
            let events = store.recent_events(1000).await.unwrap();
            assert_eq!(events.len(), 300);
            assert_eq!(events[0].request_id, "r299");
        }

        async fn a_flush_returns_once_the_queued_records_are_readable(_db, store) {
            let (writer, _task) = EventWriter::start(store.clone());
            for i in 0..3 {
                writer.record(Record::Decision {
                    request_id: format!("r{i}"),
                    service: "svc".into(),
                    account_id: None,
                    failure: "network".into(),
                    action: "retry".into(),
                });
            }
            writer.flush().await;
            let decisions = store.recent_decisions(10).await.unwrap();
            assert_eq!(decisions.len(), 3);
            assert_eq!(decisions[0].request_id, "r2");
        }

        /// One window's records of every kind land in one batch, and a remembered
        /// conversation is found again, sealed.
        async fn a_mixed_batch_is_written_and_read_back(_db, store) {
            let (writer, _task) = EventWriter::start(store.clone());
            writer.record(Record::Decision {
                request_id: "r1".into(),
                service: "svc".into(),
                account_id: Some("a_1".into()),
                failure: "rate_limit".into(),
                action: "next_account".into(),
            });
            writer.record(Record::Conversation {
                request_id: "r1".into(),
                service: "svc".into(),
                key: "k1".into(),
                continuation: Arc::new(Continuation {
                    account_id: "a_1".into(),
                    values: [("conversation_id".to_owned(), "conv-secret-7".to_owned())].into(),
                }),
            });
            let written = writer
                .record_durably(Record::Execution(ExecutionEvent {
                    request_id: "r1".into(),
                    service: "svc".into(),
                    account_id: Some("a_1".into()),
                    flow_id: Some("f_1".into()),
                    tier: Some(2),
                    outcome: "ok".into(),
                    status: Some(200),
                    ttft_ms: Some(7),
                    latency_ms: Some(9),
                    queue_ms: Some(3),
                    detail: Some("d".into()),
                }))
                .unwrap();
            written.await.unwrap();
            let events = store.recent_events(10).await.unwrap();
            assert_eq!(
                (events[0].tier, events[0].queue_ms, events[0].detail.as_deref()),
                (Some(2), Some(3), Some("d"))
            );
            assert_eq!(store.recent_decisions(10).await.unwrap()[0].failure, "rate_limit");
            let found = store.find_continuation("k1").await.unwrap().unwrap();
            assert_eq!(found.values["conversation_id"], "conv-secret-7");
            let raw = store.raw_bytes("SELECT site_conversation FROM chat_history").await;
            assert!(!raw[0].windows(11).any(|w| w == b"conv-secret"), "stored sealed");
            assert!(writer.write_failure().is_none());
        }
    }

    #[tokio::test]
    async fn watchers_see_requests_and_decisions_as_they_are_recorded() {
        let (_dir, store) = crate::store::testing::store().await;
        let (writer, _task) = EventWriter::start(store.clone());
        let mut live = writer.subscribe();
        writer.record(Record::Decision {
            request_id: "r1".into(),
            service: "svc".into(),
            account_id: Some("a_1".into()),
            failure: "rate_limit".into(),
            action: "next_account".into(),
        });
        writer.record(Record::Conversation {
            request_id: "r1".into(),
            service: "svc".into(),
            key: "k".into(),
            continuation: Arc::new(Continuation {
                account_id: "a_1".into(),
                values: Default::default(),
            }),
        });
        let _ = writer.record_durably(Record::Execution(ExecutionEvent {
            request_id: "r1".into(),
            service: "svc".into(),
            account_id: Some("a_1".into()),
            flow_id: None,
            tier: Some(1),
            outcome: "ok".into(),
            status: Some(200),
            ttft_ms: Some(5),
            latency_ms: Some(9),
            queue_ms: None,
            detail: None,
        }));
        match live.try_recv().unwrap() {
            Observed::Decision(d) => assert_eq!(d.action, "next_account"),
            other => panic!("{other:?}"),
        }
        // The remembered conversation is not shown; the request is.
        match live.try_recv().unwrap() {
            Observed::Execution { event, at_ms } => {
                assert_eq!(event.ttft_ms, Some(5));
                assert!(at_ms > 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(live.try_recv().is_err());
    }
}
