//! An `http://` or `https://` input is downloaded once, streaming, into the
//! invocation's scratch directory, and every pass (probe, ladder, cover, quality,
//! segments) reads that file instead of fetching the URL again. TLS is reqwest's
//! rustls with the aws-lc-rs provider (the workspace's one TLS stack, shared with the
//! S3 client of [`crate::s3`]) and the system's root certificates. `s3://` inputs are
//! downloaded the same way by [`crate::s3::download`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use crate::request::Input;

/// Give up when the server sends nothing for this long (like ffmpeg's `-rw_timeout`).
const STALL: Duration = Duration::from_secs(30);
const CONNECT: Duration = Duration::from_secs(10);

/// Whether the input is fetched once before the passes: every network input is.
pub fn downloads(input: &Input) -> bool {
    input.is_network()
}

/// What the manifest says about the download.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Downloaded {
    pub bytes: u64,
    pub ms: u64,
}

/// The downloaded file, removed when dropped.
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes: u64,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Downloads `url` into `dir` (whole, or an error and no file).
pub fn download(url: &str, dir: &Path) -> anyhow::Result<Fetched> {
    let mut fetched = Fetched {
        path: dir.join(format!("ferry-input-{}", std::process::id())),
        bytes: 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start an async runtime")?;
    fetched.bytes = rt.block_on(fetch(url, &fetched.path))?;
    Ok(fetched)
}

/// An error and its causes (reqwest's own message leaves out why: refused, a
/// certificate, a timeout), each once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

async fn fetch(url: &str, path: &Path) -> anyhow::Result<u64> {
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT)
        .read_timeout(STALL)
        .build()
        .context("build the HTTP client")?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow!("cannot read the input {url}: {}", chain(&e)))?;
    if !resp.status().is_success() {
        bail!("cannot read the input {url}: HTTP {}", resp.status());
    }
    // Read before the body: afterwards it is what is left (nothing).
    let expected = resp.content_length();
    let mut file =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        anyhow!(
            "downloading the input {url} broke off after {n} bytes: {}",
            chain(&e)
        )
    })? {
        file.write_all(&chunk)
            .with_context(|| format!("write {}", path.display()))?;
        n += chunk.len() as u64;
    }
    if let Some(want) = expected
        && want != n
    {
        bail!("the input {url} ended after {n} of {want} bytes");
    }
    file.sync_all().ok();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_inputs_are_downloaded() {
        assert!(downloads(&Input::Http("http://127.0.0.1/a.mp4".into())));
        assert!(downloads(&Input::Http("HTTP://h/a.mp4".into())));
        assert!(downloads(&Input::Http("https://h/a.mp4".into())));
        assert!(downloads(
            &crate::request::parse_input("s3://bucket/a.mp4").unwrap()
        ));
        assert!(!downloads(&Input::File("/a.mp4".into())));
    }

    #[test]
    fn a_refused_connection_is_a_readable_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = download(&format!("http://127.0.0.1:{port}/a.mp4"), dir.path()).unwrap_err();
        assert!(e.to_string().contains("cannot read the input"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn https_goes_through_the_linked_tls_stack() {
        // A server that answers plain text to the TLS hello: the handshake fails, and
        // says so in one readable error (no panic about a missing crypto provider).
        let dir = tempfile::tempdir().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
        });
        let e = download(&format!("https://127.0.0.1:{port}/a.mp4"), dir.path()).unwrap_err();
        assert!(e.to_string().contains("cannot read the input"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
