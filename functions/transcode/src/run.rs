//! Runs the job: probe, one-decode ladder (per-rung retries when it fails), verify,
//! cover, quality, manifest. Every ffmpeg/ffprobe is a child process in our process
//! group, so the platform's timeout kill reaches them too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::ffmpeg::{self, Progress, Settings, Span, Tick};
use crate::ladder::{self, Planned};
use crate::manifest::{self, Cover, Delivered, Failed, Manifest, Timings};
use crate::probe::{self, Source};
use crate::request::{Input, Job, Output};
use crate::s3::{self, S3Url};
use crate::{fetch, gpu, hls, parallel};

/// What a child process left behind.
struct Ran {
    ok: bool,
    status: String,
    stdout: Vec<u8>,
    stderr: String,
}

fn command(args: &[String]) -> anyhow::Result<Command> {
    let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let mut c = Command::new(prog);
    c.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Fewer malloc arenas: less address space reserved per thread (RLIMIT_AS).
        .env("MALLOC_ARENA_MAX", "4");
    Ok(c)
}

fn spawn_error(prog: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow!("cannot run {prog}: not found on PATH (is ffmpeg installed?)")
    } else {
        anyhow!("cannot run {prog}: {e}")
    }
}

/// Reads a pipe to its end on a thread.
fn drain(r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut r = r;
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs a command to its end, capturing stdout and stderr.
fn capture(args: &[String]) -> anyhow::Result<Ran> {
    let mut child = command(args)?
        .spawn()
        .map_err(|e| spawn_error(&args[0], e))?;
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let status = child.wait().context("wait for a child process")?;
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Ran {
        ok: status.success(),
        status: status.to_string(),
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Runs an ffmpeg with `-progress pipe:1`, printing `ferry-progress:` lines to stderr
/// (its own 0-100 placed within `span` of the whole invocation).
fn encode(args: &[String], duration_s: f64, span: Span, step: &str) -> anyhow::Result<Ran> {
    let mut child = command(args)?
        .spawn()
        .map_err(|e| spawn_error(&args[0], e))?;
    let err = child.stderr.take().map(drain);
    if let Some(out) = child.stdout.take() {
        let mut p = Progress::new(duration_s);
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(t) = p.line(&line) {
                emit(span.at(t.percent), step, &t);
            }
        }
    }
    let status = child.wait().context("wait for ffmpeg")?;
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Ran {
        ok: status.success(),
        status: status.to_string(),
        stdout: vec![],
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// When a segment is encoded inside this process, its own 0-100 is placed within the
/// whole invocation's span (and its steps prefixed).
static NESTED: std::sync::Mutex<Option<Span>> = std::sync::Mutex::new(None);

/// Runs `f` with progress reports placed within `span`.
pub(crate) fn nested<T>(span: Span, f: impl FnOnce() -> T) -> T {
    let set = |v| {
        *NESTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = v
    };
    set(Some(span));
    let out = f();
    set(None);
    out
}

/// Prints one progress line (the runtime's contract), placed within a nesting span.
fn emit(percent: f64, step: &str, t: &Tick) {
    let outer = *NESTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match outer {
        Some(span) => eprintln!(
            "{}",
            ffmpeg::progress_line(span.at(percent), &format!("segment:{step}"), t)
        ),
        None => eprintln!("{}", ffmpeg::progress_line(percent, step, t)),
    }
}

/// A progress line between steps (no ffmpeg running).
fn mark(percent: f64, step: &str) {
    let t = Tick {
        percent,
        fps: 0.0,
        speed: "N/A".into(),
    };
    emit(percent, step, &t);
}

/// Runs a command to its end: (success, the reason when it failed).
pub(crate) fn capture_args(args: &[String]) -> anyhow::Result<(bool, String)> {
    let ran = capture(args)?;
    Ok((ran.ok, if ran.ok { String::new() } else { reason(&ran) }))
}

/// How the invocation's 0-100 is shared: the encode dominates; the quality pass
/// decodes everything once more.
fn spans(job: &Job) -> (Span, Span) {
    let end_of_encode = if job.quality { 85.0 } else { 97.0 };
    (
        Span {
            from: 0.0,
            to: end_of_encode,
        },
        Span {
            from: 88.0,
            to: 99.0,
        },
    )
}

fn reason(r: &Ran) -> String {
    ffmpeg::error_reason(&r.stderr).unwrap_or_else(|| format!("ffmpeg ended with {}", r.status))
}

fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    Ok((n, hex::encode(h.finalize())))
}

fn ms(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

fn ffprobe_args(input: &str, network: bool) -> Vec<String> {
    let mut a: Vec<String> = ["ffprobe", "-v", "error"].map(String::from).into();
    if network {
        a.extend(["-rw_timeout".into(), "30000000".into()]);
    }
    a.extend(["-show_streams", "-show_format", "-of", "json", input].map(String::from));
    a
}

/// Checks a local input before ffprobe does, for a clearer message.
fn check_input(job: &Job) -> anyhow::Result<()> {
    if let Input::File(p) = &job.input {
        let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("input file {} does not exist", p.display()),
            _ => anyhow!("input file {} cannot be read: {e}", p.display()),
        })?;
        if !meta.is_file() {
            bail!("input {} is not a regular file", p.display());
        }
        std::fs::File::open(p)
            .map_err(|e| anyhow!("input file {} cannot be read: {e}", p.display()))?;
    }
    Ok(())
}

pub fn probe_source(job: &Job) -> anyhow::Result<Source> {
    check_input(job)?;
    let ran = capture(&ffprobe_args(
        &job.input.ffmpeg_arg(),
        job.input.is_network(),
    ))?;
    if !ran.ok {
        let why = ffmpeg::error_reason(&ran.stderr).unwrap_or(ran.status);
        bail!("cannot read the input {}: {why}", job.input_url);
    }
    probe::source(&ran.stdout).map_err(|e| anyhow!("{e} ({})", job.input_url))
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Probes and hashes a written rendition.
fn verify(
    rung: &Planned,
    dir: &Path,
    encoded_in: &'static str,
    command: Option<String>,
) -> Result<Delivered, String> {
    let path = ffmpeg::rendition_path(dir, &rung.name);
    let ran =
        capture(&ffprobe_args(&path.display().to_string(), false)).map_err(|e| e.to_string())?;
    if !ran.ok {
        return Err(format!(
            "ffprobe cannot read the rendition: {}",
            ffmpeg::error_reason(&ran.stderr).unwrap_or(ran.status)
        ));
    }
    let facts = probe::facts(&ran.stdout)?;
    let (size_bytes, sha256) = sha256_file(&path).map_err(|e| e.to_string())?;
    Ok(Delivered {
        rung: rung.clone(),
        encoded_in,
        ffmpeg_command: command,
        path,
        size_bytes,
        sha256,
        facts,
    })
}

fn failed(rung: &Planned, reason: String, command: String) -> Failed {
    Failed {
        name: rung.name.clone(),
        width: rung.width,
        height: rung.height,
        target_bitrate_kbps: rung.bitrate_kbps,
        reason,
        ffmpeg_command: command,
    }
}

/// What the ladder encode produced (one pass, or the segments joined).
pub(crate) struct Ladder {
    pub encoded: Vec<(Planned, &'static str, Option<String>)>,
    pub failures: Vec<Failed>,
    pub ffmpeg_command: String,
    pub ladder_error: Option<String>,
    pub accel: gpu::Plan,
    pub set: Settings,
    pub ladder_ms: u64,
    pub retries_ms: u64,
}

/// The one-decode ladder of `job` into its output directory: on the GPU plan first
/// (falling back to the CPU), each rung retried alone when the run fails.
pub(crate) fn encode_ladder(
    job: &Job,
    source: &Source,
    rungs: &[Planned],
    mut set: Settings,
    mut accel: gpu::Plan,
    encode_span: Span,
) -> anyhow::Result<Ladder> {
    let dir = &job.output_dir;
    let t = Instant::now();
    let args = ffmpeg::ladder_args(&set, rungs, dir);
    let ffmpeg_command = ffmpeg::shell_line(&args);
    let mut ran = encode(&args, segment_duration(job, source), encode_span, "ladder")?;
    let mut ffmpeg_command = ffmpeg_command;
    if !ran.ok && accel.path != gpu::Accel::Cpu {
        // The GPU path failed (driver, memory, an unusual source): make the ladder on
        // the CPU instead, and say so.
        let why = reason(&ran);
        eprintln!("transcode: the GPU run failed ({why}); encoding on the CPU");
        for r in rungs {
            remove(&ffmpeg::rendition_path(dir, &r.name));
        }
        let cpu = gpu::Plan {
            fallback_error: Some(why),
            found: accel.found.clone(),
            ..gpu::Plan::cpu(job.codec, accel.gpus.clone(), "the GPU run failed")
        };
        accel = cpu;
        set = set.on(&accel);
        let args = ffmpeg::ladder_args(&set, rungs, dir);
        ffmpeg_command = ffmpeg::shell_line(&args);
        ran = encode(&args, segment_duration(job, source), encode_span, "ladder")?;
    }
    let ladder_ms = ms(t);
    let mut retries_ms = 0;

    let mut encoded: Vec<(Planned, &'static str, Option<String>)> = vec![];
    let mut failures = vec![];
    let mut ladder_error = None;
    if ran.ok {
        encoded.extend(rungs.iter().map(|r| (r.clone(), "ladder", None)));
    } else {
        // A failing rung must not take the others down: retry each rung alone.
        let why = reason(&ran);
        eprintln!("transcode: the one-decode run failed ({why}); retrying each rung alone");
        ladder_error = Some(why);
        for r in rungs {
            remove(&ffmpeg::rendition_path(dir, &r.name));
        }
        let t = Instant::now();
        let n = rungs.len() as f64;
        for (i, r) in rungs.iter().enumerate() {
            let args = ffmpeg::ladder_args(&set, std::slice::from_ref(r), dir);
            let line = ffmpeg::shell_line(&args);
            eprintln!("transcode: {} alone", r.name);
            let span = Span {
                from: encode_span.at(i as f64 / n * 100.0),
                to: encode_span.at((i + 1) as f64 / n * 100.0),
            };
            let ran = encode(
                &args,
                segment_duration(job, source),
                span,
                &format!("alone:{}", r.name),
            )?;
            if ran.ok {
                encoded.push((r.clone(), "alone", Some(line)));
            } else {
                let why = reason(&ran);
                eprintln!("transcode: {} failed: {why}", r.name);
                remove(&ffmpeg::rendition_path(dir, &r.name));
                failures.push(failed(r, why, line));
            }
        }
        retries_ms = ms(t);
    }

    Ok(Ladder {
        encoded,
        failures,
        ffmpeg_command,
        ladder_error,
        accel,
        set,
        ladder_ms,
        retries_ms,
    })
}

/// How much of the source this invocation encodes (for progress).
fn segment_duration(job: &Job, source: &Source) -> f64 {
    match &job.segment {
        Some(seg) => seg
            .duration_s
            .unwrap_or((source.duration_s - seg.start_s).max(0.0)),
        None => source.duration_s,
    }
}

/// The whole transcode: a network input is downloaded into scratch first; an `s3://`
/// output is checked before any work, written into scratch, then uploaded.
pub fn run(job: &Job) -> anyhow::Result<Manifest> {
    let scratch = std::env::current_dir().unwrap_or_else(|_| std::env::temp_dir());
    let needs_s3 = matches!(job.input, Input::S3(_)) || matches!(job.output, Output::S3(_));
    let s3cfg = needs_s3.then(s3::Config::from_env);
    let mut local = job.clone();
    // Removes the local output folder of an s3:// output at the end, whatever happens.
    let mut staged = None;
    if let (Output::S3(dest), Some(cfg)) = (&job.output, &s3cfg) {
        s3::check_output(dest, cfg)?;
        let dir = Staged(scratch.join(format!("ferry-output-{}", std::process::id())));
        local.output_dir = dir.0.clone();
        staged = Some(dir);
    }
    let mut fetched = None;
    let mut downloaded = None;
    if fetch::downloads(&job.input) {
        // Once, into the scratch directory; every pass then reads the file.
        let t = Instant::now();
        mark(0.0, "download");
        let f = match (&job.input, &s3cfg) {
            (Input::S3(url), Some(cfg)) => s3::download(url, cfg, &scratch)?,
            _ => fetch::download(&job.input.ffmpeg_arg(), &scratch)?,
        };
        let d = fetch::Downloaded {
            bytes: f.bytes,
            ms: ms(t),
        };
        eprintln!(
            "transcode: downloaded {} bytes of {} in {} ms",
            f.bytes, job.input_url, d.ms
        );
        local.input = Input::File(f.path.clone());
        downloaded = Some(d);
        fetched = Some(f);
    }
    let mut m = run_job(&local, downloaded)?;
    drop(fetched);
    if let (Output::S3(dest), Some(cfg), Some(dir)) = (&job.output, &s3cfg, &staged) {
        publish(&mut m, &dir.0, dest, cfg)?;
    }
    Ok(m)
}

/// The local folder an `s3://` output is written to, removed when dropped.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Uploads everything under `dir` to `dest`, the manifest last, with its locations
/// (and the copy in `manifest.json`) saying `s3://` URLs and object keys.
fn publish(m: &mut Manifest, dir: &Path, dest: &S3Url, cfg: &s3::Config) -> anyhow::Result<()> {
    let t = Instant::now();
    mark(99.0, "upload");
    let files: Vec<(String, PathBuf)> = s3::files_under(dir)?
        .into_iter()
        .filter(|(rel, _)| rel != "manifest.json")
        .collect();
    let bytes = s3::upload(&files, dest, cfg)?;
    m.relocate(dest.to_string(), |local| {
        let rel = Path::new(local).strip_prefix(dir).ok()?;
        let rel: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let url = dest.join(&rel.join("/"));
        Some((url.key.clone(), url.to_string()))
    });
    m.output_upload = Some(s3::Uploaded {
        files: files.len() as u64,
        bytes,
        ms: ms(t),
    });
    let json = serde_json::to_vec_pretty(m)?;
    let path = dir.join("manifest.json");
    std::fs::write(&path, json).with_context(|| format!("write {}", path.display()))?;
    s3::upload(&[("manifest.json".into(), path)], dest, cfg)?;
    eprintln!(
        "transcode: uploaded {} files ({bytes} bytes) and the manifest to {dest} in {} ms",
        files.len(),
        ms(t)
    );
    mark(100.0, "done");
    Ok(())
}

fn run_job(job: &Job, downloaded: Option<fetch::Downloaded>) -> anyhow::Result<Manifest> {
    let start = Instant::now();
    let mut timings = Timings::default();

    let t = Instant::now();
    let source = probe_source(job)?;
    timings.probe = ms(t);
    let plan = ladder::plan(&source, &job.ladder, job.min_one_rendition);
    if plan.rungs.is_empty() {
        bail!(
            "every rung is taller than the source ({}x{}); add a smaller rung or set min_one_rendition",
            source.display_width,
            source.display_height
        );
    }
    let dir = &job.output_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow!("cannot create the output directory {}: {e}", dir.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The platform runs us in a scratch directory: the GPU probe writes its sample there.
    let scratch = std::env::current_dir().unwrap_or_else(|_| std::env::temp_dir());
    let accel = gpu::plan_for(job.codec, job.reproducible, &source, &scratch);
    eprintln!(
        "transcode: {} (decode {}, encoder {}): {}",
        serde_json::to_value(accel.path)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        accel.decode,
        accel.encoder,
        accel.reason
    );
    let set = Settings::new(job, &source, cores).on(&accel);
    eprintln!(
        "transcode: {} rung(s) from {}x{} @ {} fps: {}",
        plan.rungs.len(),
        source.display_width,
        source.display_height,
        source.frame_rate,
        plan.rungs
            .iter()
            .map(|r| format!("{} {}x{} {}k", r.name, r.width, r.height, r.bitrate_kbps))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (encode_span, quality_span) = spans(job);
    mark(0.0, "ladder");
    let mut segmented = None;
    let mut segmented_error = None;
    let ladder = match parallel::decide(job, &source, parallel::Api::from_env()) {
        Ok(api) => {
            let t = Instant::now();
            match parallel::run(job, &source, &plan.rungs, &api, encode_span) {
                Ok((l, report)) => {
                    segmented = Some(report);
                    Ladder {
                        ladder_ms: ms(t),
                        ..l
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!(
                        "transcode: segment-parallel encoding failed ({why}); encoding in one pass"
                    );
                    segmented_error = Some(why);
                    encode_ladder(job, &source, &plan.rungs, set, accel, encode_span)?
                }
            }
        }
        Err(why) => {
            segmented_error = why;
            encode_ladder(job, &source, &plan.rungs, set, accel, encode_span)?
        }
    };
    timings.ladder = ladder.ladder_ms;
    timings.retries = ladder.retries_ms;
    let Ladder {
        encoded,
        mut failures,
        ffmpeg_command,
        ladder_error,
        accel,
        set,
        ..
    } = ladder;

    let t = Instant::now();
    let mut delivered = vec![];
    for (r, how, line) in encoded {
        let command = line.clone().unwrap_or_else(|| ffmpeg_command.clone());
        match verify(&r, dir, how, line) {
            Ok(d) => delivered.push(d),
            Err(why) => {
                remove(&ffmpeg::rendition_path(dir, &r.name));
                failures.push(failed(&r, why, command));
            }
        }
    }
    timings.verify = ms(t);
    if delivered.is_empty() {
        let why: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", f.name, f.reason))
            .collect();
        bail!("every rung failed: {}", why.join("; "));
    }

    let t = Instant::now();
    let (hls, hls_error) = if job.hls {
        mark(encode_span.to, "hls");
        match package_hls(job, &source, dir, &delivered) {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };
    timings.hls = ms(t);

    let t = Instant::now();
    let (cover, cover_error) = if job.cover {
        mark(encode_span.to + 1.0, "cover");
        match make_cover(&set, &source, dir) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };
    timings.cover = ms(t);

    let t = Instant::now();
    let (quality, quality_error) = if job.quality {
        mark(quality_span.from, "quality");
        match measure(&set, &source, &delivered, quality_span) {
            Ok(q) => (Some(q), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };
    timings.quality = ms(t);
    timings.total = ms(start);

    let m = manifest::assemble(manifest::Parts {
        job,
        keyint_frames: set.keyint_frames,
        acceleration: accel,
        source,
        skipped: plan.skipped,
        delivered,
        failed: failures,
        quality,
        quality_error,
        cover,
        cover_error,
        hls,
        hls_error,
        segmented,
        segmented_error,
        downloaded,
        ffmpeg_command,
        ladder_error,
        timings,
    });
    let json = serde_json::to_vec_pretty(&m)?;
    std::fs::write(dir.join("manifest.json"), json)
        .map_err(|e| anyhow!("cannot write {}: {e}", dir.join("manifest.json").display()))?;
    if matches!(job.output, Output::Dir(_)) {
        mark(100.0, "done");
    }
    Ok(m)
}

/// Packages every delivered rendition as HLS and writes the master playlist listing
/// those that were packaged. Fails only when none could be.
fn package_hls(
    job: &Job,
    source: &Source,
    dir: &Path,
    delivered: &[Delivered],
) -> anyhow::Result<hls::Hls> {
    let root = dir.join(hls::DIR);
    let master_path = root.join(hls::MASTER);
    remove(&master_path);
    // Folders of this job's rungs are replaced; a failed rung's old files go too.
    for r in &job.ladder {
        let _ = std::fs::remove_dir_all(hls::rung_dir(dir, &r.name));
    }
    let mut variants = vec![];
    let mut failed = vec![];
    for d in delivered {
        match package_rung(job, source, dir, d) {
            Ok(v) => variants.push(v),
            Err(e) => {
                let reason = format!("{e:#}");
                eprintln!(
                    "transcode: HLS packaging of {} failed: {reason}",
                    d.rung.name
                );
                let _ = std::fs::remove_dir_all(hls::rung_dir(dir, &d.rung.name));
                failed.push(hls::Unpackaged {
                    name: d.rung.name.clone(),
                    reason,
                });
            }
        }
    }
    if variants.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|f| format!("{}: {}", f.name, f.reason))
            .collect();
        bail!("no rendition could be packaged as HLS: {}", why.join("; "));
    }
    std::fs::write(&master_path, hls::master(&variants))
        .with_context(|| format!("write {}", master_path.display()))?;
    Ok(hls::Hls {
        master: format!("{}/{}", hls::DIR, hls::MASTER),
        url: manifest::file_url(&master_path),
        path: master_path.display().to_string(),
        variants,
        failed,
    })
}

fn package_rung(
    job: &Job,
    source: &Source,
    dir: &Path,
    d: &Delivered,
) -> anyhow::Result<hls::Variant> {
    let name = &d.rung.name;
    let codecs = hls::codecs(&d.facts).ok_or_else(|| {
        anyhow!(
            "no codec string for {} {} level {:?}",
            d.facts.codec,
            d.facts.profile,
            d.facts.level
        )
    })?;
    let rung_dir = hls::rung_dir(dir, name);
    std::fs::create_dir_all(&rung_dir).with_context(|| format!("create {}", rung_dir.display()))?;
    let ran = capture(&hls::package_args(
        &d.path,
        &rung_dir,
        job.keyframe_interval_s,
    ))?;
    if !ran.ok {
        bail!("{}", reason(&ran));
    }
    let playlist_path = rung_dir.join(hls::MEDIA);
    let text = std::fs::read_to_string(&playlist_path)
        .with_context(|| format!("read {}", playlist_path.display()))?;
    let (segments, init) = hls::media_segments(&text).map_err(|e| anyhow!("{e}"))?;
    let size = |uri: &str| -> anyhow::Result<u64> {
        let p = rung_dir.join(uri);
        Ok(std::fs::metadata(&p)
            .with_context(|| format!("segment {}", p.display()))?
            .len())
    };
    let mut sized = Vec::with_capacity(segments.len());
    for s in &segments {
        sized.push((s.duration_s, size(&s.uri)?));
    }
    if let Some(init) = init {
        size(&init)?;
    }
    let (bandwidth, average_bandwidth) = hls::bandwidths(&sized, job.keyframe_interval_s);
    Ok(hls::Variant {
        name: name.clone(),
        playlist: format!("{name}/{}", hls::MEDIA),
        path: playlist_path.display().to_string(),
        segments: segments.len(),
        duration_s: (segments.iter().map(|s| s.duration_s).sum::<f64>() * 1e6).round() / 1e6,
        bandwidth,
        average_bandwidth,
        width: d.facts.width,
        height: d.facts.height,
        frame_rate: source.fps,
        codecs,
    })
}

fn make_cover(set: &Settings, source: &Source, dir: &Path) -> anyhow::Result<Cover> {
    let path: PathBuf = dir.join("cover.jpg");
    let ran = capture(&ffmpeg::cover_args(set, source, &path))?;
    let written = std::fs::metadata(&path)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if !ran.ok || !written {
        remove(&path);
        bail!("{}", reason(&ran));
    }
    let (size_bytes, sha256) = sha256_file(&path)?;
    let (width, height) = ffmpeg::cover_size(source);
    Ok(Cover {
        file: "cover.jpg".into(),
        url: manifest::file_url(&path),
        path: path.display().to_string(),
        width,
        height,
        time_s: ffmpeg::cover_time(source),
        size_bytes,
        sha256,
    })
}

fn measure(
    set: &Settings,
    source: &Source,
    delivered: &[Delivered],
    span: Span,
) -> anyhow::Result<BTreeMap<String, ffmpeg::Quality>> {
    let list: Vec<(String, PathBuf)> = delivered
        .iter()
        .map(|d| (d.rung.name.clone(), d.path.clone()))
        .collect();
    let ran = encode(
        &ffmpeg::quality_args(set, source, &list),
        source.duration_s,
        span,
        "quality",
    )?;
    if !ran.ok {
        bail!("quality check failed: {}", reason(&ran));
    }
    let q = ffmpeg::parse_quality(&ran.stderr);
    if let Some((name, _)) = list.iter().find(|(n, _)| !q.contains_key(n)) {
        bail!("quality check printed no PSNR/SSIM for {name}");
    }
    Ok(q)
}
