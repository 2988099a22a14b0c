//! `computetower doctor`: what a new setup lacks, each with what to do about it.
//!
//! It checks Chromium (its version, and that it starts), the data dir and its master key,
//! the API keys against the bind address, and each account's session and flow. It changes
//! nothing: a missing data dir is reported, not created.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::CliResult;
use crate::config::Config;

/// Longest Chromium may take to start and print a blank page.
const CHROME_START: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Report {
    problems: usize,
    lines: Vec<String>,
}

impl Report {
    fn ok(&mut self, text: String) {
        self.lines.push(format!("ok    {text}"));
    }

    fn fix(&mut self, text: String, fix: &str) {
        self.problems += 1;
        self.lines.push(format!("FIX   {text}\n      → {fix}"));
    }

    fn note(&mut self, text: String) {
        self.lines.push(format!("      {text}"));
    }
}

pub async fn run(config: &Config) -> CliResult {
    let mut report = Report::default();
    check_chromium(&config.chrome, &mut report).await;
    check_data(config, &mut report).await;
    let mut out = std::io::stdout().lock();
    for line in &report.lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    match report.problems {
        0 => {
            let _ = writeln!(out, "nothing to fix");
            Ok(())
        }
        1 => Err("1 thing to fix (above)".into()),
        n => Err(format!("{n} things to fix (above)").into()),
    }
}

async fn check_chromium(chrome: &Path, report: &mut Report) {
    let install = "install Debian's Chromium (`apt-get install chromium`), or point `chrome` in \
                   computetower.toml (or COMPUTETOWER_CHROME) at a Chromium binary";
    if !chrome.exists() {
        report.fix(format!("no Chromium at {}", chrome.display()), install);
        return;
    }
    let version = tokio::process::Command::new(chrome)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    let version = match tokio::time::timeout(CHROME_START, version).await {
        Ok(Ok(out)) if out.status.success() => {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
        _ => {
            report.fix(format!("{} does not run", chrome.display()), install);
            return;
        }
    };
    // Starting it headless on a blank page is what a login needs first.
    let profile = match tempfile_dir() {
        Some(dir) => dir,
        None => {
            report.fix(
                "cannot make a temporary Chromium profile".into(),
                "check that the temp dir ($TMPDIR or /tmp) is writable",
            );
            return;
        }
    };
    let started = Instant::now();
    let run = tokio::process::Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", "about:blank"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let outcome = tokio::time::timeout(CHROME_START, run).await;
    let _ = std::fs::remove_dir_all(&profile);
    match outcome {
        Ok(Ok(out)) if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("<html") => {
            report.ok(format!(
                "{version} at {} starts headless ({:.1} s)",
                chrome.display(),
                started.elapsed().as_secs_f64()
            ));
        }
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            report.fix(
                format!("{version} does not start headless ({}): {last}", out.status),
                "run it by hand to see why (`chromium --headless --no-sandbox --dump-dom about:blank`); a missing library or a full /tmp are the usual causes",
            );
        }
        Ok(Err(e)) => report.fix(format!("{version} cannot be started: {e}"), install),
        Err(_) => report.fix(
            format!("{version} did not start within {} s", CHROME_START.as_secs()),
            "the machine may be overloaded; try again, or run Chromium by hand to see where it hangs",
        ),
    }
}

fn tempfile_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "computetower-doctor-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

async fn check_data(config: &Config, report: &mut Report) {
    let dir = &config.data_dir;
    let add = "add an account: `computetower account add --url URL --name NAME --email E \
               --password-stdin` (or `--cookies FILE`), then `computetower learn NAME`";
    if !config.database_path().exists() {
        report.fix(
            format!(
                "data dir {} holds no database yet (nothing was set up here)",
                dir.display()
            ),
            add,
        );
        return;
    }
    let env_key = std::env::var("COMPUTETOWER_MASTER_KEY").is_ok();
    if !env_key && !config.key_file().exists() {
        report.fix(
            format!("{} has a database but no master key file", dir.display()),
            "set COMPUTETOWER_MASTER_KEY to the key this data was sealed with, or restore master.key from your backup",
        );
        return;
    }
    let store = match crate::server::open_store(config).await {
        Ok(store) => store,
        Err(e) => {
            report.fix(
                format!("the data in {} does not open: {e}", dir.display()),
                "use the master key this data was created with (COMPUTETOWER_MASTER_KEY or master.key)",
            );
            return;
        }
    };
    report.ok(format!(
        "data dir {} opens with its master key ({})",
        dir.display(),
        if env_key {
            "COMPUTETOWER_MASTER_KEY"
        } else {
            "master.key"
        }
    ));
    if let Err(e) = check_store(config, &store, report).await {
        report.fix(
            format!("reading the store failed: {e}"),
            "check the disk and the data dir's permissions",
        );
    }
    store.close().await;
}

async fn check_store(
    config: &Config,
    store: &crate::store::Store,
    report: &mut Report,
) -> Result<(), crate::store::StoreError> {
    let keys = store.live_key_count().await?;
    if config.bind.ip().is_loopback() {
        report.ok(format!(
            "serve listens on {} (loopback), {keys} API key(s)",
            config.bind
        ));
    } else if keys == 0 {
        report.fix(
            format!("serve is set to listen on {} with no API key", config.bind),
            "create one: `computetower keys create` (serve refuses to start without)",
        );
    } else {
        report.ok(format!(
            "serve listens on {} with {keys} API key(s)",
            config.bind
        ));
    }
    let accounts = store.accounts().await?;
    if accounts.is_empty() {
        report.fix(
            "no account yet: there is no model to serve".into(),
            "add one: `computetower account add --url URL --name NAME --email E --password-stdin` (or `--cookies FILE`), then `computetower learn NAME`",
        );
        return Ok(());
    }
    let now = crate::store::now();
    for account in accounts {
        let name = format!("account {} (model `{}`)", account.id, account.service);
        if !account.enabled {
            report.fix(
                format!("{name} is disabled"),
                &format!(
                    "enable it: `computetower account update {} --enable`",
                    account.id
                ),
            );
            continue;
        }
        match store.latest_session(&account.id).await? {
            Some(s) if s.is_usable(now) => report.ok(format!(
                "{name}: session from {} ({} cookies){}",
                s.source,
                s.data.cookies.len(),
                s.expires_at
                    .map(|e| format!(", expires in {} h", (e - now) / 3600))
                    .unwrap_or_default()
            )),
            found => {
                let why = match found {
                    Some(s) if !s.authenticated => "the site rejected its session",
                    Some(_) => "its session has expired",
                    None => "it has no session yet",
                };
                if account.has_password {
                    report.ok(format!(
                        "{name}: {why}; it logs in with its password when needed"
                    ));
                } else {
                    report.fix(
                        format!("{name}: {why}, and it has no password to log in with"),
                        &format!(
                            "import fresh cookies (`computetower account update {} --cookies FILE`), or give it a login (`--email E --password-stdin`)",
                            account.id
                        ),
                    );
                }
            }
        }
        match store.active_flow(&account.service).await? {
            Some(flow) if flow.replay.needs_browser => report.ok(format!(
                "{name}: flow v{} needs the browser (tier {}): {}",
                flow.version,
                flow.replay.min_tier.unwrap_or(2),
                flow.replay.reason.as_deref().unwrap_or("direct replay failed")
            )),
            Some(flow) if flow.stats.tested => {
                report.ok(format!("{name}: flow v{} verified", flow.version))
            }
            Some(flow) => {
                report.ok(format!("{name}: flow v{} (imported, not verified here)", flow.version));
                report.note(format!(
                    "to verify it against the site: `computetower learn {}`",
                    account.service
                ));
            }
            None => report.fix(
                format!("{name}: no flow, so `{}` cannot serve", account.service),
                &format!(
                    "learn it: `computetower learn {}` (or import one: `computetower flows import FILE --service {}`)",
                    account.id, account.service
                ),
            ),
        }
    }
    Ok(())
}
