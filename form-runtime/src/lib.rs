//! What every service binary of the platform shares, so each service crate holds only
//! its own logic:
//!
//! - [`clock`]: wall-clock ms and instants, on simulated time in the simulator;
//! - [`cli`]: common flags, one-line errors for bad flags and config (exit code 2);
//! - [`config`]: TOML config files, validated before any port is bound;
//! - [`addr`]: `host:port` lists for finding other services;
//! - [`ready`]: the ready file (every address actually bound, so port 0 works);
//! - [`metrics`]: the Prometheus recorder and the `/metrics` endpoint;
//! - [`grpc`]: a tonic server with `grpc.health.v1` and reflection (v1 and v1alpha);
//! - [`shutdown`]: SIGTERM (graceful) and SIGINT (fast) as one signal for every task;
//! - [`upstream`]: lazily connected gRPC channels to other services, watched with backoff;
//! - [`service`]: the `main` every binary runs: parse, validate, bind, run, stop;
//! - [`ports`]: ports for listeners another process binds later, outside the range
//!   port-0 binds draw from.

pub mod addr;
pub mod authz;
pub mod child;
pub mod cidr;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod fence;
pub mod grpc;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod ports;
pub mod procenv;
pub mod ready;
pub mod service;
pub mod shutdown;
pub mod tls;
pub mod upstream;
pub mod watch;

pub use error::{ConfigError, RuntimeError};
