//! Three real form-state processes whose gossip links run through cuttable proxies.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_testkit::net::{Proxy, free_addrs};
use form_testkit::{ChildService, LaunchSpec, TestDir, probe};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_form-state");

/// Creates the node key of `replica_id` in `data_dir`; returns its authorized keys line.
pub fn keygen(replica_id: &str, data_dir: &Path) -> String {
    let out = Command::new(BIN)
        .args([
            "--print-public-key",
            "--replica-id",
            replica_id,
            "--data-dir",
        ])
        .arg(data_dir)
        .output()
        .expect("run --print-public-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A replica's launch arguments.
pub fn replica_args(i: usize, listen: SocketAddr, peers: &[SocketAddr], dir: &Path) -> Vec<String> {
    let mut args = vec![
        "--listen".to_owned(),
        listen.to_string(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--replica-id".into(),
        format!("state-{i}"),
        "--data-dir".into(),
        dir.join(format!("r{i}")).display().to_string(),
        "--authorized-keys".into(),
        dir.join("authorized_keys").display().to_string(),
        "--sync-interval-ms".into(),
        "50".into(),
        "--anti-entropy-interval-ms".into(),
        "200".into(),
    ];
    if !peers.is_empty() {
        args.push("--peers".into());
        args.push(
            peers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    args
}

pub struct Trio {
    pub dir: TestDir,
    pub addrs: Vec<SocketAddr>,
    /// proxies[i][j]: replica i's link to replica j (None on the diagonal).
    pub proxies: Vec<Vec<Option<Proxy>>>,
    pub procs: Vec<Option<ChildService>>,
}

impl Trio {
    pub async fn start(label: &str) -> Self {
        let dir = TestDir::new(label);
        let mut keys = String::new();
        for i in 0..3 {
            keys.push_str(&keygen(
                &format!("state-{i}"),
                &dir.path().join(format!("r{i}")),
            ));
        }
        std::fs::write(dir.path().join("authorized_keys"), keys).expect("write keys");
        let addrs = free_addrs(3);
        let mut proxies = Vec::new();
        for i in 0..3 {
            let mut row = Vec::new();
            for (j, addr) in addrs.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(Proxy::start(*addr).await)
                });
            }
            proxies.push(row);
        }
        let mut trio = Self {
            dir,
            addrs,
            proxies,
            procs: Vec::new(),
        };
        for i in 0..3 {
            let p = trio.launch(i).await;
            trio.procs.push(Some(p));
        }
        trio
    }

    pub fn peers_of(&self, i: usize) -> Vec<SocketAddr> {
        self.proxies[i].iter().flatten().map(Proxy::addr).collect()
    }

    pub async fn launch(&self, i: usize) -> ChildService {
        let args = replica_args(i, self.addrs[i], &self.peers_of(i), self.dir.path());
        let spec = LaunchSpec::new(format!("state-{i}"), BIN, self.dir.path()).args(args);
        ChildService::start(spec)
            .await
            .unwrap_or_else(|e| panic!("start state-{i}: {e}"))
    }

    pub async fn client(&self, i: usize) -> StateServiceClient<Channel> {
        StateServiceClient::new(probe::channel(self.addrs[i]).await.expect("connect"))
    }

    /// Cuts replica `i` off from the others, both ways.
    pub fn isolate(&self, i: usize) {
        for j in 0..3 {
            if let Some(p) = &self.proxies[i][j] {
                p.cut();
            }
            if let Some(p) = &self.proxies[j][i] {
                p.cut();
            }
        }
    }

    pub fn heal(&self) {
        for p in self.proxies.iter().flatten().flatten() {
            p.heal();
        }
    }

    pub fn metrics_addr(&self, i: usize) -> SocketAddr {
        self.procs[i]
            .as_ref()
            .and_then(|p| p.addr("metrics"))
            .expect("metrics address")
    }
}

pub async fn digest(client: &mut StateServiceClient<Channel>) -> Vec<u8> {
    client
        .digest(pb::DigestRequest {})
        .await
        .map(|r| r.into_inner().sha256)
        .unwrap_or_default()
}

pub async fn digests_equal(trio: &Trio) -> bool {
    let mut ds = Vec::new();
    for i in 0..3 {
        ds.push(digest(&mut trio.client(i).await).await);
    }
    !ds[0].is_empty() && ds.iter().all(|d| *d == ds[0])
}

pub fn cluster(id: &str) -> pb::PutClusterRequest {
    pb::PutClusterRequest {
        cluster_id: id.into(),
        ..Default::default()
    }
}

pub fn member(cluster: &str, instance: &str) -> pb::AddMemberRequest {
    pb::AddMemberRequest {
        cluster_id: cluster.into(),
        member: Some(pb::Member {
            instance_id: instance.into(),
            node_id: "node-1".into(),
            addresses: vec!["127.0.0.1:9".into()],
            ..Default::default()
        }),
    }
}

pub async fn members(client: &mut StateServiceClient<Channel>, cluster: &str) -> Vec<String> {
    match client
        .get_cluster(pb::GetClusterRequest {
            cluster_id: cluster.into(),
        })
        .await
    {
        Ok(c) => {
            let mut m: Vec<String> = c.into_inner().members.into_keys().collect();
            m.sort();
            m
        }
        Err(_) => Vec::new(),
    }
}

pub fn data_dir(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("r{i}"))
}
