//! Time to snapshot a VPS's disk with 100 MB and 1 GB of changes (random,
//! so gzip cannot shrink them): `Containerd::commit` on a real containerd,
//! against gzip of the same number of random bytes on this machine (the
//! floor: a commit reads, compresses and stores every changed byte). Prints
//! seconds, MB/s and the ratio commit / gzip.
//!
//! `cargo bench --bench snapshot`

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::containerd::{busybox_oci_archive, PrivateContainerd};
use rivernode::oci::{build_spec, Containerd, RuntimeSpecInput};

fn main() {
    let Some(ctd) = PrivateContainerd::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let Some(oci) = busybox_oci_archive(work.path()) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Containerd::connect(&ctd.socket, "overlayfs").await.unwrap();
        let img = c
            .import_archive(
                "rivernode.local/env/busybox:latest",
                &oci,
                work.path(),
                &rivernode::oci::Progress::none(),
            )
            .await
            .unwrap();
        println!("size      commit s  MB/s   gzip s  MB/s   layer MB  commit/gzip");
        for mb in [100u64, 1000] {
            let id = format!("bench-snap-{mb}-{}", std::process::id());
            let input = RuntimeSpecInput {
                hostname: id.clone(),
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("head -c {} /dev/urandom > /data", mb * 1_000_000),
                ],
                env: BTreeMap::new(),
                rivernode_env: BTreeMap::new(),
                cwd: None,
                mounts: vec![],
                cpus: "0".parse().unwrap(),
                cpu_quota_cores: Some(1),
                mems: None,
                memory_bytes: None,
                pids_max: 256,
                cgroups_path: format!("/rivernode-bench/{id}"),
                netns: None,
                privileged: None,
                shm_bytes: 64 << 20,
                user: Default::default(),
            };
            let spec = build_spec(&img.config, &input).unwrap();
            let log = format!("file://{}", work.path().join("log").display());
            c.run_container(&id, HashMap::new(), &img, &spec, &log, &log)
                .await
                .unwrap();
            assert_eq!(c.wait(&id).await.unwrap(), 0, "writing the changes");
            c.delete_task(&id).await.unwrap();

            let name = format!("bench/snapshot:{mb}");
            let t = Instant::now();
            let done = c.commit(&id, &name, HashMap::new(), "bench").await.unwrap();
            let commit_s = t.elapsed().as_secs_f64();

            // The floor: gzip the same amount of random bytes.
            let t = Instant::now();
            let mut gz = Command::new("gzip")
                .arg("-c")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let mut input = std::fs::File::open("/dev/urandom").unwrap();
            let mut stdin = gz.stdin.take().unwrap();
            std::io::copy(
                &mut std::io::Read::take(&mut input, mb * 1_000_000),
                &mut stdin,
            )
            .unwrap();
            stdin.flush().unwrap();
            drop(stdin);
            assert!(gz.wait().unwrap().success());
            let gzip_s = t.elapsed().as_secs_f64();

            println!(
                "{:>5} MB  {:>8.2}  {:>4.0}  {:>7.2}  {:>4.0}  {:>8.1}  {:>11.2}",
                mb,
                commit_s,
                mb as f64 / commit_s,
                gzip_s,
                mb as f64 / gzip_s,
                done.layer_size as f64 / 1e6,
                commit_s / gzip_s
            );
            c.delete_image(&name).await.unwrap();
            c.cleanup(&id).await;
        }
    });
}
