//! Operations: scale-out, scale-in, replacement and resize, each a list of steps with
//! an undo, recorded in form-state before each step runs (see docs/operations.md).

pub mod create;
pub mod engine;
pub mod lifecycle;
pub mod place;
pub mod plan;
pub mod record;
pub mod remove;
pub mod resize;
pub mod sync;
pub mod transfer;

use form_proto::types::v1 as types;

/// One step of an operation. Every step and every undo may run again after a crash,
/// so each is idempotent: it checks what exists before it acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Resize each member in place, one at a time; members that cannot be resized in
    /// place become victims to be replaced by resized clones.
    ResizeInPlace,
    /// Record the new resources on the cluster (future clones get them).
    StoreResources,
    /// Snapshot the source instance (the template, or a healthy member).
    SnapshotSource,
    /// Clone the planned new instances from the snapshot.
    CloneInstances,
    /// Wait until every new instance runs and answers its health path.
    WaitHealthy,
    /// Merge the changes the source made since its snapshot into the new instances
    /// (the workload state contract), before they take traffic.
    SyncClones,
    /// Add the new instances as members (starting: not yet routed).
    AddMembers,
    /// Mark the new members active: the balancer routes to them.
    ActivateMembers,
    /// Wait until the balancer has every new instance as an active backend.
    WaitServing,
    /// Merge the source's changes made since `SyncClones` into the new instances.
    FinalSyncClones,
    /// Make a new instance the template when the template is a victim.
    PromoteReplacement,
    /// Mark victims draining and, with `drain_connections` or state sync, wait for
    /// their drain.
    DrainVictims,
    /// Merge each drained victim's changes into the instances that remain.
    HandoffVictims,
    /// Remove the victims' members. From here an operation only goes forward.
    RemoveVictimMembers,
    /// Delete the victims' instances.
    DeleteVictimInstances,
    /// Delete the snapshot the clones came from.
    DeleteSnapshot,
    /// Store the cluster of a create (`cluster_spec`); its undo deletes it.
    StoreCluster,
    /// Start the template instance (`new_instances[0]`); its undo deletes it.
    CreateTemplate,
    /// Add the template as an active member and make it the cluster's template.
    AddTemplate,
    /// Wait until the balancer serves the template (as `WaitServing`).
    TemplateServing,
    /// Delete the cluster's record: the balancer stops routing to it and no
    /// controller starts an operation on it. From here a delete only goes forward.
    DeleteClusterRecord,
    /// Delete the instances of its members (`victims`).
    DeleteClusterInstances,
}

/// Every step, for name lookups.
const ALL: [Step; 22] = [
    Step::ResizeInPlace,
    Step::StoreResources,
    Step::SnapshotSource,
    Step::CloneInstances,
    Step::WaitHealthy,
    Step::SyncClones,
    Step::AddMembers,
    Step::ActivateMembers,
    Step::WaitServing,
    Step::FinalSyncClones,
    Step::PromoteReplacement,
    Step::DrainVictims,
    Step::HandoffVictims,
    Step::RemoveVictimMembers,
    Step::DeleteVictimInstances,
    Step::DeleteSnapshot,
    Step::StoreCluster,
    Step::CreateTemplate,
    Step::AddTemplate,
    Step::TemplateServing,
    Step::DeleteClusterRecord,
    Step::DeleteClusterInstances,
];

/// Prefix of the recorded name of an undo step.
pub const UNDO_PREFIX: &str = "undo:";

impl Step {
    /// The name recorded in form-state.
    pub fn name(self) -> &'static str {
        match self {
            Step::ResizeInPlace => "resize_in_place",
            Step::StoreResources => "store_resources",
            Step::SnapshotSource => "snapshot_source",
            Step::CloneInstances => "clone_instances",
            Step::WaitHealthy => "wait_healthy",
            Step::SyncClones => "sync_clones",
            Step::AddMembers => "add_members",
            Step::ActivateMembers => "activate_members",
            Step::WaitServing => "wait_serving",
            Step::FinalSyncClones => "final_sync_clones",
            Step::PromoteReplacement => "promote_replacement",
            Step::DrainVictims => "drain_victims",
            Step::HandoffVictims => "handoff_victims",
            Step::RemoveVictimMembers => "remove_victim_members",
            Step::DeleteVictimInstances => "delete_victim_instances",
            Step::DeleteSnapshot => "delete_snapshot",
            Step::StoreCluster => "store_cluster",
            Step::CreateTemplate => "create_template",
            Step::AddTemplate => "add_template",
            Step::TemplateServing => "template_serving",
            Step::DeleteClusterRecord => "delete_cluster_record",
            Step::DeleteClusterInstances => "delete_cluster_instances",
        }
    }

    /// The step named `name`.
    pub fn from_name(name: &str) -> Option<Step> {
        ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether starting this step commits the operation: once it has started, a
    /// failure or a restart finishes the operation instead of rolling it back (a
    /// removed victim cannot be brought back).
    pub fn commits(self) -> bool {
        matches!(
            self,
            Step::RemoveVictimMembers
                | Step::DeleteVictimInstances
                | Step::DeleteSnapshot
                | Step::DeleteClusterRecord
                | Step::DeleteClusterInstances
        )
    }
}

/// The name of an operation kind as the API spells it.
pub fn kind_name(kind: i32) -> &'static str {
    form_proto::operation_kind_name(kind)
}

/// Whether the operation has reached a terminal state.
pub fn is_terminal(op: &types::Operation) -> bool {
    form_proto::operation_is_terminal(op)
}

/// `requested`, `in_progress`, `completed`, `failed` or `rolled_back`.
pub fn status_name(op: &types::Operation) -> &'static str {
    use types::operation_status::State as S;
    match op.status.as_ref().and_then(|s| s.state.as_ref()) {
        None | Some(S::Requested(_)) => "requested",
        Some(S::InProgress(_)) => "in_progress",
        Some(S::Completed(_)) => "completed",
        Some(S::Failed(_)) => "failed",
        Some(S::RolledBack(_)) => "rolled_back",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_name_reads_back() {
        for s in ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
        assert_eq!(Step::from_name("nope"), None);
    }
}
