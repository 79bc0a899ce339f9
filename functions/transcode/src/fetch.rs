//! An `http://` input is downloaded once, into the invocation's scratch directory,
//! and every pass (probe, ladder, cover, quality, segments) reads that file instead
//! of fetching the URL again. `https://` inputs are still read by ffmpeg itself on
//! each pass: the function links no TLS library of its own (ffmpeg has one).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use crate::request::Input;

/// Give up when the server sends nothing for this long (like ffmpeg's `-rw_timeout`).
const STALL: Duration = Duration::from_secs(30);
const CONNECT: Duration = Duration::from_secs(10);

/// Whether the input is fetched once before the passes.
pub fn downloads(input: &Input) -> bool {
    matches!(input, Input::Http(u) if u.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")))
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
        .map_err(|e| anyhow!("cannot read the input {url}: {e}"))?;
    if !resp.status().is_success() {
        bail!("cannot read the input {url}: HTTP {}", resp.status());
    }
    // Read before the body: afterwards it is what is left (nothing).
    let expected = resp.content_length();
    let mut file =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut n = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| anyhow!("downloading the input {url} broke off after {n} bytes: {e}"))?
    {
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
    fn only_plain_http_is_downloaded() {
        assert!(downloads(&Input::Http("http://127.0.0.1/a.mp4".into())));
        assert!(downloads(&Input::Http("HTTP://h/a.mp4".into())));
        assert!(!downloads(&Input::Http("https://h/a.mp4".into())));
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
}
