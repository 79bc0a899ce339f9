//! How a native invocation's CPU and memory are limited: a cgroup v2 per invocation
//! where the host delegates one to the runtime, `RLIMIT_AS` otherwise.
//!
//! **cgroup v2** needs a directory of the unified hierarchy that the runtime may create
//! children in, whose `cgroup.controllers` lists `cpu` and `memory`, and which does not
//! hold processes itself (cgroup v2's "no internal processes" rule: a cgroup that hands
//! controllers to its children holds none). It is either configured
//! ([`CgroupSetting::Root`], e.g. a systemd unit with `Delegate=yes` whose agent runs in
//! a sibling leaf, or a container's delegated subtree), or found at start
//! ([`CgroupSetting::Auto`]): the runtime's own cgroup, when its `cgroup.subtree_control`
//! already hands out `cpu` and `memory` and it is writable. Each invocation then gets
//! `ROOT/ferry-<scratch name>/` with `cpu.max = "<cpu_millis × 100> 100000"`,
//! `memory.max = memory_mb MiB`, `memory.swap.max = 0`; the process joins it before
//! `exec` (so everything it starts is inside, `setsid` or not), everything left in it is
//! killed when the invocation ends (`cgroup.kill`), and the directory is removed.
//!
//! Otherwise the **rlimit** fallback applies: `RLIMIT_AS` (address space per process)
//! from `memory_mb`, and no CPU limit (the node's capacity accounting still reserves
//! `cpu_millis`). [`Limiter::describe`] says which is in force and why.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The `cpu.max` period, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What the configuration asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// Use the runtime's own cgroup when it is usable (see the module docs).
    #[default]
    Auto,
    /// Never: rlimits only.
    Off,
    /// This delegated cgroup v2 directory (its controllers are enabled if need be).
    Root(PathBuf),
}

/// What is in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limiter {
    Cgroup { root: PathBuf },
    Rlimit { why: String },
}

impl Limiter {
    /// `cgroup v2 at …` or `rlimits (…)`: for logs and `ferry nodes`.
    pub fn describe(&self) -> String {
        match self {
            Limiter::Cgroup { root } => format!(
                "cgroup v2 under {} (cpu.max, memory.max per invocation)",
                root.display()
            ),
            Limiter::Rlimit { why } => {
                format!("rlimits (RLIMIT_AS for memory, no CPU limit): {why}")
            }
        }
    }

    pub fn is_cgroup(&self) -> bool {
        matches!(self, Limiter::Cgroup { .. })
    }
}

/// What the decision looks at, read from the host (or made up by a test).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// Where the cgroup2 filesystem is mounted, if it is.
    pub mount: Option<PathBuf>,
    /// The runtime's own cgroup v2 path (`0::/x/y` in `/proc/self/cgroup`).
    pub own: Option<String>,
}

/// Reads `/proc/self/mountinfo` and `/proc/self/cgroup`.
pub fn read_host() -> Host {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Host {
        mount: cgroup2_mount(&mountinfo),
        own: own_cgroup(&cgroup),
    }
}

/// The mount point of the cgroup2 filesystem in a `mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// The `0::PATH` entry of `/proc/self/cgroup`.
pub fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn has_both(list: &[String]) -> bool {
    ["cpu", "memory"]
        .iter()
        .all(|c| list.iter().any(|w| w.trim_start_matches('+') == *c))
}

fn writable(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path and nothing else.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0;
    ok
}

/// Whether `dir` can hold the invocations' cgroups; `Err` says why not. With
/// `enable`, missing controllers are switched on in `cgroup.subtree_control`.
pub fn check_root(dir: &Path, enable: bool) -> Result<(), String> {
    let controllers = dir.join("cgroup.controllers");
    if !controllers.exists() {
        return Err(format!("{} is not a cgroup v2 directory", dir.display()));
    }
    if !has_both(&words(&controllers)) {
        return Err(format!(
            "the cpu and memory controllers are not available in {} (cgroup.controllers: {:?}; on a hybrid host they belong to cgroup v1)",
            dir.display(),
            words(&controllers).join(" ")
        ));
    }
    if !writable(dir) {
        return Err(format!("{} is not writable by this user", dir.display()));
    }
    let subtree = dir.join("cgroup.subtree_control");
    if !has_both(&words(&subtree)) {
        if !enable {
            return Err(format!(
                "{} does not hand cpu and memory to its children (cgroup.subtree_control); configure a delegated cgroup root",
                dir.display()
            ));
        }
        std::fs::write(&subtree, "+cpu +memory").map_err(|e| {
            format!(
                "cannot enable cpu and memory in {}: {e} (a cgroup holding processes cannot delegate controllers)",
                subtree.display()
            )
        })?;
        if !has_both(&words(&subtree)) {
            return Err(format!("{} did not take +cpu +memory", subtree.display()));
        }
    }
    Ok(())
}

/// The decision (pure but for reading the candidate directory's files).
pub fn decide(setting: &CgroupSetting, host: &Host) -> Limiter {
    let rl = |why: String| Limiter::Rlimit { why };
    match setting {
        CgroupSetting::Off => rl("cgroups are turned off in the configuration".into()),
        CgroupSetting::Root(dir) => match check_root(dir, true) {
            Ok(()) => Limiter::Cgroup { root: dir.clone() },
            Err(why) => rl(why),
        },
        CgroupSetting::Auto => {
            let Some(mount) = &host.mount else {
                return rl("no cgroup v2 filesystem is mounted".into());
            };
            let Some(own) = &host.own else {
                return rl("this process is in no cgroup v2 (/proc/self/cgroup)".into());
            };
            let rel = own.trim_start_matches('/');
            let dir = if rel.is_empty() {
                mount.clone()
            } else {
                mount.join(rel)
            };
            match check_root(&dir, false) {
                Ok(()) => Limiter::Cgroup { root: dir },
                Err(why) => rl(why),
            }
        }
    }
}

/// `cpu.max` for a share of CPUs in millicores (`max` when unlimited).
pub fn cpu_max(cpu_millis: u64) -> String {
    if cpu_millis == 0 {
        format!("max {CPU_PERIOD_US}")
    } else {
        // millicores / 1000 × period, at least 1 ms of each period.
        let quota = (cpu_millis * CPU_PERIOD_US / 1000).max(1000);
        format!("{quota} {CPU_PERIOD_US}")
    }
}

/// One invocation's cgroup.
#[derive(Debug)]
pub(crate) struct InvocationGroup {
    dir: PathBuf,
    /// `cgroup.procs` of it, ready for the child to open before `exec`.
    procs: CString,
}

impl InvocationGroup {
    /// Creates `root/ferry-<name>` with the limits.
    pub(crate) fn create(
        root: &Path,
        name: &str,
        cpu_millis: u64,
        memory_mb: u64,
    ) -> Result<Self, String> {
        let dir = root.join(format!("ferry-{name}"));
        std::fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let group = Self {
            procs: CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|e| e.to_string())?,
            dir,
        };
        let set = |file: &str, value: &str| {
            std::fs::write(group.dir.join(file), value)
                .map_err(|e| format!("set {file} = {value} in {}: {e}", group.dir.display()))
        };
        set("cpu.max", &cpu_max(cpu_millis))?;
        set(
            "memory.max",
            &memory_mb.max(1).saturating_mul(1 << 20).to_string(),
        )?;
        // Not every kernel has swap accounting; without it there is nothing to limit.
        let _ = std::fs::write(group.dir.join("memory.swap.max"), "0");
        Ok(group)
    }

    /// Makes the child join the cgroup between `fork` and `exec`.
    #[allow(unsafe_code)]
    pub(crate) fn join_before_exec(&self, cmd: &mut tokio::process::Command) {
        let procs = self.procs.clone();
        // SAFETY: runs in the forked child before exec. It uses only open(2), write(2),
        // close(2) and getpid(2), which are async-signal-safe, on memory prepared
        // before the fork, and formats the pid into a stack buffer (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                let mut buf = [0u8; 20];
                let mut n = libc::getpid() as u64;
                let mut i = buf.len();
                loop {
                    i -= 1;
                    buf[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                // O_CREAT is a no-op on cgroupfs (the file exists) and lets a stand-in
                // directory of plain files record the pid.
                let fd = libc::open(
                    procs.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                );
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let len = buf.len() - i;
                let w = libc::write(fd, buf[i..].as_ptr().cast(), len);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if w != len as isize {
                    return Err(err);
                }
                Ok(())
            });
        }
    }

    /// Whether the kernel killed a process of the group for memory.
    pub(crate) fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
    }

    /// Kills whatever is left in it and removes it.
    pub(crate) fn remove(self) {
        let on_cgroupfs = is_cgroup2(&self.dir);
        if on_cgroupfs {
            if std::fs::write(self.dir.join("cgroup.kill"), "1").is_err() {
                // Kernels before 5.14: kill the members one by one.
                for pid in words(&self.dir.join("cgroup.procs")) {
                    if let Ok(pid) = pid.parse::<i32>()
                        && pid > 1
                    {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        #[allow(unsafe_code)]
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            // The kernel takes a moment to empty it after the kill.
            for _ in 0..100 {
                if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            tracing::warn!(dir = %self.dir.display(), "could not remove an invocation cgroup");
        } else {
            // Not a real cgroup (a test's stand-in directory): plain files.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) writes into the zeroed struct we own; the path is NUL-terminated.
    #[allow(unsafe_code)]
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in cgroup directory: plain files with the given contents.
    fn fake(dir: &Path, controllers: &str, subtree: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), subtree).unwrap();
    }

    #[test]
    fn reads_the_mount_and_own_cgroup() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  41 31 0:36 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / /proc rw - proc proc rw\n"), None);
        assert_eq!(
            own_cgroup("4:memory:/x\n0::/system.slice/ferry.service\n").as_deref(),
            Some("/system.slice/ferry.service")
        );
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn auto_uses_its_own_cgroup_only_when_it_delegates_cpu_and_memory() {
        let t = tempfile::tempdir().unwrap();
        let host = Host {
            mount: Some(t.path().to_path_buf()),
            own: Some("/agent".into()),
        };
        let dir = t.path().join("agent");

        // Hybrid host (this machine): cgroup2 without controllers.
        fake(&dir, "", "");
        let l = decide(&CgroupSetting::Auto, &host);
        assert!(
            matches!(&l, Limiter::Rlimit { why } if why.contains("not available")),
            "{l:?}"
        );
        // Controllers exist but are not handed down: auto does not try to enable them
        // (the agent itself lives there).
        fake(&dir, "cpuset cpu io memory pids", "pids");
        let l = decide(&CgroupSetting::Auto, &host);
        assert!(
            matches!(&l, Limiter::Rlimit { why } if why.contains("subtree_control")),
            "{l:?}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
            "pids"
        );
        fake(&dir, "cpuset cpu io memory pids", "cpu memory pids");
        assert_eq!(
            decide(&CgroupSetting::Auto, &host),
            Limiter::Cgroup { root: dir.clone() }
        );
        // No cgroup2 at all, or not in one.
        let none = decide(&CgroupSetting::Auto, &Host::default());
        assert!(matches!(&none, Limiter::Rlimit { why } if why.contains("mounted")));
        let l = decide(
            &CgroupSetting::Auto,
            &Host {
                mount: host.mount.clone(),
                own: None,
            },
        );
        assert!(matches!(l, Limiter::Rlimit { .. }));
        assert!(matches!(
            decide(&CgroupSetting::Off, &host),
            Limiter::Rlimit { .. }
        ));
    }

    #[test]
    fn a_configured_root_gets_its_controllers_enabled() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("delegated");
        fake(&dir, "cpu memory pids", "");
        let l = decide(&CgroupSetting::Root(dir.clone()), &Host::default());
        assert_eq!(l, Limiter::Cgroup { root: dir.clone() });
        assert!(l.describe().starts_with("cgroup v2 under"));
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory",
            "what the kernel is told (a real cgroupfs then lists `cpu memory`)"
        );
        let l = decide(
            &CgroupSetting::Root(t.path().join("missing")),
            &Host::default(),
        );
        assert!(matches!(&l, Limiter::Rlimit { why } if why.contains("not a cgroup v2 directory")));
        assert!(l.describe().starts_with("rlimits"));
    }

    #[test]
    fn cpu_max_from_millicores() {
        assert_eq!(cpu_max(2000), "200000 100000");
        assert_eq!(cpu_max(500), "50000 100000");
        assert_eq!(cpu_max(1), "1000 100000", "at least 1 ms per period");
        assert_eq!(cpu_max(0), "max 100000");
    }
}
