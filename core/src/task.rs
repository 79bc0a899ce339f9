//! Async tasks: the record kept in the store, and the pure rules for what happens
//! after an attempt (retry with exponential backoff and jitter, or a final state).

use serde::{Deserialize, Serialize};

use crate::model::VersionRecord;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    /// The function kept failing (its own error) until attempts ran out.
    Failed,
    /// The function kept running past its timeout until attempts ran out.
    TimedOut,
    Cancelled,
    /// The platform could not complete it (nodes lost, packages unrunnable, too old).
    Dead,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Cancelled => "cancelled",
            TaskState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::TimedOut,
            Self::Cancelled,
            Self::Dead,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// Priority classes, most important first (the derived order is the placement order).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    #[default]
    Normal,
    Batch,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Normal => "normal",
            Self::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "critical" => Some(Self::Critical),
            "normal" => Some(Self::Normal),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// Per-function retry policy (`[retry]` in ferry.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time, with jitter.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// A task older than this is not retried again.
    pub max_age_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            max_age_ms: 24 * 3_600_000,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt `attempt` (1-based): `backoff × 2^(attempt-1)`,
    /// capped, scaled by `0.5 + jitter/2` with `jitter` in [0, 1).
    pub fn delay_ms(&self, attempt: u32, jitter: f64) -> u64 {
        let exp = self
            .backoff_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
        let capped = exp.min(self.max_backoff_ms) as f64;
        (capped * (0.5 + jitter.clamp(0.0, 1.0) / 2.0)) as u64
    }
}

/// One attempt at running a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub order_server: String,
    pub node: String,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// succeeded, function_error, timed_out, failed, node_lost, cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An async task, as stored at `/ferry/tasks/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub function: String,
    /// The version it runs (copied in, so an order-server needs nothing else).
    pub version: VersionRecord,
    pub cluster: String,
    pub priority: Priority,
    pub state: TaskState,
    #[serde(with = "b64")]
    pub input: Vec<u8>,
    /// Attempts started so far; the fencing epoch of the current one.
    pub attempt: u32,
    /// Attempts that ended in the function's own failure (error or timeout).
    #[serde(default)]
    pub function_failures: u32,
    /// Attempts the platform lost (node lost, instance died, package unrunnable).
    #[serde(default)]
    pub platform_failures: u32,
    pub retry: RetryPolicy,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Not to be claimed before this time (retry backoff).
    pub not_before_ms: u64,
    /// The order-server instance running it, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64opt")]
    pub output: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_tail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// How the callback is shaped (Ferry's JSON envelope, or OpenFaaS's raw result).
    #[serde(default, skip_serializing_if = "CallbackStyle::is_default")]
    pub callback_style: CallbackStyle,
    /// Delivery of the callback, once it is over (delivered or given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackStatus>,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub cancel_requested: bool,
    /// The queue's internal name (`{tenant}.{queue}`, or the queue's own name for the
    /// operator's); empty for tasks from before queues (the default queue).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub queue: String,
}

/// Who runs a claimed task, and which attempt (see [`QueueEntry::claim`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The order-server instance's incarnation, `{instance}@{registration revision}`:
    /// when it is no longer registered, any live instance re-queues the task.
    pub by: String,
    pub attempt: u32,
    pub node: String,
    pub started_ms: u64,
}

impl Claim {
    /// The instance id of [`Claim::by`].
    pub fn instance(&self) -> &str {
        self.by.rsplit_once('@').map_or(&self.by, |(i, _)| i)
    }
}

/// The shape of a task's callback request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackStyle {
    /// POST of a JSON envelope (task id, state, output, error), signed.
    #[default]
    Ferry,
    /// OpenFaaS: POST of the function's raw output, `X-Function-Status` and `X-Call-Id`.
    Openfaas,
}

impl CallbackStyle {
    pub fn is_default(&self) -> bool {
        *self == CallbackStyle::Ferry
    }
}

/// How a callback delivery ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackStatus {
    pub delivered: bool,
    pub attempts: u32,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `/ferry/callbacks/{cluster}/{task_id}`: a callback still to deliver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackRecord {
    pub task_id: String,
    pub attempts: u32,
    /// Not before this time (retry backoff).
    pub next_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The value of a queue key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub priority: Priority,
    pub not_before_ms: u64,
    pub enqueued_ms: u64,
    /// The task's queue (its internal name), so claims can hold each queue to its MRT
    /// without reading the task.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub queue: String,
    /// Set while an order-server runs the task: the claim is this mark, written on the
    /// entry by compare-and-swap (the task record is rewritten only when the attempt
    /// ends). The commit deletes the entry, or puts it back unmarked for a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

impl TaskRecord {
    /// A new task, queued now, with its version's retry policy.
    pub fn new(
        id: String,
        version: VersionRecord,
        cluster: String,
        priority: Priority,
        input: Vec<u8>,
        now_ms: u64,
    ) -> Self {
        Self {
            id,
            function: version.name.clone(),
            retry: version.retry,
            version,
            cluster,
            priority,
            state: TaskState::Queued,
            input,
            attempt: 0,
            function_failures: 0,
            platform_failures: 0,
            created_ms: now_ms,
            updated_ms: now_ms,
            not_before_ms: now_ms,
            owner: None,
            attempts: vec![],
            output: None,
            error: None,
            error_code: None,
            log_tail: String::new(),
            callback_url: None,
            callback_style: CallbackStyle::Ferry,
            callback: None,
            request_id: String::new(),
            cancel_requested: false,
            queue: String::new(),
        }
    }

    pub fn queue_entry(&self) -> QueueEntry {
        QueueEntry {
            priority: self.priority,
            not_before_ms: self.not_before_ms,
            enqueued_ms: self.updated_ms,
            queue: self.queue.clone(),
            claim: None,
        }
    }

    /// The task as it is while `claim` runs it: the record stays `queued` in the store
    /// until the attempt ends, so readers lay the claim over it. Records already past
    /// `queued` (final, or from before claim marks) are left as they are.
    pub fn with_claim(mut self, claim: &Claim) -> Self {
        if self.state != TaskState::Queued || claim.attempt <= self.attempt {
            return self;
        }
        self.state = TaskState::Running;
        self.attempt = claim.attempt;
        self.owner = Some(claim.instance().to_string());
        self.updated_ms = self.updated_ms.max(claim.started_ms);
        self.attempts.push(Attempt {
            attempt: claim.attempt,
            order_server: claim.instance().to_string(),
            node: claim.node.clone(),
            started_ms: claim.started_ms,
            finished_ms: None,
            outcome: None,
            error: None,
        });
        self
    }
}

/// The latest progress of a running attempt (`/ferry/progress/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub attempt: u32,
    /// 0 to 100.
    pub percent: f32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub updated_ms: u64,
}

/// How an attempt ended, as far as retries are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    Succeeded,
    FunctionError,
    TimedOut,
    /// The platform failed (node lost, package fetch, crash): not the function's fault.
    PlatformFailure,
    Cancelled,
}

impl AttemptEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::FunctionError => "function_error",
            Self::TimedOut => "timed_out",
            Self::PlatformFailure => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Final(TaskState),
    /// Queue again, not before this time.
    Retry {
        not_before_ms: u64,
    },
}

/// Platform failures a task survives before it is declared dead. They do not use up
/// the function's own `max_attempts`: a lost node is not the function's fault.
pub const MAX_PLATFORM_FAILURES: u32 = 10;

/// The rule: success, cancellation and requested cancellation are final; a failure is
/// retried after a backoff while its budget (the function's `max_attempts` for its own
/// failures, [`MAX_PLATFORM_FAILURES`] for the platform's) and the age limit allow,
/// else the task ends in the state that names its last failure. `task` holds the
/// counters from before this attempt ended.
pub fn after_attempt(task: &TaskRecord, end: AttemptEnd, now_ms: u64, jitter: f64) -> Next {
    let (used, budget) = match end {
        AttemptEnd::Succeeded => return Next::Final(TaskState::Succeeded),
        AttemptEnd::Cancelled => return Next::Final(TaskState::Cancelled),
        _ if task.cancel_requested => return Next::Final(TaskState::Cancelled),
        AttemptEnd::FunctionError | AttemptEnd::TimedOut => {
            (task.function_failures + 1, task.retry.max_attempts)
        }
        AttemptEnd::PlatformFailure => (task.platform_failures + 1, MAX_PLATFORM_FAILURES),
    };
    // A platform failure (its node died, its order-server was lost) is not the task's
    // doing: the first one re-queues it at once, so failover costs no backoff. Repeats
    // back off, in case the task itself is what brings nodes down.
    let delay = if end == AttemptEnd::PlatformFailure && used == 1 {
        0
    } else {
        task.retry.delay_ms(used, jitter)
    };
    let too_old =
        now_ms.saturating_add(delay).saturating_sub(task.created_ms) > task.retry.max_age_ms;
    if used < budget && !too_old {
        return Next::Retry {
            not_before_ms: now_ms + delay,
        };
    }
    Next::Final(match end {
        AttemptEnd::FunctionError => TaskState::Failed,
        AttemptEnd::TimedOut => TaskState::TimedOut,
        _ => TaskState::Dead,
    })
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

mod b64opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        use base64::Engine;
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{Kind, Limits};

    /// A running task whose earlier attempts all failed the same way (`attempt - 1`).
    fn task(attempt: u32) -> TaskRecord {
        let version = VersionRecord {
            name: "f".into(),
            version: 1,
            sha256: "0".repeat(64),
            size: 1,
            kind: Kind::Wasm,
            limits: Limits::default(),
            resources: Default::default(),
            retry: RetryPolicy::default(),
            created_ms: 0,
        };
        let mut t = TaskRecord::new(
            "t".into(),
            version,
            "local".into(),
            Priority::Normal,
            b"\x00\xffhi".to_vec(),
            0,
        );
        t.state = TaskState::Running;
        t.attempt = attempt;
        t.function_failures = attempt - 1;
        t.platform_failures = attempt - 1;
        t.output = Some(b"out".to_vec());
        t
    }

    #[test]
    fn bytes_round_trip_through_json() {
        let t = task(1);
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("\"input\":\"AP9oaQ==\""), "{json}");
        assert_eq!(serde_json::from_str::<TaskRecord>(&json).unwrap(), t);
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let p = RetryPolicy {
            backoff_ms: 1000,
            max_backoff_ms: 5000,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay_ms(1, 1.0), 1000);
        assert_eq!(p.delay_ms(2, 1.0), 2000);
        assert_eq!(p.delay_ms(3, 1.0), 4000);
        assert_eq!(p.delay_ms(4, 1.0), 5000);
        assert_eq!(p.delay_ms(40, 1.0), 5000);
        assert_eq!(p.delay_ms(2, 0.0), 1000, "jitter scales into [half, full]");
    }

    #[test]
    fn retries_until_attempts_run_out_then_names_the_failure() {
        assert_eq!(
            after_attempt(&task(1), AttemptEnd::Succeeded, 10, 0.5),
            Next::Final(TaskState::Succeeded)
        );
        assert!(
            matches!(after_attempt(&task(1), AttemptEnd::FunctionError, 10, 0.5), Next::Retry { not_before_ms } if not_before_ms > 10)
        );
        assert_eq!(
            after_attempt(&task(3), AttemptEnd::FunctionError, 10, 0.5),
            Next::Final(TaskState::Failed)
        );
        assert_eq!(
            after_attempt(&task(3), AttemptEnd::TimedOut, 10, 0.5),
            Next::Final(TaskState::TimedOut)
        );
        let mut cancelled = task(1);
        cancelled.cancel_requested = true;
        assert_eq!(
            after_attempt(&cancelled, AttemptEnd::FunctionError, 10, 0.5),
            Next::Final(TaskState::Cancelled)
        );
    }

    #[test]
    fn platform_failures_do_not_use_the_functions_budget() {
        let mut t = task(3);
        t.platform_failures = 0;
        assert_eq!(
            after_attempt(&t, AttemptEnd::PlatformFailure, 10, 0.5),
            Next::Retry { not_before_ms: 10 },
            "a first platform failure (a lost node) is re-queued at once"
        );
        t.platform_failures = 1;
        assert!(matches!(
            after_attempt(&t, AttemptEnd::PlatformFailure, 10, 0.5),
            Next::Retry { not_before_ms } if not_before_ms > 10
        ));
        t.platform_failures = MAX_PLATFORM_FAILURES - 1;
        assert_eq!(
            after_attempt(&t, AttemptEnd::PlatformFailure, 10, 0.5),
            Next::Final(TaskState::Dead)
        );
    }

    #[test]
    fn too_old_tasks_are_not_retried() {
        let mut t = task(1);
        t.retry.max_age_ms = 500;
        assert_eq!(
            after_attempt(&t, AttemptEnd::PlatformFailure, 1_000, 0.5),
            Next::Final(TaskState::Dead)
        );
    }

    #[test]
    fn priorities_order_most_important_first() {
        assert!(Priority::Critical < Priority::Normal && Priority::Normal < Priority::Batch);
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(TaskState::parse("timed_out"), Some(TaskState::TimedOut));
    }

    #[test]
    fn a_claim_is_laid_over_a_queued_record_only() {
        let mut t = task(1);
        t.state = TaskState::Queued;
        t.attempt = 0;
        let claim = Claim {
            by: "os-1@42".into(),
            attempt: 1,
            node: "n1".into(),
            started_ms: 5_000,
        };
        assert_eq!(claim.instance(), "os-1");
        let running = t.clone().with_claim(&claim);
        assert_eq!(running.state, TaskState::Running);
        assert_eq!(running.attempt, 1);
        assert_eq!(running.owner.as_deref(), Some("os-1"));
        let a = running.attempts.last().unwrap();
        assert_eq!((a.attempt, a.node.as_str(), a.started_ms), (1, "n1", 5_000));
        assert_eq!(a.finished_ms, None);
        // A mark for an attempt the record already holds (committed meanwhile), or a
        // record past queued, changes nothing.
        assert_eq!(running.clone().with_claim(&claim), running);
        let mut done = t.clone();
        done.state = TaskState::Cancelled;
        assert_eq!(done.clone().with_claim(&claim), done);
        // Old entries without a mark still parse; a mark round-trips.
        let e: QueueEntry =
            serde_json::from_str(r#"{"priority":"normal","not_before_ms":0,"enqueued_ms":1}"#)
                .unwrap();
        assert_eq!(e.claim, None);
        let mut marked = e.clone();
        marked.claim = Some(claim);
        let back: QueueEntry =
            serde_json::from_slice(&serde_json::to_vec(&marked).unwrap()).unwrap();
        assert_eq!(back, marked);
    }
}
