//! Signed delta envelopes: what replicas exchange. The origin signs the encoded
//! `DeltaEnvelope` whole; a receiver checks that the key is authorized for the replica
//! the envelope names, then the signature, then the payload.

use std::collections::BTreeMap;
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use form_proto::state::v1 as pb;
use prost::Message;

use crate::codec;
use crate::crdt::Delta;
use crate::error::StateError;

/// Most dots one delta may consume.
pub const MAX_DOTS_PER_DELTA: u64 = 1 << 20;

/// A delta whose origin and signature were checked (or that this replica made).
#[derive(Debug, Clone)]
pub struct VerifiedDelta {
    /// The delta.
    pub delta: Delta,
    /// What the origin had applied when it made the delta.
    pub deps: BTreeMap<String, u64>,
    /// When the origin made it, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// The signed bytes, to store and forward unchanged.
    pub signed: Arc<pb::SignedDelta>,
}

/// The replica id part of an actor (`state-1@5f3a9c21` -> `state-1`).
pub fn replica_of(actor: &str) -> &str {
    actor.split_once('@').map_or(actor, |(r, _)| r)
}

/// Signs `delta` as its origin.
pub fn sign(
    key: &SigningKey,
    delta: Delta,
    deps: BTreeMap<String, u64>,
    now: u64,
) -> VerifiedDelta {
    let envelope = pb::DeltaEnvelope {
        origin_id: delta.actor.clone(),
        seq: delta.first,
        deps: Some(pb::VersionVector {
            entries: deps.clone().into_iter().collect(),
        }),
        created_at_ms: now,
        payload: codec::encode_delta(&delta),
    }
    .encode_to_vec();
    let signature = key.sign(&envelope).to_bytes().to_vec();
    VerifiedDelta {
        delta,
        deps,
        created_at_ms: now,
        signed: Arc::new(pb::SignedDelta {
            envelope,
            signature,
            public_key: key.verifying_key().to_bytes().to_vec(),
        }),
    }
}

/// The keys this replica accepts deltas from, by replica id.
#[derive(Debug, Clone, Default)]
pub struct Authorized {
    keys: BTreeMap<String, VerifyingKey>,
}

impl Authorized {
    /// The authorized set.
    pub fn new(keys: BTreeMap<String, VerifyingKey>) -> Self {
        Self { keys }
    }

    /// Whether `replica` may sign with `key`.
    pub fn allows(&self, replica: &str, key: &VerifyingKey) -> bool {
        self.keys.get(replica) == Some(key)
    }

    /// Checks the key of a signed item claimed by `origin`; returns the key.
    pub fn check_key(&self, origin: &str, public_key: &[u8]) -> Result<VerifyingKey, StateError> {
        let reject = |reason, message: String| StateError::Rejected {
            reason,
            origin: origin.to_owned(),
            message,
        };
        let bytes: [u8; 32] = public_key.try_into().map_err(|_| {
            reject(
                "malformed",
                format!("public key of {} bytes", public_key.len()),
            )
        })?;
        let vk =
            VerifyingKey::from_bytes(&bytes).map_err(|e| reject("malformed", e.to_string()))?;
        if !self.keys.values().any(|k| *k == vk) {
            return Err(reject(
                "unknown_key",
                "the key is not in the authorized set".into(),
            ));
        }
        if !self.allows(replica_of(origin), &vk) {
            return Err(reject(
                "wrong_origin",
                format!(
                    "the key is not the one authorized for {}",
                    replica_of(origin)
                ),
            ));
        }
        Ok(vk)
    }

    /// Verifies one signed delta.
    pub fn verify(&self, signed: Arc<pb::SignedDelta>) -> Result<VerifiedDelta, StateError> {
        self.verify_batch(vec![signed])
            .pop()
            .unwrap_or_else(|| unreachable!())
    }

    /// Verifies a batch with one batch verification; when it fails, each delta is
    /// checked alone so only the bad ones are rejected.
    pub fn verify_batch(
        &self,
        batch: Vec<Arc<pb::SignedDelta>>,
    ) -> Vec<Result<VerifiedDelta, StateError>> {
        let opened: Vec<_> = batch.iter().map(|s| self.open(s)).collect();
        let ok: Vec<usize> = (0..batch.len()).filter(|i| opened[*i].is_ok()).collect();
        let msgs: Vec<&[u8]> = ok.iter().map(|i| batch[*i].envelope.as_slice()).collect();
        let (sigs, keys): (Vec<Signature>, Vec<VerifyingKey>) = ok
            .iter()
            .filter_map(|i| opened[*i].as_ref().ok().map(|(_, vk, sig)| (*sig, *vk)))
            .unzip();
        let all_good = ok.len() > 1 && ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok();
        batch
            .into_iter()
            .zip(opened)
            .map(|(signed, opened)| {
                let (env, vk, sig) = opened?;
                if !all_good {
                    // One by one: a batch of one, or a batch with a bad signature in it.
                    vk.verify(&signed.envelope, &sig)
                        .map_err(|e| StateError::Rejected {
                            reason: "bad_signature",
                            origin: env.origin_id.clone(),
                            message: e.to_string(),
                        })?;
                }
                finish(env, signed)
            })
            .collect()
    }

    /// Decodes a delta read back from this replica's own log, whose signature was
    /// checked before it was written.
    pub fn decode_trusted(signed: Arc<pb::SignedDelta>) -> Result<VerifiedDelta, StateError> {
        let env = decode_envelope(&signed.envelope)?;
        finish(env, signed)
    }

    fn open(
        &self,
        signed: &pb::SignedDelta,
    ) -> Result<(pb::DeltaEnvelope, VerifyingKey, Signature), StateError> {
        let env = decode_envelope(&signed.envelope)?;
        let vk = self.check_key(&env.origin_id, &signed.public_key)?;
        let sig = Signature::from_slice(&signed.signature).map_err(|e| StateError::Rejected {
            reason: "malformed",
            origin: env.origin_id.clone(),
            message: format!("signature: {e}"),
        })?;
        Ok((env, vk, sig))
    }
}

fn decode_envelope(bytes: &[u8]) -> Result<pb::DeltaEnvelope, StateError> {
    pb::DeltaEnvelope::decode(bytes).map_err(|e| StateError::Rejected {
        reason: "malformed",
        origin: "?".into(),
        message: format!("envelope: {e}"),
    })
}

fn finish(
    env: pb::DeltaEnvelope,
    signed: Arc<pb::SignedDelta>,
) -> Result<VerifiedDelta, StateError> {
    let malformed = |message: String| StateError::Rejected {
        reason: "malformed",
        origin: env.origin_id.clone(),
        message,
    };
    let delta =
        codec::decode_delta(&env.payload).map_err(|e| malformed(format!("payload: {e}")))?;
    if delta.actor != env.origin_id || delta.first != env.seq {
        return Err(malformed("payload does not match its envelope".into()));
    }
    if delta.first == 0
        || delta.len == 0
        || delta.len < delta.writes.len() as u64
        || delta.len > MAX_DOTS_PER_DELTA
        || delta.first.checked_add(delta.len).is_none()
    {
        return Err(malformed(format!(
            "dots {}+{} do not cover its {} writes",
            delta.first,
            delta.len,
            delta.writes.len()
        )));
    }
    Ok(VerifiedDelta {
        deps: env
            .deps
            .map(|v| v.entries.into_iter().collect())
            .unwrap_or_default(),
        created_at_ms: env.created_at_ms,
        delta,
        signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{DeltaBuilder, Field, Key, State, Value};

    fn delta(actor: &str) -> Delta {
        let s = State::default();
        let mut b = DeltaBuilder::new(&s, actor);
        b.set(
            Key::cluster("web", Field::Domain),
            Value::Text("web.fog".into()),
            0,
            1,
        );
        b.build().expect("delta")
    }

    fn setup() -> (SigningKey, SigningKey, Authorized) {
        let a = SigningKey::from_bytes(&[1; 32]);
        let evil = SigningKey::from_bytes(&[2; 32]);
        let b = SigningKey::from_bytes(&[3; 32]);
        let auth = Authorized::new(
            [
                ("state-1".to_owned(), a.verifying_key()),
                ("state-2".to_owned(), b.verifying_key()),
            ]
            .into(),
        );
        (a, evil, auth)
    }

    #[test]
    fn good_deltas_verify_alone_and_in_batches() {
        let (a, _, auth) = setup();
        let d = sign(&a, delta("state-1@01"), BTreeMap::new(), 5);
        let v = auth.verify(d.signed.clone()).expect("verifies");
        assert_eq!(v.delta, d.delta);
        let batch = auth.verify_batch(vec![d.signed.clone(), d.signed.clone()]);
        assert!(batch.iter().all(Result::is_ok));
    }

    #[test]
    fn unknown_keys_flipped_bytes_and_impersonation_are_rejected() {
        let (a, evil, auth) = setup();
        let reason = |r: Result<VerifiedDelta, StateError>| match r {
            Err(StateError::Rejected { reason, .. }) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        };
        let forged = sign(&evil, delta("state-1@01"), BTreeMap::new(), 5);
        assert_eq!(reason(auth.verify(forged.signed)), "unknown_key");
        let b = SigningKey::from_bytes(&[3; 32]);
        let impostor = sign(&b, delta("state-1@01"), BTreeMap::new(), 5);
        assert_eq!(reason(auth.verify(impostor.signed)), "wrong_origin");
        let good = sign(&a, delta("state-1@01"), BTreeMap::new(), 5);
        let mut flipped = (*good.signed).clone();
        let last = flipped.envelope.len() - 1;
        flipped.envelope[last] ^= 0x01;
        assert_eq!(
            reason(auth.verify(Arc::new(flipped.clone()))),
            "bad_signature"
        );
        let batch = auth.verify_batch(vec![good.signed.clone(), Arc::new(flipped), good.signed]);
        assert!(batch[0].is_ok() && batch[2].is_ok());
        assert!(matches!(
            &batch[1],
            Err(StateError::Rejected {
                reason: "bad_signature",
                ..
            })
        ));
    }
}
