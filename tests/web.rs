//! What a browser and an API client see of the host: its OpenAPI document
//! checked against the live host by schemathesis, and the web dashboard
//! driven in Debian's Chromium by playwright-core.

mod common;

use std::path::Path;
use std::process::Command;

use common::cluster::{self, private_namespaces};
use common::*;

const SCHEMATHESIS: &str = "/opt/rivernode-test/schemathesis/bin/schemathesis";

/// schemathesis (PyPI) sends what the document allows, and much it does
/// not, to every route as the admin, for a bounded time: no answer may be a
/// 5xx, and every answer's status, content type and body must be the ones
/// the document gives for that route.
#[test]
fn schemathesis_finds_no_server_error_and_nothing_undocumented() {
    if !real_part_available("schemathesis", Path::new(SCHEMATHESIS).exists()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(shared.join("environments")).unwrap();
    std::fs::write(shared.join("environments/base.tar"), "").unwrap();
    let (host, url) = start_host_with(tmp.path(), &["--shared-dir", shared.to_str().unwrap()]);
    let admin = read_trimmed(&tmp.path().join("host/admin.token")).unwrap();
    // A node (it never heartbeats), and something for the task routes to
    // find: a VPS placed there.
    // A real runner (degraded: it has no containerd), so that the routes
    // that ask a node's runner get its answers.
    let _runner = start_runner(
        tmp.path(),
        "runner",
        &url,
        &tmp.path().join("host/join.token"),
        "node-a",
    );
    let hd = tmp.path().join("host");
    wait_for("node-a", || {
        nodes(&hd).iter().find(|n| alive(n)).map(|_| ())
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = cli(&[
        "--host",
        &url,
        "--token",
        &admin,
        "vps",
        "create",
        "--container",
        "base",
        "--no-ssh",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let doc = tmp.path().join("openapi.json");
    let text = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!("{url}/api/openapi.json"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.text().await.unwrap()
    });
    std::fs::write(&doc, &text).unwrap();
    // Two runs: the coverage phase (boundary values of every parameter and
    // field) leaves out the submit route, where schemathesis 4.32.5 trips
    // over its own generator ("FlakyFailure" in hypothesis, a runtime error
    // of the tool, not an answer of ours); fuzzing and the stateful phase
    // cover every route, submit included.
    let runs: [&[&str]; 2] = [
        &[
            "--phases",
            "coverage",
            "--exclude-operation-id",
            "post_api_tasks",
            "--max-time",
            "120",
        ],
        &["--phases", "examples,fuzzing,stateful", "--max-time", "90"],
    ];
    for phases in runs {
        let out = Command::new("timeout")
            .args(["600", SCHEMATHESIS, "run"])
            .arg(&doc)
            .args(["--url", &url])
            .args(["--header", &format!("Authorization: Bearer {admin}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(phases)
            .args(["--max-examples", "30", "--workers", "2", "--seed", "1"])
            .args(["--no-color", "--suppress-health-check", "all"])
            // The admin's own token stays: a rotated one would end the run.
            .args(["--exclude-path-regex", "^/api/users/\\{name\\}/token$"])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let report = format!("{}{}", stdout(&out), stderr(&out));
        assert_ne!(
            out.status.code(),
            Some(124),
            "schemathesis {phases:?} timed out:\n{report}"
        );
        assert!(
            out.status.success(),
            "schemathesis {phases:?} found problems:\n{report}\nhost log:\n{}",
            host.log_text()
        );
        // It ran (a run that tested nothing also exits 0).
        assert!(report.contains(" passed"), "{report}");
        eprintln!(
            "{}",
            report
                .lines()
                .filter(|l| l.contains("passed") || l.contains("Operations"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// The dashboard as a person uses it, in Debian's Chromium driven by
/// playwright-core (`web/tests/dashboard.mjs`): ann signs in with her
/// token, does not see bob's VPS, creates one of her own and sees it
/// `running`, types `echo hi` in its terminal and reads `hi`, stops and
/// deletes it; the admin then sees the node and bob's VPS. Screenshots of
/// the main pages go to `target/dashboard-screenshots`.
#[test]
fn the_dashboard_signs_in_creates_a_vps_opens_its_terminal_and_deletes_it() {
    let chromium = Path::new("/usr/bin/chromium");
    let playwright = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/node_modules/playwright-core");
    if !real_part_available(
        "Debian's chromium and web/node_modules (npm ci in web/)",
        chromium.exists() && playwright.is_dir() && command_exists("node"),
    ) || !cluster::parts_present()
    {
        return;
    }
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    private_namespaces(move || {
        // Users' VPS run without waiting for an operator here.
        let Some(v) = cluster::Vps::start_with("n1", &["--approval", "none"]) else {
            return;
        };
        let ann = v.add_user("ann");
        let bob = v.add_user("bob");
        let key = v.dir.path().join("web_key");
        let o = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let o = v.rn_as(
            &bob,
            &[
                "-o",
                "json",
                "vps",
                "create",
                "--container",
                "busybox",
                "--public-key-string",
                public.trim(),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let bobs = cluster::created_id(&o);
        v.wait_state(&bobs, "running");
        let admin = read_trimmed(&v.host_data().join("admin.token")).unwrap();

        let out = Command::new("timeout")
            .args(["600", "node", "web/tests/dashboard.mjs"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RIVERNODE_URL", &v.url)
            .env("ADMIN_TOKEN", &admin)
            .env("USER_TOKEN", &ann)
            .env("OTHER_TOKEN", &bob)
            .env("OTHER_TASK", &bobs)
            .env("IMAGE_KIND", "environment")
            .env("IMAGE", "busybox")
            .env("SSH_KEY", public.trim())
            .env("SCREENSHOTS", &shots)
            .env("CHROMIUM", chromium)
            .output()
            .unwrap();
        let said = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            out.status.success() && said.contains("dashboard: ok"),
            "the dashboard test failed:\n{said}\n{}",
            v.logs()
        );
        for png in ["signin.png", "instances.png", "terminal.png", "nodes.png"] {
            let len = std::fs::metadata(shots.join(png))
                .map(|m| m.len())
                .unwrap_or(0);
            assert!(len > 1000, "{png}: {len} bytes");
        }
        // What the page did went through the API: ann's VPS is deleted, bob's runs.
        let anns = said
            .lines()
            .find_map(|l| l.strip_prefix("dashboard: created VPS "))
            .expect("the script names the VPS it created")
            .trim()
            .to_string();
        assert_eq!(v.state(&anns), "deleted");
        assert_eq!(v.state(&bobs), "running");
    });
}

/// The page and its bundles answer without a token, with the policy that
/// keeps injected text from running; nothing else does. axum's own
/// refusals (a path that does not parse, a method a route lacks) are JSON
/// like every other refusal.
#[test]
fn the_page_is_public_with_its_policy_and_every_refusal_is_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let admin = read_trimmed(&tmp.path().join("host/admin.token")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        for (path, kind) in [
            ("/", "text/html"),
            ("/assets/app.js", "text/javascript"),
            ("/assets/app.css", "text/css"),
        ] {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let h = r.headers();
            assert!(
                h["content-type"].to_str().unwrap().starts_with(kind),
                "{path}"
            );
            let csp = h["content-security-policy"].to_str().unwrap();
            assert!(
                csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
                "{csp}"
            );
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert!(
                r.bytes().await.unwrap().len() > 100,
                "{path} has its bundle"
            );
        }
        // Anything else without a token is refused.
        for path in ["/assets/other.js", "/index.html", "/api/openapi.json"] {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
        }
        // A task id that is not a number, and a method the route lacks.
        let r = http
            .get(format!("{url}/api/tasks/abc"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("abc"), "{body}");
        let r = http
            .patch(format!("{url}/api/tasks"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
        assert!(
            r.headers().contains_key("allow"),
            "the allowed methods are kept"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
    });
}

/// A browser cannot send Authorization on a websocket: it offers its token
/// as the subprotocol `rivernode.bearer.<token>`. A good token gets past
/// authentication (to the task check: 404 for a task that does not exist),
/// a bad one does not, and a plain request cannot use the subprotocol way.
#[test]
fn a_browser_websocket_names_its_token_as_a_subprotocol() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error;
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let admin = read_trimmed(&tmp.path().join("host/admin.token")).unwrap();
    let ws_url = format!("{}/api/tasks/999/exec", url.replacen("http", "ws", 1));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let status_with = |token: String| {
            let ws_url = ws_url.clone();
            async move {
                let mut req = ws_url.into_client_request().unwrap();
                req.headers_mut().insert(
                    "sec-websocket-protocol",
                    format!("rivernode.exec, rivernode.bearer.{token}")
                        .parse()
                        .unwrap(),
                );
                match tokio_tungstenite::connect_async(req).await {
                    Err(Error::Http(resp)) => resp.status().as_u16(),
                    other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
                }
            }
        };
        assert_eq!(status_with(admin.clone()).await, 404, "the token was taken");
        assert_eq!(status_with("rnadm_not_a_token".into()).await, 401);
        // Not an upgrade: the subprotocol header carries no credential.
        let r = reqwest::Client::new()
            .get(format!("{url}/api/whoami"))
            .header(
                "sec-websocket-protocol",
                format!("rivernode.bearer.{admin}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    });
}
