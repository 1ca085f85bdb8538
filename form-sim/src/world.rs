//! The simulated platform: form-state replicas running the production gossip protocol
//! (`form_state::gossip::{link, protocol}` over `form_state::replica::Replica`) on one
//! thread, on simulated time, over an in-memory network. Every event (a timer, a
//! message delivered, a disk sync, a client write, a fault) sits in one queue ordered
//! by (time, sequence), and every choice comes from the run's [`Rng`], so a run is a
//! function of its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use form_proto::state::v1 as pb;
use form_state::codec;
use form_state::crdt::{DeltaBuilder, Field, Key, Space, State, Value};
use form_state::envelope::{Authorized, VerifiedDelta};
use form_state::gossip::ReplicationPolicy;
use form_state::gossip::link::{Call, Next, Schedule};
use form_state::gossip::protocol::{self, Outgoing, PeerView};
use form_state::model::index::Operations;
use form_state::replica::{Limits, Replica};

use crate::disk::{Disk, Record};
use crate::history::{History, Write};
use crate::options::{Options, Peers};
use crate::rng::Rng;
use crate::track::Track;

/// Time a gossip call may take before the caller gives up (as in production).
const CALL_TIMEOUT_MS: u64 = 5_000;
/// What the slow link (`Options::slow_link`) adds to each message, ms.
const SLOW_LINK_MS: u64 = 1_500;
/// Wall-clock base of simulated time, so entries carry plausible dates.
const EPOCH_MS: u64 = 1_790_000_000_000;

/// What a message carries.
#[derive(Debug, Clone)]
enum Body {
    Push(pb::DeltaBatch),
    Pull(pb::AntiEntropyRequest),
    Ack(pb::PushAck),
    Answer(pb::AntiEntropyReply),
    /// The call failed at the server (not running, or it refused the request).
    Refused,
}

#[derive(Debug, Clone)]
struct Msg {
    from: usize,
    to: usize,
    call: u64,
    body: Body,
}

#[derive(Debug)]
enum Event {
    Poll {
        node: usize,
        peer: usize,
        timer: u64,
    },
    Deliver(Box<Msg>),
    Timeout {
        node: usize,
        peer: usize,
        call: u64,
    },
    Synced {
        node: usize,
        inc: u64,
        upto: usize,
    },
    Tick {
        node: usize,
        inc: u64,
    },
    Write,
    Crash {
        node: usize,
        down_ms: u64,
    },
    Restart {
        node: usize,
    },
    Partition {
        side: Vec<bool>,
    },
    Heal,
    EndFaults,
    Check,
}

/// What a link does next.
enum Step {
    Stop,
    Again,
    Wait(u64, u64),
    Call(Box<Body>, Option<u64>),
}

struct Link {
    schedule: Schedule,
    view: PeerView,
    out: Option<u64>,
    timer: u64,
}

/// A send that waits until the state it carries is durable.
struct Waiting {
    lsn: u64,
    msg: Msg,
}

struct Node {
    actor: String,
    key: SigningKey,
    up: bool,
    inc: u64,
    replica: Replica,
    disk: Disk,
    skew: i64,
    disk_ms: u64,
    links: BTreeMap<usize, Link>,
    /// Writes waiting for their sync: (lsn, history index).
    unacked: Vec<(u64, usize)>,
    waiting: Vec<Waiting>,
    anti_entropy_wanted: bool,
}

/// Counts of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// Messages sent.
    pub messages: u64,
    /// Messages lost (loss, partition, or a node that was down).
    pub dropped: u64,
    /// Messages delivered twice.
    pub duplicated: u64,
    /// Client writes made / acknowledged.
    pub writes: u64,
    /// Acknowledged writes.
    pub acked: u64,
    /// Acknowledged deletes.
    pub acked_deletes: u64,
    /// Crashes and partitions.
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
    /// Full states sent.
    pub full_states: u64,
    /// Calls that timed out.
    pub timeouts: u64,
    /// Pushes woken by urgent writes (prioritized policy).
    pub wakes: u64,
}

/// The result of a run.
#[derive(Debug)]
pub struct Outcome {
    /// The seed it replays from.
    pub seed: u64,
    /// Broken invariants (empty: the run passed).
    pub violations: Vec<String>,
    /// Simulated ms from the end of the faults until every replica held one state.
    pub converged_after_ms: Option<u64>,
    /// The converged state's encoding length and a hash of it.
    pub digest: (usize, u64),
    /// Counts.
    pub stats: Stats,
    /// Write-to-every-replica latencies, simulated ms.
    pub convergence: Track,
    /// What the seed drew: peers, policy, limits (for a failing seed's report).
    pub setup: String,
}

/// One simulated platform.
struct World {
    opts: Options,
    seed: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<Node>,
    authorized: Authorized,
    limits: Limits,
    cut: Option<Vec<bool>>,
    /// Whom each replica gossips with (never `Peers::Seeded`: drawn at the start).
    topology: Peers,
    /// The replication policy in force.
    policy: ReplicationPolicy,
    /// Fields whose local write wakes every link's push (prioritized policy).
    urgent: Vec<Field>,
    faults_on: bool,
    next_call: u64,
    history: History,
    track: Track,
    stats: Stats,
    violations: Vec<String>,
    faults_ended_at: Option<u64>,
    converged_at: Option<u64>,
}

/// Runs one simulated platform from `seed` and checks its invariants.
pub fn run(seed: u64, opts: &Options) -> Outcome {
    World::new(seed, opts.clone()).run()
}

impl World {
    fn new(seed: u64, opts: Options) -> Self {
        let mut rng = Rng::new(seed);
        let keys: Vec<SigningKey> = (0..opts.replicas)
            .map(|i| {
                let mut b = [7u8; 32];
                b[..8].copy_from_slice(&(i as u64).to_le_bytes());
                SigningKey::from_bytes(&b)
            })
            .collect();
        let authorized = Authorized::new(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (format!("sim-{i}"), k.verifying_key()))
                .collect(),
        );
        let (buffer, log) = if opts.seeded_limits && rng.chance(0.5) {
            (10_000, 100_000)
        } else {
            (opts.buffer, opts.delta_log)
        };
        let limits = Limits {
            buffer,
            log,
            ..Limits::default()
        };
        let genesis = genesis(opts.clusters, opts.members);
        let nodes = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| {
                let actor = format!("sim-{i}@1");
                let mut replica = Replica::new(
                    actor.clone(),
                    key.clone(),
                    authorized.clone(),
                    State::default(),
                    limits,
                );
                let mut disk = Disk::default();
                if let Some(g) = &genesis {
                    replica.merge_state(g);
                    disk.append(Record::Full(g.clone()), replica.lsn());
                    disk.start_sync().map(|n| disk.finish_sync(n));
                    let lsn = replica.lsn();
                    replica.mark_durable(lsn);
                }
                let skew =
                    rng.range(0, 2 * opts.faults.skew_ms) as i64 - opts.faults.skew_ms as i64;
                let disk_ms = rng.range(1, opts.faults.slowest_disk_ms.max(1));
                Node {
                    actor,
                    key,
                    up: true,
                    inc: 0,
                    replica,
                    disk,
                    skew,
                    disk_ms,
                    links: BTreeMap::new(),
                    unacked: Vec::new(),
                    waiting: Vec::new(),
                    anti_entropy_wanted: false,
                }
            })
            .collect();
        let track = Track::new(opts.replicas);
        let topology = match opts.peers {
            Peers::Seeded if rng.chance(0.5) => Peers::Ring(1),
            Peers::Seeded => Peers::Mesh,
            p => p,
        };
        let policy = opts.policy.clone().unwrap_or_else(|| match rng.below(10) {
            0..5 => ReplicationPolicy::DeltaSync,
            5..8 => ReplicationPolicy::PrioritizedSync {
                high_priority_fields: vec!["clusters".into()],
            },
            _ => ReplicationPolicy::FullSync,
        });
        let urgent = match &policy {
            ReplicationPolicy::PrioritizedSync {
                high_priority_fields,
            } => form_state::gossip::high_priority_fields(high_priority_fields).unwrap_or_default(),
            _ => Vec::new(),
        };
        Self {
            topology,
            policy,
            urgent,
            opts,
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            authorized,
            limits,
            cut: None,
            faults_on: true,
            next_call: 0,
            history: History::default(),
            track,
            stats: Stats::default(),
            violations: Vec::new(),
            faults_ended_at: None,
            converged_at: None,
        }
    }

    fn at(&mut self, time: u64, e: Event) {
        self.seq += 1;
        self.queue.insert((time, self.seq), e);
    }

    fn run(mut self) -> Outcome {
        for node in 0..self.nodes.len() {
            self.start(node);
        }
        self.plan_faults();
        let first = self.write_gap();
        self.at(first, Event::Write);
        self.at(self.opts.fault_ms, Event::EndFaults);
        let deadline = self.opts.fault_ms + self.opts.settle_ms;
        while let Some(((time, _), event)) = self.queue.pop_first() {
            if time > deadline || self.converged_at.is_some() {
                break;
            }
            self.now = time;
            self.stats.events += 1;
            self.handle(event);
        }
        self.finish()
    }

    /// Partitions and crashes at seeded times of the fault phase.
    fn plan_faults(&mut self) {
        let f = self.opts.faults;
        let end = self.opts.fault_ms;
        for _ in 0..self.rng.range(0, f.partitions) {
            let start = self.rng.range(0, end.saturating_sub(1));
            let len = self.rng.range(500, 10_000);
            let side: Vec<bool> = (0..self.nodes.len())
                .map(|_| self.rng.chance(0.5))
                .collect();
            self.at(start, Event::Partition { side });
            self.at((start + len).min(end), Event::Heal);
        }
        for _ in 0..self.rng.range(0, f.crashes) {
            let node = self.rng.below(self.nodes.len());
            let at = self.rng.range(0, end.saturating_sub(1));
            let down_ms = self.rng.range(100, 8_000);
            self.at(at, Event::Crash { node, down_ms });
        }
    }

    fn write_gap(&mut self) -> u64 {
        let mean = 1_000 / self.opts.writes_per_second.max(1);
        self.now + self.rng.range(1, 2 * mean.max(1))
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Poll { node, peer, timer } => {
                if self.nodes[node]
                    .links
                    .get(&peer)
                    .is_some_and(|l| l.timer == timer)
                {
                    self.drive(node, peer);
                }
            }
            Event::Deliver(msg) => self.deliver(*msg),
            Event::Timeout { node, peer, call } => {
                if self.nodes[node]
                    .links
                    .get(&peer)
                    .is_some_and(|l| l.out == Some(call))
                {
                    self.stats.timeouts += 1;
                    self.call_done(node, peer, false);
                }
            }
            Event::Synced { node, inc, upto } => self.synced(node, inc, upto),
            Event::Tick { node, inc } => {
                let n = &mut self.nodes[node];
                if !n.up || n.inc != inc {
                    return;
                }
                if std::mem::take(&mut n.anti_entropy_wanted) {
                    let peers: Vec<usize> = n.links.keys().copied().collect();
                    for p in peers {
                        if let Some(l) = self.nodes[node].links.get_mut(&p) {
                            l.schedule.wake(false, true);
                        }
                        self.drive(node, p);
                    }
                }
                self.at(self.now + self.opts.sync_ms, Event::Tick { node, inc });
            }
            Event::Write => {
                if self.faults_on {
                    self.client_write();
                    let next = self.write_gap();
                    self.at(next, Event::Write);
                }
            }
            Event::Crash { node, down_ms } => self.crash(node, down_ms),
            Event::Restart { node } => self.restart(node),
            Event::Partition { side } => {
                if self.faults_on {
                    self.stats.partitions += 1;
                    self.cut = Some(side);
                }
            }
            Event::Heal => self.cut = None,
            Event::EndFaults => {
                self.faults_on = false;
                self.cut = None;
                self.faults_ended_at = Some(self.now);
                for node in 0..self.nodes.len() {
                    if !self.nodes[node].up {
                        self.restart(node);
                    }
                }
                self.at(self.now, Event::Check);
            }
            Event::Check => {
                if self.converged() {
                    self.converged_at = Some(self.now);
                } else {
                    self.at(self.now + 100, Event::Check);
                }
            }
        }
    }

    /// Starts (or restarts) a node's links and ticks.
    fn start(&mut self, node: usize) {
        let n = self.nodes.len();
        let peers: Vec<usize> = match self.topology {
            Peers::Mesh | Peers::Seeded => (0..n).filter(|p| *p != node).collect(),
            Peers::Ring(k) => (1..=k.min(n - 1)).map(|i| (node + i) % n).collect(),
            Peers::Chain if node + 1 < n => vec![node + 1],
            Peers::Chain => vec![node.saturating_sub(1)],
        };
        let peers: Vec<usize> = peers
            .into_iter()
            .chain(self.opts.black_hole.then_some(n))
            .collect();
        let now = self.now;
        let (sync, ae) = (self.opts.sync_ms, self.opts.anti_entropy_ms);
        let n = &mut self.nodes[node];
        n.links = peers
            .iter()
            .map(|p| {
                (
                    *p,
                    Link {
                        schedule: Schedule::new(now, sync, ae),
                        view: PeerView::default(),
                        out: None,
                        timer: 0,
                    },
                )
            })
            .collect();
        let inc = n.inc;
        self.at(now + self.opts.sync_ms, Event::Tick { node, inc });
        for p in peers {
            self.drive(node, p);
        }
    }

    /// Runs a link's schedule until it waits: makes the calls it asks for.
    fn drive(&mut self, node: usize, peer: usize) {
        loop {
            match self.step(node, peer) {
                Step::Stop => return,
                Step::Again => {}
                Step::Wait(t, timer) => {
                    self.at(t, Event::Poll { node, peer, timer });
                    return;
                }
                Step::Call(body, lsn) => {
                    self.call(node, peer, *body, lsn);
                    return;
                }
            }
        }
    }

    fn step(&mut self, node: usize, peer: usize) -> Step {
        let now = self.now;
        let n = &mut self.nodes[node];
        if !n.up {
            return Step::Stop;
        }
        let Some(link) = n.links.get_mut(&peer) else {
            return Step::Stop;
        };
        match link.schedule.poll(now, link.view.contacted) {
            Next::Wait(None) => Step::Stop,
            Next::Wait(Some(t)) => {
                link.timer += 1;
                Step::Wait(t, link.timer)
            }
            Next::Call(Call::Pull) => Step::Call(
                Box::new(Body::Pull(protocol::pull_request(&n.replica))),
                None,
            ),
            Next::Call(Call::Push) => {
                let plan = protocol::plan_push(
                    &n.replica,
                    &link.view,
                    &self.policy,
                    self.opts.batch,
                    self.opts.broken,
                );
                let sender_id = n.actor.clone();
                match plan {
                    Outgoing::Nothing => {
                        link.schedule.done(true);
                        Step::Again
                    }
                    Outgoing::Deltas(deltas) => Step::Call(
                        Box::new(Body::Push(pb::DeltaBatch {
                            sender_id,
                            deltas,
                            full_state: None,
                        })),
                        None,
                    ),
                    Outgoing::FullState => {
                        self.stats.full_states += 1;
                        let u = protocol::unsealed(&n.replica);
                        let lsn = u.lsn;
                        let body = Body::Push(pb::DeltaBatch {
                            sender_id,
                            deltas: Vec::new(),
                            full_state: Some(protocol::seal(u)),
                        });
                        Step::Call(Box::new(body), Some(lsn))
                    }
                }
            }
        }
    }

    /// Sends a call of `node`'s link to `peer` (once `lsn` is durable, when given).
    fn call(&mut self, node: usize, peer: usize, body: Body, lsn: Option<u64>) {
        self.next_call += 1;
        let call = self.next_call;
        if let Some(l) = self.nodes[node].links.get_mut(&peer) {
            l.out = Some(call);
        }
        self.at(
            self.now + CALL_TIMEOUT_MS,
            Event::Timeout { node, peer, call },
        );
        let msg = Msg {
            from: node,
            to: peer,
            call,
            body,
        };
        self.send_when_durable(node, lsn, msg);
    }

    fn send_when_durable(&mut self, node: usize, lsn: Option<u64>, msg: Msg) {
        match lsn {
            Some(lsn) if lsn > self.nodes[node].replica.durable_lsn() => {
                self.nodes[node].waiting.push(Waiting { lsn, msg });
            }
            _ => self.send(msg),
        }
    }

    /// Puts a message on the network, with the faults in force.
    fn send(&mut self, msg: Msg) {
        self.stats.messages += 1;
        let f = self.opts.faults;
        let lossy = self.faults_on;
        if lossy && self.rng.chance(f.loss) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if lossy && self.rng.chance(f.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let slow = if self.opts.slow_link && msg.from.min(msg.to) == 0 && msg.from.max(msg.to) == 1
        {
            SLOW_LINK_MS
        } else {
            0
        };
        for _ in 0..copies {
            let delay = self.rng.range(f.delay_ms.0, f.delay_ms.1) + slow;
            self.at(self.now + delay, Event::Deliver(Box::new(msg.clone())));
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        match &self.cut {
            Some(side) => side.get(a) == side.get(b),
            None => true,
        }
    }

    fn deliver(&mut self, msg: Msg) {
        // The black hole, a cut link and a stopped node's replies vanish (the caller
        // times out); a request to a stopped node is refused at once.
        if msg.to >= self.nodes.len() || !self.reachable(msg.from, msg.to) {
            self.stats.dropped += 1;
            return;
        }
        let is_request = matches!(msg.body, Body::Push(_) | Body::Pull(_));
        if !self.nodes[msg.to].up {
            self.stats.dropped += 1;
            if is_request {
                self.reply(&msg, Body::Refused, None);
            }
            return;
        }
        match msg.body.clone() {
            Body::Push(batch) => self.serve_push(&msg, batch),
            Body::Pull(req) => self.serve_pull(&msg, req),
            Body::Ack(ack) => self.take_ack(&msg, ack),
            Body::Answer(a) => self.take_answer(&msg, a),
            Body::Refused => {
                if self.is_answer_to_out(&msg) {
                    self.call_done(msg.to, msg.from, false);
                }
            }
        }
    }

    fn reply(&mut self, req: &Msg, body: Body, lsn: Option<u64>) {
        let msg = Msg {
            from: req.to,
            to: req.from,
            call: req.call,
            body,
        };
        self.send_when_durable(req.to, lsn, msg);
    }

    fn is_answer_to_out(&self, msg: &Msg) -> bool {
        self.nodes[msg.to]
            .links
            .get(&msg.from)
            .is_some_and(|l| l.out == Some(msg.call))
    }

    fn call_done(&mut self, node: usize, peer: usize, ok: bool) {
        if let Some(l) = self.nodes[node].links.get_mut(&peer) {
            l.out = None;
            l.schedule.done(ok);
        }
        self.drive(node, peer);
    }

    /// `GossipService.PushDeltas` on the receiving replica.
    fn serve_push(&mut self, msg: &Msg, batch: pb::DeltaBatch) {
        let node = msg.to;
        if let Some(full) = batch.full_state
            && self.take_full(node, &full).is_err()
        {
            self.reply(msg, Body::Refused, None);
            return;
        }
        let (good, received, rejected) = self.take_deltas(node, batch.deltas);
        self.credit(node, &batch.sender_id, &good);
        let ack = protocol::ack(&self.nodes[node].replica, &received, rejected);
        self.reply(msg, Body::Ack(ack), None);
    }

    /// `GossipService.AntiEntropy` on the asked replica.
    fn serve_pull(&mut self, msg: &Msg, req: pb::AntiEntropyRequest) {
        let n = &self.nodes[msg.to];
        let theirs = protocol::from_vv(req.version);
        let plan = protocol::plan_answer(
            &n.replica,
            &theirs,
            self.opts.batch,
            &req.sender_id,
            self.opts.broken,
        );
        let (deltas, full, lsn) = match plan {
            Outgoing::Nothing => (Vec::new(), None, None),
            Outgoing::Deltas(d) => (d, None, None),
            Outgoing::FullState => {
                self.stats.full_states += 1;
                let u = protocol::unsealed(&n.replica);
                let lsn = u.lsn;
                (Vec::new(), Some(protocol::seal(u)), Some(lsn))
            }
        };
        let answer = protocol::answer(&self.nodes[msg.to].replica, deltas, full);
        self.reply(msg, Body::Answer(answer), lsn);
    }

    fn take_ack(&mut self, msg: &Msg, ack: pb::PushAck) {
        if !self.is_answer_to_out(msg) {
            return;
        }
        let version = protocol::from_vv(ack.version);
        if let Some(l) = self.nodes[msg.to].links.get_mut(&msg.from) {
            l.view.learn(ack.replica_id, version);
        }
        self.call_done(msg.to, msg.from, true);
    }

    fn take_answer(&mut self, msg: &Msg, mut a: pb::AntiEntropyReply) {
        if !self.is_answer_to_out(msg) {
            return;
        }
        let node = msg.to;
        if let Some(full) = a.full_state.take()
            && self.take_full(node, &full).is_err()
        {
            self.call_done(node, msg.from, false);
            return;
        }
        let (good, _, _) = self.take_deltas(node, std::mem::take(&mut a.deltas));
        let version = protocol::from_vv(a.version);
        self.credit(node, &a.sender_id, &good);
        if let Some(l) = self.nodes[node].links.get_mut(&msg.from) {
            l.view.learn(a.sender_id, version);
        }
        self.call_done(node, msg.from, true);
    }

    /// `sender` holds `deltas` (it sent them): `node` never sends them back to it (as
    /// `gossip::Peers::learned_from`).
    fn credit(&mut self, node: usize, sender: &str, deltas: &[VerifiedDelta]) {
        for l in self.nodes[node].links.values_mut() {
            if l.view.actor.as_deref() == Some(sender) {
                l.view.credit(deltas);
            }
        }
    }

    /// Verifies and joins a full state, and logs it.
    fn take_full(&mut self, node: usize, full: &pb::SignedFullState) -> Result<(), ()> {
        let vk = self
            .authorized
            .check_key(&full.origin_id, &full.public_key)
            .map_err(|e| {
                self.violations
                    .push(format!("node {node} refused a full state: {e}"))
            })?;
        let state = protocol::open(vk, full).map_err(|e| {
            self.violations
                .push(format!("node {node} refused a full state: {e}"))
        })?;
        let n = &mut self.nodes[node];
        let (changed, applied) = n.replica.merge_state(&state);
        if changed {
            let lsn = n.replica.lsn() - applied.len() as u64;
            n.disk.append(Record::Full(Arc::new(state)), lsn);
        }
        self.log_applied(node, applied);
        Ok(())
    }

    /// Verifies signed deltas and applies the good ones (logging them).
    fn take_deltas(
        &mut self,
        node: usize,
        signed: Vec<pb::SignedDelta>,
    ) -> (Vec<VerifiedDelta>, form_state::replica::Received, u32) {
        let results = self
            .authorized
            .verify_batch(signed.into_iter().map(Arc::new).collect());
        let mut good = Vec::new();
        let mut rejected = 0;
        for r in results {
            match r {
                Ok(v) => good.push(v),
                Err(e) => {
                    rejected += 1;
                    self.violations
                        .push(format!("node {node} rejected a delta: {e}"));
                }
            }
        }
        let received = self.nodes[node].replica.receive(good.clone());
        if received.overflow > 0 {
            self.nodes[node].anti_entropy_wanted = true;
        }
        self.log_applied(node, received.applied.clone());
        (good, received, rejected)
    }

    fn log_applied(&mut self, node: usize, applied: Vec<Arc<VerifiedDelta>>) {
        let n = &mut self.nodes[node];
        let first = n.replica.lsn() + 1 - applied.len() as u64;
        for (i, d) in applied.into_iter().enumerate() {
            n.disk.append(Record::Delta(d), first + i as u64);
        }
        let version = n.replica.version();
        self.track.reached(node, &version, self.now);
        self.sync_soon(node);
    }

    fn sync_soon(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if let Some(upto) = n.disk.start_sync() {
            let inc = n.inc;
            let ms = self.rng.range(n.disk_ms / 2, n.disk_ms).max(1);
            self.at(self.now + ms, Event::Synced { node, inc, upto });
        }
    }

    fn synced(&mut self, node: usize, inc: u64, upto: usize) {
        let n = &mut self.nodes[node];
        if !n.up || n.inc != inc {
            return;
        }
        let durable = n.disk.finish_sync(upto);
        n.replica.mark_durable(durable);
        let durable = n.replica.durable_lsn();
        let (acked, rest): (Vec<_>, Vec<_>) = n.unacked.drain(..).partition(|(l, _)| *l <= durable);
        n.unacked = rest;
        let mut wake = false;
        for (_, w) in acked {
            self.ack(w);
            // As `Store::write`: a durable local write to an urgent field wakes every
            // link's push.
            wake |= self.history.writes[w].put && self.urgent.contains(&Field::Domain);
        }
        if wake {
            self.stats.wakes += 1;
            let peers: Vec<usize> = self.nodes[node].links.keys().copied().collect();
            for p in peers {
                if let Some(l) = self.nodes[node].links.get_mut(&p) {
                    l.schedule.wake(true, false);
                }
                self.drive(node, p);
            }
        }
        let (ready, rest): (Vec<_>, Vec<_>) = self.nodes[node]
            .waiting
            .drain(..)
            .partition(|w| w.lsn <= durable);
        self.nodes[node].waiting = rest;
        for w in ready {
            self.send(w.msg);
        }
        self.sync_soon(node);
    }

    fn ack(&mut self, w: usize) {
        let write = &mut self.history.writes[w];
        if !write.acked {
            write.acked = true;
            self.stats.acked += 1;
            if !write.put {
                self.stats.acked_deletes += 1;
            }
        }
    }

    /// A client writes to a random running replica: creates a cluster, or deletes one
    /// the replica has.
    fn client_write(&mut self) {
        let node = self.rng.below(self.nodes.len());
        if !self.nodes[node].up {
            return;
        }
        let at_ms = (EPOCH_MS as i64 + self.now as i64 + self.nodes[node].skew) as u64;
        let ids: Vec<String> = self.nodes[node]
            .replica
            .state()
            .ids(Space::Cluster)
            .into_iter()
            .filter(|id| id.starts_with('w'))
            .map(str::to_owned)
            .collect();
        let put = ids.is_empty() || self.rng.chance(0.8);
        let id = if put {
            format!("w{node}-{}", self.history.writes.len())
        } else {
            ids[self.rng.below(ids.len())].clone()
        };
        let writes = self.history.writes.len();
        let n = &mut self.nodes[node];
        let made = n.replica.write(at_ms, |s, actor| {
            let mut b = DeltaBuilder::new(s, actor);
            if put {
                b.set(
                    Key::cluster(&id, Field::Domain),
                    Value::Text(id.clone()),
                    0,
                    at_ms,
                );
                // An operation of the new cluster, under an id that other replicas
                // write too (for other clusters): the replicas' index of operations by
                // cluster must follow whichever body wins.
                let (op, body, status) = operation_of(&id, writes);
                b.set(Key::operation(&op, Field::OperationBody), body, 0, at_ms);
                b.set(
                    Key::operation(&op, Field::OperationStatus),
                    status,
                    0,
                    at_ms,
                );
            } else {
                b.remove_scope(Space::Cluster, &id, None);
            }
            Ok(b.build())
        });
        let Ok(Some(d)) = made else { return };
        self.stats.writes += 1;
        let lsn = n.replica.lsn();
        n.disk.append(Record::Delta(d.clone()), lsn);
        let w = self.history.writes.len();
        n.unacked.push((lsn, w));
        self.history.writes.push(Write {
            node,
            id,
            put,
            dot: (d.delta.actor.clone(), d.delta.last()),
            acked: false,
        });
        if self.opts.ack_before_sync {
            self.ack(w);
        }
        self.track.made(&d.delta.actor, d.delta.last(), self.now);
        let version = self.nodes[node].replica.version();
        self.track.reached(node, &version, self.now);
        self.sync_soon(node);
    }

    fn crash(&mut self, node: usize, down_ms: u64) {
        if !self.faults_on || !self.nodes[node].up {
            return;
        }
        self.stats.crashes += 1;
        let unsynced = self.nodes[node].disk.unsynced() as u64;
        let extra = self.rng.range(0, unsynced) as usize;
        let n = &mut self.nodes[node];
        n.up = false;
        n.inc += 1;
        n.disk.crash(extra);
        n.links.clear();
        n.unacked.clear();
        n.waiting.clear();
        n.anti_entropy_wanted = false;
        self.at(self.now + down_ms, Event::Restart { node });
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].up {
            return;
        }
        let n = &mut self.nodes[node];
        let fresh = Replica::new(
            n.actor.clone(),
            n.key.clone(),
            self.authorized.clone(),
            State::default(),
            self.limits,
        );
        n.replica = n.disk.recover(fresh);
        n.up = true;
        let version = n.replica.version();
        let own = version.get(&n.actor).copied().unwrap_or(0);
        let actor = n.actor.clone();
        self.violations
            .extend(self.history.check_recovered(node, &version));
        self.track.forget_after(&actor, own);
        self.start(node);
    }

    /// Every replica running and holding one state.
    fn converged(&self) -> bool {
        let first = &self.nodes[0];
        self.nodes.iter().all(|n| n.up)
            && self
                .nodes
                .iter()
                .all(|n| n.replica.version() == first.replica.version())
            && self
                .nodes
                .iter()
                .all(|n| n.replica.state() == first.replica.state())
    }

    fn finish(mut self) -> Outcome {
        let converged_after_ms = match (self.converged_at, self.faults_ended_at) {
            (Some(c), Some(e)) => Some(c - e),
            _ => None,
        };
        if converged_after_ms.is_none() {
            let versions: BTreeSet<String> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| format!("node {i} (up: {}): {:?}", n.up, n.replica.version()))
                .collect();
            self.violations.push(format!(
                "the replicas did not converge within {} ms after the faults ended: {}",
                self.opts.settle_ms,
                versions.into_iter().collect::<Vec<_>>().join("; ")
            ));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.replica.pending_len() > 0 {
                self.violations.push(format!(
                    "node {i} still buffers {} deltas whose predecessors never came",
                    n.replica.pending_len()
                ));
            }
            self.violations.extend(
                self.history
                    .check_final(&format!("node {i}"), n.replica.state()),
            );
            if *n.replica.operations() != Operations::of(n.replica.state()) {
                self.violations.push(format!(
                    "node {i}'s index of operations differs from one built from its state"
                ));
            }
        }
        let encoded = codec::encode_state(self.nodes[0].replica.state());
        Outcome {
            seed: self.seed,
            violations: self.violations,
            converged_after_ms,
            digest: (encoded.len(), fnv(&encoded)),
            stats: self.stats,
            convergence: self.track,
            setup: format!(
                "peers {:?}, policy {}, buffer {}, delta log {}",
                self.topology,
                match &self.policy {
                    ReplicationPolicy::DeltaSync => "delta",
                    ReplicationPolicy::FullSync => "full",
                    ReplicationPolicy::PrioritizedSync { .. } => "prioritized",
                },
                self.limits.buffer,
                self.limits.log
            ),
        }
    }
}

/// `clusters` clusters of `members` members each, as one replica made them long ago
/// (the fleet-scale runs start from it on every replica).
fn genesis(clusters: usize, members: usize) -> Option<Arc<State>> {
    if clusters == 0 {
        return None;
    }
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut r = Replica::new(
        "genesis@1".into(),
        key,
        Authorized::new(BTreeMap::new()),
        State::default(),
        Limits::default(),
    );
    for c in 0..clusters {
        let id = format!("c{c}");
        let _ = r.write(EPOCH_MS, |s, actor| {
            let mut b = DeltaBuilder::new(s, actor);
            b.set(
                Key::cluster(&id, Field::Domain),
                Value::Text(format!("{id}.example")),
                0,
                EPOCH_MS,
            );
            for m in 0..members {
                let inst = format!("i{m}");
                b.set(
                    Key::member(&id, &inst, Field::MemberStatus),
                    Value::U64(1),
                    0,
                    EPOCH_MS,
                );
                b.set(
                    Key::member(&id, &inst, Field::Addresses),
                    Value::Texts(vec![format!("10.{}.{}.{m}:8080", c / 256, c % 256)]),
                    0,
                    EPOCH_MS,
                );
            }
            Ok(b.build())
        });
    }
    Some(Arc::new(r.state().clone()))
}

/// FNV-1a of `b`: a digest that needs no dependency.
/// The `n`th write's operation for `cluster`: one of 7 ids, so replicas write the
/// same operation for different clusters; every other one has ended.
fn operation_of(cluster: &str, n: usize) -> (String, Value, Value) {
    use form_proto::types::v1 as types;
    use prost::Message;
    use types::operation_status::State as S;
    let id = format!("op{}", n % 7);
    let body = types::Operation {
        operation_id: id.clone(),
        cluster_id: cluster.to_owned(),
        kind: types::OperationKind::ScaleOut as i32,
        ..Default::default()
    };
    let state = if n.is_multiple_of(2) {
        S::Completed(types::Completed {})
    } else {
        S::InProgress(types::InProgress {
            step_index: 0,
            step: "clone".into(),
        })
    };
    let status = types::OperationStatus { state: Some(state) };
    (
        id,
        Value::Bytes(body.encode_to_vec()),
        Value::Bytes(status.encode_to_vec()),
    )
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    })
}
