//! `/api/v1/openapi.json`: the OpenAPI 3.1 document, built from the route table below
//! and the JSON Schemas of the request and response types (derived from the Rust
//! types the handlers parse and return). A test checks that every route in the table
//! is served.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};

use crate::api::model;
use crate::error::ErrorBody;

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// HTTP method, lower case.
    pub method: &'static str,
    /// Path with `{param}`s.
    pub path: &'static str,
    /// operationId (the MCP tool of the same action, where there is one).
    pub id: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Request body schema.
    pub request: Option<SchemaFn>,
    /// Success status and body schema.
    pub response: (u16, SchemaFn),
    /// Whether it needs an admin token.
    pub writes: bool,
}

/// Every route of `/api/v1`.
pub const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/api/v1/clusters",
        id: "list_clusters",
        summary: "List every cluster with its members.",
        request: None,
        response: (200, s::<model::ClusterList>),
        writes: false,
    },
    Route {
        method: "post",
        path: "/api/v1/clusters",
        id: "create_cluster",
        summary: "Create a cluster and start its first instance (its template).",
        request: Some(s::<model::CreateCluster>),
        response: (201, s::<model::Cluster>),
        writes: true,
    },
    Route {
        method: "get",
        path: "/api/v1/clusters/{id}",
        id: "get_cluster",
        summary: "Read one cluster.",
        request: None,
        response: (200, s::<model::Cluster>),
        writes: false,
    },
    Route {
        method: "delete",
        path: "/api/v1/clusters/{id}",
        id: "delete_cluster",
        summary: "Delete a cluster and its instances (refused while an operation runs).",
        request: None,
        response: (200, s::<model::Deleted>),
        writes: true,
    },
    Route {
        method: "put",
        path: "/api/v1/clusters/{id}/policy",
        id: "set_scaling_policy",
        summary: "Change a cluster's scaling policy: the fields given are validated and stored; fields left out keep the values of the policy in force (the cluster's, or the defaults).",
        request: Some(s::<model::PolicyUpdate>),
        response: (200, s::<model::Policy>),
        writes: true,
    },
    Route {
        method: "put",
        path: "/api/v1/clusters/{id}/state-sync",
        id: "set_state_sync",
        summary: "Set how a cluster's instances share application state: none, on_scale (clones catch up, victims hand off their writes) or continuous.",
        request: Some(s::<model::StateSync>),
        response: (200, s::<model::StateSync>),
        writes: true,
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/{id}/scale",
        id: "scale_cluster",
        summary: "Request a scaling operation; an Idempotency-Key header makes a retry return the same operation.",
        request: Some(s::<model::ScaleRequest>),
        response: (202, s::<model::ScaleAccepted>),
        writes: true,
    },
    Route {
        method: "get",
        path: "/api/v1/clusters/{id}/status",
        id: "get_cluster_status",
        summary: "Instances, health, the last operation and the last decision of a cluster.",
        request: None,
        response: (200, s::<model::Status>),
        writes: false,
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/{id}/instances/{instance}/drain",
        id: "drain_instance",
        summary: "Start draining one instance: no new unpinned request goes to it.",
        request: None,
        response: (202, s::<model::Drained>),
        writes: true,
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/{id}/instances/{instance}/undrain",
        id: "undrain_instance",
        summary: "Make a draining instance serve again.",
        request: None,
        response: (200, s::<model::Drained>),
        writes: true,
    },
    Route {
        method: "put",
        path: "/api/v1/clusters/{id}/drain",
        id: "set_drain",
        summary: "Set how the cluster's scale-ins drain their victims.",
        request: Some(s::<model::Drain>),
        response: (200, s::<model::Drain>),
        writes: true,
    },
    Route {
        method: "get",
        path: "/api/v1/nodes",
        id: "list_nodes",
        summary: "Every form-vmm-service node: capacity, usage, labels, backend, latest heartbeat, cordon.",
        request: None,
        response: (200, s::<model::NodeList>),
        writes: false,
    },
    Route {
        method: "post",
        path: "/api/v1/nodes/{id}/cordon",
        id: "cordon_node",
        summary: "Cordon a node: it takes no new instance (its instances keep running).",
        request: None,
        response: (200, s::<model::Node>),
        writes: true,
    },
    Route {
        method: "post",
        path: "/api/v1/nodes/{id}/uncordon",
        id: "uncordon_node",
        summary: "Lift a node's cordon.",
        request: None,
        response: (200, s::<model::Node>),
        writes: true,
    },
    Route {
        method: "get",
        path: "/api/v1/operations/{id}",
        id: "get_operation",
        summary: "Read one operation, with its progress.",
        request: None,
        response: (200, s::<model::Operation>),
        writes: false,
    },
];

fn error_responses(g: &mut SchemaGenerator, writes: bool) -> Map<String, Value> {
    let err = Value::from(g.subschema_for::<ErrorBody>());
    let mut out = Map::new();
    let mut add = |code: &str, what: &str| {
        out.insert(
            code.to_owned(),
            json!({ "description": what, "content": { "application/json": { "schema": err.clone() } } }),
        );
    };
    add(
        "400",
        "Invalid JSON, an unknown or wrong-typed field (named), or a value outside what is accepted",
    );
    add(
        "405",
        "The route does not take this method (Allow lists those it takes)",
    );
    add("401", "Missing or unknown bearer token");
    add("404", "No such cluster, instance or operation");
    add("503", "A service behind the gateway is unavailable");
    if writes {
        add("403", "The token may only read");
        add(
            "409",
            "Conflicts with a running operation, an existing id, or a cooldown",
        );
        add("413", "The body is too large");
        add("415", "The body's Content-Type is not application/json");
    }
    out
}

/// The ids of clusters, instances and operations (`form_runtime::ids`).
fn id_schema() -> Value {
    json!({
        "type": "string", "minLength": 1, "maxLength": form_runtime::ids::MAX_ID_LEN,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut g = settings.into_generator();
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = Map::new();
        op.insert("operationId".into(), json!(r.id));
        op.insert("summary".into(), json!(r.summary));
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|p| json!({ "name": p, "in": "path", "required": true, "schema": id_schema() }))
            .collect();
        if r.id == "scale_cluster" {
            params.push(json!({
                "name": "Idempotency-Key", "in": "header", "required": false,
                "description": "Names one request per cluster: a retry with the same key and the same body returns the first operation; another body gets 409.",
                "schema": { "type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[\\x21-\\x7e]+$" }
            }));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = r.request {
            op.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { "application/json": { "schema": Value::from(req(&mut g)) } } }),
            );
        }
        let mut responses = error_responses(&mut g, r.writes);
        let (code, body) = r.response;
        responses.insert(
            code.to_string(),
            json!({ "description": "Success", "content": { "application/json": { "schema": Value::from(body(&mut g)) } } }),
        );
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths
            .entry(r.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(r.method.to_owned(), Value::Object(op));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "form-mcp API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Clusters of stateful instances that scale without losing state. Every request needs 'Authorization: Bearer TOKEN'; read tokens may only read."
        },
        "security": [ { "bearer": [] } ],
        "paths": paths,
        "components": {
            "schemas": g.take_definitions(true),
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constraints_the_server_enforces_are_in_the_schemas() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(schemas["Resources"]["properties"]["vcpus"]["maximum"], 256);
        assert_eq!(
            schemas["Policy"]["properties"]["min_instances"]["minimum"],
            1
        );
        assert_eq!(
            schemas["Policy"]["properties"]["target_cpu_utilization"]["maximum"],
            1.0
        );
        assert_eq!(schemas["Workload"]["properties"]["command"]["minLength"], 1);
        assert!(schemas["CreateCluster"]["properties"]["cluster_id"]["pattern"].is_string());
        let scale = &doc["paths"]["/api/v1/clusters/{id}/scale"]["post"];
        let params = scale["parameters"].as_array().expect("parameters");
        assert!(params.iter().any(|p| p["name"] == "Idempotency-Key"));
        assert!(
            params
                .iter()
                .any(|p| p["name"] == "id" && p["schema"]["maxLength"] == 128)
        );
        assert!(scale["responses"]["415"].is_object());
    }

    #[test]
    fn every_reference_resolves_and_every_route_has_an_operation() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap_or("");
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        for r in ROUTES {
            assert!(
                doc["paths"][r.path][r.method]["responses"].is_object(),
                "{} {}",
                r.method,
                r.path
            );
        }
        assert!(schemas.contains_key("CreateCluster") && schemas.contains_key("ErrorBody"));
    }
}
