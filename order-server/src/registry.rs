//! The in-memory table of nodes attached to this instance, with their reservations,
//! circuit breakers and the operator's settings. One lock guards it; every operation is
//! short and does no I/O. Breaker transitions are sent out as [`NodeEvent`]s for the
//! service to log and record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_core::model::{BreakerRecord, Capacity, NodeAdmin, NodeState};
use ferry_core::proto::{self, Outcome, ServerMessage, TaskResult};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::breaker::{Admission, Breaker, BreakerConfig, State, Transition};
use crate::placement::{self, Need, NodeView};

pub type Outbound = mpsc::Sender<Result<ServerMessage, tonic::Status>>;

/// How a node answered an assignment.
pub enum Reply {
    Rejected(String),
    Done(TaskResult),
}

/// Settings of the node table.
#[derive(Clone, Copy, Debug)]
pub struct RegistryConfig {
    /// Silence after which a node gets no new work (it is dead later, at `dead_after`).
    pub suspect_after: Duration,
    pub breaker: BreakerConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            suspect_after: Duration::from_secs(3),
            breaker: BreakerConfig::default(),
        }
    }
}

/// A breaker transition, for the service to log, count and record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// `function`: `None` for the node's own breaker.
    Ejected {
        node: String,
        function: Option<String>,
        for_ms: u64,
        ejections: u32,
    },
    Restored {
        node: String,
        function: Option<String>,
    },
    /// A threshold was crossed but the pool's ejection budget was spent.
    Spared {
        node: String,
        function: Option<String>,
    },
}

struct Pending {
    sha: String,
    function: String,
    reserved: Capacity,
    /// This placement is the half-open probe of the node's / the function's breaker.
    probe_node: bool,
    probe_function: bool,
    reply: oneshot::Sender<Reply>,
}

pub struct NodeEntry {
    pub conn: u64,
    pub capacity: Capacity,
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub tx: Outbound,
    pub last_seen: Instant,
    /// Store revision of this attachment's NodeRecord (fencing for later writes).
    pub attach_rev: i64,
    used: Capacity,
    /// What the node said it uses in its last heartbeat (it may run work this
    /// instance did not place, e.g. from before a re-attach).
    reported: Capacity,
    /// Set by a reject: the node is full in its own eyes until it heartbeats again.
    full: bool,
    /// Marked suspect (silent past `suspect_after`) and not heard from since.
    pub suspect: bool,
    packages: HashSet<String>,
    pending: HashMap<String, Pending>,
    breaker: Breaker,
    fn_breakers: HashMap<String, Breaker>,
    /// Nodes of one pool share their tags (their resource class): the sorted tags.
    pool: String,
}

fn pool_of(tags: &[String]) -> String {
    let mut t = tags.to_vec();
    t.sort();
    t.join(",")
}

/// A breaker in the store's terms: its ejection time as wall-clock milliseconds.
fn breaker_record(b: &Breaker, now: Instant, now_ms: u64) -> Option<BreakerRecord> {
    let (ejections, until) = b.carried(now)?;
    let until_ms = until.map_or(0, |u| {
        (now_ms + u.saturating_duration_since(now).as_millis() as u64).max(1)
    });
    Some(BreakerRecord {
        ejections,
        until_ms,
    })
}

/// A stored breaker as [`Breaker::resumed`] takes it.
fn resumable(r: &BreakerRecord, now: Instant, now_ms: u64) -> (u32, Option<Instant>) {
    let until =
        (r.until_ms > 0).then(|| now + Duration::from_millis(r.until_ms.saturating_sub(now_ms)));
    (r.ejections, until)
}

/// A node's breakers as its record keeps them: its own, and those per function that
/// were ever ejected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub node: Option<BreakerRecord>,
    pub functions: BTreeMap<String, BreakerRecord>,
}

impl Carried {
    fn of(n: &NodeEntry) -> Self {
        let (now, now_ms) = (Instant::now(), ferry_core::now_ms());
        Self {
            node: breaker_record(&n.breaker, now, now_ms),
            functions: n
                .fn_breakers
                .iter()
                .filter_map(|(f, b)| Some((f.clone(), breaker_record(b, now, now_ms)?)))
                .collect(),
        }
    }
}

/// Whether `pool` may lose one more member to ejection (`of_function`: counting that
/// function's breakers, else the nodes' own), `except` left out of the count.
fn pool_has_room(
    t: &Table,
    cfg: &BreakerConfig,
    pool: &str,
    of_function: Option<&str>,
    except: Option<&str>,
) -> bool {
    let (mut size, mut ejected) = (0, 0);
    for (id, n) in t.nodes.iter().filter(|(_, n)| n.pool == pool) {
        size += 1;
        if except == Some(id.as_str()) {
            continue;
        }
        let out = match of_function {
            None => n.breaker.is_ejected(),
            Some(f) => n.fn_breakers.get(f).is_some_and(Breaker::is_ejected),
        };
        ejected += usize::from(out);
    }
    ejected < cfg.max_ejected(size)
}

/// A placed task: where it went and how to hear back.
pub struct Placed {
    pub node_id: String,
    pub tx: Outbound,
    pub reply: oneshot::Receiver<Reply>,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<String, NodeEntry>,
    /// The operator's settings by node id (absent: active).
    admin: HashMap<String, NodeAdmin>,
}

pub struct Registry {
    cfg: RegistryConfig,
    inner: Mutex<Table>,
    events: Option<mpsc::UnboundedSender<NodeEvent>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(RegistryConfig::default(), None)
    }
}

fn sub(a: &mut Capacity, b: &Capacity) {
    a.cpu_millis = a.cpu_millis.saturating_sub(b.cpu_millis);
    a.memory_mb = a.memory_mb.saturating_sub(b.memory_mb);
    a.gpus = a.gpus.saturating_sub(b.gpus);
    a.fpga_slots = a.fpga_slots.saturating_sub(b.fpga_slots);
    a.slots = a.slots.saturating_sub(b.slots);
}

fn add(a: &mut Capacity, b: &Capacity) {
    a.cpu_millis = a.cpu_millis.saturating_add(b.cpu_millis);
    a.memory_mb = a.memory_mb.saturating_add(b.memory_mb);
    a.gpus = a.gpus.saturating_add(b.gpus);
    a.fpga_slots = a.fpga_slots.saturating_add(b.fpga_slots);
    a.slots = a.slots.saturating_add(b.slots);
}

fn max(a: &Capacity, b: &Capacity) -> Capacity {
    Capacity {
        cpu_millis: a.cpu_millis.max(b.cpu_millis),
        memory_mb: a.memory_mb.max(b.memory_mb),
        gpus: a.gpus.max(b.gpus),
        fpga_slots: a.fpga_slots.max(b.fpga_slots),
        slots: a.slots.max(b.slots),
    }
}

/// How an outcome counts: (for the node's breaker, for the node × function breaker),
/// each `Some(failed)` or `None` (says nothing). The node's own breaker only hears of
/// platform failures: a function's error, or its running past its timeout, is the
/// function's (on this node), not the node's.
fn verdicts(outcome: Outcome) -> (Option<bool>, Option<bool>) {
    match outcome {
        Outcome::Succeeded => (Some(false), Some(false)),
        Outcome::FunctionError | Outcome::TimedOut => (Some(false), Some(true)),
        Outcome::Failed => (Some(true), Some(true)),
        Outcome::Cancelled | Outcome::Unspecified => (None, None),
    }
}

fn breaker_status(function: &str, b: &Breaker, now: Instant) -> proto::BreakerStatus {
    let (state, left) = match b.state() {
        State::Closed => ("closed", 0),
        State::Open { until } if now < until => ("open", (until - now).as_millis() as u64),
        State::Open { .. } | State::HalfOpen { .. } => ("half-open", 0),
    };
    proto::BreakerStatus {
        function: function.to_string(),
        state: state.into(),
        ejections: b.ejections(),
        ejected_for_ms: left,
        consecutive_failures: b.consecutive_failures(),
    }
}

impl Registry {
    pub fn new(cfg: RegistryConfig, events: Option<mpsc::UnboundedSender<NodeEvent>>) -> Self {
        Self {
            cfg,
            inner: Mutex::new(Table::default()),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means a panic elsewhere; the table itself stays consistent
        // because every mutation below completes without panicking.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, ev: NodeEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// Adds (or replaces) a node; a replaced attachment's pending tasks fail over. The
    /// breakers of a node that re-attaches here carry over: reconnecting does not
    /// shorten an ejection. A node new here resumes the node breaker `carried` from
    /// its last attachment (see [`Breaker::resumed`]), unless the pool has no room for
    /// another ejected member: then it starts closed, keeping its ejection count.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        id: &str,
        conn: u64,
        capacity: Capacity,
        tags: Vec<String>,
        labels: BTreeMap<String, String>,
        packages: Vec<String>,
        tx: Outbound,
        carried: Carried,
    ) {
        let now = Instant::now();
        let pool = pool_of(&tags);
        let mut t = self.lock();
        let (breaker, fn_breakers, resume) = match t.nodes.remove(id) {
            Some(old) => (old.breaker, old.fn_breakers, None),
            None => (Breaker::new(now), HashMap::new(), Some(carried)),
        };
        let entry = NodeEntry {
            conn,
            capacity,
            pool: pool.clone(),
            tags,
            labels,
            tx,
            last_seen: now,
            attach_rev: 0,
            used: Capacity::default(),
            reported: Capacity::default(),
            full: false,
            suspect: false,
            packages: packages.into_iter().collect(),
            pending: HashMap::new(),
            breaker,
            fn_breakers,
        };
        t.nodes.insert(id.to_string(), entry);
        let Some(carried) = resume else {
            return;
        };
        // Each carried ejection holds if the pool has room for it; else that breaker
        // starts closed (keeping its count), as a new ejection would be spared.
        let now_ms = ferry_core::now_ms();
        let resume = |function: Option<&str>, rec: &BreakerRecord| {
            let (ejections, mut until) = resumable(rec, now, now_ms);
            if until.is_some() && !pool_has_room(&t, &self.cfg.breaker, &pool, function, Some(id)) {
                self.emit(NodeEvent::Spared {
                    node: id.to_string(),
                    function: function.map(str::to_string),
                });
                until = None;
            }
            Breaker::resumed(now, ejections, until)
        };
        let node = carried.node.as_ref().map(|r| resume(None, r));
        let functions: Vec<(String, Breaker)> = carried
            .functions
            .iter()
            .map(|(f, r)| (f.clone(), resume(Some(f), r)))
            .collect();
        if let Some(n) = t.nodes.get_mut(id) {
            if let Some(b) = node {
                n.breaker = b;
            }
            n.fn_breakers.extend(functions);
        }
    }

    /// Returns false when that attachment is already gone.
    pub fn set_attach_rev(&self, id: &str, conn: u64, rev: i64) -> bool {
        match self.lock().nodes.get_mut(id).filter(|n| n.conn == conn) {
            Some(n) => {
                n.attach_rev = rev;
                true
            }
            None => false,
        }
    }

    /// The attachment, its record's revision (for a fenced write) and what the record
    /// describes: (conn, revision, capacity, tags, labels).
    #[allow(clippy::type_complexity)]
    pub fn attachment(
        &self,
        id: &str,
    ) -> Option<(u64, i64, Capacity, Vec<String>, BTreeMap<String, String>)> {
        self.lock().nodes.get(id).map(|n| {
            (
                n.conn,
                n.attach_rev,
                n.capacity,
                n.tags.clone(),
                n.labels.clone(),
            )
        })
    }

    /// Removes the node if `conn` is still its attachment; returns its attach revision.
    /// Removes that attachment: its attach revision and its breakers, to carry.
    pub fn detach(&self, id: &str, conn: u64) -> Option<(i64, Carried)> {
        let mut t = self.lock();
        if t.nodes.get(id).is_some_and(|n| n.conn == conn) {
            // Dropping the pending senders tells every waiting caller the node is lost.
            t.nodes.remove(id).map(|n| (n.attach_rev, Carried::of(&n)))
        } else {
            None
        }
    }

    /// The state a node's record should show now (None: not attached here).
    pub fn node_state(&self, id: &str) -> Option<NodeState> {
        self.lock().nodes.get(id).map(|n| {
            if n.suspect {
                NodeState::Suspect
            } else if n.breaker.is_ejected() {
                NodeState::Ejected
            } else {
                NodeState::Attached
            }
        })
    }

    /// The node's breakers as its record keeps them (empty: never ejected).
    pub fn carried(&self, id: &str) -> Carried {
        self.lock()
            .nodes
            .get(id)
            .map(Carried::of)
            .unwrap_or_default()
    }

    /// Returns true when the node was suspect and is back.
    pub fn heartbeat(&self, id: &str, conn: u64, reported: Option<Capacity>) -> bool {
        let mut t = self.lock();
        let Some(n) = t.nodes.get_mut(id).filter(|n| n.conn == conn) else {
            return false;
        };
        n.last_seen = Instant::now();
        if let Some(r) = reported {
            n.reported = r;
            n.full = false;
        }
        std::mem::take(&mut n.suspect)
    }

    /// Nodes silent for longer than `dead_after`: (id, conn, tx).
    pub fn silent(&self, dead_after: Duration) -> Vec<(String, u64, Outbound)> {
        let now = Instant::now();
        self.lock()
            .nodes
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_seen) > dead_after)
            .map(|(id, n)| (id.clone(), n.conn, n.tx.clone()))
            .collect()
    }

    /// Marks nodes silent past `suspect_after` as suspect; returns the newly suspect.
    pub fn mark_suspects(&self) -> Vec<String> {
        let now = Instant::now();
        let mut t = self.lock();
        let mut out = vec![];
        for (id, n) in t.nodes.iter_mut() {
            if !n.suspect && now.duration_since(n.last_seen) > self.cfg.suspect_after {
                n.suspect = true;
                out.push(id.clone());
            }
        }
        out
    }

    /// Applies the operator's settings (the whole set; absent nodes are active). A node
    /// moving back to active has its breakers closed.
    pub fn set_admin(&self, admin: HashMap<String, NodeAdmin>, restored: &[String]) {
        let now = Instant::now();
        let mut t = self.lock();
        for id in restored {
            if let Some(n) = t.nodes.get_mut(id) {
                n.breaker.reset(now);
                n.fn_breakers.clear();
            }
        }
        t.admin = admin;
    }

    /// Chooses a node with [`placement::place`] and reserves the task's needs on it.
    /// Suspect, ejected, drained and manually ejected nodes get nothing; a node whose
    /// breaker (its own, or the one for this function) is half-open gets this task as
    /// its single probe.
    pub fn place(
        &self,
        task_id: &str,
        sha: &str,
        function: &str,
        need: &Need,
        exclude: &HashSet<String>,
    ) -> Option<Placed> {
        self.place_batch(&[(task_id, sha, function, need)], exclude)
            .pop()
            .flatten()
    }

    /// [`Registry::place`] for several tasks under one lock, in order. The nodes that
    /// can take work at all now (attached, active, not suspect, breaker not open, a
    /// slot free) are listed once; their views are built once per (function, package)
    /// over that list and kept current as tasks are placed; each task is placed with
    /// [`placement::place_sampled`] (a few nodes drawn from the task id, all of them
    /// when none of those fits). So a batch costs one pass over the nodes, plus O(k)
    /// per task while nodes have room.
    pub fn place_batch(
        &self,
        tasks: &[(&str, &str, &str, &Need)],
        exclude: &HashSet<String>,
    ) -> Vec<Option<Placed>> {
        let now = Instant::now();
        let mut t = self.lock();
        let table = &mut *t;
        // Function-independent, so every view set below lists the same nodes at the
        // same indices.
        let open: Vec<String> = table
            .nodes
            .iter()
            .filter(|(id, n)| {
                !exclude.contains(*id)
                    && !n.full
                    && max(&n.used, &n.reported).slots < n.capacity.slots
                    && table.admin.get(*id).copied().unwrap_or_default() == NodeAdmin::Active
                    && now.duration_since(n.last_seen) <= self.cfg.suspect_after
                    && n.breaker.admission(now) != Admission::Deny
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut views: HashMap<(&str, &str), Vec<NodeView>> = HashMap::new();
        let mut out = Vec::with_capacity(tasks.len());
        for &(task_id, sha, function, need) in tasks {
            let set = views.entry((function, sha)).or_insert_with(|| {
                open.iter()
                    .filter_map(|id| table.nodes.get(id).map(|n| (id, n)))
                    .map(|(id, n)| {
                        let mut used = max(&n.used, &n.reported);
                        if n.full {
                            used.slots = n.capacity.slots;
                        }
                        let admin = table.admin.get(id).copied().unwrap_or_default();
                        let fn_ok = n
                            .fn_breakers
                            .get(function)
                            .is_none_or(|b| b.admission(now) != Admission::Deny);
                        NodeView {
                            id: id.clone(),
                            capacity: n.capacity,
                            used,
                            tags: n.tags.clone(),
                            has_package: n.packages.contains(sha),
                            schedulable: admin == NodeAdmin::Active
                                && now.duration_since(n.last_seen) <= self.cfg.suspect_after
                                && n.breaker.admission(now) != Admission::Deny
                                && fn_ok,
                        }
                    })
                    .collect()
            });
            let Some(chosen) = placement::place_sampled(set, need, placement::seed_of(task_id))
            else {
                out.push(None);
                continue;
            };
            let node_id = set[chosen].id.clone();
            let Some(n) = table.nodes.get_mut(&node_id) else {
                out.push(None);
                continue;
            };
            let probe_node = n.breaker.admission(now) == Admission::Probe;
            if probe_node {
                n.breaker.probe_started();
            }
            let probe_function = match n.fn_breakers.get_mut(function) {
                Some(b) if b.admission(now) == Admission::Probe => {
                    b.probe_started();
                    true
                }
                _ => false,
            };
            let reserved = Capacity {
                cpu_millis: need.cpu_millis,
                memory_mb: need.memory_mb,
                gpus: need.gpus,
                fpga_slots: need.fpga_slots,
                slots: 1,
            };
            add(&mut n.used, &reserved);
            // Keep every cached view of this node current: its reservation grew, and a
            // probe placed on it closes it to further work.
            let reopened = n.breaker.admission(now) != Admission::Deny;
            // Every set lists the `open` nodes in order, so the node sits at `chosen`
            // in each.
            for ((f, _), set) in views.iter_mut() {
                if let Some(v) = set.get_mut(chosen).filter(|v| v.id == node_id) {
                    add(&mut v.used, &reserved);
                    if !reopened || (probe_function && *f == function) {
                        v.schedulable = false;
                    }
                }
            }
            let (reply_tx, reply) = oneshot::channel();
            n.pending.insert(
                task_id.to_string(),
                Pending {
                    sha: sha.to_string(),
                    function: function.to_string(),
                    reserved,
                    probe_node,
                    probe_function,
                    reply: reply_tx,
                },
            );
            out.push(Some(Placed {
                node_id,
                tx: n.tx.clone(),
                reply,
            }));
        }
        out
    }

    /// Feeds one outcome into the node's breakers. `node`: Some(failed) for the node's
    /// own breaker; `func`: for the node × function breaker. `None`: the placement says
    /// nothing (a reject, a cancel): a probe it carried is given back.
    fn record(
        &self,
        t: &mut Table,
        node_id: &str,
        p: &Pending,
        node: Option<bool>,
        func: Option<bool>,
    ) {
        let now = Instant::now();
        let cfg = self.cfg.breaker;
        let Some(pool) = t.nodes.get(node_id).map(|n| n.pool.clone()) else {
            return;
        };
        // Whether the pool may lose one more member: a pass over the nodes, so the
        // breakers ask for it only when a threshold is crossed. While it runs, the
        // breaker being decided is out of the table (a closed one stands in for it,
        // which is what it is until it trips).
        let room =
            |t: &Table, of_function: Option<&str>| pool_has_room(t, &cfg, &pool, of_function, None);
        let mut events = vec![];
        match node {
            Some(failed) => {
                let Some(n) = t.nodes.get_mut(node_id) else {
                    return;
                };
                let mut b = std::mem::replace(&mut n.breaker, Breaker::new(now));
                let tr = b.record(&cfg, now, failed, || room(t, None), rand::rng().random());
                if let Some(n) = t.nodes.get_mut(node_id) {
                    n.breaker = b;
                }
                events.push((tr, None));
            }
            None if p.probe_node => {
                if let Some(n) = t.nodes.get_mut(node_id) {
                    n.breaker.probe_abandoned();
                }
            }
            None => {}
        }
        match func {
            Some(failed) => {
                let Some(n) = t.nodes.get_mut(node_id) else {
                    return;
                };
                let mut b = n
                    .fn_breakers
                    .remove(&p.function)
                    .unwrap_or_else(|| Breaker::new(now));
                let tr = b.record(
                    &cfg,
                    now,
                    failed,
                    || room(t, Some(&p.function)),
                    rand::rng().random(),
                );
                // A healthy, closed breaker with nothing counted is not worth keeping.
                let keep =
                    !(b.state() == State::Closed && b.consecutive_failures() == 0 && !failed);
                if keep && let Some(n) = t.nodes.get_mut(node_id) {
                    n.fn_breakers.insert(p.function.clone(), b);
                }
                events.push((tr, Some(p.function.clone())));
            }
            None if p.probe_function => {
                if let Some(b) = t
                    .nodes
                    .get_mut(node_id)
                    .and_then(|n| n.fn_breakers.get_mut(&p.function))
                {
                    b.probe_abandoned();
                }
            }
            None => {}
        }
        for (tr, function) in events {
            let node = node_id.to_string();
            match tr {
                Transition::Ejected { until, ejections } => self.emit(NodeEvent::Ejected {
                    node,
                    function,
                    for_ms: until.saturating_duration_since(now).as_millis() as u64,
                    ejections,
                }),
                Transition::Restored => self.emit(NodeEvent::Restored { node, function }),
                Transition::Spared => self.emit(NodeEvent::Spared { node, function }),
                Transition::None => {}
            }
        }
    }

    /// The node answered (result or reject): release the reservation, feed the
    /// breakers, wake the caller. A reply nobody here waits for (a task placed by an
    /// instance that has since died) is handed back.
    pub fn complete(&self, node_id: &str, conn: u64, task_id: &str, reply: Reply) -> Option<Reply> {
        let mut t = self.lock();
        let Some(n) = t.nodes.get_mut(node_id).filter(|n| n.conn == conn) else {
            return Some(reply);
        };
        let Some(p) = n.pending.remove(task_id) else {
            return Some(reply);
        };
        sub(&mut n.used, &p.reserved);
        // The node's last report counted this task too: until its next heartbeat,
        // take it out of the report as well, or the node looks busy for up to a second.
        sub(&mut n.reported, &p.reserved);
        if matches!(reply, Reply::Rejected(_)) {
            n.full = true;
        }
        // A node that ran the package (whatever the function did) holds it now.
        if let Reply::Done(r) = &reply
            && r.outcome() != Outcome::Failed
        {
            n.packages.insert(p.sha.clone());
        }
        let (node, func) = match &reply {
            Reply::Done(r) => verdicts(r.outcome()),
            Reply::Rejected(_) => (None, None),
        };
        self.record(&mut t, node_id, &p, node, func);
        let _ = p.reply.send(reply);
        None
    }

    /// Free task slots over every node that can take work now.
    pub fn free_slots(&self) -> usize {
        let t = self.lock();
        t.nodes
            .iter()
            .filter(|(id, n)| {
                !n.suspect && t.admin.get(*id).copied().unwrap_or_default() == NodeAdmin::Active
            })
            .map(|(_, n)| n.capacity.slots.saturating_sub(n.used.slots) as usize)
            .sum()
    }

    /// The outbound channel of one node.
    pub fn tx(&self, node_id: &str) -> Option<Outbound> {
        self.lock().nodes.get(node_id).map(|n| n.tx.clone())
    }

    /// Forgets a task whose caller gave up; frees its reservation (and its probe).
    pub fn abandon(&self, node_id: &str, task_id: &str) {
        let mut t = self.lock();
        if let Some(n) = t.nodes.get_mut(node_id)
            && let Some(p) = n.pending.remove(task_id)
        {
            sub(&mut n.used, &p.reserved);
            self.record(&mut t, node_id, &p, None, None);
        }
    }

    /// The node never answered within the task's deadline: a platform failure of the
    /// node (and of the function there); frees the reservation.
    pub fn timed_out(&self, node_id: &str, task_id: &str) {
        let mut t = self.lock();
        if let Some(n) = t.nodes.get_mut(node_id)
            && let Some(p) = n.pending.remove(task_id)
        {
            sub(&mut n.used, &p.reserved);
            self.record(&mut t, node_id, &p, Some(true), Some(true));
        }
    }

    pub fn note_package(&self, node_id: &str, sha: &str) {
        if let Some(n) = self.lock().nodes.get_mut(node_id) {
            n.packages.insert(sha.to_string());
        }
    }

    /// Every attached node's outbound channel, for broadcasts.
    pub fn all(&self) -> Vec<(String, Outbound)> {
        self.lock()
            .nodes
            .iter()
            .map(|(id, n)| (id.clone(), n.tx.clone()))
            .collect()
    }

    /// (attached nodes, their summed capacity)
    pub fn summary(&self) -> (u32, Capacity) {
        let t = self.lock();
        let mut total = Capacity::default();
        for n in t.nodes.values() {
            add(&mut total, &n.capacity);
        }
        (t.nodes.len() as u32, total)
    }

    /// What `ferry nodes` shows: each node's live state, usage, work and breakers.
    pub fn statuses(&self) -> Vec<proto::NodeStatus> {
        let now = Instant::now();
        let t = self.lock();
        let mut out: Vec<proto::NodeStatus> = t
            .nodes
            .iter()
            .map(|(id, n)| {
                let admin = t.admin.get(id).copied().unwrap_or_default();
                let silent = now.duration_since(n.last_seen);
                let state = match (admin, n.breaker.admission(now), n.breaker.state()) {
                    (NodeAdmin::Ejected, ..) => "disabled",
                    (NodeAdmin::Draining, ..) => "draining",
                    _ if silent > self.cfg.suspect_after => "suspect",
                    (_, Admission::Deny, State::Open { .. }) => "ejected",
                    (_, _, State::Open { .. } | State::HalfOpen { .. }) => "half-open",
                    _ => "ready",
                };
                let mut running: Vec<String> = n.pending.keys().cloned().collect();
                running.sort();
                let mut fns: Vec<proto::BreakerStatus> = n
                    .fn_breakers
                    .iter()
                    .map(|(f, b)| breaker_status(f, b, now))
                    .collect();
                fns.sort_by(|a, b| a.function.cmp(&b.function));
                proto::NodeStatus {
                    node_id: id.clone(),
                    state: state.into(),
                    capacity: Some(n.capacity.into()),
                    used: Some(max(&n.used, &n.reported).into()),
                    tags: n.tags.clone(),
                    labels: n.labels.clone().into_iter().collect(),
                    running,
                    breaker: Some(breaker_status("", &n.breaker, now)),
                    function_breakers: fns,
                    last_heartbeat_ms: silent.as_millis() as u64,
                    admin: admin.as_str().into(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn clear(&self) {
        self.lock().nodes.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn registry(events: mpsc::UnboundedSender<NodeEvent>) -> Registry {
        Registry::new(
            RegistryConfig {
                suspect_after: Duration::from_secs(60),
                breaker: BreakerConfig {
                    consecutive: 3,
                    base_ejection: Duration::from_millis(200),
                    jitter: 0.0,
                    ..BreakerConfig::default()
                },
            },
            Some(events),
        )
    }

    fn attach(r: &Registry, id: &str) -> mpsc::Receiver<Result<ServerMessage, tonic::Status>> {
        attach_carrying(r, id, Carried::default())
    }

    fn attach_carrying(
        r: &Registry,
        id: &str,
        carried: Carried,
    ) -> mpsc::Receiver<Result<ServerMessage, tonic::Status>> {
        let (tx, rx) = mpsc::channel(64);
        let cap = Capacity {
            cpu_millis: 4000,
            memory_mb: 4096,
            slots: 8,
            ..Capacity::default()
        };
        r.attach(
            id,
            1,
            cap,
            vec!["cpu".into()],
            BTreeMap::new(),
            vec![],
            tx,
            carried,
        );
        rx
    }

    #[test]
    fn an_ejection_carried_from_another_attachment_holds_and_counts_on() {
        let (etx, mut erx) = mpsc::unbounded_channel();
        let r = registry(etx);
        let _b = attach(&r, "b");
        let ejected = |ejections, for_ms| Carried {
            node: Some(BreakerRecord {
                ejections,
                until_ms: ferry_core::now_ms() + for_ms,
            }),
            ..Carried::default()
        };
        let _a = attach_carrying(&r, "a", ejected(2, 300));
        // Ejected: none of many placements goes to "a" while the ejection lasts.
        let mut n = 0;
        for _ in 0..12 {
            assert_ne!(run(&r, &mut n, "f", Outcome::Succeeded).unwrap(), "a");
        }
        let rec = r.carried("a").node.unwrap();
        assert_eq!(rec.ejections, 2);
        assert!(rec.until_ms > ferry_core::now_ms(), "{rec:?}");
        // It takes the pool's budget (1 of 3): another carried ejection is spared.
        let _e = attach_carrying(&r, "e", ejected(1, 300));
        assert!(matches!(erx.try_recv(), Ok(NodeEvent::Spared { node, .. }) if node == "e"));
        let e = r.carried("e").node.unwrap();
        assert_eq!((e.ejections, e.until_ms), (1, 0), "closed, its count kept");
        // After it, "a" gets the probe; a failure ejects it a third time, for longer.
        std::thread::sleep(Duration::from_millis(350));
        let mut on_a = vec![];
        for i in 0..20 {
            let id = format!("q{i}");
            if let Some(p) = r.place(&id, "sha", "f", &need(), &HashSet::new())
                && p.node_id == "a"
            {
                on_a.push(id);
            }
        }
        assert_eq!(on_a.len(), 1, "one probe, nothing else: {on_a:?}");
        let failed = TaskResult {
            task_id: on_a[0].clone(),
            outcome: Outcome::Failed as i32,
            ..TaskResult::default()
        };
        r.complete("a", 1, &on_a[0], Reply::Done(failed));
        let ev = erx.try_recv().unwrap();
        assert!(
            matches!(&ev, NodeEvent::Ejected { node, function: None, ejections: 3, for_ms } if node == "a" && *for_ms >= 550),
            "{ev:?}"
        );
        // What a detach hands on to the next attachment.
        let (_, carried) = r.detach("a", 1).unwrap();
        assert_eq!(carried.node.unwrap().ejections, 3);
        // A node never ejected carries nothing.
        assert_eq!(r.detach("b", 1).unwrap().1, Carried::default());
    }

    fn need() -> Need {
        Need {
            cpu_millis: 100,
            memory_mb: 64,
            ..Need::default()
        }
    }

    /// Places one task of `function` and answers it with `outcome`; returns the node.
    fn run(r: &Registry, n: &mut u32, function: &str, outcome: Outcome) -> Option<String> {
        *n += 1;
        let id = format!("t{n}");
        let p = r.place(&id, "sha", function, &need(), &HashSet::new())?;
        let result = TaskResult {
            task_id: id.clone(),
            outcome: outcome as i32,
            ..TaskResult::default()
        };
        assert!(
            r.complete(&p.node_id, 1, &id, Reply::Done(result))
                .is_none()
        );
        Some(p.node_id)
    }

    #[test]
    fn a_node_failing_a_function_is_ejected_for_it_and_returns_after_a_probe() {
        let (etx, mut erx) = mpsc::unbounded_channel();
        let r = registry(etx);
        let _a = attach(&r, "a");
        let _b = attach(&r, "b");
        let mut n = 0;
        // "a" fails f every time; "b" runs it fine. Spreading puts work on both until
        // "a" is ejected for f after 3 failures in a row.
        let mut a_failures = 0;
        for _ in 0..20 {
            let placed = r
                .place("probe-peek", "sha", "f", &need(), &HashSet::new())
                .unwrap();
            r.abandon(&placed.node_id, "probe-peek");
            let outcome = if placed.node_id == "a" {
                a_failures += 1;
                Outcome::FunctionError
            } else {
                Outcome::Succeeded
            };
            run(&r, &mut n, "f", outcome);
        }
        assert_eq!(a_failures, 3, "a got work only until its third failure");
        let ev = erx.try_recv().unwrap();
        assert!(
            matches!(&ev, NodeEvent::Ejected { node, function: Some(f), ejections: 1, .. } if node == "a" && f == "f"),
            "{ev:?}"
        );
        // Other functions still run on "a"; the node's own breaker is closed.
        let placed: HashSet<String> = (0..4)
            .filter_map(|_| run(&r, &mut n, "g", Outcome::Succeeded))
            .collect();
        assert!(placed.contains("a"), "{placed:?}");
        let st = r.statuses();
        assert_eq!(st[0].state, "ready");
        assert_eq!(st[0].function_breakers[0].state, "open");

        // After the ejection, one probe goes to "a"; it succeeds and closes the breaker.
        std::thread::sleep(Duration::from_millis(250));
        let probe = r.place("p", "sha", "f", &need(), &HashSet::new()).unwrap();
        assert_eq!(
            probe.node_id, "a",
            "the idle half-open node takes the probe"
        );
        let second = r.place("p2", "sha", "f", &need(), &HashSet::new()).unwrap();
        assert_eq!(second.node_id, "b", "only one probe at a time");
        let ok = TaskResult {
            task_id: "p".into(),
            outcome: Outcome::Succeeded as i32,
            ..TaskResult::default()
        };
        r.complete("a", 1, "p", Reply::Done(ok));
        assert!(matches!(
            erx.try_recv().unwrap(),
            NodeEvent::Restored { .. }
        ));
        assert!(r.statuses()[0].function_breakers.is_empty());
    }

    #[test]
    fn platform_failures_eject_the_node_but_never_more_than_half_the_pool() {
        let (etx, mut erx) = mpsc::unbounded_channel();
        let r = registry(etx);
        let _rx: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| attach(&r, id))
            .collect();
        let mut n = 0;
        // Every node fails everything: a fault of ours, not theirs. Only two of the
        // four may be out at once; the other two keep getting work.
        for _ in 0..40 {
            run(&r, &mut n, "f", Outcome::Failed);
        }
        let mut ejected = HashSet::new();
        let mut spared = 0;
        while let Ok(ev) = erx.try_recv() {
            match ev {
                NodeEvent::Ejected {
                    node,
                    function: None,
                    ..
                } => {
                    ejected.insert(node);
                }
                NodeEvent::Spared { .. } => spared += 1,
                _ => {}
            }
        }
        assert_eq!(ejected.len(), 2, "{ejected:?}");
        assert!(spared > 0);
        let states: Vec<String> = r.statuses().into_iter().map(|s| s.state).collect();
        assert_eq!(
            states.iter().filter(|s| *s == "ejected").count(),
            2,
            "{states:?}"
        );
    }

    #[test]
    fn drained_ejected_and_suspect_nodes_get_no_work_and_restore_closes_breakers() {
        let (etx, _erx) = mpsc::unbounded_channel();
        let r = registry(etx);
        let _a = attach(&r, "a");
        let _b = attach(&r, "b");
        let mut n = 0;
        // "b" is ejected by its breaker (3 platform failures), "a" drained by hand.
        for _ in 0..3 {
            let p = r
                .place("x", "sha", "f", &need(), &HashSet::from(["a".to_string()]))
                .unwrap();
            let fail = TaskResult {
                task_id: "x".into(),
                outcome: Outcome::Failed as i32,
                ..TaskResult::default()
            };
            r.complete(&p.node_id, 1, "x", Reply::Done(fail));
        }
        assert_eq!(r.statuses()[1].state, "ejected");
        r.set_admin(HashMap::from([("a".to_string(), NodeAdmin::Draining)]), &[]);
        assert!(run(&r, &mut n, "f", Outcome::Succeeded).is_none());
        assert_eq!(r.free_slots(), 8, "only b's slots: a is drained");
        assert_eq!(r.statuses()[0].state, "draining");

        // Restoring both: "a" back to active, "b"'s breaker closed at once.
        r.set_admin(HashMap::new(), &["b".to_string()]);
        assert_eq!(
            run(&r, &mut n, "f", Outcome::Succeeded).as_deref(),
            Some("a")
        );
        let only_b = HashSet::from(["a".to_string()]);
        let p = r.place("z", "sha", "f", &need(), &only_b).unwrap();
        assert_eq!(p.node_id, "b");
        assert_eq!(r.statuses()[1].state, "ready");

        // A silent node is suspect: no new work.
        let (etx, _erx) = mpsc::unbounded_channel();
        let quick = Registry::new(
            RegistryConfig {
                suspect_after: Duration::from_millis(20),
                ..RegistryConfig::default()
            },
            Some(etx),
        );
        let _c = attach(&quick, "c");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(quick.mark_suspects(), vec!["c".to_string()]);
        assert!(
            quick
                .place("y", "sha", "f", &need(), &HashSet::new())
                .is_none()
        );
        assert!(quick.heartbeat("c", 1, None), "back from suspect");
        assert!(
            quick
                .place("y", "sha", "f", &need(), &HashSet::new())
                .is_some()
        );
    }
}
