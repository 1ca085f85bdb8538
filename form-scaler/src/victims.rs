//! Which instances a scale-in removes: the cheapest to lose. Cost is what a removal
//! would disturb: sessions pinned to the instance (each weighs like several requests,
//! a session's state moves) and requests in flight. The template is never chosen (it
//! is what clones are made from), and the cluster never goes below its minimum.
//! Unhealthy instances go first: they serve badly anyway. Then the survivors stay
//! spread over nodes, as placement spreads new instances: a member that shares its
//! node with another survivor goes before one that is the last on its node, so a
//! scale-in never leaves every survivor on one node while others ran some (one
//! node's crash would then take the whole cluster; the simulator found it, seed 8 of
//! `seeded_node_crashes_lose_instances_and_the_platform_heals`).

use std::collections::HashMap;

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
    /// The node it runs on ("" when unknown: such members spread as one node).
    pub node_id: String,
}

/// Weight of a pinned session against a request in flight.
pub const SESSION_WEIGHT: u64 = 10;

/// What removing `c` disturbs.
pub fn cost(c: &Candidate) -> u64 {
    u64::from(c.pinned_sessions) * SESSION_WEIGHT + u64::from(c.in_flight)
}

/// Up to `remove` victims among `members`, keeping at least `min` members and the
/// template; cheapest first: unhealthy before healthy, then one that shares its node
/// with another survivor before the last on its node, then by cost, then by id.
pub fn choose(members: &[Candidate], remove: usize, min: u32) -> Vec<String> {
    let removable = members.len().saturating_sub(min as usize).min(remove);
    let mut on_node: HashMap<&str, usize> = HashMap::new();
    for c in members {
        *on_node.entry(c.node_id.as_str()).or_default() += 1;
    }
    let mut pool: Vec<&Candidate> = members.iter().filter(|c| !c.template).collect();
    let mut out = Vec::with_capacity(removable);
    while out.len() < removable && !pool.is_empty() {
        let last_on_node = |c: &Candidate| on_node[c.node_id.as_str()] <= 1;
        let (k, _) = pool
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                (a.healthy, last_on_node(a), cost(a), &a.instance_id).cmp(&(
                    b.healthy,
                    last_on_node(b),
                    cost(b),
                    &b.instance_id,
                ))
            })
            .expect("the pool is not empty");
        let victim = pool.swap_remove(k);
        if let Some(n) = on_node.get_mut(victim.node_id.as_str()) {
            *n -= 1;
        }
        out.push(victim.instance_id.clone());
    }
    out
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
            node_id: String::new(),
        }
    }

    fn on(node: &str, c: Candidate) -> Candidate {
        Candidate {
            node_id: node.into(),
            ..c
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

    #[test]
    fn the_survivors_stay_spread_over_nodes() {
        // Seed 8's shape: the template shares node-1 with a busy member; node-2 and
        // node-3 run one idle member each. By cost alone both idle ones would go,
        // and every survivor would run on node-1.
        let members = vec![
            on("node-1", c("t", true, true, 0, 0)),
            on("node-1", c("a", false, true, 9, 0)),
            on("node-2", c("b", false, true, 0, 0)),
            on("node-3", c("c", false, true, 1, 0)),
        ];
        let gone = choose(&members, 2, 2);
        assert_eq!(
            gone,
            vec!["a", "b"],
            "node-1's second first, then the cheapest"
        );
        let kept: Vec<&str> = members
            .iter()
            .filter(|m| !gone.contains(&m.instance_id))
            .map(|m| m.node_id.as_str())
            .collect();
        assert_eq!(kept, vec!["node-1", "node-3"]);
        // Unhealthy still goes first, wherever it runs.
        let mut sick = members.clone();
        sick[3].healthy = false;
        assert_eq!(choose(&sick, 1, 1), vec!["c"]);
        // Within one node, cost decides.
        let one_node: Vec<Candidate> = members.iter().cloned().map(|m| on("node-1", m)).collect();
        assert_eq!(choose(&one_node, 2, 1), vec!["b", "c"]);
    }
}
