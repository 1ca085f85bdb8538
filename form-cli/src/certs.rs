//! The local certificate authority of a stack: `formctl certs ca|issue` for compose
//! and Kubernetes set-ups, and what `formctl up` does by itself (a CA in
//! `DATA_DIR/tls/ca`, one TLS directory per process and one for formctl, renewed while
//! the stack runs once two thirds of their lifetime has passed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use form_runtime::tls::pki::Ca;
use form_runtime::tls::{Identity, Kind, Material};

/// `formctl certs ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CertsCommand {
    /// Make a certificate authority in DIR (kept if one is there).
    Ca {
        /// Where the CA's certificate and key go.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue a certificate naming KIND and ID, signed by the CA in --ca, into the TLS
    /// directory --out (ca.pem, cert.pem, key.pem), replacing what is there.
    Issue {
        /// The CA's directory.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// What the holder is: state, scaler, vmm, rplb, gateway or operator.
        #[arg(long, value_name = "KIND", value_parser = parse_kind)]
        kind: Kind,
        /// Which one (e.g. state-1).
        #[arg(long, value_name = "ID")]
        id: String,
        /// The TLS directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the certificate is valid, in hours.
        #[arg(long, value_name = "HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
        lifetime_hours: u64,
    },
    /// The certificates of a whole set-up: a CA in DIR/ca (kept if there) and a TLS
    /// directory DIR/ID for each --holder, issued when missing or past two thirds of
    /// their lifetime; with --watch, stays running and renews them (compose runs it so).
    Stack {
        /// Where the CA and the TLS directories go.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A holder, ID=KIND (repeat): e.g. state-1=state, formctl=operator.
        #[arg(long = "holder", value_name = "ID=KIND", required = true, value_parser = parse_holder)]
        holders: Vec<Identity>,
        /// How long each certificate is valid, in hours.
        #[arg(long, value_name = "HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
        lifetime_hours: u64,
        /// Keep running, checking every minute and renewing what is due.
        #[arg(long)]
        watch: bool,
    },
    /// Issue a server certificate for the DNS names NAME... (e.g. demo.localhost,
    /// *.apps.example), signed by the CA in --ca, as NAME.crt and NAME.key (or
    /// --stem) in the public certificate directory --out that form-rplb's and the
    /// gateway's --https-certs read. Clients must trust the CA's ca.pem; for a
    /// public name use a certificate from a public authority instead.
    Domain {
        /// The CA's directory.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The DNS names the certificate serves.
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
        /// The public certificate directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// File stem of the pair (`default` serves every name no other pair lists);
        /// the first name, with `*` as `_`, unless given.
        #[arg(long, value_name = "STEM")]
        stem: Option<String>,
        /// How long the certificate is valid, in hours.
        #[arg(long, value_name = "HOURS", default_value_t = 24 * 90, value_parser = clap::value_parser!(u64).range(1..=8760))]
        lifetime_hours: u64,
    },
    /// Check that a TLS directory reads whole (the key fits the certificate, the CA
    /// reads) and print whom it names and until when.
    Verify {
        /// The TLS directory.
        #[arg(long, value_name = "DIR")]
        tls_dir: PathBuf,
    },
}

fn parse_holder(s: &str) -> Result<Identity, String> {
    let (id, kind) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not ID=KIND (e.g. state-1=state)"))?;
    Identity::new(Kind::parse(kind)?, id)
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s)
}

pub(crate) fn run(cmd: CertsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCommand::Ca { dir } => {
            Ca::load_or_generate(&dir, "form local CA").map_err(anyhow::Error::msg)?;
            println!("CA in {}", dir.display());
        }
        CertsCommand::Issue {
            ca,
            kind,
            id,
            out,
            lifetime_hours,
        } => {
            let ca = Ca::load(&ca).map_err(anyhow::Error::msg)?;
            let who = Identity::new(kind, &id).map_err(anyhow::Error::msg)?;
            ca.issue_into(&out, &who, Duration::from_secs(lifetime_hours * 3600))
                .map_err(anyhow::Error::msg)?;
            println!("{who} in {}", out.display());
        }
        CertsCommand::Domain {
            ca,
            names,
            out,
            stem,
            lifetime_hours,
        } => {
            let ca = Ca::load(&ca).map_err(anyhow::Error::msg)?;
            // The names are checked first: a stem taken from a bad name is the name's fault.
            let issued = ca
                .issue_domains(&names, Duration::from_secs(lifetime_hours * 3600))
                .map_err(anyhow::Error::msg)?;
            let stem = stem.unwrap_or_else(|| names[0].replace('*', "_"));
            if stem.is_empty() || stem.contains('/') || stem.starts_with('.') {
                anyhow::bail!(
                    "--stem '{stem}' cannot name a file: expected a plain name such as demo.localhost"
                );
            }
            issued.write_pair(&out, &stem).map_err(anyhow::Error::msg)?;
            println!("{} in {}", names.join(", "), out.join(&stem).display());
        }
        CertsCommand::Stack {
            dir,
            holders,
            lifetime_hours,
            watch,
        } => {
            let lifetime = Duration::from_secs(lifetime_hours * 3600);
            let ca =
                Ca::load_or_generate(&dir.join("ca"), "form CA").map_err(anyhow::Error::msg)?;
            loop {
                for who in &holders {
                    let out = dir.join(&who.id);
                    if due(&out, lifetime) {
                        ca.issue_into(&out, who, lifetime)
                            .map_err(anyhow::Error::msg)?;
                        println!("{who} in {}", out.display());
                    }
                }
                if !watch {
                    break;
                }
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        CertsCommand::Verify { tls_dir } => {
            let m = Material::load(&tls_dir).map_err(anyhow::Error::msg)?;
            let left = m.seconds_left();
            if left <= 0 {
                anyhow::bail!(
                    "{}: the certificate of {} has expired",
                    tls_dir.display(),
                    m.identity
                );
            }
            println!("{} until {} ({left} s left)", m.identity, m.not_after);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The TLS directories of a stack in `data_dir`.
pub(crate) fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// formctl's own TLS directory in a stack.
pub(crate) fn operator_dir(data_dir: &Path) -> PathBuf {
    root(data_dir).join("formctl")
}

/// The TLS directory of the process `name` of a stack.
pub(crate) fn process_dir(data_dir: &Path, name: &str) -> PathBuf {
    root(data_dir).join(name)
}

/// The certificates of a stack: (directory, identity) for each process and formctl.
pub(crate) fn holders(
    data_dir: &Path,
    processes: &[(String, &'static str)],
) -> anyhow::Result<Vec<(PathBuf, Identity)>> {
    let mut out = vec![(
        operator_dir(data_dir),
        Identity::new(Kind::Operator, "formctl").map_err(anyhow::Error::msg)?,
    )];
    for (name, bin) in processes {
        let kind = Kind::of_service(bin).with_context(|| format!("{bin} is not a service"))?;
        out.push((
            process_dir(data_dir, name),
            Identity::new(kind, name).map_err(anyhow::Error::msg)?,
        ));
    }
    Ok(out)
}

/// Makes the stack's CA if it has none, and issues every holder a certificate valid
/// for `lifetime`.
pub(crate) fn issue_all(
    data_dir: &Path,
    holders: &[(PathBuf, Identity)],
    lifetime: Duration,
) -> anyhow::Result<()> {
    let ca = Ca::load_or_generate(&root(data_dir).join("ca"), "form local CA")
        .map_err(anyhow::Error::msg)?;
    for (dir, who) in holders {
        ca.issue_into(dir, who, lifetime)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Whether the certificate in `dir` has less than a third of `lifetime` left (or
/// cannot be read).
pub(crate) fn due(dir: &Path, lifetime: Duration) -> bool {
    let Ok(m) = Material::load(dir) else {
        return true;
    };
    m.seconds_left() < (lifetime.as_secs() / 3) as i64
}
