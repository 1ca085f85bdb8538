//! Configuration of form-rplb: file, environment and flags.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use form_runtime::ConfigError;
use form_runtime::addr::HostPort;
use form_runtime::cli::CommonArgs;
use form_runtime::config::ServiceConfig;
use serde::{Deserialize, Serialize};

use crate::trusted::Cidr;

/// Configuration (TOML keys are the field names; every key is optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Main listen address: gRPC control (RplbControl, health, reflection).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// Address of the HTTP data plane (HTTP/1.1 and cleartext HTTP/2).
    pub listen_http: SocketAddr,
    /// Address of the HTTPS data plane (HTTP/1.1 and HTTP/2 over TLS), if any; needs
    /// `https_certs`.
    pub listen_https: Option<SocketAddr>,
    /// Directory of the HTTPS certificates: `<name>.crt` with `<name>.key`, chosen by
    /// SNI among their DNS names; `default.crt` serves unknown names (see
    /// docs/rplb.md).
    pub https_certs: Option<PathBuf>,
    /// form-state replicas to read routes from, `host:port` each.
    pub state: Vec<HostPort>,
    /// Peers whose `X-Forwarded-For` is believed (CIDR blocks).
    pub trusted_proxies: Vec<Cidr>,
    /// Networks backends' addresses must be in (CIDR blocks; the nodes' instance
    /// networks); empty: any address that may receive traffic.
    pub backend_networks: Vec<Cidr>,
    /// File holding the cookie HMAC key (64 hex characters), shared by every balancer
    /// replica; without it a random key is made at start (sessions re-pin after a
    /// restart).
    pub cookie_key_file: Option<PathBuf>,
    /// Milliseconds to wait for a backend's response head before answering 504.
    pub request_timeout_ms: u64,
    /// Milliseconds a client may take to send a request head (HTTP/1).
    pub header_read_timeout_ms: u64,
    /// Milliseconds a client connection may stay idle before it is closed.
    pub idle_timeout_ms: u64,
    /// Largest request head accepted, bytes (larger gets 431).
    pub max_header_bytes: usize,
    /// Most request header fields accepted (more gets 431).
    pub max_headers: usize,
    /// Consecutive failed requests that eject a backend.
    pub passive_failures: u32,
    /// Milliseconds a passively ejected backend rests before it is checked again.
    pub cool_off_ms: u64,
    /// Most of a route's serving backends that passive ejection may have out at once,
    /// percent (Envoy's `max_ejection_percent`); 0 turns passive ejection off. The last
    /// serving backend is never ejected.
    pub max_ejection_percent: u8,
    /// Milliseconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Threads of the data plane; 0 means one per CPU.
    pub http_workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            listen_http: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080),
            listen_https: None,
            https_certs: None,
            state: Vec::new(),
            trusted_proxies: Vec::new(),
            backend_networks: Vec::new(),
            cookie_key_file: None,
            request_timeout_ms: 60_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            passive_failures: 5,
            cool_off_ms: 10_000,
            max_ejection_percent: 50,
            shutdown_grace_ms: 3_000,
            http_workers: 0,
        }
    }
}

/// Largest accepted SIGTERM grace (the service must stop in reasonable time).
const MAX_SHUTDOWN_GRACE_MS: u64 = 300_000;

impl Config {
    /// Checks ranges; errors name the key and what is accepted.
    fn check_ranges(&self) -> Result<(), ConfigError> {
        let mut listeners = vec![
            ("--listen", self.listen),
            ("--metrics-listen", self.metrics_listen),
            ("--listen-http", self.listen_http),
        ];
        listeners.extend(self.listen_https.map(|a| ("--listen-https", a)));
        form_runtime::cli::distinct_listeners(&listeners)?;
        match (&self.listen_https, &self.https_certs) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "https_certs",
                    "is required with listen_https: a directory of <name>.crt and <name>.key pairs",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "listen_https",
                    "is required with https_certs: the address to serve HTTPS on",
                ));
            }
            _ => {}
        }
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::invalid(name, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("request_timeout_ms", self.request_timeout_ms)?;
        positive("header_read_timeout_ms", self.header_read_timeout_ms)?;
        positive("idle_timeout_ms", self.idle_timeout_ms)?;
        positive("passive_failures", u64::from(self.passive_failures))?;
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            return Err(ConfigError::invalid(
                "max_header_bytes",
                format!(
                    "{} is out of range; expected 8192 to 1048576",
                    self.max_header_bytes
                ),
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(ConfigError::invalid(
                "max_ejection_percent",
                format!(
                    "{} is out of range; expected 0 (no passive ejection) to 100",
                    self.max_ejection_percent
                ),
            ));
        }
        if !(1..=1000).contains(&self.max_headers) {
            return Err(ConfigError::invalid(
                "max_headers",
                format!("{} is out of range; expected 1 to 1000", self.max_headers),
            ));
        }
        if self.http_workers > 256 {
            return Err(ConfigError::invalid(
                "http_workers",
                format!(
                    "{} is too many; expected 0 (one per CPU) to 256",
                    self.http_workers
                ),
            ));
        }
        if self.shutdown_grace_ms > MAX_SHUTDOWN_GRACE_MS {
            return Err(ConfigError::invalid(
                "shutdown_grace_ms",
                format!(
                    "{} is too long; expected at most {MAX_SHUTDOWN_GRACE_MS}",
                    self.shutdown_grace_ms
                ),
            ));
        }
        Ok(())
    }

    /// Threads of the data plane.
    pub fn workers(&self) -> usize {
        match self.http_workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// The SIGTERM grace.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

impl ServiceConfig for Config {
    const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 3005);
    const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9005);

    fn listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.listen
    }

    fn metrics_listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.metrics_listen
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check_ranges()
    }
}

/// form-rplb: the HTTP load balancer of the platform's clusters, with session affinity, connection draining and health checks, controlled over gRPC.
#[derive(Debug, Parser)]
#[command(name = "form-rplb", version, about, long_about = None)]
pub struct Args {
    /// Address of the HTTP data plane (HTTP/1.1 and cleartext HTTP/2) [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR", env = "FORM_RPLB_LISTEN_HTTP", value_parser = form_runtime::addr::parse_listen)]
    pub listen_http: Option<SocketAddr>,

    /// Address of the HTTPS data plane (needs --https-certs) [default: none]
    #[arg(long, value_name = "ADDR", env = "FORM_RPLB_LISTEN_HTTPS", value_parser = form_runtime::addr::parse_listen)]
    pub listen_https: Option<SocketAddr>,

    /// Directory of HTTPS certificates: NAME.crt with NAME.key, picked by SNI; default.crt serves unknown names
    #[arg(long, value_name = "DIR", env = "FORM_RPLB_HTTPS_CERTS")]
    pub https_certs: Option<PathBuf>,

    /// Comma-separated addresses of form-state replicas to read routes from
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_RPLB_STATE",
        value_delimiter = ','
    )]
    pub state: Option<Vec<HostPort>>,

    /// Comma-separated CIDR blocks of proxies whose X-Forwarded-For is believed
    #[arg(
        long,
        value_name = "CIDR,...",
        env = "FORM_RPLB_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Option<Vec<Cidr>>,

    /// Comma-separated CIDR blocks backends' addresses must be in (the nodes' instance networks) [default: any]
    #[arg(
        long,
        value_name = "CIDR,...",
        env = "FORM_RPLB_BACKEND_NETWORKS",
        value_delimiter = ','
    )]
    pub backend_networks: Option<Vec<Cidr>>,

    /// File with the cookie HMAC key (64 hex characters), shared by balancer replicas
    #[arg(long, value_name = "PATH", env = "FORM_RPLB_COOKIE_KEY_FILE")]
    pub cookie_key_file: Option<PathBuf>,

    /// Milliseconds in-flight requests get to finish after SIGTERM [default: 3000]
    #[arg(long, value_name = "MS", env = "FORM_RPLB_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,

    /// Flags every service shares.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// The config file (if any) with environment variables and flags applied, validated.
    pub fn into_config(self) -> Result<(Config, CommonArgs), ConfigError> {
        let config = form_runtime::config::build(&self.common, |c: &mut Config| {
            if let Some(v) = self.listen_http {
                c.listen_http = v;
            }
            if let Some(v) = self.listen_https {
                c.listen_https = Some(v);
            }
            if let Some(v) = self.https_certs {
                c.https_certs = Some(v);
            }
            if let Some(v) = self.state {
                c.state = v;
            }
            if let Some(v) = self.trusted_proxies {
                c.trusted_proxies = v;
            }
            if let Some(v) = self.backend_networks {
                c.backend_networks = v;
            }
            if let Some(v) = self.cookie_key_file {
                c.cookie_key_file = Some(v);
            }
            if let Some(v) = self.shutdown_grace_ms {
                c.shutdown_grace_ms = v;
            }
        })?;
        Ok((config, self.common))
    }
}
