//! Who may call what: one table for every gRPC method of the platform, enforced by
//! one tower layer on every server.
//!
//! A caller is known by the kind its certificate names (see [`crate::tls`]). A method
//! not in the table is refused to everyone; health and reflection are open to every
//! authenticated caller. A refusal is `PERMISSION_DENIED` naming the caller and the
//! method, and is counted in `form_authz_denied_total{caller,method}`. On a server
//! started with `--insecure-plaintext` there is no caller to know, and everything is
//! let through.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::tls::{Kind, Peer};

use Kind::{Gateway, Operator, Rplb, Scaler, State, Vmm};

/// Every reader of the cluster records.
const READERS: &[Kind] = &[State, Scaler, Vmm, Rplb, Gateway, Operator];

/// The table: (`package.Service`, method, kinds allowed).
pub const TABLE: &[(&str, &str, &[Kind])] = &[
    // form-state: clusters are written by the controller and the gateway; members by
    // the controller (the vmm nodes and the gateway update their health and drains);
    // heartbeats of instances come from vmm nodes, of controllers from controllers.
    (
        "form.state.v1.StateService",
        "PutCluster",
        &[Scaler, Gateway],
    ),
    ("form.state.v1.StateService", "GetCluster", READERS),
    ("form.state.v1.StateService", "ListClusters", READERS),
    (
        "form.state.v1.StateService",
        "DeleteCluster",
        &[Scaler, Gateway],
    ),
    ("form.state.v1.StateService", "AddMember", &[Scaler]),
    ("form.state.v1.StateService", "RemoveMember", &[Scaler]),
    (
        "form.state.v1.StateService",
        "UpdateMember",
        &[Scaler, Gateway, Vmm],
    ),
    ("form.state.v1.StateService", "Heartbeat", &[Vmm]),
    ("form.state.v1.StateService", "PutOperation", &[Scaler]),
    ("form.state.v1.StateService", "GetOperation", READERS),
    ("form.state.v1.StateService", "ListOperations", READERS),
    ("form.state.v1.StateService", "Watch", READERS),
    ("form.state.v1.StateService", "Digest", READERS),
    (
        "form.state.v1.StateService",
        "ControllerHeartbeat",
        &[Scaler],
    ),
    ("form.state.v1.StateService", "ListControllers", READERS),
    // Only a vmm node reports itself; operators and the gateway cordon.
    ("form.state.v1.StateService", "NodeHeartbeat", &[Vmm]),
    ("form.state.v1.StateService", "ListNodes", READERS),
    (
        "form.state.v1.StateService",
        "SetNodeCordon",
        &[Gateway, Operator],
    ),
    ("form.state.v1.StateService", "ClaimCluster", &[Scaler]),
    // Gossip between replicas only.
    ("form.state.v1.GossipService", "PushDeltas", &[State]),
    ("form.state.v1.GossipService", "AntiEntropy", &[State]),
    // form-vmm-service: only the controller changes instances and snapshots; operators
    // read (the gateway reads what the nodes report into form-state, never a node).
    ("form.vmm.v1.VmmService", "CreateInstance", &[Scaler]),
    ("form.vmm.v1.VmmService", "GetInstance", &[Scaler, Operator]),
    (
        "form.vmm.v1.VmmService",
        "ListInstances",
        &[Scaler, Operator],
    ),
    ("form.vmm.v1.VmmService", "Pause", &[Scaler]),
    ("form.vmm.v1.VmmService", "Resume", &[Scaler]),
    ("form.vmm.v1.VmmService", "Snapshot", &[Scaler]),
    ("form.vmm.v1.VmmService", "Clone", &[Scaler]),
    ("form.vmm.v1.VmmService", "Resize", &[Scaler]),
    ("form.vmm.v1.VmmService", "DeleteInstance", &[Scaler]),
    ("form.vmm.v1.VmmService", "GetStats", &[Scaler, Operator]),
    (
        "form.vmm.v1.VmmService",
        "ListSnapshots",
        &[Scaler, Operator],
    ),
    ("form.vmm.v1.VmmService", "DeleteSnapshot", &[Scaler]),
    ("form.vmm.v1.VmmService", "ReadChanges", &[Scaler, Vmm]),
    ("form.vmm.v1.VmmService", "MergeChanges", &[Scaler, Vmm]),
    ("form.vmm.v1.VmmService", "CopyChanges", &[Scaler]),
    // Snapshots travel node to node: a node reads another's files when the controller
    // asks it to pull them.
    ("form.vmm.v1.VmmService", "ReadSnapshot", &[Vmm]),
    ("form.vmm.v1.VmmService", "PullSnapshot", &[Scaler]),
    // form-rplb: routes and backends from the controller only.
    ("form.rplb.v1.RplbControl", "UpsertRoute", &[Scaler]),
    ("form.rplb.v1.RplbControl", "RemoveRoute", &[Scaler]),
    ("form.rplb.v1.RplbControl", "SetBackends", &[Scaler]),
    ("form.rplb.v1.RplbControl", "DrainBackend", &[Scaler]),
    (
        "form.rplb.v1.RplbControl",
        "GetStats",
        &[Scaler, Gateway, Operator],
    ),
    (
        "form.rplb.v1.RplbControl",
        "ListRoutes",
        &[Scaler, Gateway, Operator],
    ),
    // form-scaler: requests come through the gateway, or from an operator.
    (
        "form.scaler.v1.ScalerService",
        "Scale",
        &[Gateway, Operator],
    ),
    (
        "form.scaler.v1.ScalerService",
        "GetStatus",
        &[Gateway, Operator],
    ),
    (
        "form.scaler.v1.ScalerService",
        "GetOperation",
        &[Gateway, Operator],
    ),
    (
        "form.scaler.v1.ScalerService",
        "ListOperations",
        &[Gateway, Operator],
    ),
    (
        "form.scaler.v1.ScalerService",
        "SetPolicy",
        &[Gateway, Operator],
    ),
    (
        "form.scaler.v1.ScalerService",
        "CreateCluster",
        &[Gateway, Operator],
    ),
    (
        "form.scaler.v1.ScalerService",
        "DeleteCluster",
        &[Gateway, Operator],
    ),
];

/// Services every authenticated caller may use.
const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Whether `caller` may call the gRPC method at `path` (`/package.Service/Method`).
pub fn allowed(caller: Kind, path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    if OPEN_SERVICES.contains(&service) {
        return true;
    }
    TABLE
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .is_some_and(|(_, _, kinds)| kinds.contains(&caller))
}

/// The layer that enforces [`TABLE`] on a tonic server.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthzLayer;

impl<S> tower_layer::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz { inner }
    }
}

/// [`AuthzLayer`]'s service.
#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Authz<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match refusal(req.extensions().get::<Peer>(), req.uri().path()) {
            None => Box::pin(self.inner.call(req)),
            Some(status) => {
                let resp = status.into_http::<tonic::body::Body>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

/// Why a call is refused, if it is.
fn refusal(peer: Option<&Peer>, path: &str) -> Option<tonic::Status> {
    let identity = match peer {
        // A plaintext server (`--insecure-plaintext`): nobody to know.
        Some(Peer { identity: None, .. }) => return None,
        Some(Peer {
            identity: Some(i), ..
        }) => i,
        None => {
            return Some(tonic::Status::unauthenticated(
                "the connection carries no peer; the server is misconfigured",
            ));
        }
    };
    if allowed(identity.kind, path) {
        return None;
    }
    let method = path.trim_start_matches('/');
    metrics::counter!(
        "form_authz_denied_total",
        "caller" => identity.kind.as_str(),
        "method" => method.to_owned()
    )
    .increment(1);
    tracing::warn!(caller = %identity, method, "call refused by the authorization table");
    Some(tonic::Status::permission_denied(format!(
        "{identity} may not call {method}: a {} may call only what the authorization table \
         in docs/security.md gives it",
        identity.kind
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_only_methods_of_the_contracts() {
        let known = form_proto::methods();
        assert!(known.len() > 40, "{known:?}");
        for (s, m, kinds) in TABLE {
            assert!(
                known.contains(&format!("{s}/{m}")),
                "{s}/{m} is in no contract"
            );
            assert!(!kinds.is_empty(), "{s}/{m}: nobody");
        }
        for k in &known {
            assert!(
                TABLE.iter().any(|(s, m, _)| format!("{s}/{m}") == *k),
                "{k} is not in the table"
            );
        }
    }

    #[test]
    fn examples() {
        assert!(allowed(Scaler, "/form.vmm.v1.VmmService/CreateInstance"));
        assert!(!allowed(Gateway, "/form.vmm.v1.VmmService/CreateInstance"));
        assert!(!allowed(
            Operator,
            "/form.state.v1.GossipService/PushDeltas"
        ));
        assert!(!allowed(
            Vmm,
            "/form.state.v1.StateService/ControllerHeartbeat"
        ));
        assert!(allowed(Vmm, "/grpc.health.v1.Health/Check"));
        assert!(!allowed(Scaler, "/form.unknown.v1.X/Y"));
        assert!(!allowed(Scaler, "nonsense"));
    }
}
