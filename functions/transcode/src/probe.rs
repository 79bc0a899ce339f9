//! ffprobe's JSON (`-show_streams -show_format -of json`), read into what the ladder
//! and the manifest need.

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Deserialize)]
pub struct Probe {
    #[serde(default)]
    pub streams: Vec<Stream>,
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Default, Deserialize)]
pub struct Format {
    pub duration: Option<String>,
    pub size: Option<String>,
    pub bit_rate: Option<String>,
    pub format_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Disposition {
    #[serde(default)]
    pub attached_pic: i64,
}

#[derive(Debug, Default, Deserialize)]
pub struct SideData {
    pub rotation: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Stream {
    pub index: Option<u32>,
    pub codec_type: Option<String>,
    pub codec_name: Option<String>,
    pub codec_tag_string: Option<String>,
    pub profile: Option<String>,
    /// `level_idc` (H.264: 40 for 4.0; HEVC: 30 × the level); -99 when unknown.
    pub level: Option<i64>,
    pub pix_fmt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub sample_aspect_ratio: Option<String>,
    pub r_frame_rate: Option<String>,
    pub avg_frame_rate: Option<String>,
    pub duration: Option<String>,
    pub bit_rate: Option<String>,
    pub nb_frames: Option<String>,
    pub sample_rate: Option<String>,
    pub channels: Option<u32>,
    #[serde(default)]
    pub disposition: Disposition,
    #[serde(default)]
    pub side_data_list: Vec<SideData>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A rational like `30000/1001`; `None` for `0/0`, `N/A` and the like.
pub fn rational(s: &str) -> Option<(u64, u64)> {
    let (n, d) = s.split_once('/').unwrap_or((s, "1"));
    let (n, d) = (n.trim().parse::<u64>().ok()?, d.trim().parse::<u64>().ok()?);
    (n > 0 && d > 0).then_some((n, d))
}

fn num<T: std::str::FromStr>(s: &Option<String>) -> Option<T> {
    s.as_deref().and_then(|s| s.trim().parse().ok())
}

impl Stream {
    pub fn is_video(&self) -> bool {
        self.codec_type.as_deref() == Some("video") && self.disposition.attached_pic == 0
    }

    pub fn is_audio(&self) -> bool {
        self.codec_type.as_deref() == Some("audio")
    }

    /// The frame rate: `avg_frame_rate` when it is set, else `r_frame_rate`.
    pub fn frame_rate(&self) -> Option<(u64, u64)> {
        self.avg_frame_rate
            .as_deref()
            .and_then(rational)
            .or_else(|| self.r_frame_rate.as_deref().and_then(rational))
    }

    /// Degrees the picture is displayed rotated by (display matrix or `rotate` tag).
    pub fn rotation(&self) -> i64 {
        let from_side = self.side_data_list.iter().find_map(|s| match &s.rotation {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        });
        let from_tag = match self.tags.get("rotate") {
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            _ => None,
        };
        from_side.or(from_tag).map_or(0, |r| r.round() as i64)
    }
}

/// What the ladder needs to know about the source.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Source {
    pub video_codec: String,
    pub width: u32,
    pub height: u32,
    /// The picture as displayed: sample aspect ratio applied, rotation applied.
    pub display_width: u32,
    pub display_height: u32,
    pub pix_fmt: String,
    /// `num/den`, e.g. `30/1` or `30000/1001`.
    pub frame_rate: String,
    pub fps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<u64>,
    /// Seconds (the video stream's, else the container's); 0 when unknown.
    pub duration_s: f64,
    pub has_audio: bool,
    pub rotation: i64,
}

/// Reads ffprobe's JSON about the source; errors are readable sentences.
pub fn source(json: &[u8]) -> Result<Source, String> {
    let p: Probe =
        serde_json::from_slice(json).map_err(|e| format!("unexpected ffprobe output: {e}"))?;
    let v = p
        .streams
        .iter()
        .find(|s| s.is_video())
        .ok_or("the input has no video stream")?;
    let (width, height) = match (v.width, v.height) {
        (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
        _ => return Err("the input's video stream has no picture size".into()),
    };
    let (fn_, fd) = v
        .frame_rate()
        .ok_or("the input's video stream has no frame rate")?;
    // Display size: apply the sample aspect ratio to the width, then the rotation.
    let sar = v.sample_aspect_ratio.as_deref().and_then(|s| {
        let s = s.replace(':', "/");
        rational(&s)
    });
    let dw = match sar {
        Some((n, d)) if n != d => ((f64::from(width) * n as f64 / d as f64).round() as u32).max(1),
        _ => width,
    };
    let rotation = v.rotation();
    let (display_width, display_height) = if rotation.rem_euclid(180) == 90 {
        (height, dw)
    } else {
        (dw, height)
    };
    let duration_s = num::<f64>(&v.duration)
        .or_else(|| num::<f64>(&p.format.duration))
        .filter(|d| d.is_finite() && *d > 0.0)
        .unwrap_or(0.0);
    Ok(Source {
        video_codec: v.codec_name.clone().unwrap_or_default(),
        width,
        height,
        display_width,
        display_height,
        pix_fmt: v.pix_fmt.clone().unwrap_or_default(),
        frame_rate: format!("{fn_}/{fd}"),
        fps: fn_ as f64 / fd as f64,
        frames: num(&v.nb_frames),
        duration_s,
        has_audio: p.streams.iter().any(Stream::is_audio),
        rotation,
    })
}

/// What ffprobe says about a rendition (the manifest's per-rendition facts).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Facts {
    pub codec: String,
    pub codec_tag: String,
    pub profile: String,
    /// The video's `level_idc` as ffprobe reports it (absent when unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<i64>,
    pub pix_fmt: String,
    pub width: u32,
    pub height: u32,
    pub frame_rate: String,
    pub frames: Option<u64>,
    pub duration_s: Option<f64>,
    /// The video stream's bitrate.
    pub bitrate_bps: Option<u64>,
    /// The whole file's bitrate (video, audio, container).
    pub total_bitrate_bps: Option<u64>,
    pub audio: Option<AudioFacts>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AudioFacts {
    pub codec: String,
    pub bitrate_bps: Option<u64>,
    pub sample_rate: Option<u32>,
    pub channels: Option<u32>,
}

pub fn facts(json: &[u8]) -> Result<Facts, String> {
    let p: Probe =
        serde_json::from_slice(json).map_err(|e| format!("unexpected ffprobe output: {e}"))?;
    let v = p
        .streams
        .iter()
        .find(|s| s.is_video())
        .ok_or("the rendition has no video stream")?;
    let audio = p.streams.iter().find(|s| s.is_audio()).map(|a| AudioFacts {
        codec: a.codec_name.clone().unwrap_or_default(),
        bitrate_bps: num(&a.bit_rate),
        sample_rate: num(&a.sample_rate),
        channels: a.channels,
    });
    Ok(Facts {
        codec: v.codec_name.clone().unwrap_or_default(),
        codec_tag: v.codec_tag_string.clone().unwrap_or_default(),
        profile: v.profile.clone().unwrap_or_default(),
        level: v.level.filter(|l| *l > 0),
        pix_fmt: v.pix_fmt.clone().unwrap_or_default(),
        width: v.width.unwrap_or(0),
        height: v.height.unwrap_or(0),
        frame_rate: v
            .frame_rate()
            .map(|(n, d)| format!("{n}/{d}"))
            .unwrap_or_default(),
        frames: num(&v.nb_frames),
        duration_s: num(&v.duration),
        bitrate_bps: num(&v.bit_rate),
        total_bitrate_bps: num(&p.format.bit_rate),
        audio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"{
      "streams": [
        {"index": 0, "codec_name": "mjpeg", "codec_type": "video", "width": 300, "height": 300,
         "disposition": {"attached_pic": 1}},
        {"index": 1, "codec_name": "h264", "profile": "High", "codec_type": "video",
         "codec_tag_string": "avc1", "width": 1920, "height": 1080, "sample_aspect_ratio": "1:1",
         "pix_fmt": "yuv420p", "r_frame_rate": "30000/1001", "avg_frame_rate": "30000/1001",
         "duration": "4.004000", "bit_rate": "28979130", "nb_frames": "120",
         "disposition": {"default": 1, "attached_pic": 0}, "tags": {"language": "und"}},
        {"index": 2, "codec_name": "aac", "codec_type": "audio", "sample_rate": "48000",
         "channels": 2, "bit_rate": "128000", "r_frame_rate": "0/0", "avg_frame_rate": "0/0"}
      ],
      "format": {"duration": "4.010000", "size": "14529452", "bit_rate": "28986000"}
    }"#;

    #[test]
    fn reads_the_source() {
        let s = source(SOURCE.as_bytes()).unwrap();
        assert_eq!((s.width, s.height), (1920, 1080));
        assert_eq!((s.display_width, s.display_height), (1920, 1080));
        assert_eq!(s.frame_rate, "30000/1001");
        assert!((s.fps - 29.97).abs() < 0.01);
        assert_eq!(s.frames, Some(120));
        assert_eq!(s.duration_s, 4.004);
        assert!(s.has_audio);
        assert_eq!(
            s.video_codec, "h264",
            "the cover art stream is not the video"
        );
    }

    #[test]
    fn aspect_ratio_and_rotation_give_the_display_size() {
        let anamorphic = r#"{"streams":[{"codec_type":"video","width":720,"height":576,
            "sample_aspect_ratio":"16:11","avg_frame_rate":"25/1"}],"format":{"duration":"2.0"}}"#;
        let s = source(anamorphic.as_bytes()).unwrap();
        assert_eq!((s.display_width, s.display_height), (1047, 576));
        assert_eq!(
            s.duration_s, 2.0,
            "the container's duration when the stream has none"
        );
        assert!(!s.has_audio);

        let rotated = r#"{"streams":[{"codec_type":"video","width":1920,"height":1080,
            "avg_frame_rate":"0/0","r_frame_rate":"30/1",
            "side_data_list":[{"side_data_type":"Display Matrix","rotation":-90}]}]}"#;
        let s = source(rotated.as_bytes()).unwrap();
        assert_eq!((s.display_width, s.display_height), (1080, 1920));
        assert_eq!(s.rotation, -90);
        assert_eq!(s.frame_rate, "30/1", "r_frame_rate when avg is 0/0");
        assert_eq!(s.duration_s, 0.0);
    }

    #[test]
    fn sources_without_video_are_refused() {
        let audio_only = r#"{"streams":[{"codec_type":"audio","codec_name":"aac"}],"format":{}}"#;
        assert_eq!(
            source(audio_only.as_bytes()).unwrap_err(),
            "the input has no video stream"
        );
        let no_rate = r#"{"streams":[{"codec_type":"video","width":2,"height":2,"avg_frame_rate":"0/0","r_frame_rate":"0/0"}]}"#;
        assert!(
            source(no_rate.as_bytes())
                .unwrap_err()
                .contains("frame rate")
        );
        assert!(source(b"not json").unwrap_err().contains("ffprobe"));
    }

    #[test]
    fn reads_a_rendition() {
        let r = r#"{"streams":[
            {"codec_type":"video","codec_name":"hevc","codec_tag_string":"hvc1","profile":"Main",
             "pix_fmt":"yuv420p","width":854,"height":480,"r_frame_rate":"25/1","avg_frame_rate":"25/1",
             "duration":"5.000000","bit_rate":"812345","nb_frames":"125"},
            {"codec_type":"audio","codec_name":"aac","sample_rate":"48000","channels":1,"bit_rate":"69000"}],
            "format":{"bit_rate":"890000","size":"556250"}}"#;
        let f = facts(r.as_bytes()).unwrap();
        assert_eq!(f.codec, "hevc");
        assert_eq!(f.codec_tag, "hvc1");
        assert_eq!(f.profile, "Main");
        assert_eq!((f.width, f.height), (854, 480));
        assert_eq!(f.frame_rate, "25/1");
        assert_eq!(f.frames, Some(125));
        assert_eq!(f.duration_s, Some(5.0));
        assert_eq!(f.bitrate_bps, Some(812_345));
        assert_eq!(f.total_bitrate_bps, Some(890_000));
        let a = f.audio.unwrap();
        assert_eq!((a.codec.as_str(), a.channels), ("aac", Some(1)));
    }

    #[test]
    fn rationals() {
        assert_eq!(rational("30/1"), Some((30, 1)));
        assert_eq!(rational("25"), Some((25, 1)));
        assert_eq!(rational("0/0"), None);
        assert_eq!(rational("N/A"), None);
    }
}
