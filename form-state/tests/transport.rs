//! The production gossip driver (`gossip::run_links`) over in-memory transports: each
//! link calls the peer's `GossipApi` directly, with no socket, and one link leads to a
//! black hole whose calls never end. Writes still reach every other replica, and the
//! whole platform stops when asked.

use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1 as pb;
use form_proto::state::v1::gossip_service_server::GossipService;
use form_runtime::shutdown::{self, ShutdownKind};
use form_state::crdt::{DeltaBuilder, Field, Key, Value};
use form_state::gossip::{GossipApi, GossipConfig, Peers, ReplicationPolicy, Transport, run_links};
use form_state::replica::Limits;
use form_state::store::{Store, StoreConfig};
use form_testkit::dir::TestDir;
use tonic::{Request, Status};

/// Calls the peer's service in this process.
struct Direct(GossipApi);

impl Transport for Direct {
    async fn push(&mut self, batch: pb::DeltaBatch) -> Result<pb::PushAck, Status> {
        Ok(self.0.push_deltas(Request::new(batch)).await?.into_inner())
    }

    async fn anti_entropy(
        &mut self,
        req: pb::AntiEntropyRequest,
    ) -> Result<pb::AntiEntropyReply, Status> {
        Ok(self.0.anti_entropy(Request::new(req)).await?.into_inner())
    }
}

/// Either a peer in this process or a black hole: a call that never returns.
enum Link {
    Direct(Direct),
    Hole,
}

impl Transport for Link {
    async fn push(&mut self, batch: pb::DeltaBatch) -> Result<pb::PushAck, Status> {
        match self {
            Link::Direct(d) => d.push(batch).await,
            Link::Hole => std::future::pending().await,
        }
    }

    async fn anti_entropy(
        &mut self,
        req: pb::AntiEntropyRequest,
    ) -> Result<pb::AntiEntropyReply, Status> {
        match self {
            Link::Direct(d) => d.anti_entropy(req).await,
            Link::Hole => std::future::pending().await,
        }
    }
}

fn open(dir: &TestDir, id: &str, authorized: &std::path::Path) -> Arc<Store> {
    Store::open(&StoreConfig {
        replica_id: id.to_owned(),
        data_dir: dir.path().join(id),
        node_key: dir.path().join(format!("{id}.key")),
        authorized_keys: Some(authorized.to_owned()),
        snapshot_every: 10_000,
        limits: Limits::default(),
    })
    .unwrap_or_else(|e| panic!("open {id}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_over_an_in_memory_transport_replicate_past_a_black_hole() {
    let dir = TestDir::new("gossip-transport");
    let ids = ["r0", "r1", "r2"];
    let mut lines = String::new();
    for id in ids {
        let key = form_state::keys::load_or_create_node_key(&dir.path().join(format!("{id}.key")))
            .unwrap_or_else(|e| panic!("key {id}: {e}"));
        lines += &format!(
            "{id} {}\n",
            form_state::keys::hex(key.verifying_key().as_bytes())
        );
    }
    let authorized = dir.path().join("authorized");
    std::fs::write(&authorized, lines).unwrap_or_else(|e| panic!("write keys: {e}"));
    let stores: Vec<Arc<Store>> = ids.iter().map(|id| open(&dir, id, &authorized)).collect();
    let peers: Vec<Arc<Peers>> = ids.iter().map(|_| Arc::new(Peers::default())).collect();
    let apis: Vec<GossipApi> = (0..3)
        .map(|i| GossipApi::new(stores[i].clone(), peers[i].clone(), 64))
        .collect();
    let (handle, stop) = shutdown::channel();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut links: Vec<(String, Link)> = (0..3)
            .filter(|j| *j != i)
            .map(|j| (ids[j].to_owned(), Link::Direct(Direct(apis[j].clone()))))
            .collect();
        links.push(("hole".into(), Link::Hole));
        let config = GossipConfig {
            peers: Vec::new(),
            sync_interval: Duration::from_millis(20),
            anti_entropy_interval: Duration::from_millis(200),
            batch_size: 64,
            policy: ReplicationPolicy::DeltaSync,
        };
        tasks.push(tokio::spawn(run_links(
            stores[i].clone(),
            peers[i].clone(),
            config,
            links,
            Arc::new(tokio::sync::Notify::new()),
            stop.clone(),
        )));
    }
    for n in 0..20 {
        let id = format!("c{n}");
        stores[n % 3]
            .write(|s, actor| {
                let mut b = DeltaBuilder::new(s, actor);
                b.set(
                    Key::cluster(&id, Field::Domain),
                    Value::Text(id.clone()),
                    0,
                    1,
                );
                Ok(b.build())
            })
            .await
            .unwrap_or_else(|e| panic!("write {id}: {e}"));
    }
    // Well inside the 5 s a black-holed call used to cost every round.
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(3),
        async {
            let v: Vec<_> = stores.iter().map(|s| s.lock().state().clone()).collect();
            v.iter().all(|s| s == &v[0]) && v[0].ids(form_state::crdt::Space::Cluster).len() == 20
        },
        "the three replicas did not converge on the 20 writes"
    );
    handle.trigger(ShutdownKind::Graceful);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap_or_else(|_| panic!("a gossip task did not stop"))
            .unwrap_or_else(|e| panic!("a gossip task failed: {e}"));
    }
}
