//! Each affinity method through real sockets: cookie sessions stay on their backend
//! while others come and go, a forged cookie does not pin, and client-IP and header
//! hashing are stable, spread within 15% of even at 10 backends and move only the keys
//! of a removed backend.

mod common;

use std::collections::BTreeMap;

use common::{Http, Lb, backends, cookie};
use form_proto::types::v1 as types;
use form_testkit::backend::HttpBackend;
use form_testkit::conformance::stop_gracefully;

/// Which backend answers each key (sent as `header: key`), 16 requests at a time.
async fn owners(http: &Http, host: &str, header: &'static str, keys: &[String]) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    let chunk = keys.len().div_ceil(16);
    for (i, part) in keys.chunks(chunk).enumerate() {
        let (http, host, part) = (http.clone(), host.to_owned(), part.to_vec());
        set.spawn(async move {
            let mut out = Vec::new();
            for k in part {
                let r = http
                    .get(&host, "/whoami", &[(header, k.as_str())])
                    .await
                    .expect("request");
                assert_eq!(r.status, 200, "{}", r.body);
                out.push(r.body);
            }
            (i, out)
        });
    }
    let mut parts = set.join_all().await;
    parts.sort_by_key(|(i, _)| *i);
    parts.into_iter().flat_map(|(_, v)| v).collect()
}

fn assert_spread(owners: &[String], backends: usize) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in owners {
        *counts.entry(o).or_default() += 1;
    }
    assert_eq!(counts.len(), backends, "{counts:?}");
    let even = owners.len() as f64 / backends as f64;
    for (b, n) in &counts {
        let off = (*n as f64 - even).abs() / even;
        assert!(
            off <= 0.15,
            "{b} got {n} keys, {:.1}% off even: {counts:?}",
            off * 100.0
        );
    }
}

/// Stable, spread, and after removing `b3` only its keys moved.
async fn hashing_holds(
    lb: &mut Lb,
    domain: &str,
    header: &'static str,
    keys: &[String],
    bs: &[HttpBackend],
) {
    let http = Http::new(lb.http);
    let first = owners(&http, domain, header, keys).await;
    assert_spread(&first, bs.len());
    let again = owners(&http, domain, header, keys).await;
    assert_eq!(first, again, "the same key goes to the same backend");
    let rest: Vec<&HttpBackend> = bs.iter().filter(|b| b.id() != "b3").collect();
    lb.set_backends(domain, &rest).await;
    let after = owners(&http, domain, header, keys).await;
    let mut moved = 0;
    for ((k, a), b) in keys.iter().zip(&first).zip(&after) {
        if a == "b3" {
            assert_ne!(b, "b3");
            moved += 1;
        } else {
            assert_eq!(a, b, "key {k} moved from {a}, which stayed");
        }
    }
    assert!(moved > 0);
}

const KEYS: usize = 10_000;

#[tokio::test]
async fn client_ip_affinity_is_stable_spread_and_moves_only_a_removed_backends_keys() {
    // The test client is the trusted proxy; each key is a client address behind it.
    let mut lb = Lb::start("client-ip", &["--trusted-proxies", "127.0.0.1/32"]).await;
    let bs = backends(10).await;
    let refs: Vec<&HttpBackend> = bs.iter().collect();
    lb.route(
        "ip.fog",
        types::affinity_method::Method::ClientIp(types::ClientIpAffinity {}),
        None,
        &refs,
    )
    .await;
    let keys: Vec<String> = (0..KEYS as u32)
        .map(|k| std::net::Ipv4Addr::from(0x0a00_0000 + k * 7).to_string())
        .collect();
    hashing_holds(&mut lb, "ip.fog", "x-forwarded-for", &keys, &bs).await;
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn header_hash_affinity_is_stable_spread_and_moves_only_a_removed_backends_keys() {
    let mut lb = Lb::start("hash", &[]).await;
    let bs = backends(10).await;
    let refs: Vec<&HttpBackend> = bs.iter().collect();
    lb.route(
        "hash.fog",
        types::affinity_method::Method::ConsistentHashing(types::ConsistentHashAffinity {
            parameter: "x-user".into(),
        }),
        None,
        &refs,
    )
    .await;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("user-{k}")).collect();
    hashing_holds(&mut lb, "hash.fog", "x-user", &keys, &bs).await;
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn client_addresses_from_untrusted_peers_are_not_believed() {
    let mut lb = Lb::start("untrusted", &[]).await;
    let bs = backends(10).await;
    let refs: Vec<&HttpBackend> = bs.iter().collect();
    lb.route(
        "ip.fog",
        types::affinity_method::Method::ClientIp(types::ClientIpAffinity {}),
        None,
        &refs,
    )
    .await;
    let keys: Vec<String> = (0..200u32)
        .map(|k| std::net::Ipv4Addr::from(0x0a00_0000 + k).to_string())
        .collect();
    let got = owners(&Http::new(lb.http), "ip.fog", "x-forwarded-for", &keys).await;
    assert!(
        got.iter().all(|o| *o == got[0]),
        "every request is the peer's own: {got:?}"
    );
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn cookie_sessions_stay_while_backends_come_and_go_and_forgeries_do_not_pin() {
    let mut lb = Lb::start("cookie", &[]).await;
    let bs = backends(5).await;
    lb.route("demo.fog", cookie(), None, &[&bs[0], &bs[1], &bs[2]])
        .await;
    let http = Http::new(lb.http);
    // 30 sessions start; each gets a cookie naming the backend that answered.
    let mut sessions = Vec::new();
    for _ in 0..30 {
        let r = http.get("demo.fog", "/whoami", &[]).await.expect("request");
        let c = r.set_cookie("FORM").expect("a new session gets a cookie");
        assert!(
            c.starts_with(&format!("{}~", r.body)),
            "cookie {c} names {}",
            r.body
        );
        sessions.push((c, r.body));
    }
    let on = |id: &str| sessions.iter().filter(|(_, b)| b == id).count();
    assert!(on("b0") > 0 && on("b1") > 0 && on("b2") > 0, "{sessions:?}");

    // Two backends join: every session stays, and no cookie is re-issued.
    lb.set_backends("demo.fog", &[&bs[0], &bs[1], &bs[2], &bs[3], &bs[4]])
        .await;
    for (c, owner) in &sessions {
        let r = http
            .get("demo.fog", "/whoami", &[("cookie", &format!("FORM={c}"))])
            .await
            .expect("request");
        assert_eq!(&r.body, owner);
        assert_eq!(r.set_cookie("FORM"), None);
    }
    // b2 leaves: its sessions are re-pinned with a new cookie, the others stay.
    lb.set_backends("demo.fog", &[&bs[0], &bs[1], &bs[3], &bs[4]])
        .await;
    for (c, owner) in &mut sessions {
        let r = http
            .get("demo.fog", "/whoami", &[("cookie", &format!("FORM={c}"))])
            .await
            .expect("request");
        if owner == "b2" {
            let fresh = r.set_cookie("FORM").expect("re-pinned with a new cookie");
            assert_ne!(r.body, "b2");
            assert!(fresh.starts_with(&format!("{}~", r.body)));
            let again = http
                .get(
                    "demo.fog",
                    "/whoami",
                    &[("cookie", &format!("FORM={fresh}"))],
                )
                .await
                .expect("request");
            assert_eq!(again.body, r.body, "the new pin holds");
        } else {
            assert_eq!(&r.body, owner);
            assert_eq!(r.set_cookie("FORM"), None);
        }
    }
    // Forgeries: another backend's id with a real MAC, a made-up MAC, garbage.
    let (real, owner) = sessions
        .iter()
        .find(|(_, b)| b == "b0")
        .expect("a b0 session")
        .clone();
    let forged_id = real.replacen(&owner, "b1", 1);
    let parts: Vec<&str> = real.split('~').collect();
    let forged_mac = format!("b1~{}~{}~{}", parts[1], parts[2], "0".repeat(32));
    let far_future = format!("b0~99999999999~{}~{}", parts[2], parts[3]);
    for forged in [forged_id, forged_mac, far_future, "garbage".to_owned()] {
        let r = http
            .get(
                "demo.fog",
                "/whoami",
                &[("cookie", &format!("FORM={forged}"))],
            )
            .await
            .expect("request");
        assert!(
            r.set_cookie("FORM").is_some(),
            "{forged} must not pin: a new session starts"
        );
    }
    stop_gracefully(&mut lb.svc).await;
}

/// Sessions pinned by balancer `a`, asked of balancer `b`: how many stay on the backend
/// that `a` pinned them to without a new cookie.
async fn honored_elsewhere(a: &Lb, b: &Lb) -> usize {
    let (ha, hb) = (Http::new(a.http), Http::new(b.http));
    let mut kept = 0;
    for _ in 0..20 {
        let r = ha.get("demo.fog", "/whoami", &[]).await.expect("request");
        let c = r.set_cookie("FORM").expect("a new session gets a cookie");
        let there = hb
            .get("demo.fog", "/whoami", &[("cookie", &format!("FORM={c}"))])
            .await
            .expect("request");
        if there.body == r.body && there.set_cookie("FORM").is_none() {
            kept += 1;
        }
    }
    kept
}

#[tokio::test]
async fn balancers_sharing_a_cookie_key_honor_each_others_sessions() {
    let bs = backends(3).await;
    let dir = form_testkit::TestDir::new("cookie-key");
    let key = dir.path().join("cookie.key");
    std::fs::write(&key, format!("{}\n", "5a".repeat(32))).expect("key");
    let key = key.display().to_string();
    let mut lbs = Vec::new();
    for name in ["shared-a", "shared-b"] {
        let mut lb = Lb::start(name, &["--cookie-key-file", &key]).await;
        lb.route("demo.fog", cookie(), None, &[&bs[0], &bs[1], &bs[2]])
            .await;
        lbs.push(lb);
    }
    assert_eq!(honored_elsewhere(&lbs[0], &lbs[1]).await, 20);
    assert_eq!(honored_elsewhere(&lbs[1], &lbs[0]).await, 20);

    // Each with a random key of its own (no file): the other balancer's cookies are
    // forgeries to it, so those sessions are pinned again.
    let mut own = Vec::new();
    for name in ["own-a", "own-b"] {
        let mut lb = Lb::start(name, &[]).await;
        lb.route("demo.fog", cookie(), None, &[&bs[0], &bs[1], &bs[2]])
            .await;
        own.push(lb);
    }
    assert_eq!(honored_elsewhere(&own[0], &own[1]).await, 0);
    for mut lb in lbs.into_iter().chain(own) {
        stop_gracefully(&mut lb.svc).await;
    }
}
