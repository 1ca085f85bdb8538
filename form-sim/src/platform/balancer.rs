//! The in-process platform's balancers: form-rplb's core with its control service on
//! the in-memory network, following a form-state replica's watch (the production
//! follower) for its routes. Only the data plane is left out: its routes are read
//! from the table the data plane would serve from.

use std::collections::BTreeSet;
use std::sync::Arc;

use form_proto::rplb::v1::rplb_control_server::RplbControlServer;
use form_rplb::core::Core;
use form_runtime::shutdown::Shutdown;
use form_testkit::memnet::Net;
use tonic::transport::Server;

use super::serve;

/// One balancer.
#[derive(Debug, Clone)]
pub struct Balancer {
    /// Its name on the in-memory network (`rplb-N:1`).
    pub name: String,
    /// The replica whose watch it follows.
    pub follows: String,
    /// Its routes and backends.
    pub core: Arc<Core>,
}

impl Balancer {
    /// The backends its route of `domain` has, but for those removed.
    pub fn backends(&self, domain: &str) -> BTreeSet<String> {
        self.core
            .table
            .get(domain)
            .map(|r| {
                r.backends
                    .iter()
                    .filter(|b| !b.is_removed())
                    .map(|b| b.id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Starts balancer `i` (from 1), following replica `follows`.
pub(super) fn start(
    net: &Net,
    tasks: &mut tokio::task::JoinSet<()>,
    i: usize,
    follows: &str,
    stopped: &Shutdown,
) -> Balancer {
    let name = format!("rplb-{i}:1");
    let core = Arc::new(Core::new(form_rplb::config::Config::default(), [7; 32]));
    let router = Server::builder().add_service(RplbControlServer::new(
        form_rplb::control::Control::new(core.clone()),
    ));
    serve(net, tasks, &name, router, stopped.clone());
    let (n, me, f) = (net.clone(), name.clone(), follows.to_owned());
    tasks.spawn(form_rplb::follow::run_over(
        core.clone(),
        move || n.channel_from(&me, &f),
        stopped.clone(),
    ));
    Balancer {
        name,
        follows: follows.to_owned(),
        core,
    }
}
