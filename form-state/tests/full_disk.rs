//! A full disk (a small tmpfs): the log cannot write, so the replica turns NOT_SERVING,
//! refuses writes and reads (no read shows a change the log has not kept), and keeps
//! trying; once there is space again it serves, with every acknowledged write there.
//! Needs root (to mount the tmpfs), as CI runs.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use form_proto::state::v1 as pb;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::{TestDir, assert_eventually, probe, start};
use tonic_health::pb::health_check_response::ServingStatus;

/// A tmpfs of `size` mounted on `at`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mkdir");
        mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"], at);
        Self(at.to_owned())
    }

    fn resize(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], &self.0);
    }
}

/// Runs `mount ARGS PATH` (this test runs as root, as CI does).
fn mount(args: &[&str], path: &Path) {
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(path)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

#[tokio::test]
async fn a_full_disk_makes_the_replica_not_serving_and_it_recovers_with_every_acknowledged_write() {
    let dir = TestDir::new("full-disk");
    let disk = Tmpfs::mount(&dir.path().join("disk"), "600k");
    let data = disk.0.join("state");
    let args: Vec<&str> = PORT0_ARGS
        .iter()
        .copied()
        .chain([
            "--replica-id",
            "state-0",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ])
        .collect();
    let mut svc = start(&dir, "state", BIN, &args).await;
    let addr = svc.addr("grpc").expect("grpc");
    let mut c = pb::state_service_client::StateServiceClient::new(
        probe::channel(addr).await.expect("connect"),
    );
    // Fill the disk: each cluster carries a 12 KiB command.
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for i in 0..200 {
        let id = format!("c{i}");
        let mut w = cluster(&id);
        w.workload = Some(form_proto::types::v1::Workload {
            command: format!("{i:0>12000}"),
            ..Default::default()
        });
        match c.put_cluster(w).await {
            Ok(_) => acked.push(id),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(s.message().contains("write-ahead log"), "{}", s.message());
                refused.push(id);
                if refused.len() >= 3 {
                    break;
                }
            }
        }
    }
    assert!(!refused.is_empty(), "the disk never filled");
    assert!(acked.len() >= 5, "{} writes acknowledged", acked.len());
    // Failing: it says so, and neither writes nor reads are served.
    assert_eventually!(
        async { probe::health(addr, "").await.ok() == Some(ServingStatus::NotServing) },
        "NOT_SERVING while the log cannot write"
    );
    let s = c
        .put_cluster(cluster("while-full"))
        .await
        .expect_err("a write while full");
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    // Space returns: the replica serves again by itself, with every acknowledged write.
    disk.resize("64m");
    assert_eventually!(
        deadline = Duration::from_secs(20),
        async { probe::health(addr, "").await.ok() == Some(ServingStatus::Serving) },
        "SERVING once the log writes again"
    );
    for id in &acked {
        c.get_cluster(pb::GetClusterRequest {
            cluster_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e:?}"));
    }
    c.put_cluster(cluster("after")).await.expect("writes again");
    // ... and after a restart from that disk, they are all still there.
    form_testkit::conformance::stop_gracefully(&mut svc).await;
    let svc = start(&dir, "state-again", BIN, &args).await;
    let mut c = pb::state_service_client::StateServiceClient::new(
        probe::channel(svc.addr("grpc").expect("grpc"))
            .await
            .expect("connect"),
    );
    for id in acked.iter().chain(std::iter::once(&"after".to_owned())) {
        c.get_cluster(pb::GetClusterRequest {
            cluster_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{id} lost after a restart: {e:?}"));
    }
    drop(svc);
}
