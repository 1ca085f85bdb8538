//! This node's record in form-state (sent with every round of heartbeats): where its
//! API is reached, what it has (vCPUs, memory, instance slots, by default this host's),
//! what its instances take, its labels and its backend. Placement reads it
//! (`form_scaler::placement`), and `ListNodes` shows it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use form_proto::state::v1 as pb;

use crate::config::Config;
use crate::hypervisor::{InstanceInfo, Status};

/// `key=value` labels, checked: keys of 1 to 63 characters of `a-z 0-9 . _ / -`,
/// values of at most 256, no key twice.
pub fn labels(list: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for l in list {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| format!("'{l}' is not key=value (e.g. zone=eu-1)"))?;
        let key_ok = (1..=63).contains(&k.len())
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'/' | b'-')
            });
        if !key_ok {
            return Err(format!(
                "'{l}': the key must be 1 to 63 characters of a-z 0-9 . _ / -"
            ));
        }
        if v.len() > 256 {
            return Err(format!("'{l}': the value is longer than 256 bytes"));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("'{k}' is given twice"));
        }
    }
    Ok(out)
}

/// The parts of the record that do not change while the node runs.
#[derive(Debug, Clone)]
pub struct Record {
    node_id: String,
    address: String,
    capacity: pb::NodeCapacity,
    labels: BTreeMap<String, String>,
    backend: String,
}

impl Record {
    /// The record of a node configured by `c` whose API listens on `listening`.
    pub fn new(c: &Config, listening: SocketAddr) -> Result<Self, String> {
        let address = match &c.advertise {
            Some(a) => a.to_string(),
            None if listening.ip().is_unspecified() => {
                SocketAddr::new(c.instance_host, listening.port()).to_string()
            }
            None => listening.to_string(),
        };
        let vcpus = match c.capacity_vcpus {
            // vCPUs are time-shared, as a cloud sells them: a host CPU runs several.
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32) * VCPUS_PER_CPU,
            n => n,
        };
        let memory_mib = match c.capacity_memory_mib {
            0 => host_memory_mib().unwrap_or(1024),
            n => n,
        };
        Ok(Self::of(
            c.node_id.clone(),
            address,
            pb::NodeCapacity {
                vcpus,
                memory_mib,
                instance_slots: c.instance_slots,
            },
            labels(&c.labels)?,
            c.backend.clone(),
        ))
    }

    /// The record of node `node_id` reached at `address` (the simulated fleet of
    /// `form-bench scaler-fleet` makes its nodes' records with it).
    pub fn of(
        node_id: String,
        address: String,
        capacity: pb::NodeCapacity,
        labels: BTreeMap<String, String>,
        backend: String,
    ) -> Self {
        Self {
            node_id,
            address,
            capacity,
            labels,
            backend,
        }
    }

    /// The heartbeat of this node running `instances`, at `at_ms`.
    pub fn heartbeat(&self, instances: &[InstanceInfo], at_ms: u64) -> pb::NodeHeartbeatRequest {
        let mut used = pb::NodeCapacity::default();
        for i in instances.iter().filter(|i| i.status != Status::Failed) {
            used.vcpus += i.spec.resources.vcpus;
            used.memory_mib += i.spec.resources.memory_mib;
            used.instance_slots += 1;
        }
        pb::NodeHeartbeatRequest {
            node_id: self.node_id.clone(),
            at_ms,
            addresses: vec![self.address.clone()],
            capacity: Some(self.capacity),
            used: Some(used),
            labels: self.labels.clone().into_iter().collect(),
            backend: self.backend.clone(),
            // The replica sets it from this node's certificate.
            identity: String::new(),
        }
    }
}

/// vCPUs a node offers per CPU of its host, unless `--capacity-vcpus` says otherwise.
pub const VCPUS_PER_CPU: u32 = 8;

/// This host's memory (`MemTotal` of /proc/meminfo), MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = crate::procfs::kib(&text, "MemTotal")?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_and_named_when_wrong() {
        let ok = labels(&["zone=eu-1".into(), "disk=ssd".into()]).expect("valid");
        assert_eq!(ok["zone"], "eu-1");
        for (bad, words) in [
            ("zone", "not key=value"),
            ("Zone=eu", "a-z 0-9"),
            ("=x", "1 to 63"),
        ] {
            let e = labels(&[bad.into()]).expect_err(bad);
            assert!(e.contains(words), "{e}");
        }
        let e = labels(&["a=1".into(), "a=2".into()]).expect_err("twice");
        assert!(e.contains("'a' is given twice"), "{e}");
    }

    #[test]
    fn the_host_memory_is_read() {
        assert!(host_memory_mib().is_some_and(|m| m > 0));
    }
}
