//! Kernel tests: each test boots the installed Debian kernel in QEMU with
//! this binary as its workload and runs one test body inside the guest, on a
//! real kernel with cgroup v2 (and later VFIO, NUMA, netlink). See README.md.
//!
//! This binary has its own `main` (harness = false) because it plays three
//! parts: on the host it boots guests (`kernel [FILTER]`); in a guest it runs
//! one test body (`kernel guest NAME`) and small workloads the bodies start
//! (`kernel helper ...`).

mod cgroup;
mod guest;
mod harness;
mod kvm;
mod vfio;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use harness::{build_initramfs, run_guest, Kit, VmSpec};

pub struct KernelTest {
    pub name: &'static str,
    pub vm: fn() -> VmSpec,
    /// The body, run inside the guest; a panic fails the test.
    pub body: fn(),
    pub expect: Expect,
}

/// What the harness must see. `Fail` and `Hang` exist to prove that the
/// harness reports broken guests instead of passing them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Pass,
    Fail,
    Hang,
}

fn all_tests() -> Vec<KernelTest> {
    let mut t = harness_self_tests();
    t.extend(cgroup::tests());
    t.extend(vfio::tests());
    t.extend(kvm::tests());
    t
}

fn harness_self_tests() -> Vec<KernelTest> {
    vec![
        KernelTest {
            name: "harness_reports_a_failing_guest",
            vm: VmSpec::default,
            body: || panic!("this guest test fails on purpose"),
            expect: Expect::Fail,
        },
        KernelTest {
            name: "harness_kills_a_hanging_guest",
            vm: || VmSpec {
                timeout: std::time::Duration::from_secs(20),
                ..VmSpec::default()
            },
            body: || loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            expect: Expect::Hang,
        },
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("guest") => {
            let name = args.get(2).map(String::as_str).unwrap_or_default();
            match all_tests().into_iter().find(|t| t.name == name) {
                Some(t) => {
                    (t.body)();
                    println!("guest test {name} passed");
                }
                None => {
                    eprintln!("no kernel test named {name:?}");
                    std::process::exit(2);
                }
            }
        }
        Some("helper") => guest::helper(&args[2..]),
        _ => std::process::exit(host_main(&args[1..])),
    }
}

fn host_main(args: &[String]) -> i32 {
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let tests: Vec<KernelTest> = all_tests()
        .into_iter()
        .filter(|t| filter.as_deref().is_none_or(|f| t.name.contains(f)))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for t in &tests {
            println!("{}: test", t.name);
        }
        return 0;
    }
    let required = std::env::var("RIVERNODE_REQUIRE_REAL").as_deref() == Ok("1");
    let kit = match Kit::find() {
        Ok(k) => k,
        Err(missing) if required => {
            eprintln!("kernel tests cannot run: {missing} (RIVERNODE_REQUIRE_REAL=1); scripts/setup.sh --test installs it");
            println!("0 passed, {} failed", tests.len());
            return 1;
        }
        Err(missing) => {
            eprintln!("SKIPPED: {} kernel tests: {missing}; set RIVERNODE_REQUIRE_REAL=1 to make this a failure", tests.len());
            println!("0 passed, 0 failed, {} skipped", tests.len());
            return 0;
        }
    };
    println!("kernel tests: {} on {}", tests.len(), kit.kernel.display());
    let work = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kernel-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("cannot create {}: {e}", work.display());
        return 1;
    }

    // One initramfs per distinct module set.
    let mut images: BTreeMap<Vec<&str>, std::path::PathBuf> = BTreeMap::new();
    for t in &tests {
        let mut mods = (t.vm)().modules;
        mods.sort_unstable();
        if images.contains_key(&mods) {
            continue;
        }
        let path = work.join(format!("initramfs-{}.cpio", images.len()));
        if let Err(e) = build_initramfs(&kit, &mods, &path) {
            eprintln!("cannot build the initramfs: {e}");
            println!("0 passed, {} failed", tests.len());
            return 1;
        }
        images.insert(mods, path);
    }

    let jobs: usize = std::env::var("RIVERNODE_KERNEL_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(2)
        .max(1);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(tests.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(t) = tests.get(i) else { break };
                let spec = (t.vm)();
                let mut mods = spec.modules.clone();
                mods.sort_unstable();
                let v = run_guest(&kit, &spec, &images[&mods], t.name, &work);
                let started = v.console.contains(&format!("RIVERNODE-START {}", t.name));
                let as_expected = match t.expect {
                    Expect::Pass => v.passed,
                    Expect::Fail => !v.passed && started && v.reason.contains("exited with 101"),
                    Expect::Hang => !v.passed && started && v.reason.contains("hung"),
                };
                if as_expected {
                    let note = if t.expect == Expect::Pass {
                        String::new()
                    } else {
                        format!(", {}", v.reason)
                    };
                    println!(
                        "test kernel::{} ... ok ({:.1}s{note})",
                        t.name,
                        v.elapsed.as_secs_f64()
                    );
                } else {
                    println!(
                        "test kernel::{} ... FAILED ({:.1}s): {}\n--- console tail ---\n{}\n---",
                        t.name,
                        v.elapsed.as_secs_f64(),
                        v.reason,
                        v.console_tail(40)
                    );
                    failures.lock().unwrap().push(t.name);
                }
            });
        }
    });
    let failed = failures.into_inner().unwrap();
    if std::env::var_os("RIVERNODE_KERNEL_KEEP").is_some() {
        println!("kept consoles and images in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    println!();
    if !failed.is_empty() {
        println!("failed kernel tests: {}", failed.join(", "));
    }
    println!(
        "{} passed, {} failed",
        tests.len() - failed.len(),
        failed.len()
    );
    i32::from(!failed.is_empty())
}
