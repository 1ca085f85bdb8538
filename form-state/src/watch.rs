//! `Watch`: a stream of changes from a replica-local sequence number. A subscriber
//! that asks for 0, or for changes already trimmed, first gets `Reset`, the whole
//! state and `Synced`, then every change as it becomes durable. Each event carries the current
//! value of what changed: several changes to one cluster read together (all that became
//! durable since the stream last read) arrive as one value, at the sequence of the
//! last of them. A stream with nothing to send gets a progress mark every second.

use std::sync::Arc;

use form_proto::state::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::crdt::Space;
use crate::model::read;
use crate::store::Store;

/// A stream with nothing to send for this long gets a progress mark (an event with no
/// change): its follower knows it is not stalled.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Events buffered per subscriber before it is considered too slow.
const SUBSCRIBER_BUFFER: usize = 1024;

/// The event stream of a `Watch` request.
pub fn stream(
    store: Arc<Store>,
    req: pb::WatchRequest,
) -> impl Stream<Item = Result<pb::WatchEvent, Status>> {
    let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
    tokio::spawn(async move {
        let mut durable = store.subscribe();
        // A sequence of an earlier run of the replica, or from the future, starts over.
        let (mut cursor, mut need_reset) = match store.lsn_of_sequence(req.from_sequence) {
            Some(lsn) if req.from_sequence != 0 && lsn <= store.lock().lsn() + 1 => {
                (lsn.saturating_sub(1), false)
            }
            _ => (0, true),
        };
        let mut last_sent = tokio::time::Instant::now();
        let mut last_sequence = 0;
        loop {
            let (events, read_at) = {
                let r = store.lock();
                let changes = if need_reset {
                    None
                } else {
                    r.changes_since(cursor)
                };
                let events = match changes {
                    None => {
                        let lsn = r.durable_lsn();
                        cursor = lsn;
                        need_reset = false;
                        snapshot(r.state(), &req.cluster_id, store.sequence(lsn))
                    }
                    Some(changes) => {
                        if let Some(last) = changes.last() {
                            cursor = last.lsn;
                        }
                        latest(&changes)
                            .into_iter()
                            .filter_map(|(lsn, space, id)| {
                                event(r.state(), space, id, &req.cluster_id, store.sequence(lsn))
                            })
                            .collect()
                    }
                };
                (events, r.lsn())
            };
            // The values read may include later changes: send them once those are durable.
            if store.wait_durable(read_at).await.is_err() {
                return;
            }
            for e in events {
                last_sequence = e.sequence;
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
            // A mark when nothing was sent for a second, however often the replica
            // changes in ways this stream does not carry (node records, controllers).
            tokio::select! {
                changed = durable.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(last_sent + PROGRESS_EVERY) => {
                    let mark = pb::WatchEvent { sequence: last_sequence, change: None };
                    if tx.send(Ok(mark)).await.is_err() {
                        return;
                    }
                    last_sent = tokio::time::Instant::now();
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// What `changes` touched, each once, at the last change that touched it, in the
/// order of those changes: a cluster written many times in one batch (heartbeats) is
/// read and sent once, with its current value, and sequences still only grow.
fn latest(changes: &[crate::replica::Change]) -> Vec<(u64, Space, &str)> {
    let mut last: std::collections::HashMap<(Space, &str), usize> = Default::default();
    let mut all = Vec::new();
    for c in changes {
        for (space, id) in &c.touched {
            last.insert((*space, id.as_str()), all.len());
            all.push((c.lsn, *space, id.as_str()));
        }
    }
    all.into_iter()
        .enumerate()
        .filter(|(i, (_, space, id))| last.get(&(*space, *id)) == Some(i))
        .map(|(_, t)| t)
        .collect()
}

fn snapshot(state: &crate::crdt::State, filter: &str, lsn: u64) -> Vec<pb::WatchEvent> {
    let mut out = vec![pb::WatchEvent {
        sequence: lsn,
        change: Some(pb::watch_event::Change::Reset(pb::Reset {
            reason: "full state follows".into(),
        })),
    }];
    for c in read::clusters(state) {
        if filter.is_empty() || c.cluster_id == filter {
            out.push(pb::WatchEvent {
                sequence: lsn,
                change: Some(pb::watch_event::Change::Cluster(c)),
            });
        }
    }
    for o in read::operations(state, filter, 0, false).into_iter().rev() {
        out.push(pb::WatchEvent {
            sequence: lsn,
            change: Some(pb::watch_event::Change::Operation(o)),
        });
    }
    out.push(pb::WatchEvent {
        sequence: lsn,
        change: Some(pb::watch_event::Change::Synced(pb::Synced {})),
    });
    out
}

fn event(
    state: &crate::crdt::State,
    space: Space,
    id: &str,
    filter: &str,
    lsn: u64,
) -> Option<pb::WatchEvent> {
    use pb::watch_event::Change;
    let change = match space {
        Space::Cluster => {
            if !filter.is_empty() && id != filter {
                return None;
            }
            match read::cluster(state, id) {
                Some(c) => Change::Cluster(c),
                None => Change::ClusterDeleted(id.to_owned()),
            }
        }
        Space::Operation => {
            let op = read::operation(state, id)?;
            if !filter.is_empty() && op.cluster_id != filter {
                return None;
            }
            Change::Operation(op)
        }
        // Controller and node heartbeats are not watched: they change every second
        // (ListNodes reads nodes).
        Space::Controller | Space::Node => return None,
    };
    Some(pb::WatchEvent {
        sequence: lsn,
        change: Some(change),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Change;

    #[test]
    fn a_batch_sends_each_touched_thing_once_at_its_last_change() {
        let change = |lsn, touched: &[(Space, &str)]| Change {
            lsn,
            touched: touched.iter().map(|(s, i)| (*s, (*i).to_owned())).collect(),
        };
        let batch = [
            change(5, &[(Space::Cluster, "a"), (Space::Operation, "o")]),
            change(6, &[(Space::Cluster, "b")]),
            change(7, &[(Space::Cluster, "a")]),
            change(8, &[(Space::Operation, "a")]),
        ];
        assert_eq!(
            latest(&batch),
            [
                (5, Space::Operation, "o"),
                (6, Space::Cluster, "b"),
                (7, Space::Cluster, "a"),
                (8, Space::Operation, "a"),
            ]
        );
    }
}
