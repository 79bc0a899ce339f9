//! The in-memory table of nodes attached to this instance, with their reservations.
//! One lock guards it; every operation is short and does no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use ferry_core::model::Capacity;
use ferry_core::proto::{Outcome, ServerMessage, TaskResult};
use tokio::sync::{mpsc, oneshot};

use crate::placement::{self, Need, NodeView};

pub type Outbound = mpsc::Sender<Result<ServerMessage, tonic::Status>>;

/// How a node answered an assignment.
pub enum Reply {
    Rejected(String),
    Done(TaskResult),
}

struct Pending {
    sha: String,
    reserved: Capacity,
    reply: oneshot::Sender<Reply>,
}

pub struct NodeEntry {
    pub conn: u64,
    pub capacity: Capacity,
    pub tags: Vec<String>,
    pub tx: Outbound,
    pub last_seen: Instant,
    /// Store revision of this attachment's NodeRecord (fencing for the detach write).
    pub attach_rev: i64,
    used: Capacity,
    /// What the node said it uses in its last heartbeat (it may run work this
    /// instance did not place, e.g. from before a re-attach).
    reported: Capacity,
    /// Set by a reject: the node is full in its own eyes until it heartbeats again.
    full: bool,
    packages: HashSet<String>,
    pending: HashMap<String, Pending>,
}

/// A placed task: where it went and how to hear back.
pub struct Placed {
    pub node_id: String,
    pub tx: Outbound,
    pub reply: oneshot::Receiver<Reply>,
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<HashMap<String, NodeEntry>>,
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

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeEntry>> {
        // A poisoned lock only means a panic elsewhere; the table itself stays consistent
        // because every mutation below completes without panicking.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) a node; a replaced attachment's pending tasks fail over.
    pub fn attach(
        &self,
        id: &str,
        conn: u64,
        capacity: Capacity,
        tags: Vec<String>,
        packages: Vec<String>,
        tx: Outbound,
    ) {
        let entry = NodeEntry {
            conn,
            capacity,
            tags,
            tx,
            last_seen: Instant::now(),
            attach_rev: 0,
            used: Capacity::default(),
            reported: Capacity::default(),
            full: false,
            packages: packages.into_iter().collect(),
            pending: HashMap::new(),
        };
        self.lock().insert(id.to_string(), entry);
    }

    /// Returns false when that attachment is already gone.
    pub fn set_attach_rev(&self, id: &str, conn: u64, rev: i64) -> bool {
        match self.lock().get_mut(id).filter(|n| n.conn == conn) {
            Some(n) => {
                n.attach_rev = rev;
                true
            }
            None => false,
        }
    }

    /// Removes the node if `conn` is still its attachment; returns its attach revision.
    pub fn detach(&self, id: &str, conn: u64) -> Option<i64> {
        let mut map = self.lock();
        if map.get(id).is_some_and(|n| n.conn == conn) {
            // Dropping the pending senders tells every waiting caller the node is lost.
            map.remove(id).map(|n| n.attach_rev)
        } else {
            None
        }
    }

    pub fn heartbeat(&self, id: &str, conn: u64, reported: Option<Capacity>) {
        if let Some(n) = self.lock().get_mut(id).filter(|n| n.conn == conn) {
            n.last_seen = Instant::now();
            if let Some(r) = reported {
                n.reported = r;
                n.full = false;
            }
        }
    }

    /// Nodes silent for longer than `dead_after`: (id, conn, tx).
    pub fn silent(&self, dead_after: std::time::Duration) -> Vec<(String, u64, Outbound)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_seen) > dead_after)
            .map(|(id, n)| (id.clone(), n.conn, n.tx.clone()))
            .collect()
    }

    /// Chooses a node with [`placement::place`] and reserves the task's needs on it.
    pub fn place(
        &self,
        task_id: &str,
        sha: &str,
        need: &Need,
        exclude: &HashSet<String>,
    ) -> Option<Placed> {
        let mut map = self.lock();
        let ids: Vec<&String> = map.keys().filter(|id| !exclude.contains(*id)).collect();
        let views: Vec<NodeView> = ids
            .iter()
            .map(|id| {
                let n = &map[*id];
                let mut used = max(&n.used, &n.reported);
                if n.full {
                    used.slots = n.capacity.slots;
                }
                NodeView {
                    id: (*id).clone(),
                    capacity: n.capacity,
                    used,
                    tags: n.tags.clone(),
                    has_package: n.packages.contains(sha),
                    schedulable: true,
                }
            })
            .collect();
        let chosen = placement::place(&views, need)?;
        let node_id = views[chosen].id.clone();
        let n = map.get_mut(&node_id)?;
        let reserved = Capacity {
            cpu_millis: need.cpu_millis,
            memory_mb: need.memory_mb,
            gpus: need.gpus,
            fpga_slots: 0,
            slots: 1,
        };
        add(&mut n.used, &reserved);
        let (reply_tx, reply) = oneshot::channel();
        n.pending.insert(
            task_id.to_string(),
            Pending {
                sha: sha.to_string(),
                reserved,
                reply: reply_tx,
            },
        );
        Some(Placed {
            node_id,
            tx: n.tx.clone(),
            reply,
        })
    }

    /// The node answered (result or reject): release the reservation, wake the caller.
    /// A reply nobody here waits for (a task placed by an instance that has since died)
    /// is handed back.
    pub fn complete(&self, node_id: &str, conn: u64, task_id: &str, reply: Reply) -> Option<Reply> {
        let mut map = self.lock();
        let Some(n) = map.get_mut(node_id).filter(|n| n.conn == conn) else {
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
            n.packages.insert(p.sha);
        }
        let _ = p.reply.send(reply);
        None
    }

    /// Free task slots over every attached node.
    pub fn free_slots(&self) -> usize {
        self.lock()
            .values()
            .map(|n| n.capacity.slots.saturating_sub(n.used.slots) as usize)
            .sum()
    }

    /// The outbound channel of one node.
    pub fn tx(&self, node_id: &str) -> Option<Outbound> {
        self.lock().get(node_id).map(|n| n.tx.clone())
    }

    /// Forgets a task whose caller gave up; frees its reservation.
    pub fn abandon(&self, node_id: &str, task_id: &str) {
        let mut map = self.lock();
        if let Some(n) = map.get_mut(node_id)
            && let Some(p) = n.pending.remove(task_id)
        {
            sub(&mut n.used, &p.reserved);
        }
    }

    pub fn note_package(&self, node_id: &str, sha: &str) {
        if let Some(n) = self.lock().get_mut(node_id) {
            n.packages.insert(sha.to_string());
        }
    }

    /// Every attached node's outbound channel, for broadcasts.
    pub fn all(&self) -> Vec<(String, Outbound)> {
        self.lock()
            .iter()
            .map(|(id, n)| (id.clone(), n.tx.clone()))
            .collect()
    }

    /// (attached nodes, their summed capacity)
    pub fn summary(&self) -> (u32, Capacity) {
        let map = self.lock();
        let mut total = Capacity::default();
        for n in map.values() {
            add(&mut total, &n.capacity);
        }
        (map.len() as u32, total)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}
