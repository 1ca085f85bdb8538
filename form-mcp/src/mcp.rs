//! The Model Context Protocol server at `/mcp` (Streamable HTTP, rmcp). Both protocol
//! generations are served on the one endpoint: 2025-11-25 clients `initialize` and get
//! a session; 2026-07-28 requests are stateless. Every tool builds the same
//! [`Action`] its REST route does and runs it through [`App::execute`], so the bearer
//! token rules (401 on the endpoint, read tokens cannot call writing tools) and the
//! errors are the REST API's.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::ErrorData;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::action::Action;
use crate::api::model::{
    CreateCluster, Drain, PolicyUpdate, Resources, ScaleOperation, ScaleRequest, StateSync,
};
use crate::rest::App;

/// Arguments naming a cluster.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterArgs {
    /// The cluster's id.
    pub cluster_id: String,
}

/// Arguments of `get_operation`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationArgs {
    /// The operation's id.
    pub operation_id: String,
}

/// Arguments of `cordon_node` and `uncordon_node`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    /// The node's id.
    pub node_id: String,
}

/// Arguments of `list_clusters`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Arguments of `scale_cluster`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleArgs {
    /// The cluster.
    pub cluster_id: String,
    /// What to do.
    pub operation: ScaleOperation,
    /// Instances wanted (scale_out, scale_in); 0: one more or one fewer.
    #[serde(default)]
    pub target_count: u32,
    /// Skip the cooldowns.
    #[serde(default)]
    pub immediate: bool,
    /// Drain removed instances first (default true).
    #[serde(default)]
    pub drain_connections: Option<bool>,
    /// New resources (resize).
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Instance to replace (replace_instance).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Makes a repeated call return the same operation.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Instances to remove (scale_in), instead of letting the controller choose.
    #[serde(default)]
    pub instance_ids_to_remove: Vec<String>,
    /// How to drain the removed instances (default: the cluster's settings).
    #[serde(default)]
    pub drain: Option<Drain>,
}

/// Arguments of `set_drain`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDrainArgs {
    /// The cluster.
    pub cluster_id: String,
    /// The new settings.
    pub drain: Drain,
}

/// Arguments of `set_scaling_policy`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyArgs {
    /// The cluster.
    pub cluster_id: String,
    /// The fields to change; the others keep the values of the policy in force.
    pub policy: PolicyUpdate,
}

/// Arguments of `set_state_sync`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSyncArgs {
    /// The cluster.
    pub cluster_id: String,
    /// The new setting.
    pub state_sync: StateSync,
}

/// Arguments of `drain_instance`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainArgs {
    /// The cluster.
    pub cluster_id: String,
    /// The instance to drain.
    pub instance_id: String,
}

struct Spec {
    name: &'static str,
    description: &'static str,
    schema: fn() -> JsonObject,
    hints: Hints,
}

/// The tool annotations: what a client may assume of a call.
#[derive(Clone, Copy)]
struct Hints {
    read_only: bool,
    /// It may remove something (instances, a cluster).
    destructive: bool,
    /// The same call twice has the effect of one.
    idempotent: bool,
}

const READ: Hints = Hints {
    read_only: true,
    destructive: false,
    idempotent: true,
};
const SET: Hints = Hints {
    read_only: false,
    destructive: false,
    idempotent: true,
};

fn schema<T: JsonSchema>() -> JsonObject {
    match serde_json::to_value(schemars::schema_for!(T)) {
        Ok(Value::Object(m)) => m,
        _ => JsonObject::new(),
    }
}

const TOOLS: &[Spec] = &[
    Spec {
        name: "list_clusters",
        description: "List every cluster with its members.",
        schema: schema::<NoArgs>,
        hints: READ,
    },
    Spec {
        name: "get_cluster",
        description: "Read one cluster: its workload, policy, affinity, resources, drain and state sync settings, and members.",
        schema: schema::<ClusterArgs>,
        hints: READ,
    },
    Spec {
        name: "delete_cluster",
        description: "Delete a cluster and every instance of it (refused while an operation runs).",
        schema: schema::<ClusterArgs>,
        hints: Hints {
            read_only: false,
            destructive: true,
            idempotent: true,
        },
    },
    Spec {
        name: "get_cluster_status",
        description: "Instances, health, the last operation and the last scaling decision of a cluster.",
        schema: schema::<ClusterArgs>,
        hints: READ,
    },
    Spec {
        name: "create_cluster",
        description: "Create a cluster of stateful instances and start its first instance (the template clones are made from).",
        schema: schema::<CreateCluster>,
        hints: Hints {
            read_only: false,
            destructive: false,
            idempotent: false,
        },
    },
    Spec {
        name: "scale_cluster",
        description: "Scale a cluster out or in to target_count, resize its instances, or replace one; returns the operation (follow it with get_operation).",
        schema: schema::<ScaleArgs>,
        hints: Hints {
            read_only: false,
            destructive: true,
            idempotent: false,
        },
    },
    Spec {
        name: "set_scaling_policy",
        description: "Validate and store a cluster's scaling policy.",
        schema: schema::<PolicyArgs>,
        hints: SET,
    },
    Spec {
        name: "set_state_sync",
        description: "Set how a cluster's instances share application state: none, on_scale (clones catch up with their source, scale-in hands the removed instances' writes to the others) or continuous.",
        schema: schema::<StateSyncArgs>,
        hints: SET,
    },
    Spec {
        name: "drain_instance",
        description: "Start draining one instance: no new unpinned request goes to it.",
        schema: schema::<DrainArgs>,
        hints: SET,
    },
    Spec {
        name: "undrain_instance",
        description: "Make a draining instance serve again (undo drain_instance).",
        schema: schema::<DrainArgs>,
        hints: SET,
    },
    Spec {
        name: "set_drain",
        description: "Set how a cluster's scale-ins drain their victims: the grace period of pinned sessions, and whether the drain ends once nothing is in flight.",
        schema: schema::<SetDrainArgs>,
        hints: SET,
    },
    Spec {
        name: "list_nodes",
        description: "List the form-vmm-service nodes: capacity, what their instances use, labels, backend, latest heartbeat and whether they are cordoned.",
        schema: schema::<NoArgs>,
        hints: READ,
    },
    Spec {
        name: "cordon_node",
        description: "Cordon a node: it takes no new instance; the instances it runs keep running.",
        schema: schema::<NodeArgs>,
        hints: SET,
    },
    Spec {
        name: "uncordon_node",
        description: "Lift a node's cordon (undo cordon_node).",
        schema: schema::<NodeArgs>,
        hints: SET,
    },
    Spec {
        name: "get_operation",
        description: "Read one scaling operation with its progress.",
        schema: schema::<OperationArgs>,
        hints: READ,
    },
];

fn parse<T: DeserializeOwned>(args: Value) -> Result<T, String> {
    serde_json::from_value(args).map_err(|e| format!("invalid arguments: {e}"))
}

/// The action a tool call stands for.
fn action(name: &str, args: Value) -> Result<Action, String> {
    Ok(match name {
        "list_clusters" => {
            parse::<NoArgs>(args)?;
            Action::ListClusters
        }
        "get_cluster_status" => Action::Status(parse::<ClusterArgs>(args)?.cluster_id),
        "get_cluster" => Action::GetCluster(parse::<ClusterArgs>(args)?.cluster_id),
        "delete_cluster" => Action::DeleteCluster(parse::<ClusterArgs>(args)?.cluster_id),
        "create_cluster" => Action::CreateCluster(Box::new(parse(args)?)),
        "scale_cluster" => {
            let a: ScaleArgs = parse(args)?;
            let req = ScaleRequest {
                operation: a.operation,
                target_count: a.target_count,
                immediate: a.immediate,
                drain_connections: a.drain_connections.unwrap_or(true),
                resources: a.resources,
                instance_id: a.instance_id,
                instance_ids_to_remove: a.instance_ids_to_remove,
                drain: a.drain,
            };
            Action::Scale(a.cluster_id, req, a.idempotency_key)
        }
        "set_scaling_policy" => {
            let a: PolicyArgs = parse(args)?;
            Action::SetPolicy(a.cluster_id, a.policy)
        }
        "set_state_sync" => {
            let a: StateSyncArgs = parse(args)?;
            Action::SetStateSync(a.cluster_id, a.state_sync)
        }
        "drain_instance" => {
            let a: DrainArgs = parse(args)?;
            Action::DrainInstance(a.cluster_id, a.instance_id)
        }
        "undrain_instance" => {
            let a: DrainArgs = parse(args)?;
            Action::UndrainInstance(a.cluster_id, a.instance_id)
        }
        "set_drain" => {
            let a: SetDrainArgs = parse(args)?;
            Action::SetDrain(a.cluster_id, a.drain)
        }
        "get_operation" => Action::GetOperation(parse::<OperationArgs>(args)?.operation_id),
        "list_nodes" => {
            parse::<NoArgs>(args)?;
            Action::ListNodes
        }
        "cordon_node" => Action::CordonNode(parse::<NodeArgs>(args)?.node_id, true),
        "uncordon_node" => Action::CordonNode(parse::<NodeArgs>(args)?.node_id, false),
        other => {
            let names: Vec<&str> = TOOLS.iter().map(|t| t.name).collect();
            return Err(format!(
                "unknown tool '{other}'; the tools are {}",
                names.join(", ")
            ));
        }
    })
}

/// The MCP server over the gateway's [`App`].
#[derive(Debug, Clone)]
pub struct Mcp {
    app: Arc<App>,
}

impl rmcp::ServerHandler for Mcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("form-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Clusters of stateful instances that scale out and in without losing state. \
                 Use list_clusters and get_cluster_status to look, scale_cluster to change a \
                 cluster's size (then get_operation to follow it).",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = TOOLS
            .iter()
            .map(|t| {
                let mut tool = Tool::new(t.name, t.description, (t.schema)());
                tool.annotations = Some(
                    ToolAnnotations::new()
                        .read_only(t.hints.read_only)
                        .destructive(t.hints.destructive)
                        .idempotent(t.hints.idempotent)
                        .open_world(false),
                );
                tool
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let headers = context
            .extensions
            .get::<axum::http::request::Parts>()
            .map(|p| p.headers.clone())
            .unwrap_or_default();
        let args = Value::Object(request.arguments.unwrap_or_default());
        let action = match action(&request.name, args) {
            Ok(a) => a,
            Err(e) => return Err(ErrorData::invalid_params(e, None)),
        };
        Ok(match self.app.execute(&headers, action).await {
            Ok((_, body)) => CallToolResult::structured(body),
            Err(e) => CallToolResult::structured_error(serde_json::json!({
                "status": e.status.as_u16(),
                "code": e.code,
                "message": e.message,
            }))
            .with_text(e.to_string()),
        }
        .into())
    }
}

trait WithText {
    fn with_text(self, text: String) -> Self;
}

impl WithText for CallToolResult {
    fn with_text(mut self, text: String) -> Self {
        self.content = vec![ContentBlock::text(text)];
        self
    }
}

/// The `/mcp` service: token check first, then rmcp's Streamable HTTP transport.
pub fn router(
    app: Arc<App>,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> axum::Router {
    let mcp = Mcp { app: app.clone() };
    // A browser page of another site must not drive the API through a user's machine
    // (DNS rebinding): any Origin not listed is refused, even with an empty list.
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(allowed_hosts)
        .with_allowed_origins(allowed_origins)
        .enforce_origin_validation()
        // Open sessions and streams end when the gateway stops.
        .with_cancellation_token(stop)
        .with_max_request_body_bytes(crate::rest::BODY_LIMIT);
    let manager: Arc<LocalSessionManager> = Arc::default();
    let sessions = Arc::new(crate::mcp_guard::Sessions::new(manager.clone()));
    let service: StreamableHttpService<Mcp, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(mcp.clone()), manager, config);
    axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            sessions,
            crate::mcp_guard::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(app, require_token))
}

async fn require_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    match app.authenticate(&headers) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Hosts accepted in `Host` by default: loopback names, plus what the config adds.
pub fn allowed_hosts(extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = ["localhost", "127.0.0.1", "::1", "[::1]"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    v.extend(extra.iter().cloned());
    let set: BTreeMap<String, ()> = v.into_iter().map(|h| (h, ())).collect();
    set.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema_and_maps_to_an_action() {
        for t in TOOLS {
            let s = (t.schema)();
            assert_eq!(
                s.get("type").and_then(Value::as_str),
                Some("object"),
                "{}",
                t.name
            );
        }
        assert!(matches!(
            action("list_clusters", serde_json::json!({})),
            Ok(Action::ListClusters)
        ));
        let e =
            action("scale_cluster", serde_json::json!({"cluster_id": "web"})).expect_err("no op");
        assert!(e.contains("operation"), "{e}");
        let e = action("explode", serde_json::json!({})).expect_err("unknown");
        assert!(e.contains("list_clusters"), "{e}");
    }
}
