//! `rivernode cgroup list|show`: node-local view of rivernode's cgroups with
//! their limits and usage, read straight from cgroupfs.

use serde::Serialize;

use crate::cgroup::{CgroupError, CgroupFs, Limits, Max, Stats, Subtree};
use crate::cli::args::{CgroupCommand, Output};
use crate::cli::output::{bytes, emit, emit_json, table};

#[derive(Debug, Serialize)]
pub struct CgroupReport {
    pub name: String,
    pub path: String,
    pub populated: bool,
    pub frozen: bool,
    pub processes: usize,
    pub limits: Limits,
    pub stats: Stats,
}

fn report(cg: &crate::cgroup::Cgroup) -> Result<CgroupReport, CgroupError> {
    let (populated, frozen) = cg.state()?;
    Ok(CgroupReport {
        name: cg.name().to_string(),
        path: cg.path().display().to_string(),
        populated,
        frozen,
        processes: cg.processes()?.len(),
        limits: cg.limits()?,
        stats: cg.stats()?,
    })
}

/// Reports for every cgroup below the subtree (none if the subtree does not exist yet).
pub fn reports(fs: &CgroupFs, subtree: &str) -> Result<Vec<CgroupReport>, CgroupError> {
    let st: Subtree = match fs.existing_subtree(subtree) {
        Ok(st) => st,
        Err(CgroupError::NoSuchCgroup(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    st.list()?.iter().map(report).collect()
}

fn max_bytes(m: Option<Max<u64>>) -> String {
    match m {
        None => "-".into(),
        Some(Max::Max) => "max".into(),
        Some(Max::Value(v)) => bytes(v),
    }
}

pub fn list_table(reports: &[CgroupReport]) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.processes.to_string(),
                if r.frozen {
                    "frozen"
                } else if r.populated {
                    "running"
                } else {
                    "empty"
                }
                .into(),
                r.limits
                    .cpuset_cpus
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or("-".into()),
                r.limits
                    .cpu_max
                    .map(|c| c.to_string())
                    .unwrap_or("-".into()),
                max_bytes(r.limits.memory_max),
                r.stats.memory_current.map(bytes).unwrap_or("-".into()),
                r.limits
                    .pids_max
                    .map(|p| p.to_string())
                    .unwrap_or("-".into()),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "PROCS", "STATE", "CPUSET", "CPU.MAX", "MEM.MAX", "MEM.NOW", "PIDS.MAX",
        ],
        &rows,
    )
}

pub fn show_text(r: &CgroupReport) -> String {
    let l = &r.limits;
    let s = &r.stats;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let fields = [
        ("Name", r.name.clone()),
        ("Path", r.path.clone()),
        ("Processes", r.processes.to_string()),
        ("Frozen", r.frozen.to_string()),
        (
            "cpuset.cpus",
            opt(l.cpuset_cpus.as_ref().map(|c| c.to_string())),
        ),
        (
            "cpuset.mems",
            opt(l.cpuset_mems.as_ref().map(|c| c.to_string())),
        ),
        ("cpu.max", opt(l.cpu_max.map(|c| c.to_string()))),
        ("cpu.weight", opt(l.cpu_weight.map(|c| c.to_string()))),
        ("memory.max", max_bytes(l.memory_max)),
        ("memory.high", max_bytes(l.memory_high)),
        ("memory.swap", max_bytes(l.memory_swap_max)),
        ("pids.max", opt(l.pids_max.map(|p| p.to_string()))),
        ("memory now", opt(s.memory_current.map(bytes))),
        ("memory peak", opt(s.memory_peak.map(bytes))),
        (
            "oom kills",
            opt(s.memory_events.get("oom_kill").map(|v| v.to_string())),
        ),
        (
            "cpu usage",
            opt(s
                .cpu
                .get("usage_usec")
                .map(|v| format!("{:.2}s", *v as f64 / 1e6))),
        ),
        (
            "throttled",
            opt(s.cpu.get("nr_throttled").map(|v| format!("{v} periods"))),
        ),
        ("pids now", opt(s.pids_current.map(|v| v.to_string()))),
    ];
    let mut out: String = fields
        .iter()
        .map(|(k, v)| format!("{:<13}{v}\n", format!("{k}:")))
        .collect();
    for line in &l.io_max {
        out.push_str(&format!("{:<13}{line}\n", "io.max:"));
    }
    out
}

pub fn run(cmd: CgroupCommand, output: Output) -> anyhow::Result<()> {
    let (opts, name) = match cmd {
        CgroupCommand::List(o) => (o, None),
        CgroupCommand::Show { opts, name } => (opts, Some(name)),
    };
    let fs = CgroupFs::new(&opts.cgroup_root, &opts.mountinfo);
    match name {
        None => {
            let all = reports(&fs, &opts.subtree)?;
            match output {
                Output::Json => emit_json(&all),
                Output::Table => emit(&list_table(&all)),
            }
        }
        Some(name) => {
            let cg = fs.existing_subtree(&opts.subtree)?.open(&name)?;
            let r = report(&cg)?;
            match output {
                Output::Json => emit_json(&r),
                Output::Table => emit(&show_text(&r)),
            }
        }
    }
    Ok(())
}
