//! Progress reported by native functions.
//!
//! The contract: a native function writes lines on **stderr** of the form
//!
//! ```text
//! ferry-progress: <percent 0-100, a decimal> <free text, e.g. fps=118.3 speed=3.9x>
//! ```
//!
//! The runtime reads them while the process runs, sends them to the invocation's
//! [`Request::progress`](crate::Request) channel (at most one every
//! [`MIN_INTERVAL`], the latest one always delivered at the end), and keeps them out of
//! the log tail. A line that starts with the prefix but whose percent does not parse is
//! an ordinary log line.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::tail::Tail;

/// The prefix of a progress line.
pub const PREFIX: &str = "ferry-progress:";
/// At most one progress report per this interval (~4 a second).
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// A stderr line longer than this is never a progress line: it goes to the log as it
/// arrives instead of being held whole.
const MAX_PROGRESS_LINE: usize = 1024;

/// One progress report of a running invocation.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// 0 to 100.
    pub percent: f32,
    /// The function's free text (`fps=118.3 speed=3.9x`), possibly empty.
    pub message: String,
}

/// Parses one line (without its newline) of the contract above.
pub fn parse_line(line: &str) -> Option<Progress> {
    let rest = line
        .trim_end_matches('\r')
        .strip_prefix(PREFIX)?
        .trim_start();
    let (pct, message) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let percent: f32 = pct.parse().ok().filter(|p: &f32| p.is_finite())?;
    Some(Progress {
        percent: percent.clamp(0.0, 100.0),
        message: message.trim().to_string(),
    })
}

/// Splits a native function's stderr into log bytes (to the tail) and progress
/// reports (to the channel, throttled).
pub(crate) struct Splitter {
    tx: Option<UnboundedSender<Progress>>,
    /// The current line, while it may still be a progress line.
    line: Vec<u8>,
    /// The current line is ordinary and already (partly) in the tail.
    passthrough: bool,
    last_sent: Option<Instant>,
    /// A report held back by the throttle, sent at the next chance or at the end.
    held: Option<Progress>,
}

impl Splitter {
    pub(crate) fn new(tx: Option<UnboundedSender<Progress>>) -> Self {
        Self {
            tx,
            line: Vec::new(),
            passthrough: false,
            last_sent: None,
            held: None,
        }
    }

    /// Takes a chunk of stderr read at `now`.
    pub(crate) fn push(&mut self, bytes: &[u8], tail: &mut Tail, now: Instant) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (part, newline) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..=i], true),
                None => (rest, false),
            };
            rest = &rest[part.len()..];
            if self.passthrough {
                tail.push(part);
            } else {
                self.line.extend_from_slice(part);
                // Not (or no longer) a candidate: it goes to the log as it is.
                let n = self.line.len().min(PREFIX.len());
                if self.line[..n] != PREFIX.as_bytes()[..n] || self.line.len() > MAX_PROGRESS_LINE {
                    tail.push(&self.line);
                    self.line.clear();
                    self.passthrough = !newline;
                    continue;
                }
                if newline {
                    self.finish_line(tail, now);
                }
            }
            if newline {
                self.passthrough = false;
            }
        }
    }

    /// A complete candidate line is in `self.line` (with its newline, if any).
    fn finish_line(&mut self, tail: &mut Tail, now: Instant) {
        let text = String::from_utf8_lossy(&self.line);
        match parse_line(text.trim_end_matches('\n')) {
            Some(p) => self.report(p, now),
            None => tail.push(&self.line),
        }
        self.line.clear();
    }

    fn report(&mut self, p: Progress, now: Instant) {
        let due = self
            .last_sent
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_INTERVAL);
        if due {
            self.held = None;
            self.send(p);
            self.last_sent = Some(now);
        } else {
            self.held = Some(p);
        }
    }

    fn send(&self, p: Progress) {
        if let Some(tx) = &self.tx {
            // The receiver may be gone (nobody listens any more): not an error.
            let _ = tx.send(p);
        }
    }

    /// The stream ended: a last unterminated line is handled, a held report sent.
    pub(crate) fn finish(&mut self, tail: &mut Tail, now: Instant) {
        if !self.line.is_empty() {
            self.finish_line(tail, now);
        }
        if let Some(p) = self.held.take() {
            self.send(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_or_not() {
        assert_eq!(
            parse_line("ferry-progress: 42.5 fps=118.3 speed=3.9x"),
            Some(Progress {
                percent: 42.5,
                message: "fps=118.3 speed=3.9x".into()
            })
        );
        assert_eq!(
            parse_line("ferry-progress:7\r"),
            Some(Progress {
                percent: 7.0,
                message: String::new()
            })
        );
        assert_eq!(parse_line("ferry-progress: 250 x").unwrap().percent, 100.0);
        assert_eq!(parse_line("ferry-progress: -3 x").unwrap().percent, 0.0);
        assert_eq!(parse_line("ferry-progress: NaN x"), None);
        assert_eq!(parse_line("ferry-progress: half done"), None);
        assert_eq!(parse_line("progress: 42"), None);
        assert_eq!(parse_line(" ferry-progress: 42"), None);
    }

    fn split(chunks: &[&[u8]], times_ms: &[u64]) -> (String, Vec<Progress>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Splitter::new(Some(tx));
        let mut tail = Tail::new(4096);
        let t0 = Instant::now();
        for (c, ms) in chunks.iter().zip(times_ms) {
            s.push(c, &mut tail, t0 + Duration::from_millis(*ms));
        }
        s.finish(&mut tail, t0 + Duration::from_secs(60));
        drop(s);
        let mut got = vec![];
        while let Ok(p) = rx.try_recv() {
            got.push(p);
        }
        (tail.text(), got)
    }

    #[test]
    fn progress_lines_leave_the_log_even_when_split_across_reads() {
        let (log, got) = split(
            &[
                b"starting\nferry-pro",
                b"gress: 10 fps=3\nhal",
                b"f a line\nferry-progress: oops\n",
                b"ferry-progress: 20 last",
            ],
            &[0, 1000, 2000, 3000],
        );
        assert_eq!(log, "starting\nhalf a line\nferry-progress: oops\n");
        let pct: Vec<f32> = got.iter().map(|p| p.percent).collect();
        assert_eq!(pct, vec![10.0, 20.0]);
        assert_eq!(got[1].message, "last");
    }

    #[test]
    fn reports_are_throttled_and_the_latest_is_delivered() {
        let lines: Vec<String> = (1..=9)
            .map(|i| format!("ferry-progress: {} n={i}\n", i * 10))
            .collect();
        let chunks: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        // 9 lines within 200 ms, then one at 1 s.
        let mut times: Vec<u64> = (0..8).map(|i| i * 25).collect();
        times.push(1000);
        let (log, got) = split(&chunks, &times);
        assert_eq!(log, "");
        let pct: Vec<f32> = got.iter().map(|p| p.percent).collect();
        assert_eq!(pct, vec![10.0, 90.0], "the burst is throttled");

        // A burst at the very end: its last report is not lost.
        let (_, got) = split(&chunks[..3], &[0, 10, 20]);
        let pct: Vec<f32> = got.iter().map(|p| p.percent).collect();
        assert_eq!(pct, vec![10.0, 30.0]);
    }

    #[test]
    fn long_lines_flow_to_the_log_without_being_held() {
        let long = vec![b'x'; 3000];
        let mut tail = Tail::new(8192);
        let mut s = Splitter::new(None);
        let now = Instant::now();
        s.push(&long, &mut tail, now);
        assert_eq!(tail.text().len(), 3000, "not buffered: no newline yet");
        s.push(b"ferry-progress: 5\nok\n", &mut tail, now);
        s.finish(&mut tail, now);
        // The first "line" continued until the newline, so the prefix was mid-line.
        assert!(tail.text().ends_with("xferry-progress: 5\nok\n"));

        let mut prefixed = b"ferry-progress: 1 ".to_vec();
        prefixed.extend(std::iter::repeat_n(b'y', 2000));
        let mut tail = Tail::new(8192);
        s.push(&prefixed, &mut tail, now);
        s.push(b"\n", &mut tail, now);
        assert_eq!(
            tail.text().len(),
            prefixed.len() + 1,
            "too long for progress"
        );
    }
}
