//! `formctl cluster create|list|get|delete`.

use std::process::ExitCode;

use serde_json::{Value, json};

use crate::client::Api;

/// Cluster commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClusterCommand {
    /// Create a cluster and start its first instance.
    Create(CreateArgs),
    /// List every cluster.
    List(JsonFlag),
    /// Show one cluster with its members.
    Get(NameArgs),
    /// Delete a cluster and its instances.
    Delete(NameArgs),
}

/// `--json`.
#[derive(Debug, clap::Args)]
pub(crate) struct JsonFlag {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A cluster name.
#[derive(Debug, clap::Args)]
pub(crate) struct NameArgs {
    /// The cluster.
    pub(crate) name: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags of `cluster create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The cluster's id.
    name: String,
    /// Program every instance runs.
    #[arg(long, value_name = "PATH")]
    command: String,
    /// An argument of the program (repeat for several).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Path answering 200 when an instance is ready.
    #[arg(long, value_name = "PATH", default_value = "/healthz")]
    health_path: String,
    /// Host name the balancer routes to the cluster [default: NAME.fog]
    #[arg(long, value_name = "HOST")]
    domain: Option<String>,
    /// Fewest instances.
    #[arg(long, value_name = "N", default_value_t = 1)]
    min: u32,
    /// Most instances.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max: u32,
    /// Target CPU utilisation, in (0, 1].
    #[arg(long, value_name = "F", default_value_t = 0.6)]
    target_cpu: f64,
    /// Session affinity: none, client-ip, cookie, header:NAME or query:NAME.
    #[arg(long, value_name = "METHOD", default_value = "cookie")]
    affinity: String,
}

/// The affinity JSON for `--affinity`.
pub(crate) fn affinity(spec: &str) -> anyhow::Result<Value> {
    Ok(match spec {
        "none" => json!({"method": "none"}),
        "client-ip" => json!({"method": "client_ip"}),
        "cookie" => json!({"method": "cookie", "name": "FORM_SESSION", "ttl_seconds": 3600}),
        s if s.starts_with("header:") && s.len() > 7 => {
            json!({"method": "consistent_hashing", "parameter": &s[7..]})
        }
        s if s.starts_with("query:") && s.len() > 6 => {
            json!({"method": "consistent_hashing", "parameter": s})
        }
        other => anyhow::bail!(
            "--affinity '{other}' is not accepted; expected none, client-ip, cookie, header:NAME or query:NAME"
        ),
    })
}

pub(crate) async fn run(api: &Api, cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ClusterCommand::Create(a) => {
            let body = json!({
                "cluster_id": a.name,
                "domain": a.domain,
                "workload": {"command": a.command, "args": a.args, "health_path": a.health_path},
                "policy": {"min_instances": a.min, "max_instances": a.max, "target_cpu_utilization": a.target_cpu},
                "affinity": affinity(&a.affinity)?,
            });
            let c = api.post("/api/v1/clusters", &body).await?;
            println!(
                "cluster {} created; it answers on host {} through the balancer",
                c["cluster_id"].as_str().unwrap_or(""),
                c["domain"].as_str().unwrap_or("")
            );
            print_cluster(&c);
        }
        ClusterCommand::List(f) => {
            let list = api.get("/api/v1/clusters").await?;
            if f.json {
                println!("{list:#}");
            } else {
                println!(
                    "{:<24} {:<28} {:>9} {:<20}",
                    "CLUSTER", "DOMAIN", "INSTANCES", "TEMPLATE"
                );
                for c in list["clusters"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<28} {:>9} {:<20}",
                        c["cluster_id"].as_str().unwrap_or(""),
                        c["domain"].as_str().unwrap_or(""),
                        c["members"].as_array().map_or(0, Vec::len),
                        c["template_instance_id"].as_str().unwrap_or("")
                    );
                }
            }
        }
        ClusterCommand::Get(n) => {
            let c = api.get(&format!("/api/v1/clusters/{}", n.name)).await?;
            if n.json {
                println!("{c:#}");
            } else {
                print_cluster(&c);
            }
        }
        ClusterCommand::Delete(n) => {
            let d = api
                .call(
                    http::Method::DELETE,
                    &format!("/api/v1/clusters/{}", n.name),
                    None,
                    &[],
                )
                .await?;
            println!(
                "cluster {} deleted with {} instances",
                n.name,
                d["instances_deleted"].as_array().map_or(0, Vec::len)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Members as a table.
pub(crate) fn print_members(members: &Value) {
    println!(
        "  {:<28} {:<9} {:<10} {:>5} {:<22}",
        "INSTANCE", "STATUS", "HEALTH", "CPU", "ADDRESS"
    );
    for m in members.as_array().into_iter().flatten() {
        println!(
            "  {:<28} {:<9} {:<10} {:>4.0}% {:<22} {}",
            m["instance_id"].as_str().unwrap_or(""),
            m["status"].as_str().unwrap_or(""),
            m["health"].as_str().unwrap_or(""),
            m["cpu_utilization"].as_f64().unwrap_or(0.0) * 100.0,
            m["addresses"][0].as_str().unwrap_or(""),
            if m["template"] == true {
                "template"
            } else {
                ""
            }
        );
        if let Some(s) = m["state_sync"].as_object() {
            println!(
                "  {:<28} synced {} ({} changes in its last round)",
                "",
                s.get("synced_at").and_then(Value::as_str).unwrap_or(""),
                s.get("changes_last_round").unwrap_or(&Value::Null)
            );
        }
    }
}

fn print_cluster(c: &Value) {
    println!(
        "{}  domain {}  template {}",
        c["cluster_id"].as_str().unwrap_or(""),
        c["domain"].as_str().unwrap_or(""),
        c["template_instance_id"].as_str().unwrap_or("")
    );
    print_members(&c["members"]);
}
