//! Placement: which node gets each new instance of a cluster. One pure function,
//! [`place`], with no I/O and no clock: the same nodes and request always give the
//! same answer, so it is tested by tables and replayed by the simulator.
//!
//! For each new instance in turn, the nodes that may take it are those that are
//! neither cordoned nor lost, carry every label the request requires, and have the
//! vCPUs, memory and an instance slot it needs free. Among them the pick is, in order:
//! 1. the fewest instances of the same cluster (spread: a node lost takes as few of a
//!    cluster's instances with it as can be);
//! 2. the most memory left free after it (load spread over the fleet);
//! 3. the smallest node id (a tie is broken the same way every time).
//!
//! The instances of one request are placed together or not at all: if one of them
//! fits nowhere, the answer is an error naming, node by node, what is short, before
//! anything is created.

use std::collections::BTreeMap;
use std::fmt;

/// Resources, as a node has them or an instance needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Instance slots (an instance takes one).
    pub slots: u32,
}

impl Amount {
    fn fits_in(&self, free: &Self) -> bool {
        self.vcpus <= free.vcpus && self.memory_mib <= free.memory_mib && self.slots <= free.slots
    }

    fn minus(&self, other: &Self) -> Self {
        Self {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            slots: self.slots.saturating_sub(other.slots),
        }
    }

    fn plus(&self, other: &Self) -> Self {
        Self {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            slots: self.slots.saturating_add(other.slots),
        }
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its id.
    pub id: String,
    /// What it has in all.
    pub capacity: Amount,
    /// What its instances take now.
    pub used: Amount,
    /// Its labels (`zone=eu-1`, `disk=ssd`, ...).
    pub labels: BTreeMap<String, String>,
    /// Takes no new instance.
    pub cordoned: bool,
    /// Its heartbeats stopped: it takes nothing.
    pub lost: bool,
}

/// New instances of one cluster to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The cluster.
    pub cluster_id: String,
    /// How many new instances.
    pub count: u32,
    /// What each needs (its slot is counted by placement).
    pub vcpus: u32,
    /// Memory of each, MiB.
    pub memory_mib: u64,
    /// Labels a node must carry, each with this value.
    pub labels: BTreeMap<String, String>,
    /// The node of each instance the cluster has now (for spread).
    pub existing_nodes: Vec<String>,
}

impl Request {
    fn need(&self) -> Amount {
        Amount {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            slots: 1,
        }
    }
}

/// Where one new instance goes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The node.
    pub node_id: String,
    /// Why this node, in words (recorded on the operation).
    pub reason: String,
}

/// Why a request cannot be placed: what each node lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// Which instance of the request found no node (1-based) and how many were asked.
    pub instance: u32,
    /// Of the request.
    pub count: u32,
    /// What one instance needs.
    pub need: Amount,
    /// Each node with what keeps it out, by node id.
    pub nodes: Vec<(String, String)>,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no node can hold instance {} of {} ({} vCPU, {} MiB)",
            self.instance, self.count, self.need.vcpus, self.need.memory_mib
        )?;
        if self.nodes.is_empty() {
            return write!(f, ": there is no node");
        }
        let reasons: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, why)| format!("{id} {why}"))
            .collect();
        write!(f, ": {}", reasons.join("; "))
    }
}

impl std::error::Error for Shortfall {}

/// Why `node` cannot take one more instance needing `need`, if it cannot.
fn excluded(
    node: &Node,
    free: &Amount,
    need: &Amount,
    labels: &BTreeMap<String, String>,
) -> Option<String> {
    if node.lost {
        return Some("is lost".into());
    }
    if node.cordoned {
        return Some("is cordoned".into());
    }
    for (k, v) in labels {
        match node.labels.get(k) {
            Some(have) if have == v => {}
            Some(have) => return Some(format!("has label {k}={have}, needs {k}={v}")),
            None => return Some(format!("lacks label {k}={v}")),
        }
    }
    if need.fits_in(free) {
        return None;
    }
    let mut short = Vec::new();
    if need.vcpus > free.vcpus {
        short.push(format!("{} vCPU free, needs {}", free.vcpus, need.vcpus));
    }
    if need.memory_mib > free.memory_mib {
        short.push(format!(
            "{} MiB free, needs {}",
            free.memory_mib, need.memory_mib
        ));
    }
    if need.slots > free.slots {
        short.push("no instance slot free".into());
    }
    Some(format!("has {}", short.join(", ")))
}

/// Places every new instance of `req` on `nodes` (see the module), or says what is
/// short. Deterministic: the order of `nodes` does not matter.
pub fn place(nodes: &[Node], req: &Request) -> Result<Vec<Placed>, Shortfall> {
    let need = req.need();
    let mut sorted: Vec<&Node> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut used: Vec<Amount> = sorted.iter().map(|n| n.used).collect();
    let mut of_cluster: BTreeMap<&str, u32> = BTreeMap::new();
    for n in &req.existing_nodes {
        *of_cluster.entry(n.as_str()).or_default() += 1;
    }
    let mut out = Vec::with_capacity(req.count as usize);
    for k in 0..req.count {
        let mut best: Option<(usize, u32, u64)> = None;
        let mut reasons = Vec::new();
        for (i, node) in sorted.iter().enumerate() {
            let free = node.capacity.minus(&used[i]);
            if let Some(why) = excluded(node, &free, &need, &req.labels) {
                reasons.push((node.id.clone(), why));
                continue;
            }
            let here = of_cluster.get(node.id.as_str()).copied().unwrap_or(0);
            let left = free.memory_mib - need.memory_mib;
            // Fewest of the cluster, then most memory left; the first (smallest id)
            // wins a tie.
            let better = match best {
                None => true,
                Some((_, h, l)) => here < h || (here == h && left > l),
            };
            if better {
                best = Some((i, here, left));
            }
        }
        let Some((i, here, left)) = best else {
            return Err(Shortfall {
                instance: k + 1,
                count: req.count,
                need,
                nodes: reasons,
            });
        };
        used[i] = used[i].plus(&need);
        let node = sorted[i];
        *of_cluster.entry(node.id.as_str()).or_default() += 1;
        let free = node.capacity.minus(&used[i]);
        out.push(Placed {
            node_id: node.id.clone(),
            reason: format!(
                "{}: {here} of cluster {}'s instances there before (the fewest), {left} MiB, {} vCPU and {} slots free after",
                node.id, req.cluster_id, free.vcpus, free.slots
            ),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, vcpus: u32, memory_mib: u64, slots: u32) -> Node {
        Node {
            id: id.into(),
            capacity: Amount {
                vcpus,
                memory_mib,
                slots,
            },
            used: Amount::default(),
            labels: BTreeMap::new(),
            cordoned: false,
            lost: false,
        }
    }

    fn request(count: u32, vcpus: u32, memory_mib: u64, existing: &[&str]) -> Request {
        Request {
            cluster_id: "web".into(),
            count,
            vcpus,
            memory_mib,
            labels: BTreeMap::new(),
            existing_nodes: existing.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn nodes_of(p: &[Placed]) -> Vec<&str> {
        p.iter().map(|x| x.node_id.as_str()).collect()
    }

    #[test]
    fn spreads_a_cluster_over_nodes_before_stacking() {
        let nodes = [node("a", 8, 8192, 10), node("b", 8, 8192, 10)];
        // Scale the demo to 4 from one instance on a: 2 and 2.
        let p = place(&nodes, &request(3, 1, 512, &["a"])).expect("room");
        assert_eq!(nodes_of(&p), ["b", "a", "b"]);
        assert!(
            p[0].reason.contains("0 of cluster web's instances"),
            "{}",
            p[0].reason
        );
    }

    #[test]
    fn prefers_the_node_with_most_memory_left_then_the_smallest_id() {
        let mut busy = node("a", 8, 8192, 10);
        busy.used.memory_mib = 4096;
        let nodes = [busy, node("c", 8, 8192, 10), node("b", 8, 8192, 10)];
        let p = place(&nodes, &request(1, 1, 512, &[])).expect("room");
        assert_eq!(nodes_of(&p), ["b"], "b and c tie on memory; b is first");
    }

    #[test]
    fn honours_capacity_slots_labels_and_cordons() {
        let mut small = node("a", 1, 8192, 10);
        small.used.vcpus = 1;
        let full = node("b", 8, 8192, 0);
        let mut cordoned = node("c", 8, 8192, 10);
        cordoned.cordoned = true;
        let mut lost = node("d", 8, 8192, 10);
        lost.lost = true;
        let mut other_zone = node("e", 8, 8192, 10);
        other_zone.labels.insert("zone".into(), "us".into());
        let mut eu = node("f", 8, 8192, 10);
        eu.labels.insert("zone".into(), "eu".into());
        let nodes = [small, full, cordoned, lost, other_zone, eu];
        let mut req = request(2, 2, 1024, &[]);
        req.labels.insert("zone".into(), "eu".into());
        let p = place(&nodes, &req).expect("f holds both");
        assert_eq!(nodes_of(&p), ["f", "f"]);
    }

    #[test]
    fn a_request_no_node_can_hold_fails_whole_naming_each_shortfall() {
        let mut a = node("a", 4, 2048, 10);
        a.used = Amount {
            vcpus: 3,
            memory_mib: 0,
            slots: 0,
        };
        let mut b = node("b", 8, 8192, 10);
        b.cordoned = true;
        let c = node("c", 8, 1024, 10);
        let e = place(&[a, b, c], &request(1, 2, 1536, &[])).expect_err("no room");
        let text = e.to_string();
        for part in [
            "no node can hold instance 1 of 1 (2 vCPU, 1536 MiB)",
            "a has 1 vCPU free, needs 2",
            "b is cordoned",
            "c has 1024 MiB free, needs 1536",
        ] {
            assert!(text.contains(part), "'{part}' not in '{text}'");
        }
        // All or nothing: the second of two does not fit, so neither is placed.
        let e = place(&[node("a", 1, 1024, 10)], &request(2, 1, 512, &[])).expect_err("one only");
        assert_eq!(e.instance, 2);
        assert_eq!(
            place(&[], &request(1, 1, 1, &[]))
                .expect_err("none")
                .to_string(),
            "no node can hold instance 1 of 1 (1 vCPU, 1 MiB): there is no node"
        );
    }

    #[test]
    fn the_order_of_the_nodes_does_not_change_the_answer() {
        let mut nodes: Vec<Node> = (0..7)
            .map(|i| {
                let mut n = node(&format!("n{i}"), 16, 16384, 20);
                n.used.memory_mib = (i * 977 % 5) as u64 * 1024;
                n
            })
            .collect();
        let req = request(9, 2, 1024, &["n1", "n1", "n4"]);
        let first = place(&nodes, &req).expect("room");
        nodes.reverse();
        assert_eq!(place(&nodes, &req).expect("room"), first);
        nodes.swap(0, 3);
        assert_eq!(place(&nodes, &req).expect("room"), first);
    }
}
