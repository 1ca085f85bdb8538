//! Flags every service shares, and parsing that turns any bad flag into one line
//! naming the value and what is accepted, with exit code 2, before any port is bound.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, ValueEnum};

/// Exit code for bad flags and bad configuration (as clap and BSD `sysexits` usage).
pub const EXIT_USAGE: u8 = 2;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags shared by every service binary.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Main listen address, IP:PORT: gRPC (HTTP for form-mcp); port 0 picks a free port
    #[arg(long, value_name = "ADDR", env = "FORM_LISTEN", value_parser = crate::addr::parse_listen)]
    pub listen: Option<std::net::SocketAddr>,

    /// Prometheus /metrics listen address, IP:PORT
    #[arg(long, value_name = "ADDR", env = "FORM_METRICS_LISTEN", value_parser = crate::addr::parse_listen)]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// TOML config file; flags and environment variables override its keys.
    #[arg(long, value_name = "FILE", env = "FORM_CONFIG")]
    pub config: Option<PathBuf>,

    /// Once ready, write JSON with every address actually bound (so port 0 works)
    /// to this file, atomically.
    #[arg(long, value_name = "PATH", env = "FORM_READY_FILE")]
    pub ready_file: Option<PathBuf>,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `form_state=debug,info`.
    #[arg(long, value_name = "FILTER", env = "FORM_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "FORM_LOG_FORMAT",
        default_value_t
    )]
    pub log_format: LogFormat,

    /// Directory of this process's TLS files: `ca.pem` (the authorities trusted),
    /// `cert.pem` and `key.pem` (its own certificate, naming its kind and id). Every
    /// gRPC connection, in and out, is mutual TLS with them; renewed files are taken in
    /// without a restart. `formctl certs issue` makes one.
    #[arg(long, value_name = "DIR", env = "FORM_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Speak plaintext gRPC and trust every caller, with no authorization (development
    /// only; excludes --tls-dir).
    #[arg(long, env = "FORM_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

/// Parses the process arguments. `--help` and `--version` print and exit 0; any error
/// prints one line (`<bin>: error: ...`) and returns `Err(ExitCode(2))`.
pub fn parse<A: Parser>() -> Result<A, ExitCode> {
    parse_with(A::command(), std::env::args_os())
}

/// Parses a service's arguments, showing its default listen addresses in `--help`.
pub fn parse_service<A: Parser>(
    listen: std::net::SocketAddr,
    metrics_listen: std::net::SocketAddr,
) -> Result<A, ExitCode> {
    let with_default = |default: std::net::SocketAddr| {
        move |arg: clap::Arg| {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            arg.help(format!("{help} [default: {default}]"))
        }
    };
    let cmd = A::command()
        .mut_arg("listen", with_default(listen))
        .mut_arg("metrics_listen", with_default(metrics_listen));
    parse_with(cmd, std::env::args_os())
}

fn parse_with<A, I, T>(cmd: clap::Command, args: I) -> Result<A, ExitCode>
where
    A: Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = cmd
        .try_get_matches_from(args)
        .and_then(|m| A::from_arg_matches(&m));
    match parsed {
        Ok(a) => Ok(a),
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            usage_error(&one_line(&e.to_string()));
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// Rejects two listeners configured on the same non-zero address.
pub fn distinct_listeners(
    listeners: &[(&str, std::net::SocketAddr)],
) -> Result<(), crate::ConfigError> {
    for (i, (a_name, a)) in listeners.iter().enumerate() {
        for (b_name, b) in &listeners[i + 1..] {
            if a.port() != 0 && a == b {
                return Err(crate::ConfigError::invalid(
                    *b_name,
                    format!("{b} is also given to {a_name}; every listener needs its own address"),
                ));
            }
        }
    }
    Ok(())
}

/// Prints `<bin>: error: <message>` on one line to stderr.
pub fn usage_error(message: &str) {
    let bin = std::env::args()
        .next()
        .and_then(|p| p.rsplit('/').next().map(str::to_owned))
        .unwrap_or_else(|| "form".into());
    let message = message.trim_start_matches("error: ");
    eprintln!("{bin}: error: {message}");
}

/// The first meaningful line of a clap error, with clap's usage hints dropped.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines.next().unwrap_or("invalid arguments").to_owned();
    // clap puts what is accepted ("[possible values: ...]") and hints ("tip: ...") on
    // the lines that follow; keep them, drop the usage block.
    for extra in lines {
        if extra.starts_with("[possible values") || extra.starts_with("tip:") {
            line = format!("{line} {extra}");
        }
    }
    format!("{line}; see --help")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Sample {
        #[arg(long, value_parser = crate::addr::parse_listen)]
        listen: Option<std::net::SocketAddr>,
    }

    #[test]
    fn bad_value_is_one_line_naming_flag_and_value() {
        let e = Sample::try_parse_from(["x", "--listen", "nowhere"]).expect_err("bad");
        let line = one_line(&e.to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("--listen") && line.contains("nowhere") && line.contains("IP:PORT"),
            "{line}"
        );
        let e = Sample::try_parse_from(["x", "--lisen", "a"]).expect_err("unknown");
        assert!(one_line(&e.to_string()).contains("--lisen"));
    }
}
