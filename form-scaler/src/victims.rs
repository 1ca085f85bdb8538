//! Which instances a scale-in removes: the cheapest to lose. Cost is what a removal
//! would disturb: sessions pinned to the instance (each weighs like several requests,
//! a session's state moves) and requests in flight. The template is never chosen (it
//! is what clones are made from), and the cluster never goes below its minimum.
//! Unhealthy instances go first: they serve badly anyway.

/// One member as the scale-in sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Instance id.
    pub instance_id: String,
    /// The cluster's template (never removed).
    pub template: bool,
    /// Healthy by the controller's judgement.
    pub healthy: bool,
    /// Sessions pinned to it on the balancer.
    pub pinned_sessions: u32,
    /// Requests in flight to it.
    pub in_flight: u32,
}

/// Weight of a pinned session against a request in flight.
pub const SESSION_WEIGHT: u64 = 10;

/// What removing `c` disturbs.
pub fn cost(c: &Candidate) -> u64 {
    u64::from(c.pinned_sessions) * SESSION_WEIGHT + u64::from(c.in_flight)
}

/// Up to `remove` victims among `members`, keeping at least `min` members and the
/// template; cheapest first (unhealthy before healthy, then by cost, then by id).
pub fn choose(members: &[Candidate], remove: usize, min: u32) -> Vec<String> {
    let removable = members.len().saturating_sub(min as usize).min(remove);
    let mut pool: Vec<&Candidate> = members.iter().filter(|c| !c.template).collect();
    pool.sort_by(|a, b| {
        (a.healthy, cost(a), &a.instance_id).cmp(&(b.healthy, cost(b), &b.instance_id))
    });
    pool.into_iter()
        .take(removable)
        .map(|c| c.instance_id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, template: bool, healthy: bool, sessions: u32, in_flight: u32) -> Candidate {
        Candidate {
            instance_id: id.into(),
            template,
            healthy,
            pinned_sessions: sessions,
            in_flight,
        }
    }

    #[test]
    fn the_cheapest_go_never_the_template_never_below_min() {
        let members = vec![
            c("t", true, true, 0, 0),
            c("busy", false, true, 30, 5),
            c("idle", false, true, 0, 0),
            c("some", false, true, 1, 2),
            c("sick", false, false, 50, 9),
        ];
        assert_eq!(choose(&members, 2, 1), vec!["sick", "idle"]);
        assert_eq!(choose(&members, 4, 1), vec!["sick", "idle", "some", "busy"]);
        assert_eq!(
            choose(&members, 4, 3),
            vec!["sick", "idle"],
            "five members, min three"
        );
        assert!(choose(&members[..1], 1, 0).is_empty(), "only the template");
        assert!(choose(&members, 0, 1).is_empty());
    }
}
