//! What a heartbeat costs the host: N heartbeats (auth + one SQLite write
//! transaction) against N `whoami` calls (auth only) on the same keep-alive
//! connection to the real binary, printed side by side with their ratio.
//!
//! `cargo bench --bench heartbeat` (loopback only, bounded request count).

mod common;

use std::time::{Duration, Instant};

use common::Host;

const N: usize = 2000;

fn main() {
    let host = Host::start(&[]);
    let (url, admin, join) = (host.url.clone(), host.admin.clone(), host.join.clone());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (beat, who) = rt.block_on(async {
        let http = reqwest::Client::new();
        let inventory = rivernode::topology::collect(&Default::default()).unwrap();
        let reg: rivernode::api::RegisterResponse = http
            .post(format!("{url}/api/nodes/register"))
            .bearer_auth(&join)
            .json(&rivernode::api::RegisterRequest {
                name: "bench".into(),
                runner_url: "http://127.0.0.1:1".into(),
                heartbeat_interval_ms: 5000,
                version: "bench".into(),
                inventory,
                registration_key: None,
            })
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let hb = rivernode::api::HeartbeatRequest {
            runner_url: "http://127.0.0.1:1".into(),
            heartbeat_interval_ms: 5000,
            version: "bench".into(),
            usage: Default::default(),
            inventory: None,
            degraded: None,
        };
        let t = Instant::now();
        for _ in 0..N {
            let r = http
                .put(format!("{url}/api/nodes/bench/heartbeat"))
                .bearer_auth(&reg.credential)
                .json(&hb)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        let beat = t.elapsed();
        let t = Instant::now();
        for _ in 0..N {
            let r = http
                .get(format!("{url}/api/whoami"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        (beat, t.elapsed())
    });
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    println!(
        "heartbeat (auth + store write): {:8.1} us/request ({N} requests)",
        per(beat)
    );
    println!(
        "whoami    (auth only)         : {:8.1} us/request ({N} requests)",
        per(who)
    );
    println!(
        "ratio heartbeat/whoami        : {:8.2}",
        beat.as_secs_f64() / who.as_secs_f64()
    );
}
