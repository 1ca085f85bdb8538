//! Judging an instance's health from what form-state and the balancer say: its status
//! (a failed instance is reported stopped by form-vmm-service), the last health event,
//! how late its heartbeat is, and whether the balancer ejected it. Pure.

use form_proto::state::v1 as state_pb;

/// Heartbeats missed before an instance is degraded.
pub const DEGRADED_AFTER: u64 = 3;
/// Heartbeats missed before an instance is unhealthy.
pub const UNHEALTHY_AFTER: u64 = 6;

/// An instance's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Serving as it should.
    Healthy,
    /// Serving, with a problem.
    Degraded(String),
    /// Not serving.
    Unhealthy(String),
}

impl Health {
    /// The state recorded in form-state.
    pub fn state(&self) -> state_pb::HealthState {
        match self {
            Health::Healthy => state_pb::HealthState::Healthy,
            Health::Degraded(_) => state_pb::HealthState::Degraded,
            Health::Unhealthy(_) => state_pb::HealthState::Unhealthy,
        }
    }

    /// Why, for people.
    pub fn reason(&self) -> &str {
        match self {
            Health::Healthy => "",
            Health::Degraded(r) | Health::Unhealthy(r) => r,
        }
    }
}

/// The health of active member `m` at `now_ms`, its last heartbeat heard at
/// `heard_ms` (0: never; `crate::arrivals`), with heartbeats due every
/// `heartbeat_ms` and `ejected` when the balancer took it out of rotation.
/// `unheard_since_ms`: when the judge first saw it without any heartbeat; a member
/// never heard from is judged from then (its node may have been lost before its first
/// heartbeat: nothing else would ever show it gone).
pub fn judge(
    m: &state_pb::Member,
    heard_ms: u64,
    now_ms: u64,
    heartbeat_ms: u64,
    ejected: bool,
    unheard_since_ms: Option<u64>,
) -> Health {
    if m.status == state_pb::MemberStatus::Stopped as i32 {
        let why = m
            .health_history
            .last()
            .map(|e| e.reason.clone())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "stopped".into());
        return Health::Unhealthy(format!("instance stopped: {why}"));
    }
    let last = match (heard_ms, unheard_since_ms) {
        (0, Some(seen)) => seen,
        (last, _) => last,
    };
    let missed = if last == 0 {
        0
    } else {
        now_ms.saturating_sub(last) / heartbeat_ms.max(1)
    };
    // Said only of a member that is not healthy: a round judges every member.
    let late = || {
        if heard_ms == 0 {
            format!("no heartbeat ever, {missed} intervals since it was first judged")
        } else {
            format!("no heartbeat for {missed} intervals")
        }
    };
    match (missed, ejected) {
        (n, true) if n >= DEGRADED_AFTER => {
            Health::Unhealthy(format!("{}, ejected by the balancer", late()))
        }
        (n, _) if n >= UNHEALTHY_AFTER => Health::Unhealthy(late()),
        (n, _) if n >= DEGRADED_AFTER => Health::Degraded(late()),
        (_, true) => Health::Degraded("ejected by the balancer".into()),
        _ => Health::Healthy,
    }
}

/// Heartbeats skipped at `now_ms` by a member last heard at `heard_ms`: whole
/// intervals since, beyond the one in progress; 0 before its first.
pub fn skipped(heard_ms: u64, now_ms: u64, heartbeat_ms: u64) -> u32 {
    if heard_ms == 0 {
        return 0;
    }
    let intervals = now_ms.saturating_sub(heard_ms) / heartbeat_ms.max(1);
    u32::try_from(intervals.saturating_sub(1)).unwrap_or(u32::MAX)
}

/// What a member's node looks like, by its record's latest heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHealth {
    /// Heard from lately (or not known: a node without a record is not judged).
    Up,
    /// Silent for [`DEGRADED_AFTER`] heartbeats or more, not yet for the node timeout:
    /// its instances are not replaced yet (placement would not avoid the node).
    Silent,
    /// Silent past the node timeout: its instances are replaced, on other nodes.
    Lost(String),
}

/// The health of node `n` at `now_ms` (its record's heartbeat time as this controller
/// heard it: `crate::fleet::Fleet::records`), with heartbeats due every `heartbeat_ms`
/// and `lost_after_ms` the node timeout.
pub fn node(
    n: Option<&state_pb::NodeInfo>,
    now_ms: u64,
    heartbeat_ms: u64,
    lost_after_ms: u64,
) -> NodeHealth {
    let Some(n) = n else {
        return NodeHealth::Up;
    };
    let silent = now_ms.saturating_sub(n.last_heartbeat_ms);
    if silent > lost_after_ms {
        NodeHealth::Lost(format!(
            "its node {} is lost: no heartbeat for {} ms (node timeout {lost_after_ms} ms)",
            n.node_id, silent
        ))
    } else if silent >= DEGRADED_AFTER * heartbeat_ms.max(1) {
        NodeHealth::Silent
    } else {
        NodeHealth::Up
    }
}

/// Since when `m` has been unhealthy by its recorded history, if it is.
pub fn unhealthy_since(m: &state_pb::Member) -> Option<u64> {
    m.health_history
        .last()
        .filter(|e| e.state == state_pb::HealthState::Unhealthy as i32)
        .map(|e| e.at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_node_is_waited_for_and_a_lost_one_named() {
        let n = state_pb::NodeInfo {
            node_id: "n2".into(),
            last_heartbeat_ms: 10_000,
            ..Default::default()
        };
        assert_eq!(node(None, 99_000, 1000, 15_000), NodeHealth::Up);
        assert_eq!(node(Some(&n), 11_000, 1000, 15_000), NodeHealth::Up);
        assert_eq!(node(Some(&n), 14_000, 1000, 15_000), NodeHealth::Silent);
        assert!(matches!(
            node(Some(&n), 25_001, 1000, 15_000),
            NodeHealth::Lost(why) if why.contains("n2 is lost")
        ));
    }

    fn member(status: state_pb::MemberStatus, hb: u64) -> state_pb::Member {
        state_pb::Member {
            status: status as i32,
            last_heartbeat_ms: hb,
            ..Default::default()
        }
    }

    #[test]
    fn status_heartbeats_and_ejection_decide() {
        let active = state_pb::MemberStatus::Active;
        assert_eq!(
            judge(&member(active, 10_000), 10_000, 10_500, 1000, false, None),
            Health::Healthy
        );
        assert_eq!(
            judge(&member(active, 0), 0, 99_000, 1000, false, None),
            Health::Healthy
        );
        assert!(matches!(
            judge(&member(active, 10_000), 10_000, 13_500, 1000, false, None),
            Health::Degraded(_)
        ));
        assert!(matches!(
            judge(&member(active, 10_000), 10_000, 16_000, 1000, false, None),
            Health::Unhealthy(_)
        ));
        assert!(matches!(
            judge(&member(active, 10_000), 10_000, 10_100, 1000, true, None),
            Health::Degraded(_)
        ));
        assert!(matches!(
            judge(&member(active, 10_000), 10_000, 13_000, 1000, true, None),
            Health::Unhealthy(_)
        ));
        let stopped = judge(
            &member(state_pb::MemberStatus::Stopped, 10_000),
            10_000,
            10_000,
            1000,
            false,
            None,
        );
        assert!(matches!(stopped, Health::Unhealthy(ref r) if r.contains("stopped")));
        // Never heard from: judged from when it was first judged so, as if its last
        // heartbeat had come then.
        assert_eq!(
            judge(&member(active, 0), 0, 12_500, 1000, false, Some(10_000)),
            Health::Healthy
        );
        assert!(matches!(
            judge(&member(active, 0), 0, 13_500, 1000, false, Some(10_000)),
            Health::Degraded(ref r) if r.contains("no heartbeat ever, 3 intervals")
        ));
        assert!(matches!(
            judge(&member(active, 0), 0, 16_000, 1000, false, Some(10_000)),
            Health::Unhealthy(ref r) if r.contains("no heartbeat ever")
        ));
    }
}
