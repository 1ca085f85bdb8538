//! Delta apply and verification throughput on one core.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use form_proto::state::v1 as pb;
use form_state::crdt::{Delta, State};
use form_state::envelope::{self, Authorized};
use form_state::model::write;

/// Verification batch size (as gossip batches).
const BATCH: usize = 256;

pub(crate) fn run(n: usize) -> anyhow::Result<()> {
    // Deltas as a busy cluster makes them: member heartbeats and status changes.
    let actor = "state-1@00000001";
    let mut state = State::default();
    let mut deltas: Vec<Delta> = Vec::with_capacity(n);
    let mk = |state: &mut State, deltas: &mut Vec<Delta>, d: Option<Delta>| {
        if let Some(d) = d {
            state.apply(&d);
            deltas.push(d);
        }
    };
    let r = pb::PutClusterRequest {
        cluster_id: "web".into(),
        ..Default::default()
    };
    let d = write::put_cluster(&state, actor, 1, &r)?;
    mk(&mut state, &mut deltas, d);
    let members = 1000;
    for i in 0..members {
        let m = pb::Member {
            instance_id: format!("i-{i}"),
            node_id: "node-1".into(),
            ..Default::default()
        };
        let d = write::add_member(
            &state,
            actor,
            1,
            &pb::AddMemberRequest {
                cluster_id: "web".into(),
                member: Some(m),
            },
        )?;
        mk(&mut state, &mut deltas, d);
    }
    let mut t = 2;
    while deltas.len() < n {
        t += 1;
        let hb = pb::HeartbeatRequest {
            cluster_id: "web".into(),
            instance_id: format!("i-{}", t % members),
            at_ms: t,
            cpu_utilization: 0.5,
            state_writes: None,
            usage: None,
            state_contract: String::new(),
        };
        let d = write::heartbeat(&state, actor, t, &hb)?;
        mk(&mut state, &mut deltas, d);
    }
    deltas.truncate(n);

    let started = Instant::now();
    let mut fresh = State::default();
    for d in &deltas {
        fresh.apply(d);
    }
    let apply_rate = n as f64 / started.elapsed().as_secs_f64();
    let join_started = Instant::now();
    let mut joined = State::default();
    let sample = n.min(20_000);
    for d in &deltas[..sample] {
        joined.join(&d.to_state());
    }
    let join_rate = sample as f64 / join_started.elapsed().as_secs_f64();

    let key = SigningKey::from_bytes(&[9; 32]);
    let auth = Authorized::new([("state-1".to_owned(), key.verifying_key())].into());
    let signs = n.min(50_000);
    let sign_started = Instant::now();
    let signed: Vec<Arc<pb::SignedDelta>> = deltas[..signs]
        .iter()
        .map(|d| envelope::sign(&key, d.clone(), BTreeMap::new(), 1).signed)
        .collect();
    let sign_rate = signs as f64 / sign_started.elapsed().as_secs_f64();
    let single_started = Instant::now();
    for s in &signed[..signs.min(10_000)] {
        auth.verify(s.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let single_rate = signs.min(10_000) as f64 / single_started.elapsed().as_secs_f64();
    let batch_started = Instant::now();
    for chunk in signed.chunks(BATCH) {
        for r in auth.verify_batch(chunk.to_vec()) {
            r.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let batch_rate = signs as f64 / batch_started.elapsed().as_secs_f64();

    println!("state-apply: {n} deltas (member heartbeats in a 1000-member cluster), one core");
    println!("| measure | per second | target |");
    println!("|---|---:|---:|");
    println!("| unsigned delta apply (`State::apply`) | {apply_rate:.0} | >= 200000 |");
    println!("| same deltas joined as states (peer: state-based join) | {join_rate:.0} | - |");
    println!("| sign (Ed25519) | {sign_rate:.0} | - |");
    println!("| verify one by one, incl. decode | {single_rate:.0} | - |");
    println!("| verify in batches of {BATCH}, incl. decode | {batch_rate:.0} | >= 25000 |");
    anyhow::ensure!(
        fresh == state,
        "applied state differs from the source state"
    );
    Ok(())
}
