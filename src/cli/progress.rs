//! Progress in the CLI: a bar (indicatif) when stderr is a terminal, plain
//! lines otherwise (logs, CI, pipes): one when a phase starts and one at
//! each quarter of it, so a log says how it went without a line per chunk.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::api::TaskProgress;
use crate::cli::output::bytes;

/// Where progress goes: a bar on a terminal, plain lines on stderr otherwise.
pub struct Meter {
    bar: Option<ProgressBar>,
    /// The phase and quarter the last plain line spoke of.
    said: Option<(String, u8)>,
}

impl Meter {
    pub fn new() -> Meter {
        Meter {
            bar: std::io::stderr().is_terminal().then(|| {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            }),
            said: None,
        }
    }

    /// Shows `p`: moves the bar, or prints a line when it says something new.
    pub fn show(&mut self, p: &TaskProgress) {
        match &self.bar {
            Some(b) => {
                b.set_message(format!("{} {}", p.phase, p.what));
                b.set_length(p.total_bytes);
                b.set_position(p.done_bytes);
            }
            None => {
                if let Some((line, now)) = plain_line(self.said.as_ref(), p) {
                    eprintln!("{line}");
                    self.said = Some(now);
                }
            }
        }
    }

    /// Prints a line on stderr, above the bar when there is one.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Ends the bar (it leaves no line behind); plain output needs nothing.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The line to print for `p` after one about `said` (its phase and
/// quarter), if it says something new: a new phase, or a further quarter.
pub fn plain_line(said: Option<&(String, u8)>, p: &TaskProgress) -> Option<(String, (String, u8))> {
    // u128: the numbers come from a node, and must not overflow here.
    let (done, total) = (
        p.done_bytes.min(p.total_bytes) as u128,
        p.total_bytes as u128,
    );
    let quarter = (done * 4).checked_div(total).map_or(4, |q| q as u8);
    let new = match said {
        Some((phase, q)) => *phase != p.phase || quarter > *q,
        None => true,
    };
    new.then(|| {
        (
            format!(
                "{} {}: {} of {} ({}%)",
                p.phase,
                p.what,
                bytes(p.done_bytes),
                bytes(p.total_bytes),
                (done * 100).checked_div(total).unwrap_or(100)
            ),
            (p.phase.clone(), quarter),
        )
    })
}

/// A spinner with the time taken, for work whose size is not known (a
/// snapshot being committed); a plain line without a terminal.
pub fn spinner(message: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        eprintln!("{message} ...");
        return None;
    }
    let s = ProgressBar::new_spinner();
    s.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    s.set_message(message.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    Some(s)
}

/// Copies `from` to a new file `to` (never one that exists: a link planted
/// there is not followed) with mode `mode`, with a byte bar (or quarter
/// lines), as `env import` and `vm image import` do; the SHA-256 of what
/// was written, in hex.
pub fn copy_file(
    from: &std::path::Path,
    to: &std::path::Path,
    what: &str,
    mode: u32,
) -> std::io::Result<String> {
    let mut meter = Meter::new();
    let mut p = TaskProgress {
        phase: "copying".into(),
        what: what.into(),
        done_bytes: 0,
        total_bytes: 0,
    };
    let sha256 = crate::files::copy_hashed(from, to, mode, |done, total| {
        p.done_bytes = done;
        p.total_bytes = total;
        meter.show(&p);
    })?;
    meter.finish();
    Ok(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(phase: &str, done: u64, total: u64) -> TaskProgress {
        TaskProgress {
            phase: phase.into(),
            what: "r:1".into(),
            done_bytes: done,
            total_bytes: total,
        }
    }

    #[test]
    fn plain_lines_come_at_a_new_phase_and_each_further_quarter() {
        let mut said = None;
        let mut lines = Vec::new();
        for step in [
            p("pulling", 0, 4096),
            p("pulling", 100, 4096),
            p("pulling", 1024, 4096),
            p("pulling", 1500, 4096),
            p("pulling", 4096, 4096),
            p("unpacking", 0, 4096),
            p("unpacking", 4096, 4096),
        ] {
            if let Some((line, now)) = plain_line(said.as_ref(), &step) {
                lines.push(line);
                said = Some(now);
            }
        }
        assert_eq!(
            lines,
            [
                "pulling r:1: 0 B of 4.0 KiB (0%)",
                "pulling r:1: 1.0 KiB of 4.0 KiB (25%)",
                "pulling r:1: 4.0 KiB of 4.0 KiB (100%)",
                "unpacking r:1: 0 B of 4.0 KiB (0%)",
                "unpacking r:1: 4.0 KiB of 4.0 KiB (100%)",
            ]
        );
        // Nothing known to do: done at once, and said once.
        let (line, now) = plain_line(None, &p("pulling", 0, 0)).unwrap();
        assert_eq!(line, "pulling r:1: 0 B of 0 B (100%)");
        assert!(plain_line(Some(&now), &p("pulling", 0, 0)).is_none());
    }
}
