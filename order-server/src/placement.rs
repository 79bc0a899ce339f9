//! The placement decision: a pure, deterministic function from the nodes' state and a
//! task's needs to a node. No I/O, no clocks, no randomness: the same inputs always give
//! the same answer, which is what the property tests below rely on.

use ferry_core::model::Capacity;

/// What the scheduler knows about one attached node at decision time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub capacity: Capacity,
    /// Reserved by tasks placed and not yet finished.
    pub used: Capacity,
    pub tags: Vec<String>,
    /// The node already holds the task's package (no fetch, no compile).
    pub has_package: bool,
    /// False while the node is suspect or ejected: it gets no new work.
    pub schedulable: bool,
}

/// What one task needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Need {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub gpus: u32,
    pub fpga_slots: u32,
    /// Tags a node must carry (e.g. "gpu").
    pub required_tags: Vec<String>,
    /// Tags that make a node preferable among those that fit.
    pub preferred_tags: Vec<String>,
}

impl Need {
    /// What one invocation of a function version needs.
    pub fn of(spec: &ferry_core::proto::FunctionSpec) -> Self {
        Self {
            cpu_millis: spec.cpu_millis,
            memory_mb: spec.memory_mb,
            gpus: spec.gpus,
            fpga_slots: spec.fpga_slots,
            required_tags: spec.required_tags.clone(),
            preferred_tags: spec.preferred_tags.clone(),
        }
    }
}

impl NodeView {
    /// Whether the task fits in what is left of this node.
    pub fn fits(&self, need: &Need) -> bool {
        let (c, u) = (&self.capacity, &self.used);
        self.schedulable
            && u.slots < c.slots
            && u.cpu_millis.saturating_add(need.cpu_millis) <= c.cpu_millis
            && u.memory_mb.saturating_add(need.memory_mb) <= c.memory_mb
            && u.gpus.saturating_add(need.gpus) <= c.gpus
            && u.fpga_slots.saturating_add(need.fpga_slots) <= c.fpga_slots
            && need.required_tags.iter().all(|t| self.tags.contains(t))
    }

    /// How many of the task's preferred tags this node carries.
    fn preferred(&self, need: &Need) -> usize {
        need.preferred_tags
            .iter()
            .filter(|t| self.tags.contains(t))
            .count()
    }

    /// Share of the node's CPU and slots in use after placing `need`, in 1/1000.
    fn load_after(&self, need: &Need) -> u64 {
        let cpu = (self.used.cpu_millis + need.cpu_millis) * 1000 / self.capacity.cpu_millis.max(1);
        let slots = u64::from(self.used.slots + 1) * 1000 / u64::from(self.capacity.slots.max(1));
        cpu.max(slots)
    }
}

/// Picks the node for a task, or `None` when no node can take it. Among the nodes that
/// fit it prefers, in order: the most preferred tags, one that already holds the
/// package, the least loaded one (spreading work), then the smallest id (determinism).
pub fn place(nodes: &[NodeView], need: &Need) -> Option<usize> {
    best(nodes.iter().enumerate(), need)
}

/// The best fitting node of `nodes` by [`place`]'s order.
fn best<'a>(nodes: impl Iterator<Item = (usize, &'a NodeView)>, need: &Need) -> Option<usize> {
    nodes
        .filter(|(_, n)| n.fits(need))
        .min_by(|(_, a), (_, b)| {
            b.preferred(need)
                .cmp(&a.preferred(need))
                .then(b.has_package.cmp(&a.has_package))
                .then(a.load_after(need).cmp(&b.load_after(need)))
                .then(a.id.cmp(&b.id))
        })
        .map(|(i, _)| i)
}

/// Nodes a sampled placement looks at.
pub const SAMPLE: usize = 8;

/// `k` indices below `n` drawn from `seed` (splitmix64; repeats possible): the same
/// seed always gives the same sample.
pub fn sample(n: usize, k: usize, seed: u64) -> impl Iterator<Item = usize> {
    let mut state = seed;
    (0..if n == 0 { 0 } else { k }).map(move |_| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n as u64) as usize
    })
}

/// Placement that looks at [`SAMPLE`] nodes drawn from `seed` ("power of k choices")
/// and takes the best of them by [`place`]'s order; when none of them fits, or the task
/// has preferred tags (rare nodes a sample would miss), or there are few nodes, it
/// scans them all like [`place`]. So it finds a node exactly when [`place`] does, at
/// O(k) instead of O(nodes) per task while nodes have room; still pure and
/// deterministic (the caller derives `seed` from the task).
pub fn place_sampled(nodes: &[NodeView], need: &Need, seed: u64) -> Option<usize> {
    if nodes.len() <= SAMPLE * 2 || !need.preferred_tags.is_empty() {
        return place(nodes, need);
    }
    best(
        sample(nodes.len(), SAMPLE, seed).map(|i| (i, &nodes[i])),
        need,
    )
    .or_else(|| place(nodes, need))
}

/// A sampling seed for a task: FNV-1a of its id.
pub fn seed_of(task_id: &str) -> u64 {
    task_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{Rng, SeedableRng};

    fn node(id: &str, cpu: u64, used_cpu: u64) -> NodeView {
        NodeView {
            id: id.into(),
            capacity: Capacity {
                cpu_millis: cpu,
                memory_mb: 4096,
                gpus: 0,
                fpga_slots: 0,
                slots: 10,
            },
            used: Capacity {
                cpu_millis: used_cpu,
                ..Capacity::default()
            },
            tags: vec!["cpu".into()],
            has_package: false,
            schedulable: true,
        }
    }

    fn need(cpu: u64) -> Need {
        Need {
            cpu_millis: cpu,
            memory_mb: 64,
            ..Need::default()
        }
    }

    #[test]
    fn spreads_to_the_least_loaded_node() {
        let nodes = vec![node("a", 2000, 1500), node("b", 2000, 100)];
        assert_eq!(place(&nodes, &need(100)), Some(1));
    }

    #[test]
    fn prefers_a_node_holding_the_package() {
        let mut nodes = vec![node("a", 2000, 1500), node("b", 2000, 100)];
        nodes[0].has_package = true;
        assert_eq!(place(&nodes, &need(100)), Some(0));
    }

    #[test]
    fn never_overcommits_and_skips_unschedulable_nodes() {
        let mut nodes = vec![node("a", 1000, 950), node("b", 1000, 0)];
        nodes[1].schedulable = false;
        assert_eq!(place(&nodes, &need(100)), None);
        nodes[1].schedulable = true;
        assert_eq!(place(&nodes, &need(100)), Some(1));
    }

    #[test]
    fn honours_required_tags_and_gpus() {
        let mut gpu = node("g", 4000, 0);
        gpu.tags.push("gpu".into());
        gpu.capacity.gpus = 1;
        let nodes = vec![node("c", 4000, 0), gpu];
        let n = Need {
            gpus: 1,
            required_tags: vec!["gpu".into()],
            ..need(100)
        };
        assert_eq!(place(&nodes, &n), Some(1));
        let mut busy = nodes.clone();
        busy[1].used.gpus = 1;
        assert_eq!(place(&busy, &n), None);
    }

    #[test]
    fn preferred_tags_win_over_a_cached_package_and_fpga_slots_are_counted() {
        let mut plain = node("a", 4000, 0);
        plain.has_package = true;
        let mut nvenc = node("b", 4000, 3000);
        nvenc.tags.push("nvenc".into());
        let nodes = vec![plain, nvenc];
        let n = Need {
            preferred_tags: vec!["nvenc".into()],
            ..need(100)
        };
        assert_eq!(place(&nodes, &n), Some(1));
        // Preferred, not required: with the tagged node full, the other one runs it.
        let mut full = nodes.clone();
        full[1].used.cpu_millis = 4000;
        assert_eq!(place(&full, &n), Some(0));

        let fpga = Need {
            fpga_slots: 1,
            ..need(100)
        };
        assert_eq!(place(&nodes, &fpga), None);
        let mut with_fpga = nodes.clone();
        with_fpga[0].capacity.fpga_slots = 2;
        assert_eq!(place(&with_fpga, &fpga), Some(0));
    }

    /// Sampled placement: finds a node exactly when the full scan does, the node fits,
    /// the same seed gives the same node, and filling a cluster with it never exceeds
    /// any node's capacity.
    #[test]
    fn sampled_placement_finds_a_node_whenever_the_full_scan_does() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..500 {
            let n = rng.random_range(0..200);
            let mut nodes: Vec<NodeView> = (0..n)
                .map(|i| {
                    let mut v = node(&format!("n{i:03}"), 4000, 0);
                    v.used.cpu_millis = rng.random_range(0..=4000);
                    v.used.slots = rng.random_range(0..=10);
                    v.has_package = rng.random_bool(0.3);
                    v.schedulable = rng.random_bool(0.9);
                    v
                })
                .collect();
            let mut nd = need(rng.random_range(1..1500));
            if round % 7 == 0 {
                nd.preferred_tags = vec!["cpu".into()];
            }
            let seed = rng.random::<u64>();
            let got = place_sampled(&nodes, &nd, seed);
            assert_eq!(got.is_some(), place(&nodes, &nd).is_some());
            if let Some(i) = got {
                assert!(nodes[i].fits(&nd));
            }
            assert_eq!(place_sampled(&nodes, &nd, seed), got, "deterministic");
            let mut placed = 0;
            for t in 0..2000 {
                let Some(i) = place_sampled(&nodes, &nd, seed_of(&format!("t{t}"))) else {
                    break;
                };
                nodes[i].used.cpu_millis += nd.cpu_millis;
                nodes[i].used.memory_mb += nd.memory_mb;
                nodes[i].used.slots += 1;
                placed += 1;
            }
            assert!(placed < 2000);
            assert!(nodes.iter().all(|v| !v.fits(&nd)), "filled up completely");
            for v in &nodes {
                assert!(v.used.slots <= v.capacity.slots, "{v:?}");
                assert!(v.used.cpu_millis <= v.capacity.cpu_millis, "{v:?}");
            }
        }
        assert_eq!(sample(0, SAMPLE, 1).count(), 0);
        assert!(sample(5, SAMPLE, 1).all(|i| i < 5));
    }

    /// Properties over random clusters: a chosen node always fits; `None` only when no
    /// node fits; the answer does not depend on the order nodes are listed in; filling a
    /// cluster by repeated placement never exceeds any node's capacity.
    #[test]
    fn properties_hold_on_random_clusters() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2_000 {
            let n = rng.random_range(0..8);
            let mut nodes: Vec<NodeView> = (0..n)
                .map(|i| {
                    let mut v = node(&format!("n{i}"), rng.random_range(0..4000), 0);
                    v.used.cpu_millis = rng.random_range(0..=v.capacity.cpu_millis);
                    v.used.slots = rng.random_range(0..=10);
                    v.has_package = rng.random_bool(0.3);
                    v.schedulable = rng.random_bool(0.9);
                    v
                })
                .collect();
            let nd = need(rng.random_range(1..1500));
            match place(&nodes, &nd) {
                Some(i) => assert!(nodes[i].fits(&nd)),
                None => assert!(nodes.iter().all(|v| !v.fits(&nd))),
            }
            let chosen = place(&nodes, &nd).map(|i| nodes[i].id.clone());
            nodes.reverse();
            assert_eq!(
                place(&nodes, &nd).map(|i| nodes[i].id.clone()),
                chosen,
                "order-independent"
            );

            // Fill until nothing fits; no node that received work may exceed capacity.
            let mut received = vec![false; nodes.len()];
            for _ in 0..200 {
                let Some(i) = place(&nodes, &nd) else { break };
                nodes[i].used.cpu_millis += nd.cpu_millis;
                nodes[i].used.memory_mb += nd.memory_mb;
                nodes[i].used.slots += 1;
                received[i] = true;
            }
            for (v, got) in nodes.iter().zip(received) {
                if got {
                    assert!(v.used.cpu_millis <= v.capacity.cpu_millis, "{v:?}");
                    assert!(v.used.memory_mb <= v.capacity.memory_mb, "{v:?}");
                    assert!(v.used.slots <= v.capacity.slots, "{v:?}");
                }
            }
        }
    }
}
