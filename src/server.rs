//! Wiring for `serve`: config → vault → store → gateway → HTTP server, and a clean shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::browser::{AssistConfig, BrowserConfig, BrowserPool, CaptchaConfig, TypingMode};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::learn::Learner;
use crate::lease::Leases;
use crate::renew::Renewer;
use crate::replay::client::{Replayer, Timeouts};
use crate::shared::Shared;
use crate::store::Store;
use crate::store::events::EventWriter;
use crate::vault::Vault;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0} without API keys: anyone who can reach it could use your accounts. \
         Create a key first (`computetower keys create`), or bind to 127.0.0.1."
    )]
    OpenNonLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the vault and the store (`database_url`, else the SQLite file in the data dir),
/// applying the migrations it lacks.
pub async fn open_store(config: &Config) -> Result<Store, ServeError> {
    let location = config.store_location()?;
    let env_key = master_key_from_env();
    let (vault, created) = Vault::open(env_key.as_deref(), &config.key_file())?;
    if created {
        tracing::info!(path = %config.key_file().display(), "created a new master key (mode 0600); back it up");
    }
    let store = Store::connect(&location, vault).await?;
    let schema = store.schema();
    tracing::info!(
        store = %location.describe(),
        schema_version = schema.version,
        migrations_applied = ?schema.applied_now,
        "store open"
    );
    Ok(store)
}

fn master_key_from_env() -> Option<String> {
    std::env::var("COMPUTETOWER_MASTER_KEY")
        .ok()
        .filter(|k| !k.is_empty())
}

/// Whether a store could already hold API keys, so an off-loopback `serve` is worth opening
/// it. SQLite: its file exists. PostgreSQL: a master key exists, without which no store this
/// instance could open has any (a new key would be refused by a used database).
fn store_may_hold_keys(config: &Config) -> Result<bool, ServeError> {
    Ok(match config.store_location()? {
        crate::store::Location::Sqlite(path) => path.exists(),
        crate::store::Location::Postgres(_) => {
            master_key_from_env().is_some() || config.key_file().exists()
        }
    })
}

pub use crate::install_tls_provider;

/// Serves until SIGINT/SIGTERM. Prints `computetower listening on http://ADDR` once bound.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    install_tls_provider();
    // Before the store opens, so its first operations are counted too.
    crate::telemetry::install();
    let off_loopback = !config.bind.ip().is_loopback();
    // Without a database there is no key: refuse before creating a data dir or a master key.
    if off_loopback && !store_may_hold_keys(&config)? {
        return Err(ServeError::OpenNonLoopback(config.bind));
    }
    let fresh = !config.database_path().exists();
    let store = open_store(&config).await?;
    if off_loopback && store.live_key_count().await? == 0 {
        return Err(ServeError::OpenNonLoopback(config.bind));
    }
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.bind,
            source,
        })?;
    let addr = listener.local_addr()?;
    let (events, writer_task) = EventWriter::start(store.clone());
    let runtime_file = config.data_dir.join(RUNTIME_FILE);
    let state = app_state(config, store.clone(), events);
    let gateway = state.gateway.clone();
    let url = reachable_url(addr);
    // A CLI on the same data hands its logins and learns to this server with this token.
    let token = hex::encode(rand::random::<[u8; 32]>());
    state.keys.allow_local_token(&token);
    state.jobs.set_handoff(url.clone(), String::new());
    let runtime = Runtime {
        pid: std::process::id(),
        url: url.clone(),
        token,
    };
    if let Err(e) = write_private(
        &runtime_file,
        &serde_json::to_vec(&runtime).unwrap_or_default(),
    ) {
        tracing::warn!(path = %runtime_file.display(), error = %e, "cannot write the runtime file; CLI logins will not be handed to this server");
    }
    print_summary(&state, &url, fresh).await;
    crate::memory::spawn_trimmer();
    let app = api::router(state);
    announce(addr);
    // `into_make_service` turns the routes into services once; handing `axum::serve` the
    // router itself would copy every route for each connection (~45 KiB and ~20 allocations).
    axum::serve(no_delay(listener), app.into_make_service())
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // Other instances take this one's accounts at once rather than at the leases' expiry.
    gateway.release_holds().await;
    // Only this server's own file: a newer `serve` may have replaced it.
    if read_runtime(&runtime_file).is_some_and(|r| r.pid == std::process::id()) {
        let _ = std::fs::remove_file(&runtime_file);
    }
    // Flush queued events before the store closes (bounded, so shutdown cannot hang).
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    store.close().await;
    Ok(())
}

/// The tier-1 HTTP client with the config's timeouts.
pub fn replayer(config: &Config) -> Replayer {
    Replayer::new(Timeouts {
        connect: Duration::from_secs(config.upstream_connect_timeout_secs),
        first_byte: Duration::from_secs(config.upstream_first_byte_timeout_secs),
        idle: Duration::from_secs(config.upstream_idle_timeout_secs),
    })
    .reusing_preflights(Duration::from_secs(config.preflight_reuse_secs))
}

pub fn app_state(config: Config, store: Store, events: EventWriter) -> AppState {
    crate::telemetry::install();
    let keys = api::auth::KeyCheck::new(store.clone(), config.limits.requests_per_minute_per_key);
    let leases = Leases::start(
        store.clone(),
        config.cluster.leases(),
        crate::lease::system_clock(),
    );
    tracing::info!(instance = %leases.instance(), "instance id (names this process's account leases)");
    // A login elsewhere may wait for a person at a captcha; a dead holder's lease expires.
    let login_wait =
        Duration::from_secs(config.browser.login_timeout_secs + config.captcha.human_timeout_secs)
            + leases.settings().ttl;
    // Other instances can share the store only on PostgreSQL; on SQLite nothing is polled.
    let shared = (store.engine() == crate::store::Engine::Postgres).then(|| {
        Shared::new(
            store.clone(),
            leases.instance().to_owned(),
            crate::lease::system_clock(),
            Duration::from_millis(config.cluster.shared_poll_ms),
        )
    });
    let renewer = Arc::new(Renewer::new(
        BrowserPool::new(browser_config(&config)),
        store.clone(),
        leases,
        login_wait,
    ));
    let allowed_origins = config
        .services
        .iter()
        .map(|(name, s)| (name.clone(), s.allowed_origins.clone()))
        .collect();
    let learner = Arc::new(Learner::new(
        renewer.clone(),
        Arc::new(replayer(&config)),
        store.clone(),
    ));
    let mut gateway = Gateway::new(
        store,
        replayer(&config),
        events,
        Some(renewer),
        Some(learner.clone()),
        crate::account_pool::Limits {
            per_account: config.limits.per_account_concurrency.max(1),
            queue: config.limits.per_account_queue,
            cooldown: Duration::from_secs(config.limits.rate_limit_cooldown_secs),
        },
    )
    .with_allowed_origins(allowed_origins);
    if let Some(shared) = shared {
        let slots = crate::slots::Slots::start(
            gateway.store().clone(),
            shared.instance().to_owned(),
            config.cluster.leases(),
            crate::lease::system_clock(),
        );
        gateway = gateway.with_shared(shared).with_shared_slots(slots);
    }
    AppState {
        gateway: Arc::new(gateway),
        learner: Some(learner),
        config: Arc::new(config),
        keys,
        jobs: Arc::new(crate::api::jobs::Jobs::new()),
    }
}

/// The browser layer's settings from the config. Chromium itself starts on first use.
pub fn browser_config(config: &Config) -> BrowserConfig {
    let b = &config.browser;
    let typing = match b.typing.as_str() {
        "fast" => TypingMode::Fast,
        "human" => TypingMode::Human {
            min_ms: b.human_delay_ms[0],
            max_ms: b.human_delay_ms[1].max(b.human_delay_ms[0]),
        },
        _ => TypingMode::Paste,
    };
    let assist = (!config.assist.url.is_empty()).then(|| AssistConfig {
        url: config.assist.url.clone(),
        api_key: config.assist.api_key.clone(),
        model: config.assist.model.clone(),
    });
    BrowserConfig {
        chrome: config.chrome.clone(),
        data_dir: config.data_dir.clone(),
        max_contexts: b.max_contexts.max(1),
        idle_timeout: Duration::from_secs(b.idle_timeout_secs),
        page_idle_timeout: Duration::from_secs(b.page_idle_secs),
        typing,
        login_timeout: Duration::from_secs(b.login_timeout_secs),
        captcha: CaptchaConfig {
            solver_command: config.captcha.solver_command.clone(),
            solver_url: config.captcha.solver_url.clone(),
            human_timeout: Duration::from_secs(config.captcha.human_timeout_secs),
        },
        assist,
        headless: b.headless,
        max_session: Duration::from_secs(b.max_session_hours * 3600),
    }
}

/// Turns Nagle's algorithm off on every accepted connection: a reply is written in small
/// pieces (headers, then chunks), and with Nagle on, a piece can wait ~40 ms for the client's
/// delayed ACK — far more than everything else the proxy adds.
pub fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// In the data dir while `serve` runs: its pid, URL and local admin token (mode 0600, like
/// the master key beside it: whoever can read one can read the other).
pub const RUNTIME_FILE: &str = "serve.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Runtime {
    pub pid: u32,
    pub url: String,
    pub token: String,
}

pub fn read_runtime(path: &std::path::Path) -> Option<Runtime> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    std::fs::rename(tmp, path)
}

/// `http://ADDR` as a person on this machine opens it (an unspecified address as loopback).
fn reachable_url(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

/// What `serve` prints before it listens: the data dir, the models with whether each has a
/// flow and a session, or what to do when there is nothing yet.
async fn print_summary(state: &AppState, url: &str, fresh: bool) {
    use std::io::Write;
    let lines = summary_lines(state, url, fresh)
        .await
        .unwrap_or_else(|e| vec![format!("(cannot read the store: {e})")]);
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

async fn summary_lines(
    state: &AppState,
    url: &str,
    fresh: bool,
) -> Result<Vec<String>, crate::store::StoreError> {
    let store = state.gateway.store();
    let dir = &state.config.data_dir;
    let shown = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
    let accounts = store.accounts().await?;
    let mut lines = vec![format!(
        "data dir {}{}",
        shown.display(),
        if fresh { " (new)" } else { "" }
    )];
    if accounts.is_empty() {
        lines.push(format!(
            "no account in this data dir yet, so there is no model to serve: add one with              `computetower account add --url URL --name NAME` (then `computetower learn NAME`),              or on the admin page {url}/admin"
        ));
        lines.push(format!("admin page {url}/admin"));
        return Ok(lines);
    }
    let sessions = store.sessions().await?;
    let now = crate::store::now();
    let mut services: Vec<String> = accounts.iter().map(|a| a.service.clone()).collect();
    services.dedup();
    lines.push("models:".to_owned());
    for service in services {
        let of: Vec<_> = accounts.iter().filter(|a| a.service == service).collect();
        let enabled = of.iter().filter(|a| a.enabled).count();
        let with_session = of
            .iter()
            .filter(|a| {
                sessions
                    .iter()
                    .rev()
                    .find(|s| s.account_id == a.id)
                    .is_some_and(|s| s.authenticated && s.expires_at.is_none_or(|e| e > now))
            })
            .count();
        let flow = match store.active_flow(&service).await? {
            Some(f) if f.replay.needs_browser => format!("flow v{} (needs the browser)", f.version),
            Some(f) if f.stats.tested => format!("flow v{} (verified)", f.version),
            Some(f) => format!("flow v{}", f.version),
            None => format!("NO FLOW: learn it (`computetower learn {service}`)"),
        };
        let session = match with_session {
            0 if state.gateway.renewer().is_some() => {
                "no session yet (logs in on first use)".into()
            }
            0 => "NO SESSION".to_owned(),
            n => format!("session on {n} of {} accounts", of.len()),
        };
        let disabled = if enabled == 0 {
            ", every account disabled"
        } else {
            ""
        };
        lines.push(format!("  {service:<20} {flow}; {session}{disabled}"));
    }
    lines.push(format!("admin page {url}/admin"));
    Ok(lines)
}

/// The line tests and scripts wait for; printed on stdout and flushed.
fn announce(addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "computetower listening on http://{addr}");
    let _ = out.flush();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
