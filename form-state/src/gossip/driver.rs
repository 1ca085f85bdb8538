//! The gossip loop on tokio: one task per peer (`Link`) that sleeps until its
//! [`Schedule`] says a round is due and makes the round's calls through a
//! [`Transport`], so a slow or black-holed peer delays only its own rounds (each call
//! waits at most `CALL_TIMEOUT`), never the other peers'.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1 as pb;
use form_proto::state::v1::gossip_service_client::GossipServiceClient;
use form_runtime::shutdown::Shutdown;
use prost::Message;
use tonic::Status;
use tonic::transport::Channel;

use super::GossipConfig;
use super::link::{Call, Next, Schedule};
use super::protocol::{self, Broken};
use super::server::{Peers, materialize, take_deltas, take_state};
use crate::store::Store;

/// Time a gossip call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest gossip message accepted or sent (a full state can be large).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// How a link reaches its peer's `GossipService`: tonic in production, anything that
/// answers the two calls in tests.
pub trait Transport: Send + 'static {
    /// `PushDeltas`.
    fn push(
        &mut self,
        batch: pb::DeltaBatch,
    ) -> impl Future<Output = Result<pb::PushAck, Status>> + Send;
    /// `AntiEntropy`.
    fn anti_entropy(
        &mut self,
        req: pb::AntiEntropyRequest,
    ) -> impl Future<Output = Result<pb::AntiEntropyReply, Status>> + Send;
}

impl Transport for GossipServiceClient<Channel> {
    async fn push(&mut self, batch: pb::DeltaBatch) -> Result<pb::PushAck, Status> {
        Ok(self.push_deltas(batch).await?.into_inner())
    }

    async fn anti_entropy(
        &mut self,
        req: pb::AntiEntropyRequest,
    ) -> Result<pb::AntiEntropyReply, Status> {
        Ok(GossipServiceClient::anti_entropy(self, req)
            .await?
            .into_inner())
    }
}

/// What wakes every peer's task before its next tick: a write to push at once, or
/// anti-entropy asked for by a full delta buffer. Each counts up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Wake {
    push: u64,
    anti_entropy: u64,
}

/// Runs a link to every peer of `config` over tonic until shutdown.
pub async fn run(
    store: Arc<Store>,
    peers: Arc<Peers>,
    config: GossipConfig,
    urgent: Arc<tokio::sync::Notify>,
    shutdown: Shutdown,
) {
    let mut links = Vec::new();
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
            Ok(ch) => links.push((
                p.to_string(),
                GossipServiceClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )),
            Err(e) => tracing::error!(peer = %p, error = %e, "bad peer address"),
        }
    }
    run_links(store, peers, config, links, urgent, shutdown).await;
}

/// Runs one `Link` per `(address, transport)` until shutdown.
pub async fn run_links<T: Transport>(
    store: Arc<Store>,
    peers: Arc<Peers>,
    config: GossipConfig,
    transports: Vec<(String, T)>,
    urgent: Arc<tokio::sync::Notify>,
    mut shutdown: Shutdown,
) {
    let (wake, _) = tokio::sync::watch::channel(Wake::default());
    let mut tasks = tokio::task::JoinSet::new();
    for (addr, transport) in transports {
        peers.lock().insert(addr.clone(), Default::default());
        let link = Link {
            store: store.clone(),
            peers: peers.clone(),
            config: config.clone(),
            addr,
            transport,
        };
        tasks.spawn(link.run(wake.subscribe(), shutdown.clone()));
    }
    let mut gather = Gather::new(config.push_gather, config.sync_interval);
    // A full buffer's request for anti-entropy is looked at every sync interval.
    let mut sync = tokio::time::interval(config.sync_interval);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            _ = urgent.notified() => {
                // The writes of the next moment go in the same push (a wake while a
                // push is out is kept by its link for the next round anyway).
                gather.next(tokio::time::Instant::now());
                if !gather.now.is_zero() {
                    tokio::select! {
                        _ = shutdown.requested() => break,
                        _ = tokio::time::sleep(gather.now) => {}
                    }
                }
                // The writes made during the wait go with this wake: the permit they
                // left would only start an empty one (and grow the wait for nothing).
                tokio::select! {
                    biased;
                    _ = urgent.notified() => {}
                    _ = std::future::ready(()) => {}
                }
                gather.woke(tokio::time::Instant::now());
                wake.send_modify(|w| w.push += 1);
            }
            _ = sync.tick() => {
                if store.take_anti_entropy_request() {
                    wake.send_modify(|w| w.anti_entropy += 1);
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// How long a push at once waits for more writes: `--push-gather-ms` after a quiet
/// moment, doubled (up to 8 times that, and never past the round interval) while
/// writes keep coming (a write within twice the least wait of the last wake), so that
/// a busy replica sends fewer, larger pushes (each push costs every peer a call, a
/// check of its signatures and a sync of its log) and an idle one sends at once.
#[derive(Debug, Clone, Copy)]
pub struct Gather {
    least: Duration,
    most: Duration,
    /// The wait of the current wake.
    pub now: Duration,
    last: Option<tokio::time::Instant>,
}

impl Gather {
    /// Waits of `least` to 8 times `least`, at most `round`.
    pub fn new(least: Duration, round: Duration) -> Self {
        Self {
            least,
            most: (least * 8).min(round),
            now: least.min(round),
            last: None,
        }
    }

    /// A write's wake at `at`: twice the last wait when it came within twice the least
    /// wait of the last wake, else the least.
    pub fn next(&mut self, at: tokio::time::Instant) {
        self.now = match self.last {
            Some(t) if at.saturating_duration_since(t) <= self.least * 2 => {
                (self.now * 2).min(self.most)
            }
            _ => self.least.min(self.most),
        };
    }

    /// The links were woken at `at`.
    pub fn woke(&mut self, at: tokio::time::Instant) {
        self.last = Some(at);
    }
}

/// One peer's side of the loop.
struct Link<T> {
    store: Arc<Store>,
    peers: Arc<Peers>,
    config: GossipConfig,
    addr: String,
    transport: T,
}

impl<T: Transport> Link<T> {
    /// Makes the calls the schedule asks for, until shutdown.
    async fn run(mut self, mut wake: tokio::sync::watch::Receiver<Wake>, mut shutdown: Shutdown) {
        let start = tokio::time::Instant::now();
        let ms = |d: Duration| d.as_millis() as u64;
        let mut schedule = Schedule::new(
            0,
            ms(self.config.sync_interval),
            ms(self.config.anti_entropy_interval),
        );
        let mut seen = *wake.borrow_and_update();
        loop {
            let contacted = self.peers.contacted(&self.addr);
            match schedule.poll(ms(start.elapsed()), contacted) {
                Next::Call(call) => {
                    let result = tokio::select! {
                        _ = shutdown.requested() => return,
                        r = self.call(call) => r,
                    };
                    if let Err(e) = &result {
                        tracing::debug!(peer = %self.addr, error = %e, "gossip failed");
                        metrics::counter!("form_state_gossip_errors_total", "peer" => self.addr.clone())
                            .increment(1);
                    }
                    schedule.done(result.is_ok());
                }
                Next::Wait(until) => {
                    let until = start + Duration::from_millis(until.unwrap_or(u64::MAX / 4));
                    tokio::select! {
                        _ = shutdown.requested() => return,
                        _ = tokio::time::sleep_until(until) => {}
                        changed = wake.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let now = *wake.borrow_and_update();
                            schedule.wake(now.push != seen.push, now.anti_entropy != seen.anti_entropy);
                            seen = now;
                        }
                    }
                }
            }
        }
    }

    async fn call(&mut self, call: Call) -> Result<(), Status> {
        match call {
            Call::Pull => self.pull().await,
            Call::Push => self.push().await,
        }
    }

    async fn push(&mut self) -> Result<(), Status> {
        let store = &self.store;
        let cfg = &self.config;
        let view = self.peers.view(&self.addr);
        let (plan, sender_id) = {
            let r = store.lock();
            let plan =
                protocol::plan_push(&r, &view, &cfg.policy, cfg.batch_size, Broken::default());
            (plan, r.actor().to_owned())
        };
        if plan == protocol::Outgoing::Nothing {
            return Ok(());
        }
        let (deltas, full_state) = materialize(store, plan).await?;
        let batch = pb::DeltaBatch {
            sender_id,
            deltas,
            full_state,
        };
        let bytes = batch.encoded_len() as u64;
        let n = batch.deltas.len() as u64;
        let ack = self.transport.push(batch).await?;
        metrics::counter!("form_state_deltas_sent_total", "peer" => self.addr.clone()).increment(n);
        metrics::counter!("form_state_bytes_sent_total", "peer" => self.addr.clone())
            .increment(bytes);
        self.learn(ack.replica_id, protocol::from_vv(ack.version));
        Ok(())
    }

    async fn pull(&mut self) -> Result<(), Status> {
        let req = protocol::pull_request(&self.store.lock());
        metrics::counter!("form_state_anti_entropy_rounds_total").increment(1);
        let sent = req.encoded_len() as u64;
        let mut reply = self.transport.anti_entropy(req).await?;
        metrics::counter!("form_state_anti_entropy_bytes_total", "peer" => self.addr.clone())
            .increment(sent + reply.encoded_len() as u64);
        if let Some(full) = reply.full_state.take() {
            take_state(&self.store, full).await?;
        }
        if !reply.deltas.is_empty() {
            let (good, _) = take_deltas(&self.store, std::mem::take(&mut reply.deltas)).await?;
            self.peers.learned_from(&reply.sender_id, &good);
        }
        self.learn(reply.sender_id, protocol::from_vv(reply.version));
        Ok(())
    }

    fn learn(&self, actor: String, version: BTreeMap<String, u64>) {
        let mine = self.store.lock().version();
        let lag: u64 = mine
            .iter()
            .map(|(a, n)| n.saturating_sub(version.get(a).copied().unwrap_or(0)))
            .sum();
        metrics::gauge!("form_state_peer_lag_dots", "peer" => self.addr.clone()).set(lag as f64);
        self.peers
            .lock()
            .entry(self.addr.clone())
            .or_default()
            .learn(actor, version);
    }
}

#[cfg(test)]
mod gather_tests {
    use super::*;

    #[test]
    fn the_wait_grows_while_writes_keep_coming_and_falls_back_after_a_quiet_moment() {
        let ms = Duration::from_millis;
        let t0 = tokio::time::Instant::now();
        let mut g = Gather::new(ms(2), ms(100));
        g.next(t0);
        assert_eq!(g.now, ms(2), "the first wake waits the least");
        let mut at = t0 + ms(2);
        g.woke(at);
        let mut waits = Vec::new();
        for _ in 0..5 {
            // The next write comes a millisecond after the wake: writes keep coming.
            at += ms(1);
            g.next(at);
            waits.push(g.now);
            at += g.now;
            g.woke(at);
        }
        assert_eq!(waits, [ms(4), ms(8), ms(16), ms(16), ms(16)], "at most 8x");
        // Writes 20 ms apart (node heartbeats): each waits the least.
        g.next(at + ms(20));
        assert_eq!(
            g.now,
            ms(2),
            "after more than twice the least, the least again"
        );
        let mut capped = Gather::new(ms(20), ms(100));
        capped.woke(t0);
        for _ in 0..4 {
            capped.next(t0);
        }
        assert_eq!(capped.now, ms(100), "never past the round interval");
        let mut zero = Gather::new(Duration::ZERO, ms(100));
        zero.woke(t0);
        zero.next(t0);
        assert_eq!(zero.now, Duration::ZERO, "0 ms: never waits");
    }
}
