//! Ties Chromium's life to this process: when `computetower` dies, even by `SIGKILL`, the
//! kernel kills the browser too, instead of leaving it running with nobody to close it.
//!
//! Chromium is started through this same binary: with [`EXEC_ENV`] set, `main` asks the kernel
//! for `SIGKILL` on its parent's death (`PR_SET_PDEATHSIG`, kept across `exec`) and then execs
//! Chromium in place, so the pid chromiumoxide watches is Chromium's own. The browser's
//! helper processes exit when it does.
//!
//! The signal follows the *thread* that started the child: browsers are launched from the
//! async runtime's worker threads (or a test's thread), which live as long as the runtime.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;

/// Set on the launcher process: the Chromium binary to exec.
pub const EXEC_ENV: &str = "COMPUTETOWER_CHROMIUM_EXEC";

/// This binary, once `main` has said it can act as the launcher (a test harness cannot).
static LAUNCHER: OnceLock<PathBuf> = OnceLock::new();

/// Called by `main`: browsers are launched through this binary from now on.
pub fn enable() {
    if let Ok(this) = std::env::current_exe() {
        let _ = LAUNCHER.set(this);
    }
}

/// The program to launch Chromium with and the environment variable it needs; `None`
/// (launch `chrome` directly) unless [`enable`] was called.
pub fn launcher(chrome: &Path) -> Option<(PathBuf, (String, String))> {
    let this = LAUNCHER.get()?;
    Some((
        this.clone(),
        (EXEC_ENV.to_owned(), chrome.to_string_lossy().into_owned()),
    ))
}

/// When this process was started as a Chromium launcher, becomes Chromium (returns only if
/// that fails). Otherwise returns `None` at once.
pub fn exec_if_launcher() -> Option<ExitCode> {
    let chrome = std::env::var_os(EXEC_ENV)?;
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // The parent may have died before the request took effect: then nobody wants a browser.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        return Some(ExitCode::FAILURE);
    }
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let error = Command::new(&chrome).args(args).env_remove(EXEC_ENV).exec();
    eprintln!("cannot start {}: {error}", Path::new(&chrome).display());
    Some(ExitCode::from(127))
}
