//! The `GossipService` of one replica: takes pushed deltas and full states, answers
//! anti-entropy requests. What it sends and learns is [`super::protocol`]'s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use form_proto::state::v1 as pb;
use form_proto::state::v1::gossip_service_server::GossipService;
use tonic::{Request, Response, Status};

use super::protocol::{self, Broken, Outgoing, PeerView};
use crate::envelope::VerifiedDelta;
use crate::error::StateError;
use crate::store::Store;

/// Deltas a batch may hold to be verified on the async worker that received it.
const INLINE_VERIFY: usize = 8;

/// Per-peer knowledge shared by the server (which learns from incoming pushes) and
/// the links (which learn from replies), by peer address.
#[derive(Debug, Default)]
pub struct Peers {
    by_addr: Mutex<BTreeMap<String, PeerView>>,
}

impl Peers {
    /// The views, locked. Keep the guard short.
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<String, PeerView>> {
        self.by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What is known of the peer at `addr`.
    pub fn view(&self, addr: &str) -> PeerView {
        self.lock().get(addr).cloned().unwrap_or_default()
    }

    /// Whether the peer at `addr` has answered since this replica started.
    pub fn contacted(&self, addr: &str) -> bool {
        self.lock().get(addr).is_some_and(|v| v.contacted)
    }

    /// A peer with `actor` holds these deltas (it sent them): never send them back.
    pub fn learned_from(&self, actor: &str, deltas: &[VerifiedDelta]) {
        for view in self
            .lock()
            .values_mut()
            .filter(|v| v.actor.as_deref() == Some(actor))
        {
            view.credit(deltas);
        }
    }
}

/// `f` on a thread of the blocking pool: whole-state and signature work that would
/// otherwise hold an async worker (and every task queued behind it).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StateError> {
    form_runtime::clock::blocking(f)
        .await
        .map_err(|e| StateError::Unavailable(format!("a blocking task failed: {e}")))
}

/// The whole state, signed, once everything it holds is durable (a full state must
/// never carry a write that a crash could still undo). Signing runs off the async
/// workers; encoding still holds the replica lock.
pub(super) async fn sign_state(store: &Store) -> Result<pb::SignedFullState, StateError> {
    metrics::counter!("form_state_full_state_sent_total").increment(1);
    let unsealed = protocol::unsealed(&store.lock());
    store.wait_durable(unsealed.lsn).await?;
    blocking(move || protocol::seal(unsealed)).await
}

/// Checks a full state's signature and decodes it on the blocking pool, then joins it.
pub(super) async fn take_state(store: &Store, s: pb::SignedFullState) -> Result<(), StateError> {
    let key = store
        .lock()
        .authorized()
        .check_key(&s.origin_id, &s.public_key);
    let opened = match key {
        Ok(vk) => blocking(move || protocol::open(vk, &s).map(|state| (state, s.state))).await?,
        Err(e) => Err(e),
    };
    match opened {
        Ok((state, encoded)) => store.merge_state(&state, encoded),
        Err(e) => {
            count_rejection(&e);
            log_rejections(1, &e);
            Err(e)
        }
    }
}

/// Signs what `plan` chose to send, as (deltas, full state).
pub(super) async fn materialize(
    store: &Store,
    plan: Outgoing,
) -> Result<(Vec<pb::SignedDelta>, Option<pb::SignedFullState>), StateError> {
    Ok(match plan {
        Outgoing::Nothing => (Vec::new(), None),
        Outgoing::Deltas(v) => (v, None),
        Outgoing::FullState => (Vec::new(), Some(sign_state(store).await?)),
    })
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
    let now = form_runtime::clock::unix_ms();
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

/// Verifies signed deltas and applies the good ones; returns them and the ack.
pub(super) async fn take_deltas(
    store: &Store,
    signed: Vec<pb::SignedDelta>,
) -> Result<(Vec<VerifiedDelta>, pb::PushAck), StateError> {
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
    let ack = protocol::ack(&store.lock(), &received, rejected);
    Ok((good, ack))
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
            take_state(&self.store, full).await?;
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
        let theirs = protocol::from_vv(r.version);
        let plan = protocol::plan_answer(
            &self.store.lock(),
            &theirs,
            self.batch_size,
            &r.sender_id,
            Broken::default(),
        );
        let (deltas, full_state) = materialize(&self.store, plan).await?;
        Ok(Response::new(protocol::answer(
            &self.store.lock(),
            deltas,
            full_state,
        )))
    }
}
