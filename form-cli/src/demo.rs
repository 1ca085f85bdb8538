//! The demo cluster: `formctl up` creates it (the demo app behind the balancer), and
//! `formctl demo` drives sticky clients through the balancer while it scales the
//! cluster out and back in, then says what the clients saw: whether every clone
//! carried the primary's keys, how many of the writes the clients made all along were
//! lost (none should be), and whether the session counters kept their counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Api;
use crate::scale::follow;

/// The demo cluster's id.
pub(crate) const DEMO: &str = "demo";
/// Its domain: `*.localhost` resolves to the loopback address, so
/// `curl http://demo.localhost:8080/whoami` reaches it through the balancer.
pub(crate) const DEMO_DOMAIN: &str = "demo.localhost";

/// (Re)creates the demo cluster running `bin_dir/form-demo-app`, and waits until the
/// balancer at `balancer` serves it.
pub(crate) async fn ensure(api: &Api, bin_dir: &Path, balancer: SocketAddr) -> anyhow::Result<()> {
    // An operation left by the previous run finishes (or rolls back) first.
    let patience = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let path = format!("/api/v1/clusters/{DEMO}");
        match api.call(http::Method::DELETE, &path, None, &[]).await {
            Ok(_) => break,
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => break,
            Err(e)
                if e.status() == Some(http::StatusCode::CONFLICT)
                    && tokio::time::Instant::now() < patience =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("removing the previous demo cluster"),
        }
    }
    let body = json!({
        "cluster_id": DEMO,
        "domain": DEMO_DOMAIN,
        "workload": {
            "command": bin_dir.join("form-demo-app").display().to_string(),
            "health_path": "/healthz"
        },
        "policy": {"min_instances": 1, "max_instances": 5, "target_cpu_utilization": 0.6,
                   "scale_out_cooldown_seconds": 30, "scale_in_cooldown_seconds": 60,
                   "scale_in_stabilization_seconds": 120, "warmup_seconds": 10},
        "affinity": {"method": "cookie", "name": "FORM_SESSION", "ttl_seconds": 3600}
    });
    api.post("/api/v1/clusters", &body)
        .await
        .context("creating the demo cluster")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _, _)) = get(balancer, DEMO_DOMAIN, "/healthz", None).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the demo cluster is not served by the balancer at {balancer} within 30 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` on the balancer for `host`: status, head, body.
pub(crate) async fn get(
    balancer: SocketAddr,
    host: &str,
    path: &str,
    cookie: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    request(balancer, "GET", host, path, cookie, None).await
}

async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .context("no answer within 10 s")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, head.to_owned(), body.to_owned()))
}

/// Flags of `formctl demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// The balancer's HTTP address.
    #[arg(
        long,
        value_name = "URL",
        env = "FORM_BALANCER",
        default_value = "http://127.0.0.1:8080"
    )]
    balancer: String,
    /// Instances to scale out to.
    #[arg(long, value_name = "N", default_value_t = 3)]
    to: u32,
    /// Sticky clients sending requests all along.
    #[arg(long, value_name = "N", default_value_t = 8)]
    clients: usize,
    /// Keys written to the primary before the scale-out.
    #[arg(long, value_name = "N", default_value_t = 20)]
    keys: usize,
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Seen {
    sent: u64,
    failed: u64,
    /// Per session: the instances that answered it, in order.
    sessions: BTreeMap<usize, Vec<String>>,
    /// Keys whose write was acknowledged (2xx), each written once.
    acked: Vec<String>,
    /// Per session: its cookies and the last count its counter answered.
    counts: BTreeMap<usize, (String, u64)>,
}

fn cookies_of(head: &str) -> Vec<String> {
    head.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("set-cookie")
                .then(|| v.trim().split(';').next().unwrap_or("").to_owned())
        })
        .collect()
}

async fn client(
    n: usize,
    lb: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut jar: Vec<String> = Vec::new();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        // A unique write in the session, then a visit of its counter.
        let key = format!("c{n}-{i}");
        let cookie = (!jar.is_empty()).then(|| jar.join("; "));
        let put = request(
            lb,
            "PUT",
            DEMO_DOMAIN,
            &format!("/kv/{key}"),
            cookie.as_deref(),
            Some(&key),
        )
        .await;
        let written = matches!(put, Ok((code, _, _)) if (200..300).contains(&code));
        let r = get(lb, DEMO_DOMAIN, "/session", cookie.as_deref()).await;
        let mut who = None;
        let mut count = None;
        if let Ok((200, head, body)) = &r {
            for c in cookies_of(head) {
                let name = c.split('=').next().unwrap_or("").to_owned();
                jar.retain(|j| !j.starts_with(&format!("{name}=")));
                jar.push(c);
            }
            let v = serde_json::from_str::<Value>(body).unwrap_or_default();
            who = Some(v["instance_id"].as_str().unwrap_or_default().to_owned());
            count = v["count"].as_u64();
        }
        {
            let mut s = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.sent += 2;
            if written {
                s.acked.push(key);
            } else {
                s.failed += 1;
            }
            match who {
                Some(who) => {
                    let h = s.sessions.entry(n).or_default();
                    if h.last() != Some(&who) {
                        h.push(who);
                    }
                    if let Some(c) = count {
                        s.counts.insert(n, (jar.join("; "), c));
                    }
                }
                None => s.failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Of `acked`, the keys a fresh client (no cookie) cannot read back through the
/// balancer with the value written.
async fn lost_writes(lb: SocketAddr, acked: &[String]) -> Vec<String> {
    let mut lost = Vec::new();
    for k in acked {
        match get(lb, DEMO_DOMAIN, &format!("/kv/{k}"), None).await {
            Ok((200, _, body)) if body == *k => {}
            _ => lost.push(k.clone()),
        }
    }
    lost
}

/// Of the sessions, how many count on from where they were (their last count + 1).
async fn counters_kept(lb: SocketAddr, counts: &BTreeMap<usize, (String, u64)>) -> usize {
    let mut kept = 0;
    for (jar, last) in counts.values() {
        if let Ok((200, _, body)) = get(lb, DEMO_DOMAIN, "/session", Some(jar)).await
            && serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["count"].as_u64())
                == Some(last + 1)
        {
            kept += 1;
        }
    }
    kept
}

fn balancer_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    hostport
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            hostport
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| {
            anyhow::anyhow!("--balancer '{url}' is not accepted; expected http://HOST:PORT")
        })
}

async fn scale_to(api: &Api, n: u32, drain: bool) -> anyhow::Result<()> {
    let st = api.get(&format!("/api/v1/clusters/{DEMO}/status")).await?;
    let now = st["instances"].as_u64().unwrap_or(0) as u32;
    if now == n {
        return Ok(());
    }
    let op = if n > now { "scale_out" } else { "scale_in" };
    println!("scaling {DEMO} from {now} to {n} instances ({op})");
    let accepted = api
        .post(
            &format!("/api/v1/clusters/{DEMO}/scale"),
            &json!({"operation": op, "target_count": n, "immediate": true, "drain_connections": drain}),
        )
        .await?;
    let done = follow(api, accepted["operation_id"].as_str().unwrap_or("")).await?;
    anyhow::ensure!(
        done["status"] == "completed",
        "the {op} ended {}",
        done["status"]
    );
    Ok(())
}

pub(crate) async fn run(api: &Api, a: DemoArgs) -> anyhow::Result<ExitCode> {
    let lb = balancer_addr(&a.balancer)?;
    scale_to(api, 1, true).await?;
    println!(
        "writing {} keys to the primary through the balancer",
        a.keys
    );
    for k in 0..a.keys {
        let (code, _, body) = request(
            lb,
            "PUT",
            DEMO_DOMAIN,
            &format!("/kv/key{k}"),
            None,
            Some(&format!("value{k}")),
        )
        .await?;
        anyhow::ensure!((200..300).contains(&code), "PUT /kv/key{k}: {code} {body}");
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    println!(
        "{} sticky clients send requests through the balancer all along",
        a.clients
    );
    let tasks: Vec<_> = (0..a.clients)
        .map(|n| tokio::spawn(client(n, lb, seen.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    scale_to(api, a.to, true).await?;
    let cluster = api.get(&format!("/api/v1/clusters/{DEMO}")).await?;
    let members: Vec<(String, String)> = cluster["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["instance_id"].as_str().unwrap_or("").to_owned(),
                m["addresses"][0].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let mut with_state = 0;
    for (id, addr) in &members {
        let mut all = true;
        for k in 0..a.keys {
            let ok = match addr.parse::<SocketAddr>() {
                Ok(sa) => {
                    matches!(get(sa, addr, &format!("/kv/key{k}"), None).await, Ok((200, _, ref b)) if *b == format!("value{k}"))
                }
                Err(_) => false,
            };
            all &= ok;
        }
        println!(
            "  {id}: {}",
            if all { "has every key" } else { "MISSING keys" }
        );
        with_state += usize::from(all);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    scale_to(api, 1, true).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let s = std::mem::take(
        &mut *seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let lost = lost_writes(lb, &s.acked).await;
    let counters = counters_kept(lb, &s.counts).await;
    let template = cluster["template_instance_id"].as_str().unwrap_or("");
    let survivors: Vec<&str> = vec![template];
    let kept = s
        .sessions
        .values()
        .filter(|h| h.len() == 1 || h.iter().skip(1).all(|i| survivors.contains(&i.as_str())))
        .count();
    println!("\nsummary");
    println!("  requests sent:                 {}", s.sent);
    println!("  requests failed:               {}", s.failed);
    println!(
        "  sessions kept on their instance: {kept} of {} (a session moves only when its instance is removed)",
        s.sessions.len()
    );
    println!(
        "  state on every instance:       {with_state} of {} had all {} keys",
        members.len(),
        a.keys
    );
    println!(
        "  writes acknowledged:           {} (through every instance, the whole run)",
        s.acked.len()
    );
    println!(
        "  writes lost:                   {}{}",
        lost.len(),
        if lost.is_empty() {
            String::new()
        } else {
            format!(
                " (e.g. {}; the cluster's state_sync is none, or its workload lacks the state contract?)",
                lost[0]
            )
        }
    );
    println!(
        "  session counters kept:         {counters} of {}",
        s.counts.len()
    );
    Ok(
        if s.failed == 0
            && !members.is_empty()
            && with_state == members.len()
            && kept == s.sessions.len()
            && lost.is_empty()
            && counters == s.counts.len()
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
