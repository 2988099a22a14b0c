//! The command line (clap). Each command opens what it needs, does one thing, and reports
//! failures as one clear line on stderr with a non-zero exit code.

mod accounts;
mod demo;
mod doctor;
mod flows;
mod job;
mod keys;
mod migrate;
pub mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::demo::Shape;

#[derive(Debug, Parser)]
#[command(
    name = "computetower",
    version,
    about = "Serve the OpenAI API from web chat sites it has learned"
)]
pub struct Cli {
    /// Config file (default: ./computetower.toml when present, or $COMPUTETOWER_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides the config and $COMPUTETOWER_DATA).
    #[arg(long, global = true, value_name = "DIR")]
    pub data: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI API (and /admin).
    Serve {
        /// Address to listen on (default 127.0.0.1:8000; port 0 picks a free port).
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
    },
    /// Run the whole job on the built-in demo site: start it, log in, set up the flow, serve,
    /// and answer a request.
    Demo(demo::DemoArgs),
    /// Run the built-in demo chat site.
    DemoSite {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: std::net::SocketAddr,
        #[arg(long, default_value = "openai")]
        shape: Shape,
        /// Delay between streamed tokens, in milliseconds.
        #[arg(long, default_value_t = 20)]
        token_delay_ms: u64,
        /// Sessions expire after this many seconds.
        #[arg(long)]
        session_ttl_secs: Option<u64>,
        /// Chat calls allowed per account per minute.
        #[arg(long)]
        rate_limit: Option<u32>,
        /// How a browser logs in: direct, landing, two-step, open or captcha.
        #[arg(long, default_value = "direct")]
        login: crate::demo::LoginPattern,
        /// Put a Cloudflare-like anti-bot challenge in front of the API (only the chat page,
        /// with its clearance token, gets through); `/__demo/anti-bot?on=` toggles it.
        #[arg(long)]
        anti_bot: bool,
        /// Seconds an anti-bot clearance token stays valid.
        #[arg(long, default_value_t = 60)]
        clearance_ttl_secs: u64,
        /// The page signs every chat call (as the `signed` shape does) and the site refuses
        /// any call without a fresh signature, whatever the shape.
        #[arg(long)]
        signed: bool,
        /// The page shows this text after every reply as if it were part of it (learning
        /// such a site fails: for testing failed learns).
        #[arg(long)]
        render_suffix: Option<String>,
        /// Give the chat page an attach control whose files are uploaded before the chat call:
        /// `multipart` (one `POST /api/files`) or `slot` (a slot, a raw PUT, a confirm call).
        /// Only the `openai` and `signed` shapes use it.
        #[arg(long, value_enum)]
        uploads: Option<crate::demo::UploadShape>,
    },
    /// Log an account in with the browser and store its session.
    Login {
        /// Account id, or a service name with a single account.
        account: String,
        #[arg(long)]
        json: bool,
    },
    /// Learn an account's chat flow from one probe message and store it.
    Learn {
        /// Account id, or a service name with a single account.
        account: String,
        #[arg(long)]
        json: bool,
        /// Also print, for every call the probe recorded, why it was or was not taken.
        #[arg(long)]
        explain: bool,
    },
    /// Check the setup: Chromium, the data dir and its key, each account's session and flow;
    /// prints what to fix (exit code 1 when something needs fixing).
    Doctor,
    /// Manage accounts (a site URL plus credentials or cookies).
    #[command(subcommand)]
    Account(accounts::AccountCommand),
    /// Manage chat flows.
    #[command(subcommand)]
    Flows(flows::FlowsCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Apply the store's migrations (SQLite, or PostgreSQL with `database_url`) and print
    /// the schema version.
    Migrate {
        #[arg(long)]
        json: bool,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    if let Some(data) = cli.data {
        config.data_dir = data;
    }
    init_tracing(
        &config,
        matches!(
            cli.command,
            Command::Serve { .. } | Command::DemoSite { .. }
        ),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let result = runtime.block_on(dispatch(cli.command, config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&*e),
    }
}

type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn dispatch(command: Command, mut config: Config) -> CliResult {
    crate::server::install_tls_provider();
    match command {
        Command::Serve { bind } => {
            if let Some(bind) = bind {
                config.bind = bind;
            }
            config.check()?;
            crate::server::serve(config).await?;
        }
        Command::Demo(args) => demo::run(args, config).await?,
        Command::DemoSite {
            bind,
            shape,
            token_delay_ms,
            session_ttl_secs,
            rate_limit,
            login,
            anti_bot,
            clearance_ttl_secs,
            signed,
            render_suffix,
            uploads,
        } => {
            let listener = tokio::net::TcpListener::bind(bind).await?;
            println!(
                "demo site ({shape}) listening on http://{}",
                listener.local_addr()?
            );
            let config = crate::demo::DemoConfig {
                shape,
                token_delay: std::time::Duration::from_millis(token_delay_ms),
                session_ttl: session_ttl_secs.map(std::time::Duration::from_secs),
                rate_limit,
                login,
                anti_bot,
                clearance_ttl: std::time::Duration::from_secs(clearance_ttl_secs),
                signed,
                render_suffix,
                uploads,
                ..Default::default()
            };
            crate::demo::serve(listener, config).await?;
        }
        Command::Login { account, json } => {
            job::run(job::Kind::Login, &account, json, &config).await?
        }
        Command::Learn {
            account,
            json,
            explain,
        } => job::run(job::Kind::Learn { explain }, &account, json, &config).await?,
        Command::Doctor => doctor::run(&config).await?,
        Command::Account(cmd) => accounts::run(cmd, &config).await?,
        Command::Flows(cmd) => flows::run(cmd, &config).await?,
        Command::Keys(cmd) => keys::run(cmd, &config).await?,
        Command::Migrate { json } => migrate::run(json, &config).await?,
    }
    Ok(())
}

fn init_tracing(config: &Config, server: bool) {
    use tracing_subscriber::EnvFilter;
    // Commands that print results keep stderr for warnings; servers log at the config's level.
    let default = if server { config.log.as_str() } else { "warn" };
    // The browser crates log CDP traffic (typed passwords, cookie values) at trace level:
    // their directives are always appended, whatever the user's filter says.
    let requested = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned());
    let directives = format!("{requested},{}", crate::browser::LOG_FILTER_DIRECTIVES);
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| {
        EnvFilter::new(format!("info,{}", crate::browser::LOG_FILTER_DIRECTIVES))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The account `name` names (an id, or a service with one account); when there is none, the
/// error lists the accounts that exist, or says how to add one.
async fn find_account(
    store: &crate::store::Store,
    name: &str,
) -> Result<crate::store::accounts::Account, Box<dyn std::error::Error + Send + Sync>> {
    match store.account(name).await {
        Ok(account) => Ok(account),
        Err(crate::store::StoreError::NotFound(_)) => {
            let accounts = store.accounts().await?;
            if accounts.is_empty() {
                return Err(format!(
                    "no account `{name}`: this data dir has no account yet; add one with \
                     `computetower account add --url URL --name NAME`"
                )
                .into());
            }
            let known: Vec<String> = accounts
                .iter()
                .map(|a| format!("{} (model `{}`, {})", a.id, a.service, a.url))
                .collect();
            Err(format!(
                "no account `{name}`. Accounts: {}. Give an account id, or a model name that \
                 has one account.",
                known.join("; ")
            )
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

fn fail(error: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::FAILURE
}

/// Prints rows as aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            out.push_str(&format!("{cell:<w$}  "));
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_json(value: &impl serde::Serialize) -> CliResult {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
