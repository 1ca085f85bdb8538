//! What the running controller decides on: per instance, the mean CPU of the heartbeat
//! samples of the last metric window and the mean request rate the balancer reported
//! over it (`window.rs`), with instances that are starting, booting or warming up
//! left out of the metrics (they still count as capacity).
//!
//! An instance is warming up until `warmup_seconds` after it became active through an
//! operation, or after it started (its uptime, from its heartbeats): the template a
//! cluster was created with included, whose boot CPU would otherwise read as load.
//! An instance whose uptime is not known yet (no heartbeat with it) is warming up too.

use std::collections::HashMap;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;

use crate::decide::Observation;
use crate::ops::plan;
use crate::window::MetricWindow;

/// What the balancer reported for one backend in this round.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Requests per second over the balancer's recent window.
    pub requests_per_second: f64,
}

/// The windows of one instance.
#[derive(Debug, Clone, Default)]
struct Windows {
    cpu: MetricWindow,
    rate: MetricWindow,
}

/// Per-instance metric windows, kept across evaluation rounds.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    windows: HashMap<String, Windows>,
}

/// One round's inputs besides the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// The balancer's figures by `cluster/backend`.
    pub loads: &'a HashMap<String, Load>,
    /// When instances became active through an operation.
    pub activated: &'a HashMap<String, u64>,
    /// Now, milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// A value whose newest sample is older than this is missing.
    pub stale_ms: u64,
    /// Span of the mean.
    pub window_ms: u64,
}

impl Observer {
    /// Adds this round's samples of `c`'s counted members and returns what `decide`
    /// sees of them; a member's heartbeat is timed when this controller saw it
    /// (`seen`, [`crate::arrivals`]), not by its node's clock.
    pub fn observe(
        &mut self,
        c: &state_pb::Cluster,
        policy: &types::ScalingPolicy,
        r: Round<'_>,
        seen: &crate::arrivals::Seen<'_>,
    ) -> Vec<Observation> {
        let warm_ms = u64::from(policy.warmup_seconds) * 1000;
        plan::counted_members(c)
            .into_iter()
            .map(|m| {
                let w = self.windows.entry(m.instance_id.clone()).or_default();
                let heard = seen.at(&m.instance_id);
                if heard > 0 {
                    // One sample per heartbeat: a repeated timestamp is ignored.
                    w.cpu.push(heard, m.cpu_utilization, r.window_ms);
                }
                let load = r.loads.get(&format!("{}/{}", c.cluster_id, m.instance_id));
                if let Some(l) = load {
                    w.rate.push(r.now_ms, l.requests_per_second, r.window_ms);
                }
                let active = m.status == state_pb::MemberStatus::Active as i32;
                Observation {
                    instance_id: m.instance_id.clone(),
                    ready: active && !warming(m, heard, r.activated, r.now_ms, warm_ms),
                    cpu: w.cpu.mean(r.now_ms, r.window_ms, r.stale_ms),
                    requests_per_second: load
                        .and_then(|_| w.rate.mean(r.now_ms, r.window_ms, r.stale_ms)),
                }
            })
            .collect()
    }

    /// Forgets instances no cluster has any more.
    pub fn retain(&mut self, alive: impl Fn(&str) -> bool) {
        self.windows.retain(|id, _| alive(id));
    }
}

/// Whether `m` (its latest heartbeat heard at `heard_ms`) is still warming up at
/// `now_ms`.
fn warming(
    m: &state_pb::Member,
    heard_ms: u64,
    activated: &HashMap<String, u64>,
    now_ms: u64,
    warm_ms: u64,
) -> bool {
    if activated
        .get(&m.instance_id)
        .is_some_and(|t| now_ms < t + warm_ms)
    {
        return true;
    }
    let Some(uptime) = m.usage.as_ref().map(|u| u.uptime_seconds) else {
        // Never heard from with an uptime: it may still be booting.
        return warm_ms > 0;
    };
    let up_ms = uptime * 1000.0 + now_ms.saturating_sub(heard_ms) as f64;
    up_ms < warm_ms as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(uptime: f64, hb: u64, cpu: f64) -> state_pb::Cluster {
        let m = state_pb::Member {
            instance_id: "t".into(),
            status: state_pb::MemberStatus::Active as i32,
            last_heartbeat_ms: hb,
            usage: (uptime > 0.0).then_some(state_pb::InstanceUsage {
                memory_bytes: 1 << 20,
                uptime_seconds: uptime,
            }),
            cpu_utilization: cpu,
            ..Default::default()
        };
        state_pb::Cluster {
            cluster_id: "c".into(),
            template_instance_id: "t".into(),
            members: [("t".to_owned(), m)].into(),
            ..Default::default()
        }
    }

    fn policy(warmup: u32) -> types::ScalingPolicy {
        types::ScalingPolicy {
            warmup_seconds: warmup,
            ..crate::policy::default_policy()
        }
    }

    /// `c`'s heartbeats as the round sees them at `now_ms`, before it observes.
    fn seen(arrivals: &crate::arrivals::Arrivals, c: &state_pb::Cluster, now_ms: u64) {
        let mut seen = arrivals.lock();
        for (id, m) in &c.members {
            seen.heard(id, m.last_heartbeat_ms, now_ms, now_ms);
        }
    }

    #[test]
    fn a_booting_template_is_not_load_until_its_warmup_has_passed() {
        let mut o = Observer::default();
        let arrivals = crate::arrivals::Arrivals::default();
        let loads = HashMap::new();
        let activated = HashMap::new();
        let round = |now_ms| Round {
            loads: &loads,
            activated: &activated,
            now_ms,
            stale_ms: 5000,
            window_ms: 15_000,
        };
        let mut observe = |c: state_pb::Cluster, now_ms| {
            seen(&arrivals, &c, now_ms);
            o.observe(&c, &policy(30), round(now_ms), &arrivals.lock())
        };
        // 2 s after start, busy booting: warming, not ready.
        let obs = observe(cluster(2.0, 10_000, 0.92), 10_000);
        assert!(!obs[0].ready);
        // Unknown uptime: warming too.
        let obs = observe(cluster(0.0, 11_000, 0.9), 11_000);
        assert!(!obs[0].ready);
        // 40 s after start: ready.
        let obs = observe(cluster(40.0, 48_000, 0.2), 48_000);
        assert!(obs[0].ready);
    }

    #[test]
    fn cpu_is_the_mean_of_the_window_not_the_last_sample() {
        let mut o = Observer::default();
        let arrivals = crate::arrivals::Arrivals::default();
        let loads = HashMap::new();
        let activated = HashMap::new();
        let mut last = None;
        for (i, cpu) in [0.2, 0.8, 0.2, 0.8].into_iter().enumerate() {
            let t = 100_000 + i as u64 * 1000;
            let r = Round {
                loads: &loads,
                activated: &activated,
                now_ms: t,
                stale_ms: 5000,
                window_ms: 4000,
            };
            let c = cluster(100.0, t, cpu);
            seen(&arrivals, &c, t);
            last = o.observe(&c, &policy(0), r, &arrivals.lock())[0].cpu;
        }
        assert!((last.expect("fresh") - 0.5).abs() < 1e-9, "{last:?}");
    }
}
