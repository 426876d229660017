//! The `rivernode` command line: a client of the host API (node commands),
//! config and completion helpers, and the daemon launchers. Later: task, vps,
//! ssh, and node-local admin (gpu, cgroup).

pub mod args;
pub mod cgroup;
pub mod client;
pub mod daemon;
pub mod forward;
pub mod gpu;
pub mod node;
pub mod output;
pub mod progress;
pub mod task;
pub mod terminal;
pub mod user;
pub mod vm;
pub mod vps;

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::config::{render_defaults, HostConfig, RunnerConfig};
use args::{Cli, Command, ConfigCommand, Daemon, Output, TokenCommand};
use client::Client;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Host(args) => daemon::host(args, cli.data_dir).await,
        Command::Runner(args) => daemon::runner(*args, cli.data_dir).await,
        Command::Up(args) => daemon::up(args, cli.data_dir).await,
        Command::Node(cmd) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            Ok(node::run(&client, cmd, cli.output).await?)
        }
        Command::User(cmd) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            Ok(user::run(&client, cmd, cli.output).await?)
        }
        Command::Quota(cmd) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            Ok(user::quota(&client, cmd, cli.output).await?)
        }
        Command::Connect { id, shell }
        | Command::Terminal(args::TerminalCommand::Attach { id, shell }) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            // A terminal only for a terminal, as ssh does: piped input then
            // ends the shell by closing its stdin. (A ^D sent down a pty can
            // be flushed by the shell's own terminal setup, and it hangs.)
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
            let code =
                terminal::exec(&client, id, terminal::login_shell(shell.as_deref()), tty).await?;
            std::process::exit(code);
        }
        Command::Forward {
            id,
            port,
            local_port,
            local_host,
            proto,
        } => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            let proto = match proto {
                args::ForwardProto::Tcp => crate::api::forward::Proto::Tcp,
                args::ForwardProto::Udp => crate::api::forward::Proto::Udp,
            };
            let a = forward::ForwardArgs {
                id,
                port,
                local_host,
                local_port,
                proto,
            };
            forward::forward(&client, a).await
        }
        Command::Terminal(args::TerminalCommand::Exec { id, tty, command }) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            let code = terminal::exec(&client, id, command, tty).await?;
            std::process::exit(code);
        }
        Command::Login {
            invite,
            name,
            force,
        } => {
            let (user, path) =
                client::login(cli.host, cli.data_dir.as_deref(), &invite, &name, force).await?;
            println!(
                "welcome, {}; your token is in {} (`rivernode whoami` shows who you are)",
                user.name,
                path.display()
            );
            Ok(())
        }
        Command::Approve { id } => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            Ok(task::decide(&client, id, None, cli.output).await?)
        }
        Command::Reject { id, reason } => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            Ok(task::decide(&client, id, Some(reason), cli.output).await?)
        }
        Command::Token(TokenCommand::Rotate { expires_in }) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            let (user, kept) = client::rotate_own(&client, expires_in).await?;
            match (cli.output, kept) {
                (Output::Json, _) => output::emit_json(&user),
                (Output::Table, Some(path)) => output::emit(&format!(
                    "{}'s token rotated; the new one is in {} (the old one no longer works)\n",
                    user.name,
                    path.display()
                )),
                (Output::Table, None) => output::emit(&format!(
                    "{}'s new token (shown once; the old one no longer works):\n{}\n",
                    user.name, user.token
                )),
            }
            Ok(())
        }
        Command::Token(TokenCommand::Metrics) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            let t: crate::api::MetricsToken = client
                .post("/api/metrics-token", &serde_json::json!({}))
                .await?;
            match cli.output {
                Output::Json => output::emit_json(&t),
                Output::Table => output::emit(&format!(
                    "the metrics token (shown once; the last one no longer works, at the runners \
                     from their next heartbeat):\n{}\n\
                     Prometheus reads {}/metrics and each runner's /metrics with it \
                     (README, Metrics)\n",
                    t.token, client.base
                )),
            }
            Ok(())
        }
        Command::Whoami => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            Ok(user::whoami(&client, cli.output).await?)
        }
        Command::Config(ConfigCommand::Init { daemon, file }) => {
            let text = match daemon {
                Daemon::Host => render_defaults(
                    "rivernode host configuration (/etc/rivernode/host.toml)",
                    HostConfig::KEYS,
                    &HostConfig::default(),
                ),
                Daemon::Runner => render_defaults(
                    "rivernode runner configuration (/etc/rivernode/runner.toml)",
                    RunnerConfig::KEYS,
                    &RunnerConfig::default(),
                ),
            };
            match file {
                None => output::emit(&text),
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .with_context(|| {
                            format!(
                                "cannot create {} (an existing file is never overwritten)",
                                path.display()
                            )
                        })?;
                    f.write_all(text.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    output::emit(&format!("wrote {}\n", path.display()));
                }
            }
            Ok(())
        }
        Command::Cgroup(cmd) => cgroup::run(cmd, cli.output),
        Command::Task(cmd) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            task::run(&client, cmd, cli.output).await
        }
        Command::Vps(cmd) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            vps::run(&client, cmd, cli.output).await
        }
        Command::Ssh(cmd) => {
            let data_dir = cli.data_dir.clone();
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            match cmd.sub {
                Some(args::SshSub::Config {
                    file,
                    key,
                    known_hosts,
                }) => vps::ssh_config(&client, data_dir.as_deref(), file, key, known_hosts).await,
                None => vps::ssh(&client, cmd.login).await,
            }
        }
        Command::SshProxyCommand { id } => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            vps::proxy_command(&client, id).await
        }
        Command::Env(cmd) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            task::env(&client, cmd, cli.output).await
        }
        Command::Gpu(cmd) => {
            // The node's ledger is the runner's: its data directory, as the
            // runner's config file and environment set it.
            let dir = match cli.data_dir {
                Some(d) => d,
                None => daemon::runner_config(&Default::default(), None)?.data_dir,
            };
            gpu::run(cmd, cli.output, &dir)
        }
        Command::Vm(args::VmCommand::Image(cmd)) => {
            let client = Client::resolve(cli.host, cli.token, cli.data_dir.as_deref())?;
            vm::image(&client, cmd, cli.output).await
        }
        Command::Vm(args::VmCommand::Check) => {
            let found = crate::kvm::check::check(&crate::kvm::check::Roots::default());
            match cli.output {
                args::Output::Json => output::emit_json(&found),
                args::Output::Table => {
                    let rows: Vec<Vec<String>> = found
                        .iter()
                        .map(|f| {
                            vec![
                                f.what.to_string(),
                                if f.ok { "ok" } else { "missing" }.to_string(),
                                f.detail.clone(),
                                f.fix.clone(),
                            ]
                        })
                        .collect();
                    output::emit(&output::table(
                        &["CHECK", "STATE", "FOUND", "WHAT TO DO"],
                        &rows,
                    ));
                }
            }
            if !crate::kvm::check::vms_can_run(&found) {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "rivernode", &mut buf);
            output::emit(&String::from_utf8_lossy(&buf));
            Ok(())
        }
    }
}
