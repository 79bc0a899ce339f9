//! `transcode`: the Ferry function that turns one video into an adaptive-bitrate
//! ladder with a single decode (ffmpeg `split` feeding every rung), a cover JPEG and a
//! manifest (ffprobe facts, sha256, PSNR/SSIM against the source).
//!
//! The pure parts — request checking ([`request`]), ladder selection ([`ladder`]),
//! ffmpeg command lines and the parsers of what ffmpeg prints ([`ffmpeg`]), ffprobe's
//! JSON ([`probe`]) and the manifest ([`manifest`]) — are unit-tested; [`run`] drives
//! the processes. See README.md for the input fields.

pub mod fetch;
pub mod ffmpeg;
pub mod gpu;
pub mod hls;
pub mod ladder;
pub mod manifest;
pub mod parallel;
pub mod probe;
pub mod request;
pub mod run;
pub mod s3;

/// Runs one invocation body to its manifest (JSON bytes) or a one-line error.
pub fn handle(body: &[u8]) -> Result<Vec<u8>, String> {
    let job = request::parse(body)?;
    let manifest = run::run(&job).map_err(|e| format!("{e:#}"))?;
    serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())
}

/// Makes a message fit on one line (the platform reports the last stderr line).
pub fn one_line(msg: &str) -> String {
    msg.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn messages_become_one_line() {
        assert_eq!(super::one_line("a\nb\r\n\n c "), "a | b | c");
    }
}
