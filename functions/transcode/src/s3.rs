//! `s3://` inputs and outputs: any S3-compatible object store, through the
//! `object_store` crate, configured by the operator with the standard AWS variables
//! (given to the function through the node's `function_env`, see README.md):
//!
//! * `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`; absent: AWS itself), `AWS_REGION` (or
//!   `AWS_DEFAULT_REGION`; absent: `us-east-1`);
//! * `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), or a
//!   web identity / container credential source;
//! * `AWS_ALLOW_HTTP=true` for a plain-`http://` endpoint (implied when the endpoint
//!   says `http://`), `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true` for `bucket.host` URLs
//!   (the default is path style, which every S3-compatible server accepts).
//!
//! An input object is streamed into the invocation's scratch directory once (like an
//! `http(s)://` input, see [`crate::fetch`]); an output prefix receives every file the
//! transcode wrote locally (renditions, cover, HLS tree, and `manifest.json` last),
//! files over [`MULTIPART_FROM`] in multipart uploads. Errors are one line and never
//! carry the secret key or the session token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use serde::Serialize;
use tokio::io::AsyncReadExt;

/// Files at least this big are uploaded in parts (of [`PART`] bytes).
pub const MULTIPART_FROM: u64 = 16 << 20;
/// The part size of multipart uploads (S3's minimum is 5 MiB).
pub const PART: usize = 8 << 20;
/// Parts (of one file) or small files in flight at once.
const CONCURRENCY: usize = 4;

/// `s3://bucket/key`: an object (input) or a key prefix (output, empty or ending in
/// `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

impl S3Url {
    /// The URL of `rel` (a `/`-separated relative path) under this prefix.
    pub fn join(&self, rel: &str) -> S3Url {
        S3Url {
            bucket: self.bucket.clone(),
            key: format!("{}{rel}", self.key),
        }
    }
}

/// S3's bucket naming rules: 3–63 of `a-z 0-9 . -`, starting and ending with a letter
/// or digit.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Splits `s3://bucket/rest` (the caller checked the scheme).
fn split<'a>(url: &'a str, field: &str) -> Result<(&'a str, &'a str), String> {
    let rest = url.get(5..).unwrap_or_default();
    if url.chars().any(|c| c.is_control()) || rest.contains(['?', '#']) {
        return Err(format!("{field}: {url:?} is not a valid s3:// URL"));
    }
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if !valid_bucket(bucket) {
        return Err(format!(
            "{field}: {bucket:?} in {url:?} is not a valid bucket name (3-63 of a-z 0-9 . -)"
        ));
    }
    Ok((bucket, key))
}

fn check_key(key: &str, url: &str, field: &str) -> Result<(), String> {
    // object_store would drop a leading `/`: the key would not be the one given.
    let ok = !key.starts_with('/') && !key.contains("//") && Key::parse(key).is_ok();
    ok.then_some(())
        .ok_or_else(|| format!("{field}: {url:?} has an invalid key (empty, `.` or `..` parts)"))
}

/// An input object: `s3://bucket/key`.
pub fn parse_object(url: &str) -> Result<S3Url, String> {
    let (bucket, key) = split(url, "input")?;
    if key.is_empty() || key.ends_with('/') {
        return Err(format!(
            "input: {url:?} names no object (expected s3://bucket/key)"
        ));
    }
    check_key(key, url, "input")?;
    Ok(S3Url {
        bucket: bucket.into(),
        key: key.into(),
    })
}

/// An output prefix: `s3://bucket/`, `s3://bucket/prefix/` (a trailing `/` is added).
pub fn parse_prefix(url: &str) -> Result<S3Url, String> {
    let (bucket, key) = split(url, "output")?;
    let trimmed = key.strip_suffix('/').unwrap_or(key);
    if !trimmed.is_empty() {
        check_key(trimmed, url, "output")?;
    }
    Ok(S3Url {
        bucket: bucket.into(),
        key: if trimmed.is_empty() {
            String::new()
        } else {
            format!("{trimmed}/")
        },
    })
}

/// The operator's object-store settings. (No `Debug`: it holds the secret.)
#[derive(Clone, Default)]
pub struct Config {
    pub endpoint: Option<String>,
    pub region: String,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    /// Another credential source object_store knows (web identity, container).
    other_credentials: bool,
    pub allow_http: bool,
    pub virtual_hosted: bool,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl Config {
    /// From the process environment.
    pub fn from_env() -> Config {
        Config::from_vars(|k| std::env::var(k).ok())
    }

    /// From `var` (a lookup; empty values count as unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Config {
        let var = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = var("AWS_ENDPOINT_URL_S3")
            .or_else(|| var("AWS_ENDPOINT_URL"))
            .or_else(|| var("AWS_ENDPOINT"));
        let plain_http = endpoint.as_deref().is_some_and(|e| {
            e.get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        });
        Config {
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            other_credentials: var("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
                || var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some()
                || var("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some(),
            allow_http: plain_http || var("AWS_ALLOW_HTTP").is_some_and(|v| truthy(&v)),
            virtual_hosted: var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_some_and(|v| truthy(&v)),
            endpoint,
        }
    }

    /// `msg` with the secret key and the session token blanked out.
    pub fn scrub(&self, msg: &str) -> String {
        let mut out = msg.to_string();
        for s in [&self.secret_access_key, &self.session_token]
            .into_iter()
            .flatten()
        {
            out = out.replace(s.as_str(), "***");
        }
        out
    }

    /// The store for `bucket`, or why there is none (missing credentials).
    pub fn store(&self, bucket: &str) -> anyhow::Result<Arc<AmazonS3>> {
        // from_env: the other credential sources' settings (role ARN, token files);
        // everything below replaces what it read.
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&self.region)
            .with_allow_http(self.allow_http)
            .with_virtual_hosted_style_request(self.virtual_hosted)
            .with_client_options(client_options(self.allow_http))
            // Bounded: a dead endpoint fails the invocation in about half a minute.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) => {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(t) = &self.session_token {
                    b = b.with_token(t);
                }
            }
            (Some(_), None) => bail!(
                "S3 credentials are incomplete: AWS_SECRET_ACCESS_KEY is not set (the node's function_env gives the function its AWS_* variables)"
            ),
            (None, Some(_)) => bail!(
                "S3 credentials are incomplete: AWS_ACCESS_KEY_ID is not set (the node's function_env gives the function its AWS_* variables)"
            ),
            (None, None) if !self.other_credentials => bail!(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the node's function_env"
            ),
            // A web identity or container source (from_env read its settings).
            (None, None) => {}
        }
        let store = b
            .build()
            .map_err(|e| anyhow!("{}", self.describe_config_error(&e)))?;
        Ok(Arc::new(store))
    }

    fn describe_config_error(&self, e: &object_store::Error) -> String {
        format!(
            "the S3 settings are not usable: {}",
            short(&self.scrub(&e.to_string()))
        )
    }

    /// One readable line about a failed operation on `url` (`what`: "read", "write").
    pub fn describe(&self, e: &object_store::Error, what: &str, url: &S3Url) -> String {
        let text = short(&self.scrub(&format!("{e}")));
        let bucket = &url.bucket;
        if text.contains("NoSuchBucket") {
            return format!("cannot {what} {url}: the bucket {bucket:?} does not exist");
        }
        match e {
            object_store::Error::NotFound { .. } => {
                format!("cannot {what} {url}: no such object")
            }
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => format!(
                "cannot {what} {url}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket's policy): {text}"
            ),
            _ if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") => {
                format!(
                    "cannot {what} {url}: the S3 credentials were refused (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {text}"
                )
            }
            _ if text.contains("error sending request") => format!(
                "cannot {what} {url}: the object store at {} did not answer: {text}",
                self.endpoint.as_deref().unwrap_or("AWS")
            ),
            _ => format!("cannot {what} {url}: {text}"),
        }
    }
}

/// Content types by file suffix, so that players and CDNs can serve the objects as
/// they are (HLS from the bucket, the cover as an image).
const CONTENT_TYPES: &[(&str, &str)] = &[
    ("mp4", "video/mp4"),
    ("m4s", "video/iso.segment"),
    ("m3u8", "application/vnd.apple.mpegurl"),
    ("jpg", "image/jpeg"),
    ("json", "application/json"),
];

fn client_options(allow_http: bool) -> ClientOptions {
    CONTENT_TYPES.iter().fold(
        ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(300))
            .with_allow_http(allow_http),
        |o, (suffix, mime)| o.with_content_type_for_suffix(*suffix, *mime),
    )
}

/// Makes an object_store error one line of at most 300 characters.
fn short(s: &str) -> String {
    let line = crate::one_line(s);
    if line.chars().count() <= 300 {
        return line;
    }
    let mut cut: String = line.chars().take(300).collect();
    cut.push('…');
    cut
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start an async runtime")
}

fn key_of(url: &S3Url) -> anyhow::Result<Key> {
    Key::parse(url.key.trim_end_matches('/')).map_err(|_| anyhow!("{url} has an invalid key"))
}

/// Streams the object at `url` into `dir` (whole, or an error and no file).
pub fn download(url: &S3Url, cfg: &Config, dir: &Path) -> anyhow::Result<crate::fetch::Fetched> {
    let mut fetched = crate::fetch::Fetched {
        path: dir.join(format!("ferry-input-{}", std::process::id())),
        bytes: 0,
    };
    let store = cfg.store(&url.bucket)?;
    fetched.bytes = runtime()?.block_on(get(&store, url, cfg, &fetched.path))?;
    Ok(fetched)
}

async fn get(store: &AmazonS3, url: &S3Url, cfg: &Config, path: &Path) -> anyhow::Result<u64> {
    let got = store
        .get(&key_of(url)?)
        .await
        .map_err(|e| anyhow!("{}", cfg.describe(&e, "read", url)))?;
    let want = got.meta.size;
    let mut body = got.into_stream();
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("create {}", path.display()))?;
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            anyhow!(
                "downloading {url} broke off after {n} bytes: {}",
                short(&cfg.scrub(&e.to_string()))
            )
        })?;
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .with_context(|| format!("write {}", path.display()))?;
        n += chunk.len() as u64;
    }
    if n != want {
        bail!("{url} ended after {n} of {want} bytes");
    }
    file.sync_all().await.ok();
    Ok(n)
}

/// Fails early, before any encoding, when the output bucket cannot be listed (missing
/// bucket, refused credentials, unreachable endpoint).
pub fn check_output(dest: &S3Url, cfg: &Config) -> anyhow::Result<()> {
    let store = cfg.store(&dest.bucket)?;
    runtime()?.block_on(async {
        let prefix = if dest.key.is_empty() {
            None
        } else {
            Some(key_of(dest)?)
        };
        store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| anyhow!("{}", cfg.describe(&e, "write to", dest)))?;
        Ok(())
    })
}

/// What the manifest says about the upload (`manifest.json` itself not counted).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Uploaded {
    pub files: u64,
    pub bytes: u64,
    pub ms: u64,
}

/// Every regular file under `dir` as (`/`-separated relative path, path), sorted.
pub fn files_under(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let entry = entry.with_context(|| format!("list {}", d.display()))?;
            let kind = entry
                .file_type()
                .with_context(|| format!("stat {}", entry.path().display()))?;
            let path = entry.path();
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .with_context(|| format!("{} is outside {}", path.display(), dir.display()))?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Uploads `files` (relative path, local path) under `dest`.
pub fn upload(files: &[(String, PathBuf)], dest: &S3Url, cfg: &Config) -> anyhow::Result<u64> {
    let store = cfg.store(&dest.bucket)?;
    runtime()?.block_on(async {
        let sizes: Vec<u64> = futures::stream::iter(files)
            .map(|(rel, path)| put_file(&store, path, dest.join(rel), cfg))
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(sizes.iter().sum())
    })
}

async fn put_file(store: &AmazonS3, path: &Path, url: S3Url, cfg: &Config) -> anyhow::Result<u64> {
    let url = &url;
    let key = key_of(url)?;
    let size = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let failed = |e: object_store::Error| anyhow!("{}", cfg.describe(&e, "write", url));
    if size < MULTIPART_FROM {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("read {}", path.display()))?;
        store
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(failed)?;
        return Ok(size);
    }
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("open {}", path.display()))?;
    let mut parts =
        WriteMultipart::new_with_chunk_size(store.put_multipart(&key).await.map_err(failed)?, PART);
    let mut buf = vec![0u8; 1 << 20];
    let sent: anyhow::Result<()> = async {
        loop {
            let n = file
                .read(&mut buf)
                .await
                .with_context(|| format!("read {}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            parts.wait_for_capacity(CONCURRENCY).await.map_err(failed)?;
            parts.write(&buf[..n]);
        }
    }
    .await;
    match sent {
        Ok(()) => {
            parts.finish().await.map_err(failed)?;
            Ok(size)
        }
        Err(e) => {
            let _ = parts.abort().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_prefixes_parse() {
        assert_eq!(
            parse_object("s3://media-in/a/b c.mp4").unwrap(),
            S3Url {
                bucket: "media-in".into(),
                key: "a/b c.mp4".into()
            }
        );
        let p = parse_prefix("s3://out.bucket/jobs/1").unwrap();
        assert_eq!(p.key, "jobs/1/");
        assert_eq!(p.to_string(), "s3://out.bucket/jobs/1/");
        assert_eq!(p.join("hls/480p/init.mp4").key, "jobs/1/hls/480p/init.mp4");
        assert_eq!(parse_prefix("s3://out/").unwrap().key, "");
        assert_eq!(parse_prefix("s3://out").unwrap().key, "");
        assert_eq!(parse_prefix("s3://out/x/").unwrap().key, "x/");
    }

    #[test]
    fn bad_s3_urls_say_what_is_wrong() {
        let e = parse_object("s3://b/k").unwrap_err();
        assert!(e.contains("not a valid bucket name"), "{e}");
        assert!(parse_object("s3://Upper/k").unwrap_err().contains("bucket"));
        assert!(parse_object("s3://-bad/k").unwrap_err().contains("bucket"));
        assert!(parse_object("s3:///k").unwrap_err().contains("bucket"));
        assert!(
            parse_object("s3://bucket")
                .unwrap_err()
                .contains("names no object")
        );
        assert!(
            parse_object("s3://bucket/")
                .unwrap_err()
                .contains("names no object")
        );
        assert!(
            parse_object("s3://bucket/dir/")
                .unwrap_err()
                .contains("names no object")
        );
        assert!(
            parse_object("s3://bucket/a//b")
                .unwrap_err()
                .contains("invalid key")
        );
        assert!(
            parse_object("s3://bucket/a/../b")
                .unwrap_err()
                .contains("invalid key")
        );
        assert!(
            parse_object("s3://bucket/a?x=1")
                .unwrap_err()
                .contains("not a valid")
        );
        assert!(
            parse_object("s3://bucket/a\nb")
                .unwrap_err()
                .contains("not a valid")
        );
        assert!(
            parse_prefix("s3://bucket//x/")
                .unwrap_err()
                .contains("invalid key")
        );
        assert!(parse_prefix("s3://b/").unwrap_err().starts_with("output:"));
    }

    fn vars(list: &[(&str, &str)]) -> Config {
        let list: Vec<(String, String)> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| list.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_environment_configures_the_store() {
        let c = vars(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
        ]);
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.region, "eu-west-1");
        assert!(c.allow_http && !c.virtual_hosted);
        assert!(c.store("bucket").is_ok());
        let c = vars(&[
            ("AWS_ENDPOINT", "https://s3.example"),
            ("AWS_REGION", "r1"),
            ("AWS_DEFAULT_REGION", "r2"),
        ]);
        assert_eq!(
            (c.endpoint.as_deref(), c.region.as_str(), c.allow_http),
            (Some("https://s3.example"), "r1", false)
        );
        assert_eq!(vars(&[]).region, "us-east-1");
        assert!(vars(&[("AWS_ALLOW_HTTP", "true")]).allow_http);
    }

    #[test]
    fn missing_credentials_are_named_and_secrets_never_shown() {
        let e = vars(&[]).store("bucket").unwrap_err().to_string();
        assert!(e.contains("no S3 credentials"), "{e}");
        let e = vars(&[("AWS_ACCESS_KEY_ID", "AKID")])
            .store("bucket")
            .unwrap_err()
            .to_string();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not set"), "{e}");
        let e = vars(&[("AWS_SECRET_ACCESS_KEY", "s3cr3t")])
            .store("bucket")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AWS_ACCESS_KEY_ID is not set") && !e.contains("s3cr3t"),
            "{e}"
        );
        let c = vars(&[
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
            ("AWS_SESSION_TOKEN", "tok3n"),
        ]);
        assert_eq!(c.scrub("a s3cr3t b tok3n"), "a *** b ***");
    }

    #[test]
    fn errors_are_one_short_line() {
        let long = "x\n".repeat(400);
        let s = short(&long);
        assert!(!s.contains('\n') && s.chars().count() <= 301, "{s}");
    }

    #[test]
    fn files_under_a_directory_are_listed_relative_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("hls/480p")).unwrap();
        std::fs::write(dir.path().join("480p.mp4"), b"a").unwrap();
        std::fs::write(dir.path().join("hls/480p/seg_0.m4s"), b"b").unwrap();
        std::fs::write(dir.path().join("hls/master.m3u8"), b"c").unwrap();
        let rel: Vec<String> = files_under(dir.path())
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(rel, ["480p.mp4", "hls/480p/seg_0.m4s", "hls/master.m3u8"]);
    }
}
