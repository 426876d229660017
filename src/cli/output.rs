//! Plain-text tables and human-readable sizes and ages for `-o table`, and
//! writing to stdout without panicking when the reader went away.

use std::io::Write;

/// Writes `text` to stdout. A closed pipe (`rivernode node list | head`) ends
/// the process quietly instead of panicking as `print!` would.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Pretty JSON followed by a newline.
pub fn emit_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => emit(&format!("{s}\n")),
        Err(e) => {
            eprintln!("error: cannot encode JSON: {e}");
            std::process::exit(1);
        }
    }
}

/// Left-aligned columns separated by two spaces, header first.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// "3s ago", "5m ago", "2h ago", "4d ago".
pub fn ago(then_ms: i64, now_ms: i64) -> String {
    format!("{} ago", span(now_ms - then_ms, false))
}

/// "in 3s", "in 7d": how long until `then_ms`, rounded up (a code made to
/// last 2d says "in 2d" a moment later, not "in 1d").
pub fn until(then_ms: i64, now_ms: i64) -> String {
    format!("in {}", span(then_ms - now_ms, true))
}

/// A duration in its largest unit: "3s", "5m", "2h", "4d"; whole units
/// rounded down, or `up`.
fn span(ms: i64, up: bool) -> String {
    let s = ms.max(0) / 1000;
    let (unit, name) = match s {
        0..=59 => (1, "s"),
        60..=3599 => (60, "m"),
        3600..=86399 => (3600, "h"),
        _ => (86400, "d"),
    };
    let n = if up { (s + unit - 1) / unit } else { s / unit };
    format!("{n}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(ago(0, 4_500), "4s ago");
        assert_eq!(ago(0, 7_200_000), "2h ago");
        assert_eq!(ago(10, 0), "0s ago");
        // A deadline is rounded up: 2 days less a second is "in 2d".
        assert_eq!(until(172_799_000, 0), "in 2d");
        assert_eq!(ago(0, 172_799_000), "1d ago");
        assert_eq!(until(7 * 86_400_000, 0), "in 7d");
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
