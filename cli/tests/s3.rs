//! The transcode function against a real S3-compatible server: moto's (PyPI
//! `moto[server]`, installed by scripts/setup.sh) on a loopback port, started and
//! killed by each test. The objects are put and checked with boto3 (another S3 client
//! than the function's), the clip is generated with lavfi, and the function runs
//! through the in-process cluster with the operator's `AWS_*` variables as the nodes'
//! function environment. Needs `target/release/transcode` (`scripts/build-guests.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_sdk::client::{Client, ClientError};
use serde_json::{Value, json};

/// The secret the nodes hold: it must never show in an answer.
const SECRET: &str = "ferry-test-SECRET-3f9a1c";

/// A moto S3 server on a loopback port, killed and reaped when dropped.
struct Moto {
    endpoint: String,
    _proc: common::Proc,
}

impl Moto {
    fn start(dir: &Path) -> Moto {
        assert!(
            Command::new("python3")
                .args(["-c", "import moto.server, boto3"])
                .status()
                .is_ok_and(|s| s.success()),
            "moto[server] and boto3 are missing: run scripts/setup.sh"
        );
        let port = common::free_port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let proc = common::Proc::spawn(
            "moto",
            Command::new("python3")
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not listen within 30 s: {}",
                std::fs::read_to_string(dir.join("moto.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            endpoint,
            _proc: proc,
        }
    }

    /// What the nodes give every function: the standard AWS variables.
    fn function_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "ferry-test"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into()
    }

    /// Runs one boto3 operation (see `BOTO`), bounded, and returns its stdout.
    fn boto(&self, args: &[&str]) -> String {
        let mut child = Command::new("timeout")
            .args(["60", "python3", "-c", BOTO, &self.endpoint])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "ferry-test")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read;
        child.stdout.take().unwrap().read_to_string(&mut out).ok();
        child.stderr.take().unwrap().read_to_string(&mut err).ok();
        assert!(child.wait().unwrap().success(), "boto3 {args:?}: {err}");
        out
    }
}

/// The test's own S3 client: `mb BUCKET`, `put BUCKET KEY FILE`, `ls BUCKET PREFIX`
/// (one key a line), `get BUCKET KEY FILE`, `type BUCKET KEY` (its Content-Type).
const BOTO: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
op, bucket = sys.argv[2], sys.argv[3]
if op == "mb":
    s3.create_bucket(Bucket=bucket)
elif op == "put":
    s3.upload_file(sys.argv[5], bucket, sys.argv[4])
elif op == "ls":
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=sys.argv[4]):
        for o in page.get("Contents", []):
            print(o["Key"])
elif op == "get":
    s3.download_file(bucket, sys.argv[4], sys.argv[5])
elif op == "type":
    print(s3.head_object(Bucket=bucket, Key=sys.argv[4])["ContentType"])
"#;

fn package() -> Vec<u8> {
    let bin = common::root().join("target/release/transcode");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/build-guests.sh (or `cargo build --release -p transcode`) first",
        bin.display()
    );
    let (_, pkg) = ferry_core::package::pack_dir(&common::root().join("functions/transcode"))
        .expect("pack functions/transcode");
    pkg
}

async fn start(dir: &Path, moto: &Moto) -> (ferry_cli::up::Cluster, Client) {
    let (cluster, client) = common::start_cluster_with_env(
        &dir.join("ferry"),
        1,
        Default::default(),
        moto.function_env(),
    )
    .await;
    client.deploy("transcode", package()).await.unwrap();
    (cluster, client)
}

/// Invokes synchronously, bounded; `no_capacity` (a call racing the previous one's
/// end) is retried for a few seconds.
async fn call(client: &Client, input: &Value) -> Result<Value, ClientError> {
    let body = serde_json::to_vec(input).unwrap();
    let attempt = async {
        for _ in 0..50 {
            match client
                .invoke_as("transcode", body.clone(), "application/json")
                .await
            {
                Err(ClientError::Api { code, .. }) if code == "no_capacity" => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other.map(|out| serde_json::from_slice(&out.body).unwrap()),
            }
        }
        panic!("no capacity for 10 s");
    };
    tokio::time::timeout(Duration::from_secs(240), attempt)
        .await
        .expect("the invocation finished within 240 s")
}

fn function_error(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!(
                (status, code.as_str()),
                (502, "function_error"),
                "{message}"
            );
            message
        }
        other => panic!("expected a function_error, got {other:?}"),
    }
}

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 4 s 640x360 25 fps lavfi clip with a tone.
fn clip(path: &Path) {
    ffmpeg(&[
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        "4",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        path.to_str().unwrap(),
    ]);
}

/// ffprobe's first video stream, frames counted by decoding.
fn video(path: &Path) -> Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "ffprobe {}", path.display());
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["streams"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_input_is_transcoded_to_an_s3_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    moto.boto(&["mb", "media-in"]);
    moto.boto(&["mb", "media-out"]);
    let src = dir.path().join("clip.mp4");
    clip(&src);
    moto.boto(&["put", "media-in", "uploads/clip.mp4", src.to_str().unwrap()]);
    let (cluster, client) = start(dir.path(), &moto).await;

    let m = call(
        &client,
        &json!({
            "input": "s3://media-in/uploads/clip.mp4",
            "output": "s3://media-out/jobs/1",
            "codec": "h264",
            "preset": "ultrafast",
            "quality": false,
            "hls": true,
            "ladder": [
                {"name": "240p", "height": 240, "bitrate_kbps": 300},
                {"name": "360p", "height": 360, "bitrate_kbps": 600},
            ],
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("transcode from and to S3: {e:?}"));

    // The manifest says where the files are in the bucket.
    assert_eq!(m["input"], "s3://media-in/uploads/clip.mp4");
    assert_eq!(m["output"], "s3://media-out/jobs/1/");
    assert_eq!(
        m["input_download"]["bytes"],
        std::fs::metadata(&src).unwrap().len()
    );
    let renditions = m["renditions"].as_array().unwrap();
    assert_eq!(renditions.len(), 2, "{m}");
    for r in renditions {
        let file = r["file"].as_str().unwrap();
        assert_eq!(r["url"], format!("s3://media-out/jobs/1/{file}"));
        assert_eq!(r["path"], format!("jobs/1/{file}"));
    }
    assert_eq!(m["cover"]["url"], "s3://media-out/jobs/1/cover.jpg");
    assert_eq!(m["hls"]["url"], "s3://media-out/jobs/1/hls/master.m3u8");
    assert!(m["output_upload"]["files"].as_u64().unwrap() > 5, "{m}");
    assert!(!m.to_string().contains(SECRET));

    // Every file is in the bucket, the manifest too.
    let keys = moto.boto(&["ls", "media-out", "jobs/1/"]);
    let keys: Vec<&str> = keys.lines().collect();
    for want in [
        "jobs/1/240p.mp4",
        "jobs/1/360p.mp4",
        "jobs/1/cover.jpg",
        "jobs/1/manifest.json",
        "jobs/1/hls/master.m3u8",
        "jobs/1/hls/360p/index.m3u8",
    ] {
        assert!(keys.contains(&want), "{want} missing from {keys:?}");
    }
    assert!(
        keys.iter()
            .any(|k| k.starts_with("jobs/1/hls/360p/") && k.ends_with(".m4s")),
        "{keys:?}"
    );
    assert_eq!(
        keys.len() as u64,
        m["output_upload"]["files"].as_u64().unwrap() + 1,
        "the upload counts every file but the manifest: {keys:?}"
    );

    for (key, mime) in [
        ("jobs/1/360p.mp4", "video/mp4"),
        ("jobs/1/hls/master.m3u8", "application/vnd.apple.mpegurl"),
        ("jobs/1/cover.jpg", "image/jpeg"),
        ("jobs/1/manifest.json", "application/json"),
    ] {
        assert_eq!(moto.boto(&["type", "media-out", key]).trim(), mime, "{key}");
    }

    // The stored manifest is the answer, and a downloaded rendition is what it says.
    let stored = dir.path().join("manifest.json");
    moto.boto(&[
        "get",
        "media-out",
        "jobs/1/manifest.json",
        stored.to_str().unwrap(),
    ]);
    let stored: Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!(stored, m);
    let got = dir.path().join("360p.mp4");
    moto.boto(&["get", "media-out", "jobs/1/360p.mp4", got.to_str().unwrap()]);
    let v = video(&got);
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(640), Some(360))
    );
    assert_eq!(v["nb_read_frames"], "100", "4 s at 25 fps");
    let r360 = renditions.iter().find(|r| r["name"] == "360p").unwrap();
    assert_eq!(r360["size_bytes"], std::fs::metadata(&got).unwrap().len());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_buckets_and_objects_fail_in_one_line_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    moto.boto(&["mb", "media-in"]);
    let src = dir.path().join("clip.mp4");
    clip(&src);
    moto.boto(&["put", "media-in", "clip.mp4", src.to_str().unwrap()]);
    let (cluster, client) = start(dir.path(), &moto).await;
    let unused = dir.path().join("unused");
    let local = format!("file://{}/", unused.display());

    let cases = [
        (
            json!({"input": "s3://media-in/clip.mp4", "output": "s3://no-such-bucket/out/"}),
            "the bucket \"no-such-bucket\" does not exist",
        ),
        (
            json!({"input": "s3://no-such-bucket/clip.mp4", "output": local}),
            "the bucket \"no-such-bucket\" does not exist",
        ),
        (
            json!({"input": "s3://media-in/nope.mp4", "output": local}),
            "cannot read s3://media-in/nope.mp4: no such object",
        ),
        (
            json!({"input": "s3://x/clip.mp4", "output": local}),
            "not a valid bucket name",
        ),
    ];
    for (input, want) in cases {
        let started = Instant::now();
        let msg = function_error(call(&client, &input).await);
        assert!(msg.contains(want), "{input}: {msg:?} should say {want:?}");
        assert!(!msg.contains(SECRET), "{msg}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{input} failed fast"
        );
    }
    assert!(!unused.exists(), "nothing was written");
    cluster.shutdown().await;
}
