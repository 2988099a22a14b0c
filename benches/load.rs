//! Load harness (`cargo bench --bench load [-- --quick]`): added latency, open-loop
//! throughput, memory, tiers, memory per browser account and learning time of the release
//! binary, against the demo site.
//!
//! Everything runs in one process tree on loopback addresses only:
//! - demo sites (`computetower demo-site --shape openai`) with a realistic token delay
//!   (latency), zero delay (throughput) and a long delay (open streams for memory);
//! - `computetower serve` on port 0 with a temp data dir, accounts imported from the demo
//!   site's JSON login as a Playwright storageState file, and `flows/demo-openai.json`;
//! - LiteLLM's proxy (from `target/litellm-venv`, skipped with a note when not installable);
//! - this program's own client: raw HTTP/1.1 over tokio `TcpStream`s with keep-alive, the
//!   least code between a socket read and its timestamp. The same client makes the direct
//!   calls, so its own cost is in both columns and cancels in the difference.
//!
//! Direct and proxied requests are interleaved in every phase (per request within a worker,
//! workers starting at different targets), so machine noise hits all of them alike.
//! Every loop is bounded in count and in time. Timings are reported, never asserted.
//!
//! Output: a markdown report on stdout, in `target/bench/results.md`, and the raw numbers in
//! `target/bench/results.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench run fails by panicking

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_computetower");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PASSWORD: &str = "demo-password";
const MASTER_KEY: &str = "0202020202020202020202020202020202020202020202020202020202020202";
const LITELLM_KEY: &str = "sk-bench-litellm";
/// LiteLLM 1.106.x: the line the issue's reference numbers were measured with, and before
/// 1.107.0, a release that was compromised on PyPI. (1.106.10 needs a newer `certifi` than
/// the registry has here; pip picks the newest 1.106 that installs.)
const LITELLM_SPEC: &str = "litellm[proxy]>=1.106,<1.107";
const PROMPT: &str = "Hello there, how are you today?";
/// Realistic per-token delay for the latency phase (50 tokens/s).
const TOKEN_DELAY_MS: u64 = 20;
/// Token delay of the site behind the open streams of the memory phase.
const SLOW_TOKEN_DELAY_MS: u64 = 1000;
/// Open-loop rates tried in order, per target, until the target fails one.
const RATES: &[u32] = &[
    25, 50, 100, 250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000,
];
/// The ladder, or the rates in `CT_BENCH_RATES` (`500,1000`): a fixed rate for profiling. A
/// list with no valid rate is refused rather than running nothing.
fn rates() -> Vec<u32> {
    let Ok(list) = std::env::var("CT_BENCH_RATES") else {
        return RATES.to_vec();
    };
    let rates: Vec<u32> = list
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    assert!(!rates.is_empty(), "CT_BENCH_RATES={list:?} names no rate");
    rates
}
/// A rate is sustained when at most this share of requests fail …
const MAX_ERROR_RATE: f64 = 0.01;
/// … the p99 latency is at most this …
const MAX_P99_MS: f64 = 250.0;
/// … and at least this share of the offered rate completes.
const MIN_ACHIEVED: f64 = 0.95;
/// Tier-2/3 hook, for whoever wires the browser tiers: the header a request uses to force a
/// tier. The tiers section runs only when `GET /health` lists tiers 2 or 3 under `tiers`.
const TIER_HEADER: &str = "x-computetower-tier";

// ---------------------------------------------------------------------------------------------
// Options and environment

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    /// Phases to run (all when empty): latency, throughput, memory, tiers, accounts, learn.
    only: Vec<String>,
    litellm: bool,
}

impl Opts {
    fn parse() -> Opts {
        let mut opts = Opts {
            quick: std::env::var("CT_BENCH_QUICK").is_ok_and(|v| v == "1"),
            only: Vec::new(),
            litellm: std::env::var("CT_BENCH_NO_LITELLM").is_err(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => opts.quick = true,
                "--no-litellm" => opts.litellm = false,
                "--only" => {
                    if let Some(list) = args.next() {
                        opts.only = list.split(',').map(str::to_owned).collect();
                    }
                }
                // cargo bench passes `--bench`; criterion-style filters are ignored.
                _ => {}
            }
        }
        opts
    }

    fn wants(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }

    /// Seconds per latency level.
    fn latency_secs(&self, streams: usize) -> u64 {
        match (self.quick, streams) {
            (true, 1) => 25,
            (true, _) => 20,
            (false, 1) => 90,
            (false, _) => 60,
        }
    }

    fn step_secs(&self) -> f64 {
        match std::env::var("CT_BENCH_STEP_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(secs) => secs,
            None if self.quick => 2.0,
            None => 8.0,
        }
    }
}

/// Raises the open-file limit to its hard maximum (children inherit it).
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0).round(),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "rustc": Command::new("rustc").arg("--version").output().ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
    })
}

fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `(VmRSS, Pss)` of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        field(&read(&format!("/proc/{pid}/status")), "VmRSS:"),
        field(&read(&format!("/proc/{pid}/smaps_rollup")), "Pss:"),
    )
}

/// CPU seconds (user + system) used so far by `pid` and, when `tree`, its descendants.
fn cpu_secs(pid: u32, tree: bool) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = |pid: u32| -> Option<(u32, f64)> {
        let text = read(&format!("/proc/{pid}/stat"));
        let rest = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((ppid, (utime + stime) / ticks))
    };
    let mut total = stat(pid).map(|s| s.1).unwrap_or(0.0);
    if tree {
        let mut parents = vec![pid];
        let all: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|p| stat(p).map(|(pp, cpu)| (p, pp, cpu)))
            .collect();
        // Bounded: a process tree is at most as deep as the process count.
        for _ in 0..all.len() {
            let children: Vec<&(u32, u32, f64)> = all
                .iter()
                .filter(|(p, pp, _)| parents.contains(pp) && !parents.contains(p))
                .collect();
            if children.is_empty() {
                break;
            }
            for (p, _, cpu) in children {
                total += cpu;
                parents.push(*p);
            }
        }
    }
    total
}

/// This process's own CPU seconds.
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes only into the struct passed.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, killed on drop, whose stderr tail is kept.
struct Proc {
    child: Child,
    url: String,
    name: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd` and waits for a stdout line `… listening on http://…`.
    fn start(name: &str, mut cmd: Command) -> Result<Proc, String> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let tail = stderr.clone();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut tail = tail.lock().expect("stderr lock");
                if tail.len() >= 50 {
                    tail.remove(0);
                }
                tail.push(line);
            }
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !sent
                    && line.contains("listening on")
                    && let Some(at) = line.find("http://")
                {
                    let _ = tx.send(line[at..].trim().trim_end_matches('/').to_owned());
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => Ok(Proc {
                child,
                url,
                name: name.to_owned(),
                stderr,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "{name} did not start: {}",
                    stderr.lock().expect("stderr lock").join("\n")
                ))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn addr(&self) -> SocketAddr {
        addr_of(&self.url)
    }

    fn stderr_tail(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var("CT_BENCH_VERBOSE").is_ok() {
            eprintln!("[{}] stderr tail:\n{}", self.name, self.stderr_tail());
        }
    }
}

fn addr_of(url: &str) -> SocketAddr {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    let addr: SocketAddr = host.parse().expect("a numeric loopback address");
    assert!(addr.ip().is_loopback(), "only loopback targets: {addr}");
    addr
}

fn demo_site(delay_ms: u64) -> Result<Proc, String> {
    let mut cmd = Command::new(BIN);
    cmd.args(["demo-site", "--bind", "127.0.0.1:0", "--shape", "openai"])
        .args(["--token-delay-ms", &delay_ms.to_string()])
        .env_remove("RUST_LOG");
    Proc::start(&format!("demo-site({delay_ms} ms)"), cmd)
}

/// A temp data dir and the CLI run against it.
struct Data {
    dir: tempfile::TempDir,
}

impl Data {
    fn new() -> Data {
        Data {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("COMPUTETOWER_DATA", self.dir.path())
            .env("COMPUTETOWER_MASTER_KEY", MASTER_KEY)
            .env_remove("COMPUTETOWER_CONFIG")
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path());
        cmd
    }

    fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(input) = stdin {
            let _ = child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(input.as_bytes());
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "`computetower {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `serve` on port 0. The per-account limits (4 replies at once, 64 queued by default)
    /// are lifted: the harness measures the proxy, not the account policy.
    fn serve(&self) -> Result<Proc, String> {
        self.serve_with(&[])
    }

    /// As [`Data::serve`], with extra environment.
    fn serve_with(&self, env: &[(&str, &str)]) -> Result<Proc, String> {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--bind", "127.0.0.1:0"])
            .env("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", "100000")
            .env("COMPUTETOWER_PER_ACCOUNT_QUEUE", "100000");
        Proc::start("computetower serve", cmd)
    }

    /// Adds an account of `service` on `site` (cookies from the JSON login, as a Playwright
    /// storageState file; also the password when `with_password`) and imports the openai flow
    /// for it.
    async fn add_account(
        &self,
        site: &str,
        service: &str,
        email: &str,
        with_password: bool,
        flow: bool,
    ) -> Result<(), String> {
        let login = computetower::demo::json_login(site, email, PASSWORD)
            .await
            .map_err(|e| e.to_string())?;
        let state = json!({
            "cookies": login.cookies.iter().map(|(n, v)| json!({
                "name": n, "value": v, "domain": "127.0.0.1", "path": "/", "expires": -1,
                "httpOnly": true, "secure": false, "sameSite": "Lax"
            })).collect::<Vec<_>>(),
            "origins": [{
                "origin": site,
                "localStorage": login.local_storage.iter()
                    .map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>()
            }]
        });
        let file = self.dir.path().join(format!("{service}.state.json"));
        std::fs::write(&file, state.to_string()).map_err(|e| e.to_string())?;
        let file_arg = file.to_string_lossy().into_owned();
        let mut args = vec![
            "account",
            "add",
            "--url",
            site,
            "--name",
            service,
            "--cookies",
            &file_arg,
        ];
        if with_password {
            args.extend(["--email", email, "--password-stdin"]);
        }
        self.cli(&args, Some(&format!("{PASSWORD}\n")))?;
        let _ = std::fs::remove_file(&file);
        if flow {
            let flow = format!("{REPO}/flows/demo-openai.json");
            self.cli(&["flows", "import", &flow, "--service", service], None)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The client: raw HTTP/1.1 with keep-alive

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// When the last read returned.
    read_at: Instant,
}

struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
    close: bool,
    /// The tier ComputeTower says served the reply (`x-computetower-tier`).
    tier: Option<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        assert!(addr.ip().is_loopback());
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            pos: 0,
            read_at: Instant::now(),
        })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 8 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        self.read_at = Instant::now();
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    async fn head(&mut self) -> std::io::Result<Head> {
        let end = loop {
            if let Some(at) = find(&self.buf[self.pos..], b"\r\n\r\n") {
                break self.pos + at + 4;
            }
            self.fill().await?;
        };
        let text = String::from_utf8_lossy(&self.buf[self.pos..end]).into_owned();
        self.pos = end;
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let mut head = Head {
            status,
            chunked: false,
            length: None,
            close: false,
            tier: None,
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => head.length = value.parse().ok(),
                "transfer-encoding" => head.chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => head.close = value.eq_ignore_ascii_case("close"),
                TIER_HEADER => head.tier = value.parse().ok(),
                _ => {}
            }
        }
        Ok(head)
    }

    /// Reads the body, handing each piece to `sink` with the time its last byte was read.
    /// Returns `false` from `sink` to stop early (the connection is then unusable).
    async fn body(
        &mut self,
        head: &Head,
        mut sink: impl FnMut(&[u8], Instant) -> bool,
    ) -> std::io::Result<bool> {
        if head.chunked {
            loop {
                // Offsets are relative to `pos`: `fill` may move the unread bytes to the front.
                let line_len = loop {
                    if let Some(at) = find(&self.buf[self.pos..], b"\r\n") {
                        break at;
                    }
                    self.fill().await?;
                };
                let size_text = String::from_utf8_lossy(&self.buf[self.pos..self.pos + line_len]);
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
                if size == 0 {
                    // Final chunk: no trailers expected, just the closing CRLF.
                    while self.buf.len() < self.pos + line_len + 4 {
                        self.fill().await?;
                    }
                    self.pos += line_len + 4;
                    return Ok(true);
                }
                while self.buf.len() < self.pos + line_len + 2 + size + 2 {
                    self.fill().await?;
                }
                let start = self.pos + line_len + 2;
                self.pos = start + size + 2;
                if !sink(&self.buf[start..start + size], self.read_at) {
                    return Ok(false);
                }
            }
        } else if let Some(length) = head.length {
            while self.buf.len() - self.pos < length {
                self.fill().await?;
            }
            let start = self.pos;
            self.pos += length;
            Ok(sink(&self.buf[start..start + length], self.read_at))
        } else {
            let mut all = Vec::new();
            loop {
                all.extend_from_slice(&self.buf[self.pos..]);
                self.pos = self.buf.len();
                if self.fill().await.is_err() {
                    break;
                }
            }
            sink(&all, self.read_at);
            Ok(false)
        }
    }

    /// One request with a fully read response: status and body.
    async fn call(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>, bool)> {
        self.stream.write_all(request).await?;
        let head = self.head().await?;
        let mut body = Vec::new();
        let reusable = self
            .body(&head, |piece, _| {
                body.extend_from_slice(piece);
                true
            })
            .await?;
        Ok((head.status, body, reusable && !head.close))
    }
}

fn http_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if method != "GET" || !body.is_empty() {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A logged-in direct session on a demo site: what a hand-written client would hold.
#[derive(Clone)]
struct DirectSession {
    addr: SocketAddr,
    cookie: String,
    token: String,
    csrf: String,
    conversation: String,
}

impl DirectSession {
    async fn login(site: &str, email: &str) -> Result<DirectSession, String> {
        let login = computetower::demo::json_login(site, email, PASSWORD)
            .await
            .map_err(|e| e.to_string())?;
        let cookie = login
            .cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let token = login
            .local_storage
            .first()
            .map(|(_, v)| v.clone())
            .ok_or("no token")?;
        let mut session = DirectSession {
            addr: addr_of(site),
            cookie,
            token,
            csrf: String::new(),
            conversation: String::new(),
        };
        let mut conn = Conn::connect(session.addr)
            .await
            .map_err(|e| e.to_string())?;
        let (csrf, conversation) = session
            .preflights(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        session.csrf = csrf;
        session.conversation = conversation;
        Ok(session)
    }

    /// The flow's two preflights: CSRF token from the chat page, a new conversation.
    async fn preflights(&self, conn: &mut Conn) -> std::io::Result<(String, String)> {
        let bad = || std::io::Error::from(std::io::ErrorKind::InvalidData);
        let page = http_request(
            "GET",
            self.addr,
            "/chat",
            &[("accept", "text/html"), ("cookie", &self.cookie)],
            "",
        );
        let (status, html, _) = conn.call(&page).await?;
        let html = String::from_utf8_lossy(&html);
        let marker = "<meta name=\"csrf-token\" content=\"";
        let at = html.find(marker).ok_or_else(bad)? + marker.len();
        let csrf = html[at..].split('"').next().ok_or_else(bad)?.to_owned();
        if status != 200 {
            return Err(bad());
        }
        let bearer = format!("Bearer {}", self.token);
        let create = http_request(
            "POST",
            self.addr,
            "/api/conversations",
            &[
                ("cookie", &self.cookie),
                ("authorization", &bearer),
                ("x-csrf-token", &csrf),
                ("content-type", "application/json"),
            ],
            r#"{"title":"New chat"}"#,
        );
        let (status, body, _) = conn.call(&create).await?;
        let json: Value = serde_json::from_slice(&body).map_err(|_| bad())?;
        let id = json
            .pointer("/data/id")
            .and_then(Value::as_str)
            .ok_or_else(bad)?;
        if status != 200 && status != 201 {
            return Err(bad());
        }
        Ok((csrf, id.to_owned()))
    }

    fn chat_request(&self, csrf: &str, conversation: &str, stream: bool) -> Vec<u8> {
        let body = json!({
            "model": "demo",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": stream,
            "conversation_id": conversation,
        })
        .to_string();
        let bearer = format!("Bearer {}", self.token);
        http_request(
            "POST",
            self.addr,
            "/api/openai/v1/chat/completions",
            &[
                ("cookie", &self.cookie),
                ("authorization", &bearer),
                ("x-csrf-token", csrf),
                ("content-type", "application/json"),
                ("accept", "text/event-stream"),
            ],
            &body,
        )
    }
}

fn proxy_request(addr: SocketAddr, model: &str, stream: bool, extra: &[(&str, &str)]) -> Vec<u8> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
    })
    .to_string();
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    http_request("POST", addr, "/v1/chat/completions", &headers, &body)
}

// ---------------------------------------------------------------------------------------------
// Statistics

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Milliseconds with three decimals (µs resolution).
fn ms(us: f64) -> String {
    if us.is_nan() {
        "–".to_owned()
    } else {
        format!("{:.3}", us / 1000.0)
    }
}

fn signed_ms(us: f64) -> String {
    if us.is_nan() {
        "–".to_owned()
    } else {
        format!("{:+.3}", us / 1000.0)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// 1. Added latency: interleaved streams

#[derive(Clone)]
enum StreamTarget {
    /// The site's internal chat call, on a conversation made beforehand.
    Direct { request: Vec<u8> },
    /// The flow's preflights then the chat call, as a hand-written replay client would.
    DirectWithPreflights { session: DirectSession },
    /// Through ComputeTower.
    Proxy { request: Vec<u8> },
}

const STREAM_TARGETS: [&str; 3] = ["direct", "direct + preflights", "ComputeTower (tier 1)"];

#[derive(Default)]
struct StreamSample {
    ok: bool,
    ttft_us: f64,
    total_us: f64,
    tokens: usize,
    gaps_us: Vec<f64>,
    /// The tier the response header named.
    tier: Option<u8>,
}

/// Whether an SSE event's JSON carries a content or reasoning token.
fn has_token(data: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let delta = json.pointer("/choices/0/delta");
    ["content", "reasoning_content"].iter().any(|field| {
        delta
            .and_then(|d| d.get(field))
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    })
}

/// Reads an SSE stream: its head, token times relative to `t0`, and whether the connection
/// can be reused.
async fn read_stream(conn: &mut Conn, t0: Instant) -> std::io::Result<(Head, Vec<f64>, bool)> {
    let head = conn.head().await?;
    let mut tokens = Vec::with_capacity(256);
    let mut line = Vec::with_capacity(512);
    let mut done = false;
    let reusable = conn
        .body(&head, |piece, at| {
            for &b in piece {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Some(data) = line.strip_prefix(b"data: ") {
                    if data == b"[DONE]" {
                        done = true;
                    } else if has_token(data) {
                        tokens.push(at.duration_since(t0).as_secs_f64() * 1e6);
                    }
                }
                line.clear();
            }
            true
        })
        .await?;
    let reusable = reusable && !head.close && done;
    Ok((head, tokens, reusable))
}

async fn one_stream(
    target: &StreamTarget,
    conn: &mut Option<Conn>,
    addr: SocketAddr,
) -> StreamSample {
    let run = async {
        if conn.is_none() {
            *conn = Some(Conn::connect(addr).await?);
        }
        let c = conn.as_mut().expect("connected");
        let t0 = Instant::now();
        let (head, tokens, reusable) = match target {
            StreamTarget::Direct { request } | StreamTarget::Proxy { request } => {
                c.stream.write_all(request).await?;
                read_stream(c, t0).await?
            }
            StreamTarget::DirectWithPreflights { session } => {
                let (csrf, conversation) = session.preflights(c).await?;
                c.stream
                    .write_all(&session.chat_request(&csrf, &conversation, true))
                    .await?;
                read_stream(c, t0).await?
            }
        };
        let total = t0.elapsed().as_secs_f64() * 1e6;
        Ok::<_, std::io::Error>((head, tokens, reusable, total))
    };
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok((head, tokens, reusable, total))) => {
            if !reusable {
                *conn = None;
            }
            if head.status != 200 || tokens.is_empty() {
                return StreamSample {
                    tier: head.tier,
                    ..StreamSample::default()
                };
            }
            StreamSample {
                ok: true,
                ttft_us: tokens[0],
                total_us: total,
                tokens: tokens.len(),
                gaps_us: tokens.windows(2).map(|w| w[1] - w[0]).collect(),
                tier: head.tier,
            }
        }
        _ => {
            *conn = None;
            StreamSample::default()
        }
    }
}

#[derive(Default)]
struct StreamStats {
    n: usize,
    errors: usize,
    ttft: Vec<f64>,
    total: Vec<f64>,
    gaps: Vec<f64>,
    tokens: usize,
}

async fn latency_level(
    streams: usize,
    secs: u64,
    targets: Arc<Vec<(StreamTarget, SocketAddr)>>,
) -> Vec<StreamStats> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Workers start spread over one typical stream's length, so streams are at all stages.
    let spread = Duration::from_millis(2_500);
    let mut workers = Vec::with_capacity(streams);
    for w in 0..streams {
        let targets = targets.clone();
        let delay = spread.mul_f64(w as f64 / streams as f64);
        workers.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut conns: Vec<Option<Conn>> = targets.iter().map(|_| None).collect();
            let mut out = Vec::new();
            // Bounded in count as well as by the deadline; worker `w` starts at target `w`.
            for k in w..w + 100_000 {
                if Instant::now() >= deadline {
                    break;
                }
                let t = k % targets.len();
                let (target, addr) = &targets[t];
                out.push((t, one_stream(target, &mut conns[t], *addr).await));
            }
            out
        }));
    }
    let mut stats: Vec<StreamStats> = targets.iter().map(|_| StreamStats::default()).collect();
    for worker in workers {
        for (t, sample) in worker.await.unwrap_or_default() {
            let s = &mut stats[t];
            s.n += 1;
            if !sample.ok {
                s.errors += 1;
                continue;
            }
            s.ttft.push(sample.ttft_us);
            s.total.push(sample.total_us);
            s.gaps.extend(sample.gaps_us);
            s.tokens += sample.tokens;
        }
    }
    for s in &mut stats {
        s.ttft = sorted(std::mem::take(&mut s.ttft));
        s.total = sorted(std::mem::take(&mut s.total));
        s.gaps = sorted(std::mem::take(&mut s.gaps));
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// 2. Throughput: open loop

struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    fn new(addr: SocketAddr) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// One non-streaming request; its latency in µs, or `None` on any failure.
    async fn request(&self, request: &[u8], timeout: Duration) -> Option<f64> {
        let conn = self.idle.lock().expect("pool lock").pop();
        let t0 = Instant::now();
        let run = async {
            let mut conn = match conn {
                Some(conn) => conn,
                None => Conn::connect(self.addr).await?,
            };
            let (status, body, reusable) = conn.call(request).await?;
            Ok::<_, std::io::Error>((status, body, reusable, conn))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok((status, body, reusable, conn))) => {
                let latency = t0.elapsed().as_secs_f64() * 1e6;
                if reusable {
                    self.idle.lock().expect("pool lock").push(conn);
                }
                (status == 200 && find(&body, b"\"content\"").is_some()).then_some(latency)
            }
            _ => None,
        }
    }
}

struct ThroughputTarget {
    name: &'static str,
    pool: Arc<Pool>,
    request: Arc<Vec<u8>>,
    /// The process whose CPU time is charged to each request (with its children when `tree`).
    pid: u32,
    tree: bool,
}

#[derive(Clone, Debug)]
struct Step {
    rate: u32,
    sent: usize,
    ok: usize,
    error_rate: f64,
    achieved: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    /// CPU µs per successful request of the measured process.
    cpu_us_per_req: f64,
    client_cpu_us_per_req: f64,
    sustained: bool,
}

async fn open_loop(target: &ThroughputTarget, rate: u32, secs: f64) -> Step {
    let total = (rate as f64 * secs).round() as usize;
    let max_inflight = 4096;
    let timeout = Duration::from_secs(5);
    let inflight = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_secs(target.pid, target.tree);
    let self0 = self_cpu_secs();
    let start = Instant::now();
    let mut handles = Vec::with_capacity(total);
    let mut dropped = 0usize;
    let mut issued = 0usize;
    // Bounded: every pass issues what is due; the pass count is capped by the step length.
    let max_passes = (secs * 2_000.0) as usize + 10_000;
    for _ in 0..max_passes {
        if issued >= total {
            break;
        }
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize + 1).min(total);
        while issued < due {
            issued += 1;
            if inflight.load(Ordering::Relaxed) >= max_inflight {
                dropped += 1;
                continue;
            }
            inflight.fetch_add(1, Ordering::Relaxed);
            let (pool, request, inflight) = (
                target.pool.clone(),
                target.request.clone(),
                inflight.clone(),
            );
            handles.push(tokio::spawn(async move {
                let result = pool.request(&request, timeout).await;
                inflight.fetch_sub(1, Ordering::Relaxed);
                result
            }));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let mut latencies = Vec::with_capacity(total);
    for handle in handles {
        if let Ok(Some(latency)) = handle.await {
            latencies.push(latency);
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(secs);
    let cpu = cpu_secs(target.pid, target.tree) - cpu0;
    let client_cpu = self_cpu_secs() - self0;
    let ok = latencies.len();
    let latencies = sorted(latencies);
    let error_rate = 1.0 - ok as f64 / total.max(1) as f64;
    let achieved = ok as f64 / elapsed;
    let p99 = percentile(&latencies, 99.0);
    let _ = dropped;
    Step {
        rate,
        sent: total,
        ok,
        error_rate,
        achieved,
        p50_us: percentile(&latencies, 50.0),
        p90_us: percentile(&latencies, 90.0),
        p99_us: p99,
        cpu_us_per_req: cpu * 1e6 / ok.max(1) as f64,
        client_cpu_us_per_req: client_cpu * 1e6 / ok.max(1) as f64,
        // Compared in whole requests, so exactly 1 % is still sustained.
        sustained: (total - ok) as f64 <= MAX_ERROR_RATE * total as f64 + 1e-9
            && p99 <= MAX_P99_MS * 1000.0
            && achieved >= MIN_ACHIEVED * rate as f64,
    }
}

// ---------------------------------------------------------------------------------------------
// LiteLLM

struct LiteLlm {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        // SIGTERM first so uvicorn's workers go too, then SIGKILL.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs LiteLLM in `target/litellm-venv` if needed; the `litellm` executable.
fn litellm_install() -> Result<PathBuf, String> {
    let venv = Path::new(REPO).join("target/litellm-venv");
    let exe = venv.join("bin/litellm");
    if exe.exists() {
        return Ok(exe);
    }
    eprintln!("installing {LITELLM_SPEC} into {} …", venv.display());
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", LITELLM_SPEC])
            .status()
            .is_ok_and(|s| s.success());
    if ok && exe.exists() {
        Ok(exe)
    } else {
        Err(format!("`pip install '{LITELLM_SPEC}'` failed"))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Starts LiteLLM's proxy, one worker, with model `demo` = the demo site's OpenAI-like API.
/// The site's session travels as LiteLLM's `api_key` (the bearer), `extra_headers` (cookie
/// and CSRF) and `extra_body` (the conversation id).
async fn litellm_start(session: &DirectSession) -> Result<LiteLlm, String> {
    let exe = litellm_install()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port();
    let config = format!(
        "model_list:\n  - model_name: demo\n    litellm_params:\n      model: openai/demo\n      \
         api_base: http://{addr}/api/openai/v1\n      api_key: {token}\n      \
         extra_headers: {{\"cookie\": {cookie}, \"x-csrf-token\": {csrf}}}\n      \
         extra_body: {{\"conversation_id\": {conversation}}}\n\
         general_settings:\n  master_key: {LITELLM_KEY}\n\
         litellm_settings:\n  telemetry: false\n  set_verbose: false\n",
        addr = session.addr,
        token = session.token,
        cookie = json!(session.cookie),
        csrf = json!(session.csrf),
        conversation = json!(session.conversation),
    );
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.path().join("litellm.log")).map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .arg("--config")
        .arg(&path)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--num_workers", "1"])
        .env("LITELLM_MASTER_KEY", LITELLM_KEY)
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOG", "ERROR")
        .env("NO_DOCS", "True")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let litellm = LiteLlm {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _dir: dir,
    };
    let probe = proxy_request(
        litellm.addr,
        "demo",
        false,
        &[("authorization", &format!("Bearer {LITELLM_KEY}"))],
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if let Ok(mut conn) = Conn::connect(litellm.addr).await
            && let Ok(Ok((status, body, _))) =
                tokio::time::timeout(Duration::from_secs(20), conn.call(&probe)).await
        {
            if status == 200 {
                return Ok(litellm);
            }
            let log = read(&litellm._dir.path().join("litellm.log").to_string_lossy());
            return Err(format!(
                "LiteLLM answered {status}: {}\n{}",
                String::from_utf8_lossy(&body),
                log.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("LiteLLM did not come up within 120 s".into())
}

// ---------------------------------------------------------------------------------------------
// 3. Memory: many open streams

/// Opens `n` streams through the proxy and waits for each one's first token; returns the
/// connections (kept open) and how many got a token.
async fn open_streams(addr: SocketAddr, model: &str, n: usize) -> (Vec<Conn>, usize) {
    let request = Arc::new(proxy_request(addr, model, true, &[]));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            // A gentle ramp: 100 new streams every 50 ms.
            tokio::time::sleep(Duration::from_millis((i / 100) as u64 * 50)).await;
            let run = async {
                let mut conn = Conn::connect(addr).await?;
                conn.stream.write_all(&request).await?;
                let head = conn.head().await?;
                // The 200 goes out after the site's first token; wait for that token's bytes.
                let t0 = Instant::now();
                while conn.buf.len() == conn.pos && t0.elapsed() < Duration::from_secs(30) {
                    conn.fill().await?;
                }
                Ok::<_, std::io::Error>((head.status, conn))
            };
            match tokio::time::timeout(Duration::from_secs(60), run).await {
                Ok(Ok((200, conn))) => Some(conn),
                _ => None,
            }
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for task in tasks {
        if let Ok(Some(conn)) = task.await {
            conns.push(conn);
        }
    }
    let open = conns.len();
    (conns, open)
}

// ---------------------------------------------------------------------------------------------
// 5. Learning

fn learn_timings(json: &Value) -> String {
    let t = json.get("timings").cloned().unwrap_or(Value::Null);
    let secs = |k: &str| t.get(k).and_then(Value::as_f64).map(|v| v / 1000.0);
    let mut parts = Vec::new();
    if let Some(v) = secs("login_ms") {
        parts.push(format!("login {v:.2} s"));
    }
    if let Some(v) = secs("probe_ms") {
        parts.push(format!("probe {v:.2} s"));
    }
    if let Some(v) = t.get("infer_ms").and_then(Value::as_u64) {
        parts.push(format!("infer {v} ms"));
    }
    if let Some(v) = t.get("verify_ms").and_then(Value::as_u64) {
        parts.push(format!("verify {v} ms"));
    }
    parts.join(", ")
}

async fn learn_phase(site: &str, report: &mut Report) -> Result<(), String> {
    let chrome = std::env::var("COMPUTETOWER_CHROME").unwrap_or("/usr/bin/chromium".into());
    if !Path::new(&chrome).exists() {
        return Err(format!("no browser at {chrome}"));
    }
    let data = Data::new();
    let svc = "learnbench";
    data.add_account(site, svc, "learner@example.com", true, false)
        .await?;
    // Cold: a new process launches Chromium, logs in (the stored cookies are from the JSON
    // login, so it may reuse them), probes, infers, verifies.
    let started = Instant::now();
    let out = data.cli(&["learn", svc, "--json"], None)?;
    let cold = started.elapsed().as_secs_f64();
    let cold_json: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    report.learn.push((
        "cold: `computetower learn` (new process, Chromium launch)".into(),
        cold,
        learn_timings(&cold_json),
        cold_json.get("verified").and_then(Value::as_bool),
    ));
    let list: Value =
        serde_json::from_str(&data.cli(&["account", "list", "--json"], None)?).unwrap_or_default();
    let accounts = list
        .get("data")
        .or(list.get("accounts"))
        .unwrap_or(&list)
        .as_array()
        .cloned()
        .unwrap_or_default();
    let id = accounts
        .first()
        .and_then(|a| a.get("id"))
        .map(|v| v.as_str().map(str::to_owned).unwrap_or(v.to_string()))
        .ok_or("no account id in `account list --json`")?;
    let server = data.serve()?;
    let learn = http_request(
        "POST",
        server.addr(),
        &format!("/admin/accounts/{id}/learn"),
        &[("content-type", "application/json")],
        "{}",
    );
    for label in [
        "server, first `POST /admin/accounts/{id}/learn` (launches Chromium)",
        "warm: server, second `POST …/learn` (browser running)",
    ] {
        let mut conn = Conn::connect(server.addr())
            .await
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let (status, body, _) = tokio::time::timeout(Duration::from_secs(180), conn.call(&learn))
            .await
            .map_err(|_| "learn timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let secs = started.elapsed().as_secs_f64();
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != 200 {
            return Err(format!("learn answered {status}: {json}"));
        }
        let verified = json
            .get("verified")
            .or(json.pointer("/verification/ok"))
            .and_then(Value::as_bool);
        report
            .learn
            .push((label.into(), secs, learn_timings(&json), verified));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Default)]
struct Report {
    notes: Vec<String>,
    /// (streams, per-target stats)
    latency: Vec<(usize, Vec<StreamStats>)>,
    /// target name → steps
    throughput: Vec<(String, Vec<Step>)>,
    memory: Vec<(String, u64, u64)>,
    bytes_per_stream: Option<(f64, usize)>,
    /// Per site: (model, token delay in ms, the tiers' figures).
    tiers: Vec<(&'static str, u64, Vec<TierStats>)>,
    accounts: Vec<AccountsRow>,
    learn: Vec<(String, f64, String, Option<bool>)>,
}

impl Report {
    fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    fn markdown(&self, machine: &Value, opts: &Opts, load: (&str, &str), wall: f64) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Machine: {} cores ({}), {} GiB, Linux {}, {}. Load average {} at the start, {} at the end. \
             Mode: {}; {:.0} s in all.\n",
            machine["cores"],
            machine["cpu"].as_str().unwrap_or("?"),
            machine["memory_gib"],
            machine["kernel"].as_str().unwrap_or("?"),
            machine["rustc"].as_str().unwrap_or("?"),
            load.0,
            load.1,
            if opts.quick { "quick" } else { "full" },
            wall
        );
        if !self.latency.is_empty() {
            let _ = writeln!(
                md,
                "**Added latency** (streaming, {TOKEN_DELAY_MS} ms per token on the site; the \
                 streams are interleaved over the three targets; ms):\n"
            );
            md.push_str("| streams | target | n (err) | TTFT p50 | TTFT p95 | TTFT p99 | gap p50 | gap p99 | gap mean |\n");
            md.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
            for (streams, stats) in &self.latency {
                for (name, s) in STREAM_TARGETS.iter().zip(stats) {
                    let _ = writeln!(
                        md,
                        "| {streams} | {name} | {} ({}) | {} | {} | {} | {} | {} | {} |",
                        s.n,
                        s.errors,
                        ms(percentile(&s.ttft, 50.0)),
                        ms(percentile(&s.ttft, 95.0)),
                        ms(percentile(&s.ttft, 99.0)),
                        ms(percentile(&s.gaps, 50.0)),
                        ms(percentile(&s.gaps, 99.0)),
                        ms(mean(&s.gaps)),
                    );
                }
                let d = |i: usize, f: &dyn Fn(&StreamStats) -> f64| f(&stats[2]) - f(&stats[i]);
                for (i, label) in [
                    (0, "**added** vs direct"),
                    (1, "added vs direct + preflights"),
                ] {
                    let _ = writeln!(
                        md,
                        "| {streams} | {label} | | {} | {} | {} | {} | {} | {} |",
                        signed_ms(d(i, &|s| percentile(&s.ttft, 50.0))),
                        signed_ms(d(i, &|s| percentile(&s.ttft, 95.0))),
                        signed_ms(d(i, &|s| percentile(&s.ttft, 99.0))),
                        signed_ms(d(i, &|s| percentile(&s.gaps, 50.0))),
                        signed_ms(d(i, &|s| percentile(&s.gaps, 99.0))),
                        signed_ms(d(i, &|s| mean(&s.gaps))),
                    );
                }
            }
            md.push('\n');
        }
        if !self.throughput.is_empty() {
            let _ = writeln!(
                md,
                "**Throughput** (non-streaming, open loop, {} s per rate, site at 0 ms per token; \
                 sustained = errors ≤ 1 %, p99 ≤ {MAX_P99_MS} ms, ≥ 95 % of the offered rate done; \
                 CPU/req is the proxy's own CPU time — the site's for `direct` — and req/s per \
                 core is its inverse):\n",
                opts.step_secs()
            );
            md.push_str("| target | max sustained req/s | p50 ms | p99 ms | CPU µs/req | req/s per core | first failing rate |\n");
            md.push_str("| --- | ---: | ---: | ---: | ---: | ---: | --- |\n");
            for (name, steps) in &self.throughput {
                let best = steps.iter().filter(|s| s.sustained).max_by_key(|s| s.rate);
                let fail = steps.iter().find(|s| !s.sustained).map(|s| {
                    format!(
                        "{}/s: {:.0} done/s, {:.1} % err, p99 {} ms",
                        s.rate,
                        s.achieved,
                        s.error_rate * 100.0,
                        ms(s.p99_us)
                    )
                });
                // CPU per request is steadiest at the highest sustained rate.
                let (cpu, per_core) = best
                    .map(|s| {
                        (
                            format!("{:.0}", s.cpu_us_per_req),
                            format!("{:.0}", 1e6 / s.cpu_us_per_req),
                        )
                    })
                    .unwrap_or(("–".into(), "–".into()));
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {} | {cpu} | {per_core} | {} |",
                    best.map(|s| s.rate.to_string()).unwrap_or("none".into()),
                    best.map(|s| ms(s.p50_us)).unwrap_or("–".into()),
                    best.map(|s| ms(s.p99_us)).unwrap_or("–".into()),
                    fail.unwrap_or("none (ladder ended)".into()),
                );
            }
            md.push_str("\nPer rate (p50 / p99 ms, errors), interleaved by rate:\n\n| rate/s |");
            for (name, _) in &self.throughput {
                let _ = write!(md, " {name} |");
            }
            md.push_str("\n| ---: |");
            for _ in &self.throughput {
                md.push_str(" --- |");
            }
            md.push('\n');
            for rate in &rates() {
                if !self
                    .throughput
                    .iter()
                    .any(|(_, s)| s.iter().any(|s| s.rate == *rate))
                {
                    continue;
                }
                let _ = write!(md, "| {rate} |");
                for (_, steps) in &self.throughput {
                    match steps.iter().find(|s| s.rate == *rate) {
                        Some(s) => {
                            let _ = write!(
                                md,
                                " {} / {}, {:.1} %{} |",
                                ms(s.p50_us),
                                ms(s.p99_us),
                                s.error_rate * 100.0,
                                if s.sustained { "" } else { " ✗" }
                            );
                        }
                        None => md.push_str(" |"),
                    }
                }
                md.push('\n');
            }
            if let Some((_, steps)) = self.throughput.first()
                && let Some(s) = steps.iter().filter(|s| s.sustained).max_by_key(|s| s.rate)
            {
                let _ = writeln!(
                    md,
                    "\nThe harness's own client used {:.0} µs of CPU per direct request at {}/s.",
                    s.client_cpu_us_per_req, s.rate
                );
            }
            md.push('\n');
        }
        if !self.memory.is_empty() {
            md.push_str("**Memory** of the `serve` process (no Chromium running):\n\n| state | RSS MiB | PSS MiB |\n| --- | ---: | ---: |\n");
            for (label, rss, pss) in &self.memory {
                let _ = writeln!(md, "| {label} | {} | {} |", mib(*rss), mib(*pss));
            }
            if let Some((bytes, open)) = self.bytes_per_stream {
                let _ = writeln!(
                    md,
                    "\nPer open stream: {:.1} KiB of RSS ({open} streams open).",
                    bytes / 1024.0
                );
            }
            md.push('\n');
        }
        for (model, delay_ms, tiers) in &self.tiers {
            tiers_markdown(&mut md, model, *delay_ms, tiers);
        }
        if !self.accounts.is_empty() {
            accounts_markdown(&mut md, &self.accounts);
        }
        if !self.learn.is_empty() {
            md.push_str("**Learning** (demo site, openai shape, 20 ms per token, release build):\n\n| run | wall s | steps | verified |\n| --- | ---: | --- | --- |\n");
            for (label, secs, steps, verified) in &self.learn {
                let v = verified.map(|v| v.to_string()).unwrap_or("?".into());
                let _ = writeln!(md, "| {label} | {secs:.2} | {steps} | {v} |");
            }
            md.push('\n');
        }
        if !self.notes.is_empty() {
            md.push_str("Notes:\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        md
    }

    fn json(&self) -> Value {
        let stream_json = |s: &StreamStats| {
            json!({
                "n": s.n, "errors": s.errors, "tokens": s.tokens,
                "ttft_us": {"p50": percentile(&s.ttft, 50.0), "p95": percentile(&s.ttft, 95.0), "p99": percentile(&s.ttft, 99.0)},
                "total_us": {"p50": percentile(&s.total, 50.0), "p99": percentile(&s.total, 99.0)},
                "gap_us": {"p50": percentile(&s.gaps, 50.0), "p99": percentile(&s.gaps, 99.0), "mean": mean(&s.gaps)},
            })
        };
        json!({
            "notes": self.notes,
            "latency": self.latency.iter().map(|(streams, stats)| json!({
                "streams": streams,
                "targets": STREAM_TARGETS.iter().zip(stats).map(|(n, s)| (n.to_string(), stream_json(s))).collect::<BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "throughput": self.throughput.iter().map(|(name, steps)| json!({
                "target": name,
                "steps": steps.iter().map(|s| json!({
                    "rate": s.rate, "sent": s.sent, "ok": s.ok, "error_rate": s.error_rate,
                    "achieved": s.achieved, "p50_us": s.p50_us, "p90_us": s.p90_us,
                    "p99_us": s.p99_us, "cpu_us_per_req": s.cpu_us_per_req,
                    "client_cpu_us_per_req": s.client_cpu_us_per_req, "sustained": s.sustained,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "memory_kib": self.memory.iter().map(|(l, rss, pss)| json!({"state": l, "rss": rss, "pss": pss})).collect::<Vec<_>>(),
            "bytes_per_stream": self.bytes_per_stream.map(|b| b.0),
            "tiers": self.tiers.iter().map(|(model, delay_ms, tiers)| json!({
                "model": model, "token_delay_ms": delay_ms,
                "tiers": tiers.iter().map(|t| json!({
                    "tier": t.tier, "n": t.ttft.len(), "errors": t.errors, "wrong_tier": t.wrong_tier,
                    "first": t.first.map(|(ttft, total)| json!({"ttft_us": ttft, "total_us": total})),
                    "ttft_us": {"p50": percentile(&t.ttft, 50.0), "p95": percentile(&t.ttft, 95.0)},
                    "total_us": {"p50": percentile(&t.total, 50.0), "p95": percentile(&t.total, 95.0)},
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "accounts": self.accounts.iter().map(|a| json!({
                "accounts": a.accounts, "state": a.state.label(), "chromium_processes": a.processes,
                "chromium_rss_kib": a.chromium_rss, "chromium_pss_kib": a.chromium_pss,
                "serve_rss_kib": a.serve_rss, "serve_pss_kib": a.serve_pss,
            })).collect::<Vec<_>>(),
            "idle_per_account_pss_kib": idle_per_account_kib(&self.accounts),
            "extra_per_account_pss_kib": per_account_kib(&self.accounts)
                .map(|(whole, context, page)| json!({"whole": whole, "context": context, "page": page})),
            "learn": self.learn.iter().map(|(l, s, steps, v)| json!({"run": l, "secs": s, "steps": steps, "verified": v})).collect::<Vec<_>>(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Main

fn main() {
    let opts = Opts::parse();
    let nofile = raise_nofile();
    computetower::server::install_tls_provider();
    let threads = std::env::var("CT_BENCH_CLIENT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let machine = machine();
    let load_start = loadavg();
    eprintln!(
        "load harness ({} mode), open-file limit {nofile}, binary {BIN}",
        if opts.quick { "quick" } else { "full" }
    );
    let mut report = Report::default();
    if let Err(e) = runtime.block_on(run(&opts, &mut report)) {
        report.note(format!("aborted: {e}"));
    }
    let load_end = loadavg();
    let md = report.markdown(
        &machine,
        &opts,
        (&load_start, &load_end),
        started.elapsed().as_secs_f64(),
    );
    println!("\n{md}");
    let dir = Path::new(REPO).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("results.md"), &md);
    let json = json!({
        "machine": machine,
        "quick": opts.quick,
        "load_average": {"start": load_start, "end": load_end},
        "results": report.json(),
    });
    let _ = std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    eprintln!("wrote {}/results.md and results.json", dir.display());
    runtime.shutdown_timeout(Duration::from_secs(2));
}

async fn run(opts: &Opts, report: &mut Report) -> Result<(), String> {
    let site = demo_site(TOKEN_DELAY_MS)?;
    let fast = demo_site(0)?;
    let slow = demo_site(SLOW_TOKEN_DELAY_MS)?;
    let data = Data::new();
    data.add_account(&site.url, "demo-openai", "bench@example.com", false, true)
        .await?;
    data.add_account(&fast.url, "fast", "bench@example.com", false, true)
        .await?;
    data.add_account(&slow.url, "slow", "bench@example.com", false, true)
        .await?;
    let server = data.serve()?;
    let pid = server.pid();
    report.note(
        "`serve` runs with COMPUTETOWER_PER_ACCOUNT_CONCURRENCY and _QUEUE at 100000 (defaults \
         4 and 64): all load goes to one account per service, and the account policy would \
         otherwise queue and refuse it",
    );
    eprintln!(
        "serve pid {pid} at {}; demo sites pids {} (20 ms) {} (0 ms) {} (1 s)",
        server.url,
        site.pid(),
        fast.pid(),
        slow.pid()
    );
    // A moment to settle, then the idle footprint before any request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, pss) = memory_kib(pid);
    report.memory.push(("idle, after start".into(), rss, pss));

    // Check all three services answer before measuring anything.
    for model in ["demo-openai", "fast", "slow"] {
        let mut conn = Conn::connect(server.addr())
            .await
            .map_err(|e| e.to_string())?;
        let stream = model == "slow";
        let request = proxy_request(server.addr(), model, stream, &[]);
        conn.stream
            .write_all(&request)
            .await
            .map_err(|e| e.to_string())?;
        let head = tokio::time::timeout(Duration::from_secs(30), conn.head())
            .await
            .map_err(|_| format!("{model}: no answer"))?
            .map_err(|e| e.to_string())?;
        if head.status != 200 {
            return Err(format!(
                "{model}: ComputeTower answered {}; server log:\n{}",
                head.status,
                server.stderr_tail()
            ));
        }
    }

    if opts.wants("latency") {
        let direct = DirectSession::login(&site.url, "direct@example.com").await?;
        let targets = Arc::new(vec![
            (
                StreamTarget::Direct {
                    request: direct.chat_request(&direct.csrf, &direct.conversation, true),
                },
                direct.addr,
            ),
            (
                StreamTarget::DirectWithPreflights {
                    session: direct.clone(),
                },
                direct.addr,
            ),
            (
                StreamTarget::Proxy {
                    request: proxy_request(server.addr(), "demo-openai", true, &[]),
                },
                server.addr(),
            ),
        ]);
        for streams in [1usize, 50, 200] {
            let secs = opts.latency_secs(streams);
            eprintln!("latency: {streams} concurrent streams for {secs} s …");
            let stats = latency_level(streams, secs, targets.clone()).await;
            for (name, s) in STREAM_TARGETS.iter().zip(&stats) {
                eprintln!(
                    "  {name}: n {} err {} TTFT p50 {} p99 {} ms, gap p99 {} ms",
                    s.n,
                    s.errors,
                    ms(percentile(&s.ttft, 50.0)),
                    ms(percentile(&s.ttft, 99.0)),
                    ms(percentile(&s.gaps, 99.0))
                );
            }
            report.latency.push((streams, stats));
        }
        if report
            .latency
            .first()
            .is_some_and(|(_, s)| s[2].ttft.len() < 20)
        {
            report.note(
                "at 1 stream there are few TTFT samples per target (each stream lasts the whole \
                 reply); p95/p99 there are close to the maximum",
            );
        }
    }

    if opts.wants("throughput") {
        let direct = DirectSession::login(&fast.url, "direct@example.com").await?;
        let mut targets = vec![
            ThroughputTarget {
                name: "direct",
                pool: Pool::new(direct.addr),
                request: Arc::new(direct.chat_request(&direct.csrf, &direct.conversation, false)),
                pid: fast.pid(),
                tree: false,
            },
            ThroughputTarget {
                name: "ComputeTower (tier 1)",
                pool: Pool::new(server.addr()),
                request: Arc::new(proxy_request(server.addr(), "fast", false, &[])),
                pid,
                tree: false,
            },
        ];
        let litellm = if opts.litellm {
            match litellm_start(&direct).await {
                Ok(l) => Some(l),
                Err(e) => {
                    report.note(format!("LiteLLM skipped: {e}"));
                    None
                }
            }
        } else {
            report.note("LiteLLM skipped (--no-litellm)");
            None
        };
        if let Some(l) = &litellm {
            targets.push(ThroughputTarget {
                name: "LiteLLM proxy (1 worker)",
                pool: Pool::new(l.addr),
                request: Arc::new(proxy_request(
                    l.addr,
                    "demo",
                    false,
                    &[("authorization", &format!("Bearer {LITELLM_KEY}"))],
                )),
                pid: l.child.id(),
                tree: true,
            });
        }
        // Warm-up: sequential requests (LiteLLM's first ones are slow: imports, caches).
        for t in &targets {
            for _ in 0..100 {
                let _ = t.pool.request(&t.request, Duration::from_secs(10)).await;
            }
        }
        let mut steps: Vec<Vec<Step>> = targets.iter().map(|_| Vec::new()).collect();
        let mut live: Vec<bool> = targets.iter().map(|_| true).collect();
        for rate in rates() {
            for (i, t) in targets.iter().enumerate() {
                if !live[i] {
                    continue;
                }
                let step = open_loop(t, rate, opts.step_secs()).await;
                eprintln!(
                    "throughput: {} at {rate}/s: {:.0} done/s, err {:.1} %, p50 {} p99 {} ms, cpu {:.0} µs/req{}",
                    t.name,
                    step.achieved,
                    step.error_rate * 100.0,
                    ms(step.p50_us),
                    ms(step.p99_us),
                    step.cpu_us_per_req,
                    if step.sustained { "" } else { "  ✗" }
                );
                live[i] = step.sustained;
                steps[i].push(step);
                // Let connections and queues drain between steps.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if !live.iter().any(|l| *l) {
                break;
            }
        }
        for (t, s) in targets.iter().zip(steps) {
            report.throughput.push((t.name.to_owned(), s));
        }
        drop(litellm);
    }

    if opts.wants("memory") {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let load_ended = Instant::now();
        let (rss, pss) = memory_kib(pid);
        report
            .memory
            .push(("the load phases' `serve`, idle after them".into(), rss, pss));
        // A fresh `serve` (same data dir) for the per-stream cost: after the throughput
        // phase the allocator holds freed memory that new streams would reuse unseen.
        let fresh = data.serve()?;
        let fresh_pid = fresh.pid();
        // Warm-up: lazy state (token counter, connection pools) is not a per-stream cost.
        let (warm, _) = open_streams(fresh.addr(), "slow", 20).await;
        drop(warm);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss0, pss0) = memory_kib(fresh_pid);
        report
            .memory
            .push(("fresh `serve`, after 20 warm-up streams".into(), rss0, pss0));
        let n = 1000;
        eprintln!("memory: opening {n} streams …");
        let (conns, open) = open_streams(fresh.addr(), "slow", n).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss1, pss1) = memory_kib(fresh_pid);
        report
            .memory
            .push((format!("fresh `serve`, {open} open streams"), rss1, pss1));
        if open > 0 {
            report.bytes_per_stream = Some((
                (rss1.saturating_sub(rss0)) as f64 * 1024.0 / open as f64,
                open,
            ));
        }
        if open < n {
            report.note(format!("memory: only {open} of {n} streams opened"));
        }
        drop(conns);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss2, pss2) = memory_kib(fresh_pid);
        report
            .memory
            .push(("fresh `serve`, 2 s after closing them".into(), rss2, pss2));
        drop(fresh);
        // The target: back within 20 % of the idle figure a minute after an overload ends
        // (the allocator's free memory handed back by `memory.rs`'s trimmer).
        tokio::time::sleep(Duration::from_secs(60).saturating_sub(load_ended.elapsed())).await;
        let (rss, pss) = memory_kib(pid);
        report
            .memory
            .push(("the load phases' `serve`, 60 s after them".into(), rss, pss));
    }

    if opts.wants("tiers") {
        tiers_phase(server.addr(), opts, report).await;
    }

    if opts.wants("accounts") {
        eprintln!("accounts: logging in 1 to {ACCOUNTS} accounts …");
        if let Err(e) = accounts_phase(&fast.url, report).await {
            report.note(format!("accounts skipped or failed: {e}"));
        }
    }

    if opts.wants("learn") {
        eprintln!("learning: cold and warm …");
        if let Err(e) = learn_phase(&site.url, report).await {
            report.note(format!("learning skipped or failed: {e}"));
        }
    }
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Tiers and accounts: the browser tiers, and what each account costs in Chromium.

/// The tiers `GET /health` says the server supports (`{"tiers": [1, 2, 3]}`); tier 1 only
/// when it says nothing.
async fn server_tiers(addr: SocketAddr) -> Vec<u64> {
    let request = http_request("GET", addr, "/health", &[], "");
    let Ok(mut conn) = Conn::connect(addr).await else {
        return vec![1];
    };
    let Ok((_, body, _)) = conn.call(&request).await else {
        return vec![1];
    };
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("tiers")?.as_array().cloned())
        .map(|tiers| tiers.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_else(|| vec![1])
}

/// One tier's forced streams.
#[derive(Default)]
struct TierStats {
    tier: u64,
    /// The tier's first request, kept out of the percentiles: for tiers 2 and 3 it opens the
    /// account's page (tier 2's also launches Chromium).
    first: Option<(f64, f64)>,
    ttft: Vec<f64>,
    total: Vec<f64>,
    errors: usize,
    /// Answers that named another tier (counted in `errors` too).
    wrong_tier: usize,
}

impl TierStats {
    fn add(&mut self, sample: StreamSample, first: bool) {
        if sample.tier.is_some_and(|t| u64::from(t) != self.tier) {
            self.wrong_tier += 1;
            self.errors += 1;
        } else if !sample.ok {
            self.errors += 1;
        } else if first {
            self.first = Some((sample.ttft_us, sample.total_us));
        } else {
            self.ttft.push(sample.ttft_us);
            self.total.push(sample.total_us);
        }
    }
}

async fn tiers_phase(addr: SocketAddr, opts: &Opts, report: &mut Report) {
    let tiers = server_tiers(addr).await;
    if !tiers.iter().any(|t| *t == 2 || *t == 3) {
        report.note(
            "tiers 2/3 skipped: the server reports no tier 2/3 support (`GET /health` has no \
             `tiers` listing 2 or 3); tier 1 is in the latency table",
        );
        return;
    }
    // The latency phase's site (its own think time is in every tier's TTFT alike), then the
    // 0 ms site, where the TTFT is what each tier itself adds.
    for (model, delay_ms) in [("demo-openai", TOKEN_DELAY_MS), ("fast", 0)] {
        // A reply on the 20 ms site lasts ~3 s: fewer rounds there keep quick mode quick.
        let rounds = match (opts.quick, delay_ms) {
            (true, 0) => 5,
            (true, _) => 3,
            (false, _) => 20,
        };
        let stats = tiers_on(addr, model, &tiers, rounds).await;
        report.tiers.push((model, delay_ms, stats));
    }
}

/// One stream at a time on `model`, forced by TIER_HEADER; interleaved over the tiers per
/// request so machine noise hits them alike.
async fn tiers_on(addr: SocketAddr, model: &str, tiers: &[u64], rounds: usize) -> Vec<TierStats> {
    let targets: Vec<StreamTarget> = tiers
        .iter()
        .map(|tier| StreamTarget::Proxy {
            request: proxy_request(addr, model, true, &[(TIER_HEADER, &tier.to_string())]),
        })
        .collect();
    let mut conns: Vec<Option<Conn>> = tiers.iter().map(|_| None).collect();
    let mut stats: Vec<TierStats> = tiers
        .iter()
        .map(|&tier| TierStats {
            tier,
            ..TierStats::default()
        })
        .collect();
    eprintln!(
        "tiers on {model}: {tiers:?}, a first request each, then {rounds} interleaved rounds …"
    );
    for round in 0..=rounds {
        for (i, target) in targets.iter().enumerate() {
            let sample = one_stream(target, &mut conns[i], addr).await;
            stats[i].add(sample, round == 0);
        }
    }
    for s in &mut stats {
        s.ttft = sorted(std::mem::take(&mut s.ttft));
        s.total = sorted(std::mem::take(&mut s.total));
        eprintln!(
            "  tier {}: n {} err {} TTFT p50 {} ms, total p50 {} ms",
            s.tier,
            s.ttft.len(),
            s.errors,
            ms(percentile(&s.ttft, 50.0)),
            ms(percentile(&s.total, 50.0))
        );
    }
    stats
}

fn tiers_markdown(md: &mut String, model: &str, delay_ms: u64, tiers: &[TierStats]) {
    let _ = writeln!(
        md,
        "**Tiers, site at {delay_ms} ms per token** (model `{model}`, forced with \
         `{TIER_HEADER}`, openai shape; one stream at a time, interleaved over the tiers; ms). \
         The first request of each tier is apart: for tiers 2 and 3 it opens the account's \
         page (on the first site, tier 2's also launches Chromium).\n"
    );
    md.push_str("| tier | first: TTFT | first: total | n (err) | TTFT p50 | TTFT p95 | total p50 | total p95 |\n");
    md.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for t in tiers {
        let (first_ttft, first_total) = t.first.unwrap_or((f64::NAN, f64::NAN));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {} |",
            t.tier,
            ms(first_ttft),
            ms(first_total),
            t.ttft.len(),
            t.errors,
            ms(percentile(&t.ttft, 50.0)),
            ms(percentile(&t.ttft, 95.0)),
            ms(percentile(&t.total, 50.0)),
            ms(percentile(&t.total, 95.0)),
        );
    }
    let p50 = |tier: u64| {
        tiers
            .iter()
            .find(|t| t.tier == tier)
            .map(|t| percentile(&t.ttft, 50.0))
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    if let (Some(one), Some(three)) = (p50(1), p50(3)) {
        let _ = writeln!(
            md,
            "\nTier 1's TTFT p50 is {:.1}× lower than tier 3's here (target ≥ 50×).",
            three / one
        );
    }
    if let Some(t) = tiers.iter().find(|t| t.wrong_tier > 0) {
        let _ = writeln!(
            md,
            "\nTier {}: {} answers named another tier.",
            t.tier, t.wrong_tier
        );
    }
    md.push('\n');
}

/// Accounts logged in, one after another, in the accounts phase.
const ACCOUNTS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum AccountState {
    /// Chromium not started yet.
    None,
    /// Logged in: the account's browser context is kept, the login page closed.
    LoggedIn,
    /// After one tier-2 request: the account's work page stays open for the next one.
    Serving,
    /// The work pages closed by the idle timeout: only the contexts stay.
    PagesClosed,
}

impl AccountState {
    fn label(self) -> &'static str {
        match self {
            AccountState::None => "no account logged in (no Chromium)",
            AccountState::LoggedIn => "logged in (context kept, login page closed)",
            AccountState::Serving => "after a tier-2 request (its page kept open)",
            AccountState::PagesClosed => "every page idle past `page_idle_secs` (closed)",
        }
    }
}

struct AccountsRow {
    accounts: usize,
    state: AccountState,
    processes: usize,
    chromium_rss: u64,
    chromium_pss: u64,
    serve_rss: u64,
    serve_pss: u64,
}

/// `pid`'s descendants (children, grandchildren …), from `/proc/*/stat`.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let text = read(&format!("/proc/{p}/stat"));
            let rest = &text[text.rfind(')')? + 2..];
            Some((p, rest.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect();
    let mut found = vec![pid];
    // Bounded: a tree is at most as deep as the process count.
    for _ in 0..parents.len() {
        let more: Vec<u32> = parents
            .iter()
            .filter(|(p, pp)| found.contains(pp) && !found.contains(p))
            .map(|(p, _)| *p)
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more);
    }
    found.remove(0);
    found
}

/// Process count, summed VmRSS and summed Pss (KiB) of the Chromium processes under `serve`.
/// Summed RSS counts shared pages once per process; PSS splits them, so it adds up.
fn chromium_tree_kib(serve: u32) -> (usize, u64, u64) {
    let mut total = (0, 0, 0);
    for pid in descendants(serve) {
        let cmdline = read(&format!("/proc/{pid}/cmdline"));
        if !cmdline.contains("chrom") {
            continue;
        }
        let (rss, pss) = memory_kib(pid);
        total.0 += 1;
        total.1 += rss;
        total.2 += pss;
    }
    total
}

/// PSS (KiB, Chromium's tree plus `serve`) of each step, by account count and state.
fn total_pss(rows: &[AccountsRow], accounts: usize, state: AccountState) -> Option<f64> {
    rows.iter()
        .find(|r| r.accounts == accounts && r.state == state)
        .map(|r| (r.chromium_pss + r.serve_pss) as f64)
}

/// Average PSS (KiB) an account adds from the second on: `(whole, context, page)`. Whole:
/// from one serving account to the next; context: its login, after the previous account's
/// page was open; page: its first tier-2 request. The first account also pays for Chromium.
fn per_account_kib(rows: &[AccountsRow]) -> Option<(f64, f64, f64)> {
    use AccountState::{LoggedIn, Serving};
    let avg = |f: &dyn Fn(usize) -> Option<f64>| {
        let v: Vec<f64> = (2..=ACCOUNTS).filter_map(f).collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    Some((
        avg(&|n| Some(total_pss(rows, n, Serving)? - total_pss(rows, n - 1, Serving)?))?,
        avg(&|n| Some(total_pss(rows, n, LoggedIn)? - total_pss(rows, n - 1, Serving)?))?,
        avg(&|n| Some(total_pss(rows, n, Serving)? - total_pss(rows, n, LoggedIn)?))?,
    ))
}

/// One request to `serve`: status and JSON body.
async fn admin_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<Value, String> {
    let request = http_request(
        method,
        addr,
        path,
        &[("content-type", "application/json")],
        body,
    );
    let mut conn = Conn::connect(addr).await.map_err(|e| e.to_string())?;
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(120), conn.call(&request))
        .await
        .map_err(|_| format!("{method} {path} timed out"))?
        .map_err(|e| e.to_string())?;
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        return Err(format!("{method} {path} answered {status}: {json}"));
    }
    Ok(json)
}

/// A fresh `serve` logs in 1, then 2 … ACCOUNTS accounts of the demo site (each its own
/// service), and after each, serves one tier-2 request on it. After each step: the memory of
/// Chromium's process tree and of `serve`.
async fn accounts_phase(site: &str, report: &mut Report) -> Result<(), String> {
    let chrome = std::env::var("COMPUTETOWER_CHROME").unwrap_or("/usr/bin/chromium".into());
    if !Path::new(&chrome).exists() {
        return Err(format!("no browser at {chrome}"));
    }
    let data = Data::new();
    // Pages idle this long are closed, so the phase can show the steady state too; longer
    // than the login loop takes, so every account's page is still open when it is measured.
    let page_idle = Duration::from_secs(25);
    let server = data.serve_with(&[(
        "COMPUTETOWER_BROWSER_PAGE_IDLE_SECS",
        &page_idle.as_secs().to_string(),
    )])?;
    let (addr, pid) = (server.addr(), server.pid());
    let flow = std::fs::read_to_string(format!("{REPO}/flows/demo-openai.json"))
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    // Returns the number of Chromium processes.
    let mut measure = |accounts: usize, state: AccountState| {
        let (processes, chromium_rss, chromium_pss) = chromium_tree_kib(pid);
        let (serve_rss, serve_pss) = memory_kib(pid);
        eprintln!(
            "  {accounts} accounts, {}: {processes} Chromium processes, RSS {} MiB, PSS {} MiB; serve RSS {} MiB",
            state.label(),
            mib(chromium_rss),
            mib(chromium_pss),
            mib(serve_rss)
        );
        rows.push(AccountsRow {
            accounts,
            state,
            processes,
            chromium_rss,
            chromium_pss,
            serve_rss,
            serve_pss,
        });
        processes
    };
    measure(0, AccountState::None);
    let mut logged_in = 0;
    // Time for a page's memory to settle after it loaded (renderers keep allocating briefly).
    let settle = Duration::from_millis(750);
    for n in 1..=ACCOUNTS {
        let service = format!("account{n}");
        let account = json!({"url": site, "name": service,
            "email": format!("{service}@example.com"), "password": PASSWORD});
        let account = admin_call(addr, "POST", "/admin/accounts", &account.to_string()).await?;
        let id = account["id"]
            .as_str()
            .ok_or(format!("no account id in {account}"))?
            .to_owned();
        admin_call(
            addr,
            "POST",
            &format!("/admin/flows?service={service}"),
            &flow,
        )
        .await?;
        admin_call(addr, "POST", &format!("/admin/accounts/{id}/login"), "{}").await?;
        tokio::time::sleep(settle).await;
        let processes = measure(n, AccountState::LoggedIn);
        if n == 1 {
            // Contexts add no process: with every page closed, this many remain.
            logged_in = processes;
        }
        let target = StreamTarget::Proxy {
            request: proxy_request(addr, &service, true, &[(TIER_HEADER, "2")]),
        };
        let sample = one_stream(&target, &mut None, addr).await;
        if !sample.ok || sample.tier != Some(2) {
            return Err(format!(
                "{service}: the tier-2 request failed (tier {:?}); server log:\n{}",
                sample.tier,
                server.stderr_tail()
            ));
        }
        tokio::time::sleep(settle).await;
        measure(n, AccountState::Serving);
    }
    // The reaper closes each page once it has been idle for `page_idle`: wait for the
    // renderer processes to go (at most 60 s), then measure what the accounts keep.
    let deadline = Instant::now() + Duration::from_secs(60);
    while chromium_tree_kib(pid).0 > logged_in && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(settle).await;
    measure(ACCOUNTS, AccountState::PagesClosed);
    report.accounts = rows;
    Ok(())
}

fn accounts_markdown(md: &mut String, rows: &[AccountsRow]) {
    let _ = writeln!(
        md,
        "**Accounts** (a fresh `serve`; demo-site accounts logged in one after another with \
         `POST /admin/accounts/{{id}}/login`, then one tier-2 request each; Chromium is every \
         process under `serve` whose command line names it; MiB):\n"
    );
    md.push_str("| accounts | state | Chromium processes | Chromium RSS (sum) | Chromium PSS | serve RSS | serve PSS |\n");
    md.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.accounts,
            r.state.label(),
            r.processes,
            mib(r.chromium_rss),
            mib(r.chromium_pss),
            mib(r.serve_rss),
            mib(r.serve_pss),
        );
    }
    if let Some((whole, context, page)) = per_account_kib(rows) {
        let _ = writeln!(
            md,
            "\nExtra per account (PSS of Chromium's tree plus `serve`, averaged over accounts 2 \
             to {ACCOUNTS}): **{:.1} MiB** (target ≤ 50 MiB): {:.1} MiB for its logged-in \
             context, {:.1} MiB for the page a tier-2 request opens and keeps.",
            whole / 1024.0,
            context / 1024.0,
            page / 1024.0
        );
    }
    if let Some(idle) = idle_per_account_kib(rows) {
        let _ = writeln!(
            md,
            "\nOnce the pages are closed (`page_idle_secs`), each account past the first keeps \
             **{:.1} MiB** (PSS of accounts {ACCOUNTS} with closed pages minus 1 logged in, over \
             {}); a browser-tier request opens its page again.",
            idle / 1024.0,
            ACCOUNTS - 1
        );
    }
    md.push('\n');
}

/// Steady-state cost of an account: its context, its pages closed.
fn idle_per_account_kib(rows: &[AccountsRow]) -> Option<f64> {
    let closed = total_pss(rows, ACCOUNTS, AccountState::PagesClosed)?;
    let first = total_pss(rows, 1, AccountState::LoggedIn)?;
    Some((closed - first) / (ACCOUNTS - 1) as f64)
}
