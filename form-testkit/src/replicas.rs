//! N real form-state replicas with their keys, each gossiping with the others either
//! directly or through cuttable proxies (to partition them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use form_runtime::child::retry_while;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use tonic::transport::Channel;

use crate::net::{Proxy, free_addrs};
use crate::{ChildError, ChildService, LaunchSpec, Signal, TestDir, probe};

/// Starts of the replicas on fresh free addresses when one was taken before its bind.
const PORT_ATTEMPTS: usize = 5;
/// Time a killed replica gets to be reaped.
const STOP_KILLED: Duration = Duration::from_secs(5);

/// Creates replica `replica_id`'s node key in `data_dir`; returns its authorized-keys line.
pub fn keygen(bin: &Path, replica_id: &str, data_dir: &Path) -> String {
    let out = Command::new(bin)
        .args([
            "--print-public-key",
            "--replica-id",
            replica_id,
            "--data-dir",
        ])
        .arg(data_dir)
        .output()
        .unwrap_or_else(|e| panic!("run {} --print-public-key: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How to start the replicas.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Number of replicas.
    pub count: usize,
    /// Route every gossip link through a [`Proxy`] (for partitions).
    pub proxied: bool,
    /// Flags added to every replica.
    pub extra_args: Vec<String>,
    /// Addresses added to every replica's peers (a black hole, say).
    pub extra_peers: Vec<SocketAddr>,
}

impl ReplicaOptions {
    /// `count` replicas, linked directly, no extra flags.
    pub fn new(count: usize) -> Self {
        Self {
            count,
            proxied: false,
            extra_args: Vec::new(),
            extra_peers: Vec::new(),
        }
    }
}

/// Running replicas `state-0 .. state-{n-1}`.
#[derive(Debug)]
pub struct Replicas {
    /// Holds keys, data directories and logs.
    pub dir: TestDir,
    bin: PathBuf,
    opts: ReplicaOptions,
    /// gRPC address of each replica.
    pub addrs: Vec<SocketAddr>,
    /// `proxies[i][j]`: replica i's link to replica j, when proxied.
    pub proxies: Vec<Vec<Option<Proxy>>>,
    /// The processes (`None` while one is stopped).
    pub procs: Vec<Option<ChildService>>,
}

impl Replicas {
    /// Creates keys and starts every replica.
    pub async fn start(bin: &Path, label: &str, opts: ReplicaOptions) -> Self {
        let dir = TestDir::new(label);
        let mut keys = String::new();
        for i in 0..opts.count {
            keys.push_str(&keygen(
                bin,
                &format!("state-{i}"),
                &Self::data_dir_in(dir.path(), i),
            ));
        }
        std::fs::write(dir.path().join("authorized_keys"), keys)
            .unwrap_or_else(|e| panic!("keys: {e}"));
        let mut r = Self {
            dir,
            bin: bin.to_owned(),
            opts,
            addrs: Vec::new(),
            proxies: Vec::new(),
            procs: Vec::new(),
        };
        // Another process can take a chosen address before its replica binds it.
        retry_while(PORT_ATTEMPTS, ChildError::is_addr_in_use, async |_| {
            r.start_on_free_ports().await
        })
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
        r
    }

    /// Chooses addresses, makes the proxies and starts every replica; if one fails,
    /// stops the ones started.
    async fn start_on_free_ports(&mut self) -> Result<(), ChildError> {
        let count = self.opts.count;
        self.addrs = free_addrs(count);
        self.proxies.clear();
        for i in 0..count {
            let mut row = Vec::new();
            for (j, addr) in self.addrs.iter().enumerate() {
                row.push(if i == j || !self.opts.proxied {
                    None
                } else {
                    Some(Proxy::start(*addr).await)
                });
            }
            self.proxies.push(row);
        }
        for i in 0..count {
            match ChildService::start(self.spec(i)).await {
                Ok(p) => self.procs.push(Some(p)),
                Err(e) => {
                    for mut p in self.procs.drain(..).flatten() {
                        drop(p.stop(Signal::SIGKILL, STOP_KILLED).await);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn data_dir_in(dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("r{i}"))
    }

    /// Replaces the extra flags used by later launches.
    pub fn set_extra_args(&mut self, args: Vec<String>) {
        self.opts.extra_args = args;
    }

    /// Replica `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        Self::data_dir_in(self.dir.path(), i)
    }

    /// Where replica `i` sends its gossip.
    pub fn peers_of(&self, i: usize) -> Vec<SocketAddr> {
        (0..self.opts.count)
            .filter(|j| *j != i)
            .map(|j| {
                self.proxies[i][j]
                    .as_ref()
                    .map_or(self.addrs[j], Proxy::addr)
            })
            .chain(self.opts.extra_peers.iter().copied())
            .collect()
    }

    /// The flags of replica `i`.
    pub fn args(&self, i: usize) -> Vec<String> {
        let mut args = vec![
            "--listen".to_owned(),
            self.addrs[i].to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--replica-id".into(),
            format!("state-{i}"),
            "--data-dir".into(),
            self.data_dir(i).display().to_string(),
            "--authorized-keys".into(),
            self.dir
                .path()
                .join("authorized_keys")
                .display()
                .to_string(),
        ];
        let peers = self.peers_of(i);
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
        args.extend(self.opts.extra_args.iter().cloned());
        args
    }

    /// How replica `i` is launched.
    pub fn spec(&self, i: usize) -> LaunchSpec {
        let args = self.args(i);
        let tls = crate::pki::service_args(&self.bin, &format!("state-{i}"), &args);
        LaunchSpec::new(format!("state-{i}"), &self.bin, self.dir.path())
            .args(args.into_iter().chain(tls))
    }

    /// Starts replica `i` (again).
    pub async fn launch(&self, i: usize) -> ChildService {
        ChildService::start(self.spec(i))
            .await
            .unwrap_or_else(|e| panic!("start state-{i}: {e}"))
    }

    /// A StateService client of replica `i`.
    pub async fn client(&self, i: usize) -> StateServiceClient<Channel> {
        StateServiceClient::new(
            probe::channel(self.addrs[i])
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .max_decoding_message_size(256 * 1024 * 1024)
    }

    /// The metrics address of replica `i`.
    pub fn metrics_addr(&self, i: usize) -> SocketAddr {
        self.procs[i]
            .as_ref()
            .and_then(|p| p.addr("metrics"))
            .unwrap_or_else(|| panic!("state-{i} is not running"))
    }

    /// Cuts replica `i` off from the others, both ways (needs `proxied`).
    pub fn isolate(&self, i: usize) {
        for j in 0..self.opts.count {
            for p in [&self.proxies[i][j], &self.proxies[j][i]]
                .into_iter()
                .flatten()
            {
                p.cut();
            }
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        for p in self.proxies.iter().flatten().flatten() {
            p.heal();
        }
    }

    /// Whether every replica reports the same digest.
    pub async fn converged(&self) -> bool {
        let mut first: Option<Vec<u8>> = None;
        for i in 0..self.opts.count {
            let d = digest(&mut self.client(i).await).await;
            if d.is_empty() || first.as_ref().is_some_and(|f| *f != d) {
                return false;
            }
            first.get_or_insert(d);
        }
        true
    }

    /// Stops every replica with SIGTERM.
    pub async fn stop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            crate::conformance::stop_gracefully(p).await;
        }
    }
}

/// A replica's digest (empty when it does not answer).
pub async fn digest(client: &mut StateServiceClient<Channel>) -> Vec<u8> {
    client
        .digest(pb::DigestRequest {})
        .await
        .map(|r| r.into_inner().sha256)
        .unwrap_or_default()
}

/// The sum of the samples of `metric` (any labels) in a Prometheus text page.
pub async fn metric_sum(metrics: SocketAddr, metric: &str) -> f64 {
    let Ok((_, body)) = probe::http_get(metrics, "/metrics").await else {
        return 0.0;
    };
    sum_in(&body, metric)
}

/// The sum of the samples of `metric` (any labels) in Prometheus text `body`; 0 when
/// it has none.
pub fn sum_in(body: &str, metric: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
