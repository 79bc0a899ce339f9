//! Which queued tasks a claim pass takes: pure functions of the candidates, the tasks
//! this instance runs now and each queue's share of its MRT. No I/O, no clocks.
//!
//! - **Order**: candidates go by [`queue_rank`] (priority class, then age, with aging
//!   across classes). Within each priority class the queues are then interleaved: the
//!   k-th candidate of every queue comes before the (k+1)-th of any, so a flood in one
//!   queue cannot starve another queue of the same class. The positions each class holds
//!   in the rank order are kept, so classes and aging weigh exactly as before.
//! - **MRT**: a queue's max running tasks is per cluster. Each live instance with nodes
//!   holds a share of it: with `n` such instances sorted by id and this one at rank `r`,
//!   `mrt / n`, plus one when `r < mrt % n`. The shares sum to the MRT, so the cluster
//!   never runs more, except briefly while instances join or leave (two instances may
//!   then each hold the same extra unit until they see the same membership). A candidate
//!   whose queue is at this instance's share is skipped, not a reason to stop.

use std::collections::HashMap;

use ferry_core::task::{Priority, QueueEntry};

/// How long a priority class weighs in the queue order: a batch task that has waited
/// this much longer than a critical one goes first (aging, against starvation).
pub const AGING_MS: u64 = 30_000;

/// Queue order: priority class first, older first within it, with aging across classes.
pub fn queue_rank(e: &QueueEntry) -> u64 {
    e.enqueued_ms + (e.priority as u64) * AGING_MS
}

/// The queue an entry counts against: an empty name is the operator's default queue.
pub fn queue_name(q: &str) -> &str {
    if q.is_empty() {
        ferry_core::model::DEFAULT_QUEUE
    } else {
        q
    }
}

/// This instance's share of a queue's MRT: `instances` live instances with nodes,
/// this one at `rank` in their id order.
pub fn share(mrt: u32, instances: usize, rank: usize) -> u32 {
    let n = instances.max(1) as u32;
    let r = rank as u32;
    mrt / n + u32::from(r < mrt % n)
}

/// One claimable entry as the selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub id: &'a str,
    /// The queue's internal name (already normalised by [`queue_name`]).
    pub queue: &'a str,
    pub priority: Priority,
    pub rank: u64,
}

/// Picks at most `max` candidates, in the order they should be placed (see the module
/// docs). `running`: this instance's running tasks per queue; `shares`: this instance's
/// share of each limited queue's MRT (a queue not in it is unlimited). Returns indices
/// into `cands`.
pub fn select(
    cands: &[Candidate<'_>],
    running: &HashMap<String, u32>,
    shares: &HashMap<String, u32>,
    max: usize,
) -> Vec<usize> {
    if max == 0 || cands.is_empty() {
        return vec![];
    }
    // Rank order (ties by id, for determinism).
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&cands[a], &cands[b]);
        (a.rank, a.id).cmp(&(b.rank, b.id))
    });
    // Interleave queues within each class, keeping the positions the class holds.
    let mut fair = order.clone();
    for class in [Priority::Critical, Priority::Normal, Priority::Batch] {
        let positions: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, i)| cands[**i].priority == class)
            .map(|(p, _)| p)
            .collect();
        if positions.is_empty() {
            continue;
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut members: Vec<(usize, usize)> = positions
            .iter()
            .map(|&p| {
                let i = order[p];
                let k = seen.entry(cands[i].queue).or_insert(0);
                *k += 1;
                (*k, i)
            })
            .collect();
        // Stable: within a round, rank order (the members are listed in rank order).
        members.sort_by_key(|&(k, _)| k);
        for (&p, (_, i)) in positions.iter().zip(members) {
            fair[p] = i;
        }
    }
    let mut taken: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::with_capacity(max.min(cands.len()));
    for i in fair {
        if out.len() == max {
            break;
        }
        let q = cands[i].queue;
        if let Some(&limit) = shares.get(q) {
            let t = taken.entry(q).or_insert(0);
            if running.get(q).copied().unwrap_or(0) + *t >= limit {
                continue;
            }
            *t += 1;
        }
        out.push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shares_sum_to_the_mrt_and_differ_by_at_most_one() {
        for mrt in 0..40u32 {
            for n in 1..9usize {
                let shares: Vec<u32> = (0..n).map(|r| share(mrt, n, r)).collect();
                assert_eq!(shares.iter().sum::<u32>(), mrt, "mrt {mrt} over {n}");
                let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(hi - lo <= 1, "{shares:?}");
                // The lower ranks hold the extra units.
                assert!(shares.windows(2).all(|w| w[0] >= w[1]), "{shares:?}");
            }
        }
        assert_eq!(share(2, 3, 0), 1);
        assert_eq!(share(2, 3, 1), 1);
        assert_eq!(share(2, 3, 2), 0);
        assert_eq!(share(5, 0, 0), 5, "no instance listed: this one alone");
    }

    fn c<'a>(id: &'a str, queue: &'a str, priority: Priority, rank: u64) -> Candidate<'a> {
        Candidate {
            id,
            queue,
            priority,
            rank,
        }
    }

    fn ids(cands: &[Candidate<'_>], chosen: &[usize]) -> Vec<String> {
        chosen.iter().map(|&i| cands[i].id.to_string()).collect()
    }

    #[test]
    fn a_flood_in_one_queue_does_not_starve_another_of_its_class() {
        let names: Vec<String> = (0..20).map(|i| format!("a{i:02}")).collect();
        let mut cands: Vec<Candidate> = names
            .iter()
            .enumerate()
            .map(|(i, id)| c(id, "flood", Priority::Normal, i as u64))
            .collect();
        cands.push(c("b0", "quiet", Priority::Normal, 100));
        cands.push(c("b1", "quiet", Priority::Normal, 101));
        let none = HashMap::new();
        let chosen = select(&cands, &none, &none, 4);
        assert_eq!(ids(&cands, &chosen), ["a00", "b0", "a01", "b1"]);
    }

    #[test]
    fn classes_and_aging_keep_their_places() {
        let cands = vec![
            c("crit-a1", "a", Priority::Critical, 10),
            c("crit-a2", "a", Priority::Critical, 11),
            c("batch-b", "b", Priority::Batch, 12),
            c("crit-b", "b", Priority::Critical, 13),
            c("norm-a", "a", Priority::Normal, 14),
        ];
        let none = HashMap::new();
        let chosen = select(&cands, &none, &none, 10);
        // Critical positions 0, 1, 3 go a, b, a; the (aged) batch task keeps position 2.
        assert_eq!(
            ids(&cands, &chosen),
            ["crit-a1", "crit-b", "batch-b", "crit-a2", "norm-a"]
        );
    }

    #[test]
    fn a_queue_at_its_share_is_skipped_not_a_stop() {
        let cands = vec![
            c("a1", "a", Priority::Normal, 1),
            c("a2", "a", Priority::Normal, 2),
            c("a3", "a", Priority::Normal, 3),
            c("a4", "a", Priority::Normal, 4),
            c("b1", "b", Priority::Normal, 5),
            c("b2", "b", Priority::Normal, 6),
        ];
        let shares = HashMap::from([("a".to_string(), 2)]);
        let running = HashMap::from([("a".to_string(), 1)]);
        let chosen = select(&cands, &running, &shares, 10);
        assert_eq!(ids(&cands, &chosen), ["a1", "b1", "b2"]);
        // At its share already: nothing of `a`, all of `b`, up to `max`.
        let running = HashMap::from([("a".to_string(), 2)]);
        assert_eq!(ids(&cands, &select(&cands, &running, &shares, 1)), ["b1"]);
        // A zero share (more instances than the MRT) claims nothing of that queue.
        let shares = HashMap::from([("a".to_string(), 0)]);
        let chosen = select(&cands, &HashMap::new(), &shares, 10);
        assert_eq!(ids(&cands, &chosen), ["b1", "b2"]);
    }

    #[test]
    fn never_over_the_share_whatever_the_input() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let queues = ["a", "b", "c", "d"];
        let prios = [Priority::Critical, Priority::Normal, Priority::Batch];
        for _ in 0..300 {
            let n = rng.random_range(0..60);
            let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
            let cands: Vec<Candidate> = names
                .iter()
                .map(|id| {
                    c(
                        id,
                        queues[rng.random_range(0..4)],
                        prios[rng.random_range(0..3)],
                        rng.random_range(0..100_000),
                    )
                })
                .collect();
            let mut shares: HashMap<String, u32> = HashMap::new();
            for q in queues {
                if rng.random_bool(0.5) {
                    shares.insert(q.to_string(), rng.random_range(0..5));
                }
            }
            let running: HashMap<String, u32> = queues
                .iter()
                .map(|q| (q.to_string(), rng.random_range(0..3)))
                .collect();
            let max = rng.random_range(0..40);
            let chosen = select(&cands, &running, &shares, max);
            assert!(chosen.len() <= max);
            let mut unique = chosen.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), chosen.len(), "no candidate twice");
            for (q, limit) in &shares {
                let got = chosen.iter().filter(|&&i| cands[i].queue == q).count() as u32;
                assert!(
                    running[q] + got <= (*limit).max(running[q]),
                    "{q} over its share"
                );
                if running[q] >= *limit {
                    assert_eq!(got, 0);
                }
            }
            // Unlimited queues are never skipped: the pass fills up to `max` with them.
            let unlimited = cands
                .iter()
                .filter(|x| !shares.contains_key(x.queue))
                .count();
            assert!(chosen.len() >= unlimited.min(max));
            // Within a queue and class, rank order holds.
            for q in queues {
                for p in prios {
                    let ranks: Vec<u64> = chosen
                        .iter()
                        .map(|&i| &cands[i])
                        .filter(|x| x.queue == q && x.priority == p)
                        .map(|x| x.rank)
                        .collect();
                    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
                }
            }
        }
    }
}
