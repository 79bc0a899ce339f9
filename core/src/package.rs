//! The package format.
//!
//! A package is a gzip-compressed tar archive with `ferry.toml` at its root. Its
//! identity is the sha256 of the archive bytes. [`build`] makes byte-identical archives
//! from identical inputs (sorted entries, zeroed times and owners), so redeploying the
//! same function dedupes by hash. [`inspect`] and [`unpack`] accept only relative paths
//! without `..`, regular files and directories: no links, devices or absolute paths, so
//! an archive can never write outside the folder it is unpacked into.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode};

/// The manifest's file name, at the package root.
pub const MANIFEST: &str = "ferry.toml";
/// Entries one archive may hold.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A WebAssembly component (WASI preview 2) exporting `ferry:function/handler`.
    Wasm,
    /// A native executable: input on stdin, output on stdout.
    Native,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Wasm => "wasm",
            Kind::Native => "native",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "wasm" => Some(Kind::Wasm),
            "native" => Some(Kind::Native),
            _ => None,
        }
    }
}

/// Resource limits and needs of one invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory ceiling of one invocation (wasm linear memory; native address space).
    pub memory_mb: u64,
    /// Wall-clock deadline of one invocation.
    pub timeout_ms: u64,
    /// CPU the scheduler reserves for one invocation, in millicores.
    pub cpu_millis: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: 128,
            timeout_ms: 30_000,
            cpu_millis: 100,
        }
    }
}

/// What a function needs from the node beyond CPU and memory (`[resources]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Whole GPUs reserved for one invocation (made visible to it alone).
    pub gpus: u32,
    /// FPGA slots reserved for one invocation.
    pub fpga_slots: u32,
    /// Tags a node must carry to run it (e.g. `gpu`, `nvenc`).
    pub required_tags: Vec<String>,
    /// Tags that make a node preferable when several fit (e.g. `nvenc`).
    pub preferred_tags: Vec<String>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// How `ferry deploy` assembles the package from a source folder. Ignored by servers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Build {
    /// Command run (in the manifest's folder) by `ferry deploy --build`.
    pub command: Vec<String>,
    /// Package path → source path (relative to the manifest's folder). When empty, every
    /// non-hidden file under the folder goes in.
    pub files: BTreeMap<String, String>,
}

/// `ferry.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Wasm: path of the component inside the package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Native: the program (a path inside the package) and its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Async tasks: attempts, backoff, maximum age.
    #[serde(default)]
    pub retry: crate::task::RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, Error> {
        let m: Manifest = toml::from_str(text).map_err(|e| {
            Error::new(
                ErrorCode::InvalidManifest,
                format!("ferry.toml: {}", e.message()),
            )
        })?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::new(ErrorCode::InvalidManifest, msg));
        if !crate::id::valid_name(&self.name) {
            return bad(format!(
                "ferry.toml: name {:?} must be 1-63 lowercase letters, digits or '-', starting with a letter",
                self.name
            ));
        }
        match self.kind {
            Kind::Wasm => match &self.module {
                Some(m) if safe_path(m).is_some() => {}
                Some(m) => {
                    return bad(format!(
                        "ferry.toml: module {m:?} must be a relative path inside the package"
                    ));
                }
                None => return bad("ferry.toml: a wasm function needs `module`".into()),
            },
            Kind::Native => match self.entrypoint.first() {
                Some(p) if safe_path(p).is_some() => {}
                Some(p) => {
                    return bad(format!(
                        "ferry.toml: entrypoint {p:?} must be a relative path inside the package"
                    ));
                }
                None => return bad("ferry.toml: a native function needs `entrypoint`".into()),
            },
        }
        let l = &self.limits;
        if !(1..=65_536).contains(&l.memory_mb) {
            return bad("ferry.toml: limits.memory_mb must be 1..=65536".into());
        }
        if !(1..=86_400_000).contains(&l.timeout_ms) {
            return bad("ferry.toml: limits.timeout_ms must be 1..=86400000".into());
        }
        if !(1..=1_024_000).contains(&l.cpu_millis) {
            return bad("ferry.toml: limits.cpu_millis must be 1..=1024000".into());
        }
        let r = &self.resources;
        if r.gpus > 64 || r.fpga_slots > 64 {
            return bad(
                "ferry.toml: resources.gpus and resources.fpga_slots must be 0..=64".into(),
            );
        }
        for t in r.required_tags.iter().chain(&r.preferred_tags) {
            let ok = (1..=63).contains(&t.len())
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return bad(format!(
                    "ferry.toml: tag {t:?} must be 1-63 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        if !(1..=100).contains(&self.retry.max_attempts) {
            return bad("ferry.toml: retry.max_attempts must be 1..=100".into());
        }
        Ok(())
    }

    /// The file the runtime starts: the wasm module or the native program.
    pub fn entry_file(&self) -> &str {
        match self.kind {
            Kind::Wasm => self.module.as_deref().unwrap_or_default(),
            Kind::Native => self
                .entrypoint
                .first()
                .map(String::as_str)
                .unwrap_or_default(),
        }
    }
}

/// A relative path with no `..`, no absolute root and no empty name, normalised to
/// `a/b/c`; `None` when unsafe.
pub fn safe_path(p: &str) -> Option<String> {
    if p.starts_with('/') || p.contains('\\') || p.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// What [`inspect`] learns from an archive without writing anything.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub manifest: Manifest,
    /// The bytes of the entry file (module or program).
    pub entry: Vec<u8>,
    /// Whether the entry file is executable (required of native entrypoints).
    pub entry_executable: bool,
    pub files: usize,
    pub unpacked_bytes: u64,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidPackage, msg)
}

fn unsafe_entry(path: &str, why: &str) -> Error {
    Error::new(
        ErrorCode::UnsafeArchive,
        format!("archive entry {path:?} {why}"),
    )
}

/// Reads a reader to its end, failing once more than `limit` bytes came out (gzip bombs).
struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "package unpacks past its limit",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn io_err(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::FileTooLarge {
        Error::new(ErrorCode::PayloadTooLarge, e.to_string())
    } else {
        invalid(format!("not a readable .tar.gz: {e}"))
    }
}

/// Walks every entry of an archive, checking it, and hands each safe regular file to `f`.
fn walk(
    bytes: &[u8],
    max_unpacked: u64,
    mut f: impl FnMut(&str, u32, &mut dyn Read) -> Result<(), Error>,
    mut on_dir: impl FnMut(&str) -> Result<(), Error>,
) -> Result<(usize, u64), Error> {
    if bytes.len() < 2 || bytes[0] != 0x1f || bytes[1] != 0x8b {
        return Err(invalid(
            "a package must be a gzip-compressed tar archive (.tar.gz)",
        ));
    }
    // Tar headers and padding cost at most ~1 KiB per entry on top of the file bytes.
    let slack = (MAX_ENTRIES as u64 + 1) * 1024;
    let reader = Limited {
        inner: flate2::read::GzDecoder::new(bytes),
        left: max_unpacked.saturating_add(slack),
    };
    let mut archive = tar::Archive::new(reader);
    let mut seen = BTreeSet::new();
    let mut files_seen = BTreeSet::new();
    let (mut files, mut total) = (0usize, 0u64);
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let name = std::str::from_utf8(&raw).map_err(|_| unsafe_entry(&shown, "is not UTF-8"))?;
        let is_dir = entry.header().entry_type().is_dir();
        if is_dir && !name.starts_with('/') && name.split('/').all(|c| c.is_empty() || c == ".") {
            continue; // the root folder itself (`tar -C dir -czf pkg.tar.gz .` writes `./`)
        }
        let path =
            safe_path(name).ok_or_else(|| unsafe_entry(&shown, "escapes the package folder"))?;
        if seen.len() >= MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} entries")));
        }
        if !seen.insert(path.clone()) {
            return Err(unsafe_entry(&shown, "appears twice"));
        }
        // A path may not be both a file and a folder (`a` and `a/b`).
        let clash = path
            .match_indices('/')
            .any(|(i, _)| files_seen.contains(&path[..i]))
            || (!is_dir
                && seen
                    .range(format!("{path}/")..)
                    .next()
                    .is_some_and(|p| p.starts_with(&format!("{path}/"))));
        if clash {
            return Err(invalid(format!(
                "archive entry {shown:?} is both a file and a folder"
            )));
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            on_dir(&path)?;
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(unsafe_entry(
                &shown,
                "is a link or special file; only files and folders are allowed",
            ));
        }
        let size = entry.header().size().map_err(io_err)?;
        total = total.saturating_add(size);
        if total > max_unpacked {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!("package unpacks to more than {max_unpacked} bytes"),
            ));
        }
        let mode = entry.header().mode().unwrap_or(0o644);
        files_seen.insert(path.clone());
        files += 1;
        f(&path, mode, &mut entry)?;
    }
    Ok((files, total))
}

/// Checks an archive and reads its manifest and entry file, writing nothing.
pub fn inspect(bytes: &[u8], max_unpacked: u64) -> Result<Inspected, Error> {
    let mut manifest_text = None;
    let mut contents: BTreeMap<String, (Vec<u8>, u32)> = BTreeMap::new();
    let (files, unpacked_bytes) = walk(
        bytes,
        max_unpacked,
        |path, mode, r| {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).map_err(io_err)?;
            if path == MANIFEST {
                manifest_text = Some(buf);
            } else {
                // Kept until the manifest says which one is the entry; bounded by max_unpacked.
                contents.insert(path.to_string(), (buf, mode));
            }
            Ok(())
        },
        |_| Ok(()),
    )?;
    let text = manifest_text.ok_or_else(|| {
        Error::new(
            ErrorCode::MissingManifest,
            "the package has no ferry.toml at its root",
        )
    })?;
    let text = String::from_utf8(text)
        .map_err(|_| Error::new(ErrorCode::InvalidManifest, "ferry.toml is not UTF-8"))?;
    let manifest = Manifest::parse(&text)?;
    let entry_path = safe_path(manifest.entry_file()).unwrap_or_default();
    let (entry, mode) = contents.remove(&entry_path).ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidPackage,
            format!("ferry.toml names {entry_path:?}, which the package does not contain"),
        )
    })?;
    let entry_executable = mode & 0o111 != 0;
    if manifest.kind == Kind::Native && !entry_executable {
        return Err(Error::new(
            ErrorCode::InvalidPackage,
            format!(
                "the entrypoint {entry_path:?} is not executable (chmod +x it before packaging)"
            ),
        ));
    }
    Ok(Inspected {
        manifest,
        entry,
        entry_executable,
        files,
        unpacked_bytes,
    })
}

/// Unpacks an archive into `dest` (which must not exist yet), atomically: into a
/// sibling temporary folder first, renamed into place once complete.
pub fn unpack(bytes: &[u8], dest: &Path, max_unpacked: u64) -> Result<(), Error> {
    let parent = dest
        .parent()
        .ok_or_else(|| Error::internal("unpack destination has no parent"))?;
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::internal(format!("create {}: {e}", parent.display())))?;
    let tmp = parent.join(format!(".unpack-{}", crate::id::new_id()));
    let result = unpack_into(bytes, &tmp, max_unpacked).and_then(|()| {
        std::fs::rename(&tmp, dest).or_else(|e| {
            if dest.exists() {
                Ok(())
            } else {
                Err(Error::internal(format!(
                    "rename into {}: {e}",
                    dest.display()
                )))
            }
        })
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn unpack_into(bytes: &[u8], root: &Path, max_unpacked: u64) -> Result<(), Error> {
    let ioe = |p: &Path, e: std::io::Error| Error::internal(format!("write {}: {e}", p.display()));
    std::fs::create_dir_all(root).map_err(|e| ioe(root, e))?;
    walk(
        bytes,
        max_unpacked,
        |path, mode, r| {
            let target = root.join(path);
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ioe(dir, e))?;
            }
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(|e| ioe(&target, e))?;
            std::io::copy(r, &mut out).map_err(io_err)?;
            set_mode(&target, if mode & 0o111 != 0 { 0o755 } else { 0o644 })
                .map_err(|e| ioe(&target, e))?;
            Ok(())
        },
        |path| {
            let dir = root.join(path);
            std::fs::create_dir_all(&dir).map_err(|e| ioe(&dir, e))
        },
    )?;
    Ok(())
}

#[cfg(unix)]
fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// One file going into a package.
pub struct PackFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub executable: bool,
}

/// Builds a reproducible `.tar.gz`: entries sorted by path, times and owners zeroed.
pub fn build(mut files: Vec<PackFile>) -> Result<Vec<u8>, Error> {
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut seen = BTreeSet::new();
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for f in &files {
        let path = safe_path(&f.path).ok_or_else(|| {
            Error::new(
                ErrorCode::UnsafeArchive,
                format!("{:?} is not a safe package path", f.path),
            )
        })?;
        if !seen.insert(path.clone()) {
            return Err(Error::new(
                ErrorCode::InvalidPackage,
                format!("{path:?} added twice"),
            ));
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(f.bytes.len() as u64);
        h.set_mode(if f.executable { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, &path, f.bytes.as_slice())
            .map_err(|e| Error::internal(format!("pack {path}: {e}")))?;
    }
    let gz = tar
        .into_inner()
        .map_err(|e| Error::internal(format!("finish tar: {e}")))?;
    let mut out = gz
        .finish()
        .map_err(|e| Error::internal(format!("finish gzip: {e}")))?;
    out.flush().ok();
    Ok(out)
}

/// Reads a package source folder: `ferry.toml` plus either its `[build.files]` or every
/// non-hidden file beneath the folder (skipping `target/`).
pub fn pack_dir(dir: &Path) -> Result<(Manifest, Vec<u8>), Error> {
    pack_dir_with(dir, vec![])
}

/// [`pack_dir`] plus extra files (benchmarks add a nonce to make a new version).
pub fn pack_dir_with(dir: &Path, extra: Vec<PackFile>) -> Result<(Manifest, Vec<u8>), Error> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| {
        Error::new(
            ErrorCode::MissingManifest,
            format!("{}: {e}", mpath.display()),
        )
    })?;
    let manifest = Manifest::parse(&text)?;
    let mut files = vec![PackFile {
        path: MANIFEST.into(),
        bytes: text.into_bytes(),
        executable: false,
    }];
    let listed = manifest
        .build
        .as_ref()
        .map(|b| b.files.clone())
        .unwrap_or_default();
    if listed.is_empty() {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = dir.join(&rel);
            let rd = std::fs::read_dir(&abs)
                .map_err(|e| Error::internal(format!("read {}: {e}", abs.display())))?;
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    || (rel.as_os_str().is_empty() && (name == "target" || name == MANIFEST))
                {
                    continue;
                }
                let ft = entry
                    .file_type()
                    .map_err(|e| Error::internal(e.to_string()))?;
                let r = rel.join(&name);
                if ft.is_dir() {
                    stack.push(r);
                } else if ft.is_file() {
                    files.push(read_pack_file(&dir.join(&r), &r.to_string_lossy())?);
                }
            }
        }
    } else {
        for (pkg_path, src) in &listed {
            files.push(read_pack_file(&dir.join(src), pkg_path)?);
        }
    }
    files.extend(extra);
    let entry = safe_path(manifest.entry_file()).unwrap_or_default();
    if !files.iter().any(|f| f.path == entry) {
        return Err(Error::new(
            ErrorCode::InvalidPackage,
            format!(
                "{} names {entry:?}, which is not in the package (build it first?)",
                mpath.display()
            ),
        ));
    }
    Ok((manifest, build(files)?))
}

fn read_pack_file(src: &Path, pkg_path: &str) -> Result<PackFile, Error> {
    let bytes = std::fs::read(src).map_err(|e| {
        Error::new(
            ErrorCode::InvalidPackage,
            format!("{} (for {pkg_path}): {e}", src.display()),
        )
    })?;
    #[cfg(unix)]
    let executable = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(src)
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    #[cfg(not(unix))]
    let executable = false;
    Ok(PackFile {
        path: pkg_path.to_string(),
        bytes,
        executable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM_MANIFEST: &str = "name = \"hello\"\nkind = \"wasm\"\nmodule = \"hello.wasm\"\n";

    fn pkg(files: &[(&str, &[u8])]) -> Vec<u8> {
        build(
            files
                .iter()
                .map(|(p, b)| PackFile {
                    path: p.to_string(),
                    bytes: b.to_vec(),
                    executable: false,
                })
                .collect(),
        )
        .unwrap()
    }

    /// A tar.gz with a raw (unchecked) entry name and type, the way an attacker makes one.
    fn raw_archive(name: &[u8], kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
            let mut t = tar::Builder::new(gz);
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_size(if kind.is_file() { 3 } else { 0 });
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            t.append(
                &h,
                if kind.is_file() {
                    &b"abc"[..]
                } else {
                    &b""[..]
                },
            )
            .unwrap();
            t.into_inner().unwrap().finish().unwrap();
        }
        out
    }

    #[test]
    fn build_is_reproducible_and_inspect_reads_it_back() {
        let a = pkg(&[
            ("hello.wasm", b"\0asm"),
            (MANIFEST, WASM_MANIFEST.as_bytes()),
        ]);
        let b = pkg(&[
            (MANIFEST, WASM_MANIFEST.as_bytes()),
            ("hello.wasm", b"\0asm"),
        ]);
        assert_eq!(a, b, "same files in any order give the same bytes");
        let i = inspect(&a, 1 << 20).unwrap();
        assert_eq!(i.manifest.name, "hello");
        assert_eq!(i.entry, b"\0asm");
        assert_eq!(i.files, 2);
    }

    #[test]
    fn traversal_absolute_and_links_are_refused() {
        for name in [&b"../evil"[..], b"a/../../evil", b"/etc/evil"] {
            let bytes = raw_archive(name, tar::EntryType::Regular, None);
            let err = inspect(&bytes, 1 << 20).unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::UnsafeArchive,
                "{}",
                String::from_utf8_lossy(name)
            );
            let dir = tempfile::tempdir().unwrap();
            let err = unpack(&bytes, &dir.path().join("out"), 1 << 20).unwrap_err();
            assert_eq!(err.code, ErrorCode::UnsafeArchive);
            assert!(!dir.path().join("out").exists());
            assert!(!dir.path().join("evil").exists());
        }
        let link = raw_archive(b"ferry.toml", tar::EntryType::Symlink, Some("/etc/passwd"));
        assert_eq!(
            inspect(&link, 1 << 20).unwrap_err().code,
            ErrorCode::UnsafeArchive
        );
    }

    #[test]
    fn missing_manifest_and_bad_manifest() {
        let no_manifest = pkg(&[("hello.wasm", b"\0asm")]);
        assert_eq!(
            inspect(&no_manifest, 1 << 20).unwrap_err().code,
            ErrorCode::MissingManifest
        );
        let bad = pkg(&[(
            MANIFEST,
            b"name = \"Hello World\"\nkind = \"wasm\"\nmodule = \"x\"",
        )]);
        assert_eq!(
            inspect(&bad, 1 << 20).unwrap_err().code,
            ErrorCode::InvalidManifest
        );
        let no_entry = pkg(&[(MANIFEST, WASM_MANIFEST.as_bytes())]);
        assert_eq!(
            inspect(&no_entry, 1 << 20).unwrap_err().code,
            ErrorCode::InvalidPackage
        );
        assert_eq!(
            inspect(b"plain text", 1 << 20).unwrap_err().code,
            ErrorCode::InvalidPackage
        );
    }

    #[test]
    fn bombs_are_cut_off() {
        let big = vec![0u8; 4 << 20];
        let bytes = pkg(&[(MANIFEST, WASM_MANIFEST.as_bytes()), ("hello.wasm", &big)]);
        assert!(bytes.len() < 64 << 10, "zeros compress well");
        assert_eq!(
            inspect(&bytes, 1 << 20).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
    }

    #[test]
    fn unpack_writes_files_with_modes() {
        let bytes = build(vec![
            PackFile {
                path: MANIFEST.into(),
                bytes: b"name = \"n\"\nkind = \"native\"\nentrypoint = [\"bin/run\"]\n".to_vec(),
                executable: false,
            },
            PackFile {
                path: "bin/run".into(),
                bytes: b"#!/bin/sh\necho hi\n".to_vec(),
                executable: true,
            },
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("pkg");
        unpack(&bytes, &dest, 1 << 20).unwrap();
        let run = dest.join("bin/run");
        assert_eq!(std::fs::read(&run).unwrap(), b"#!/bin/sh\necho hi\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no temporary folder left: {leftovers:?}"
        );
    }

    #[test]
    fn native_entrypoints_must_be_executable_and_paths_cannot_be_file_and_folder() {
        let m = b"name = \"n\"\nkind = \"native\"\nentrypoint = [\"run\"]\n".to_vec();
        let f = |p: &str, x: bool| PackFile {
            path: p.into(),
            bytes: b"#!/bin/sh\n".to_vec(),
            executable: x,
        };
        let plain = build(vec![
            PackFile {
                path: MANIFEST.into(),
                bytes: m.clone(),
                executable: false,
            },
            f("run", false),
        ])
        .unwrap();
        assert_eq!(
            inspect(&plain, 1 << 20).unwrap_err().code,
            ErrorCode::InvalidPackage
        );
        let ok = build(vec![
            PackFile {
                path: MANIFEST.into(),
                bytes: m.clone(),
                executable: false,
            },
            f("run", true),
        ])
        .unwrap();
        assert!(inspect(&ok, 1 << 20).unwrap().entry_executable);
        let clash = build(vec![
            PackFile {
                path: MANIFEST.into(),
                bytes: m,
                executable: false,
            },
            f("run", true),
            f("a", false),
            f("a/b", false),
        ])
        .unwrap();
        assert_eq!(
            inspect(&clash, 1 << 20).unwrap_err().code,
            ErrorCode::InvalidPackage
        );
    }

    #[test]
    fn a_leading_dot_slash_root_entry_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), WASM_MANIFEST).unwrap();
        std::fs::write(dir.path().join("hello.wasm"), b"\0asm").unwrap();
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().join("pkg.tar.gz");
        let status = std::process::Command::new("tar")
            .args([
                "-C",
                &dir.path().display().to_string(),
                "-czf",
                &out.display().to_string(),
                ".",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let i = inspect(&std::fs::read(&out).unwrap(), 1 << 20).unwrap();
        assert_eq!(i.manifest.name, "hello");
    }

    #[test]
    fn safe_paths() {
        assert_eq!(safe_path("./a//b/"), Some("a/b".into()));
        assert_eq!(safe_path("a/../b"), None);
        assert_eq!(safe_path("/a"), None);
        assert_eq!(safe_path(""), None);
    }
}
