//! Every route of the host API against every kind of caller: anonymous, a
//! bad token, the join token, one node's credential on another node's
//! routes, one user on another user's task, that task's owner, the
//! metrics token, and the admin. The table below is the expected access; the routes themselves
//! are read from the router's source, so a route added without a row here
//! fails this test.

mod common;

use common::*;
use reqwest::{Method, StatusCode};

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Access {
    /// Any valid token.
    Anyone,
    Admin,
    /// Every person: the admin, users, operators, viewers.
    People,
    /// People who may submit work: not viewers.
    Submit,
    /// Those who read the cluster: the admin, operators, viewers.
    Readers,
    /// The admin and operators.
    Operators,
    /// A task route everyone who may see the task may call: its owner, the
    /// admin, operators and viewers; other users see 404.
    Seen,
    /// A task route that changes it: its owner, the admin, operators;
    /// viewers get 403, other users 404.
    Operated,
    /// A task's owner and the admin; everyone else sees 404.
    Owner,
    Join,
    /// The node named in the path, with its own credential.
    OwnNode,
    /// The admin, and the user the path names (bob, the task's owner).
    OwnUser,
    /// An invitation's code, which no caller here holds.
    Invite,
    /// `/metrics`: the metrics token, and the admin, operators and viewers.
    Scrape,
    /// The dashboard's static page and assets (no data): anyone, no token
    /// or a bad one too. Not in the API document.
    Public,
}

/// (method, path with `{node}`, `{task}`, `{user}` placeholders, access).
const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/api/whoami", Access::Anyone),
    ("GET", "/api/openapi.json", Access::Anyone),
    ("POST", "/api/users", Access::Admin),
    ("GET", "/api/users", Access::Admin),
    ("DELETE", "/api/users/{user}", Access::Admin),
    ("GET", "/api/nodes", Access::Readers),
    ("GET", "/api/nodes/{node}", Access::Readers),
    ("GET", "/api/overlay", Access::Readers),
    ("DELETE", "/api/nodes/{node}", Access::Admin),
    ("POST", "/api/join-token", Access::Admin),
    ("GET", "/api/nodes/{node}/runner", Access::Admin),
    ("POST", "/api/nodes/register", Access::Join),
    ("PUT", "/api/nodes/{node}/heartbeat", Access::OwnNode),
    ("GET", "/api/nodes/{node}/assignments", Access::OwnNode),
    ("PUT", "/api/nodes/{node}/tasks/{task}", Access::OwnNode),
    (
        "PUT",
        "/api/nodes/{node}/tasks/{task}/progress",
        Access::OwnNode,
    ),
    (
        "PUT",
        "/api/nodes/{node}/tasks/{task}/expose",
        Access::OwnNode,
    ),
    (
        "POST",
        "/api/nodes/{node}/tasks/{task}/self",
        Access::OwnNode,
    ),
    (
        "GET",
        "/api/nodes/{node}/environments/{env}",
        Access::OwnNode,
    ),
    (
        "GET",
        "/api/nodes/{node}/environments/{env}/archive",
        Access::OwnNode,
    ),
    (
        "GET",
        "/api/nodes/{node}/environments/{env}/blobs/{digest}",
        Access::OwnNode,
    ),
    (
        "PUT",
        "/api/nodes/{node}/tasks/{task}/park",
        Access::OwnNode,
    ),
    (
        "PUT",
        "/api/nodes/{node}/tasks/{task}/park/blobs/{digest}",
        Access::OwnNode,
    ),
    ("GET", "/api/nodes/{node}/parked/{task}", Access::OwnNode),
    ("GET", "/api/nodes/{node}/moves/{task}", Access::OwnNode),
    ("GET", "/api/nodes/{node}/clones/{task}", Access::OwnNode),
    ("DELETE", "/api/nodes/{node}/left/{task}", Access::OwnNode),
    (
        "GET",
        "/api/nodes/{node}/parked/{task}/blobs/{digest}",
        Access::OwnNode,
    ),
    ("POST", "/api/tasks", Access::Submit),
    ("GET", "/api/tasks", Access::People),
    ("GET", "/api/environments", Access::People),
    ("GET", "/api/tasks/{task}", Access::Seen),
    ("GET", "/api/tasks/{task}/logs", Access::Owner),
    ("GET", "/api/tasks/{task}/exec", Access::Owner),
    ("GET", "/api/tasks/{task}/forward", Access::Owner),
    ("POST", "/api/tasks/{task}/kill", Access::Operated),
    ("POST", "/api/tasks/{task}/delete", Access::Owner),
    ("POST", "/api/tasks/{task}/approve", Access::Operators),
    ("POST", "/api/tasks/{task}/idle-exempt", Access::Operators),
    ("POST", "/api/tasks/{task}/reject", Access::Operators),
    ("POST", "/api/tasks/{task}/pause", Access::Operated),
    ("POST", "/api/tasks/{task}/resume", Access::Operated),
    ("POST", "/api/tasks/{task}/stop", Access::Operated),
    ("POST", "/api/tasks/{task}/restart", Access::Operated),
    ("POST", "/api/vps/snapshots/{task}", Access::Owner),
    ("GET", "/api/vps/snapshots/{task}", Access::Owner),
    ("GET", "/api/vps/snapshots/{task}/latest", Access::Owner),
    (
        "DELETE",
        "/api/vps/snapshots/{task}/{snapshot}",
        Access::Owner,
    ),
    ("PUT", "/api/quotas/{scope}/{user}", Access::Admin),
    ("POST", "/api/invitations", Access::Admin),
    ("POST", "/api/metrics-token", Access::Admin),
    // Prometheus's path.
    ("GET", "/metrics", Access::Scrape),
    // The dashboard's page and assets: what signs a person in, so no token.
    ("GET", "/", Access::Public),
    ("GET", "/assets/app.js", Access::Public),
    ("GET", "/assets/app.css", Access::Public),
    ("GET", "/api/invitations", Access::Admin),
    ("DELETE", "/api/invitations/{invitation}", Access::Admin),
    ("PUT", "/api/users/{user}", Access::Admin),
    ("POST", "/api/invitations/redeem", Access::Invite),
    ("GET", "/api/quotas", Access::People),
    ("GET", "/api/users/{bob}/env", Access::OwnUser),
    ("POST", "/api/users/{bob}/env", Access::OwnUser),
    // Last: bob's own call revokes the token he makes it with.
    ("POST", "/api/users/{bob}/token", Access::OwnUser),
];

/// The callers, in the order they are tried (the admin last: its calls change things).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Caller {
    Anonymous,
    BadToken,
    Join,
    /// node-a's credential (on node-b's routes).
    OtherNode,
    /// node-b's credential on its own routes.
    Node,
    /// vera, a viewer.
    Viewer,
    /// olga, an operator.
    Operator,
    /// alice, on bob's task.
    OtherUser,
    /// bob, who owns the task.
    User,
    /// The cluster's metrics token (Prometheus's).
    Metrics,
    Admin,
}

const CALLERS: [Caller; 11] = [
    Caller::Anonymous,
    Caller::BadToken,
    Caller::Join,
    Caller::OtherNode,
    Caller::Node,
    Caller::Viewer,
    Caller::Operator,
    Caller::OtherUser,
    Caller::User,
    Caller::Metrics,
    Caller::Admin,
];

/// What a caller must get: `Some(status)`, or `None` for "let in" (any
/// answer but 401, 403 and a 404 that says the task is not there for them).
fn expected(access: Access, caller: Caller) -> Option<StatusCode> {
    use Access as A;
    use Caller::*;
    let person = matches!(caller, Viewer | Operator | OtherUser | User | Admin);
    match (caller, access) {
        (_, A::Public) => Some(StatusCode::OK),
        (Anonymous | BadToken, _) | (_, A::Invite) => Some(StatusCode::UNAUTHORIZED),
        (_, A::Anyone) => None,
        (Join, A::Join) | (Node, A::OwnNode) => None,
        (Admin, A::Join | A::OwnNode) => Some(StatusCode::FORBIDDEN),
        (Admin, _) => None,
        (_, A::People) if person => None,
        (Viewer, A::Submit) => Some(StatusCode::FORBIDDEN),
        (_, A::Submit) if person => None,
        (Operator | Viewer, A::Readers) | (Operator, A::Operators) => None,
        (Metrics | Operator | Viewer, A::Scrape) => None,
        (User, A::Seen | A::Operated | A::Owner | A::OwnUser) => None,
        (Operator, A::Seen | A::Operated) | (Viewer, A::Seen) => None,
        (Viewer, A::Operated) => Some(StatusCode::FORBIDDEN),
        // Someone else's task looks like no task at all.
        (OtherUser, A::Seen | A::Operated | A::Owner) => Some(StatusCode::NOT_FOUND),
        (Operator | Viewer, A::Owner) => Some(StatusCode::NOT_FOUND),
        _ => Some(StatusCode::FORBIDDEN),
    }
}

/// An OCI layout archive of one image (an empty config, one empty layer)
/// at `path`; its manifest's digest.
fn tiny_layout(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let (config, layer) = (b"{}".to_vec(), Vec::new());
    let desc = |b: &[u8]| serde_json::json!({"digest": digest(b), "size": b.len()});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "config": desc(&config), "layers": [desc(&layer)],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({"manifests": [desc(&manifest)]})).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("index.json".into(), &index);
    for b in [&manifest, &config, &layer] {
        add(format!("blobs/sha256/{}", &digest(b)[7..]), b);
    }
    tar.finish().unwrap();
    digest(&manifest)
}

/// Every (method, path) of a `.route("...", get(..).post(..))` in the
/// host's router sources.
fn routes_in_source() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in [
        "src/host/api.rs",
        "src/host/tasks.rs",
        "src/host/snapshots.rs",
        "src/host/environments.rs",
        "src/host/parked.rs",
        "src/host/dashboard.rs",
    ] {
        let text = std::fs::read_to_string(f).unwrap();
        for part in text.split(".route(").skip(1) {
            let Some(start) = part.find('"') else {
                continue;
            };
            let rest = &part[start + 1..];
            let path = &rest[..rest.find('"').unwrap()];
            // The method router: up to the parenthesis that closes `.route(`.
            let mut depth = 1;
            let end = part
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(part.len());
            let router = &part[start + 1 + path.len() + 1..end];
            let before_ok = |i: usize| {
                i == 0
                    || !router.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && router.as_bytes()[i - 1] != b'_'
            };
            for method in ["get", "post", "put", "delete", "patch"] {
                let call = format!("{method}(");
                let found = router.match_indices(&call).any(|(i, _)| before_ok(i));
                if found {
                    out.push((method.to_ascii_uppercase(), path.to_string()));
                }
            }
        }
    }
    out
}

/// A path with every `{placeholder}` made `{}`.
fn shape(path: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push('{');
            }
            '}' => {
                inside = false;
                out.push('}');
            }
            _ if inside => {}
            c => out.push(c),
        }
    }
    out
}

async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> StatusCode {
    let mut req =
        reqwest::Client::new().request(Method::from_bytes(method.as_bytes()).unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.expect("request").status()
}

#[test]
fn every_route_matches_the_matrix_and_every_route_has_a_row() {
    let in_source = routes_in_source();
    for (method, path) in &in_source {
        assert!(
            ROUTES
                .iter()
                .any(|(m, p, _)| m == method && shape(p) == shape(path)),
            "route {method} {path} has no row in the matrix"
        );
    }
    for (method, path, _) in ROUTES {
        assert!(
            in_source
                .iter()
                .any(|(m, p)| m == method && shape(p) == shape(path)),
            "the matrix's {method} {path} is no route of the source: {in_source:?}"
        );
    }
    assert!(
        in_source.len() >= 20,
        "the scan found the routes: {in_source:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(shared.join("environments")).unwrap();
    let manifest = tiny_layout(&shared.join("environments/base.tar"));
    let (_host, url) = start_host_with(tmp.path(), &["--shared-dir", shared.to_str().unwrap()]);
    let host_data = tmp.path().join("host");
    let hd = host_data.to_str().unwrap();
    let admin = read_trimmed(&host_data.join("admin.token")).unwrap();
    let join = read_trimmed(&host_data.join("join.token")).unwrap();
    let add_user = |name: &str, role: &str| {
        let o = cli(&[
            "--data-dir",
            hd,
            "-o",
            "json",
            "user",
            "add",
            name,
            "--role",
            role,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let (alice, bob) = (add_user("alice", "user"), add_user("bob", "user"));
    let (olga, vera) = (add_user("olga", "operator"), add_user("vera", "viewer"));
    let o = cli(&["--data-dir", hd, "-o", "json", "token", "metrics"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let scraper = v["token"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let node_a = register(&url, &join, "node-a").await;
        let node_b = register(&url, &join, "node-b").await;
        let spec = serde_json::json!({
            "command": [], "image": {"environment": "base"}, "kind": "vps", "target": {"node": "node-b", "numa": null, "gpus": []},
        });
        let r = reqwest::Client::new()
            .post(format!("{url}/api/tasks"))
            .bearer_auth(&bob)
            .json(&spec)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let task = v["id"].as_u64().unwrap().to_string();

        let mut failures = Vec::new();
        for caller in CALLERS {
            let token = match caller {
                Caller::Anonymous => None,
                Caller::BadToken => Some("rnadm_not_a_token"),
                Caller::Join => Some(join.as_str()),
                Caller::OtherNode => Some(node_a.as_str()),
                Caller::Node => Some(node_b.as_str()),
                Caller::Viewer => Some(vera.as_str()),
                Caller::Operator => Some(olga.as_str()),
                Caller::OtherUser => Some(alice.as_str()),
                Caller::User => Some(bob.as_str()),
                Caller::Metrics => Some(scraper.as_str()),
                Caller::Admin => Some(admin.as_str()),
            };
            for (method, path, access) in ROUTES {
                // The admin's destructive calls aim at nothing that matters.
                let (node, user) = match (caller, *method) {
                    (Caller::Admin, "DELETE") => ("ghost", "nobody"),
                    _ => ("node-b", "nobody"),
                };
                // The admin rotates nobody's token (404), others try bob's.
                let bob_name = if caller == Caller::Admin { "nobody" } else { "bob" };
                let p = path
                    .replace("{bob}", bob_name)
                    .replace("{node}", node)
                    .replace("{task}", &task)
                    .replace("{user}", user)
                    .replace("{scope}", "user")
                    .replace("{snapshot}", "1")
                    .replace("{invitation}", "000000000000")
                    .replace("{env}", "base")
                    .replace("{digest}", &manifest);
                let body = (*method != "GET" && *method != "DELETE").then(|| serde_json::json!({}));
                let got = call(method, &format!("{url}{p}"), token, body).await;
                let ok = match expected(*access, caller) {
                    Some(want) => got == want,
                    None => {
                        got != StatusCode::UNAUTHORIZED
                            && got != StatusCode::FORBIDDEN
                            && !(caller != Caller::Admin && got == StatusCode::NOT_FOUND)
                    }
                };
                if !ok {
                    failures.push(format!(
                        "{method} {path} as {caller:?}: got {got}, expected {}",
                        expected(*access, caller)
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "to be let in".into())
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));

        // The OpenAPI document describes every route, each with its method.
        let doc: serde_json::Value = reqwest::Client::new()
            .get(format!("{url}/api/openapi.json"))
            .bearer_auth(&vera)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let described: Vec<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.to_ascii_uppercase(), shape(path)))
            })
            .collect();
        let api = || ROUTES.iter().filter(|(_, _, a)| *a != Access::Public);
        let missing: Vec<String> = api()
            .filter(|(m, p, _)| !described.contains(&(m.to_string(), shape(p))))
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect();
        assert!(missing.is_empty(), "not in /api/openapi.json: {missing:?}");
        assert_eq!(described.len(), api().count(), "described: {described:?}");
    });
}
