//! The guest side: small workloads (`helper` mode of this binary) that test
//! bodies start inside a cgroup, and the plumbing to start them there.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use rivernode::cgroup::Cgroup;

use crate::harness::GUEST_BINARY;

/// A helper process, moved into a cgroup before it does anything.
pub struct Helper {
    pub child: Child,
    out: BufReader<ChildStdout>,
}

impl Helper {
    /// Starts `kernel helper ARGS`, moves it into `cg`, then lets it run: the
    /// helper waits for a line on stdin first, so all its work is charged to `cg`.
    pub fn start_in(cg: &Cgroup, args: &[&str]) -> Helper {
        let mut child = Command::new(GUEST_BINARY)
            .arg("helper")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start helper");
        cg.add_process(child.id())
            .expect("move helper into the cgroup");
        let stdin = child.stdin.as_mut().expect("helper stdin");
        stdin.write_all(b"go\n").expect("start helper");
        stdin.flush().unwrap();
        let out = BufReader::new(child.stdout.take().expect("helper stdout"));
        Helper { child, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The helper's next line of output ("" at end of file).
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read helper output");
        l.trim().to_string()
    }

    /// Waits for exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "helper {} did not exit",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_for_go() {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("read go");
}

/// Blocks until stdin is closed (the parent ends the helper by killing it).
fn park() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn say(s: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").unwrap();
    out.flush().unwrap();
}

/// `kernel helper MODE ARGS`, run inside the guest.
pub fn helper(args: &[String]) -> ! {
    wait_for_go();
    let arg = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("numeric helper argument")
    };
    match args.first().map(String::as_str) {
        // Allocate and touch MiB of memory, then hold it.
        Some("alloc") => {
            let mut held: Vec<Vec<u8>> = Vec::new();
            for _ in 0..arg(1) {
                let mut chunk = vec![0u8; 1 << 20];
                for b in chunk.iter_mut().step_by(4096) {
                    *b = 1;
                }
                held.push(chunk);
            }
            say("allocated");
            park();
            drop(held);
        }
        // Busy loop for SECONDS of wall time.
        Some("spin") => {
            let end = Instant::now() + Duration::from_secs(arg(1));
            let mut n: u64 = 0;
            while Instant::now() < end {
                n = n.wrapping_add(1);
                std::hint::black_box(n);
            }
            say("spun");
        }
        // Try to start N sleeping children; report how many the kernel allowed.
        Some("spawn") => {
            let mut kids = Vec::new();
            let mut refused = 0;
            for _ in 0..arg(1) {
                match Command::new("/bin/sleep").arg("60").spawn() {
                    Ok(c) => kids.push(c),
                    Err(_) => refused += 1,
                }
            }
            say(&format!("spawned {} refused {refused}", kids.len()));
            for mut k in kids {
                let _ = k.kill();
                let _ = k.wait();
            }
        }
        // Count upwards, publishing the count every 10 ms in FILE.
        Some("count") => {
            let path = args.get(1).expect("count FILE").clone();
            let mut n: u64 = 0;
            loop {
                n += 1;
                std::fs::write(&path, n.to_string()).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Some("park") => park(),
        other => panic!("unknown helper mode {other:?}"),
    }
    std::process::exit(0)
}
