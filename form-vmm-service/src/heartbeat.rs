//! Heartbeats of this node and its instances into form-state, every
//! `heartbeat_interval_ms`. The node's own comes first, with its record
//! ([`crate::node`]). Then the instances':
//! running instances report their CPU utilisation, whether their workload implements
//! the state contract (as the node learned it when the instance started; form-state
//! keeps it on the member, so a gateway need not ask each node) and, when it does, how
//! many writes it made (so a victim that dies before its handoff is reported with
//! what it held); an instance that failed is
//! reported once as stopped and unhealthy, with the reason. A paused instance is
//! reported once as `PAUSED` (the balancer then leaves it out, the controller neither
//! counts its load nor replaces it), and `ACTIVE` again when it runs, unless something
//! else changed the member's status meanwhile. Members the controller has not
//! registered yet (NOT_FOUND) are skipped quietly; an instance that was a member and
//! whose cluster no longer has it (replaced while this node was cut off) is stopped
//! ([`crate::orphans`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::shutdown::Shutdown;
use tonic::transport::Channel;

use crate::hypervisor::{Hypervisor, Status, Window};
use crate::orphans::Seen;

fn log_error(instance: &str, e: &tonic::Status) {
    if e.code() != tonic::Code::NotFound {
        tracing::debug!(instance, error = %e, "heartbeat failed");
        metrics::counter!("form_vmm_heartbeat_errors_total").increment(1);
    }
}

async fn set_status(
    client: &mut StateServiceClient<tonic::transport::Channel>,
    cluster: &str,
    id: &str,
    status: pb::MemberStatus,
) -> Result<(), ()> {
    let req = pb::UpdateMemberRequest {
        cluster_id: cluster.to_owned(),
        instance_id: id.to_owned(),
        status: Some(status as i32),
        ..Default::default()
    };
    match client.update_member(req).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
        Err(e) => {
            log_error(id, &e);
            Err(())
        }
    }
}

/// A member this node reported paused runs again: `ACTIVE`, if it is still `PAUSED`.
async fn resumed(
    client: &mut StateServiceClient<tonic::transport::Channel>,
    cluster: &str,
    id: &str,
) -> Result<(), ()> {
    let c = match client
        .get_cluster(pb::GetClusterRequest {
            cluster_id: cluster.to_owned(),
        })
        .await
    {
        Ok(c) => c.into_inner(),
        Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
        Err(e) => {
            log_error(id, &e);
            return Err(());
        }
    };
    match c.members.get(id) {
        Some(m) if m.status == pb::MemberStatus::Paused as i32 => {
            set_status(client, cluster, id, pb::MemberStatus::Active).await
        }
        _ => Ok(()),
    }
}

/// Whether `cluster` (as one replica has it) has `id` as a member; `Unknown` when the
/// cluster cannot be read or does not exist.
async fn membership(
    client: &mut StateServiceClient<tonic::transport::Channel>,
    cluster: &str,
    id: &str,
) -> Seen {
    match client
        .get_cluster(pb::GetClusterRequest {
            cluster_id: cluster.to_owned(),
        })
        .await
    {
        Ok(c) if c.get_ref().members.contains_key(id) => Seen::Member,
        Ok(_) => Seen::NotMember,
        Err(_) => Seen::Unknown,
    }
}

/// Runs until shutdown, writing to form-state over `state`, every `interval`, with
/// the times of `clock` (the system's; a simulator skews it).
pub async fn run<H: Hypervisor>(
    hv: Arc<H>,
    contracts: Arc<crate::contract::Contracts>,
    state: Channel,
    record: crate::node::Record,
    interval: Duration,
    clock: form_runtime::clock::Skew,
    mut shutdown: Shutdown,
) {
    let now_ms = || clock.unix_ms();
    let mut client = StateServiceClient::new(state);
    let mut reported_failed: BTreeSet<String> = BTreeSet::new();
    let mut reported_paused: BTreeSet<String> = BTreeSet::new();
    let mut orphans = crate::orphans::Orphans::default();
    // The first round at once: the node's record is what controllers find it by.
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
        first = false;
        let instances = hv.list().await;
        orphans.keep(
            &instances
                .iter()
                .map(|i| i.spec.instance_id.clone())
                .collect(),
        );
        match client
            .node_heartbeat(record.heartbeat(&instances, now_ms()))
            .await
        {
            Ok(_) => metrics::counter!("form_vmm_node_heartbeats_total").increment(1),
            Err(e) => {
                tracing::debug!(error = %e, "node heartbeat failed");
                metrics::counter!("form_vmm_heartbeat_errors_total").increment(1);
            }
        }
        for i in instances {
            let (id, cluster) = (i.spec.instance_id.clone(), i.spec.cluster_id.clone());
            match i.status {
                Status::Paused if !reported_paused.contains(&id) => {
                    let r = set_status(&mut client, &cluster, &id, pb::MemberStatus::Paused).await;
                    if r.is_ok() {
                        reported_paused.insert(id);
                    }
                }
                // Running again after a pause: ACTIVE first (a heartbeat if that fails).
                Status::Running
                    if reported_paused.contains(&id)
                        && resumed(&mut client, &cluster, &id).await.is_ok() =>
                {
                    reported_paused.remove(&id);
                }
                Status::Running => {
                    let usage = hv.stats(&id, Window::Heartbeat).await.ok();
                    let state_writes = match i.admin_address {
                        Some(a) => crate::contract::writes(a).await,
                        None => None,
                    };
                    let req = pb::HeartbeatRequest {
                        cluster_id: cluster.clone(),
                        instance_id: id.clone(),
                        at_ms: now_ms(),
                        cpu_utilization: usage.map_or(0.0, |u| u.cpu_utilization),
                        state_writes,
                        usage: usage.map(|u| pb::InstanceUsage {
                            memory_bytes: u.memory_bytes,
                            uptime_seconds: u.uptime_seconds,
                        }),
                        state_contract: contracts.get(&id).map(|c| c.name()).unwrap_or_default(),
                    };
                    let seen = match client.heartbeat(req).await {
                        Ok(_) => {
                            metrics::counter!("form_vmm_heartbeats_total").increment(1);
                            Seen::Member
                        }
                        Err(e) if e.code() == tonic::Code::NotFound && orphans.was_member(&id) => {
                            membership(&mut client, &cluster, &id).await
                        }
                        Err(e) => {
                            log_error(&id, &e);
                            Seen::Unknown
                        }
                    };
                    if orphans.saw(&id, seen, tokio::time::Instant::now()) {
                        tracing::warn!(instance = %id, cluster = %cluster, "stopping an instance its cluster no longer has (replaced while this node was cut off)");
                        metrics::counter!("form_vmm_orphans_stopped_total").increment(1);
                        if let Err(e) = hv.delete(&id).await {
                            tracing::warn!(instance = %id, error = %e, "cannot stop the orphan; tried again next round");
                        } else {
                            orphans.forget(&id);
                        }
                    }
                }
                Status::Failed if !reported_failed.contains(&id) => {
                    let req = pb::UpdateMemberRequest {
                        cluster_id: cluster,
                        instance_id: id.clone(),
                        status: Some(pb::MemberStatus::Stopped as i32),
                        health: Some(pb::HealthEvent {
                            state: pb::HealthState::Unhealthy as i32,
                            reason: i.failure.clone().unwrap_or_else(|| "failed".into()),
                            at_ms: now_ms(),
                        }),
                        ..Default::default()
                    };
                    match client.update_member(req).await {
                        Ok(_) => {
                            reported_failed.insert(id);
                        }
                        Err(e) if e.code() == tonic::Code::NotFound => {
                            reported_failed.insert(id);
                        }
                        Err(e) => log_error(&id, &e),
                    }
                }
                _ => {}
            }
        }
    }
}
