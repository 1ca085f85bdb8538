//! The services an operation acts on: form-state (the operation record, the cluster
//! and its members), the form-vmm-service nodes (instances and snapshots, each on the
//! node that runs it: [`crate::fleet`]) and form-rplb (draining, and whether a new
//! instance serves). Every balancer given is followed: a drain and a new instance's
//! wait end when each has done its part, or has been unreachable for the balancer
//! timeout.

use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::ConfigError;
use form_runtime::addr::HostPort;
use form_runtime::tls::Kind;
use form_runtime::upstream::{PROBE_TIMEOUT, Upstream};
use tonic::transport::Channel;

/// Why a step (or a request) could not be carried out, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// What went wrong.
    pub message: String,
    /// The platform refused what was asked (it cannot be done, trying again will not
    /// help), as opposed to a failure that may pass.
    pub refused: bool,
}

impl OpError {
    /// A failure that may pass.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            refused: false,
        }
    }

    /// A definite refusal: what was asked cannot be done.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            refused: true,
        }
    }

    /// `what` failed with the gRPC status `e`; a refusal when the code says the request
    /// itself cannot be carried out.
    pub fn rpc(what: impl std::fmt::Display, e: &tonic::Status) -> Self {
        use tonic::Code;
        Self {
            message: format!("{what}: {} ({:?})", e.message(), e.code()),
            refused: matches!(
                e.code(),
                Code::FailedPrecondition
                    | Code::InvalidArgument
                    | Code::OutOfRange
                    | Code::ResourceExhausted
                    | Code::Unimplemented
            ),
        }
    }
}

/// Whether `e` says the thing does not exist (so deleting it again is done).
pub fn not_found(e: &tonic::Status) -> bool {
    e.code() == tonic::Code::NotFound
}

/// The result of a removal: done, or already gone (also done), or an error about `what`.
pub fn gone_ok<T>(
    r: Result<T, tonic::Status>,
    what: impl std::fmt::Display,
) -> Result<(), OpError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => Err(OpError::rpc(what, &e)),
    }
}

/// Clients of the other services. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Platform {
    /// form-state replicas, balanced.
    pub state: StateServiceClient<crate::fencing::Ch>,
    /// The form-vmm-service nodes.
    pub fleet: std::sync::Arc<crate::fleet::Fleet>,
    /// Every form-rplb given, with its address: drains and new instances are followed
    /// on each.
    pub balancers: Vec<(String, RplbControlClient<crate::fencing::Ch>)>,
}

impl Platform {
    /// Clients over `state`, the vmm nodes (found by their records, `vmm` before any),
    /// and every one of `rplb`.
    pub fn new(state: &Upstream, vmm: &[HostPort], rplb: &[HostPort]) -> Result<Self, ConfigError> {
        Ok(Self {
            // One replica at a time: an operation reads back what it wrote.
            state: StateServiceClient::new(crate::fencing::fenced(state.sticky_channel())),
            fleet: std::sync::Arc::new(crate::fleet::Fleet::new(vmm)?),
            balancers: rplb
                .iter()
                .map(|hp| {
                    Ok((
                        hp.to_string(),
                        RplbControlClient::new(crate::fencing::fenced(dial(hp, Kind::Rplb)?)),
                    ))
                })
                .collect::<Result<_, ConfigError>>()?,
        })
    }

    /// Clients over channels made elsewhere (an in-memory network in tests): `state`,
    /// the vmm nodes of `fleet`, and each balancer with its name.
    pub fn over(
        state: Channel,
        fleet: crate::fleet::Fleet,
        balancers: Vec<(String, Channel)>,
    ) -> Self {
        Self {
            state: StateServiceClient::new(crate::fencing::fenced(state)),
            fleet: std::sync::Arc::new(fleet),
            balancers: balancers
                .into_iter()
                .map(|(name, ch)| (name, RplbControlClient::new(crate::fencing::fenced(ch))))
                .collect(),
        }
    }

    /// Why `node` is lost (no heartbeat for the node timeout), if it is.
    pub async fn lost(&self, node: &str, timeout: std::time::Duration) -> Option<String> {
        self.fleet.lost(&self.state, node, timeout).await
    }

    /// A client of vmm node `node` ("": the node given with `--vmm`).
    pub async fn vmm_on(&self, node: &str) -> Result<crate::fleet::VmmClient, OpError> {
        self.fleet.client(&self.state, node).await
    }

    /// Writes cluster fields (`what` names the change in errors).
    pub async fn put_cluster(
        &self,
        req: state_pb::PutClusterRequest,
        what: impl std::fmt::Display,
    ) -> Result<(), OpError> {
        self.state
            .clone()
            .put_cluster(req)
            .await
            .map(|_| ())
            .map_err(|e| OpError::rpc(what, &e))
    }

    /// The cluster as form-state has it.
    pub async fn cluster(&self, id: &str) -> Result<state_pb::Cluster, OpError> {
        self.state
            .clone()
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: id.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| OpError::rpc(format!("reading cluster {id}"), &e))
    }
}

/// A channel to the service of `kind` at `hp`. HTTP/2 pings find a peer that went
/// away while a call (a drain's stream) was open.
pub fn dial(hp: &HostPort, kind: Kind) -> Result<Channel, ConfigError> {
    form_runtime::tls::client::channel(kind, std::slice::from_ref(hp), |e| {
        e.connect_timeout(PROBE_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(BALANCER_CALL)
            .keep_alive_timeout(BALANCER_CALL)
            .keep_alive_while_idle(true)
    })
    .map_err(|e| ConfigError::invalid(kind.as_str(), e))
}

/// Longest a balancer may take to answer one call (its statistics, the start of a
/// drain) before it counts as unreachable.
pub const BALANCER_CALL: std::time::Duration = std::time::Duration::from_secs(3);

/// A balancer's statistics of `domain` ("" for every route); no answer within
/// [`BALANCER_CALL`] is `UNAVAILABLE`, as a refused connection is.
pub async fn balancer_stats(
    rplb: &mut RplbControlClient<crate::fencing::Ch>,
    domain: &str,
) -> Result<form_proto::rplb::v1::StatsReply, tonic::Status> {
    let call = rplb.get_stats(form_proto::rplb::v1::GetStatsRequest {
        domain: domain.to_owned(),
    });
    match tokio::time::timeout(BALANCER_CALL, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::unavailable(format!(
            "no answer within {BALANCER_CALL:?}"
        ))),
    }
}
