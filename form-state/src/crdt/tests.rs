//! Property tests of the CRDT laws: join is commutative, associative and idempotent;
//! deltas applied in any order, with duplicates, give the state of in-order delivery.

use proptest::prelude::*;

use super::*;

const ACTORS: [&str; 3] = ["a", "b", "c"];
const IDS: [&str; 2] = ["c1", "c2"];
const SUBS: [&str; 3] = ["", "i1", "i2"];
const FIELDS: [Field; 4] = [
    Field::Domain,
    Field::Heartbeat,
    Field::Health,
    Field::MemberStatus,
];

#[derive(Debug, Clone)]
enum Op {
    Set {
        actor: usize,
        id: usize,
        sub: usize,
        field: usize,
        value: u64,
    },
    Append {
        actor: usize,
        id: usize,
        value: u64,
    },
    Remove {
        actor: usize,
        id: usize,
        sub: Option<usize>,
    },
    Sync {
        from: usize,
        to: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..2usize, 0..3usize, 0..4usize, 0..5u64)
            .prop_map(|(actor, id, sub, field, value)| Op::Set { actor, id, sub, field, value }),
        1 => (0..3usize, 0..2usize, 0..100u64).prop_map(|(actor, id, value)| Op::Append { actor, id, value }),
        1 => (0..3usize, 0..2usize, proptest::option::of(0..3usize))
            .prop_map(|(actor, id, sub)| Op::Remove { actor, id, sub }),
        2 => (0..3usize, 0..3usize).prop_map(|(from, to)| Op::Sync { from, to }),
    ]
}

/// Runs the ops on three replicas; returns their states and every delta made.
fn run(ops: &[Op]) -> ([State; 3], Vec<Delta>) {
    let mut states: [State; 3] = Default::default();
    let mut deltas = Vec::new();
    for (t, op) in ops.iter().enumerate() {
        let at = t as u64;
        let made = match op {
            Op::Set {
                actor,
                id,
                sub,
                field,
                value,
            } => {
                let mut b = DeltaBuilder::new(&states[*actor], ACTORS[*actor]);
                let key = Key::member(IDS[*id], SUBS[*sub], FIELDS[*field]);
                b.set(key, Value::U64(*value), *value, at);
                Some((*actor, b.build()))
            }
            Op::Append { actor, id, value } => {
                let mut b = DeltaBuilder::new(&states[*actor], ACTORS[*actor]);
                b.append(
                    Key::cluster(IDS[*id], Field::Health),
                    Value::U64(*value),
                    *value,
                    at,
                    3,
                );
                Some((*actor, b.build()))
            }
            Op::Remove { actor, id, sub } => {
                let mut b = DeltaBuilder::new(&states[*actor], ACTORS[*actor]);
                b.remove_scope(Space::Cluster, IDS[*id], sub.map(|s| SUBS[s]));
                Some((*actor, b.build()))
            }
            Op::Sync { from, to } => {
                let src = states[*from].clone();
                states[*to].join(&src);
                None
            }
        };
        if let Some((actor, Some(d))) = made {
            states[actor].apply(&d);
            deltas.push(d);
        }
    }
    (states, deltas)
}

fn joined(a: &State, b: &State) -> State {
    let mut x = a.clone();
    x.join(b);
    x
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn join_is_commutative_associative_idempotent(ops in proptest::collection::vec(op(), 0..40)) {
        let ([a, b, c], _) = run(&ops);
        prop_assert_eq!(joined(&a, &b), joined(&b, &a));
        prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
        prop_assert_eq!(joined(&a, &a), a.clone());
        // Joining never loses what a replica has seen.
        let ab = joined(&a, &b);
        for (actor, n) in a.context().version_vector() {
            prop_assert!(ab.context().max_contiguous(actor) >= *n);
        }
    }

    #[test]
    fn deltas_in_any_order_with_duplicates_converge(
        ops in proptest::collection::vec(op(), 0..40),
        seed in any::<u64>(),
        dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let (_, deltas) = run(&ops);
        let mut in_order = State::default();
        for d in &deltas {
            in_order.apply(d);
        }
        // A shuffled schedule with duplicates.
        let mut schedule: Vec<&Delta> = deltas.iter().collect();
        for i in &dups {
            if !deltas.is_empty() {
                schedule.push(&deltas[i.index(deltas.len())]);
            }
        }
        let mut rng = seed;
        for i in (1..schedule.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            schedule.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let mut shuffled = State::default();
        for d in schedule {
            shuffled.apply(d);
        }
        prop_assert_eq!(&shuffled, &in_order);
        // And a delta applied equals the delta joined as a state.
        let mut by_join = State::default();
        for d in &deltas {
            by_join.join(&d.to_state());
        }
        prop_assert_eq!(&by_join, &in_order);
    }

    #[test]
    fn replicas_that_exchanged_everything_are_equal(ops in proptest::collection::vec(op(), 0..40)) {
        let ([a, b, c], deltas) = run(&ops);
        let all = joined(&joined(&a, &b), &c);
        let mut from_deltas = State::default();
        for d in &deltas {
            from_deltas.apply(d);
        }
        prop_assert_eq!(all, from_deltas);
    }
}

#[test]
fn concurrent_adds_of_different_members_are_both_kept() {
    let (mut a, mut b) = (State::default(), State::default());
    let mut da = DeltaBuilder::new(&a, "a");
    da.set(
        Key::member("web", "m1", Field::MemberPresence),
        Value::Unit,
        0,
        1,
    );
    let da = da.build().expect("delta");
    let mut db = DeltaBuilder::new(&b, "b");
    db.set(
        Key::member("web", "m2", Field::MemberPresence),
        Value::Unit,
        0,
        1,
    );
    let db = db.build().expect("delta");
    a.apply(&da);
    b.apply(&db);
    a.apply(&db);
    b.apply(&da);
    assert_eq!(a, b);
    assert_eq!(a.subs("web"), ["m1", "m2"]);
}

#[test]
fn a_remove_deletes_only_what_it_observed() {
    let (mut a, mut b) = (State::default(), State::default());
    let mut add1 = DeltaBuilder::new(&a, "a");
    add1.set(
        Key::member("web", "m1", Field::MemberPresence),
        Value::Unit,
        0,
        1,
    );
    let add1 = add1.build().expect("delta");
    a.apply(&add1);
    b.apply(&add1);
    // b re-adds m1 (a new dot) while a, not having seen it, removes m1.
    let mut readd = DeltaBuilder::new(&b, "b");
    readd.set(
        Key::member("web", "m1", Field::NodeId),
        Value::Text("n2".into()),
        0,
        2,
    );
    readd.set(
        Key::member("web", "m1", Field::MemberPresence),
        Value::Unit,
        0,
        2,
    );
    let readd = readd.build().expect("delta");
    b.apply(&readd);
    let mut rm = DeltaBuilder::new(&a, "a");
    rm.remove_scope(Space::Cluster, "web", Some("m1"));
    let rm = rm.build().expect("delta");
    a.apply(&rm);
    assert!(a.subs("web").is_empty());
    a.apply(&readd);
    b.apply(&rm);
    assert_eq!(a, b);
    assert_eq!(
        a.subs("web"),
        ["m1"],
        "the unobserved add survives the remove"
    );
    // A late duplicate of the first add does not bring back what was removed.
    a.apply(&add1);
    assert_eq!(a, b);
    let presence = a
        .entries(&Key::member("web", "m1", Field::MemberPresence))
        .expect("present");
    assert_eq!(presence.len(), 1, "only b's re-add remains");
}
