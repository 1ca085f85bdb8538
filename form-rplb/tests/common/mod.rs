//! What the balancer's tests share: the balancer binary on free ports with a control
//! client, routes made of test backends, and an HTTP/1.1 client that sets the Host.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use form_proto::rplb::v1 as pb;
use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_proto::types::v1 as types;
use form_testkit::backend::HttpBackend;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::{ChildService, TestDir, probe, start};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_form-rplb");

/// A running balancer.
pub struct Lb {
    pub dir: TestDir,
    pub svc: ChildService,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub control: RplbControlClient<Channel>,
}

impl Lb {
    /// Starts the balancer with `extra` flags.
    pub async fn start(name: &str, extra: &[&str]) -> Self {
        let dir = TestDir::new(name);
        let args: Vec<&str> = PORT0_ARGS
            .iter()
            .chain(&["--listen-http", "127.0.0.1:0"])
            .chain(extra)
            .copied()
            .collect();
        let svc = start(&dir, "rplb", Path::new(BIN), &args).await;
        let http = svc.addr("http").expect("http address");
        let grpc = svc.addr("grpc").expect("grpc address");
        let control = RplbControlClient::new(probe::channel(grpc).await.expect("control channel"));
        Self {
            dir,
            svc,
            http,
            grpc,
            control,
        }
    }

    /// Starts the balancer with a configuration file holding `toml` (read at start).
    pub async fn start_configured(name: &str, toml: &str) -> Self {
        let conf_dir = TestDir::new(&format!("{name}-conf"));
        let conf = conf_dir.path().join("rplb.toml");
        std::fs::write(&conf, toml).expect("config");
        let conf = conf.display().to_string();
        Self::start(name, &["--config", &conf]).await
    }

    /// Creates or replaces route `domain` over `backends`.
    pub async fn route(
        &mut self,
        domain: &str,
        affinity: types::affinity_method::Method,
        health: Option<pb::HealthCheckConfig>,
        backends: &[&HttpBackend],
    ) -> pb::Route {
        self.control
            .upsert_route(pb::UpsertRouteRequest {
                route: Some(pb::Route {
                    domain: domain.into(),
                    cluster_id: domain.split('.').next().unwrap_or(domain).into(),
                    affinity: Some(types::AffinityMethod {
                        method: Some(affinity),
                    }),
                    health_check: health,
                    drain: None,
                    backends: backends.iter().map(|b| backend(b)).collect(),
                }),
            })
            .await
            .expect("upsert route")
            .into_inner()
            .route
            .expect("route")
    }

    /// Replaces the backends of `domain`; removed ones leave at once.
    pub async fn set_backends(&mut self, domain: &str, backends: &[&HttpBackend]) {
        self.replace_backends(domain, backends, false).await;
    }

    /// Replaces the backends of `domain`; removed ones are drained first.
    pub async fn set_backends_draining(&mut self, domain: &str, backends: &[&HttpBackend]) {
        self.replace_backends(domain, backends, true).await;
    }

    async fn replace_backends(
        &mut self,
        domain: &str,
        backends: &[&HttpBackend],
        drain_removed: bool,
    ) {
        self.control
            .set_backends(pb::SetBackendsRequest {
                domain: domain.into(),
                backends: backends.iter().map(|b| backend(b)).collect(),
                drain_removed,
            })
            .await
            .expect("set backends");
    }

    /// Creates route `domain` (default settings) over one backend `id` at `addr` that
    /// is not a test backend (a raw server of a test).
    pub async fn route_to(&mut self, domain: &str, id: &str, addr: SocketAddr) {
        self.control
            .upsert_route(pb::UpsertRouteRequest {
                route: Some(pb::Route {
                    domain: domain.into(),
                    backends: vec![pb::Backend {
                        id: id.into(),
                        address: addr.to_string(),
                        weight: 1,
                        state: 0,
                    }],
                    ..Default::default()
                }),
            })
            .await
            .expect("route");
    }

    /// The route of `domain` as the balancer lists it.
    pub async fn listed(&mut self, domain: &str) -> pb::Route {
        self.control
            .list_routes(pb::ListRoutesRequest {})
            .await
            .expect("list routes")
            .into_inner()
            .routes
            .into_iter()
            .find(|r| r.domain == domain)
            .expect("route listed")
    }

    /// The statistics of route `domain`.
    pub async fn stats(&mut self, domain: &str) -> pb::RouteStats {
        self.control
            .get_stats(pb::GetStatsRequest {
                domain: domain.into(),
            })
            .await
            .expect("stats")
            .into_inner()
            .routes
            .into_iter()
            .next()
            .expect("the route's statistics")
    }

    /// The backend states of `domain`, by id.
    pub async fn states(&mut self, domain: &str) -> Vec<(String, pb::BackendState)> {
        self.listed(domain)
            .await
            .backends
            .into_iter()
            .map(|b| (b.id.clone(), b.state()))
            .collect()
    }
}

/// The contract's backend for a test backend (weight 1).
pub fn backend(b: &HttpBackend) -> pb::Backend {
    pb::Backend {
        id: b.id().into(),
        address: b.addr.to_string(),
        weight: 1,
        state: 0,
    }
}

/// `n` backends named `b0`, `b1`, ...
pub async fn backends(n: usize) -> Vec<HttpBackend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(HttpBackend::start(&format!("b{i}")).await);
    }
    v
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The value of the session cookie `name` set by this response.
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.split(';')
                    .next()
                    .and_then(|kv| kv.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
            })
    }
}

/// An HTTP/1.1 client with keep-alive.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    lb: SocketAddr,
}

impl Http {
    /// A client of the balancer at `lb`.
    pub fn new(lb: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            lb,
        }
    }

    /// Sends `method path` for `host` with `headers` and `body`.
    pub async fn send(
        &self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.lb))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.client.request(req.body(Full::new(body))?).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// `GET path` for `host` with `headers`.
    pub async fn get(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        self.send("GET", host, path, headers, Bytes::new()).await
    }
}

/// Cookie affinity named `FORM` for 10 minutes.
pub fn cookie() -> types::affinity_method::Method {
    types::affinity_method::Method::Cookie(types::CookieAffinity {
        name: "FORM".into(),
        ttl_seconds: 600,
    })
}

/// No affinity.
pub fn none() -> types::affinity_method::Method {
    types::affinity_method::Method::None(types::NoAffinity {})
}
