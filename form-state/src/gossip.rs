//! Replication between replicas: the `GossipService` server and the loop that pushes
//! deltas to each peer and runs anti-entropy with it.
//!
//! Each peer has its own task (a slow peer delays only itself). Every `sync_interval`
//! (or at once after a write asked for it) the replica pushes to each peer the durable
//! deltas the peer lacks (per the version vector it last reported), at most
//! `batch_size` per message, never the peer's own deltas; when the deltas it needs were
//! trimmed, the full state instead. Every `anti_entropy_interval` it sends its version vector to each peer and
//! takes what it lacks. A peer seen for the first time starts with anti-entropy, so a
//! restarted replica is not flooded with what it already has. See docs/gossip.md.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, Verifier};
use form_proto::state::v1 as pb;
use form_proto::state::v1::gossip_service_client::GossipServiceClient;
use form_proto::state::v1::gossip_service_server::GossipService;
use form_runtime::addr::HostPort;
use form_runtime::shutdown::Shutdown;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::codec;
use crate::crdt::State;
use crate::error::StateError;
use crate::replica::Missing;
use crate::store::Store;

/// How replicas exchange state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum ReplicationPolicy {
    /// Push deltas; full state only when needed deltas were compacted away.
    DeltaSync,
    /// Push the whole state every interval (simple, costly; for comparison).
    FullSync,
    /// Like `DeltaSync`, but a write touching a high-priority field is pushed at once
    /// instead of at the next interval.
    PrioritizedSync {
        /// Field groups pushed at once: `members`, `health`, `heartbeats`, `operations`, `clusters`.
        high_priority_fields: Vec<String>,
    },
}

/// The fields of the high-priority groups named in `groups`.
pub fn high_priority_fields(groups: &[String]) -> Result<Vec<crate::crdt::Field>, String> {
    use crate::crdt::Field as F;
    let mut out = Vec::new();
    for g in groups {
        out.extend_from_slice(match g.as_str() {
            "members" => &[F::MemberPresence, F::NodeId, F::Addresses, F::MemberStatus, F::Generation, F::MemberResources, F::MemberStateSync, F::MemberDrain][..],
            "health" => &[F::Health, F::HeartbeatsSkipped][..],
            "heartbeats" => &[F::Heartbeat, F::StateWrites, F::HeartbeatUsage][..],
            "operations" => &[F::OperationBody, F::OperationStatus][..],
            "clusters" => &[F::ClusterPresence, F::Domain, F::Workload, F::Policy, F::Template, F::Affinity, F::ClusterResources, F::StateSync, F::Drain, F::Standby, F::NodeSelector][..],
            other => {
                return Err(format!(
                    "'{other}' is not a field group; expected members, health, heartbeats, operations or clusters"
                ));
            }
        });
    }
    Ok(out)
}

/// Gossip settings.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// Peers' gRPC addresses.
    pub peers: Vec<HostPort>,
    /// Push interval.
    pub sync_interval: Duration,
    /// Anti-entropy interval.
    pub anti_entropy_interval: Duration,
    /// Most deltas per message.
    pub batch_size: usize,
    /// Policy.
    pub policy: ReplicationPolicy,
}

/// Deltas a batch may hold to be verified on the async worker that received it.
const INLINE_VERIFY: usize = 8;

/// Time a gossip call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest gossip message accepted or sent (a full state can be large).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// What this replica knows of one peer.
#[derive(Debug, Default, Clone)]
struct PeerView {
    actor: Option<String>,
    known: BTreeMap<String, u64>,
    contacted: bool,
}

/// Per-peer knowledge shared by the server (which learns from incoming pushes) and
/// the loop (which learns from replies).
#[derive(Debug, Default)]
pub struct Peers {
    by_addr: Mutex<BTreeMap<String, PeerView>>,
}

impl Peers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerView>> {
        self.by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A peer with `actor` holds these deltas (it sent them): never send them back.
    fn learned_from(&self, actor: &str, deltas: &[crate::envelope::VerifiedDelta]) {
        let mut peers = self.lock();
        for view in peers
            .values_mut()
            .filter(|v| v.actor.as_deref() == Some(actor))
        {
            for d in deltas {
                for (a, n) in d.deps.iter().chain([(&d.delta.actor, &d.delta.last())]) {
                    let e = view.known.entry(a.clone()).or_insert(0);
                    *e = (*e).max(*n);
                }
            }
        }
    }
}

fn vv(m: &BTreeMap<String, u64>) -> pb::VersionVector {
    pb::VersionVector {
        entries: m.clone().into_iter().collect(),
    }
}

fn from_vv(v: Option<pb::VersionVector>) -> BTreeMap<String, u64> {
    v.map(|v| v.entries.into_iter().collect())
        .unwrap_or_default()
}

/// The whole state, signed, once everything it holds is durable (a full state must
/// never carry a write that a crash could still undo).
async fn sign_state(store: &Store) -> Result<pb::SignedFullState, StateError> {
    let (state, version, actor, lsn, key) = {
        let r = store.lock();
        (
            codec::encode_state(r.state()),
            vv(&r.version()),
            r.actor().to_owned(),
            r.lsn(),
            r.key().clone(),
        )
    };
    store.wait_durable(lsn).await?;
    let public_key = key.verifying_key().to_bytes().to_vec();
    let v = version.encode_to_vec();
    // Signing a whole state takes long: not on an async worker.
    let (state, signature) = blocking(move || {
        let mut msg = state;
        let n = msg.len();
        msg.extend(v);
        let signature = key.sign(&msg).to_bytes().to_vec();
        msg.truncate(n);
        (msg, signature)
    })
    .await?;
    Ok(pb::SignedFullState {
        signature,
        public_key,
        origin_id: actor,
        state,
        version: Some(version),
    })
}

/// `f` on a thread of the blocking pool: whole-state and signature work that would
/// otherwise hold an async worker (and every task queued behind it).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Unavailable(format!("a blocking task failed: {e}")))
}

/// Checks a full state's signature and decodes it, on the blocking pool.
async fn open_state(store: &Store, s: pb::SignedFullState) -> Result<State, StateError> {
    let vk = store
        .lock()
        .authorized()
        .check_key(&s.origin_id, &s.public_key)?;
    blocking(move || verify_state(vk, &s)).await?
}

fn verify_state(
    vk: ed25519_dalek::VerifyingKey,
    s: &pb::SignedFullState,
) -> Result<State, StateError> {
    let reject = |reason, message: String| StateError::Rejected {
        reason,
        origin: s.origin_id.clone(),
        message,
    };
    let sig =
        Signature::from_slice(&s.signature).map_err(|e| reject("malformed", e.to_string()))?;
    let mut msg = s.state.clone();
    msg.extend(s.version.clone().unwrap_or_default().encode_to_vec());
    vk.verify(&msg, &sig)
        .map_err(|e| reject("bad_signature", e.to_string()))?;
    codec::decode_state(&s.state).map_err(|e| reject("malformed", e.to_string()))
}

/// Counts a rejected delta (or full state); logs it with [`log_rejections`].
fn count_rejection(e: &StateError) {
    if let StateError::Rejected { reason, .. } = e {
        metrics::counter!("form_state_rejected_deltas_total", "reason" => *reason).increment(1);
    }
}

/// One log line for `n` rejections of which `first` is the first, at most one line a
/// second: a peer that sends thousands of forged deltas cannot flood the log (the
/// counter `form_state_rejected_deltas_total` counts every one).
fn log_rejections(n: u64, first: &StateError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = crate::store::now_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) < 1000
        || LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        SUPPRESSED.fetch_add(n, Ordering::Relaxed);
        return;
    }
    let earlier = SUPPRESSED.swap(0, Ordering::Relaxed);
    if let StateError::Rejected {
        reason,
        origin,
        message,
    } = first
    {
        tracing::warn!(
            rejected = n,
            also_rejected_since_last_line = earlier,
            reason,
            origin,
            message,
            "rejected deltas (the first is described)"
        );
    }
}

/// Verifies signed deltas and applies the good ones; returns the ack counts.
async fn take_deltas(
    store: &Store,
    signed: Vec<pb::SignedDelta>,
) -> Result<(Vec<crate::envelope::VerifiedDelta>, pb::PushAck), StateError> {
    // Verify without holding the store lock; a large batch on the blocking pool (a
    // few signatures cost less than the hand-off).
    let n = signed.len();
    let authorized = store.lock().authorized().clone();
    let verify = move || authorized.verify_batch(signed.into_iter().map(Arc::new).collect());
    let results = if n > INLINE_VERIFY {
        blocking(verify).await?
    } else {
        verify()
    };
    let mut good = Vec::new();
    let mut rejected = 0;
    let mut first = None;
    for r in results {
        match r {
            Ok(v) => good.push(v),
            Err(e) => {
                count_rejection(&e);
                rejected += 1;
                first.get_or_insert(e);
            }
        }
    }
    if let Some(e) = &first {
        log_rejections(u64::from(rejected), e);
    }
    metrics::counter!("form_state_deltas_received_total").increment(good.len() as u64);
    let received = store.receive(good.clone())?;
    if received.overflow > 0 {
        tracing::warn!(
            overflow = received.overflow,
            "delta buffer full; anti-entropy will fetch the rest in order"
        );
    }
    let r = store.lock();
    Ok((
        good,
        pb::PushAck {
            version: Some(vv(&r.version())),
            applied: received.applied.len() as u32,
            buffered: received.buffered,
            duplicates: received.duplicates,
            rejected,
            replica_id: r.actor().to_owned(),
        },
    ))
}

/// The GossipService of one replica.
#[derive(Debug, Clone)]
pub struct GossipApi {
    store: Arc<Store>,
    peers: Arc<Peers>,
    batch_size: usize,
}

impl GossipApi {
    /// The service.
    pub fn new(store: Arc<Store>, peers: Arc<Peers>, batch_size: usize) -> Self {
        Self {
            store,
            peers,
            batch_size,
        }
    }
}

#[tonic::async_trait]
impl GossipService for GossipApi {
    async fn push_deltas(
        &self,
        req: Request<pb::DeltaBatch>,
    ) -> Result<Response<pb::PushAck>, Status> {
        let mut batch = req.into_inner();
        if let Some(full) = batch.full_state.take() {
            match open_state(&self.store, full).await {
                Ok(s) => self.store.merge_state(&s)?,
                Err(e) => {
                    count_rejection(&e);
                    log_rejections(1, &e);
                    return Err(e.into());
                }
            }
        }
        let (good, ack) = take_deltas(&self.store, batch.deltas).await?;
        self.peers.learned_from(&batch.sender_id, &good);
        Ok(Response::new(ack))
    }

    async fn anti_entropy(
        &self,
        req: Request<pb::AntiEntropyRequest>,
    ) -> Result<Response<pb::AntiEntropyReply>, Status> {
        let r = req.into_inner();
        if !r.deltas.is_empty() {
            take_deltas(&self.store, r.deltas).await?;
        }
        let theirs = from_vv(r.version);
        let missing = self
            .store
            .lock()
            .missing_for(&theirs, self.batch_size, Some(&r.sender_id));
        let (deltas, full_state) = match missing {
            Missing::Nothing => (Vec::new(), None),
            Missing::Deltas(v) => (v.iter().map(|d| (*d.signed).clone()).collect(), None),
            Missing::FullState => {
                metrics::counter!("form_state_full_state_sent_total").increment(1);
                (Vec::new(), Some(sign_state(&self.store).await?))
            }
        };
        let r = self.store.lock();
        Ok(Response::new(pb::AntiEntropyReply {
            sender_id: r.actor().to_owned(),
            version: Some(vv(&r.version())),
            deltas,
            full_state,
        }))
    }
}

/// What wakes every peer's task before its next tick: a write to push at once, or
/// anti-entropy asked for by a full delta buffer. Each counts up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Wake {
    push: u64,
    anti_entropy: u64,
}

/// Runs the push and anti-entropy loop until shutdown: one task per peer, each on its
/// own ticks, so a slow or black-holed peer delays only its own rounds (each call
/// waits at most `CALL_TIMEOUT`), never the other peers'.
pub async fn run(
    store: Arc<Store>,
    peers: Arc<Peers>,
    config: GossipConfig,
    urgent: Arc<tokio::sync::Notify>,
    mut shutdown: Shutdown,
) {
    let (wake, _) = tokio::sync::watch::channel(Wake::default());
    let mut tasks = tokio::task::JoinSet::new();
    for p in &config.peers {
        let shape = |e: tonic::transport::Endpoint| {
            e.connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        };
        match form_runtime::tls::client::channel(
            form_runtime::tls::Kind::State,
            std::slice::from_ref(p),
            shape,
        ) {
            Ok(ch) => {
                let client = GossipServiceClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                peers.lock().insert(p.to_string(), PeerView::default());
                let link = Link {
                    store: store.clone(),
                    peers: peers.clone(),
                    config: config.clone(),
                    addr: p.to_string(),
                    client,
                };
                tasks.spawn(link.run(wake.subscribe(), shutdown.clone()));
            }
            Err(e) => tracing::error!(peer = %p, error = %e, "bad peer address"),
        }
    }
    // A full buffer's request for anti-entropy is looked at every sync interval.
    let mut sync = tokio::time::interval(config.sync_interval);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            _ = urgent.notified() => wake.send_modify(|w| w.push += 1),
            _ = sync.tick() => {
                if store.take_anti_entropy_request() {
                    wake.send_modify(|w| w.anti_entropy += 1);
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// One peer's side of the loop.
struct Link {
    store: Arc<Store>,
    peers: Arc<Peers>,
    config: GossipConfig,
    addr: String,
    client: GossipServiceClient<Channel>,
}

impl Link {
    /// Pushes every sync interval (or at once when woken), runs anti-entropy every
    /// anti-entropy interval (or when asked), until shutdown.
    async fn run(mut self, mut wake: tokio::sync::watch::Receiver<Wake>, mut shutdown: Shutdown) {
        let mut sync = tokio::time::interval(self.config.sync_interval);
        let mut ae = tokio::time::interval(self.config.anti_entropy_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ae.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = *wake.borrow_and_update();
        loop {
            let anti_entropy = tokio::select! {
                _ = shutdown.requested() => return,
                _ = sync.tick() => false,
                _ = ae.tick() => true,
                changed = wake.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = *wake.borrow_and_update();
                    let asked = now.anti_entropy != seen.anti_entropy;
                    seen = now;
                    asked
                }
            };
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = self.round(anti_entropy) => {}
            }
        }
    }

    /// One round with the peer: first contact learns what it has (and takes what it
    /// has that this replica lacks), then pushes in the same round.
    async fn round(&mut self, anti_entropy: bool) {
        let Self {
            store,
            peers,
            config,
            addr,
            client,
        } = self;
        let first = !peers.lock().get(addr.as_str()).is_some_and(|v| v.contacted);
        let result = async {
            if anti_entropy || first {
                pull(store, peers, addr, client).await?;
            }
            if !anti_entropy {
                push(store, peers, addr, client, config).await?;
            }
            Ok::<(), Status>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(peer = %addr, error = %e, "gossip failed");
            metrics::counter!("form_state_gossip_errors_total", "peer" => addr.clone())
                .increment(1);
        }
    }
}

async fn push(
    store: &Store,
    peers: &Peers,
    addr: &str,
    client: &mut GossipServiceClient<Channel>,
    cfg: &GossipConfig,
) -> Result<(), Status> {
    let (known, actor) = {
        let p = peers.lock();
        let v = p.get(addr).cloned().unwrap_or_default();
        (v.known, v.actor)
    };
    let (sender_id, mine) = {
        let r = store.lock();
        (r.actor().to_owned(), r.version())
    };
    let batch = if cfg.policy == ReplicationPolicy::FullSync {
        if mine == known {
            return Ok(());
        }
        metrics::counter!("form_state_full_state_sent_total").increment(1);
        pb::DeltaBatch {
            sender_id,
            deltas: Vec::new(),
            full_state: Some(sign_state(store).await?),
        }
    } else {
        // The guard must be gone before the full state locks the store again.
        let missing = store
            .lock()
            .missing_for(&known, cfg.batch_size, actor.as_deref());
        match missing {
            Missing::Nothing => return Ok(()),
            Missing::Deltas(v) => pb::DeltaBatch {
                sender_id,
                deltas: v.iter().map(|d| (*d.signed).clone()).collect(),
                full_state: None,
            },
            Missing::FullState => {
                metrics::counter!("form_state_full_state_sent_total").increment(1);
                pb::DeltaBatch {
                    sender_id,
                    deltas: Vec::new(),
                    full_state: Some(sign_state(store).await?),
                }
            }
        }
    };
    let bytes = batch.encoded_len() as u64;
    let n = batch.deltas.len() as u64;
    let ack = client.push_deltas(batch).await?.into_inner();
    metrics::counter!("form_state_deltas_sent_total", "peer" => addr.to_owned()).increment(n);
    metrics::counter!("form_state_bytes_sent_total", "peer" => addr.to_owned()).increment(bytes);
    learn(store, peers, addr, ack.replica_id, from_vv(ack.version));
    Ok(())
}

async fn pull(
    store: &Store,
    peers: &Peers,
    addr: &str,
    client: &mut GossipServiceClient<Channel>,
) -> Result<(), Status> {
    let req = {
        let r = store.lock();
        pb::AntiEntropyRequest {
            sender_id: r.actor().to_owned(),
            version: Some(vv(&r.version())),
            deltas: Vec::new(),
        }
    };
    metrics::counter!("form_state_anti_entropy_rounds_total").increment(1);
    let sent = req.encoded_len() as u64;
    let reply = client.anti_entropy(req).await?.into_inner();
    metrics::counter!("form_state_anti_entropy_bytes_total", "peer" => addr.to_owned())
        .increment(sent + reply.encoded_len() as u64);
    let mut reply = reply;
    if let Some(full) = reply.full_state.take() {
        match open_state(store, full).await {
            Ok(s) => store.merge_state(&s)?,
            Err(e) => {
                count_rejection(&e);
                log_rejections(1, &e);
                return Err(e.into());
            }
        }
    }
    if !reply.deltas.is_empty() {
        let (good, _) = take_deltas(store, reply.deltas).await?;
        peers.learned_from(&reply.sender_id, &good);
    }
    learn(store, peers, addr, reply.sender_id, from_vv(reply.version));
    Ok(())
}

fn learn(store: &Store, peers: &Peers, addr: &str, actor: String, version: BTreeMap<String, u64>) {
    let mine = store.lock().version();
    let lag: u64 = mine
        .iter()
        .map(|(a, n)| n.saturating_sub(version.get(a).copied().unwrap_or(0)))
        .sum();
    metrics::gauge!("form_state_peer_lag_dots", "peer" => addr.to_owned()).set(lag as f64);
    let mut p = peers.lock();
    let v = p.entry(addr.to_owned()).or_default();
    v.actor = Some(actor);
    v.known = version;
    v.contacted = true;
}
