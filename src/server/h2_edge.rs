//! The connection edge between an accepted unix stream and hyper: the client's HTTP/2
//! byte stream is read frame by frame, every header block (HEADERS + CONTINUATION) is
//! rewritten by [`HeaderBlockRewriter`] and re-framed, and every other frame (DATA
//! above all) passes through untouched. The server → client direction is not touched.
//!
//! Anything this edge cannot make sense of is handed to hyper so that hyper's h2
//! ends the connection with the error it would have sent anyway: a malformed frame
//! goes through byte for byte, and a header block that does not decode is replaced by
//! one that cannot decode (indexed field 0), so h2 sends the GOAWAY it sends for any
//! undecodable block (PROTOCOL_ERROR in h2 0.4; `tests/h2_edge.rs` checks it is the
//! same with and without the edge). After that everything passes through raw; h2 has
//! stopped reading.

use super::header_block::{HeaderBlockRewriter, Rewrite};
use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// SETTINGS_MAX_FRAME_SIZE of the server: the protocol default, which hyper keeps
/// and `server::run` sets explicitly. Larger client frames are hyper's to refuse,
/// and the frames we write never exceed it.
pub const MAX_FRAME_SIZE: usize = 16_384;

/// Bound on one header block as the client encoded it (all fragments).
const MAX_BLOCK: usize = 256 << 10;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// How much is read from the socket at a time when a frame is incomplete.
const READ_CHUNK: usize = 8 << 10;

/// An accepted connection whose header blocks are made acceptable to hyper.
pub struct H2Edge<S> {
    inner: S,
    /// Bytes read from the client and not yet looked at.
    input: BytesMut,
    /// Bytes ready for hyper.
    output: BytesMut,
    state: State,
    /// A header block whose CONTINUATION frames are still to come.
    pending: Option<PendingBlock>,
    rewriter: HeaderBlockRewriter,
    eof: bool,
    logged_authority: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the client's connection preface.
    Preface,
    /// At a frame boundary.
    Frames,
    /// Inside a frame that passes through; this many payload bytes are left.
    Passthrough(usize),
    /// Not HTTP/2 we understand, or after an error handed to hyper: bytes pass as is.
    Raw,
}

struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    /// Stream dependency and weight from the HEADERS frame's PRIORITY flag.
    priority: Option<[u8; 5]>,
    fragments: BytesMut,
}

struct FrameHeader {
    length: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> FrameHeader {
        FrameHeader {
            length: (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize,
            kind: b[3],
            flags: b[4],
            stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

enum Step {
    /// Something changed; look again.
    Progress,
    /// More input is needed first.
    NeedInput,
}

impl<S> H2Edge<S> {
    /// Wraps a freshly accepted connection. `max_header_list` bounds what one header
    /// block may decode to (see [`HeaderBlockRewriter::new`]).
    pub fn new(inner: S, max_header_list: usize) -> Self {
        H2Edge {
            inner,
            input: BytesMut::with_capacity(READ_CHUNK),
            output: BytesMut::new(),
            state: State::Preface,
            pending: None,
            rewriter: HeaderBlockRewriter::new(max_header_list),
            eof: false,
            logged_authority: false,
        }
    }

    /// Moves as much of `input` to `output` as the state allows.
    fn step(&mut self) -> Step {
        match self.state {
            State::Raw => {
                if self.input.is_empty() {
                    return Step::NeedInput;
                }
                let all = self.input.split();
                self.output.unsplit(all);
                Step::Progress
            }
            State::Passthrough(left) => {
                if self.input.is_empty() {
                    return Step::NeedInput;
                }
                let n = left.min(self.input.len());
                let chunk = self.input.split_to(n);
                self.output.unsplit(chunk);
                self.state = if n == left {
                    State::Frames
                } else {
                    State::Passthrough(left - n)
                };
                Step::Progress
            }
            State::Preface => {
                let n = self.input.len().min(PREFACE.len());
                if self.input[..n] != PREFACE[..n] {
                    self.state = State::Raw;
                    return Step::Progress;
                }
                if n < PREFACE.len() {
                    return Step::NeedInput;
                }
                let preface = self.input.split_to(n);
                self.output.unsplit(preface);
                self.state = State::Frames;
                Step::Progress
            }
            State::Frames => self.frame(),
        }
    }

    /// At a frame boundary: one frame's worth of work.
    fn frame(&mut self) -> Step {
        if self.input.len() < FRAME_HEADER {
            return Step::NeedInput;
        }
        let header = FrameHeader::parse(&self.input[..FRAME_HEADER]);
        if let Some(pending) = &self.pending {
            if header.kind != CONTINUATION || header.stream_id != pending.stream_id {
                // RFC 9113 §6.10: nothing may come between a header block's frames.
                // Hand hyper an unfinished HEADERS and the offending frame as sent.
                let stream_id = pending.stream_id;
                self.pending = None;
                self.write_frame(HEADERS, 0, stream_id, &[]);
                self.state = State::Raw;
                return Step::Progress;
            }
        }
        if header.kind != HEADERS && header.kind != CONTINUATION {
            let raw = self.input.split_to(FRAME_HEADER);
            self.output.unsplit(raw);
            if header.length > 0 {
                self.state = State::Passthrough(header.length);
            }
            return Step::Progress;
        }
        if header.length > MAX_FRAME_SIZE || (header.kind == CONTINUATION && self.pending.is_none())
        {
            // FRAME_SIZE_ERROR or PROTOCOL_ERROR: hyper's to send.
            self.state = State::Raw;
            return Step::Progress;
        }
        if self.input.len() < FRAME_HEADER + header.length {
            return Step::NeedInput;
        }
        if header.kind == HEADERS {
            self.headers(header)
        } else {
            self.continuation(header)
        }
    }

    fn headers(&mut self, header: FrameHeader) -> Step {
        let payload = &self.input[FRAME_HEADER..FRAME_HEADER + header.length];
        let Some((priority, fragment)) = split_headers_payload(header.flags, payload) else {
            // Padding or priority longer than the frame: PROTOCOL_ERROR, hyper's.
            self.state = State::Raw;
            return Step::Progress;
        };
        let pending = PendingBlock {
            stream_id: header.stream_id,
            end_stream: header.flags & END_STREAM != 0,
            priority,
            fragments: BytesMut::from(fragment),
        };
        self.input.advance(FRAME_HEADER + header.length);
        self.pending = Some(pending);
        if header.flags & END_HEADERS != 0 {
            self.finish_block();
        }
        Step::Progress
    }

    fn continuation(&mut self, header: FrameHeader) -> Step {
        let Some(pending) = self.pending.as_mut() else {
            // frame() sends a CONTINUATION without a block to hyper before this.
            self.state = State::Raw;
            return Step::Progress;
        };
        pending
            .fragments
            .extend_from_slice(&self.input[FRAME_HEADER..FRAME_HEADER + header.length]);
        self.input.advance(FRAME_HEADER + header.length);
        if pending.fragments.len() > MAX_BLOCK {
            tracing::debug!(
                bytes = pending.fragments.len(),
                "header block over {MAX_BLOCK} bytes; ending the connection"
            );
            let stream_id = pending.stream_id;
            self.pending = None;
            self.poison(stream_id);
        } else if header.flags & END_HEADERS != 0 {
            self.finish_block();
        }
        Step::Progress
    }

    /// The pending block is complete: rewrite it and write it out as HEADERS and as
    /// many CONTINUATION frames as the frame size needs.
    fn finish_block(&mut self) {
        let Some(block) = self.pending.take() else {
            return;
        };
        let mut encoded = Vec::with_capacity(block.fragments.len() + 64);
        match self.rewriter.rewrite(&block.fragments, &mut encoded) {
            Ok(rewrite) => self.note(&rewrite),
            Err(error) => {
                tracing::debug!(%error, "undecodable header block; ending the connection");
                self.poison(block.stream_id);
                return;
            }
        }
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        let mut first = Vec::with_capacity(MAX_FRAME_SIZE.min(encoded.len() + 5));
        if let Some(priority) = block.priority {
            flags |= PRIORITY;
            first.extend_from_slice(&priority);
        }
        let room = MAX_FRAME_SIZE - first.len();
        let (head, mut rest) = encoded.split_at(room.min(encoded.len()));
        first.extend_from_slice(head);
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        self.write_frame(HEADERS, flags | end, block.stream_id, &first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(MAX_FRAME_SIZE.min(rest.len()));
            rest = tail;
            let end = if rest.is_empty() { END_HEADERS } else { 0 };
            self.write_frame(CONTINUATION, end, block.stream_id, chunk);
        }
    }

    /// Hands hyper a header block that cannot decode, so that h2 ends the connection
    /// as it would have, then lets everything else through as is.
    fn poison(&mut self, stream_id: u32) {
        self.write_frame(HEADERS, END_HEADERS, stream_id, &[0x80]);
        self.state = State::Raw;
    }

    fn note(&mut self, rewrite: &Rewrite) {
        if rewrite.truncated {
            tracing::debug!("header list over the bound; passing on a prefix for hyper to refuse");
        }
        if let Some(sent) = &rewrite.replaced_authority {
            if !self.logged_authority {
                self.logged_authority = true;
                tracing::debug!(
                    sent = %String::from_utf8_lossy(sent).escape_debug(),
                    "replacing the client's :authority, which is not an RFC 3986 authority, with localhost"
                );
            }
        }
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = payload.len();
        self.output.reserve(FRAME_HEADER + len);
        self.output.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
        ]);
        self.output.extend_from_slice(&stream_id.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

/// A HEADERS payload without its padding and priority fields: (priority, fragment),
/// or None when those fields do not fit in the payload.
fn split_headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = body.split_first()?;
        // RFC 9113 §6.2: padding longer than the rest is a PROTOCOL_ERROR.
        body = rest.get(..rest.len().checked_sub(pad as usize)?)?;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, rest) = body.split_first_chunk::<5>()?;
        priority = Some(*fields);
        body = rest;
    }
    Some((priority, body))
}

impl<S: AsyncRead + Unpin> H2Edge<S> {
    /// Reads more client bytes into `input`; sets `eof` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.input.reserve(READ_CHUNK);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.input
        ))?;
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H2Edge<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Work through everything buffered before handing bytes over, so that hyper
            // gets as much as it has room for in one read (16 requests in flight arrive
            // as one socket read; handing them over a frame at a time cost CPU).
            while this.output.len() < buf.remaining() {
                if let Step::NeedInput = this.step() {
                    break;
                }
            }
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Bytes that pass unchanged go from the socket straight into hyper's buffer:
            // all of them once raw, and the rest of a large DATA payload. (A small one
            // is read with what follows it, in one read.)
            if this.input.is_empty() && !this.eof {
                match this.state {
                    State::Raw => return Pin::new(&mut this.inner).poll_read(cx, buf),
                    State::Passthrough(left) if left >= READ_CHUNK => {
                        let want = left.min(buf.remaining());
                        let mut direct = ReadBuf::new(buf.initialize_unfilled_to(want));
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                        let n = direct.filled().len();
                        buf.advance(n);
                        this.state = if n == left {
                            State::Frames
                        } else {
                            State::Passthrough(left - n)
                        };
                        return Poll::Ready(Ok(()));
                    }
                    State::Preface | State::Frames | State::Passthrough(_) => {}
                }
            }
            if this.eof {
                // A truncated frame or block: hand over what is left as is; hyper
                // sees the connection end mid-frame, as it would have.
                this.pending = None;
                this.state = State::Raw;
                if this.input.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Edge<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for H2Edge<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt as _;

    type List = Vec<(Vec<u8>, Vec<u8>)>;

    /// A client connection as bytes, delivered `chunk` bytes per read.
    struct Client {
        bytes: Vec<u8>,
        at: usize,
        chunks: Vec<usize>,
        reads: usize,
    }

    impl AsyncRead for Client {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let chunk = this.chunks[this.reads % this.chunks.len()];
            this.reads += 1;
            let n = chunk.min(buf.remaining()).min(this.bytes.len() - this.at);
            buf.put_slice(&this.bytes[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Client {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper would read from the edge, given what the client sent.
    fn through_edge(bytes: Vec<u8>, chunks: Vec<usize>, max_list: usize) -> Vec<u8> {
        let client = Client {
            bytes,
            at: 0,
            chunks,
            reads: 0,
        };
        let mut edge = H2Edge::new(client, max_list);
        let mut out = Vec::new();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(edge.read_to_end(&mut out))
            .unwrap();
        out
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream_id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[derive(Debug, PartialEq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let h = FrameHeader::parse(&bytes[..FRAME_HEADER]);
            frames.push(Frame {
                kind: h.kind,
                flags: h.flags,
                stream_id: h.stream_id,
                payload: bytes[FRAME_HEADER..FRAME_HEADER + h.length].to_vec(),
            });
            bytes = &bytes[FRAME_HEADER + h.length..];
        }
        frames
    }

    /// One request as a client might send it.
    #[derive(Debug, Clone)]
    struct Request {
        fields: Vec<(String, String, u8)>,
        end_stream: bool,
        priority: Option<[u8; 5]>,
        padding: Option<u8>,
        /// Sizes of the block fragments after the first (CONTINUATION frames).
        splits: Vec<usize>,
        data: Vec<u8>,
    }

    fn authority() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(Some("/run/cri-imaged/cri-imaged.sock".to_string())),
            Just(Some("run%2Fcri-imaged%2Fcri-imaged.sock".to_string())),
            Just(Some("localhost".to_string())),
            Just(Some(String::new())),
            Just(None),
            "[ -~]{0,40}".prop_map(Some),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        let regular = prop::collection::vec(
            (
                prop_oneof![
                    Just("content-type".to_string()),
                    Just("user-agent".to_string()),
                    Just("te".to_string()),
                    Just("grpc-timeout".to_string()),
                    "[a-z][a-z0-9-]{0,20}",
                ],
                prop_oneof![
                    Just("application/grpc".to_string()),
                    "[ -~]{0,60}",
                    "x{300,2000}"
                ],
                0u8..0x20,
            ),
            0..8,
        );
        (
            authority(),
            0u8..0x20,
            regular,
            any::<bool>(),
            prop::option::of(any::<[u8; 5]>()),
            prop::option::of(any::<u8>()),
            prop::collection::vec(0usize..200, 0..4),
            prop::collection::vec(any::<u8>(), 0..3000),
        )
            .prop_map(
                |(authority, aflags, regular, end_stream, priority, padding, splits, data)| {
                    let mut fields = vec![
                        (":method".to_string(), "POST".to_string(), 0x14),
                        (":scheme".to_string(), "http".to_string(), 0x14),
                        (
                            ":path".to_string(),
                            "/runtime.v1.ImageService/ListImages".to_string(),
                            0x17,
                        ),
                    ];
                    if let Some(a) = authority {
                        fields.push((":authority".to_string(), a, aflags));
                    }
                    fields.extend(regular);
                    Request {
                        fields,
                        end_stream,
                        priority,
                        padding,
                        splits,
                        data,
                    }
                },
            )
    }

    /// The client's bytes (HPACK by httlib-hpack, an encoder independent of ours) and
    /// what hyper must see: each request's fields with `:authority` made valid.
    fn client_bytes(requests: &[Request]) -> (Vec<u8>, Vec<List>) {
        let mut encoder = httlib_hpack::Encoder::default();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let mut expected = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let stream_id = 2 * i as u32 + 1;
            let mut block = Vec::new();
            let mut list = List::new();
            for (n, v, flags) in &r.fields {
                encoder
                    .encode(
                        (n.as_bytes().to_vec(), v.as_bytes().to_vec(), *flags),
                        &mut block,
                    )
                    .unwrap();
                let v = if n == ":authority" && http::uri::Authority::try_from(v.as_str()).is_err()
                {
                    "localhost"
                } else {
                    v
                };
                list.push((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
            expected.push(list);
            let mut pieces = Vec::new();
            let mut rest = &block[..];
            for &s in &r.splits {
                let (head, tail) = rest.split_at(rest.len().saturating_sub(s));
                pieces.insert(0, tail.to_vec());
                rest = head;
            }
            let mut payload = Vec::new();
            let mut flags = if r.end_stream { END_STREAM } else { 0 };
            if let Some(pad) = r.padding {
                flags |= PADDED;
                payload.push(pad);
            }
            if let Some(p) = r.priority {
                flags |= PRIORITY;
                payload.extend_from_slice(&p);
            }
            payload.extend_from_slice(rest);
            payload.extend(std::iter::repeat_n(0, r.padding.unwrap_or(0) as usize));
            if pieces.is_empty() {
                flags |= END_HEADERS;
            }
            bytes.extend(frame(HEADERS, flags, stream_id, &payload));
            for (j, piece) in pieces.iter().enumerate() {
                let end = if j + 1 == pieces.len() {
                    END_HEADERS
                } else {
                    0
                };
                bytes.extend(frame(CONTINUATION, end, stream_id, piece));
            }
            bytes.extend(frame(0x0, 0, stream_id, &r.data));
        }
        (bytes, expected)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn header_blocks_decode_the_same_with_only_authority_changed(
            requests in prop::collection::vec(request(), 1..12),
            chunks in prop::collection::vec(1usize..5000, 1..5),
        ) {
            let (bytes, expected) = client_bytes(&requests);
            let out = through_edge(bytes, chunks, 64 << 10);
            prop_assert!(out.starts_with(PREFACE));
            let frames = frames(&out[PREFACE.len()..]);
            prop_assert_eq!(&frames[0], &Frame { kind: 0x4, flags: 0, stream_id: 0, payload: vec![] });
            let mut decoder = httlib_hpack::Decoder::default();
            let mut at = 1;
            for (i, (r, want)) in requests.iter().zip(&expected).enumerate() {
                let stream_id = 2 * i as u32 + 1;
                let first = &frames[at];
                prop_assert_eq!(first.kind, HEADERS);
                prop_assert_eq!(first.stream_id, stream_id);
                prop_assert_eq!(first.flags & PADDED, 0);
                prop_assert_eq!(first.flags & END_STREAM != 0, r.end_stream);
                let mut block = first.payload.clone();
                if let Some(p) = r.priority {
                    prop_assert_eq!(first.flags & PRIORITY, PRIORITY);
                    prop_assert_eq!(&block[..5], &p[..]);
                    block.drain(..5);
                }
                let mut flags = first.flags;
                at += 1;
                while flags & END_HEADERS == 0 {
                    let f = &frames[at];
                    prop_assert_eq!((f.kind, f.stream_id), (CONTINUATION, stream_id));
                    block.extend_from_slice(&f.payload);
                    flags = f.flags;
                    at += 1;
                }
                let mut fields = Vec::new();
                decoder.decode(&mut block, &mut fields).unwrap();
                let got: List = fields.into_iter().map(|(n, v, _)| (n, v)).collect();
                prop_assert_eq!(&got, want);
                let data = &frames[at];
                prop_assert_eq!((data.kind, data.stream_id), (0x0, stream_id));
                prop_assert_eq!(&data.payload, &r.data);
                at += 1;
            }
            prop_assert_eq!(at, frames.len());
            prop_assert!(frames.iter().all(|f| f.payload.len() <= MAX_FRAME_SIZE || f.kind == 0x0));
        }
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        for f in frames {
            bytes.extend_from_slice(f);
        }
        bytes
    }

    #[test]
    fn not_http2_passes_through_unchanged() {
        let bytes = b"GET / HTTP/1.1\r\nHost: /tmp/x.sock\r\n\r\n".to_vec();
        assert_eq!(through_edge(bytes.clone(), vec![7], 1 << 16), bytes);
    }

    #[test]
    fn undecodable_block_becomes_one_that_hyper_refuses() {
        let bad = frame(HEADERS, END_HEADERS, 1, &[0xff, 0x80]);
        let after = frame(0x0, 0, 1, b"rest");
        let out = through_edge(connection(&[bad, after.clone()]), vec![100], 1 << 16);
        let frames = frames(&out[PREFACE.len()..]);
        assert_eq!(frames[0].payload, [0x80]);
        assert_eq!(frames[1].payload, b"rest");
    }

    #[test]
    fn frame_between_headers_and_continuation_reaches_hyper() {
        let mut encoder = httlib_hpack::Encoder::default();
        let mut block = Vec::new();
        encoder
            .encode((b":method".to_vec(), b"POST".to_vec(), 0), &mut block)
            .unwrap();
        let headers = frame(HEADERS, 0, 1, &block);
        let ping = frame(0x6, 0, 0, &[0; 8]);
        let out = through_edge(connection(&[headers, ping.clone()]), vec![3], 1 << 16);
        let frames = frames(&out[PREFACE.len()..]);
        assert_eq!(
            (frames[0].kind, frames[0].flags & END_HEADERS),
            (HEADERS, 0)
        );
        assert_eq!(frames[1].kind, 0x6);
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn malformed_frames_pass_through_for_hyper_to_refuse() {
        for bad in [
            frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]), // padding past the end
            frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0, 0]), // short priority
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),        // no HEADERS before
            frame(HEADERS, END_HEADERS, 1, &vec![0x82; MAX_FRAME_SIZE + 1]),
        ] {
            let bytes = connection(std::slice::from_ref(&bad));
            assert_eq!(through_edge(bytes.clone(), vec![5000], 1 << 16), bytes);
        }
    }

    #[test]
    fn continuation_flood_ends_the_connection_within_the_bound() {
        let mut frames_in = vec![frame(HEADERS, 0, 1, &[0x82])];
        // Fragments of a literal value that never ends: 40 frames × 16 KiB > MAX_BLOCK.
        let piece = vec![b'a'; MAX_FRAME_SIZE];
        frames_in.extend((0..40).map(|_| frame(CONTINUATION, 0, 1, &piece)));
        let out = through_edge(connection(&frames_in), vec![MAX_FRAME_SIZE], 1 << 16);
        let frames = frames(&out[PREFACE.len()..]);
        assert_eq!(frames[0].payload, [0x80], "a block hyper cannot decode");
        assert!(frames.len() < 40, "the rest passes through raw");
    }

    #[test]
    fn connection_closed_mid_frame_ends_the_read() {
        let mut bytes = connection(&[frame(HEADERS, END_HEADERS, 1, &[0x82, 0x86])]);
        bytes.truncate(bytes.len() - 1);
        let out = through_edge(bytes.clone(), vec![4], 1 << 16);
        assert_eq!(out, bytes, "handed over as is");
    }
}
