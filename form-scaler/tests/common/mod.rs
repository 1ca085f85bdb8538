//! The real platform for the controller's tests: a form-state replica, form-vmm-service
//! with the process backend running form-demo-app, form-rplb following the state, and
//! form-scaler, each a process on free ports. A demo cluster has a template instance
//! holding keys that clones must carry.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use form_proto::rplb::v1 as rplb_pb;
use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_proto::scaler::v1 as pb;
use form_proto::scaler::v1::scaler_service_client::ScalerServiceClient;
use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{ChildService, Signal, TestDir, probe, start, workspace_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_form-scaler");
pub const CLUSTER: &str = "demo";
pub const DOMAIN: &str = "demo.test";
pub const TEMPLATE: &str = "demo-0";

/// The running platform.
pub struct Stack {
    pub dir: TestDir,
    pub replicas: Replicas,
    pub vmm: ChildService,
    pub rplb: ChildService,
    pub scaler: Option<ChildService>,
    pub http: SocketAddr,
    pub state: StateServiceClient<Channel>,
    pub vmm_client: VmmServiceClient<Channel>,
    pub rplb_client: RplbControlClient<Channel>,
    scaler_args: Vec<String>,
    /// The workload's command (the demo app, on the host or in the guest).
    command: String,
    /// The replica's address, for nodes added later.
    state_addr: String,
    /// What the backend adds to a vmm node's flags.
    backend_args: Vec<String>,
    /// Nodes started by [`Stack::add_node`].
    pub nodes: Vec<ChildService>,
}

/// The flags of vmm node `id` of a stack.
fn node_args(dir: &TestDir, state: &str, id: &str, backend: &[String]) -> Vec<String> {
    let data = dir.path().join(format!("{id}-data"));
    PORT0_ARGS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(
            [
                "--node-id",
                id,
                "--state",
                state,
                "--heartbeat-interval-ms",
                "200",
                "--data-dir",
                data.to_str().expect("utf-8"),
            ]
            .map(str::to_owned),
        )
        .chain(backend.iter().cloned())
        .collect()
}

/// What runs the instances.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Processes of this build's form-demo-app.
    Process,
    /// Processes of this command (another workload).
    Command(String),
    /// VMs of this guest directory (`form_testkit::guest::build`).
    Qemu(std::path::PathBuf),
    /// Processes of form-demo-app on a node whose cgroups cannot be written (its
    /// `--cgroup-root` holds none): limits cannot be enforced there.
    ProcessWithoutCgroups,
}

impl Stack {
    /// Starts everything but the controller, and the demo cluster with its template.
    pub async fn start(label: &str) -> Self {
        Self::start_on(label, Backend::Process).await
    }

    /// [`Stack::start`] with instances run by `backend`.
    pub async fn start_on(label: &str, backend: Backend) -> Self {
        let replicas = Replicas::start(
            &workspace_bin("form-state"),
            &format!("{label}-state"),
            ReplicaOptions::new(1),
        )
        .await;
        let state_addr = replicas.addrs[0].to_string();
        let dir = TestDir::new(label);
        let no_cgroups = dir.path().join("no-cgroups");
        let mut backend_args: Vec<String> = Vec::new();
        let command = match &backend {
            Backend::Process => workspace_bin("form-demo-app").display().to_string(),
            Backend::ProcessWithoutCgroups => {
                std::fs::create_dir_all(&no_cgroups).expect("dir");
                backend_args.extend([
                    "--cgroup-root".to_owned(),
                    no_cgroups.to_str().expect("utf-8").to_owned(),
                ]);
                workspace_bin("form-demo-app").display().to_string()
            }
            Backend::Command(c) => {
                // The node runs it: it is on the allowlist.
                backend_args.extend(["--allowed-commands".to_owned(), c.clone()]);
                c.clone()
            }
            Backend::Qemu(guest) => {
                backend_args.extend(
                    [
                        "--backend",
                        "qemu",
                        "--guest-dir",
                        guest.to_str().expect("utf-8"),
                        "--ready-timeout-ms",
                        "90000",
                    ]
                    .map(str::to_owned),
                );
                "form-demo-app".to_owned()
            }
        };
        let vmm_args = node_args(&dir, &state_addr, "node-1", &backend_args);
        let vmm_args: Vec<&str> = vmm_args.iter().map(String::as_str).collect();
        let vmm = start(&dir, "vmm", workspace_bin("form-vmm-service"), &vmm_args).await;
        let replicas_addr = state_addr.clone();
        let rplb_args: Vec<&str> = PORT0_ARGS
            .iter()
            .copied()
            .chain(["--listen-http", "127.0.0.1:0", "--state", &state_addr])
            .collect();
        let rplb = start(&dir, "rplb", workspace_bin("form-rplb"), &rplb_args).await;
        let http = rplb.addr("http").expect("http");
        let state = replicas.client(0).await;
        // A VM boots (TCG, on a loaded machine) within the vmm node's ready timeout.
        let vmm_client = VmmServiceClient::new(
            probe::channel_with_timeout(vmm.addr("grpc").expect("grpc"), Duration::from_secs(120))
                .await
                .expect("vmm"),
        );
        let rplb_client = RplbControlClient::new(
            probe::channel(rplb.addr("grpc").expect("grpc"))
                .await
                .expect("rplb"),
        );
        let scaler_args = vec![
            "--state".to_owned(),
            state_addr,
            "--vmm".to_owned(),
            vmm.addr("grpc").expect("grpc").to_string(),
            "--rplb".to_owned(),
            rplb.addr("grpc").expect("grpc").to_string(),
            // The vmm node beats every 200 ms; judging by 1 s intervals keeps a loaded
            // test machine's late heartbeats from looking like dead instances.
            "--heartbeat-interval-ms".to_owned(),
            "1000".to_owned(),
        ];
        let mut s = Self {
            command,
            dir,
            replicas,
            vmm,
            rplb,
            scaler: None,
            http,
            state,
            vmm_client,
            rplb_client,
            scaler_args,
            state_addr: replicas_addr,
            backend_args,
            nodes: Vec::new(),
        };
        s.create_demo().await;
        s
    }

    /// A stack with a second node, "node-2", once both nodes have a record, and a
    /// client of it.
    pub async fn two_nodes(label: &str) -> (Self, VmmServiceClient<Channel>) {
        Self::two_nodes_with(label, &[]).await
    }

    /// [`Stack::two_nodes`] with `extra` flags for node-2.
    pub async fn two_nodes_with(label: &str, extra: &[&str]) -> (Self, VmmServiceClient<Channel>) {
        let mut stack = Self::start(label).await;
        let node2 = stack.add_node_with("node-2", extra).await;
        form_testkit::assert_eventually!(
            async {
                let nodes = stack
                    .state
                    .list_nodes(state_pb::ListNodesRequest {})
                    .await
                    .map(|r| r.into_inner().nodes)
                    .unwrap_or_default();
                nodes.len() == 2
            },
            "both nodes have a record"
        );
        (stack, node2)
    }

    /// Starts another vmm node with id `id`, on the same backend and state, and
    /// returns a client of it.
    pub async fn add_node(&mut self, id: &str) -> VmmServiceClient<Channel> {
        self.add_node_with(id, &[]).await
    }

    /// [`Stack::add_node`] with `extra` flags (`--labels zone=b`, ...).
    pub async fn add_node_with(&mut self, id: &str, extra: &[&str]) -> VmmServiceClient<Channel> {
        let mut args = node_args(&self.dir, &self.state_addr, id, &self.backend_args);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let svc = start(&self.dir, id, workspace_bin("form-vmm-service"), &args).await;
        let client = VmmServiceClient::new(
            probe::channel_with_timeout(svc.addr("grpc").expect("grpc"), Duration::from_secs(120))
                .await
                .expect("vmm"),
        );
        self.nodes.push(svc);
        client
    }

    async fn create_demo(&mut self) {
        let resources = types::Resources {
            vcpus: 1,
            memory_mib: 256,
        };
        let workload = types::Workload {
            command: self.command.clone(),
            health_path: "/healthz".into(),
            ..Default::default()
        };
        self.state
            .put_cluster(state_pb::PutClusterRequest {
                cluster_id: CLUSTER.into(),
                domain: Some(DOMAIN.into()),
                workload: Some(workload.clone()),
                scaling_policy: Some(types::ScalingPolicy {
                    min_instances: 1,
                    max_instances: 5,
                    target_cpu_utilization: 0.5,
                    scale_out_cooldown_seconds: 0,
                    scale_in_cooldown_seconds: 0,
                    ..Default::default()
                }),
                affinity: Some(types::AffinityMethod {
                    method: Some(types::affinity_method::Method::Cookie(
                        types::CookieAffinity {
                            name: "FORM_SESSION".into(),
                            ttl_seconds: 3600,
                        },
                    )),
                }),
                resources: Some(resources),
                ..Default::default()
            })
            .await
            .expect("cluster");
        let i = self
            .vmm_client
            .create_instance(vmm_pb::CreateInstanceRequest {
                instance_id: TEMPLATE.into(),
                cluster_id: CLUSTER.into(),
                workload: Some(workload),
                resources: Some(resources),
            })
            .await
            .expect("template instance")
            .into_inner();
        self.state
            .add_member(state_pb::AddMemberRequest {
                cluster_id: CLUSTER.into(),
                member: Some(state_pb::Member {
                    instance_id: TEMPLATE.into(),
                    node_id: i.node_id.clone(),
                    addresses: vec![i.address.clone()],
                    status: state_pb::MemberStatus::Active as i32,
                    ..Default::default()
                }),
            })
            .await
            .expect("member");
        self.state
            .put_cluster(state_pb::PutClusterRequest {
                cluster_id: CLUSTER.into(),
                template_instance_id: Some(TEMPLATE.into()),
                ..Default::default()
            })
            .await
            .expect("template");
        let addr: SocketAddr = i.address.parse().expect("address");
        for k in ["alpha", "beta"] {
            let (code, _) = probe::http_request(
                addr,
                "PUT",
                &format!("/kv/{k}"),
                format!("value-{k}").as_bytes(),
            )
            .await
            .expect("put key");
            assert!((200..300).contains(&code), "PUT /kv/{k}: {code}");
        }
    }

    /// Starts the controller with `extra` flags (autoscaling off unless they say).
    pub async fn start_scaler(&mut self, extra: &[&str]) -> ScalerServiceClient<Channel> {
        let mut args: Vec<&str> = PORT0_ARGS.to_vec();
        args.extend(self.scaler_args.iter().map(String::as_str));
        if !extra.contains(&"--autoscale") {
            args.extend(["--autoscale", "false"]);
        }
        args.extend(extra);
        let svc = start(&self.dir, "scaler", Path::new(BIN), &args).await;
        let client = ScalerServiceClient::new(
            probe::channel(svc.addr("grpc").expect("grpc"))
                .await
                .expect("scaler"),
        );
        self.scaler = Some(svc);
        client
    }

    /// The flags that point a controller at this platform.
    pub fn scaler_args(&self) -> &[String] {
        &self.scaler_args
    }

    /// Stops the controller with SIGTERM.
    pub async fn stop_scaler(&mut self) {
        if let Some(mut s) = self.scaler.take() {
            let _ = s.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
        }
    }

    /// Kills the controller with SIGKILL.
    pub async fn kill_scaler(&mut self) {
        if let Some(mut s) = self.scaler.take() {
            let _ = s.stop(Signal::SIGKILL, Duration::from_secs(5)).await;
        }
    }

    /// The cluster as form-state has it.
    pub async fn operations(&mut self) -> Vec<types::Operation> {
        self.state
            .list_operations(state_pb::ListOperationsRequest {
                cluster_id: CLUSTER.into(),
                limit: 0,
                unfinished_only: false,
            })
            .await
            .expect("operations")
            .into_inner()
            .operations
    }

    pub async fn cluster(&mut self) -> state_pb::Cluster {
        self.state
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: CLUSTER.into(),
            })
            .await
            .expect("cluster")
            .into_inner()
    }

    /// Kills the process of member `id` with SIGKILL (found by its port, which no other
    /// test's instance shares).
    pub async fn kill_member(&mut self, id: &str) {
        let c = self.cluster().await;
        let address = &c.members[id].addresses[0];
        let port = address.rsplit(':').next().expect("port");
        let pids = probe::pids_with_env("PORT", port);
        assert!(!pids.is_empty(), "no process of {id} on {address}");
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Member ids, sorted.
    pub async fn members(&mut self) -> Vec<String> {
        let mut v: Vec<String> = self.cluster().await.members.into_keys().collect();
        v.sort();
        v
    }

    /// Instance ids on the vmm node, sorted.
    pub async fn instances(&mut self) -> Vec<String> {
        let mut v: Vec<String> = self
            .vmm_client
            .list_instances(vmm_pb::ListInstancesRequest::default())
            .await
            .expect("instances")
            .into_inner()
            .instances
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        v.sort();
        v
    }

    /// Snapshot ids on the vmm node.
    pub async fn snapshots(&mut self) -> Vec<String> {
        self.vmm_client
            .list_snapshots(vmm_pb::ListSnapshotsRequest::default())
            .await
            .expect("snapshots")
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| s.snapshot_id)
            .collect()
    }

    /// Backend ids of the demo route on the balancer, with their states, sorted.
    pub async fn backends(&mut self) -> Vec<(String, i32)> {
        let stats = self
            .rplb_client
            .get_stats(rplb_pb::GetStatsRequest {
                domain: DOMAIN.into(),
            })
            .await
            .map(tonic::Response::into_inner)
            .unwrap_or_default();
        let mut v: Vec<(String, i32)> = stats
            .routes
            .into_iter()
            .flat_map(|r| r.backends)
            .map(|b| (b.id, b.state))
            .collect();
        v.sort();
        v
    }

    /// Waits until the balancer routes the demo cluster to its template alone.
    pub async fn routed_template(&mut self) {
        form_testkit::assert_eventually!(
            deadline = Duration::from_secs(20),
            async {
                self.backends().await
                    == vec![(TEMPLATE.to_owned(), rplb_pb::BackendState::Active as i32)]
            },
            "the balancer routes the demo cluster to its template"
        );
    }

    /// Waits until node `id` has beaten within the last 2 s, as form-state holds it
    /// (after a node was stopped longer than the node timeout, placement skips it until
    /// then).
    pub async fn wait_node_beating(&mut self, id: &str) {
        form_testkit::assert_eventually!(
            deadline = Duration::from_secs(20),
            async {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                self.state
                    .list_nodes(state_pb::ListNodesRequest {})
                    .await
                    .map(|r| r.into_inner().nodes)
                    .unwrap_or_default()
                    .iter()
                    .any(|n| n.node_id == id && now.saturating_sub(n.last_heartbeat_ms) < 2_000)
            },
            "node {id} beats again"
        );
    }

    /// Whether members, instances and balancer backends are the same set, every member
    /// is active and every backend serves, and no snapshot is left.
    pub async fn agree(&mut self) -> bool {
        let members = self.members().await;
        let instances = self.instances().await;
        let backends = self.backends().await;
        let ids: Vec<String> = backends.iter().map(|(id, _)| id.clone()).collect();
        let all_active = self
            .cluster()
            .await
            .members
            .values()
            .all(|m| m.status == state_pb::MemberStatus::Active as i32);
        let all_serving = backends
            .iter()
            .all(|(_, s)| *s == rplb_pb::BackendState::Active as i32);
        members == instances
            && members == ids
            && all_active
            && all_serving
            && self.snapshots().await.is_empty()
    }

    /// Stops every process, the vmm node last-but-one so it deletes its instances.
    pub async fn stop(&mut self) {
        if let Some(mut s) = self.scaler.take() {
            let _ = s.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
        }
        let _ = self
            .rplb
            .stop(Signal::SIGTERM, Duration::from_secs(10))
            .await;
        for n in &mut self.nodes {
            let _ = n.stop(Signal::SIGTERM, Duration::from_secs(20)).await;
        }
        let _ = self
            .vmm
            .stop(Signal::SIGTERM, Duration::from_secs(20))
            .await;
        self.replicas.stop().await;
    }
}

impl Drop for Stack {
    /// A test that panicked: stop the vmm node with SIGTERM so it deletes its
    /// instances (a SIGKILL would leave them running).
    fn drop(&mut self) {
        for node in std::iter::once(&mut self.vmm).chain(self.nodes.iter_mut()) {
            if node.signal(Signal::SIGTERM).is_ok() {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::time::Instant::now() < deadline && matches!(node.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Waits until operation `id` ends and returns it.
pub async fn wait_op(
    scaler: &mut ScalerServiceClient<Channel>,
    id: &str,
    within: Duration,
) -> types::Operation {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = scaler
            .get_operation(pb::GetOperationRequest {
                operation_id: id.into(),
            })
            .await
            .map(tonic::Response::into_inner);
        if let Ok(op) = &last
            && terminal(op)
        {
            return op.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "operation {id} not ended within {within:?}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `op` has ended.
pub fn terminal(op: &types::Operation) -> bool {
    form_proto::operation_is_terminal(op)
}

/// The status name of `op`.
pub fn status(op: &types::Operation) -> String {
    use types::operation_status::State as S;
    match op.status.as_ref().and_then(|s| s.state.as_ref()) {
        Some(S::Completed(_)) => "completed".into(),
        Some(S::Failed(f)) => format!("failed: {}", f.error),
        Some(S::RolledBack(r)) => format!("rolled_back: {}", r.reason),
        Some(S::InProgress(p)) => format!("in_progress: {}", p.step),
        _ => "requested".into(),
    }
}

/// A scale request.
pub fn scale(kind: types::OperationKind, to: u32) -> pb::ScaleRequest {
    pb::ScaleRequest {
        cluster_id: CLUSTER.into(),
        kind: kind as i32,
        target_count: to,
        drain_connections: true,
        ..Default::default()
    }
}

/// `GET path` through the balancer for the demo domain: status, body, headers.
pub async fn via_lb(
    http: SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    lb_call(http, "GET", path, cookie, b"").await
}

/// `METHOD path` with `body` through the balancer for the demo domain: status, body,
/// headers.
pub async fn lb_call(
    http: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n{cookie}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned(), head.to_owned()))
}

/// The `name=value` of the balancer's affinity cookie set in a response head.
pub fn session_cookie(head: &str) -> Option<String> {
    probe::set_cookie(head, "FORM_SESSION")
}

/// The value of key `k` on the instance at `address`.
pub async fn key_on(address: &str, k: &str) -> Option<String> {
    let addr: SocketAddr = address.parse().ok()?;
    match probe::http_get(addr, &format!("/kv/{k}")).await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// A request to create cluster `id` running this build's form-demo-app.
pub fn create_request(id: &str) -> pb::CreateClusterRequest {
    pb::CreateClusterRequest {
        operation_id: format!("create-{id}"),
        cluster: Some(state_pb::PutClusterRequest {
            cluster_id: id.into(),
            workload: Some(types::Workload {
                command: form_testkit::workspace_bin("form-demo-app")
                    .display()
                    .to_string(),
                health_path: "/healthz".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}
