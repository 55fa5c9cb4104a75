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
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

enum Message {
    Chunk(Bytes),
    End,
}

/// Creates a tee that lets a download be at most `ahead` bytes (at least one
/// chunk) ahead of its extraction; a download outrunning its extraction waits.
pub fn tee(ahead: usize) -> (TeeSender, TeeReader) {
    let (tx, rx) = mpsc::unbounded_channel();
    let ahead = u32::try_from(ahead.max(1)).unwrap_or(u32::MAX);
    let room = Arc::new(Semaphore::new(ahead as usize));
    (
        TeeSender {
            tx: Some(tx),
            room: room.clone(),
            ahead,
        },
        TeeReader {
            rx,
            current: Bytes::new(),
            charged: 0,
            room,
            ahead,
            state: State::Open,
        },
    )
}

/// What a chunk takes of the tee's room: its length, or all the room for a chunk
/// bigger than that.
fn charge(chunk: &Bytes, ahead: u32) -> u32 {
    u32::try_from(chunk.len()).unwrap_or(u32::MAX).min(ahead)
}

/// The download's end of a tee.
pub struct TeeSender {
    /// `None` once the reader went away: nothing more is sent.
    tx: Option<mpsc::UnboundedSender<Message>>,
    /// Bytes the reader has room for (permits, one per byte).
    room: Arc<Semaphore>,
    ahead: u32,
}

impl TeeSender {
    /// Hands a copy of `chunk` (a reference count, not the bytes) to the reader,
    /// once it has room. Once the reader is gone (the extraction stopped, or nobody
    /// extracts this layer) this does nothing, and [`finish`](Self::finish) says so.
    pub async fn send(&mut self, chunk: &Bytes) {
        let Some(tx) = &self.tx else {
            return;
        };
        // The reader closes the room when it goes away.
        let sent = match self.room.acquire_many(charge(chunk, self.ahead)).await {
            Ok(permits) => {
                permits.forget();
                tx.send(Message::Chunk(chunk.clone())).is_ok()
            }
            Err(_) => false,
        };
        if !sent {
            self.tx = None;
        }
    }

    /// Tells the reader the stream is complete. Returns whether every chunk sent
    /// reached it, i.e. the reader saw the whole stream.
    pub async fn finish(mut self) -> bool {
        match self.tx.take() {
            Some(tx) => tx.send(Message::End).is_ok(),
            None => false,
        }
    }
}

/// The extraction's end of a tee: a blocking [`BufRead`] whose buffer is the
/// download's own chunk (no copy). Read it on a blocking thread, never on the
/// async runtime; [`ready`](Self::ready) waits for the first bytes without one.
pub struct TeeReader {
    rx: mpsc::UnboundedReceiver<Message>,
    /// The unread rest of the latest chunk.
    current: Bytes,
    /// Room the latest chunk took, given back once it is read.
    charged: u32,
    room: Arc<Semaphore>,
    ahead: u32,
    state: State,
}

impl Drop for TeeReader {
    fn drop(&mut self) {
        // A sender waiting for room learns that nobody reads any more.
        self.room.close();
    }
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
            Some(Message::Chunk(chunk)) => {
                self.current = chunk;
                self.charged = charge(&self.current, self.ahead);
            }
            Some(Message::End) => self.state = State::Ended,
            None => self.state = State::Broken,
        }
    }
}

impl BufRead for TeeReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            if self.charged > 0 {
                self.room
                    .add_permits(std::mem::take(&mut self.charged) as usize);
            }
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
    async fn a_sender_waits_for_room_and_goes_on_when_the_reader_reads() {
        let (mut tx, mut rx) = tee(4);
        tx.send(&Bytes::from_static(b"abc")).await;
        // One byte of room left: the next chunk waits until "abc" is read.
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            tx.send(&Bytes::from_static(b"de")),
        )
        .await;
        assert!(blocked.is_err(), "sent with no room");
        rx.ready().await;
        let reader = read_all(rx);
        // A chunk bigger than the whole room still goes, taking all of it.
        tx.send(&Bytes::from_static(b"de")).await;
        tx.send(&Bytes::from_static(b"fghijklmn")).await;
        assert!(tx.finish().await);
        assert_eq!(reader.join().unwrap().unwrap(), b"abcdefghijklmn");
    }

    #[tokio::test]
    async fn a_reader_gone_wakes_a_sender_waiting_for_room() {
        let (mut tx, rx) = tee(2);
        tx.send(&Bytes::from_static(b"ab")).await;
        let waiting = tokio::spawn(async move {
            tx.send(&Bytes::from_static(b"c")).await;
            tx.finish().await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(rx);
        assert!(!waiting.await.unwrap());
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
