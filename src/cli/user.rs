//! `rivernode user add|list|remove|rotate-token` (admin; rotate-token also a user's own).

use crate::api::{NewUser, UserView, WhoAmI};
use crate::cli::args::{Output, UserCommand};
use crate::cli::client::{Client, ClientError};
use crate::cli::output::{ago, emit, emit_json, table};

pub async fn run(client: &Client, cmd: UserCommand, output: Output) -> Result<(), ClientError> {
    match cmd {
        UserCommand::Add { name } => {
            let u: NewUser = client
                .post("/api/users", &serde_json::json!({ "name": name }))
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
                                u.active_tasks.to_string(),
                                ago(u.created_at_unix_ms, now),
                            ]
                        })
                        .collect();
                    emit(&table(&["NAME", "ACTIVE TASKS", "ADDED"], &rows));
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
            emit(&format!("user {name} removed; their token is revoked\n"));
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
                (Some(u), _) => format!("user {u}"),
                (None, Some(n)) => format!("node {n}"),
                (None, None) => w.role.clone(),
            };
            emit(&format!("{who} on {}\n", client.base))
        }
    }
    Ok(())
}
