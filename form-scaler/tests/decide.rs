//! `decide()` in the manner of Kubernetes' HPA tests: a table of situations and the
//! expected count and reason; then simulated traces over a day of noisy constant
//! load, a load step and a sine load faster than the scale-in window.

use form_proto::types::v1::ScalingPolicy;
use form_scaler::decide::{Decision, History, Observation, decide};
use form_scaler::policy::default_policy;
use form_scaler::window::MetricWindow;

fn obs(cpus: &[Option<f64>]) -> Vec<Observation> {
    cpus.iter()
        .enumerate()
        .map(|(i, c)| Observation {
            instance_id: format!("i{i}"),
            ready: true,
            cpu: *c,
            requests_per_second: None,
        })
        .collect()
}

fn policy() -> ScalingPolicy {
    ScalingPolicy {
        min_instances: 1,
        max_instances: 10,
        target_cpu_utilization: 0.6,
        scale_out_cooldown_seconds: 60,
        scale_in_cooldown_seconds: 300,
        scale_in_stabilization_seconds: 300,
        ..default_policy()
    }
}

const NOW: u64 = 10_000_000;

struct Case {
    name: &'static str,
    policy: ScalingPolicy,
    observations: Vec<Observation>,
    history: History,
    desired: u32,
    reason: &'static str,
}

fn check(c: Case) {
    let d: Decision = decide(&c.policy, &c.observations, &c.history, NOW);
    assert_eq!(d.desired, c.desired, "{}: {}", c.name, d.reason);
    assert!(
        d.reason.contains(c.reason),
        "{}: reason '{}' lacks '{}'",
        c.name,
        d.reason,
        c.reason
    );
}

#[test]
fn decisions_follow_the_table() {
    let some = |v: &[f64]| obs(&v.iter().map(|x| Some(*x)).collect::<Vec<_>>());
    let mut warming = some(&[0.9, 0.9]);
    warming.extend(obs(&[None, None]).into_iter().map(|mut o| {
        o.ready = false;
        o.instance_id.push('w');
        o
    }));
    let recent_four = History {
        recommendations: vec![(NOW - 100_000, 4)],
        ..History::default()
    };
    let cases = vec![
        Case {
            name: "at target",
            policy: policy(),
            observations: some(&[0.6, 0.6, 0.6]),
            history: History::default(),
            desired: 3,
            reason: "within 10%",
        },
        Case {
            name: "inside the tolerance band",
            policy: policy(),
            observations: some(&[0.65, 0.64, 0.66]),
            history: History::default(),
            desired: 3,
            reason: "hold",
        },
        Case {
            name: "over target scales out proportionally",
            policy: policy(),
            observations: some(&[0.9, 0.9, 0.9]),
            history: History::default(),
            desired: 5,
            reason: "scale out 3 -> 5",
        },
        Case {
            name: "under target scales in",
            policy: policy(),
            observations: some(&[0.2, 0.2, 0.2, 0.2]),
            history: History::default(),
            desired: 2,
            reason: "scale in 4 -> 2",
        },
        Case {
            name: "scale-in takes the highest recommendation of its window",
            policy: policy(),
            observations: some(&[0.2, 0.2, 0.2, 0.2]),
            history: recent_four.clone(),
            desired: 4,
            reason: "window (300 s) saw 4",
        },
        Case {
            name: "a missing metric blocks scale-in",
            policy: policy(),
            observations: obs(&[Some(0.1), Some(0.1), None]),
            history: History::default(),
            desired: 3,
            reason: "without a fresh value; no scale-in",
        },
        Case {
            name: "no metric at all holds",
            policy: policy(),
            observations: obs(&[None, None]),
            history: History::default(),
            desired: 2,
            reason: "no fresh value",
        },
        Case {
            name: "a missing metric counts as idle when scaling out",
            policy: policy(),
            observations: obs(&[Some(1.0), Some(1.0), None]),
            history: History::default(),
            desired: 4,
            reason: "scale out 3 -> 4",
        },
        Case {
            name: "warming instances count as capacity, not in metrics",
            policy: policy(),
            observations: warming,
            history: History::default(),
            desired: 4,
            reason: "4 instances cover it",
        },
        Case {
            name: "scale-out cooldown counts from the last new capacity",
            policy: policy(),
            observations: some(&[0.9, 0.9]),
            history: History {
                last_capacity_ready_ms: Some(NOW - 30_000),
                ..History::default()
            },
            desired: 2,
            reason: "scale-out cools down for 30 s more",
        },
        Case {
            name: "the scale-in cooldown does not hold back a scale-out",
            policy: policy(),
            observations: some(&[0.9, 0.9]),
            history: History {
                last_action_ms: Some(NOW - 30_000),
                last_capacity_ready_ms: Some(NOW - 90_000),
                ..History::default()
            },
            desired: 3,
            reason: "scale out 2 -> 3",
        },
        Case {
            name: "scale-in cooldown",
            policy: policy(),
            observations: some(&[0.1, 0.1]),
            history: History {
                last_action_ms: Some(NOW - 30_000),
                ..History::default()
            },
            desired: 2,
            reason: "scale-in cools down for 270 s more",
        },
        Case {
            name: "clamped to max",
            policy: policy(),
            observations: some(&[1.0; 8]),
            history: History::default(),
            desired: 10,
            reason: "scale out 8 -> 10",
        },
        Case {
            name: "clamped to min",
            policy: ScalingPolicy {
                min_instances: 2,
                ..policy()
            },
            observations: some(&[0.05, 0.05, 0.05]),
            history: History::default(),
            desired: 2,
            reason: "scale in 3 -> 2",
        },
        Case {
            name: "below min, whatever the load",
            policy: ScalingPolicy {
                min_instances: 2,
                ..policy()
            },
            observations: some(&[0.0]),
            history: History {
                last_action_ms: Some(NOW),
                ..History::default()
            },
            desired: 2,
            reason: "below the minimum 2",
        },
        Case {
            name: "above max",
            policy: ScalingPolicy {
                max_instances: 2,
                ..policy()
            },
            observations: some(&[0.9, 0.9, 0.9]),
            history: History::default(),
            desired: 2,
            reason: "above the maximum 2",
        },
    ];
    for c in cases {
        check(c);
    }
}

#[test]
fn any_signal_scales_out_and_all_must_agree_to_scale_in() {
    let p = ScalingPolicy {
        target_requests_per_instance: Some(10.0),
        ..policy()
    };
    let with = |cpu: f64, rate: f64| -> Vec<Observation> {
        (0..4)
            .map(|i| Observation {
                instance_id: format!("i{i}"),
                ready: true,
                cpu: Some(cpu),
                requests_per_second: Some(rate),
            })
            .collect()
    };
    let d = decide(&p, &with(0.1, 20.0), &History::default(), NOW);
    assert_eq!(d.desired, 8, "{}", d.reason);
    assert!(d.reason.contains("requests/s"), "{}", d.reason);
    let d = decide(&p, &with(0.1, 10.0), &History::default(), NOW);
    assert_eq!(d.desired, 4, "cpu says in, requests say hold: {}", d.reason);
    let d = decide(&p, &with(0.1, 5.0), &History::default(), NOW);
    assert_eq!(d.desired, 2, "both say in; the higher wins: {}", d.reason);
}

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (v >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

const INTERVAL_S: u64 = 15;
const SPAN_MS: u64 = INTERVAL_S * 1000;

/// Simulates `seconds` of `load(t)` (in cores) over a cluster starting at `n`: one CPU
/// sample per instance per second with `noise` (relative), a decision every 15 s on the
/// 15 s mean. Scaling takes effect at once. Returns the decisions that changed the
/// count: `(at_s, from, to)`.
fn simulate(
    p: &ScalingPolicy,
    mut n: u32,
    seconds: u64,
    noise: f64,
    load: impl Fn(u64) -> f64,
) -> Vec<(u64, u32, u32)> {
    let mut rng = Noise(0x9e37_79b9_7f4a_7c15);
    let mut windows: Vec<MetricWindow> = vec![MetricWindow::default(); n as usize];
    let mut history = History::default();
    let mut events = Vec::new();
    for t in 0..seconds {
        let at = t * 1000;
        let per = load(t) / f64::from(n);
        for w in &mut windows {
            w.push(
                at,
                (per * (1.0 + noise * rng.next())).clamp(0.0, 1.0),
                SPAN_MS,
            );
        }
        if t % INTERVAL_S != 0 || t == 0 {
            continue;
        }
        let observations: Vec<Observation> = windows
            .iter()
            .enumerate()
            .map(|(i, w)| Observation {
                instance_id: format!("i{i}"),
                ready: true,
                cpu: w.mean(at, SPAN_MS, 5_000),
                requests_per_second: None,
            })
            .collect();
        let d = decide(p, &observations, &history, at);
        history.record(at, d.raw, 3_600_000);
        if d.changes() {
            events.push((t, n, d.desired));
            if d.desired > n {
                history.last_capacity_ready_ms = Some(at);
            }
            history.last_action_ms = Some(at);
            n = d.desired;
            // New instances start with the current per-instance load.
            windows = vec![MetricWindow::default(); n as usize];
            let per = load(t) / f64::from(n);
            for w in &mut windows {
                w.push(at, per, SPAN_MS);
            }
        }
    }
    events
}

#[test]
fn a_day_of_noisy_constant_load_moves_nothing() {
    // Four instances at the 60% target, each sample +-15%.
    let events = simulate(&policy(), 4, 86_400, 0.15, |_| 2.4);
    assert!(events.is_empty(), "scale events: {events:?}");
}

#[test]
fn a_load_step_scales_out_within_one_evaluation_interval() {
    let step_at = 1_000 + 7; // between two evaluations
    let events = simulate(&policy(), 4, 1_200, 0.15, |t| {
        if t < step_at { 2.4 } else { 4.8 }
    });
    let (at, from, to) = *events.first().expect("a scale-out");
    assert!(to > from, "{events:?}");
    // The first evaluation after the step sees a mean past the tolerance band once the
    // step has lasted 10% of the span: within one interval plus that.
    let bound = INTERVAL_S + INTERVAL_S / 10 + 1;
    assert!(
        at - step_at <= bound,
        "decided {} s after the step: {events:?}",
        at - step_at
    );
    // The first decision sees part of the step; once the scale-out cooldown passed,
    // the count is proportional: 4 instances at double the target load need 8.
    assert_eq!(events.last().map(|e| e.2), Some(8), "{events:?}");
    assert!(
        events.iter().all(|(_, f, t)| t > f),
        "no scale-in under a steady doubled load: {events:?}"
    );
}

#[test]
fn a_sine_load_faster_than_the_scale_in_window_reverses_at_most_once_per_window() {
    // Period 120 s, +-40% around the target of 4 instances, for two hours.
    let events = simulate(&policy(), 4, 7_200, 0.05, |t| {
        2.4 * (1.0 + 0.4 * (t as f64 * std::f64::consts::TAU / 120.0).sin())
    });
    assert!(!events.is_empty(), "the peaks ask for more instances");
    let direction = |(_, from, to): &(u64, u32, u32)| to > from;
    let reversals: Vec<u64> = events
        .windows(2)
        .filter(|w| direction(&w[0]) != direction(&w[1]))
        .map(|w| w[1].0)
        .collect();
    for pair in reversals.windows(2) {
        assert!(
            pair[1] - pair[0] >= 300,
            "two reversals within the 300 s window: {reversals:?} {events:?}"
        );
    }
}

#[test]
fn without_the_scale_in_window_the_same_sine_load_flaps() {
    // The control of the test above: with neither window nor cooldown, the cluster
    // follows every wave, so the property above is not true by construction.
    let p = ScalingPolicy {
        scale_in_stabilization_seconds: 0,
        scale_in_cooldown_seconds: 0,
        scale_out_cooldown_seconds: 0,
        ..policy()
    };
    let events = simulate(&p, 4, 7_200, 0.05, |t| {
        2.4 * (1.0 + 0.4 * (t as f64 * std::f64::consts::TAU / 120.0).sin())
    });
    let reversals = events
        .windows(2)
        .filter(|w| (w[0].2 > w[0].1) != (w[1].2 > w[1].1))
        .count();
    assert!(reversals > 50, "{reversals} reversals: {events:?}");
}
