//! Where the ladder is decoded, scaled and encoded: on the CPU, or on an NVIDIA GPU
//! the node made visible to this invocation.
//!
//! The node agent chooses GPUs and sets `CUDA_VISIBLE_DEVICES` /
//! `NVIDIA_VISIBLE_DEVICES`; this function only reads them. When one names a GPU, a
//! one-frame probe finds out what works (an NVENC encode from lavfi for each codec, a
//! CUDA hwaccel decode followed by `scale_cuda`), once per process. The choice
//! ([`choose`]) is pure:
//!
//! * NVENC for the requested codec works → **nvenc**: the GPU encodes; it also decodes
//!   and scales (`-hwaccel cuda`, `scale_cuda`) when that works and the source allows.
//! * no NVENC but CUDA decode + `scale_cuda` work (H100/H200: NVDEC, no NVENC) →
//!   **nvdec**: decode and scale on the GPU, download, encode with x265/x264.
//! * otherwise → **cpu**. Reproducible mode is always cpu (GPU encoders are not
//!   bit-exact across drivers and cards).

use std::path::Path;
use std::process::{Command, Stdio};

use serde::Serialize;

use crate::probe::Source;
use crate::request::Codec;

/// The GPUs the environment makes visible: `CUDA_VISIBLE_DEVICES` when set (a
/// comma-separated list; empty, `-1`, `none` or `void` mean none), else
/// `NVIDIA_VISIBLE_DEVICES` (`all` or a list; `none`, `void` or empty mean none).
pub fn visible_gpus(cuda: Option<&str>, nvidia: Option<&str>) -> Vec<String> {
    let list = |v: &str| -> Vec<String> {
        let v = v.trim();
        if v.is_empty() || ["none", "void", "-1", "NoDevFiles"].contains(&v) {
            return vec![];
        }
        v.split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            // CUDA stops at the first invalid (negative) index.
            .take_while(|d| !d.starts_with('-'))
            .map(String::from)
            .collect()
    };
    match cuda {
        Some(c) => list(c),
        None => nvidia.map(list).unwrap_or_default(),
    }
}

/// What the one-frame probe found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Found {
    pub hevc_nvenc: bool,
    pub h264_nvenc: bool,
    /// A CUDA hwaccel decode followed by `scale_cuda` worked.
    pub cuda_decode: bool,
}

/// Where each stage runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Cpu,
    Nvdec,
    Nvenc,
}

/// The choice, recorded in the manifest as `acceleration`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub path: Accel,
    /// `cpu` or `cuda`: where the source is decoded and scaled.
    pub decode: &'static str,
    /// The video encoder of every rung.
    pub encoder: &'static str,
    pub gpus: Vec<String>,
    pub reason: String,
    /// What the probe found (absent when no GPU was visible or nothing was probed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<Found>,
    /// Set when the GPU run failed and the ladder was made on the CPU instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_error: Option<String>,
}

impl Plan {
    /// The CPU plan.
    pub fn cpu(codec: Codec, gpus: Vec<String>, reason: impl Into<String>) -> Self {
        Self {
            path: Accel::Cpu,
            decode: "cpu",
            encoder: cpu_encoder(codec),
            gpus,
            reason: reason.into(),
            found: None,
            fallback_error: None,
        }
    }

    pub fn cuda_decode(&self) -> bool {
        self.decode == "cuda"
    }

    pub fn nvenc(&self) -> bool {
        self.path == Accel::Nvenc
    }
}

pub fn cpu_encoder(codec: Codec) -> &'static str {
    match codec {
        Codec::H265 => "libx265",
        Codec::H264 => "libx264",
    }
}

pub fn nvenc_encoder(codec: Codec) -> &'static str {
    match codec {
        Codec::H265 => "hevc_nvenc",
        Codec::H264 => "h264_nvenc",
    }
}

/// Codecs NVDEC decodes on every card that has one.
const NVDEC_CODECS: &[&str] = &["h264", "hevc", "vp9", "av1", "mpeg2video", "mpeg4", "vc1"];

/// Whether the source can be decoded and scaled on the GPU: an NVDEC codec, 8-bit
/// 4:2:0, no rotation (ffmpeg's automatic rotation is a CPU filter).
pub fn source_fits_gpu(source: &Source) -> Result<(), String> {
    if !NVDEC_CODECS.contains(&source.video_codec.as_str()) {
        return Err(format!("NVDEC does not decode {}", source.video_codec));
    }
    if !["yuv420p", "yuvj420p", "nv12"].contains(&source.pix_fmt.as_str()) {
        return Err(format!(
            "{} is not 8-bit 4:2:0 (GPU scaling path)",
            source.pix_fmt
        ));
    }
    if source.rotation != 0 {
        return Err("rotated sources are turned on the CPU".into());
    }
    Ok(())
}

/// The choice (pure). `found` is `None` when nothing was probed.
pub fn choose(
    gpus: &[String],
    found: Option<&Found>,
    codec: Codec,
    reproducible: bool,
    source: &Source,
) -> Plan {
    let gpus_v = gpus.to_vec();
    if gpus.is_empty() {
        return Plan::cpu(codec, gpus_v, "no GPU visible");
    }
    if reproducible {
        return Plan::cpu(
            codec,
            gpus_v,
            "reproducible mode encodes on the CPU (GPU output is not bit-exact)",
        );
    }
    let Some(found) = found else {
        return Plan::cpu(codec, gpus_v, "GPU visible but not probed");
    };
    let nvenc = match codec {
        Codec::H265 => found.hevc_nvenc,
        Codec::H264 => found.h264_nvenc,
    };
    let fits = source_fits_gpu(source);
    let gpu_decode = found.cuda_decode && fits.is_ok();
    let why_not_decode = if !found.cuda_decode {
        "CUDA decode did not work".to_string()
    } else {
        fits.clone().err().unwrap_or_default()
    };
    let mut plan = if nvenc {
        Plan {
            path: Accel::Nvenc,
            decode: if gpu_decode { "cuda" } else { "cpu" },
            encoder: nvenc_encoder(codec),
            gpus: gpus_v,
            reason: if gpu_decode {
                "NVENC present: decode, scale and encode on the GPU".into()
            } else {
                format!("NVENC present: encode on the GPU, decode on the CPU ({why_not_decode})")
            },
            found: None,
            fallback_error: None,
        }
    } else if gpu_decode {
        Plan {
            path: Accel::Nvdec,
            decode: "cuda",
            encoder: cpu_encoder(codec),
            gpus: gpus_v,
            reason: format!(
                "no {} on this GPU: decode and scale with NVDEC/CUDA, encode on the CPU",
                nvenc_encoder(codec)
            ),
            found: None,
            fallback_error: None,
        }
    } else {
        Plan::cpu(
            codec,
            gpus_v,
            format!(
                "GPU visible but neither {} nor GPU decoding is usable ({why_not_decode})",
                nvenc_encoder(codec)
            ),
        )
    };
    plan.found = Some(found.clone());
    plan
}

/// Runs a probe command; true when it exits 0 (within the time the platform gives).
fn works(args: &[&str], dir: &Path) -> bool {
    let Some((prog, rest)) = args.split_first() else {
        return false;
    };
    Command::new(prog)
        .args(rest)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The one-frame probe commands: (what, args).
pub fn probe_commands(sample: &str) -> Vec<(&'static str, Vec<String>)> {
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y"]
            .map(String::from)
            .into();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let lavfi = [
        "-f",
        "lavfi",
        "-i",
        "color=size=256x144:rate=25",
        "-frames:v",
        "1",
    ];
    let nvenc = |enc: &'static str| {
        let mut a = base(&lavfi);
        a.extend(["-c:v", enc, "-f", "null", "-"].map(String::from));
        a
    };
    let mut make = base(&lavfi);
    make.extend(
        [
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", sample,
        ]
        .map(String::from),
    );
    let mut decode = base(&["-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-i"]);
    decode.push(sample.to_string());
    decode.extend(
        [
            "-vf",
            "scale_cuda=128:72:format=nv12,hwdownload,format=nv12",
            "-f",
            "null",
            "-",
        ]
        .map(String::from),
    );
    vec![
        ("hevc_nvenc", nvenc("hevc_nvenc")),
        ("h264_nvenc", nvenc("h264_nvenc")),
        ("sample", make),
        ("cuda_decode", decode),
    ]
}

/// Probes the GPU once per process (in `dir`, a scratch folder).
pub fn probe(dir: &Path) -> Found {
    static FOUND: std::sync::OnceLock<Found> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let sample = dir.join("ferry-gpu-probe.mp4");
            let mut f = Found::default();
            for (what, args) in probe_commands(&sample.display().to_string()) {
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let ok = works(&argv, dir);
                match what {
                    "hevc_nvenc" => f.hevc_nvenc = ok,
                    "h264_nvenc" => f.h264_nvenc = ok,
                    "sample" if !ok => break,
                    "cuda_decode" => f.cuda_decode = ok,
                    _ => {}
                }
            }
            let _ = std::fs::remove_file(&sample);
            f
        })
        .clone()
}

/// The plan for this invocation: reads the environment, probes only when a GPU is
/// visible.
pub fn plan_for(codec: Codec, reproducible: bool, source: &Source, dir: &Path) -> Plan {
    let cuda = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let nvidia = std::env::var("NVIDIA_VISIBLE_DEVICES").ok();
    let gpus = visible_gpus(cuda.as_deref(), nvidia.as_deref());
    let found = (!gpus.is_empty() && !reproducible).then(|| probe(dir));
    choose(&gpus, found.as_ref(), codec, reproducible, source)
}

/// NVENC's preset for an x264/x265 preset name.
pub fn nvenc_preset(preset: &str) -> &'static str {
    match preset {
        "ultrafast" | "superfast" => "p1",
        "veryfast" => "p2",
        "faster" => "p3",
        "fast" => "p4",
        "medium" => "p5",
        "slow" => "p6",
        _ => "p7",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(codec: &str, pix: &str, rotation: i64) -> Source {
        Source {
            video_codec: codec.into(),
            width: 1920,
            height: 1080,
            display_width: 1920,
            display_height: 1080,
            pix_fmt: pix.into(),
            frame_rate: "25/1".into(),
            fps: 25.0,
            frames: Some(125),
            duration_s: 5.0,
            has_audio: true,
            rotation,
        }
    }

    fn gpus(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    const ALL: Found = Found {
        hevc_nvenc: true,
        h264_nvenc: true,
        cuda_decode: true,
    };
    /// H100/H200: NVDEC and CUDA, no NVENC.
    const DECODE_ONLY: Found = Found {
        hevc_nvenc: false,
        h264_nvenc: false,
        cuda_decode: true,
    };

    #[test]
    fn the_environment_names_the_gpus() {
        assert!(visible_gpus(None, None).is_empty());
        assert_eq!(visible_gpus(Some("0,1"), None), gpus(&["0", "1"]));
        assert_eq!(
            visible_gpus(Some("GPU-8a3c"), Some("all")),
            gpus(&["GPU-8a3c"])
        );
        assert!(visible_gpus(Some(""), Some("all")).is_empty(), "CUDA wins");
        assert!(visible_gpus(Some("-1"), None).is_empty());
        assert_eq!(visible_gpus(Some("2,-1,3"), None), gpus(&["2"]));
        assert_eq!(visible_gpus(None, Some("all")), gpus(&["all"]));
        assert!(visible_gpus(None, Some("void")).is_empty());
        assert!(visible_gpus(None, Some("none")).is_empty());
    }

    #[test]
    fn no_gpu_means_the_cpu_plan() {
        let s = src("h264", "yuv420p", 0);
        for codec in [Codec::H265, Codec::H264] {
            // Even if a probe had found everything, no visible GPU means CPU.
            let p = choose(&[], Some(&ALL), codec, false, &s);
            assert_eq!(p.path, Accel::Cpu);
            assert_eq!(p.decode, "cpu");
            assert_eq!(p.encoder, cpu_encoder(codec));
            assert_eq!(p.reason, "no GPU visible");
            assert_eq!(p.found, None);
        }
        // And in this test process (no GPU env set by cargo), the real entry point.
        if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none()
            && std::env::var_os("NVIDIA_VISIBLE_DEVICES").is_none()
        {
            let p = plan_for(Codec::H265, false, &s, Path::new("/nonexistent"));
            assert_eq!(p, Plan::cpu(Codec::H265, vec![], "no GPU visible"));
        }
    }

    #[test]
    fn nvenc_when_present() {
        let s = src("h264", "yuv420p", 0);
        let p = choose(&gpus(&["0"]), Some(&ALL), Codec::H265, false, &s);
        assert_eq!(
            (p.path, p.decode, p.encoder),
            (Accel::Nvenc, "cuda", "hevc_nvenc")
        );
        assert_eq!(p.found, Some(ALL));
        let p = choose(&gpus(&["0"]), Some(&ALL), Codec::H264, false, &s);
        assert_eq!(p.encoder, "h264_nvenc");
        // Only the other codec's NVENC: not usable for this one.
        let only264 = Found {
            hevc_nvenc: false,
            h264_nvenc: true,
            cuda_decode: false,
        };
        let p = choose(&gpus(&["0"]), Some(&only264), Codec::H265, false, &s);
        assert_eq!(p.path, Accel::Cpu);
        let p = choose(&gpus(&["0"]), Some(&only264), Codec::H264, false, &s);
        assert_eq!((p.path, p.decode), (Accel::Nvenc, "cpu"));
        assert!(
            p.reason.contains("CUDA decode did not work"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn decoders_only_means_gpu_decode_and_cpu_encode() {
        let s = src("hevc", "yuv420p", 0);
        for codec in [Codec::H265, Codec::H264] {
            let p = choose(&gpus(&["0"]), Some(&DECODE_ONLY), codec, false, &s);
            assert_eq!(p.path, Accel::Nvdec);
            assert_eq!(p.decode, "cuda");
            assert_eq!(p.encoder, cpu_encoder(codec));
        }
    }

    #[test]
    fn sources_the_gpu_cannot_take_stay_on_the_cpu() {
        for (s, why) in [
            (src("prores", "yuv422p10le", 0), "NVDEC does not decode"),
            (src("hevc", "yuv420p10le", 0), "not 8-bit"),
            (src("h264", "yuv420p", 90), "rotated"),
        ] {
            let p = choose(&gpus(&["0"]), Some(&DECODE_ONLY), Codec::H265, false, &s);
            assert_eq!(p.path, Accel::Cpu, "{why}");
            assert!(p.reason.contains(why), "{}", p.reason);
            // With NVENC, the GPU still encodes what the CPU decoded.
            let p = choose(&gpus(&["0"]), Some(&ALL), Codec::H265, false, &s);
            assert_eq!((p.path, p.decode), (Accel::Nvenc, "cpu"), "{why}");
        }
    }

    #[test]
    fn reproducible_or_unprobed_or_nothing_found_is_cpu() {
        let s = src("h264", "yuv420p", 0);
        let p = choose(&gpus(&["0"]), Some(&ALL), Codec::H265, true, &s);
        assert_eq!(p.path, Accel::Cpu);
        assert!(p.reason.contains("reproducible"));
        let p = choose(&gpus(&["0"]), None, Codec::H265, false, &s);
        assert_eq!(p.path, Accel::Cpu);
        let p = choose(
            &gpus(&["0"]),
            Some(&Found::default()),
            Codec::H265,
            false,
            &s,
        );
        assert_eq!(p.path, Accel::Cpu);
        assert_eq!(
            p.found,
            Some(Found::default()),
            "what was probed is recorded"
        );
    }

    #[test]
    fn probe_commands_are_one_frame() {
        let c = probe_commands("/s/p.mp4");
        let names: Vec<&str> = c.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["hevc_nvenc", "h264_nvenc", "sample", "cuda_decode"]);
        for (_, a) in &c[..3] {
            assert!(a.join(" ").contains("-frames:v 1"));
        }
        let d = c[3].1.join(" ");
        assert!(
            d.contains("-hwaccel cuda -hwaccel_output_format cuda -i /s/p.mp4"),
            "{d}"
        );
        assert!(d.contains("scale_cuda="), "{d}");
        assert_eq!(nvenc_preset("medium"), "p5");
        assert_eq!(nvenc_preset("placebo"), "p7");
    }
}
