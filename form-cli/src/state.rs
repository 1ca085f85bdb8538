//! `formctl state dump` and `formctl state digest`: inspect one form-state replica.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::addr::HostPort;
use tonic::transport::Channel;

/// `formctl state ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum StateCommand {
    /// Print every cluster, member and operation a replica holds.
    Dump {
        /// The replica's gRPC address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        addr: HostPort,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a replica's state digest and version vector (equal digests = equal state).
    Digest {
        /// The replica's gRPC address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        addr: HostPort,
    },
}

async fn connect(addr: &HostPort) -> anyhow::Result<StateServiceClient<Channel>> {
    let ch = form_runtime::tls::client::endpoint(addr, form_runtime::tls::Kind::State)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to form-state at {addr}"))?;
    Ok(StateServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024))
}

pub(crate) async fn run(cmd: StateCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StateCommand::Dump { addr, json } => {
            let mut c = connect(&addr).await?;
            let clusters = c
                .list_clusters(pb::ListClustersRequest {})
                .await?
                .into_inner()
                .clusters;
            let operations = c
                .list_operations(pb::ListOperationsRequest {
                    cluster_id: String::new(),
                    limit: 0,
                    unfinished_only: false,
                })
                .await?
                .into_inner()
                .operations;
            if json {
                let v = serde_json::json!({ "clusters": clusters, "operations": operations });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_text(&clusters, &operations);
            }
        }
        StateCommand::Digest { addr } => {
            let mut c = connect(&addr).await?;
            let d = c.digest(pb::DigestRequest {}).await?.into_inner();
            let hex: String = d.sha256.iter().map(|b| format!("{b:02x}")).collect();
            println!("replica   {}", d.replica_id);
            println!("digest    {hex}");
            println!("clusters  {}", d.clusters);
            println!("operations {}", d.operations);
            let mut vv: Vec<_> = d
                .version
                .map(|v| v.entries.into_iter().collect())
                .unwrap_or_default();
            vv.sort();
            for (actor, n) in vv {
                println!("version   {actor} {n}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(clusters: &[pb::Cluster], operations: &[form_proto::types::v1::Operation]) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if clusters.is_empty() {
        println!("no clusters");
    }
    for c in clusters {
        println!(
            "cluster {} (domain {}, template {})",
            c.cluster_id,
            c.domain,
            or_dash(&c.template_instance_id)
        );
        let mut members: Vec<&pb::Member> = c.members.values().collect();
        members.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        for m in members {
            let status = pb::MemberStatus::try_from(m.status)
                .map(|s| s.as_str_name())
                .unwrap_or("?");
            let hb = if m.last_heartbeat_ms == 0 {
                "never".to_owned()
            } else {
                format!(
                    "{:.1}s ago",
                    now.saturating_sub(m.last_heartbeat_ms) as f64 / 1000.0
                )
            };
            println!(
                "  member {:<20} node {:<10} {:<24} gen {:<3} heartbeat {:<12} {}",
                m.instance_id,
                or_dash(&m.node_id),
                status.trim_start_matches("MEMBER_STATUS_"),
                m.generation,
                hb,
                m.addresses.join(",")
            );
        }
    }
    for o in operations {
        println!(
            "operation {} cluster {} kind {} status {:?}",
            o.operation_id,
            o.cluster_id,
            o.kind,
            o.status.as_ref().and_then(|s| s.state.as_ref())
        );
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
