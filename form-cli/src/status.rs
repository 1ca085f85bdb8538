//! `formctl status` (a table, or `--json` for scripts) and `formctl watch` (live).

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::client::Api;
use crate::clusters::print_members;
use crate::scale::progress_line;

/// Flags of `formctl status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// The cluster.
    name: String,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

/// Flags of `formctl watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// The cluster.
    name: String,
    /// Milliseconds between two refreshes.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    interval_ms: u64,
}

/// The status of `name` (its members come with their statuses and addresses).
async fn read(api: &Api, name: &str) -> anyhow::Result<Value> {
    Ok(api.get(&format!("/api/v1/clusters/{name}/status")).await?)
}

fn print(st: &Value) {
    println!(
        "{}: {} instances ({} ready), {}, {}",
        st["cluster_id"].as_str().unwrap_or(""),
        st["instances"],
        st["ready_instances"],
        st["health_status"].as_str().unwrap_or(""),
        st["scaling_status"].as_str().unwrap_or("")
    );
    print_members(&st["members"]);
    match st["state_sync"].as_str().unwrap_or("") {
        "unsupported" => println!(
            "state sync: unsupported (the workload lacks the state contract: a scale-in loses the removed instances' writes)"
        ),
        "none" => println!("state sync: none (a scale-in loses the removed instances' writes)"),
        mode => println!("state sync: {mode}"),
    }
    if let Some(op) = st["last_operation"].as_object() {
        println!(
            "last operation: {} {} {}",
            op.get("type").and_then(Value::as_str).unwrap_or(""),
            op.get("status").and_then(Value::as_str).unwrap_or(""),
            op.get("completed_at").and_then(Value::as_str).unwrap_or("")
        );
        for lost in op
            .get("not_handed_off")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            println!("  not handed off: {}", lost.as_str().unwrap_or(""));
        }
    }
    if let Some(d) = st["last_decision"].as_object() {
        println!(
            "last decision: {} -> {} ({})",
            d.get("current").unwrap_or(&Value::Null),
            d.get("desired").unwrap_or(&Value::Null),
            d.get("reason").and_then(Value::as_str).unwrap_or("")
        );
    }
}

pub(crate) async fn status(api: &Api, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let st = read(api, &a.name).await?;
    if a.json {
        println!("{st:#}");
    } else {
        print(&st);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn watch(api: &Api, a: WatchArgs) -> anyhow::Result<ExitCode> {
    loop {
        let st = read(api, &a.name).await?;
        // Clear the screen and go home, then draw.
        print!("\x1b[2J\x1b[H");
        print(&st);
        if let Some(id) = st["last_operation"]["operation_id"].as_str()
            && st["scaling_status"] != "stable"
            && let Ok(op) = api.get(&format!("/api/v1/operations/{id}")).await
        {
            println!("running: {}", progress_line(&op));
        }
        println!("\n(refreshing every {} ms; Ctrl-C to stop)", a.interval_ms);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(a.interval_ms)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}
