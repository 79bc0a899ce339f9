//! The invocation body: JSON fields with defaults, checked into a [`Job`].

use std::path::PathBuf;

use serde::Deserialize;

use crate::s3::S3Url;

/// The presets x264 and x265 both accept.
pub const PRESETS: &[&str] = &[
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
];

/// One rung of the ladder as the caller gives it.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rung {
    /// Names the rendition (`{name}.mp4`); `[A-Za-z0-9_-]`, 1–32 characters.
    pub name: String,
    /// The short side of the picture in pixels (the height for landscape video).
    pub height: u32,
    /// Target video bitrate.
    pub bitrate_kbps: u32,
}

/// The default ladder: 480p at 800 kb/s, 720p at 1.5 Mb/s, 1080p at 3 Mb/s.
pub fn default_ladder() -> Vec<Rung> {
    [
        ("480p", 480, 800),
        ("720p", 720, 1500),
        ("1080p", 1080, 3000),
    ]
    .into_iter()
    .map(|(name, height, bitrate_kbps)| Rung {
        name: name.into(),
        height,
        bitrate_kbps,
    })
    .collect()
}

/// The video codec of every rendition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Codec {
    #[serde(rename = "h265", alias = "hevc")]
    H265,
    #[serde(rename = "h264", alias = "avc")]
    H264,
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::H265 => "h265",
            Codec::H264 => "h264",
        }
    }
}

/// The request body, as parsed (see README.md for every field).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub input: Option<String>,
    pub output: Option<String>,
    #[serde(default = "default_codec")]
    pub codec: Codec,
    #[serde(default = "default_ladder")]
    pub ladder: Vec<Rung>,
    #[serde(default = "default_preset")]
    pub preset: String,
    #[serde(default = "default_audio")]
    pub audio_bitrate_kbps: u32,
    #[serde(default = "default_keyint")]
    pub keyframe_interval_s: f64,
    #[serde(default)]
    pub reproducible: bool,
    #[serde(default = "yes")]
    pub quality: bool,
    #[serde(default = "yes")]
    pub cover: bool,
    #[serde(default = "yes")]
    pub min_one_rendition: bool,
    #[serde(default)]
    pub fail_rung: Option<String>,
    #[serde(default)]
    pub hls: bool,
    #[serde(default = "default_threshold")]
    pub segment_threshold_s: f64,
    #[serde(default = "default_segment")]
    pub segment_s: f64,
    /// Internal: this invocation encodes one segment of a segment-parallel job.
    #[serde(default)]
    pub segment: Option<SegmentSpec>,
}

/// One segment of a segment-parallel job: `[start_s, start_s + duration_s)` of the
/// source (`duration_s` absent: to the end).
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSpec {
    pub index: u32,
    pub start_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
}

fn default_codec() -> Codec {
    Codec::H265
}
fn default_preset() -> String {
    "medium".into()
}
fn default_audio() -> u32 {
    128
}
fn default_keyint() -> f64 {
    2.0
}
fn default_threshold() -> f64 {
    60.0
}
fn default_segment() -> f64 {
    30.0
}
fn yes() -> bool {
    true
}

/// Where the source comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    File(PathBuf),
    /// An `http://` or `https://` URL (downloaded once into scratch, see
    /// [`crate::fetch`]).
    Http(String),
    /// An object in an S3-compatible store (downloaded once, see [`crate::s3`]).
    S3(S3Url),
}

impl Input {
    /// What ffmpeg and ffprobe are given after `-i` (network inputs are downloaded
    /// first, so they see a file).
    pub fn ffmpeg_arg(&self) -> String {
        match self {
            Input::File(p) => p.display().to_string(),
            Input::Http(u) => u.clone(),
            Input::S3(u) => u.to_string(),
        }
    }

    pub fn is_network(&self) -> bool {
        matches!(self, Input::Http(_) | Input::S3(_))
    }
}

/// Where the results go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A local (or shared) directory.
    Dir(PathBuf),
    /// A key prefix in an S3-compatible store (empty or ending in `/`): the files are
    /// written into scratch, then uploaded (see [`crate::s3`]).
    S3(S3Url),
}

/// A checked request.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub input_url: String,
    pub input: Input,
    pub output_url: String,
    pub output: Output,
    /// The directory the files are written to (created if missing): the output
    /// directory, or for an `s3://` output one in scratch that [`crate::run::run`]
    /// chooses (empty until then).
    pub output_dir: PathBuf,
    pub codec: Codec,
    pub ladder: Vec<Rung>,
    pub preset: String,
    pub audio_bitrate_kbps: u32,
    pub keyframe_interval_s: f64,
    pub reproducible: bool,
    pub quality: bool,
    pub cover: bool,
    pub min_one_rendition: bool,
    pub fail_rung: Option<String>,
    /// Also package the renditions as HLS (fMP4 segments, media and master playlists).
    pub hls: bool,
    /// Sources longer than this are encoded segment-parallel (when the platform gives
    /// the function an API address).
    pub segment_threshold_s: f64,
    /// Length of each segment (a multiple of the keyframe interval).
    pub segment_s: f64,
    /// Set when this invocation is one segment of a segment-parallel job.
    pub segment: Option<SegmentSpec>,
}

/// Whether `x` is a whole multiple of `step` (to a microsecond).
pub fn multiple_of(x: f64, step: f64) -> bool {
    let k = x / step;
    (k - k.round()).abs() * step < 1e-6
}

/// Decodes `%XX` escapes (file URLs may carry them for spaces and the like).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

fn scheme(url: &str) -> Option<&str> {
    let (s, _) = url.split_once("://")?;
    (!s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)))
    .then_some(s)
}

/// `file:///abs/path` (or `file://localhost/abs/path`) → `/abs/path`.
fn file_path(url: &str, field: &str) -> Result<PathBuf, String> {
    let rest = &url["file://".len()..];
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    if !rest.starts_with('/') {
        return Err(format!(
            "{field}: {url:?} must be an absolute file URL like file:///abs/path"
        ));
    }
    let path = percent_decode(rest).map_err(|e| format!("{field}: {e}"))?;
    if path.contains('\0') {
        return Err(format!("{field}: {url:?} contains a NUL"));
    }
    Ok(PathBuf::from(path))
}

pub fn parse_input(url: &str) -> Result<Input, String> {
    match scheme(url).map(str::to_ascii_lowercase).as_deref() {
        Some("file") => file_path(url, "input").map(Input::File),
        Some("s3") => crate::s3::parse_object(url).map(Input::S3),
        Some("http" | "https") => {
            if url.chars().any(|c| c.is_control() || c == ' ') {
                return Err(format!("input: {url:?} is not a valid URL"));
            }
            Ok(Input::Http(url.to_string()))
        }
        Some(other) => Err(format!(
            "input: unsupported scheme {other:?} (supported: file, http, https, s3)"
        )),
        None => Err(format!(
            "input: {url:?} is not a URL (expected file:///abs/path, http(s)://... or s3://bucket/key)"
        )),
    }
}

pub fn parse_output(url: &str) -> Result<Output, String> {
    match scheme(url).map(str::to_ascii_lowercase).as_deref() {
        Some("file") => file_path(url, "output").map(Output::Dir),
        Some("s3") => crate::s3::parse_prefix(url).map(Output::S3),
        Some(other) => Err(format!(
            "output: unsupported scheme {other:?} (supported: file, s3)"
        )),
        None => Err(format!(
            "output: {url:?} is not a URL (expected file:///abs/dir/ or s3://bucket/prefix/)"
        )),
    }
}

fn valid_name(n: &str) -> bool {
    (1..=32).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parses and checks the invocation body.
pub fn parse(body: &[u8]) -> Result<Job, String> {
    let req: Request = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("the input is not valid JSON: {e}")
        } else {
            format!("bad request: {e}")
        }
    })?;
    let input_url = req.input.ok_or(
        "missing field \"input\" (a URL: file:///abs/in.mp4, http(s)://... or s3://bucket/key)",
    )?;
    let output_url = req.output.ok_or(
        "missing field \"output\" (a directory URL: file:///abs/out/ or s3://bucket/prefix/)",
    )?;
    let input = parse_input(&input_url)?;
    let output = parse_output(&output_url)?;
    let output_dir = match &output {
        Output::Dir(d) => d.clone(),
        Output::S3(_) => PathBuf::new(),
    };
    if req.ladder.is_empty() || req.ladder.len() > 8 {
        return Err("ladder: give 1 to 8 rungs".into());
    }
    for (i, r) in req.ladder.iter().enumerate() {
        if !valid_name(&r.name) {
            return Err(format!(
                "ladder: rung name {:?} must be 1-32 of A-Z a-z 0-9 _ -",
                r.name
            ));
        }
        if r.name == "cover" || r.name == "manifest" {
            return Err(format!("ladder: rung name {:?} is reserved", r.name));
        }
        if req.ladder[..i].iter().any(|o| o.name == r.name) {
            return Err(format!("ladder: rung name {:?} appears twice", r.name));
        }
        if r.height % 2 != 0 || !(16..=4320).contains(&r.height) {
            return Err(format!(
                "ladder: {}: height {} must be even and within 16..=4320",
                r.name, r.height
            ));
        }
        if !(50..=200_000).contains(&r.bitrate_kbps) {
            return Err(format!(
                "ladder: {}: bitrate_kbps {} must be within 50..=200000",
                r.name, r.bitrate_kbps
            ));
        }
    }
    if !PRESETS.contains(&req.preset.as_str()) {
        return Err(format!(
            "preset {:?} is not one of {}",
            req.preset,
            PRESETS.join(", ")
        ));
    }
    if !(16..=512).contains(&req.audio_bitrate_kbps) {
        return Err("audio_bitrate_kbps must be within 16..=512".into());
    }
    if !(req.keyframe_interval_s.is_finite() && (0.1..=20.0).contains(&req.keyframe_interval_s)) {
        return Err("keyframe_interval_s must be within 0.1..=20".into());
    }
    if let Some(f) = &req.fail_rung
        && !req.ladder.iter().any(|r| &r.name == f)
    {
        return Err(format!("fail_rung {f:?} names no rung of the ladder"));
    }
    if !(req.segment_threshold_s.is_finite() && req.segment_threshold_s >= 1.0) {
        return Err("segment_threshold_s must be at least 1".into());
    }
    let kf = req.keyframe_interval_s;
    if !(req.segment_s.is_finite()
        && (kf..=3600.0).contains(&req.segment_s)
        && multiple_of(req.segment_s, kf))
    {
        return Err(format!(
            "segment_s must be a multiple of keyframe_interval_s ({kf}) within {kf}..=3600"
        ));
    }
    if let Some(seg) = &req.segment {
        let dur_ok = seg
            .duration_s
            .is_none_or(|d| d.is_finite() && d > 0.0 && multiple_of(d, kf));
        let start_ok =
            seg.start_s.is_finite() && seg.start_s >= 0.0 && multiple_of(seg.start_s, kf);
        if !(start_ok && dur_ok) {
            return Err(format!(
                "segment: start_s and duration_s must be multiples of keyframe_interval_s ({kf})"
            ));
        }
    }
    let mut ladder = req.ladder;
    ladder.sort_by_key(|r| (r.height, r.bitrate_kbps));
    Ok(Job {
        input_url,
        input,
        output_url,
        output,
        output_dir,
        codec: req.codec,
        ladder,
        preset: req.preset,
        audio_bitrate_kbps: req.audio_bitrate_kbps,
        keyframe_interval_s: req.keyframe_interval_s,
        reproducible: req.reproducible,
        quality: req.quality,
        cover: req.cover,
        min_one_rendition: req.min_one_rendition,
        fail_rung: req.fail_rung,
        hls: req.hls,
        segment_threshold_s: req.segment_threshold_s,
        segment_s: req.segment_s,
        segment: req.segment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_request_gets_the_defaults() {
        let j = parse(br#"{"input":"file:///in/a%20b.mp4","output":"file:///out/"}"#).unwrap();
        assert_eq!(j.input, Input::File("/in/a b.mp4".into()));
        assert_eq!(j.output_dir, PathBuf::from("/out/"));
        assert_eq!(j.codec, Codec::H265);
        assert_eq!(j.ladder, default_ladder());
        assert_eq!(j.preset, "medium");
        assert_eq!(j.keyframe_interval_s, 2.0);
        assert!(j.quality && j.cover && j.min_one_rendition && !j.reproducible && !j.hls);
        assert_eq!(
            (j.segment_threshold_s, j.segment_s, j.segment.clone()),
            (60.0, 30.0, None)
        );
    }

    #[test]
    fn s3_input_and_output_are_read() {
        let j =
            parse(br#"{"input":"s3://media-in/uploads/a.mp4","output":"s3://media-out/jobs/7"}"#)
                .unwrap();
        assert_eq!(
            j.input,
            Input::S3(S3Url {
                bucket: "media-in".into(),
                key: "uploads/a.mp4".into()
            })
        );
        assert!(j.input.is_network());
        assert_eq!(
            j.output,
            Output::S3(S3Url {
                bucket: "media-out".into(),
                key: "jobs/7/".into()
            })
        );
        assert_eq!(j.output_dir, PathBuf::new());
    }

    #[test]
    fn options_are_read() {
        let j = parse(
            br#"{"input":"https://example.com/v.mp4","output":"file://localhost/o","codec":"h264",
                 "ladder":[{"name":"hi","height":720,"bitrate_kbps":2000},{"name":"lo","height":360,"bitrate_kbps":500}],
                 "preset":"veryfast","reproducible":true,"quality":false,"cover":false,"fail_rung":"hi","hls":true}"#,
        )
        .unwrap();
        assert_eq!(j.input, Input::Http("https://example.com/v.mp4".into()));
        assert_eq!(j.output_dir, PathBuf::from("/o"));
        assert_eq!(j.codec, Codec::H264);
        // Sorted by height.
        assert_eq!(j.ladder[0].name, "lo");
        assert!(j.reproducible && !j.quality && !j.cover);
        assert_eq!(j.fail_rung.as_deref(), Some("hi"));
        assert!(j.hls);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |b: &str| parse(b.as_bytes()).unwrap_err();
        assert!(err("{\"input\": ").contains("not valid JSON"));
        assert!(err(r#"{"output":"file:///o"}"#).contains("missing field \"input\""));
        assert!(err(r#"{"input":"file:///i"}"#).contains("missing field \"output\""));
        assert!(err(r#"{"input":"gs://b/k","output":"file:///o"}"#).contains("unsupported scheme"));
        assert!(err(r#"{"input":"s3://b/k","output":"file:///o"}"#).contains("bucket name"));
        assert!(err(r#"{"input":"file:///i","output":"s3://bucket?x"}"#).contains("output:"));
        assert!(err(r#"{"input":"/abs/in.mp4","output":"file:///o"}"#).contains("is not a URL"));
        assert!(err(r#"{"input":"file://rel/in.mp4","output":"file:///o"}"#).contains("absolute"));
        assert!(
            err(r#"{"input":"file:///i","output":"http://x/"}"#).contains("unsupported scheme")
        );
        assert!(err(r#"{"input":"file:///i","output":"file:///o","nope":1}"#).contains("nope"));
        assert!(err(r#"{"input":"file:///i","output":"file:///o","codec":"vp9"}"#).contains("vp9"));
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","preset":"x;rm"}"#).contains("preset")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","fail_rung":"4k"}"#)
                .contains("names no rung")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","ladder":[{"name":"a;b","height":480,"bitrate_kbps":800}]}"#)
                .contains("rung name")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","ladder":[{"name":"a","height":481,"bitrate_kbps":800}]}"#)
                .contains("even")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","ladder":[{"name":"a","height":480,"bitrate_kbps":800},{"name":"a","height":720,"bitrate_kbps":800}]}"#)
                .contains("twice")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","ladder":[]}"#).contains("1 to 8")
        );
        assert!(err(r#"{"input":"file:///%zz","output":"file:///o"}"#).contains("escape"));
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","segment_s":3}"#).contains("multiple")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","segment_threshold_s":0}"#)
                .contains("segment_threshold_s")
        );
        assert!(
            err(r#"{"input":"file:///i","output":"file:///o","segment":{"index":1,"start_s":3}}"#)
                .contains("multiples")
        );
    }
}
