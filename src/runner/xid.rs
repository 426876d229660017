//! NVIDIA Xid errors (the driver's reports of a GPU fault: 79 "fallen off
//! the bus", 48 a double-bit ECC error, 31 a page fault...), counted per
//! GPU from the kernel log (`/dev/kmsg`, the `kmsg_path` setting), where
//! the driver writes `NVRM: Xid (PCI:0000:3b:00): 79, ...`. Reading
//! /dev/kmsg from its start counts every Xid since the node booted, which
//! is what a counter should say.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Xids seen, by the PCI device the driver names (`0000:3b:00`, no function).
pub type XidCounts = Arc<Mutex<BTreeMap<String, u64>>>;

/// The device (`domain:bus:device`, lower case) and Xid of a kernel log
/// record, if it is an NVIDIA Xid report.
pub fn parse(record: &str) -> Option<(String, u32)> {
    // A /dev/kmsg record is `prio,seq,time,flags;message`; a file's line may be the message alone.
    let message = record.split_once(';').map_or(record, |(_, m)| m);
    let rest = message.split("NVRM: Xid (PCI:").nth(1)?;
    let (device, rest) = rest.split_once(')')?;
    let code = rest.trim_start_matches(':').trim_start();
    let code: u32 = code
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((device.trim().to_ascii_lowercase(), code))
}

/// Whether the device the driver names is the GPU at `address` (`0000:3b:00.0`).
pub fn names(device: &str, address: &str) -> bool {
    address
        .rsplit_once('.')
        .is_some_and(|(dev, _)| dev.eq_ignore_ascii_case(device))
}

/// Counts Xids from `path` into `counts`, on a thread of its own, for the
/// runner's life. A log that cannot be opened (no /dev/kmsg, not root) is
/// said once and counts nothing.
pub fn watch(path: PathBuf, counts: XidCounts) {
    let spawned = std::thread::Builder::new()
        .name("xid-watch".into())
        .spawn(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "no kernel log to count GPU Xid errors from");
                    return;
                }
            };
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    // A plain file at its end (tests): look again later.
                    // /dev/kmsg blocks for the next record instead.
                    Ok(0) => std::thread::sleep(Duration::from_millis(200)),
                    Ok(_) => {
                        if let Some((device, code)) = parse(&line) {
                            tracing::warn!(device, xid = code, "NVIDIA Xid error");
                            *counts
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(device)
                                .or_default() += 1;
                        }
                    }
                    // EPIPE: records were overwritten before we read them; go on.
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EPIPE as i32) => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "reading the kernel log failed; Xid errors are no longer counted");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the Xid watch");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xid_reports_are_read_from_kernel_log_records() {
        assert_eq!(
            parse("4,1234,5678901,-;NVRM: Xid (PCI:0000:3B:00): 79, pid=0, name=, GPU has fallen off the bus.\n"),
            Some(("0000:3b:00".into(), 79))
        );
        assert_eq!(
            parse("NVRM: Xid (PCI:0000:17:00): 48, pid=1, DBE (double bit error) ECC"),
            Some(("0000:17:00".into(), 48))
        );
        assert_eq!(
            parse("6,1,2,-;NVRM: loading NVIDIA UNIX x86_64 Kernel Module"),
            None
        );
        assert_eq!(parse("6,1,2,-;usb 1-1: new device"), None);
        assert!(names("0000:3b:00", "0000:3b:00.0"));
        assert!(!names("0000:3b:00", "0000:3c:00.0"));
    }
}
