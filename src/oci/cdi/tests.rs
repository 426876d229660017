use std::collections::HashMap;

use super::nvidia::{self, DriverGpu, NvidiaNode, NvidiaRoots};
use super::*;
use crate::topology::PciAddress;

/// Device nodes by path, as a fake `/dev`.
struct FakeNodes(HashMap<PathBuf, NodeFacts>);

impl DeviceNodes for FakeNodes {
    fn stat(&self, path: &Path) -> std::io::Result<Option<NodeFacts>> {
        match self.0.get(path) {
            Some(f) => Ok(Some(*f)),
            None if path == Path::new("/etc/hostname") => Ok(None),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }
}

fn c(major: i64, minor: i64) -> NodeFacts {
    NodeFacts {
        char_device: true,
        major,
        minor,
        mode: 0o666,
    }
}

fn fake_dev() -> FakeNodes {
    FakeNodes(HashMap::from([
        (PathBuf::from("/dev/nvidia0"), c(195, 0)),
        (PathBuf::from("/dev/nvidia1"), c(195, 1)),
        (PathBuf::from("/dev/nvidiactl"), c(195, 255)),
        (PathBuf::from("/host/null"), c(1, 3)),
    ]))
}

const YAML: &str = r#"
cdiVersion: 0.7.0
kind: example.com/gpu
containerEdits:
  env: [VENDOR=example]
  deviceNodes:
    - path: /dev/nvidiactl
  mounts:
    - hostPath: /
      containerPath: /usr/lib/example
      options: [ro, nosuid, nodev, rbind]
  additionalGids: [0, 44]
devices:
  - name: GPU-aaaa
    containerEdits:
      deviceNodes:
        - path: /dev/nvidia0
  - name: GPU-bbbb
    containerEdits:
      env: [ONE=1]
      deviceNodes:
        - path: /dev/nvidia1
          permissions: rw
        - path: /dev/zero-ish
          hostPath: /host/null
          permissions: none
      mounts:
        - hostPath: /
          containerPath: /opt
          options: [rbind]
        - hostPath: /
          containerPath: /dev/shm
          type: bind
          options: [rbind]
"#;

fn registry() -> Registry {
    let spec = parse(Path::new("/etc/cdi/example.yaml"), YAML).unwrap();
    Registry::from_specs(vec![("/etc/cdi/example.yaml".into(), spec)]).unwrap()
}

fn base() -> Spec {
    Spec::default()
}

/// Applies device `name` of example.com/gpu to a fresh spec: the error.
fn apply_err(r: &Registry, name: &str) -> String {
    let e = r
        .apply(
            &mut base(),
            &[format!("example.com/gpu={name}")],
            &fake_dev(),
        )
        .unwrap_err();
    crate::error_chain(&e)
}

fn j(spec: &Spec) -> serde_json::Value {
    serde_json::to_value(spec).unwrap()
}

#[test]
fn yaml_spec_parses_and_names_are_found_by_device_name() {
    let r = registry();
    assert_eq!(r.named("GPU-bbbb"), vec!["example.com/gpu=GPU-bbbb"]);
    assert!(r.named("GPU-cccc").is_empty());
}

#[test]
fn edits_apply_with_the_reference_semantics() {
    let r = registry();
    let mut spec = base();
    r.apply(&mut spec, &["example.com/gpu=GPU-bbbb".into()], &fake_dev())
        .unwrap();
    let v = j(&spec);
    // Spec-wide edits once, then the device's.
    let env: Vec<&str> = v["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(env.ends_with(&["VENDOR=example", "ONE=1"]), "{env:?}");
    let devices = v["linux"]["devices"].as_array().unwrap();
    let paths: Vec<&str> = devices
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/dev/nvidiactl", "/dev/nvidia1", "/dev/zero-ish"]);
    // Type and numbers come from the node, not the spec.
    assert_eq!(devices[1]["type"], "c");
    assert_eq!(
        (devices[1]["major"].as_i64(), devices[1]["minor"].as_i64()),
        (Some(195), Some(1))
    );
    assert_eq!(
        (devices[2]["major"].as_i64(), devices[2]["minor"].as_i64()),
        (Some(1), Some(3))
    );
    // nvidia0 was not asked for: not there, and not allowed.
    assert!(!paths.contains(&"/dev/nvidia0"));
    let rules = v["linux"]["resources"]["devices"].as_array().unwrap();
    let allowed: Vec<(i64, i64, &str)> = rules
        .iter()
        .filter(|r| r["allow"] == true)
        .map(|r| {
            (
                r["major"].as_i64().unwrap(),
                r["minor"].as_i64().unwrap(),
                r["access"].as_str().unwrap(),
            )
        })
        .collect();
    // `none` gives the node but no access; default is rwm.
    assert_eq!(allowed, [(195, 255, "rwm"), (195, 1, "rw")]);
    // additionalGids: appended, 0 skipped.
    assert_eq!(
        v["process"]["user"]["additionalGids"],
        serde_json::json!([44])
    );
    // Mounts: same destination replaced (the default /dev/shm tmpfs), sorted by depth.
    let mounts = v["mounts"].as_array().unwrap();
    let shm: Vec<&serde_json::Value> = mounts
        .iter()
        .filter(|m| m["destination"] == "/dev/shm")
        .collect();
    assert_eq!(shm.len(), 1);
    assert_eq!(shm[0]["type"], "bind");
    let depths: Vec<usize> = mounts
        .iter()
        .map(|m| {
            Path::new(m["destination"].as_str().unwrap())
                .components()
                .count()
        })
        .collect();
    assert!(depths.windows(2).all(|w| w[0] <= w[1]), "{depths:?}");
    let opt = mounts.iter().find(|m| m["destination"] == "/opt").unwrap();
    assert_eq!(opt["type"], "bind", "a bind mount without a type is a bind");
}

#[test]
fn spec_wide_edits_apply_once_for_two_devices() {
    let r = registry();
    let mut spec = base();
    r.apply(
        &mut spec,
        &[
            "example.com/gpu=GPU-bbbb".into(),
            "example.com/gpu=GPU-aaaa".into(),
        ],
        &fake_dev(),
    )
    .unwrap();
    let v = j(&spec);
    let env = v["process"]["env"].as_array().unwrap();
    assert_eq!(env.iter().filter(|e| *e == "VENDOR=example").count(), 1);
    let paths: Vec<&str> = v["linux"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    // In the order asked: the ledger's order.
    assert_eq!(
        paths,
        [
            "/dev/nvidiactl",
            "/dev/nvidia1",
            "/dev/zero-ish",
            "/dev/nvidia0"
        ]
    );
}

#[test]
fn a_bad_device_leaves_the_spec_untouched_and_names_file_and_device() {
    let text = YAML.replace(
        "path: /dev/nvidia1\n",
        "path: /dev/nvidia1\n          major: 10\n",
    );
    let spec = parse(Path::new("/etc/cdi/example.yaml"), &text).unwrap();
    let r = Registry::from_specs(vec![("/etc/cdi/example.yaml".into(), spec)]).unwrap();
    let mut s = base();
    let before = j(&s);
    let e = crate::error_chain(
        &r.apply(&mut s, &["example.com/gpu=GPU-bbbb".into()], &fake_dev())
            .unwrap_err(),
    );
    assert!(
        e.contains("/etc/cdi/example.yaml") && e.contains("GPU-bbbb") && e.contains("195:1"),
        "{e}"
    );
    assert_eq!(j(&s), before, "not half-equipped");

    // A node that is missing, or not a device.
    for (path, want) in [
        ("/dev/nvidia7", "does not exist"),
        ("/etc/hostname", "not a device node"),
    ] {
        let text = YAML.replace("path: /dev/nvidia0", &format!("path: {path}"));
        let spec = parse(Path::new("/etc/cdi/x.yaml"), &text).unwrap();
        let r = Registry::from_specs(vec![("/etc/cdi/x.yaml".into(), spec)]).unwrap();
        let e = apply_err(&r, "GPU-aaaa");
        assert!(
            e.contains(path) && e.contains(want) && e.contains("GPU-aaaa"),
            "{e}"
        );
    }

    // An unknown device.
    let e = apply_err(&registry(), "GPU-zzzz");
    assert!(e.contains("GPU-zzzz"), "{e}");
}

#[test]
fn bad_specs_are_refused_naming_the_file() {
    let p = Path::new("/etc/cdi/bad.yaml");
    let cases = [
        (
            YAML.replace("cdiVersion: 0.7.0", "cdiVersion: 9.9.9"),
            "9.9.9",
        ),
        // additionalGids needs 0.7.0.
        (
            YAML.replace("cdiVersion: 0.7.0", "cdiVersion: 0.5.0"),
            "0.7.0",
        ),
        (
            YAML.replace("kind: example.com/gpu", "kind: gpu"),
            "vendor.com/class",
        ),
        (
            YAML.replace("  env: [VENDOR=example]", "  envv: [X=1]"),
            "envv",
        ),
        (YAML.replace("name: GPU-aaaa", "name: GPU-bbbb"), "twice"),
        (
            YAML.replace("name: GPU-aaaa", "name: 'bad name'"),
            "bad name",
        ),
        ("cdiVersion: [".to_string(), ""),
    ];
    for (text, want) in cases {
        let e = parse(p, &text).unwrap_err().to_string();
        assert!(e.contains("bad.yaml") && e.contains(want), "{want}: {e}");
    }
    // intelRdt parses (0.7.0) but is refused when applied, by name.
    let text = YAML.replace("  env: [VENDOR=example]", "  intelRdt: {closID: x}");
    let spec = parse(p, &text).unwrap();
    let r = Registry::from_specs(vec![(p.into(), spec)]).unwrap();
    let e = apply_err(&r, "GPU-aaaa");
    assert!(e.contains("intelRdt"), "{e}");
}

#[test]
fn hooks_go_to_their_phase_and_must_be_installed() {
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("hook");
    std::fs::write(&hook, "#!/bin/sh\n").unwrap();
    let spec = CdiSpec {
        cdi_version: "0.5.0".into(),
        kind: "example.com/gpu".into(),
        devices: vec![CdiDevice {
            name: "0".into(),
            container_edits: ContainerEdits {
                hooks: vec![
                    CdiHook {
                        hook_name: "createContainer".into(),
                        path: hook.clone(),
                        args: vec!["hook".into(), "a".into()],
                        ..CdiHook::default()
                    },
                    CdiHook {
                        hook_name: "poststop".into(),
                        path: hook.clone(),
                        timeout: Some(5),
                        ..CdiHook::default()
                    },
                ],
                ..ContainerEdits::default()
            },
            ..CdiDevice::default()
        }],
        ..CdiSpec::default()
    };
    let r = Registry::from_specs(vec![("/mem".into(), spec.clone())]).unwrap();
    let mut s = base();
    r.apply(&mut s, &["example.com/gpu=0".into()], &fake_dev())
        .unwrap();
    let v = j(&s);
    assert_eq!(
        v["hooks"]["createContainer"][0]["args"],
        serde_json::json!(["hook", "a"])
    );
    assert_eq!(v["hooks"]["poststop"][0]["timeout"], 5);
    assert!(v["hooks"]["startContainer"].is_null());

    let mut missing = spec;
    missing.devices[0].container_edits.hooks[1].path = dir.path().join("absent");
    let r = Registry::from_specs(vec![("/mem".into(), missing)]).unwrap();
    let e = apply_err(&r, "0");
    assert!(e.contains("absent") && e.contains("not installed"), "{e}");
}

#[test]
fn directories_load_in_order_later_wins_and_a_clash_in_one_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let (etc, run) = (root.path().join("etc"), root.path().join("run"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(etc.join("a.yaml"), YAML).unwrap();
    let json = serde_json::to_string(&parse(Path::new("x.yaml"), YAML).unwrap()).unwrap();
    std::fs::write(run.join("b.json"), &json).unwrap();
    std::fs::write(run.join("ignored.txt"), "not a spec").unwrap();
    let dirs = vec![etc.clone(), run.clone(), root.path().join("absent")];
    let r = Registry::load(&dirs).unwrap();
    assert_eq!(r.devices["example.com/gpu=GPU-aaaa"].0, run.join("b.json"));
    assert!(r.problems().is_empty());
    // Twice in one directory: neither is used, and a request for it says why;
    // the other devices stay usable.
    std::fs::remove_file(run.join("b.json")).unwrap();
    std::fs::write(etc.join("c.json"), &json).unwrap();
    let r = Registry::load(&dirs).unwrap();
    assert!(r.named("GPU-aaaa").is_empty());
    let e = apply_err(&r, "GPU-aaaa");
    assert!(
        e.contains("a.yaml") && e.contains("c.json") && e.contains("GPU-aaaa"),
        "{e}"
    );
    // A broken file is left out, named; the good ones load.
    std::fs::remove_file(etc.join("c.json")).unwrap();
    std::fs::write(etc.join("d.yaml"), "kind: [").unwrap();
    let r = Registry::load(&dirs).unwrap();
    assert_eq!(r.named("GPU-bbbb"), ["example.com/gpu=GPU-bbbb"]);
    assert!(
        r.problems_text().contains("d.yaml"),
        "{}",
        r.problems_text()
    );
}

fn gpu(addr: &str, uuid: &str, minor: u32) -> DriverGpu {
    DriverGpu {
        address: addr.parse().unwrap(),
        uuid: uuid.into(),
        minor,
        model: None,
    }
}

#[test]
fn driver_files_parse() {
    let info = "Model: \t\t NVIDIA H200\nIRQ:   \t\t 123\nGPU UUID: \t GPU-4a2b\nVideo BIOS: \t ??\nBus Type: \t PCIe\nDMA Size: \t 52 bits\nDevice Minor: \t 3\nBus Location: \t 0000:17:00.0\n";
    let a: PciAddress = "0000:17:00.0".parse().unwrap();
    let g = nvidia::parse_information(a, info).unwrap();
    assert_eq!(
        (g.uuid.as_str(), g.minor, g.model.as_deref()),
        ("GPU-4a2b", 3, Some("NVIDIA H200"))
    );
    assert!(nvidia::parse_information(a, "Model: x\n").is_none());
    let v = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n";
    assert_eq!(nvidia::parse_version(v).as_deref(), Some("535.104.05"));
    let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 2025\n";
    assert_eq!(nvidia::parse_version(open).as_deref(), Some("570.86.15"));
}

#[test]
fn a_spec_is_generated_from_a_fake_nvidia_node() {
    let root = tempfile::tempdir().unwrap();
    let p = |rel: &str| root.path().join(rel);
    let write = |rel: &str, text: &str| {
        std::fs::create_dir_all(p(rel).parent().unwrap()).unwrap();
        std::fs::write(p(rel), text).unwrap();
    };
    write(
        "proc/gpus/0000:65:00.0/information",
        "GPU UUID: GPU-bbbb\nDevice Minor: 1\n",
    );
    write(
        "proc/gpus/0000:17:00.0/information",
        "GPU UUID: GPU-aaaa\nDevice Minor: 0\n",
    );
    write(
        "proc/version",
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  x\n",
    );
    write("dev/nvidiactl", "");
    write("dev/nvidia-uvm", "");
    write("lib/libcuda.so.535.104.05", "elf");
    write("lib/libnvidia-ml.so.535.104.05", "elf");
    write("lib/libnvidia-ml.so.470.1", "stale");
    write("lib/libunrelated.so.535.104.05", "elf");
    std::os::unix::fs::symlink("libcuda.so.535.104.05", p("lib/libcuda.so.1")).unwrap();
    std::os::unix::fs::symlink("libcuda.so.1", p("lib/libcuda.so")).unwrap();
    write("bin/nvidia-smi", "elf");
    write("run/nvidia-persistenced/socket", "");
    let roots = NvidiaRoots {
        driver: p("proc"),
        dev: p("dev"),
        lib_dirs: vec![p("lib"), p("absent")],
        bin_dirs: vec![p("bin")],
        run: p("run"),
    };
    let node = nvidia::discover(&roots).unwrap();
    assert_eq!(node.version.as_deref(), Some("535.104.05"));
    assert_eq!(
        node.gpus,
        vec![
            gpu("0000:17:00.0", "GPU-aaaa", 0),
            gpu("0000:65:00.0", "GPU-bbbb", 1)
        ]
    );
    assert_eq!(node.control_nodes, ["nvidiactl", "nvidia-uvm"]);
    let spec = nvidia::generate(&node);
    validate(Path::new("generated"), &spec).unwrap();
    assert_eq!(spec.kind, "nvidia.com/gpu");
    let names: Vec<&str> = spec.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["GPU-aaaa", "GPU-bbbb"]);
    let node1 = &spec.devices[1].container_edits.device_nodes[0];
    assert_eq!(
        (node1.path.as_str(), node1.host_path.clone()),
        ("/dev/nvidia1", Some(p("dev/nvidia1")))
    );
    let mounts: Vec<(String, String)> = spec
        .container_edits
        .mounts
        .iter()
        .map(|m| {
            (
                m.host_path
                    .strip_prefix(root.path())
                    .unwrap()
                    .display()
                    .to_string(),
                m.container_path.replace(root.path().to_str().unwrap(), ""),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("lib/libcuda.so.535.104.05", "/lib/libcuda.so.535.104.05"),
        ("lib/libcuda.so.535.104.05", "/lib/libcuda.so"),
        ("lib/libcuda.so.535.104.05", "/lib/libcuda.so.1"),
        (
            "lib/libnvidia-ml.so.535.104.05",
            "/lib/libnvidia-ml.so.535.104.05",
        ),
        ("bin/nvidia-smi", "/bin/nvidia-smi"),
        (
            "run/nvidia-persistenced/socket",
            "/run/nvidia-persistenced/socket",
        ),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(mounts, want);
    assert!(spec.container_edits.mounts[0]
        .options
        .contains(&"ro".to_string()));

    assert!(nvidia::missing_essentials(&node).is_empty());

    // Debian's layout: links in the multiarch directory lead, through
    // /etc/alternatives, to the real files in nvidia/current.
    write("deb/current/libcuda.so.535.104.05", "elf");
    write("deb/current/libnvidia-ml.so.535.104.05", "elf");
    std::os::unix::fs::symlink("libcuda.so.535.104.05", p("deb/current/libcuda.so.1")).unwrap();
    std::fs::create_dir_all(p("deb/alternatives")).unwrap();
    std::os::unix::fs::symlink(p("deb/current/libcuda.so.1"), p("deb/alternatives/cuda")).unwrap();
    std::fs::create_dir_all(p("deb/multiarch")).unwrap();
    std::os::unix::fs::symlink(p("deb/alternatives/cuda"), p("deb/multiarch/libcuda.so.1"))
        .unwrap();
    let libs = nvidia::find_libraries(&[p("deb/multiarch"), p("deb/current")], Some("535.104.05"));
    assert_eq!(libs.len(), 2, "{libs:?}");
    assert_eq!(libs[0].path, p("deb/current/libcuda.so.535.104.05"));
    assert_eq!(
        libs[0].links,
        [
            p("deb/multiarch/libcuda.so.1"),
            p("deb/current/libcuda.so.1")
        ]
    );
    let mut without = node.clone();
    without
        .libraries
        .retain(|l| !l.path.to_string_lossy().contains("libcuda"));
    assert_eq!(nvidia::missing_essentials(&without), ["libcuda"]);

    // Pure generation from a fake library list.
    let spec = nvidia::generate(&NvidiaNode {
        gpus: vec![gpu("0000:17:00.0", "GPU-aaaa", 4)],
        libraries: vec![nvidia::Library {
            path: "/usr/lib/x86_64-linux-gnu/libcuda.so.550.1".into(),
            links: vec!["/usr/lib/x86_64-linux-gnu/libcuda.so.1".into()],
        }],
        dev: "/dev".into(),
        ..NvidiaNode::default()
    });
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(
        json["devices"][0]["containerEdits"]["deviceNodes"][0]["path"],
        "/dev/nvidia4"
    );
    assert_eq!(
        json["containerEdits"]["mounts"][1]["containerPath"],
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    );
    // No driver: nothing generated.
    assert!(nvidia::discover(&NvidiaRoots {
        driver: p("absent"),
        ..roots
    })
    .is_none());
}
