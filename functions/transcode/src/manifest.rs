//! The manifest: what was made, what ffprobe says about it, how good it is, and what
//! was skipped or failed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ffmpeg::Quality;
use crate::ladder::{Planned, Skipped};
use crate::probe::{Facts, Source};
use crate::request::Job;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Manifest {
    pub input: String,
    pub output: String,
    pub source: Source,
    pub codec: &'static str,
    pub preset: String,
    pub reproducible: bool,
    pub keyframe_interval_s: f64,
    pub keyint_frames: u32,
    /// Where the ladder was decoded, scaled and encoded (CPU, NVDEC, NVENC) and why.
    pub acceleration: crate::gpu::Plan,
    pub renditions: Vec<Rendition>,
    pub skipped: Vec<Skipped>,
    pub failed: Vec<Failed>,
    pub cover: Option<Cover>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cover_error: Option<String>,
    /// The HLS packaging, when asked for (`hls: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hls: Option<crate::hls::Hls>,
    /// Why HLS packaging failed as a whole, when it did (not fatal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hls_error: Option<String>,
    /// This invocation was one segment of a segment-parallel job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<crate::request::SegmentSpec>,
    /// A network input (`http(s)://`, `s3://`) downloaded once before the passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_download: Option<crate::fetch::Downloaded>,
    /// The upload to an `s3://` output (every file but `manifest.json` itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_upload: Option<crate::s3::Uploaded>,
    /// How a long source was encoded segment-parallel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmented: Option<crate::parallel::Report>,
    /// Why a source over the threshold was encoded in one pass after all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmented_error: Option<String>,
    /// How PSNR/SSIM were measured; absent when `quality` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality_method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality_error: Option<String>,
    /// The one-decode command (shell-quoted) that encoded the ladder.
    pub ffmpeg_command: String,
    /// Why the one-decode run failed, when it did (each rung was then retried alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ladder_error: Option<String>,
    pub timings_ms: Timings,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    pub probe: u64,
    pub ladder: u64,
    pub retries: u64,
    pub verify: u64,
    pub cover: u64,
    pub hls: u64,
    pub quality: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rendition {
    pub name: String,
    pub target_bitrate_kbps: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub clamped_to_source: bool,
    /// `ladder` (the one-decode run) or `alone` (retried by itself).
    pub encoded_in: &'static str,
    pub file: String,
    pub path: String,
    pub url: String,
    pub size_bytes: u64,
    pub sha256: String,
    #[serde(flatten)]
    pub facts: Facts,
    pub quality: Option<Quality>,
    /// The command that made it, when it was not the ladder's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ffmpeg_command: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failed {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub target_bitrate_kbps: u32,
    pub reason: String,
    pub ffmpeg_command: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cover {
    pub file: String,
    pub path: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub time_s: f64,
    pub size_bytes: u64,
    pub sha256: String,
}

/// A rendition that was written and verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivered {
    pub rung: Planned,
    pub encoded_in: &'static str,
    pub ffmpeg_command: Option<String>,
    pub path: std::path::PathBuf,
    pub size_bytes: u64,
    pub sha256: String,
    pub facts: Facts,
}

impl Manifest {
    /// Points every location at where the files went: `output` becomes `output`, and
    /// each local path `p` the (`path`, `url`) that `place(p)` gives (kept when `None`).
    pub fn relocate(&mut self, output: String, place: impl Fn(&str) -> Option<(String, String)>) {
        self.output = output;
        let moved = |path: &mut String, url: &mut String| {
            if let Some((p, u)) = place(path) {
                *path = p;
                *url = u;
            }
        };
        for r in &mut self.renditions {
            moved(&mut r.path, &mut r.url);
        }
        if let Some(c) = &mut self.cover {
            moved(&mut c.path, &mut c.url);
        }
        if let Some(h) = &mut self.hls {
            moved(&mut h.path, &mut h.url);
            for v in &mut h.variants {
                if let Some((p, _)) = place(&v.path) {
                    v.path = p;
                }
            }
        }
    }
}

/// A file URL for a path (the output is a local directory).
pub fn file_url(path: &std::path::Path) -> String {
    let mut out = String::from("file://");
    for b in path.display().to_string().bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Everything a transcode produced, to be assembled.
pub struct Parts<'a> {
    pub job: &'a Job,
    pub source: Source,
    pub keyint_frames: u32,
    pub acceleration: crate::gpu::Plan,
    pub skipped: Vec<Skipped>,
    pub delivered: Vec<Delivered>,
    pub failed: Vec<Failed>,
    pub quality: Option<BTreeMap<String, Quality>>,
    pub quality_error: Option<String>,
    pub cover: Option<Cover>,
    pub cover_error: Option<String>,
    pub hls: Option<crate::hls::Hls>,
    pub hls_error: Option<String>,
    pub segmented: Option<crate::parallel::Report>,
    pub segmented_error: Option<String>,
    pub downloaded: Option<crate::fetch::Downloaded>,
    pub ffmpeg_command: String,
    pub ladder_error: Option<String>,
    pub timings: Timings,
}

pub fn assemble(p: Parts<'_>) -> Manifest {
    let quality_on = p.job.quality;
    let renditions = p
        .delivered
        .into_iter()
        .map(|d| Rendition {
            quality: p
                .quality
                .as_ref()
                .and_then(|q| q.get(&d.rung.name).cloned()),
            name: d.rung.name,
            target_bitrate_kbps: d.rung.bitrate_kbps,
            clamped_to_source: d.rung.clamped_to_source,
            encoded_in: d.encoded_in,
            file: d
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            url: file_url(&d.path),
            path: d.path.display().to_string(),
            size_bytes: d.size_bytes,
            sha256: d.sha256,
            facts: d.facts,
            ffmpeg_command: d.ffmpeg_command,
        })
        .collect();
    Manifest {
        input: p.job.input_url.clone(),
        output: file_url(&p.job.output_dir),
        quality_method: quality_on.then(|| crate::ffmpeg::quality_method(&p.source)),
        source: p.source,
        codec: p.job.codec.as_str(),
        preset: p.job.preset.clone(),
        reproducible: p.job.reproducible,
        keyframe_interval_s: p.job.keyframe_interval_s,
        keyint_frames: p.keyint_frames,
        acceleration: p.acceleration,
        renditions,
        skipped: p.skipped,
        failed: p.failed,
        cover: p.cover,
        cover_error: p.cover_error,
        hls: p.hls,
        hls_error: p.hls_error,
        segment: p.job.segment.clone(),
        input_download: p.downloaded,
        output_upload: None,
        segmented: p.segmented,
        segmented_error: p.segmented_error,
        quality_error: p.quality_error,
        ffmpeg_command: p.ffmpeg_command,
        ladder_error: p.ladder_error,
        timings_ms: p.timings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffmpeg::{Psnr, Ssim};

    fn planned(name: &str, w: u32, h: u32, b: u32) -> Planned {
        Planned {
            name: name.into(),
            width: w,
            height: h,
            bitrate_kbps: b,
            clamped_to_source: false,
        }
    }

    #[test]
    fn assembles_renditions_skips_and_failures() {
        let job = crate::request::parse(
            br#"{"input":"file:///in.mp4","output":"file:///out dir/","fail_rung":"720p"}"#,
        )
        .unwrap();
        let source = crate::probe::source(
            br#"{"streams":[{"codec_type":"video","codec_name":"h264","width":1280,"height":720,"avg_frame_rate":"25/1","duration":"5.0","nb_frames":"125"}]}"#,
        )
        .unwrap();
        let facts = Facts {
            codec: "hevc".into(),
            codec_tag: "hvc1".into(),
            profile: "Main".into(),
            level: Some(90),
            pix_fmt: "yuv420p".into(),
            width: 854,
            height: 480,
            frame_rate: "25/1".into(),
            frames: Some(125),
            duration_s: Some(5.0),
            bitrate_bps: Some(790_000),
            total_bitrate_bps: Some(800_000),
            audio: None,
        };
        let mut quality = BTreeMap::new();
        quality.insert(
            "480p".to_string(),
            Quality {
                psnr: Psnr {
                    average: Some(35.5),
                    ..Default::default()
                },
                ssim: Ssim {
                    all: Some(0.97),
                    ..Default::default()
                },
            },
        );
        let m = assemble(Parts {
            job: &job,
            source,
            keyint_frames: 50,
            acceleration: crate::gpu::Plan::cpu(job.codec, vec![], "no GPU visible"),
            skipped: vec![Skipped {
                name: "1080p".into(),
                height: 1080,
                reason: "too tall".into(),
            }],
            delivered: vec![Delivered {
                rung: planned("480p", 854, 480, 800),
                encoded_in: "alone",
                ffmpeg_command: Some("ffmpeg …".into()),
                path: "/out dir/480p.mp4".into(),
                size_bytes: 500_000,
                sha256: "ab".repeat(32),
                facts,
            }],
            failed: vec![Failed {
                name: "720p".into(),
                width: 1280,
                height: 720,
                target_bitrate_kbps: 1500,
                reason: "Invalid or incompatible profile set".into(),
                ffmpeg_command: "ffmpeg …".into(),
            }],
            quality: Some(quality),
            quality_error: None,
            cover: None,
            cover_error: Some("no frame".into()),
            hls: None,
            hls_error: None,
            segmented: None,
            segmented_error: None,
            downloaded: None,
            ffmpeg_command: "ffmpeg -i /in.mp4 …".into(),
            ladder_error: Some("profile".into()),
            timings: Timings::default(),
        });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["input"], "file:///in.mp4");
        assert_eq!(v["output"], "file:///out%20dir/");
        assert_eq!(v["codec"], "h265");
        assert_eq!(v["keyint_frames"], 50);
        assert_eq!(v["source"]["width"], 1280);
        let r = &v["renditions"][0];
        assert_eq!(r["name"], "480p");
        assert_eq!(r["file"], "480p.mp4");
        assert_eq!(r["url"], "file:///out%20dir/480p.mp4");
        assert_eq!(r["path"], "/out dir/480p.mp4");
        assert_eq!(r["codec"], "hevc", "ffprobe's facts sit in the rendition");
        assert_eq!(r["codec_tag"], "hvc1");
        assert_eq!(r["frames"], 125);
        assert_eq!(r["bitrate_bps"], 790_000);
        assert_eq!(r["target_bitrate_kbps"], 800);
        assert_eq!(r["encoded_in"], "alone");
        assert_eq!(r["quality"]["psnr"]["average"], 35.5);
        assert_eq!(r["quality"]["ssim"]["all"], 0.97);
        assert!(r.get("clamped_to_source").is_none());
        assert_eq!(v["failed"][0]["name"], "720p");
        assert!(
            v["failed"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("profile")
        );
        assert_eq!(v["skipped"][0]["name"], "1080p");
        assert!(v["cover"].is_null());
        assert_eq!(v["cover_error"], "no frame");
        assert!(v["quality_method"].as_str().unwrap().contains("1280x720"));
        assert_eq!(v["ladder_error"], "profile");
        assert!(v.get("quality_error").is_none());
        assert!(v.get("hls").is_none(), "no hls section unless asked");
        assert_eq!(v["acceleration"]["path"], "cpu");
        assert_eq!(v["acceleration"]["encoder"], "libx265");
        assert_eq!(r["level"], 90);

        // An object-store output: the locations become keys and s3:// URLs.
        let mut m = m;
        m.relocate("s3://b/p/".into(), |local| {
            let rel = local.strip_prefix("/out dir/")?;
            Some((format!("p/{rel}"), format!("s3://b/p/{rel}")))
        });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["output"], "s3://b/p/");
        assert_eq!(v["renditions"][0]["url"], "s3://b/p/480p.mp4");
        assert_eq!(v["renditions"][0]["path"], "p/480p.mp4");
        assert_eq!(v["renditions"][0]["file"], "480p.mp4");
    }
}
