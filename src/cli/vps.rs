//! `rivernode vps ...`, `rivernode ssh <id>` and the ProxyCommand behind it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::ports::{PortRequest, Proto, Published, JUPYTER_PORT};
use crate::api::{
    ImageSource, Kind, RestartRequest, SnapshotRequest, SnapshotView, SubmitResponse, TaskSpec,
    TaskState, TaskView, WhoAmI,
};
use crate::cli::args::{Output, SnapshotCommand, SshArgs, VpsCommand, VpsCreateArgs};
use crate::cli::client::Client;
use crate::cli::output::{ago, bytes, emit, emit_json, table};

/// The user's home directory, when it exists: a HOME that names none
/// (`/nonexistent`, as services and tests run) is no place to create one,
/// and nothing is remembered there.
fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_dir())
}

/// The public keys a new VPS accepts, per the key flags.
/// Vast.ai's `--launch`: `entrypoint` is a VPS without our SSH server that
/// runs its image (with `--args`); `ssh` is the default.
fn launch_mode(a: &mut VpsCreateArgs) -> anyhow::Result<()> {
    match a.launch.as_deref() {
        Some("entrypoint") => {
            if a.gen_ssh_key || a.public_key_file.is_some() || a.public_key_string.is_some() {
                bail!("--launch entrypoint runs no SSH server of ours: drop the key options (reach it with `rivernode connect`), or use --launch ssh");
            }
            if a.onstart.is_some() || a.onstart_cmd.is_some() {
                bail!("--launch entrypoint runs the image's entrypoint: put the onstart's work there, or use --launch ssh");
            }
            a.no_ssh = true;
        }
        Some("ssh") if a.no_ssh => {
            bail!("--launch ssh runs our SSH server, --no-ssh none: choose one")
        }
        Some("jupyter") if a.no_ssh => {
            bail!("--launch jupyter runs our SSH server beside Jupyter; drop --no-ssh")
        }
        _ => {}
    }
    if !a.args.is_empty() && !a.no_ssh {
        bail!("--args are arguments of the image's entrypoint: give them with --launch entrypoint");
    }
    Ok(())
}

fn keys(a: &VpsCreateArgs) -> anyhow::Result<Vec<String>> {
    if a.no_ssh_key || a.no_ssh {
        return Ok(vec![]);
    }
    if a.gen_ssh_key {
        let out = match &a.key_out_file {
            Some(f) => f.clone(),
            None => home()
                .context("HOME is not set: give --key-out-file")?
                .join(format!(".ssh/rivernode_vps_{}", crate::now_unix_ms())),
        };
        if out.exists() {
            bail!("{} exists; choose another --key-out-file", out.display());
        }
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let o = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "rivernode-vps", "-f"])
            .arg(&out)
            .output()
            .context("running ssh-keygen (install openssh-client)")?;
        if !o.status.success() {
            bail!("ssh-keygen: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        eprintln!("private key written to {} (0600)", out.display());
        // ssh-keygen appends ".pub" to the whole name (vps.key -> vps.key.pub).
        let public_file = public_key_file_of(&out);
        let public = std::fs::read_to_string(&public_file)
            .with_context(|| format!("reading {}", public_file.display()))?;
        return Ok(vec![public.trim().to_string()]);
    }
    if let Some(k) = &a.public_key_string {
        return Ok(vec![k.trim().to_string()]);
    }
    if let Some(f) = &a.public_key_file {
        let k = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(vec![k.trim().to_string()]);
    }
    let mut found = Vec::new();
    for private in default_private_keys() {
        if let Ok(k) = std::fs::read_to_string(public_key_file_of(&private)) {
            found.push(k.trim().to_string());
        }
    }
    if found.is_empty() {
        bail!("no SSH public key in ~/.ssh: pass --gen-ssh-key, --public-key-file or --public-key-string");
    }
    Ok(found)
}

/// Where this machine remembers which private key a VPS was created with
/// (`<id> <path>` lines), so `ssh` and `ssh config` use it without `-i`.
fn key_records() -> Option<PathBuf> {
    home().map(|h| h.join(".config/rivernode/vps-keys"))
}

/// The private key recorded for VPS `id` at `host`, if it still exists.
fn recorded_key(host: &str, id: u64) -> Option<PathBuf> {
    let text = std::fs::read_to_string(key_records()?).ok()?;
    let prefix = format!("{host} {id} ");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

fn record_key(host: &str, id: u64, private: &Path) -> anyhow::Result<()> {
    let Some(file) = key_records() else {
        return Ok(());
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let private = std::fs::canonicalize(private).unwrap_or_else(|_| private.to_path_buf());
    let mut text = std::fs::read_to_string(&file).unwrap_or_default();
    text.push_str(&format!("{host} {id} {}\n", private.display()));
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))
}

/// The private key of a VPS's creation flags, when this machine has it.
fn private_key_of(a: &VpsCreateArgs) -> Option<PathBuf> {
    if a.gen_ssh_key {
        return a.key_out_file.clone();
    }
    let public = a.public_key_file.as_ref()?;
    let private = public.to_str()?.strip_suffix(".pub").map(PathBuf::from)?;
    private.exists().then_some(private)
}

/// The user's usual keys (`$HOME/.ssh/id_*` with their `.pub`), which a
/// VPS accepts unless other key flags were given.
fn default_private_keys() -> Vec<PathBuf> {
    let dir = home().map(|h| h.join(".ssh")).unwrap_or_default();
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|k| public_key_file_of(k).exists())
        .collect()
}

/// Where ssh-keygen puts the public half of the key it writes to `private`.
fn public_key_file_of(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// True for a VM of `--backend` (`qemu`, `vm`), false for a container
/// (`container`, `docker`); anything else is a mistake to name.
fn is_vm_backend(backend: &str) -> anyhow::Result<bool> {
    match backend {
        "container" | "docker" => Ok(false),
        "qemu" | "vm" => Ok(true),
        other => bail!("--backend {other:?}: say container (or docker) or vm (or qemu)"),
    }
}

/// A size flag whose bare number means `bare_unit` (`--vm-memory 16384`
/// is MiB, `--vm-disk 50` GiB, as the seed writes them); units are taken too.
fn sized(flag: &str, input: &str, bare_unit: &str) -> anyhow::Result<u64> {
    let s = input.trim();
    let text = if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        format!("{s}{bare_unit}")
    } else {
        s.to_string()
    };
    crate::api::parse_memory_size(&text).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// A VM's part of `vps create`: its image (`None`: the host's default),
/// and memory and disk if given.
struct VmChoice {
    image: Option<String>,
    memory: Option<u64>,
    disk: Option<u64>,
}

/// The host's default VM image, for `vps create --backend vm` without --vm-image.
async fn default_vm_image(client: &Client) -> anyhow::Result<String> {
    let envs: crate::api::Environments = client.get("/api/environments").await?;
    envs.default_vm_image.ok_or_else(|| {
        anyhow::anyhow!(
            "--backend vm needs --vm-image NAME, the base image to boot (`rivernode vm image list` shows them; `rivernode vm image import NAME FILE.qcow2` adds one); the operator can set the host's default_vm_image"
        )
    })
}

/// The VM part of `vps create`; `None` for a container.
fn vm_choice(a: &VpsCreateArgs) -> anyhow::Result<Option<VmChoice>> {
    if !is_vm_backend(&a.backend)? {
        if a.vm_memory.is_some() || a.vm_image.is_some() || a.vm_disk.is_some() {
            bail!("--vm-memory, --vm-image and --vm-disk are for VM VPS: add --backend vm (a container VPS takes -m for memory)");
        }
        return Ok(None);
    }
    if a.resources.container.is_some() || a.resources.image.is_some() || a.from_snapshot.is_some() {
        bail!("--container, --image and --from-snapshot are for container VPS; a VM boots --vm-image NAME");
    }
    let memory = match (&a.vm_memory, &a.resources.memory) {
        (Some(_), Some(_)) => bail!("give the VM's memory once: --vm-memory MIB or -m SIZE"),
        (Some(m), None) => Some(sized("--vm-memory", m, "M")?),
        // -m is read with the other resource flags.
        (None, _) => None,
    };
    let disk = a
        .vm_disk
        .as_deref()
        .map(|d| sized("--vm-disk", d, "G"))
        .transpose()?;
    Ok(Some(VmChoice {
        image: a.vm_image.clone(),
        memory,
        disk,
    }))
}

/// SHA-512 crypt rounds for VPS passwords (glibc's default is 5000).
const CRYPT_ROUNDS: usize = 50_000;

/// 16 characters of crypt's alphabet from the kernel's random source.
fn random_salt() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect())
}

/// `$6$[rounds=N$]salt$hash`, the crypt(3) SHA-512 format glibc, dropbear
/// and OpenSSH's sshd check passwords against.
fn crypt_sha512(password: &str, salt: &str, rounds: usize) -> String {
    let params = sha_crypt::Sha512Params::new(rounds).unwrap_or_default();
    let hash = sha_crypt::sha512_crypt_b64(password.as_bytes(), salt.as_bytes(), &params)
        .unwrap_or_default();
    if rounds == sha_crypt::ROUNDS_DEFAULT {
        format!("$6${salt}${hash}")
    } else {
        format!("$6$rounds={rounds}${salt}${hash}")
    }
}

pub async fn run(client: &Client, cmd: VpsCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        VpsCommand::Create(mut a) => {
            launch_mode(&mut a)?;
            let vm = vm_choice(&a)?;
            let ssh_password_hash = if a.password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the password from standard input")?;
                let pw = line.trim_end_matches(['\r', '\n']);
                if pw.is_empty() {
                    bail!("--password-stdin: the password is empty (empty passwords are never allowed)");
                }
                Some(crypt_sha512(pw, &random_salt()?, CRYPT_ROUNDS))
            } else {
                None
            };
            let source = match (&vm, a.from_snapshot.as_deref()) {
                (Some(vm), _) => Some(ImageSource::VmImage(match &vm.image {
                    Some(i) => i.clone(),
                    None => default_vm_image(client).await?,
                })),
                (None, Some(s)) => Some(snapshot_source(s)?),
                (None, None) => crate::cli::task::default_image(client, &a.resources).await?,
            };
            let mut spec = TaskSpec {
                ssh_keys: keys(&a)?,
                ssh_password_hash,
                privileged: a.privileged,
                no_ssh: a.no_ssh,
                movable: a.movable,
                command: a.command.clone(),
                env: crate::cli::task::parse_env(&a.env)?,
                args: a.args.clone(),
                ports: a
                    .ports
                    .iter()
                    .map(|p| PortRequest::parse(p).map_err(|e| anyhow::anyhow!("-p {e}")))
                    .collect::<anyhow::Result<_>>()?,
                jupyter: a.launch.as_deref() == Some("jupyter"),
                onstart: match (&a.onstart, &a.onstart_cmd) {
                    (Some(f), _) => Some(std::fs::read_to_string(f).with_context(|| {
                        format!("--onstart {}: cannot read the script", f.display())
                    })?),
                    (None, cmd) => cmd.clone(),
                },
                ..crate::cli::task::base_spec_from(&a.resources, Kind::Vps, source)?
            };
            if let Some(vm) = vm {
                spec.memory_bytes = vm.memory.or(spec.memory_bytes);
                spec.vm_disk_bytes = vm.disk;
            }
            let mut r: SubmitResponse = client.post("/api/tasks", &spec).await?;
            let private = private_key_of(&a);
            if let Some(k) = &private {
                record_key(&client.base, r.id, k)?;
            }
            // A person waits while the VPS is made on its node (its image
            // pulled or imported, shown as it goes); one queued for room is
            // left queued. Scripts (-o json) get the id at once.
            if output == Output::Table && !a.no_wait {
                let t = crate::cli::task::wait_made(
                    client,
                    r.id,
                    "vps",
                    Some(std::time::Duration::from_secs(3)),
                )
                .await?;
                if t.state.is_final() {
                    bail!(
                        "vps {} {}: {}",
                        r.id,
                        t.state,
                        t.message.as_deref().unwrap_or("no reason given")
                    );
                }
                r.state = t.state;
                r.reason = t.reason;
            }
            match output {
                Output::Json => emit_json(&r),
                Output::Table => {
                    let with_key = private
                        .map(|k| format!(" -i {}", k.display()))
                        .unwrap_or_default();
                    let mut how = if a.no_ssh {
                        format!("no SSH server; a shell: rivernode connect {}", r.id)
                    } else {
                        format!("log in with: rivernode ssh {}{with_key}", r.id)
                    };
                    if r.state == crate::api::TaskState::PendingApproval {
                        how = format!(
                            "an operator approves it first (`rivernode approve {}`); then {how}",
                            r.id
                        );
                    }
                    emit(&format!("vps {} {}: {}\n{how}\n", r.id, r.state, r.reason))
                }
            }
        }
        VpsCommand::List { all } => {
            let tasks: Vec<TaskView> = client.get("/api/tasks").await?;
            let vps: Vec<TaskView> = tasks
                .into_iter()
                .filter(|t| t.spec.kind == Kind::Vps)
                .filter(|t| all || t.state != crate::api::TaskState::Deleted)
                .collect();
            match output {
                Output::Json => emit_json(&vps),
                Output::Table => {
                    let rows: Vec<Vec<String>> = vps
                        .iter()
                        .map(|t| {
                            let p = t.placement.as_ref();
                            vec![
                                t.id.to_string(),
                                t.state.to_string(),
                                p.map(|p| p.node.clone()).unwrap_or_else(|| "-".into()),
                                p.and_then(|p| p.node_port)
                                    .map(|n| n.to_string())
                                    .unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect();
                    emit(&table(&["ID", "STATE", "NODE", "NODE PORT"], &rows));
                }
            }
        }
        VpsCommand::Status { id } => {
            let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
            if t.spec.kind != Kind::Vps {
                bail!("task {id} is a command, not a VPS: rivernode task status {id}");
            }
            match output {
                Output::Json => emit_json(&t),
                Output::Table => {
                    let mut text = crate::cli::task::status_text(&t);
                    if let Some(port) = t.placement.as_ref().and_then(|p| p.node_port) {
                        text.push_str(&format!("Node port:  {port}\n"));
                    }
                    if !t.spec.ports.is_empty() {
                        text.push_str(&format!(
                            "Ports:      {} published: rivernode vps ports {id}\n",
                            t.spec.ports.len()
                        ));
                    }
                    let jupyter = t.placement.as_ref().and_then(|p| {
                        p.published
                            .iter()
                            .find(|x| x.request == JUPYTER_PORT && x.proto == Proto::Tcp)
                    });
                    if let (true, Some(p)) = (t.spec.jupyter, jupyter) {
                        let token = t.spec.env.get("JUPYTER_TOKEN").cloned().unwrap_or_default();
                        text.push_str(&format!(
                            "Jupyter:    http://{}:{}/?token={token}\n",
                            public_host(client).await?,
                            p.external
                        ));
                    }
                    if t.spec.no_ssh {
                        text.push_str(&format!(
                            "SSH:        none (--no-ssh); a shell: rivernode connect {id}\n"
                        ));
                    } else {
                        text.push_str(&format!("Log in:     rivernode ssh {id}\n"));
                    }
                    emit(&text)
                }
            }
        }
        VpsCommand::Ports { id } => ports(client, id, output).await?,
        VpsCommand::Pause { id } => lifecycle(client, id, "pause", output).await?,
        VpsCommand::Resume { id } => lifecycle(client, id, "resume", output).await?,
        VpsCommand::Stop { id } => lifecycle(client, id, "stop", output).await?,
        VpsCommand::Exempt { id, undo } => {
            let t: TaskView = client
                .post(
                    &format!("/api/tasks/{id}/idle-exempt"),
                    &serde_json::json!({ "exempt": !undo }),
                )
                .await?;
            match output {
                Output::Json => emit_json(&t),
                Output::Table if t.idle_exempt => emit(&format!(
                    "VPS {id} is exempt: it is never stopped for idle GPUs (`--undo` ends that)\n"
                )),
                Output::Table => emit(&format!(
                    "VPS {id} is no longer exempt: idle GPUs count again, from now\n"
                )),
            }
        }
        VpsCommand::Restart {
            id,
            from_snapshot,
            anywhere,
        } => {
            let t: TaskView = client
                .post(
                    &format!("/api/tasks/{id}/restart"),
                    &RestartRequest {
                        from_snapshot: from_snapshot.clone(),
                        anywhere,
                    },
                )
                .await?;
            match output {
                Output::Json => emit_json(&t),
                Output::Table => emit(&match (from_snapshot, anywhere) {
                    (Some(s), _) => format!(
                        "vps {id}: restart from snapshot {s} requested (state {})\n",
                        t.state
                    ),
                    (None, true) => format!(
                        "vps {id}: restart on any node from its parked copy (snapshot {}) requested (state {})\n",
                        t.parked.as_deref().unwrap_or("?"),
                        t.state
                    ),
                    (None, false) => format!("vps {id}: restart requested (state {})\n", t.state),
                }),
            }
        }
        VpsCommand::Snapshot(cmd) => snapshot(client, cmd, output).await?,
        VpsCommand::Delete { id } => {
            let t: TaskView = client
                .post(&format!("/api/tasks/{id}/delete"), &serde_json::json!({}))
                .await?;
            match output {
                Output::Json => emit_json(&t),
                Output::Table => emit(&format!("vps {id}: delete requested (state {})\n", t.state)),
            }
        }
    }
    Ok(())
}

/// `VPS` or `VPS:SNAPSHOT` of `--from-snapshot`.
fn snapshot_source(text: &str) -> anyhow::Result<ImageSource> {
    let (vps, snapshot) = text.split_once(':').unwrap_or((text, "latest"));
    let vps = vps
        .parse()
        .with_context(|| format!("--from-snapshot {text:?}: say VPS_ID or VPS_ID:SNAPSHOT_ID"))?;
    Ok(ImageSource::Snapshot {
        vps,
        snapshot: snapshot.to_string(),
    })
}

fn snapshot_rows(list: &[SnapshotView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                ago(s.created_at_unix_ms, crate::now_unix_ms()),
                bytes(s.size_bytes),
                s.node.clone(),
                s.consistency.map(|c| c.to_string()).unwrap_or_default(),
                s.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["SNAPSHOT", "TAKEN", "SIZE", "NODE", "COPY", "MESSAGE"],
        &rows,
    )
}

async fn snapshot(client: &Client, cmd: SnapshotCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { id, message } => {
            // The commit's size is known only at its end: a spinner, not a bar.
            let spin = match output {
                Output::Table => {
                    crate::cli::progress::spinner(&format!("vps {id}: committing its changes"))
                }
                Output::Json => None,
            };
            let s = client
                .post_long::<_, SnapshotView>(
                    &format!("/api/vps/snapshots/{id}"),
                    &SnapshotRequest { message },
                )
                .await;
            if let Some(spin) = spin {
                spin.finish_and_clear();
            }
            let s = s?;
            match output {
                Output::Json => emit_json(&s),
                Output::Table => emit(&match s.consistency {
                    Some(c) => format!(
                        "vps {id}: snapshot {} taken ({}, {c})\n",
                        s.id,
                        bytes(s.size_bytes)
                    ),
                    None => format!(
                        "vps {id}: snapshot {} taken ({} of changes)\n",
                        s.id,
                        bytes(s.size_bytes)
                    ),
                }),
            }
        }
        SnapshotCommand::List { id } => {
            let list: Vec<SnapshotView> = client.get(&format!("/api/vps/snapshots/{id}")).await?;
            match output {
                Output::Json => emit_json(&list),
                Output::Table => emit(&snapshot_rows(&list)),
            }
        }
        SnapshotCommand::Latest { id } => {
            let s: SnapshotView = client
                .get(&format!("/api/vps/snapshots/{id}/latest"))
                .await?;
            match output {
                Output::Json => emit_json(&s),
                Output::Table => emit(&snapshot_rows(std::slice::from_ref(&s))),
            }
        }
        SnapshotCommand::Delete { id, snapshot } => {
            client
                .delete(&format!("/api/vps/snapshots/{id}/{snapshot}"))
                .await?;
            emit(&format!("vps {id}: snapshot {snapshot} deleted\n"));
        }
    }
    Ok(())
}

async fn lifecycle(client: &Client, id: u64, verb: &str, output: Output) -> anyhow::Result<()> {
    let t: TaskView = client
        .post(&format!("/api/tasks/{id}/{verb}"), &serde_json::json!({}))
        .await?;
    match output {
        Output::Json => emit_json(&t),
        Output::Table => emit(&format!("vps {id}: {verb} requested (state {})\n", t.state)),
    }
    Ok(())
}

/// Runs stock ssh with rivernode as its ProxyCommand; the token travels in
/// the environment, not on a command line other users could read.
pub async fn ssh(client: &Client, a: SshArgs) -> anyhow::Result<()> {
    let Some(id) = a.id else {
        bail!("which VPS? rivernode ssh <id> (rivernode vps list shows them)");
    };
    let exe = std::env::current_exe().context("locating the rivernode binary")?;
    let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
    if t.spec.no_ssh {
        bail!("VPS {id} has no SSH server (it was made with --no-ssh): rivernode connect {id} opens a shell in it");
    }
    let known = known_hosts(a.known_hosts.clone())?;
    // The key the runner reported is pinned; without one (an older runner), trust on first use.
    let checking = match &t.ssh_host_key {
        Some(key) => {
            pin_host_key(&known, id, key)?;
            "yes"
        }
        None => "accept-new",
    };
    if let Some(port) = a.local_port {
        return local_forward(client, id, port, a.proxy_port).await;
    }
    let mut cmd = std::process::Command::new("ssh");
    if let Some(p) = a.proxy_port {
        cmd.env(PROXY_PORT_ENV, p.to_string());
    }
    cmd.env("RIVERNODE_HOST", &client.base)
        .env("RIVERNODE_TOKEN", client.token())
        .arg("-o")
        .arg(format!(
            "ProxyCommand={} ssh-proxy-command {id}",
            shell_quote(&exe)
        ))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        // The key the runner reported, pinned above; a different key is refused.
        .arg("-o")
        .arg(format!("StrictHostKeyChecking={checking}"))
        .args(["-o", &format!("HostKeyAlias=rivernode-vps-{id}")]);
    // Without a password on the VPS, a prompt could only fail: don't show one.
    if t.spec.ssh_password_hash.is_none() {
        cmd.args(["-o", "PasswordAuthentication=no"]);
    }
    // The key given, else the one this VPS was made with, else the ones
    // `vps create` uploads by default (from $HOME, which ssh itself ignores).
    let keys: Vec<PathBuf> = match a.key.or_else(|| recorded_key(&client.base, id)) {
        Some(k) => vec![k],
        None => default_private_keys(),
    };
    for k in &keys {
        cmd.arg("-i").arg(k);
    }
    if !keys.is_empty() {
        cmd.args(["-o", "IdentitiesOnly=yes"]);
    }
    cmd.arg(format!("{}@rivernode-vps-{id}", a.user));
    cmd.args(&a.command);
    let status = cmd
        .status()
        .context("running ssh (install openssh-client)")?;
    std::process::exit(status.code().unwrap_or(255));
}

/// Makes `known` hold exactly `key` for `rivernode-vps-<id>`.
fn pin_host_key(known: &Path, id: u64, key: &str) -> anyhow::Result<()> {
    let alias = format!("rivernode-vps-{id} ");
    let text = std::fs::read_to_string(known).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.starts_with(&alias)).collect();
    let entry = format!("{alias}{key}");
    lines.push(&entry);
    std::fs::write(known, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", known.display()))
}

fn known_hosts(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let known = match given {
        Some(k) => k,
        None => home()
            .context("HOME is not set: give --known-hosts")?
            .join(".config/rivernode/known_hosts"),
    };
    if let Some(dir) = known.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(known)
}

/// ssh_config entries that stock ssh, scp, sftp and IDEs can use. The
/// ProxyCommand finds the host and token the same way this command did
/// (the data directory when one was given, else the user's client.toml or
/// RIVERNODE_HOST/RIVERNODE_TOKEN in the environment), so no token is written here.
pub async fn ssh_config(
    client: &Client,
    data_dir: Option<&Path>,
    output: Option<PathBuf>,
    key: Option<PathBuf>,
    known: Option<PathBuf>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the rivernode binary")?;
    let known = known_hosts(known)?;
    // Every VPS that can run again keeps its entry (a stopped one too), of
    // those this token may log in to: an operator or viewer sees everyone's
    // VPS but tunnels only into their own (the admin into all).
    let me: crate::api::WhoAmI = client.get("/api/whoami").await?;
    let all: Vec<TaskView> = client.get("/api/tasks").await?;
    let all: Vec<TaskView> = all
        .into_iter()
        .filter(|t| me.role == "admin" || (me.user.is_some() && t.owner == me.user))
        .filter(|t| {
            use crate::api::TaskState as S;
            matches!(
                t.state,
                S::Pending | S::Assigning | S::Running | S::Paused | S::Stopped | S::Lost
            )
        })
        .collect();
    let mut out = String::from("# Generated by `rivernode ssh config`.\n");
    let dd = data_dir
        .map(|d| format!(" --data-dir {}", shell_quote(d)))
        .unwrap_or_default();
    // A VPS made with --no-ssh has nothing to log in to.
    for t in all
        .iter()
        .filter(|t| t.spec.kind == Kind::Vps && !t.spec.no_ssh)
    {
        if let Some(key) = &t.ssh_host_key {
            pin_host_key(&known, t.id, key)?;
        }
        out.push_str(&format!(
            "\nHost rivernode-vps-{id}\n  User root\n  ProxyCommand {exe}{dd} ssh-proxy-command {id}\n  HostKeyAlias rivernode-vps-{id}\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking {checking}\n{password}",
            id = t.id,
            checking = if t.ssh_host_key.is_some() { "yes" } else { "accept-new" },
            // A prompt could only fail without a password on the VPS.
            password = if t.spec.ssh_password_hash.is_none() {
                "  PasswordAuthentication no\n"
            } else {
                ""
            },
            exe = shell_quote(&exe),
            known = known.display(),
        ));
        if let Some(k) = key.clone().or_else(|| recorded_key(&client.base, t.id)) {
            out.push_str(&format!(
                "  IdentityFile {}\n  IdentitiesOnly yes\n",
                k.display()
            ));
        }
    }
    match output {
        Some(f) => {
            std::fs::write(&f, out).with_context(|| format!("writing {}", f.display()))?;
            emit(&format!(
                "wrote {}; use it with ssh -F {} rivernode-vps-<id>\n",
                f.display(),
                f.display()
            ));
        }
        None => emit(&out),
    }
    Ok(())
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Connects stdin/stdout to instance `id` through the host's SSH proxy.
pub async fn proxy_command(client: &Client, id: u64) -> anyhow::Result<()> {
    let port = std::env::var(PROXY_PORT_ENV)
        .ok()
        .and_then(|p| p.parse().ok());
    let s = open_tunnel(client, id, port).await?;
    let (mut r, mut w) = s.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut w).await;
        let _ = w.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut r, &mut tokio::io::stdout()).await;
    };
    // The session is over when the instance side closes.
    tokio::join!(up, async {
        down.await;
        std::process::exit(0);
    });
    Ok(())
}

/// `ssh --proxy-port`, handed to the ProxyCommand ssh runs.
const PROXY_PORT_ENV: &str = "RIVERNODE_SSH_PROXY_PORT";

/// `ssh --local-port`: 127.0.0.1:PORT carries each connection to the VPS's
/// SSH server through its own tunnel, until interrupted.
async fn local_forward(
    client: &Client,
    id: u64,
    port: u16,
    proxy_port: Option<u16>,
) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("--local-port {port}: cannot listen on 127.0.0.1:{port}"))?;
    let port = l.local_addr()?.port();
    eprintln!(
        "VPS {id}'s SSH server is at 127.0.0.1:{port}: ssh -p {port} root@127.0.0.1 (Ctrl-C ends)"
    );
    loop {
        let (mut local, _) = l.accept().await?;
        let tunnel = open_tunnel(client, id, proxy_port).await;
        tokio::spawn(async move {
            match tunnel {
                Ok(mut t) => {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut t).await;
                }
                Err(e) => eprintln!("{}", crate::error_chain(e.as_ref())),
            }
        });
    }
}

/// A connection to VPS `id`'s SSH server through the host's SSH proxy.
async fn open_tunnel(
    client: &Client,
    id: u64,
    proxy_port: Option<u16>,
) -> anyhow::Result<tokio::net::TcpStream> {
    let port = match proxy_port {
        Some(p) => p,
        None => client.get::<WhoAmI>("/api/whoami").await?.ssh_proxy_port,
    };
    let host = client
        .base
        .split("://")
        .nth(1)
        .and_then(|r| {
            r.rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .or(Some(r.to_string()))
        })
        .context("cannot tell the host's address from its URL")?;
    let mut s = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("connecting to the SSH proxy at {host}:{port}"))?;
    s.write_all(format!("REQUEST_TUNNEL {id} {}\n", client.token()).as_bytes())
        .await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).await? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line).to_string();
    if line != "SUCCESS" {
        bail!("the SSH proxy said: {line}");
    }
    Ok(s)
}

/// `vps ports ID` and `task ports ID`: the published ports, as Vast.ai's
/// IP Port Info shows them.
pub async fn ports(client: &Client, id: u64, output: Output) -> anyhow::Result<()> {
    let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
    let what = match t.spec.kind {
        Kind::Vps => "vps",
        Kind::Command => "task",
    };
    let published = t.placement.map(|p| p.published).unwrap_or_default();
    match output {
        Output::Json => emit_json(&published),
        Output::Table if t.spec.ports.is_empty() => emit(&format!(
            "{what} {id} publishes no ports ({what} {} -p PORT)\n",
            if what == "vps" { "create" } else { "submit" }
        )),
        Output::Table if published.is_empty() => emit(&format!(
            "{what} {id} is {}: its ports get their numbers when it is placed\n",
            t.state
        )),
        Output::Table => {
            let host = public_host(client).await?;
            let mut text = String::new();
            for p in &published {
                text.push_str(&format!("{}\n", port_line(&host, p)));
            }
            if !matches!(t.state, TaskState::Running | TaskState::Paused) {
                text.push_str(&format!(
                    "(closed while {what} {id} is {}; a VPS keeps them until it is deleted)\n",
                    t.state
                ));
            }
            emit(&text)
        }
    }
    Ok(())
}

/// The address published ports answer at: the host's `public_address`,
/// else the host this client talks to.
async fn public_host(client: &Client) -> anyhow::Result<String> {
    let who: WhoAmI = client.get("/api/whoami").await?;
    Ok(who
        .public_address
        .or_else(|| crate::api::url_host(&client.base))
        .unwrap_or_else(|| "HOST".into()))
}

/// `203.0.113.9:21234 -> 8081/tcp`, as Vast.ai's IP Port Info shows it.
fn port_line(host: &str, p: &Published) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{host}:{} -> {}/{}", p.external, p.internal, p.proto)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_half_is_the_whole_name_plus_pub() {
        // Not with_extension: "vps.key" must give "vps.key.pub", not "vps.pub".
        assert_eq!(
            public_key_file_of(Path::new("/h/.ssh/vps.key")),
            Path::new("/h/.ssh/vps.key.pub")
        );
        assert_eq!(
            public_key_file_of(Path::new("/h/.ssh/mynode_vps")),
            Path::new("/h/.ssh/mynode_vps.pub")
        );
    }

    #[test]
    fn backends_and_the_seeds_vm_sizes() {
        assert!(!is_vm_backend("container").unwrap() && !is_vm_backend("docker").unwrap());
        assert!(is_vm_backend("qemu").unwrap() && is_vm_backend("vm").unwrap());
        assert!(is_vm_backend("lxc").is_err());
        // The seed's bare numbers: --vm-memory in MiB, --vm-disk in GiB.
        assert_eq!(sized("--vm-memory", "16384", "M").unwrap(), 16384 << 20);
        assert_eq!(sized("--vm-disk", "50", "G").unwrap(), 50 << 30);
        assert_eq!(sized("--vm-disk", "512M", "G").unwrap(), 512 << 20);
        let e = sized("--vm-disk", "lots", "G").unwrap_err().to_string();
        assert!(e.starts_with("--vm-disk:"), "{e}");
    }

    #[test]
    fn crypt_matches_the_reference_vectors() {
        // From Ulrich Drepper's SHA-crypt specification.
        assert_eq!(
            crypt_sha512("Hello world!", "saltstring", 5000),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        );
        assert_eq!(
            crypt_sha512("Hello world!", "saltstringsaltst", 10000),
            "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."
        );
        let s = random_salt().unwrap();
        assert_eq!(s.len(), 16);
        assert_ne!(s, random_salt().unwrap());
    }
}
