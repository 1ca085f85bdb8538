//! `formctl scale`, `formctl resize` and `formctl policy set`, with the operation
//! followed step by step until it ends.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use crate::client::Api;

/// Flags of `formctl scale`.
#[derive(Debug, clap::Args)]
pub(crate) struct ScaleArgs {
    /// The cluster.
    name: String,
    /// Instances wanted (with --remove: optional, and must agree).
    #[arg(long, value_name = "N", required_unless_present = "remove")]
    to: Option<u32>,
    /// Remove this instance (repeatable): a scale-in of the named instances instead of
    /// the ones the controller would choose; a drained instance may be named.
    #[arg(long, value_name = "ID")]
    remove: Vec<String>,
    /// Seconds sessions pinned to a removed instance may still use it [default: the
    /// cluster's drain settings]
    #[arg(long, value_name = "S")]
    grace_seconds: Option<u32>,
    /// Keep pinned sessions on removed instances for the whole grace period.
    #[arg(long, requires = "grace_seconds")]
    keep_sessions: bool,
    /// Remove instances without draining them first (by default their in-flight
    /// requests finish and new sessions go elsewhere before they go).
    #[arg(long)]
    no_drain: bool,
    /// Skip the cooldowns.
    #[arg(long)]
    immediate: bool,
    /// Return once the operation is accepted.
    #[arg(long)]
    no_wait: bool,
}

/// Flags of `formctl resize`.
#[derive(Debug, clap::Args)]
pub(crate) struct ResizeArgs {
    /// The cluster.
    name: String,
    /// vCPUs per instance.
    #[arg(long, value_name = "N")]
    vcpus: u32,
    /// Memory per instance in MiB.
    #[arg(long, value_name = "MIB")]
    memory_mib: u64,
    /// Return once the operation is accepted.
    #[arg(long)]
    no_wait: bool,
}

/// Policy commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum PolicyCommand {
    /// Set (replace) a cluster's scaling policy.
    Set(PolicyArgs),
}

/// Flags of `formctl policy set`.
#[derive(Debug, clap::Args)]
pub(crate) struct PolicyArgs {
    /// The cluster.
    name: String,
    /// Fewest instances.
    #[arg(long, value_name = "N")]
    min: u32,
    /// Most instances.
    #[arg(long, value_name = "N")]
    max: u32,
    /// Target CPU utilisation, in (0, 1].
    #[arg(long, value_name = "F")]
    target_cpu: f64,
    /// Target in-flight requests per instance (a second signal).
    #[arg(long, value_name = "N")]
    target_requests: Option<f64>,
    /// Seconds after new capacity before the next scale-out.
    #[arg(long, value_name = "S", default_value_t = 60)]
    scale_out_cooldown: u32,
    /// Seconds after the last action before the next scale-in.
    #[arg(long, value_name = "S", default_value_t = 60)]
    scale_in_cooldown: u32,
    /// Scale-in looks back this many seconds.
    #[arg(long, value_name = "S", default_value_t = 300)]
    scale_in_window: u32,
    /// Seconds a new instance is left out of the metrics.
    #[arg(long, value_name = "S", default_value_t = 30)]
    warmup: u32,
}

pub(crate) async fn scale(api: &Api, a: ScaleArgs) -> anyhow::Result<ExitCode> {
    let st = api
        .get(&format!("/api/v1/clusters/{}/status", a.name))
        .await?;
    let now = st["instances"].as_u64().unwrap_or(0) as u32;
    if a.remove.is_empty() && a.to == Some(now) {
        println!("{} has {now} instances already", a.name);
        return Ok(ExitCode::SUCCESS);
    }
    let operation = match a.to {
        Some(to) if to > now => "scale_out",
        _ => "scale_in",
    };
    let mut body = json!({
        "operation": operation,
        "target_count": a.to.unwrap_or(0),
        "immediate": a.immediate,
        "drain_connections": !a.no_drain,
        "instance_ids_to_remove": a.remove,
    });
    if let Some(g) = a.grace_seconds {
        body["drain"] = crate::drain::settings(g, a.keep_sessions, true);
    }
    submit(api, &a.name, &body, a.no_wait).await
}

pub(crate) async fn resize(api: &Api, a: ResizeArgs) -> anyhow::Result<ExitCode> {
    let body = json!({
        "operation": "resize",
        "resources": {"vcpus": a.vcpus, "memory_mib": a.memory_mib},
    });
    submit(api, &a.name, &body, a.no_wait).await
}

async fn submit(api: &Api, name: &str, body: &Value, no_wait: bool) -> anyhow::Result<ExitCode> {
    let accepted = api
        .post(&format!("/api/v1/clusters/{name}/scale"), body)
        .await?;
    let id = accepted["operation_id"].as_str().unwrap_or("").to_owned();
    println!(
        "{} of {name}: operation {id} accepted",
        accepted["operation"]["type"]
            .as_str()
            .unwrap_or("operation")
    );
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let op = follow(api, &id).await?;
    Ok(if op["status"] == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A progress bar of `done` out of `total`.
pub(crate) fn bar(done: usize, total: usize) -> String {
    let width = 20;
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// One line describing an operation's progress.
pub(crate) fn progress_line(op: &Value) -> String {
    let steps: Vec<&str> = op["steps"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let step = op["step"].as_str().unwrap_or("");
    let status = op["status"].as_str().unwrap_or("");
    let done = match status {
        "completed" => steps.len(),
        _ => steps.iter().position(|s| *s == step).unwrap_or(0),
    };
    let what = match status {
        "in_progress" => step.to_owned(),
        "rolled_back" | "failed" => format!("{status}: {}", op["error"].as_str().unwrap_or("")),
        other => other.to_owned(),
    };
    format!(
        "{} {} {}/{} {what}",
        op["type"].as_str().unwrap_or(""),
        bar(done, steps.len()),
        done,
        steps.len()
    )
}

/// Prints the operation's steps as they happen until it ends; returns its last value.
pub(crate) async fn follow(api: &Api, id: &str) -> anyhow::Result<Value> {
    let mut last = String::new();
    loop {
        let op = api.get(&format!("/api/v1/operations/{id}")).await?;
        let line = progress_line(&op);
        if line != last {
            println!("  {line}");
            let _ = std::io::stdout().flush();
            last = line;
        }
        if ["completed", "failed", "rolled_back"].contains(&op["status"].as_str().unwrap_or("")) {
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Flags of `formctl state-sync`.
#[derive(Debug, clap::Args)]
pub(crate) struct StateSyncArgs {
    /// The cluster.
    name: String,
    /// none (nothing carried), on_scale (clones catch up with their source, a scale-in
    /// hands the removed instances' writes to the others) or continuous.
    #[arg(long, value_name = "MODE", value_parser = ["none", "on_scale", "continuous"])]
    mode: String,
    /// continuous: milliseconds between exchanges (50-600000).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    interval_ms: u32,
    /// continuous: largest batch read from one instance, in bytes (4096-4194304).
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    batch_bytes: u32,
    /// continuous: keys with this prefix are carried first in each round (repeatable).
    #[arg(long = "priority-prefix", value_name = "PREFIX")]
    priority_prefixes: Vec<String>,
    /// Fail a scale-in whose removed instances' writes cannot be handed off.
    #[arg(long)]
    refuse_unsynced_scale_in: bool,
}

/// `formctl state-sync NAME --mode MODE`.
pub(crate) async fn state_sync(api: &Api, a: StateSyncArgs) -> anyhow::Result<ExitCode> {
    let body = json!({
        "mode": a.mode,
        "interval_ms": if a.mode == "continuous" { a.interval_ms } else { 0 },
        "batch_bytes": if a.mode == "continuous" { a.batch_bytes } else { 0 },
        "priority_prefixes": a.priority_prefixes,
        "refuse_unsynced_scale_in": a.refuse_unsynced_scale_in,
    });
    let stored = api
        .call(
            http::Method::PUT,
            &format!("/api/v1/clusters/{}/state-sync", a.name),
            Some(&body),
            &[],
        )
        .await?;
    println!(
        "state sync of {}: {}{}",
        a.name,
        stored["mode"].as_str().unwrap_or(""),
        if stored["refuse_unsynced_scale_in"] == true {
            ", refusing scale-ins that would lose writes"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn policy(api: &Api, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    let PolicyCommand::Set(p) = cmd;
    let body = json!({
        "min_instances": p.min,
        "max_instances": p.max,
        "target_cpu_utilization": p.target_cpu,
        "target_requests_per_instance": p.target_requests,
        "scale_out_cooldown_seconds": p.scale_out_cooldown,
        "scale_in_cooldown_seconds": p.scale_in_cooldown,
        "scale_in_stabilization_seconds": p.scale_in_window,
        "warmup_seconds": p.warmup,
    });
    let stored = api
        .call(
            http::Method::PUT,
            &format!("/api/v1/clusters/{}/policy", p.name),
            Some(&body),
            &[],
        )
        .await?;
    println!(
        "policy of {}: {} to {} instances at {:.0}% CPU",
        p.name,
        stored["min_instances"],
        stored["max_instances"],
        stored["target_cpu_utilization"].as_f64().unwrap_or(0.0) * 100.0
    );
    Ok(ExitCode::SUCCESS)
}
