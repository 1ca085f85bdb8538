//! A replica buffers deltas until their predecessors arrive, ignores duplicates, and
//! replicas converge under any delivery schedule once anti-entropy runs.

use proptest::prelude::*;

use super::*;
use crate::model::{read, write};
use form_proto::state::v1 as pb;

const N: usize = 3;

fn replicas(limits: Limits) -> Vec<Replica> {
    let keys: Vec<SigningKey> = (0..N)
        .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
        .collect();
    let auth = Authorized::new(
        (0..N)
            .map(|i| (format!("state-{i}"), keys[i].verifying_key()))
            .collect(),
    );
    (0..N)
        .map(|i| {
            Replica::new(
                format!("state-{i}@1"),
                keys[i].clone(),
                auth.clone(),
                State::default(),
                limits,
            )
        })
        .collect()
}

fn unverify(d: &Arc<VerifiedDelta>) -> VerifiedDelta {
    (**d).clone()
}

fn put(r: &mut Replica, cluster: &str, domain: &str) -> Arc<VerifiedDelta> {
    let req = pb::PutClusterRequest {
        cluster_id: cluster.into(),
        domain: Some(domain.into()),
        ..Default::default()
    };
    let d = r
        .write(1, |s, a| write::put_cluster(s, a, 1, &req))
        .expect("valid")
        .expect("changes");
    let l = r.lsn();
    r.mark_durable(l);
    d
}

#[test]
fn out_of_order_deltas_wait_for_their_predecessors() {
    let mut rs = replicas(Limits::default());
    let d1 = put(&mut rs[0], "web", "web.fog");
    let d2 = put(&mut rs[0], "web", "www.fog");
    let r = rs[1].receive(vec![unverify(&d2)]);
    assert_eq!((r.applied.len(), r.buffered), (0, 1));
    assert!(read::cluster(rs[1].state(), "web").is_none());
    let r = rs[1].receive(vec![unverify(&d1), unverify(&d1)]);
    assert_eq!(r.applied.len(), 2, "d1 then the buffered d2");
    assert_eq!(r.buffered, 0);
    assert_eq!(
        read::cluster(rs[1].state(), "web").expect("web").domain,
        "www.fog"
    );
    let r = rs[1].receive(vec![unverify(&d2)]);
    assert_eq!(r.duplicates, 1);
    assert_eq!(rs[0].state(), rs[1].state());
}

#[test]
fn a_full_buffer_refuses_more_and_anti_entropy_catches_up() {
    let mut rs = replicas(Limits {
        buffer: 2,
        ..Limits::default()
    });
    let ds: Vec<_> = (0..5)
        .map(|i| put(&mut rs[0], "web", &format!("w{i}.fog")))
        .collect();
    let r = rs[1].receive(ds[1..].iter().map(unverify).collect());
    assert_eq!((r.buffered, r.overflow), (2, 2));
    match rs[0].missing_for(&rs[1].version(), 100, None) {
        Missing::Deltas(v) => {
            let r = rs[1].receive(v.iter().map(unverify).collect());
            assert_eq!(r.overflow, 0);
        }
        other => panic!("expected deltas, got {other:?}"),
    }
    assert_eq!(rs[0].state(), rs[1].state());
}

#[test]
fn trimmed_deltas_are_replaced_by_full_state() {
    let mut rs = replicas(Limits {
        log: 2,
        ..Limits::default()
    });
    for i in 0..5 {
        put(&mut rs[0], "web", &format!("w{i}.fog"));
    }
    assert!(matches!(
        rs[0].missing_for(&rs[1].version(), 100, None),
        Missing::FullState
    ));
    let s = rs[0].state().clone();
    rs[1].merge_state(&s);
    assert_eq!(rs[0].state(), rs[1].state());
    assert!(matches!(
        rs[0].missing_for(&rs[1].version(), 100, None),
        Missing::Nothing
    ));
}

#[test]
fn deltas_are_not_offered_back_to_their_origin() {
    let mut rs = replicas(Limits::default());
    let d = put(&mut rs[0], "web", "web.fog");
    rs[1].receive(vec![unverify(&d)]);
    {
        let l = rs[1].lsn();
        rs[1].mark_durable(l);
    }
    let origin = rs[0].actor().to_owned();
    assert!(matches!(
        rs[1].missing_for(&BTreeMap::new(), 100, Some(&origin)),
        Missing::Nothing
    ));
}

#[test]
fn durable_own_writes_count_only_what_the_log_kept() {
    let mut rs = replicas(Limits::default());
    let own = |r: &Replica| r.version().get(r.actor()).copied().unwrap_or(0);
    put(&mut rs[0], "web", "web.fog");
    let first = own(&rs[0]);
    let write = |r: &mut Replica, id: &str| {
        let req = pb::PutClusterRequest {
            cluster_id: id.into(),
            domain: Some(format!("{id}.fog")),
            ..Default::default()
        };
        r.write(1, |s, a| write::put_cluster(s, a, 1, &req))
            .expect("valid")
            .expect("changes");
        (r.lsn(), own(r))
    };
    let (second, after_second) = write(&mut rs[0], "api");
    let (third, after_third) = write(&mut rs[0], "db");
    assert!(first > 0 && after_second > first && after_third > after_second);
    // A peer's delta between them is not the replica's own.
    let theirs = put(&mut rs[1], "cache", "cache.fog");
    rs[0].receive(vec![unverify(&theirs)]);
    assert_eq!(
        rs[0].durable_own_writes(),
        first,
        "only the first is durable"
    );
    rs[0].mark_durable(second);
    assert_eq!(rs[0].durable_own_writes(), after_second);
    rs[0].mark_durable(third);
    assert_eq!(rs[0].durable_own_writes(), after_third);
    let all = rs[0].lsn();
    rs[0].mark_durable(all);
    assert_eq!(rs[0].durable_own_writes(), own(&rs[0]));
    assert_eq!(own(&rs[0]), after_third, "the peer's delta is not counted");
}

#[test]
fn undurable_deltas_are_not_offered() {
    let mut rs = replicas(Limits::default());
    let req = pb::PutClusterRequest {
        cluster_id: "web".into(),
        ..Default::default()
    };
    rs[0]
        .write(1, |s, a| write::put_cluster(s, a, 1, &req))
        .expect("valid");
    assert!(matches!(
        rs[0].missing_for(&BTreeMap::new(), 100, None),
        Missing::Nothing
    ));
    {
        let l = rs[0].lsn();
        rs[0].mark_durable(l);
    }
    assert!(matches!(
        rs[0].missing_for(&BTreeMap::new(), 100, None),
        Missing::Deltas(_)
    ));
}

#[test]
fn a_lagging_peer_gets_every_origin_in_causal_order_within_the_limit() {
    // state-0 writes after seeing each write of state-1, so every state-0 delta depends
    // on a state-1 delta, and state-0 sorts first. A peer that lacks both must not get
    // state-0's deltas ahead of state-1's forever.
    let mut rs = replicas(Limits::default());
    for i in 0..30 {
        let d = put(&mut rs[1], &format!("a{i}"), "x.fog");
        rs[0].receive(vec![unverify(&d)]);
        let _ = put(&mut rs[0], &format!("b{i}"), "y.fog");
    }
    let l = rs[0].lsn();
    rs[0].mark_durable(l);
    let mut rounds = 0;
    while rs[2].state() != rs[0].state() {
        rounds += 1;
        assert!(rounds < 20, "no progress");
        match rs[0].missing_for(&rs[2].version(), 8, None) {
            Missing::Deltas(v) => {
                let r = rs[2].receive(v.iter().map(unverify).collect());
                assert_eq!(r.buffered, 0, "every batch applies in order");
            }
            other => panic!("expected deltas, got {other:?}"),
        }
    }
    assert_eq!(rounds, 8, "60 deltas in batches of 8");
}

#[test]
fn dots_that_arrived_in_a_full_state_are_never_sent_as_a_gapped_run() {
    let mut rs = replicas(Limits::default());
    let d1 = put(&mut rs[0], "c1", "x.fog");
    rs[1].receive(vec![unverify(&d1)]);
    let _ = put(&mut rs[0], "c2", "x.fog");
    let s0 = rs[0].state().clone();
    rs[1].merge_state(&s0); // a:2 arrives inside a full state, not as a delta
    let d3 = put(&mut rs[0], "c3", "x.fog");
    rs[1].receive(vec![unverify(&d3)]);
    let l = rs[1].lsn();
    rs[1].mark_durable(l);
    // A peer at a:1 must get the full state, not a:3 alone (which it could never apply).
    let known: BTreeMap<String, u64> = [(rs[0].actor().to_owned(), 1)].into();
    assert!(matches!(
        rs[1].missing_for(&known, 100, None),
        Missing::FullState
    ));
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        at: usize,
        cluster: usize,
        member: usize,
    },
    Deliver {
        to: usize,
        pick: prop::sample::Index,
        dup: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..N, 0..2usize, 0..3usize).prop_map(|(at, cluster, member)| Step::Write {
            at,
            cluster,
            member
        }),
        (0..N, any::<prop::sample::Index>(), any::<bool>())
            .prop_map(|(to, pick, dup)| Step::Deliver { to, pick, dup }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Writes on every replica; messages delivered in random order, duplicated or
    /// never (dropped); then anti-entropy between every pair: all replicas are equal.
    #[test]
    fn random_delivery_schedules_converge(steps in proptest::collection::vec(step(), 1..60)) {
        let mut rs = replicas(Limits { buffer: 8, log: 50, changes: 100 });
        let mut in_flight: Vec<Arc<VerifiedDelta>> = Vec::new();
        for s in &steps {
            match s {
                Step::Write { at, cluster, member } => {
                    let c = format!("c{cluster}");
                    let r = &mut rs[*at];
                    let made = if read::cluster_exists(r.state(), &c) {
                        let m = pb::Member { instance_id: format!("m{member}"), ..Default::default() };
                        let req = pb::AddMemberRequest { cluster_id: c.clone(), member: Some(m) };
                        r.write(1, |st, a| write::add_member(st, a, 1, &req))
                    } else {
                        let req = pb::PutClusterRequest { cluster_id: c.clone(), ..Default::default() };
                        r.write(1, |st, a| write::put_cluster(st, a, 1, &req))
                    };
                    let l = r.lsn();
    r.mark_durable(l);
                    if let Ok(Some(d)) = made {
                        in_flight.push(d);
                    }
                }
                Step::Deliver { to, pick, dup } => {
                    if in_flight.is_empty() {
                        continue;
                    }
                    let i = pick.index(in_flight.len());
                    let d = if *dup { in_flight[i].clone() } else { in_flight.swap_remove(i) };
                    rs[*to].receive(vec![unverify(&d)]);
                    { let l = rs[*to].lsn(); rs[*to].mark_durable(l); }
                }
            }
        }
        // What is still in flight is lost. Anti-entropy, pairwise, until quiet.
        for _round in 0..4 {
            for a in 0..N {
                for b in 0..N {
                    if a == b {
                        continue;
                    }
                    let known = rs[b].version();
                    match rs[a].missing_for(&known, 1000, None) {
                        Missing::Nothing => {}
                        Missing::Deltas(v) => {
                            rs[b].receive(v.iter().map(unverify).collect());
                        }
                        Missing::FullState => {
                            let st = rs[a].state().clone();
                            rs[b].merge_state(&st);
                        }
                    }
                    { let l = rs[b].lsn(); rs[b].mark_durable(l); }
                }
            }
        }
        for r in &rs[1..] {
            prop_assert_eq!(r.state(), rs[0].state());
        }
        prop_assert_eq!(rs[0].pending_len(), 0);
    }
}
