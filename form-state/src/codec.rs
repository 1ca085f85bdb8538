//! Versioned binary encoding of deltas and states (postcard behind a format byte), so
//! a replica refuses data written by a newer format instead of misreading it.
//!
//! ```text
//! +---------+----------------------+
//! | version | postcard(Delta|State) |
//! +---------+----------------------+
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crdt::{Delta, State};

/// Current format of encoded deltas and states.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Empty input.
    #[error("empty")]
    Empty,
    /// Written by another format version.
    #[error("format version {0}; this build reads version {FORMAT_VERSION}")]
    Version(u8),
    /// Not a valid encoding.
    #[error("malformed: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // postcard cannot fail on these in-memory types (no maps with non-string keys issues).
    out.extend(postcard::to_stdvec(v).unwrap_or_default());
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&v, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if v != FORMAT_VERSION {
        return Err(CodecError::Version(v));
    }
    postcard::from_bytes(rest).map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Encodes a delta.
pub fn encode_delta(d: &Delta) -> Vec<u8> {
    encode(d)
}

/// Decodes a delta.
pub fn decode_delta(bytes: &[u8]) -> Result<Delta, CodecError> {
    decode(bytes)
}

/// Encodes a whole state.
pub fn encode_state(s: &State) -> Vec<u8> {
    encode(s)
}

/// Decodes a whole state.
pub fn decode_state(bytes: &[u8]) -> Result<State, CodecError> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::crdt::{DeltaBuilder, Field, Key, Value};

    proptest! {
        #[test]
        fn deltas_round_trip(id in "[a-z]{1,8}", text in ".{0,40}", n in any::<u64>()) {
            let s = State::default();
            let mut b = DeltaBuilder::new(&s, "a@1");
            b.set(Key::cluster(&id, Field::Domain), Value::Text(text), n, n);
            let d = b.build().expect("delta");
            prop_assert_eq!(decode_delta(&encode_delta(&d)).expect("decodes"), d.clone());
            let st = d.to_state();
            prop_assert_eq!(decode_state(&encode_state(&st)).expect("decodes"), st);
        }
    }

    #[test]
    fn future_versions_and_garbage_are_refused() {
        assert!(matches!(decode_delta(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode_delta(&[9, 1, 2]),
            Err(CodecError::Version(9))
        ));
        assert!(matches!(
            decode_delta(&[FORMAT_VERSION, 0xff, 0xff, 0xff]),
            Err(CodecError::Malformed(_))
        ));
    }
}
