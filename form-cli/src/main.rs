//! formctl: the operator CLI of the platform. `formctl up` runs the whole stack on
//! this machine as child processes and stops it cleanly on Ctrl-C; the other commands
//! talk to form-mcp's REST API.

mod certs;
mod client;
mod clusters;
mod cookie_key;
mod demo;
mod detach;
mod drain;
mod nodes;
mod ops_tools;
mod plan;
mod scale;
mod state;
mod status;
mod tokens;
mod transport;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// formctl: run and operate the elastic scaling platform.
#[derive(Debug, Parser)]
#[command(name = "formctl", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    api: ApiArgs,

    #[command(flatten)]
    tls: TlsArgs,

    #[command(subcommand)]
    command: Command,
}

/// Where the API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
struct ApiArgs {
    /// URL of form-mcp's API [default: that of the stack `formctl up` runs from its data
    /// directory (also with --auto-ports), else http://127.0.0.1:3010]
    #[arg(long, value_name = "URL", env = "FORM_API", global = true)]
    api: Option<String>,

    /// Bearer token [default, for an API on this machine: the admin token in the tokens
    /// file `formctl up` made in its data directory ($FORM_DATA_DIR,
    /// $XDG_DATA_HOME/form or ~/.local/share/form)]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FORM_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
}

impl ApiArgs {
    /// The API client: the token given, or the local stack's admin token.
    fn client(&self) -> client::Api {
        let dir = std::env::var_os("FORM_DATA_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| up::default_data_dir().ok());
        let api = self
            .api
            .clone()
            .or_else(|| dir.as_deref().and_then(up::running_api))
            .unwrap_or_else(|| "http://127.0.0.1:3010".to_owned());
        // The local stack's token goes only to an API on this machine.
        let local = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"]
            .iter()
            .any(|p| api.starts_with(p));
        let token = self.token.clone().or_else(|| {
            if !local {
                return None;
            }
            tokens::read(&tokens::path(dir.as_deref()?)).map(|t| t.admin)
        });
        client::Api::new(&api, token)
    }
}

/// How formctl's gRPC commands (`state`, `probe grpc`) connect.
#[derive(Debug, Clone, clap::Args)]
struct TlsArgs {
    /// formctl's TLS directory (ca.pem, cert.pem, key.pem) for gRPC commands; default:
    /// the local stack's (DATA_DIR/tls/formctl).
    #[arg(long, value_name = "DIR", env = "FORM_TLS_DIR", global = true)]
    tls_dir: Option<PathBuf>,

    /// Speak plaintext gRPC (to services started with --insecure-plaintext).
    #[arg(long, env = "FORM_INSECURE_PLAINTEXT", global = true)]
    insecure_plaintext: bool,
}

impl TlsArgs {
    /// Sets how gRPC commands connect.
    fn install(&self) -> anyhow::Result<()> {
        let stack = || {
            std::env::var_os("FORM_DATA_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| up::default_data_dir().ok())
                .map(|d| certs::operator_dir(&d))
                .filter(|d| d.is_dir())
        };
        let dir = match (&self.tls_dir, self.insecure_plaintext) {
            (Some(d), _) => Some(d.clone()),
            (None, false) => stack(),
            (None, true) => None,
        };
        if dir.is_none() && !self.insecure_plaintext {
            anyhow::bail!(
                "no TLS directory for gRPC: give --tls-dir DIR (ca.pem, cert.pem, key.pem of a \
                 certificate of kind operator), start a local stack with formctl up, or pass \
                 --insecure-plaintext for services that run without TLS"
            );
        }
        let mode =
            form_runtime::tls::from_flags("formctl", dir.as_deref(), self.insecure_plaintext)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        form_runtime::tls::install(mode);
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the whole stack on this machine (3 form-state replicas, form-vmm-service,
    /// form-rplb, form-scaler, form-mcp) with a demo cluster; Ctrl-C stops it cleanly.
    Up(UpArgs),
    /// Stop a stack started with `formctl up --detach`.
    Down(DownArgs),
    /// Create, list, read and delete clusters.
    #[command(subcommand)]
    Cluster(clusters::ClusterCommand),
    /// List the nodes (capacity, usage, labels), cordon and uncordon them.
    #[command(subcommand)]
    Nodes(nodes::NodesCommand),
    /// Scale a cluster to a number of instances (out or in) and follow the operation.
    Scale(scale::ScaleArgs),
    /// Change the vCPUs and memory of every instance of a cluster.
    Resize(scale::ResizeArgs),
    /// Set a cluster's scaling policy.
    #[command(subcommand)]
    Policy(scale::PolicyCommand),
    /// Set how a cluster's instances share application state (none, on_scale,
    /// continuous).
    StateSync(scale::StateSyncArgs),
    /// Take one instance out of rotation: no new session goes to it.
    Drain(drain::InstanceArgs),
    /// Put a draining instance back in rotation.
    Undrain(drain::InstanceArgs),
    /// Set how a cluster's scale-ins drain the instances they remove.
    DrainSettings(drain::SettingsArgs),
    /// A cluster's instances, health and last operation.
    Status(status::StatusArgs),
    /// Follow a cluster live: members, health, operations with progress.
    Watch(status::WatchArgs),
    /// Drive load on the demo cluster, scale it out and in, and summarise what clients saw.
    Demo(demo::DemoArgs),
    /// Inspect a form-state replica.
    #[command(subcommand)]
    State(state::StateCommand),
    /// Health probes for containers (exit 0 when healthy).
    #[command(subcommand)]
    Probe(ops_tools::ProbeCommand),
    /// Make the state replicas' keys and the authorized keys file they share.
    Keys(ops_tools::KeysArgs),
    /// Print an API token of a tokens file (admin, or --read).
    Tokens(ops_tools::TokensArgs),
    /// Make a local certificate authority and the certificates of mutual TLS (for
    /// compose and Kubernetes set-ups; `formctl up` makes its own).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Create the demo cluster through an API (what `formctl up` does; for containers).
    DemoSetup(ops_tools::DemoSetupArgs),
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

    /// Instances run by form-vmm-service: `process` (default) or `qemu` (needs
    /// --guest-dir, made by deploy/guest/build.sh).
    #[arg(long, value_name = "BACKEND", default_value = "process", value_parser = ["process", "qemu"])]
    backend: String,

    /// Guest kernel and initramfs for `--backend qemu`.
    #[arg(long, value_name = "DIR")]
    guest_dir: Option<PathBuf>,

    /// Do not create the demo cluster.
    #[arg(long)]
    no_demo: bool,

    /// Run in the background (log in DATA_DIR/formctl.log); stop with `formctl down`.
    #[arg(long)]
    detach: bool,

    /// Lifetime of the stack's certificates, in hours; they are renewed while the
    /// stack runs, once two thirds of it has passed.
    #[arg(long, value_name = "HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
    cert_lifetime_hours: u64,
}

/// Flags of `formctl down`.
#[derive(Debug, Clone, clap::Args)]
struct DownArgs {
    /// Data directory of the stack [default: $XDG_DATA_HOME/form or ~/.local/share/form]
    #[arg(long, value_name = "DIR", env = "FORM_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Output into a closed pipe (`formctl status | head`) ends the program quietly, as it
/// does other command-line tools, instead of a panic about a broken pipe.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
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
        Command::Up(args) if args.detach => detach::up(args),
        Command::Up(args) => runtime.block_on(up::run(args)),
        Command::Down(args) => detach::down(args),
        Command::Cluster(cmd) => runtime.block_on(clusters::run(&cli.api.client(), cmd)),
        Command::Nodes(cmd) => runtime.block_on(nodes::run(&cli.api.client(), cmd)),
        Command::Scale(args) => runtime.block_on(scale::scale(&cli.api.client(), args)),
        Command::Resize(args) => runtime.block_on(scale::resize(&cli.api.client(), args)),
        Command::Policy(cmd) => runtime.block_on(scale::policy(&cli.api.client(), cmd)),
        Command::StateSync(args) => runtime.block_on(scale::state_sync(&cli.api.client(), args)),
        Command::Drain(args) => runtime.block_on(drain::instance(&cli.api.client(), args, false)),
        Command::Undrain(args) => runtime.block_on(drain::instance(&cli.api.client(), args, true)),
        Command::DrainSettings(args) => runtime.block_on(drain::set(&cli.api.client(), args)),
        Command::Status(args) => runtime.block_on(status::status(&cli.api.client(), args)),
        Command::Watch(args) => runtime.block_on(status::watch(&cli.api.client(), args)),
        Command::Demo(args) => runtime.block_on(demo::run(&cli.api.client(), args)),
        Command::State(cmd) => cli
            .tls
            .install()
            .and_then(|()| runtime.block_on(state::run(cmd))),
        Command::Probe(cmd) => {
            let tls = if cmd.is_grpc() {
                cli.tls.install()
            } else {
                Ok(())
            };
            tls.and_then(|()| runtime.block_on(ops_tools::probe(cmd)))
        }
        Command::Keys(args) => ops_tools::keys(args),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Tokens(args) => ops_tools::tokens(args),
        Command::DemoSetup(args) => runtime.block_on(ops_tools::demo_setup(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("formctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
