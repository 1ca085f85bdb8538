//! Which controller handles a cluster, without consensus: rendezvous (highest random
//! weight) hashing of the cluster over the controllers whose heartbeat is fresh. Every
//! controller computes the same owner from the same view; when one dies, only its
//! clusters move, each to the controller that ranks next for it.

use sha2::{Digest, Sha256};

/// A controller's heartbeat as read from form-state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// Controller id.
    pub id: String,
    /// Its last heartbeat, ms since the Unix epoch.
    pub last_heartbeat_ms: u64,
}

fn weight(controller: &str, cluster: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(controller.as_bytes());
    h.update([0]);
    h.update(cluster.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The live controllers at `now_ms`: heartbeat within `ttl_ms`.
pub fn live(controllers: &[Controller], now_ms: u64, ttl_ms: u64) -> Vec<&str> {
    controllers
        .iter()
        .filter(|c| now_ms.saturating_sub(c.last_heartbeat_ms) <= ttl_ms)
        .map(|c| c.id.as_str())
        .collect()
}

/// The owner of `cluster` among `live` controllers.
pub fn owner<'a>(cluster: &str, live: &[&'a str]) -> Option<&'a str> {
    live.iter()
        .copied()
        .max_by_key(|c| (weight(c, cluster), *c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cluster_has_one_owner_and_only_a_dead_ones_clusters_move() {
        let all = ["scaler-a", "scaler-b", "scaler-c"];
        let clusters: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
        let before: Vec<&str> = clusters
            .iter()
            .map(|c| owner(c, &all).expect("owner"))
            .collect();
        for id in all {
            let n = before.iter().filter(|o| **o == id).count();
            assert!((60..=140).contains(&n), "{id} owns {n} of 300");
        }
        let after_loss: Vec<&str> = clusters
            .iter()
            .map(|c| owner(c, &["scaler-a", "scaler-c"]).expect("owner"))
            .collect();
        for (b, a) in before.iter().zip(&after_loss) {
            if *b != "scaler-b" {
                assert_eq!(b, a, "a live controller's cluster moved");
            }
        }
        assert_eq!(owner("c1", &[]), None);
        let hb = |id: &str, at| Controller {
            id: id.into(),
            last_heartbeat_ms: at,
        };
        assert_eq!(
            live(&[hb("a", 1_000), hb("b", 9_000)], 10_000, 5_000),
            vec!["b"]
        );
    }
}
