//! The vmm nodes an operation acts on. Each node writes its record into form-state
//! with every round of heartbeats (its id, API address, capacity, labels); the
//! controller reads the records (`ListNodes`) and dials a node at its recorded address
//! the first time it needs it. A node given with `--vmm` is the one used when no node
//! has a record yet (a single node that does not heartbeat into form-state), and for
//! an operation recorded before its instances had nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_runtime::ConfigError;
use form_runtime::addr::HostPort;
use form_runtime::tls::Kind;
use tonic::transport::Channel;

use crate::platform::{OpError, dial};

/// Largest gRPC message to and from a vmm node: a batch of application changes.
const MAX_BATCH_MESSAGE: usize = 17 * 1024 * 1024;

/// How long a read of the records serves before it is read again.
const RECORDS_FRESH: Duration = Duration::from_secs(1);

/// A client of a vmm node.
pub type VmmClient = VmmServiceClient<crate::fencing::Ch>;

/// The nodes, and a client of each one used so far.
#[derive(Debug, Default)]
pub struct Fleet {
    /// The first `--vmm` node.
    given: Option<VmmClient>,
    /// Clients by address.
    clients: Mutex<HashMap<String, VmmClient>>,
    /// The records last read, and when.
    records: Mutex<Option<(Instant, Arc<Vec<state_pb::NodeInfo>>)>>,
    /// How a node's recorded address is reached; TLS over TCP when unset.
    dialer: Option<Dialer>,
    /// When this controller saw each node's heartbeat stamp change: the records it
    /// hands out carry that time, not the node's clock (`crate::arrivals`).
    arrivals: crate::arrivals::Arrivals,
}

/// Makes the channel to a recorded node address (an in-memory network in tests).
#[derive(Clone)]
pub struct Dialer(pub Arc<dyn Fn(&str) -> Channel + Send + Sync>);

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer")
    }
}

fn client_of(ch: Channel) -> VmmClient {
    // A batch of the state contract travels whole (up to 16 MiB).
    VmmServiceClient::new(crate::fencing::fenced(ch))
        .max_decoding_message_size(MAX_BATCH_MESSAGE)
        .max_encoding_message_size(MAX_BATCH_MESSAGE)
}

impl Fleet {
    /// The fleet, with the first of `vmm` (if any) as the node used before any record.
    pub fn new(vmm: &[HostPort]) -> Result<Self, ConfigError> {
        if vmm.len() > 1 {
            tracing::info!(
                given = vmm.len(),
                "several --vmm nodes: nodes are found by their records in form-state; the first given is used only before any node has one"
            );
        }
        Ok(Self {
            given: vmm
                .first()
                .map(|hp| dial(hp, Kind::Vmm).map(client_of))
                .transpose()?,
            ..Default::default()
        })
    }

    /// A fleet found by its records only, whose nodes are reached through `dialer`.
    pub fn dialing(dialer: Dialer) -> Self {
        Self {
            dialer: Some(dialer),
            ..Default::default()
        }
    }

    /// Whether any node can be reached: one given, or records to be read.
    pub fn configured(&self) -> bool {
        self.given.is_some()
            || lock(&self.records)
                .as_ref()
                .is_some_and(|(_, r)| !r.is_empty())
    }

    /// The node records as form-state has them (read again when older than a second,
    /// or when `fresh`), each `last_heartbeat_ms` the time this controller saw it
    /// arrive ([`crate::arrivals`]).
    pub async fn records(
        &self,
        state: &StateServiceClient<crate::fencing::Ch>,
        fresh: bool,
    ) -> Result<Arc<Vec<state_pb::NodeInfo>>, OpError> {
        if !fresh
            && let Some((at, r)) = lock(&self.records).as_ref()
            && at.elapsed() < RECORDS_FRESH
        {
            return Ok(r.clone());
        }
        let nodes = state
            .clone()
            .list_nodes(state_pb::ListNodesRequest {})
            .await
            .map_err(|s| OpError::rpc("listing the vmm nodes", &s))?
            .into_inner()
            .nodes;
        let nodes = Arc::new(self.heard(nodes));
        *lock(&self.records) = Some((Instant::now(), nodes.clone()));
        Ok(nodes)
    }

    /// `nodes` with each heartbeat's time as this controller saw it arrive.
    fn heard(&self, mut nodes: Vec<state_pb::NodeInfo>) -> Vec<state_pb::NodeInfo> {
        let now = crate::ops::record::now_ms();
        {
            let mut seen = self.arrivals.lock();
            for n in &mut nodes {
                n.last_heartbeat_ms = seen.heard(&n.node_id, n.last_heartbeat_ms, now, now);
            }
        }
        let ids: std::collections::HashSet<&str> =
            nodes.iter().map(|n| n.node_id.as_str()).collect();
        self.arrivals.retain(|id| ids.contains(id));
        nodes
    }

    /// The record of node `id`, read again once when it is not known yet.
    pub async fn record(
        &self,
        state: &StateServiceClient<crate::fencing::Ch>,
        id: &str,
    ) -> Result<Option<state_pb::NodeInfo>, OpError> {
        for fresh in [false, true] {
            let r = self.records(state, fresh).await?;
            if let Some(n) = r.iter().find(|n| n.node_id == id) {
                return Ok(Some(n.clone()));
            }
            if fresh && r.is_empty() {
                return Ok(None);
            }
        }
        Err(OpError::new(format!(
            "vmm node {id} has no record in form-state (it never sent a heartbeat)"
        )))
    }

    /// A client of node `id`: at its recorded address; the `--vmm` node for "" (an
    /// instance recorded without a node) or while no node has a record.
    pub async fn client(
        &self,
        state: &StateServiceClient<crate::fencing::Ch>,
        id: &str,
    ) -> Result<VmmClient, OpError> {
        let record = if id.is_empty() {
            None
        } else {
            self.record(state, id).await?
        };
        let Some(record) = record else {
            return self.given.clone().ok_or_else(|| {
                OpError::new(format!(
                    "no vmm node known for {}: none has a record in form-state, and none was given with --vmm",
                    if id.is_empty() { "an instance without a node" } else { id }
                ))
            });
        };
        let address = address_of(&record)?;
        if let Some(c) = lock(&self.clients).get(&address) {
            return Ok(c.clone());
        }
        let c = match &self.dialer {
            Some(d) => client_of(d.0(&address)),
            None => {
                let hp: HostPort = address.parse().map_err(|e| {
                    OpError::new(format!("vmm node {id} records address '{address}': {e}"))
                })?;
                client_of(
                    dial(&hp, Kind::Vmm)
                        .map_err(|e| OpError::new(format!("vmm node {id}: {e}")))?,
                )
            }
        };
        lock(&self.clients).insert(address, c.clone());
        Ok(c)
    }

    /// Why node `id` is lost (no heartbeat for `timeout`), if it is; a node without a
    /// record, or "", is not.
    pub async fn lost(
        &self,
        state: &StateServiceClient<crate::fencing::Ch>,
        id: &str,
        timeout: Duration,
    ) -> Option<String> {
        if id.is_empty() {
            return None;
        }
        let records = self.records(state, false).await.ok()?;
        let r = records.iter().find(|n| n.node_id == id)?;
        let silent = crate::ops::record::now_ms().saturating_sub(r.last_heartbeat_ms);
        (silent > timeout.as_millis() as u64)
            .then(|| format!("node {id} is lost (no heartbeat for {silent} ms)"))
    }

    /// The address of node `id` as other nodes reach it (a pull's source).
    pub async fn address(
        &self,
        state: &StateServiceClient<crate::fencing::Ch>,
        id: &str,
    ) -> Result<String, OpError> {
        match self.record(state, id).await? {
            Some(r) => address_of(&r),
            None => Err(OpError::new(format!(
                "vmm node {id} has no record in form-state: other nodes cannot reach it"
            ))),
        }
    }
}

fn address_of(r: &state_pb::NodeInfo) -> Result<String, OpError> {
    r.addresses
        .first()
        .cloned()
        .ok_or_else(|| OpError::new(format!("vmm node {} records no address", r.node_id)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
