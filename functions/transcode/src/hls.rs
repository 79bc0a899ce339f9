//! HLS packaging: each delivered rendition is cut, without re-encoding, into fMP4
//! segments at its keyframes (every `keyframe_interval_s`, the same times in every
//! rung), with a media playlist per rung; a master playlist lists the rungs that were
//! delivered and packaged, with BANDWIDTH, AVERAGE-BANDWIDTH, RESOLUTION, FRAME-RATE
//! and CODECS.
//!
//! Layout under the output directory: `hls/master.m3u8`, `hls/{rung}/index.m3u8`,
//! `hls/{rung}/init.mp4`, `hls/{rung}/seg_00000.m4s` …

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::probe::Facts;

/// The folder (under the output directory) that holds the HLS files.
pub const DIR: &str = "hls";
pub const MASTER: &str = "master.m3u8";
pub const MEDIA: &str = "index.m3u8";

/// Where a rung's playlist and segments go.
pub fn rung_dir(out: &Path, name: &str) -> PathBuf {
    out.join(DIR).join(name)
}

/// The number as the playlist wants it (`2`, `1.5`).
fn num(x: f64) -> String {
    let t = format!("{x:.6}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Cuts one rendition into fMP4 segments of `interval_s` (its keyframes are exactly
/// that far apart, so every segment starts with one), streams copied.
pub fn package_args(rendition: &Path, dir: &Path, interval_s: f64) -> Vec<String> {
    let mut a: Vec<String> = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-v", "error"]
        .map(String::from)
        .into();
    a.extend(["-i".into(), rendition.display().to_string()]);
    a.extend(["-map", "0", "-c", "copy", "-f", "hls"].map(String::from));
    a.extend(["-hls_time".into(), num(interval_s)]);
    a.extend(
        [
            "-hls_playlist_type",
            "vod",
            "-hls_segment_type",
            "fmp4",
            "-hls_fmp4_init_filename",
            "init.mp4",
            "-hls_flags",
            "independent_segments",
            "-hls_segment_filename",
        ]
        .map(String::from),
    );
    a.push(dir.join("seg_%05d.m4s").display().to_string());
    a.push(dir.join(MEDIA).display().to_string());
    a
}

/// One segment of a media playlist.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub uri: String,
    pub duration_s: f64,
}

/// The segments (and the `EXT-X-MAP` init segment) of a media playlist.
pub fn media_segments(playlist: &str) -> Result<(Vec<Segment>, Option<String>), String> {
    if !playlist.starts_with("#EXTM3U") {
        return Err("not an M3U8 playlist".into());
    }
    let mut segments = vec![];
    let mut init = None;
    let mut pending: Option<f64> = None;
    for line in playlist.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("#EXTINF:") {
            let d = rest.split(',').next().unwrap_or_default();
            pending = Some(d.parse().map_err(|_| format!("bad EXTINF {line:?}"))?);
        } else if let Some(rest) = line.strip_prefix("#EXT-X-MAP:") {
            init = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("URI="))
                .map(|u| u.trim_matches('"').to_string());
        } else if !line.starts_with('#') {
            let duration_s = pending
                .take()
                .ok_or_else(|| format!("segment {line:?} without EXTINF"))?;
            segments.push(Segment {
                uri: line.to_string(),
                duration_s,
            });
        }
    }
    if segments.is_empty() {
        return Err("the playlist has no segments".into());
    }
    Ok((segments, init))
}

/// The RFC 6381 codec string of a rendition (`hvc1.1.6.L93.B0,mp4a.40.2`), from what
/// ffprobe says; `None` when the video's profile or level is not one it knows.
pub fn codecs(f: &Facts) -> Option<String> {
    let level = f.level.filter(|l| *l > 0)?;
    let tag = if f.codec_tag.is_empty() {
        None
    } else {
        Some(f.codec_tag.as_str())
    };
    let video = match f.codec.as_str() {
        "hevc" => {
            let tag = tag
                .filter(|t| *t == "hvc1" || *t == "hev1")
                .unwrap_or("hvc1");
            // profile_space 0, general_profile_idc, compatibility flags (bit-reversed,
            // hex), tier L(ow)/main, level_idc, constraint flags.
            let (idc, compat) = match f.profile.as_str() {
                "Main" => (1, "6"),
                "Main 10" => (2, "4"),
                _ => return None,
            };
            format!("{tag}.{idc}.{compat}.L{level}.B0")
        }
        "h264" => {
            let (idc, constraints) = match f.profile.as_str() {
                "High" => (0x64, 0x00),
                "Main" => (0x4d, 0x40),
                "Constrained Baseline" => (0x42, 0xc0),
                "Baseline" => (0x42, 0x00),
                _ => return None,
            };
            format!("avc1.{idc:02x}{constraints:02x}{level:02x}")
        }
        _ => return None,
    };
    match f.audio.as_ref().map(|a| a.codec.as_str()) {
        // The function encodes AAC-LC.
        Some("aac") => Some(format!("{video},mp4a.40.2")),
        Some(_) => None,
        None => Some(video),
    }
}

/// One rung as the master playlist lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Variant {
    pub name: String,
    /// The media playlist, relative to the master playlist.
    pub playlist: String,
    pub path: String,
    pub segments: usize,
    pub duration_s: f64,
    /// Peak segment bitrate (segments shorter than half the interval, such as a short
    /// last one, are left out unless there is nothing else), bits/s.
    pub bandwidth: u64,
    /// Total segment bytes over total duration, bits/s.
    pub average_bandwidth: u64,
    pub width: u32,
    pub height: u32,
    pub frame_rate: f64,
    pub codecs: String,
}

/// A rung that was delivered as MP4 but could not be packaged (so is not listed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Unpackaged {
    pub name: String,
    pub reason: String,
}

/// The manifest's `hls` section.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hls {
    pub master: String,
    pub path: String,
    pub url: String,
    pub variants: Vec<Variant>,
    pub failed: Vec<Unpackaged>,
}

/// Peak and average bitrate from the segments' (duration, bytes).
pub fn bandwidths(segments: &[(f64, u64)], interval_s: f64) -> (u64, u64) {
    let rate = |d: f64, b: u64| if d > 0.0 { b as f64 * 8.0 / d } else { 0.0 };
    let full: Vec<&(f64, u64)> = segments
        .iter()
        .filter(|(d, _)| *d >= interval_s / 2.0)
        .collect();
    let considered: Vec<&(f64, u64)> = if full.is_empty() {
        segments.iter().collect()
    } else {
        full
    };
    let peak = considered
        .iter()
        .map(|(d, b)| rate(*d, *b))
        .fold(0.0, f64::max);
    let total_d: f64 = segments.iter().map(|s| s.0).sum();
    let total_b: u64 = segments.iter().map(|s| s.1).sum();
    (peak.ceil() as u64, rate(total_d, total_b).ceil() as u64)
}

/// The master playlist text.
pub fn master(variants: &[Variant]) -> String {
    let mut m = String::from("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for v in variants {
        m.push_str(&format!(
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},RESOLUTION={}x{},FRAME-RATE={:.3},CODECS=\"{}\"\n{}\n",
            v.bandwidth, v.average_bandwidth, v.width, v.height, v.frame_rate, v.codecs, v.playlist
        ));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::AudioFacts;

    fn facts(codec: &str, tag: &str, profile: &str, level: i64, audio: bool) -> Facts {
        Facts {
            codec: codec.into(),
            codec_tag: tag.into(),
            profile: profile.into(),
            level: Some(level),
            audio: audio.then(|| AudioFacts {
                codec: "aac".into(),
                ..AudioFacts::default()
            }),
            ..Facts::default()
        }
    }

    #[test]
    fn codec_strings() {
        assert_eq!(
            codecs(&facts("hevc", "hvc1", "Main", 93, true)).as_deref(),
            Some("hvc1.1.6.L93.B0,mp4a.40.2")
        );
        assert_eq!(
            codecs(&facts("hevc", "hev1", "Main 10", 120, false)).as_deref(),
            Some("hev1.2.4.L120.B0")
        );
        assert_eq!(
            codecs(&facts("h264", "avc1", "High", 40, true)).as_deref(),
            Some("avc1.640028,mp4a.40.2")
        );
        assert_eq!(
            codecs(&facts("h264", "avc1", "Main", 31, false)).as_deref(),
            Some("avc1.4d401f")
        );
        assert_eq!(codecs(&facts("h264", "avc1", "High", -99, false)), None);
        assert_eq!(codecs(&facts("vp9", "", "0", 10, false)), None);
    }

    #[test]
    fn package_command_copies_and_cuts_at_the_interval() {
        let a = package_args(Path::new("/o/480p.mp4"), Path::new("/o/hls/480p"), 2.0);
        let s = a.join(" ");
        assert!(
            s.contains("-i /o/480p.mp4 -map 0 -c copy -f hls -hls_time 2 "),
            "{s}"
        );
        assert!(s.contains("-hls_segment_type fmp4"), "{s}");
        assert!(
            s.ends_with("/o/hls/480p/seg_%05d.m4s /o/hls/480p/index.m3u8"),
            "{s}"
        );
    }

    #[test]
    fn media_playlists_are_read() {
        let p = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:2\n#EXT-X-MAP:URI=\"init.mp4\"\n#EXTINF:2.000000,\nseg_00000.m4s\n#EXTINF:0.480000,\nseg_00001.m4s\n#EXT-X-ENDLIST\n";
        let (segs, init) = media_segments(p).unwrap();
        assert_eq!(init.as_deref(), Some("init.mp4"));
        assert_eq!(
            segs,
            vec![
                Segment {
                    uri: "seg_00000.m4s".into(),
                    duration_s: 2.0
                },
                Segment {
                    uri: "seg_00001.m4s".into(),
                    duration_s: 0.48
                }
            ]
        );
        assert!(media_segments("#EXTM3U\n#EXT-X-ENDLIST\n").is_err());
        assert!(media_segments("hello").is_err());
    }

    #[test]
    fn bandwidth_ignores_a_short_last_segment() {
        // 2 s at 1 Mb/s and 1.6 Mb/s, then 0.2 s holding a keyframe (8 Mb/s).
        let (peak, avg) = bandwidths(&[(2.0, 250_000), (2.0, 400_000), (0.2, 200_000)], 2.0);
        assert_eq!(peak, 1_600_000);
        assert_eq!(avg, 1_619_048, "850 kB over 4.2 s");
        let (peak, _) = bandwidths(&[(0.5, 100_000)], 2.0);
        assert_eq!(peak, 1_600_000, "only short segments: they count");
    }

    #[test]
    fn master_lists_each_variant() {
        let v = Variant {
            name: "480p".into(),
            playlist: "480p/index.m3u8".into(),
            path: "/o/hls/480p/index.m3u8".into(),
            segments: 3,
            duration_s: 5.0,
            bandwidth: 950_000,
            average_bandwidth: 900_000,
            width: 854,
            height: 480,
            frame_rate: 25.0,
            codecs: "hvc1.1.6.L93.B0,mp4a.40.2".into(),
        };
        assert_eq!(
            master(&[v]),
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n\
             #EXT-X-STREAM-INF:BANDWIDTH=950000,AVERAGE-BANDWIDTH=900000,RESOLUTION=854x480,FRAME-RATE=25.000,CODECS=\"hvc1.1.6.L93.B0,mp4a.40.2\"\n\
             480p/index.m3u8\n"
        );
    }
}
