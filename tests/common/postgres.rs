//! A real PostgreSQL server for tests: Debian's `postgresql` binaries (`./setup.sh` installs
//! them), an unprivileged cluster made with `initdb` in a temp dir and listening on a free
//! loopback port, started once per test binary. Each test gets a fresh database.
//!
//! - PostgreSQL refuses to run as root: when the tests run as root, the cluster belongs to
//!   and runs as the `postgres` user that Debian's package creates.
//! - The server lives exactly as long as the test binary, even one that is killed: it runs
//!   under a small shell that the kernel signals when the test binary dies
//!   (`PR_SET_PDEATHSIG`), and the shell stops the server and removes the cluster's dir.
//! - Password authentication over TCP (scram-sha-256), as a real deployment has it, so tests
//!   can check that the password never shows.
//!
//! This file is shared: `tests/common/mod.rs` has it as `common::postgres`, and the library's
//! own store tests include it by path.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates; tests connect as it.
pub const USER: &str = "ct";
const STARTUP: Duration = Duration::from_secs(60);

/// The running cluster.
pub struct Cluster {
    pub port: u16,
    pub password: String,
    pub dir: PathBuf,
}

impl Cluster {
    /// The URL of `database` on this cluster, password included.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }
}

/// The cluster of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(start) {
        Ok(cluster) => cluster,
        Err(e) => panic!("cannot start the test PostgreSQL server: {e}"),
    }
}

/// Creates a new, empty database on the cluster and returns its URL.
pub async fn fresh_database() -> String {
    use sqlx::Connection;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let cluster = cluster();
    let name = format!("ct_test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut admin = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    cluster.url(&name)
}

fn start() -> Result<Cluster, String> {
    let bin = bin_dir()?;
    let owner = owner()?;
    let dir = tempfile::Builder::new()
        .prefix("computetower-pg-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        // Removed by the shell that runs the server, when the test binary ends.
        .keep();
    let password = uuid::Uuid::new_v4().simple().to_string();
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, &password).map_err(|e| format!("{}: {e}", pwfile.display()))?;
    if let Some((uid, gid)) = owner {
        for path in [&dir, &pwfile] {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: chown with a valid C string and ids.
            if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
                return Err(format!(
                    "chown {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-U", USER, "-E", "UTF8", "--locale=C", "--no-sync"])
        .args(["--auth-host=scram-sha-256", "--auth-local=trust"])
        .arg(format!("--pwfile={}", pwfile.display()));
    initdb.current_dir(&dir);
    as_owner(&mut initdb, owner, false);
    let out = initdb.output().map_err(|e| format!("run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let _ = std::fs::remove_file(&pwfile);
    // A port that was free a moment ago can be taken before the server binds it: try again
    // with another.
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        match run_server(&bin, &dir, port, owner) {
            Ok(()) => {
                return Ok(Cluster {
                    port,
                    password,
                    dir,
                });
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Starts the server on `port` and waits until it accepts connections.
fn run_server(bin: &Path, dir: &Path, port: u16, owner: Option<(u32, u32)>) -> Result<(), String> {
    // The server's own settings for tests: nothing here needs to survive a power cut.
    const SCRIPT: &str = r#"
        "$1/postgres" -D "$2/data" -p "$3" -k "$2" -h 127.0.0.1 \
            -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
            -c max_connections=300 &
        pg=$!
        trap 'kill -QUIT $pg; wait $pg; rm -rf "$2"' TERM
        wait $pg
    "#;
    let log_path = dir.join(format!("server-{port}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| format!("server log: {e}"))?;
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", SCRIPT, "sh"])
        .arg(bin)
        .arg(dir)
        .arg(port.to_string())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    as_owner(&mut command, owner, true);
    let mut child = spawn_for_life(command)?;
    let pid_file = dir.join("data/postmaster.pid");
    let deadline = Instant::now() + STARTUP;
    loop {
        // Line 8 of postmaster.pid is the server's state: `ready` once it accepts connections.
        let ready = std::fs::read_to_string(&pid_file)
            .is_ok_and(|text| text.lines().nth(7).is_some_and(|l| l.trim() == "ready"));
        if ready {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            return Err(format!("the server exited ({status}): {text}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("the server was not ready within {STARTUP:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `command` from a thread that never ends: the kernel's parent-death signal follows
/// the thread that spawned a child, so it then fires only when the whole test binary ends.
fn spawn_for_life(mut command: Command) -> Result<Child, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            command
                .spawn()
                .map_err(|e| format!("start the server: {e}")),
        );
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(|e| e.to_string())?
}

/// Runs `command` as `owner` (when the tests run as root); with `tied`, it also gets SIGTERM
/// when the test binary dies.
fn as_owner(command: &mut Command, owner: Option<(u32, u32)>, tied: bool) {
    // SAFETY: between fork and exec only async-signal-safe calls are made (setgroups, setgid,
    // setuid, prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            if let Some((uid, gid)) = owner
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After the change of user, which would clear it.
            if tied {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("the test binary is gone"));
                }
            }
            Ok(())
        });
    }
}

/// The newest PostgreSQL version's binaries.
fn bin_dir() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|_| missing())?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(missing)
}

fn missing() -> String {
    "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run ./setup.sh, which \
     installs Debian's postgresql package"
        .to_owned()
}

/// Who owns and runs the cluster: `None` (this user) unless the tests run as root.
fn owner() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the record is read at once, before any other
    // call could reuse it.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(
            "the tests run as root and there is no `postgres` user to run the server as: run \
             ./setup.sh, which installs Debian's postgresql package (it creates that user)"
                .to_owned(),
        );
    }
    // SAFETY: a non-null record from getpwnam.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}
