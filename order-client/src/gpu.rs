//! GPUs of this node: discovered through NVML (a machine without the NVIDIA driver has
//! none), and handed to tasks one index at a time so that a task sees only the GPUs it
//! was given (`CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES`).

use std::collections::BTreeSet;

/// One GPU as NVML reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub model: String,
    pub memory_mb: u64,
    /// A hardware encoder (NVENC) is present: HEVC encode capacity above zero.
    pub nvenc: bool,
    /// A hardware decoder (NVDEC) answers.
    pub nvdec: bool,
}

/// The GPUs NVML can see; empty when the driver or its library is missing (the reason
/// is returned for the log).
pub fn discover() -> (Vec<Gpu>, Option<String>) {
    use nvml_wrapper::Nvml;
    use nvml_wrapper::enum_wrappers::device::EncoderType;
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => return (vec![], Some(format!("NVML unavailable: {e}"))),
    };
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => return (vec![], Some(format!("NVML device count: {e}"))),
    };
    let mut out = vec![];
    for index in 0..count {
        let Ok(d) = nvml.device_by_index(index) else {
            continue;
        };
        out.push(Gpu {
            index,
            model: d.name().unwrap_or_else(|_| "unknown".into()),
            memory_mb: d.memory_info().map(|m| m.total >> 20).unwrap_or(0),
            nvenc: d.encoder_capacity(EncoderType::HEVC).is_ok_and(|c| c > 0),
            nvdec: d.decoder_utilization().is_ok(),
        });
    }
    (out, None)
}

/// Tags and labels a node with these GPUs declares: `gpu` when it has any, `nvenc` /
/// `nvdec` when every GPU has one, and `gpu.model`, `gpu.memory_mb` labels.
pub fn tags_and_labels(gpus: &[Gpu]) -> (Vec<String>, Vec<(String, String)>) {
    if gpus.is_empty() {
        return (vec![], vec![]);
    }
    let mut tags = vec!["gpu".to_string()];
    if gpus.iter().all(|g| g.nvenc) {
        tags.push("nvenc".into());
    }
    if gpus.iter().all(|g| g.nvdec) {
        tags.push("nvdec".into());
    }
    let models: BTreeSet<&str> = gpus.iter().map(|g| g.model.as_str()).collect();
    let labels = vec![
        (
            "gpu.model".to_string(),
            models.into_iter().collect::<Vec<_>>().join(","),
        ),
        (
            "gpu.memory_mb".to_string(),
            gpus.iter()
                .map(|g| g.memory_mb)
                .min()
                .unwrap_or(0)
                .to_string(),
        ),
    ];
    (tags, labels)
}

/// Which GPU indices are free. Tasks take whole GPUs.
#[derive(Debug, Default)]
pub struct GpuPool {
    free: BTreeSet<u32>,
}

impl GpuPool {
    pub fn new(indices: impl IntoIterator<Item = u32>) -> Self {
        Self {
            free: indices.into_iter().collect(),
        }
    }

    /// Takes `n` GPUs (lowest indices first), or none if fewer are free.
    pub fn take(&mut self, n: u32) -> Option<Vec<u32>> {
        if self.free.len() < n as usize {
            return None;
        }
        let got: Vec<u32> = self.free.iter().take(n as usize).copied().collect();
        for i in &got {
            self.free.remove(i);
        }
        Some(got)
    }

    pub fn give_back(&mut self, ids: &[u32]) {
        self.free.extend(ids);
    }
}

/// The environment that makes exactly `ids` visible to a process (none: no GPU).
pub fn visibility_env(ids: &[u32]) -> Vec<(String, String)> {
    let list = if ids.is_empty() {
        // CUDA: an empty list hides every device; the NVIDIA container runtime: "void".
        (String::new(), "void".to_string())
    } else {
        let s = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        (s.clone(), s)
    };
    vec![
        ("CUDA_VISIBLE_DEVICES".into(), list.0),
        ("NVIDIA_VISIBLE_DEVICES".into(), list.1),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_machine_without_the_driver_has_no_gpus() {
        // This machine has no NVIDIA driver: discovery answers nothing, with a reason.
        let (gpus, why) = discover();
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return; // a GPU machine: nothing to assert about absence
        }
        assert!(gpus.is_empty());
        assert!(why.unwrap().contains("NVML"));
        assert_eq!(tags_and_labels(&gpus), (vec![], vec![]));
    }

    #[test]
    fn tasks_get_whole_gpus_and_see_only_theirs() {
        let mut pool = GpuPool::new([0, 1, 2]);
        let a = pool.take(2).unwrap();
        assert_eq!(a, vec![0, 1]);
        assert_eq!(pool.take(2), None, "only one left");
        let b = pool.take(1).unwrap();
        assert_eq!(b, vec![2]);
        pool.give_back(&a);
        assert_eq!(pool.take(1).unwrap(), vec![0]);
        assert_eq!(
            visibility_env(&b),
            vec![
                ("CUDA_VISIBLE_DEVICES".to_string(), "2".to_string()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "2".to_string())
            ]
        );
        assert_eq!(visibility_env(&[])[0].1, "", "no GPU: every device hidden");
    }

    #[test]
    fn tags_follow_what_every_gpu_has() {
        let h100 = Gpu {
            index: 0,
            model: "NVIDIA H100".into(),
            memory_mb: 81_559,
            nvenc: false,
            nvdec: true,
        };
        let l4 = Gpu {
            index: 1,
            model: "NVIDIA L4".into(),
            memory_mb: 23_034,
            nvenc: true,
            nvdec: true,
        };
        let (tags, labels) = tags_and_labels(std::slice::from_ref(&h100));
        assert_eq!(tags, vec!["gpu", "nvdec"], "H100: decoders, no NVENC");
        assert_eq!(labels[0].1, "NVIDIA H100");
        let (tags, labels) = tags_and_labels(&[h100, l4]);
        assert_eq!(tags, vec!["gpu", "nvdec"]);
        assert_eq!(labels[0].1, "NVIDIA H100,NVIDIA L4");
        assert_eq!(labels[1].1, "23034");
    }
}
