//! The services behind the gateway: form-state (clusters, members, nodes, operations)
//! and form-scaler (scaling, status, policies). It asks no vmm node: what it shows of
//! instances (their node, their state contract) the nodes report into form-state.

use form_proto::scaler::v1::scaler_service_client::ScalerServiceClient;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::upstream::Upstream;
use tonic::transport::Channel;

use crate::error::ApiError;

/// Clients of the services behind the gateway; cheap to clone.
#[derive(Debug, Clone)]
pub struct Backends {
    state: Option<StateServiceClient<Channel>>,
    scaler: Option<ScalerServiceClient<Channel>>,
}

fn missing(what: &str, flag: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("the gateway has no {what} configured ({flag})"),
    )
}

impl Backends {
    /// Clients over the configured upstreams (by name: state, scaler).
    pub fn new(upstreams: &[Upstream]) -> Self {
        let find = |n: &str| upstreams.iter().find(|u| u.name() == n);
        Self {
            // One replica at a time: a request reads back what it wrote.
            state: find("state").map(|u| StateServiceClient::new(u.sticky_channel())),
            scaler: find("scaler").map(|u| ScalerServiceClient::new(u.channel())),
        }
    }

    /// form-state.
    pub fn state(&self) -> Result<StateServiceClient<Channel>, ApiError> {
        self.state
            .clone()
            .ok_or_else(|| missing("form-state", "--state"))
    }

    /// form-scaler.
    pub fn scaler(&self) -> Result<ScalerServiceClient<Channel>, ApiError> {
        self.scaler
            .clone()
            .ok_or_else(|| missing("form-scaler", "--scaler"))
    }
}
