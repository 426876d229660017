//! Every route of the host and runner APIs is authenticated, and each token
//! can do only what its role allows.

mod common;

use common::*;
use reqwest::StatusCode;

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn host_api_requires_a_valid_token_with_the_right_role() {
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let admin = read_trimmed(&host_data.join("admin.token")).unwrap();
    let join = read_trimmed(&host_data.join("join.token")).unwrap();
    use reqwest::Method as M;

    for path in [
        "/api/nodes",
        "/api/whoami",
        "/api/nodes/x",
        "/api/no-such-route",
    ] {
        let (s, body) = call(M::GET, &format!("{url}{path}"), None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} without token");
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
        let (s, _) = call(M::GET, &format!("{url}{path}"), Some("rnadm_wrong"), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} with a wrong token");
    }
    let (s, body) = call(M::GET, &format!("{url}/api/whoami"), Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["role"], "admin");

    // The join token registers nodes and nothing else.
    let (s, _) = call(M::GET, &format!("{url}/api/nodes"), Some(&join), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The admin token cannot register a node.
    let (s, _) = call(
        M::POST,
        &format!("{url}/api/nodes/register"),
        Some(&admin),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Bad bodies are 400s that name the problem.
    let (s, body) = call(
        M::POST,
        &format!("{url}/api/nodes/register"),
        Some(&join),
        Some(serde_json::json!({"name": "x"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("runner_url"),
        "{body}"
    );

    // Users: the admin adds them; a user token reaches tasks, not the cluster's administration.
    for (body, field) in [
        (serde_json::json!({"name": "Bad Name"}), "name"),
        (serde_json::json!({"name": "admin"}), "admin"),
        (serde_json::json!({"nom": "x"}), "nom"),
    ] {
        let (s, b) = call(
            M::POST,
            &format!("{url}/api/users"),
            Some(&admin),
            Some(body),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(b["error"].as_str().unwrap().contains(field), "{b}");
    }
    let (s, b) = call(
        M::POST,
        &format!("{url}/api/users"),
        Some(&admin),
        Some(serde_json::json!({"name": "carol"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let carol = b["token"].as_str().unwrap().to_string();
    assert!(carol.starts_with("rnusr_"), "{carol}");
    let (s, _) = call(
        M::POST,
        &format!("{url}/api/users"),
        Some(&admin),
        Some(serde_json::json!({"name": "carol"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "a taken name");
    let (s, b) = call(M::GET, &format!("{url}/api/whoami"), Some(&carol), None).await;
    assert_eq!(
        (s, b["role"].as_str(), b["user"].as_str()),
        (StatusCode::OK, Some("user"), Some("carol"))
    );
    for (method, path) in [
        (M::GET, "/api/nodes"),
        (M::GET, "/api/users"),
        (M::POST, "/api/users"),
        (M::DELETE, "/api/users/carol"),
        (M::DELETE, "/api/nodes/x"),
        (M::POST, "/api/nodes/register"),
    ] {
        let (s, _) = call(method, &format!("{url}{path}"), Some(&carol), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path} with a user token");
    }
    let (s, b) = call(M::GET, &format!("{url}/api/tasks"), Some(&carol), None).await;
    assert_eq!((s, b), (StatusCode::OK, serde_json::json!([])));
    // The join token cannot reach tasks.
    let (s, _) = call(M::GET, &format!("{url}/api/tasks"), Some(&join), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_credentials_and_the_runner_api() {
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let admin = read_trimmed(&host_data.join("admin.token")).unwrap();
    let runner_data = tmp.path().join("r1");
    let _runner = start_runner(
        tmp.path(),
        "r1",
        &url,
        &host_data.join("join.token"),
        "node-c",
    );
    let hd = host_data.clone();
    let n = wait_for("node-c", move || node(&nodes(&hd), "node-c").cloned());
    let runner_url = n["runner_url"].as_str().unwrap();
    let cred = runner_credential(&runner_data);
    let credential = cred["credential"].as_str().unwrap();
    use reqwest::Method as M;

    // A node credential is for its own node only.
    let (s, body) = call(M::GET, &format!("{url}/api/whoami"), Some(credential), None).await;
    assert_eq!(
        (s, body["role"].as_str(), body["node"].as_str()),
        (StatusCode::OK, Some("node"), Some("node-c"))
    );
    let (s, _) = call(M::GET, &format!("{url}/api/nodes"), Some(credential), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let beat = serde_json::json!({
        "runner_url": "http://127.0.0.1:1", "heartbeat_interval_ms": 1000, "version": "x",
        "usage": {"cpu_percent": 0.0, "memory_available_bytes": 0, "load_1m": 0.0}, "inventory": null
    });
    let (s, _) = call(
        M::PUT,
        &format!("{url}/api/nodes/other/heartbeat"),
        Some(credential),
        Some(beat),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "cannot heartbeat for another node"
    );

    // The runner API accepts only its host: not anonymous callers, not the admin, not the node itself.
    // Every route, read from the runner's router source (a new route
    // without a row here fails), and a path that is no route at all.
    let source = std::fs::read_to_string("src/runner/api.rs").unwrap();
    let in_source: Vec<&str> = source
        .split(".route(")
        .skip(1)
        .filter_map(|p| p.split('"').nth(1))
        .collect();
    let runner_routes = [
        (M::GET, "/api/status"),
        (M::GET, "/api/tasks/{id}/logs"),
        (M::GET, "/api/tasks/{id}/exec"),
        (M::GET, "/api/tasks/{id}/forward"),
        (M::GET, "/api/vps/{id}/snapshots"),
        (M::POST, "/api/vps/{id}/snapshots"),
        (M::DELETE, "/api/vps/{id}/snapshots/{snapshot}"),
        (M::PUT, "/api/vps/{id}/transfer"),
        // A move's grant, not the host's token: none of these.
        (M::GET, "/api/transfers/{id}/blobs/{digest}"),
        (M::GET, "/api/no-such-route"),
        // The scrape route takes the cluster's metrics token, none of these.
        (M::GET, "/metrics"),
    ];
    for path in &in_source {
        assert!(
            runner_routes.iter().any(|(_, p)| p == path),
            "runner route {path} has no row here"
        );
    }
    assert!(
        in_source.len() >= 4,
        "the scan found the routes: {in_source:?}"
    );
    for (method, path) in &runner_routes {
        let p = path
            .replace("{id}", "1")
            .replace("{snapshot}", "1")
            .replace("{digest}", "sha256:00");
        for token in [
            None,
            Some(admin.as_str()),
            Some(credential),
            Some("rnhost_guess"),
        ] {
            let (s, _) = call(method.clone(), &format!("{runner_url}{p}"), token, None).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "runner {method} {p} with {token:?}"
            );
        }
    }
    // ...while the host, with the token it got at registration, gets through.
    let (s, body) = call(
        M::GET,
        &format!("{url}/api/nodes/node-c/runner"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "node-c");
}

#[test]
fn a_runner_with_a_bad_join_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let runner_data = tmp.path().join("bad");
    let mut r = Daemon::start(
        tmp.path(),
        "bad",
        &[
            "--data-dir",
            runner_data.to_str().unwrap(),
            "runner",
            "--config",
            "/dev/null",
            "--name",
            "intruder",
            "--host-url",
            &url,
            "--join-token",
            "rnjoin_not-the-token",
            "--bind",
            "127.0.0.1",
            "--runner-port",
            "0",
        ],
    );
    let status = r.wait_exit(common::WAIT).expect("runner exits");
    assert!(!status.success());
    let log = r.log_text();
    assert!(
        log.contains("refused registration") && log.contains("join token"),
        "{log}"
    );
    assert!(nodes(&host_data).is_empty());
    assert!(!runner_data.join("runner/node.json").exists());
}

#[test]
fn the_cli_says_what_to_do_without_a_token_or_host() {
    let tmp = tempfile::tempdir().unwrap();
    let o = cli(&["--data-dir", tmp.path().to_str().unwrap(), "node", "list"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.starts_with("error: no API token") && e.contains("--token"),
        "{e}"
    );

    let o = cli(&[
        "--host",
        "http://127.0.0.1:1",
        "--token",
        "x",
        "node",
        "list",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cannot reach the host at http://127.0.0.1:1"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
}

#[test]
fn the_ssh_proxy_checks_the_token_before_anything_else() {
    use std::io::{BufRead, BufReader, Write};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("host");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let _host = Daemon::start(
        tmp.path(),
        "host",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "host",
            "--config",
            "/dev/null",
            "--bind",
            "127.0.0.1",
            "--api-port",
            "0",
            "--ssh-proxy-port",
            &port,
        ],
    );
    wait_for("host api.url", || read_trimmed(&data.join("api.url")));
    let admin = read_trimmed(&data.join("admin.token")).unwrap();
    let ask = |line: String| {
        let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        answer
    };
    assert_eq!(
        ask("REQUEST_TUNNEL 1 rnadm_wrong\n".into()),
        "ERROR invalid token\n"
    );
    assert_eq!(
        ask("REQUEST_TUNNEL 1\n".into()),
        "ERROR missing token: REQUEST_TUNNEL <id> <token>\n"
    );
    // A valid token learns only that there is no such instance (VPS come later).
    assert_eq!(
        ask(format!("REQUEST_TUNNEL 1 {admin}\n")),
        "ERROR no instance 1\n"
    );
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host_with(tmp.path(), &["--http-header-timeout", "300ms"]);
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    // F12: half a request, then silence (slowloris).
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /api/whoami HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = slow.read(&mut buf);
    let closed = match n {
        Ok(n) => n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        Err(ref e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the server still holds the connection: {n:?}");
    // Whole requests are still served.
    let o = cli(&["--host", &url, "--token", "nope", "node", "list"]);
    assert!(
        stderr(&o).contains("401") || stderr(&o).contains("invalid"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_user_rotates_their_token_and_the_old_one_stops_at_once() {
    // L5: a token is replaced without removing the user (who keeps their tasks).
    let tmp = tempfile::tempdir().unwrap();
    let (_host, _url) = start_host_with(tmp.path(), &[]);
    let data = tmp.path().join("host");
    let hd = data.to_str().unwrap();
    let json = |o: &std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", stderr(o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let add_user = |name: &str| -> String {
        let o = cli(&["--data-dir", hd, "-o", "json", "user", "add", name]);
        json(&o)["token"].as_str().unwrap().to_string()
    };
    let old = add_user("carol");
    let whoami = |token: &str| cli(&["--data-dir", hd, "--token", token, "-o", "json", "whoami"]);
    assert!(whoami(&old).status.success());
    // Carol rotates her own; another user's name is refused.
    let o = cli(&[
        "--data-dir",
        hd,
        "--token",
        &old,
        "user",
        "rotate-token",
        "dave",
    ]);
    assert!(stderr(&o).contains("only their own"), "{}", stderr(&o));
    let new = json(&cli(&[
        "--data-dir",
        hd,
        "--token",
        &old,
        "-o",
        "json",
        "user",
        "rotate-token",
        "carol",
    ]))["token"]
        .as_str()
        .unwrap()
        .to_string();
    let o = whoami(&old);
    assert!(
        !o.status.success() && stderr(&o).contains("401"),
        "{}",
        stderr(&o)
    );
    assert_eq!(json(&whoami(&new))["user"], "carol");
    // The admin gives her one that has already run out.
    let short = json(&cli(&[
        "--data-dir",
        hd,
        "-o",
        "json",
        "user",
        "rotate-token",
        "carol",
        "--expires-in",
        "1ms",
    ]))["token"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(
        !whoami(&new).status.success(),
        "the admin's rotation revoked hers"
    );
    assert!(!whoami(&short).status.success(), "expired");

    // The admin token rotates too; the host rewrites admin.token, which
    // local clients read, and the old one stops.
    let old_admin = read_trimmed(&data.join("admin.token")).unwrap();
    let erin = add_user("erin");
    let o = cli(&[
        "--data-dir",
        hd,
        "--token",
        &erin,
        "user",
        "rotate-token",
        "admin",
    ]);
    assert!(stderr(&o).contains("403"), "a user cannot: {}", stderr(&o));
    let rotated = cli(&[
        "--data-dir",
        hd,
        "-o",
        "json",
        "user",
        "rotate-token",
        "admin",
    ]);
    let new_admin = json(&rotated)["token"].as_str().unwrap().to_string();
    assert_eq!(read_trimmed(&data.join("admin.token")).unwrap(), new_admin);
    assert!(!whoami(&old_admin).status.success());
    assert_eq!(json(&whoami(&new_admin))["role"], "admin");
}
