//! ffmpeg command lines (pure: built from the job, the probed source and the plan) and
//! the parsers for what ffmpeg prints (progress, PSNR/SSIM, errors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::gpu::{Accel, Plan, nvenc_preset};
use crate::ladder::{Planned, even};
use crate::probe::Source;
use crate::request::{Codec, Job, SegmentSpec};

/// `-rw_timeout` for network inputs: give up on a stalled download after 30 s.
const NETWORK_TIMEOUT_US: &str = "30000000";
/// The x265 worker pool per encoder is capped: three encoders on a 64-core node would
/// otherwise start ~200 threads whose stacks and malloc arenas count against
/// `RLIMIT_AS`, and x265 hangs (rather than fails) when it cannot create a thread.
pub const MAX_X265_POOL: usize = 16;
/// The most frames the `thumbnail` filter buffers to pick the cover.
const COVER_BATCH_MAX: u32 = 50;
/// Value of `-profile:v` that makes a rung's encoder refuse to open (`fail_rung`).
pub const FORCED_FAILURE_PROFILE: &str = "ferry-forced-failure";

/// Everything the encode command lines depend on besides the rungs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub input: String,
    pub network_input: bool,
    pub codec: Codec,
    pub preset: String,
    pub audio_bitrate_kbps: u32,
    pub has_audio: bool,
    pub keyframe_interval_s: f64,
    pub keyint_frames: u32,
    pub reproducible: bool,
    pub fail_rung: Option<String>,
    /// x265 worker threads per encoder (ignored in reproducible mode: single-threaded).
    pub pool_threads: usize,
    /// Where the ladder is decoded/scaled and encoded (see [`crate::gpu`]); the cover
    /// and quality passes always run on the CPU.
    pub accel: Accel,
    pub cuda_decode: bool,
    /// Only this part of the source (one segment of a segment-parallel job; its video
    /// only: the parent encodes the audio once).
    pub segment: Option<SegmentSpec>,
}

/// Frames between keyframes: the interval times the frame rate, at least 1.
pub fn keyint_frames(fps: f64, interval_s: f64) -> u32 {
    ((fps * interval_s).round() as u32).max(1)
}

impl Settings {
    pub fn new(job: &Job, source: &Source, cores: usize) -> Self {
        Self {
            input: job.input.ffmpeg_arg(),
            network_input: job.input.is_network(),
            codec: job.codec,
            preset: job.preset.clone(),
            audio_bitrate_kbps: job.audio_bitrate_kbps,
            has_audio: source.has_audio && job.segment.is_none(),
            keyframe_interval_s: job.keyframe_interval_s,
            keyint_frames: keyint_frames(source.fps, job.keyframe_interval_s),
            reproducible: job.reproducible,
            fail_rung: job.fail_rung.clone(),
            pool_threads: cores.clamp(1, MAX_X265_POOL),
            accel: Accel::Cpu,
            cuda_decode: false,
            segment: job.segment.clone(),
        }
    }

    /// These settings on the path a [`Plan`] chose.
    pub fn on(mut self, plan: &Plan) -> Self {
        self.accel = plan.path;
        self.cuda_decode = plan.cuda_decode();
        self
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// A number as ffmpeg expressions want it: `2`, `1.5`.
fn num(x: f64) -> String {
    let t = format!("{x:.6}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Where a rung's rendition is written.
pub fn rendition_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.mp4"))
}

fn input_args(set: &Settings) -> Vec<String> {
    let mut a = vec![];
    if set.network_input {
        a.extend([s("-rw_timeout"), s(NETWORK_TIMEOUT_US)]);
    }
    a.extend([s("-i"), set.input.clone()]);
    a
}

/// The one-decode command: the source is decoded once, split, and each branch scaled
/// and encoded into its own MP4. With one rung it is that rung alone.
pub fn ladder_args(set: &Settings, rungs: &[Planned], dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-v", "error"]
        .map(s)
        .into();
    a.extend(["-nostats", "-progress", "pipe:1", "-stats_period", "1"].map(s));
    if set.cuda_decode {
        a.extend(["-hwaccel", "cuda", "-hwaccel_output_format", "cuda"].map(s));
    }
    if let Some(seg) = &set.segment {
        // Input seeking is frame-accurate when transcoding: output starts at the first
        // frame at or after start_s (a keyframe time of the whole ladder), and -t stops
        // before the next segment's first frame.
        a.extend([s("-ss"), num(seg.start_s)]);
        if let Some(d) = seg.duration_s {
            a.extend([s("-t"), num(d)]);
        }
    }
    a.extend(input_args(set));
    if set.reproducible {
        a.extend([s("-filter_complex_threads"), s("1")]);
    }
    a.extend([s("-filter_complex"), filter_graph(set, rungs)]);
    for (i, r) in rungs.iter().enumerate() {
        a.extend(output_args(set, r, i, &rendition_path(dir, &r.name)));
    }
    a
}

/// `[0:v:0]split=3[s0][s1][s2];[s0]scale=854:480:…[v0];…`. Decoded on the GPU, the
/// frames are scaled there (`scale_cuda`) and downloaded only for a CPU encoder.
pub fn filter_graph(set: &Settings, rungs: &[Planned]) -> String {
    let scale = |r: &Planned| match (set.cuda_decode, set.accel) {
        (false, _) => format!(
            "scale={}:{}:flags=bicubic,setsar=1,format=yuv420p",
            r.width, r.height
        ),
        (true, Accel::Nvenc) => format!(
            "scale_cuda={}:{}:interp_algo=bicubic:format=nv12,setsar=1",
            r.width, r.height
        ),
        (true, _) => format!(
            "scale_cuda={}:{}:interp_algo=bicubic:format=nv12,hwdownload,format=nv12,format=yuv420p,setsar=1",
            r.width, r.height
        ),
    };
    if let [only] = rungs {
        return format!("[0:v:0]{}[v0]", scale(only));
    }
    let mut g = format!("[0:v:0]split={}", rungs.len());
    for i in 0..rungs.len() {
        g.push_str(&format!("[s{i}]"));
    }
    for (i, r) in rungs.iter().enumerate() {
        g.push_str(&format!(";[s{i}]{}[v{i}]", scale(r)));
    }
    g
}

fn output_args(set: &Settings, r: &Planned, i: usize, path: &Path) -> Vec<String> {
    let mut a = vec![s("-map"), format!("[v{i}]")];
    if set.has_audio {
        a.extend(["-map", "0:a:0", "-c:a", "aac", "-b:a"].map(s));
        a.push(format!("{}k", set.audio_bitrate_kbps));
    } else {
        a.push(s("-an"));
    }
    let n = set.keyint_frames;
    let forced = set.fail_rung.as_deref() == Some(r.name.as_str());
    let b = r.bitrate_kbps;
    let mut vflags = vec![];
    match (set.accel, set.codec) {
        (Accel::Nvenc, codec) => {
            let (enc, profile, tag) = match codec {
                Codec::H265 => ("hevc_nvenc", "main", "hvc1"),
                Codec::H264 => ("h264_nvenc", "high", "avc1"),
            };
            let profile = if forced {
                FORCED_FAILURE_PROFILE
            } else {
                profile
            };
            a.extend(["-c:v", enc, "-preset", nvenc_preset(&set.preset)].map(s));
            a.extend(
                [
                    "-tune",
                    "hq",
                    "-rc",
                    "vbr",
                    "-profile:v",
                    profile,
                    "-tag:v",
                    tag,
                ]
                .map(s),
            );
            // Fixed GOPs of N frames, IDR at every forced keyframe, no scene cuts.
            a.extend([s("-g"), n.to_string()]);
            a.extend(["-forced-idr", "1", "-no-scenecut", "1", "-strict_gop", "1"].map(s));
            vflags.push("+cgop");
        }
        (_, Codec::H265) => {
            let profile = if forced {
                FORCED_FAILURE_PROFILE
            } else {
                "main"
            };
            a.extend(
                [
                    "-c:v",
                    "libx265",
                    "-preset",
                    &set.preset,
                    "-profile:v",
                    profile,
                ]
                .map(s),
            );
            a.extend(["-tag:v", "hvc1"].map(s));
            let threads = if set.reproducible {
                s("pools=none:frame-threads=1:info=0")
            } else {
                format!("pools={}", set.pool_threads)
            };
            a.push(s("-x265-params"));
            a.push(format!(
                "keyint={n}:min-keyint={n}:scenecut=0:open-gop=0:log-level=error:{threads}"
            ));
        }
        (_, Codec::H264) => {
            let profile = if forced {
                FORCED_FAILURE_PROFILE
            } else {
                "high"
            };
            a.extend(
                [
                    "-c:v",
                    "libx264",
                    "-preset",
                    &set.preset,
                    "-profile:v",
                    profile,
                ]
                .map(s),
            );
            a.extend(["-tag:v", "avc1"].map(s));
            a.push(s("-x264-params"));
            let threads = if set.reproducible { ":threads=1" } else { "" };
            a.push(format!("keyint={n}:min-keyint={n}:scenecut=0{threads}"));
            vflags.push("+cgop");
        }
    }
    a.extend([
        s("-b:v"),
        format!("{b}k"),
        s("-maxrate"),
        format!("{b}k"),
        // A one-second VBV buffer: measured within ~6% of target on short clips,
        // where two seconds overshot by 8-10%.
        s("-bufsize"),
        format!("{b}k"),
    ]);
    a.extend([
        s("-force_key_frames"),
        format!("expr:gte(t,n_forced*{})", num(set.keyframe_interval_s)),
    ]);
    a.extend(["-movflags", "+faststart", "-map_chapters", "-1"].map(s));
    if set.reproducible {
        vflags.push("+bitexact");
        a.extend(
            [
                "-map_metadata",
                "-1",
                "-fflags",
                "+bitexact",
                "-flags:a",
                "+bitexact",
            ]
            .map(s),
        );
    }
    if !vflags.is_empty() {
        a.extend([s("-flags:v"), vflags.concat()]);
    }
    a.extend([s("-f"), s("mp4"), path.display().to_string()]);
    a
}

/// The cover's size: the source's display size, its short side capped at 1080.
pub fn cover_size(source: &Source) -> (u32, u32) {
    let (w, h) = (source.display_width, source.display_height);
    let short = w.min(h);
    let target = f64::from(short.min(1080));
    let k = target / f64::from(short);
    (even(f64::from(w) * k), even(f64::from(h) * k))
}

/// When the cover is taken from: a third into the video.
pub fn cover_time(source: &Source) -> f64 {
    (source.duration_s / 3.0 * 1000.0).floor() / 1000.0
}

/// The cover: seek a third into the video, let `thumbnail` pick the most
/// representative of the next ~2 s of frames, write one JPEG.
pub fn cover_args(set: &Settings, source: &Source, path: &Path) -> Vec<String> {
    let (w, h) = cover_size(source);
    let batch = keyint_frames(source.fps, 2.0).min(COVER_BATCH_MAX);
    let mut a: Vec<String> = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-v", "error"]
        .map(s)
        .into();
    a.extend([s("-ss"), num(cover_time(source))]);
    a.extend(input_args(set));
    a.extend(["-map", "0:v:0", "-an", "-sn", "-dn", "-vf"].map(s));
    a.push(format!(
        "thumbnail=n={batch},scale={w}:{h}:flags=bicubic,setsar=1"
    ));
    a.extend(["-frames:v", "1", "-q:v", "2"].map(s));
    if set.reproducible {
        a.extend(
            [
                "-map_metadata",
                "-1",
                "-fflags",
                "+bitexact",
                "-flags:v",
                "+bitexact",
            ]
            .map(s),
        );
    }
    a.extend(["-f", "image2", "-update", "1"].map(s));
    a.push(path.display().to_string());
    a
}

/// How PSNR and SSIM are measured (stated in the manifest).
pub fn quality_method(source: &Source) -> String {
    format!(
        "each rendition scaled (bicubic) to the source's display size {}x{} and compared, frame by frame, with the source converted to yuv420p; PSNR in dB, SSIM 0..1",
        source.display_width, source.display_height
    )
}

/// One ffmpeg run decoding the source once and every rendition, comparing each with
/// the source at the source's display size. Reports go to stderr, one per filter
/// instance (`psnr@NAME`, `ssim@NAME`).
pub fn quality_args(
    set: &Settings,
    source: &Source,
    renditions: &[(String, PathBuf)],
) -> Vec<String> {
    let (w, h) = (source.display_width, source.display_height);
    let norm = format!("scale={w}:{h}:flags=bicubic,setsar=1,format=yuv420p");
    let mut a: Vec<String> = [
        "ffmpeg",
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-v",
        "info",
        "-progress",
        "pipe:1",
        "-stats_period",
        "1",
    ]
    .map(s)
    .into();
    a.extend(input_args(set));
    for (_, p) in renditions {
        a.extend([s("-i"), p.display().to_string()]);
    }
    let n = renditions.len();
    let mut g = format!("[0:v:0]{norm},split={}", 2 * n);
    for i in 0..n {
        g.push_str(&format!("[r{i}a][r{i}b]"));
    }
    for (i, (name, _)) in renditions.iter().enumerate() {
        g.push_str(&format!(
            ";[{}:v:0]{norm},split=2[d{i}a][d{i}b];[d{i}a][r{i}a]psnr@{name};[d{i}b][r{i}b]ssim@{name}",
            i + 1
        ));
    }
    a.extend([s("-filter_complex"), g]);
    a.extend(["-an", "-sn", "-dn", "-f", "null", "-"].map(s));
    a
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Psnr {
    pub y: Option<f64>,
    pub u: Option<f64>,
    pub v: Option<f64>,
    pub average: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Ssim {
    pub y: Option<f64>,
    pub u: Option<f64>,
    pub v: Option<f64>,
    pub all: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Quality {
    pub psnr: Psnr,
    pub ssim: Ssim,
}

/// `key:value` pairs of a report line; `inf` (identical pictures) becomes `None`
/// (JSON has no infinity).
fn fields(text: &str) -> BTreeMap<String, Option<f64>> {
    text.split_whitespace()
        .filter_map(|t| t.split_once(':'))
        .map(|(k, v)| {
            let v = v.parse::<f64>().ok().filter(|x| x.is_finite());
            (k.to_ascii_lowercase(), v)
        })
        .collect()
}

/// Reads the `psnr@NAME` / `ssim@NAME` summary lines of a quality run.
pub fn parse_quality(stderr: &str) -> BTreeMap<String, Quality> {
    let mut out: BTreeMap<String, Quality> = BTreeMap::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((ctx, report)) = rest.split_once(']') else {
            continue;
        };
        let filter = ctx.split(" @ ").next().unwrap_or_default();
        let Some((kind, name)) = filter.split_once('@') else {
            continue;
        };
        let report = report.trim();
        match (kind, report.split_once(' ')) {
            ("psnr", Some(("PSNR", vals))) => {
                let f = fields(vals);
                let get = |k: &str| f.get(k).copied().flatten();
                out.entry(name.to_string()).or_default().psnr = Psnr {
                    y: get("y"),
                    u: get("u"),
                    v: get("v"),
                    average: get("average"),
                    min: get("min"),
                    max: get("max"),
                };
            }
            ("ssim", Some(("SSIM", vals))) => {
                let f = fields(vals);
                let get = |k: &str| f.get(k).copied().flatten();
                out.entry(name.to_string()).or_default().ssim = Ssim {
                    y: get("y"),
                    u: get("u"),
                    v: get("v"),
                    all: get("all"),
                };
            }
            _ => {}
        }
    }
    out
}

/// One `-progress` block of ffmpeg: how far (0-100 of this run), frames per second
/// and speed (`3.9x`, as ffmpeg prints it).
#[derive(Clone, Debug, PartialEq)]
pub struct Tick {
    pub percent: f64,
    pub fps: f64,
    pub speed: String,
}

/// Follows ffmpeg's `-progress` key=value stream; yields a [`Tick`] at the end of each
/// block.
#[derive(Debug)]
pub struct Progress {
    duration_us: f64,
    out_time_us: Option<f64>,
    fps: Option<f64>,
    speed: Option<String>,
}

impl Progress {
    pub fn new(duration_s: f64) -> Self {
        Self {
            duration_us: duration_s * 1e6,
            out_time_us: None,
            fps: None,
            speed: None,
        }
    }

    pub fn line(&mut self, line: &str) -> Option<Tick> {
        let (k, v) = line.trim().split_once('=')?;
        match k {
            "out_time_us" | "out_time_ms" => {
                if let Ok(t) = v.parse::<f64>() {
                    self.out_time_us = Some(t.max(0.0));
                }
                None
            }
            "fps" => {
                self.fps = v.parse().ok();
                None
            }
            "speed" => {
                let v = v.trim();
                self.speed = (v != "N/A" && !v.is_empty()).then(|| v.to_string());
                None
            }
            "progress" => {
                let percent = if v == "end" {
                    100.0
                } else if self.duration_us > 0.0 {
                    (self.out_time_us.unwrap_or(0.0) / self.duration_us * 100.0).min(99.9)
                } else {
                    0.0
                };
                Some(Tick {
                    percent,
                    fps: self.fps.unwrap_or(0.0),
                    speed: self.speed.clone().unwrap_or_else(|| "N/A".into()),
                })
            }
            _ => None,
        }
    }
}

/// Where a step's own 0-100 falls in the whole invocation's 0-100.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    pub from: f64,
    pub to: f64,
}

impl Span {
    pub fn at(self, step_percent: f64) -> f64 {
        self.from + (self.to - self.from) * step_percent.clamp(0.0, 100.0) / 100.0
    }
}

/// The progress line the platform reads from stderr (the runtime's contract:
/// `ferry-progress: <percent> <free text>`).
pub fn progress_line(percent: f64, step: &str, tick: &Tick) -> String {
    format!(
        "ferry-progress: {percent:.1} step={step} fps={:.1} speed={}",
        tick.fps, tick.speed
    )
}

/// A readable reason from ffmpeg's stderr: its last few lines on one line, without the
/// `@ 0x…` context addresses (which change from run to run).
pub fn error_reason(stderr: &str) -> Option<String> {
    let lines: Vec<String> = stderr
        .lines()
        .map(strip_addresses)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(4);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        return None;
    }
    let mut out: String = joined.chars().take(600).collect();
    if out.len() < joined.len() {
        out.push('…');
    }
    Some(out)
}

fn strip_addresses(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find(" @ 0x") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 5..];
        let hex_len = after
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(after.len());
        rest = &after[hex_len..];
    }
    out.push_str(rest);
    out
}

/// A command line as a shell would need it typed.
pub fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let safe = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
            if safe {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ladder::plan;
    use crate::request::{Input, default_ladder};

    fn source(w: u32, h: u32, audio: bool) -> Source {
        Source {
            video_codec: "h264".into(),
            width: w,
            height: h,
            display_width: w,
            display_height: h,
            pix_fmt: "yuv420p".into(),
            frame_rate: "25/1".into(),
            fps: 25.0,
            frames: Some(125),
            duration_s: 5.0,
            has_audio: audio,
            rotation: 0,
        }
    }

    fn job(extra: &str) -> Job {
        crate::request::parse(
            format!(r#"{{"input":"file:///in.mp4","output":"file:///out/"{extra}}}"#).as_bytes(),
        )
        .unwrap()
    }

    /// The values following each occurrence of `flag`.
    fn values<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn one_decode_feeds_every_rung() {
        let src = source(1920, 1080, true);
        let j = job("");
        let set = Settings::new(&j, &src, 2);
        let p = plan(&src, &j.ladder, true);
        let a = ladder_args(&set, &p.rungs, Path::new("/out"));
        assert_eq!(values(&a, "-i"), vec!["/in.mp4"], "one input, decoded once");
        assert!(!a.contains(&"-hwaccel".to_string()), "the CPU plan");
        assert_eq!(
            values(&a, "-filter_complex"),
            vec![
                "[0:v:0]split=3[s0][s1][s2];\
                 [s0]scale=854:480:flags=bicubic,setsar=1,format=yuv420p[v0];\
                 [s1]scale=1280:720:flags=bicubic,setsar=1,format=yuv420p[v1];\
                 [s2]scale=1920:1080:flags=bicubic,setsar=1,format=yuv420p[v2]"
            ]
        );
        assert_eq!(
            values(&a, "-map"),
            vec!["[v0]", "0:a:0", "[v1]", "0:a:0", "[v2]", "0:a:0"]
        );
        assert_eq!(values(&a, "-c:v"), vec!["libx265"; 3]);
        assert_eq!(values(&a, "-tag:v"), vec!["hvc1"; 3]);
        assert_eq!(values(&a, "-profile:v"), vec!["main"; 3]);
        assert_eq!(values(&a, "-b:v"), vec!["800k", "1500k", "3000k"]);
        assert_eq!(values(&a, "-maxrate"), vec!["800k", "1500k", "3000k"]);
        assert_eq!(values(&a, "-bufsize"), vec!["800k", "1500k", "3000k"]);
        assert_eq!(
            values(&a, "-x265-params"),
            vec!["keyint=50:min-keyint=50:scenecut=0:open-gop=0:log-level=error:pools=2"; 3]
        );
        assert_eq!(
            values(&a, "-force_key_frames"),
            vec!["expr:gte(t,n_forced*2)"; 3]
        );
        assert_eq!(values(&a, "-c:a"), vec!["aac"; 3]);
        assert_eq!(values(&a, "-b:a"), vec!["128k"; 3]);
        assert_eq!(values(&a, "-movflags"), vec!["+faststart"; 3]);
        assert_eq!(values(&a, "-f"), vec!["mp4"; 3]);
        assert_eq!(a.last().unwrap(), "/out/1080p.mp4");
        assert!(a.contains(&"/out/480p.mp4".to_string()));
        assert_eq!(values(&a, "-progress"), vec!["pipe:1"]);
        assert!(!a.iter().any(|x| x.contains("bitexact")));
    }

    #[test]
    fn h264_reproducible_and_forced_failure() {
        let src = source(1280, 720, false);
        let j =
            job(r#","codec":"h264","reproducible":true,"fail_rung":"720p","preset":"veryfast""#);
        let set = Settings::new(&j, &src, 64);
        let p = plan(&src, &j.ladder, true);
        let a = ladder_args(&set, &p.rungs, Path::new("/out"));
        assert_eq!(values(&a, "-c:v"), vec!["libx264"; 2]);
        assert_eq!(values(&a, "-tag:v"), vec!["avc1"; 2]);
        assert_eq!(values(&a, "-preset"), vec!["veryfast"; 2]);
        assert_eq!(
            values(&a, "-profile:v"),
            vec!["high", FORCED_FAILURE_PROFILE],
            "only the named rung is broken"
        );
        assert_eq!(
            values(&a, "-x264-params"),
            vec!["keyint=50:min-keyint=50:scenecut=0:threads=1"; 2]
        );
        assert_eq!(values(&a, "-flags:v"), vec!["+cgop+bitexact"; 2]);
        assert_eq!(values(&a, "-flags:a"), vec!["+bitexact"; 2]);
        assert_eq!(values(&a, "-fflags"), vec!["+bitexact"; 2]);
        assert_eq!(values(&a, "-map_metadata"), vec!["-1"; 2]);
        assert_eq!(values(&a, "-filter_complex_threads"), vec!["1"]);
        assert_eq!(values(&a, "-map"), vec!["[v0]", "[v1]"], "no audio to map");
        assert_eq!(a.iter().filter(|x| *x == "-an").count(), 2);
    }

    fn gpu_plan(path: Accel, decode: &'static str) -> Plan {
        Plan {
            path,
            decode,
            encoder: "x",
            gpus: vec!["0".into()],
            reason: String::new(),
            found: None,
            fallback_error: None,
        }
    }

    #[test]
    fn gpu_paths_decode_scale_and_encode_where_the_plan_says() {
        let src = source(1920, 1080, true);
        let j = job(r#","preset":"medium""#);
        let p = plan(&src, &j.ladder, true);

        // NVENC with GPU decode: frames stay on the GPU from decoder to encoder.
        let set = Settings::new(&j, &src, 2).on(&gpu_plan(Accel::Nvenc, "cuda"));
        let a = ladder_args(&set, &p.rungs, Path::new("/out"));
        assert_eq!(values(&a, "-hwaccel"), vec!["cuda"]);
        assert_eq!(values(&a, "-hwaccel_output_format"), vec!["cuda"]);
        let g = values(&a, "-filter_complex")[0];
        assert!(
            g.contains("[s0]scale_cuda=854:480:interp_algo=bicubic:format=nv12,setsar=1[v0]"),
            "{g}"
        );
        assert!(!g.contains("hwdownload"), "{g}");
        assert_eq!(values(&a, "-c:v"), vec!["hevc_nvenc"; 3]);
        assert_eq!(values(&a, "-preset"), vec!["p5"; 3]);
        assert_eq!(values(&a, "-g"), vec!["50"; 3]);
        assert_eq!(values(&a, "-forced-idr"), vec!["1"; 3]);
        assert_eq!(values(&a, "-no-scenecut"), vec!["1"; 3]);
        assert_eq!(values(&a, "-tag:v"), vec!["hvc1"; 3]);
        assert_eq!(values(&a, "-b:v"), vec!["800k", "1500k", "3000k"]);
        assert!(values(&a, "-x265-params").is_empty());
        assert_eq!(
            values(&a, "-force_key_frames"),
            vec!["expr:gte(t,n_forced*2)"; 3]
        );

        // NVDEC only (H100/H200): GPU decode and scale, download, x265.
        let set = Settings::new(&j, &src, 2).on(&gpu_plan(Accel::Nvdec, "cuda"));
        let a = ladder_args(&set, &p.rungs, Path::new("/out"));
        assert_eq!(values(&a, "-hwaccel"), vec!["cuda"]);
        let g = values(&a, "-filter_complex")[0];
        assert!(
            g.contains("[s2]scale_cuda=1920:1080:interp_algo=bicubic:format=nv12,hwdownload,format=nv12,format=yuv420p,setsar=1[v2]"),
            "{g}"
        );
        assert_eq!(values(&a, "-c:v"), vec!["libx265"; 3]);

        // NVENC fed by the CPU decoder.
        let set = Settings::new(&j, &src, 2).on(&gpu_plan(Accel::Nvenc, "cpu"));
        let a = ladder_args(&set, &p.rungs, Path::new("/out"));
        assert!(values(&a, "-hwaccel").is_empty());
        assert!(values(&a, "-filter_complex")[0].contains("[s0]scale=854:480:flags=bicubic"));
        assert_eq!(values(&a, "-c:v"), vec!["hevc_nvenc"; 3]);

        // The cover and quality passes stay on the CPU whatever the plan.
        let c = cover_args(&set, &src, Path::new("/o/cover.jpg"));
        assert!(!c.contains(&"-hwaccel".to_string()));
    }

    #[test]
    fn a_segment_is_seeked_and_has_no_audio() {
        let src = source(1280, 720, true);
        let j = job(r#","segment":{"index":2,"start_s":60,"duration_s":30}"#);
        let set = Settings::new(&j, &src, 2);
        let p = plan(&src, &j.ladder, true);
        let a = ladder_args(&set, &p.rungs, Path::new("/o"));
        let line = a.join(" ");
        assert!(line.contains("-ss 60 -t 30 -i /in.mp4"), "{line}");
        assert_eq!(values(&a, "-map"), vec!["[v0]", "[v1]"], "no audio");
        assert_eq!(a.iter().filter(|x| *x == "-an").count(), 2);
        assert_eq!(
            values(&a, "-force_key_frames"),
            vec!["expr:gte(t,n_forced*2)"; 2],
            "keyframes relative to the segment's start: a multiple of 2 s"
        );
        let last = job(r#","segment":{"index":3,"start_s":90}"#);
        let a = ladder_args(&Settings::new(&last, &src, 2), &p.rungs, Path::new("/o"));
        assert_eq!(values(&a, "-ss"), vec!["90"]);
        assert!(
            values(&a, "-t").is_empty(),
            "the last segment runs to the end"
        );
    }

    #[test]
    fn x265_threads_are_capped_or_single_in_reproducible_mode() {
        let src = source(1920, 1080, true);
        let set = Settings::new(&job(""), &src, 128);
        assert_eq!(set.pool_threads, MAX_X265_POOL);
        let set = Settings::new(&job(r#","reproducible":true"#), &src, 8);
        let a = ladder_args(
            &set,
            &plan(&src, &default_ladder(), true).rungs,
            Path::new("/o"),
        );
        assert!(values(&a, "-x265-params")[0].ends_with("pools=none:frame-threads=1:info=0"));
    }

    #[test]
    fn a_single_rung_has_no_split_and_network_inputs_time_out() {
        let src = source(640, 360, true);
        let mut j = job("");
        j.input = Input::Http("http://127.0.0.1:1/a.mp4".into());
        let set = Settings::new(&j, &src, 2);
        let p = plan(&src, &j.ladder, true);
        let a = ladder_args(&set, &p.rungs, Path::new("/out"));
        assert_eq!(
            values(&a, "-filter_complex"),
            vec!["[0:v:0]scale=640:360:flags=bicubic,setsar=1,format=yuv420p[v0]"]
        );
        assert_eq!(values(&a, "-rw_timeout"), vec![NETWORK_TIMEOUT_US]);
        assert_eq!(values(&a, "-i"), vec!["http://127.0.0.1:1/a.mp4"]);
    }

    #[test]
    fn keyframe_interval_follows_the_frame_rate() {
        assert_eq!(keyint_frames(25.0, 2.0), 50);
        assert_eq!(keyint_frames(30000.0 / 1001.0, 2.0), 60);
        assert_eq!(keyint_frames(60.0, 1.5), 90);
        assert_eq!(keyint_frames(1.0, 0.1), 1);
        assert_eq!(num(1.5), "1.5");
        assert_eq!(num(2.0), "2");
    }

    #[test]
    fn cover_and_quality_commands() {
        let src = source(3840, 2160, true);
        let set = Settings::new(&job(""), &src, 2);
        let c = cover_args(&set, &src, Path::new("/o/cover.jpg"));
        assert_eq!(values(&c, "-ss"), vec!["1.666"]);
        assert_eq!(
            values(&c, "-vf"),
            vec!["thumbnail=n=50,scale=1920:1080:flags=bicubic,setsar=1"]
        );
        assert_eq!(c.last().unwrap(), "/o/cover.jpg");

        let q = quality_args(
            &set,
            &src,
            &[
                ("480p".into(), "/o/480p.mp4".into()),
                ("720p".into(), "/o/720p.mp4".into()),
            ],
        );
        assert_eq!(
            values(&q, "-i"),
            vec!["/in.mp4", "/o/480p.mp4", "/o/720p.mp4"]
        );
        let g = values(&q, "-filter_complex")[0];
        assert!(g.starts_with("[0:v:0]scale=3840:2160:flags=bicubic,setsar=1,format=yuv420p,split=4[r0a][r0b][r1a][r1b];"), "{g}");
        assert!(g.contains("[1:v:0]scale=3840:2160:flags=bicubic,setsar=1,format=yuv420p,split=2[d0a][d0b];[d0a][r0a]psnr@480p;[d0b][r0b]ssim@480p"), "{g}");
        assert!(g.contains("[d1a][r1a]psnr@720p;[d1b][r1b]ssim@720p"), "{g}");
    }

    #[test]
    fn reads_psnr_and_ssim_reports() {
        let log = "\
Stream mapping: ...
[ssim@720p @ 0x56183585f5c0] SSIM Y:0.965537 (14.626505) U:0.969452 (15.150213) V:0.960170 (13.997910) All:0.965295 (14.596112)
[psnr@720p @ 0x56183585ed40] PSNR y:36.363278 u:34.833892 v:31.537762 average:34.871151 min:34.415321 max:35.674462
[psnr@1080p @ 0x56183585ed41] PSNR y:inf u:inf v:inf average:inf min:inf max:inf
[Parsed_null_0 @ 0x1] something else
";
        let q = parse_quality(log);
        assert_eq!(q.len(), 2);
        let q720 = &q["720p"];
        assert_eq!(q720.psnr.average, Some(34.871151));
        assert_eq!(q720.psnr.y, Some(36.363278));
        assert_eq!(q720.psnr.min, Some(34.415321));
        assert_eq!(q720.ssim.all, Some(0.965295));
        assert_eq!(q720.ssim.y, Some(0.965537));
        assert_eq!(q["1080p"].psnr.average, None, "identical: infinite PSNR");
    }

    #[test]
    fn progress_blocks_become_percentages() {
        let mut p = Progress::new(4.0);
        let mut seen = vec![];
        let whole = Span {
            from: 10.0,
            to: 60.0,
        };
        for l in "frame=30\nfps=31.5\nout_time_us=N/A\nspeed=N/A\nprogress=continue\nframe=60\nfps=31.5\nout_time_us=1680000\nout_time_ms=1680000\nspeed=1.26x\nprogress=continue\nfps=30.0\nprogress=end\n".lines() {
            if let Some(t) = p.line(l) {
                seen.push(progress_line(whole.at(t.percent), "ladder", &t));
            }
        }
        assert_eq!(
            seen,
            vec![
                "ferry-progress: 10.0 step=ladder fps=31.5 speed=N/A",
                "ferry-progress: 31.0 step=ladder fps=31.5 speed=1.26x",
                "ferry-progress: 60.0 step=ladder fps=30.0 speed=1.26x"
            ]
        );
    }

    #[test]
    fn error_reasons_are_one_line_without_addresses() {
        let err = "x265 [error]: unknown profile <ferry-forced-failure>\n[libx265 @ 0x562e3b091d00] Invalid or incompatible profile set: ferry-forced-failure.\n\nError initializing output stream 0:0 -- Error while opening encoder\n";
        assert_eq!(
            error_reason(err).unwrap(),
            "x265 [error]: unknown profile <ferry-forced-failure> | [libx265] Invalid or incompatible profile set: ferry-forced-failure. | Error initializing output stream 0:0 -- Error while opening encoder"
        );
        assert_eq!(error_reason("\n \n"), None);
    }

    #[test]
    fn shell_lines_quote_what_needs_it() {
        let a: Vec<String> = [
            "ffmpeg",
            "-filter_complex",
            "[0:v:0]split=2[s0][s1]",
            "it's",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            shell_line(&a),
            "ffmpeg -filter_complex '[0:v:0]split=2[s0][s1]' 'it'\\''s'"
        );
    }
}
