//! Small commands for containers, whose images hold no shell or curl:
//! `formctl probe grpc|http` (health checks) and `formctl keys` (the state replicas'
//! keys and the authorized keys file they share, the API tokens, the balancers' cookie
//! key).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use form_runtime::addr::HostPort;

/// `formctl probe ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ProbeCommand {
    /// Exit 0 when the gRPC service at HOST:PORT reports SERVING.
    Grpc {
        /// The service's address.
        addr: HostPort,
        /// What the service is (its certificate must say so): state, scaler, vmm or rplb.
        #[arg(long, value_name = "KIND", value_parser = form_runtime::tls::Kind::parse)]
        kind: form_runtime::tls::Kind,
    },
    /// Exit 0 when `GET PATH` on HOST:PORT answers 200.
    Http {
        /// The server's address.
        addr: HostPort,
        /// The path.
        #[arg(default_value = "/healthz")]
        path: String,
        /// Speak HTTPS (trusting FORM_API_CA, else the system's authorities).
        #[arg(long)]
        https: bool,
    },
}

impl ProbeCommand {
    /// Whether it speaks gRPC (and so needs formctl's TLS directory).
    pub(crate) fn is_grpc(&self) -> bool {
        matches!(self, ProbeCommand::Grpc { .. })
    }
}

pub(crate) async fn probe(cmd: ProbeCommand) -> anyhow::Result<ExitCode> {
    let ok = match cmd {
        ProbeCommand::Grpc { addr, kind } => form_runtime::upstream::serving_at(&addr, kind).await,
        ProbeCommand::Http { addr, path, https } => {
            let scheme = if https { "https" } else { "http" };
            let api = crate::client::Api::new(&format!("{scheme}://{addr}"), None);
            api.get(&path).await.is_ok()
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Flags of `formctl keys`.
#[derive(Debug, clap::Args)]
pub(crate) struct KeysArgs {
    /// The form-state binary.
    #[arg(long, value_name = "PATH", default_value = "form-state")]
    form_state: PathBuf,
    /// A replica and its data directory, ID=DIR (repeat for each replica).
    #[arg(long = "replica", value_name = "ID=DIR", required = true)]
    replicas: Vec<String>,
    /// The authorized keys file to write.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Also make an API tokens file in this directory (kept if present); the tokens
    /// are not printed (logs are not for secrets): `formctl tokens` shows them.
    #[arg(long, value_name = "DIR")]
    tokens_dir: Option<PathBuf>,
    /// Also make the balancers' session cookie key at this path (kept if present), for
    /// every form-rplb of the stack to read with --cookie-key-file.
    #[arg(long, value_name = "PATH")]
    cookie_key: Option<PathBuf>,
}

/// Makes each replica's key (kept if present) and writes the file listing them all.
pub(crate) fn keys(a: KeysArgs) -> anyhow::Result<ExitCode> {
    let mut lines = String::from("# form-state replicas (formctl keys)\n");
    for r in &a.replicas {
        let Some((id, dir)) = r.split_once('=') else {
            bail!("--replica '{r}' is not accepted; expected ID=DIR, e.g. state-1=/data");
        };
        let out = std::process::Command::new(&a.form_state)
            .args(["--data-dir", dir, "--replica-id", id, "--print-public-key"])
            .output()
            .with_context(|| format!("running {}", a.form_state.display()))?;
        if !out.status.success() {
            bail!("{id}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        lines.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&a.out, lines).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} keys to {}", a.replicas.len(), a.out.display());
    if let Some(dir) = &a.tokens_dir {
        crate::tokens::ensure(dir)?;
        println!(
            "API tokens in {} (formctl tokens --tokens-dir {} shows them)",
            crate::tokens::path(dir).display(),
            dir.display()
        );
    }
    if let Some(p) = &a.cookie_key {
        let made = crate::cookie_key::ensure(p)?;
        println!(
            "{} the balancers' cookie key at {}",
            if made { "made" } else { "kept" },
            p.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Flags of `formctl tokens`.
#[derive(Debug, clap::Args)]
pub(crate) struct TokensArgs {
    /// Directory of the tokens file.
    #[arg(long, value_name = "DIR")]
    tokens_dir: PathBuf,
    /// Print the read-only token instead of the admin token.
    #[arg(long)]
    read: bool,
}

/// Prints one API token of a tokens file, for the one who asks (not for logs).
pub(crate) fn tokens(a: TokensArgs) -> anyhow::Result<ExitCode> {
    let t = crate::tokens::read(&crate::tokens::path(&a.tokens_dir))
        .with_context(|| format!("no tokens in {}", a.tokens_dir.display()))?;
    println!("{}", if a.read { t.read } else { t.admin });
    Ok(ExitCode::SUCCESS)
}

/// Flags of `formctl demo-setup`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoSetupArgs {
    /// The API, http://HOST:PORT or https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    api: String,
    /// Directory of the tokens file (its admin token is used).
    #[arg(long, value_name = "DIR")]
    tokens_dir: PathBuf,
    /// Where form-demo-app is, as the VMM service sees it.
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// The balancer's HTTP address, to wait until it serves the demo.
    #[arg(long, value_name = "HOST:PORT")]
    balancer: HostPort,
}

/// (Re)creates the demo cluster through the API and waits until the balancer serves
/// it, retrying while the API is not up yet.
pub(crate) async fn demo_setup(a: DemoSetupArgs) -> anyhow::Result<ExitCode> {
    let t = crate::tokens::read(&crate::tokens::path(&a.tokens_dir))
        .with_context(|| format!("no tokens in {}", a.tokens_dir.display()))?;
    let api = crate::client::Api::new(&a.api, Some(t.admin));
    let balancer = tokio::net::lookup_host(a.balancer.to_string())
        .await?
        .next()
        .with_context(|| format!("{} does not resolve", a.balancer))?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match crate::demo::ensure(&api, &a.bin_dir, balancer).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("demo-setup: {e:#}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    println!(
        "the demo cluster answers on host {} through the balancer",
        crate::demo::DEMO_DOMAIN
    );
    Ok(ExitCode::SUCCESS)
}
