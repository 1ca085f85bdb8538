//! The in-process platform's controllers, each in a tokio runtime of its own: a crash
//! is the end of that runtime (every task of the controller stops where it is, its
//! connections break), and a restart is a new runtime with a new controller of the
//! same id, which adopts what its predecessor left unfinished.

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
use tokio::runtime::Runtime;
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
}

/// See the module documentation.
#[derive(Debug)]
pub struct Controller {
    /// The controller.
    pub shared: Arc<Shared>,
    /// Always set; taken when the controller ends.
    runtime: Option<Runtime>,
    _stop: shutdown::ShutdownHandle,
}

impl Controller {
    /// A controller reaching the platform through `net`, as `s` says; its
    /// connections are its own (`Net::partition_between` with its id cuts them).
    pub fn start(net: &Net, s: &Settings) -> anyhow::Result<Self> {
        let id = s.id.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (stop, stopped) = shutdown::channel();
        // The clients' channels spawn their workers on the runtime they are made in.
        let shared = {
            let _on = runtime.enter();
            let (dial, me) = (net.clone(), id.clone());
            let platform = form_scaler::platform::Platform::over(
                net.channel_from(&id, &s.state),
                Fleet::dialing(Dialer(Arc::new(move |a: &str| dial.channel_from(&me, a)))),
                s.balancers
                    .iter()
                    .map(|b| (b.clone(), net.channel_from(&id, b)))
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
            Arc::new(Shared::new(id.clone(), engine, 100, s.ttl))
        };
        let c = shared.clone();
        let st = stopped.clone();
        runtime.spawn(async move {
            let client = c.engine.platform.state.clone();
            c.peers
                .run(client, format!("{id}:1"), Duration::from_millis(200), st)
                .await
        });
        runtime.spawn(
            shared
                .clusters
                .clone()
                .follow(shared.engine.platform.state.clone(), stopped.clone()),
        );
        // Evaluation rounds: they adopt and resume operations (a suspended or orphaned
        // run goes on here), and decide when `act`. The instances send no heartbeats:
        // no member is judged on them.
        runtime.spawn(form_scaler::autoscale::run(
            shared.clone(),
            form_scaler::autoscale::Settings {
                interval: s.evaluate,
                heartbeat: Duration::from_secs(3600),
                act: s.act,
                replace_after: Duration::from_secs(3600),
                metric_window: Duration::from_secs(10),
            },
            stopped,
        ));
        Ok(Self {
            shared,
            runtime: Some(runtime),
            _stop: stop,
        })
    }

    /// A request, taken (and its operation run) on the controller's runtime.
    pub async fn submit(&self, cluster: &str, req: Request) -> Result<types::Operation, Status> {
        let (shared, cluster) = (self.shared.clone(), cluster.to_owned());
        self.on_runtime(async move { shared.submit(&cluster, req, false).await })
            .await
    }

    /// A cluster's creation, as [`Controller::submit`].
    pub async fn create(
        &self,
        spec: state_pb::PutClusterRequest,
        operation_id: &str,
    ) -> Result<types::Operation, Status> {
        let (shared, id) = (self.shared.clone(), operation_id.to_owned());
        self.on_runtime(async move { shared.submit_create(spec, id).await })
            .await
    }

    async fn on_runtime<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
    ) -> Result<T, Status> {
        let Some(rt) = &self.runtime else {
            return Err(Status::unavailable("the controller stopped"));
        };
        rt.spawn(f)
            .await
            .map_err(|e| Status::unavailable(format!("the controller stopped: {e}")))?
    }

    /// Ends the runtime at once (see the module documentation).
    pub fn crash(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // A runtime may not be dropped inside another; this one is left at once.
        self.end();
    }
}
