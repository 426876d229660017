//! `rivernode task ...` and `rivernode env ...`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::api::{
    parse_memory_size, Environments, ImageSource, MountSpec, SubmitResponse, Target, TaskSpec,
    TaskView,
};
use crate::cli::args::{EnvCommand, Output, ResourceArgs, SubmitArgs, TaskCommand};
use crate::cli::client::Client;
use crate::cli::output::{ago, bytes, emit, emit_json, table};

/// The part of a spec every kind shares: where, how much, in what image.
pub fn base_spec(r: &ResourceArgs, kind: crate::api::Kind) -> anyhow::Result<TaskSpec> {
    base_spec_from(r, kind, None)
}

/// What to run in when the flags name nothing: the host's default
/// environment, or an error that lists the environments there are.
pub async fn default_image(
    client: &Client,
    r: &ResourceArgs,
) -> anyhow::Result<Option<ImageSource>> {
    if r.container.is_some() || r.image.is_some() {
        return Ok(None);
    }
    let envs: crate::api::Environments = client.get("/api/environments").await?;
    match envs.default {
        Some(name) => Ok(Some(ImageSource::Environment(name))),
        None => {
            let names: Vec<&str> = envs.environments.iter().map(|e| e.name.as_str()).collect();
            bail!(
                "say what to run in: --container ENV (an environment: {}) or --image REF (a registry image); \
                 the operator can set the host's default_environment",
                if names.is_empty() { "none yet".to_string() } else { names.join(", ") }
            )
        }
    }
}

/// The spec of the resource flags; `image` stands in for --container/--image.
pub fn base_spec_from(
    r: &ResourceArgs,
    kind: crate::api::Kind,
    image: Option<ImageSource>,
) -> anyhow::Result<TaskSpec> {
    let target = r
        .target
        .as_deref()
        .map(|t| t.parse::<Target>())
        .transpose()?;
    let memory_bytes = r
        .memory
        .as_deref()
        .map(parse_memory_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("-m/--memory: {e}"))?;
    let shm_bytes = r
        .shm_size
        .as_deref()
        .map(parse_memory_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--shm-size: {e}"))?;
    if let (Some(shm), Some(mem)) = (shm_bytes, memory_bytes) {
        if shm > mem {
            bail!("--shm-size is larger than --memory: /dev/shm counts against the memory limit; raise -m or lower --shm-size");
        }
    }
    let image = match (image, &r.container, &r.image) {
        (Some(i), None, None) => i,
        (None, Some(env), None) => ImageSource::Environment(env.clone()),
        (None, None, Some(reference)) => ImageSource::Registry(reference.clone()),
        _ => bail!("say what to run in: --container ENV (an environment) or --image REF (a registry image)"),
    };
    Ok(TaskSpec {
        command: vec![],
        env: BTreeMap::new(),
        mounts: vec![],
        image,
        cores: r.cores,
        memory_bytes,
        gpu_count: r.gpus,
        target,
        kind,
        ssh_keys: vec![],
        ssh_password_hash: None,
        privileged: false,
        restore: None,
        movable: false,
        no_ssh: false,
        shm_bytes,
        vm_disk_bytes: None,
        onstart: None,
        args: vec![],
        ports: vec![],
        jupyter: false,
        no_network: false,
        hostname: r.hostname.clone(),
    })
}

/// `-e KEY=VALUE` flags as the variables they set (a later one wins).
pub fn parse_env(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for kv in flags {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .with_context(|| format!("-e {kv:?}: write KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    Ok(env)
}

/// Turns the command line into a task spec, refusing bad input before anything is sent.
/// `image` stands in for --container/--image (the host's default).
pub fn spec_from_args(a: &SubmitArgs, image: Option<ImageSource>) -> anyhow::Result<TaskSpec> {
    let base = base_spec_from(&a.resources, crate::api::Kind::Command, image)?;
    let env = parse_env(&a.env)?;
    let mut mounts = Vec::new();
    for m in &a.mounts {
        let parts: Vec<&str> = m.split(':').collect();
        let (source, target, read_only) = match parts.as_slice() {
            [s, t] => (*s, *t, false),
            [s, t, "ro"] => (*s, *t, true),
            _ => bail!("--mount {m:?}: write SRC:DST or SRC:DST:ro"),
        };
        mounts.push(MountSpec {
            source: source.into(),
            target: target.into(),
            read_only,
        });
    }
    if a.command.is_empty() || a.command[0].trim().is_empty() {
        bail!("no command: put it after --, e.g. rivernode task submit --container base -- python train.py");
    }
    Ok(TaskSpec {
        command: a.command.clone(),
        env,
        mounts,
        privileged: a.privileged,
        no_network: a.network == "none",
        ports: a
            .ports
            .iter()
            .map(|p| {
                crate::api::ports::PortRequest::parse(p).map_err(|e| anyhow::anyhow!("-p {e}"))
            })
            .collect::<anyhow::Result<_>>()?,
        ..base
    })
}

fn list_table(tasks: &[TaskView], now: i64) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let p = t.placement.as_ref();
            vec![
                t.id.to_string(),
                t.state.to_string(),
                p.map(|p| p.node.clone()).unwrap_or_else(|| "-".into()),
                // The count asked for, and which CPUs it has (a list such
                // as "0" would read like a count on its own).
                t.spec.cores.to_string(),
                p.map(|p| {
                    if p.cpus.is_empty() {
                        "shared".to_string()
                    } else {
                        p.cpus.to_string()
                    }
                })
                .unwrap_or_else(|| "-".into()),
                p.map(|p| p.gpus.len().to_string())
                    .unwrap_or_else(|| "-".into()),
                ago(t.submitted_at_unix_ms, now),
                t.spec.command.join(" ").chars().take(40).collect(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "NODE",
            "CORES",
            "CPU LIST",
            "GPUS",
            "SUBMITTED",
            "COMMAND",
        ],
        &rows,
    )
}

pub fn status_text(t: &TaskView) -> String {
    let mut out = format!(
        "Task:       {}\nState:      {} (wanted: {:?})\nCommand:    {}\n",
        t.id,
        t.state,
        t.desired,
        t.spec.command.join(" ")
    );
    out.push_str(&format!("Image:      {}\n", t.spec.image));
    out.push_str(&format!(
        "Asked:      {}, {}, {} GPUs{}\n",
        match t.spec.cores {
            0 => "shared cores".to_string(),
            n => format!("{n} cores"),
        },
        t.spec
            .memory_bytes
            .map(bytes)
            .unwrap_or_else(|| "its share of the node's memory".into()),
        t.spec.gpu_count,
        t.spec
            .target
            .as_ref()
            .map(|x| format!(", target {x}"))
            .unwrap_or_default()
    ));
    if let Some(p) = &t.placement {
        out.push_str(&format!(
            "Placed:     {} NUMA {} cpus {} memory {}{}\n",
            p.node,
            p.numa.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            if p.cpus.is_empty() {
                "shared (the node's unreserved ones)".to_string()
            } else {
                p.cpus.to_string()
            },
            if p.memory_bytes > 0 {
                bytes(p.memory_bytes)
            } else {
                "unlimited".into()
            },
            if p.gpus.is_empty() {
                String::new()
            } else {
                format!(
                    " GPUs {}",
                    p.gpus
                        .iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        ));
    }
    out.push_str(&format!("Why:        {}\n", t.reason));
    if let Some(c) = t.exit_code {
        out.push_str(&format!("Exit code:  {c}\n"));
    }
    if let Some(m) = &t.message {
        out.push_str(&format!("Message:    {m}\n"));
    }
    if let Some(n) = &t.notice {
        out.push_str(&format!("Warning:    {n}\n"));
    }
    if t.idle_exempt {
        out.push_str("Idle GPUs:  exempt (an operator's `vps exempt`): never stopped for them\n");
    }
    if let Some(p) = &t.parked {
        out.push_str(&format!(
            "Parked:     snapshot {p} of its last stop is on the host (`vps restart {} --anywhere` starts it on any node)\n",
            t.id
        ));
    }
    out
}

async fn wait_final(client: &Client, id: u64) -> anyhow::Result<TaskView> {
    loop {
        let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
        if t.state.is_final() {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Copies task `id`'s log `stream` to `to` from the start; with `follow`,
/// until the task has ended and what it wrote last has been read.
async fn copy_log(
    client: &Client,
    id: u64,
    stream: &str,
    follow: bool,
    to: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let mut offset = 0u64;
    let mut ended = false;
    loop {
        let (data, next) = client
            .get_bytes(&format!(
                "/api/tasks/{id}/logs?stream={stream}&offset={offset}"
            ))
            .await?;
        to.write_all(&data)?;
        to.flush()?;
        offset = next.unwrap_or(offset + data.len() as u64);
        if !data.is_empty() {
            continue;
        }
        // One more read after the end was seen: what the task wrote just
        // before it ended is not lost.
        if !follow || ended {
            return Ok(());
        }
        let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
        ended = t.state.is_final();
        if !ended {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Waits while task `id` waits for room or is being made on its node:
/// says why it waits (once each time that changes) and shows how far the
/// making got (image pull or import). With `pending_for`, gives up waiting
/// once it has been queued for room that long (the task stays queued).
/// Returns it as it was last seen.
pub async fn wait_made(
    client: &Client,
    id: u64,
    what: &str,
    pending_for: Option<Duration>,
) -> anyhow::Result<TaskView> {
    use crate::api::TaskState;
    let mut said = String::new();
    let mut meter = crate::cli::progress::Meter::new();
    let began = std::time::Instant::now();
    let mut told = false;
    loop {
        let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
        let made =
            t.placement.is_some() && !matches!(t.state, TaskState::Pending | TaskState::Assigning);
        // A VPS that waits for an operator may wait for days: say so and return.
        if made || t.state.is_final() || (what == "vps" && t.state == TaskState::PendingApproval) {
            return Ok(t);
        }
        // A task's stderr is its own (`--wait` passes it through, as
        // `docker run` does): only a VPS gets this word.
        if what == "vps" && t.state == TaskState::Assigning && !told {
            let node = t.placement.as_ref().map(|p| p.node.as_str()).unwrap_or("?");
            meter.say(&format!(
                "{what} {id}: being made on node {node} (Ctrl-C stops waiting, not the VPS)"
            ));
            told = true;
        }
        if let Some(p) = &t.progress {
            meter.show(p);
        }
        // Why it waits, once each time the reason changes.
        let why = t.reason.clone();
        let waits = matches!(t.state, TaskState::Pending | TaskState::PendingApproval);
        if waits && !why.is_empty() && why != said {
            meter.say(&format!("{what} {id} {}: {why}", t.state));
            said = why;
        }
        if t.state == TaskState::Pending && pending_for.is_some_and(|d| began.elapsed() > d) {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for task `id` to start, streams its stdout and stderr to ours
/// while it runs, and returns it once it has ended.
async fn stream_until_final(client: &Client, id: u64) -> anyhow::Result<TaskView> {
    let t = wait_made(client, id, "task", None).await?;
    if t.state.is_final() && t.placement.is_none() {
        return Ok(t);
    }
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let (out, err) = tokio::join!(
        copy_log(client, id, "stdout", true, &mut stdout),
        copy_log(client, id, "stderr", true, &mut stderr),
    );
    out?;
    err?;
    wait_final(client, id).await
}

pub async fn run(client: &Client, cmd: TaskCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Submit(a) => {
            let image = default_image(client, &a.resources).await?;
            let spec = spec_from_args(&a, image)?;
            let r: SubmitResponse = client.post("/api/tasks", &spec).await?;
            if !a.wait {
                match output {
                    Output::Json => emit_json(&r),
                    Output::Table => emit(&format!("task {} {}: {}\n", r.id, r.state, r.reason)),
                }
                return Ok(());
            }
            let t = match output {
                Output::Json => {
                    let t = wait_final(client, r.id).await?;
                    emit_json(&t);
                    t
                }
                // As `docker run` does: the task's output while it runs,
                // stdout and stderr each to ours, then how it ended (on
                // stderr, so stdout is the task's alone).
                Output::Table => {
                    let t = stream_until_final(client, r.id).await?;
                    eprintln!(
                        "task {} {}{}",
                        t.id,
                        t.state,
                        t.exit_code
                            .map(|c| format!(" (exit code {c})"))
                            .unwrap_or_else(|| t
                                .message
                                .as_deref()
                                .map(|m| format!(": {m}"))
                                .unwrap_or_default())
                    );
                    t
                }
            };
            if t.state != crate::api::TaskState::Completed {
                std::process::exit(t.exit_code.filter(|c| *c != 0).unwrap_or(1));
            }
        }
        TaskCommand::List { state, node } => {
            let mut q = Vec::new();
            if let Some(s) = &state {
                q.push(format!("state={s}"));
            }
            if let Some(n) = &node {
                q.push(format!("node={n}"));
            }
            let path = if q.is_empty() {
                "/api/tasks".to_string()
            } else {
                format!("/api/tasks?{}", q.join("&"))
            };
            let tasks: Vec<TaskView> = client.get(&path).await?;
            match output {
                Output::Json => emit_json(&tasks),
                Output::Table => emit(&list_table(&tasks, crate::now_unix_ms())),
            }
        }
        TaskCommand::Ports { id } => crate::cli::vps::ports(client, id, output).await?,
        TaskCommand::Status { id } => {
            let t: TaskView = client.get(&format!("/api/tasks/{id}")).await?;
            match output {
                Output::Json => emit_json(&t),
                Output::Table => emit(&status_text(&t)),
            }
        }
        TaskCommand::Logs {
            id,
            stderr,
            onstart,
            follow,
        } => {
            let stream = match (onstart, stderr) {
                (false, false) => "stdout",
                (false, true) => "stderr",
                (true, false) => "onstart.stdout",
                (true, true) => "onstart.stderr",
            };
            // Written to our stdout either way: `logs --stderr > f` keeps it.
            let mut stdout = std::io::stdout();
            copy_log(client, id, stream, follow, &mut stdout).await?;
        }
        TaskCommand::Kill { id } => desire(client, "kill", id, output).await?,
        TaskCommand::Pause { id } => desire(client, "pause", id, output).await?,
        TaskCommand::Resume { id } => desire(client, "resume", id, output).await?,
    }
    Ok(())
}

async fn desire(client: &Client, verb: &str, id: u64, output: Output) -> anyhow::Result<()> {
    let t: TaskView = client
        .post(&format!("/api/tasks/{id}/{verb}"), &serde_json::json!({}))
        .await?;
    match output {
        Output::Json => emit_json(&t),
        Output::Table => emit(&format!(
            "task {id}: {verb} requested (state {})\n",
            t.state
        )),
    }
    Ok(())
}

/// `rivernode approve ID` (no reason) or `reject ID --reason ...`.
pub async fn decide(
    client: &Client,
    id: u64,
    rejection: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let t: TaskView = match &rejection {
        None => {
            client
                .post(&format!("/api/tasks/{id}/approve"), &serde_json::json!({}))
                .await?
        }
        Some(reason) => {
            client
                .post(
                    &format!("/api/tasks/{id}/reject"),
                    &serde_json::json!({ "reason": reason }),
                )
                .await?
        }
    };
    match output {
        Output::Json => emit_json(&t),
        Output::Table => emit(&match rejection {
            None => format!("task {id} approved: {} ({})\n", t.state, t.reason),
            Some(_) => format!("task {id} rejected; its owner reads why in its status\n"),
        }),
    }
    Ok(())
}

pub async fn env(client: &Client, cmd: EnvCommand, output: Output) -> anyhow::Result<()> {
    let envs: Environments = client.get("/api/environments").await?;
    match cmd {
        EnvCommand::List => match output {
            Output::Json => emit_json(&envs),
            Output::Table => {
                let rows: Vec<Vec<String>> = envs
                    .environments
                    .iter()
                    .map(|e| vec![e.name.clone(), bytes(e.size_bytes)])
                    .collect();
                emit(&table(&["NAME", "SIZE"], &rows));
            }
        },
        EnvCommand::Import { name, archive } => {
            if !crate::api::valid_image_name(&name) {
                bail!("environment name {name:?}: use letters, digits, '.', '_' and '-'");
            }
            let dir = std::path::Path::new(&envs.shared_dir).join("environments");
            std::fs::create_dir_all(&dir).with_context(|| {
                format!(
                    "creating {} (is the shared directory mounted here?)",
                    dir.display()
                )
            })?;
            let dest = dir.join(format!("{name}.tar"));
            let tmp = dir.join(format!(".{name}.tar.importing"));
            if !archive.is_file() {
                bail!("{}: no such file (give an OCI or docker archive, e.g. from `docker save` or `skopeo copy ... oci-archive:FILE`)", archive.display());
            }
            // A leftover of an import that was cut off (or a link planted
            // there) goes first; the copy makes a new file.
            let _ = std::fs::remove_file(&tmp);
            crate::cli::progress::copy_file(&archive, &tmp, &format!("environment {name}"), 0o644)
                .with_context(|| format!("copying {} to {}", archive.display(), tmp.display()))?;
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming to {}", dest.display()))?;
            emit(&format!("environment {name} is {}\n", dest.display()));
        }
    }
    Ok(())
}
