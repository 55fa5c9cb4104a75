//! The daemon's HTTP/2 edge, byte for byte: requests whose `:authority` hyper would
//! refuse (the socket path, a percent-encoded path, empty) are served, and a client
//! that breaks HPACK gets hyper's own GOAWAY(COMPRESSION_ERROR) while the daemon keeps
//! serving. The gRPC health check is the request; no registry is needed.

mod common;

use common::containerd::Containerd;
use common::cri::{Daemon, DaemonConfig};
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const PROTOCOL_ERROR: u32 = 0x1;

struct Frame {
    kind: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream_id.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A hand-driven HTTP/2 client connection on the daemon's socket.
struct Raw {
    stream: UnixStream,
    decoder: httlib_hpack::Decoder<'static>,
}

impl Raw {
    fn open(daemon: &Daemon) -> Raw {
        let mut stream = UnixStream::connect(daemon.socket()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).unwrap();
        Raw {
            stream,
            decoder: httlib_hpack::Decoder::default(),
        }
    }

    /// Writes `bytes`; a connection the server already closed is not an error here,
    /// reading tells what happened.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// `Health/Check` on `stream_id` with `authority` (None: no `:authority` at all),
    /// every field literal with incremental indexing as grpc-go's encoder does.
    fn health_check(
        &mut self,
        encoder: &mut httlib_hpack::Encoder,
        stream_id: u32,
        authority: Option<&str>,
    ) {
        let mut fields = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
        ];
        if let Some(a) = authority {
            fields.push((":authority", a));
        }
        fields.extend([("content-type", "application/grpc"), ("te", "trailers")]);
        let mut block = Vec::new();
        for (n, v) in fields {
            let flags = httlib_hpack::Encoder::WITH_INDEXING | httlib_hpack::Encoder::BEST_FORMAT;
            encoder
                .encode(
                    (n.as_bytes().to_vec(), v.as_bytes().to_vec(), flags),
                    &mut block,
                )
                .unwrap();
        }
        let mut bytes = frame(HEADERS, END_HEADERS, stream_id, &block);
        // An empty HealthCheckRequest: uncompressed, zero length.
        bytes.extend(frame(DATA, END_STREAM, stream_id, &[0, 0, 0, 0, 0]));
        self.send(&bytes);
    }

    fn read_frame(&mut self) -> Option<Frame> {
        let mut header = [0u8; 9];
        self.stream.read_exact(&mut header).ok()?;
        let len = (header[0] as usize) << 16 | (header[1] as usize) << 8 | header[2] as usize;
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload).ok()?;
        let stream_id =
            u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        Some(Frame {
            kind: header[3],
            flags: header[4],
            stream_id,
            payload,
        })
    }

    /// Reads until `stream_id` ends: its header fields (decoded), or the RST_STREAM
    /// or GOAWAY error code that ended it.
    fn outcome(&mut self, stream_id: u32) -> Result<Vec<(String, String)>, (u8, u32)> {
        let mut fields = Vec::new();
        loop {
            let Some(f) = self.read_frame() else {
                return Err((0, u32::MAX));
            };
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => self.send(&frame(SETTINGS, ACK, 0, &[])),
                HEADERS if f.stream_id == stream_id => {
                    let mut block = f.payload;
                    let mut decoded = Vec::new();
                    self.decoder.decode(&mut block, &mut decoded).unwrap();
                    fields.extend(decoded.into_iter().map(|(n, v, _)| {
                        (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                    }));
                    if f.flags & END_STREAM != 0 {
                        return Ok(fields);
                    }
                }
                RST_STREAM if f.stream_id == stream_id => {
                    return Err((
                        RST_STREAM,
                        u32::from_be_bytes(f.payload[..4].try_into().unwrap()),
                    ));
                }
                GOAWAY => {
                    return Err((
                        GOAWAY,
                        u32::from_be_bytes(f.payload[4..8].try_into().unwrap()),
                    ));
                }
                _ => {}
            }
        }
    }
}

fn grpc_status(fields: &[(String, String)]) -> Option<&str> {
    fields
        .iter()
        .find(|(n, _)| n == "grpc-status")
        .map(|(_, v)| v.as_str())
}

const AUTHORITIES: &[Option<&str>] = &[
    Some("/run/cri-imaged/cri-imaged.sock"), // grpc-go with a bare path (kubelet 1.26)
    Some("%2Frun%2Fcri-imaged%2Fcri-imaged.sock"), // grpc-core ≥ 1.57
    Some(""),
    Some("localhost"),
    None,
];

#[test]
fn every_authority_a_client_sends_is_served_on_one_connection() {
    let containerd = Containerd::start();
    let daemon = DaemonConfig::new(&containerd)
        .env("RUST_LOG", "cri_imaged=debug")
        .start();
    let mut conn = Raw::open(&daemon);
    let mut encoder = httlib_hpack::Encoder::default();
    // Twice round: the second time every field comes from the client's dynamic table.
    for (i, authority) in AUTHORITIES.iter().chain(AUTHORITIES).enumerate() {
        let stream_id = 2 * i as u32 + 1;
        conn.health_check(&mut encoder, stream_id, *authority);
        let fields = conn
            .outcome(stream_id)
            .unwrap_or_else(|e| panic!("{authority:?}: stream ended with {e:?}"));
        assert_eq!(grpc_status(&fields), Some("0"), "{authority:?}: {fields:?}");
    }
    assert!(
        daemon.log().contains("/run/cri-imaged/cri-imaged.sock"),
        "the replaced authority is logged at debug level"
    );
}

#[test]
fn without_the_edge_hyper_refuses_a_socket_path_authority() {
    // What every grpc-go, grpc-core and grpc-java client got before the edge existed;
    // proves the test above exercises the rewrite.
    let containerd = Containerd::start();
    let daemon = DaemonConfig::new(&containerd)
        .rewrite_authority(false)
        .start();
    let mut conn = Raw::open(&daemon);
    let mut encoder = httlib_hpack::Encoder::default();
    conn.health_check(&mut encoder, 1, Some("/run/cri-imaged/cri-imaged.sock"));
    assert_eq!(conn.outcome(1).unwrap_err(), (RST_STREAM, PROTOCOL_ERROR));
    conn.health_check(&mut encoder, 3, Some("localhost"));
    assert_eq!(grpc_status(&conn.outcome(3).unwrap()), Some("0"));
}

#[test]
fn broken_hpack_ends_the_connection_as_hyper_would_and_the_daemon_keeps_serving() {
    let containerd = Containerd::start();
    let edge = DaemonConfig::new(&containerd).start();
    let direct = DaemonConfig::new(&containerd)
        .rewrite_authority(false)
        .start();
    for bad_block in [
        &[0x80][..],                   // indexed field 0
        &[0xbf, 0x01][..],             // an index past both tables
        &[0x40, 0x7f, 0x01][..],       // a literal name longer than the block
        &[0x3f, 0xe2, 0x1f, 0x82][..], // a table size above SETTINGS_HEADER_TABLE_SIZE
    ] {
        let outcome = |daemon: &Daemon| {
            let mut conn = Raw::open(daemon);
            conn.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, bad_block));
            conn.outcome(1).unwrap_err()
        };
        let through_edge = outcome(&edge);
        assert_eq!(through_edge.0, GOAWAY, "{bad_block:02x?}");
        assert_eq!(through_edge, outcome(&direct), "{bad_block:02x?}");
    }
    let mut conn = Raw::open(&edge);
    let mut encoder = httlib_hpack::Encoder::default();
    conn.health_check(&mut encoder, 1, Some("/tmp/x.sock"));
    assert_eq!(grpc_status(&conn.outcome(1).unwrap()), Some("0"));
}
