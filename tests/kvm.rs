//! The VM building blocks against libvirt's and Linux's own tools: the
//! domain XML we generate (its golden files, which the unit tests keep
//! equal to the builder's output) against libvirt's schema, the NoCloud
//! seed read back by isoinfo and blkid, and `vm check` on this machine.
//! (The seed is also mounted by a real kernel: tests/kernel/kvm.rs.)

mod common;

use std::process::Command;

use common::*;
use rivernode::kvm::seed::{meta_data, network_config, seed_iso, user_data, SeedInput};

fn run(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
    let s = SeedInput {
        instance_id: "3f2a9c1e-0000-4000-8000-00000000002a".into(),
        hostname: "vps-42".into(),
        ssh_keys: vec!["ssh-ed25519 AAAAC3Nza alice@laptop".into()],
        password_hash: Some("$6$salt$hash".into()),
        host_key: Some((
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into(),
            "ssh-ed25519 AAAAhost".into(),
        )),
        mac: [0x0a, 0x58, 10, 250, 0, 42],
        ip: "10.250.0.42".parse().unwrap(),
        prefix: 24,
        gateway: "10.250.0.1".parse().unwrap(),
        nameservers: vec!["10.250.0.1".parse().unwrap()],
    };
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
