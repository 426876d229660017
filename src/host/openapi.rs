//! `GET /api/openapi.json`: the host API described for clients and tools
//! (OpenAPI 3.1). The schemas are derived from the wire types themselves
//! (`utoipa::ToSchema` on `crate::api`), so a field added to a type is in
//! the document; the routes are the table below, one row per route of
//! `api::router`, which `tests/route_matrix.rs` holds against the router's
//! source (a route without a row fails it).

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathItem,
    PathsBuilder, Ref, RefOr, Required, ResponseBuilder, ResponsesBuilder,
};
use utoipa::ToSchema;

use crate::api::{self as wire, ports, TaskSpec, TaskView};

/// The named schemas a document refers to, gathered as rows name them.
type Schemas = Vec<(String, RefOr<Schema>)>;

/// A schema a row names: registers it (and what it refers to) and returns
/// how the row refers to it.
type SchemaOf = fn(&mut Schemas) -> RefOr<Schema>;

fn named<T: ToSchema>(s: &mut Schemas) -> RefOr<Schema> {
    s.push((T::name().into_owned(), T::schema()));
    T::schemas(s);
    Ref::from_schema_name(T::name()).into()
}

fn list_of<T: ToSchema>(s: &mut Schemas) -> RefOr<Schema> {
    ArrayBuilder::new().items(named::<T>(s)).into()
}

/// A user's variables: names to values.
fn string_map(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::RefOr(
            RefOr::T(Schema::from(
                ObjectBuilder::new().schema_type(Type::String).build(),
            )),
        )))
        .into()
}

/// What a successful answer carries.
#[derive(Clone, Copy)]
enum Answer {
    /// JSON of this schema.
    Json(u16, SchemaOf),
    /// No body.
    Empty(u16),
    /// Bytes of a log (`x-next-offset` says where the next read starts).
    Log,
    /// The Prometheus text formats.
    Metrics,
    /// A websocket (`Upgrade: websocket`); see `api::exec` and `api::forward`.
    WebSocket,
    /// An environment archive (a tar), whole or from an offset.
    Archive,
    /// A blob of a parked copy, whole or from an offset.
    Blob,
}

/// What a parameter holds.
#[derive(Clone, Copy)]
enum Value {
    Integer,
    Text,
    OneOf(&'static [&'static str]),
    Schema(SchemaOf),
}

/// A query parameter: name, what it holds, whether it is required, description.
type Query = (&'static str, Value, bool, &'static str);

/// One route of the host API.
struct Row {
    method: HttpMethod,
    path: &'static str,
    /// What it does and who may call it.
    summary: &'static str,
    body: Option<SchemaOf>,
    /// The body may be empty (the defaults).
    body_optional: bool,
    query: &'static [Query],
    answer: Answer,
    /// Refusals beyond 401 (every route: no or a bad token).
    errors: &'static [u16],
}

/// Refusals of a route a role may be refused, whose body or path may be wrong.
const CHECKED: &[u16] = &[400, 403, 404];
/// Refusals of a route about one task: also its state (409), and its node's runner (502).
const ON_TASK: &[u16] = &[400, 403, 404, 409, 502];

const fn row(method: HttpMethod, path: &'static str, summary: &'static str, answer: Answer) -> Row {
    Row {
        method,
        path,
        summary,
        body: None,
        body_optional: false,
        query: &[],
        answer,
        errors: CHECKED,
    }
}

impl Row {
    const fn body(mut self, s: SchemaOf) -> Row {
        self.body = Some(s);
        self
    }
    const fn optional_body(mut self, s: SchemaOf) -> Row {
        self.body = Some(s);
        self.body_optional = true;
        self
    }
    const fn query(mut self, q: &'static [Query]) -> Row {
        self.query = q;
        self
    }
    const fn errors(mut self, e: &'static [u16]) -> Row {
        self.errors = e;
        self
    }
}

use Answer::*;
use HttpMethod::{Delete, Get, Post, Put};

/// Every route of the host API.
fn rows() -> Vec<Row> {
    vec![
        row(Get, "/api/whoami", "The role and person the token carries. Any valid token.", Json(200, named::<wire::WhoAmI>)),
        row(Get, "/api/openapi.json", "This document. Any valid token.", Json(200, |_| ObjectBuilder::new().into())),
        // People and their tokens.
        row(Post, "/api/users", "Add a person; their token is shown once. Admin.", Json(201, named::<wire::NewUser>))
            .body(named::<super::api::AddUser>)
            .errors(&[400, 403, 409]),
        row(Get, "/api/users", "Every person and their unfinished work. Admin.", Json(200, list_of::<wire::UserView>)),
        row(Put, "/api/users/{name}", "Change a person's role or group. Admin.", Empty(204))
            .body(named::<super::api::SetPerson>),
        row(Delete, "/api/users/{name}", "Remove a person; their requests that never ran end. Admin.", Empty(204))
            .errors(&[400, 403, 404, 409]),
        row(Post, "/api/users/{name}/token", "A new token for the person; the old one stops working. Admin, or that person.", Json(201, named::<wire::NewUser>))
            .optional_body(named::<super::api::RotateJoinToken>),
        row(Get, "/api/users/{name}/env", "The person's variables, set in each of their instances. Admin, or that person.", Json(200, string_map)),
        row(Post, "/api/users/{name}/env", "Set or unset the person's variables. Admin, or that person.", Json(200, string_map))
            .body(named::<wire::UserEnvChange>),
        row(Post, "/api/invitations", "A one-time code a person redeems for their token. Admin.", Json(201, named::<wire::Invitation>))
            .body(named::<super::api::Invite>),
        row(Get, "/api/invitations", "Invitations, never their codes. Admin.", Json(200, list_of::<wire::InvitationView>)),
        row(Delete, "/api/invitations/{id}", "Revoke an invitation. Admin.", Empty(204)).errors(&[400, 403, 404, 409]),
        row(Post, "/api/invitations/redeem", "Become a person: the bearer is the invitation's code.", Json(201, named::<wire::NewUser>))
            .body(named::<super::api::Redeem>)
            .errors(&[400, 409]),
        row(Post, "/api/join-token", "A new join token for nodes; the old one stops working. Admin.", Json(201, named::<super::api::JoinTokenView>))
            .optional_body(named::<super::api::RotateJoinToken>),
        row(Post, "/api/metrics-token", "A new token Prometheus scrapes with (shown once). Admin.", Json(201, named::<wire::MetricsToken>)),
        // Quotas.
        row(Get, "/api/quotas", "Quotas and their use: all for the admin, operators and viewers, a user's own for a user. People.", Json(200, list_of::<wire::QuotaView>)),
        row(Put, "/api/quotas/{scope}/{name}", "Set a user's or a group's caps (all absent: remove it). Admin.", Empty(204))
            .body(named::<wire::QuotaCaps>),
        // Nodes.
        row(Get, "/api/nodes", "Every node, its inventory, usage and state. Admin, operators, viewers.", Json(200, list_of::<wire::NodeView>)),
        row(Get, "/api/nodes/{name}", "One node. Admin, operators, viewers.", Json(200, named::<wire::NodeView>)),
        row(Get, "/api/overlay", "The VXLAN overlay: the cluster range and each node's subnet and underlay address. Admin, operators, viewers.", Json(200, named::<wire::OverlayView>)),
        row(Delete, "/api/nodes/{name}", "Forget a node: its credential is revoked and its tasks end; says which VPS keep their disks on that machine. Admin.", Json(200, named::<wire::NodeRemoved>)).errors(&[400, 403, 404, 409]),
        row(Get, "/api/nodes/{name}/runner", "Ask a node's runner whether it answers. Admin.", Json(200, named::<wire::RunnerStatus>))
            .errors(&[400, 403, 404, 502]),
        row(Post, "/api/nodes/register", "A runner joins the cluster. The join token.", Json(201, named::<wire::RegisterResponse>))
            .body(named::<wire::RegisterRequest>)
            .errors(&[400, 403, 409]),
        row(Put, "/api/nodes/{name}/heartbeat", "A runner's heartbeat. That node's credential.", Json(200, named::<wire::HeartbeatReply>))
            .body(named::<wire::HeartbeatRequest>)
            .errors(&[400, 403, 404, 409]),
        row(Get, "/api/nodes/{name}/assignments", "What the node should run (long-poll). That node's credential.", Json(200, named::<wire::Assignments>))
            .query(&[("after", Value::Integer, false, "answer once the revision is past this one"), ("wait_ms", Value::Integer, false, "how long to wait, at most 60000")]),
        row(Put, "/api/nodes/{name}/tasks/{id}", "A runner reports a task's state. That node's credential.", Json(200, named::<TaskView>))
            .body(named::<wire::TaskReport>)
            .errors(&[400, 403, 404, 409]),
        row(Put, "/api/nodes/{name}/tasks/{id}/progress", "How far the node got making an instance. That node's credential.", Empty(204))
            .body(named::<wire::TaskProgress>),
        row(Put, "/api/nodes/{name}/tasks/{id}/expose", "Publish the ports a VPS's image exposes. That node's credential.", Json(200, named::<wire::Placement>))
            .body(named::<ports::ExposeRequest>)
            .errors(&[400, 403, 404, 409, 429]),
        row(Post, "/api/nodes/{name}/tasks/{id}/self", "An instance acts on itself with its key, through its runner. That node's credential.", Json(200, named::<TaskView>))
            .body(named::<crate::api::instance_key::SelfRequest>)
            .errors(&[400, 403, 404, 409]),
        row(Get, "/api/nodes/{name}/environments/{env}", "An environment archive's size and SHA-256 (and an OCI layout's blobs), for a node without the shared directory. That node's credential.", Json(200, named::<wire::EnvironmentArchive>)),
        row(Get, "/api/nodes/{name}/environments/{env}/archive", "The archive's bytes (Range: bytes=N- resumes; x-expect-sha256 must name it, else 412). That node's credential.", Archive)
            .errors(&[400, 403, 404, 412]),
        row(Get, "/api/nodes/{name}/environments/{env}/blobs/{digest}", "One blob of an OCI layout environment archive (its manifest, config or a layer), by sha256:<hex> digest (Range: bytes=N- resumes; x-expect-sha256 must be the digest's hex, else 412). That node's credential.", Blob)
            .errors(&[400, 403, 404, 412]),
        row(Put, "/api/nodes/{name}/tasks/{id}/park", "Park a stopped VPS's snapshot (park_stopped_vps): its id, host key file (hex) and image manifest, and the VPS's snapshots on the node (they follow it). The answer lists the blobs the host lacks (send them, then park again); none: the copy is made. That node's credential.", Json(200, named::<wire::ParkAnswer>))
            .body(named::<wire::ParkRequest>)
            .errors(&[400, 403, 404, 409]),
        row(Put, "/api/nodes/{name}/tasks/{id}/park/blobs/{digest}", "A piece of a blob a park lacks, in order: its bytes from x-upload-offset of x-upload-total; the last piece is checked against the digest. That node's credential.", Empty(204))
            .errors(&[400, 403, 404, 409, 429]),
        row(Get, "/api/nodes/{name}/parked/{id}", "A VPS's parked copy (snapshot, size, SHA-256, host key, its blobs, and its snapshots), for the node it is placed on; for a node making a new VPS from one of its snapshots, that snapshot only, without the host key. That node's credential.", Json(200, named::<wire::ParkedVps>))
            .errors(&[400, 403, 404, 409]),
        row(Get, "/api/nodes/{name}/moves/{id}", "Where a VPS moving to this node node to node (`vps restart --anywhere` while its node is online) is fetched from: the runner of the node it left, a grant for its snapshots there (an hour), and its copy (snapshots and host key). That node's credential.", Json(200, named::<wire::MoveSource>))
            .errors(&[400, 403, 404, 409, 502]),
        row(Get, "/api/nodes/{name}/clones/{id}", "Where the snapshot a new VPS on this node starts from is fetched from, when neither the node nor the host has it: the runner of the node that keeps it, a grant for that snapshot alone (an hour), and the snapshot (no host key). That node's credential.", Json(200, named::<wire::MoveSource>))
            .errors(&[400, 403, 404, 409, 502]),
        row(Delete, "/api/nodes/{name}/left/{id}", "The node removed what a deleted VPS left there when it moved away. That node's credential.", Empty(204))
            .errors(&[400, 403]),
        row(Get, "/api/nodes/{name}/parked/{id}/blobs/{digest}", "One blob of the parked copy (its manifest, config or a layer), by sha256:<hex> digest, from the host's archive (Range: bytes=N- resumes; x-expect-sha256 must be the digest's hex, else 412). That node's credential.", Blob)
            .errors(&[400, 403, 404, 409, 412]),
        // Tasks and VPS.
        row(Post, "/api/tasks", "Submit a command task or a VPS. Admin, operators, users.", Json(201, named::<wire::SubmitResponse>))
            .body(named::<TaskSpec>)
            .errors(&[400, 403, 404, 409, 429, 502]),
        row(Get, "/api/tasks", "Tasks: a user's own, everyone's for the admin, operators and viewers. People.", Json(200, list_of::<TaskView>))
            .query(&[("state", Value::Schema(named::<wire::TaskState>), false, "only tasks in this state"), ("node", Value::Text, false, "only tasks on this node")]),
        row(Get, "/api/tasks/{id}", "One task. Its owner, the admin, operators, viewers.", Json(200, named::<TaskView>)),
        row(Get, "/api/tasks/{id}/logs", "A task's output from an offset. Its owner and the admin.", Log)
            .query(&[("stream", Value::OneOf(&wire::LOG_STREAMS), false, "which output (default stdout)"), ("offset", Value::Integer, false, "the first byte to read")])
            .errors(ON_TASK),
        row(Get, "/api/tasks/{id}/exec", "A websocket to a command in the instance (the exec protocol). Its owner and the admin.", WebSocket).errors(ON_TASK),
        row(Get, "/api/tasks/{id}/forward", "A websocket to a port of the instance. Its owner and the admin.", WebSocket)
            .query(&[("port", Value::Integer, true, "the instance's port"), ("proto", Value::OneOf(&["tcp", "udp"]), false, "tcp (default) or udp")])
            .errors(ON_TASK),
        row(Post, "/api/tasks/{id}/kill", "End a task. Its owner, the admin, operators.", Json(200, named::<TaskView>)).errors(ON_TASK),
        row(Post, "/api/tasks/{id}/stop", "Stop a VPS, keeping its disk. Its owner, the admin, operators.", Json(200, named::<TaskView>)).errors(ON_TASK),
        row(Post, "/api/tasks/{id}/pause", "Freeze an instance. Its owner, the admin, operators.", Json(200, named::<TaskView>)).errors(ON_TASK),
        row(Post, "/api/tasks/{id}/resume", "Thaw an instance. Its owner, the admin, operators.", Json(200, named::<TaskView>)).errors(ON_TASK),
        row(Post, "/api/tasks/{id}/delete", "Delete a VPS with its disk and snapshots. Its owner and the admin.", Json(200, named::<TaskView>)).errors(ON_TASK),
        row(Post, "/api/tasks/{id}/restart", "Start a stopped VPS again, from a snapshot, or on any node from its parked copy (anywhere). Its owner, the admin, operators.", Json(200, named::<TaskView>))
            .optional_body(named::<wire::RestartRequest>)
            .errors(&[400, 403, 404, 409, 429, 502]),
        row(Post, "/api/tasks/{id}/approve", "Let a request that waits for approval run. Admin, operators.", Json(200, named::<TaskView>)).errors(ON_TASK),
        row(Post, "/api/tasks/{id}/reject", "Refuse a request that waits for approval. Admin, operators.", Json(200, named::<TaskView>))
            .body(named::<super::tasks::RejectRequest>)
            .errors(ON_TASK),
        row(Post, "/api/tasks/{id}/idle-exempt", "Exempt a VPS from idle-GPU reclamation, or no longer. Admin, operators.", Json(200, named::<TaskView>))
            .body(named::<super::tasks::ExemptRequest>)
            .errors(ON_TASK),
        row(Get, "/api/environments", "Environments in the shared directory, and the defaults. People.", Json(200, named::<wire::Environments>)),
        // Snapshots.
        row(Post, "/api/vps/snapshots/{id}", "Snapshot a VPS. Its owner and the admin.", Json(201, named::<wire::SnapshotView>))
            .optional_body(named::<wire::SnapshotRequest>)
            .errors(ON_TASK),
        row(Get, "/api/vps/snapshots/{id}", "A VPS's snapshots, oldest first: its node's, or, while that node is offline or removed, those the host keeps of it (stopped and parked; node \"host\"). Its owner and the admin.", Json(200, list_of::<wire::SnapshotView>)).errors(ON_TASK),
        row(Get, "/api/vps/snapshots/{id}/latest", "A VPS's newest snapshot. Its owner and the admin.", Json(200, named::<wire::SnapshotView>)).errors(ON_TASK),
        row(Delete, "/api/vps/snapshots/{id}/{snapshot}", "Delete a snapshot. Its owner and the admin.", Empty(204)).errors(ON_TASK),
        row(Get, "/metrics", "Prometheus metrics (OpenMetrics when asked for). The metrics token, the admin, operators, viewers.", Metrics),
    ]
}

/// Why a refusal happened, as the document says it.
fn refusal(code: u16) -> &'static str {
    match code {
        400 => "the request is malformed; `error` names the field",
        401 => "no token, or one that is invalid, expired or revoked",
        403 => "the token's role may not do this",
        404 => "no such thing, or not one the caller may see",
        409 => "not in a state that allows this; `error` says what to do",
        412 => "the archive changed since the digest the caller names",
        429 => "a limit or quota is reached",
        502 => "the node's runner did not answer as it should",
        _ => "refused",
    }
}

/// The document for every route.
pub fn document() -> OpenApi {
    let mut schemas: Schemas = Vec::new();
    let error = named::<wire::ErrorBody>(&mut schemas);
    let mut paths = PathsBuilder::new();
    for r in rows() {
        let mut op = OperationBuilder::new()
            .summary(Some(r.summary))
            .operation_id(Some(operation_id(r.method.clone(), r.path)));
        for name in path_params(r.path) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(value_schema(path_param(r.path, name), &mut schemas))),
            );
        }
        for (name, value, required, what) in r.query {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Query)
                    .required(if *required {
                        Required::True
                    } else {
                        Required::False
                    })
                    .description(Some(*what))
                    .schema(Some(value_schema(*value, &mut schemas))),
            );
        }
        if let Some(body) = r.body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(body(&mut schemas)))
                            .build(),
                    )
                    .required(Some(if r.body_optional {
                        Required::False
                    } else {
                        Required::True
                    }))
                    .build(),
            ));
        }
        let mut responses = ResponsesBuilder::new();
        responses = match r.answer {
            Json(code, s) => responses.response(
                code.to_string(),
                ResponseBuilder::new()
                    .description("done")
                    .content("application/json", ContentBuilder::new().schema(Some(s(&mut schemas))).build()),
            ),
            Empty(code) => responses.response(code.to_string(), ResponseBuilder::new().description("done")),
            Log => responses.response(
                "200",
                ResponseBuilder::new()
                    .description("the log's bytes from `offset`; the `x-next-offset` header is where to read next")
                    .content("application/octet-stream", ContentBuilder::new().build()),
            ),
            Metrics => responses.response(
                "200",
                ResponseBuilder::new()
                    .description("Prometheus text; OpenMetrics when the Accept header asks for it")
                    .content("text/plain", ContentBuilder::new().build())
                    .content("application/openmetrics-text", ContentBuilder::new().build()),
            ),
            Archive | Blob => {
                let (what, content_type) = match r.answer {
                    Archive => ("archive", "application/x-tar"),
                    _ => ("blob", "application/octet-stream"),
                };
                responses
                    .response(
                        "200",
                        ResponseBuilder::new()
                            .description(format!(
                                "the whole {what}; `x-content-sha256` is its digest"
                            ))
                            .content(content_type, ContentBuilder::new().build()),
                    )
                    .response(
                        "206",
                        ResponseBuilder::new()
                            .description(format!("the {what} from the range's start"))
                            .content(content_type, ContentBuilder::new().build()),
                    )
            }
            WebSocket => responses.response(
                "101",
                ResponseBuilder::new().description(
                    "the websocket; without `Upgrade: websocket` the answer is 400. A browser, \
                     which cannot send an Authorization header here, offers the subprotocols \
                     `rivernode.exec` and `rivernode.bearer.<token>`",
                ),
            ),
        };
        // No `default` answer: each status a route gives is listed, so a
        // tool that checks answers against the document (schemathesis's
        // status_code_conformance) catches one that is not. A method the
        // route lacks (405) and a fault of the host (500) have the same
        // error body, and are no part of a route's contract.
        let mut codes = r.errors.to_vec();
        codes.push(401);
        codes.sort_unstable();
        codes.dedup();
        for code in codes {
            responses = responses.response(
                code.to_string(),
                ResponseBuilder::new().description(refusal(code)).content(
                    "application/json",
                    ContentBuilder::new().schema(Some(error.clone())).build(),
                ),
            );
        }
        let item = PathItem::new(r.method, op.responses(responses.build()).build());
        paths = paths.path(r.path, item);
    }
    // Each schema once, in a stable order.
    schemas.sort_by(|a, b| a.0.cmp(&b.0));
    schemas.dedup_by(|a, b| a.0 == b.0);
    let bearer = SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("rivernode host API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Every route takes `Authorization: Bearer <token>`: a person's, a node's, \
                     the join token, the metrics token, or (redeem only) an invitation's code.",
                )),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .schemas_from_iter(schemas)
                .security_scheme("bearer", bearer)
                .build(),
        ))
        .security(Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]))
        .build()
}

/// What the path parameter `name` of `path` holds.
fn path_param(path: &str, name: &str) -> Value {
    match name {
        // An invitation's id is the first 12 hex digits of its code's hash.
        "id" if path.starts_with("/api/invitations/") => Value::Text,
        "id" => Value::Integer,
        "scope" => Value::Schema(named::<wire::QuotaScope>),
        _ => Value::Text,
    }
}

fn value_schema(v: Value, schemas: &mut Schemas) -> RefOr<Schema> {
    match v {
        Value::Integer => ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .minimum(Some(0))
            .into(),
        Value::Text => ObjectBuilder::new().schema_type(Type::String).into(),
        Value::OneOf(values) => ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(values.iter().copied()))
            .into(),
        Value::Schema(s) => s(schemas),
    }
}

/// `{name}` segments of a path, in order.
fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
}

/// `post_api_tasks_id_kill`: unique per route, stable, readable.
fn operation_id(method: HttpMethod, path: &str) -> String {
    let verb = match method {
        Get => "get",
        Post => "post",
        Put => "put",
        Delete => "delete",
        _ => "other",
    };
    let rest: String = path
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let mut id = format!("{verb}{rest}");
    while id.contains("__") {
        id = id.replace("__", "_");
    }
    id.trim_end_matches('_').to_string()
}

/// The document as JSON, made once.
pub fn json() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        document()
            .to_json()
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_once_with_its_parameters() {
        let doc: serde_json::Value = serde_json::from_str(json()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for r in rows() {
            let verb = operation_id(r.method.clone(), "/")
                .trim_end_matches('_')
                .to_string();
            assert!(
                seen.insert((verb.clone(), r.path)),
                "{verb} {} twice",
                r.path
            );
            let op = &doc["paths"][r.path][&verb];
            assert!(op.is_object(), "{verb} {} missing", r.path);
            let named: Vec<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(named, path_params(r.path).collect::<Vec<_>>(), "{}", r.path);
            assert!(
                op["responses"]["401"].is_object(),
                "{} documents no 401",
                r.path
            );
        }
    }

    #[test]
    fn every_schema_a_route_names_is_in_the_document() {
        let text = json();
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "TaskSpec",
            "TaskView",
            "ImageSource",
            "Placement",
            "NodeView",
            "Inventory",
            "Gpu",
            "ErrorBody",
        ] {
            assert!(schemas.contains_key(name), "{name} missing");
        }
        // Every $ref resolves.
        for (i, _) in text.match_indices("#/components/schemas/") {
            let name: String = text[i + 21..].chars().take_while(|c| *c != '"').collect();
            assert!(schemas.contains_key(&name), "dangling $ref {name}");
        }
    }

    #[test]
    fn operation_ids_read_as_the_route() {
        assert_eq!(
            operation_id(Post, "/api/tasks/{id}/kill"),
            "post_api_tasks_id_kill"
        );
        assert_eq!(operation_id(Get, "/metrics"), "get_metrics");
    }
}
