//! A tonic server with what every service's gRPC port carries besides its own
//! services: `grpc.health.v1.Health` (SERVING once ready, NOT_SERVING when stopping)
//! and server reflection in both `v1` and `v1alpha` (grpcurl and Python's grpcio
//! still use `v1alpha`).

use std::convert::Infallible;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::RuntimeError;
use crate::shutdown::Shutdown;

/// HTTP/2 keepalive pings, so dead peers and half-open connections are noticed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Requests one connection may have in progress at once.
pub const MAX_CONCURRENT_PER_CONNECTION: usize = 256;
/// Longest a request may take to be answered (a backstop: the platform's longest
/// calls, an operation the gateway waits for, end within 600 s by their own deadline).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

/// Name of the gRPC listener in ready files.
pub const GRPC_LISTENER: &str = "grpc";

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The gRPC server of one service, before it serves.
#[derive(Debug)]
pub struct GrpcServer {
    routes: RoutesBuilder,
    served: Vec<&'static str>,
    reporter: HealthReporter,
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcServer {
    /// A server carrying only health and reflection.
    pub fn new() -> Self {
        let (reporter, health) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health);
        Self {
            routes,
            served: Vec::new(),
            reporter,
        }
    }

    /// Adds a service; it is advertised by reflection and reported by health.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: tower_service::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(svc);
        self.served.push(S::NAME);
        self
    }

    /// The health reporter, to mark services NOT_SERVING while degraded.
    pub fn health(&self) -> HealthReporter {
        self.reporter.clone()
    }

    /// Serves on `listener` until `shutdown`; marks every service SERVING, calls
    /// `ready`, and marks them NOT_SERVING as soon as shutdown is requested, then
    /// drains connections.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        mut shutdown: Shutdown,
        ready: impl FnOnce(),
    ) -> Result<(), RuntimeError> {
        let advertised: Vec<&str> = self
            .served
            .iter()
            .copied()
            .chain([HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA])
            .collect();
        let reflection = || {
            advertised.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .include_reflection_service(false)
                    .register_encoded_file_descriptor_set(form_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                |b, name| b.with_service_name(*name),
            )
        };
        let refl_err = |e: tonic_reflection::server::Error| RuntimeError::Serve {
            name: "grpc",
            message: format!("reflection: {e}"),
        };
        self.routes
            .add_service(reflection().build_v1().map_err(refl_err)?);
        self.routes
            .add_service(reflection().build_v1alpha().map_err(refl_err)?);

        let reporter = self.reporter.clone();
        let names: Vec<&'static str> = self.served.clone();
        set_all(&reporter, &names, ServingStatus::Serving).await;
        ready();

        let signal = async move {
            shutdown.requested().await;
            set_all(&reporter, &names, ServingStatus::NotServing).await;
        };
        Server::builder()
            .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
            .max_concurrent_streams(Some(MAX_CONCURRENT_PER_CONNECTION as u32))
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .layer(crate::authz::AuthzLayer)
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(
                crate::tls::server::incoming(listener, crate::tls::mode()),
                signal,
            )
            .await
            .map_err(|e| RuntimeError::Serve {
                name: "grpc",
                message: e.to_string(),
            })
    }
}

async fn set_all(reporter: &HealthReporter, names: &[&str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Runs a gRPC service: takes the `grpc` listener, starts watching `upstreams`, serves
/// `server` and reports ready, until shutdown.
pub async fn run(
    mut ctx: crate::service::RunContext,
    server: GrpcServer,
    upstreams: &[crate::upstream::Upstream],
) -> Result<(), RuntimeError> {
    let listener = ctx.take_listener(GRPC_LISTENER)?;
    for u in upstreams {
        u.spawn_watcher(ctx.shutdown.clone());
    }
    let shutdown = ctx.shutdown.clone();
    server.serve(listener, shutdown, || ctx.ready()).await
}
