//! `Watch`: a stream of changes from a replica-local sequence number. A subscriber
//! that asks for 0, or for changes already trimmed, first gets `Reset` and the whole
//! state, then every change as it becomes durable. Each event carries the current
//! value of what changed (several changes to one cluster may arrive as one value).

use std::sync::Arc;

use form_proto::state::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::crdt::Space;
use crate::model::read;
use crate::store::Store;

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
        let mut cursor = req.from_sequence.saturating_sub(1);
        let mut need_reset = req.from_sequence == 0;
        loop {
            let events = {
                let r = store.lock();
                let changes = if need_reset {
                    None
                } else {
                    r.changes_since(cursor)
                };
                match changes {
                    None => {
                        let lsn = r.durable_lsn();
                        cursor = lsn;
                        need_reset = false;
                        snapshot(r.state(), &req.cluster_id, lsn)
                    }
                    Some(changes) => {
                        let mut events = Vec::new();
                        for c in changes {
                            cursor = c.lsn;
                            for (space, id) in &c.touched {
                                if let Some(e) =
                                    event(r.state(), *space, id, &req.cluster_id, c.lsn)
                                {
                                    events.push(e);
                                }
                            }
                        }
                        events
                    }
                }
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = durable.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
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
    for o in read::operations(state, filter, 0).into_iter().rev() {
        out.push(pb::WatchEvent {
            sequence: lsn,
            change: Some(pb::watch_event::Change::Operation(o)),
        });
    }
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
    };
    Some(pb::WatchEvent {
        sequence: lsn,
        change: Some(change),
    })
}
