//! src/oci against a real, private containerd with runc: environments from
//! OCI and docker archives, exit codes, logs, OOM kills, pause and kill.

mod common;

/// Container ids unique to this test process (runc keeps state in a machine-wide directory).
fn uid(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use common::containerd::{busybox_oci_archive, docker_archive, PrivateContainerd};
use rivernode::oci::{
    build_spec, oom_kills, Containerd, ImportedImage, RuntimeSpecInput, TaskStatus,
};

fn input(id: &str, args: &[&str], memory: Option<u64>) -> RuntimeSpecInput {
    RuntimeSpecInput {
        hostname: id.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        rivernode_env: [("RIVERNODE_TASK_ID".to_string(), id.to_string())].into(),
        cwd: None,
        mounts: vec![],
        cpus: "0".parse().unwrap(),
        cpu_quota_cores: Some(1),
        mems: None,
        memory_bytes: memory,
        pids_max: 256,
        cgroups_path: format!("/rivernode-test/{id}"),
        netns: None,
        privileged: None,
        shm_bytes: 64 << 20,
        user: Default::default(),
    }
}

async fn run(
    c: &Containerd,
    img: &ImportedImage,
    dir: &Path,
    id: &str,
    args: &[&str],
    memory: Option<u64>,
) -> (u32, bool, String) {
    run_input(c, img, dir, input(id, args, memory)).await
}

async fn run_input(
    c: &Containerd,
    img: &ImportedImage,
    dir: &Path,
    input: RuntimeSpecInput,
) -> (u32, bool, String) {
    let id = input.hostname.as_str();
    let spec = build_spec(&img.config, &input).unwrap();
    // file:// puts stdout and stderr in one file (the runner uses its log driver instead).
    let out = dir.join(format!("{id}.out"));
    let uri = format!("file://{}", out.display());
    c.run_container(
        id,
        HashMap::from([("io.rivernode.task".to_string(), id.to_string())]),
        img,
        &spec,
        &uri,
        &uri,
    )
    .await
    .unwrap();
    let code = c.wait(id).await.unwrap();
    let oom = oom_kills(
        Path::new("/sys/fs/cgroup"),
        &format!("/rivernode-test/{id}"),
    ) > 0;
    let problems = c.cleanup(id).await;
    assert!(problems.is_empty(), "{problems:?}");
    (code, oom, std::fs::read_to_string(out).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn environments_run_on_real_containerd() {
    let Some(ctd) = PrivateContainerd::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let Some(oci) = busybox_oci_archive(work.path()) else {
        return;
    };
    let c = Containerd::connect(&ctd.socket, "overlayfs").await.unwrap();
    // How far the import got, as the runner hears it.
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = heard.clone();
    let progress = rivernode::oci::Progress::new(move |phase, done, total| {
        h.lock().unwrap().push((phase, done, total))
    });
    let img = c
        .import_archive(
            "rivernode.local/env/busybox:latest",
            &oci,
            work.path(),
            &progress,
        )
        .await
        .unwrap();
    let heard = heard.lock().unwrap().clone();
    let total = heard[0].2;
    assert!(total > 0, "{heard:?}");
    assert_eq!(heard.first(), Some(&("importing", 0, total)));
    assert!(heard.contains(&("importing", total, total)), "{heard:?}");
    assert_eq!(heard.last(), Some(&("unpacking", total, total)));

    let (code, oom, out) = run(
        &c,
        &img,
        work.path(),
        &uid("t-hello"),
        &["sh", "-c", "echo hello; echo $RIVERNODE_TASK_ID"],
        None,
    )
    .await;
    assert_eq!(
        (code, oom, out.as_str()),
        (0, false, format!("hello\n{}\n", uid("t-hello")).as_str())
    );
    let (code, oom, _) = run(
        &c,
        &img,
        work.path(),
        &uid("t-exit3"),
        &["sh", "-c", "exit 3"],
        None,
    )
    .await;
    assert_eq!((code, oom), (3, false));

    // root's capabilities: Docker's default set, or all of them when privileged.
    let cap_eff = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    let caps = ["sh", "-c", "cat /proc/self/status"];
    let (_, _, out) = run(&c, &img, work.path(), &uid("t-caps"), &caps, None).await;
    let plain = cap_eff(&out);
    assert_eq!(plain.count_ones(), 14, "{plain:x}");
    assert_eq!(plain & (1 << 21), 0, "no CAP_SYS_ADMIN");
    let bound = rivernode::oci::capability_bound(Path::new("/proc")).unwrap();
    let privileged = RuntimeSpecInput {
        privileged: Some(bound),
        ..input(&uid("t-priv"), &caps, None)
    };
    let (_, _, out) = run_input(&c, &img, work.path(), privileged).await;
    let all = cap_eff(&out);
    assert_ne!(all & (1 << 21), 0, "CAP_SYS_ADMIN when privileged: {all:x}");
    assert_eq!(all, bound & ((1 << 41) - 1), "all that the runtime holds");

    // Files in the image are found in its layers without mounting it.
    let found = c
        .find_in_image(&img, &["/bin/busybox", "/usr/sbin/sshd"])
        .await
        .unwrap();
    assert!(rivernode::oci::rootfs::is_file(&found[0]), "{found:?}");
    assert!(found[1].is_none(), "busybox has no sshd: {found:?}");

    // 32 MiB limit, 100 MB string: the kernel's OOM killer ends it and the cgroup says so.
    let (code, oom, _) = run(
        &c,
        &img,
        work.path(),
        &uid("t-oom"),
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}",
        ],
        Some(32 << 20),
    )
    .await;
    assert!(oom, "OOM kill seen in the cgroup (exit code {code})");

    // The same archive again is not imported again: same image, same snapshot.
    let again = c
        .import_archive(
            "rivernode.local/env/busybox:latest",
            &oci,
            work.path(),
            &rivernode::oci::Progress::none(),
        )
        .await
        .unwrap();
    assert_eq!(again.top_chain, img.top_chain);

    // A docker save archive of the same image.
    let Some(docker) = docker_archive(&oci, work.path()) else {
        return;
    };
    let dimg = c
        .import_archive(
            "rivernode.local/env/busybox-docker:latest",
            &docker,
            work.path(),
            &rivernode::oci::Progress::none(),
        )
        .await
        .unwrap();
    let (code, _, out) = run(
        &c,
        &dimg,
        work.path(),
        &uid("t-docker"),
        &["echo", "from docker"],
        None,
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "from docker\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_kill() {
    let Some(ctd) = PrivateContainerd::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let Some(oci) = busybox_oci_archive(work.path()) else {
        return;
    };
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
    let id = uid("t-sleep");
    let id = id.as_str();
    let spec = build_spec(&img.config, &input(id, &["sleep", "1000"], None)).unwrap();
    let labels = HashMap::from([("io.rivernode.task".to_string(), id.to_string())]);
    c.run_container(
        id,
        labels,
        &img,
        &spec,
        &format!("file://{}", work.path().join("log").display()),
        &format!("file://{}", work.path().join("log").display()),
    )
    .await
    .unwrap();
    assert_eq!(c.status(id).await.unwrap(), TaskStatus::Running);
    c.pause(id).await.unwrap();
    assert_eq!(c.status(id).await.unwrap(), TaskStatus::Paused);
    c.resume(id).await.unwrap();
    assert_eq!(c.status(id).await.unwrap(), TaskStatus::Running);
    let found = c.containers_with_label("io.rivernode.task").await.unwrap();
    assert_eq!(
        found.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        [id]
    );
    // `sleep` is PID 1 of the container and has no TERM handler: the kernel
    // ignores SIGTERM for it. That is why a kill escalates to SIGKILL.
    c.kill(id, 15).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), c.wait(id))
        .await
        .is_err());
    c.kill(id, 9).await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), c.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 128 + 9);
    assert!(c.cleanup(id).await.is_empty());
    assert!(c
        .containers_with_label("io.rivernode.task")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(c.status(id).await.unwrap(), TaskStatus::Absent);
}
