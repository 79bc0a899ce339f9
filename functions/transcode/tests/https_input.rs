//! An `https://` input through the real binary: a Python HTTPS server on a loopback
//! port with a certificate from a throw-away CA (openssl), which the function trusts
//! only through `SSL_CERT_FILE` (read by rustls-native-certs, the system roots'
//! loader). The clip must be fetched with exactly one request and the ladder made from
//! the download; without the CA the certificate must be refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server {
    port: u16,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SERVE: &str = r#"
import http.server, ssl, sys, os
os.chdir(sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

fn sh(dir: &Path, cmd: &str) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a leaf for 127.0.0.1 signed by it: `ca.pem`, `leaf.pem`, `leaf.key`.
fn certificates(dir: &Path) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(
        dir,
        &format!(
            "openssl req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=ferry-test-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    );
    sh(
        dir,
        &format!("openssl req {ec} -keyout leaf.key -out leaf.csr -subj /CN=127.0.0.1"),
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh(
        dir,
        "openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 -extfile ext",
    );
}

fn serve(root: &Path, certs: &Path, log: &Path) -> Server {
    let mut child = Command::new("python3")
        .args(["-c", SERVE])
        .arg(root)
        .arg(certs.join("leaf.pem"))
        .arg(certs.join("leaf.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the server's port");
    Server { port, child }
}

/// Runs the function binary on `body` in `scratch`, bounded; (success, stdout, stderr).
fn transcode(body: &str, scratch: &Path, ca: Option<&Path>) -> (bool, String, String) {
    let mut cmd = Command::new("timeout");
    cmd.arg("120")
        .arg(env!("CARGO_BIN_EXE_transcode"))
        .current_dir(scratch)
        .env_remove("SSL_CERT_DIR")
        .env_remove("FERRY_API_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match ca {
        Some(ca) => cmd.env("SSL_CERT_FILE", ca),
        None => cmd.env_remove("SSL_CERT_FILE"),
    };
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_https_input_is_downloaded_once_and_its_certificate_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, root, scratch) = (
        dir.path().join("certs"),
        dir.path().join("www"),
        dir.path().join("scratch"),
    );
    for d in [&certs, &root, &scratch] {
        std::fs::create_dir_all(d).unwrap();
    }
    certificates(&certs);
    let clip = root.join("clip.mp4");
    let out = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25",
        ])
        .args([
            "-t",
            "2",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&clip)
        .output()
        .unwrap();
    assert!(out.status.success(), "ffmpeg");
    let log = dir.path().join("server.log");
    let server = serve(&root, &certs, &log);
    let body = |out: &str| {
        format!(
            r#"{{"input":"https://127.0.0.1:{}/clip.mp4","output":"file://{}/","codec":"h264","preset":"ultrafast","quality":false,"cover":false,"ladder":[{{"name":"120p","height":120,"bitrate_kbps":200}}]}}"#,
            server.port,
            dir.path().join(out).display()
        )
    };

    let (ok, stdout, stderr) = transcode(&body("out"), &scratch, Some(&certs.join("ca.pem")));
    assert!(ok, "{stderr}");
    let m: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        m["input_download"]["bytes"],
        std::fs::metadata(&clip).unwrap().len()
    );
    assert_eq!(m["renditions"][0]["height"], 120);
    assert!(dir.path().join("out/120p.mp4").exists());
    // One GET for the probe, the ladder and the checks together.
    std::thread::sleep(Duration::from_millis(200));
    let gets = std::fs::read_to_string(&log)
        .unwrap()
        .matches("\"GET /clip.mp4")
        .count();
    assert_eq!(gets, 1, "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the download is removed"
    );

    // Without the CA, the server's certificate is refused.
    let (ok, _, stderr) = transcode(&body("out2"), &scratch, None);
    assert!(!ok);
    assert!(stderr.contains("cannot read the input"), "{stderr}");
    assert!(
        stderr.contains("certificate"),
        "the reason is given: {stderr}"
    );
    assert!(!dir.path().join("out2").exists());
}
