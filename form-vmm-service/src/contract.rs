//! The workload state contract seen from the node (docs/workload-contract.md): reading
//! an instance's changes, merging a batch into an instance, and its cursor, through
//! the instance's admin address. The node learns whether a workload implements the
//! contract when the instance starts (`GET /_form/cursor`), so that later an admin
//! address that stops answering is told apart from a workload that never had one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use form_proto::vmm::v1 as pb;
use serde::Deserialize;

use crate::error::VmmError;
use crate::http;

/// Time limit of one contract request.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit of the probe at start.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest batch read from a workload.
pub const MAX_BATCH: usize = 16 * 1024 * 1024;
/// Batch size when the caller does not say.
const DEFAULT_MAX_BYTES: u32 = 1024 * 1024;
/// Longest cursor accepted from a workload.
const MAX_CURSOR: usize = 1024;
/// Range of `max_bytes` accepted.
const MAX_BYTES_RANGE: std::ops::RangeInclusive<u32> = 4096..=4 * 1024 * 1024;

/// Whether an instance's workload implements the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contract {
    /// It answered `GET /_form/cursor`.
    Supported,
    /// It did not: why.
    Unsupported(String),
}

impl Contract {
    /// The wire form (`Instance.state_contract`).
    pub fn name(&self) -> String {
        match self {
            Contract::Supported => "supported".into(),
            Contract::Unsupported(why) => format!("unsupported: {why}"),
        }
    }
}

/// What the node learned of each instance.
#[derive(Debug, Default)]
pub struct Contracts(Mutex<HashMap<String, Contract>>);

impl Contracts {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Contract>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What is known of instance `id`.
    pub fn get(&self, id: &str) -> Option<Contract> {
        self.map().get(id).cloned()
    }

    /// Records what instance `id` showed.
    pub fn set(&self, id: &str, c: Contract) {
        self.map().insert(id.to_owned(), c);
    }

    /// Forgets a deleted instance.
    pub fn forget(&self, id: &str) {
        self.map().remove(id);
    }

    /// Asks instance `id` at `admin` whether it implements the contract, and records
    /// a definite answer: a valid cursor (supported), a 404, 405 or 501, or nothing
    /// listening on the admin address (unsupported: the workload is healthy, so its
    /// admin listener would be up; the admin address must answer before the health
    /// path). A timeout or another error records nothing: later exchanges decide.
    pub async fn probe(&self, id: &str, admin: Option<SocketAddr>) -> Option<Contract> {
        let c = match admin {
            None => Some(Contract::Unsupported(
                "the instance has no admin address".into(),
            )),
            Some(a) => match http::request(a, "GET", "/_form/cursor", b"", PROBE_TIMEOUT).await {
                Ok((200, body)) if serde_json::from_str::<CursorReply>(&body).is_ok() => {
                    Some(Contract::Supported)
                }
                Ok((code @ (404 | 405 | 501), _)) => Some(Contract::Unsupported(format!(
                    "GET /_form/cursor answered {code}"
                ))),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(
                    Contract::Unsupported(format!("nothing listens on its admin address {a}")),
                ),
                Ok(_) | Err(_) => None,
            },
        };
        if let Some(c) = &c {
            self.set(id, c.clone());
        }
        c
    }
}

/// `GET /_form/cursor`.
#[derive(Debug, Deserialize)]
struct CursorReply {
    cursor: String,
    #[serde(default)]
    writes: Option<u64>,
}

/// The writes instance `admin` counts (`GET /_form/cursor`), if it answers with them:
/// for heartbeats, so that a victim that dies is reported with what it held.
pub async fn writes(admin: SocketAddr) -> Option<u64> {
    match http::request(admin, "GET", "/_form/cursor", b"", PROBE_TIMEOUT).await {
        Ok((200, body)) => serde_json::from_str::<CursorReply>(&body).ok()?.writes,
        _ => None,
    }
}

/// The envelope of a batch; its changes are counted, not read.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    origin: String,
    #[serde(default)]
    next_cursor: String,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    pending: u64,
    #[serde(default)]
    writes: u64,
    changes: Vec<serde::de::IgnoredAny>,
}

/// `GET /_form/merge`'s answer.
#[derive(Debug, Deserialize)]
struct MergeReply {
    #[serde(default)]
    applied: u64,
    #[serde(default)]
    duplicates: u64,
    #[serde(default)]
    stale: u64,
}

/// Percent-encodes a query value.
fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The error for a failed exchange with instance `id`: an instance known to implement
/// the contract that does not answer is unavailable (the caller must not go on as if
/// it had no state); one that never implemented it is unsupported.
fn unreachable(id: &str, known: Option<Contract>, what: &str, e: std::io::Error) -> VmmError {
    match known {
        Some(Contract::Supported) => VmmError::Unavailable(format!(
            "{what} of instance {id} failed: {e} (its workload implements the state contract)"
        )),
        Some(Contract::Unsupported(why)) => VmmError::Unsupported(format!(
            "instance {id}'s workload does not implement the state contract ({why})"
        )),
        None => VmmError::Unavailable(format!("{what} of instance {id} failed: {e}")),
    }
}

/// The answer of a workload that says no: 404 means no contract (unless it showed it
/// had one: then it is unavailable), others are errors.
fn refused(id: &str, known: Option<&Contract>, what: &str, code: u16, text: &[u8]) -> VmmError {
    let text = String::from_utf8_lossy(&text[..text.len().min(500)])
        .trim()
        .to_owned();
    match code {
        404 | 405 | 501 if known == Some(&Contract::Supported) => VmmError::Unavailable(format!(
            "instance {id} answered {code} to {what}, though its workload implements the state contract"
        )),
        404 | 405 | 501 => VmmError::Unsupported(format!(
            "instance {id}'s workload does not implement the state contract ({what} answered {code})"
        )),
        410 => VmmError::CursorGone(format!("instance {id}: {text}")),
        400..=499 => VmmError::invalid(
            "batch",
            format!("instance {id} refused {what} ({code}): {text}"),
        ),
        _ => VmmError::Backend(format!("instance {id} answered {code} to {what}: {text}")),
    }
}

/// Reads instance `id`'s changes since `since` from its admin address.
pub async fn read(
    contracts: &Contracts,
    id: &str,
    admin: Option<SocketAddr>,
    since: &str,
    max_bytes: u32,
    own: bool,
    prefixes: &[String],
) -> Result<pb::ChangeBatch, VmmError> {
    let max = if max_bytes == 0 {
        DEFAULT_MAX_BYTES
    } else {
        max_bytes
    };
    if !MAX_BYTES_RANGE.contains(&max) {
        return Err(VmmError::invalid(
            "max_bytes",
            format!("is {max}; expected 4096 to 4194304, or 0 for 1048576"),
        ));
    }
    let known = contracts.get(id);
    let Some(admin) = admin else {
        return Err(VmmError::Unsupported(format!(
            "instance {id} has no admin address, so no state contract"
        )));
    };
    if prefixes.len() > 16
        || prefixes
            .iter()
            .any(|p| p.is_empty() || p.len() > 256 || p.contains(','))
    {
        return Err(VmmError::invalid(
            "prefixes",
            "expected at most 16 prefixes of 1 to 256 bytes without ','",
        ));
    }
    let mut path = format!(
        "/_form/changes?since={}&max_bytes={max}{}",
        query_value(since),
        if own { "&own=true" } else { "" }
    );
    if !prefixes.is_empty() {
        path.push_str("&prefixes=");
        path.push_str(&query_value(&prefixes.join(",")));
    }
    let what = "GET /_form/changes";
    let (code, body) = http::request_bytes(admin, "GET", &path, b"", TIMEOUT, MAX_BATCH)
        .await
        .map_err(|e| unreachable(id, known.clone(), what, e))?;
    if code != 200 {
        return Err(refused(id, known.as_ref(), what, code, &body));
    }
    contracts.set(id, Contract::Supported);
    let env: Envelope = serde_json::from_slice(&body).map_err(|e| {
        VmmError::Backend(format!(
            "instance {id} answered {what} with a malformed batch: {e}"
        ))
    })?;
    // What the platform keeps and sends back must be sane, and a batch that says more
    // follows must move on.
    if env.next_cursor.is_empty() || env.next_cursor.len() > MAX_CURSOR {
        return Err(VmmError::Backend(format!(
            "instance {id} answered {what} with a next_cursor of {} bytes; expected 1 to {MAX_CURSOR}",
            env.next_cursor.len()
        )));
    }
    if env.more && env.next_cursor == since {
        return Err(VmmError::Backend(format!(
            "instance {id} answered {what} with more: true but the same cursor; it would be read for ever"
        )));
    }
    Ok(pb::ChangeBatch {
        changes: env.changes.len() as u64,
        next_cursor: env.next_cursor,
        more: env.more,
        origin: env.origin,
        pending: env.pending,
        writes: env.writes,
        batch: body,
    })
}

/// Merges `batch` into instance `id` through its admin address.
pub async fn merge(
    contracts: &Contracts,
    id: &str,
    admin: Option<SocketAddr>,
    batch: &[u8],
) -> Result<pb::MergeChangesReply, VmmError> {
    if batch.len() > MAX_BATCH {
        return Err(VmmError::invalid(
            "batch",
            format!("is {} bytes; at most {MAX_BATCH} accepted", batch.len()),
        ));
    }
    let known = contracts.get(id);
    let Some(admin) = admin else {
        return Err(VmmError::Unsupported(format!(
            "instance {id} has no admin address, so no state contract"
        )));
    };
    let what = "POST /_form/merge";
    let (code, body) =
        http::request_bytes(admin, "POST", "/_form/merge", batch, TIMEOUT, 64 * 1024)
            .await
            .map_err(|e| unreachable(id, known.clone(), what, e))?;
    if code != 200 {
        return Err(refused(id, known.as_ref(), what, code, &body));
    }
    contracts.set(id, Contract::Supported);
    let r: MergeReply = serde_json::from_slice(&body)
        .map_err(|e| VmmError::Backend(format!("instance {id} answered {what} with {e}")))?;
    Ok(pb::MergeChangesReply {
        applied: r.applied,
        duplicates: r.duplicates,
        stale: r.stale,
    })
}

/// Instance `id`'s cursor now, or `None` when its workload does not implement the
/// contract (a snapshot then records no cursor).
pub async fn cursor(
    contracts: &Contracts,
    id: &str,
    admin: Option<SocketAddr>,
) -> Result<Option<String>, VmmError> {
    let Some(admin) = admin else {
        return Ok(None);
    };
    let known = contracts.get(id);
    match http::request(admin, "GET", "/_form/cursor", b"", TIMEOUT).await {
        Ok((200, body)) => {
            let r: CursorReply = serde_json::from_str(&body).map_err(|e| {
                VmmError::Backend(format!("instance {id} answered GET /_form/cursor with {e}"))
            })?;
            contracts.set(id, Contract::Supported);
            Ok(Some(r.cursor))
        }
        Ok((code, body)) => match refused(
            id,
            known.as_ref(),
            "GET /_form/cursor",
            code,
            body.as_bytes(),
        ) {
            VmmError::Unsupported(_) => Ok(None),
            e => Err(e),
        },
        Err(e) => match (
            &known,
            unreachable(id, known.clone(), "GET /_form/cursor", e),
        ) {
            (_, VmmError::Unsupported(_)) => Ok(None),
            // Never seen answering: a workload without an admin listener.
            (None, VmmError::Unavailable(_)) => Ok(None),
            (_, e) => Err(e),
        },
    }
}

/// An instance with its admin address.
pub type Target = (String, Option<SocketAddr>);

/// Reads `from`'s changes after `since` batch by batch and merges each into every
/// instance of `to` at once; the next batch is read while the last merges. A cursor
/// `from` no longer knows starts again from the beginning. The reply's cursor is that
/// of the last batch every target merged.
pub async fn copy(
    contracts: std::sync::Arc<Contracts>,
    from: Target,
    to: Vec<Target>,
    since: String,
    max_bytes: u32,
    own: bool,
    prefixes: Vec<String>,
) -> Result<pb::CopyChangesReply, VmmError> {
    if to.is_empty() {
        return Err(VmmError::invalid(
            "to_instance_ids",
            "is empty; expected the instances to merge into",
        ));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<pb::ChangeBatch, VmmError>>(1);
    let reader = {
        let contracts = contracts.clone();
        let mut cursor = since.clone();
        tokio::spawn(async move {
            let mut restarted = false;
            loop {
                let r = read(
                    &contracts, &from.0, from.1, &cursor, max_bytes, own, &prefixes,
                )
                .await;
                let r = match r {
                    Err(VmmError::CursorGone(_)) if !restarted && !cursor.is_empty() => {
                        restarted = true;
                        cursor.clear();
                        continue;
                    }
                    r => r,
                };
                let last = match &r {
                    Ok(b) => {
                        cursor = b.next_cursor.clone();
                        !b.more
                    }
                    Err(_) => true,
                };
                if tx.send(r).await.is_err() || last {
                    return;
                }
            }
        })
    };
    let mut out = pb::CopyChangesReply {
        next_cursor: since,
        ..Default::default()
    };
    let result = loop {
        let batch = match rx.recv().await {
            Some(Ok(b)) => std::sync::Arc::new(b),
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        };
        if batch.changes > 0 {
            let mut set = tokio::task::JoinSet::new();
            for (id, admin) in to.iter().cloned() {
                let (contracts, batch) = (contracts.clone(), batch.clone());
                set.spawn(async move {
                    merge(&contracts, &id, admin, &batch.batch)
                        .await
                        .map_err(|e| VmmError::MergeFailed(format!("merging into {id}: {e}")))
                });
            }
            let mut failed = None;
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        failed.get_or_insert(e);
                    }
                    Err(e) => {
                        failed.get_or_insert(VmmError::MergeFailed(format!(
                            "a merge task failed: {e}"
                        )));
                    }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
        }
        out.changes += batch.changes;
        out.bytes += batch.batch.len() as u64;
        out.next_cursor = batch.next_cursor.clone();
        out.writes = batch.writes;
    };
    reader.abort();
    result.map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_percent_encoded() {
        assert_eq!(query_value("ab.12"), "ab.12");
        assert_eq!(query_value("a b&c=d"), "a%20b%26c%3Dd");
    }
}
