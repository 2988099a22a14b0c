//! Requests per second with one and with two `serve` instances on one PostgreSQL store, and
//! one instance on SQLite for reference (`cargo bench --bench instances [-- --quick]`).
//!
//! Everything runs on this machine, on loopback: the test PostgreSQL cluster of
//! `tests/common/postgres.rs` (an unprivileged `initdb` cluster in a temp dir), one demo site
//! (`--shape openai`, no token delay, so the site costs little), four accounts imported from
//! the site's JSON login with `flows/demo-openai.json`, and the release binary's `serve`.
//! The client is a closed loop: `CLIENTS` workers, each sending non-streamed chat requests
//! back to back for the phase's duration, spread evenly over the instances. The
//! per-account limit is raised out of the way, so what is measured is the instances and
//! their store, not the accounts' queues.
//!
//! Output: a markdown table on stdout and in `target/bench/instances.md`. Timings are
//! reported, never asserted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench run fails by panicking

#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_computetower");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PASSWORD: &str = "demo-password";
const MASTER_KEY: &str = "0303030303030303030303030303030303030303030303030303030303030303";
const ACCOUNTS: usize = 4;
const CLIENTS: usize = 32;

/// A child process killed on drop.
struct Proc {
    child: Child,
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and waits for its `listening on http://…` line.
fn start(mut cmd: Command) -> Proc {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent
                && line.contains("listening on")
                && let Some(at) = line.find("http://")
            {
                let _ = tx.send(line[at..].trim().to_owned());
                sent = true;
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the process did not announce its address");
    Proc { child, url }
}

/// A data dir's environment for the binary: its own dir, the shared key, the store.
fn command(data: &Path, database_url: Option<&str>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("COMPUTETOWER_DATA", data)
        .env("COMPUTETOWER_MASTER_KEY", MASTER_KEY)
        .env("COMPUTETOWER_LOG", "warn")
        .env("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", "1000")
        .env("COMPUTETOWER_PER_ACCOUNT_QUEUE", "1000")
        .env_remove("COMPUTETOWER_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("COMPUTETOWER_DATABASE_URL")
        .current_dir(data);
    if let Some(url) = database_url {
        cmd.env("COMPUTETOWER_DATABASE_URL", url);
    }
    cmd
}

fn cli(data: &Path, database_url: Option<&str>, args: &[&str]) {
    let out = command(data, database_url).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "computetower {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The demo accounts and their flow, in the store of `data` (or `database_url`).
async fn add_accounts(site: &str, data: &Path, database_url: Option<&str>) {
    let host = url::Url::parse(site)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned();
    for i in 0..ACCOUNTS {
        let email = format!("bench{i}@example.com");
        let login = computetower::demo::json_login(site, &email, PASSWORD)
            .await
            .unwrap();
        let state = json!({
            "cookies": login.cookies.iter().map(|(n, v)| json!({
                "name": n, "value": v, "domain": host, "path": "/", "expires": -1,
                "httpOnly": true, "secure": false, "sameSite": "Lax"
            })).collect::<Vec<_>>(),
            "origins": [{
                "origin": site.trim_end_matches('/'),
                "localStorage": login.local_storage.iter()
                    .map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>()
            }]
        });
        let file = data.join(format!("{email}.json"));
        std::fs::write(&file, state.to_string()).unwrap();
        cli(
            data,
            database_url,
            &[
                "account",
                "add",
                "--url",
                site,
                "--name",
                "demo-openai",
                "--cookies",
                file.to_str().unwrap(),
            ],
        );
        std::fs::remove_file(&file).unwrap();
    }
    let flow = Path::new(REPO).join("flows/demo-openai.json");
    cli(
        data,
        database_url,
        &["flows", "import", flow.to_str().unwrap()],
    );
}

fn serve(data: &Path, database_url: Option<&str>) -> Proc {
    let mut cmd = command(data, database_url);
    cmd.args(["serve", "--bind", "127.0.0.1:0"]);
    start(cmd)
}

/// Closed-loop throughput over `servers` for `duration`: (requests/s, errors).
async fn measure(servers: &[String], duration: Duration) -> (f64, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..CLIENTS).map(|i| {
        let server = servers[i % servers.len()].clone();
        let (client, ok, failed) = (client.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let body = json!({"model": "demo-openai",
                              "messages": [{"role": "user", "content": "Hello there, how are you today?"}]})
            .to_string();
            while Instant::now() < deadline {
                let response = client
                    .post(format!("{server}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let good = match response {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                };
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    for worker in futures_util::future::join_all(workers).await {
        worker.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
    )
}

async fn run(quick: bool) -> String {
    computetower::install_tls_provider();
    let phase = Duration::from_secs(if quick { 5 } else { 20 });
    let warmup = Duration::from_secs(2);
    let mut site_cmd = Command::new(BIN);
    site_cmd.args([
        "demo-site",
        "--bind",
        "127.0.0.1:0",
        "--shape",
        "openai",
        "--token-delay-ms",
        "0",
    ]);
    let site = start(site_cmd);
    let mut rows = Vec::new();

    // One instance on SQLite, for reference.
    let sqlite = tempfile::tempdir().unwrap();
    add_accounts(&site.url, sqlite.path(), None).await;
    {
        let server = serve(sqlite.path(), None);
        measure(std::slice::from_ref(&server.url), warmup).await;
        rows.push((
            "1 instance, SQLite",
            measure(std::slice::from_ref(&server.url), phase).await,
        ));
    }

    // One, then two instances on one PostgreSQL database.
    let url = postgres::fresh_database().await;
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    add_accounts(&site.url, a_dir.path(), Some(&url)).await;
    let a = serve(a_dir.path(), Some(&url));
    measure(std::slice::from_ref(&a.url), warmup).await;
    rows.push((
        "1 instance, PostgreSQL",
        measure(std::slice::from_ref(&a.url), phase).await,
    ));
    let b = serve(b_dir.path(), Some(&url));
    let both = [a.url.clone(), b.url.clone()];
    measure(&both, warmup).await;
    rows.push(("2 instances, one PostgreSQL", measure(&both, phase).await));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = format!(
        "Closed loop, {CLIENTS} clients, non-streamed chat requests, {} s per row, {cores} cores \
         shared by the client, the demo site, PostgreSQL and the instances.\n\n\
         | setup | requests/s | errors |\n| --- | ---: | ---: |\n",
        phase.as_secs()
    );
    for (name, (rate, errors)) in rows {
        report.push_str(&format!("| {name} | {rate:.0} | {errors} |\n"));
    }
    report
}

fn main() {
    // `cargo bench` passes `--bench`; only `--quick` (or CT_BENCH_QUICK=1) matters here.
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("CT_BENCH_QUICK").is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(quick));
    println!("{report}");
    let dir = Path::new(REPO).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("instances.md"), &report).unwrap();
}
