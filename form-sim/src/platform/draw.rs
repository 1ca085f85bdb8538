//! The operations a seeded run draws, and what each must have done once it ended:
//! checked by what the nodes run and what form-state records, not by the operation's
//! own report.

use std::collections::BTreeSet;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_scaler::ops::plan::Request;
use form_vmm_service::hypervisor::Hypervisor;

use super::InProcess;
use super::run::members;
use crate::rng::Rng;

/// The sizes a resize draws from: (vCPUs, MiB).
const SIZES: [(u32, u64); 4] = [(1, 256), (2, 256), (1, 512), (2, 512)];

/// What the cluster is, as far as the run's operations have changed it.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Members.
    pub count: u32,
    /// (vCPUs, MiB) of every instance.
    pub size: (u32, u64),
}

/// An operation drawn, and what it must have done.
#[derive(Debug, Clone)]
pub enum Drawn {
    /// To this many instances.
    Scale(u32),
    /// Every instance to this size, in place.
    Resize((u32, u64)),
    /// This member replaced by a new one.
    Replace(String),
}

impl Drawn {
    /// An operation on `c`: mostly scales (to a count from `to`, which the caller drew),
    /// a resize or a replacement (of one of several members) one time in ten each, by
    /// `kinds`. `None` when the draw changes nothing.
    pub async fn draw(p: &InProcess, c: &Cluster, to: u32, kinds: &mut Rng) -> Option<Self> {
        match kinds.below(10) {
            8 => {
                let size = SIZES[kinds.below(SIZES.len())];
                (size != c.size).then_some(Self::Resize(size))
            }
            // A sole member is not replaced: a replacement clones another member (or
            // a standby snapshot, which these clusters do not keep), and the request
            // is refused as such.
            9 if c.count >= 2 => {
                let ids: Vec<String> = members(p, "web")
                    .await
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect();
                let id = ids.get(kinds.below(ids.len().max(1)))?.clone();
                Some(Self::Replace(id))
            }
            _ => (to != c.count).then_some(Self::Scale(to)),
        }
    }

    /// The request, as operation `id`.
    pub fn request(&self, c: &Cluster, id: &str) -> Request {
        let mut r = Request {
            operation_id: id.into(),
            immediate: true,
            ..Default::default()
        };
        match self {
            Self::Scale(to) => {
                r.kind = if *to > c.count {
                    types::OperationKind::ScaleOut
                } else {
                    types::OperationKind::ScaleIn
                } as i32;
                r.target_count = *to;
            }
            Self::Resize((vcpus, memory_mib)) => {
                r.kind = types::OperationKind::Resize as i32;
                r.target_resources = Some(types::Resources {
                    vcpus: *vcpus,
                    memory_mib: *memory_mib,
                });
            }
            Self::Replace(instance) => {
                r.kind = types::OperationKind::ReplaceInstance as i32;
                r.instance_id = instance.clone();
            }
        }
        r
    }

    /// Its kind, for a run's outcomes.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Scale(_) => "scales",
            Self::Resize(_) => "resizes",
            Self::Replace(_) => "replacements",
        }
    }

    /// A few words for the run's history.
    pub fn describe(&self, c: &Cluster) -> String {
        match self {
            Self::Scale(to) => format!("scale {}->{to}", c.count),
            Self::Resize((v, m)) => {
                format!("resize {}/{}->{v}/{m}", c.size.0, c.size.1)
            }
            Self::Replace(id) => format!("replace {id}"),
        }
    }

    /// Checks that the operation, which ended `status`, did what that says: completed,
    /// the cluster is as asked; rolled back, as it was (`before`). Returns the cluster
    /// as it now is. `crashed`: a node crashed under it, and the controller has
    /// replaced what the crash lost since.
    pub async fn check(
        &self,
        p: &InProcess,
        before: &Cluster,
        status: &str,
        crashed: bool,
    ) -> Result<Cluster, String> {
        let done = match status {
            "completed" => true,
            "rolled_back" => false,
            other => return Err(format!("it ended {other}")),
        };
        let now: BTreeSet<String> = members(p, "web")
            .await
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let count = now.len() as u32;
        let mut after = Cluster {
            count,
            size: before.size,
        };
        match self {
            Self::Scale(to) => {
                let want = if done { *to } else { before.count };
                if count != want {
                    return Err(format!("{count} members, not {want}"));
                }
            }
            Self::Resize(size) => {
                if count != before.count {
                    return Err(format!("{count} members, not {}", before.count));
                }
                let want = if done { *size } else { before.size };
                sizes_are(p, want).await?;
                after.size = want;
            }
            Self::Replace(id) => {
                if count != before.count {
                    return Err(format!("{count} members, not {}", before.count));
                }
                // Rolled back with a node crashed under it: the controller may have
                // replaced the member since, for its own reason (its instance was
                // lost), so only a completed replacement is held to it.
                let held = done || !crashed;
                if held && now.contains(id) == done {
                    return Err(if done {
                        format!("{id} is still a member")
                    } else {
                        format!("{id} is no longer a member")
                    });
                }
            }
        }
        Ok(after)
    }
}

/// Every instance the nodes run, and form-state's record of the cluster, have `size`.
async fn sizes_are(p: &InProcess, size: (u32, u64)) -> Result<(), String> {
    let want = types::Resources {
        vcpus: size.0,
        memory_mib: size.1,
    };
    for n in p.nodes() {
        for i in n.backend.list().await {
            if i.spec.resources != want {
                return Err(format!(
                    "{} on {} has {:?}, not {want:?}",
                    i.spec.instance_id, n.id, i.spec.resources
                ));
            }
        }
    }
    let recorded = p
        .state()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: "web".into(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .resources;
    if recorded != Some(want) {
        return Err(format!("form-state records {recorded:?}, not {want:?}"));
    }
    Ok(())
}
