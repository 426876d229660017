//! Tasks and the ledger in SQLite. A task's reservation is its placement,
//! held while the task is in any non-final state (queued tasks hold none;
//! paused and lost ones keep theirs). Placement runs inside one transaction
//! with the reservations it reads, so nothing is checked-then-inserted.

use std::collections::{BTreeSet, HashMap};

use rusqlite::{params, Connection, Transaction};

use super::{node_from_row, to_json, StoreError, NODE_COLUMNS};
use crate::api::ports::{self, PortRange, PortRequest, Published};
use crate::api::{
    Assignment, Assignments, Desired, NodeView, Placement, Restore, TaskReport, TaskSpec,
    TaskState, TaskView,
};
use crate::api::{QuotaCaps, QuotaScope, QuotaUse, QuotaView};
use crate::host::idle::{IdleMark, IdlePolicy, IdleStep};
use crate::host::quota;
use crate::host::scheduler::{self, Decision};
use crate::topology::nvml::GpuSample;

const COLUMNS: &str = "id, spec, state, desired, placement, reason, exit_code, message, submitted_at_ms, started_at_ms, finished_at_ms, ssh_host_key, owner, notice, idle_exempt, parked";

fn desired_str(d: Desired) -> &'static str {
    match d {
        Desired::Running => "running",
        Desired::Paused => "paused",
        Desired::Stopped => "stopped",
        Desired::Restarting => "restarting",
        Desired::Killed => "killed",
        Desired::Deleted => "deleted",
    }
}

/// The ends, as SQL: such a task runs nothing and reserves nothing.
pub(super) const ENDED: &str =
    "('completed', 'failed', 'killed', 'killed_oom', 'deleted', 'rejected')";

fn json_err(what: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |source| StoreError::Json { what, source }
}

type Raw = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    Option<i32>,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    Option<String>,
);

fn row_to_task(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
        r.get(15)?,
    ))
}

fn decode(raw: Raw) -> Result<TaskView, StoreError> {
    let (
        id,
        spec,
        state,
        desired,
        placement,
        reason,
        exit_code,
        message,
        submitted,
        started,
        finished,
        ssh_host_key,
        owner,
        notice,
        idle_exempt,
        parked,
    ) = raw;
    let parse_state = |s: &str| {
        s.parse::<TaskState>().map_err(|e| StoreError::Json {
            what: "tasks.state",
            source: serde::de::Error::custom(e),
        })
    };
    Ok(TaskView {
        id: id as u64,
        state: parse_state(&state)?,
        desired: serde_json::from_value(serde_json::Value::String(desired))
            .map_err(json_err("tasks.desired"))?,
        spec: serde_json::from_str(&spec).map_err(json_err("tasks.spec"))?,
        placement: placement
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(json_err("tasks.placement"))?,
        reason,
        exit_code,
        message,
        submitted_at_unix_ms: submitted,
        started_at_unix_ms: started,
        finished_at_unix_ms: finished,
        ssh_host_key,
        owner,
        progress: None,
        notice,
        idle_exempt,
        parked,
    })
}

fn query(
    c: &Connection,
    where_clause: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<TaskView>, StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT {COLUMNS} FROM tasks {where_clause} ORDER BY id"
    ))?;
    let raws = stmt
        .query_map(args, row_to_task)?
        .collect::<Result<Vec<_>, _>>()?;
    raws.into_iter().map(decode).collect()
}

pub(super) fn bump(tx: &Transaction<'_>) -> Result<u64, StoreError> {
    Ok(tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
        [],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

pub(super) fn revision(c: &Connection) -> Result<u64, StoreError> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
            r.get::<_, i64>(0)
        })? as u64,
    )
}

pub(super) fn nodes(c: &Connection) -> Result<Vec<NodeView>, StoreError> {
    let mut stmt = c.prepare(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"))?;
    let rows = stmt.query_map([], node_from_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r??);
    }
    Ok(out)
}

fn reservations(c: &Connection) -> Result<Vec<Placement>, StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT placement FROM tasks WHERE placement IS NOT NULL
         AND state NOT IN ('pending', 'stopped') AND state NOT IN {ENDED}"
    ))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(serde_json::from_str(&r?).map_err(json_err("tasks.placement"))?);
    }
    Ok(out)
}

/// Who holds each node's GPUs: the instances whose placement reserves them.
pub(super) fn fill_gpu_holders(c: &Connection, nodes: &mut [NodeView]) -> Result<(), StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT id, placement FROM tasks WHERE placement IS NOT NULL
         AND state NOT IN ('pending', 'stopped') AND state NOT IN {ENDED}"
    ))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    for r in rows {
        let (id, placement) = r?;
        let p: Placement = serde_json::from_str(&placement).map_err(json_err("tasks.placement"))?;
        if let Some(n) = nodes.iter_mut().find(|n| n.name == p.node) {
            for g in p.gpus {
                n.gpu_holders.insert(g, id as u64);
            }
        }
    }
    Ok(())
}

/// The ports `user`'s tasks publish or hold.
fn published_of(c: &Connection, user: &str) -> Result<usize, StoreError> {
    let mut stmt = c.prepare(
        "SELECT spec, state FROM tasks WHERE owner = ?1 AND state != 'deleted' AND spec LIKE '%\"ports\"%'",
    )?;
    let rows = stmt.query_map([user], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut n = 0;
    for r in rows {
        let (spec, state) = r?;
        let spec: TaskSpec = serde_json::from_str(&spec).map_err(json_err("tasks.spec"))?;
        if state
            .parse::<TaskState>()
            .is_ok_and(|st| holds_ports(&spec, st))
        {
            n += spec.ports.len();
        }
    }
    Ok(n)
}

/// What a submission must respect.
pub(super) struct SubmitRules {
    /// Tasks one user may have waiting (to be placed or approved).
    pub max_waiting: u32,
    /// Published ports one user's tasks may hold.
    pub published_cap: usize,
    /// It waits for an operator's approval.
    pub needs_approval: bool,
}

pub(super) fn submit(
    c: &mut Connection,
    spec: &TaskSpec,
    owner: Option<&str>,
    rules: SubmitRules,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let tx = c.transaction()?;
    scheduler::validate(spec, &nodes(&tx)?).map_err(StoreError::Refused)?;
    if let (Some(user), false) = (owner, spec.ports.is_empty()) {
        // External ports are the cluster's, held until a VPS is deleted:
        // one user must not take them all.
        let held = published_of(&tx, user)?;
        if held + spec.ports.len() > rules.published_cap {
            return Err(StoreError::TooMany(format!(
                "{user}'s VPS hold {held} published ports and this asks for {} more; \
                 max_published_ports_per_user allows {}: delete a VPS that publishes some",
                spec.ports.len(),
                rules.published_cap
            )));
        }
    }
    if let Some(user) = owner {
        quota_book(&tx, now_ms)?
            .could_ever_fit(user, &asked_use(spec))
            .map_err(StoreError::Refused)?;
    }
    if let Some(user) = owner {
        // Every pending task is looked at on each scheduling pass, and every
        // request waiting for approval by an operator: one user's flood must
        // not slow everyone's heartbeats and calls, nor bury the others'.
        let waiting: u32 = tx.query_row(
            "SELECT COUNT(*) FROM tasks WHERE owner = ?1 AND state IN ('pending', 'pending_approval')
             AND desired NOT IN ('killed', 'deleted')",
            [user],
            |r| r.get(0),
        )?;
        if waiting >= rules.max_waiting {
            return Err(StoreError::TooMany(format!(
                "{user} has {waiting} tasks waiting for resources or approval, the most max_waiting_per_user allows; \
                 kill some (`rivernode task list --state pending`, `--state pending_approval`) or wait for them to start"
            )));
        }
    }
    let (state, reason) = if rules.needs_approval {
        (
            "pending_approval",
            "waits for an operator's approval (`rivernode approve ID`)",
        )
    } else {
        ("pending", "queued")
    };
    let id: i64 = tx.query_row(
        "INSERT INTO tasks (spec, state, desired, reason, submitted_at_ms, owner)
         VALUES (?1, ?2, 'running', ?3, ?4, ?5) RETURNING id",
        params![to_json("spec", spec)?, state, reason, now_ms, owner],
        |r| r.get(0),
    )?;
    bump(&tx)?;
    tx.commit()?;
    Ok(id as u64)
}

/// An operator's decision on a task waiting for approval: `None` approves
/// it (queued, to be placed), `Some(reason)` rejects it (ended, never ran).
pub(super) fn decide(
    c: &mut Connection,
    id: u64,
    by: &str,
    rejection: Option<&str>,
    now_ms: i64,
) -> Result<TaskView, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    if t.state != TaskState::PendingApproval {
        return Err(StoreError::Conflict(format!(
            "task {id} is {}: only a task waiting for approval is approved or rejected",
            t.state
        )));
    }
    match rejection {
        None => tx.execute(
            "UPDATE tasks SET state = 'pending', reason = ?2 WHERE id = ?1",
            params![id as i64, format!("queued (approved by {by})")],
        )?,
        Some(reason) => tx.execute(
            "UPDATE tasks SET state = 'rejected', desired = 'killed', reason = 'rejected',
             message = ?2, finished_at_ms = ?3 WHERE id = ?1",
            params![id as i64, format!("rejected by {by}: {reason}"), now_ms],
        )?,
    };
    bump(&tx)?;
    let t = one(&tx, id)?;
    tx.commit()?;
    Ok(t)
}

/// Whether a task holds its published ports: a VPS from its placement
/// until it is deleted (a stopped VPS keeps its addresses, and its
/// container the `VAST_*_PORT_*` made with them), a command until it ends.
fn holds_ports(spec: &TaskSpec, state: TaskState) -> bool {
    state != TaskState::Deleted && (spec.kind == crate::api::Kind::Vps || !state.is_final())
}

/// The external ports each task holds.
fn published_held(c: &Connection) -> Result<Vec<(u64, Vec<Published>)>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT id, placement, spec, state FROM tasks WHERE placement IS NOT NULL
         AND state != 'deleted' AND placement LIKE '%\"published\"%'",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (id, placement, spec, state) = r?;
        let spec: TaskSpec = serde_json::from_str(&spec).map_err(json_err("tasks.spec"))?;
        let state = state.parse::<TaskState>().map_err(|e| StoreError::Json {
            what: "tasks.state",
            source: serde::de::Error::custom(e),
        })?;
        if holds_ports(&spec, state) {
            let p: Placement =
                serde_json::from_str(&placement).map_err(json_err("tasks.placement"))?;
            out.push((id as u64, p.published));
        }
    }
    Ok(out)
}

/// The quotas, who is in which group, and what each user and group holds.
struct QuotaBook {
    caps: HashMap<(QuotaScope, String), QuotaCaps>,
    group_of: HashMap<String, String>,
    used: HashMap<(QuotaScope, String), QuotaUse>,
}

/// What a placed task holds against its owner's quotas (a task on shared
/// cores, `-c 0`, counts one, as the scheduler does).
fn placed_use(spec: &TaskSpec, p: &Placement) -> QuotaUse {
    quota::held_by(
        spec.kind == crate::api::Kind::Vps,
        u64::from(spec.cores.max(1)),
        p.gpus.len() as u64,
        p.memory_bytes,
    )
}

/// What a request asks, before it is placed.
fn asked_use(spec: &TaskSpec) -> QuotaUse {
    quota::held_by(
        spec.kind == crate::api::Kind::Vps,
        u64::from(spec.cores.max(1)),
        u64::from(scheduler::gpus_asked(spec)),
        spec.memory_bytes.unwrap_or(0),
    )
}

/// The tasks that hold their placement now (quotas count them), as SQL:
/// an owner's, placed, neither queued nor stopped nor ended.
fn holding() -> String {
    format!(
        "WHERE owner IS NOT NULL AND placement IS NOT NULL
         AND state NOT IN ('pending', 'stopped') AND state NOT IN {ENDED}"
    )
}

/// Keeps the GPU ledger in step with what runs on GPUs at `now`: a
/// stretch opens when a person's task runs with GPUs, and closes when it
/// no longer does (or holds another number). The scheduler runs this on each pass,
/// at least every second, so a stretch's ends are within a pass of true.
fn sync_gpu_use(tx: &Transaction<'_>, now_ms: i64) -> Result<(), StoreError> {
    // The ledger serves GPU-hours quotas: while none is set it records
    // nothing (a pass need not read every running task), and what was
    // open closes.
    let wanted: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM quotas WHERE gpu_seconds IS NOT NULL)",
        [],
        |r| r.get(0),
    )?;
    if !wanted {
        tx.execute(
            "UPDATE gpu_use SET end_ms = ?1 WHERE end_ms IS NULL",
            params![now_ms],
        )?;
        return Ok(());
    }
    let mut held: HashMap<i64, (String, i64)> = HashMap::new();
    {
        // Time is billed while the work runs (or is paused): not while its
        // image is pulled, nor while its node is out of sight (`lost`).
        let mut stmt = tx.prepare(
            "SELECT id, owner, placement FROM tasks
             WHERE owner IS NOT NULL AND placement IS NOT NULL AND state IN ('running', 'paused')",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (id, owner, placement) = row?;
            let p: Placement =
                serde_json::from_str(&placement).map_err(json_err("tasks.placement"))?;
            if !p.gpus.is_empty() {
                held.insert(id, (owner, p.gpus.len() as i64));
            }
        }
    }
    let open: Vec<(i64, i64, i64)> = tx
        .prepare("SELECT rowid, task, gpus FROM gpu_use WHERE end_ms IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (rowid, task, gpus) in &open {
        match held.get(task) {
            Some((_, n)) if n == gpus => {
                held.remove(task);
            }
            _ => {
                tx.execute(
                    "UPDATE gpu_use SET end_ms = ?2 WHERE rowid = ?1",
                    params![rowid, now_ms],
                )?;
            }
        }
    }
    for (task, (owner, gpus)) in held {
        tx.execute(
            "INSERT INTO gpu_use (task, owner, gpus, start_ms) VALUES (?1, ?2, ?3, ?4)",
            params![task, owner, gpus, now_ms],
        )?;
    }
    // A stretch that ended over a year ago counts in no period anyone sets.
    tx.execute(
        "DELETE FROM gpu_use WHERE end_ms < ?1",
        params![now_ms - 400 * 86_400_000],
    )?;
    Ok(())
}

/// GPU seconds one stretch (`gpus` from `start` to `end`, none: still
/// open) gave within the window ending at `now` of `period_s`.
pub(super) fn gpu_seconds_within(
    gpus: i64,
    start: i64,
    end: Option<i64>,
    now: i64,
    period_s: u64,
) -> u64 {
    let from = now.saturating_sub(i64::try_from(period_s.saturating_mul(1000)).unwrap_or(i64::MAX));
    // A clock stepped back can put an end before its start: that counts nothing.
    let (a, b) = (start.max(from), end.unwrap_or(now).min(now).max(start));
    if b <= a || gpus <= 0 {
        return 0;
    }
    (gpus as u64).saturating_mul((b - a) as u64) / 1000
}

fn quota_book(c: &Connection, now_ms: i64) -> Result<QuotaBook, StoreError> {
    let mut caps = HashMap::new();
    let mut stmt = c.prepare(
        "SELECT scope, name, gpus, vps, cores, memory_bytes, gpu_seconds, period_s FROM quotas",
    )?;
    let rows = stmt.query_map([], |r| {
        let cap = |i| {
            r.get::<_, Option<i64>>(i)
                .map(|v| v.map(|v| v.max(0) as u64))
        };
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            QuotaCaps {
                gpus: cap(2)?,
                vps: cap(3)?,
                cores: cap(4)?,
                memory_bytes: cap(5)?,
                gpu_seconds: cap(6)?,
                period_s: cap(7)?,
            },
        ))
    })?;
    for row in rows {
        let (scope, name, c) = row?;
        let scope = if scope == "group" {
            QuotaScope::Group
        } else {
            QuotaScope::User
        };
        caps.insert((scope, name), c);
    }
    let mut group_of = HashMap::new();
    let mut stmt = c.prepare("SELECT name, grp FROM users WHERE grp IS NOT NULL")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (user, group) = row?;
        group_of.insert(user, group);
    }
    let mut book = QuotaBook {
        caps,
        group_of,
        used: HashMap::new(),
    };
    // Without quotas there is nothing to count (and every placed task to read).
    if book.caps.is_empty() {
        return Ok(book);
    }
    for t in query(c, &holding(), &[])? {
        if let (Some(owner), Some(p)) = (&t.owner, &t.placement) {
            book.add(owner, &placed_use(&t.spec, p));
        }
    }
    // GPU time, for the quotas that cap it, each over its own period.
    if book.caps.values().any(|c| c.gpu_seconds.is_some()) {
        let longest = book.caps.values().map(QuotaCaps::period).max().unwrap_or(0);
        let since =
            now_ms.saturating_sub(i64::try_from(longest.saturating_mul(1000)).unwrap_or(i64::MAX));
        let mut stmt = c.prepare(
            "SELECT owner, gpus, start_ms, end_ms FROM gpu_use WHERE end_ms IS NULL OR end_ms > ?1",
        )?;
        let rows = stmt
            .query_map([since], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        for (owner, gpus, start, end) in rows {
            for key in book.keys(&owner) {
                if let Some(period) = book
                    .caps
                    .get(&key)
                    .filter(|c| c.gpu_seconds.is_some())
                    .map(QuotaCaps::period)
                {
                    let spent = gpu_seconds_within(gpus, start, end, now_ms, period);
                    book.used.entry(key).or_default().gpu_seconds += spent;
                }
            }
        }
    }
    Ok(book)
}

impl QuotaBook {
    /// The quota keys that apply to `owner`: theirs and their group's.
    fn keys(&self, owner: &str) -> Vec<(QuotaScope, String)> {
        let mut keys = vec![(QuotaScope::User, owner.to_string())];
        if let Some(g) = self.group_of.get(owner) {
            keys.push((QuotaScope::Group, g.clone()));
        }
        keys
    }

    fn add(&mut self, owner: &str, u: &QuotaUse) {
        for key in self.keys(owner) {
            let e = self.used.entry(key).or_default();
            *e = e.plus(u);
        }
    }

    /// Whether `owner` may take `ask` on top of what they and their group hold.
    fn allows(&self, owner: &str, ask: &QuotaUse) -> Result<(), String> {
        self.each_quota(owner, |caps, who, used| quota::within(caps, who, used, ask))
    }

    /// Whether `ask` could ever fit `owner`'s quotas.
    fn could_ever_fit(&self, owner: &str, ask: &QuotaUse) -> Result<(), String> {
        self.each_quota(owner, |caps, who, _| quota::could_ever_fit(caps, who, ask))
    }

    /// `check` on each quota that applies to `owner` (theirs, their
    /// group's), with its name in words and what it holds; the first refusal.
    fn each_quota(
        &self,
        owner: &str,
        check: impl Fn(&QuotaCaps, &str, &QuotaUse) -> Result<(), String>,
    ) -> Result<(), String> {
        for key in self.keys(owner) {
            if let Some(caps) = self.caps.get(&key) {
                let used = self.used.get(&key).copied().unwrap_or_default();
                check(caps, &format!("{} {}", key.0.as_str(), key.1), &used)?;
            }
        }
        Ok(())
    }
}

pub(super) fn set_quota(
    c: &mut Connection,
    scope: QuotaScope,
    name: &str,
    caps: &QuotaCaps,
) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    if *caps == QuotaCaps::default() {
        tx.execute(
            "DELETE FROM quotas WHERE scope = ?1 AND name = ?2",
            params![scope.as_str(), name],
        )?;
    } else {
        let n = |v: Option<u64>| v.map(|v| v.min(i64::MAX as u64) as i64);
        tx.execute(
            "INSERT INTO quotas (scope, name, gpus, vps, cores, memory_bytes, gpu_seconds, period_s)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (scope, name) DO UPDATE SET gpus = ?3, vps = ?4, cores = ?5,
             memory_bytes = ?6, gpu_seconds = ?7, period_s = ?8",
            params![
                scope.as_str(),
                name,
                n(caps.gpus),
                n(caps.vps),
                n(caps.cores),
                n(caps.memory_bytes),
                n(caps.gpu_seconds),
                n(caps.period_s)
            ],
        )?;
    }
    // A raised quota may let waiting work in.
    bump(&tx)?;
    tx.commit()?;
    Ok(())
}

pub(super) fn quota_views(c: &mut Connection, now_ms: i64) -> Result<Vec<QuotaView>, StoreError> {
    let book = quota_book(c, now_ms)?;
    let mut out: Vec<QuotaView> = book
        .caps
        .iter()
        .map(|((scope, name), caps)| QuotaView {
            scope: *scope,
            name: name.clone(),
            caps: *caps,
            used: book
                .used
                .get(&(*scope, name.clone()))
                .copied()
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| (a.scope.as_str(), &a.name).cmp(&(b.scope.as_str(), &b.name)));
    Ok(out)
}

pub(super) fn schedule(
    c: &mut Connection,
    range: PortRange,
    now_ms: i64,
) -> Result<Vec<u64>, StoreError> {
    let tx = c.transaction()?;
    // Stretches of GPU time that ended since the last pass close first.
    sync_gpu_use(&tx, now_ms)?;
    let nodes = nodes(&tx)?;
    let mut held = reservations(&tx)?;
    let mut externals = published_held(&tx)?;
    let pending = query(
        &tx,
        "WHERE state = 'pending' AND desired NOT IN ('killed', 'deleted')",
        &[],
    )?;
    let mut book = quota_book(&tx, now_ms)?;
    let mut placed = Vec::new();
    // Shapes that had to wait in this pass, with why (see `scheduler::shape`).
    let mut waits: HashMap<String, String> = HashMap::new();
    for t in pending {
        let shape = scheduler::shape(&t.spec);
        let mut decision = match waits.get(&shape) {
            Some(why) => Decision::Wait(why.clone()),
            None => {
                let d = scheduler::place(&t.spec, &nodes, &held);
                if let Decision::Wait(why) = &d {
                    waits.insert(shape, why.clone());
                }
                d
            }
        };
        // A movable VPS whose node is full, offline or gone moves, from its
        // parked copy, to a node that fits.
        let mut moved = None;
        if !matches!(decision, Decision::Place { .. }) {
            if let Some(spec) = scheduler::moved_spec(&t, now_ms) {
                if let d @ Decision::Place { .. } = scheduler::place(&spec, &nodes, &held) {
                    decision = d;
                    moved = Some(spec);
                }
            }
        }
        // Within its owner's quotas (and their group's), counting what this
        // pass placed before it: nothing is spent twice.
        if let (Decision::Place { placement, .. }, Some(owner)) = (&decision, &t.owner) {
            if let Err(why) = book.allows(owner, &placed_use(&t.spec, placement)) {
                decision = Decision::Wait(format!("over quota: {why}"));
            }
        }
        if let Decision::Place { placement, .. } = &mut decision {
            if !placement.published.is_empty() {
                let taken: BTreeSet<u16> = externals
                    .iter()
                    .filter(|(id, _)| *id != t.id)
                    .flat_map(|(_, ps)| ps.iter().map(|p| p.external))
                    .collect();
                let previous = t.placement.as_ref().map_or(&[][..], |p| &p.published[..]);
                match scheduler::give_external(placement, previous, &taken, range, t.id) {
                    Ok(()) => {
                        externals.retain(|(id, _)| *id != t.id);
                        externals.push((t.id, placement.published.clone()));
                    }
                    Err(why) => decision = Decision::Wait(format!("waiting: {why}")),
                }
            }
        }
        match decision {
            Decision::Place { placement, reason } => {
                let mut reason = reason;
                if let (Some(spec), Some(old)) = (&moved, &t.placement) {
                    // Its old node keeps its container and older snapshots
                    // until the VPS is deleted (as for --anywhere).
                    tx.execute(
                        "INSERT OR IGNORE INTO left_behind (task, node) VALUES (?1, ?2)",
                        params![t.id as i64, old.node],
                    )?;
                    tx.execute(
                        "UPDATE tasks SET spec = ?2 WHERE id = ?1",
                        params![t.id as i64, to_json("spec", spec)?],
                    )?;
                    reason = format!(
                        "moved from {} (it cannot start there now): {reason}",
                        old.node
                    );
                }
                tx.execute(
                    "UPDATE tasks SET state = 'assigning', node = ?2, placement = ?3, reason = ?4 WHERE id = ?1",
                    params![t.id as i64, placement.node, to_json("placement", &placement)?, reason],
                )?;
                if let Some(owner) = &t.owner {
                    book.add(owner, &placed_use(&t.spec, &placement));
                }
                held.push(placement);
                placed.push(t.id);
            }
            Decision::Wait(reason) if reason != t.reason => {
                tx.execute(
                    "UPDATE tasks SET reason = ?2 WHERE id = ?1",
                    params![t.id as i64, reason],
                )?;
            }
            Decision::Wait(_) => {}
            // The cluster changed under a queued task (its node was removed): fail it, saying why.
            Decision::Refuse(reason) => {
                tx.execute(
                    "UPDATE tasks SET state = 'failed', reason = ?2, message = ?2 WHERE id = ?1",
                    params![t.id as i64, reason],
                )?;
            }
        }
    }
    if !placed.is_empty() {
        sync_gpu_use(&tx, now_ms)?;
        bump(&tx)?;
    }
    tx.commit()?;
    Ok(placed)
}

/// A VPS being made publishes its image's EXPOSEd ports it did not ask
/// for: node ports on its node and external ports beside those it has
/// (kept), recorded in its spec and placement so a restart keeps them.
pub(super) fn expose(
    c: &mut Connection,
    node: &str,
    id: u64,
    exposed: &[PortRequest],
    range: PortRange,
    published_cap: usize,
) -> Result<Placement, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    let Some(mut placement) = t.placement.clone().filter(|p| p.node == node) else {
        return Err(StoreError::Conflict(format!(
            "task {id} is not assigned to node {node:?}"
        )));
    };
    if t.state != TaskState::Assigning || t.spec.kind != crate::api::Kind::Vps {
        return Err(StoreError::Conflict(format!(
            "task {id} is {}: only a VPS being made publishes its image's ports",
            t.state
        )));
    }
    // The image's EXPOSE 22 is the SSH server's port: never published
    // while our SSH server runs (it is reached through the proxy).
    let exposed: Vec<PortRequest> = exposed
        .iter()
        .filter(|r| !t.spec.asks_for_our_ssh(r))
        .copied()
        .collect();
    let (mut new, mut left_out) = ports::still_unpublished(&t.spec.ports, &exposed);
    if let Some(user) = &t.owner {
        let room = published_cap.saturating_sub(published_of(&tx, user)?);
        left_out += new.len().saturating_sub(room);
        new.truncate(room);
    }
    if left_out > 0 {
        tracing::warn!(
            task = id,
            left_out,
            "the image exposes more ports than an instance may publish; the rest stay unpublished"
        );
    }
    if new.is_empty() {
        return Ok(placement);
    }
    let reserved = reservations(&tx)?;
    let here = reserved.iter().filter(|p| p.node == node);
    let free: Vec<u16> = scheduler::free_node_ports(here.chain(std::iter::once(&placement)))
        .take(new.len())
        .collect();
    if free.len() < new.len() {
        return Err(StoreError::Conflict(format!(
            "node {node} has no free node port"
        )));
    }
    let previous = placement.published.clone();
    for (r, node_port) in new.iter().zip(free) {
        placement.published.push(Published {
            request: r.port,
            proto: r.proto,
            internal: r.port as u16,
            node_port,
            external: 0,
        });
    }
    let taken: BTreeSet<u16> = published_held(&tx)?
        .into_iter()
        .filter(|(other, _)| *other != id)
        .flat_map(|(_, ps)| ps.into_iter().map(|p| p.external))
        .collect();
    scheduler::give_external(&mut placement, &previous, &taken, range, id)
        .map_err(StoreError::Conflict)?;
    let mut spec = t.spec.clone();
    spec.ports.extend(new);
    tx.execute(
        "UPDATE tasks SET spec = ?2, placement = ?3 WHERE id = ?1",
        params![
            id as i64,
            to_json("spec", &spec)?,
            to_json("placement", &placement)?
        ],
    )?;
    bump(&tx)?;
    tx.commit()?;
    Ok(placement)
}

fn one(c: &Connection, id: u64) -> Result<TaskView, StoreError> {
    query(c, "WHERE id = ?1", &[&(id as i64)])?
        .into_iter()
        .next()
        .ok_or(StoreError::NoTask(id))
}

pub(super) fn get(c: &mut Connection, id: u64) -> Result<Option<TaskView>, StoreError> {
    Ok(query(c, "WHERE id = ?1", &[&(id as i64)])?
        .into_iter()
        .next())
}

pub(super) fn list(
    c: &mut Connection,
    state: Option<TaskState>,
    node: Option<&str>,
    owner: Option<&str>,
) -> Result<Vec<TaskView>, StoreError> {
    let s = state.map(|s| s.as_str().to_string());
    query(
        c,
        "WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR node = ?2) AND (?3 IS NULL OR owner = ?3)",
        &[&s, &node, &owner],
    )
}

pub(super) fn set_desired(
    c: &mut Connection,
    id: u64,
    desired: Desired,
    now_ms: i64,
) -> Result<TaskView, StoreError> {
    change_desired(c, id, desired, now_ms)
}

/// `vps restart`: a stopped VPS is queued again; a running or paused one
/// is stopped first and queued again when its runner reports it stopped.
/// With `restore`, the disk is recreated from that snapshot on the way.
pub(super) fn restart(
    c: &mut Connection,
    id: u64,
    restore: Option<&Restore>,
) -> Result<TaskView, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    if t.spec.kind != crate::api::Kind::Vps {
        return Err(StoreError::Conflict(format!(
            "task {id} is a command: only a VPS restarts (submit the command again)"
        )));
    }
    if t.placement.is_none() && t.started_at_unix_ms.is_none() {
        // It never ran (withdrawn before approval, or refused a place): a
        // restart would pass an approval by and has no disk to come back to.
        return Err(StoreError::Conflict(format!(
            "VPS {id} never ran ({}): create it again",
            t.reason
        )));
    }
    match t.state {
        // A VPS that ended (stopped, killed, failed, OOM-killed) kept its disk.
        TaskState::Stopped
        | TaskState::Killed
        | TaskState::KilledOom
        | TaskState::Failed
        | TaskState::Completed
            if t.desired != Desired::Deleted =>
        {
            requeue(&tx, &t, restore)?
        }
        TaskState::Running | TaskState::Paused if t.desired != Desired::Deleted => {
            let mut spec = t.spec.clone();
            spec.restore = restore.cloned();
            tx.execute(
                "UPDATE tasks SET desired = 'restarting', spec = ?2 WHERE id = ?1",
                params![id as i64, to_json("spec", &spec)?],
            )?;
        }
        s => {
            return Err(StoreError::Conflict(format!(
                "VPS {id} is {s}: it restarts once it is running, paused, stopped or ended (and not deleted)"
            )))
        }
    }
    bump(&tx)?;
    let view = query(&tx, "WHERE id = ?1", &[&(id as i64)])?.remove(0);
    tx.commit()?;
    Ok(view)
}

/// `vps restart --anywhere`: a stopped VPS whose last stop is parked on
/// the host (`restore` names that copy), or whose node is online (`restore`
/// names a snapshot there, `from` that node), is queued again for any node
/// that fits; the node it lands on starts it from the copy, or from that
/// node's snapshot, fetched node to node.
pub(super) fn restart_anywhere(
    c: &mut Connection,
    id: u64,
    restore: &Restore,
) -> Result<TaskView, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    if t.spec.kind != crate::api::Kind::Vps || t.spec.is_vm() {
        return Err(StoreError::Conflict(format!(
            "task {id} is no container VPS: only those move between nodes"
        )));
    }
    if !t.state.kept_its_disk() || t.desired == Desired::Deleted {
        return Err(StoreError::Conflict(format!(
            "VPS {id} is {}: it moves once it is stopped (`rivernode vps stop {id}`)",
            t.state
        )));
    }
    let node = t.placement.as_ref().map(|p| p.node.as_str());
    // From its node (online), or again from the node an unfinished move
    // left (it holds the snapshot that move named).
    let retried = t.spec.restore.as_ref().is_some_and(|r| {
        r.from.is_some() && r.from == restore.from && r.snapshot == restore.snapshot
    });
    let node_to_node = restore.from.is_some() && (restore.from.as_deref() == node || retried);
    if !node_to_node && t.parked.as_deref() != Some(restore.snapshot.as_str()) {
        return Err(StoreError::Conflict(format!(
            "VPS {id}'s last stop was not parked on the host, so it can start only on its own node"
        )));
    }
    // The node it leaves keeps its old container and snapshots until the
    // VPS is deleted (then that node removes them).
    if let Some(p) = &t.placement {
        tx.execute(
            "INSERT OR IGNORE INTO left_behind (task, node) VALUES (?1, ?2)",
            params![id as i64, p.node],
        )?;
    }
    requeue_on(&tx, &t, Some(restore), false)?;
    bump(&tx)?;
    let view = query(&tx, "WHERE id = ?1", &[&(id as i64)])?.remove(0);
    tx.commit()?;
    Ok(view)
}

/// Queues a stopped VPS again, on the node that keeps its disk.
fn requeue(
    tx: &Transaction<'_>,
    t: &TaskView,
    restore: Option<&Restore>,
) -> Result<(), StoreError> {
    requeue_on(tx, t, restore, true)
}

/// Queues a stopped VPS again: `pinned`, on the node that keeps its disk;
/// else on any node (from its parked copy).
fn requeue_on(
    tx: &Transaction<'_>,
    t: &TaskView,
    restore: Option<&Restore>,
    pinned: bool,
) -> Result<(), StoreError> {
    let mut spec = t.spec.clone();
    // A move that never ran (its copy did not come) tries the copy again,
    // on any node: the one it was placed on holds nothing else of the VPS.
    let unfinished_move = t.spec.restore.clone().filter(|r| {
        restore.is_none() && r.parked && t.parked.as_deref() == Some(r.snapshot.as_str())
    });
    // So does a move node to node that never ran (`from` goes once the VPS
    // runs): the node it left keeps the VPS's snapshots until a delete;
    // without it, a node would start the VPS from its image, without its
    // disk.
    let node_to_node = t
        .spec
        .restore
        .clone()
        .filter(|r| restore.is_none() && r.from.is_some());
    let pinned = pinned && unfinished_move.is_none() && node_to_node.is_none();
    spec.restore = restore.cloned().or(unfinished_move).or(node_to_node);
    let is_vm = spec.is_vm();
    if !pinned {
        spec.target = None;
    } else if let Some(p) = &t.placement {
        let target = spec.target.get_or_insert_with(|| crate::api::Target {
            node: p.node.clone(),
            numa: None,
            gpus: vec![],
        });
        target.node = p.node.clone();
        // Its container was made with these GPUs' devices: the same ones
        // again, by address (an index could name another GPU by then). A
        // VM's domain is written anew at each start: any free GPUs will do.
        if !is_vm {
            target.gpus = p.gpus.iter().map(|g| g.to_string()).collect();
        }
    }
    tx.execute(
        // The placement stays (it names the node with the disk) but reserves
        // nothing while pending; the scheduler replaces it.
        "UPDATE tasks SET state = 'pending', desired = 'running', spec = ?2,
         reason = 'restarting', exit_code = NULL, message = NULL, finished_at_ms = NULL,
         notice = NULL, idle_since_ms = NULL, idle_seen_ms = NULL, idle_warned_ms = NULL WHERE id = ?1",
        params![t.id as i64, to_json("spec", &spec)?],
    )?;
    Ok(())
}

fn change_desired(
    c: &mut Connection,
    id: u64,
    desired: Desired,
    now_ms: i64,
) -> Result<TaskView, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    let vps = t.spec.kind == crate::api::Kind::Vps;
    if desired == Desired::Deleted && !vps {
        return Err(StoreError::Conflict(format!(
            "task {id} is a command: kill ends it (delete is for a VPS)"
        )));
    }
    if t.state == TaskState::Deleted || t.desired == Desired::Deleted {
        return Err(StoreError::Conflict(format!(
            "VPS {id} is deleted{}",
            if t.state == TaskState::Deleted {
                ""
            } else {
                " (its node is removing it)"
            }
        )));
    }
    // A VPS's disk is on its node while it has a placement: only that
    // node's runner removes it, so a delete goes there as `desired`.
    let disk_on_node = vps && t.placement.is_some();
    match (t.state, desired) {
        (_, Desired::Deleted) if !disk_on_node => {
            tx.execute(
                "UPDATE tasks SET state = 'deleted', desired = 'deleted', reason = 'deleted',
                 finished_at_ms = COALESCE(finished_at_ms, ?2) WHERE id = ?1",
                params![id as i64, now_ms],
            )?;
        }
        (TaskState::Pending, Desired::Deleted) => {
            // Queued for a restart: back to stopped, to be deleted by its node.
            tx.execute(
                "UPDATE tasks SET state = 'stopped', desired = 'deleted',
                 reason = 'deleted while queued for a restart' WHERE id = ?1",
                params![id as i64],
            )?;
        }
        (_, Desired::Deleted) => {
            tx.execute(
                "UPDATE tasks SET desired = 'deleted' WHERE id = ?1",
                params![id as i64],
            )?;
        }
        (TaskState::Rejected, _) => {
            return Err(StoreError::Conflict(format!(
                "task {id} was rejected ({}); `vps delete` removes it, a new request asks again",
                t.message.clone().unwrap_or_default()
            )));
        }
        (s, _) if s.is_final() => {
            return Err(StoreError::Conflict(format!(
                "task {id} already ended ({s}){}",
                if vps {
                    ": `vps restart` starts it again, `vps delete` removes it"
                } else {
                    ""
                }
            )));
        }
        (TaskState::PendingApproval, Desired::Killed) => {
            tx.execute(
                "UPDATE tasks SET state = 'killed', desired = 'killed',
                 reason = 'killed before approval', finished_at_ms = ?2 WHERE id = ?1",
                params![id as i64, now_ms],
            )?;
        }
        (TaskState::PendingApproval, _) => {
            return Err(StoreError::Conflict(format!(
                "task {id} waits for an operator's approval; only kill (withdraw) or delete applies"
            )))
        }
        (TaskState::Pending, Desired::Killed) => {
            tx.execute(
                "UPDATE tasks SET state = 'killed', desired = 'killed', reason = 'killed while queued',
                 finished_at_ms = ?2 WHERE id = ?1",
                params![id as i64, now_ms],
            )?;
        }
        (TaskState::Pending, _) => {
            return Err(StoreError::Conflict(format!(
                "task {id} is still queued ({}); only kill applies",
                t.reason
            )))
        }
        (_, Desired::Stopped | Desired::Restarting) if !vps => {
            return Err(StoreError::Conflict(format!(
                "task {id} is a command: only a VPS can be stopped and restarted (kill ends a command)"
            )));
        }
        (TaskState::Stopped, Desired::Running) => requeue(&tx, &t, None)?,
        // Its runner has signalled it already: an end under way is not undone.
        (_, Desired::Running | Desired::Paused)
            if matches!(
                t.desired,
                Desired::Stopped | Desired::Restarting | Desired::Killed
            ) =>
        {
            return Err(StoreError::Conflict(format!(
                "task {id} is being {} already; wait until it has ended",
                desired_str(t.desired)
            )));
        }
        (TaskState::Stopped, Desired::Killed) => {
            return Err(StoreError::Conflict(format!(
                "VPS {id} is stopped already: `vps restart` starts it, `vps delete` removes it"
            )));
        }
        _ => {
            tx.execute(
                "UPDATE tasks SET desired = ?2 WHERE id = ?1",
                params![id as i64, desired_str(desired)],
            )?;
        }
    }
    bump(&tx)?;
    let view = query(&tx, "WHERE id = ?1", &[&(id as i64)])?.remove(0);
    tx.commit()?;
    Ok(view)
}

/// One heartbeat's GPU readings against the idle-GPU policy: each running
/// or paused VPS on `node` that holds GPUs, is not exempt and is not being
/// stopped already moves its idle clock; a warning is put up or taken
/// down (the runner writes it into the instance), or the VPS is stopped,
/// saying why. Returns the steps taken, by task.
pub(super) fn review_idle(
    c: &mut Connection,
    node: &str,
    samples: &[GpuSample],
    policy: &IdlePolicy,
    now_ms: i64,
) -> Result<Vec<(u64, IdleStep)>, StoreError> {
    let tx = c.transaction()?;
    let mut stmt = tx.prepare(
        "SELECT id, placement, idle_since_ms, idle_seen_ms, idle_warned_ms, spec FROM tasks
         WHERE node = ?1 AND state IN ('running', 'paused') AND desired IN ('running', 'paused')
         AND placement IS NOT NULL AND idle_exempt = 0",
    )?;
    let rows = stmt
        .query_map([node], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                IdleMark {
                    since: r.get(2)?,
                    seen: r.get(3)?,
                    warned: r.get(4)?,
                },
                r.get::<_, String>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    drop(stmt);
    let mut steps = Vec::new();
    for (id, placement, mark, spec) in rows {
        let spec: TaskSpec = serde_json::from_str(&spec).map_err(json_err("tasks.spec"))?;
        if spec.kind != crate::api::Kind::Vps {
            continue;
        }
        let p: Placement = serde_json::from_str(&placement).map_err(json_err("tasks.placement"))?;
        // Every GPU it holds must have a reading; otherwise nothing is known.
        let Some(utilisation) = p
            .gpus
            .iter()
            .map(|g| {
                samples
                    .iter()
                    .find(|s| s.address == *g)
                    .map(|s| s.utilisation_percent)
            })
            .collect::<Option<Vec<u32>>>()
            .filter(|u| !u.is_empty())
        else {
            continue;
        };
        let (next, step) = policy.review(mark, &utilisation, now_ms);
        tx.execute(
            "UPDATE tasks SET idle_since_ms = ?2, idle_seen_ms = ?3, idle_warned_ms = ?4 WHERE id = ?1",
            params![id, next.since, next.seen, next.warned],
        )?;
        match &step {
            IdleStep::Nothing => continue,
            IdleStep::Warn(text) => {
                tx.execute(
                    "UPDATE tasks SET notice = ?2 WHERE id = ?1",
                    params![id, text],
                )?;
            }
            IdleStep::Clear => {
                tx.execute("UPDATE tasks SET notice = NULL WHERE id = ?1", params![id])?;
            }
            IdleStep::Stop(why) => {
                tx.execute(
                    "UPDATE tasks SET desired = 'stopped', notice = NULL, message = ?2,
                     idle_since_ms = NULL, idle_seen_ms = NULL, idle_warned_ms = NULL WHERE id = ?1",
                    params![id, why],
                )?;
            }
        }
        steps.push((id as u64, step));
    }
    if !steps.is_empty() {
        bump(&tx)?;
    }
    tx.commit()?;
    Ok(steps)
}

/// An operator exempts a VPS from idle-GPU reclamation (or ends that):
/// either way its idle clock and any warning start over.
pub(super) fn set_idle_exempt(
    c: &mut Connection,
    id: u64,
    exempt: bool,
) -> Result<TaskView, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    if t.spec.kind != crate::api::Kind::Vps {
        return Err(StoreError::Conflict(format!(
            "task {id} is a command: only a VPS is reclaimed when its GPUs sit idle"
        )));
    }
    if t.state == TaskState::Deleted || t.desired == Desired::Deleted {
        return Err(StoreError::Conflict(format!("VPS {id} is deleted")));
    }
    tx.execute(
        "UPDATE tasks SET idle_exempt = ?2, notice = NULL,
         idle_since_ms = NULL, idle_seen_ms = NULL, idle_warned_ms = NULL WHERE id = ?1",
        params![id as i64, exempt],
    )?;
    bump(&tx)?;
    let t = one(&tx, id)?;
    tx.commit()?;
    Ok(t)
}

pub(super) fn assignments(c: &mut Connection, node: &str) -> Result<Assignments, StoreError> {
    let tx = c.transaction()?;
    let revision = revision(&tx)?;
    // Ended tasks are not the runner's business, but a VPS to delete is:
    // its disk is on that node.
    let tasks = query(
        &tx,
        &format!(
            "WHERE node = ?1 AND state NOT IN ('pending', 'deleted')
             AND (state NOT IN {ENDED} OR desired = 'deleted')"
        ),
        &[&node],
    )?;
    let forget = tx
        .prepare(
            "SELECT l.task FROM left_behind l JOIN tasks t ON t.id = l.task
             WHERE l.node = ?1 AND t.state = 'deleted' ORDER BY l.task",
        )?
        .query_map([node], |r| r.get::<_, i64>(0))?
        .map(|r| r.map(|id| id as u64))
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(Assignments {
        forget,
        revision,
        tasks: tasks
            .into_iter()
            .filter_map(|t| {
                Some(Assignment {
                    id: t.id,
                    desired: t.desired,
                    state: t.state,
                    started: t.started_at_unix_ms.is_some(),
                    placement: t.placement?,
                    spec: t.spec,
                    owner: t.owner,
                    submitted_at_unix_ms: t.submitted_at_unix_ms,
                    public_address: None,
                    notice: t.notice,
                    overlay_group: None,
                })
            })
            .collect(),
    })
}

pub(super) fn report(
    c: &mut Connection,
    node: &str,
    id: u64,
    r: &TaskReport,
    now_ms: i64,
) -> Result<TaskView, StoreError> {
    let tx = c.transaction()?;
    let t = one(&tx, id)?;
    if t.placement.as_ref().map(|p| p.node.as_str()) != Some(node) {
        return Err(StoreError::Conflict(format!(
            "task {id} is not assigned to node {node:?}"
        )));
    }
    if t.state == r.state {
        // A live VPS's news (its onstart failed): the message only.
        let live = matches!(r.state, TaskState::Running | TaskState::Paused);
        if r.message.is_some() && r.message != t.message && live {
            tx.execute(
                "UPDATE tasks SET message = ?2 WHERE id = ?1",
                params![id as i64, r.message],
            )?;
            bump(&tx)?;
            let t = one(&tx, id)?;
            tx.commit()?;
            return Ok(t);
        }
        return Ok(t);
    }
    if !t.state.can_become(r.state) {
        return Err(StoreError::Conflict(format!(
            "task {id} cannot go from {} to {}",
            t.state, r.state
        )));
    }
    let started =
        (r.state == TaskState::Running && t.started_at_unix_ms.is_none()).then_some(now_ms);
    let finished = r.state.is_final().then_some(now_ms);
    tx.execute(
        // A start (not a resume) begins a new run: the last run's message is moot.
        "UPDATE tasks SET state = ?2, exit_code = COALESCE(?3, exit_code),
         message = CASE WHEN ?2 = 'running' AND state NOT IN ('running', 'paused')
                   THEN ?4 ELSE COALESCE(?4, message) END,
         started_at_ms = COALESCE(started_at_ms, ?5), finished_at_ms = COALESCE(?6, finished_at_ms),
         ssh_host_key = COALESCE(?7, ssh_host_key),
         parked = CASE
             WHEN ?2 = 'running' AND state NOT IN ('running', 'paused') THEN NULL
             WHEN ?2 IN ('running', 'paused') THEN parked
             WHEN ?8 IS NOT NULL THEN ?8
             ELSE parked END
         WHERE id = ?1",
        params![
            id as i64,
            r.state.as_str(),
            r.exit_code,
            r.message,
            started,
            finished,
            r.ssh_host_key,
            r.parked
        ],
    )?;
    if r.state == TaskState::Running {
        // A move node to node is done once the VPS runs where it landed:
        // from then on its disk is there, not on the node it left.
        if let Some(from) = t.spec.restore.as_ref().and_then(|r| r.from.as_ref()) {
            let mut spec = t.spec.clone();
            if let Some(restore) = spec.restore.as_mut() {
                restore.from = None;
            }
            tx.execute(
                "UPDATE tasks SET spec = ?2 WHERE id = ?1",
                params![id as i64, to_json("spec", &spec)?],
            )?;
            tracing::info!(task = id, from = %from, node, "a move node to node is done");
        }
    }
    if !matches!(r.state, TaskState::Running | TaskState::Paused) {
        // A warning about idle GPUs is about this run only.
        tx.execute(
            "UPDATE tasks SET notice = NULL, idle_since_ms = NULL, idle_seen_ms = NULL,
             idle_warned_ms = NULL WHERE id = ?1",
            params![id as i64],
        )?;
    }
    if r.state == TaskState::Stopped && t.desired == Desired::Restarting {
        // The stop half of a restart is done: the start half is queued.
        let stopped = one(&tx, id)?;
        requeue(&tx, &stopped, stopped.spec.restore.as_ref())?;
    }
    bump(&tx)?;
    let view = query(&tx, "WHERE id = ?1", &[&(id as i64)])?.remove(0);
    tx.commit()?;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::super::{SqliteStore, Store};
    use crate::api::ports::PortRange;
    use crate::api::Placement;
    use crate::api::{
        Desired, ImageSource, RegisterRequest, Target, TaskReport, TaskSpec, TaskState,
    };
    use crate::topology::{collect, fake::FakeMachine};

    fn store_with_node(name: &str) -> Arc<SqliteStore> {
        store_with(name, false)
    }

    /// A store with node `name`: two sockets, four GPUs, VMs when `vms`.
    fn store_with(name: &str, vms: bool) -> Arc<SqliteStore> {
        let s = SqliteStore::open_in_memory().unwrap();
        add_node(&s, name, vms);
        Arc::new(s)
    }

    /// Registers node `name` (two sockets, four GPUs, VMs when `vms`).
    fn add_node(s: &SqliteStore, name: &str, vms: bool) {
        let m = FakeMachine::two_socket_four_gpus();
        let mut inventory = collect(&m.roots()).unwrap();
        inventory.vms = vms;
        s.register_node(
            &RegisterRequest {
                name: name.into(),
                runner_url: "http://127.0.0.1:1".into(),
                heartbeat_interval_ms: 1000,
                version: "t".into(),
                inventory,
                registration_key: None,
            },
            &format!("cred-{name}"),
            "host-token",
            0,
        )
        .unwrap();
    }

    fn spec(cores: u32, gpus: u32) -> TaskSpec {
        TaskSpec {
            command: vec!["sleep".into(), "1".into()],
            env: Default::default(),
            mounts: vec![],
            image: ImageSource::Environment("base".into()),
            cores,
            memory_bytes: None,
            gpu_count: gpus,
            target: None,
            kind: crate::api::Kind::Command,
            ssh_keys: vec![],
            ssh_password_hash: None,
            privileged: false,
            restore: None,
            movable: false,
            no_ssh: false,
            shm_bytes: None,
            vm_disk_bytes: None,
            onstart: None,
            args: vec![],
            ports: vec![],
            jupyter: false,
            no_network: false,
            hostname: None,
        }
    }

    fn report(
        s: &SqliteStore,
        id: u64,
        state: TaskState,
    ) -> Result<crate::api::TaskView, super::StoreError> {
        s.report_task(
            "n1",
            id,
            &TaskReport {
                state,
                exit_code: None,
                ssh_host_key: None,
                parked: None,
                message: None,
            },
            1,
        )
    }

    #[test]
    fn a_request_waiting_for_approval_holds_nothing_until_approved_and_a_rejection_ends_it() {
        let s = store_with_node("n1");
        let waiting = s
            .submit_task_capped(&spec(8, 0), Some("bob"), 10, true, 0)
            .unwrap();
        assert!(
            s.schedule().unwrap().is_empty(),
            "not placed before approval"
        );
        let t = s.get_task(waiting).unwrap().unwrap();
        assert_eq!((t.state, t.placement), (TaskState::PendingApproval, None));
        // Another task takes the node's 8 cores meanwhile: the request held none.
        let other = s.submit_task(&spec(8, 0), None, 0).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![other]);
        let t = s.approve(waiting, "olga").unwrap();
        assert_eq!(t.state, TaskState::Pending);
        assert!(t.reason.contains("approved by olga"), "{}", t.reason);
        assert!(
            matches!(
                s.approve(waiting, "olga"),
                Err(super::StoreError::Conflict(_))
            ),
            "decided once"
        );
        // Stop, pause and the like wait for the decision; a reject ends it.
        let second = s
            .submit_task_capped(&spec(1, 0), Some("bob"), 10, true, 0)
            .unwrap();
        assert!(matches!(
            s.set_desired(second, crate::api::Desired::Paused, 1),
            Err(super::StoreError::Conflict(_))
        ));
        let t = s.reject(second, "olga", "not now", 5).unwrap();
        assert_eq!(t.state, TaskState::Rejected);
        assert_eq!(t.message.as_deref(), Some("rejected by olga: not now"));
        assert_eq!(t.finished_at_unix_ms, Some(5));
        assert!(matches!(
            s.reject(second, "olga", "again", 6),
            Err(super::StoreError::Conflict(_))
        ));
        // Requests count against the waiting cap.
        s.submit_task_capped(&spec(1, 0), Some("carl"), 1, true, 0)
            .unwrap();
        assert!(matches!(
            s.submit_task_capped(&spec(1, 0), Some("carl"), 1, false, 0),
            Err(super::StoreError::TooMany(_))
        ));
    }

    #[test]
    fn fifty_parallel_requests_never_spend_a_groups_gpus_twice() {
        use crate::api::{PersonRole, QuotaCaps, QuotaScope};
        let s = store_with_node("n1");
        for u in ["u0", "u1", "u2", "u3", "u4"] {
            s.add_user(u, PersonRole::User, Some("lab-a"), &format!("h-{u}"), 0)
                .unwrap();
        }
        let caps = QuotaCaps {
            gpus: Some(2),
            ..Default::default()
        };
        s.set_quota(QuotaScope::Group, "lab-a", &caps).unwrap();
        let threads: Vec<_> = (0..50)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let owner = format!("u{}", i % 5);
                    s.submit_task(&spec(1, 1), Some(&owner), 0).unwrap();
                    s.schedule().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        s.schedule().unwrap();
        let all = s.list_tasks(None, None, None).unwrap();
        let placed = all.iter().filter(|t| t.placement.is_some()).count();
        // The node had room for more (with the check taken out, 3 are
        // placed): the group's quota stops it at 2.
        assert_eq!(placed, 2);
        let waiting: Vec<_> = all.iter().filter(|t| t.placement.is_none()).collect();
        assert_eq!(waiting.len(), 48);
        for t in &waiting {
            assert!(
                t.reason
                    .contains("over quota: group lab-a holds 2 of 2 GPUs"),
                "{}",
                t.reason
            );
        }
        let q = s.quotas().unwrap();
        assert_eq!((q.len(), q[0].used.gpus), (1, 2));
        // A request bigger than the quota is refused at once, with the numbers.
        let e = s.submit_task(&spec(1, 3), Some("u0"), 0).unwrap_err();
        assert!(
            e.to_string().contains("group lab-a's quota (gpus 2)"),
            "{e}"
        );
        // The admin's own work is not counted.
        assert!(s.submit_task(&spec(1, 1), None, 0).is_ok());
        // Lifting the quota lets one more in (the node's fourth GPU).
        s.set_quota(QuotaScope::Group, "lab-a", &QuotaCaps::default())
            .unwrap();
        assert!(s.quotas().unwrap().is_empty());
        assert_eq!(s.schedule().unwrap().len(), 1);
    }

    #[test]
    fn gpu_time_is_counted_from_the_ledger_over_the_quota_period() {
        use crate::api::{QuotaCaps, QuotaScope};
        const H: i64 = 3_600_000;
        let s = store_with_node("n1");
        let caps = QuotaCaps {
            gpu_seconds: Some(2 * 3600),
            period_s: Some(86_400),
            ..Default::default()
        };
        s.set_quota(QuotaScope::User, "ann", &caps).unwrap();
        let range = PortRange::parse("20000-29999").unwrap();
        let pass = |now: i64| s.with(|c| super::schedule(c, range, now)).unwrap();
        let t0 = 1_800_000_000_000;
        let a = s.submit_task(&spec(1, 2), Some("ann"), t0).unwrap();
        assert_eq!(pass(t0), vec![a]);
        // Placed is not running: nothing is billed until it runs.
        assert_eq!(
            s.with(|c| super::quota_views(c, t0 + H)).unwrap()[0]
                .used
                .gpu_seconds,
            0
        );
        report(&s, a, TaskState::Running).unwrap();
        assert!(pass(t0).is_empty(), "the pass that opens a's stretch");
        // Two GPUs for an hour: two GPU-hours, all of the day's.
        let b = s.submit_task(&spec(1, 1), Some("ann"), t0).unwrap();
        let cpu = s.submit_task(&spec(1, 0), Some("ann"), t0).unwrap();
        assert_eq!(pass(t0 + H), vec![cpu], "CPU work is not held back");
        let why = s.get_task(b).unwrap().unwrap().reason;
        assert_eq!(
            why,
            "over quota: user ann had 2 of 2 GPU-hours in the last 1d; GPU work waits until older use ages out"
        );
        let q = s.with(|c| super::quota_views(c, t0 + H)).unwrap();
        assert_eq!(q[0].used.gpu_seconds, 2 * 3600, "{q:?}");
        // It ends; what it had still counts until it ages out of the day.
        s.set_desired(a, Desired::Killed, t0 + H).unwrap();
        report(&s, a, TaskState::Killed).unwrap();
        assert!(pass(t0 + H + 1000).is_empty());
        assert!(
            pass(t0 + 24 * H + 1000).is_empty(),
            "still 2 h in the window"
        );
        // A day after its first half hour: an hour and a half in the window.
        assert_eq!(pass(t0 + 24 * H + H / 2), vec![b]);
        report(&s, b, TaskState::Running).unwrap();
        assert!(pass(t0 + 25 * H).is_empty());
        // The ledger holds one closed stretch for a and one open for b.
        let rows: Vec<(i64, i64, i64, Option<i64>)> = s
            .with(|c| {
                Ok(
                    c.prepare("SELECT task, gpus, start_ms, end_ms FROM gpu_use ORDER BY rowid")?
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                        .collect::<Result<Vec<_>, _>>()?,
                )
            })
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (a as i64, 2, t0, Some(t0 + H + 1000)),
                (b as i64, 1, t0 + 25 * H, None)
            ]
        );
        assert_eq!(
            super::gpu_seconds_within(2, 0, Some(10_000), 20_000, 15),
            10
        );
        assert_eq!(super::gpu_seconds_within(2, 0, None, 20_000, 60), 40);
    }

    #[test]
    fn one_scheduling_pass_counts_what_it_placed_before() {
        use crate::api::{QuotaCaps, QuotaScope};
        let s = store_with_node("n1");
        let caps = QuotaCaps {
            gpus: Some(2),
            ..Default::default()
        };
        s.set_quota(QuotaScope::User, "ann", &caps).unwrap();
        for _ in 0..3 {
            s.submit_task(&spec(1, 1), Some("ann"), 0).unwrap();
        }
        assert_eq!(
            s.schedule().unwrap().len(),
            2,
            "one pass, three asks, a cap of two"
        );
    }

    #[test]
    fn a_user_may_have_only_so_many_tasks_waiting() {
        let s = store_with_node("n1");
        let submit = |owner| s.submit_task_capped(&spec(8, 0), owner, 2, false, 0);
        let first = submit(Some("alice")).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![first]);
        // The placed one does not count; two more wait, the next is refused.
        submit(Some("alice")).unwrap();
        let killed = submit(Some("alice")).unwrap();
        let e = submit(Some("alice")).unwrap_err();
        assert!(
            matches!(&e, super::StoreError::TooMany(m) if m.contains("max_waiting_per_user")),
            "{e}"
        );
        // Others are not held back by alice's queue, nor is the admin.
        submit(Some("bob")).unwrap();
        submit(None).unwrap();
        submit(None).unwrap();
        // A killed one makes room.
        s.set_desired(killed, crate::api::Desired::Killed, 1)
            .unwrap();
        submit(Some("alice")).unwrap();
    }

    #[test]
    fn full_node_tasks_run_one_after_the_other() {
        let s = store_with_node("n1");
        let a = s.submit_task(&spec(8, 0), None, 0).unwrap();
        let b = s.submit_task(&spec(8, 0), None, 0).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![a]);
        let tb = s.get_task(b).unwrap().unwrap();
        assert_eq!(tb.state, TaskState::Pending);
        assert!(tb.reason.contains("0 of 8 cores free"), "{}", tb.reason);
        report(&s, a, TaskState::Running).unwrap();
        assert!(s.schedule().unwrap().is_empty());
        report(&s, a, TaskState::Completed).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![b]);
        assert_eq!(s.get_task(b).unwrap().unwrap().state, TaskState::Assigning);
    }

    #[test]
    fn fifty_concurrent_submissions_never_double_book_gpus() {
        let s = store_with_node("n1");
        let threads: Vec<_> = (0..50)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    s.submit_task(&spec(1, 1), None, 0).unwrap();
                    s.schedule().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let placed: Vec<_> = s
            .list_tasks(Some(TaskState::Assigning), None, None)
            .unwrap()
            .into_iter()
            .flat_map(|t| t.placement.unwrap().gpus)
            .collect();
        // The fake node has 4 GPUs, one already on vfio-pci: 3 can be handed out.
        assert_eq!(placed.len(), 3, "{placed:?}");
        let distinct: std::collections::BTreeSet<_> = placed.iter().collect();
        assert_eq!(distinct.len(), 3);
        assert_eq!(
            s.list_tasks(Some(TaskState::Pending), None, None)
                .unwrap()
                .len(),
            47
        );
    }

    #[test]
    fn impossible_targets_are_refused_and_nothing_is_created() {
        let s = store_with_node("n1");
        for (t, want) in [
            ("n2", "no node named"),
            ("n1:5", "no NUMA node 5"),
            ("n1::7", "no GPU"),
        ] {
            let mut sp = spec(1, 0);
            sp.target = Some(t.parse::<Target>().unwrap());
            let e = s.submit_task(&sp, None, 0).unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
        let mut empty = spec(1, 0);
        empty.command.clear();
        assert!(s
            .submit_task(&empty, None, 0)
            .unwrap_err()
            .to_string()
            .contains("command"));
        assert!(s.list_tasks(None, None, None).unwrap().is_empty());
    }

    #[test]
    fn paused_tasks_keep_their_cores_and_kill_of_a_queued_task_ends_it() {
        let s = store_with_node("n1");
        let a = s.submit_task(&spec(8, 0), None, 0).unwrap();
        s.schedule().unwrap();
        report(&s, a, TaskState::Running).unwrap();
        assert_eq!(
            s.set_desired(a, Desired::Paused, 0).unwrap().desired,
            Desired::Paused
        );
        report(&s, a, TaskState::Paused).unwrap();
        let b = s.submit_task(&spec(1, 0), None, 0).unwrap();
        assert!(
            s.schedule().unwrap().is_empty(),
            "paused task still holds all 8 cores"
        );
        let kb = s.set_desired(b, Desired::Killed, 5).unwrap();
        assert_eq!(
            (kb.state, kb.finished_at_unix_ms),
            (TaskState::Killed, Some(5))
        );
        let e = s
            .set_desired(b, Desired::Running, 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already ended"), "{e}");
    }

    #[test]
    fn a_vps_deleted_while_queued_for_a_restart_goes_back_to_its_node_to_be_deleted() {
        let s = store_with_node("n1");
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            ..spec(8, 0)
        };
        let a = s.submit_task(&vps, None, 0).unwrap();
        s.schedule().unwrap();
        report(&s, a, TaskState::Running).unwrap();
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        report(&s, a, TaskState::Stopped).unwrap();
        // Something else takes the cores; the restart waits, still naming its node.
        let other = s.submit_task(&spec(8, 0), None, 2).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![other]);
        let t = s.set_desired(a, Desired::Running, 3).unwrap();
        assert_eq!(t.state, TaskState::Pending);
        assert!(
            s.schedule().unwrap().is_empty(),
            "a queued restart reserves nothing"
        );
        let t = s.set_desired(a, Desired::Deleted, 4).unwrap();
        assert_eq!((t.state, t.desired), (TaskState::Stopped, Desired::Deleted));
        let asg = s.assignments("n1").unwrap();
        assert!(
            asg.tasks
                .iter()
                .any(|x| x.id == a && x.desired == Desired::Deleted),
            "its runner hears of the delete and removes the disk"
        );
    }

    /// VPS `vps` with one GPU runs and is stopped, then a command takes
    /// the first free GPU: the VPS, its first GPUs, the command and its GPUs.
    fn stopped_while_another_takes_a_gpu(
        s: &SqliteStore,
        vps: &TaskSpec,
    ) -> (
        u64,
        Vec<crate::topology::PciAddress>,
        u64,
        Vec<crate::topology::PciAddress>,
    ) {
        let a = s.submit_task(vps, None, 0).unwrap();
        s.schedule().unwrap();
        let first = s.get_task(a).unwrap().unwrap().placement.unwrap().gpus;
        report(s, a, TaskState::Running).unwrap();
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        report(s, a, TaskState::Stopped).unwrap();
        let b = s.submit_task(&spec(1, 1), None, 0).unwrap();
        s.schedule().unwrap();
        let taken = s.get_task(b).unwrap().unwrap().placement.unwrap().gpus;
        (a, first, b, taken)
    }

    #[test]
    fn a_restarted_vps_gets_the_gpus_its_container_was_made_with() {
        let s = store_with_node("n1");
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            ..spec(1, 1)
        };
        // While it is stopped, another instance takes the first free GPU ...
        let (a, first, b, taken) = stopped_while_another_takes_a_gpu(&s, &vps);
        assert_eq!(taken, first, "a stopped VPS holds no GPU");
        // ... so the VPS waits for its own rather than take another.
        s.restart(a, None).unwrap();
        assert!(s.schedule().unwrap().is_empty());
        let t = s.get_task(a).unwrap().unwrap();
        assert!(t.reason.contains("in use"), "{}", t.reason);
        report(&s, b, TaskState::Running).unwrap();
        report(&s, b, TaskState::Completed).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![a]);
        assert_eq!(
            s.get_task(a).unwrap().unwrap().placement.unwrap().gpus,
            first
        );
    }

    #[test]
    fn a_restarted_vm_takes_any_free_gpu() {
        let s = store_with("n1", true);
        let vm = TaskSpec {
            kind: crate::api::Kind::Vps,
            image: ImageSource::VmImage("mini".into()),
            ..spec(1, 1)
        };
        let (a, first, _, taken) = stopped_while_another_takes_a_gpu(&s, &vm);
        assert_eq!(taken, first);
        // Its domain is written anew at each start: another GPU will do.
        s.restart(a, None).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![a]);
        let again = s.get_task(a).unwrap().unwrap().placement.unwrap();
        assert_eq!((again.node.as_str(), again.gpus.len()), ("n1", 1));
        assert_ne!(again.gpus, first);
    }

    #[test]
    fn published_ports_are_held_until_delete_and_exposed_ones_join_them() {
        use crate::api::ports::PortRequest;
        let s = store_with_node("n1");
        s.set_published_ports(PortRange::parse("20000-20003").unwrap());
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            ports: vec![PortRequest::parse("8080").unwrap()],
            ..spec(1, 0)
        };
        let a = s.submit_task(&vps, None, 0).unwrap();
        s.schedule().unwrap();
        let placed = s.get_task(a).unwrap().unwrap().placement.unwrap();
        // Its image EXPOSEs 8080 (asked already) and two more.
        // 22 is the SSH server's: reached through the proxy, never published.
        let exposed = ["8080", "53/udp", "9000", "22"].map(|p| PortRequest::parse(p).unwrap());
        let p = s.expose("n1", a, &exposed).unwrap();
        assert_eq!(p.published.len(), 3);
        assert_eq!(p.published[0], placed.published[0], "what it had stays");
        let nodes: BTreeSet<u16> = p
            .published
            .iter()
            .map(|x| x.node_port)
            .chain(p.node_port)
            .collect();
        assert_eq!(nodes.len(), 4, "distinct node ports: {p:?}");
        let t = s.get_task(a).unwrap().unwrap();
        assert_eq!(t.spec.ports.len(), 3, "the spec says so, for restarts");
        let e = s.expose("n2", a, &exposed).unwrap_err().to_string();
        assert!(e.contains("not assigned"), "{e}");
        report(&s, a, TaskState::Running).unwrap();
        let e = s.expose("n1", a, &exposed).unwrap_err().to_string();
        assert!(e.contains("being made"), "{e}");
        // Stopped, it holds its three of the four: a second VPS with two waits.
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        report(&s, a, TaskState::Stopped).unwrap();
        let two = TaskSpec {
            ports: vec![
                PortRequest::parse("1").unwrap(),
                PortRequest::parse("2").unwrap(),
            ],
            ..vps.clone()
        };
        let b = s.submit_task(&two, None, 2).unwrap();
        s.schedule().unwrap();
        let t = s.get_task(b).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Pending);
        assert!(t.reason.contains("no free published port"), "{}", t.reason);
        // Restarted, it gets the same three back.
        s.restart(a, None).unwrap();
        s.schedule().unwrap();
        let again = s.get_task(a).unwrap().unwrap().placement.unwrap();
        let ext = |p: &Placement| p.published.iter().map(|x| x.external).collect::<Vec<_>>();
        assert_eq!(ext(&again), ext(&p));
        // Deleted, they go to the one waiting.
        report(&s, a, TaskState::Running).unwrap();
        s.set_desired(a, Desired::Deleted, 3).unwrap();
        report(&s, a, TaskState::Deleted).unwrap();
        s.schedule().unwrap();
        assert_eq!(s.get_task(b).unwrap().unwrap().state, TaskState::Assigning);
    }

    #[test]
    fn a_command_holds_its_published_ports_only_until_it_ends() {
        use crate::api::ports::PortRequest;
        let s = store_with_node("n1");
        s.set_published_ports(PortRange::parse("20000-20000").unwrap());
        let web = TaskSpec {
            ports: vec![PortRequest::parse("80").unwrap()],
            ..spec(1, 0)
        };
        let a = s.submit_task(&web, None, 0).unwrap();
        let b = s.submit_task(&web, None, 0).unwrap();
        s.schedule().unwrap();
        assert_eq!(s.get_task(b).unwrap().unwrap().state, TaskState::Pending);
        report(&s, a, TaskState::Running).unwrap();
        report(&s, a, TaskState::Completed).unwrap();
        s.schedule().unwrap();
        let t = s.get_task(b).unwrap().unwrap();
        assert_eq!(t.placement.unwrap().published[0].external, 20000);
    }

    #[test]
    fn a_user_holds_at_most_the_published_ports_the_cap_allows() {
        use crate::api::ports::PortRequest;
        let s = store_with_node("n1");
        s.set_published_per_user(3);
        let vps = |ports: &[&str]| TaskSpec {
            kind: crate::api::Kind::Vps,
            ports: ports
                .iter()
                .map(|p| PortRequest::parse(p).unwrap())
                .collect(),
            ..spec(1, 0)
        };
        let a = s.submit_task(&vps(&["1", "2"]), Some("alice"), 0).unwrap();
        let e = s
            .submit_task(&vps(&["3", "4"]), Some("alice"), 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hold 2 published ports") && e.contains("allows 3"),
            "{e}"
        );
        s.submit_task(&vps(&["3", "4"]), Some("bob"), 0).unwrap();
        s.submit_task(&vps(&["3", "4"]), None, 0).unwrap();
        // What its image EXPOSEs is cut to what the cap leaves.
        s.schedule().unwrap();
        let more = ["5", "6", "7"].map(|p| PortRequest::parse(p).unwrap());
        let p = s.expose("n1", a, &more).unwrap();
        assert_eq!(p.published.len(), 3, "{p:?}");
    }

    #[test]
    fn a_killed_vps_keeps_its_disk_restarts_and_only_delete_removes_it() {
        let s = store_with_node("n1");
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            ..spec(2, 0)
        };
        let a = s.submit_task(&vps, None, 0).unwrap();
        s.schedule().unwrap();
        report(&s, a, TaskState::Running).unwrap();
        s.set_desired(a, Desired::Killed, 1).unwrap();
        let t = report(&s, a, TaskState::Killed).unwrap();
        assert!(t.finished_at_unix_ms.is_some());
        assert!(
            !s.assignments("n1").unwrap().tasks.iter().any(|x| x.id == a),
            "an ended VPS is not its runner's business"
        );
        assert!(s.schedule().unwrap().is_empty(), "nothing to place");
        // Killed is no dead end for a VPS: it restarts on its node.
        let t = s.restart(a, None).unwrap();
        assert_eq!((t.state, t.finished_at_unix_ms), (TaskState::Pending, None));
        assert_eq!(s.schedule().unwrap(), vec![a]);
        let asg = s.assignments("n1").unwrap();
        let x = asg.tasks.iter().find(|x| x.id == a).unwrap();
        assert!(x.started, "the runner knows it ran before");
        report(&s, a, TaskState::Running).unwrap();
        report(&s, a, TaskState::Failed).unwrap();
        // Delete of an ended VPS goes to its node, which removes the disk.
        let t = s.set_desired(a, Desired::Deleted, 2).unwrap();
        assert_eq!((t.state, t.desired), (TaskState::Failed, Desired::Deleted));
        assert!(s
            .assignments("n1")
            .unwrap()
            .tasks
            .iter()
            .any(|x| x.id == a && x.desired == Desired::Deleted));
        let e = s.restart(a, None).unwrap_err().to_string();
        assert!(e.contains("not deleted"), "{e}");
        report(&s, a, TaskState::Deleted).unwrap();
        assert!(!s.assignments("n1").unwrap().tasks.iter().any(|x| x.id == a));
        let e = s
            .set_desired(a, Desired::Deleted, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("deleted"), "{e}");
        assert!(s.restart(a, None).is_err(), "nothing leaves deleted");
    }

    #[test]
    fn delete_is_for_a_vps_and_a_stopped_vps_is_not_killed() {
        let s = store_with_node("n1");
        let cmd = s.submit_task(&spec(1, 0), None, 0).unwrap();
        let e = s
            .set_desired(cmd, Desired::Deleted, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kill ends it"), "{e}");
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            ..spec(1, 0)
        };
        let a = s.submit_task(&vps, None, 0).unwrap();
        s.schedule().unwrap();
        report(&s, a, TaskState::Running).unwrap();
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        report(&s, a, TaskState::Stopped).unwrap();
        let e = s
            .set_desired(a, Desired::Killed, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vps delete"), "{e}");
        // Never placed (the command and `full` hold all 8 cores): deleted at once.
        let full = s.submit_task(&spec(7, 0), None, 0).unwrap();
        assert_eq!(s.schedule().unwrap(), vec![full]);
        let q = s.submit_task(&vps, None, 0).unwrap();
        assert!(s.schedule().unwrap().is_empty());
        let t = s.set_desired(q, Desired::Deleted, 3).unwrap();
        assert_eq!(t.state, TaskState::Deleted);
    }

    /// n1 reports VPS `id` stopped, with that stop parked as `snapshot`.
    fn stop_parked(s: &SqliteStore, id: u64, snapshot: &str) -> crate::api::TaskView {
        s.report_task(
            "n1",
            id,
            &TaskReport {
                state: TaskState::Stopped,
                exit_code: None,
                message: None,
                ssh_host_key: None,
                parked: Some(snapshot.into()),
            },
            2,
        )
        .unwrap()
    }

    /// A target of node `node`, any NUMA node and GPUs.
    fn target(node: &str) -> crate::api::Target {
        crate::api::Target {
            node: node.into(),
            numa: None,
            gpus: vec![],
        }
    }

    /// A VPS of `cores` cores with `target`, running on n1.
    fn running_vps(s: &SqliteStore, cores: u32, target: Option<crate::api::Target>) -> u64 {
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            target,
            ..spec(cores, 0)
        };
        let a = s.submit_task(&vps, None, 0).unwrap();
        s.schedule().unwrap();
        report(s, a, TaskState::Running).unwrap();
        a
    }

    #[test]
    fn a_stop_reported_after_its_node_was_lost_is_parked() {
        let s = store_with_node("n1");
        let a = running_vps(&s, 2, None);
        // The node goes silent; the user stops the VPS meanwhile.
        assert_eq!(s.mark_silent_offline(i64::MAX / 4, 3).unwrap(), ["n1"]);
        assert_eq!(s.get_task(a).unwrap().unwrap().state, TaskState::Lost);
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        // Back, the node stops it, parks the stop and says so.
        let t = stop_parked(&s, a, "9");
        assert_eq!(
            (t.state, t.parked.as_deref()),
            (TaskState::Stopped, Some("9"))
        );
    }

    #[test]
    fn a_vps_moves_only_stopped_and_from_the_parked_copy_of_its_last_stop() {
        let s = store_with_node("n1");
        let n1 = crate::api::Target {
            node: "n1".into(),
            numa: None,
            gpus: vec![],
        };
        let a = running_vps(&s, 2, Some(n1));
        let copy = |snapshot: &str| crate::api::Restore {
            snapshot: snapshot.into(),
            request: 5,
            parked: true,
            from: None,
        };
        let e = s.restart_anywhere(a, &copy("7")).unwrap_err().to_string();
        assert!(e.contains("once it is stopped"), "{e}");
        // Stopped with its stop parked.
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        let stopped = stop_parked(&s, a, "7");
        assert_eq!(stopped.parked.as_deref(), Some("7"));
        // (A stop its node reports after the host thought it lost, as when
        // a node comes back, is parked all the same.)
        let e = s.restart_anywhere(a, &copy("6")).unwrap_err().to_string();
        assert!(e.contains("not parked"), "an older copy: {e}");
        let t = s.restart_anywhere(a, &copy("7")).unwrap();
        assert_eq!(t.state, TaskState::Pending);
        assert_eq!(t.spec.target, None, "no longer pinned to n1");
        assert_eq!(t.spec.restore, Some(copy("7")));
        // A make that fails before it runs (the copy did not come) keeps
        // the copy for another try.
        s.schedule().unwrap();
        let failed = report(&s, a, TaskState::Failed).unwrap();
        assert_eq!(failed.parked.as_deref(), Some("7"));
        s.restart_anywhere(a, &copy("7")).unwrap();
        s.schedule().unwrap();
        // Once it runs, what it writes is newer than the copy: the copy is
        // no longer its state, even if it ends without a stop of its own.
        assert_eq!(report(&s, a, TaskState::Running).unwrap().parked, None);
        assert_eq!(report(&s, a, TaskState::Failed).unwrap().parked, None);
        let e = s.restart_anywhere(a, &copy("7")).unwrap_err().to_string();
        assert!(e.contains("not parked"), "{e}");
    }

    #[test]
    fn a_move_node_to_node_that_did_not_finish_keeps_where_it_comes_from() {
        let s = store_with_node("n1");
        add_node(&s, "n2", false);
        let a = running_vps(&s, 2, Some(target("n1")));
        let from = |node: &str, request: i64| crate::api::Restore {
            snapshot: "7".into(),
            request,
            parked: false,
            from: Some(node.into()),
        };
        s.set_desired(a, Desired::Stopped, 1).unwrap();
        report(&s, a, TaskState::Stopped).unwrap();
        // Only from the node it stopped on.
        let e = s
            .restart_anywhere(a, &from("n2", 5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not parked"), "{e}");
        // n1 fills up meanwhile: it lands on n2.
        let filler = TaskSpec {
            target: Some(target("n1")),
            ..spec(8, 0)
        };
        s.submit_task(&filler, None, 0).unwrap();
        s.schedule().unwrap();
        let t = s.restart_anywhere(a, &from("n1", 5)).unwrap();
        assert_eq!(t.spec.target, None, "no longer pinned to n1");
        assert_eq!(t.spec.restore, Some(from("n1", 5)));
        // It fails there before it runs (its snapshots did not come).
        let fail = |s: &SqliteStore| {
            s.schedule().unwrap();
            let node = s.get_task(a).unwrap().unwrap().placement.unwrap().node;
            assert_eq!(node, "n2");
            let r = TaskReport {
                state: TaskState::Failed,
                exit_code: None,
                message: None,
                ssh_host_key: None,
                parked: None,
            };
            s.report_task(&node, a, &r, 3).unwrap();
        };
        fail(&s);
        // A plain restart still comes from n1, on any node: n2 has no disk
        // of it.
        let t = s.restart(a, None).unwrap();
        assert_eq!(t.spec.restore, Some(from("n1", 5)));
        assert_eq!(t.spec.target, None);
        // So does another move from n1, although it is placed on n2.
        fail(&s);
        let t = s.restart_anywhere(a, &from("n1", 6)).unwrap();
        assert_eq!(t.spec.restore, Some(from("n1", 6)));
        // Once it runs where it landed, the move is done: its disk is there.
        s.schedule().unwrap();
        let r = TaskReport {
            state: TaskState::Running,
            exit_code: None,
            message: None,
            ssh_host_key: None,
            parked: None,
        };
        s.report_task("n2", a, &r, 4).unwrap();
        let from_none = crate::api::Restore {
            from: None,
            ..from("n1", 6)
        };
        assert_eq!(
            s.get_task(a).unwrap().unwrap().spec.restore,
            Some(from_none)
        );
        s.set_desired(a, Desired::Stopped, 5).unwrap();
        let r = TaskReport {
            state: TaskState::Stopped,
            ..r
        };
        s.report_task("n2", a, &r, 6).unwrap();
        let e = s
            .restart_anywhere(a, &from("n1", 7))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not parked"), "n1 no longer holds its disk: {e}");
        let t = s.restart(a, None).unwrap();
        assert_eq!(t.spec.restore, None, "a plain restart there");
        assert_eq!(t.spec.target, Some(target("n2")));
    }

    #[test]
    fn a_movable_vps_whose_node_is_full_moves_from_its_parked_copy() {
        let s = store_with_node("n1");
        add_node(&s, "n2", false);
        let n1 = crate::api::Target {
            node: "n1".into(),
            numa: None,
            gpus: vec![],
        };
        let vps = |movable: bool| {
            let spec = TaskSpec {
                kind: crate::api::Kind::Vps,
                target: Some(n1.clone()),
                movable,
                ..spec(2, 0)
            };
            let id = s.submit_task(&spec, None, 0).unwrap();
            s.schedule().unwrap();
            report(&s, id, TaskState::Running).unwrap();
            s.set_desired(id, Desired::Stopped, 1).unwrap();
            stop_parked(&s, id, "7");
            id
        };
        let (movable, pinned, restored) = (vps(true), vps(false), vps(true));
        // n1 fills up while they are stopped.
        let filler = TaskSpec {
            target: Some(n1.clone()),
            ..spec(8, 0)
        };
        let f = s.submit_task(&filler, None, 0).unwrap();
        s.schedule().unwrap();
        assert_eq!(s.get_task(f).unwrap().unwrap().state, TaskState::Assigning);
        s.restart(movable, None).unwrap();
        s.restart(pinned, None).unwrap();
        // One restored from a snapshot of its node must start there.
        let local = crate::api::Restore {
            snapshot: "7".into(),
            request: 3,
            parked: false,
            from: None,
        };
        s.restart(restored, Some(&local)).unwrap();
        s.schedule().unwrap();
        let t = s.get_task(movable).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Assigning, "{}", t.reason);
        assert_eq!(t.placement.as_ref().unwrap().node, "n2");
        assert!(t.reason.contains("moved from n1"), "{}", t.reason);
        let from = t.spec.restore.as_ref().unwrap();
        assert_eq!((from.snapshot.as_str(), from.parked), ("7", true));
        assert_eq!(t.spec.target, None);
        // n1 is told to remove what it left once the VPS is deleted.
        let left: i64 = s
            .with(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM left_behind WHERE task = ?1 AND node = 'n1'",
                    [movable as i64],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(left, 1);
        // Its start there fails (the copy did not come): a plain restart
        // tries the copy again, rather than a VPS without its disk.
        let failed = TaskReport {
            state: TaskState::Failed,
            exit_code: None,
            ssh_host_key: None,
            parked: None,
            message: None,
        };
        s.report_task("n2", movable, &failed, 3).unwrap();
        let again = s.restart(movable, None).unwrap();
        let from = again.spec.restore.as_ref().expect("the copy is kept");
        assert_eq!((from.snapshot.as_str(), from.parked), ("7", true));
        assert_eq!(
            again.spec.target, None,
            "not pinned to the node that failed"
        );
        for id in [pinned, restored] {
            let t = s.get_task(id).unwrap().unwrap();
            assert_eq!(t.state, TaskState::Pending, "{id} waits for n1");
            assert_eq!(t.placement.as_ref().unwrap().node, "n1");
        }
    }

    #[test]
    fn a_running_vps_restarts_by_stopping_then_queueing_again() {
        let s = store_with_node("n1");
        let vps = TaskSpec {
            kind: crate::api::Kind::Vps,
            ..spec(2, 0)
        };
        let a = s.submit_task(&vps, None, 0).unwrap();
        s.schedule().unwrap();
        report(&s, a, TaskState::Running).unwrap();
        let restore = crate::api::Restore {
            snapshot: "7".into(),
            request: 9,
            parked: false,
            from: None,
        };
        let t = s.restart(a, Some(&restore)).unwrap();
        assert_eq!(
            (t.state, t.desired),
            (TaskState::Running, Desired::Restarting)
        );
        let t = report(&s, a, TaskState::Stopped).unwrap();
        assert_eq!((t.state, t.desired), (TaskState::Pending, Desired::Running));
        assert_eq!(t.spec.restore, Some(restore), "the restore rides along");
        assert_eq!(s.schedule().unwrap(), vec![a]);
        let cmd = s.submit_task(&spec(1, 0), None, 0).unwrap();
        let e = s.restart(cmd, None).unwrap_err().to_string();
        assert!(e.contains("only a VPS restarts"), "{e}");
    }

    #[test]
    fn reports_follow_the_state_machine_and_the_node() {
        let s = store_with_node("n1");
        let a = s.submit_task(&spec(1, 0), None, 0).unwrap();
        s.schedule().unwrap();
        let before = s.revision().unwrap();
        let e = s
            .report_task(
                "n2",
                a,
                &TaskReport {
                    state: TaskState::Running,
                    exit_code: None,
                    ssh_host_key: None,
                    parked: None,
                    message: None,
                },
                0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("not assigned to node"), "{e}");
        let done = s
            .report_task(
                "n1",
                a,
                &TaskReport {
                    state: TaskState::Failed,
                    exit_code: Some(3),
                    ssh_host_key: None,
                    parked: None,
                    message: Some("exit 3".into()),
                },
                9,
            )
            .unwrap();
        assert_eq!(
            (done.exit_code, done.finished_at_unix_ms),
            (Some(3), Some(9))
        );
        assert!(s.revision().unwrap() > before);
        assert!(report(&s, a, TaskState::Running)
            .unwrap_err()
            .to_string()
            .contains("cannot go from failed"));
        assert!(
            s.assignments("n1").unwrap().tasks.is_empty(),
            "final tasks are not assigned"
        );
    }

    #[test]
    fn silent_nodes_lose_their_tasks_which_come_back_when_reported() {
        let s = store_with_node("n1");
        let a = s.submit_task(&spec(8, 0), None, 0).unwrap();
        s.schedule().unwrap();
        report(&s, a, TaskState::Running).unwrap();
        s.mark_silent_offline(i64::MAX / 2, 3).unwrap();
        assert_eq!(s.get_task(a).unwrap().unwrap().state, TaskState::Lost);
        // Lost keeps the reservation: nothing else lands on those cores.
        s.submit_task(&spec(1, 0), None, 0).unwrap();
        assert!(s.schedule().unwrap().is_empty());
        assert_eq!(
            report(&s, a, TaskState::Running).unwrap().state,
            TaskState::Running
        );
        let asg = s.assignments("n1").unwrap();
        assert_eq!(asg.tasks.len(), 1);
        assert_eq!(asg.tasks[0].placement.cpus.len(), 8);
    }
}
