//! The VM building blocks against libvirt's and Linux's own tools: the
//! domain XML we generate (its golden files, which the unit tests keep
//! equal to the builder's output) against libvirt's schema, the NoCloud
//! seed read back by isoinfo and blkid, and `vm check` on this machine.
//! (The seed is also mounted by a real kernel: tests/kernel/kvm.rs.)

mod common;

use std::process::Command;

use common::guest::*;
use common::*;
use rivernode::kvm::seed::{meta_data, network_config, seed_iso, user_data, SeedInput};

#[test]
fn generated_domains_are_valid_for_libvirts_schema() {
    let present = command_exists("virt-xml-validate") && command_exists("xmllint");
    if !real_part_available(
        "virt-xml-validate and xmllint (libvirt-clients, libxml2-utils)",
        present,
    ) {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kvm/testdata");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "xml") {
            let o = Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && said.contains("validates"),
                "{}: {said}",
                path.display()
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 2, "both profiles (TCG test, KVM with GPUs)");
    // The schema is a real check: a domain with a bad value fails it.
    let bad = tempfile::NamedTempFile::new().unwrap();
    let text = std::fs::read_to_string(dir.join("domain-tcg.xml"))
        .unwrap()
        .replace("append='off'", "append='false'");
    std::fs::write(bad.path(), text).unwrap();
    let o = Command::new("virt-xml-validate")
        .arg(bad.path())
        .arg("domain")
        .output()
        .unwrap();
    assert!(!o.status.success(), "a wrong attribute value is refused");
}

#[test]
fn the_seed_reads_back_with_isoinfo_and_carries_the_cidata_label() {
    let present = command_exists("isoinfo") && command_exists("blkid");
    if !real_part_available("isoinfo and blkid (genisoimage, util-linux)", present) {
        return;
    }
    let mut s = test_seed(
        42,
        vec!["ssh-ed25519 AAAAC3Nza alice@laptop".into()],
        Some((
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into(),
            "ssh-ed25519 AAAAhost".into(),
        )),
    );
    s.password_hash = Some("$6$salt$hash".into());
    s.nameservers = vec!["10.250.0.1".parse().unwrap()];
    let iso = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(iso.path(), seed_iso(&s)).unwrap();
    let path = iso.path().to_str().unwrap();
    let d = run(Command::new("isoinfo").args(["-d", "-i", path]));
    assert!(d.contains("Volume id: cidata"), "{d}");
    assert!(d.contains("Joliet with UCS level 3 found"), "{d}");
    let names = run(Command::new("isoinfo").args(["-J", "-f", "-i", path]));
    let mut names: Vec<&str> = names.lines().collect();
    names.sort();
    assert_eq!(names, ["/meta-data", "/network-config", "/user-data"]);
    for (name, want) in [
        ("meta-data", meta_data(&s)),
        ("user-data", user_data(&s)),
        ("network-config", network_config(&s)),
    ] {
        let got = run(Command::new("isoinfo").args(["-J", "-x", &format!("/{name}"), "-i", path]));
        assert_eq!(got, want, "{name}");
    }
    let b = run(Command::new("blkid").args(["-p", "-o", "export", path]));
    assert!(
        b.contains("LABEL=cidata") && b.contains("TYPE=iso9660"),
        "{b}"
    );
}

#[test]
fn vm_check_says_what_this_node_offers_and_what_to_do() {
    let o = cli(&["-o", "json", "vm", "check"]);
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let what: Vec<&str> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["what"].as_str().unwrap())
        .collect();
    assert_eq!(what, ["kvm", "iommu", "vfio", "ovmf", "qemu", "libvirt"]);
    for f in found.as_array().unwrap() {
        // Whatever is missing comes with what to do about it.
        assert_eq!(f["ok"] == false, f["fix"] != "", "{f}");
    }
    // Exits 1 exactly when QEMU or libvirt is missing.
    let runnable = found
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["what"] == "qemu" || f["what"] == "libvirt")
        .all(|f| f["ok"] == true);
    assert_eq!(o.status.success(), runnable, "{found}");
}

/// A guest for the boot test: the node's kernel with an initramfs of
/// busybox whose init says it is up (with its CPUs and the seed's label
/// as the guest sees it), then waits.
fn guest_initramfs(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "proc", "sys", "dev", "mnt"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let init = root.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\necho \"RIVERNODE-VM-UP cpus=$(nproc)\"\nwhile true; do sleep 1; echo \"RIVERNODE-VM-TICK $(cat /proc/uptime)\"; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = dir.join("initramfs.cpio");
    write_cpio(
        &root,
        &["init", "bin/busybox"],
        &["proc", "sys", "dev", "mnt"],
        &out,
    );
    out
}

/// What both VM tests set up in their private namespaces, as the runner
/// will: a bridge with the VM's tap on it, a base image with the VM's disk
/// as an overlay, the seed, and the domain: one vCPU and QEMU's threads
/// on the last CPU this test may use, booting `kernel` with `initrd`.
struct TestVm {
    rt: tokio::runtime::Runtime,
    vm: rivernode::kvm::Vm,
}

impl TestVm {
    fn new(
        d: &std::path::Path,
        seed: &SeedInput,
        id: u64,
        kernel: std::path::PathBuf,
        initrd: std::path::PathBuf,
    ) -> TestVm {
        use rivernode::kvm::{Accel, Boot, Instance, Vm};
        let tap = format!("rvtap{id}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use rivernode::net::{link, tap as taps};
            let h = link::connect().unwrap();
            link::ensure_bridge(&h, "rvt0", seed.gateway, seed.prefix)
                .await
                .unwrap();
            taps::create_tap(std::path::Path::new("/dev"), &tap).unwrap();
            taps::attach_tap(&h, "rvt0", &tap, true).await.unwrap();
        });
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(d.join("base.qcow2"))
            .arg("16M"));
        rivernode::kvm::image::create_overlay(
            &d.join("base.qcow2"),
            &d.join("disk.qcow2"),
            32 << 20,
        )
        .unwrap();
        std::fs::write(d.join("seed.iso"), seed_iso(seed)).unwrap();
        let last = last_allowed_cpu();
        let vm = Vm {
            uuid: seed.instance_id.clone(),
            accel: Accel::Qemu,
            memory_mib: 256,
            vcpu_pins: vec![last],
            emulator_cpus: [last].into_iter().collect(),
            boot: Boot::Kernel {
                kernel,
                initrd: Some(initrd),
                cmdline: "console=ttyS0 panic=-1 quiet".into(),
            },
            disk: d.join("disk.qcow2"),
            base: d.join("base.qcow2"),
            disk_cache: rivernode::kvm::domain::DiskCache::Writeback,
            seed: d.join("seed.iso"),
            mac: seed.mac,
            console_log: d.join("console.log"),
            hostdevs: vec![],
            instance: Instance {
                id,
                owner: Some("alice".into()),
                node: "n1".into(),
                submitted_at_unix_ms: 1_796_000_000_000,
                cpus: [last].into_iter().collect(),
                numa: Some(0),
                gpus: vec![],
                tap,
                ip: seed.ip,
            },
        };
        TestVm { rt, vm }
    }

    /// Removes the tap (the domain is the test's to undefine).
    fn remove_tap(&self) {
        self.rt.block_on(async {
            let h = rivernode::net::link::connect().unwrap();
            assert!(rivernode::net::link::delete_link(&h, &self.vm.instance.tap)
                .await
                .unwrap());
        });
    }
}

/// The seed of test VM `id` (address 10.250.0.`id`).
fn test_seed(id: u8, ssh_keys: Vec<String>, host_key: Option<(String, String)>) -> SeedInput {
    SeedInput {
        instance_id: format!("3f2a9c1e-0000-4000-8000-{id:012x}"),
        hostname: format!("vps-{id}"),
        ssh_keys,
        password_hash: None,
        host_key,
        mac: [0x0a, 0x58, 10, 250, 0, id],
        ip: format!("10.250.0.{id}").parse().unwrap(),
        prefix: 24,
        gateway: "10.250.0.1".parse().unwrap(),
        nameservers: vec![],
    }
}

#[test]
fn a_vm_from_our_domain_boots_pinned_pauses_and_leaves_nothing() {
    use rivernode::kvm::libvirt::{Hypervisor, VmState};
    if !common::cluster::parts_present() || !common::libvirt::libvirt_present() {
        return;
    }
    let Some(kernel) = newest_kernel().map(|k| boot_copy(&k)) else {
        assert!(
            !real_part_available("a kernel in /boot (linux-image-amd64)", false),
            "no kernel"
        );
        return;
    };
    common::cluster::private_namespaces(move || {
        let lv = common::libvirt::PrivateLibvirt::start();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let seed = test_seed(7, vec!["ssh-ed25519 AAAAC3Nza alice@laptop".into()], None);
        let t = TestVm::new(d, &seed, 7, kernel, guest_initramfs(d));
        let (vm, last) = (&t.vm, t.vm.vcpu_pins[0]);
        // The VM's disk is an overlay on the read-only base, as the runner makes it.
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(d.join("disk.qcow2")));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], 32 << 20);
        assert_eq!(
            info["backing-filename"],
            d.join("base.qcow2").to_str().unwrap()
        );
        let h = Hypervisor::open(&lv.uri).unwrap();
        h.define_and_start(vm)
            .unwrap_or_else(|e| panic!("{e:?}\n{}", lv.log()));
        let console = || std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
        let up = wait_for("the guest's init", || {
            let c = console();
            c.contains("RIVERNODE-VM-UP").then_some(c)
        });
        assert!(up.contains("RIVERNODE-VM-UP cpus=1"), "{up}");
        // Its vCPU thread runs only on the reserved CPU.
        let name = rivernode::kvm::domain_name(&vm.uuid);
        let pid = lv.qemu_pid(&name).expect("QEMU's pid file");
        let vcpus = vcpu_affinity(pid);
        assert_eq!(vcpus, vec![last.to_string()]);
        // What a restarted runner finds: our instance, from the metadata.
        let found = h.list().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].instance.clone(), found[0].state),
            (vm.instance.clone(), VmState::Running)
        );
        // Paused, the guest's clock stops ticking on the console.
        h.pause(&vm.uuid).unwrap();
        assert_eq!(h.state(&vm.uuid).unwrap(), Some(VmState::Paused));
        // What was on its way to the log has landed after a second.
        std::thread::sleep(std::time::Duration::from_secs(1));
        let frozen = console().len();
        std::thread::sleep(std::time::Duration::from_secs(3));
        assert_eq!(console().len(), frozen, "no tick while paused");
        h.resume(&vm.uuid).unwrap();
        wait_for("a tick after resume", || {
            (console().len() > frozen).then_some(())
        });
        // busybox init ignores the power button: the plug is pulled after the grace.
        assert!(!h.stop(&vm.uuid, std::time::Duration::from_secs(2)).unwrap());
        assert_eq!(h.state(&vm.uuid).unwrap(), Some(VmState::Off { exit: 137 }));
        assert!(
            lv.qemu_pid(&name).is_none() || !std::path::Path::new(&format!("/proc/{pid}")).exists()
        );
        h.undefine(&vm.uuid).unwrap();
        assert_eq!(h.state(&vm.uuid).unwrap(), None);
        assert!(h.list().unwrap().is_empty());
        drop(h);
        t.remove_tap();
    });
}

#[test]
fn vm_images_are_imported_read_only_with_their_digest_and_unsafe_ones_refused() {
    if !real_part_available("qemu-img (qemu-utils)", command_exists("qemu-img")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let (_host, _url) = start_host_with(dir.path(), &["--shared-dir", shared.to_str().unwrap()]);
    let data = dir.path().join("host");
    let rn = |args: &[&str]| {
        let mut a = vec!["--data-dir", data.to_str().unwrap()];
        a.extend_from_slice(args);
        cli(&a)
    };
    let base = dir.path().join("mini.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M"));
    let o = rn(&["vm", "image", "import", "mini", base.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stored = shared.join("vm-images/mini.qcow2");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&stored).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o444, "read-only");
    let sum = run(Command::new("sha256sum").arg(&stored));
    let digest = std::fs::read_to_string(shared.join("vm-images/mini.qcow2.sha256")).unwrap();
    assert_eq!(digest.trim(), sum.split_whitespace().next().unwrap());
    let o = rn(&["-o", "json", "vm", "image", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "mini");
    assert_eq!(list[0]["virtual_bytes"], 16 << 20);
    assert_eq!(list[0]["sha256"], digest.trim());
    // An image that names a backing file would open that node file for the guest.
    let backed = dir.path().join("backed.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
        ])
        .arg(&backed)
        .arg("16M"));
    let o = rn(&["vm", "image", "import", "evil", backed.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("backing file"), "{}", stderr(&o));
    // Not qcow2, and not there: both say what to give.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let o = rn(&["vm", "image", "import", "raw", raw.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("qemu-img convert"), "{}", stderr(&o));
    // An image's name is taken for good: VMs' disks are overlays on it.
    let o = rn(&["vm", "image", "import", "mini", base.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    let o = rn(&["vm", "image", "import", "gone", "/nonexistent.qcow2"]);
    assert!(
        stderr(&o).contains("/nonexistent.qcow2: no such file"),
        "{}",
        stderr(&o)
    );
    let names: Vec<String> = std::fs::read_dir(shared.join("vm-images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only mini and its digest: {names:?}");
}

/// The CPUs each vCPU thread of QEMU process `pid` may run on (TCG names
/// them `CPU n/TCG`), in thread order.
fn vcpu_affinity(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let is_vcpu = status
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("Name:") && l.contains("CPU ") && l.contains("/TCG"));
        if is_vcpu {
            out.push(
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .unwrap()
                    .trim()
                    .to_string(),
            );
        }
    }
    out
}

/// The highest CPU this process may run on (its affinity, not the count).
fn last_allowed_cpu() -> u32 {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&c| set.is_set(c).unwrap_or(false))
        .unwrap() as u32
}

#[test]
fn a_vm_reads_its_seed_and_answers_ssh_with_the_key_and_host_key_it_was_given() {
    use rivernode::kvm::libvirt::Hypervisor;
    let Some((kernel, version)) = guest_kernel() else {
        return;
    };
    common::cluster::private_namespaces(move || {
        let lv = common::libvirt::PrivateLibvirt::start();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for k in ["client", "other", "hostkey"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(k)));
        }
        let public = |k: &str| std::fs::read_to_string(d.join(format!("{k}.pub"))).unwrap();
        let host_public = public("hostkey")
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let seed = test_seed(
            8,
            vec![public("client").trim().to_string()],
            Some((
                std::fs::read_to_string(d.join("hostkey")).unwrap(),
                host_public.clone(),
            )),
        );
        let t = TestVm::new(d, &seed, 8, kernel, tier1_initramfs(d, &version));
        let vm = &t.vm;
        let h = Hypervisor::open(&lv.uri).unwrap();
        h.define_and_start(vm)
            .unwrap_or_else(|e| panic!("{e:?}\n{}", lv.log()));
        let console = || std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
        let deadline = std::time::Instant::now() + WAIT;
        let up = loop {
            let c = console();
            if c.contains("RIVERNODE-VM-UP") || c.contains("RIVERNODE-VM-NOSEED") {
                break c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the guest did not come up:\n{c}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        assert!(up.contains("RIVERNODE-VM-UP vps-8 10.250.0.8/24"), "{up}");
        // The host key it was given is the one it shows: pinned, not trusted on first use.
        let known = d.join("known_hosts");
        std::fs::write(&known, format!("10.250.0.8 {host_public}\n")).unwrap();
        let ssh = |key: &str| {
            Command::new("ssh")
                .args(["-i", d.join(key).to_str().unwrap()])
                .args(["-o", &format!("UserKnownHostsFile={}", known.display())])
                .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
                .args(["-o", "ConnectTimeout=5", "-o", "IdentitiesOnly=yes"])
                .args(["root@10.250.0.8", "uname -r; hostname"])
                .output()
                .unwrap()
        };
        let out = wait_for("ssh into the VM", || {
            let o = ssh("client");
            o.status.success().then(|| stdout(&o))
        });
        assert_eq!(
            out,
            format!("{version}\nvps-8\n"),
            "the node's kernel, the seed's name"
        );
        let o = ssh("other");
        assert!(
            !o.status.success(),
            "a key the seed did not name is refused"
        );
        h.undefine(&vm.uuid).unwrap();
        drop(h);
        t.remove_tap();
    });
}

/// The runner flags of a test node that boots VMs under `lv` with TCG,
/// `kernel` and `initrd` from the node, and `cmdline`.
fn vm_runner_flags(
    lv: &common::libvirt::PrivateLibvirt,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
) -> Vec<String> {
    [
        "--libvirt-uri",
        &lv.uri,
        "--vm-accel",
        "qemu",
        "--vm-kernel",
        kernel.to_str().unwrap(),
        "--vm-initrd",
        initrd.to_str().unwrap(),
        "--vm-cmdline",
        cmdline,
        // The store is a tmpfs in the tests: no O_DIRECT.
        "--vm-disk-cache",
        "writeback",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Imports `image` as `name`, creates a VM VPS from it with `memory_mib`
/// (and `extra` flags) and a new key, and waits until it runs; its task id
/// and instance id.
fn create_vm(
    v: &common::cluster::Vps,
    name: &str,
    image: &std::path::Path,
    memory_mib: &str,
    extra: &[&str],
) -> (String, String) {
    let o = v.rn(&["vm", "image", "import", name, image.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut args = vec![
        "-o",
        "json",
        "vps",
        "create",
        "--backend",
        "vm",
        "--vm-image",
        name,
        "--vm-memory",
        memory_mib,
        "--gen-ssh-key",
        "--key-out-file",
        v.key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let id = common::cluster::created_id(&v.rn(&args));
    v.wait_state(&id, "running");
    let cid = format!("n1-task-{id}");
    (id, cid)
}

/// What `vps snapshot list` says of snapshot `snap`'s consistency.
fn snapshot_consistency(v: &common::cluster::Vps, id: &str, snap: &str) -> String {
    let list = v.json(&["vps", "snapshot", "list", id]);
    let s = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == snap)
        .unwrap_or_else(|| panic!("no snapshot {snap}: {list}"));
    s["consistency"].as_str().unwrap_or_default().to_string()
}

/// Waits until the VM's serial console shows `marker`; the console so far.
fn wait_for_console(
    console: &std::path::Path,
    marker: &str,
    lv: &common::libvirt::PrivateLibvirt,
) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let c = std::fs::read_to_string(console).unwrap_or_default();
        if c.contains(marker) {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not come up:\n{c}\n{}",
            lv.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// The runner's default VM store: a tmpfs in the test's mount namespace
/// (PrivateLibvirt mounts one over /var/lib/libvirt).
const STORE: &str = "/var/lib/libvirt/rivernode";

/// The whole life of a VM VPS through the CLI, the host and the runner:
/// made from an imported image, reached with `rivernode ssh` through the
/// proxy and node port, pinned, its disk kept over stop and restart, a
/// deleted file brought back from a snapshot, paused, left running by a runner killed with SIGKILL and adopted by the
/// next one, and deleted without a trace.
#[test]
fn a_vm_vps_lives_its_whole_life_through_the_runner() {
    use rivernode::kvm::libvirt::{Hypervisor, VmState};
    let Some((kernel, version)) = guest_kernel() else {
        return;
    };
    common::cluster::private_namespaces(move || {
        // QEMU as libvirt's own user, as on a node: the runner's files must
        // be reachable for it.
        let lv = common::libvirt::PrivateLibvirt::start_as_qemu_user();
        let work = tempfile::tempdir().unwrap();
        let initrd = tier1_initramfs(work.path(), &version);
        let passable = |p: &std::path::Path, mode| {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
        };
        passable(work.path(), 0o711);
        passable(&initrd, 0o644);
        let base = ext2_base(work.path());
        let extra = vm_runner_flags(&lv, &kernel, &initrd, "console=ttyS0 panic=-1 quiet");
        let Some(mut v) = common::cluster::Vps::start_full("n1", &[], &extra) else {
            return;
        };
        let (id, cid) = create_vm(&v, "mini", &base, "256", &["--vm-disk", "64M"]);
        let uuid = rivernode::runner::vm::vm_uuid(&cid);
        let name = rivernode::kvm::domain_name(&uuid);
        let console = std::path::PathBuf::from(format!("{STORE}/vms/{cid}/console.log"));
        let c = wait_for_console(&console, "RIVERNODE-VM-UP", &lv);
        assert!(!c.contains("RIVERNODE-VM-NODISK"), "the disk: {c}");
        let out = v.ssh_ok(&id, &["uname -r; hostname; df -k /data | tail -1"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[..2],
            [version.as_str(), &format!("task-{id}")],
            "the node's kernel, the instance's name: {out}\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        // QEMU (libvirt's user) boots the runner's copies: the node's own
        // kernel and initrd are never handed to it.
        use std::os::unix::fs::MetadataExt;
        for f in [&kernel, &initrd] {
            assert_eq!(std::fs::metadata(f).unwrap().uid(), 0, "{}", f.display());
        }
        assert!(std::path::Path::new(&format!("{STORE}/vms/{cid}/vmlinuz")).is_file());
        // The disk is the asked 64 MiB, grown from the 16 MiB image (the
        // filesystem stays 16 MiB: growing it is the guest's business).
        let h = Hypervisor::open(&lv.uri).unwrap();
        let disk = std::path::PathBuf::from(format!("{STORE}/vms/{cid}/disk.qcow2"));
        let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&disk)))
        .unwrap();
        assert_eq!(info["virtual-size"], 64 << 20);
        // Each vCPU runs on the cores the scheduler reserved, and only there.
        let t = v.json(&["task", "status", &id]);
        let cpus = t["placement"]["cpus"].as_str().unwrap().to_string();
        let pid = lv.qemu_pid(&name).expect("QEMU's pid file");
        assert_eq!(vcpu_affinity(pid), vec![cpus.clone()]);
        // The disk keeps what is written over a stop and a restart.
        v.ssh_ok(&id, &["echo kept > /data/f && sync"]);
        // The runner's /metrics has the VM's usage, read from libvirt: its
        // CPU time, QEMU's resident memory (the guest has 256 MiB) and the
        // bytes written to its disk.
        let token = common::metrics::metrics_token(&v);
        let runner = common::metrics::runner_metrics_url(&v, "n1");
        let instance = format!("instance=\"{id}\"");
        let page = wait_for("the VM's usage on the runner's page", || {
            let (code, page) = common::metrics::scrape(&runner, &token);
            let value = |name| common::metrics::sample(&page, name, &[&instance, "kind=\"vps\""]);
            let cpu = value("rivernode_instance_cpu_seconds_total")?;
            let memory = value("rivernode_instance_memory_bytes")?;
            let written = value("rivernode_instance_io_write_bytes_total")?;
            (code == 200 && cpu > 0.0 && memory >= (16 << 20) as f64 && written > 0.0)
                .then_some(page)
        });
        assert_eq!(
            common::metrics::sample(&page, "rivernode_instance_pids", &[&instance]),
            None,
            "a VM's processes are the guest's: {page}"
        );
        if real_part_available("promtool (Debian prometheus)", command_exists("promtool")) {
            common::metrics::promtool(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        }
        let o = v.rn(&["vps", "stop", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "stopped");
        assert_eq!(h.state(&uuid).unwrap(), Some(VmState::Off { exit: 137 }));
        // The stop took a snapshot of the stopped disk (auto_snapshot_on_stop).
        let kept_snapshot = v.snapshot_ids(&id);
        assert_eq!(
            kept_snapshot.len(),
            1,
            "{kept_snapshot:?}: {}\n{}",
            v.json(&["task", "status", &id]),
            v.logs()
        );
        let o = v.rn(&["vps", "restart", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["cat /data/f"]), "kept\n");
        // A running VM's disk is copied as it is at that instant while the
        // guest runs on (no guest agent here: crash-consistent, after a sync).
        v.ssh_ok(&id, &["echo live > /data/g && sync"]);
        let o = v.rn(&["vps", "snapshot", "create", &id, "-m", "live"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let live = v.snapshot_ids(&id).last().unwrap().clone();
        assert_eq!(v.state(&id), "running");
        assert_eq!(snapshot_consistency(&v, &id, &live), "crash");
        v.ssh_ok(&id, &["rm /data/g && sync"]);
        assert!(
            !std::path::Path::new(&format!("{STORE}/vms/{cid}/snapshot.qcow2")).exists(),
            "the copy's work file is gone"
        );
        // A snapshot brings back a deleted file.
        v.ssh_ok(&id, &["rm /data/f && sync"]);
        let o = v.rn(&["vps", "stop", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "stopped");
        let o = v.rn(&["vps", "snapshot", "create", &id, "-m", "without f"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            v.snapshot_ids(&id).len(),
            4,
            "on stops, running and by hand"
        );
        let o = v.rn(&["vps", "restart", &id, "--from-snapshot", &kept_snapshot[0]]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        assert_eq!(
            v.ssh_ok(&id, &["cat /data/f; ls /data"]),
            "kept\nf\nlost+found\n"
        );
        // The snapshot of the running VM brings back what it had then.
        let o = v.rn(&["vps", "stop", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "stopped");
        let o = v.rn(&["vps", "restart", &id, "--from-snapshot", &live]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["cat /data/f /data/g"]), "kept\nlive\n");
        // Paused, the guest does not run; resumed, it answers again.
        let o = v.rn(&["vps", "pause", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "paused");
        assert_eq!(h.state(&uuid).unwrap(), Some(VmState::Paused));
        let o = v.rn(&["vps", "resume", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        // A runner killed with SIGKILL leaves the VM running; the next
        // one adopts it (and stops it when asked).
        let qemu = lv.qemu_pid(&name).unwrap();
        v.restart_runner(None);
        assert_eq!(lv.qemu_pid(&name), Some(qemu), "the same QEMU");
        assert!(std::path::Path::new(&format!("/proc/{qemu}")).exists());
        assert_eq!(v.ssh_ok(&id, &["cat /data/f"]), "kept\n");
        // Deleted, nothing of it is left: no domain, files, tap or address.
        v.delete(&id);
        assert_eq!(h.state(&uuid).unwrap(), None);
        assert!(h.list().unwrap().is_empty());
        assert!(!std::path::Path::new(&format!("{STORE}/vms/{cid}")).exists());
        assert!(!v
            .runner_data()
            .join(format!("runner/vm-snapshots/{cid}"))
            .exists());
        assert_eq!(v.leftovers(), (0, 0, 0), "containers, links, leases");
        drop(h);
        drop(v);
        drop(lv);
    });
}

/// UEFI, the production default (`vm_firmware = "uefi"`, no node kernel):
/// libvirt picks OVMF with Secure Boot off from the firmware descriptors,
/// the VM's variables live in its own `VARS.fd`, and the firmware boots the
/// loader on the VM's own disk (GRUB, then the tier-1 guest); the guest
/// sees EFI firmware and answers SSH. Deleted, the variables go too.
#[test]
fn a_uefi_vm_boots_the_loader_on_its_own_disk() {
    let Some((kernel, version)) = guest_kernel() else {
        return;
    };
    if !uefi_tools_present() {
        return;
    }
    common::cluster::private_namespaces(move || {
        let lv = common::libvirt::PrivateLibvirt::start_as_qemu_user();
        let work = tempfile::tempdir().unwrap();
        let initrd = tier1_initramfs(work.path(), &version);
        let base = uefi_base(
            work.path(),
            &kernel,
            &initrd,
            "console=ttyS0 panic=-1 quiet",
        );
        let extra: Vec<String> = [
            "--libvirt-uri",
            &lv.uri,
            "--vm-accel",
            "qemu",
            "--vm-firmware",
            "uefi",
            "--vm-disk-cache",
            "writeback",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let Some(v) = common::cluster::Vps::start_full("n1", &[], &extra) else {
            return;
        };
        let (id, cid) = create_vm(&v, "efi", &base, "512", &[]);
        let dir = std::path::PathBuf::from(format!("{STORE}/vms/{cid}"));
        let c = wait_for_console(&dir.join("console.log"), "RIVERNODE-VM-UP", &lv);
        assert!(
            c.contains("RIVERNODE-GRUB"),
            "booted by the disk's loader: {c}"
        );
        assert_eq!(
            v.ssh_ok(&id, &["test -d /sys/firmware/efi && echo uefi"]),
            "uefi\n"
        );
        assert!(dir.join("VARS.fd").is_file(), "the VM's own UEFI variables");
        v.delete(&id);
        assert!(!dir.exists(), "the disk and variables are gone");
        drop(v);
        drop(lv);
    });
}

/// Tier 2: Debian 12 with systemd, openssh-server and the real cloud-init
/// (built once with debootstrap, cached under target/) booted by the
/// runner: cloud-init applies our NoCloud seed (root's key, the pinned
/// host key, the hostname and the static address, on a bridge with no
/// DHCP), and `rivernode ssh` gets in through the proxy.
#[test]
fn a_debian_vm_with_cloud_init_takes_our_seed() {
    let Some((kernel, version)) = guest_kernel() else {
        return;
    };
    let initrd = std::path::PathBuf::from(format!("/boot/initrd.img-{version}"));
    if !real_part_available(
        "Debian's initrd for the node's kernel (linux-image-amd64)",
        initrd.exists(),
    ) {
        return;
    }
    let initrd = boot_copy(&initrd);
    let Some(image) = debian_cloud_image(&version) else {
        return;
    };
    common::cluster::private_namespaces(move || {
        let lv = common::libvirt::PrivateLibvirt::start_as_qemu_user();
        let extra = vm_runner_flags(&lv, &kernel, &initrd, "root=/dev/vda rw console=ttyS0");
        let Some(v) = common::cluster::Vps::start_full("n1", &[], &extra) else {
            return;
        };
        let (id, cid) = create_vm(&v, "debian", &image, "1024", &[]);
        let console = std::path::PathBuf::from(format!("{STORE}/vms/{cid}/console.log"));
        // systemd and cloud-init under emulation take minutes: ssh works
        // once cloud-init has written the key and the address.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
        let out = loop {
            let o = v.ssh(
                &id,
                &["hostname; ip -4 -o addr show eth0; cloud-init status --wait --long; cloud-init schema --system >/dev/null 2>&1 && echo schema-ok; true"],
            );
            if o.status.success() {
                break stdout(&o);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no ssh into the Debian VM: {}\n--- console ---\n{}",
                stderr(&o),
                std::fs::read_to_string(&console).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_secs(3));
        };
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("task-{id}"), "the seed's hostname: {out}");
        assert!(
            lines[1].contains("inet 10.253.0.2/24"),
            "the seed's static address: {out}"
        );
        assert!(out.contains("status: done"), "cloud-init finished: {out}");
        assert!(!out.contains("errors:\n  -"), "without errors: {out}");
        assert!(
            out.contains("schema-ok"),
            "our user-data is valid cloud-config: {out}"
        );
        // `ssh config` entries work with stock scp (OpenSSH's sftp), as for
        // a container: through the proxy, bytes identical both ways.
        let cfg = v.ssh_config("vm_ssh_config");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let entry = format!("rivernode-vps-{id}");
        assert!(v.scp_round_trip(&cfg, &entry, "/root/payload", &data) == data);
        // With QEMU's guest agent running, a snapshot of the running VM is
        // taken with its filesystems frozen for that instant, and thawed:
        // the guest writes again afterwards.
        v.ssh_ok(
            &id,
            &["systemctl is-active --wait qemu-guest-agent || systemctl start qemu-guest-agent"],
        );
        let o = v.rn(&["vps", "snapshot", "create", &id, "-m", "agent"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let snap = v.snapshot_ids(&id).last().unwrap().clone();
        assert_eq!(snapshot_consistency(&v, &id, &snap), "frozen");
        let table = stdout(&v.rn(&["vps", "snapshot", "list", &id]));
        assert!(table.contains("filesystems frozen"), "{table}");
        assert_eq!(
            v.ssh_ok(&id, &["touch /root/after && echo written"]),
            "written\n"
        );
        v.delete(&id);
        drop(v);
        drop(lv);
    });
}
