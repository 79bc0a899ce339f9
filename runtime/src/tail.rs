//! Bounded log capture: keeps only the last `cap` bytes written.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

/// The last `cap` bytes of a stream.
#[derive(Debug)]
pub(crate) struct Tail {
    cap: usize,
    buf: Vec<u8>,
    /// Bytes were dropped from the front at some point.
    cut: bool,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: Vec::new(),
            cut: false,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.cap == 0 {
            return;
        }
        if bytes.len() >= self.cap {
            self.cut |= bytes.len() > self.cap || !self.buf.is_empty();
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - self.cap..]);
            return;
        }
        self.buf.extend_from_slice(bytes);
        // Trim only once twice the cap is held, so small writes cost amortised O(1).
        if self.buf.len() > 2 * self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
            self.cut = true;
        }
    }

    /// The kept bytes as text: the last `cap` bytes, a character cut in half at the
    /// start dropped, invalid UTF-8 replaced.
    pub(crate) fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        let mut bytes = &self.buf[start..];
        if start > 0 || self.cut {
            let skip = bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
                .count();
            bytes = &bytes[skip..];
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// The last non-empty line of a log, for short error messages.
pub(crate) fn last_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
}

/// A [`Tail`] shared between writers (the guest's stdout and stderr) and the reader.
#[derive(Clone, Debug)]
pub(crate) struct TailPipe(Arc<Mutex<Tail>>);

impl TailPipe {
    pub(crate) fn new(cap: usize) -> Self {
        Self(Arc::new(Mutex::new(Tail::new(cap))))
    }

    pub(crate) fn push(&self, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(bytes);
    }

    pub(crate) fn text(&self) -> String {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).text()
    }
}

// --- As a WASI output stream: always accepts, never blocks, never fails. ---

use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write in one `write` call.
const WRITE_BUDGET: usize = 64 * 1024;

#[wasmtime_wasi::async_trait]
impl Pollable for TailPipe {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for TailPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

impl tokio::io::AsyncWrite for TailPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for TailPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for TailPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes() {
        let mut t = Tail::new(8);
        for chunk in ["abc", "defg", "hijkl", "mnop"] {
            t.push(chunk.as_bytes());
        }
        assert_eq!(t.text(), "ijklmnop");
        t.push(b"0123456789");
        assert_eq!(t.text(), "23456789");
        assert!(t.buf.len() <= 16);
    }

    #[test]
    fn a_character_cut_in_half_is_dropped() {
        let mut t = Tail::new(4);
        t.push("aé€".as_bytes()); // 1 + 2 + 3 bytes: the tail starts inside 'é'
        assert_eq!(t.text(), "€");
    }

    #[test]
    fn last_line_skips_blank_lines() {
        assert_eq!(last_line("one\ntwo  \n\n"), "two");
        assert_eq!(last_line(""), "");
    }
}
