//! The in-process platform's controllers. A crash stops the controller where it is:
//! its rounds and its connections end at once, and what still runs of its operations
//! is cut off from everything (its name on the network is partitioned for good), as
//! a killed process's would be. A restart is a new controller of the same id under a
//! new name on the network (`controller-1#2`), which adopts what its predecessor left
//! unfinished. Every controller runs on the caller's runtime, so the whole platform
//! shares one clock (paused, in the seeded runs).

use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_runtime::shutdown;
use form_scaler::controller::Shared;
use form_scaler::faults::Faults;
use form_scaler::fleet::{Dialer, Fleet};
use form_scaler::ops::engine::{Engine, Limits};
use form_scaler::ops::plan::Request;
use form_testkit::memnet::Net;
use tokio::task::AbortHandle;
use tonic::Status;

/// How a controller is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Its id (kept across restarts).
    pub id: String,
    /// The form-state replica it uses.
    pub state: String,
    /// The balancers it drains and waits on.
    pub balancers: Vec<String>,
    /// Faults in its steps.
    pub faults: Faults,
    /// A controller without a heartbeat this long is dead to the others.
    pub ttl: Duration,
    /// Whether it acts on its decisions (false: its rounds only judge health and
    /// adopt operations).
    pub act: bool,
    /// Time between two evaluation rounds.
    pub evaluate: Duration,
    /// Whether members are judged by their heartbeats, as (the nodes' heartbeat
    /// interval, how long a member is unhealthy before it is replaced); none: every
    /// member is healthy to it.
    pub judge: Option<(Duration, Duration)>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Controller {
    /// The controller.
    pub shared: Arc<Shared>,
    /// The name its connections have on the network (its id, then `id#N` after the
    /// N-1th restart).
    pub name: String,
    net: Net,
    tasks: Vec<AbortHandle>,
    _stop: shutdown::ShutdownHandle,
}

impl Controller {
    /// Incarnation `n` (from 1) of the controller `s` describes, reaching the platform
    /// through `net` under its own name (`Net::partition_between` with
    /// [`Controller::name`] cuts it).
    pub fn start(net: &Net, s: &Settings, n: u32) -> anyhow::Result<Self> {
        let id = s.id.clone();
        let name = if n <= 1 {
            id.clone()
        } else {
            format!("{id}#{n}")
        };
        let (stop, stopped) = shutdown::channel();
        let (dial, me) = (net.clone(), name.clone());
        let platform = form_scaler::platform::Platform::over(
            net.channel_from(&name, &s.state),
            Fleet::dialing(Dialer(Arc::new(move |a: &str| dial.channel_from(&me, a)))),
            s.balancers
                .iter()
                .map(|b| (b.clone(), net.channel_from(&name, b)))
                .collect(),
        );
        let engine = Engine {
            platform,
            limits: Limits {
                ready_timeout: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(10),
                balancer_timeout: Duration::from_secs(5),
                poll: Duration::from_millis(10),
                operation_timeout: Duration::from_secs(60),
                node_timeout: Duration::from_secs(15),
            },
            faults: s.faults.clone(),
            taking_standby: Default::default(),
        };
        let shared = Arc::new(Shared::new(id.clone(), engine, 100, s.ttl));
        let c = shared.clone();
        let st = stopped.clone();
        let peers = tokio::spawn(async move {
            let client = c.engine.platform.state.clone();
            c.peers
                .run(client, format!("{id}:1"), Duration::from_millis(200), st)
                .await
        });
        let follow = tokio::spawn(
            shared
                .clusters
                .clone()
                .follow(shared.engine.platform.state.clone(), stopped.clone()),
        );
        // Evaluation rounds: they adopt and resume operations (a suspended or orphaned
        // run goes on here), judge members when asked to (and replace those that stay
        // unhealthy), and decide when `act`. Otherwise a heartbeat is an hour: no
        // member is judged unhealthy.
        let (heartbeat, replace_after) = s
            .judge
            .unwrap_or((Duration::from_secs(3600), Duration::from_secs(3600)));
        let rounds = tokio::spawn(form_scaler::autoscale::run(
            shared.clone(),
            form_scaler::autoscale::Settings {
                interval: s.evaluate,
                heartbeat,
                act: s.act,
                replace_after,
                metric_window: Duration::from_secs(10),
            },
            stopped,
        ));
        Ok(Self {
            shared,
            name,
            net: net.clone(),
            tasks: vec![
                peers.abort_handle(),
                follow.abort_handle(),
                rounds.abort_handle(),
            ],
            _stop: stop,
        })
    }

    /// A request, taken (and its operation started) by the controller.
    pub async fn submit(&self, cluster: &str, req: Request) -> Result<types::Operation, Status> {
        self.shared.submit(cluster, req, false).await
    }

    /// A cluster's creation, as [`Controller::submit`].
    pub async fn create(
        &self,
        spec: state_pb::PutClusterRequest,
        operation_id: &str,
    ) -> Result<types::Operation, Status> {
        self.shared
            .submit_create(spec, operation_id.to_owned())
            .await
    }

    /// Stops the controller where it is (see the module documentation).
    pub fn crash(mut self) {
        self.end();
    }

    fn end(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        // What it still runs (its operations' tasks) can reach nothing any more.
        self.net.partition(&self.name);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.end();
    }
}
