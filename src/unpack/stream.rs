//! A layer's bytes handed from its download to its extraction as they arrive: the
//! download sends each chunk it writes to the content store ([`TeeSender`]), and
//! the extraction, on a blocking thread, reads them in order ([`TeeReader`]). So a
//! layer is extracted while it downloads instead of read back from the store after.
//!
//! The reader sees the end of the stream only when the sender says the download is
//! complete ([`TeeSender::finish`]); a sender dropped before that (the download
//! failed or was cancelled) is a read error, never a clean end, so a cut-off
//! stream cannot pass for a short layer. What the extraction of a streamed layer
//! found counts only if the download then verified the blob's digest.

use bytes::{Buf, Bytes};
use std::io::{self, BufRead, Read};
use tokio::sync::mpsc;

enum Message {
    Chunk(Bytes),
    End,
}

/// Creates a tee holding at most `chunks` chunks in flight: a download outrunning
/// its extraction waits for it.
pub fn tee(chunks: usize) -> (TeeSender, TeeReader) {
    let (tx, rx) = mpsc::channel(chunks.max(1));
    (
        TeeSender { tx: Some(tx) },
        TeeReader {
            rx,
            current: Bytes::new(),
            state: State::Open,
        },
    )
}

/// The download's end of a tee.
pub struct TeeSender {
    /// `None` once the reader went away: nothing more is sent.
    tx: Option<mpsc::Sender<Message>>,
}

impl TeeSender {
    /// Hands a copy of `chunk` (a reference count, not the bytes) to the reader.
    /// Once the reader is gone (the extraction stopped, or nobody extracts this
    /// layer) this does nothing, and [`finish`](Self::finish) says so.
    pub async fn send(&mut self, chunk: &Bytes) {
        if let Some(tx) = &self.tx {
            if tx.send(Message::Chunk(chunk.clone())).await.is_err() {
                self.tx = None;
            }
        }
    }

    /// Tells the reader the stream is complete. Returns whether every chunk sent
    /// reached it, i.e. the reader saw the whole stream.
    pub async fn finish(mut self) -> bool {
        match self.tx.take() {
            Some(tx) => tx.send(Message::End).await.is_ok(),
            None => false,
        }
    }
}

/// The extraction's end of a tee: a blocking [`BufRead`] whose buffer is the
/// download's own chunk (no copy). Read it on a blocking thread, never on the
/// async runtime; [`ready`](Self::ready) waits for the first bytes without one.
pub struct TeeReader {
    rx: mpsc::Receiver<Message>,
    /// The unread rest of the latest chunk.
    current: Bytes,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The sender said the stream is complete.
    Ended,
    /// The sender went away without saying so.
    Broken,
}

impl TeeReader {
    /// Waits (asynchronously) until there is something to read, so a blocking
    /// thread is taken only once the download is under way.
    pub async fn ready(&mut self) {
        if self.current.is_empty() && self.state == State::Open {
            let message = self.rx.recv().await;
            self.take(message);
        }
    }

    fn take(&mut self, message: Option<Message>) {
        match message {
            Some(Message::Chunk(chunk)) => self.current = chunk,
            Some(Message::End) => self.state = State::Ended,
            None => self.state = State::Broken,
        }
    }
}

impl BufRead for TeeReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.state {
                State::Open => {
                    let message = self.rx.blocking_recv();
                    self.take(message);
                }
                State::Ended => break,
                State::Broken => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the download stopped before the layer was complete",
                    ))
                }
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, n: usize) {
        self.current.advance(n);
    }
}

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut reader: TeeReader) -> std::thread::JoinHandle<io::Result<Vec<u8>>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        })
    }

    #[tokio::test]
    async fn the_reader_gets_every_chunk_in_order_then_the_end() {
        let (mut tx, rx) = tee(2);
        let reader = read_all(rx);
        for part in [&b"abc"[..], b"", b"defgh", b"i"] {
            tx.send(&Bytes::copy_from_slice(part)).await;
        }
        assert!(tx.finish().await);
        assert_eq!(reader.join().unwrap().unwrap(), b"abcdefghi");
    }

    #[tokio::test]
    async fn ready_waits_for_the_first_chunk_without_losing_it() {
        let (mut tx, mut rx) = tee(2);
        tx.send(&Bytes::from_static(b"first")).await;
        rx.ready().await;
        assert!(tx.finish().await);
        assert_eq!(read_all(rx).join().unwrap().unwrap(), b"first");
    }

    #[tokio::test]
    async fn a_sender_dropped_unfinished_is_an_error_not_an_end() {
        let (mut tx, rx) = tee(2);
        let reader = read_all(rx);
        tx.send(&Bytes::from_static(b"partial")).await;
        drop(tx);
        let err = reader.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_reader_gone_makes_finish_say_the_stream_was_not_whole() {
        let (mut tx, rx) = tee(1);
        drop(rx);
        tx.send(&Bytes::from_static(b"x")).await;
        tx.send(&Bytes::from_static(b"y")).await;
        assert!(!tx.finish().await);
    }
}
