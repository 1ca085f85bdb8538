//! The Kubernetes manifests in deploy/k8s parse, use only the image the build script
//! makes, and every port and address they name exists: container ports match the
//! services' listen flags, Services point at named ports of their pods, and every
//! `host:port` a service is given is a Service (or StatefulSet pod) with that port.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

fn objects() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("deploy/k8s")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    let mut out = Vec::new();
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).expect("read"))
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if v["kind"] == "List" {
            out.extend(v["items"].as_array().expect("items").iter().cloned());
        } else {
            out.push(v);
        }
    }
    for o in &out {
        assert!(o["apiVersion"].is_string() && o["kind"].is_string(), "{o}");
        assert!(o["metadata"]["name"].is_string(), "{o}");
    }
    out
}

fn pod_spec(o: &Value) -> Option<&Value> {
    match o["kind"].as_str()? {
        "Deployment" | "StatefulSet" | "Job" => Some(&o["spec"]["template"]["spec"]),
        _ => None,
    }
}

#[test]
fn manifests_parse_and_reference_only_images_ports_and_addresses_that_exist() {
    let objs = objects();
    let build = std::fs::read_to_string(dir().join("../docker/build.sh")).expect("build.sh");
    let script = std::fs::read_to_string(dir().join("make-secret.sh")).expect("make-secret.sh");
    let config: BTreeMap<String, String> = objs
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .flat_map(|o| o["data"].as_object().cloned().unwrap_or_default())
        .map(|(k, v)| (k, v.as_str().unwrap_or("").to_owned()))
        .collect();

    // Reachable names: each Service's ports; a headless Service's StatefulSet pods too.
    let mut reachable: BTreeSet<String> = BTreeSet::new();
    let mut pods_by_app: BTreeMap<String, (Vec<String>, BTreeMap<String, u64>)> = BTreeMap::new();
    for o in &objs {
        let Some(spec) = pod_spec(o) else { continue };
        // Services select pods by their `app` label (the workload's name without one).
        let app = o["spec"]["template"]["metadata"]["labels"]["app"]
            .as_str()
            .or(o["metadata"]["name"].as_str())
            .unwrap_or("")
            .to_owned();
        let mut ports = BTreeMap::new();
        let mut images = Vec::new();
        for c in spec["containers"].as_array().expect("containers") {
            let image = c["image"].as_str().expect("image").to_owned();
            assert!(
                image == "form-platform:local" && build.contains("-t form-platform:local"),
                "{app} uses {image}, which deploy/docker/build.sh does not make"
            );
            images.push(image);
            for p in c["ports"].as_array().into_iter().flatten() {
                ports.insert(
                    p["name"].as_str().expect("port name").to_owned(),
                    p["containerPort"].as_u64().expect("port"),
                );
            }
            // Every `--listen*` flag binds a declared container port.
            let args: Vec<&str> = c["args"]
                .as_array()
                .expect("args")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            for w in args.windows(2) {
                if w[0].starts_with("--listen") || w[0] == "--metrics-listen" {
                    let port: u64 = w[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .expect("port");
                    assert!(
                        ports.values().any(|p| *p == port),
                        "{app}: {} {} is not a containerPort",
                        w[0],
                        w[1]
                    );
                }
            }
            // Probes run formctl, which the image holds.
            for probe in ["readinessProbe", "livenessProbe"] {
                if let Some(cmd) = c[probe]["exec"]["command"].as_array() {
                    assert_eq!(cmd[0], "formctl", "{app} {probe}");
                }
            }
        }
        pods_by_app.insert(app, (images, ports));
    }
    for o in objs.iter().filter(|o| o["kind"] == "Service") {
        let name = o["metadata"]["name"].as_str().expect("name");
        let app = o["spec"]["selector"]["app"].as_str().expect("selector");
        let (_, ports) = pods_by_app
            .get(app)
            .unwrap_or_else(|| panic!("Service {name} selects no workload {app}"));
        for p in o["spec"]["ports"].as_array().expect("ports") {
            let target = p["targetPort"].as_str().expect("named targetPort");
            let port = p["port"].as_u64().expect("port");
            assert_eq!(
                ports.get(target),
                Some(&port),
                "Service {name} port {target}"
            );
            reachable.insert(format!("{name}:{port}"));
            if o["spec"]["clusterIP"] == "None" {
                let behind: Vec<&Value> = objs
                    .iter()
                    .filter(|s| s["kind"] == "StatefulSet" && s["spec"]["serviceName"] == name)
                    .collect();
                assert!(
                    !behind.is_empty(),
                    "a StatefulSet behind the headless Service {name}"
                );
                for sts in behind {
                    let sts_name = sts["metadata"]["name"].as_str().expect("name");
                    for i in 0..sts["spec"]["replicas"].as_u64().expect("replicas") {
                        reachable.insert(format!("{sts_name}-{i}.{name}:{port}"));
                    }
                }
            }
        }
    }
    // Every address handed to a service exists.
    let mut named = 0;
    for o in &objs {
        let Some(spec) = pod_spec(o) else { continue };
        for c in spec["containers"].as_array().expect("containers") {
            for a in c["args"]
                .as_array()
                .expect("args")
                .iter()
                .filter_map(Value::as_str)
            {
                let expanded = if a == "$(FORM_STATE_PEERS)" {
                    config
                        .get("FORM_STATE_PEERS")
                        .cloned()
                        .expect("peers in the ConfigMap")
                } else {
                    a.to_owned()
                };
                for addr in expanded.split(',') {
                    let addr = addr.trim_start_matches("http://");
                    let Some((host, port)) = addr.rsplit_once(':') else {
                        continue;
                    };
                    if host.starts_with(|c: char| c.is_ascii_alphabetic())
                        && port.parse::<u16>().is_ok()
                    {
                        named += 1;
                        let short = host.trim_end_matches(".form.svc").trim_end_matches(".form");
                        assert!(
                            reachable.contains(&format!("{short}:{port}")),
                            "{addr} (in {}) is no Service port",
                            o["metadata"]["name"]
                        );
                    }
                }
            }
            for v in spec["volumes"].as_array().into_iter().flatten() {
                if let Some(secret) = v["secret"]["secretName"].as_str() {
                    assert!(
                        [
                            "form-keys",
                            "form-tls",
                            "form-state-0",
                            "form-state-1",
                            "form-state-2",
                            "form-vmm-0",
                            "form-vmm-1"
                        ]
                        .contains(&secret),
                        "{secret}: make-secret.sh makes form-keys, form-tls, form-state-<i> and form-vmm-<i>"
                    );
                    // A replica's (or a vmm node's) own Secret goes to it only.
                    if secret.starts_with("form-state-") || secret.starts_with("form-vmm-") {
                        assert_eq!(
                            o["metadata"]["name"].as_str(),
                            Some(secret),
                            "{} mounts the Secret of {secret}",
                            o["metadata"]["name"]
                        );
                    }
                }
                // No other Secret carries a node key.
                for item in v["secret"]["items"].as_array().into_iter().flatten() {
                    let key = item["key"].as_str().unwrap_or("");
                    assert!(
                        !key.ends_with(".key") || key.ends_with(".key.pem"),
                        "{} mounts the node key {key}",
                        o["metadata"]["name"]
                    );
                }
            }
            // The API tokens go only where form-mcp (or the demo job) runs.
            for v in spec["volumes"].as_array().into_iter().flatten() {
                if v["secret"]["secretName"] == "form-keys" {
                    let items = v["secret"]["items"].as_array();
                    let has_tokens = items.is_none_or(|i| i.iter().any(|x| x["key"] == "tokens"));
                    let is_api = ["form-mcp", "form-demo"]
                        .contains(&o["metadata"]["name"].as_str().unwrap_or(""));
                    assert!(
                        !has_tokens || is_api,
                        "{} mounts the API tokens",
                        o["metadata"]["name"]
                    );
                }
            }
            // Every service runs with mutual TLS from the form-tls Secret.
            for c in spec["containers"].as_array().into_iter().flatten() {
                let command = c["command"][0].as_str().unwrap_or("");
                if command.starts_with("form-") {
                    let args = c["args"].to_string();
                    assert!(
                        args.contains("\"--tls-dir\""),
                        "{command} runs without --tls-dir"
                    );
                }
                // Every balancer pod reads the one cookie key: a session pinned by
                // one is honored by the others.
                if command == "form-rplb" {
                    let args: Vec<&str> = c["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let file = args
                        .iter()
                        .position(|a| *a == "--cookie-key-file")
                        .and_then(|i| args.get(i + 1))
                        .expect("form-rplb runs with a random cookie key of its own");
                    // The file is a mounted item of a Secret that make-secret.sh fills.
                    let item = c["volumeMounts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|m| {
                            let at = m["mountPath"].as_str().unwrap_or("").to_owned();
                            spec["volumes"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(move |v| v["name"] == m["name"])
                                .flat_map(|v| v["secret"]["items"].as_array().into_iter().flatten())
                                .map(move |i| {
                                    (format!("{at}/{}", i["path"].as_str().unwrap_or("")), i)
                                })
                        })
                        .find(|(path, _)| path == file)
                        .unwrap_or_else(|| panic!("{file} is no mounted Secret item"))
                        .1;
                    let key = item["key"].as_str().unwrap_or("");
                    assert!(script.contains(key), "make-secret.sh does not make {key}");
                }
            }
        }
    }
    assert!(named >= 8, "addresses checked: {named}");
    for key in [
        "form-keys",
        "form-tls",
        "certs stack",
        "authorized_keys",
        "tokens",
        "f\"form-state-{i}\"",
        "node.key",
        "--cookie-key",
    ] {
        assert!(script.contains(key), "make-secret.sh makes {key}");
    }
}

/// Several nodes: the vmm nodes run one per Kubernetes node (as a DaemonSet would),
/// each a StatefulSet with its own node id, certificate and volume; two balancers and
/// two controllers run, and the controllers are given every balancer, not a Service
/// that would hide all but one.
#[test]
fn vmm_nodes_have_their_own_identities_and_controllers_reach_every_balancer() {
    let objs = objects();
    let arg = |o: &Value, flag: &str| -> Option<String> {
        let args = pod_spec(o)?["containers"][0]["args"].as_array()?.clone();
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1)?.as_str().map(str::to_owned)
    };
    let vmm: Vec<&Value> = objs
        .iter()
        .filter(|o| {
            o["kind"] == "StatefulSet"
                && o["spec"]["template"]["metadata"]["labels"]["app"] == "form-vmm"
        })
        .collect();
    assert!(vmm.len() >= 2, "vmm nodes: {}", vmm.len());
    let mut ids = BTreeSet::new();
    for o in &vmm {
        let name = o["metadata"]["name"].as_str().expect("name");
        assert_eq!(o["spec"]["replicas"], 1, "{name}");
        assert_eq!(
            arg(o, "--node-id").as_deref(),
            Some(name),
            "{name}'s node id"
        );
        ids.insert(name.to_owned());
        let spec = pod_spec(o).expect("pod");
        let secrets: Vec<&str> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        assert_eq!(secrets, [name], "{name} mounts its own certificate only");
        let anti = &spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "{name}");
        assert_eq!(
            anti["labelSelector"]["matchLabels"]["app"], "form-vmm",
            "{name}"
        );
        assert!(
            o["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data",
            "{name} keeps its instances and fences on a volume of its own"
        );
    }
    assert_eq!(ids.len(), vmm.len(), "node ids are distinct");
    let script = std::fs::read_to_string(dir().join("make-secret.sh")).expect("make-secret.sh");
    assert!(
        script.contains("form-vmm-$i=vmm"),
        "make-secret.sh issues one certificate per node"
    );

    let rplb = objs
        .iter()
        .find(|o| o["metadata"]["name"] == "form-rplb" && pod_spec(o).is_some())
        .expect("form-rplb");
    let balancers = rplb["spec"]["replicas"].as_u64().expect("replicas");
    assert!(balancers >= 2, "balancers: {balancers}");
    let scaler = objs
        .iter()
        .find(|o| o["metadata"]["name"] == "form-scaler" && pod_spec(o).is_some())
        .expect("form-scaler");
    assert!(
        scaler["spec"]["replicas"].as_u64() >= Some(2),
        "controllers"
    );
    let given = arg(scaler, "--rplb").expect("--rplb");
    assert_eq!(
        given.split(',').count() as u64,
        balancers,
        "the controllers are given every balancer: {given}"
    );
    assert_eq!(
        arg(scaler, "--id").as_deref(),
        Some("$(POD_NAME)"),
        "one id per controller"
    );
}
