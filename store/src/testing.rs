//! Test support (feature `testing`): a throwaway single-member etcd.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`EtcdServer::start`] waits for etcd to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// An etcd process on free loopback ports, with its data and log (`etcd.log`) in a
/// temporary directory. Killed (SIGKILL) and reaped on drop.
///
/// The binary is `$FERRY_ETCD_BIN`, else `/usr/bin/etcd`, else `etcd` on `PATH`.
pub struct EtcdServer {
    child: Option<Child>,
    pid: u32,
    client_port: u16,
    dir: tempfile::TempDir,
}

fn free_ports() -> io::Result<(u16, u16)> {
    // Hold both listeners until both ports are known, so they differ.
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_ETCD_BIN") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/bin/etcd");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("etcd")
    }
}

/// Whether etcd's `/health` endpoint says it is healthy.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.take(64 * 1024).read_to_string(&mut resp);
    resp.starts_with("HTTP/1.1 200") && resp.contains("\"health\":\"true\"")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl EtcdServer {
    /// Starts etcd and waits (at most 15 s) until it is healthy. The error carries the
    /// tail of etcd's log.
    pub fn start() -> io::Result<EtcdServer> {
        let mut last = None;
        // A free port can be taken by someone else before etcd binds it: retry.
        for _ in 0..3 {
            match Self::try_start() {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn try_start() -> io::Result<EtcdServer> {
        let dir = tempfile::Builder::new().prefix("ferry-etcd-").tempdir()?;
        let (client_port, peer_port) = free_ports()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let bin = etcd_binary();
        let child = Command::new(&bin)
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot run etcd ({}): {e}", bin.display()),
                )
            })?;
        let pid = child.id();
        let mut server = EtcdServer {
            child: Some(child),
            pid,
            client_port,
            dir,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = server.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                server.child = None;
                return Err(io::Error::other(format!(
                    "etcd exited at startup ({status}); log tail:\n{}",
                    tail(&log_path, 30)
                )));
            }
            if healthy(client_port) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                server.stop();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd not healthy after {START_TIMEOUT:?}; log tail:\n{}",
                        tail(&log_path, 30)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The store URL for [`crate::open`]: `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// The client endpoint: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// etcd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Kills etcd (SIGKILL) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
