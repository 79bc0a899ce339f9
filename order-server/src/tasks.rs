//! Async tasks on an order-server instance: claiming from the shared queue, running on
//! attached nodes, and committing every transition with a compare-and-swap fenced by
//! the task's revision and this instance's registration (its lease).
//!
//! - **Claim**: queued tasks are spread over live instances by rendezvous hashing on the
//!   task id; an instance claims its own, and anyone's that waited past `steal_after`.
//!   Candidates come from the [`QueueIndex`](crate::queue_index::QueueIndex) (the queue
//!   parsed once and sorted as it arrives) and are chosen by [`fairness::select`]:
//!   priority with aging, queues interleaved within a class, each queue held to this
//!   instance's share of its MRT. One transaction claims a batch: each task's queue
//!   entry is marked with the claim (instance incarnation, attempt, node, start) by
//!   compare-and-swap on the entry, one write a task; the task record is not touched
//!   until the attempt ends (readers lay the mark over it). Tasks are placed first so
//!   nothing is claimed without a node to run it.
//! - **Complete**: the result is committed only if the entry is still at the revision
//!   the claim wrote and this instance's registration is the one that claimed it: a
//!   paused or partitioned instance whose lease expired commits nothing. The commit
//!   writes the record and deletes the entry (or puts it back unmarked for a retry).
//! - **Orphans**: entries marked by incarnations that are no longer registered (seen so
//!   in two sweeps running) are re-queued by any live instance. A result that arrives
//!   later for the same attempt (its node re-attached elsewhere) is adopted while the
//!   task has not started again. Running keys of stores from before claim marks are
//!   re-queued the same way.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ferry_core::keys;
use ferry_core::model::QueueRecord;
use ferry_core::proto::{self, Assignment, Outcome, ServerMessage, TaskResult, server_message};
use ferry_core::task::{AttemptEnd, Claim, Next, TaskRecord, TaskState, after_attempt};
use ferry_store::{Compare, Op, Revision, Txn};
use rand::Rng;
use tracing::{debug, info, warn};

use crate::fairness::{self, Candidate};
use crate::placement::Need;
use crate::queue_index::Indexed;
use crate::registry::Reply;
use crate::service::OrderService;

/// Tasks claimed in one transaction at most (a compare and a put each, under etcd's 128).
const CLAIM_BATCH: usize = 32;
/// Claim transactions one pass launches (one queue snapshot serves them all).
const CLAIM_PARALLEL: usize = 8;
/// Claim transactions in flight at once, over consecutive passes.
pub(crate) const CLAIMS_IN_FLIGHT: usize = 16;
/// Results larger than this are not kept with the task.
pub const MAX_RESULT_BYTES: usize = 1 << 20;

/// What this instance remembers about a task it runs.
#[derive(Clone)]
pub(crate) struct Inflight {
    pub node: String,
    pub attempt: u32,
    /// The queue it was claimed from (counted against that queue's MRT share).
    pub queue: String,
    /// The queue entry our claim marked, at `claim_rev`: progress is written only while
    /// it is still there unchanged (the attempt is still ours and not committed).
    pub queue_key: String,
    pub claim_rev: i64,
    pub last_progress: Option<std::time::Instant>,
    /// Its commit is under way: no more progress writes (the commit decided whether
    /// it deletes a progress key from whether one was written before).
    pub committing: bool,
}

/// The async tasks this instance runs, with a count per queue kept alongside.
#[derive(Default)]
pub(crate) struct InflightSet {
    tasks: HashMap<String, Inflight>,
    per_queue: HashMap<String, u32>,
}

impl InflightSet {
    pub fn insert(&mut self, task_id: String, i: Inflight) {
        *self.per_queue.entry(i.queue.clone()).or_insert(0) += 1;
        if let Some(old) = self.tasks.insert(task_id, i) {
            self.uncount(&old.queue);
        }
    }

    pub fn remove(&mut self, task_id: &str) -> Option<Inflight> {
        let old = self.tasks.remove(task_id)?;
        self.uncount(&old.queue);
        Some(old)
    }

    fn uncount(&mut self, queue: &str) {
        if let Some(n) = self.per_queue.get_mut(queue) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_queue.remove(queue);
            }
        }
    }

    pub fn get(&self, task_id: &str) -> Option<&Inflight> {
        self.tasks.get(task_id)
    }

    pub fn get_mut(&mut self, task_id: &str) -> Option<&mut Inflight> {
        self.tasks.get_mut(task_id)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn contains_key(&self, task_id: &str) -> bool {
        self.tasks.contains_key(task_id)
    }

    /// Running tasks per queue.
    pub fn per_queue(&self) -> &HashMap<String, u32> {
        &self.per_queue
    }
}

/// Each defined queue's MRT (`None`: unlimited), parsed at one revision of the queue
/// definitions' cache.
#[derive(Default)]
pub(crate) struct Mrts {
    revision: Revision,
    by_queue: std::sync::Arc<HashMap<String, Option<u32>>>,
}

/// A queue's MRT: its record's, else what a queue without one gets.
fn mrt_of(defined: &HashMap<String, Option<u32>>, queue: &str) -> Option<u32> {
    match defined.get(queue) {
        Some(m) => *m,
        None => QueueRecord::implicit(queue).mrt,
    }
}

/// A queue entry chosen for a claim, with its task record read.
struct Chosen {
    task: TaskRecord,
    queued: Indexed,
}

/// A task a claim transaction marks: the record as the attempt runs it (moved, not
/// cloned), the queue it counts against here, its entry's key and the revision the
/// claim compares, and its placement.
struct Marked {
    task: TaskRecord,
    queue: String,
    key: String,
    seen_rev: Revision,
    slot_id: String,
    placed: crate::registry::Placed,
}

/// At most one progress write per task per this interval.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
fn rendezvous(task_id: &str, instances: &[String]) -> Option<String> {
    rendezvous_ref(task_id, instances).cloned()
}

fn rendezvous_ref<'a>(task_id: &str, instances: &'a [String]) -> Option<&'a String> {
    if instances.len() <= 1 {
        return instances.first();
    }
    instances.iter().max_by_key(|i| {
        use sha2::Digest;
        let d = sha2::Sha256::new()
            .chain_update(task_id)
            .chain_update(b"/")
            .chain_update(i.as_bytes())
            .finalize();
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    })
}

impl OrderService {
    fn incarnation_tag(&self, create_rev: i64) -> String {
        format!("{}@{create_rev}", self.inner.cfg.id)
    }

    /// The registration compare every task commit of ours carries.
    fn fence(&self) -> Compare {
        let key = keys::order_server(&self.inner.cfg.cluster, &self.inner.cfg.id);
        Compare {
            key,
            op: ferry_store::CompareOp::Equal,
            target: ferry_store::CompareTarget::CreateRevision(self.incarnation()),
        }
    }

    /// Live instance ids of this cluster that have nodes, and all live incarnations.
    fn live(&self) -> (Vec<String>, Vec<String>) {
        let mut with_nodes = vec![];
        let mut incarnations = vec![];
        for kv in self.inner.instances.snapshot() {
            if let Ok(r) = serde_json::from_slice::<ferry_core::model::OrderServerRecord>(&kv.value)
            {
                if r.nodes > 0 {
                    with_nodes.push(r.id.clone());
                }
                incarnations.push(format!("{}@{}", r.id, kv.create_revision));
            }
        }
        with_nodes.sort();
        (with_nodes, incarnations)
    }

    /// The defined queues' MRTs, re-parsed only when their definitions changed.
    fn mrts(&self) -> std::sync::Arc<HashMap<String, Option<u32>>> {
        let rev = self.inner.queue_defs.revision();
        let mut m = self.inner.mrts.lock().unwrap_or_else(|p| p.into_inner());
        if m.revision != rev {
            let mut by_queue = HashMap::new();
            for kv in self.inner.queue_defs.snapshot() {
                if let Ok(q) = serde_json::from_slice::<QueueRecord>(&kv.value) {
                    let name = kv.key[keys::QUEUES.len()..].to_string();
                    by_queue.insert(name, q.mrt);
                }
            }
            *m = Mrts {
                revision: rev,
                by_queue: std::sync::Arc::new(by_queue),
            };
        }
        m.by_queue.clone()
    }

    pub(crate) async fn claim_loop(self) {
        let mut queue_changes = self.inner.queue.changes();
        loop {
            let claimed = match self.claim_once().await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "claiming tasks failed");
                    0
                }
            };
            if claimed == 0 {
                tokio::select! {
                    _ = queue_changes.changed() => {}
                    _ = self.inner.capacity_freed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }
    }

    /// The queue entries this pass should claim, in placement order (see
    /// [`fairness`]): ours by rendezvous (or stolen past `steal_after`), due, not
    /// already running here, within each queue's share of its MRT.
    fn choose(&self, max: usize) -> Vec<Indexed> {
        let now = ferry_core::now_ms();
        let (owners, _) = self.live();
        let me = &self.inner.cfg.id;
        // This instance's place among those with nodes (counted even before its own
        // record says it has nodes).
        let (n, rank) = match owners.binary_search(me) {
            Ok(r) => (owners.len(), r),
            Err(r) => (owners.len() + 1, r),
        };
        let steal_after = self.inner.cfg.steal_after.as_millis() as u64;
        let defined = self.mrts();
        let inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let claiming = self.claiming();
        // Running here, or about to (held by a claim transaction in flight).
        let mut running = inflight.per_queue().clone();
        for queue in claiming.values() {
            *running.entry(queue.clone()).or_insert(0) += 1;
        }
        // Shares are computed per queue as the index meets it.
        let shares = std::cell::RefCell::new(HashMap::<String, u32>::new());
        let share_of = |queue: &str| -> Option<u32> {
            let mrt = mrt_of(&defined, queue)?;
            Some(
                *shares
                    .borrow_mut()
                    .entry(queue.to_string())
                    .or_insert_with(|| fairness::share(mrt, n, rank)),
            )
        };
        let gathered = self.inner.queue.gather(
            |queue| match share_of(queue) {
                Some(s) => {
                    (s.saturating_sub(running.get(queue).copied().unwrap_or(0)) as usize).min(max)
                }
                None => max,
            },
            |e| {
                if e.entry.not_before_ms > now
                    || inflight.contains_key(&e.id)
                    || claiming.contains_key(&e.id)
                {
                    return false;
                }
                if now.saturating_sub(e.entry.not_before_ms.max(e.entry.enqueued_ms)) > steal_after
                {
                    return true;
                }
                if owners.len() <= 1 {
                    return rendezvous_ref(&e.id, &owners) == Some(me);
                }
                // A queue whose MRT is below the instance count is spread only over
                // the instances that hold a share of it.
                let owners = match mrt_of(&defined, &e.entry.queue) {
                    Some(m) if (m as usize) < owners.len() => &owners[..m as usize],
                    _ => &owners[..],
                };
                rendezvous_ref(&e.id, owners) == Some(me)
            },
        );
        let shares = shares.into_inner();
        let cands: Vec<Candidate> = gathered
            .iter()
            .map(|e| Candidate {
                id: &e.id,
                queue: &e.entry.queue,
                priority: e.entry.priority,
                rank: e.rank,
            })
            .collect();
        let picked = fairness::select(&cands, &running, &shares, max);
        drop(claiming);
        drop(inflight);
        let mut slots: Vec<Option<Indexed>> = gathered.into_iter().map(Some).collect();
        picked.into_iter().filter_map(|i| slots[i].take()).collect()
    }

    /// Claims and starts one batch; returns how many tasks it started.
    ///
    /// The claim transactions run on their own (at most [`CLAIMS_IN_FLIGHT`] at once):
    /// the next pass chooses, reads and places while they commit, skipping the entries
    /// they hold (`claiming`).
    async fn claim_once(&self) -> Result<usize, ferry_core::Error> {
        let free = self.inner.nodes.free_slots();
        if free == 0 || self.incarnation() == 0 {
            return Ok(0);
        }
        let candidates = self.choose(free.min(CLAIM_BATCH * CLAIM_PARALLEL));
        if candidates.is_empty() {
            return Ok(0);
        }
        let mut pending: Vec<String> = candidates.iter().map(|c| c.id.clone()).collect();
        self.claiming().extend(
            candidates
                .iter()
                .map(|c| (c.id.clone(), c.entry.queue.clone())),
        );
        let r = self.claim_pass(candidates, &mut pending).await;
        // What no claim transaction took over is free for the next pass.
        let mut claiming = self.claiming();
        for id in &pending {
            claiming.remove(id);
        }
        r
    }

    /// Task id → queue of the entries chosen and not yet claimed or released.
    fn claiming(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.inner
            .claiming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reads, places and launches the claim of `candidates`; removes from `pending`
    /// the ids a launched claim now holds (it releases them when it ends).
    async fn claim_pass(
        &self,
        candidates: Vec<Indexed>,
        pending: &mut Vec<String>,
    ) -> Result<usize, ferry_core::Error> {
        // Read the tasks: one round trip per batch, the batches at once.
        let reads = candidates.chunks(CLAIM_BATCH).map(|chunk| {
            let txn = Txn {
                success: chunk.iter().map(|q| Op::get(keys::task(&q.id))).collect(),
                ..Txn::default()
            };
            self.inner.store.txn(txn)
        });
        let mut gets = vec![];
        for r in futures::future::join_all(reads).await {
            gets.extend(r?.gets);
        }
        let mut batch = vec![];
        for (queued, got) in candidates.into_iter().zip(gets) {
            match got.and_then(|kv| {
                serde_json::from_slice::<TaskRecord>(&kv.value)
                    .ok()
                    .map(|t| (t, kv.mod_revision))
            }) {
                // An unmarked entry is always written with its task, in one transaction.
                Some((task, task_rev))
                    if task.state == TaskState::Queued && task_rev == queued.mod_revision =>
                {
                    batch.push(Chosen { task, queued })
                }
                // A queue entry that no longer matches its task (cancelled, or a
                // leftover).
                _ => self.drop_entry(&queued.key, queued.mod_revision).await,
            }
        }

        // Place each task before claiming it: never claim what no node can run now.
        // Placement stops at the first task that does not fit, so queue order holds.
        let needs: Vec<(String, Need)> = batch
            .iter()
            .map(|c| {
                (
                    format!("{}#{}", c.task.id, c.task.attempt + 1),
                    Need::of(&c.task.version.spec()),
                )
            })
            .collect();
        let requests: Vec<(&str, &str, &str, &Need)> = batch
            .iter()
            .zip(&needs)
            .map(|(c, (slot, need))| {
                (
                    slot.as_str(),
                    c.task.version.sha256.as_str(),
                    c.task.version.name.as_str(),
                    need,
                )
            })
            .collect();
        let outcomes = self.inner.nodes.place_batch(&requests, &Default::default());
        let mut placed = vec![];
        let mut stop = false;
        for ((c, (slot_id, _)), p) in batch.into_iter().zip(needs).zip(outcomes) {
            match p {
                Some(p) if !stop => placed.push((c, slot_id, p)),
                Some(p) => self.inner.nodes.abandon(&p.node_id, &slot_id),
                None => stop = true,
            }
        }
        if placed.is_empty() {
            return Ok(0);
        }

        // Claim in batches of CLAIM_BATCH, each one transaction, all at once.
        let mut chunks = vec![];
        while !placed.is_empty() {
            let rest = placed.split_off(placed.len().min(CLAIM_BATCH));
            chunks.push(std::mem::replace(&mut placed, rest));
        }
        let mut n = 0;
        for chunk in chunks {
            let Ok(permit) = self.inner.claims_in_flight.clone().acquire_owned().await else {
                break;
            };
            let ids: Vec<String> = chunk.iter().map(|(c, _, _)| c.queued.id.clone()).collect();
            pending.retain(|id| !ids.contains(id));
            n += chunk.len();
            let svc = self.clone();
            tokio::spawn(async move {
                match svc.claim_chunk(chunk).await {
                    Ok(0) => svc.inner.capacity_freed.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "claiming tasks failed");
                        svc.inner.capacity_freed.notify_one();
                    }
                }
                let mut claiming = svc.claiming();
                for id in &ids {
                    claiming.remove(id);
                }
                drop(permit);
            });
        }
        Ok(n)
    }

    /// Claims placed tasks in one fenced transaction (a claim mark on each queue
    /// entry) and starts them; on a lost race every reservation of the chunk is
    /// released.
    async fn claim_chunk(
        &self,
        placed: Vec<(Chosen, String, crate::registry::Placed)>,
    ) -> Result<usize, ferry_core::Error> {
        let tag = self.incarnation_tag(self.incarnation());
        let claimed_at = ferry_core::now_ms();
        let mut txn = Txn::new().when(self.fence());
        let mut started = Vec::with_capacity(placed.len());
        for (c, slot_id, p) in placed {
            let Chosen { task, queued } = c;
            let claim = Claim {
                by: tag.clone(),
                attempt: task.attempt + 1,
                node: p.node_id.clone(),
                started_ms: claimed_at,
            };
            let next = task.with_claim(&claim);
            // The entry as stored (its queue as the task names it); the index's
            // normalised name is what this instance counts running tasks under.
            let mut entry = queued.entry;
            let queue = std::mem::replace(&mut entry.queue, next.queue.clone());
            entry.claim = Some(claim);
            txn = txn
                .when(Compare::mod_revision(&queued.key, queued.mod_revision))
                .then(Op::put(
                    queued.key.clone(),
                    serde_json::to_vec(&entry).unwrap_or_default(),
                ));
            started.push(Marked {
                task: next,
                queue,
                key: queued.key,
                seen_rev: queued.mod_revision,
                slot_id,
                placed: p,
            });
        }
        let result = self.inner.store.txn(txn).await;
        let rev = match result {
            Ok(r) if r.succeeded => {
                crate::metrics::bump(&self.inner.counts.claimed, started.len());
                r.revision
            }
            other => {
                // Someone else claimed one of them (or our registration changed):
                // release every reservation and let the next round re-read.
                for m in &started {
                    self.inner.nodes.abandon(&m.placed.node_id, &m.slot_id);
                }
                if let Err(e) = other {
                    return Err(e.into());
                }
                debug!(batch = started.len(), "claim lost a race; retrying");
                return Ok(0);
            }
        };
        let claimed: Vec<(&str, Revision)> = started
            .iter()
            .map(|m| (m.task.id.as_str(), m.seen_rev))
            .collect();
        self.inner.queue.forget(&claimed);
        let n = started.len();
        for m in started {
            self.start_task(m.task, m.queue, rev, m.slot_id, m.key, m.placed);
        }
        Ok(n)
    }

    fn start_task(
        &self,
        task: TaskRecord,
        queue: String,
        claim_rev: i64,
        slot_id: String,
        queue_key: String,
        p: crate::registry::Placed,
    ) {
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                task.id.clone(),
                Inflight {
                    node: p.node_id.clone(),
                    attempt: task.attempt,
                    queue,
                    queue_key: queue_key.clone(),
                    claim_rev,
                    last_progress: None,
                    committing: false,
                },
            );
        let assignment = ServerMessage {
            msg: Some(server_message::Msg::Assignment(Assignment {
                task_id: slot_id.clone(),
                attempt: task.attempt,
                epoch: claim_rev as u64,
                function: Some(task.version.spec()),
                input: task.input.clone(),
                request_id: task.request_id.clone(),
                env: vec![],
            })),
        };
        let svc = self.clone();
        let deadline =
            Duration::from_millis(task.version.limits.timeout_ms) + self.inner.cfg.assignment_grace;
        tokio::spawn(async move {
            let (end, result, why) = if p.tx.send(Ok(assignment)).await.is_err() {
                svc.inner.nodes.abandon(&p.node_id, &slot_id);
                (
                    AttemptEnd::PlatformFailure,
                    None,
                    Some("the node's stream closed".to_string()),
                )
            } else {
                match tokio::time::timeout(deadline, p.reply).await {
                    Ok(Ok(Reply::Done(r))) => (attempt_end(&r), Some(r), None),
                    Ok(Ok(Reply::Rejected(reason))) => (
                        AttemptEnd::PlatformFailure,
                        None,
                        Some(format!("the node rejected it: {reason}")),
                    ),
                    Ok(Err(_)) => (
                        AttemptEnd::PlatformFailure,
                        None,
                        Some(format!("node {} was lost", p.node_id)),
                    ),
                    Err(_) => {
                        svc.inner.nodes.timed_out(&p.node_id, &slot_id);
                        if let Some(tx) = svc.inner.nodes.tx(&p.node_id) {
                            let cancel = proto::Cancel {
                                task_id: slot_id.clone(),
                                attempt: task.attempt,
                            };
                            let _ = tx.try_send(Ok(ServerMessage {
                                msg: Some(server_message::Msg::Cancel(cancel)),
                            }));
                        }
                        (
                            AttemptEnd::PlatformFailure,
                            None,
                            Some(format!("no result within {} ms", deadline.as_millis())),
                        )
                    }
                }
            };
            let guard = vec![Compare::mod_revision(&queue_key, claim_rev)];
            svc.commit(task, guard, end, result, why, true, vec![])
                .await;
            svc.inner.capacity_freed.notify_one();
        });
    }

    /// Commits the end of an attempt of `task` (the record as the attempt ran it,
    /// claim laid over). `guard`: the compares that say the attempt is still the
    /// task's current one (its claimed entry's revision, or the record's). `as_owner`:
    /// fence on our registration too. A final state deletes the queue entry, a retry
    /// puts it back unmarked; `also_delete` names keys of stores from before claim
    /// marks (running keys). Returns whether it was committed (false: stale, someone
    /// else moved the task on).
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        mut task: TaskRecord,
        guard: Vec<Compare>,
        end: AttemptEnd,
        result: Option<TaskResult>,
        why: Option<String>,
        as_owner: bool,
        also_delete: Vec<String>,
    ) -> bool {
        let now = ferry_core::now_ms();
        let task_id = task.id.clone();
        let mut end = end;
        if let Some(r) = &result
            && r.output.len() > MAX_RESULT_BYTES
        {
            end = AttemptEnd::FunctionError;
        }
        let error = match (&result, &why) {
            (Some(r), _) if r.output.len() > MAX_RESULT_BYTES => Some(format!(
                "output of {} bytes is over the {MAX_RESULT_BYTES}-byte task result limit; write media to storage and return references",
                r.output.len()
            )),
            (Some(r), _) if !r.error.is_empty() => Some(r.error.clone()),
            (_, Some(w)) => Some(w.clone()),
            _ => None,
        };
        if let Some(a) = task
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == task.attempt)
        {
            a.finished_ms = Some(now);
            a.outcome = Some(end.as_str().to_string());
            a.error = error.clone();
        }
        // A cancellation is requested through its key (the record stays the owner's).
        if self.inner.cancels.get(&keys::cancel(&task_id)).is_some() {
            task.cancel_requested = true;
        }
        let next = after_attempt(&task, end, now, rand::rng().random::<f64>());
        match end {
            AttemptEnd::FunctionError | AttemptEnd::TimedOut => task.function_failures += 1,
            AttemptEnd::PlatformFailure => task.platform_failures += 1,
            _ => {}
        }
        task.owner = None;
        task.updated_ms = now;
        // A progress key is written only by the attempt's owner, fenced on its running
        // key: when that is us and we never wrote one, there is none to delete.
        let wrote_progress = match self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&task_id)
        {
            Some(i) => {
                i.committing = true;
                i.last_progress.is_some()
            }
            None => true,
        };
        let mut txn = Txn {
            compares: guard,
            ..Txn::default()
        };
        if wrote_progress || !as_owner {
            txn = txn.then(Op::delete(keys::progress(&task_id)));
        }
        if as_owner {
            txn = txn.when(self.fence());
        }
        // A final state is filed under a finish-time key, by the committer (one key
        // for the commits it groups).
        let mut done = None;
        match next {
            Next::Final(state) => {
                task.state = state;
                if let Some(r) = &result {
                    task.log_tail = r.log_tail.clone();
                    if state == TaskState::Succeeded {
                        task.output = Some(r.output.clone());
                    }
                    if !r.error_code.is_empty() {
                        task.error_code = Some(r.error_code.clone());
                    }
                }
                task.error = if state == TaskState::Succeeded {
                    None
                } else {
                    error
                };
                txn = txn
                    .then(Op::delete(keys::queued(&task.cluster, &task_id)))
                    .then(Op::delete(keys::cancel(&task_id)));
                done = Some(crate::batcher::Done {
                    cluster: task.cluster.clone(),
                    finished_ms: now,
                    task_id: task_id.clone(),
                    created_ms: task.created_ms,
                    function: task.function.clone(),
                });
                if task.callback_url.is_some() {
                    let cb = ferry_core::task::CallbackRecord {
                        task_id: task_id.clone(),
                        attempts: 0,
                        next_ms: now,
                        last_error: None,
                    };
                    txn = txn.then(Op::put(
                        keys::callback(&task.cluster, &task_id),
                        serde_json::to_vec(&cb).unwrap_or_default(),
                    ));
                }
            }
            Next::Retry { not_before_ms } => {
                task.state = TaskState::Queued;
                task.not_before_ms = not_before_ms;
                task.error = error;
                txn = txn.then(Op::put(
                    keys::queued(&task.cluster, &task_id),
                    serde_json::to_vec(&task.queue_entry()).unwrap_or_default(),
                ));
            }
        }
        let requeued = matches!(next, Next::Retry { .. });
        for key in also_delete {
            txn = txn.then(Op::delete(key));
        }
        let txn = txn.then(Op::put(
            keys::task(&task_id),
            serde_json::to_vec(&task).unwrap_or_default(),
        ));
        let committed = self.inner.committer.txn(txn, done).await;
        // Counted as running (against its queue's MRT) until its running key is gone.
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task_id);
        match committed {
            Ok(true) => {
                let c = &self.inner.counts;
                crate::metrics::bump(if requeued { &c.retried } else { &c.finished }, 1);
                if !as_owner {
                    crate::metrics::bump(&c.orphans, 1);
                }
                debug!(
                    task_id,
                    state = task.state.as_str(),
                    attempt = task.attempt,
                    "task attempt committed"
                );
                true
            }
            Ok(false) => {
                self.inner
                    .stale_completions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(task_id, attempt = task.attempt, "stale completion ignored");
                false
            }
            Err(e) => {
                warn!(task_id, error = %e, "cannot commit task attempt; an orphan sweep will re-queue it");
                false
            }
        }
    }

    /// A progress report from a node: kept (throttled) under the task's progress key
    /// while the attempt is still ours and running.
    pub(crate) fn progress(&self, p: proto::Progress) {
        let Some((task_id, _)) = p.task_id.split_once('#') else {
            return; // synchronous invocations have no task to show it on
        };
        let now = std::time::Instant::now();
        let target = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match inflight.get_mut(task_id) {
                Some(i)
                    if i.attempt == p.attempt
                        && !i.committing
                        && i.last_progress.is_none_or(|t| now - t >= PROGRESS_EVERY) =>
                {
                    i.last_progress = Some(now);
                    Some((i.queue_key.clone(), i.claim_rev))
                }
                _ => None,
            }
        };
        let Some((queue_key, claim_rev)) = target else {
            return;
        };
        let record = ferry_core::task::TaskProgress {
            attempt: p.attempt,
            percent: p.percent.clamp(0.0, 100.0),
            message: p.message.chars().take(256).collect(),
            updated_ms: ferry_core::now_ms(),
        };
        let svc = self.clone();
        let key = keys::progress(task_id);
        tokio::spawn(async move {
            // The claimed entry is deleted or rewritten by the commit: a report that
            // arrives after it writes nothing, so no progress key outlives its attempt.
            let txn = Txn::new()
                .when(Compare::mod_revision(&queue_key, claim_rev))
                .then(Op::put(
                    key,
                    serde_json::to_vec(&record).unwrap_or_default(),
                ));
            if let Err(e) = svc.inner.store.txn(txn).await {
                debug!(error = %e, "progress not recorded");
            }
        });
    }

    /// A result for a task this instance did not place: adopt it if that attempt is
    /// still the task's latest and nobody runs the task now.
    pub(crate) async fn adopt(&self, r: TaskResult) {
        let Some((task_id, _)) = r.task_id.split_once('#') else {
            return;
        };
        let stale = || {
            self.inner
                .stale_completions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let Ok(Some(kv)) = self.inner.store.get(&keys::task(task_id)).await else {
            return;
        };
        let Ok(task) = serde_json::from_slice::<TaskRecord>(&kv.value) else {
            return;
        };
        if task.state.is_final() {
            return stale();
        }
        let queue_key = keys::queued(&task.cluster, task_id);
        let entry = match self.inner.store.get(&queue_key).await {
            Ok(e) => e,
            Err(_) => return,
        };
        let claim = entry.as_ref().and_then(|e| {
            serde_json::from_slice::<ferry_core::task::QueueEntry>(&e.value)
                .ok()
                .and_then(|q| q.claim)
        });
        let (_, incarnations) = self.live();
        let mut guard = vec![Compare::mod_revision(keys::task(task_id), kv.mod_revision)];
        let mut also_delete = vec![];
        let task = match (&claim, &entry) {
            // Claimed for this attempt by an instance that is gone (else its owner
            // hears from the node, or re-queues it).
            (Some(c), Some(e)) if c.attempt == r.attempt => {
                if incarnations.contains(&c.by) {
                    return;
                }
                guard.push(Compare::mod_revision(&queue_key, e.mod_revision));
                task.with_claim(c)
            }
            (Some(_), _) => return stale(),
            // Re-queued after its instance died (the attempt recorded as lost), but
            // the attempt finished after all; the entry goes with the result.
            (None, e) if task.state == TaskState::Queued && task.attempt == r.attempt => {
                if let Some(e) = e {
                    guard.push(Compare::mod_revision(&queue_key, e.mod_revision));
                }
                task
            }
            // A store from before claim marks: the record itself says running.
            (None, _) if task.state == TaskState::Running && task.attempt == r.attempt => {
                let owner_alive = task.owner.as_ref().is_some_and(|o| {
                    incarnations.iter().any(|i| i.starts_with(&format!("{o}@")))
                        && o != &self.inner.cfg.id
                });
                if owner_alive {
                    return;
                }
                also_delete = self.inner.running_keys_of(task_id).await;
                task
            }
            _ => return stale(),
        };
        info!(
            task_id,
            attempt = r.attempt,
            "adopting a result from an earlier owner"
        );
        let end = attempt_end(&r);
        self.commit(task, guard, end, Some(r), None, false, also_delete)
            .await;
    }

    /// Re-queues running tasks whose instance incarnation is gone: claimed entries
    /// whose claim is by a gone incarnation in two sweeps running (a new instance's
    /// registration may reach this instance's view after its first claims), and
    /// running keys of stores from before claim marks.
    pub(crate) async fn orphan_loop(self) {
        let mut suspects: HashSet<(String, Revision)> = HashSet::new();
        loop {
            tokio::time::sleep(self.inner.cfg.orphan_sweep).await;
            if self.incarnation() == 0 {
                continue;
            }
            let (_, live) = self.live();
            let mut seen = HashSet::new();
            for e in self.inner.queue.orphans(&live) {
                let key = (e.id.clone(), e.mod_revision);
                if suspects.contains(&key) {
                    self.requeue_claimed(e).await;
                } else {
                    seen.insert(key);
                }
            }
            suspects = seen;
            self.requeue_legacy(&live).await;
        }
    }

    /// Deletes a queue entry that has no task to go with, if it has not changed since
    /// it was read at `rev`.
    async fn drop_entry(&self, key: &str, rev: Revision) {
        let txn = Txn::new()
            .when(Compare::mod_revision(key, rev))
            .then(Op::delete(key));
        if let Err(e) = self.inner.store.txn(txn).await {
            debug!(key, error = %e, "stale queue entry not dropped; the next pass retries");
        }
    }

    /// Ends the attempt of a claimed entry whose instance is gone, as lost.
    async fn requeue_claimed(&self, e: crate::queue_index::Indexed) {
        let Some(claim) = e.entry.claim.clone() else {
            return;
        };
        let task = match self.inner.store.get(&keys::task(&e.id)).await {
            Ok(Some(kv)) => match serde_json::from_slice::<TaskRecord>(&kv.value) {
                Ok(t) => t,
                Err(_) => return,
            },
            // No task for the entry (removed by hand).
            Ok(None) => return self.drop_entry(&e.key, e.mod_revision).await,
            Err(_) => return,
        };
        info!(
            task_id = e.id,
            attempt = claim.attempt,
            "re-queueing a task whose order-server is gone"
        );
        let why = Some("its order-server instance was lost".to_string());
        let guard = vec![Compare::mod_revision(&e.key, e.mod_revision)];
        self.commit(
            task.with_claim(&claim),
            guard,
            AttemptEnd::PlatformFailure,
            None,
            why,
            false,
            vec![],
        )
        .await;
    }

    /// Running keys (stores from before claim marks) of gone incarnations.
    async fn requeue_legacy(&self, live: &[String]) {
        let prefix = keys::running_of(&self.inner.cfg.cluster);
        let Ok(running) = self.inner.store.range(&prefix).await else {
            return;
        };
        for kv in running.kvs {
            let Some((incarnation, task_id)) = kv.key[prefix.len()..].split_once('/') else {
                continue;
            };
            if live.iter().any(|l| l == incarnation) {
                continue;
            }
            let task = match self.inner.store.get(&keys::task(task_id)).await {
                Ok(Some(t)) => t,
                Ok(None) => {
                    let _ = self.inner.store.delete(&kv.key).await;
                    continue;
                }
                Err(_) => continue,
            };
            let Ok(record) = serde_json::from_slice::<TaskRecord>(&task.value) else {
                continue;
            };
            if record.state != TaskState::Running {
                let _ = self.inner.store.delete(&kv.key).await;
                continue;
            }
            let why = Some("its order-server instance was lost".to_string());
            let guard = vec![Compare::mod_revision(
                keys::task(task_id),
                task.mod_revision,
            )];
            self.commit(
                record,
                guard,
                AttemptEnd::PlatformFailure,
                None,
                why,
                false,
                vec![kv.key.clone()],
            )
            .await;
        }
    }

    /// Tells nodes to stop tasks whose cancellation was requested.
    pub(crate) async fn cancel_loop(self) {
        let mut changes = self.inner.cancels.changes();
        loop {
            for kv in self.inner.cancels.snapshot() {
                let task_id = kv.key.rsplit('/').next().unwrap_or_default().to_string();
                let node = self
                    .inner
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&task_id)
                    .map(|i| i.node.clone());
                let Some(node) = node else { continue };
                let attempt = serde_json::from_slice::<u32>(&kv.value).unwrap_or(0);
                if let Some(tx) = self.inner.nodes.tx(&node) {
                    let cancel = proto::Cancel {
                        task_id: format!("{task_id}#{attempt}"),
                        attempt,
                    };
                    let _ = tx.try_send(Ok(ServerMessage {
                        msg: Some(server_message::Msg::Cancel(cancel)),
                    }));
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

impl crate::service::Inner {
    /// Running keys of a task, under any incarnation of any instance.
    async fn running_keys_of(&self, task_id: &str) -> Vec<String> {
        let prefix = keys::running_of(&self.cfg.cluster);
        match self.store.range(&prefix).await {
            Ok(r) => r
                .kvs
                .into_iter()
                .map(|kv| kv.key)
                .filter(|k| k.ends_with(&format!("/{task_id}")))
                .collect(),
            Err(_) => vec![],
        }
    }
}

fn attempt_end(r: &TaskResult) -> AttemptEnd {
    match r.outcome() {
        Outcome::Succeeded => AttemptEnd::Succeeded,
        Outcome::FunctionError => AttemptEnd::FunctionError,
        Outcome::TimedOut => AttemptEnd::TimedOut,
        Outcome::Cancelled => AttemptEnd::Cancelled,
        Outcome::Failed | Outcome::Unspecified => AttemptEnd::PlatformFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fairness::{AGING_MS, queue_rank};
    use ferry_core::task::QueueEntry;

    #[test]
    fn rendezvous_is_stable_and_spreads() {
        let instances: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..3000 {
            let owner = rendezvous(&format!("task-{i}"), &instances).unwrap();
            assert_eq!(
                rendezvous(&format!("task-{i}"), &instances).unwrap(),
                owner,
                "stable"
            );
            *counts.entry(owner).or_default() += 1;
        }
        for c in counts.values() {
            assert!((800..1200).contains(c), "{counts:?}");
        }
        // Removing an instance moves only its own tasks.
        let two: Vec<String> = instances[..2].to_vec();
        for i in 0..300 {
            let id = format!("task-{i}");
            let before = rendezvous(&id, &instances).unwrap();
            if before != "c" {
                assert_eq!(rendezvous(&id, &two).unwrap(), before);
            }
        }
        assert_eq!(rendezvous("x", &[]), None);
    }

    #[test]
    fn aging_lets_old_batch_work_overtake_new_critical_work() {
        use ferry_core::task::Priority;
        let critical = QueueEntry {
            priority: Priority::Critical,
            not_before_ms: 0,
            enqueued_ms: 100_000,
            queue: String::new(),
            claim: None,
        };
        let fresh_batch = QueueEntry {
            priority: Priority::Batch,
            not_before_ms: 0,
            enqueued_ms: 100_000,
            queue: String::new(),
            claim: None,
        };
        let old_batch = QueueEntry {
            priority: Priority::Batch,
            not_before_ms: 0,
            enqueued_ms: 100_000 - 2 * AGING_MS - 1,
            queue: String::new(),
            claim: None,
        };
        assert!(queue_rank(&critical) < queue_rank(&fresh_batch));
        assert!(queue_rank(&old_batch) < queue_rank(&critical));
    }
}

#[cfg(test)]
pub(crate) mod fencing {
    use std::sync::Arc;

    use ferry_core::model::VersionRecord;
    use ferry_core::package::{Kind, Limits};
    use ferry_core::task::{Priority, RetryPolicy};
    use ferry_store::Store;

    use super::*;
    use crate::Config;

    /// A service on an embedded store in a fresh folder (kept while the folder lives).
    pub(crate) async fn service(cfg: Config) -> (tempfile::TempDir, Arc<dyn Store>, OrderService) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(ferry_store::embedded::EmbeddedStore::open(dir.path()).unwrap());
        let svc = OrderService::start(cfg, "http://127.0.0.1:1".into(), store.clone())
            .await
            .unwrap();
        (dir, store, svc)
    }

    /// A queued task of `function` created at `created_ms`, for tests.
    pub(crate) fn queued_task(function: &str, created_ms: u64) -> TaskRecord {
        let version = VersionRecord {
            name: function.into(),
            version: 1,
            sha256: "0".repeat(64),
            size: 1,
            kind: Kind::Wasm,
            limits: Limits::default(),
            resources: Default::default(),
            retry: RetryPolicy::default(),
            created_ms: 0,
        };
        TaskRecord::new(
            ferry_core::id::new_id(),
            version,
            "local".into(),
            Priority::Normal,
            vec![],
            created_ms,
        )
    }

    /// Stores `task` queued and its entry claimed by `by` for attempt 1; returns the
    /// record as the attempt runs it, the entry's key and the claim's revision.
    pub(crate) async fn claimed(
        store: &Arc<dyn Store>,
        task: &TaskRecord,
        by: &str,
    ) -> (TaskRecord, String, Revision) {
        let claim = Claim {
            by: by.into(),
            attempt: 1,
            node: "n1".into(),
            started_ms: ferry_core::now_ms(),
        };
        let mut entry = task.queue_entry();
        entry.claim = Some(claim.clone());
        let key = keys::queued(&task.cluster, &task.id);
        store
            .put(&keys::task(&task.id), serde_json::to_vec(task).unwrap(), 0)
            .await
            .unwrap();
        let rev = store
            .put(&key, serde_json::to_vec(&entry).unwrap(), 0)
            .await
            .unwrap();
        (task.clone().with_claim(&claim), key, rev)
    }

    fn ok_result(task: &TaskRecord) -> TaskResult {
        TaskResult {
            task_id: format!("{}#1", task.id),
            attempt: 1,
            outcome: Outcome::Succeeded as i32,
            output: b"done".to_vec(),
            ..TaskResult::default()
        }
    }

    async fn state_of(store: &Arc<dyn Store>, id: &str) -> TaskState {
        let kv = store.get(&keys::task(id)).await.unwrap().unwrap();
        serde_json::from_slice::<TaskRecord>(&kv.value)
            .unwrap()
            .state
    }

    #[tokio::test]
    async fn completions_are_fenced_by_revision_and_by_the_instance_registration() {
        let cfg = Config {
            token: "t".into(),
            ..Config::default()
        };
        let (_dir, store, svc) = service(cfg.clone()).await;
        assert!(svc.incarnation() > 0);
        let tag = svc.incarnation_tag(svc.incarnation());
        let (task, key, rev) = claimed(&store, &queued_task("f", ferry_core::now_ms()), &tag).await;
        let guard = |rev| vec![Compare::mod_revision(&key, rev)];

        // A stale revision: someone moved the task on since our claim.
        assert!(
            !svc.commit(
                task.clone(),
                guard(rev - 1),
                AttemptEnd::Succeeded,
                Some(ok_result(&task)),
                None,
                true,
                vec![]
            )
            .await
        );
        assert_eq!(state_of(&store, &task.id).await, TaskState::Queued);

        // Our registration vanished (the lease expired while we were paused) and was
        // written again: the old incarnation's completion must change nothing.
        let reg = keys::order_server(&cfg.cluster, &cfg.id);
        let old = store.get(&reg).await.unwrap().unwrap();
        store.delete(&reg).await.unwrap();
        store.put(&reg, old.value, 0).await.unwrap();
        assert!(
            !svc.commit(
                task.clone(),
                guard(rev),
                AttemptEnd::Succeeded,
                Some(ok_result(&task)),
                None,
                true,
                vec![]
            )
            .await
        );
        assert_eq!(state_of(&store, &task.id).await, TaskState::Queued);
        assert_eq!(store.get(&key).await.unwrap().unwrap().mod_revision, rev);
        assert_eq!(svc.stale_completions(), 2);

        // Unfenced by registration (the orphan/adoption path) but at the right revision:
        // committed once (the entry goes, the attempt is recorded), and a second
        // identical completion is stale.
        assert!(
            svc.commit(
                task.clone(),
                guard(rev),
                AttemptEnd::Succeeded,
                Some(ok_result(&task)),
                None,
                false,
                vec![]
            )
            .await
        );
        assert_eq!(state_of(&store, &task.id).await, TaskState::Succeeded);
        assert!(store.get(&key).await.unwrap().is_none());
        let kv = store.get(&keys::task(&task.id)).await.unwrap().unwrap();
        let done: TaskRecord = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(done.attempt, 1);
        assert_eq!(done.attempts.len(), 1);
        assert_eq!(done.attempts[0].node, "n1");
        assert_eq!(done.attempts[0].outcome.as_deref(), Some("succeeded"));
        assert!(
            !svc.commit(
                task.clone(),
                guard(rev),
                AttemptEnd::Succeeded,
                Some(ok_result(&task)),
                None,
                false,
                vec![]
            )
            .await
        );
        svc.close().await;
    }
}

#[cfg(test)]
mod orphans {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use ferry_core::task::QueueEntry;

    use super::fencing::{claimed, queued_task, service};
    use super::*;
    use crate::Config;

    /// A task claimed by an incarnation that is not registered is re-queued by a live
    /// instance: its attempt recorded as lost, its entry put back unmarked (once seen
    /// orphaned in two sweeps); an entry claimed by a live incarnation is left alone.
    #[tokio::test]
    async fn claims_of_gone_instances_are_requeued_and_live_ones_are_kept() {
        let cfg = Config {
            token: "t".into(),
            orphan_sweep: Duration::from_millis(50),
            ..Config::default()
        };
        let (_dir, store, svc) = service(cfg).await;
        let now = ferry_core::now_ms();
        let gone = queued_task("f", now);
        let ours = queued_task("f", now);
        let live_tag = svc.incarnation_tag(svc.incarnation());
        claimed(&store, &gone, "os-dead@3").await;
        claimed(&store, &ours, &live_tag).await;
        // Bounded wait for the sweep.
        let mut requeued = None;
        for _ in 0..100 {
            let kv = store.get(&keys::task(&gone.id)).await.unwrap().unwrap();
            let t: TaskRecord = serde_json::from_slice(&kv.value).unwrap();
            if t.attempt == 1 {
                requeued = Some(t);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = requeued.expect("the gone instance's task was re-queued");
        assert_eq!(t.state, TaskState::Queued);
        assert_eq!(t.platform_failures, 1);
        assert_eq!(t.attempts[0].outcome.as_deref(), Some("failed"));
        assert_eq!(t.attempts[0].node, "n1");
        let entry_of = async |t: &TaskRecord| -> QueueEntry {
            let kv = store.get(&keys::queued(&t.cluster, &t.id)).await.unwrap();
            serde_json::from_slice(&kv.unwrap().value).unwrap()
        };
        assert_eq!(
            entry_of(&gone).await.claim,
            None,
            "back in the queue, unmarked"
        );
        // The live instance's claim is untouched.
        assert_eq!(entry_of(&ours).await.claim.unwrap().by, live_tag);
        svc.close().await;
    }
}
