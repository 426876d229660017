//! GPUs reach containers, on real containerd and runc without a GPU: the
//! runner reads a fake sysfs with two NVIDIA GPUs, a fake
//! `/proc/driver/nvidia` with their UUIDs and minors, and a CDI spec of a
//! test vendor whose device nodes are real char devices made with mknod
//! (NVIDIA's major 195, minors 0 and 1, and /dev/null's 1:3). Opening a GPU
//! node the device cgroup allows gives ENXIO (no driver behind it); one it
//! denies gives EPERM: that difference is the proof.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::cluster::*;
use common::metrics::{metrics_token, promtool, runner_metrics_url, sample, scrape};
use common::*;

const GPU0: &str = "0000:17:00.0";
const GPU1: &str = "0000:65:00.0";
const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const UUID1: &str = "GPU-11111111-2222-3333-4444-555555555555";

/// The fake node's trees; the runner flags that point at them.
struct FakeGpus {
    root: tempfile::TempDir,
}

impl FakeGpus {
    fn new() -> FakeGpus {
        let root = tempfile::tempdir().unwrap();
        let p = |rel: &str| root.path().join(rel);
        let write = |rel: &str, text: &str| {
            std::fs::create_dir_all(p(rel).parent().unwrap()).unwrap();
            std::fs::write(p(rel), text).unwrap();
        };
        // The real CPUs, NUMA nodes and cgroupfs; fake PCI devices.
        std::fs::create_dir_all(p("sys")).unwrap();
        symlink("/sys/devices", p("sys/devices")).unwrap();
        symlink("/sys/fs", p("sys/fs")).unwrap();
        std::fs::create_dir_all(p("sys/bus/pci/drivers/vfio-pci")).unwrap();
        for (i, (bdf, uuid)) in [(GPU0, UUID0), (GPU1, UUID1)].into_iter().enumerate() {
            let d = format!("sys/bus/pci/devices/{bdf}");
            write(&format!("{d}/class"), "0x030200\n");
            write(&format!("{d}/vendor"), "0x10de\n");
            write(&format!("{d}/device"), "0x2335\n");
            write(&format!("{d}/numa_node"), "-1\n");
            let group = p(&format!("sys/kernel/iommu_groups/{}", 40 + i));
            std::fs::create_dir_all(group.join("devices")).unwrap();
            symlink(p(&d), group.join("devices").join(bdf)).unwrap();
            symlink(&group, p(&d).join("iommu_group")).unwrap();
            write(
                &format!("nvidia/gpus/{bdf}/information"),
                &format!("Model: \t Test GPU\nGPU UUID: \t {uuid}\nDevice Minor: \t {i}\nBus Location: \t {bdf}\n"),
            );
            mknod(&p(&format!("dev/nvidia{i}")), 195, i as u64);
        }
        // A control node, spec-wide: allowed by the spec's rule (ENXIO, not EPERM).
        mknod(&p("dev/nvidiactl"), 195, 255);
        write("driverlib/libtest.so.1", "not really a library\n");
        let spec = format!(
            r#"cdiVersion: 0.6.0
kind: rivernode.test/gpu
containerEdits:
  env: [TEST_VENDOR=yes, NVIDIA_VISIBLE_DEVICES=void]
  deviceNodes:
    - path: /dev/rivernode-test
      hostPath: /dev/null
    - path: /dev/nvidiactl
      hostPath: {dev}/nvidiactl
  mounts:
    - hostPath: {lib}
      containerPath: /usr/lib/rivernode-test
      options: [ro, nosuid, nodev, rbind]
devices:
  - name: {UUID0}
    containerEdits:
      deviceNodes: [{{path: /dev/nvidia0, hostPath: {dev}/nvidia0}}]
  - name: {UUID1}
    containerEdits:
      deviceNodes: [{{path: /dev/nvidia1, hostPath: {dev}/nvidia1}}]
"#,
            lib = p("driverlib").display(),
            dev = p("dev").display(),
        );
        write("cdi/test.yaml", &spec);
        FakeGpus { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn runner_flags(&self) -> Vec<String> {
        let s = |rel: &str| self.path(rel).display().to_string();
        [
            "--sys-root".to_string(),
            s("sys"),
            "--nvidia-driver-root".into(),
            s("nvidia"),
            "--dev-root".into(),
            s("dev"),
            "--cdi-spec-dir".into(),
            s("cdi"),
        ]
        .to_vec()
    }

    /// A fake NVML (tests/fixtures/fake_nvml.c, compiled here) that reads
    /// its GPUs' utilisation from a file `set_utilisation` rewrites; the
    /// runner flag that loads it.
    fn fake_nvml(&self, utilisation: [u32; 2]) -> Vec<String> {
        let (lib, state) = (self.path("nvml/libnvidia-ml.so.1"), self.path("nvml/state"));
        std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
        self.set_utilisation(utilisation);
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_nvml.c");
        let o = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&lib)
            .arg(format!("-DSTATE_FILE=\"{}\"", state.display()))
            .arg(&source)
            .output()
            .expect("cc (build-essential) compiles the fake NVML");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        vec!["--nvml-library".into(), lib.display().to_string()]
    }

    /// What the fake NVML reads for GPU 0 and GPU 1 from now on.
    fn set_utilisation(&self, u: [u32; 2]) {
        let text = format!(
            "{GPU0} {UUID0} Test-GPU {} 1048576\n{GPU1} {UUID1} Test-GPU {} 0\n",
            u[0], u[1]
        );
        let (tmp, state) = (self.path("nvml/state.new"), self.path("nvml/state"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, state).unwrap();
    }

    /// `rivernode gpu ...` on the runner's node (its data directory, the fake sysfs).
    fn gpu_cli(&self, v: &Vps, args: &[&str]) -> std::process::Output {
        let data = v.runner_data();
        let (sys, dev) = (self.path("sys"), self.path("dev"));
        let mut a = vec!["--data-dir", data.to_str().unwrap(), "gpu"];
        a.extend_from_slice(args);
        a.extend([
            "--sys-root",
            sys.to_str().unwrap(),
            "--dev-root",
            dev.to_str().unwrap(),
        ]);
        cli(&a)
    }
}

fn mknod(path: &Path, major: u64, minor: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(major, minor),
    )
    .expect("mknod (root needed)");
}

/// A script that reports what a workload sees of its GPUs, one `key=value`
/// line per probe, for an instance meant to hold GPU `mine` only.
fn probe(mine: usize) -> String {
    let other = 1 - mine;
    format!(
        r#"
echo "nodes=$(ls /dev | grep -E '^(nvidia|rivernode)' | tr '\n' ' ')"
echo "numbers=$(stat -c '%t:%T' /dev/nvidia{mine} 2>&1)"
echo "env=$CUDA_VISIBLE_DEVICES|$NVIDIA_VISIBLE_DEVICES|$GPU_COUNT|$RIVERNODE_GPUS|$TEST_VENDOR"
mknod /dev/other-gpu c 195 {other}
echo "other=$(cat /dev/other-gpu 2>&1)"
echo "mine=$(cat /dev/nvidia{mine} 2>&1)"
echo "ctl=$(cat /dev/nvidiactl 2>&1)"
cat /dev/rivernode-test && echo "harmless=read"
echo "lib=$(cat /usr/lib/rivernode-test/libtest.so.1); $(touch /usr/lib/rivernode-test/x 2>&1)"
echo "shm=$(df -k /dev/shm | tail -1 | awk '{{print $2}}')"
"#
    )
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= line in:\n{out}"))
}

/// The probe's findings for an instance that holds GPU `mine` only.
fn assert_holds_only(out: &str, mine: usize) {
    let (bdf, uuid) = [(GPU0, UUID0), (GPU1, UUID1)][mine];
    assert_eq!(
        line(out, "nodes").trim(),
        format!("nvidia{mine} nvidiactl rivernode-test"),
        "{out}"
    );
    // Type and numbers from the node: c 195:<minor> (hex c3:<minor>).
    assert_eq!(line(out, "numbers"), format!("c3:{mine}"), "{out}");
    assert_eq!(
        line(out, "env"),
        format!("{uuid}|{uuid}|1|{bdf}|yes"),
        "our variables win over the spec's NVIDIA_VISIBLE_DEVICES=void: {out}"
    );
    // The other GPU's node, made by hand inside: the device cgroup refuses it.
    assert!(
        line(out, "other").contains("Operation not permitted"),
        "{out}"
    );
    // Its own GPU: allowed; with no driver behind the number, ENXIO.
    assert!(
        line(out, "mine").contains("No such device or address"),
        "{out}"
    );
    assert!(out.contains("harmless=read"), "{out}");
    let lib = line(out, "lib");
    assert!(
        lib.starts_with("not really a library") && lib.contains("Read-only file system"),
        "{lib}"
    );
}

/// A task that holds the GPUs of `target` until killed; its id, once running.
fn hold(v: &Vps, target: &str) -> String {
    let o = v.rn(&[
        "-o",
        "json",
        "task",
        "submit",
        "-t",
        target,
        "--container",
        "busybox",
        "--",
        "sleep",
        "600",
    ]);
    let id = created_id(&o);
    v.wait_state(&id, "running");
    id
}

/// Runs `f` with a one-node cluster on the fake GPU node, in private namespaces.
fn on_a_fake_gpu_node(name: &'static str, f: impl FnOnce(&FakeGpus, &Vps) + Send + 'static) {
    if !parts_present() {
        return;
    }
    private_namespaces(move || {
        let fake = FakeGpus::new();
        let Some(v) = Vps::start_full(name, &[], &fake.runner_flags()) else {
            return;
        };
        f(&fake, &v);
    });
}

#[test]
fn a_task_sees_exactly_its_gpu_and_the_ledger_refuses_to_bind_it() {
    on_a_fake_gpu_node("gpu-a", |fake, v| {
        let node = v.json(&["node", "status", "gpu-a"]);
        let uuids: Vec<&str> = node["node"]["inventory"]["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["uuid"].as_str().unwrap_or("-"))
            .collect();
        assert_eq!(
            uuids,
            [UUID0, UUID1],
            "UUIDs from the driver's files: {node}"
        );

        // Index 1 is the second GPU by PCI address.
        let target = "gpu-a::1";
        let holder = hold(v, target);
        let o = fake.gpu_cli(v, &["bind", GPU1]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains(GPU1) && e.contains(&format!("task {holder}")),
            "{e}"
        );
        let list = stdout(&fake.gpu_cli(v, &["list"]));
        let row = |l: &str, a: &str| l.lines().find(|x| x.starts_with(a)).unwrap().to_string();
        assert!(
            row(&list, GPU1).ends_with(&format!("in use by task {holder}")),
            "{list}"
        );
        assert!(row(&list, GPU0).ends_with("free (no driver)"), "{list}");
        // Without --data-dir, the runner's own settings say where the ledger is.
        let o = std::process::Command::new(BIN)
            .env("RIVERNODE_DATA_DIR", v.runner_data())
            .args(["gpu", "list", "--sys-root"])
            .arg(fake.path("sys"))
            .output()
            .unwrap();
        assert!(
            stdout(&o).contains(&format!("in use by task {holder}")),
            "{}{}",
            stdout(&o),
            stderr(&o)
        );
        let status = stdout(&v.rn(&["node", "status", "gpu-a"]));
        assert!(
            status.contains(&format!("in use by task {holder}")),
            "{status}"
        );
        // The other GPU is still free: a second task gets it, not this one.
        let o = v.rn(&[
            "-o",
            "json",
            "task",
            "submit",
            "--gpus",
            "1",
            "--container",
            "busybox",
            "--",
            "sh",
            "-c",
            "ls /dev | grep -E '^nvidia[0-9]'",
        ]);
        let other = created_id(&o);
        v.wait_state(&other, "completed");
        assert_eq!(stdout(&v.rn(&["task", "logs", &other])), "nvidia0\n");

        // Ended, it gives its GPU back.
        assert!(v.rn(&["task", "kill", &holder]).status.success());
        v.wait_state(&holder, "killed");
        wait_for("the claim given back", || {
            let list = stdout(&fake.gpu_cli(v, &["list"]));
            row(&list, GPU1).ends_with("free (no driver)").then_some(())
        });

        // A request no node could ever meet is refused at submit, naming the field.
        let o = v.rn(&[
            "task",
            "submit",
            "--gpus",
            "3",
            "--container",
            "busybox",
            "--",
            "true",
        ]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("no node has 3 GPUs"), "{}", stderr(&o));
    });
}

#[test]
fn a_vps_keeps_its_gpu_across_stop_and_restart() {
    on_a_fake_gpu_node("gpu-b", |fake, v| {
        // GPU 0 is busy when the VPS is made: it gets GPU 1.
        let first = hold(v, "gpu-b::0");
        let id = v.create_with(&["--gpus", "1", "-m", "256M"]);
        // An SSH session has its own environment: the instance's is PID 1's.
        let script = format!(
            "export $(tr '\\0' '\\n' < /proc/1/environ | grep -E '^(CUDA|NVIDIA|GPU_COUNT|RIVERNODE_GPUS|TEST)' | xargs); {}",
            probe(1)
        );
        let out = v.ssh_ok(&id, &[&script]);
        assert_holds_only(&out, 1);
        assert_eq!(
            line(&out, "shm"),
            "131072",
            "default: half of -m 256M: {out}"
        );

        assert!(v.rn(&["vps", "stop", &id]).status.success());
        v.wait_state(&id, "stopped");
        let list = stdout(&fake.gpu_cli(v, &["list"]));
        assert!(
            !list.contains(&format!("in use by task {id}")),
            "a stopped VPS holds no GPU: {list}"
        );
        // GPU 0 is free now, GPU 1 is the VPS's: the restart gets GPU 1 back.
        assert!(v.rn(&["task", "kill", &first]).status.success());
        v.wait_state(&first, "killed");
        assert!(v.rn(&["vps", "restart", &id]).status.success());
        v.wait_state(&id, "running");
        let t = v.json(&["task", "status", &id]);
        assert_eq!(t["placement"]["gpus"], serde_json::json!([GPU1]), "{t}");
        let out = v.ssh_ok(&id, &[&script]);
        assert_holds_only(&out, 1);

        v.delete(&id);
        let list = stdout(&fake.gpu_cli(v, &["list"]));
        assert!(!list.contains("in use"), "{list}");
    });
}

/// The VPS's warning, as `task status` shows it (none: null).
fn notice(v: &Vps, id: &str) -> serde_json::Value {
    v.json(&["task", "status", id])["notice"].clone()
}

#[test]
fn a_vps_whose_gpu_sits_idle_is_warned_then_stopped_and_an_exempt_one_is_not() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let fake = FakeGpus::new();
        let mut flags = fake.runner_flags();
        // GPU 0 busy, GPU 1 idle.
        flags.extend(fake.fake_nvml([50, 0]));
        let host = [
            "--idle-gpu-after",
            "2s",
            "--idle-gpu-grace",
            "8s",
            "--idle-gpu-threshold",
            "10",
        ];
        let Some(v) = Vps::start_full("gpu-c", &host, &flags) else {
            return;
        };
        let busy = v.create_with(&["-t", "gpu-c::0", "-m", "256M"]);
        let idle = v.create_with(&["-t", "gpu-c::1", "-m", "256M"]);
        v.ssh_ok(&idle, &["echo kept > /root/kept"]);

        // GPU 1 idle for 2 s: its VPS is warned, in its status and inside.
        let warning = wait_for("the idle warning", || {
            notice(&v, &idle).as_str().map(str::to_string)
        });
        assert!(warning.contains("below 10% for 2s"), "{warning}");
        // The runner writes it on its next look at the assignments.
        let inside = wait_for("the warning inside", || {
            let o = v.ssh(&idle, &["cat /.rivernode/instance/idle-warning"]);
            o.status.success().then(|| stdout(&o))
        });
        assert_eq!(
            inside.trim(),
            warning,
            "the instance reads the same warning"
        );
        let status = stdout(&v.rn(&["vps", "status", &idle]));
        assert!(
            status.contains(&format!("Warning:    {warning}")),
            "{status}"
        );
        assert!(notice(&v, &busy).is_null(), "GPU 0 is busy: no warning");

        // Used again: the warning comes down, there and inside.
        fake.set_utilisation([50, 90]);
        wait_for("the warning taken down", || {
            notice(&v, &idle).is_null().then_some(())
        });
        assert_eq!(v.state(&idle), "running", "taken down, not stopped");
        wait_for("the warning gone inside", || {
            let o = v.ssh(
                &idle,
                &["cat /.rivernode/instance/idle-warning 2>&1 || true"],
            );
            stdout(&o).contains("No such file").then_some(())
        });

        // Idle again: warned after 2 s, stopped 8 s later; disk kept, GPU freed.
        fake.set_utilisation([50, 0]);
        v.wait_state(&idle, "stopped");
        let t = v.json(&["task", "status", &idle]);
        assert!(
            t["message"]
                .as_str()
                .is_some_and(|m| m.contains("its GPUs stayed below 10% for 10s")),
            "{t}"
        );
        assert!(t["notice"].is_null(), "{t}");
        let list = stdout(&fake.gpu_cli(&v, &["list"]));
        assert!(!list.contains(&format!("in use by task {idle}")), "{list}");
        assert_eq!(v.state(&busy), "running", "its GPU is busy");

        // Exempt, restarted: its disk is there; and when the other VPS's
        // GPU goes idle later and that one is stopped, this one (idle all
        // along, and longer) still runs.
        let said = stdout(&v.rn(&["vps", "exempt", &idle]));
        assert!(said.contains("is exempt"), "{said}");
        assert!(v.rn(&["vps", "restart", &idle]).status.success());
        v.wait_state(&idle, "running");
        assert_eq!(v.ssh_ok(&idle, &["cat /root/kept"]).trim(), "kept");
        let status = stdout(&v.rn(&["vps", "status", &idle]));
        assert!(status.contains("Idle GPUs:  exempt"), "{status}");
        fake.set_utilisation([0, 0]);
        v.wait_state(&busy, "stopped");
        assert_eq!(v.state(&idle), "running");
        assert!(notice(&v, &idle).is_null());

        v.delete(&idle);
        v.delete(&busy);
    });
}

#[test]
fn metrics_follow_a_busy_task_and_a_fake_gpu_and_promtool_accepts_both_pages() {
    if !parts_present()
        || !real_part_available("promtool (Debian prometheus)", command_exists("promtool"))
    {
        return;
    }
    private_namespaces(|| {
        let fake = FakeGpus::new();
        let mut flags = fake.runner_flags();
        flags.extend(fake.fake_nvml([37, 0]));
        // A kernel log with two Xids of GPU 0 among other records.
        let kmsg = fake.path("kmsg");
        std::fs::write(
            &kmsg,
            "6,1,10,-;NVRM: loading NVIDIA UNIX x86_64 Kernel Module\n\
             4,2,20,-;NVRM: Xid (PCI:0000:17:00): 13, pid=77, Graphics Exception\n\
             6,3,30,-;usb 1-1: new high-speed USB device\n\
             4,4,40,-;NVRM: Xid (PCI:0000:17:00): 31, pid=77, MMU Fault\n",
        )
        .unwrap();
        flags.extend(["--kmsg-path".to_string(), kmsg.display().to_string()]);
        let Some(v) = Vps::start_full("gpu-m", &[], &flags) else {
            return;
        };
        let token = metrics_token(&v);
        let host = format!("{}/metrics", v.url);
        let runner = runner_metrics_url(&v, "gpu-m");

        // Only a scraper's token reads them.
        let user = v.add_user("mia");
        assert_eq!(scrape(&host, "nope").0, 401);
        assert_eq!(scrape(&host, &user).0, 403, "a user token");
        assert_eq!(scrape(&runner, &user).0, 401, "a user token at the runner");

        // A task of mia's that fills 64 MiB of memory and spins one core.
        let o = v.rn_as(
            &user,
            &[
                "-o",
                "json",
                "task",
                "submit",
                "--container",
                "busybox",
                "-m",
                "512M",
                "--",
                "sh",
                "-c",
                "head -c 67108864 /dev/zero > /dev/shm/fill; while :; do :; done",
            ],
        );
        let id = created_id(&o);
        v.wait_state(&id, "running");
        let instance = format!("instance=\"{id}\"");

        // The runner learns the token from its next heartbeat; the busy
        // loop's CPU time and the filled memory show, and GPU 0 reads 37%.
        let page = wait_for("the runner's page with the task's usage", || {
            let (code, page) = scrape(&runner, &token);
            let cpu = sample(&page, "rivernode_instance_cpu_seconds_total", &[&instance])?;
            let mem = sample(&page, "rivernode_instance_memory_bytes", &[&instance])?;
            (code == 200 && cpu >= 2.0 && mem >= (64 << 20) as f64).then_some(page)
        });
        promtool(&page).unwrap_or_else(|e| panic!("runner page: {e}\n{page}"));
        let gpu0 = [r#"address="0000:17:00.0""#, UUID0];
        assert_eq!(
            sample(&page, "rivernode_gpu_utilization_percent", &gpu0),
            Some(37.0),
            "{page}"
        );
        assert_eq!(
            sample(&page, "rivernode_gpu_memory_used_bytes", &gpu0),
            Some(1048576.0)
        );
        assert_eq!(
            sample(&page, "rivernode_gpu_power_watts", &gpu0),
            Some(75.0)
        );
        assert_eq!(
            sample(&page, "rivernode_gpu_temperature_celsius", &gpu0),
            Some(40.0)
        );
        // Its owner on its row.
        assert!(
            sample(
                &page,
                "rivernode_instance_cpu_seconds_total",
                &[&instance, r#"owner="mia""#]
            )
            .is_some(),
            "{page}"
        );
        assert_eq!(
            sample(&page, "rivernode_backend_up", &[r#"backend="containerd""#]),
            Some(1.0)
        );
        assert!(sample(&page, "rivernode_instance_pids", &[&instance]).is_some_and(|n| n >= 1.0));
        let gpu1 = [r#"address="0000:65:00.0""#, UUID1];
        assert_eq!(
            sample(&page, "rivernode_gpu_xid_errors_total", &gpu0),
            Some(2.0),
            "{page}"
        );
        assert_eq!(
            sample(&page, "rivernode_gpu_xid_errors_total", &gpu1),
            Some(0.0)
        );
        // GPU 0 counts ECC errors; GPU 1 cannot, and has no ECC series.
        assert_eq!(
            sample(
                &page,
                "rivernode_gpu_ecc_errors_total",
                &[gpu0[0], gpu0[1], r#"kind="corrected""#]
            ),
            Some(2.0),
            "{page}"
        );
        assert_eq!(
            sample(
                &page,
                "rivernode_gpu_ecc_errors_total",
                &[gpu0[0], gpu0[1], r#"kind="uncorrected""#]
            ),
            Some(0.0)
        );
        assert_eq!(sample(&page, "rivernode_gpu_ecc_errors_total", &gpu1), None);
        // A new Xid in the log is counted.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&kmsg)
            .unwrap()
            .write_all(
                b"4,5,50,-;NVRM: Xid (PCI:0000:65:00): 79, pid=0, GPU has fallen off the bus.\n",
            )
            .unwrap();
        wait_for("GPU 1's Xid counted", || {
            let (_, page) = scrape(&runner, &token);
            (sample(&page, "rivernode_gpu_xid_errors_total", &gpu1) == Some(1.0)).then_some(())
        });
        // The fake GPU's reading follows the file.
        fake.set_utilisation([5, 0]);
        wait_for("GPU 0 at 5%", || {
            let (_, page) = scrape(&runner, &token);
            (sample(&page, "rivernode_gpu_utilization_percent", &gpu0) == Some(5.0)).then_some(())
        });

        // The host's page: the node online, the task running, the API's routes.
        let (code, page) = scrape(&host, &token);
        assert_eq!(code, 200, "{page}");
        promtool(&page).unwrap_or_else(|e| panic!("host page: {e}\n{page}"));
        assert_eq!(
            sample(&page, "rivernode_nodes", &[r#"state="online""#]),
            Some(1.0),
            "{page}"
        );
        assert_eq!(
            sample(
                &page,
                "rivernode_tasks",
                &[r#"state="running""#, r#"kind="command""#]
            ),
            Some(1.0),
            "{page}"
        );
        assert_eq!(
            sample(
                &page,
                "rivernode_tasks",
                &[r#"state="lost""#, r#"kind="vps""#]
            ),
            Some(0.0),
            "a state nothing is in reads 0: {page}"
        );
        assert_eq!(
            sample(&page, "rivernode_queue_length", &[]),
            None,
            "no labels"
        );
        assert!(page.contains("\nrivernode_queue_length 0\n"), "{page}");
        assert!(
            sample(
                &page,
                "rivernode_http_request_duration_seconds_count",
                &[r#"route="/api/tasks""#, r#"method="POST""#]
            )
            .is_some_and(|n| n >= 1.0),
            "{page}"
        );
        assert!(
            sample(&page, "rivernode_placement_wait_seconds_count", &[]).is_none(),
            "no labels on it"
        );
        assert!(
            page.contains("rivernode_placement_wait_seconds_count 1"),
            "{page}"
        );
        // An OpenMetrics scraper gets OpenMetrics.
        let o = std::process::Command::new("curl")
            .args([
                "-s",
                "-H",
                "Accept: application/openmetrics-text; version=1.0.0",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {token}"))
            .arg(&host)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).ends_with("# EOF\n"));

        // A new token: the old one is refused by the host at once, and by
        // the runner from its next heartbeat on.
        let o = v.rn(&["-o", "json", "token", "metrics"]);
        let new: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let new = new["token"].as_str().unwrap().to_string();
        assert_eq!(scrape(&host, &token).0, 401);
        assert_eq!(scrape(&host, &new).0, 200);
        wait_for("the runner refusing the old token", || {
            (scrape(&runner, &token).0 == 401).then_some(())
        });
        assert_eq!(scrape(&runner, &new).0, 200);

        assert!(v.rn(&["task", "kill", &id]).status.success());
        v.wait_state(&id, "killed");
    });
}
