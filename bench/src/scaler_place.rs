//! Placement's cost (`form_scaler::placement::place`): a fleet of 100 nodes holding
//! 1,000 clusters of 10 instances, spread by placement itself, then one scale-out by
//! one instance per cluster, each timed.

use std::collections::BTreeMap;
use std::time::Instant;

use form_scaler::placement::{Amount, Node, Request, place};

use crate::quantile;

/// Runs the benchmark.
pub(crate) fn run(nodes: usize, clusters: usize) -> anyhow::Result<()> {
    let mut fleet: Vec<Node> = (0..nodes)
        .map(|i| Node {
            id: format!("node-{i:03}"),
            capacity: Amount {
                vcpus: 256,
                memory_mib: 512 * 1024,
                slots: 500,
            },
            used: Amount::default(),
            labels: BTreeMap::from([("zone".to_owned(), format!("z{}", i % 3))]),
            cordoned: i % 50 == 7,
            lost: false,
        })
        .collect();
    let request = |c: usize, count: u32, existing: &[String]| Request {
        cluster_id: format!("c{c}"),
        count,
        vcpus: 1,
        memory_mib: 512,
        labels: BTreeMap::new(),
        existing_nodes: existing.to_vec(),
    };
    // Fill the fleet: 10 instances per cluster, where placement puts them.
    let mut placed: Vec<Vec<String>> = Vec::with_capacity(clusters);
    for c in 0..clusters {
        let p = place(&fleet, &request(c, 10, &[])).map_err(anyhow::Error::msg)?;
        for x in &p {
            if let Some(n) = fleet.iter_mut().find(|n| n.id == x.node_id) {
                n.used.vcpus += 1;
                n.used.memory_mib += 512;
                n.used.slots += 1;
            }
        }
        placed.push(p.into_iter().map(|x| x.node_id).collect());
    }
    let mut times = Vec::with_capacity(clusters);
    for (c, existing) in placed.iter().enumerate() {
        let req = request(c, 1, existing);
        let t = Instant::now();
        let p = place(std::hint::black_box(&fleet), &req).map_err(anyhow::Error::msg)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(p);
    }
    times.sort_by(f64::total_cmp);
    let (p50, p99) = (quantile(&times, 0.5), quantile(&times, 0.99));
    println!(
        "scaler-place: {nodes} nodes (2 cordoned), {clusters} clusters of 10 instances, one scale-out by one per cluster"
    );
    println!("| measure | value | target |");
    println!("|---|---:|---|");
    println!("| place() p50 | {p50:.1} µs | - |");
    println!(
        "| place() p99 | {p99:.1} µs | <= 1000 µs {} |",
        if p99 <= 1000.0 { "✓" } else { "✗ missed" }
    );
    Ok(())
}
