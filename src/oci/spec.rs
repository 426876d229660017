//! The OCI runtime spec of a rivernode container, built as a typed value
//! (oci-spec) from the task's request, its reservation and the image config.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder, MountBuilder,
    Spec,
};

use super::import::ImageConfig;
use super::OciError;
use crate::topology::CpuList;

#[derive(Clone, Debug)]
pub struct MountInput {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Everything the spec is built from.
#[derive(Clone, Debug)]
pub struct RuntimeSpecInput {
    pub hostname: String,
    pub args: Vec<String>,
    /// User environment; image and rivernode variables are added around it.
    pub env: BTreeMap<String, String>,
    /// Variables rivernode sets (RIVERNODE_TASK_ID, ...); they win over the user's.
    pub rivernode_env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub mounts: Vec<MountInput>,
    pub cpus: CpuList,
    /// A CFS quota of this many cores (none: the cpuset alone bounds it,
    /// as for instances on shared cores, whose set changes).
    pub cpu_quota_cores: Option<i64>,
    pub mems: Option<CpuList>,
    pub memory_bytes: Option<u64>,
    pub pids_max: i64,
    /// Relative to the runtime's cgroup root, e.g. `/rivernode/task-7`.
    pub cgroups_path: String,
    /// Join this network namespace instead of getting a fresh, empty one.
    pub netns: Option<PathBuf>,
    /// Privileged: every capability in this mask (the runner's own bounding
    /// set: a container cannot get more than its runtime holds), no masked
    /// or read-only kernel paths, all device access in the device cgroup
    /// (Docker's `--privileged`, less the node's device nodes, which are not
    /// copied in).
    pub privileged: Option<u64>,
    /// Size of the `/dev/shm` tmpfs (its pages count against the memory
    /// limit, as any tmpfs page a cgroup writes does).
    pub shm_bytes: u64,
    /// Who the process runs as (the image's `User`; root by default).
    pub user: super::user::ImageUser,
}

/// Sets each of `vars` in the process environment, replacing any entry of
/// the same name (CDI edits append theirs; ours must win).
pub fn set_env(spec: &mut Spec, vars: &BTreeMap<String, String>) {
    let Some(p) = spec.process_mut().as_mut() else {
        return;
    };
    let mut env: Vec<String> = p
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| {
            let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
            !vars.contains_key(key)
        })
        .collect();
    env.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
    p.set_env(Some(env));
}

/// Removes each of `keys` from the process environment.
pub fn remove_env(spec: &mut Spec, keys: &[&str]) {
    let Some(p) = spec.process_mut().as_mut() else {
        return;
    };
    let env: Vec<String> = p
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| !keys.contains(&kv.split_once('=').map(|(k, _)| k).unwrap_or(kv)))
        .collect();
    p.set_env(Some(env));
}

/// The capability bounding set of this process (`CapBnd` in `/proc/self/status`).
pub fn capability_bound(proc_root: &std::path::Path) -> Result<u64, OciError> {
    let path = proc_root.join("self/status");
    let text = std::fs::read_to_string(&path).map_err(|source| OciError::Io {
        path: path.clone(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| OciError::Spec(format!("{}: no CapBnd line", path.display())))
}

fn spec_err(e: impl std::fmt::Display) -> OciError {
    OciError::Spec(e.to_string())
}

/// The environment: the image's, then the user's, then rivernode's.
fn merged_env(image: &ImageConfig, input: &RuntimeSpecInput) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    for kv in image.env.iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.into(), v.into());
        }
    }
    if let (false, Some(home)) = (env.contains_key("HOME"), &input.user.home) {
        env.insert("HOME".into(), home.clone());
    }
    env.extend(input.env.clone());
    env.extend(input.rivernode_env.clone());
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The capabilities root in a container has: the same set Docker and
/// containerd give by default (enough for `chown`, `su`, an SSH server's
/// setgroups), without anything that reaches the node (no SYS_ADMIN,
/// NET_ADMIN, SYS_MODULE, ...).
fn default_capabilities() -> Result<oci_spec::runtime::LinuxCapabilities, OciError> {
    use oci_spec::runtime::Capability::*;
    let set: std::collections::HashSet<oci_spec::runtime::Capability> = [
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ]
    .into_iter()
    .collect();
    capabilities(set)
}

/// `set` as root's bounding, effective and permitted capabilities.
fn capabilities(
    set: std::collections::HashSet<oci_spec::runtime::Capability>,
) -> Result<oci_spec::runtime::LinuxCapabilities, OciError> {
    oci_spec::runtime::LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .build()
        .map_err(spec_err)
}

/// Every capability Linux 6.x knows (`capability.h` order).
const ALL_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Every capability whose bit is set in `mask`.
fn all_capabilities(mask: u64) -> Result<oci_spec::runtime::LinuxCapabilities, OciError> {
    let set: std::collections::HashSet<oci_spec::runtime::Capability> = ALL_CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, name)| name)
        .filter_map(|name| serde_json::from_value(serde_json::json!(format!("CAP_{name}"))).ok())
        .collect();
    capabilities(set)
}

pub fn build(image: &ImageConfig, input: &RuntimeSpecInput) -> Result<Spec, OciError> {
    let mut spec = Spec::default();
    spec.set_hostname(Some(input.hostname.clone()));
    // A writable root filesystem (its changes live in the container's own
    // snapshot), as with Docker; oci-spec's default would be read-only.
    if let Some(root) = spec.root_mut().as_mut() {
        root.set_readonly(Some(false));
    }
    let cwd = input
        .cwd
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if let Some(p) = spec.process_mut().as_mut() {
        p.set_capabilities(Some(match input.privileged {
            Some(mask) => all_capabilities(mask)?,
            None => default_capabilities()?,
        }));
        p.set_args(Some(input.args.clone()));
        let u = &input.user;
        let user = oci_spec::runtime::UserBuilder::default()
            .uid(u.uid)
            .gid(u.gid)
            .additional_gids(u.additional_gids.clone())
            .build()
            .map_err(spec_err)?;
        p.set_user(user);
        // setuid programs and file capabilities gain nothing inside.
        p.set_no_new_privileges(Some(input.privileged.is_none()));
        p.set_env(Some(merged_env(image, input)));
        p.set_cwd(PathBuf::from(cwd));
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    // Not the 64 MiB default that multi-worker data loaders and NCCL fail with.
    for m in mounts
        .iter_mut()
        .filter(|m| m.destination() == std::path::Path::new("/dev/shm"))
    {
        let mut opts: Vec<String> = m
            .options()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|o| !o.starts_with("size="))
            .collect();
        opts.push(format!("size={}k", input.shm_bytes.div_ceil(1024).max(1)));
        m.set_options(Some(opts));
    }
    if input.privileged.is_some() {
        // /sys writable, as Docker's --privileged has it.
        for m in mounts
            .iter_mut()
            .filter(|m| m.destination() == std::path::Path::new("/sys"))
        {
            let opts = m.options().clone().unwrap_or_default();
            m.set_options(Some(opts.into_iter().filter(|o| o != "ro").collect()));
        }
    }
    for m in &input.mounts {
        let mut opts = vec![
            "rbind".to_string(),
            "nosuid".to_string(),
            "nodev".to_string(),
        ];
        opts.push(if m.read_only { "ro" } else { "rw" }.to_string());
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(&m.target))
                .typ("bind")
                .source(m.source.clone())
                .options(opts)
                .build()
                .map_err(spec_err)?,
        );
    }
    spec.set_mounts(Some(mounts));

    let mut cpu = LinuxCpuBuilder::default().cpus(input.cpus.to_string());
    if let Some(cores) = input.cpu_quota_cores {
        cpu = cpu.quota(cores * 100_000).period(100_000u64);
    }
    if let Some(m) = &input.mems {
        cpu = cpu.mems(m.to_string());
    }
    let mut resources = LinuxResourcesBuilder::default()
        .cpu(cpu.build().map_err(spec_err)?)
        .pids(
            LinuxPidsBuilder::default()
                .limit(input.pids_max)
                .build()
                .map_err(spec_err)?,
        )
        .devices(if input.privileged.is_some() {
            vec![oci_spec::runtime::LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .access("rwm")
                .build()
                .map_err(spec_err)?]
        } else {
            vec![]
        });
    if let Some(bytes) = input.memory_bytes {
        // Swap equal to the limit: the task cannot swap past its memory.
        let mem = LinuxMemoryBuilder::default()
            .limit(bytes as i64)
            .swap(bytes as i64)
            .build()
            .map_err(spec_err)?;
        resources = resources.memory(mem);
    }
    let resources = resources.build().map_err(spec_err)?;
    if let Some(linux) = spec.linux_mut().as_mut() {
        linux.set_resources(Some(resources));
        linux.set_cgroups_path(Some(PathBuf::from(&input.cgroups_path)));
        if input.privileged.is_some() {
            linux.set_masked_paths(None);
            linux.set_readonly_paths(None);
        } else {
            // Unprivileged: only the syscalls a workload needs (no new
            // namespaces, mounts, keyrings, BPF, ...).
            linux.set_seccomp(Some(super::seccomp::default_profile()));
            let mut masked = linux.masked_paths().clone().unwrap_or_default();
            // The RAPL energy counters leak what other tenants compute (L2).
            masked.push("/sys/devices/virtual/powercap".into());
            linux.set_masked_paths(Some(masked));
        }
        if let (Some(path), Some(namespaces)) = (&input.netns, linux.namespaces_mut().as_mut()) {
            for ns in namespaces.iter_mut() {
                if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
                    ns.set_path(Some(path.clone()));
                }
            }
        }
    }
    Ok(spec)
}

/// The spec as containerd stores it: JSON inside a protobuf `Any`.
pub fn to_any(spec: &Spec) -> Result<prost_types::Any, OciError> {
    Ok(prost_types::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
        value: serde_json::to_vec(spec).map_err(spec_err)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_env_replaces_what_cdi_appended() {
        let mut spec = build(&ImageConfig::default(), &input()).unwrap();
        if let Some(p) = spec.process_mut().as_mut() {
            let mut env = p.env().clone().unwrap();
            env.push("NVIDIA_VISIBLE_DEVICES=void".into());
            p.set_env(Some(env));
        }
        set_env(
            &mut spec,
            &[("NVIDIA_VISIBLE_DEVICES".to_string(), "GPU-1".to_string())].into(),
        );
        let env = spec.process().as_ref().unwrap().env().clone().unwrap();
        let nv: Vec<&String> = env
            .iter()
            .filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES="))
            .collect();
        assert_eq!(nv, ["NVIDIA_VISIBLE_DEVICES=GPU-1"]);
        assert!(env.contains(&"RIVERNODE_TASK_ID=7".to_string()));
    }

    fn input() -> RuntimeSpecInput {
        RuntimeSpecInput {
            hostname: "task-7".into(),
            args: vec!["python".into(), "train.py".into()],
            env: [
                ("PATH".to_string(), "/opt/bin".to_string()),
                ("A".into(), "1".into()),
            ]
            .into(),
            rivernode_env: [("RIVERNODE_TASK_ID".to_string(), "7".to_string())].into(),
            cwd: Some("/shared".into()),
            mounts: vec![MountInput {
                source: "/mnt/share".into(),
                target: "/shared".into(),
                read_only: false,
            }],
            cpus: "2-3".parse().unwrap(),
            cpu_quota_cores: Some(2),
            mems: Some("1".parse().unwrap()),
            memory_bytes: Some(32 << 20),
            pids_max: 4096,
            cgroups_path: "/rivernode/task-7".into(),
            netns: None,
            privileged: None,
            shm_bytes: 1 << 30,
            user: Default::default(),
        }
    }

    #[test]
    fn privileged_gets_every_capability_and_no_masks() {
        let image = ImageConfig::default();
        let plain = serde_json::to_value(build(&image, &input()).unwrap()).unwrap();
        let caps = |j: &serde_json::Value| {
            j["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len()
        };
        assert_eq!(caps(&plain), 14);
        assert!(!plain["linux"]["maskedPaths"].as_array().unwrap().is_empty());
        let p = serde_json::to_value(
            build(
                &image,
                &RuntimeSpecInput {
                    privileged: Some(u64::MAX),
                    ..input()
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(caps(&p), ALL_CAPABILITIES.len(), "every name parses");
        assert!(p["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("CAP_SYS_ADMIN")));
        assert!(p["linux"]["maskedPaths"].is_null());
        assert_eq!(p["linux"]["resources"]["devices"][0]["allow"], true);
        assert!(p["linux"]["seccomp"].is_null(), "privileged: unconfined");
        assert_eq!(p["process"]["noNewPrivileges"], false);
        assert_eq!(plain["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(plain["process"]["noNewPrivileges"], true);
        assert!(plain["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("/sys/devices/virtual/powercap")));
        // Never more than the runtime holds itself.
        let p = serde_json::to_value(
            build(
                &image,
                &RuntimeSpecInput {
                    privileged: Some(!(1 << 21)),
                    ..input()
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(caps(&p), ALL_CAPABILITIES.len() - 1);
        assert!(!p["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("CAP_SYS_ADMIN")));
        let sys = p["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(!sys["options"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("ro")));
    }

    #[test]
    fn spec_carries_the_reservation() {
        let image = ImageConfig {
            env: Some(vec!["LANG=C.UTF-8".into(), "A=image".into()]),
            working_dir: Some("/app".into()),
            user: None,
            ..Default::default()
        };
        let spec = build(&image, &input()).unwrap();
        let j = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            j["process"]["args"],
            serde_json::json!(["python", "train.py"])
        );
        let env: Vec<&str> = j["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"A=1") && env.contains(&"LANG=C.UTF-8") && env.contains(&"PATH=/opt/bin"),
            "{env:?}"
        );
        assert!(env.contains(&"RIVERNODE_TASK_ID=7"));
        assert_eq!(j["process"]["cwd"], "/shared");
        assert_eq!(j["process"]["user"]["uid"], 0);
        let as_app = build(
            &image,
            &RuntimeSpecInput {
                user: crate::oci::user::ImageUser {
                    uid: 1000,
                    gid: 1000,
                    additional_gids: vec![44],
                    home: Some("/home/app".into()),
                },
                ..input()
            },
        )
        .unwrap();
        let a = serde_json::to_value(&as_app).unwrap();
        assert_eq!(
            (
                &a["process"]["user"]["uid"],
                &a["process"]["user"]["additionalGids"]
            ),
            (&serde_json::json!(1000), &serde_json::json!([44]))
        );
        assert!(a["process"]["env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("HOME=/home/app")));
        assert_eq!(j["root"]["readonly"], false);
        let r = &j["linux"]["resources"];
        assert_eq!(r["cpu"]["cpus"], "2-3");
        assert_eq!(r["cpu"]["mems"], "1");
        assert_eq!(r["cpu"]["quota"], 200_000);
        assert_eq!(r["memory"]["limit"], 32 << 20);
        assert_eq!(r["pids"]["limit"], 4096);
        assert_eq!(j["linux"]["cgroupsPath"], "/rivernode/task-7");
        let shm = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/dev/shm")
            .unwrap();
        let opts: Vec<&str> = shm["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert!(
            opts.contains(&"size=1048576k") && !opts.contains(&"size=65536k"),
            "{opts:?}"
        );
        assert!(j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/shared" && m["type"] == "bind"));
        let ns: Vec<&str> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(
            ns.contains(&"network") && ns.contains(&"pid"),
            "isolated from the node's network: {ns:?}"
        );
        assert_eq!(
            to_any(&spec).unwrap().type_url,
            "types.containerd.io/opencontainers/runtime-spec/1/Spec"
        );
    }
}
