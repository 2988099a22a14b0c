use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Started as Chromium's launcher (see `browser::guard`): become the browser.
    if let Some(code) = computetower::browser::guard::exec_if_launcher() {
        return code;
    }
    computetower::browser::guard::enable();
    computetower::cli::run(computetower::cli::Cli::parse())
}
