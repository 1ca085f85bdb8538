//! The clusters as form-state has them, kept by following its `Watch`
//! (`form_runtime::watch`) instead of listing the whole fleet at every evaluation
//! round and every continuous-sync tick: a list costs form-state a read of every
//! cluster and member, a watch only what changed.
//!
//! The view is used only while it is in step with the stream: from the `Synced` that
//! ends a snapshot until the stream ends, fails or stalls (nothing for 5 s, while a
//! replica sends a progress mark every second when idle: `form_runtime::watch`).
//! Otherwise (at start, while a new stream sends its snapshot, while form-state is
//! unreachable or hangs) [`Clusters::list`] asks form-state, so no decision is taken
//! on a view that stopped following. The stream is opened on the channel the
//! controller's other calls use; after that channel moved to another replica, the
//! view follows the replica it was opened on while that one keeps sending, which is
//! as eventually consistent as any replica's answer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::shutdown::Shutdown;
use form_runtime::watch::{self, Follower};
use tonic::Status;

use crate::fencing::Ch;

/// Clusters by id.
pub type ById = BTreeMap<String, Arc<state_pb::Cluster>>;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Clusters {
    inner: Mutex<View>,
}

#[derive(Debug, Default)]
struct View {
    /// The clusters; copied on change only while a reader holds them.
    live: Arc<ById>,
    /// In step with the stream.
    synced: bool,
    /// A snapshot being received (after a `Reset`).
    staging: Option<ById>,
}

impl Clusters {
    /// The clusters, from the view when it is in step, else listed from form-state.
    pub async fn list(&self, state: &StateServiceClient<Ch>) -> Result<Arc<ById>, Status> {
        if let Some(v) = self.synced() {
            return Ok(v);
        }
        let listed = state
            .clone()
            .list_clusters(state_pb::ListClustersRequest {})
            .await?
            .into_inner()
            .clusters;
        Ok(Arc::new(
            listed
                .into_iter()
                .map(|c| (c.cluster_id.clone(), Arc::new(c)))
                .collect(),
        ))
    }

    /// The view, if it is in step with the stream.
    pub fn synced(&self) -> Option<Arc<ById>> {
        let v = self.lock();
        v.synced.then(|| v.live.clone())
    }

    /// Follows form-state's watch over `state` until shutdown.
    pub async fn follow(self: Arc<Self>, state: StateServiceClient<Ch>, shutdown: Shutdown) {
        let open = || {
            let mut client = state.clone();
            async move { Ok(client.watch(watch::from_start()).await?.into_inner()) }
        };
        let mut me = Following(self);
        watch::follow("controller", open, &mut me, shutdown).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Following(Arc<Clusters>);

impl Follower for Following {
    fn event(&mut self, ev: state_pb::WatchEvent) {
        use state_pb::watch_event::Change;
        let mut v = self.0.lock();
        match ev.change {
            Some(Change::Reset(_)) => {
                v.synced = false;
                v.staging = Some(ById::new());
            }
            Some(Change::Cluster(c)) => {
                let c = Arc::new(c);
                match v.staging.as_mut() {
                    Some(s) => {
                        s.insert(c.cluster_id.clone(), c);
                    }
                    None => {
                        Arc::make_mut(&mut v.live).insert(c.cluster_id.clone(), c);
                    }
                }
            }
            Some(Change::ClusterDeleted(id)) => match v.staging.as_mut() {
                Some(s) => {
                    s.remove(&id);
                }
                None => {
                    Arc::make_mut(&mut v.live).remove(&id);
                }
            },
            Some(Change::Synced(_)) => {
                if let Some(s) = v.staging.take() {
                    v.live = Arc::new(s);
                    v.synced = true;
                }
            }
            Some(Change::Operation(_)) | None => {}
        }
    }

    fn lost(&mut self) {
        let mut v = self.0.lock();
        v.synced = false;
        v.staging = None;
    }
}

#[cfg(test)]
mod tests {
    use state_pb::watch_event::Change;

    use super::*;

    fn ev(change: Change) -> state_pb::WatchEvent {
        state_pb::WatchEvent {
            sequence: 1,
            change: Some(change),
        }
    }

    fn cluster(id: &str, domain: &str) -> Change {
        Change::Cluster(state_pb::Cluster {
            cluster_id: id.into(),
            domain: domain.into(),
            ..Default::default()
        })
    }

    fn ids(c: &Clusters) -> Option<Vec<String>> {
        c.synced().map(|v| v.keys().cloned().collect())
    }

    #[test]
    fn in_step_only_between_a_snapshot_and_the_loss_of_its_stream() {
        let c = Arc::new(Clusters::default());
        let mut f = Following(c.clone());
        assert_eq!(ids(&c), None, "nothing followed yet");
        f.event(ev(Change::Reset(state_pb::Reset::default())));
        f.event(ev(cluster("a", "a.test")));
        assert_eq!(ids(&c), None, "a snapshot is not whole before Synced");
        f.event(ev(cluster("b", "b.test")));
        f.event(ev(Change::Synced(state_pb::Synced {})));
        assert_eq!(ids(&c), Some(vec!["a".into(), "b".into()]));

        let held = c.synced();
        f.event(ev(cluster("a", "a2.test")));
        f.event(ev(Change::ClusterDeleted("b".into())));
        assert_eq!(ids(&c), Some(vec!["a".into()]));
        assert_eq!(
            held.map(|v| v["a"].domain.clone()).as_deref(),
            Some("a.test"),
            "a view taken earlier does not change under its reader"
        );
        assert_eq!(
            c.synced().map(|v| v["a"].domain.clone()).as_deref(),
            Some("a2.test")
        );

        f.lost();
        assert_eq!(ids(&c), None, "a lost stream is not followed");
        // A new stream's snapshot replaces everything: what it does not name is gone.
        f.event(ev(Change::Reset(state_pb::Reset::default())));
        f.event(ev(cluster("c", "c.test")));
        f.event(ev(Change::Synced(state_pb::Synced {})));
        assert_eq!(ids(&c), Some(vec!["c".into()]));
    }
}
