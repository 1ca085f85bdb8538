//! The balancer's data plane against nginx and HAProxy (Debian's packages), side by
//! side in one run, over the same two backends (an nginx answering `ok`):
//! (a) peak requests/s with `wrk` (median of `runs` runs per proxy, interleaved);
//! (b) latency added over a direct connection at a fixed request rate, measured by an
//!     open-loop generator (a request that had to wait for the previous one counts
//!     from its scheduled time, so a stall is not hidden), median of `runs` runs'
//!     percentiles, interleaved;
//! and the proxy's CPU time per request during (a), from `/proc`, with the TCP segments
//! the machine sent per request (the network work every proxy makes its peers do).
//! With `--https`, clients speak HTTPS (TLS 1.3) to every proxy, each serving the same
//! certificate; the proxies still reach the backends in plain HTTP.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use form_proto::rplb::v1 as pb;
use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_testkit::probe::HttpsClient;
use form_testkit::{TestDir, probe, start};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::process::{Child, Command};

use crate::proc_cost::{EVENTS, SyscallCount, TICKS_PER_SECOND, cpu_ticks, tcp_segments_sent};
use crate::quantile;

const DOMAIN: &str = "bench.fog";

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// How to reach it over TLS (none: plain HTTP).
    tls: Option<HttpsClient>,
    /// Processes whose CPU time counts for this target (none for the direct one).
    pids: Vec<u32>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A peer process, stopped with SIGTERM when dropped (nginx's master then stops its
/// workers; SIGKILL would orphan them).
struct Peer(Child);

impl Peer {
    fn id(&self) -> Option<u32> {
        self.0.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn spawn(cmd: &str, args: &[&str], log: &Path) -> anyhow::Result<Peer> {
    let out = std::fs::File::create(log)?;
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .map(Peer)
        .with_context(|| {
            format!("starting {cmd} (install it: apt-get install wrk nginx-light haproxy)")
        })
}

/// A client connection's stream, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to `addr`, over TLS with `tls`.
async fn dial(addr: SocketAddr, tls: Option<&HttpsClient>) -> anyhow::Result<Box<dyn Stream>> {
    Ok(match tls {
        None => Box::new(tokio::net::TcpStream::connect(addr).await?),
        Some(c) => Box::new(c.connect(addr, &[b"http/1.1"]).await?),
    })
}

/// One `GET /` for the benchmark's domain; its status.
async fn get_status(addr: SocketAddr, tls: Option<&HttpsClient>) -> anyhow::Result<u16> {
    let io = TokioIo::new(dial(addr, tls).await?);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/")
        .header("host", DOMAIN)
        .body(Empty::<Bytes>::new())?;
    Ok(send.send_request(req).await?.status().as_u16())
}

async fn wait_http(addr: SocketAddr, tls: Option<&HttpsClient>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(200) = get_status(addr, tls).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} did not answer 200 within 10 s")
}

fn nginx_backend(dir: &Path, a: u16, b: u16) -> String {
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/backend.pid;\nerror_log {d}/backend-error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n access_log off;\n keepalive_requests 10000000;\n client_body_temp_path {d}/b-body;\n proxy_temp_path {d}/b-proxy;\n fastcgi_temp_path {d}/b-fcgi;\n uwsgi_temp_path {d}/b-uwsgi;\n scgi_temp_path {d}/b-scgi;\n\
         server {{ listen 127.0.0.1:{a}; location / {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{b}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
        d = dir.display()
    )
}

fn nginx_proxy(dir: &Path, port: u16, a: u16, b: u16, https: bool) -> String {
    let listen = if https {
        format!(
            "listen 127.0.0.1:{port} ssl; ssl_certificate {c}; ssl_certificate_key {k}; ssl_protocols TLSv1.3;",
            c = dir.join("certs/default.crt").display(),
            k = dir.join("certs/default.key").display()
        )
    } else {
        format!("listen 127.0.0.1:{port};")
    };
    format!(
        "worker_processes 2;\ndaemon off;\npid {d}/proxy.pid;\nerror_log {d}/proxy-error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n access_log off;\n keepalive_requests 10000000;\n client_body_temp_path {d}/p-body;\n proxy_temp_path {d}/p-proxy;\n fastcgi_temp_path {d}/p-fcgi;\n uwsgi_temp_path {d}/p-uwsgi;\n scgi_temp_path {d}/p-scgi;\n\
         upstream be {{ server 127.0.0.1:{a}; server 127.0.0.1:{b}; keepalive 256; }}\n\
         server {{ {listen} location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; }} }}\n}}\n",
        d = dir.display()
    )
}

fn haproxy(port: u16, a: u16, b: u16, pem: Option<&Path>) -> String {
    let tls = pem
        .map(|p| format!(" ssl crt {} ssl-min-ver TLSv1.3", p.display()))
        .unwrap_or_default();
    format!(
        "global\n  nbthread 2\n  maxconn 4000\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\
         frontend f\n  bind 127.0.0.1:{port}{tls}\n  default_backend b\n\
         backend b\n  balance roundrobin\n  server a 127.0.0.1:{a}\n  server b 127.0.0.1:{b}\n"
    )
}

/// Requests/s of one `wrk` run, refusing runs with errors.
async fn wrk(
    addr: SocketAddr,
    https: bool,
    seconds: u64,
    connections: usize,
) -> anyhow::Result<f64> {
    let scheme = if https { "https" } else { "http" };
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-H",
            &format!("Host: {DOMAIN}"),
            &format!("{scheme}://{addr}/"),
        ])
        .output()
        .await
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk against {addr} saw errors:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))
}

/// Latencies (ms) at a fixed `rate` over `conns` keep-alive connections, each
/// counted from its scheduled send time.
async fn fixed_rate(
    addr: SocketAddr,
    tls: Option<&HttpsClient>,
    rate: u64,
    conns: usize,
    seconds: u64,
) -> anyhow::Result<Vec<f64>> {
    let per_conn = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let tls = tls.cloned();
        tasks.spawn(async move {
            let io = TokioIo::new(dial(addr, tls.as_ref()).await?);
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let mut out = Vec::new();
            let mut at = start + per_conn.mul_f64(c as f64 / conns as f64);
            let mut prev_end = start;
            while at < end {
                tokio::time::sleep_until(at.into()).await;
                // Latency counts from the scheduled time when this connection was still
                // busy with the previous request then (a stall is not hidden); otherwise
                // from when the timer woke (timer lateness is not the proxy's).
                let from = if prev_end > at { at } else { Instant::now() };
                let req = http::Request::builder()
                    .uri("/")
                    .header("host", DOMAIN)
                    .body(Empty::<Bytes>::new())?;
                send.ready().await?;
                let resp = send.send_request(req).await?;
                if resp.status() != 200 {
                    bail!("status {}", resp.status());
                }
                resp.into_body().collect().await?;
                prev_end = Instant::now();
                out.push(prev_end.duration_since(from).as_secs_f64() * 1000.0);
                at += per_conn;
            }
            anyhow::Ok(out)
        });
    }
    let mut all = Vec::new();
    for r in tasks.join_all().await {
        all.extend(r?);
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

/// Runs the comparison.
pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    seconds: u64,
    rate: u64,
    syscalls: bool,
    https: bool,
) -> anyhow::Result<()> {
    let dir = TestDir::new("rplb-http");
    let d = dir.path();
    let (a, b, np) = (free_port()?, free_port()?, free_port()?);
    let hp = free_port()?;
    // One certificate for the benchmark's domain, served by every proxy.
    let client = if https {
        let ca =
            form_runtime::tls::pki::Ca::generate("form-bench CA").map_err(anyhow::Error::msg)?;
        let pair = ca
            .issue_domains(&[DOMAIN.to_owned()], Duration::from_secs(24 * 3600))
            .map_err(anyhow::Error::msg)?;
        pair.write_pair(&d.join("certs"), "default")
            .map_err(anyhow::Error::msg)?;
        std::fs::write(
            d.join("haproxy.pem"),
            format!("{}{}", pair.cert_pem, pair.key_pem),
        )?;
        Some(HttpsClient {
            ca_pem: ca.cert_pem.clone(),
            sni: DOMAIN.to_owned(),
        })
    } else {
        None
    };
    let pem = d.join("haproxy.pem");
    std::fs::write(d.join("backend.conf"), nginx_backend(d, a, b))?;
    std::fs::write(d.join("proxy.conf"), nginx_proxy(d, np, a, b, https))?;
    std::fs::write(
        d.join("haproxy.cfg"),
        haproxy(hp, a, b, https.then_some(pem.as_path())),
    )?;
    let certs = d.join("certs").display().to_string();
    let mut rplb_args = vec![
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--listen-http",
        "127.0.0.1:0",
        "--log",
        "warn",
    ];
    if https {
        rplb_args.extend(["--listen-https", "127.0.0.1:0", "--https-certs", &certs]);
    }
    let conf = |n: &str| d.join(n).display().to_string();
    let _backend = spawn(
        "nginx",
        &["-p", &d.display().to_string(), "-c", &conf("backend.conf")],
        &d.join("backend.log"),
    )?;
    let nginx = spawn(
        "nginx",
        &["-p", &d.display().to_string(), "-c", &conf("proxy.conf")],
        &d.join("nginx.log"),
    )?;
    let ha = spawn(
        "haproxy",
        &["-db", "-f", &conf("haproxy.cfg")],
        &d.join("haproxy.log"),
    )?;
    let mut rplb = start(&dir, "rplb", bin_dir.join("form-rplb"), &rplb_args).await;
    let listener = if https { "https" } else { "http" };
    let rplb_http = rplb.addr(listener).context("rplb data plane address")?;
    let mut control =
        RplbControlClient::new(probe::channel(rplb.addr("grpc").context("grpc")?).await?);
    let backend = |id: &str, port: u16| pb::Backend {
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        weight: 1,
        state: 0,
    };
    control
        .upsert_route(pb::UpsertRouteRequest {
            route: Some(pb::Route {
                domain: DOMAIN.into(),
                cluster_id: "bench".into(),
                backends: vec![backend("a", a), backend("b", b)],
                ..Default::default()
            }),
        })
        .await?;
    let loopback = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let targets = [
        Target {
            name: "direct (one backend)",
            addr: loopback(a),
            tls: None,
            pids: vec![],
        },
        Target {
            name: "form-rplb",
            addr: rplb_http,
            tls: client.clone(),
            pids: vec![rplb.info().pid],
        },
        Target {
            name: "nginx",
            addr: loopback(np),
            tls: client.clone(),
            pids: nginx.id().into_iter().collect(),
        },
        Target {
            name: "HAProxy",
            addr: loopback(hp),
            tls: client.clone(),
            pids: ha.id().into_iter().collect(),
        },
    ];
    for t in &targets {
        wait_http(t.addr, t.tls.as_ref())
            .await
            .with_context(|| t.name)?;
    }
    eprintln!("warming up");
    for t in &targets {
        wrk(t.addr, t.tls.is_some(), 2, 64).await?;
    }
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut cpu_us: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut kernel_us: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut calls: Vec<Option<f64>> = vec![None; targets.len()];
    let mut segments: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for run in 0..runs {
        for (i, t) in targets.iter().enumerate() {
            let counting = if syscalls && run == 0 && !t.pids.is_empty() {
                Some(SyscallCount::start(&t.pids, d, &t.name.replace(' ', "-")).await?)
            } else {
                None
            };
            let before = cpu_ticks(&t.pids);
            let sent = tcp_segments_sent();
            let v = wrk(t.addr, t.tls.is_some(), seconds, 64).await?;
            let used = cpu_ticks(&t.pids).since(before);
            segments[i]
                .push(tcp_segments_sent().saturating_sub(sent) as f64 / (v * seconds as f64));
            let us_per_request =
                |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / (v * seconds as f64);
            let per_request = us_per_request(used.total());
            if let Some(c) = counting {
                let counts = c.finish().await?;
                let requests = v * seconds as f64;
                let (sched, calls_by_name): (Vec<_>, Vec<_>) = counts
                    .iter()
                    .partition(|(name, _)| EVENTS.contains(&name.as_str()));
                let total: u64 = calls_by_name.iter().map(|(_, n)| n).sum();
                let per = |list: &[&(String, u64)], n: usize| {
                    list.iter()
                        .take(n)
                        .map(|(name, c)| format!("{name} {:.2}", *c as f64 / requests))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                eprintln!(
                    "{:<22} {:.2} system calls per request: {}; {}",
                    t.name,
                    total as f64 / requests,
                    per(&calls_by_name, 8),
                    per(&sched, 2)
                );
                calls[i] = Some(total as f64 / requests);
            }
            eprintln!(
                "run {}/{runs} {:<22} {v:>10.0} req/s, {per_request:.1} us CPU per request ({:.1} in the kernel)",
                run + 1,
                t.name,
                us_per_request(used.system)
            );
            rps[i].push(v);
            cpu_us[i].push(per_request);
            kernel_us[i].push(us_per_request(used.system));
        }
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        quantile(&s, 0.5)
    };
    // One run's p99 is its 1% slowest requests, which one stall of the machine decides:
    // the runs are interleaved like wrk's and the medians of their percentiles count.
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for run in 0..runs {
        for (i, t) in targets.iter().enumerate() {
            let l = fixed_rate(t.addr, t.tls.as_ref(), rate, 50, seconds)
                .await
                .with_context(|| t.name)?;
            let (p50, p99) = (quantile(&l, 0.5), quantile(&l, 0.99));
            eprintln!(
                "latency {}/{runs} {:<22} {} requests at {rate}/s: p50 {p50:.3} ms, p99 {p99:.3} ms",
                run + 1,
                t.name,
                l.len()
            );
            p50s[i].push(p50);
            p99s[i].push(p99);
        }
    }
    let lat: Vec<(f64, f64)> = (0..targets.len())
        .map(|i| (median(&p50s[i]), median(&p99s[i])))
        .collect();
    println!(
        "\nrplb-http{}: wrk -t2 -c64 -d{seconds}s, median of {runs} runs; latency at {rate} req/s over 50 connections, {seconds} s, median of {runs} runs' percentiles",
        if https {
            " (HTTPS, TLS 1.3, to every proxy)"
        } else {
            ""
        }
    );
    println!(
        "| target | req/s (median) | runs | proxy CPU us/request | of it in the kernel | syscalls/request | TCP segments/request | p50 ms | p99 ms | added p50 us | added p99 us |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let (d50, d99) = lat[0];
    for (i, t) in targets.iter().enumerate() {
        let runs_s: Vec<String> = rps[i].iter().map(|v| format!("{v:.0}")).collect();
        let (p50, p99) = lat[i];
        let added = |v: f64, base: f64| {
            if i == 0 {
                "-".to_owned()
            } else {
                format!("{:.0}", (v - base) * 1000.0)
            }
        };
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.2} | {p50:.3} | {p99:.3} | {} | {} |",
            t.name,
            median(&rps[i]),
            runs_s.join(" "),
            if i == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&cpu_us[i]))
            },
            if i == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&kernel_us[i]))
            },
            calls[i].map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
            median(&segments[i]),
            added(p50, d50),
            added(p99, d99)
        );
    }
    let (ours, nginx, ha) = (median(&rps[1]), median(&rps[2]), median(&rps[3]));
    let (our99, nginx99) = (lat[1].1 - d99, lat[2].1 - d99);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    // The cores are shared by wrk, the backends and the proxy: the CPU of one request
    // through form-rplb is cores / rate, of which the proxy took its measured share.
    // With no user-space CPU at all, only its kernel share would be left.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let others = cores * 1e6 / ours - median(&cpu_us[1]);
    let ceiling = cores * 1e6 / (others + median(&kernel_us[1]));
    println!("\ntargets:");
    println!(
        "- throughput >= nginx: {:.0} vs {:.0} ({:.2}x): {}",
        ours,
        nginx,
        ours / nginx,
        verdict(ours >= nginx)
    );
    println!(
        "- throughput >= 1.2x HAProxy: {:.0} vs {:.0} ({:.2}x): {}",
        ours,
        ha,
        ours / ha,
        verdict(ours >= 1.2 * ha)
    );
    println!(
        "- p99 added latency <= nginx's: {:.0} us vs {:.0} us: {}",
        our99 * 1000.0,
        nginx99 * 1000.0,
        verdict(our99 <= nginx99)
    );
    println!(
        "- form-rplb's ceiling here with no user-space CPU, its kernel share alone: {ceiling:.0} req/s ({:.2}x nginx, {:.2}x HAProxy)",
        ceiling / nginx,
        ceiling / ha
    );
    form_testkit::conformance::stop_gracefully(&mut rplb).await;
    Ok(())
}
