//! `rivernode connect`, `terminal attach` and `terminal exec`: a command in
//! an instance on any node, over the host's exec websocket (`api::exec`).
//! With a terminal, the local one is put in raw mode (restored on every
//! way out) and its size follows the window; without one, the command's
//! stdout and stderr stay apart and its exit status is ours.

use std::io::Write;
use std::os::fd::AsFd;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::api::exec::{frame, ws_url, ExecControl, ExecEnd, ExecStart, STDERR, STDIN, STDOUT};
use crate::cli::client::Client;

/// The shell `connect` and `terminal attach` start: bash where the image
/// has it, else sh, as a login shell.
pub fn login_shell(shell: Option<&str>) -> Vec<String> {
    match shell {
        Some(s) => vec![s.to_string()],
        None => vec![
            "/bin/sh".into(),
            "-c".into(),
            "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi".into(),
        ],
    }
}

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::libc::winsize);

/// The local terminal's (columns, rows); 80x24 when it cannot be told.
fn terminal_size() -> (u16, u16) {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own, on
    // stdout's descriptor, which stays open for the whole call.
    let ok = unsafe { tiocgwinsz(nix::libc::STDOUT_FILENO, &mut ws) }.is_ok();
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (80, 24)
    }
}

pub type HostSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The host's websocket at `path`, with our token; the host's refusal (no
/// such task, not running) as its own message.
pub async fn dial(client: &Client, path: &str) -> anyhow::Result<HostSocket> {
    let mut req = ws_url(&client.base, path)
        .into_client_request()
        .with_context(|| format!("host URL {}", client.base))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", client.token())
            .parse()
            .context("the token is not a header value")?,
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body = resp.body().as_deref().unwrap_or_default();
            let text = String::from_utf8_lossy(body).to_string();
            let message = crate::api::ErrorBody::message_of(&text).unwrap_or(text);
            bail!("the host answered {status}: {message}");
        }
        Err(e) => bail!("connecting to {}: {e}", client.base),
    }
}

/// Runs `command` in instance `id`; its exit status.
pub async fn exec(
    client: &Client,
    id: u64,
    command: Vec<String>,
    tty: bool,
) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    let ws = dial(client, &format!("/api/tasks/{id}/exec")).await?;
    let (mut tx, mut rx) = ws.split();
    let (cols, rows) = if tty { terminal_size() } else { (80, 24) };
    let start = ExecStart {
        command,
        tty,
        cols,
        rows,
    };
    tx.send(Message::Text(serde_json::to_string(&start)?.into()))
        .await?;
    let _raw = (tty && std::io::stdin().is_terminal())
        .then(RawMode::enter)
        .flatten();
    let (to_ws, mut from_local) = tokio::sync::mpsc::channel::<Message>(16);
    // Standard input, then its end: for a terminal, its end-of-file key
    // (^D), which ends a shell as if typed, rather than a hang-up.
    let input = to_ws.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let end = if tty {
                        frame(STDIN, &[0x04])
                    } else {
                        vec![STDIN]
                    };
                    let _ = input.send(Message::Binary(end.into())).await;
                    break;
                }
                Ok(n) => {
                    if input
                        .send(Message::Binary(frame(STDIN, &buf[..n]).into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    if tty {
        let resize = to_ws.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                let (cols, rows) = terminal_size();
                let c = ExecControl::Resize { cols, rows };
                if let Ok(text) = serde_json::to_string(&c) {
                    if resize.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    drop(to_ws);
    loop {
        tokio::select! {
            Some(m) = from_local.recv() => {
                if tx.send(m).await.is_err() {
                    bail!("the host closed the session");
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => match b.split_first() {
                    Some((&STDOUT, data)) => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(data)?;
                        out.flush()?;
                    }
                    Some((&STDERR, data)) => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(data)?;
                        err.flush()?;
                    }
                    _ => {}
                },
                Some(Ok(Message::Text(t))) => {
                    let end: ExecEnd = serde_json::from_str(t.as_str())
                        .context("the runner sent an unknown message")?;
                    match (end.exit_code, end.error) {
                        (Some(code), _) => return Ok(code),
                        (None, Some(e)) => bail!("{e}"),
                        (None, None) => bail!("the command ended without an exit status"),
                    }
                }
                Some(Ok(Message::Close(_))) | None => bail!("the session ended before the command did"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("the session broke: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_shell_prefers_bash_and_a_given_shell_wins() {
        let s = login_shell(None);
        assert_eq!(s[0], "/bin/sh");
        assert!(s[2].contains("exec bash -l") && s[2].contains("exec sh -l"));
        assert_eq!(login_shell(Some("/bin/zsh")), ["/bin/zsh"]);
    }
}
