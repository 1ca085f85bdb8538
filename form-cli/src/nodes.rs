//! `formctl nodes`: the form-vmm-service nodes (capacity, usage, labels, cordon), and
//! cordoning them, through the API.

use std::process::ExitCode;

use serde_json::Value;

use crate::client::Api;

/// `formctl nodes ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum NodesCommand {
    /// List every node.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cordon a node: it takes no new instance; its instances keep running.
    Cordon {
        /// The node's id.
        node: String,
    },
    /// Lift a node's cordon.
    Uncordon {
        /// The node's id.
        node: String,
    },
}

fn amount(v: &Value) -> String {
    format!(
        "{}/{}",
        v["vcpus"].as_u64().unwrap_or(0),
        v["memory_mib"].as_u64().unwrap_or(0)
    )
}

/// One node as a table row.
fn row(n: &Value, now_ms: u64) -> String {
    let used = &n["used"];
    let cap = &n["capacity"];
    let age = now_ms.saturating_sub(n["last_heartbeat_ms"].as_u64().unwrap_or(0)) / 1000;
    let labels: Vec<String> = n["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    format!(
        "{:<16} {:<8} {:>9} {:>15} {:>15} {:>6}s {:<9} {}",
        n["node_id"].as_str().unwrap_or(""),
        n["backend"].as_str().unwrap_or(""),
        format!(
            "{}/{}",
            used["instance_slots"].as_u64().unwrap_or(0),
            cap["instance_slots"].as_u64().unwrap_or(0)
        ),
        amount(used),
        amount(cap),
        age,
        if n["cordoned"].as_bool().unwrap_or(false) {
            "cordoned"
        } else {
            "-"
        },
        labels.join(",")
    )
}

pub(crate) async fn run(api: &Api, cmd: NodesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodesCommand::List { json } => {
            let list = api.get("/api/v1/nodes").await?;
            if json {
                println!("{list:#}");
                return Ok(ExitCode::SUCCESS);
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            println!(
                "{:<16} {:<8} {:>9} {:>15} {:>15} {:>7} {:<9} LABELS",
                "NODE", "BACKEND", "INSTANCES", "USED CPU/MiB", "HAS CPU/MiB", "SEEN", "CORDON"
            );
            for n in list["nodes"].as_array().into_iter().flatten() {
                println!("{}", row(n, now_ms));
            }
        }
        NodesCommand::Cordon { node } | NodesCommand::Uncordon { node } if node.is_empty() => {
            anyhow::bail!("a node id is needed, e.g. node-1 (formctl nodes list shows them)");
        }
        NodesCommand::Cordon { node } => {
            api.post(&format!("/api/v1/nodes/{node}/cordon"), &Value::Null)
                .await?;
            println!("node {node} cordoned: it takes no new instance");
        }
        NodesCommand::Uncordon { node } => {
            api.post(&format!("/api/v1/nodes/{node}/uncordon"), &Value::Null)
                .await?;
            println!("node {node} takes new instances again");
        }
    }
    Ok(ExitCode::SUCCESS)
}
