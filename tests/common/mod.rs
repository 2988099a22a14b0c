//! Test harness: the real `computetower` binary and the demo site as child processes on port
//! 0, a temp data dir each, and the official `openai` SDK from a venv under `target/`.
#![allow(dead_code)]

pub mod postgres;
pub mod proxy;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_computetower");
pub const PASSWORD: &str = "demo-password";
/// A fixed master key, so a restarted server opens the same data.
pub const MASTER_KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const STARTUP: Duration = Duration::from_secs(30);

/// A child process that is killed when dropped; its stderr is kept for inspection.
pub struct Proc {
    pub child: Child,
    pub url: String,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd` and waits for a stdout line containing `marker` followed by a URL.
    fn start(mut cmd: Command, marker: &str) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let marker = marker.to_owned();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent
                    && line.contains(&marker)
                    && let Some(at) = line.find("http://")
                {
                    let _ = tx.send(line[at..].trim().to_owned());
                    sent = true;
                }
            }
        });
        let url = match rx.recv_timeout(STARTUP) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "process did not announce `{}` in time; stderr:\n{}",
                    "listening",
                    log.lock().unwrap()
                );
            }
        };
        Proc {
            child,
            url,
            stderr: log,
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) {
        unsafe_sigterm(self.child.id());
        let _ = self.child.wait();
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the demo site with `shape` and extra flags (token delay 1 ms unless given).
pub fn demo_site(shape: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["demo-site", "--bind", "127.0.0.1:0", "--shape", shape]);
    if !extra.contains(&"--token-delay-ms") {
        cmd.args(["--token-delay-ms", "1"]);
    }
    cmd.args(extra);
    Proc::start(cmd, "listening on")
}

/// A data dir with its own environment for the binary.
pub struct Data {
    pub dir: tempfile::TempDir,
    /// Set for every command run on this data dir (`COMPUTETOWER_DATABASE_URL`, say).
    env: Vec<(String, String)>,
}

impl Data {
    pub fn new() -> Data {
        Data {
            dir: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        }
    }

    /// A data dir inside `parent` (a small filesystem a test mounted, say).
    pub fn in_dir(parent: &Path) -> Data {
        Data {
            dir: tempfile::tempdir_in(parent).unwrap(),
            env: Vec::new(),
        }
    }

    /// A data dir whose store is the PostgreSQL database at `url` (see [`postgres`]).
    pub fn on_postgres(url: &str) -> Data {
        let mut data = Data::new();
        data.env
            .push(("COMPUTETOWER_DATABASE_URL".to_owned(), url.to_owned()));
        data
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("COMPUTETOWER_DATA", self.path())
            .env("COMPUTETOWER_MASTER_KEY", MASTER_KEY)
            .env_remove("COMPUTETOWER_CONFIG")
            .env_remove("COMPUTETOWER_DATABASE_URL")
            .env_remove("RUST_LOG")
            .current_dir(self.path());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The command for `args` with this data dir's environment, to run as a test likes.
    pub fn command_for(&self, args: &[&str]) -> Command {
        let mut cmd = self.command();
        cmd.args(args);
        cmd
    }

    /// Runs a CLI command to completion, with `stdin` as its input.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cli");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "`computetower {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Adds an account from URL + `email` + password only, and learns its flow with the CLI;
    /// returns what `learn` printed.
    pub fn learn_account(&self, site: &str, name: &str, email: &str) -> String {
        self.ok(
            &[
                "account",
                "add",
                "--url",
                site,
                "--name",
                name,
                "--email",
                email,
                "--password-stdin",
            ],
            Some(&format!("{PASSWORD}\n")),
        );
        self.ok(&["learn", name], None)
    }

    /// Starts `serve` on port 0 with `env` added.
    pub fn serve(&self, env: &[(&str, &str)]) -> Proc {
        self.serve_with(&["--bind", "127.0.0.1:0"], env)
    }

    /// Starts `serve` with `args` (global options before `serve` go in as `--config …` etc.
    /// through `env`) and `env`. The announced URL is made reachable: an unspecified address
    /// (`0.0.0.0`) becomes 127.0.0.1.
    pub fn serve_with(&self, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command();
        cmd.arg("serve").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::start(cmd, "listening on");
        proc.url = proc.url.replace("://0.0.0.0:", "://127.0.0.1:");
        proc
    }

    /// Adds an account for `site` logged in through the site's JSON login, imported as a
    /// Playwright storageState file, and installs the shape's hand-written flow. Returns the
    /// model name.
    pub async fn add_demo_account(&self, site: &str, shape: &str, email: &str) -> String {
        self.add_demo_account_with_secrets(site, shape, email)
            .await
            .0
    }

    /// As [`Data::add_demo_account`] but with imported cookies only: no password to log in
    /// again with.
    pub async fn add_demo_account_cookies_only(
        &self,
        site: &str,
        shape: &str,
        email: &str,
    ) -> String {
        self.import_demo_account(site, shape, email, false).await.0
    }

    /// As [`Data::add_demo_account`], also returning every secret involved (password, cookie
    /// values, the bearer token) for leak checks.
    pub async fn add_demo_account_with_secrets(
        &self,
        site: &str,
        shape: &str,
        email: &str,
    ) -> (String, Vec<String>) {
        self.import_demo_account(site, shape, email, true).await
    }

    async fn import_demo_account(
        &self,
        site: &str,
        shape: &str,
        email: &str,
        with_password: bool,
    ) -> (String, Vec<String>) {
        computetower::server::install_tls_provider();
        let login = computetower::demo::json_login(site, email, PASSWORD)
            .await
            .unwrap();
        let host = url::Url::parse(site)
            .unwrap()
            .host_str()
            .unwrap()
            .to_owned();
        let state = serde_json::json!({
            "cookies": login.cookies.iter().map(|(n, v)| serde_json::json!({
                "name": n, "value": v, "domain": host, "path": "/", "expires": -1,
                "httpOnly": true, "secure": false, "sameSite": "Lax"
            })).collect::<Vec<_>>(),
            "origins": [{
                "origin": site.trim_end_matches('/'),
                "localStorage": login.local_storage.iter().map(|(k, v)| serde_json::json!({"name": k, "value": v})).collect::<Vec<_>>()
            }]
        });
        let mut secrets = vec![PASSWORD.to_owned()];
        secrets.extend(login.cookies.iter().map(|(_, v)| v.clone()));
        secrets.extend(login.local_storage.iter().map(|(_, v)| v.clone()));
        let cookie_file = self.path().join(format!("{email}.state.json"));
        std::fs::write(&cookie_file, state.to_string()).unwrap();
        let service = format!("demo-{shape}");
        let mut args = vec![
            "account",
            "add",
            "--url",
            site,
            "--name",
            &service,
            "--cookies",
            cookie_file.to_str().unwrap(),
        ];
        if with_password {
            args.extend(["--email", email, "--password-stdin"]);
        }
        let out = self.ok(&args, Some(&format!("{PASSWORD}\n")));
        std::fs::remove_file(&cookie_file).unwrap();
        assert!(out.contains("added account"), "{out}");
        if self
            .ok(&["flows", "list", "--json"], None)
            .contains(&format!("\"service\": \"{service}\""))
        {
            return (service, secrets);
        }
        let flow = repo().join(format!("flows/demo-{shape}.json"));
        self.ok(&["flows", "import", flow.to_str().unwrap()], None);
        (service, secrets)
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter of the venv `setup.sh` makes (run once per test binary).
pub fn python() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let status = Command::new(repo().join("setup.sh"))
                .status()
                .expect("run setup.sh");
            assert!(status.success(), "setup.sh failed");
            repo().join("target/py-venv/bin/python")
        })
        .clone()
}

/// Runs the SDK client script; returns its JSON report.
pub fn sdk(args: Value) -> Value {
    let out = Command::new(python())
        .arg(repo().join("tests/clients/openai_chat.py"))
        .arg(args.to_string())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "SDK client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn http() -> reqwest::Client {
    computetower::server::install_tls_provider();
    // A hung request fails its test instead of the whole run.
    reqwest::Client::builder()
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap()
}

/// POSTs a chat completion body as raw bytes; returns status, headers and JSON body.
pub async fn post_chat(
    base: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut request = http()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text}"));
    (status, json)
}

/// Asserts `body` is an OpenAI error object and returns its message.
pub fn error_message(body: &Value) -> String {
    let error = &body["error"];
    assert!(error.is_object(), "not an OpenAI error body: {body}");
    for field in ["message", "type", "param", "code"] {
        assert!(
            error.get(field).is_some(),
            "error body lacks `{field}`: {body}"
        );
    }
    error["message"].as_str().unwrap().to_owned()
}

/// A chat completion body with one user message.
pub fn ask(model: &str, text: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string()
}

/// GETs a JSON document (admin endpoints, the demo site's controls).
pub async fn get_json(url: String) -> Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// POSTs `body` as JSON; returns the JSON answer.
pub async fn post_json(url: String, body: &Value) -> Value {
    http()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs a Python conformance client from `tests/clients/` with the venv's interpreter; it
/// asserts itself and prints `{"checks": [...]}`. Returns that report.
pub fn python_client(script: &str, args: Value) -> Value {
    let out = Command::new(python())
        .arg(repo().join("tests/clients").join(script))
        .arg(args.to_string())
        .output()
        .expect("run python");
    report(script, out)
}

/// Runs a Node conformance client from `tests/clients/` with the `openai` package `setup.sh`
/// installs under `target/node` (its path is passed as `node_modules`).
pub fn node_client(script: &str, mut args: Value) -> Value {
    python(); // runs setup.sh once, which also installs the Node SDK
    args["node_modules"] = Value::String(
        repo()
            .join("target/node/node_modules")
            .to_string_lossy()
            .into_owned(),
    );
    let out = Command::new("node")
        .arg(repo().join("tests/clients").join(script))
        .arg(args.to_string())
        .output()
        .expect("run node");
    report(script, out)
}

fn report(script: &str, out: Output) -> Value {
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("{script} printed no report: {stdout}"))
}

/// The names of the checks a client report says ran.
pub fn checks_of(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .expect("a checks list")
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}
