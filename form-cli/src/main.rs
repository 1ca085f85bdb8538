//! formctl: the operator CLI of the platform. `formctl up` runs the whole stack on
//! this machine as child processes and stops it cleanly on Ctrl-C.

mod plan;
mod state;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// formctl: run and operate the elastic scaling platform.
#[derive(Debug, Parser)]
#[command(name = "formctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the whole stack on this machine (3 form-state replicas, form-vmm-service,
    /// form-rplb, form-scaler, form-mcp) and stop it cleanly on Ctrl-C.
    Up(UpArgs),
    /// Inspect a form-state replica.
    #[command(subcommand)]
    State(state::StateCommand),
}

/// Flags of `formctl up`.
#[derive(Debug, Clone, clap::Args)]
struct UpArgs {
    /// Directory for state, logs and ready files; kept across runs
    /// [default: $XDG_DATA_HOME/form or ~/.local/share/form]
    #[arg(long, value_name = "DIR", env = "FORM_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// IP address every service listens on.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    host: std::net::IpAddr,

    /// Use free ports chosen at start instead of the documented defaults
    /// (3004/3014/3024 state, 3002 vmm, 3005 rplb, 3006 scaler, 3010 API).
    #[arg(long)]
    auto_ports: bool,

    /// Directory of the service binaries [default: the directory of formctl]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Write JSON with every service's addresses to this file once the stack is up.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match form_runtime::cli::parse::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("formctl: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up(args) => runtime.block_on(up::run(args)),
        Command::State(cmd) => runtime.block_on(state::run(cmd)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("formctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
