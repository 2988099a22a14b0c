use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    computetower::cli::run(computetower::cli::Cli::parse())
}
