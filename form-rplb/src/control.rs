//! `RplbControl`: routes, backends, drains and statistics over gRPC. Every change
//! builds a new route view and swaps it in whole (requests in flight keep the view
//! they started with).

use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;

use form_proto::rplb::v1 as pb;
use form_proto::rplb::v1::rplb_control_server::RplbControl;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::drain;
use crate::routes::settings;
use crate::routes::{Removal, RouteView, Source};

/// The gRPC control service.
#[derive(Debug, Clone)]
pub struct Control {
    core: Arc<Core>,
}

impl Control {
    /// The service over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

/// Statistics of one route.
pub fn route_stats(route: &RouteView, now: Instant) -> pb::RouteStats {
    pb::RouteStats {
        domain: route.settings.domain.clone(),
        cluster_id: route.settings.cluster_id.clone(),
        backends: route
            .backends
            .iter()
            .map(|b| {
                let r = b.stats.read(now);
                pb::BackendStats {
                    id: b.id.clone(),
                    address: b.authority.to_string(),
                    state: b.state_pb().into(),
                    in_flight: u32::try_from(b.in_flight()).unwrap_or(u32::MAX),
                    requests_total: r.requests,
                    errors_total: r.errors,
                    latency_p50_ms: r.p50_ms,
                    latency_p99_ms: r.p99_ms,
                    pinned_sessions: b.pinned_sessions(now),
                    requests_per_second: r.rps,
                }
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl RplbControl for Control {
    async fn upsert_route(&self, req: Request<pb::UpsertRouteRequest>) -> Result<pb::RouteReply> {
        let route = req.into_inner().route.ok_or_else(|| {
            Status::invalid_argument("route: missing; expected a Route with at least a domain")
        })?;
        let s = settings::route(&route).map_err(Status::invalid_argument)?;
        let specs = settings::backends(&route.backends).map_err(Status::invalid_argument)?;
        settings::within_networks(&specs, &self.core.config.backend_networks)
            .map_err(Status::invalid_argument)?;
        let domain = s.domain.clone();
        let backends = (!specs.is_empty()).then_some(specs.as_slice());
        let (view, change) =
            self.core
                .table
                .upsert(s, backends, Source::Control, Removal::Immediate);
        self.core.apply(&domain, change);
        tracing::info!(domain, backends = view.backends.len(), "route set");
        Ok(Response::new(pb::RouteReply {
            route: Some(view.to_pb()),
        }))
    }

    async fn remove_route(
        &self,
        req: Request<pb::RemoveRouteRequest>,
    ) -> Result<pb::RemoveRouteReply> {
        let domain =
            settings::domain(&req.into_inner().domain).map_err(Status::invalid_argument)?;
        let removed = self.core.table.remove(&domain).is_some();
        if removed {
            tracing::info!(domain, "route removed");
        }
        Ok(Response::new(pb::RemoveRouteReply { removed }))
    }

    async fn set_backends(&self, req: Request<pb::SetBackendsRequest>) -> Result<pb::RouteReply> {
        let r = req.into_inner();
        let domain = settings::domain(&r.domain).map_err(Status::invalid_argument)?;
        let specs = settings::backends(&r.backends).map_err(Status::invalid_argument)?;
        settings::within_networks(&specs, &self.core.config.backend_networks)
            .map_err(Status::invalid_argument)?;
        let removal = if r.drain_removed {
            Removal::Drain
        } else {
            Removal::Immediate
        };
        let (view, change) = self
            .core
            .table
            .set_backends(&domain, &specs, removal)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no route for domain '{domain}'; create it with UpsertRoute"
                ))
            })?;
        self.core.apply(&domain, change);
        Ok(Response::new(pb::RouteReply {
            route: Some(view.to_pb()),
        }))
    }

    type DrainBackendStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::DrainProgress, Status>> + Send>>;

    async fn drain_backend(
        &self,
        req: Request<pb::DrainBackendRequest>,
    ) -> Result<Self::DrainBackendStream> {
        let fence = form_runtime::fence::Fence::of(&req)?;
        let r = req.into_inner();
        let domain = settings::domain(&r.domain).map_err(Status::invalid_argument)?;
        let (route_drain, cluster) = self
            .core
            .table
            .get(&domain)
            .map(|v| (v.settings.drain, v.settings.cluster_id.clone()))
            .ok_or_else(|| Status::not_found(format!("no route for domain '{domain}'")))?;
        self.core.fences.check(&cluster, fence.as_ref())?;
        let drain_settings = r
            .drain
            .as_ref()
            .map_or(route_drain, |d| settings::drain(Some(d)));
        let mut rx = drain::start(&self.core, &domain, &r.backend_id, drain_settings)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let stream = async_stream(move |tx| async move {
            loop {
                let p = *rx.borrow_and_update();
                let last = p.result != pb::DrainResult::Unspecified as i32;
                if tx.send(Ok(p)).await.is_err() || last {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_stats(&self, req: Request<pb::GetStatsRequest>) -> Result<pb::StatsReply> {
        let want = req.into_inner().domain;
        let now = Instant::now();
        let routes = self
            .core
            .table
            .list()
            .iter()
            .filter(|r| want.is_empty() || r.settings.domain == want.to_ascii_lowercase())
            .map(|r| route_stats(r, now))
            .collect::<Vec<_>>();
        if !want.is_empty() && routes.is_empty() {
            return Err(Status::not_found(format!("no route for domain '{want}'")));
        }
        Ok(Response::new(pb::StatsReply { routes }))
    }

    async fn list_routes(
        &self,
        _req: Request<pb::ListRoutesRequest>,
    ) -> Result<pb::ListRoutesReply> {
        Ok(Response::new(pb::ListRoutesReply {
            routes: self.core.table.list().iter().map(|r| r.to_pb()).collect(),
        }))
    }
}

/// A stream fed by a task that gets the sending half of a small channel.
fn async_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
