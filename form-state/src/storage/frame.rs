//! Framing of WAL records and snapshots, each with a format version and a CRC-32.
//!
//! ```text
//! WAL record:  | "FWAL" | version u8 | kind u8 | len u32 LE | crc32(kind, payload) u32 LE | payload |
//! snapshot:    | "FSNP" | version u8 | segment u64 LE | len u64 LE | crc32(payload) u32 LE | payload |
//! ```

use super::Record;

/// Magic of a WAL record.
pub const WAL_MAGIC: &[u8; 4] = b"FWAL";
/// Magic of a snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 4] = b"FSNP";
/// Current version of both formats.
pub const VERSION: u8 = 1;
/// Bytes before a record's payload.
pub const RECORD_HEADER: usize = 4 + 1 + 1 + 4 + 4;
/// Bytes before a snapshot's payload.
pub const SNAPSHOT_HEADER: usize = 4 + 1 + 8 + 8 + 4;
/// Largest record payload accepted (a full state can be large).
pub const MAX_RECORD: usize = 1 << 30;

/// Appends the framed `record` to `out`.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) {
    let payload = record.payload();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[record.kind()]);
    crc.update(payload);
    out.extend_from_slice(WAL_MAGIC);
    out.push(VERSION);
    out.push(record.kind());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// The length of `record`'s frame ([`encode_record`]).
pub fn record_len(record: &Record) -> u64 {
    (WAL_MAGIC.len() + 1 + 1 + 4 + 4 + record.payload().len()) as u64
}

/// The outcome of reading one record at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A record and the offset after it.
    Record(Record, usize),
    /// Clean end of input.
    End,
    /// The input ends inside a record (a write cut short): everything from here on is
    /// a torn tail.
    Torn(String),
    /// The bytes here are not a valid record although more input follows.
    Corrupt(String),
}

/// Reads the record at `at`.
pub fn read_record(buf: &[u8], at: usize) -> Read {
    let rest = &buf[at..];
    if rest.is_empty() {
        return Read::End;
    }
    if rest.iter().all(|b| *b == 0) {
        return Read::Torn(format!("{} zero bytes at the end", rest.len()));
    }
    if rest.len() < RECORD_HEADER {
        return if WAL_MAGIC.starts_with(&rest[..rest.len().min(4)]) {
            Read::Torn(format!("{} bytes of a record header", rest.len()))
        } else {
            Read::Corrupt("bad magic".into())
        };
    }
    if &rest[..4] != WAL_MAGIC {
        return Read::Corrupt("bad magic (not a record)".into());
    }
    if rest[4] != VERSION {
        return Read::Corrupt(format!(
            "record format version {}; this build reads version {VERSION}",
            rest[4]
        ));
    }
    let kind = rest[5];
    let len = u32::from_le_bytes([rest[6], rest[7], rest[8], rest[9]]) as usize;
    let crc = u32::from_le_bytes([rest[10], rest[11], rest[12], rest[13]]);
    if len > MAX_RECORD {
        return Read::Corrupt(format!("record length {len} is larger than {MAX_RECORD}"));
    }
    let end = RECORD_HEADER + len;
    if rest.len() < end {
        return Read::Torn(format!(
            "record of {len} bytes cut at {}",
            rest.len() - RECORD_HEADER
        ));
    }
    let payload = &rest[RECORD_HEADER..end];
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    if h.finalize() != crc {
        let msg = "checksum mismatch".to_owned();
        // The last record of the input with a bad checksum is a write cut short.
        return if rest.len() == end {
            Read::Torn(msg)
        } else {
            Read::Corrupt(msg)
        };
    }
    let record = match kind {
        1 => Record::Delta(payload.to_vec()),
        2 => Record::FullState(payload.to_vec()),
        k => return Read::Corrupt(format!("unknown record kind {k}")),
    };
    Read::Record(record, at + end)
}

/// The offset of the first valid record after `at`, if any: a "torn" tail followed by
/// valid records is corruption (a damaged length), not a write cut short.
pub fn valid_record_after(buf: &[u8], at: usize) -> Option<usize> {
    let mut from = at + 1;
    while from + RECORD_HEADER <= buf.len() {
        let i = from + buf[from..].windows(4).position(|w| w == WAL_MAGIC)?;
        if matches!(read_record(buf, i), Read::Record(..)) {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// A framed snapshot of `payload`, taken at the end of WAL segment `segment`.
pub fn encode_snapshot(segment: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER + payload.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&segment.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The segment and payload of a framed snapshot, or what is wrong with it.
pub fn decode_snapshot(buf: &[u8]) -> Result<(u64, &[u8]), String> {
    if buf.len() < SNAPSHOT_HEADER {
        return Err(format!(
            "truncated: {} bytes, the header alone is {SNAPSHOT_HEADER}",
            buf.len()
        ));
    }
    if &buf[..4] != SNAPSHOT_MAGIC {
        return Err("bad magic (not a snapshot)".into());
    }
    if buf[4] != VERSION {
        return Err(format!(
            "snapshot format version {}; this build reads version {VERSION}",
            buf[4]
        ));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let segment = u64_at(5);
    let len = u64_at(13) as usize;
    let crc = u32::from_le_bytes([buf[21], buf[22], buf[23], buf[24]]);
    let payload = &buf[SNAPSHOT_HEADER..];
    if payload.len() != len {
        return Err(format!(
            "truncated at offset {}: expected {len} payload bytes, found {}",
            buf.len(),
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err(format!(
            "checksum mismatch in the payload at offset {SNAPSHOT_HEADER}"
        ));
    }
    Ok((segment, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_records() -> Vec<u8> {
        let mut buf = Vec::new();
        encode_record(&Record::Delta(b"one".to_vec()), &mut buf);
        encode_record(&Record::FullState(b"two".to_vec()), &mut buf);
        buf
    }

    #[test]
    fn records_round_trip() {
        let buf = two_records();
        let Read::Record(a, next) = read_record(&buf, 0) else {
            panic!("first")
        };
        assert_eq!(a, Record::Delta(b"one".to_vec()));
        let Read::Record(b, end) = read_record(&buf, next) else {
            panic!("second")
        };
        assert_eq!(b, Record::FullState(b"two".to_vec()));
        assert_eq!(read_record(&buf, end), Read::End);
    }

    #[test]
    fn a_cut_tail_is_torn_and_a_bad_middle_is_corrupt() {
        let buf = two_records();
        let first_len = RECORD_HEADER + 3;
        for cut in first_len + 1..buf.len() {
            assert!(
                matches!(read_record(&buf[..cut], first_len), Read::Torn(_)),
                "cut at {cut}"
            );
        }
        let mut flipped = buf.clone();
        flipped[RECORD_HEADER + 1] ^= 0xff; // inside the first payload
        assert!(matches!(read_record(&flipped, 0), Read::Corrupt(m) if m.contains("checksum")));
        let mut last = buf.clone();
        let n = last.len() - 1;
        last[n] ^= 0xff; // inside the last payload
        assert!(matches!(read_record(&last, first_len), Read::Torn(_)));
        let mut length = buf.clone();
        length[6] = 0xff; // the first record's length now runs past the end
        assert!(matches!(read_record(&length, 0), Read::Torn(_)));
        assert_eq!(
            valid_record_after(&length, 0),
            Some(first_len),
            "but a valid record follows"
        );
        assert_eq!(valid_record_after(&buf[..buf.len() - 1], first_len), None);
        let mut future = buf;
        future[4] = 9;
        assert!(matches!(read_record(&future, 0), Read::Corrupt(m) if m.contains("version 9")));
    }

    #[test]
    fn snapshots_detect_truncation_corruption_and_future_versions() {
        let snap = encode_snapshot(7, b"state bytes");
        assert_eq!(decode_snapshot(&snap), Ok((7, &b"state bytes"[..])));
        assert!(
            decode_snapshot(&snap[..snap.len() - 2])
                .expect_err("truncated")
                .contains("truncated")
        );
        let mut bad = snap.clone();
        let n = bad.len() - 1;
        bad[n] ^= 1;
        assert!(
            decode_snapshot(&bad)
                .expect_err("corrupt")
                .contains("checksum")
        );
        let mut future = snap;
        future[4] = 2;
        assert!(
            decode_snapshot(&future)
                .expect_err("future")
                .contains("version 2")
        );
    }
}
