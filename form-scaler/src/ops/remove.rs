//! Steps that take victims out: drain them on the balancer, remove their members,
//! delete their instances, and drop the snapshot. Removing a member commits the
//! operation: from there it only goes forward.

use form_proto::rplb::v1 as rplb_pb;
use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use tokio::task::JoinSet;

use super::Step;
use super::create::{delete_instances, delete_snapshots, remove_members, set_status};
use super::engine::Engine;
use crate::platform::{BALANCER_CALL, OpError, balancer_stats, not_found};

/// Runs `step` (one of this module's).
pub async fn forward(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::DrainVictims => drain(e, op).await,
        Step::RemoveVictimMembers => {
            super::sync::carry_late(e, op).await?;
            remove_members(e, &op.cluster_id, &op.victims).await
        }
        Step::DeleteVictimInstances => {
            let notes = delete_instances(e, op, &op.victims).await?;
            add_notes(op, notes);
            Ok(())
        }
        Step::DeleteSnapshot => delete_snapshots(e, op).await,
        _ => Err(OpError::new(format!(
            "{} is not a removal step",
            step.name()
        ))),
    }
}

/// Undoes `step`: only a drain can be undone. A victim whose instance runs becomes
/// active again; one whose instance does not (a dead member being replaced) goes back
/// to stopped, so the balancer never routes to it. The later steps commit the
/// operation and are never undone.
pub async fn undo(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    if step != Step::DrainVictims {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    for id in &op.victims {
        if cluster
            .members
            .get(id)
            .is_none_or(|m| m.status != state_pb::MemberStatus::Draining as i32)
        {
            continue;
        }
        let mut vmm = e
            .platform
            .vmm_on(&super::place::node_of(op, Some(&cluster), id))
            .await?;
        let running = match vmm
            .get_instance(vmm_pb::InstanceRef {
                instance_id: id.clone(),
            })
            .await
        {
            Ok(i) => i.into_inner().status == vmm_pb::InstanceStatus::Running as i32,
            Err(s) if not_found(&s) => false,
            Err(s) => return Err(OpError::rpc(format!("reading instance {id}"), &s)),
        };
        let back = if running {
            state_pb::MemberStatus::Active
        } else {
            state_pb::MemberStatus::Stopped
        };
        set_status(e, op, std::slice::from_ref(id), back).await?;
    }
    Ok(())
}

/// Waits until the balancer has no request in flight to backend `id` of `domain` (or no
/// longer has the backend).
async fn in_flight_done(
    rplb: &mut RplbControlClient<crate::fencing::Ch>,
    domain: &str,
    id: &str,
    poll: std::time::Duration,
) -> Result<(), tonic::Status> {
    loop {
        let stats = balancer_stats(rplb, domain).await?;
        let busy = stats
            .routes
            .iter()
            .flat_map(|r| &r.backends)
            .any(|b| b.id == id && b.in_flight > 0);
        if !busy {
            return Ok(());
        }
        tokio::time::sleep(poll).await;
    }
}

async fn drain(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    let notes = drain_members(e, op, &op.victims, op.drain_connections).await?;
    add_notes(op, notes);
    Ok(())
}

/// Adds `notes` to the operation's, each once (a step run again says it again).
pub fn add_notes(op: &mut types::Operation, notes: Vec<String>) {
    for n in notes {
        if !op.notes.contains(&n) {
            op.notes.push(n);
        }
    }
}

fn drain_config(d: types::DrainSettings) -> rplb_pb::ConnectionDrainConfig {
    rplb_pb::ConnectionDrainConfig {
        grace_period_seconds: form_proto::drain_grace_seconds(&d),
        wait_for_connections: d.wait_for_connections,
        notify_clients: d.notify_clients,
    }
}

/// Marks `ids` draining and, with `drain_connections` or state sync, follows their
/// drain on every balancer until no request reaches them. A balancer that cannot be
/// reached for `balancer_timeout` is not waited for; the notes returned say which.
pub async fn drain_members(
    e: &Engine,
    op: &types::Operation,
    ids: &[String],
    drain_connections: bool,
) -> Result<Vec<String>, OpError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // The balancer drains a DRAINING member as the member says: the operation's
    // settings (the request's, else the cluster's).
    let settings =
        drain_connections.then(|| op.drain.unwrap_or_else(form_proto::default_drain_settings));
    super::create::set_status_with(e, op, ids, state_pb::MemberStatus::Draining, settings).await?;
    if e.platform.balancers.is_empty() {
        return Ok(Vec::new());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    // A victim whose changes are handed off must receive no request after the
    // handoff reads them: without `drain_connections` the drain still waits, but only
    // for the requests in flight (pinned sessions move at once).
    let drain = if drain_connections {
        // The request's settings, else the cluster's, recorded with the operation.
        Some(drain_config(
            op.drain.unwrap_or_else(form_proto::default_drain_settings),
        ))
    } else if super::sync::enabled(&cluster) {
        Some(rplb_pb::ConnectionDrainConfig {
            grace_period_seconds: u32::try_from(e.limits.drain_timeout.as_secs())
                .unwrap_or(u32::MAX),
            wait_for_connections: true,
            notify_clients: false,
        })
    } else {
        return Ok(Vec::new());
    };
    let synced = super::sync::enabled(&cluster);
    let domain = cluster.domain;
    // A grace period longer than the drain timeout is the operator's choice.
    let timeout = e.limits.drain_timeout.max(
        std::time::Duration::from_secs(drain.map_or(0, |d| u64::from(d.grace_period_seconds)))
            + std::time::Duration::from_secs(10),
    );
    let mut set = JoinSet::new();
    for (at, rplb) in &e.platform.balancers {
        for id in ids {
            let follow = Follow {
                at: at.clone(),
                rplb: rplb.clone(),
                domain: domain.clone(),
                id: id.clone(),
                drain,
                synced,
                poll: e.limits.poll,
                patience: e.limits.balancer_timeout,
            };
            set.spawn(crate::fencing::scoped(async move {
                let what = format!(
                    "drain of {} on {} (balancer {})",
                    follow.id, follow.domain, follow.at
                );
                tokio::time::timeout(timeout, follow.run())
                    .await
                    .unwrap_or_else(|_| {
                        Err(OpError::new(format!("{what} took longer than {timeout:?}")))
                    })
            }));
        }
    }
    // Every follow ends before the first error is returned (as `join_all` does).
    let (mut notes, mut first) = (Vec::new(), None);
    while let Some(r) = set.join_next().await {
        match r.unwrap_or_else(|j| Err(OpError::new(format!("task failed: {j}")))) {
            Ok(Some(note)) => notes.push(note),
            Ok(None) => {}
            Err(err) => {
                first.get_or_insert(err);
            }
        }
    }
    if let Some(err) = first {
        return Err(err);
    }
    notes.sort();
    notes.dedup();
    Ok(notes)
}

/// One victim's drain followed on one balancer.
struct Follow {
    at: String,
    rplb: RplbControlClient<crate::fencing::Ch>,
    domain: String,
    id: String,
    drain: Option<rplb_pb::ConnectionDrainConfig>,
    synced: bool,
    poll: std::time::Duration,
    patience: std::time::Duration,
}

impl Follow {
    /// Follows the drain to its end; `Some(note)` when the balancer could not be
    /// reached for `patience` (it refused connections, did not answer within
    /// [`BALANCER_CALL`], or its stream broke and it could not be asked again) and
    /// was not waited for any longer.
    async fn run(mut self) -> Result<Option<String>, OpError> {
        let id = self.id.clone();
        // Since when the balancer has not been reachable.
        let mut silent: Option<tokio::time::Instant> = None;
        loop {
            let req = rplb_pb::DrainBackendRequest {
                domain: self.domain.clone(),
                backend_id: id.clone(),
                drain: self.drain,
            };
            let lost = match tokio::time::timeout(BALANCER_CALL, self.rplb.drain_backend(req)).await
            {
                Ok(Ok(s)) => match self.follow(s.into_inner()).await {
                    Ok(()) => return Ok(None),
                    Err(s) if unreachable(&s) => s.message().to_owned(),
                    Err(s) => {
                        return Err(OpError::rpc(format!("draining {id} on {}", self.at), &s));
                    }
                },
                // Not on the balancer (never routed, or already gone): nothing to drain.
                Ok(Err(s)) if not_found(&s) => return Ok(None),
                Ok(Err(s)) if unreachable(&s) => s.message().to_owned(),
                Ok(Err(s)) => {
                    return Err(OpError::rpc(format!("draining {id} on {}", self.at), &s));
                }
                Err(_) => format!("no answer within {BALANCER_CALL:?}"),
            };
            let since = *silent.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= self.patience {
                tracing::warn!(balancer = %self.at, backend = %id, error = %lost, "balancer unreachable; not waiting for its drain");
                return Ok(Some(format!(
                    "stopped waiting for balancer {} to drain {id}: unreachable for {:?} ({lost})",
                    self.at, self.patience
                )));
            }
            tokio::time::sleep(self.poll.max(std::time::Duration::from_millis(200))).await;
        }
    }

    /// Reads the drain's progress until it ends (then waits for the requests in flight
    /// when the handoff needs it).
    async fn follow(
        &mut self,
        mut stream: tonic::Streaming<rplb_pb::DrainProgress>,
    ) -> Result<(), tonic::Status> {
        while let Some(p) = stream.message().await? {
            if p.result != rplb_pb::DrainResult::Unspecified as i32 {
                tracing::info!(balancer = %self.at, backend = %self.id, result = p.result, in_flight = p.in_flight, "drain ended");
                if self.synced && p.in_flight > 0 {
                    // The grace period ended with requests still running: their
                    // writes must land before the handoff reads the victim.
                    in_flight_done(&mut self.rplb, &self.domain, &self.id, self.poll).await?;
                }
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Whether `s` says the balancer could not be reached (as opposed to answering).
fn unreachable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
}
