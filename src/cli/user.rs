//! `rivernode user add|list|remove|rotate-token|env` (admin; rotate-token
//! and env also a user's own).

use crate::api::{NewUser, UserView, WhoAmI};
use std::collections::BTreeMap;

use crate::api::UserEnvChange;
use crate::cli::args::{Output, UserCommand, UserEnvCommand};
use crate::cli::client::{Client, ClientError};
use crate::cli::output::{ago, emit, emit_json, table};

pub async fn run(client: &Client, cmd: UserCommand, output: Output) -> Result<(), ClientError> {
    match cmd {
        UserCommand::Add { name, role, group } => {
            let u: NewUser = client
                .post(
                    "/api/users",
                    &serde_json::json!({ "name": name, "role": role, "group": group }),
                )
                .await?;
            match output {
                Output::Json => emit_json(&u),
                Output::Table => emit(&format!(
                    "user {} added; their token (shown once, give it to them):\n{}\n\
                     they use it as: rivernode --host URL --token TOKEN ... \
                     (or token = \"...\" in ~/.config/rivernode/client.toml)\n",
                    u.name, u.token
                )),
            }
        }
        UserCommand::List => {
            let users: Vec<UserView> = client.get("/api/users").await?;
            match output {
                Output::Json => emit_json(&users),
                Output::Table => {
                    let now = crate::now_unix_ms();
                    let rows: Vec<Vec<String>> = users
                        .iter()
                        .map(|u| {
                            vec![
                                u.name.clone(),
                                u.role.as_str().to_string(),
                                u.group.clone().unwrap_or_else(|| "-".into()),
                                u.active_tasks.to_string(),
                                ago(u.created_at_unix_ms, now),
                            ]
                        })
                        .collect();
                    emit(&table(
                        &["NAME", "ROLE", "GROUP", "ACTIVE TASKS", "ADDED"],
                        &rows,
                    ));
                }
            }
        }
        UserCommand::RotateToken { name, expires_in } => {
            let u: NewUser = client
                .post(
                    &format!("/api/users/{name}/token"),
                    &serde_json::json!({
                        "expires_in_ms": expires_in.map(|d| d.0.as_millis() as u64),
                    }),
                )
                .await?;
            match output {
                Output::Json => emit_json(&u),
                Output::Table => emit(&format!(
                    "user {}'s new token (shown once; the old one no longer works):\n{}\n",
                    u.name, u.token
                )),
            }
        }
        UserCommand::Remove { name } => {
            client.delete(&format!("/api/users/{name}")).await?;
            emit(&format!(
                "user {name} removed; their token is revoked and their requests that never ran ended \
                 (what ran stays: `rivernode task list` shows it)\n"
            ));
        }
        UserCommand::Set {
            name,
            role,
            group,
            no_group,
        } => {
            if role.is_none() && group.is_none() && !no_group {
                return Err(ClientError::Usage(
                    "say what changes: --role ROLE, --group GROUP or --no-group".into(),
                ));
            }
            client
                .put(
                    &format!("/api/users/{name}"),
                    &serde_json::json!({ "role": role, "group": group, "no_group": no_group }),
                )
                .await?;
            emit(&format!(
                "user {name} changed; `rivernode user list` shows them\n"
            ));
        }
        UserCommand::Invitations => {
            let list: Vec<crate::api::InvitationView> = client.get("/api/invitations").await?;
            match output {
                Output::Json => emit_json(&list),
                Output::Table => {
                    let now = crate::now_unix_ms();
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|i| {
                            vec![
                                i.id.clone(),
                                i.role.as_str().to_string(),
                                i.group.clone().unwrap_or_else(|| "-".into()),
                                match (&i.used_by, i.expires_at_unix_ms > now) {
                                    (Some(by), _) => format!("used by {by}"),
                                    (None, true) => format!(
                                        "open, expires {}",
                                        crate::cli::output::until(i.expires_at_unix_ms, now)
                                    ),
                                    (None, false) => "expired".into(),
                                },
                            ]
                        })
                        .collect();
                    emit(&table(&["ID", "ROLE", "GROUP", "STATE"], &rows));
                }
            }
        }
        UserCommand::Uninvite { id } => {
            client.delete(&format!("/api/invitations/{id}")).await?;
            emit(&format!(
                "invitation {id} revoked: its code no longer works\n"
            ));
        }
        UserCommand::Env { cmd } => env(client, cmd, output).await?,
        UserCommand::Invite {
            role,
            group,
            expires,
        } => {
            let inv: crate::api::Invitation = client
                .post(
                    "/api/invitations",
                    &serde_json::json!({
                        "role": role,
                        "group": group,
                        "expires_in_ms": expires.map(|d| d.0.as_millis() as u64),
                    }),
                )
                .await?;
            match output {
                Output::Json => emit_json(&inv),
                Output::Table => emit(&format!(
                    "invitation {} for one {} (shown once; it expires {}):\n{}\n\
                     they run: rivernode --host {} login --invite {} --name THEIR-NAME\n\
                     (`rivernode user uninvite {}` revokes it)\n",
                    inv.id,
                    inv.role.as_str(),
                    crate::cli::output::until(inv.expires_at_unix_ms, crate::now_unix_ms()),
                    inv.code,
                    client.base,
                    inv.code,
                    inv.id
                )),
            }
        }
    }
    Ok(())
}

/// `rivernode user env set|list|unset`.
async fn env(client: &Client, cmd: UserEnvCommand, output: Output) -> Result<(), ClientError> {
    let (user, change) = match cmd {
        UserEnvCommand::List { user } => (user, None),
        UserEnvCommand::Set { vars, user } => {
            let set = crate::cli::task::parse_env(&vars)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            let change = UserEnvChange {
                set,
                ..Default::default()
            };
            (user, Some(change))
        }
        UserEnvCommand::Unset { keys, user } => (
            user,
            Some(UserEnvChange {
                unset: keys,
                ..Default::default()
            }),
        ),
    };
    let user = match user {
        Some(u) => u,
        None => {
            let w: WhoAmI = client.get("/api/whoami").await?;
            w.user.ok_or_else(|| {
                ClientError::Usage("this token is no user's: name one with --user NAME".into())
            })?
        }
    };
    let path = format!("/api/users/{user}/env");
    let vars: BTreeMap<String, String> = match change {
        Some(c) => client.post(&path, &c).await?,
        None => client.get(&path).await?,
    };
    match output {
        Output::Json => emit_json(&vars),
        Output::Table => {
            let rows: Vec<Vec<String>> = vars
                .iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect();
            emit(&table(&["NAME", "VALUE"], &rows));
        }
    }
    Ok(())
}

/// `rivernode whoami`: the token's principal, as the host sees it.
pub async fn whoami(client: &Client, output: Output) -> Result<(), ClientError> {
    let w: WhoAmI = client.get("/api/whoami").await?;
    match output {
        Output::Json => emit_json(&w),
        Output::Table => {
            let who = match (&w.user, &w.node) {
                (Some(u), _) if w.role == "user" => format!("user {u}"),
                (Some(u), _) => format!("{} {u}", w.role),
                (None, Some(n)) => format!("node {n}"),
                (None, None) => w.role.clone(),
            };
            emit(&format!("{who} on {}\n", client.base))
        }
    }
    Ok(())
}

/// `rivernode quota set|show`.
pub async fn quota(
    client: &Client,
    cmd: crate::cli::args::QuotaCommand,
    output: Output,
) -> Result<(), ClientError> {
    use crate::api::{QuotaCaps, QuotaView};
    use crate::cli::args::QuotaCommand;
    match cmd {
        QuotaCommand::Set {
            user,
            group,
            gpus,
            vps,
            cores,
            memory,
            gpu_hours,
            period,
        } => {
            let (scope, name) = match (user, group) {
                (Some(u), _) => ("user", u),
                (None, Some(g)) => ("group", g),
                (None, None) => {
                    return Err(ClientError::Usage(
                        "say whose: --user NAME or --group NAME".into(),
                    ))
                }
            };
            let caps = QuotaCaps {
                gpus,
                vps,
                cores,
                memory_bytes: memory.map(|m| m.0),
                gpu_seconds: gpu_hours.map(|h| (h * 3600.0).round() as u64),
                period_s: period.map(|p| p.0.as_secs()),
            };
            client
                .put(&format!("/api/quotas/{scope}/{name}"), &caps)
                .await?;
            emit(&format!("quota of {scope} {name}: {}\n", caps.text()));
        }
        QuotaCommand::Show => {
            let quotas: Vec<QuotaView> = client.get("/api/quotas").await?;
            match output {
                Output::Json => emit_json(&quotas),
                Output::Table => {
                    let cell = |used: u64, cap: Option<u64>| match cap {
                        Some(c) => format!("{used}/{c}"),
                        None => format!("{used}"),
                    };
                    let gib = |b: u64| b.div_ceil(1 << 30);
                    let rows: Vec<Vec<String>> = quotas
                        .iter()
                        .map(|q| {
                            vec![
                                format!("{} {}", q.scope.as_str(), q.name),
                                cell(q.used.gpus, q.caps.gpus),
                                cell(q.used.vps, q.caps.vps),
                                cell(q.used.cores, q.caps.cores),
                                cell(gib(q.used.memory_bytes), q.caps.memory_bytes.map(gib)),
                                match q.caps.gpu_seconds {
                                    Some(cap) => format!(
                                        "{}/{} per {}",
                                        crate::api::gpu_hours_text(q.used.gpu_seconds),
                                        crate::api::gpu_hours_text(cap),
                                        crate::api::period_text(q.caps.period())
                                    ),
                                    None => "-".into(),
                                },
                            ]
                        })
                        .collect();
                    emit(&table(
                        &["WHO", "GPUS", "VPS", "CORES", "MEMORY (GiB)", "GPU-HOURS"],
                        &rows,
                    ));
                }
            }
        }
    }
    Ok(())
}
