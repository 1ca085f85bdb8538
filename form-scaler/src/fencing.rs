//! This controller's side of fencing (docs/fencing.md). Before it changes anything of a
//! cluster it claims an epoch in form-state (`ClaimCluster`), higher than any it has
//! seen for the cluster; an operation, a health or scaling round then runs in a task
//! scope ([`FENCE`]) in which every call to form-state, the vmm nodes and the
//! balancers carries that epoch in the `form-fence` header ([`FenceHeader`]). A call
//! refused as stale means another controller claimed the cluster since: the epoch is
//! forgotten, and a later run claims anew only if this controller owns the cluster
//! then.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_runtime::fence::{Fence, HEADER};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::platform::OpError;

tokio::task_local! {
    /// The fence the calls of the current task carry.
    pub static FENCE: Fence;
}

/// Adds the current task's fence, if it runs under one, to every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct FenceHeader;

impl Interceptor for FenceHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Ok(v) = FENCE.try_with(Fence::header)
            && let Ok(v) = v.parse()
        {
            req.metadata_mut().insert(HEADER, v);
        }
        Ok(req)
    }
}

/// A channel whose calls carry the task's fence.
pub type Ch = InterceptedService<Channel, FenceHeader>;

/// `channel`, with the fence header on every call.
pub fn fenced(channel: Channel) -> Ch {
    InterceptedService::new(channel, FenceHeader)
}

/// Runs `f` with the calls it makes carrying `fence`; spawned tasks must be wrapped
/// again ([`scoped`]).
pub async fn with<F: std::future::Future>(fence: Fence, f: F) -> F::Output {
    FENCE.scope(fence, f).await
}

/// `f` wrapped in the current task's fence (if any), for `tokio::spawn`.
pub fn scoped<F>(f: F) -> impl std::future::Future<Output = F::Output> + Send
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let fence = FENCE.try_with(Clone::clone).ok();
    async move {
        match fence {
            Some(fence) => FENCE.scope(fence, f).await,
            None => f.await,
        }
    }
}

/// The epochs this controller holds, by cluster.
#[derive(Debug, Default)]
pub struct Epochs {
    held: Mutex<HashMap<String, Fence>>,
}

impl Epochs {
    /// The epoch this controller holds for `cluster`, claimed now when it holds none,
    /// or one below the cluster's fence in form-state (which it then forgets): one
    /// above that fence. A claim refused as stale (another
    /// controller claimed a higher one meanwhile) is an error; the caller tries later.
    pub async fn hold(
        &self,
        me: &str,
        state: &form_proto::state::v1::state_service_client::StateServiceClient<Ch>,
        cluster: &str,
    ) -> Result<Fence, OpError> {
        let seen = match state
            .clone()
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: cluster.to_owned(),
            })
            .await
        {
            Ok(c) => c.into_inner().fence.map_or(0, |f| f.epoch),
            // A cluster being created: its fence may be claimed before it exists.
            Err(s) if s.code() == tonic::Code::NotFound => 0,
            Err(s) => return Err(OpError::rpc(format!("reading cluster {cluster}"), &s)),
        };
        if let Some(f) = self.get(cluster) {
            if f.epoch >= seen {
                return Ok(f);
            }
            self.forget(cluster);
        }
        let f = Fence::next(seen, me);
        state
            .clone()
            .claim_cluster(state_pb::ClaimClusterRequest {
                cluster_id: cluster.to_owned(),
                fence: Some(types::Fence {
                    epoch: f.epoch,
                    owner: f.owner.clone(),
                }),
            })
            .await
            .map_err(|s| OpError::rpc(format!("claiming cluster {cluster}"), &s))?;
        tracing::info!(cluster, epoch = f.epoch, "fence claimed");
        metrics::counter!("form_scaler_fences_claimed_total").increment(1);
        self.lock().insert(cluster.to_owned(), f.clone());
        Ok(f)
    }

    /// The epoch held for `cluster`, if any.
    pub fn get(&self, cluster: &str) -> Option<Fence> {
        self.lock().get(cluster).cloned()
    }

    /// Forgets the epoch of `cluster` (a call was refused as stale, or the cluster
    /// moved to another controller).
    pub fn forget(&self, cluster: &str) {
        if self.lock().remove(cluster).is_some() {
            tracing::warn!(
                cluster,
                "fence lost: another controller claimed the cluster"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fence>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
