//! Snapshot transfer throughput between two vmm nodes (`PullSnapshot`/`ReadSnapshot`,
//! docs/transfer.md) against the link it runs over, measured in the same run: a demo
//! instance on node A holds `mib` MiB of values, is snapshotted once, and node B pulls
//! the snapshot `runs` times (deleting it between pulls). Beside each pull, the same
//! number of bytes is sent over the same link by a plain TCP writer to a plain reader:
//! that is the link's throughput. Two links: a shaped one (a relay that lets through
//! `link_mib` MiB/s, as a node's network would) and loopback as it is.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::{ChildService, TestDir, probe, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

use crate::quantile;

const VALUE_BYTES: usize = 900 * 1024;

pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    mib: usize,
    link_mib: u64,
) -> anyhow::Result<()> {
    let dir = TestDir::new("bench-transfer");
    let (mut a_svc, mut a, a_addr) = node(bin_dir, &dir, "node-a").await?;
    let (mut b_svc, mut b, _) = node(bin_dir, &dir, "node-b").await?;
    // Stopped however the measurement ends: a vmm node killed would leave its instance.
    let r = measure_both(bin_dir, runs, mib, link_mib, (&mut a, a_addr), &mut b).await;
    form_testkit::conformance::stop_gracefully(&mut b_svc).await;
    form_testkit::conformance::stop_gracefully(&mut a_svc).await;
    r
}

async fn measure_both(
    bin_dir: &Path,
    runs: usize,
    mib: usize,
    link_mib: u64,
    (a, a_addr): (&mut VmmServiceClient<Channel>, SocketAddr),
    b: &mut VmmServiceClient<Channel>,
) -> anyhow::Result<()> {
    let snap = source(bin_dir, a, mib).await?;
    let bytes: u64 = snap.files.iter().map(|f| f.size_bytes).sum();
    println!(
        "vmm-transfer: a snapshot of {:.1} MiB ({} files) pulled node to node, {runs} runs per link; the link measured with plain TCP for the same bytes in the same run",
        bytes as f64 / 1048576.0,
        snap.files.len()
    );
    println!("| link | link MiB/s p50 | transfer MiB/s p50 | transfer / link | target |");
    println!("|---|---:|---:|---:|---|");
    let shaped = Shaped::start(a_addr, link_mib * 1024 * 1024).await?;
    let (link, pull) = measure(b, &snap, shaped.addr, runs, bytes, Some(link_mib)).await?;
    row(
        &format!("shaped to {link_mib} MiB/s"),
        &link,
        &pull,
        ">= 0.80",
    );
    let (link, pull) = measure(b, &snap, a_addr, runs, bytes, None).await?;
    row("loopback, unshaped", &link, &pull, "-");
    Ok(())
}

fn row(name: &str, link: &[f64], pull: &[f64], target: &str) {
    let (l, p) = (quantile(link, 0.5), quantile(pull, 0.5));
    let ratio = p / l;
    let mark = match target {
        "-" => "",
        _ if ratio >= 0.80 => " ✓",
        _ => " ✗ missed",
    };
    println!("| {name} | {l:.0} | {p:.0} | {ratio:.2} | {target}{mark} |");
}

/// `runs` pairs of (plain TCP over the link, pull over the link), MiB/s each.
async fn measure(
    b: &mut VmmServiceClient<Channel>,
    snap: &pb::SnapshotInfo,
    from: SocketAddr,
    runs: usize,
    bytes: u64,
    shaped: Option<u64>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut link, mut pull) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        link.push(tcp_throughput(bytes, shaped).await?);
        let t = Instant::now();
        let r = b
            .pull_snapshot(pb::PullSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                from_address: from.to_string(),
                expected_files: snap.files.clone(),
                max_bytes_per_second: 0,
            })
            .await?
            .into_inner();
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            r.bytes_received >= bytes && !r.already_present,
            "pulled {} of {bytes} bytes",
            r.bytes_received
        );
        pull.push(bytes as f64 / 1048576.0 / secs);
        b.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await?;
    }
    link.sort_by(f64::total_cmp);
    pull.sort_by(f64::total_cmp);
    Ok((link, pull))
}

/// MiB/s of `bytes` written by a plain TCP writer and read by a plain reader, through a
/// relay shaped to `shaped` MiB/s when given (the same relay as the pulls').
async fn tcp_throughput(bytes: u64, shaped: Option<u64>) -> anyhow::Result<f64> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    // The writer is the listener's side, as node A is the server of a pull.
    let writer = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await?;
        let buf = vec![7u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        s.shutdown().await?;
        anyhow::Ok(())
    });
    let relay = match shaped {
        Some(mib) => Some(Shaped::start(sink_addr, mib * 1024 * 1024).await?),
        None => None,
    };
    let at = relay.as_ref().map_or(sink_addr, |r| r.addr);
    let t = Instant::now();
    let mut s = TcpStream::connect(at).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    writer.await??;
    anyhow::ensure!(got == bytes, "the link carried {got} of {bytes} bytes");
    Ok(bytes as f64 / 1048576.0 / secs)
}

/// A TCP relay to `target` that lets through at most `rate` bytes per second towards
/// the client (a token bucket refilled every millisecond), as a network link would.
struct Shaped {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shaped {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shaped {
    async fn start(target: SocketAddr, rate: u64) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    });
                    let _ = paced_copy(&mut sr, &mut cw, rate).await;
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        Ok(Self { addr, task })
    }
}

/// Copies `r` to `w` at no more than `rate` bytes per second, measured from the start.
async fn paced_copy(
    r: &mut (impl AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
    rate: u64,
) -> std::io::Result<()> {
    let start = Instant::now();
    let mut sent = 0u64;
    // Reads of at most a millisecond's worth, so the pacing is smooth.
    let mut buf = vec![0u8; (rate / 1000).clamp(1024, 256 * 1024) as usize];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

async fn node(
    bin_dir: &Path,
    dir: &TestDir,
    name: &str,
) -> anyhow::Result<(ChildService, VmmServiceClient<Channel>, SocketAddr)> {
    let data = dir.path().join(name);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--node-id",
        name,
        "--data-dir",
        data.to_str().unwrap_or(name),
    ];
    let svc = start(dir, name, bin_dir.join("form-vmm-service"), &args).await;
    let addr = svc
        .addr("grpc")
        .ok_or_else(|| anyhow::anyhow!("{name} has no gRPC address"))?;
    let client = VmmServiceClient::new(probe::channel(addr).await?);
    Ok((svc, client, addr))
}

/// A demo instance on `a` holding `mib` MiB of values, and one snapshot of it.
async fn source(
    bin_dir: &Path,
    a: &mut VmmServiceClient<Channel>,
    mib: usize,
) -> anyhow::Result<pb::SnapshotInfo> {
    let primary = a
        .create_instance(crate::demo_instance(bin_dir, "primary", None))
        .await?
        .into_inner();
    let at: SocketAddr = primary.address.parse()?;
    let values = (mib * 1024 * 1024).div_ceil(VALUE_BYTES);
    for i in 0..values {
        let v = vec![b'a' + (i % 26) as u8; VALUE_BYTES];
        let (code, body) = probe::http_request(at, "PUT", &format!("/kv/k{i}"), &v).await?;
        anyhow::ensure!(code == 204, "PUT k{i}: {code} {body}");
    }
    Ok(a.snapshot(pb::SnapshotRequest {
        instance_id: "primary".into(),
        resume: None,
    })
    .await?
    .into_inner())
}
