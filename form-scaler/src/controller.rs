//! The controller's shared state and the one place requests become operations: the
//! gRPC API and the autoscaler both call [`Shared::submit`]. It checks the request,
//! refuses a second operation on a busy cluster (naming the running one), plans the
//! operation, records it and runs it in the background. [`Shared::resume`] adopts
//! operations found unfinished in form-state (after a restart).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use tonic::Status;

use crate::decide::{Decision, History};
use crate::ops::engine::Engine;
use crate::ops::plan::{self, Request};
use crate::ops::{self, record};
use crate::peers::Peers;
use crate::victims::Candidate;

/// The latest decision of a cluster and when it was made.
#[derive(Debug, Clone)]
pub struct LastDecision {
    /// The decision.
    pub decision: Decision,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// State shared by the API, the autoscaler and running operations.
#[derive(Debug)]
pub struct Shared {
    /// This controller's id (the `owner` of its operations).
    pub id: String,
    /// Runs operations.
    pub engine: Engine,
    /// Largest `max_instances` accepted in a policy.
    pub cap: u32,
    /// Running operations: cluster id -> (operation id, kind).
    running: Mutex<HashMap<String, (String, i32)>>,
    /// The operations that ended here lately (newest last): a resume that listed one
    /// before it ended must not run it again.
    ended: Mutex<std::collections::VecDeque<String>>,
    /// Decision history per cluster.
    pub histories: Mutex<HashMap<String, History>>,
    /// Latest decision per cluster.
    pub decisions: Mutex<HashMap<String, LastDecision>>,
    /// When each instance created by a scale-out became active (warm-up).
    pub activated: Mutex<HashMap<String, u64>>,
    /// Members judged before any heartbeat of theirs, and when they were first
    /// judged so (`health::judge`).
    pub unheard: Mutex<HashMap<String, u64>>,
    /// When this controller saw each member's heartbeat stamp change (members are
    /// judged by it, not by the node's clock: `crate::arrivals`).
    pub heard: crate::arrivals::Arrivals,
    /// Metric windows of every instance (what decisions are taken on).
    pub observer: Mutex<crate::observe::Observer>,
    /// When each cluster whose history is kept was created: a cluster made again with
    /// the same id starts with no history (no cooldown, no decision window).
    created: Mutex<HashMap<String, u64>>,
    /// The other controllers, and who owns which cluster.
    pub peers: Peers,
    /// The clusters' epochs this controller holds (docs/fencing.md).
    pub epochs: crate::fencing::Epochs,
    /// The clusters, followed through form-state's watch.
    pub clusters: Arc<crate::clusters::Clusters>,
    /// How long the evaluation rounds take.
    pub rounds: crate::autoscale::Rounds,
    /// Requests one at a time per cluster, and per operation id (`keyed.rs`): from the
    /// check that nothing runs to the record and launch of the operation.
    submits: crate::keyed::Keyed,
    /// Woken whenever an operation's task here has ended (see `ending`).
    task_ended: tokio::sync::Notify,
    counter: AtomicU64,
}

/// How many ended operation ids a controller remembers (see `Shared::ended`).
const ENDED_KEPT: usize = 1024;

/// The mutex's guard, poisoned or not.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn state_err(what: &str, e: Status) -> Status {
    Status::new(e.code(), format!("{what}: {}", e.message()))
}

impl Shared {
    /// A controller named `id`.
    pub fn new(id: String, engine: Engine, cap: u32, peers_ttl: Duration) -> Self {
        Self {
            peers: Peers::new(id.clone(), peers_ttl),
            id,
            engine,
            cap,
            running: Mutex::default(),
            ended: Mutex::default(),
            histories: Mutex::default(),
            decisions: Mutex::default(),
            activated: Mutex::default(),
            unheard: Mutex::default(),
            heard: Default::default(),
            observer: Mutex::default(),
            created: Mutex::default(),
            epochs: Default::default(),
            clusters: Default::default(),
            rounds: Default::default(),
            submits: Default::default(),
            task_ended: tokio::sync::Notify::new(),
            counter: AtomicU64::new(0),
        }
    }

    /// The operations of `cluster` (all when empty) in form-state, newest first, at most
    /// `limit` (0 = all).
    pub async fn operations(
        &self,
        cluster: &str,
        limit: u32,
    ) -> Result<Vec<types::Operation>, Status> {
        self.list_operations(cluster, limit, false).await
    }

    async fn list_operations(
        &self,
        cluster: &str,
        limit: u32,
        unfinished_only: bool,
    ) -> Result<Vec<types::Operation>, Status> {
        Ok(self
            .engine
            .platform
            .state
            .clone()
            .list_operations(state_pb::ListOperationsRequest {
                cluster_id: cluster.to_owned(),
                limit,
                unfinished_only,
            })
            .await?
            .into_inner()
            .operations)
    }

    /// The running operation of `cluster`: (id, kind).
    pub fn running(&self, cluster: &str) -> Option<(String, i32)> {
        lock(&self.running).get(cluster).cloned()
    }

    /// Checks, plans, records and starts `req` on `cluster_id`. With `check_cooldown`,
    /// a scale inside its direction's cooldown is refused unless `immediate`.
    pub async fn submit(
        self: &Arc<Self>,
        cluster_id: &str,
        mut req: Request,
        check_cooldown: bool,
    ) -> Result<types::Operation, Status> {
        form_runtime::ids::check(cluster_id)
            .map_err(|e| Status::invalid_argument(format!("cluster_id {e}")))?;
        if req.operation_id.is_empty() {
            req.operation_id = self.new_operation_id(cluster_id);
        } else {
            form_runtime::ids::check(&req.operation_id)
                .map_err(|e| Status::invalid_argument(format!("operation_id {e}")))?;
        }
        self.wait_ready().await?;
        let _one_at_a_time = self.one_at_a_time(cluster_id, &req.operation_id).await;
        let mut state = self.engine.platform.state.clone();
        match state
            .get_operation(state_pb::GetOperationRequest {
                operation_id: req.operation_id.clone(),
            })
            .await
        {
            Ok(existing) => {
                let op = existing.into_inner();
                if op.cluster_id == cluster_id
                    && !op.request_digest.is_empty()
                    && op.request_digest != req.digest()
                {
                    return Err(Status::already_exists(format!(
                        "operation {} was made by another request (its kind, counts, \
                         instances or flags such as immediate and drain_connections differ); \
                         an operation id (Idempotency-Key) names one request",
                        op.operation_id
                    )));
                }
                let same_target = req.target_count == 0 || req.target_count == op.target_count;
                if op.cluster_id == cluster_id && op.kind == req.kind && same_target {
                    return Ok(op);
                }
                if op.cluster_id == cluster_id && op.kind == req.kind {
                    return Err(Status::already_exists(format!(
                        "operation {} was requested with target_count {}, not {}; an id names one request",
                        op.operation_id, op.target_count, req.target_count
                    )));
                }
                return Err(Status::already_exists(format!(
                    "operation {} exists for cluster {} ({}); an id names one request",
                    op.operation_id,
                    op.cluster_id,
                    ops::kind_name(op.kind)
                )));
            }
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(state_err("reading operations", e)),
        }
        let cluster = state
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: cluster_id.to_owned(),
            })
            .await
            .map_err(|e| state_err(&format!("cluster {cluster_id}"), e))?
            .into_inner();
        self.forget_if_recreated(&cluster);
        // A request that can never run is refused as such, before busy or cooldown.
        let candidates = self.candidates(&cluster).await;
        let owner = self.peers.owner_of(cluster_id);
        let mut op = plan::build(&req, &cluster, &candidates, &owner, record::now_ms())?;
        self.refuse_if_busy(cluster_id).await?;
        if check_cooldown && !req.immediate {
            if !lock(&self.histories).contains_key(cluster_id) {
                self.seed_history(cluster_id).await;
            }
            self.refuse_in_cooldown(&cluster, req.kind)?;
        }
        self.place(&mut op, Some(&cluster), None).await?;
        state
            .put_operation(state_pb::PutOperationRequest {
                operation: Some(op.clone()),
            })
            .await
            .map_err(|e| state_err("recording the operation", e))?;
        tracing::info!(operation = %op.operation_id, cluster = cluster_id, kind = ops::kind_name(op.kind), target = op.target_count, reason = %op.reason, owner = %owner, "operation accepted");
        if owner == self.id {
            self.launch(op.clone());
        }
        // Otherwise the cluster's owner finds it in form-state and runs it.
        Ok(op)
    }

    /// Accepts the creation of the cluster `spec` describes as an operation: checked
    /// (id, command, policy with this controller's cap, affinity), refused when the
    /// cluster exists or an operation on its id runs, recorded, and run by the owner.
    pub async fn submit_create(
        self: &Arc<Self>,
        mut spec: state_pb::PutClusterRequest,
        operation_id: String,
    ) -> Result<types::Operation, Status> {
        let id = spec.cluster_id.clone();
        form_runtime::ids::check(&id)
            .map_err(|e| Status::invalid_argument(format!("cluster.cluster_id {e}")))?;
        let operation_id = if operation_id.is_empty() {
            self.new_operation_id(&id)
        } else {
            form_runtime::ids::check(&operation_id)
                .map_err(|e| Status::invalid_argument(format!("operation_id {e}")))?;
            operation_id
        };
        if spec
            .workload
            .as_ref()
            .is_none_or(|w| w.command.trim().is_empty())
        {
            return Err(Status::invalid_argument(
                "cluster.workload.command is empty; expected the program every instance runs",
            ));
        }
        let policy = *spec
            .scaling_policy
            .get_or_insert_with(crate::policy::default_policy);
        crate::policy::validate(&policy, self.cap)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(a) = &spec.affinity {
            form_proto::check_affinity(a).map_err(Status::invalid_argument)?;
        }
        spec.template_instance_id = None;
        if spec.standby.is_some() {
            return Err(Status::invalid_argument(
                "cluster.standby is set; a standby snapshot is taken by the controller (set scaling_policy.standby_snapshot_seconds instead)",
            ));
        }
        self.wait_ready().await?;
        let _one_at_a_time = self.one_at_a_time(&id, &operation_id).await;
        let mut state = self.engine.platform.state.clone();
        let owner = self.peers.owner_of(&id);
        let mut op = plan::create_cluster(&operation_id, &spec, &owner, record::now_ms());
        match state
            .get_operation(state_pb::GetOperationRequest {
                operation_id: operation_id.clone(),
            })
            .await
        {
            Ok(existing) => {
                let existing = existing.into_inner();
                if existing.request_digest == op.request_digest {
                    return Ok(existing);
                }
                return Err(Status::already_exists(format!(
                    "operation {operation_id} was made by another request; an operation id names one request"
                )));
            }
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(state_err("reading operations", e)),
        }
        match state
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: id.clone(),
            })
            .await
        {
            Ok(_) => {
                return Err(Status::already_exists(format!(
                    "cluster {id} exists; delete it first or choose another id"
                )));
            }
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(state_err(&format!("cluster {id}"), e)),
        }
        self.refuse_if_busy(&id).await?;
        // Placed as the cluster it makes will be: its resources, its node selector.
        let made = state_pb::Cluster {
            cluster_id: id.clone(),
            resources: spec.resources,
            node_selector: spec.node_selector.clone(),
            ..Default::default()
        };
        self.place(&mut op, Some(&made), None).await?;
        state
            .put_operation(state_pb::PutOperationRequest {
                operation: Some(op.clone()),
            })
            .await
            .map_err(|e| state_err("recording the operation", e))?;
        tracing::info!(operation = %op.operation_id, cluster = %id, owner = %owner, "cluster creation accepted");
        if owner == self.id {
            self.launch(op.clone());
        }
        Ok(op)
    }

    /// Waits for the turn of a request on `cluster` with `operation` (locks taken in
    /// this order everywhere: cluster, then operation).
    async fn one_at_a_time(
        &self,
        cluster: &str,
        operation: &str,
    ) -> (crate::keyed::Held<'_>, crate::keyed::Held<'_>) {
        let c = self.submits.lock(format!("cluster/{cluster}")).await;
        let o = self.submits.lock(format!("operation/{operation}")).await;
        (c, o)
    }

    /// Waits (briefly) until the view of the other controllers has been read.
    async fn wait_ready(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.peers.ready() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(
                    "the controller cannot read the other controllers from form-state yet; retry",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Places the new instances of `op` (of `resources`, else the cluster's) on the
    /// vmm nodes, and records where its victims run: refused, naming what each node
    /// lacks, when no node can hold them.
    async fn place(
        &self,
        op: &mut types::Operation,
        cluster: Option<&state_pb::Cluster>,
        resources: Option<types::Resources>,
    ) -> Result<(), Status> {
        if op.new_instances.is_empty() && op.victims.is_empty() {
            return Ok(());
        }
        let p = &self.engine.platform;
        let nodes = p
            .fleet
            .records(&p.state, true)
            .await
            .map_err(|e| Status::unavailable(e.message))?;
        let lost_after = self.engine.limits.node_timeout.as_millis() as u64;
        let now = record::now_ms();
        ops::place::away_from_lost_source(op, cluster, &nodes, now, lost_after);
        op.placements = ops::place::placements(op, cluster, resources, &nodes, now, lost_after)
            .map_err(|s| Status::resource_exhausted(format!("cluster {}: {s}", op.cluster_id)))?;
        if !op.snapshot_node_id.is_empty() {
            op.snapshot_node_id = ops::place::standby_node(op, cluster, &nodes, now, lost_after)
                .map_err(Status::failed_precondition)?;
        }
        Ok(())
    }

    /// Whether an operation of `cluster_id` runs here or is unfinished in form-state
    /// (one another controller runs); unknown (form-state not answering) counts as busy.
    pub async fn busy(&self, cluster_id: &str) -> bool {
        self.refuse_if_busy(cluster_id).await.is_err()
    }

    async fn refuse_if_busy(&self, cluster_id: &str) -> Result<(), Status> {
        if let Some((id, kind)) = self.running(cluster_id)
            && !self.ending(cluster_id, &id).await
        {
            return Err(busy(cluster_id, &id, kind, "running"));
        }
        let listed = self
            .operations(cluster_id, 0)
            .await
            .map_err(|e| state_err("reading operations", e))?;
        if let Some(op) = listed.iter().find(|o| !ops::is_terminal(o)) {
            return Err(busy(
                cluster_id,
                &op.operation_id,
                op.kind,
                ops::status_name(op),
            ));
        }
        Ok(())
    }

    /// Whether operation `id`, still running here, has recorded its end: then its task
    /// is only doing its last bookkeeping, and this waits (up to a second) for it to
    /// finish, so a client that saw the operation completed is not told it runs. An
    /// end recorded by another controller (which adopted the operation) ends it at
    /// once: the task here is stale.
    async fn ending(&self, cluster_id: &str, id: &str) -> bool {
        let recorded = self
            .engine
            .platform
            .state
            .clone()
            .get_operation(state_pb::GetOperationRequest {
                operation_id: id.to_owned(),
            })
            .await;
        let Ok(recorded) = recorded.map(tonic::Response::into_inner) else {
            return false;
        };
        if !ops::is_terminal(&recorded) {
            return false;
        }
        // Another controller adopted it and ended it: the run here is stale (every
        // change it still tries carries an older epoch and is refused), and does not
        // hold the cluster.
        if recorded.owner != self.id {
            return true;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            // Registered before the check, so an end between the two is not missed.
            let ended = self.task_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.running(cluster_id).is_none_or(|(r, _)| r != id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }

    fn refuse_in_cooldown(&self, cluster: &state_pb::Cluster, kind: i32) -> Result<(), Status> {
        let policy = plan::policy_of(cluster);
        let h = lock(&self.histories)
            .get(&cluster.cluster_id)
            .cloned()
            .unwrap_or_default();
        let (since, secs, name) = if kind == types::OperationKind::ScaleOut as i32 {
            (
                h.last_capacity_ready_ms,
                policy.scale_out_cooldown_seconds,
                "scale_out",
            )
        } else if kind == types::OperationKind::ScaleIn as i32 {
            (
                h.last_action_ms,
                policy.scale_in_cooldown_seconds,
                "scale_in",
            )
        } else {
            return Ok(());
        };
        let now = record::now_ms();
        if let Some(t) = since {
            let end = t + u64::from(secs) * 1000;
            if now < end {
                return Err(Status::failed_precondition(format!(
                    "cluster {} is in its {name} cooldown for {} more seconds; set immediate to skip it",
                    cluster.cluster_id,
                    (end - now).div_ceil(1000)
                )));
            }
        }
        Ok(())
    }

    /// The members as a scale-in sees them, with the balancer's figures when it answers.
    async fn candidates(&self, c: &state_pb::Cluster) -> Vec<Candidate> {
        let mut load: HashMap<String, (u32, u32)> = HashMap::new();
        // Summed over the balancers: each pins its own clients.
        for (_, rplb) in &self.engine.platform.balancers {
            let mut rplb = rplb.clone();
            let Ok(stats) = crate::platform::balancer_stats(&mut rplb, &c.domain).await else {
                continue;
            };
            for b in stats.routes.iter().flat_map(|r| &r.backends) {
                let l = load.entry(b.id.clone()).or_default();
                l.0 += b.pinned_sessions;
                l.1 += b.in_flight;
            }
        }
        plan::counted_members(c)
            .into_iter()
            .map(|m| {
                let (pinned_sessions, in_flight) =
                    load.get(&m.instance_id).copied().unwrap_or((0, 0));
                Candidate {
                    instance_id: m.instance_id.clone(),
                    template: m.instance_id == c.template_instance_id,
                    healthy: plan::member_healthy(m),
                    pinned_sessions,
                    in_flight,
                    node_id: m.node_id.clone(),
                }
            })
            .collect()
    }

    fn new_operation_id(&self, cluster: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let prefix: String = cluster.chars().take(90).collect();
        format!("op-{prefix}-{:x}-{n}", record::now_ms())
    }

    /// Runs `op` in the background; the cluster counts as busy until it ends.
    fn launch(self: &Arc<Self>, op: types::Operation) {
        lock(&self.running).insert(op.cluster_id.clone(), (op.operation_id.clone(), op.kind));
        let this = self.clone();
        tokio::spawn(async move {
            let cluster = op.cluster_id.clone();
            // Every change the operation makes carries this controller's epoch.
            let platform = &this.engine.platform;
            let done = match this.epochs.hold(&this.id, &platform.state, &cluster).await {
                Ok(f) => crate::fencing::with(f, this.engine.run(op)).await,
                Err(e) => {
                    tracing::warn!(operation = %op.operation_id, error = %e, "cannot claim the cluster's fence; the operation is resumed later");
                    op
                }
            };
            if !ops::is_terminal(&done) {
                // Refused as stale, perhaps: the next run claims anew if it may.
                this.epochs.forget(&cluster);
            }
            this.finished(&done);
            // Only an end that is recorded: a suspended run (a record failed or was
            // refused as stale) is left for the next round to resume.
            if ops::is_terminal(&done) {
                let mut ended = lock(&this.ended);
                if ended.len() >= ENDED_KEPT {
                    ended.pop_front();
                }
                ended.push_back(done.operation_id.clone());
            }
            {
                // Only its own entry: a request may have started the next operation
                // after another controller ended this one (see `ending`).
                let mut running = lock(&this.running);
                if running
                    .get(&cluster)
                    .is_some_and(|(id, _)| *id == done.operation_id)
                {
                    running.remove(&cluster);
                }
            }
            this.task_ended.notify_waiters();
        });
    }

    fn finished(&self, op: &types::Operation) {
        // A cluster's creation is not a scaling action: no cooldown follows it.
        if !ops::is_terminal(op)
            || op.kind == types::OperationKind::CreateCluster as i32
            || op.kind == types::OperationKind::DeleteCluster as i32
        {
            return;
        }
        let now = record::now_ms();
        let mut h = lock(&self.histories);
        let h = h.entry(op.cluster_id.clone()).or_default();
        h.last_action_ms = Some(now);
        let completed = ops::status_name(op) == "completed";
        if completed && op.kind == types::OperationKind::ScaleOut as i32 {
            h.last_capacity_ready_ms = Some(now);
            let mut a = lock(&self.activated);
            for id in &op.new_instances {
                a.insert(id.clone(), now);
            }
        }
    }

    /// Forgets the history of `c`'s id when it belongs to an earlier cluster of that id.
    pub fn forget_if_recreated(&self, c: &state_pb::Cluster) {
        let mut created = lock(&self.created);
        if created.insert(c.cluster_id.clone(), c.created_at_ms) != Some(c.created_at_ms) {
            lock(&self.histories).remove(&c.cluster_id);
            lock(&self.decisions).remove(&c.cluster_id);
        }
    }

    /// Starts the decision history of a cluster new to this controller (after a restart
    /// or a change of owner) from its operations in form-state, so the cooldowns hold
    /// across controllers.
    pub async fn seed_history(&self, cluster_id: &str) {
        let Ok(ops) = self.operations(cluster_id, 20).await else {
            return;
        };
        let ended = |o: &&types::Operation| {
            ops::is_terminal(o)
                && o.completed_at_ms > 0
                && o.kind != types::OperationKind::CreateCluster as i32
                && o.kind != types::OperationKind::DeleteCluster as i32
        };
        let h = History {
            last_action_ms: ops.iter().filter(ended).map(|o| o.completed_at_ms).max(),
            last_capacity_ready_ms: ops
                .iter()
                .filter(ended)
                .filter(|o| {
                    o.kind == types::OperationKind::ScaleOut as i32
                        && ops::status_name(o) == "completed"
                })
                .map(|o| o.completed_at_ms)
                .max(),
            ..History::default()
        };
        lock(&self.histories)
            .entry(cluster_id.to_owned())
            .or_insert(h);
    }

    /// Adopts the unfinished operations in form-state that are not running here and
    /// are this controller's: recorded with it as owner, or left by a dead controller
    /// on a cluster this one now owns. Each is resumed (forward after its commit, back
    /// before it). An operation of a live controller stays with it, even when its
    /// cluster has moved: two controllers never run one operation.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, Status> {
        // Only the unfinished ones; each is read again under its cluster's lock, since
        // a request may have launched or ended it meanwhile.
        let listed = self.list_operations("", 0, true).await?;
        let mut adopted = 0;
        for op in listed {
            // Not while a request on its cluster is between recording its operation
            // and launching it.
            let _one_at_a_time = self
                .submits
                .lock(format!("cluster/{}", op.cluster_id))
                .await;
            if ops::is_terminal(&op)
                || self.running(&op.cluster_id).is_some()
                || lock(&self.ended).contains(&op.operation_id)
            {
                continue;
            }
            let Ok(op) = self
                .engine
                .platform
                .state
                .clone()
                .get_operation(state_pb::GetOperationRequest {
                    operation_id: op.operation_id.clone(),
                })
                .await
                .map(tonic::Response::into_inner)
            else {
                continue;
            };
            if ops::is_terminal(&op) {
                continue;
            }
            let mine = op.owner == self.id
                || (!self.peers.is_live(&op.owner) && self.peers.owns(&op.cluster_id));
            if !mine {
                continue;
            }
            tracing::warn!(controller = %self.id, owner = %op.owner, owner_live = self.peers.is_live(&op.owner), operation = %op.operation_id, cluster = %op.cluster_id, status = ops::status_name(&op), step = record::current_step(&op).unwrap_or(""), "resuming an unfinished operation");
            let op = types::Operation {
                owner: self.id.clone(),
                ..op
            };
            self.launch(op);
            adopted += 1;
        }
        Ok(adopted)
    }
}

fn busy(cluster: &str, op: &str, kind: i32, status: &str) -> Status {
    Status::aborted(format!(
        "cluster {cluster} has an operation in progress: {op} ({}, {status}); one operation runs at a time per cluster, retry when it ends",
        ops::kind_name(kind)
    ))
}
