//! Segment-parallel encoding of long sources.
//!
//! A source longer than `segment_threshold_s` is cut at multiples of `segment_s` (a
//! multiple of the keyframe interval, so every cut is a keyframe time of the whole
//! ladder). Each segment is an ordinary invocation of this function (`segment` set:
//! video only, `-ss start -t length`, keyframes every interval from its start),
//! submitted as an async task through the platform's API, so other nodes encode them
//! while this invocation works too: it encodes segment 0 itself, then takes over
//! (cancels and encodes here) the highest-numbered segment still queued, and only waits
//! when every remaining segment is running elsewhere. The audio is encoded once, here;
//! each rung's segments are then joined without re-encoding (concat demuxer, `-c copy`)
//! and muxed with it. A segment task that fails is encoded here instead.
//!
//! The segments are written under the output directory (`.ferry-segments-<id>/`),
//! which must therefore be storage the nodes share (as any `file://` output is for
//! the caller), and removed at the end. An `s3://` output is staged in this node's
//! scratch, which other nodes cannot reach: such jobs encode in one pass.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::ffmpeg::{self, Span};
use crate::ladder::Planned;
use crate::manifest::Failed;
use crate::probe::Source;
use crate::request::{Job, SegmentSpec, multiple_of};
use crate::run::Ladder;

/// Where the platform's API is, from the environment the node agent gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Api {
    pub url: String,
    pub token: Option<String>,
    /// `name:version` of this function (its segments run the same version).
    pub function: String,
    pub request_id: String,
}

impl Api {
    /// `FERRY_API_URL`, `FERRY_API_TOKEN`, `FERRY_FUNCTION`, `FERRY_VERSION`,
    /// `FERRY_REQUEST_ID`; `None` without an API URL.
    pub fn from_env() -> Option<Api> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let url = var("FERRY_API_URL")?;
        let name = var("FERRY_FUNCTION").unwrap_or_else(|| "transcode".into());
        let function = match var("FERRY_VERSION").and_then(|v| v.parse::<u32>().ok()) {
            Some(v) if v > 0 => format!("{name}:{v}"),
            _ => name,
        };
        Some(Api {
            url,
            token: var("FERRY_API_TOKEN"),
            function,
            request_id: var("FERRY_REQUEST_ID").unwrap_or_else(|| std::process::id().to_string()),
        })
    }
}

/// Whether to encode segment-parallel: `Ok` with the API to use; `Err(None)` when
/// one pass is what the job wants; `Err(Some(why))` when it would split but cannot.
pub fn decide(job: &Job, source: &Source, api: Option<Api>) -> Result<Api, Option<String>> {
    if job.segment.is_some() || source.duration_s <= job.segment_threshold_s {
        return Err(None);
    }
    if source.duration_s <= job.segment_s {
        return Err(Some(format!(
            "the source ({:.1} s) is not longer than one segment ({} s)",
            source.duration_s, job.segment_s
        )));
    }
    if job.reproducible {
        return Err(Some(
            "reproducible mode encodes in one pass (segment boundaries change the bytes)".into(),
        ));
    }
    if matches!(job.output, crate::request::Output::S3(_)) {
        return Err(Some(
            "the output is an object store: segments need a directory the nodes share, so this node encodes in one pass".into(),
        ));
    }
    api.ok_or_else(|| {
        Some("FERRY_API_URL is not set: the node gives this function no API address".into())
    })
}

/// The segments of a source: `[k × segment_s, (k + 1) × segment_s)`, the last one to
/// the end.
pub fn split(duration_s: f64, segment_s: f64) -> Vec<SegmentSpec> {
    let n = ((duration_s / segment_s) - 1e-9).ceil().max(1.0) as u32;
    (0..n)
        .map(|i| SegmentSpec {
            index: i,
            start_s: f64::from(i) * segment_s,
            duration_s: (i + 1 < n).then_some(segment_s),
        })
        .collect()
}

/// The request of one segment: the job's own settings, video only, no extras.
pub fn child_request(job: &Job, input: &str, seg: &SegmentSpec, out: &Path) -> Value {
    json!({
        "input": input,
        "output": crate::manifest::file_url(out),
        "codec": job.codec.as_str(),
        "ladder": job.ladder,
        "preset": job.preset,
        "keyframe_interval_s": job.keyframe_interval_s,
        "reproducible": job.reproducible,
        "min_one_rendition": job.min_one_rendition,
        "fail_rung": job.fail_rung,
        "quality": false,
        "cover": false,
        "hls": false,
        "segment": seg,
    })
}

/// What the segments read: the URL as given, or the local file this invocation
/// downloaded it to (see [`crate::fetch`]).
fn child_input(job: &Job) -> String {
    match &job.input {
        crate::request::Input::File(p) => crate::manifest::file_url(p),
        crate::request::Input::Http(u) => u.clone(),
        crate::request::Input::S3(u) => u.to_string(),
    }
}

/// A concat demuxer list (`file '…'` lines, quotes escaped).
pub fn concat_list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| {
            format!(
                "file '{}'\n",
                f.display().to_string().replace('\'', "'\\''")
            )
        })
        .collect()
}

/// The whole source's first audio stream, encoded once.
pub fn audio_args(job: &Job, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-v", "error"]
        .map(String::from)
        .into();
    if job.input.is_network() {
        a.extend(["-rw_timeout".into(), "30000000".into()]);
    }
    a.extend(["-i".into(), job.input.ffmpeg_arg()]);
    a.extend(["-map", "0:a:0", "-vn", "-c:a", "aac", "-b:a"].map(String::from));
    a.push(format!("{}k", job.audio_bitrate_kbps));
    a.extend(["-f", "mp4"].map(String::from));
    a.push(out.display().to_string());
    a
}

/// Joins a rung's segments without re-encoding and muxes the audio in.
pub fn concat_args(list: &Path, audio: Option<&Path>, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-v", "error"]
        .map(String::from)
        .into();
    a.extend(["-f", "concat", "-safe", "0", "-i"].map(String::from));
    a.push(list.display().to_string());
    if let Some(audio) = audio {
        a.extend(["-i".into(), audio.display().to_string()]);
        a.extend(["-map", "0:v:0", "-map", "1:a:0"].map(String::from));
    } else {
        a.extend(["-map", "0:v:0"].map(String::from));
    }
    a.extend(["-c", "copy", "-movflags", "+faststart", "-f", "mp4"].map(String::from));
    a.push(out.display().to_string());
    a
}

/// How each segment was made (the manifest's `segmented.segments`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SegmentDone {
    pub index: u32,
    pub start_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// `task` (an async task, on whichever node ran it) or `here`.
    pub ran: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Why a segment submitted as a task was encoded here after all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_back: Option<String>,
}

/// The manifest's `segmented` section.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub threshold_s: f64,
    pub segment_s: f64,
    pub segments: Vec<SegmentDone>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_command: Option<String>,
}

/// One segment's answer: which rungs it made (paths) and which failed (why).
struct Made {
    files: Vec<(String, PathBuf)>,
    failed: Vec<(String, String, String)>,
    command: String,
}

fn made_from_manifest(m: &Value) -> anyhow::Result<Made> {
    let list = |k: &str| m[k].as_array().cloned().unwrap_or_default();
    let files = list("renditions")
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or_default().to_string();
            let path = PathBuf::from(r["path"].as_str().unwrap_or_default());
            (name, path)
        })
        .collect();
    let failed = list("failed")
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
            (s("name"), s("reason"), s("ffmpeg_command"))
        })
        .collect();
    let command = m["ffmpeg_command"]
        .as_str()
        .ok_or_else(|| anyhow!("the segment's answer is not a transcode manifest"))?
        .to_string();
    Ok(Made {
        files,
        failed,
        command,
    })
}

/// Removes the work folder when dropped.
struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Cancels the submitted segment tasks when the segment-parallel run gives up (an
/// error return), so none keeps a node busy for nothing; disarmed on success.
struct Outstanding<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a ferry_sdk::client::Client,
    ids: Vec<String>,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            // Best effort: a finished task cannot be cancelled and says so.
            let _ = self.rt.block_on(self.client.cancel(id));
        }
    }
}

/// Encodes one segment in this process (the same code path a task runs).
fn encode_here(job: &Job, seg: &SegmentSpec, out: &Path, span: Span) -> anyhow::Result<Made> {
    let body = serde_json::to_vec(&child_request(job, &child_input(job), seg, out))?;
    let child = crate::request::parse(&body).map_err(|e| anyhow!("{e}"))?;
    let m = crate::run::nested(span, || crate::run::run(&child))
        .with_context(|| format!("encode segment {}", seg.index))?;
    made_from_manifest(&serde_json::to_value(&m)?)
}

/// The segment-parallel ladder.
pub(crate) fn run(
    job: &Job,
    source: &Source,
    rungs: &[Planned],
    api: &Api,
    span: Span,
) -> anyhow::Result<(Ladder, Report)> {
    if !multiple_of(job.segment_s, job.keyframe_interval_s) {
        bail!("segment_s is not a multiple of the keyframe interval");
    }
    let dir = &job.output_dir;
    let safe: String = api
        .request_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    let work = Work(dir.join(format!(".ferry-segments-{safe}")));
    std::fs::create_dir_all(&work.0).with_context(|| format!("create {}", work.0.display()))?;
    // A downloaded input sits in this node's scratch directory: the segment tasks on
    // other nodes read a copy in the shared work folder instead of downloading again.
    let shared_job;
    let job = match &job.input {
        crate::request::Input::File(p) if !job.input_url.starts_with("file:") => {
            let copy = work.0.join("input");
            if std::fs::hard_link(p, &copy).is_err() {
                std::fs::copy(p, &copy)
                    .with_context(|| format!("copy the downloaded input to {}", copy.display()))?;
            }
            shared_job = Job {
                input: crate::request::Input::File(copy),
                ..job.clone()
            };
            &shared_job
        }
        _ => job,
    };
    let specs = split(source.duration_s, job.segment_s);
    let n = specs.len();
    eprintln!(
        "transcode: {:.1} s source: {n} segments of {} s, through {}",
        source.duration_s, job.segment_s, api.url
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start an async runtime")?;
    let client = ferry_sdk::client::Client::new(api.url.clone(), api.token.clone());
    let deadline = Instant::now() + Duration::from_secs(3600);

    // Every segment but the first is offered to the cluster.
    let mut done: Vec<Option<(SegmentDone, Made)>> = (0..n).map(|_| None).collect();
    let mut remote: Vec<Option<String>> = vec![None; n];
    let mut here: Vec<(usize, Option<String>)> = vec![(0, None)];
    for (i, seg) in specs.iter().enumerate().skip(1) {
        let body = serde_json::to_vec(&child_request(
            job,
            &child_input(job),
            seg,
            &work.0.join(format!("r{i}")),
        ))?;
        let opts = ferry_sdk::client::SubmitOptions::default();
        match rt.block_on(client.submit(&api.function, body, &opts)) {
            Ok(id) => remote[i] = Some(id),
            Err(e) => here.push((i, Some(format!("could not submit it: {e}")))),
        }
    }
    let mut outstanding = Outstanding {
        rt: &rt,
        client: &client,
        ids: remote.iter().flatten().cloned().collect(),
    };

    // The audio, once, for the whole file.
    let audio_path = work.0.join("audio.m4a");
    let audio_command = if source.has_audio {
        let args = audio_args(job, &audio_path);
        let ran = crate::run::capture_args(&args)?;
        if !ran.0 {
            bail!("audio encode failed: {}", ran.1);
        }
        Some(ffmpeg::shell_line(&args))
    } else {
        None
    };

    let share = |k: usize| Span {
        from: span.at(k as f64 / n as f64 * 100.0),
        to: span.at((k + 1) as f64 / n as f64 * 100.0),
    };
    // Bounded: each round encodes a segment here, takes one back, or waits one out.
    for _round in 0..(3 * n + 3) {
        let finished = done.iter().filter(|d| d.is_some()).count();
        if finished == n {
            break;
        }
        if let Some((i, taken_back)) = here.pop() {
            let seg = &specs[i];
            let made = encode_here(job, seg, &work.0.join(format!("l{i}")), share(finished))?;
            done[i] = Some((
                SegmentDone {
                    index: seg.index,
                    start_s: seg.start_s,
                    duration_s: seg.duration_s,
                    ran: "here",
                    task_id: remote[i].take(),
                    taken_back,
                },
                made,
            ));
            continue;
        }
        // Take back the last segment nobody has started.
        let mut took = false;
        for i in (0..n).rev() {
            let Some(id) = remote[i].clone().filter(|_| done[i].is_none()) else {
                continue;
            };
            let t = rt.block_on(client.task(&id)).map_err(|e| anyhow!("{e}"))?;
            if t["state"] == "queued" {
                let c = rt
                    .block_on(client.cancel(&id))
                    .map_err(|e| anyhow!("{e}"))?;
                if c["state"] == "cancelled" {
                    here.push((i, Some("still queued when this invocation was free".into())));
                    took = true;
                    break;
                }
            }
        }
        if took {
            continue;
        }
        // Everything left runs elsewhere: wait for the first of them.
        let Some(i) = (0..n).find(|i| done[*i].is_none() && remote[*i].is_some()) else {
            bail!("segments left with nobody to encode them");
        };
        let id = remote[i].clone().unwrap_or_default();
        let left = deadline.saturating_duration_since(Instant::now());
        let t = rt
            .block_on(client.wait(&id, left))
            .map_err(|e| anyhow!("{e}"))?;
        let state = t["state"].as_str().unwrap_or_default().to_string();
        match (state.as_str(), made_from_manifest(&t["output"])) {
            ("succeeded", Ok(made)) => {
                let seg = &specs[i];
                done[i] = Some((
                    SegmentDone {
                        index: seg.index,
                        start_s: seg.start_s,
                        duration_s: seg.duration_s,
                        ran: "task",
                        task_id: Some(id),
                        taken_back: None,
                    },
                    made,
                ));
            }
            (other, _) => {
                let why = t["error"].as_str().unwrap_or_default();
                here.push((i, Some(format!("its task ended {other}: {why}"))));
            }
        }
    }
    let mut segs = vec![];
    let mut made = vec![];
    for d in done {
        let (s, m) = d.ok_or_else(|| anyhow!("a segment was never encoded"))?;
        segs.push(s);
        made.push(m);
    }
    // Every segment is in: nothing left to cancel.
    outstanding.ids.clear();

    // Each rung: joined when every segment made it.
    let mut encoded = vec![];
    let mut failures = vec![];
    for r in rungs {
        let mut files = vec![];
        let mut missing = None;
        for (k, m) in made.iter().enumerate() {
            match m.files.iter().find(|(name, _)| *name == r.name) {
                Some((_, p)) => files.push(p.clone()),
                None => {
                    let (why, cmd) = m
                        .failed
                        .iter()
                        .find(|f| f.0 == r.name)
                        .map(|f| (f.1.clone(), f.2.clone()))
                        .unwrap_or_else(|| ("not made".into(), m.command.clone()));
                    missing = Some((format!("segment {k}: {why}"), cmd));
                    break;
                }
            }
        }
        if let Some((why, cmd)) = missing {
            failures.push(Failed {
                name: r.name.clone(),
                width: r.width,
                height: r.height,
                target_bitrate_kbps: r.bitrate_kbps,
                reason: why,
                ffmpeg_command: cmd,
            });
            continue;
        }
        let list = work.0.join(format!("{}.txt", r.name));
        std::fs::write(&list, concat_list(&files))
            .with_context(|| format!("write {}", list.display()))?;
        let out = ffmpeg::rendition_path(dir, &r.name);
        let args = concat_args(
            &list,
            audio_command.as_ref().map(|_| audio_path.as_path()),
            &out,
        );
        let line = ffmpeg::shell_line(&args);
        let ran = crate::run::capture_args(&args)?;
        if ran.0 {
            encoded.push((r.clone(), "segments", Some(line)));
        } else {
            let _ = std::fs::remove_file(&out);
            failures.push(Failed {
                name: r.name.clone(),
                width: r.width,
                height: r.height,
                target_bitrate_kbps: r.bitrate_kbps,
                reason: format!("joining the segments failed: {}", ran.1),
                ffmpeg_command: line,
            });
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let set = ffmpeg::Settings::new(job, source, cores);
    let accel = crate::gpu::Plan::cpu(
        job.codec,
        vec![],
        "segment-parallel: each segment chose its own path",
    );
    Ok((
        Ladder {
            encoded,
            failures,
            ffmpeg_command: made.first().map(|m| m.command.clone()).unwrap_or_default(),
            ladder_error: None,
            accel,
            set,
            ladder_ms: 0,
            retries_ms: 0,
        },
        Report {
            threshold_s: job.segment_threshold_s,
            segment_s: job.segment_s,
            segments: segs,
            audio_command,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> Job {
        crate::request::parse(
            format!(r#"{{"input":"file:///in.mp4","output":"file:///out/"{extra}}}"#).as_bytes(),
        )
        .unwrap()
    }

    fn source(duration_s: f64) -> Source {
        Source {
            video_codec: "h264".into(),
            width: 1280,
            height: 720,
            display_width: 1280,
            display_height: 720,
            pix_fmt: "yuv420p".into(),
            frame_rate: "25/1".into(),
            fps: 25.0,
            frames: None,
            duration_s,
            has_audio: true,
            rotation: 0,
        }
    }

    fn api() -> Option<Api> {
        Some(Api {
            url: "http://127.0.0.1:7070".into(),
            token: Some("t".into()),
            function: "transcode:3".into(),
            request_id: "r1".into(),
        })
    }

    #[test]
    fn long_sources_split_when_an_api_is_given() {
        let j = job("");
        assert_eq!(decide(&j, &source(120.0), api()), Ok(api().unwrap()));
        assert_eq!(
            decide(&j, &source(60.0), api()),
            Err(None),
            "at the threshold"
        );
        let why = decide(&j, &source(120.0), None).unwrap_err().unwrap();
        assert!(why.contains("FERRY_API_URL"), "{why}");
        let why = decide(&job(r#","reproducible":true"#), &source(120.0), api())
            .unwrap_err()
            .unwrap();
        assert!(why.contains("reproducible"));
        // An object-store output is staged in this node's scratch: one pass.
        let s3 = crate::request::parse(
            br#"{"input":"s3://media-in/a.mp4","output":"s3://media-out/jobs/1/"}"#,
        )
        .unwrap();
        let why = decide(&s3, &source(120.0), api()).unwrap_err().unwrap();
        assert!(why.contains("object store"), "{why}");
        // An s3:// input with a shared directory output still splits.
        let s3_in =
            crate::request::parse(br#"{"input":"s3://media-in/a.mp4","output":"file:///out/"}"#)
                .unwrap();
        assert!(decide(&s3_in, &source(120.0), api()).is_ok());
        // A lowered threshold, a source shorter than a segment.
        let j = job(r#","segment_threshold_s":5,"segment_s":10"#);
        assert!(decide(&j, &source(8.0), api()).unwrap_err().is_some());
        assert!(decide(&j, &source(12.0), api()).is_ok());
        // A segment never splits again.
        let j = job(r#","segment_threshold_s":5,"segment":{"index":0,"start_s":0,"duration_s":4}"#);
        assert_eq!(decide(&j, &source(12.0), api()), Err(None));
    }

    #[test]
    fn segments_cut_at_multiples_of_the_segment_length() {
        let s = split(125.0, 30.0);
        let starts: Vec<f64> = s.iter().map(|x| x.start_s).collect();
        assert_eq!(starts, vec![0.0, 30.0, 60.0, 90.0, 120.0]);
        assert!(s[..4].iter().all(|x| x.duration_s == Some(30.0)));
        assert_eq!(s[4].duration_s, None, "the last runs to the end");
        assert_eq!(split(120.0, 30.0).len(), 4, "no empty tail");
        assert_eq!(split(10.0, 30.0).len(), 1);
        assert_eq!(split(120.000001, 30.0).len(), 5);
    }

    #[test]
    fn a_segment_request_is_the_job_without_extras() {
        let j = job(r#","codec":"h264","preset":"veryfast","hls":true,"fail_rung":"720p""#);
        let seg = SegmentSpec {
            index: 2,
            start_s: 60.0,
            duration_s: Some(30.0),
        };
        let v = child_request(&j, "file:///in.mp4", &seg, Path::new("/out/.w/r2"));
        assert_eq!(v["input"], "file:///in.mp4");
        assert_eq!(v["output"], "file:///out/.w/r2");
        assert_eq!(
            v["segment"],
            json!({"index": 2, "start_s": 60.0, "duration_s": 30.0})
        );
        assert_eq!(
            (v["hls"].clone(), v["quality"].clone(), v["cover"].clone()),
            (json!(false), json!(false), json!(false))
        );
        assert_eq!(v["fail_rung"], "720p");
        // It parses back into a job of the same ladder.
        let back = crate::request::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(back.ladder, j.ladder);
        assert_eq!(back.preset, "veryfast");
        assert_eq!(back.segment, Some(seg));
    }

    #[test]
    fn concat_and_audio_commands() {
        let list = concat_list(&[
            PathBuf::from("/w/l0/480p.mp4"),
            PathBuf::from("/w/it's/480p.mp4"),
        ]);
        assert_eq!(list, "file '/w/l0/480p.mp4'\nfile '/w/it'\\''s/480p.mp4'\n");
        let a = concat_args(
            Path::new("/w/480p.txt"),
            Some(Path::new("/w/audio.m4a")),
            Path::new("/o/480p.mp4"),
        );
        assert_eq!(
            a.join(" "),
            "ffmpeg -hide_banner -nostdin -y -v error -f concat -safe 0 -i /w/480p.txt -i /w/audio.m4a -map 0:v:0 -map 1:a:0 -c copy -movflags +faststart -f mp4 /o/480p.mp4"
        );
        let a = audio_args(
            &job(r#","audio_bitrate_kbps":96"#),
            Path::new("/w/audio.m4a"),
        );
        assert!(
            a.join(" ")
                .contains("-i /in.mp4 -map 0:a:0 -vn -c:a aac -b:a 96k")
        );
    }
}
