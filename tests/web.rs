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
        // What the page did went through the API: ann's VPS is gone, bob's runs.
        assert_eq!(v.state(&bobs), "running");
    });
}
