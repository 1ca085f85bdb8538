//! What whole-state work costs the replica's lock: a copy-on-write clone of the state
//! (what a full-state send, a digest and a log snapshot now take under the lock)
//! against encoding it (what they took under the lock before), and what the first
//! write after a clone pays to copy its shard.

use std::time::Instant;

use form_proto::state::v1 as pb;
use form_state::codec;
use form_state::crdt::State;
use form_state::model::write;

use crate::quantile;

/// Runs the benchmark on `clusters` clusters of `members` members.
pub(crate) fn run(clusters: usize, members: usize) -> anyhow::Result<()> {
    let actor = "state-1@00000001";
    let mut state = State::default();
    for c in 0..clusters {
        let id = format!("c{c}");
        let put = pb::PutClusterRequest {
            cluster_id: id.clone(),
            domain: Some(format!("{id}.example")),
            ..Default::default()
        };
        if let Some(d) = write::put_cluster(&state, actor, 1, &put)? {
            state.apply(&d);
        }
        for m in 0..members {
            let add = pb::AddMemberRequest {
                cluster_id: id.clone(),
                member: Some(pb::Member {
                    instance_id: format!("i-{m}"),
                    node_id: "node-1".into(),
                    addresses: vec![format!("10.0.{}.{m}:8080", c % 250)],
                    ..Default::default()
                }),
            };
            if let Some(d) = write::add_member(&state, actor, 1, &add)? {
                state.apply(&d);
            }
        }
    }
    let rounds = 30;
    let (mut clone_us, mut encode_us, mut write_us) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for r in 0..rounds {
        let t = Instant::now();
        let snapshot = std::hint::black_box(state.clone());
        clone_us.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        bytes = std::hint::black_box(codec::encode_state(&state)).len();
        encode_us.push(t.elapsed().as_secs_f64() * 1e6);
        // The first write after the clone copies its cluster's shard.
        let hb = pb::HeartbeatRequest {
            cluster_id: format!("c{}", r % clusters),
            instance_id: "i-0".into(),
            at_ms: 10 + r as u64,
            cpu_utilization: 0.5,
            ..Default::default()
        };
        let t = Instant::now();
        if let Some(d) = write::heartbeat(&state, actor, 1, &hb)? {
            state.apply(&d);
        }
        write_us.push(t.elapsed().as_secs_f64() * 1e6);
        drop(snapshot);
    }
    for v in [&mut clone_us, &mut encode_us, &mut write_us] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "state-snapshot: {clusters} clusters of {members} members, {} entries, {:.1} MiB encoded, {rounds} rounds",
        state.entry_count(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "{:<52} {:>10} {:>10}",
        "under the replica lock", "p50 us", "p99 us"
    );
    for (name, v) in [
        ("copy-on-write clone (now)", &clone_us),
        ("encode the whole state (before)", &encode_us),
        ("first write after a clone (copies one shard)", &write_us),
    ] {
        println!(
            "{name:<52} {:>10.1} {:>10.1}",
            quantile(v, 0.5),
            quantile(v, 0.99)
        );
    }
    println!(
        "clone / encode at p50: {:.3}",
        quantile(&clone_us, 0.5) / quantile(&encode_us, 0.5)
    );
    Ok(())
}
