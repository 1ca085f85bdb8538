//! The gossip protocol without I/O: what a replica knows of a peer, what it sends it
//! (a push, an anti-entropy request or answer) and what it learns from the replies.
//! Every function here works on a [`Replica`] and plain messages; the tonic driver
//! (`super::run`, `super::GossipApi`) and the simulator (`form-sim`) both call them, so
//! the simulator breaks the same protocol that production runs.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use form_proto::state::v1 as pb;
use prost::Message;

use super::ReplicationPolicy;
use crate::codec;
use crate::crdt::State;
use crate::envelope::VerifiedDelta;
use crate::error::StateError;
use crate::replica::{Missing, Received, Replica};

/// What this replica knows of one peer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// The peer's actor, once it answered.
    pub actor: Option<String>,
    /// The version vector it last reported, plus what it sent us since.
    pub known: BTreeMap<String, u64>,
    /// Whether it answered since this replica started (a first round pulls first).
    pub contacted: bool,
}

impl PeerView {
    /// The peer answered as `actor` with `version`: that replaces what was known (a
    /// restarted peer that lost unsynced deltas reports less, and gets them again).
    pub fn learn(&mut self, actor: String, version: BTreeMap<String, u64>) {
        self.actor = Some(actor);
        self.known = version;
        self.contacted = true;
    }

    /// The peer sent these deltas, so it holds them (and what they depend on): they
    /// are never sent back to it.
    pub fn credit(&mut self, deltas: &[VerifiedDelta]) {
        for d in deltas {
            for (a, n) in d.deps.iter().chain([(&d.delta.actor, &d.delta.last())]) {
                let e = self.known.entry(a.clone()).or_insert(0);
                *e = (*e).max(*n);
            }
        }
    }
}

/// Deliberate bugs for the simulator's self-test: a checker that never fails proves
/// nothing. Never set outside tests (no flag of the binary reaches it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Broken {
    /// A replica sends only the deltas it made itself: it never forwards another
    /// replica's deltas (push and anti-entropy answers alike).
    pub no_forward: bool,
}

/// What to send a peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// It has everything.
    Nothing,
    /// These signed deltas, in causal order.
    Deltas(Vec<pb::SignedDelta>),
    /// The whole state (signed once everything in it is durable).
    FullState,
}

/// What to push to a peer seen as `view`.
pub fn plan_push(
    r: &Replica,
    view: &PeerView,
    policy: &ReplicationPolicy,
    batch: usize,
    broken: Broken,
) -> Outgoing {
    if *policy == ReplicationPolicy::FullSync {
        return if r.version() == view.known {
            Outgoing::Nothing
        } else {
            Outgoing::FullState
        };
    }
    plan(r, &view.known, batch, view.actor.as_deref(), broken)
}

/// What to answer a peer's anti-entropy request: what it lacks of `theirs`.
pub fn plan_answer(
    r: &Replica,
    theirs: &BTreeMap<String, u64>,
    batch: usize,
    sender: &str,
    broken: Broken,
) -> Outgoing {
    plan(r, theirs, batch, Some(sender), broken)
}

fn plan(
    r: &Replica,
    known: &BTreeMap<String, u64>,
    batch: usize,
    exclude: Option<&str>,
    broken: Broken,
) -> Outgoing {
    match r.missing_for(known, batch, exclude) {
        Missing::Nothing => Outgoing::Nothing,
        Missing::FullState => Outgoing::FullState,
        Missing::Deltas(v) => {
            let v: Vec<pb::SignedDelta> = v
                .iter()
                .filter(|d| !broken.no_forward || d.delta.actor == r.actor())
                .map(|d| (*d.signed).clone())
                .collect();
            if v.is_empty() {
                Outgoing::Nothing
            } else {
                Outgoing::Deltas(v)
            }
        }
    }
}

/// The request that starts anti-entropy: this replica's version vector.
pub fn pull_request(r: &Replica) -> pb::AntiEntropyRequest {
    pb::AntiEntropyRequest {
        sender_id: r.actor().to_owned(),
        version: Some(vv(&r.version())),
        deltas: Vec::new(),
    }
}

/// The acknowledgement of a push, after `received` (and `rejected` bad deltas).
pub fn ack(r: &Replica, received: &Received, rejected: u32) -> pb::PushAck {
    pb::PushAck {
        version: Some(vv(&r.version())),
        applied: received.applied.len() as u32,
        buffered: received.buffered,
        duplicates: received.duplicates,
        rejected,
        replica_id: r.actor().to_owned(),
    }
}

/// The answer to an anti-entropy request, with what `plan_answer` chose (the full
/// state signed by the caller when it chose one).
pub fn answer(
    r: &Replica,
    deltas: Vec<pb::SignedDelta>,
    full_state: Option<pb::SignedFullState>,
) -> pb::AntiEntropyReply {
    pb::AntiEntropyReply {
        sender_id: r.actor().to_owned(),
        version: Some(vv(&r.version())),
        deltas,
        full_state,
    }
}

/// A whole state as the replica holds it (a cheap copy-on-write clone), to be encoded
/// and signed off the lock with [`seal`].
#[derive(Debug)]
pub struct Unsealed {
    state: State,
    version: pb::VersionVector,
    actor: String,
    key: SigningKey,
    /// The change the state includes: send it only once this lsn is durable.
    pub lsn: u64,
}

/// The replica's whole state (the part that needs the replica, and is cheap).
pub fn unsealed(r: &Replica) -> Unsealed {
    Unsealed {
        state: r.state().clone(),
        version: vv(&r.version()),
        actor: r.actor().to_owned(),
        key: r.key().clone(),
        lsn: r.lsn(),
    }
}

/// Encodes and signs a whole state (the costly part, which needs no replica).
pub fn seal(u: Unsealed) -> pb::SignedFullState {
    let mut msg = codec::encode_state(&u.state);
    let n = msg.len();
    msg.extend(u.version.encode_to_vec());
    let signature = u.key.sign(&msg).to_bytes().to_vec();
    msg.truncate(n);
    pb::SignedFullState {
        signature,
        public_key: u.key.verifying_key().to_bytes().to_vec(),
        origin_id: u.actor,
        state: msg,
        version: Some(u.version),
    }
}

/// Checks a whole state's signature by `vk` (the key its origin is authorized with)
/// and decodes it.
pub fn open(vk: VerifyingKey, s: &pb::SignedFullState) -> Result<State, StateError> {
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

/// A version vector as the wire carries it.
pub fn vv(m: &BTreeMap<String, u64>) -> pb::VersionVector {
    pb::VersionVector {
        entries: m.clone().into_iter().collect(),
    }
}

/// A version vector from the wire.
pub fn from_vv(v: Option<pb::VersionVector>) -> BTreeMap<String, u64> {
    v.map(|v| v.entries.into_iter().collect())
        .unwrap_or_default()
}
