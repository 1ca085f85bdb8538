//! Configuration of form-scaler: file, environment and flags.

use std::net::SocketAddr;

use clap::Parser;
use form_runtime::ConfigError;
use form_runtime::addr::HostPort;
use form_runtime::cli::CommonArgs;
use form_runtime::config::ServiceConfig;
use serde::{Deserialize, Serialize};

/// Configuration (TOML keys are the field names; every key is optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Main listen address: gRPC (ScalerService, health, reflection).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// form-state replicas, `host:port` each.
    pub state: Vec<HostPort>,
    /// form-vmm-service nodes, `host:port` each.
    pub vmm: Vec<HostPort>,
    /// form-rplb control addresses, `host:port` each.
    pub rplb: Vec<HostPort>,
    /// This controller's id (the owner of its operations); keep it across restarts.
    pub id: String,
    /// Milliseconds between two evaluations of every cluster.
    pub evaluate_interval_ms: u64,
    /// The vmm heartbeat interval: a CPU figure older than 5 of them is stale.
    pub heartbeat_interval_ms: u64,
    /// Whether decisions are acted on; false leaves scaling to manual requests.
    pub autoscale: bool,
    /// Largest `max_instances` a policy may set.
    pub max_instances_cap: u32,
    /// Milliseconds a new instance has to become healthy and served.
    pub ready_timeout_ms: u64,
    /// Milliseconds a victim's drain may take.
    pub drain_timeout_ms: u64,
    /// Milliseconds an unreachable balancer may hold up a drain or the wait for a new
    /// instance to serve; then the operation goes on without it, saying so.
    pub balancer_timeout_ms: u64,
    /// Milliseconds without a heartbeat after which a vmm node counts as lost: it takes
    /// no new instance.
    pub node_timeout_ms: u64,
    /// Milliseconds from its request in which an operation must finish; past it the
    /// operation is rolled back and ends `failed`.
    pub operation_timeout_ms: u64,
    /// Milliseconds of samples whose mean a decision takes (CPU, request rate).
    pub metric_window_ms: u64,
    /// Injected faults, `STEP[=fail|hang|hold:FILE|skip_undo]` (tests of rollback and restarts).
    pub inject_fault: Vec<String>,
    /// Milliseconds an instance stays unhealthy before it is replaced.
    pub replace_after_ms: u64,
    /// Milliseconds between two heartbeats of this controller into form-state.
    pub controller_heartbeat_ms: u64,
    /// A controller silent this many milliseconds is dead: its clusters move.
    pub controller_ttl_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            state: Vec::new(),
            vmm: Vec::new(),
            rplb: Vec::new(),
            id: "form-scaler".into(),
            evaluate_interval_ms: 1000,
            heartbeat_interval_ms: 1000,
            autoscale: true,
            max_instances_cap: 100,
            ready_timeout_ms: 60_000,
            drain_timeout_ms: 120_000,
            balancer_timeout_ms: 30_000,
            node_timeout_ms: 15_000,
            operation_timeout_ms: 600_000,
            metric_window_ms: 15_000,
            inject_fault: Vec::new(),
            replace_after_ms: 10_000,
            controller_heartbeat_ms: 1000,
            controller_ttl_ms: 5000,
        }
    }
}

impl ServiceConfig for Config {
    const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 3006);
    const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9006);

    fn listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.listen
    }

    fn metrics_listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.metrics_listen
    }

    fn validate(&self) -> Result<(), ConfigError> {
        form_runtime::ids::check(&self.id).map_err(|e| ConfigError::invalid("id", e))?;
        for (field, v) in [
            ("evaluate_interval_ms", self.evaluate_interval_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("ready_timeout_ms", self.ready_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
            ("balancer_timeout_ms", self.balancer_timeout_ms),
            ("node_timeout_ms", self.node_timeout_ms),
            ("operation_timeout_ms", self.operation_timeout_ms),
            ("metric_window_ms", self.metric_window_ms),
            ("replace_after_ms", self.replace_after_ms),
            ("controller_heartbeat_ms", self.controller_heartbeat_ms),
            ("controller_ttl_ms", self.controller_ttl_ms),
        ] {
            if !(10..=3_600_000).contains(&v) {
                return Err(ConfigError::invalid(
                    field,
                    format!("{v} is not accepted; expected 10 to 3600000 milliseconds"),
                ));
            }
        }
        // An unreachable balancer is given up before the step itself times out.
        let limit = self.ready_timeout_ms.min(self.drain_timeout_ms);
        if self.balancer_timeout_ms >= limit {
            return Err(ConfigError::invalid(
                "balancer_timeout_ms",
                format!(
                    "{} is not accepted; expected less than ready_timeout_ms ({}) and drain_timeout_ms ({}), so that an operation goes on without an unreachable balancer",
                    self.balancer_timeout_ms, self.ready_timeout_ms, self.drain_timeout_ms
                ),
            ));
        }
        if self.controller_ttl_ms < 2 * self.controller_heartbeat_ms {
            return Err(ConfigError::invalid(
                "controller_ttl_ms",
                format!(
                    "{} is not accepted; expected at least twice controller_heartbeat_ms ({})",
                    self.controller_ttl_ms, self.controller_heartbeat_ms
                ),
            ));
        }
        if self.max_instances_cap == 0 {
            return Err(ConfigError::invalid(
                "max_instances_cap",
                "0 is not accepted; expected at least 1",
            ));
        }
        crate::faults::Faults::parse(&self.inject_fault)?;
        Ok(())
    }
}

/// form-scaler: the scaling controller (decisions, operations with rollback, health and failover, vertical scaling).
#[derive(Debug, Parser)]
#[command(name = "form-scaler", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated addresses of form-state replicas
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_SCALER_STATE",
        value_delimiter = ','
    )]
    pub state: Option<Vec<HostPort>>,

    /// Comma-separated addresses of form-vmm-service nodes
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_SCALER_VMM",
        value_delimiter = ','
    )]
    pub vmm: Option<Vec<HostPort>>,

    /// Comma-separated gRPC control addresses of form-rplb
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_SCALER_RPLB",
        value_delimiter = ','
    )]
    pub rplb: Option<Vec<HostPort>>,

    /// This controller's id; operations it owns are resumed by a controller of that id
    #[arg(long, value_name = "ID", env = "FORM_SCALER_ID")]
    pub id: Option<String>,

    /// Milliseconds between two evaluations of every cluster
    #[arg(long, value_name = "MS")]
    pub evaluate_interval_ms: Option<u64>,

    /// The vmm heartbeat interval in milliseconds (CPU figures older than 5 are stale)
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,

    /// Act on decisions (true) or only carry out manual requests (false)
    #[arg(long, value_name = "BOOL")]
    pub autoscale: Option<bool>,

    /// Milliseconds a new instance has to become healthy and served
    #[arg(long, value_name = "MS")]
    pub ready_timeout_ms: Option<u64>,

    /// Milliseconds an instance stays unhealthy before it is replaced
    #[arg(long, value_name = "MS")]
    pub replace_after_ms: Option<u64>,

    /// Milliseconds an unreachable balancer may hold up a drain or a new instance's
    /// wait to serve; then the operation goes on without it and notes it [default: 30000]
    #[arg(long, value_name = "MS")]
    pub balancer_timeout_ms: Option<u64>,

    /// Milliseconds without a heartbeat after which a vmm node counts as lost and takes
    /// no new instance [default: 15000]
    #[arg(long, value_name = "MS")]
    pub node_timeout_ms: Option<u64>,

    /// Milliseconds from its request in which an operation must finish; past it the
    /// operation is rolled back and ends failed [default: 600000]
    #[arg(long, value_name = "MS")]
    pub operation_timeout_ms: Option<u64>,

    /// Milliseconds of samples whose mean a decision takes (CPU from heartbeats, the
    /// balancer's request rate) [default: 15000]
    #[arg(long, value_name = "MS")]
    pub metric_window_ms: Option<u64>,

    /// Milliseconds between two heartbeats of this controller into form-state
    #[arg(long, value_name = "MS")]
    pub controller_heartbeat_ms: Option<u64>,

    /// Milliseconds of silence after which a controller is dead and its clusters move
    #[arg(long, value_name = "MS")]
    pub controller_ttl_ms: Option<u64>,

    /// Inject a fault at a step, STEP[=fail|hang|hold:FILE|skip_undo] (tests of rollback and
    /// restarts; hold waits before the step until FILE exists)
    #[arg(
        long,
        value_name = "STEP[=fail|hang|hold:FILE|skip_undo]",
        env = "FORM_SCALER_INJECT_FAULT",
        value_delimiter = ','
    )]
    pub inject_fault: Vec<String>,

    /// Flags every service shares.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// The config file (if any) with environment variables and flags applied, validated.
    pub fn into_config(self) -> Result<(Config, CommonArgs), ConfigError> {
        let config = form_runtime::config::build(&self.common, |c: &mut Config| {
            if let Some(v) = self.state {
                c.state = v;
            }
            if let Some(v) = self.vmm {
                c.vmm = v;
            }
            if let Some(v) = self.rplb {
                c.rplb = v;
            }
            if let Some(v) = self.id {
                c.id = v;
            }
            if let Some(v) = self.evaluate_interval_ms {
                c.evaluate_interval_ms = v;
            }
            if let Some(v) = self.heartbeat_interval_ms {
                c.heartbeat_interval_ms = v;
            }
            if let Some(v) = self.autoscale {
                c.autoscale = v;
            }
            if let Some(v) = self.ready_timeout_ms {
                c.ready_timeout_ms = v;
            }
            if let Some(v) = self.replace_after_ms {
                c.replace_after_ms = v;
            }
            if let Some(v) = self.balancer_timeout_ms {
                c.balancer_timeout_ms = v;
            }
            if let Some(v) = self.node_timeout_ms {
                c.node_timeout_ms = v;
            }
            if let Some(v) = self.operation_timeout_ms {
                c.operation_timeout_ms = v;
            }
            if let Some(v) = self.metric_window_ms {
                c.metric_window_ms = v;
            }
            if let Some(v) = self.controller_heartbeat_ms {
                c.controller_heartbeat_ms = v;
            }
            if let Some(v) = self.controller_ttl_ms {
                c.controller_ttl_ms = v;
            }
            if !self.inject_fault.is_empty() {
                c.inject_fault = self.inject_fault;
            }
        })?;
        Ok((config, self.common))
    }
}
