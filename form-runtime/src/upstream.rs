//! Connections to other services. A service starts and reports SERVING even when the
//! services it talks to are not up yet: its channels connect lazily, and a watcher
//! probes each upstream's `grpc.health.v1` with exponential backoff until it answers,
//! then keeps checking it. `form_upstream_up{upstream="..."}` shows the result.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::ConfigError;
use crate::addr::HostPort;
use crate::shutdown::Shutdown;
use crate::tls::Kind;

/// First retry delay after a failed probe.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay between probes of an upstream that is down.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Delay between probes of an upstream that is up.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a request on a sticky channel may take.
pub const STICKY_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed probes in a row before a sticky channel moves to the next endpoint.
pub const STICKY_MISSES: u32 = 2;
/// Time a connection attempt or probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Upstreams for every `(name, endpoints)` pair that has endpoints; a pair without
/// any is logged and left out (the service runs without it).
pub fn from_config(specs: &[(&'static str, &[HostPort])]) -> Result<Vec<Upstream>, ConfigError> {
    let mut out = Vec::new();
    for (name, endpoints) in specs {
        if endpoints.is_empty() {
            tracing::warn!(upstream = name, "no address configured; running without it");
        } else {
            out.push(Upstream::new(name, endpoints)?);
        }
    }
    Ok(out)
}

/// A named group of endpoints of one other service, behind one balanced channel.
#[derive(Debug, Clone)]
pub struct Upstream {
    name: &'static str,
    kind: Kind,
    endpoints: Vec<HostPort>,
    channel: Channel,
    up: Arc<AtomicBool>,
}

impl Upstream {
    /// A lazily connected channel balanced over `endpoints` (none connect yet).
    /// Must be called inside a tokio runtime.
    pub fn new(name: &'static str, endpoints: &[HostPort]) -> Result<Self, ConfigError> {
        if endpoints.is_empty() {
            return Err(ConfigError::invalid(
                name,
                "no address given; expected HOST:PORT[,HOST:PORT...]",
            ));
        }
        let kind = Kind::parse(name).map_err(|e| ConfigError::invalid(name, e))?;
        let channel = crate::tls::client::channel(kind, endpoints, |e| {
            e.connect_timeout(PROBE_TIMEOUT).tcp_nodelay(true)
        })
        .map_err(|e| ConfigError::invalid(name, e))?;
        metrics::gauge!("form_upstream_up", "upstream" => name).set(0.0);
        Ok(Self {
            name,
            kind,
            endpoints: endpoints.to_vec(),
            channel,
            up: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The upstream's name, e.g. `state`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[HostPort] {
        &self.endpoints
    }

    /// A channel for gRPC clients; requests fail fast while the upstream is down.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Whether the last probe got SERVING.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Spawns the watcher that probes the upstream until `shutdown`.
    pub fn spawn_watcher(&self, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.watch(shutdown).await })
    }

    async fn watch(self, mut shutdown: Shutdown) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let ok = self.probe().await;
            let was = self.up.swap(ok, Ordering::Relaxed);
            if ok != was {
                if ok {
                    tracing::info!(upstream = self.name, endpoints = ?self.endpoints_str(), "upstream is up");
                } else {
                    tracing::warn!(upstream = self.name, endpoints = ?self.endpoints_str(), "upstream is down");
                }
            }
            metrics::gauge!("form_upstream_up", "upstream" => self.name).set(if ok {
                1.0
            } else {
                0.0
            });
            let delay = if ok {
                backoff = BACKOFF_MIN;
                CHECK_INTERVAL
            } else {
                let d = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            };
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn probe(&self) -> bool {
        serving(&self.channel).await
    }

    /// A channel that sends every request to one endpoint, and moves to the next one
    /// that answers when it stops answering: a client of a replicated store then reads
    /// its own writes (the balanced [`Upstream::channel`] may read from a replica the
    /// write has not reached yet). Must be called inside a tokio runtime.
    pub fn sticky_channel(&self) -> Channel {
        let kind = self.kind;
        let addrs = self.endpoints.clone();
        // Made again when the TLS files are renewed, so new connections present the
        // new certificate.
        let make = move || -> Vec<Endpoint> {
            addrs
                .iter()
                .filter_map(|hp| {
                    crate::tls::client::endpoint(hp, kind).ok().map(|e| {
                        e.connect_timeout(PROBE_TIMEOUT)
                            .tcp_nodelay(true)
                            // A replica that accepts but never answers must not hold a
                            // request forever.
                            .timeout(STICKY_REQUEST_TIMEOUT)
                    })
                })
                .collect()
        };
        let mut generation = crate::tls::active().map(|t| t.generation());
        let mut eps = make();
        let (channel, tx) = Channel::balance_channel::<usize>(64);
        let name = self.name;
        tokio::spawn(async move {
            let Some(first) = eps.first() else { return };
            if tx.send(Change::Insert(0, first.clone())).await.is_err() {
                return;
            }
            let mut probes: Vec<Channel> = eps.iter().map(Endpoint::connect_lazy).collect();
            let mut current = 0;
            let mut misses = 0;
            loop {
                tokio::time::sleep(CHECK_INTERVAL.min(Duration::from_millis(500))).await;
                if tx.is_closed() {
                    return;
                }
                if generation
                    .as_mut()
                    .is_some_and(|g| g.has_changed().unwrap_or(false))
                {
                    if let Some(g) = generation.as_mut() {
                        g.borrow_and_update();
                    }
                    eps = make();
                    probes = eps.iter().map(Endpoint::connect_lazy).collect();
                    if let Some(e) = eps.get(current)
                        && tx.send(Change::Insert(current, e.clone())).await.is_err()
                    {
                        return;
                    }
                }
                if serving(&probes[current]).await {
                    misses = 0;
                    continue;
                }
                // One missed probe on a loaded machine is not a dead replica: moving
                // costs read-your-writes until the next replica has caught up.
                misses += 1;
                if misses < STICKY_MISSES {
                    continue;
                }
                misses = 0;
                for k in 1..eps.len() {
                    let j = (current + k) % eps.len();
                    if serving(&probes[j]).await {
                        tracing::warn!(
                            upstream = name,
                            from = current,
                            to = j,
                            "endpoint stopped answering; requests move to the next one"
                        );
                        if tx.send(Change::Insert(j, eps[j].clone())).await.is_err()
                            || tx.send(Change::Remove(current)).await.is_err()
                        {
                            return;
                        }
                        current = j;
                        break;
                    }
                }
            }
        });
        channel
    }

    fn endpoints_str(&self) -> Vec<String> {
        self.endpoints.iter().map(ToString::to_string).collect()
    }
}

/// Whether the gRPC service of `kind` at `addr` answers its health check with SERVING.
pub async fn serving_at(addr: &HostPort, kind: Kind) -> bool {
    match crate::tls::client::endpoint(addr, kind) {
        Ok(e) => serving(&e.connect_timeout(PROBE_TIMEOUT).connect_lazy()).await,
        Err(_) => false,
    }
}

/// Whether the service behind `channel` answers its health check with SERVING.
async fn serving(channel: &Channel) -> bool {
    let mut client = HealthClient::new(channel.clone());
    let req = HealthCheckRequest {
        service: String::new(),
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, client.check(req)).await,
        Ok(Ok(resp)) if resp.get_ref().status() == ServingStatus::Serving
    )
}
