//! What a VPS needs beyond a command task: its network (address, namespace,
//! veth, node port in the node's nftables table) and an SSH server. Images
//! without one get dropbear injected read-only: the binary, the libraries
//! `ldd` lists and the loader, run as `ld.so --library-path`, so the image's
//! own libc (if any) is never used, with a minimal passwd; images with an
//! sshd run it under rivernode's configuration. Keys, resolver files and the
//! host key are bind-mounted read-only; passwords work only when the user set one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::api::ports::Proto;
use crate::api::Placement;
use crate::config::RunnerConfig;
use crate::net::{Firewall, InstanceNet, Ipam, NodeNetwork, PortMap};
use crate::oci::MountInput;

/// `--launch jupyter`, run as the onstart's first part: the image's
/// Jupyter (Lab when it has it) on 8080 in the background, its output in
/// the onstart log, with the instance's token; then the onstart script
/// (its arguments), if any. An image without `jupyter` is said in the log
/// and in `vps status`, and the VPS stays up.
const JUPYTER_LAUNCH: &str = r#"j=0
if command -v jupyter >/dev/null 2>&1; then
    if command -v jupyter-lab >/dev/null 2>&1; then app=lab; else app=notebook; fi
    dir="${JUPYTER_DIR:-/}"
    (cd "$dir" && exec jupyter "$app" --ip=0.0.0.0 --port=8080 --no-browser --allow-root         --ServerApp.token="$JUPYTER_TOKEN" --ServerApp.root_dir="$dir") &
else
    echo "rivernode: --launch jupyter: the image has no jupyter on its PATH" >&2
    j=127
fi
if [ $# -gt 0 ]; then "$@" || exit $?; fi
exit $j
"#;

/// The node ports an instance at `ip` answers on: its SSH port (to 22) and
/// each published port (to its port inside).
pub fn port_maps(placement: &Placement, ip: std::net::Ipv4Addr) -> Vec<PortMap> {
    let ssh = placement.node_port.map(|node_port| PortMap {
        node_port,
        ip,
        port: 22,
        proto: Proto::Tcp,
    });
    ssh.into_iter()
        .chain(placement.published.iter().map(|p| PortMap {
            node_port: p.node_port,
            ip,
            port: p.internal,
            proto: p.proto,
        }))
        .collect()
}

/// Where the SSH kit appears inside an instance.
const SSH_DIR: &str = "/.rivernode/ssh";
const INSTANCE_DIR: &str = "/.rivernode/instance";

pub struct VpsKit {
    pub network: NodeNetwork,
    root: PathBuf,
    dropbear: PathBuf,
    sftp_server: PathBuf,
    /// The node's resolver configuration, copied into instances.
    resolv_source: PathBuf,
    /// Node ports of the instances running here, by task id, and whether
    /// the kernel's table may lag them (an apply failed): the next call
    /// applies whatever it is asked.
    ports: Mutex<(BTreeMap<u64, Vec<PortMap>>, bool)>,
    bundle: Mutex<Option<PathBuf>>,
}

/// Why an instance's network or SSH server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VpsError {
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: String, stderr: String },
    #[error("{} is missing: install dropbear-bin on the node", .0.display())]
    NoDropbear(PathBuf),
    #[error(
        "this image has no SSH server of its own, so a VPS from it needs an SSH key or a password \
         (passwordless root is never allowed)"
    )]
    NoLogin,
    #[error("instance_subnet: {0}")]
    Subnet(String),
    #[error("blocked_networks: {0}")]
    BlockedNetwork(String),
    #[error("instance network")]
    Net(#[from] crate::net::NetError),
}

/// The instance's dropbear host key in `dir` (`hostkey`), made once.
fn dropbear_host_key(dir: &Path) -> Result<PathBuf, VpsError> {
    let hostkey = dir.join("hostkey");
    if !hostkey.exists() {
        run_tool(
            Command::new("dropbearkey")
                .args(["-t", "ed25519", "-f"])
                .arg(&hostkey),
        )?;
    }
    Ok(hostkey)
}

/// The OpenSSH copy of an instance's host key, in its directory.
const OPENSSH_HOST_KEY: &str = "ssh_host_ed25519_key";

/// The same key in OpenSSH's format (`ssh_host_ed25519_key`, 0600: sshd
/// refuses a host key others can read), made once from the dropbear one.
fn openssh_host_key(dir: &Path) -> Result<PathBuf, VpsError> {
    let hostkey = dropbear_host_key(dir)?;
    let key = dir.join(OPENSSH_HOST_KEY);
    if !key.exists() {
        run_tool(
            Command::new("dropbearconvert")
                .args(["dropbear", "openssh"])
                .arg(&hostkey)
                .arg(&key),
        )?;
        set_mode(&key, 0o600)?;
    }
    Ok(key)
}

/// The `map_err` for an I/O error on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VpsError + '_ {
    move |source| VpsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The node's nameservers for an instance. Loopback resolvers (a local
/// systemd-resolved or dnsmasq) are unreachable from an instance's namespace,
/// so they are left out; with none left, a public resolver is named.
fn resolv_conf(source: &Path) -> String {
    let text = std::fs::read_to_string(source).unwrap_or_default();
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("nameserver"), Some(ip)) => ip
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| !ip.is_loopback()),
                (Some("search" | "options" | "domain"), _) => true,
                _ => false,
            }
        })
        .map(str::to_string)
        .collect();
    if !out.iter().any(|l| l.starts_with("nameserver")) {
        out.push("nameserver 1.1.1.1".into());
    }
    out.join("\n") + "\n"
}

/// Who may log in to a VPS.
pub struct SshLogin<'a> {
    pub keys: &'a [String],
    /// A crypt(3) hash for root's password.
    pub password_hash: Option<&'a str>,
}

/// What the image brings for SSH: its sshd and its shadow file, as found in its layers.
#[derive(Debug, Default)]
pub struct ImageSsh {
    /// The sshd path inside the image, when it has one.
    pub sshd: Option<String>,
    /// The image's `/etc/shadow` on the node (a layer file), to add a password to.
    pub shadow: Option<PathBuf>,
}

/// The image's sshd runs with this configuration, not the image's own:
/// keys from the instance's file and the user's `~/.ssh`, passwords only
/// when one was set (or, with neither, the image's own), never empty ones.
fn sshd_config(login: &SshLogin<'_>) -> String {
    let image_auth = login.keys.is_empty() && login.password_hash.is_none();
    let passwords = login.password_hash.is_some() || image_auth;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    format!(
        "# Written by rivernode for this instance.\n\
         Port 22\n\
         HostKey {INSTANCE_DIR}/ssh_host_ed25519_key\n\
         AuthorizedKeysFile .ssh/authorized_keys {INSTANCE_DIR}/authorized_keys\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication {}\n\
         KbdInteractiveAuthentication no\n\
         PermitEmptyPasswords no\n\
         PermitRootLogin {}\n\
         UsePAM no\n\
         PrintMotd no\n\
         Subsystem sftp internal-sftp\n",
        yes_no(passwords),
        if passwords {
            "yes"
        } else {
            "prohibit-password"
        },
    )
}

/// Where the instance's /etc/environment is written.
const ENVIRONMENT: &str = "environment";
/// Where a VPS's onstart script is written.
const ONSTART: &str = "onstart";
/// Where a VPS reads a warning for its owner (its GPUs sit idle).
const NOTICE: &str = "idle-warning";

/// Variables the dynamic loader acts on: never given to the injected
/// dropbear (it runs on the node's libraries; its sessions lack them too).
pub const LOADER_VARS: [&str; 4] = [
    "LD_PRELOAD",
    "LD_AUDIT",
    "LD_LIBRARY_PATH",
    "GLIBC_TUNABLES",
];

/// Variables an SSH server sets for each login itself: never carried over.
const PER_LOGIN: [&str; 7] = ["HOME", "USER", "LOGNAME", "SHELL", "PWD", "TERM", "MAIL"];

/// The instance's variables that its SSH sessions get (its user's `-e`,
/// the contract variables, the GPU ones), less those set per login.
pub fn session_vars(env: &[(String, String)]) -> Vec<(String, String)> {
    env.iter()
        .filter(|(k, _)| !PER_LOGIN.contains(&k.as_str()))
        // One variable a line (an image's Env is not checked like users' -e).
        .filter(|(k, v)| !format!("{k}{v}").contains(['\n', '\r', '\0']))
        .cloned()
        .collect()
}

/// The version of an OpenSSH sshd binary (`OpenSSH_9.2p1` in its bytes).
pub fn openssh_version(binary: &[u8]) -> Option<(u32, u32)> {
    const MARK: &[u8] = b"OpenSSH_";
    let at = binary.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let rest = &binary[at..binary.len().min(at + 16)];
    let text: String = rest
        .iter()
        .take_while(|b| b.is_ascii_digit() || **b == b'.')
        .map(|b| *b as char)
        .collect();
    let (major, minor) = text.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// sshd's `SetEnv` for `vars`, as the image's sshd (`version`) reads it:
/// none before 7.8 (or unknown: an unknown option stops sshd); one line
/// (sshd takes only its first `SetEnv`), each `"K=V"` quoted, with `\` and
/// `"` escaped from 8.7 on and values holding them left out before.
fn sshd_setenv(version: Option<(u32, u32)>, vars: &[(String, String)]) -> String {
    let Some(v) = version.filter(|v| *v >= (7, 8)) else {
        return String::new();
    };
    let escapes = v >= (8, 7);
    let quoted: Vec<String> = vars
        .iter()
        .filter(|(_, val)| escapes || !val.contains(['"', '\\']))
        .map(|(k, v)| {
            let kv = format!("{k}={v}")
                .replace('\\', "\\\\")
                .replace('"', "\\\"");
            format!("\"{kv}\"")
        })
        .collect();
    if quoted.is_empty() {
        return String::new();
    }
    format!("SetEnv {}\n", quoted.join(" "))
}

/// `/etc/environment`: the image's own lines (but those of variables set
/// here), then `vars`, quoted when they hold blanks (pam_env strips the quotes).
fn etc_environment(image: &str, vars: &[(String, String)]) -> String {
    let ours = |line: &str| {
        let name = line.trim_start().trim_start_matches("export ");
        let name = name.split('=').next().unwrap_or_default().trim();
        vars.iter().any(|(k, _)| k == name)
    };
    let mut out: String = image
        .lines()
        .filter(|l| !ours(l))
        .map(|l| format!("{l}\n"))
        .collect();
    for (k, v) in vars {
        if v.contains(char::is_whitespace) && !v.contains('"') {
            out.push_str(&format!("{k}=\"{v}\"\n"));
        } else {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    out
}

/// `shadow` with root's password set to `hash` (a root line is added if missing).
fn with_root_password(shadow: &str, hash: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = shadow
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&"root") && f.len() >= 2 {
                found = true;
                f[1] = hash;
                f.join(":")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.insert(0, format!("root:{hash}:0:0:99999:7:::"));
    }
    out.join("\n") + "\n"
}

/// Writes a file only root may read, atomically.
fn write_secret(path: &Path, text: &str) -> Result<(), VpsError> {
    crate::files::write_secret(path, text.as_bytes()).map_err(io(path))
}

fn write(path: &Path, text: impl AsRef<[u8]>) -> Result<(), VpsError> {
    std::fs::write(path, text).map_err(io(path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), VpsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Runs a node tool; its stderr is the error.
fn run_tool(cmd: &mut Command) -> Result<std::process::Output, VpsError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let o = cmd.output().map_err(|source| VpsError::Spawn {
        tool: tool.clone(),
        source,
    })?;
    if o.status.success() {
        Ok(o)
    } else {
        Err(VpsError::Tool {
            tool,
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        })
    }
}

/// Copies `bin` to `dir/name`, the libraries `ldd` lists to `dir/lib`, and
/// the loader to `dir/ld.so`.
fn copy_with_libraries(bin: &Path, dir: &Path, name: &str) -> Result<(), VpsError> {
    std::fs::copy(bin, dir.join(name)).map_err(io(bin))?;
    let out = run_tool(Command::new("ldd").arg(bin))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let file = Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = if file.starts_with("ld-linux") {
            dir.join("ld.so")
        } else {
            dir.join("lib").join(&file)
        };
        std::fs::copy(path, dest).map_err(io(Path::new(path)))?;
    }
    Ok(())
}

impl VpsKit {
    pub fn new(
        config: &RunnerConfig,
        protected_ports: Vec<u16>,
        runner_ports: Vec<u16>,
        node_port_sources: Vec<std::net::Ipv4Addr>,
        overlay_subnet: Option<&str>,
    ) -> Result<Self, VpsError> {
        // The overlay's subnet, given by the host, over the node's own.
        let subnet: crate::net::Ipv4Net = overlay_subnet
            .unwrap_or(&config.instance_subnet)
            .parse()
            .map_err(VpsError::Subnet)?;
        let root = config.data_dir.join(super::STATE_DIR);
        Ok(Self {
            network: NodeNetwork {
                bridge: config.instance_bridge.clone(),
                sysctl_dir: config.proc_root.join("sys"),
                netns_dir: root.join("netns"),
                ipam: Ipam::new(&root.join("ipam.json"), subnet),
                firewall: Firewall {
                    nft: "nft".into(),
                    table: config.nft_table.clone(),
                    bridge: config.instance_bridge.clone(),
                    subnet,
                    protected_ports,
                    runner_ports,
                    port_maps: vec![],
                    node_port_sources,
                    isolate_instances: config.isolate_instances,
                    instances: vec![],
                    blocked_networks: config
                        .blocked_networks
                        .iter()
                        .map(|n| n.parse())
                        .collect::<Result<_, _>>()
                        .map_err(VpsError::BlockedNetwork)?,
                    instance_api: config.instance_api(),
                    overlay: None,
                },
                isolate_instances: config.isolate_instances,
                instance_api: config.instance_api().map(|a| *a.ip()),
                overlay: crate::net::NodeOverlay::new(
                    &config.overlay_device,
                    &root.join("overlay-groups.json"),
                ),
            },
            root,
            dropbear: config.dropbear.clone(),
            sftp_server: PathBuf::from("/usr/lib/openssh/sftp-server"),
            resolv_source: PathBuf::from("/etc/resolv.conf"),
            ports: Mutex::new((BTreeMap::new(), false)),
            bundle: Mutex::new(None),
        })
    }

    /// dropbear (and OpenSSH's sftp-server, for scp/sftp, when the node has
    /// it), their libraries and the loader in one directory (made once).
    fn ssh_bundle(&self) -> Result<PathBuf, VpsError> {
        let mut guard = self.bundle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = guard.as_ref() {
            return Ok(b.clone());
        }
        let dir = self.root.join("ssh-bundle");
        std::fs::create_dir_all(dir.join("lib")).map_err(io(&dir))?;
        if !self.dropbear.is_file() {
            return Err(VpsError::NoDropbear(self.dropbear.clone()));
        }
        copy_with_libraries(&self.dropbear, &dir, "dropbear")?;
        if self.sftp_server.is_file() {
            copy_with_libraries(&self.sftp_server, &dir, "sftp-server")?;
            // dropbear runs its SFTP subsystem from /usr/lib/sftp-server.
            let wrapper = dir.join("sftp-wrapper");
            write(
                &wrapper,
                format!("#!/bin/sh\nexec {SSH_DIR}/ld.so --library-path {SSH_DIR}/lib {SSH_DIR}/sftp-server \"$@\"\n"),
            )?;
            set_mode(&wrapper, 0o755)?;
        }
        *guard = Some(dir.clone());
        Ok(dir)
    }

    /// An instance's resolver files (`/etc/resolv.conf`, `/etc/hosts`),
    /// written anew; the mounts that put them in place.
    pub fn network_files(&self, cid: &str, hostname: &str) -> Result<Vec<MountInput>, VpsError> {
        let dir = self.root.join("instances").join(cid);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        write(&dir.join("resolv.conf"), resolv_conf(&self.resolv_source))?;
        // Its own name resolves (sudo, `hostname -f`), and the node's name for it.
        write(
            &dir.join("hosts"),
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname} {cid}\n"
            ),
        )?;
        Ok(["resolv.conf", "hosts"]
            .iter()
            .map(|f| MountInput {
                source: dir.join(f),
                target: format!("/etc/{f}"),
                read_only: true,
            })
            .collect())
    }

    /// Puts up (`Some`) or takes down the warning an instance reads at
    /// /.rivernode/instance/idle-warning (its directory is bound there);
    /// whether anything changed. An instance without that directory (no
    /// SSH) gets none: its owner reads the warning in `vps status`.
    pub fn set_notice(&self, cid: &str, notice: Option<&str>) -> Result<bool, VpsError> {
        let dir = self.root.join("instances").join(cid);
        if !dir.is_dir() {
            return Ok(false);
        }
        let path = dir.join(NOTICE);
        let now = std::fs::read_to_string(&path).ok();
        match notice {
            Some(text) if now.as_deref() != Some(&format!("{text}\n")) => {
                crate::files::write_public(&path, format!("{text}\n").as_bytes())
                    .map_err(io(&path))?;
                Ok(true)
            }
            None if now.is_some() => {
                std::fs::remove_file(&path).map_err(io(&path))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The instance's host key, resolver files and authorized keys.
    fn instance_files(&self, cid: &str, keys: &[String]) -> Result<PathBuf, VpsError> {
        let dir = self.root.join("instances").join(cid);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        dropbear_host_key(&dir)?;
        let ak = dir.join("authorized_keys");
        write(&ak, keys.join("\n") + "\n")?;
        set_mode(&ak, 0o600)?;
        // Filled by `session_env` once the instance's variables are known.
        if !dir.join(ENVIRONMENT).exists() {
            write(&dir.join(ENVIRONMENT), "")?;
        }
        Ok(dir)
    }

    /// Writes a VPS's onstart script where the instance sees it; the
    /// command that runs it there: a script with a `#!` line runs with that
    /// interpreter, any other with bash where the image has it (Vast.ai's
    /// templates are bash), else /bin/sh.
    pub fn onstart_command(
        &self,
        cid: &str,
        script: Option<&str>,
        jupyter: bool,
    ) -> Result<Vec<String>, VpsError> {
        let mut args: Vec<String> = Vec::new();
        if jupyter {
            args.extend(["/bin/sh", "-c", JUPYTER_LAUNCH, "jupyter"].map(String::from));
        }
        let Some(script) = script else {
            return Ok(args);
        };
        let dir = self.root.join("instances").join(cid);
        let path = dir.join(ONSTART);
        write(&path, script)?;
        set_mode(&path, 0o755)?;
        let inside = format!("{INSTANCE_DIR}/{ONSTART}");
        if script.starts_with("#!") {
            args.push(inside);
        } else {
            args.extend(
                [
                    "/bin/sh",
                    "-c",
                    "[ -x /bin/bash ] && exec /bin/bash \"$0\"; exec /bin/sh \"$0\"",
                ]
                .map(String::from),
            );
            args.push(inside);
        }
        Ok(args)
    }

    /// What SSH sessions of the instance see: its variables in
    /// /etc/environment, and for an image's sshd (`Some(its version)`) in
    /// one `SetEnv` added to its configuration (dropbear passes its own
    /// environment on, `-e`). `image_environment`: the image's own
    /// /etc/environment.
    pub fn session_env(
        &self,
        cid: &str,
        vars: &[(String, String)],
        image_environment: &str,
        sshd: Option<Option<(u32, u32)>>,
    ) -> Result<(), VpsError> {
        let dir = self.root.join("instances").join(cid);
        if let Some(version) = sshd {
            let config = dir.join("sshd_config");
            let base = std::fs::read_to_string(&config).map_err(io(&config))?;
            let base: String = base
                .lines()
                .filter(|l| !l.starts_with("SetEnv "))
                .map(|l| format!("{l}\n"))
                .collect();
            let setenv = sshd_setenv(version, vars);
            if setenv.is_empty() && !vars.is_empty() {
                tracing::warn!(container = cid, ?version, "the image's sshd takes no SetEnv (OpenSSH 7.8 or later does): its sessions get only /etc/environment");
            }
            // Root's alone (sshd reads it as root): it holds the variables,
            // CONTAINER_API_KEY among them.
            write_secret(&config, &(base + &setenv))?;
        }
        // Root's alone, as the variables are: PAM reads it as root, and an
        // unprivileged user in the instance has no business with the key.
        write_secret(
            &dir.join(ENVIRONMENT),
            &etc_environment(image_environment, vars),
        )?;
        Ok(())
    }

    /// The SSH server command and the mounts it needs: the image's own sshd
    /// when it has one (with our configuration and host key), else dropbear
    /// injected. Logins are by key, by a password whose hash the user gave,
    /// or (image sshd only) by whatever the image itself provides; never
    /// by an empty password.
    pub fn ssh_server(
        &self,
        cid: &str,
        login: &SshLogin<'_>,
        image: &ImageSsh,
    ) -> Result<(Vec<String>, Vec<MountInput>), VpsError> {
        let files = self.instance_files(cid, login.keys)?;
        let ro = |source: PathBuf, target: &str| MountInput {
            source,
            target: target.into(),
            read_only: true,
        };
        let mut mounts = vec![
            ro(files.clone(), INSTANCE_DIR),
            // Writable: Vast.ai's templates append to it (`env >> /etc/environment`).
            MountInput {
                source: files.join(ENVIRONMENT),
                target: "/etc/environment".into(),
                read_only: false,
            },
        ];
        if let Some(sshd) = &image.sshd {
            // The same key dropbear would use: a VPS keeps its pinned host key.
            openssh_host_key(&files)?;
            write(&files.join("sshd_config"), sshd_config(login))?;
            if let Some(hash) = login.password_hash {
                let shadow = image
                    .shadow
                    .as_ref()
                    .and_then(|p| crate::oci::rootfs::read_small_file(p, 1 << 20))
                    .unwrap_or_default();
                write_secret(&files.join("shadow"), &with_root_password(&shadow, hash))?;
                mounts.push(ro(files.join("shadow"), "/etc/shadow"));
            }
            // sshd refuses to start without its privilege-separation directory.
            let empty = self.root.join("empty");
            std::fs::create_dir_all(&empty).map_err(io(&empty))?;
            mounts.push(ro(empty, "/run/sshd"));
            let args = [sshd.as_str(), "-D", "-e", "-f"]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("{INSTANCE_DIR}/sshd_config")])
                .collect();
            return Ok((args, mounts));
        }
        if login.keys.is_empty() && login.password_hash.is_none() {
            return Err(VpsError::NoLogin);
        }
        let bundle = self.ssh_bundle()?;
        let passwd = files.join("passwd");
        crate::files::write_public(&passwd, b"root:x:0:0:root:/root:/bin/sh\n")
            .map_err(io(&passwd))?;
        let mut args: Vec<String> = [
            &format!("{SSH_DIR}/ld.so"),
            "--library-path",
            &format!("{SSH_DIR}/lib"),
            &format!("{SSH_DIR}/dropbear"),
            "-F",
            "-E",
            // Sessions get the instance's environment (dropbear clears it otherwise).
            "-e",
            "-p",
            "22",
            "-r",
            &format!("{INSTANCE_DIR}/hostkey"),
            "-P",
            "/tmp/.rivernode-dropbear.pid",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if login.password_hash.is_none() {
            args.push("-s".into());
        }
        mounts.extend([
            ro(bundle.clone(), SSH_DIR),
            ro(files.join("passwd"), "/etc/passwd"),
            ro(files.join("authorized_keys"), "/root/.ssh/authorized_keys"),
        ]);
        if let Some(hash) = login.password_hash {
            // dropbear finds "x" in passwd and reads the hash from shadow (glibc's files NSS).
            write_secret(&files.join("shadow"), &with_root_password("", hash))?;
            mounts.push(ro(files.join("shadow"), "/etc/shadow"));
        }
        if bundle.join("sftp-wrapper").exists() {
            mounts.push(ro(bundle.join("sftp-wrapper"), "/usr/lib/sftp-server"));
        }
        Ok((args, mounts))
    }

    /// Sets up the instance's network and publishes its node ports.
    pub async fn start_network(
        &self,
        id: u64,
        cid: &str,
        placement: &Placement,
        group: Option<u16>,
    ) -> Result<InstanceNet, VpsError> {
        let h = crate::net::link::connect()?;
        let inet = self.network.setup(&h, cid, group).await?;
        self.set_port(id, port_maps(placement, inet.ip), true)?;
        Ok(inet)
    }

    /// Takes the instance's network down; returns every problem met. The
    /// address goes first: the reconcile loop republishes node ports only
    /// for instances that still have one.
    pub async fn stop_network(&self, id: u64, cid: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match crate::net::link::connect() {
            Ok(h) => problems.extend(self.network.teardown(&h, cid).await),
            Err(e) => problems.push(e.to_string()),
        }
        if let Err(e) = self.set_port(id, vec![], true) {
            problems.push(crate::error_chain(&e));
        }
        problems
    }

    /// Forgets the instance's host key and files (on delete, not on stop:
    /// a restarted VPS keeps its host key, so pinned known_hosts stay valid).
    pub fn forget(&self, cid: &str) {
        let _ = std::fs::remove_dir_all(self.root.join("instances").join(cid));
    }

    /// Sets (or, given none, removes) one instance's node ports and
    /// rewrites the table if that changed it, or if the node's instances
    /// changed (`joined_or_left`: each has its own anti-spoofing rules,
    /// and an instance with no port needs the table as much as any).
    pub fn set_port(
        &self,
        id: u64,
        maps: Vec<PortMap>,
        joined_or_left: bool,
    ) -> Result<(), VpsError> {
        let mut guard = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let (ports, lagging) = &mut *guard;
        let changed = if maps.is_empty() {
            ports.remove(&id).is_some()
        } else {
            ports.insert(id, maps.clone()).as_ref() != Some(&maps)
        };
        if changed || joined_or_left || *lagging {
            tracing::debug!(task = id, ?maps, "node ports changed");
            self.write_table(ports, lagging)?;
        }
        Ok(())
    }

    /// Rewrites the table with these node ports. Not applied: the map
    /// keeps what is wanted (a removed instance's rules must never come
    /// back, their ports and address go to others) and `lagging` makes the
    /// next call apply it (L7).
    fn write_table(
        &self,
        ports: &BTreeMap<u64, Vec<PortMap>>,
        lagging: &mut bool,
    ) -> Result<(), VpsError> {
        let all = ports.values().flatten().copied().collect();
        // nft is a blocking child process: keep it off the async workers.
        let applied = tokio::task::block_in_place(|| self.network.apply_firewall(all));
        *lagging = applied.is_err();
        Ok(applied?)
    }

    /// Follows the host's overlay plan (none: no overlay): the table first
    /// (again too when an earlier write failed), then the device, so the
    /// device never passes what the table does not yet guard.
    pub async fn follow_overlay(
        &self,
        plan: Option<&crate::api::OverlayPlan>,
    ) -> Result<(), VpsError> {
        let changed = self.network.plan_overlay(plan)?;
        {
            let mut guard = self.ports.lock().unwrap_or_else(|p| p.into_inner());
            let (ports, lagging) = &mut *guard;
            if changed || *lagging {
                self.write_table(ports, lagging)?;
            }
        }
        let h = crate::net::link::connect()?;
        self.network.build_overlay(&h).await?;
        if changed {
            match plan {
                Some(p) => tracing::info!(
                    subnet = %p.subnet,
                    peers = p.peers.len(),
                    "overlay mesh built"
                ),
                None => tracing::info!("no overlay: the host runs none"),
            }
        }
        Ok(())
    }

    /// The instance's host key file (dropbear's, private), as a park
    /// carries it to the host.
    /// Empty for an instance without one (`--no-ssh`).
    pub fn host_key_file(&self, cid: &str) -> Result<Vec<u8>, VpsError> {
        let key = self.root.join("instances").join(cid).join("hostkey");
        match std::fs::read(&key) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            r => r.map_err(io(&key)),
        }
    }

    /// Takes `key` (a parked VPS's host key file) as the instance's, so
    /// that it answers with the key its users pinned. An OpenSSH copy of an
    /// earlier key goes: it is made again from this one.
    pub fn adopt_host_key(&self, cid: &str, key: &[u8]) -> Result<(), VpsError> {
        let dir = self.root.join("instances").join(cid);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let _ = std::fs::remove_file(dir.join(OPENSSH_HOST_KEY));
        crate::files::write_secret(&dir.join("hostkey"), key).map_err(io(&dir))
    }

    /// The instance's public host key (`ssh-ed25519 AAAA...`), for clients to pin.
    pub fn host_key(&self, cid: &str) -> Option<String> {
        let key = self.root.join("instances").join(cid).join("hostkey");
        let o = tokio::task::block_in_place(|| {
            Command::new("dropbearkey")
                .args(["-y", "-f"])
                .arg(&key)
                .output()
        })
        .ok()?;
        let text = String::from_utf8_lossy(&o.stdout);
        text.lines()
            .find(|l| l.starts_with("ssh-"))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
    }

    /// A VM's host key: the same dropbear key a container VPS would have
    /// (made once, kept until delete), as OpenSSH private key text and its
    /// public line, for the guest's seed. Clients pin the public line.
    pub fn host_key_pair(&self, cid: &str) -> Result<(String, String), VpsError> {
        let dir = self.root.join("instances").join(cid);
        crate::files::ensure_private_dir(&dir).map_err(io(&dir))?;
        let key = openssh_host_key(&dir)?;
        let private = std::fs::read_to_string(&key).map_err(io(&key))?;
        let public = self.host_key(cid).ok_or_else(|| VpsError::Tool {
            tool: "dropbearkey -y".into(),
            stderr: format!("no public key from {}", dir.join("hostkey").display()),
        })?;
        Ok((private, public))
    }

    /// The resolvers instances are given: the node's, less loopback ones.
    pub fn nameservers(&self) -> Vec<std::net::Ipv4Addr> {
        resolv_conf(&self.resolv_source)
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .filter_map(|ip| ip.trim().parse().ok())
            .collect()
    }

    /// Sets up a VM's tap and address and publishes its node ports.
    pub async fn start_vm_network(
        &self,
        id: u64,
        cid: &str,
        placement: &Placement,
        dev_root: &Path,
        group: Option<u16>,
    ) -> Result<(std::net::Ipv4Addr, String), VpsError> {
        let h = crate::net::link::connect()?;
        let (ip, tap) = self.network.setup_tap(&h, cid, dev_root, group).await?;
        self.set_port(id, port_maps(placement, ip), true)?;
        Ok((ip, tap))
    }

    /// A stopped VM's network: its node port and tap go, its address stays
    /// (the guest keeps it in its own configuration) until `stop_network`.
    pub async fn stop_vm_network(&self, id: u64, cid: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.set_port(id, vec![], false) {
            problems.push(crate::error_chain(&e));
        }
        match crate::net::link::connect() {
            Ok(h) => {
                if let Err(e) = self.network.remove_tap(&h, cid).await {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        problems
    }

    /// The address IPAM gave an instance, if it has one.
    pub fn address_of(&self, cid: &str) -> Option<std::net::Ipv4Addr> {
        self.network.ipam.leases().ok()?.get(cid).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ports_lead_to_ssh_and_each_published_port() {
        let mut placement: Placement = serde_json::from_value(serde_json::json!({
            "node": "n1", "numa": null, "cpus": "", "memory_bytes": 0, "gpus": [],
            "node_port": 30000,
        }))
        .unwrap();
        placement.published = vec![crate::api::ports::Published {
            request: 70000,
            proto: Proto::Udp,
            internal: 20001,
            node_port: 30001,
            external: 20001,
        }];
        let ip = std::net::Ipv4Addr::new(10, 250, 0, 2);
        let maps = port_maps(&placement, ip);
        assert_eq!(
            maps,
            [
                PortMap {
                    node_port: 30000,
                    ip,
                    port: 22,
                    proto: Proto::Tcp
                },
                PortMap {
                    node_port: 30001,
                    ip,
                    port: 20001,
                    proto: Proto::Udp
                },
            ]
        );
        placement.node_port = None;
        assert_eq!(
            port_maps(&placement, ip).len(),
            1,
            "no SSH server: its ports only"
        );
    }

    #[test]
    fn root_password_goes_into_shadow() {
        let shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n";
        let out = with_root_password(shadow, "$6$salt$hash");
        assert_eq!(
            out,
            "root:$6$salt$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
        );
        assert_eq!(
            with_root_password("", "$6$s$h"),
            "root:$6$s$h:0:0:99999:7:::\n"
        );
    }

    #[test]
    fn sessions_get_the_instances_variables_but_not_per_login_ones() {
        let env: Vec<(String, String)> = [
            ("HOME", "/root"),
            ("TZ", "UTC"),
            ("NOTE", "two words"),
            ("Q", "say \"hi\" \\o/"),
            ("PATH", "/usr/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let vars = session_vars(&env);
        assert!(vars.iter().all(|(k, _)| k != "HOME"), "{vars:?}");
        assert_eq!(
            sshd_setenv(Some((9, 2)), &vars),
            "SetEnv \"TZ=UTC\" \"NOTE=two words\" \"Q=say \\\"hi\\\" \\\\o/\" \"PATH=/usr/bin\"\n"
        );
        // Before 8.7 no escapes: a value that needs one is left out; before
        // 7.8 (or unknown) no SetEnv at all.
        assert_eq!(
            sshd_setenv(Some((8, 2)), &vars),
            "SetEnv \"TZ=UTC\" \"NOTE=two words\" \"PATH=/usr/bin\"\n"
        );
        assert_eq!(sshd_setenv(Some((7, 4)), &vars), "");
        assert_eq!(sshd_setenv(None, &vars), "");
        assert_eq!(sshd_setenv(Some((9, 2)), &[]), "");
        assert_eq!(
            openssh_version(b"\0junk OpenSSH_9.2p1 Debian-2+deb12u3\0"),
            Some((9, 2))
        );
        assert_eq!(openssh_version(b"OpenSSH_7.4"), Some((7, 4)));
        assert_eq!(openssh_version(b"dropbear"), None);
        let broken = vec![("BAD".to_string(), "a\nPermitRootLogin yes".to_string())];
        assert!(session_vars(&broken).is_empty(), "never a second line");
        let etc = etc_environment("PATH=\"/usr/local/bin\"\nLANG=C.UTF-8\n", &vars);
        assert_eq!(
            etc, "LANG=C.UTF-8\nTZ=UTC\nNOTE=\"two words\"\nQ=say \"hi\" \\o/\nPATH=/usr/bin\n",
            "the image's PATH gives way to the instance's"
        );
    }

    #[test]
    fn sshd_config_never_allows_empty_passwords() {
        let keys = vec!["ssh-ed25519 AAAA k".to_string()];
        let key_only = sshd_config(&SshLogin {
            keys: &keys,
            password_hash: None,
        });
        assert!(key_only.contains("PasswordAuthentication no"));
        assert!(key_only.contains("PermitRootLogin prohibit-password"));
        let with_pw = sshd_config(&SshLogin {
            keys: &[],
            password_hash: Some("$6$s$h"),
        });
        assert!(with_pw.contains("PasswordAuthentication yes"));
        for c in [key_only, with_pw] {
            assert!(c.contains("PermitEmptyPasswords no"), "{c}");
        }
    }

    #[test]
    fn loopback_resolvers_are_not_copied() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("resolv.conf");
        std::fs::write(
            &f,
            "# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch lab\n",
        )
        .unwrap();
        assert_eq!(super::resolv_conf(&f), "nameserver 10.0.0.2\nsearch lab\n");
        std::fs::write(&f, "nameserver 127.0.0.53\n").unwrap();
        assert_eq!(super::resolv_conf(&f), "nameserver 1.1.1.1\n");
    }
}
