//! Content-addressed package storage: `DIR/sha256/ab/abcdef…`, written atomically.
//! (On one machine a local folder; several gateway replicas need a shared folder or,
//! later, an object store.)

use std::path::{Path, PathBuf};

use ferry_core::{Error, ErrorCode};

#[derive(Clone, Debug)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join("sha256").join(&sha[..2]).join(sha)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores bytes under their hash (a no-op when already present).
    pub async fn put(&self, sha: &str, bytes: &[u8]) -> Result<(), Error> {
        let path = self.path(sha);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(());
        }
        let io = |e: std::io::Error| Error::internal(format!("store package {sha}: {e}"));
        let parent = path
            .parent()
            .ok_or_else(|| Error::internal("blob path has no parent"))?;
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
        let tmp = parent.join(format!(".{sha}.{}", ferry_core::id::new_id()));
        let bytes = bytes.to_vec();
        let t = tmp.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&t)?;
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)
    }

    /// Opens a stored package for streaming: (file, length).
    pub async fn open(&self, sha: &str) -> Result<(tokio::fs::File, u64), Error> {
        if !ferry_core::id::valid_sha256(sha) {
            return Err(Error::new(
                ErrorCode::PackageNotFound,
                format!("package {sha:?} not found"),
            ));
        }
        let open = async {
            let f = tokio::fs::File::open(self.path(sha)).await?;
            let len = f.metadata().await?.len();
            Ok::<_, std::io::Error>((f, len))
        };
        open.await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    ErrorCode::PackageNotFound,
                    format!("package {sha} not found"),
                )
            } else {
                Error::internal(format!("read package {sha}: {e}"))
            }
        })
    }
}
