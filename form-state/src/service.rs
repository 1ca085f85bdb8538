//! `form.state.v1.StateService` over the store.

use std::pin::Pin;
use std::sync::Arc;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_server::StateService;
use form_proto::types::v1 as types;
use sha2::{Digest as _, Sha256};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::codec;
use crate::crdt::Space;
use crate::error::StateError;
use crate::model::{read, validate, write};
use crate::store::{Store, Written};
use crate::watch;

/// The StateService of one replica.
#[derive(Debug, Clone)]
pub struct StateApi {
    store: Arc<Store>,
    /// Finished operations kept per cluster (older ones are deleted).
    operations_kept: usize,
    max_clusters: usize,
    /// Networks members' addresses must be in (empty: any).
    member_networks: Vec<form_runtime::cidr::Cidr>,
}

impl StateApi {
    /// The service over `store`, keeping `operations_kept` finished operations per
    /// cluster and at most `max_clusters` clusters.
    pub fn new(store: Arc<Store>, operations_kept: usize, max_clusters: usize) -> Self {
        Self {
            store,
            operations_kept,
            max_clusters,
            member_networks: Vec::new(),
        }
    }

    /// Refuses members whose addresses are outside `networks` (none: any address).
    pub fn with_member_networks(mut self, networks: Vec<form_runtime::cidr::Cidr>) -> Self {
        self.member_networks = networks;
        self
    }

    /// Checks `addresses` (field `field`) against the member networks; an address
    /// that is not `IP:PORT` is left to the write's own validation.
    fn within_networks(
        &self,
        field: &str,
        addresses: &[String],
    ) -> std::result::Result<(), Status> {
        for a in addresses {
            if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
                form_runtime::cidr::check_within("address", sa.ip(), &self.member_networks)
                    .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
            }
        }
        Ok(())
    }

    /// The fence `req` carries (docs/fencing.md): refused when older than the
    /// fence of `cluster`, recorded when newer (for a cluster that exists); the write
    /// checks it again, atomically with itself.
    async fn fence_of<T>(
        &self,
        req: &Request<T>,
        cluster: &str,
    ) -> std::result::Result<Option<types::Fence>, Status> {
        let Some(f) = form_runtime::fence::Fence::of(req)? else {
            return Ok(None);
        };
        let f = types::Fence {
            epoch: f.epoch,
            owner: f.owner,
        };
        self.store
            .write(|s, a| {
                if read::cluster_exists(s, cluster) {
                    write::claim_fence(s, a, self.store.now_ms(), cluster, &f)
                } else {
                    Ok(None)
                }
            })
            .await?;
        Ok(Some(f))
    }

    fn reply(&self, w: Written) -> Response<pb::WriteReply> {
        let actor = self.store.lock().actor().to_owned();
        Response::new(pb::WriteReply {
            version: Some(pb::VersionVector {
                entries: w.version.into_iter().collect(),
            }),
            sequence: self.store.sequence(w.lsn),
            replica_id: actor,
        })
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl StateService for StateApi {
    async fn put_cluster(&self, req: Request<pb::PutClusterRequest>) -> Result<pb::WriteReply> {
        let f = self.fence_of(&req, &req.get_ref().cluster_id).await?;
        let r = req.into_inner();
        {
            let g = self.store.lock();
            let s = g.state();
            if !read::cluster_exists(s, &r.cluster_id)
                && read::cluster_count(s) >= self.max_clusters
            {
                return Err(Status::resource_exhausted(format!(
                    "this replica holds {} clusters, its quota (--max-clusters); delete one first",
                    self.max_clusters
                )));
            }
        }
        let w = self
            .store
            .write(|s, a| {
                write::check_fence(s, &r.cluster_id, f.as_ref())?;
                write::put_cluster(s, a, self.store.now_ms(), &r)
            })
            .await?;
        Ok(self.reply(w))
    }

    async fn get_cluster(&self, req: Request<pb::GetClusterRequest>) -> Result<pb::Cluster> {
        let id = req.into_inner().cluster_id;
        validate::id("cluster_id", &id)?;
        let c = self.store.read(|r| read::cluster(r.state(), &id)).await?;
        c.map(Response::new).ok_or_else(|| {
            StateError::NotFound {
                what: "cluster",
                id,
            }
            .into()
        })
    }

    async fn list_clusters(
        &self,
        _: Request<pb::ListClustersRequest>,
    ) -> Result<pb::ListClustersReply> {
        let clusters = self.store.read_all(read::clusters).await?;
        Ok(Response::new(pb::ListClustersReply { clusters }))
    }

    async fn claim_cluster(&self, req: Request<pb::ClaimClusterRequest>) -> Result<pb::WriteReply> {
        let r = req.into_inner();
        let f = r
            .fence
            .ok_or_else(|| Status::invalid_argument("fence is missing; expected {epoch, owner}"))?;
        let w = self
            .store
            .write(|s, a| write::claim_fence(s, a, self.store.now_ms(), &r.cluster_id, &f))
            .await?;
        Ok(self.reply(w))
    }

    async fn delete_cluster(
        &self,
        req: Request<pb::DeleteClusterRequest>,
    ) -> Result<pb::WriteReply> {
        let f = self.fence_of(&req, &req.get_ref().cluster_id).await?;
        let id = req.into_inner().cluster_id;
        let w = self
            .store
            .write(|s, a| {
                write::check_fence(s, &id, f.as_ref())?;
                write::delete_cluster(s, a, &id)
            })
            .await?;
        Ok(self.reply(w))
    }

    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Result<pb::WriteReply> {
        let f = self.fence_of(&req, &req.get_ref().cluster_id).await?;
        let r = req.into_inner();
        if let Some(m) = &r.member {
            self.within_networks("member.addresses", &m.addresses)?;
        }
        let w = self
            .store
            .write(|s, a| {
                write::check_fence(s, &r.cluster_id, f.as_ref())?;
                write::add_member(s, a, self.store.now_ms(), &r)
            })
            .await?;
        Ok(self.reply(w))
    }

    async fn remove_member(&self, req: Request<pb::RemoveMemberRequest>) -> Result<pb::WriteReply> {
        let f = self.fence_of(&req, &req.get_ref().cluster_id).await?;
        let r = req.into_inner();
        let w = self
            .store
            .write(|s, a| {
                write::check_fence(s, &r.cluster_id, f.as_ref())?;
                write::remove_member(s, a, &r.cluster_id, &r.instance_id)
            })
            .await?;
        Ok(self.reply(w))
    }

    async fn update_member(&self, req: Request<pb::UpdateMemberRequest>) -> Result<pb::WriteReply> {
        let f = self.fence_of(&req, &req.get_ref().cluster_id).await?;
        let r = req.into_inner();
        self.within_networks("addresses", &r.addresses)?;
        let w = self
            .store
            .write(|s, a| {
                write::check_fence(s, &r.cluster_id, f.as_ref())?;
                write::update_member(s, a, self.store.now_ms(), &r)
            })
            .await?;
        Ok(self.reply(w))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<pb::WriteReply> {
        let r = req.into_inner();
        let w = self
            .store
            .write(|s, a| write::heartbeat(s, a, self.store.now_ms(), &r))
            .await?;
        Ok(self.reply(w))
    }

    async fn controller_heartbeat(
        &self,
        req: Request<pb::ControllerHeartbeatRequest>,
    ) -> Result<pb::WriteReply> {
        let r = req.into_inner();
        let w = self
            .store
            .write(|s, a| write::controller_heartbeat(s, a, self.store.now_ms(), &r))
            .await?;
        Ok(self.reply(w))
    }

    async fn node_heartbeat(
        &self,
        req: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<pb::WriteReply> {
        let sender = req
            .extensions()
            .get::<form_runtime::tls::Peer>()
            .and_then(|p| p.identity.as_ref())
            .map(ToString::to_string)
            .unwrap_or_default();
        let r = req.into_inner();
        let w = self
            .store
            .write(|s, a| write::node_heartbeat(s, a, self.store.now_ms(), &r, &sender))
            .await?;
        Ok(self.reply(w))
    }

    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Result<pb::ListNodesReply> {
        // A record per node, read under the lock: cheaper than the copy of the whole
        // state a read off the lock takes (placement reads them at every operation).
        let nodes = self.store.read(|r| read::nodes(r.state())).await?;
        Ok(Response::new(pb::ListNodesReply { nodes }))
    }

    async fn set_node_cordon(
        &self,
        req: Request<pb::SetNodeCordonRequest>,
    ) -> Result<pb::WriteReply> {
        let r = req.into_inner();
        let w = self
            .store
            .write(|s, a| write::set_node_cordon(s, a, self.store.now_ms(), &r))
            .await?;
        Ok(self.reply(w))
    }

    async fn list_controllers(
        &self,
        _req: Request<pb::ListControllersRequest>,
    ) -> Result<pb::ListControllersReply> {
        let controllers = self.store.read(|r| read::controllers(r.state())).await?;
        Ok(Response::new(pb::ListControllersReply { controllers }))
    }

    async fn put_operation(&self, req: Request<pb::PutOperationRequest>) -> Result<pb::WriteReply> {
        let cluster = req
            .get_ref()
            .operation
            .as_ref()
            .map(|o| o.cluster_id.clone())
            .unwrap_or_default();
        let f = self.fence_of(&req, &cluster).await?;
        let r = req.into_inner();
        // Which old operations go with an ending one: found among its cluster's through
        // the replica's index (the write checks each again).
        let prune = if r
            .operation
            .as_ref()
            .is_some_and(form_proto::operation_is_terminal)
        {
            let keep = self.operations_kept;
            self.store
                .read(|rep| {
                    let ids = rep.operations().of_cluster(&cluster);
                    write::finished_beyond(rep.state(), ids, &r, keep)
                })
                .await?
        } else {
            Vec::new()
        };
        let w = self
            .store
            .write(|s, a| {
                write::check_fence(s, &cluster, f.as_ref())?;
                write::put_operation_pruning(s, a, self.store.now_ms(), &r, &prune)
            })
            .await?;
        Ok(self.reply(w))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<types::Operation> {
        let id = req.into_inner().operation_id;
        validate::id("operation_id", &id)?;
        let op = self.store.read(|r| read::operation(r.state(), &id)).await?;
        op.map(Response::new).ok_or_else(|| {
            StateError::NotFound {
                what: "operation",
                id,
            }
            .into()
        })
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<pb::ListOperationsReply> {
        let r = req.into_inner();
        if !r.cluster_id.is_empty() {
            validate::id("cluster_id", &r.cluster_id)?;
        }
        // One cluster's, or the unfinished ones: through the replica's index, under its
        // lock; every operation: on a copy, off the lock.
        let listed = self
            .store
            .read(|rep| {
                let ids = rep
                    .operations()
                    .candidates(&r.cluster_id, r.unfinished_only)?;
                Some(read::operations_among(
                    rep.state(),
                    ids,
                    &r.cluster_id,
                    r.limit as usize,
                    r.unfinished_only,
                ))
            })
            .await?;
        let operations = match listed {
            Some(ops) => ops,
            None => {
                self.store
                    .read_all(move |s| read::operations(s, "", r.limit as usize, false))
                    .await?
            }
        };
        Ok(Response::new(pb::ListOperationsReply { operations }))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Self::WatchStream> {
        let r = req.into_inner();
        if !r.cluster_id.is_empty() {
            validate::id("cluster_id", &r.cluster_id)?;
        }
        Ok(Response::new(Box::pin(watch::stream(
            self.store.clone(),
            r,
        ))))
    }

    async fn digest(&self, _: Request<pb::DigestRequest>) -> Result<pb::DigestReply> {
        // A clone of the state is cheap (shared shards): the encoding and hash run off
        // the replica's lock, on the blocking pool.
        let (state, version, actor) = self
            .store
            .read(|r| (r.state().clone(), r.version(), r.actor().to_owned()))
            .await?;
        let reply = form_runtime::clock::blocking(move || {
            let encoded = codec::encode_state(&state);
            pb::DigestReply {
                sha256: Sha256::digest(&encoded).to_vec(),
                state_bytes: encoded.len() as u64,
                version: Some(pb::VersionVector {
                    entries: version.into_iter().collect(),
                }),
                clusters: read::clusters(&state).len() as u64,
                operations: state.ids(Space::Operation).len() as u64,
                replica_id: actor,
            }
        })
        .await
        .map_err(|e| Status::internal(format!("digest: {e}")))?;
        Ok(Response::new(reply))
    }
}
