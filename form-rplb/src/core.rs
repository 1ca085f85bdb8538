//! What the data plane, the control plane and the background tasks share: the route
//! table, the cookie key, the trusted proxies, the health-check client, and the
//! starting of each new backend's health checks and drains. (Proxied requests use the
//! per-thread pools of `proxy::upstream`.)

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::Config;
use crate::balance::cookie::CookieSigner;
use crate::balance::health::HealthConfig;
use crate::routes::{Change, Table};
use crate::trusted::Trusted;

/// Time a health check may take to connect before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle health-check connections are kept this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// State shared by every part of the balancer.
#[derive(Debug)]
pub struct Core {
    /// Configuration.
    pub config: Config,
    /// Routes.
    pub table: Table,
    /// Session cookie key.
    pub signer: CookieSigner,
    /// Trusted proxies.
    pub trusted: Trusted,
    /// Client for active health checks (a pool of its own).
    pub check_client: Client<HttpConnector, Empty<Bytes>>,
    /// The highest fence seen per cluster, from controllers' calls and from form-state
    /// (docs/fencing.md).
    pub fences: form_runtime::fence::Fences,
}

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c
}

impl Core {
    /// The shared state for `config` with cookie key `key`.
    pub fn new(config: Config, key: [u8; 32]) -> Self {
        let passive = HealthConfig {
            passive_failures: config.passive_failures,
            cool_off: Duration::from_millis(config.cool_off_ms),
            ..HealthConfig::default()
        };
        let check_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(2)
            .build(connector());
        Self {
            trusted: Trusted::new(config.trusted_proxies.clone()),
            table: Table::new(passive),
            signer: CookieSigner::new(key),
            check_client,
            config,
            fences: Default::default(),
        }
    }

    /// Starts the tasks a route change needs: health checks of new backends, drains
    /// of backends that leave once drained.
    pub fn apply(self: &Arc<Self>, domain: &str, change: Change) {
        for b in change.added {
            tokio::spawn(crate::health_check::run(self.clone(), domain.to_owned(), b));
        }
        for b in change.to_drain {
            let settings = self
                .table
                .get(domain)
                .map(|r| r.settings.drain)
                .unwrap_or_default();
            if let Err(e) = crate::drain::start(self, domain, &b.id, settings) {
                tracing::warn!(domain, backend = %b.id, error = %e, "cannot drain a leaving backend");
            }
        }
        for b in change.removed {
            tracing::info!(domain, backend = %b.id, "backend removed");
        }
    }
}
