//! Reading `/metrics` pages in tests: a scrape with a token, one sample's
//! value, and promtool's verdict.

/// `url` with a bearer token, by curl: (HTTP status, body).
pub fn scrape(url: &str, token: &str) -> (u16, String) {
    let o = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `promtool check metrics` on a page: its complaints, if any.
pub fn promtool(page: &str) -> Result<(), String> {
    let o = super::output_with_stdin(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        page,
    );
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// The value of the sample `name{...}` whose labels include every one of `labels`.
pub fn sample(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (set, value) = rest.rsplit_once(' ')?;
        (set.starts_with('{') && labels.iter().all(|x| set.contains(x)))
            .then(|| value.parse().ok())?
    })
}

/// The cluster's scrape token, made by the admin (`token metrics`).
pub fn metrics_token(v: &super::cluster::Vps) -> String {
    let o = v.rn(&["-o", "json", "token", "metrics"]);
    assert!(o.status.success(), "{}", super::stderr(&o));
    let token: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    token["token"].as_str().unwrap().to_string()
}

/// Node `node`'s runner's `/metrics` address, as the host has it.
pub fn runner_metrics_url(v: &super::cluster::Vps, node: &str) -> String {
    format!(
        "{}/metrics",
        v.json(&["node", "status", node])["node"]["runner_url"]
            .as_str()
            .unwrap()
            .trim_end_matches('/')
    )
}
