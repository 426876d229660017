//! The host's state behind a narrow trait, with SQLite (WAL, versioned
//! migrations) as the embedded backend. A PostgreSQL backend for an HA
//! control plane would implement the same trait.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::{params, Connection, OptionalExtension};

mod tasks;

use super::auth::{Principal, Role};
use crate::api::ports::PortRange;
use crate::api::{
    Assignments, Desired, HeartbeatRequest, NodeState, NodeView, RegisterRequest, Restore,
    TaskReport, TaskSpec, TaskState, TaskView, UserView,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("database migration to version {version} failed: {source}")]
    Migration {
        version: usize,
        source: rusqlite::Error,
    },
    #[error("database is at schema version {found}, newer than this rivernode ({known}); upgrade rivernode")]
    TooNew { found: usize, known: usize },
    #[error("node {0:?} is already registered")]
    NodeExists(String),
    #[error("{0}")]
    Refused(String),
    #[error("no task {0}")]
    NoTask(u64),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooMany(String),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored JSON in {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// What the host needs from its store. Every method is one transaction.
pub trait Store: Send + Sync + 'static {
    fn insert_token(&self, hash: &str, role: Role, label: &str) -> Result<(), StoreError>;
    fn has_token_with_role(&self, role: Role) -> Result<bool, StoreError>;
    fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError>;
    /// `find_token` answered from memory, without waiting for the database;
    /// `None` when that cannot be done now (call `find_token`).
    fn find_token_now(&self, _hash: &str) -> Option<Option<Principal>> {
        None
    }
    /// Adds a user with their first token (`Conflict` if the name is taken).
    fn add_user(
        &self,
        name: &str,
        role: crate::api::PersonRole,
        group: Option<&str>,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Sets (replaces) the quota of a user or group; all caps `None` removes it.
    fn set_quota(
        &self,
        scope: crate::api::QuotaScope,
        name: &str,
        caps: &crate::api::QuotaCaps,
    ) -> Result<(), StoreError>;
    /// Every quota with what its user or group holds now.
    fn quotas(&self) -> Result<Vec<crate::api::QuotaView>, StoreError>;
    /// Records an invitation (the hash of its code) for one person.
    fn add_invitation(
        &self,
        code_hash: &str,
        role: crate::api::PersonRole,
        group: Option<&str>,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Whether the invitation with this code hash may be redeemed now;
    /// `Refused` saying why not.
    fn check_invitation(&self, code_hash: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Makes user `name` with the invitation's role and group and their
    /// token, and spends the invitation, in one transaction. `Refused`
    /// when the code is unknown, used or expired.
    fn redeem_invitation(
        &self,
        code_hash: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    fn list_users(&self) -> Result<Vec<UserView>, StoreError>;
    /// Removes a user and revokes their tokens; their tasks that ran stay
    /// (the admin sees them), their requests that never ran end.
    fn remove_user(&self, name: &str) -> Result<bool, StoreError>;
    /// Changes a person's role and group (`None`: unchanged; `Some(None)`:
    /// no group); `false` if there is no such user.
    fn set_person(
        &self,
        name: &str,
        role: Option<crate::api::PersonRole>,
        group: Option<Option<&str>>,
    ) -> Result<bool, StoreError>;
    /// Every invitation, newest first.
    fn list_invitations(&self) -> Result<Vec<crate::api::InvitationView>, StoreError>;
    /// Revokes the unused invitation whose id is `id`.
    fn revoke_invitation(&self, id: &str) -> Result<(), StoreError>;
    /// The variables user `name` gives each instance they make; `None`
    /// when there is no such user.
    fn user_env(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, StoreError>;
    /// Sets `set` and removes `unset` of user `name`'s variables in one
    /// transaction; the variables after it, or `None` for no such user.
    fn change_user_env(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<Option<BTreeMap<String, String>>, StoreError>;
    /// Replaces every admin token with `hash`.
    fn rotate_admin_token(&self, hash: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Replaces the metrics token (Prometheus's) with `hash`.
    fn rotate_metrics_token(&self, hash: &str, now_ms: i64) -> Result<(), StoreError>;
    /// The hashes of the tokens that may read /metrics (runners accept them).
    fn metrics_keys(&self) -> Vec<String>;
    /// Tasks by state and kind, and the queue, for /metrics.
    fn task_counts(&self) -> Result<TaskCounts, StoreError>;
    /// Gives a user a new token valid until `expires_at_ms` (none: no
    /// expiry) and revokes their others; `false` if there is no such user.
    fn rotate_user_token(
        &self,
        name: &str,
        token_hash: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Adds a node with its credential hash and the token the host uses on its runner.
    fn register_node(
        &self,
        req: &RegisterRequest,
        credential_hash: &str,
        host_token: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Records a heartbeat (and whether the node is degraded); returns the
    /// state the node was in before, `None` if unknown.
    fn heartbeat(
        &self,
        name: &str,
        hb: &HeartbeatRequest,
        now_ms: i64,
    ) -> Result<Option<NodeState>, StoreError>;
    fn list_nodes(&self) -> Result<Vec<NodeView>, StoreError>;
    fn get_node(&self, name: &str) -> Result<Option<NodeView>, StoreError>;
    /// The runner URL and the token the host presents to it.
    fn runner_access(&self, name: &str) -> Result<Option<(String, String)>, StoreError>;
    /// Marks offline every online node silent for `missed` of its own intervals.
    fn mark_silent_offline(&self, now_ms: i64, missed: u32) -> Result<Vec<String>, StoreError>;
    /// Removes a node for good: its credential is revoked, its tasks end
    /// (a new holder of the name inherits none of them), and the name
    /// registers again only with a join token made after now.
    /// Forgets node `name`, ending its tasks; the VPS whose disks stay on
    /// that machine (none: no such node).
    fn delete_node(&self, name: &str, now_ms: i64) -> Result<Option<Vec<u64>>, StoreError>;
    /// Replaces every join token with `hash`, valid until `expires_at_ms` (none: no expiry).
    fn rotate_join_token(
        &self,
        hash: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Queues a task for `owner` (none: the admin); refused if it can never
    /// run. Returns its id.
    fn submit_task(
        &self,
        spec: &TaskSpec,
        owner: Option<&str>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.submit_task_capped(spec, owner, u32::MAX, false, now_ms)
    }
    /// `submit_task`, refused (`TooMany`) when a user already has
    /// `max_waiting` tasks waiting (to be placed or approved); the admin is
    /// not capped. With `needs_approval` it waits in `pending_approval`.
    fn submit_task_capped(
        &self,
        spec: &TaskSpec,
        owner: Option<&str>,
        max_waiting: u32,
        needs_approval: bool,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// An operator's yes to a task waiting for approval: it is queued.
    fn approve(&self, id: u64, by: &str) -> Result<TaskView, StoreError>;
    /// An operator's no, with the reason its owner will read.
    fn reject(&self, id: u64, by: &str, reason: &str, now_ms: i64) -> Result<TaskView, StoreError>;
    /// Places queued tasks in submission order; returns the ids placed.
    fn schedule(&self) -> Result<Vec<u64>, StoreError>;
    /// Moves the idle clocks of `node`'s GPU VPS by its GPU readings; the
    /// warnings put up or taken down and the stops, by task.
    fn review_idle(
        &self,
        node: &str,
        samples: &[crate::topology::nvml::GpuSample],
        policy: &crate::host::idle::IdlePolicy,
        now_ms: i64,
    ) -> Result<Vec<(u64, crate::host::idle::IdleStep)>, StoreError>;
    /// An operator's exemption of a VPS from idle-GPU reclamation (or its end).
    fn set_idle_exempt(&self, id: u64, exempt: bool) -> Result<TaskView, StoreError>;
    fn get_task(&self, id: u64) -> Result<Option<TaskView>, StoreError>;
    /// Tasks, filtered by state, node and owner when given.
    fn list_tasks(
        &self,
        state: Option<TaskState>,
        node: Option<&str>,
        owner: Option<&str>,
    ) -> Result<Vec<TaskView>, StoreError>;
    /// Records what the user wants; a queued task that is killed ends at once.
    fn set_desired(&self, id: u64, desired: Desired, now_ms: i64) -> Result<TaskView, StoreError>;
    /// Restarts a VPS (stopped: queued again; running or paused: stopped
    /// first), restoring its disk from a snapshot when `restore` says so.
    fn restart(&self, id: u64, restore: Option<&Restore>) -> Result<TaskView, StoreError>;
    /// `vps restart --anywhere`: a stopped VPS queued for any node, from its parked copy.
    fn restart_anywhere(&self, id: u64, restore: &Restore) -> Result<TaskView, StoreError>;
    /// Node `node` removed what VPS `id` left there when it moved away.
    fn left_removed(&self, node: &str, id: u64) -> Result<(), StoreError>;
    /// What `node` must run, with the current revision.
    fn assignments(&self, node: &str) -> Result<Assignments, StoreError>;
    /// Applies a runner's report for a task on its node.
    fn report_task(
        &self,
        node: &str,
        id: u64,
        report: &TaskReport,
        now_ms: i64,
    ) -> Result<TaskView, StoreError>;
    /// Publishes the ports of `exposed` a VPS being made on `node` lacks
    /// (its image's EXPOSE); its placement after.
    fn expose(
        &self,
        node: &str,
        id: u64,
        exposed: &[crate::api::ports::PortRequest],
    ) -> Result<crate::api::Placement, StoreError>;
    fn revision(&self) -> Result<u64, StoreError>;
    /// `node`'s slot in the overlay range (its subnet's index), given the
    /// lowest free one below `slots` if it has none.
    fn overlay_slot(&self, node: &str, slots: u32) -> Result<u32, StoreError>;
    /// Every node that has an overlay slot, with what the mesh needs of it
    /// (read without the nodes' inventories: every heartbeat asks).
    fn overlay_members(&self) -> Result<Vec<OverlayMember>, StoreError>;
    /// The overlay group of each owner (`""` for the admin), given the
    /// lowest free one (1 to 65535) to those that have none.
    fn overlay_groups(&self, owners: &[String]) -> Result<BTreeMap<String, u16>, StoreError>;
}

/// A node of the overlay as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayMember {
    pub node: String,
    pub runner_url: String,
    pub state: NodeState,
    /// Its subnet's index in the cluster range.
    pub slot: u32,
}

/// Schema versions, applied in order; `PRAGMA user_version` records the last.
const MIGRATIONS: &[&str] = &[
    // 1: nodes and tokens.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        runner_url TEXT NOT NULL,
        host_token TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('online', 'offline')),
        version TEXT NOT NULL,
        registered_at_ms INTEGER NOT NULL,
        last_heartbeat_ms INTEGER NOT NULL,
        heartbeat_interval_ms INTEGER NOT NULL,
        inventory TEXT NOT NULL,
        usage TEXT
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'join', 'node')),
        node TEXT REFERENCES nodes(name) ON DELETE CASCADE,
        label TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );",
    // 2: tasks, and the revision counter runners long-poll on.
    "CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL DEFAULT 'command',
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        desired TEXT NOT NULL,
        node TEXT,
        placement TEXT,
        reason TEXT NOT NULL DEFAULT '',
        exit_code INTEGER,
        message TEXT,
        submitted_at_ms INTEGER NOT NULL,
        started_at_ms INTEGER,
        finished_at_ms INTEGER
    );
    CREATE INDEX tasks_by_state ON tasks(state);
    CREATE INDEX tasks_by_node ON tasks(node);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
    // 3: the SSH host key a VPS's runner reported.
    "ALTER TABLE tasks ADD COLUMN ssh_host_key TEXT;",
    // 4: users, their tokens, and who owns each task (NULL: the admin). A
    // removed user's row stays, so the name never passes to someone else
    // with the old owner's tasks. SQLite cannot change a CHECK constraint in
    // place: tokens is rebuilt.
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        created_at_ms INTEGER NOT NULL,
        removed_at_ms INTEGER
    );
    CREATE TABLE tokens_v4 (
        id INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'join', 'node', 'user')),
        node TEXT REFERENCES nodes(name) ON DELETE CASCADE,
        user TEXT REFERENCES users(name) ON DELETE CASCADE,
        label TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    INSERT INTO tokens_v4 (id, hash, role, node, label, created_at_ms)
        SELECT id, hash, role, node, label, created_at_ms FROM tokens;
    DROP TABLE tokens;
    ALTER TABLE tokens_v4 RENAME TO tokens;
    ALTER TABLE tasks ADD COLUMN owner TEXT;
    CREATE INDEX tasks_by_owner ON tasks(owner);",
    // 5: the hash of the key a runner registered with, so that it can
    // register again after a lost answer.
    "ALTER TABLE nodes ADD COLUMN registration_key_hash TEXT;",
    // 6: tokens that expire (join tokens), and the names of removed nodes:
    // such a name registers again only with a join token made after it was
    // removed, and inherits nothing.
    "ALTER TABLE tokens ADD COLUMN expires_at_ms INTEGER;
    CREATE TABLE removed_nodes (name TEXT PRIMARY KEY, removed_at_ms INTEGER NOT NULL);",
    // 7: why an online node cannot start instances (its runner says so on
    // every beat while it lasts).
    "ALTER TABLE nodes ADD COLUMN degraded TEXT;",
    // 8: variables a user gives every instance they make (Vast.ai's
    // account-level environment).
    "CREATE TABLE user_env (
        user TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (user, key)
    );",
    // 9: what each person's tokens may do (their tokens keep role 'user';
    // the person's role is read with them).
    "ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'user'
        CHECK (role IN ('viewer', 'user', 'operator'));",
    // 10: groups of users and the quotas of users and groups (no row: no limit).
    "ALTER TABLE users ADD COLUMN grp TEXT;
    CREATE TABLE quotas (
        scope TEXT NOT NULL CHECK (scope IN ('user', 'group')),
        name TEXT NOT NULL,
        gpus INTEGER,
        vps INTEGER,
        cores INTEGER,
        memory_bytes INTEGER,
        PRIMARY KEY (scope, name)
    );",
    // 11: one-time invitation codes (their hashes), each making one person.
    "CREATE TABLE invitations (
        code_hash TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('viewer', 'user', 'operator')),
        grp TEXT,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        used_at_ms INTEGER,
        used_by TEXT
    );",
    // 12: idle-GPU reclamation: each VPS's idle clock, the warning its
    // owner reads, and an operator's exemption.
    "ALTER TABLE tasks ADD COLUMN idle_since_ms INTEGER;
    ALTER TABLE tasks ADD COLUMN idle_seen_ms INTEGER;
    ALTER TABLE tasks ADD COLUMN idle_warned_ms INTEGER;
    ALTER TABLE tasks ADD COLUMN idle_exempt INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN notice TEXT;",
    // 13: GPU time quotas, and the ledger they are counted from: each
    // stretch a person's task held GPUs (end NULL: it still does).
    "ALTER TABLE quotas ADD COLUMN gpu_seconds INTEGER;
    ALTER TABLE quotas ADD COLUMN period_s INTEGER;
    CREATE TABLE gpu_use (
        task INTEGER NOT NULL,
        owner TEXT NOT NULL,
        gpus INTEGER NOT NULL,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER
    );
    CREATE INDEX gpu_use_end ON gpu_use (end_ms);",
    // 14: a token that reads /metrics only (Prometheus's): tokens is
    // rebuilt, its role check widened.
    "CREATE TABLE tokens_v14 (
        id INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'join', 'node', 'user', 'metrics')),
        node TEXT REFERENCES nodes(name) ON DELETE CASCADE,
        user TEXT REFERENCES users(name) ON DELETE CASCADE,
        label TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER
    );
    INSERT INTO tokens_v14 (id, hash, role, node, user, label, created_at_ms, expires_at_ms)
        SELECT id, hash, role, node, user, label, created_at_ms, expires_at_ms FROM tokens;
    DROP TABLE tokens;
    ALTER TABLE tokens_v14 RENAME TO tokens;",
    // 15: the overlay: each node's subnet (its slot in the cluster range)
    // and each owner's group policy id, kept so they never change.
    "CREATE TABLE overlay_slots (node TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE);
    CREATE TABLE overlay_groups (owner TEXT PRIMARY KEY, grp INTEGER NOT NULL UNIQUE);",
    // 16: tasks.kind was never written (every row said 'command'): a
    // task's kind is its spec's, which is what every query reads.
    "ALTER TABLE tasks DROP COLUMN kind;",
    // 17: the snapshot of a stopped VPS's last stop that the host keeps a
    // copy of (`park_stopped_vps`), for `vps restart --anywhere`.
    "ALTER TABLE tasks ADD COLUMN parked TEXT;",
    // 18: the nodes a VPS moved away from, which still hold its old
    // container and snapshots until it is deleted and they removed them.
    "CREATE TABLE left_behind (task INTEGER NOT NULL, node TEXT NOT NULL, PRIMARY KEY (task, node));",
];

/// What `/metrics` says of the tasks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskCounts {
    /// (state, kind, how many).
    pub by_state: Vec<(String, String, u64)>,
    /// When the longest-waiting never-started queued task was submitted.
    pub oldest_waiting_since: Option<i64>,
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
    tokens: TokenCache,
    /// Where published ports get their external ports (`published_ports`).
    published_ports: RwLock<PortRange>,
    /// How many one user's VPS may publish (`max_published_ports_per_user`).
    published_per_user: std::sync::atomic::AtomicUsize,
}

/// Every token (hash, whom it is for, expiry) in memory, so that checking a
/// request's token, anonymous and bogus ones included, never waits for the
/// database's one connection behind heartbeats and submissions (F12).
/// SQLite's update hook marks it `dirty` on any change to `tokens` (or `users`: roles), so no
/// write path can forget to, and the writer reads the table again before
/// it lets go of the connection: its caller (who alone could know a new
/// token yet) hears of the change only once the map holds it. A lookup
/// meanwhile reads the map as it was before that write, as if it had come
/// first. Only a failed reload (`stale`) sends lookups to the database.
#[derive(Default)]
struct TokenCache {
    dirty: Arc<AtomicBool>,
    stale: AtomicBool,
    map: RwLock<HashMap<String, (Principal, Option<i64>)>>,
}

impl TokenCache {
    fn lookup(&self, hash: &str, now_ms: i64) -> Option<Option<Principal>> {
        if self.stale.load(Ordering::Acquire) {
            return None;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        Some(
            map.get(hash)
                .filter(|(_, expires)| expires.is_none_or(|e| e > now_ms))
                .map(|(p, _)| p.clone()),
        )
    }

    /// After a write (connection held): the map follows what it changed.
    fn follow(&self, c: &Connection) {
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.reload(c) {
                tracing::error!(error = %crate::error_chain(&e), "cannot read the tokens again: checking them in the database");
                self.stale.store(true, Ordering::Release);
            }
        }
    }

    /// Reads the table again; called with the connection held, so no write
    /// can come between the read and clearing the mark. The mark is cleared
    /// only once the new map is in place: a lookup that found it clear
    /// earlier read the old map, which lacked the newest tokens (the admin's,
    /// just after the host started), and refused them.
    fn reload(&self, c: &Connection) -> Result<(), StoreError> {
        let mut stmt = c.prepare(
            "SELECT t.hash, t.role, t.node, t.user, t.expires_at_ms, u.role
             FROM tokens t LEFT JOIN users u ON u.name = t.user",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?;
        let mut map = HashMap::new();
        for row in rows {
            let (hash, role, node, user, expires, person) = row?;
            // A person's token carries the person's role.
            let role = match (role.as_str(), person) {
                ("user", Some(person)) => person,
                (role, _) => role.to_string(),
            };
            if let Some(role) = Role::parse(&role) {
                map.insert(hash, (Principal { role, node, user }, expires));
            }
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
        self.stale.store(false, Ordering::Release);
        Ok(())
    }
}

/// The role and group of an invitation that may be redeemed now; `Refused`
/// for one unknown, used or expired.
fn usable_invitation(
    c: &Connection,
    code_hash: &str,
    now_ms: i64,
) -> Result<(crate::api::PersonRole, Option<String>), StoreError> {
    let found: Option<(String, Option<String>, i64, Option<i64>)> = c
        .query_row(
            "SELECT role, grp, expires_at_ms, used_at_ms FROM invitations WHERE code_hash = ?1",
            [code_hash],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    match found {
        None => Err(StoreError::Refused("no such invitation".into())),
        Some((_, _, _, Some(_))) => Err(StoreError::Refused(
            "this invitation was used; ask the admin for a new one".into(),
        )),
        Some((_, _, expires, None)) if expires <= now_ms => Err(StoreError::Refused(
            "this invitation expired; ask the admin for a new one".into(),
        )),
        // The table's CHECK keeps the role one of the three.
        Some((role, group, _, None)) => Ok((role.parse().unwrap_or_default(), group)),
    }
}

/// Adds person `name` with their first token; a name in use, or once used
/// by a removed user, is refused.
fn insert_user(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    role: crate::api::PersonRole,
    group: Option<&str>,
    token_hash: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let added = tx.execute(
        "INSERT INTO users (name, created_at_ms, role, grp) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
        params![name, now_ms, role.as_str(), group],
    )?;
    if added == 0 {
        let removed: Option<i64> = tx.query_row(
            "SELECT removed_at_ms FROM users WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        return Err(StoreError::Conflict(match removed {
            None => format!(
                "user {name:?} exists; `rivernode user remove {name}` first to give them a new token"
            ),
            Some(_) => format!(
                "user name {name:?} belonged to a removed user and is never given out again (their tasks keep it): choose another"
            ),
        }));
    }
    tx.execute(
        "INSERT INTO tokens (hash, role, user, label, created_at_ms) VALUES (?1, 'user', ?2, 'user token', ?3)",
        params![token_hash, name, now_ms],
    )?;
    Ok(())
}

/// The host's external ports for published ports, unless configured:
/// below the node ports and the kernel's ephemeral ports, so that neither
/// a node on the host's machine nor an outgoing connection takes them.
pub const DEFAULT_PUBLISHED_PORTS: PortRange = PortRange {
    first: 20000,
    last: 29999,
};

impl SqliteStore {
    /// The one token of a cluster-wide role (the admin's, the metrics
    /// token) replaced by `hash`, in one transaction.
    fn replace_role_token(&self, role: Role, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM tokens WHERE role = ?1", [role.as_str()])?;
            tx.execute(
                "INSERT INTO tokens (hash, role, label, created_at_ms) VALUES (?1, ?2, ?2, ?3)",
                params![hash, role.as_str(), now_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}

impl SqliteStore {
    /// Sets how many ports one user's VPS may publish in all.
    pub fn set_published_per_user(&self, n: usize) {
        self.published_per_user.store(n, Ordering::Relaxed);
    }

    /// Sets the range published ports' external ports come from.
    pub fn set_published_ports(&self, range: PortRange) {
        *self
            .published_ports
            .write()
            .unwrap_or_else(|p| p.into_inner()) = range;
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        Self::init(conn).map_err(|e| match e {
            StoreError::Sql(source) => open_err(source),
            other => other,
        })
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // FULL: a commit the host has answered survives a power loss too
        // (NORMAL in WAL mode may drop the last ones): an accepted task is
        // never forgotten. The host's write rate makes the fsync cheap.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        let tokens = TokenCache::default();
        tokens.reload(&conn)?;
        let dirty = tokens.dirty.clone();
        conn.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| {
                // A person's token carries the person's role: a change
                // to either table is read again.
                if table == "tokens" || table == "users" {
                    dirty.store(true, Ordering::Release);
                }
            },
        ));
        Ok(Self {
            conn: Mutex::new(conn),
            tokens,
            published_ports: RwLock::new(DEFAULT_PUBLISHED_PORTS),
            published_per_user: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (transactions roll back on drop), so a poisoned lock is safe to reuse.
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut guard);
        self.tokens.follow(&guard);
        out
    }
}

/// The most variables a user may give their instances, and their size.
pub const MAX_USER_VARS: usize = 128;
pub const MAX_USER_ENV_BYTES: usize = 64 << 10;

/// Whether user `name` exists and was not removed.
fn user_present(c: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(c.query_row(
        "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?1 AND removed_at_ms IS NULL)",
        [name],
        |r| r.get(0),
    )?)
}

/// A present user's variables; `None` when there is no such user.
fn read_user_env(
    c: &Connection,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, StoreError> {
    if !user_present(c, name)? {
        return Ok(None);
    }
    let mut stmt = c.prepare("SELECT key, value FROM user_env WHERE user = ?1")?;
    let rows = stmt.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Some(rows.collect::<Result<_, _>>()?))
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i + 1;
        let tx = conn
            .transaction()
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.execute_batch(sql)
            .and_then(|_| tx.pragma_update(None, "user_version", version))
            .and_then(|_| tx.commit())
            .map_err(|source| StoreError::Migration { version, source })?;
    }
    Ok(())
}

pub(super) fn to_json<T: serde::Serialize>(
    what: &'static str,
    v: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|source| StoreError::Json { what, source })
}

pub(super) const NODE_COLUMNS: &str = "name, state, runner_url, version, registered_at_ms, last_heartbeat_ms, heartbeat_interval_ms, inventory, usage, degraded";

/// Inventories decoded, by their stored text: every scheduling pass reads
/// every node, and a node's inventory changes rarely, so its JSON is parsed
/// once, not once a pass. Keyed by the whole text (no hash collision can
/// hand one node another's inventory); emptied when it grows past a bound.
fn decode_inventory(text: String) -> Result<crate::topology::Inventory, serde_json::Error> {
    use std::sync::OnceLock;
    const MAX: usize = 8192;
    static DECODED: OnceLock<Mutex<HashMap<String, crate::topology::Inventory>>> = OnceLock::new();
    let cache = DECODED.get_or_init(Default::default);
    if let Some(inv) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&text) {
        return Ok(inv.clone());
    }
    let inv: crate::topology::Inventory = serde_json::from_str(&text)?;
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX {
        map.clear();
    }
    map.insert(text, inv.clone());
    Ok(inv)
}

pub(super) fn node_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<Result<NodeView, StoreError>> {
    let state: String = row.get(1)?;
    let inventory: String = row.get(7)?;
    let usage: Option<String> = row.get(8)?;
    let inventory = match decode_inventory(inventory) {
        Ok(i) => i,
        Err(source) => {
            return Ok(Err(StoreError::Json {
                what: "nodes.inventory",
                source,
            }))
        }
    };
    let usage = match usage.map(|u| serde_json::from_str(&u)).transpose() {
        Ok(u) => u,
        Err(source) => {
            return Ok(Err(StoreError::Json {
                what: "nodes.usage",
                source,
            }))
        }
    };
    let degraded: Option<String> = row.get(9)?;
    Ok(Ok(NodeView {
        name: row.get(0)?,
        state: match (state.as_str(), &degraded) {
            ("online", None) => NodeState::Online,
            ("online", Some(_)) => NodeState::Degraded,
            _ => NodeState::Offline,
        },
        degraded,
        runner_url: row.get(2)?,
        version: row.get(3)?,
        registered_at_unix_ms: row.get(4)?,
        last_heartbeat_unix_ms: row.get(5)?,
        heartbeat_interval_ms: row.get::<_, i64>(6)?.max(0) as u64,
        inventory,
        usage,
        gpu_holders: Default::default(),
    }))
}

impl Store for SqliteStore {
    fn insert_token(&self, hash: &str, role: Role, label: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, role, node, label, created_at_ms) VALUES (?1, ?2, NULL, ?3, ?4)",
                params![hash, role.as_str(), label, crate::now_unix_ms()],
            )?;
            Ok(())
        })
    }

    fn has_token_with_role(&self, role: Role) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT EXISTS(SELECT 1 FROM tokens WHERE role = ?1)",
                [role.as_str()],
                |r| r.get(0),
            )?)
        })
    }

    fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        let now = crate::now_unix_ms();
        if let Some(found) = self.tokens.lookup(hash, now) {
            return Ok(found);
        }
        self.with(|c| {
            if self.tokens.stale.load(Ordering::Acquire) {
                self.tokens.reload(c)?;
            }
            Ok(self.tokens.lookup(hash, now).flatten())
        })
    }

    fn find_token_now(&self, hash: &str) -> Option<Option<Principal>> {
        self.tokens.lookup(hash, crate::now_unix_ms())
    }

    fn add_user(
        &self,
        name: &str,
        role: crate::api::PersonRole,
        group: Option<&str>,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            insert_user(&tx, name, role, group, token_hash, now_ms)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn add_invitation(
        &self,
        code_hash: &str,
        role: crate::api::PersonRole,
        group: Option<&str>,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO invitations (code_hash, role, grp, created_at_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![code_hash, role.as_str(), group, now_ms, expires_at_ms],
            )?;
            Ok(())
        })
    }

    fn check_invitation(&self, code_hash: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| usable_invitation(c, code_hash, now_ms).map(|_| ()))
    }

    fn redeem_invitation(
        &self,
        code_hash: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let (role, group) = usable_invitation(&tx, code_hash, now_ms)?;
            insert_user(&tx, name, role, group.as_deref(), token_hash, now_ms)?;
            tx.execute(
                "UPDATE invitations SET used_at_ms = ?2, used_by = ?3 WHERE code_hash = ?1",
                params![code_hash, now_ms, name],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn set_quota(
        &self,
        scope: crate::api::QuotaScope,
        name: &str,
        caps: &crate::api::QuotaCaps,
    ) -> Result<(), StoreError> {
        self.with(|c| tasks::set_quota(c, scope, name, caps))
    }

    fn quotas(&self) -> Result<Vec<crate::api::QuotaView>, StoreError> {
        self.with(|c| tasks::quota_views(c, crate::now_unix_ms()))
    }

    fn list_users(&self) -> Result<Vec<UserView>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT u.name, u.created_at_ms, u.role, u.grp,
                   (SELECT COUNT(*) FROM tasks t WHERE t.owner = u.name
                      AND t.state NOT IN ('completed', 'failed', 'killed', 'killed_oom', 'deleted', 'rejected'))
                 FROM users u WHERE u.removed_at_ms IS NULL ORDER BY u.name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(UserView {
                    name: r.get(0)?,
                    created_at_unix_ms: r.get(1)?,
                    // The table's CHECK keeps it one of the three.
                    role: r.get::<_, String>(2)?.parse().unwrap_or_default(),
                    group: r.get(3)?,
                    active_tasks: r.get::<_, i64>(4)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let removed = tx.execute(
                "UPDATE users SET removed_at_ms = ?2 WHERE name = ?1 AND removed_at_ms IS NULL",
                params![name, crate::now_unix_ms()],
            )? > 0;
            tx.execute("DELETE FROM tokens WHERE user = ?1", [name])?;
            tx.execute("DELETE FROM user_env WHERE user = ?1", [name])?;
            if removed {
                // Requests that never ran would run for nobody: they end.
                // What ran (a VPS's disk) stays, for the admin to end.
                let now = crate::now_unix_ms();
                tx.execute(
                    "UPDATE tasks SET state = 'rejected', desired = 'killed', reason = 'rejected',
                     message = 'its owner was removed', finished_at_ms = ?2
                     WHERE owner = ?1 AND state = 'pending_approval'",
                    params![name, now],
                )?;
                tx.execute(
                    "UPDATE tasks SET state = 'killed', desired = 'killed',
                     reason = 'killed while queued: its owner was removed', finished_at_ms = ?2
                     WHERE owner = ?1 AND state = 'pending' AND started_at_ms IS NULL",
                    params![name, now],
                )?;
                tasks::bump(&tx)?;
            }
            tx.commit()?;
            Ok(removed)
        })
    }

    fn set_person(
        &self,
        name: &str,
        role: Option<crate::api::PersonRole>,
        group: Option<Option<&str>>,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let found = tx.execute(
                "UPDATE users SET role = COALESCE(?2, role),
                 grp = CASE WHEN ?3 THEN ?4 ELSE grp END
                 WHERE name = ?1 AND removed_at_ms IS NULL",
                params![
                    name,
                    role.map(|r| r.as_str()),
                    group.is_some(),
                    group.flatten()
                ],
            )? > 0;
            // A new group's quota applies to what waits now.
            tasks::bump(&tx)?;
            tx.commit()?;
            Ok(found)
        })
    }

    fn list_invitations(&self) -> Result<Vec<crate::api::InvitationView>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT code_hash, role, grp, created_at_ms, expires_at_ms, used_by FROM invitations
                 ORDER BY created_at_ms DESC",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (hash, role, group, created, expires, used_by) = row?;
                out.push(crate::api::InvitationView {
                    id: crate::api::invitation_id(&hash),
                    role: role.parse().unwrap_or_default(),
                    group,
                    created_at_unix_ms: created,
                    expires_at_unix_ms: expires,
                    used_by,
                });
            }
            Ok(out)
        })
    }

    fn revoke_invitation(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let found: Vec<(String, Option<String>)> = tx
                .prepare("SELECT code_hash, used_by FROM invitations WHERE substr(code_hash, 1, 12) = ?1")?
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            match &found[..] {
                [] => Err(StoreError::Refused(format!(
                    "no invitation {id:?}; `rivernode user invitations` lists them"
                ))),
                [(_, Some(by))] => Err(StoreError::Conflict(format!(
                    "invitation {id} was used already (by {by}); `rivernode user remove {by}` undoes that"
                ))),
                [(hash, None)] => {
                    tx.execute("DELETE FROM invitations WHERE code_hash = ?1", [hash])?;
                    tx.commit()?;
                    Ok(())
                }
                _ => Err(StoreError::Conflict(format!(
                    "{id:?} names more than one invitation"
                ))),
            }
        })
    }

    fn user_env(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        self.with(|c| read_user_env(c, name))
    }

    fn change_user_env(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if read_user_env(&tx, name)?.is_none() {
                return Ok(None);
            }
            for k in unset {
                tx.execute(
                    "DELETE FROM user_env WHERE user = ?1 AND key = ?2",
                    params![name, k],
                )?;
            }
            for (k, v) in set {
                tx.execute(
                    "INSERT INTO user_env (user, key, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (user, key) DO UPDATE SET value = excluded.value",
                    params![name, k, v],
                )?;
            }
            let after = read_user_env(&tx, name)?;
            if let Some(vars) = &after {
                // Every instance of the user carries them (and every spec
                // stored for one): bounded, the change refused whole.
                let bytes: usize = vars.iter().map(|(k, v)| k.len() + v.len()).sum();
                if vars.len() > MAX_USER_VARS || bytes > MAX_USER_ENV_BYTES {
                    return Err(StoreError::Refused(format!(
                        "set: a user has at most {MAX_USER_VARS} variables of {MAX_USER_ENV_BYTES} bytes in all; this change would make {} of {bytes}",
                        vars.len()
                    )));
                }
            }
            tx.commit()?;
            Ok(after)
        })
    }

    fn rotate_admin_token(&self, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        self.replace_role_token(Role::Admin, hash, now_ms)
    }

    fn rotate_metrics_token(&self, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        self.replace_role_token(Role::Metrics, hash, now_ms)
    }

    fn metrics_keys(&self) -> Vec<String> {
        if self.tokens.stale.load(Ordering::Acquire) {
            // The cache could not be read again: the table says.
            return self
                .with(|c| {
                    Ok(c.prepare("SELECT hash FROM tokens WHERE role = 'metrics'")?
                        .query_map([], |r| r.get(0))?
                        .collect::<Result<Vec<String>, _>>()?)
                })
                .unwrap_or_default();
        }
        let map = self.tokens.map.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, (p, _))| p.role == Role::Metrics)
            .map(|(hash, _)| hash.clone())
            .collect()
    }

    fn task_counts(&self) -> Result<TaskCounts, StoreError> {
        self.with(|c| {
            let by_state = c
                .prepare(
                    "SELECT state, json_extract(spec, '$.kind'), COUNT(*) FROM tasks GROUP BY 1, 2",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        // A spec without a kind is a command (Kind's default).
                        r.get::<_, Option<String>>(1)?.unwrap_or_else(|| "command".into()),
                        r.get::<_, i64>(2)?.max(0) as u64,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let oldest_waiting_since = c.query_row(
                "SELECT MIN(submitted_at_ms) FROM tasks WHERE state = 'pending' AND started_at_ms IS NULL",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )?;
            Ok(TaskCounts {
                by_state,
                oldest_waiting_since,
            })
        })
    }

    fn rotate_user_token(
        &self,
        name: &str,
        token_hash: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if !user_present(&tx, name)? {
                return Ok(false);
            }
            tx.execute("DELETE FROM tokens WHERE user = ?1", [name])?;
            tx.execute(
                "INSERT INTO tokens (hash, role, user, label, created_at_ms, expires_at_ms)
                 VALUES (?1, 'user', ?2, 'user token', ?3, ?4)",
                params![token_hash, name, now_ms, expires_at_ms],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn register_node(
        &self,
        req: &RegisterRequest,
        credential_hash: &str,
        host_token: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let inventory = to_json("inventory", &req.inventory)?;
        let key_hash = req.registration_key.as_deref().map(crate::api::token::hash);
        self.with(|c| {
            let tx = c.transaction()?;
            // A removed name comes back only with a join token newer than its removal.
            let removed_at: Option<i64> = tx
                .query_row(
                    "SELECT removed_at_ms FROM removed_nodes WHERE name = ?1",
                    [&req.name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(removed_at) = removed_at {
                let newest_join: Option<i64> = tx.query_row(
                    "SELECT MAX(created_at_ms) FROM tokens WHERE role = 'join'",
                    [],
                    |r| r.get(0),
                )?;
                if newest_join.is_none_or(|t| t <= removed_at) {
                    return Err(StoreError::Conflict(format!(
                        "node {:?} was removed; it registers again only with a new join token (`rivernode node join-token rotate` on the host)",
                        req.name
                    )));
                }
                tx.execute("DELETE FROM removed_nodes WHERE name = ?1", [&req.name])?;
            }
            let stored: Option<Option<String>> = tx
                .query_row(
                    "SELECT registration_key_hash FROM nodes WHERE name = ?1",
                    [&req.name],
                    |r| r.get(0),
                )
                .optional()?;
            match stored {
                None => {
                    tx.execute(
                        "INSERT INTO nodes (name, runner_url, host_token, state, version, registered_at_ms,
                                            last_heartbeat_ms, heartbeat_interval_ms, inventory, usage,
                                            registration_key_hash)
                         VALUES (?1, ?2, ?3, 'online', ?4, ?5, ?5, ?6, ?7, NULL, ?8)",
                        params![
                            req.name,
                            req.runner_url,
                            host_token,
                            req.version,
                            now_ms,
                            req.heartbeat_interval_ms as i64,
                            inventory,
                            key_hash
                        ],
                    )?;
                }
                // The same runner again (its answer was lost): new secrets, the
                // old credential revoked, its tasks kept.
                Some(Some(h)) if key_hash.as_deref() == Some(h.as_str()) => {
                    tx.execute(
                        "UPDATE nodes SET runner_url = ?2, host_token = ?3, state = 'online', version = ?4,
                         last_heartbeat_ms = ?5, heartbeat_interval_ms = ?6, inventory = ?7 WHERE name = ?1",
                        params![
                            req.name,
                            req.runner_url,
                            host_token,
                            req.version,
                            now_ms,
                            req.heartbeat_interval_ms as i64,
                            inventory
                        ],
                    )?;
                    tx.execute(
                        "DELETE FROM tokens WHERE role = 'node' AND node = ?1",
                        [&req.name],
                    )?;
                }
                Some(_) => return Err(StoreError::NodeExists(req.name.clone())),
            }
            tx.execute(
                "INSERT INTO tokens (hash, role, node, label, created_at_ms) VALUES (?1, 'node', ?2, 'node credential', ?3)",
                params![credential_hash, req.name, now_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn heartbeat(
        &self,
        name: &str,
        hb: &HeartbeatRequest,
        now_ms: i64,
    ) -> Result<Option<NodeState>, StoreError> {
        let usage = to_json("usage", &hb.usage)?;
        let inventory = hb
            .inventory
            .as_ref()
            .map(|i| to_json("inventory", i))
            .transpose()?;
        self.with(|c| {
            let tx = c.transaction()?;
            let prev: Option<(String, String, Option<String>)> = tx
                .query_row(
                    "SELECT state, runner_url, degraded FROM nodes WHERE name = ?1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((prev, url, was_degraded)) = prev else {
                return Ok(None);
            };
            // A restarted runner may listen on another port, never on
            // another machine: the host calls only the host it registered.
            let host_of = |u: &str| crate::api::runner_origin(u).map(|(s, h, _)| (s, h)).ok();
            if host_of(&url) != host_of(&hb.runner_url) {
                return Err(StoreError::Conflict(format!(
                    "runner_url: node {name:?} registered at {url}; a heartbeat cannot move it to {} (remove the node and register it again)",
                    hb.runner_url
                )));
            }
            tx.execute(
                "UPDATE nodes SET state = 'online', runner_url = ?2, version = ?3, last_heartbeat_ms = ?4,
                        heartbeat_interval_ms = ?5, usage = ?6, inventory = COALESCE(?7, inventory),
                        degraded = ?8
                 WHERE name = ?1",
                params![
                    name,
                    hb.runner_url,
                    hb.version,
                    now_ms,
                    hb.heartbeat_interval_ms as i64,
                    usage,
                    inventory,
                    hb.degraded
                ],
            )?;
            // What was handed to the node and has not started says why it waits.
            if let Some(why) = &hb.degraded {
                tx.execute(
                    "UPDATE tasks SET reason = ?2 WHERE node = ?1 AND state = 'assigning'",
                    params![name, format!("waiting for node {name}, which cannot start instances: {why}")],
                )?;
            }
            tx.commit()?;
            Ok(Some(match (prev.as_str(), was_degraded) {
                ("online", None) => NodeState::Online,
                ("online", Some(_)) => NodeState::Degraded,
                _ => NodeState::Offline,
            }))
        })
    }

    fn list_nodes(&self) -> Result<Vec<NodeView>, StoreError> {
        self.with(|c| {
            let mut nodes = tasks::nodes(c)?;
            tasks::fill_gpu_holders(c, &mut nodes)?;
            Ok(nodes)
        })
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeView>, StoreError> {
        self.with(|c| {
            let node = c
                .query_row(
                    &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?1"),
                    [name],
                    node_from_row,
                )
                .optional()?
                .transpose()?;
            let mut nodes: Vec<NodeView> = node.into_iter().collect();
            tasks::fill_gpu_holders(c, &mut nodes)?;
            Ok(nodes.pop())
        })
    }

    fn runner_access(&self, name: &str) -> Result<Option<(String, String)>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT runner_url, host_token FROM nodes WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
    }

    fn mark_silent_offline(&self, now_ms: i64, missed: u32) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let names = {
                let mut stmt = tx.prepare(
                    "UPDATE nodes SET state = 'offline'
                     WHERE state = 'online' AND last_heartbeat_ms + heartbeat_interval_ms * ?2 < ?1
                     RETURNING name",
                )?;
                let names = stmt
                    .query_map(params![now_ms, missed], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                names
            };
            // Their tasks are lost, not freed: the node may come back with them
            // running, so the ledger keeps their reservations.
            for n in &names {
                tx.execute(
                    "UPDATE tasks SET state = 'lost', reason = 'node went silent'
                     WHERE node = ?1 AND state IN ('assigning', 'running', 'paused')",
                    [n],
                )?;
            }
            if !names.is_empty() {
                tasks::bump(&tx)?;
            }
            tx.commit()?;
            Ok(names)
        })
    }

    fn delete_node(&self, name: &str, now_ms: i64) -> Result<Option<Vec<u64>>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            // Every VPS it holds that was not deleted: a stopped one's disk
            // and snapshots too stay there, out of the cluster's reach.
            let left = tx
                .prepare(
                    "SELECT id FROM tasks WHERE node = ?1 AND json_extract(spec, '$.kind') = 'vps'
                     AND desired != 'deleted' AND state != 'deleted' ORDER BY id",
                )?
                .query_map([name], |r| r.get(0))?
                .collect::<Result<Vec<u64>, _>>()?;
            let gone = tx.execute("DELETE FROM nodes WHERE name = ?1", [name])? > 0;
            if gone {
                // Its subnet is free for a node that joins later.
                tx.execute("DELETE FROM overlay_slots WHERE node = ?1", [name])?;
                tx.execute("DELETE FROM left_behind WHERE node = ?1", [name])?;
                tx.execute(
                    "INSERT OR REPLACE INTO removed_nodes (name, removed_at_ms) VALUES (?1, ?2)",
                    params![name, now_ms],
                )?;
                // A delete under way there is done as far as the cluster goes.
                tx.execute(
                    "UPDATE tasks SET state = 'deleted', reason = 'deleted (its node was removed)',
                     finished_at_ms = COALESCE(finished_at_ms, ?2)
                     WHERE node = ?1 AND desired = 'deleted'",
                    params![name, now_ms],
                )?;
                let message = format!(
                    "its node {name} was removed (a VPS's disk, if any, stays on that machine)"
                );
                tx.execute(
                    &format!(
                        "UPDATE tasks SET state = 'failed', reason = ?2, message = ?2,
                         finished_at_ms = COALESCE(finished_at_ms, ?3)
                         WHERE node = ?1 AND state NOT IN {}",
                        tasks::ENDED
                    ),
                    params![name, message, now_ms],
                )?;
                // No holder of the name ever sees them again.
                tx.execute(
                    "UPDATE tasks SET node = NULL, placement = NULL WHERE node = ?1",
                    [name],
                )?;
                tasks::bump(&tx)?;
            }
            tx.commit()?;
            Ok(gone.then_some(left))
        })
    }

    fn rotate_join_token(
        &self,
        hash: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM tokens WHERE role = 'join'", [])?;
            tx.execute(
                "INSERT INTO tokens (hash, role, node, label, created_at_ms, expires_at_ms)
                 VALUES (?1, 'join', NULL, 'join token (rotated)', ?2, ?3)",
                params![hash, now_ms, expires_at_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn submit_task_capped(
        &self,
        spec: &TaskSpec,
        owner: Option<&str>,
        max_waiting: u32,
        needs_approval: bool,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let cap = self.published_per_user.load(Ordering::Relaxed);
        self.with(|c| {
            tasks::submit(
                c,
                spec,
                owner,
                tasks::SubmitRules {
                    max_waiting,
                    published_cap: cap,
                    needs_approval,
                },
                now_ms,
            )
        })
    }

    fn approve(&self, id: u64, by: &str) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::decide(c, id, by, None, 0))
    }

    fn reject(&self, id: u64, by: &str, reason: &str, now_ms: i64) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::decide(c, id, by, Some(reason), now_ms))
    }

    fn schedule(&self) -> Result<Vec<u64>, StoreError> {
        let range = *self
            .published_ports
            .read()
            .unwrap_or_else(|p| p.into_inner());
        self.with(|c| tasks::schedule(c, range, crate::now_unix_ms()))
    }

    fn get_task(&self, id: u64) -> Result<Option<TaskView>, StoreError> {
        self.with(|c| tasks::get(c, id))
    }

    fn review_idle(
        &self,
        node: &str,
        samples: &[crate::topology::nvml::GpuSample],
        policy: &crate::host::idle::IdlePolicy,
        now_ms: i64,
    ) -> Result<Vec<(u64, crate::host::idle::IdleStep)>, StoreError> {
        self.with(|c| tasks::review_idle(c, node, samples, policy, now_ms))
    }

    fn set_idle_exempt(&self, id: u64, exempt: bool) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::set_idle_exempt(c, id, exempt))
    }

    fn list_tasks(
        &self,
        state: Option<TaskState>,
        node: Option<&str>,
        owner: Option<&str>,
    ) -> Result<Vec<TaskView>, StoreError> {
        self.with(|c| tasks::list(c, state, node, owner))
    }

    fn set_desired(&self, id: u64, desired: Desired, now_ms: i64) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::set_desired(c, id, desired, now_ms))
    }

    fn restart(&self, id: u64, restore: Option<&Restore>) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::restart(c, id, restore))
    }

    fn restart_anywhere(&self, id: u64, restore: &Restore) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::restart_anywhere(c, id, restore))
    }

    fn left_removed(&self, node: &str, id: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM left_behind WHERE task = ?1 AND node = ?2",
                params![id as i64, node],
            )?;
            Ok(())
        })
    }

    fn assignments(&self, node: &str) -> Result<Assignments, StoreError> {
        self.with(|c| tasks::assignments(c, node))
    }

    fn report_task(
        &self,
        node: &str,
        id: u64,
        report: &TaskReport,
        now_ms: i64,
    ) -> Result<TaskView, StoreError> {
        self.with(|c| tasks::report(c, node, id, report, now_ms))
    }

    fn expose(
        &self,
        node: &str,
        id: u64,
        exposed: &[crate::api::ports::PortRequest],
    ) -> Result<crate::api::Placement, StoreError> {
        let range = *self
            .published_ports
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let cap = self.published_per_user.load(Ordering::Relaxed);
        self.with(|c| tasks::expose(c, node, id, exposed, range, cap))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.with(|c| tasks::revision(c))
    }

    fn overlay_slot(&self, node: &str, slots: u32) -> Result<u32, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let have: Option<u32> = tx
                .query_row(
                    "SELECT slot FROM overlay_slots WHERE node = ?1",
                    [node],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(slot) = have {
                return Ok(slot);
            }
            let used = tx
                .prepare("SELECT slot FROM overlay_slots ORDER BY slot")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<u32>, _>>()?;
            let slot = lowest_free(&used, 0, slots).ok_or_else(|| {
                StoreError::TooMany(format!(
                    "the overlay range has room for {slots} node subnets and all are taken; \
                     remove a node or set a wider overlay_range"
                ))
            })?;
            tx.execute(
                "INSERT INTO overlay_slots (node, slot) VALUES (?1, ?2)",
                params![node, slot],
            )?;
            tx.commit()?;
            Ok(slot)
        })
    }

    fn overlay_members(&self) -> Result<Vec<OverlayMember>, StoreError> {
        self.with(|c| {
            Ok(c.prepare(
                "SELECT n.name, n.runner_url, n.state, n.degraded IS NOT NULL, s.slot
                 FROM nodes n JOIN overlay_slots s ON s.node = n.name ORDER BY s.slot",
            )?
            .query_map([], |r| {
                let state = match (r.get::<_, String>(2)?.as_str(), r.get::<_, bool>(3)?) {
                    ("online", false) => NodeState::Online,
                    ("online", true) => NodeState::Degraded,
                    _ => NodeState::Offline,
                };
                Ok(OverlayMember {
                    node: r.get(0)?,
                    runner_url: r.get(1)?,
                    state,
                    slot: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?)
        })
    }

    fn overlay_groups(&self, owners: &[String]) -> Result<BTreeMap<String, u16>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut known: BTreeMap<String, u16> = tx
                .prepare("SELECT owner, grp FROM overlay_groups")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut used: Vec<u32> = known.values().map(|g| u32::from(*g)).collect();
            used.sort_unstable();
            let mut out = BTreeMap::new();
            for owner in owners {
                let g = match known.get(owner) {
                    Some(g) => *g,
                    None => {
                        // 0 is no group: the mark of traffic from no instance.
                        let g = lowest_free(&used, 1, 1 << 16).ok_or_else(|| {
                            StoreError::TooMany(
                                "the overlay has a group for 65535 owners and all are taken".into(),
                            )
                        })?;
                        tx.execute(
                            "INSERT INTO overlay_groups (owner, grp) VALUES (?1, ?2)",
                            params![owner, g],
                        )?;
                        used.push(g);
                        used.sort_unstable();
                        let g = g as u16;
                        known.insert(owner.clone(), g);
                        g
                    }
                };
                out.insert(owner.clone(), g);
            }
            tx.commit()?;
            Ok(out)
        })
    }
}

/// The lowest number in `from..limit` not in `used` (sorted).
fn lowest_free(used: &[u32], from: u32, limit: u32) -> Option<u32> {
    let mut next = from;
    for &u in used {
        if u == next {
            next += 1;
        } else if u > next {
            break;
        }
    }
    (next < limit).then_some(next)
}

#[cfg(test)]
mod overlay_tests {
    use super::*;

    #[test]
    fn the_lowest_free_number_fills_gaps_first() {
        assert_eq!(lowest_free(&[], 0, 4), Some(0));
        assert_eq!(lowest_free(&[0, 1, 3], 0, 4), Some(2));
        assert_eq!(lowest_free(&[0, 1, 2, 3], 0, 4), None);
        assert_eq!(lowest_free(&[1, 2], 1, 10), Some(3));
        assert_eq!(lowest_free(&[5], 1, 10), Some(1));
    }

    #[test]
    fn slots_and_groups_stay_and_a_removed_nodes_slot_is_reused() {
        let s = SqliteStore::open_in_memory().unwrap();
        assert_eq!(s.overlay_slot("a", 2).unwrap(), 0);
        assert_eq!(s.overlay_slot("b", 2).unwrap(), 1);
        assert_eq!(s.overlay_slot("a", 2).unwrap(), 0);
        assert!(matches!(
            s.overlay_slot("c", 2),
            Err(StoreError::TooMany(_))
        ));
        let g = s
            .overlay_groups(&["ann".into(), "".into(), "bob".into()])
            .unwrap();
        assert_eq!(g["ann"], 1);
        assert_eq!(g[""], 2);
        assert_eq!(g["bob"], 3);
        let again = s.overlay_groups(&["bob".into(), "cy".into()]).unwrap();
        assert_eq!((again["bob"], again["cy"]), (3, 4));
        s.with(|c| {
            c.execute("DELETE FROM overlay_slots WHERE node = 'a'", [])?;
            Ok(())
        })
        .unwrap();
        assert_eq!(s.overlay_slot("c", 2).unwrap(), 0);
        // Members are the registered nodes with a slot (none registered here).
        assert!(s.overlay_members().unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Inventory, Usage};

    fn inventory() -> Inventory {
        Inventory {
            hostname: "n1".into(),
            kernel: "6.1".into(),
            cpus: vec![],
            numa_nodes: vec![],
            memory_total_bytes: 1 << 30,
            gpus: vec![],
            warnings: vec![],
            vms: false,
            memory_reserved_bytes: 0,
        }
    }

    fn register(store: &SqliteStore, name: &str, now: i64) {
        let req = RegisterRequest {
            name: name.into(),
            runner_url: "http://127.0.0.1:8001".into(),
            heartbeat_interval_ms: 1000,
            version: "0.1.0".into(),
            inventory: inventory(),
            registration_key: None,
        };
        store
            .register_node(&req, &format!("hash-{name}"), "host-token", now)
            .unwrap();
    }

    fn beat() -> HeartbeatRequest {
        HeartbeatRequest {
            runner_url: "http://127.0.0.1:8001".into(),
            heartbeat_interval_ms: 1000,
            version: "0.1.0".into(),
            usage: Usage::default(),
            degraded: None,
            inventory: None,
        }
    }

    #[test]
    fn a_removed_node_comes_back_only_with_a_new_join_token_and_inherits_nothing() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.rotate_join_token("join-1", None, 1_000).unwrap();
        let m = crate::topology::fake::FakeMachine::two_socket_four_gpus();
        let machine = crate::topology::collect(&m.roots()).unwrap();
        let first = RegisterRequest {
            name: "n1".into(),
            runner_url: "http://127.0.0.1:8001".into(),
            heartbeat_interval_ms: 1000,
            version: "x".into(),
            inventory: machine,
            registration_key: None,
        };
        s.register_node(&first, "cred-1", "t1", 1_000).unwrap();
        let spec = crate::api::TaskSpec {
            command: vec!["true".into()],
            env: Default::default(),
            mounts: vec![],
            image: crate::api::ImageSource::Environment("base".into()),
            cores: 1,
            memory_bytes: None,
            gpu_count: 0,
            target: None,
            kind: crate::api::Kind::Vps,
            ssh_keys: vec![],
            ssh_password_hash: Some("$6$salt$secret".into()),
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
        };
        let id = s.submit_task(&spec, Some("alice"), 1_000).unwrap();
        s.schedule().unwrap();
        assert_eq!(s.assignments("n1").unwrap().tasks.len(), 1);

        assert_eq!(
            s.delete_node("n1", 5_000).unwrap(),
            Some(vec![id]),
            "the VPS whose disk stays there is named"
        );
        let t = s.get_task(id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Failed);
        assert!(t.message.unwrap().contains("n1 was removed"));
        assert!(t.placement.is_none());
        // The same join token cannot bring the name back ...
        let req = RegisterRequest {
            name: "n1".into(),
            runner_url: "http://10.9.9.9:8001".into(),
            heartbeat_interval_ms: 1000,
            version: "x".into(),
            inventory: inventory(),
            registration_key: None,
        };
        let e = s
            .register_node(&req, "cred-2", "t2", 6_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("join-token rotate"), "{e}");
        // ... a new one can, and the name inherits nothing.
        s.rotate_join_token("join-2", None, 7_000).unwrap();
        assert_eq!(
            s.find_token("join-1").unwrap(),
            None,
            "the old token is revoked"
        );
        s.register_node(&req, "cred-2", "t2", 8_000).unwrap();
        assert!(s.assignments("n1").unwrap().tasks.is_empty());
        // A token past its expiry is no token.
        s.rotate_join_token("join-3", Some(crate::now_unix_ms() - 1), 9_000)
            .unwrap();
        assert_eq!(s.find_token("join-3").unwrap(), None);
        s.rotate_join_token("join-4", Some(crate::now_unix_ms() + 60_000), 9_001)
            .unwrap();
        assert_eq!(s.find_token("join-4").unwrap().unwrap().role, Role::Join);
    }

    #[test]
    fn a_runner_whose_answer_was_lost_registers_again_with_its_key() {
        let s = SqliteStore::open_in_memory().unwrap();
        let req = RegisterRequest {
            name: "n1".into(),
            runner_url: "http://127.0.0.1:8001".into(),
            heartbeat_interval_ms: 1000,
            version: "0.1.0".into(),
            inventory: inventory(),
            registration_key: Some("rnreg_secret".into()),
        };
        s.register_node(&req, "cred-1", "host-1", 1).unwrap();
        // The answer never arrived: the runner tries again with the same key.
        s.register_node(&req, "cred-2", "host-2", 2).unwrap();
        assert_eq!(
            s.find_token("cred-1").unwrap(),
            None,
            "the lost credential is revoked"
        );
        assert_eq!(
            s.find_token("cred-2").unwrap().unwrap().node.as_deref(),
            Some("n1")
        );
        assert_eq!(s.runner_access("n1").unwrap().unwrap().1, "host-2");
        let other = RegisterRequest {
            registration_key: Some("rnreg_other".into()),
            ..req.clone()
        };
        assert!(matches!(
            s.register_node(&other, "cred-3", "host-3", 3),
            Err(StoreError::NodeExists(_))
        ));
        let none = RegisterRequest {
            registration_key: None,
            ..req
        };
        assert!(matches!(
            s.register_node(&none, "cred-4", "host-4", 4),
            Err(StoreError::NodeExists(_))
        ));
    }

    #[test]
    fn migrations_are_versioned_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.db");
        drop(SqliteStore::open(&path).unwrap());
        let s = SqliteStore::open(&path).unwrap();
        let v: usize = s
            .with(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len());
        let mode: String = s
            .with(|c| Ok(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn tokens_survive_the_users_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.db");
        {
            // A version 3 database, as the previous release left it.
            let mut c = Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            for sql in &MIGRATIONS[..3] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.execute(
                "INSERT INTO tokens (hash, role, node, label, created_at_ms) VALUES ('h', 'admin', NULL, 'admin', 1)",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.find_token("h").unwrap().unwrap().role, Role::Admin);
        s.add_user("dana", crate::api::PersonRole::User, None, "hd", 5)
            .unwrap();
        let p = s.find_token("hd").unwrap().unwrap();
        assert_eq!((p.role, p.user.as_deref()), (Role::User, Some("dana")));
        assert!(matches!(
            s.add_user("dana", crate::api::PersonRole::User, None, "hd2", 6),
            Err(StoreError::Conflict(_))
        ));
        assert!(s.remove_user("dana").unwrap());
        assert_eq!(
            s.find_token("hd").unwrap(),
            None,
            "removing a user revokes their token"
        );
        assert!(!s.remove_user("dana").unwrap(), "removed once");
        assert!(s.list_users().unwrap().is_empty());
        let e = s
            .add_user("dana", crate::api::PersonRole::User, None, "hd3", 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("never given out again"), "{e}");
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.db");
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn node_lifecycle() {
        let s = SqliteStore::open_in_memory().unwrap();
        register(&s, "n1", 1_000);
        assert_eq!(
            s.find_token("hash-n1").unwrap(),
            Some(Principal {
                role: Role::Node,
                node: Some("n1".into()),
                user: None,
            })
        );
        let dup = RegisterRequest {
            name: "n1".into(),
            runner_url: "http://evil:8001".into(),
            heartbeat_interval_ms: 1000,
            version: "x".into(),
            inventory: inventory(),
            registration_key: None,
        };
        assert!(matches!(
            s.register_node(&dup, "h2", "t2", 2_000),
            Err(StoreError::NodeExists(_))
        ));
        let guess = RegisterRequest {
            registration_key: Some("a guess".into()),
            ..dup.clone()
        };
        assert!(
            matches!(
                s.register_node(&guess, "h2", "t2", 2_000),
                Err(StoreError::NodeExists(_))
            ),
            "a node registered without a key cannot be taken with one"
        );
        assert_eq!(
            s.runner_access("n1").unwrap().unwrap().0,
            "http://127.0.0.1:8001"
        );

        // 3 intervals of 1 s: still online at 4.0 s, offline after.
        assert!(s.mark_silent_offline(4_000, 3).unwrap().is_empty());
        assert_eq!(
            s.mark_silent_offline(4_001, 3).unwrap(),
            vec!["n1".to_string()]
        );
        assert!(
            s.mark_silent_offline(9_000, 3).unwrap().is_empty(),
            "reported once"
        );
        assert_eq!(s.get_node("n1").unwrap().unwrap().state, NodeState::Offline);

        assert_eq!(
            s.heartbeat("n1", &beat(), 10_000).unwrap(),
            Some(NodeState::Offline)
        );
        let n = s.get_node("n1").unwrap().unwrap();
        assert_eq!(
            (n.state, n.last_heartbeat_unix_ms),
            (NodeState::Online, 10_000)
        );
        assert!(n.usage.is_some());
        assert_eq!(
            n.inventory.memory_total_bytes,
            1 << 30,
            "inventory kept when not resent"
        );
        assert_eq!(s.heartbeat("ghost", &beat(), 10_000).unwrap(), None);
        // F6: a heartbeat may change the port (a restarted runner), never the host.
        let moved = HeartbeatRequest {
            runner_url: "http://127.0.0.1:9999".into(),
            ..beat()
        };
        s.heartbeat("n1", &moved, 10_001).unwrap();
        assert_eq!(
            s.runner_access("n1").unwrap().unwrap().0,
            "http://127.0.0.1:9999"
        );
        let away = HeartbeatRequest {
            runner_url: "http://169.254.169.254:80".into(),
            ..beat()
        };
        let e = s.heartbeat("n1", &away, 10_002).unwrap_err().to_string();
        assert!(e.contains("runner_url") && e.contains("127.0.0.1"), "{e}");
        assert_eq!(
            s.runner_access("n1").unwrap().unwrap().0,
            "http://127.0.0.1:9999"
        );

        assert!(s.delete_node("n1", 20_000).unwrap().is_some());
        assert_eq!(
            s.find_token("hash-n1").unwrap(),
            None,
            "credential revoked with the node"
        );
        assert!(s.list_nodes().unwrap().is_empty());
        assert!(s.delete_node("n1", 20_001).unwrap().is_none());
    }

    #[test]
    fn tokens_are_checked_from_memory_and_every_change_is_seen() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.add_user("alice", crate::api::PersonRole::User, None, "ha", 0)
            .unwrap();
        assert_eq!(
            s.find_token("ha").unwrap().unwrap().user.as_deref(),
            Some("alice")
        );
        // With the database busy (its one connection held), a token is
        // still checked, and a bogus one refused, without waiting.
        {
            let _busy = s.conn.lock().unwrap();
            assert_eq!(s.find_token_now("ha").flatten().unwrap().role, Role::User);
            assert_eq!(s.find_token_now("bogus"), Some(None));
        }
        // A revocation is seen at once, whichever statement made it, and
        // from memory: nothing waits for the database after a change.
        assert!(s.remove_user("alice").unwrap());
        s.add_user("bob", crate::api::PersonRole::User, None, "hb", 0)
            .unwrap();
        {
            let _busy = s.conn.lock().unwrap();
            assert_eq!(s.find_token_now("ha"), Some(None));
            assert_eq!(s.find_token_now("bogus"), Some(None));
            assert_eq!(s.find_token_now("hb").flatten().unwrap().role, Role::User);
        }
        assert_eq!(s.find_token("ha").unwrap(), None);
        // An expired join token is refused from memory too.
        s.rotate_join_token("hj", Some(crate::now_unix_ms() - 1), 0)
            .unwrap();
        assert_eq!(s.find_token("hj").unwrap(), None);
        s.rotate_join_token("hj2", Some(crate::now_unix_ms() + 60_000), 0)
            .unwrap();
        assert_eq!(s.find_token("hj2").unwrap().unwrap().role, Role::Join);
    }

    #[test]
    fn a_users_variables_are_set_unset_and_go_with_the_user() {
        let s = SqliteStore::open_in_memory().unwrap();
        let none = BTreeMap::new();
        assert_eq!(s.user_env("alice").unwrap(), None, "no such user");
        assert_eq!(s.change_user_env("alice", &none, &[]).unwrap(), None);
        s.add_user("alice", crate::api::PersonRole::User, None, "ha", 0)
            .unwrap();
        assert_eq!(s.user_env("alice").unwrap(), Some(none.clone()));
        let set: BTreeMap<String, String> =
            [("A".to_string(), "1".to_string()), ("B".into(), "2".into())].into();
        assert_eq!(
            s.change_user_env("alice", &set, &[]).unwrap(),
            Some(set.clone())
        );
        // One change sets and unsets; a value is replaced.
        let again: BTreeMap<String, String> = [("A".to_string(), "3".to_string())].into();
        let after = s
            .change_user_env("alice", &again, &["B".into()])
            .unwrap()
            .unwrap();
        assert_eq!(after, again);
        // Over the limit: refused whole, nothing changed.
        let many: BTreeMap<String, String> = (0..=MAX_USER_VARS)
            .map(|i| (format!("V{i}"), "x".to_string()))
            .collect();
        assert!(matches!(
            s.change_user_env("alice", &many, &[]),
            Err(StoreError::Refused(m)) if m.contains("at most")
        ));
        assert_eq!(s.user_env("alice").unwrap(), Some(again.clone()));
        assert!(s.remove_user("alice").unwrap());
        assert_eq!(s.user_env("alice").unwrap(), None, "removed with the user");
    }

    #[test]
    fn a_users_token_is_rotated_and_can_expire() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.add_user("alice", crate::api::PersonRole::User, None, "old", 0)
            .unwrap();
        assert!(s.rotate_user_token("alice", "new", None, 1).unwrap());
        assert_eq!(s.find_token("old").unwrap(), None, "the old one is revoked");
        assert_eq!(
            s.find_token("new").unwrap().unwrap().user.as_deref(),
            Some("alice")
        );
        let past = crate::now_unix_ms() - 1;
        assert!(s
            .rotate_user_token("alice", "short", Some(past), 2)
            .unwrap());
        assert_eq!(s.find_token("short").unwrap(), None, "expired");
        assert!(
            !s.rotate_user_token("bob", "x", None, 3).unwrap(),
            "no such user"
        );
        s.remove_user("alice").unwrap();
        assert!(
            !s.rotate_user_token("alice", "back", None, 4).unwrap(),
            "removed stays removed"
        );
    }

    #[test]
    fn commits_are_durable_across_a_power_loss() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("state.db")).unwrap();
        let sync: i64 = s
            .with(|c| Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL");
    }

    #[test]
    fn a_token_is_never_refused_while_the_cache_reloads() {
        // The admin's token is made after the store opened (as the host
        // does), then tokens come and go while another thread checks it:
        // each change reloads the cache, and no check may miss it meanwhile.
        let s = Arc::new(SqliteStore::open_in_memory().unwrap());
        s.insert_token("admin", Role::Admin, "admin").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let checker = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut missed = 0;
                while !stop.load(Ordering::Acquire) {
                    if s.find_token("admin").unwrap().is_none() {
                        missed += 1;
                    }
                }
                missed
            })
        };
        for i in 0..1500 {
            s.insert_token(&format!("t{i}"), Role::Admin, "other")
                .unwrap();
            assert!(s.find_token(&format!("t{i}")).unwrap().is_some());
        }
        stop.store(true, Ordering::Release);
        assert_eq!(
            checker.join().unwrap(),
            0,
            "checks that missed the admin's token"
        );
    }

    #[test]
    fn tokens_by_role() {
        let s = SqliteStore::open_in_memory().unwrap();
        assert!(!s.has_token_with_role(Role::Admin).unwrap());
        s.insert_token("abc", Role::Admin, "admin").unwrap();
        assert!(s.has_token_with_role(Role::Admin).unwrap());
        assert_eq!(s.find_token("abc").unwrap().unwrap().role, Role::Admin);
        assert_eq!(s.find_token("nope").unwrap(), None);
        assert!(
            s.insert_token("abc", Role::Join, "dup").is_err(),
            "hashes are unique"
        );
    }
}
