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
        clock: Default::default(),
        sync_latency: None,
    })
    .unwrap_or_else(|e| panic!("open {id}: {e}"))
}

/// Replicas `ids` under `dir`, each authorizing every other's key: their stores, peer
/// tables and gossip services.
fn replicas(dir: &TestDir, ids: &[&str]) -> (Vec<Arc<Store>>, Vec<Arc<Peers>>, Vec<GossipApi>) {
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
    let stores: Vec<Arc<Store>> = ids.iter().map(|id| open(dir, id, &authorized)).collect();
    let peers: Vec<Arc<Peers>> = ids.iter().map(|_| Arc::new(Peers::default())).collect();
    let apis: Vec<GossipApi> = (0..ids.len())
        .map(|i| GossipApi::new(stores[i].clone(), peers[i].clone(), 64))
        .collect();
    (stores, peers, apis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_over_an_in_memory_transport_replicate_past_a_black_hole() {
    let dir = TestDir::new("gossip-transport");
    let ids = ["r0", "r1", "r2"];
    let (stores, peers, apis) = replicas(&dir, &ids);
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
            push_gather: Duration::from_millis(1),
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

/// A link that loses pushes while `lose` is above zero (each lost push counts it
/// down): the peer never sees them, and the sender sees the call fail.
struct Lossy {
    peer: Direct,
    lose: Arc<std::sync::atomic::AtomicU64>,
}

impl Transport for Lossy {
    async fn push(&mut self, batch: pb::DeltaBatch) -> Result<pb::PushAck, Status> {
        use std::sync::atomic::Ordering;
        let lost = self
            .lose
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            return Err(Status::unavailable("lost on the way"));
        }
        self.peer.push(batch).await
    }

    async fn anti_entropy(
        &mut self,
        req: pb::AntiEntropyRequest,
    ) -> Result<pb::AntiEntropyReply, Status> {
        self.peer.anti_entropy(req).await
    }
}

/// Three replicas in a mesh of [`Lossy`] links sharing `lose`, pushing every write at
/// once, with rounds every `sync`; anti-entropy is left out (an hour).
fn lossy_mesh(
    dir: &TestDir,
    sync: Duration,
    lose: &Arc<std::sync::atomic::AtomicU64>,
) -> (
    Vec<Arc<Store>>,
    form_runtime::shutdown::ShutdownHandle,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ids = ["r0", "r1", "r2"];
    let (stores, peers, apis) = replicas(dir, &ids);
    let (handle, stop) = shutdown::channel();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let links: Vec<(String, Lossy)> = (0..3)
            .filter(|j| *j != i)
            .map(|j| {
                let peer = Direct(apis[j].clone());
                (
                    ids[j].to_owned(),
                    Lossy {
                        peer,
                        lose: lose.clone(),
                    },
                )
            })
            .collect();
        let config = GossipConfig {
            peers: Vec::new(),
            sync_interval: sync,
            push_gather: Duration::from_millis(1),
            anti_entropy_interval: Duration::from_secs(3600),
            batch_size: 64,
            policy: ReplicationPolicy::DeltaSync,
        };
        let urgent = Arc::new(tokio::sync::Notify::new());
        stores[i].set_urgent(urgent.clone(), None);
        tasks.push(tokio::spawn(run_links(
            stores[i].clone(),
            peers[i].clone(),
            config,
            links,
            urgent,
            stop.clone(),
        )));
    }
    (stores, handle, tasks)
}

async fn write_cluster(store: &Store, id: &str) {
    store
        .write(|s, actor| {
            let mut b = DeltaBuilder::new(s, actor);
            b.set(
                Key::cluster(id, Field::Domain),
                Value::Text(id.to_owned()),
                0,
                1,
            );
            Ok(b.build())
        })
        .await
        .unwrap_or_else(|e| panic!("write {id}: {e}"));
}

fn everywhere(stores: &[Arc<Store>], n: usize) -> bool {
    stores
        .iter()
        .all(|s| s.lock().state().ids(form_state::crdt::Space::Cluster).len() == n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_pushed_at_once_and_a_lost_push_is_repaired_by_the_rounds() {
    use std::sync::atomic::Ordering;
    // Rounds every minute: within the first seconds, only a push at once can carry a
    // write (the first round of each link, at start, is spent before the writes).
    let lose = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let dir = TestDir::new("gossip-push-at-once");
    let (stores, handle, tasks) = lossy_mesh(&dir, Duration::from_secs(60), &lose);
    // Let the links' first rounds (at start) end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_cluster(&stores[0], "c0").await;
    write_cluster(&stores[1], "c1").await;
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(5),
        async { everywhere(&stores, 2) },
        "writes pushed at once did not reach every replica (the rounds are a minute apart)"
    );
    handle.trigger(ShutdownKind::Graceful);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    // Every push at once lost: the rounds (every 200 ms here) deliver.
    let dir = TestDir::new("gossip-push-lost");
    let (stores, handle, tasks) = lossy_mesh(&dir, Duration::from_millis(200), &lose);
    tokio::time::sleep(Duration::from_millis(300)).await;
    lose.store(2, Ordering::SeqCst);
    write_cluster(&stores[0], "c0").await;
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(5),
        async { everywhere(&stores, 1) },
        "a lost push was not repaired by the rounds"
    );
    assert_eq!(
        lose.load(Ordering::SeqCst),
        0,
        "two pushes were lost on the way"
    );
    handle.trigger(ShutdownKind::Graceful);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
}
