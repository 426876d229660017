//! The exec protocol of `terminal exec`, `terminal attach` and `connect`,
//! one websocket from the CLI through the host to the runner (the host
//! relays frames unchanged). The client's first frame is an `ExecStart`
//! (text, JSON). Then binary frames carry a stream: the first byte names it
//! (`STDIN` from the client; `STDOUT`, `STDERR` from the instance), the
//! rest is data, and a lone `STDIN` byte is the end of the input. Text
//! frames from the client are `ExecControl`; the server's last frame is an
//! `ExecEnd` (text), then it closes.

use serde::{Deserialize, Serialize};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    pub command: Vec<String>,
    /// A pseudo-terminal: raw keys in, one output stream out.
    #[serde(default)]
    pub tty: bool,
    #[serde(default = "cols")]
    pub cols: u16,
    #[serde(default = "rows")]
    pub rows: u16,
}

fn cols() -> u16 {
    80
}

fn rows() -> u16 {
    24
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecControl {
    /// The terminal's new size.
    Resize { cols: u16, rows: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnd {
    /// The command's exit status (128 + signal when a signal ended it).
    pub exit_code: Option<i32>,
    /// Why there is none: the command could not start, the instance is not running.
    #[serde(default)]
    pub error: Option<String>,
}

impl ExecStart {
    /// A refusal the caller can act on, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("command: empty; give the command after --".into());
        }
        if self.tty && (self.cols == 0 || self.rows == 0) {
            return Err("cols, rows: a terminal is at least 1x1".into());
        }
        Ok(())
    }
}

/// The websocket URL of `path` under an HTTP base URL (`http` -> `ws`,
/// `https` -> `wss`).
pub fn ws_url(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    match base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}{path}"),
        Some((_, rest)) => format!("ws://{rest}{path}"),
        None => format!("ws://{base}{path}"),
    }
}

/// A binary frame of `stream` with `data`.
pub fn frame(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 1);
    f.push(stream);
    f.extend_from_slice(data);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_checked_and_frames_name_their_stream() {
        let s: ExecStart = serde_json::from_str(r#"{"command":["ps","aux"]}"#).unwrap();
        assert_eq!((s.tty, s.cols, s.rows), (false, 80, 24));
        assert!(s.check().is_ok());
        let empty = ExecStart {
            command: vec![],
            ..s.clone()
        };
        assert!(empty.check().unwrap_err().contains("command"));
        assert!(serde_json::from_str::<ExecStart>(r#"{"command":["x"],"bogus":1}"#).is_err());
        assert_eq!(frame(STDOUT, b"hi"), [1, b'h', b'i']);
        assert_eq!(
            ws_url("http://10.0.0.2:8001/", "/api/t"),
            "ws://10.0.0.2:8001/api/t"
        );
        assert_eq!(ws_url("https://n1.lab", "/x"), "wss://n1.lab/x");
        let c: ExecControl = serde_json::from_str(r#"{"resize":{"cols":100,"rows":40}}"#).unwrap();
        assert_eq!(
            c,
            ExecControl::Resize {
                cols: 100,
                rows: 40
            }
        );
    }
}
