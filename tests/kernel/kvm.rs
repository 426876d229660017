//! The VM VPS seed on a real kernel: the NoCloud image `src/kvm/seed.rs`
//! writes is mounted by Linux's own isofs (loop device, read-only), and
//! its files read back under the names cloud-init looks for.

use std::process::Command;

use rivernode::kvm::seed::{meta_data, network_config, seed_iso, user_data, SeedInput};

use crate::harness::VmSpec;
use crate::{Expect, KernelTest};

pub fn tests() -> Vec<KernelTest> {
    vec![KernelTest {
        name: "kvm_nocloud_seed_mounts_with_its_names",
        vm: || VmSpec {
            modules: vec!["loop", "isofs", "nls_utf8"],
            ..VmSpec::default()
        },
        body: seed_mounts_with_its_names,
        expect: Expect::Pass,
    }]
}

pub fn input() -> SeedInput {
    SeedInput {
        instance_id: "3f2a9c1e-0000-4000-8000-00000000002a".into(),
        hostname: "vps-42".into(),
        ssh_keys: vec!["ssh-ed25519 AAAAC3Nza alice@laptop".into()],
        password_hash: None,
        host_key: None,
        mac: [0x0a, 0x58, 10, 250, 0, 42],
        ip: "10.250.0.42".parse().unwrap(),
        prefix: 24,
        gateway: "10.250.0.1".parse().unwrap(),
        nameservers: vec!["10.250.0.1".parse().unwrap()],
    }
}

fn seed_mounts_with_its_names() {
    let s = input();
    std::fs::write("/tmp/seed.iso", seed_iso(&s)).unwrap();
    std::fs::create_dir_all("/tmp/seed").unwrap();
    let o = Command::new("mount")
        .args([
            "-t",
            "iso9660",
            "-o",
            "loop,ro",
            "/tmp/seed.iso",
            "/tmp/seed",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir("/tmp/seed")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["meta-data", "network-config", "user-data"]);
    let read = |n: &str| std::fs::read_to_string(format!("/tmp/seed/{n}")).unwrap();
    assert_eq!(read("meta-data"), meta_data(&s));
    assert_eq!(read("user-data"), user_data(&s));
    assert_eq!(read("network-config"), network_config(&s));
    let _ = Command::new("umount").arg("/tmp/seed").status();
}
