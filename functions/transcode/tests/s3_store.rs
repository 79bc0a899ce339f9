//! `transcode::s3` against a real S3-compatible server: moto's (PyPI `moto[server]`,
//! installed by scripts/setup.sh) on a loopback port, killed at the end. A file big
//! enough for a multipart upload goes up and comes back byte for byte; a missing bucket
//! is one readable line without the secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use transcode::s3::{self, Config};

const SECRET: &str = "store-test-SECRET-77d1";

/// A moto server, killed and reaped when dropped.
struct Moto {
    endpoint: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Moto {
    assert!(
        Command::new("python3")
            .args(["-c", "import moto.server, boto3"])
            .status()
            .is_ok_and(|s| s.success()),
        "moto[server] and boto3 are missing: run scripts/setup.sh"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto");
    let m = Moto {
        endpoint: format!("http://127.0.0.1:{port}"),
        child,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    m
}

fn make_bucket(m: &Moto, bucket: &str) {
    let ok = Command::new("timeout")
        .args([
            "60",
            "python3",
            "-c",
            "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2])",
            &m.endpoint,
            bucket,
        ])
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .status()
        .unwrap();
    assert!(ok.success(), "create bucket {bucket}");
}

fn config(m: &Moto) -> Config {
    let vars = [
        ("AWS_ENDPOINT_URL", m.endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", "k".to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
    ];
    Config::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
}

/// Bytes that differ from part to part (a part swapped or repeated would show).
fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn files_go_up_in_parts_and_come_back_whole() {
    let m = moto();
    make_bucket(&m, "media-out");
    let cfg = config(&m);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Over the multipart threshold and not a whole number of parts.
    let big = pattern(s3::MULTIPART_FROM as usize + 3 * s3::PART / 2 + 123);
    write(&out.join("big.mp4"), &big);
    write(&out.join("hls/480p/index.m3u8"), b"#EXTM3U\n");

    let dest = s3::parse_prefix("s3://media-out/jobs/9/").unwrap();
    s3::check_output(&dest, &cfg).unwrap();
    let files = s3::files_under(&out).unwrap();
    let sent = s3::upload(&files, &dest, &cfg).unwrap();
    assert_eq!(sent, big.len() as u64 + 8);

    let back = dir.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    let got = s3::download(&dest.join("big.mp4"), &cfg, &back).unwrap();
    assert_eq!(got.bytes, big.len() as u64);
    assert!(std::fs::read(&got.path).unwrap() == big, "same bytes");
    drop(got);
    let got = s3::download(&dest.join("hls/480p/index.m3u8"), &cfg, &back).unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), b"#EXTM3U\n");
}

#[test]
fn a_missing_bucket_is_one_line_without_the_secret() {
    let m = moto();
    let cfg = config(&m);
    let dir = tempfile::tempdir().unwrap();
    let dest = s3::parse_prefix("s3://no-such-bucket/x/").unwrap();
    let e = format!("{:#}", s3::check_output(&dest, &cfg).unwrap_err());
    assert!(
        e.contains("the bucket \"no-such-bucket\" does not exist"),
        "{e}"
    );
    assert!(!e.contains(SECRET) && !e.contains('\n'), "{e}");
    let obj = s3::parse_object("s3://no-such-bucket/a.mp4").unwrap();
    let e = format!("{:#}", s3::download(&obj, &cfg, dir.path()).unwrap_err());
    assert!(e.contains("does not exist") && !e.contains(SECRET), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no partial file"
    );
}

#[test]
fn an_unreachable_store_is_named_and_given_up_on_quickly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let vars = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "k".to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
    ];
    let cfg = Config::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()));
    let started = Instant::now();
    let dest = s3::parse_prefix("s3://media-out/x/").unwrap();
    let e = format!("{:#}", s3::check_output(&dest, &cfg).unwrap_err());
    assert!(
        e.contains(&format!(
            "the object store at http://127.0.0.1:{port} did not answer"
        )),
        "{e}"
    );
    assert!(!e.contains(SECRET));
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "bounded retries"
    );
}
