//! One client header block at a time: HPACK-decoded against the client's dynamic table,
//! `:authority` replaced when it is not an RFC 3986 authority, and re-encoded without
//! indexing so the server's decoder never needs a dynamic table of its own.
//!
//! Why: on a unix socket gRPC clients send the socket path (grpc-go dialled with a bare
//! path, as kubelet 1.26 and crictl 1.26 do; grpc-java) or a percent-encoded path
//! (grpc-core ≥ 1.57) as `:authority`, and hyper's h2 resets every such stream with
//! PROTOCOL_ERROR before tonic sees it. The value means nothing on a unix socket.

use loona_hpack::decoder::DecoderError;
use loona_hpack::Decoder;

/// What an unusable `:authority` becomes: what newer kubelets and tonic send.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// The dynamic table size the server's decoder starts with and never raises:
/// hyper's h2 does not advertise SETTINGS_HEADER_TABLE_SIZE, so a client may not
/// grow its table (and so ours) past the protocol default.
pub const MAX_TABLE_SIZE: usize = 4096;

/// How much of a replaced `:authority` is kept for the log.
const LOGGED_AUTHORITY: usize = 256;

/// What one rewrite did, for the caller's log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// The first `:authority` replaced in the block (at most 256 bytes of it).
    pub replaced_authority: Option<Vec<u8>>,
    /// The block decoded to more than the list bound; only a prefix was re-encoded
    /// (still over the bound, so the server refuses the stream as too large).
    pub truncated: bool,
}

/// Decodes a connection's header blocks in order and re-encodes them.
pub struct HeaderBlockRewriter {
    decoder: Decoder<'static>,
    /// Bound on the decoded header list (RFC 7541 §4.1 sizes: name + value + 32).
    max_list_size: usize,
}

impl HeaderBlockRewriter {
    /// A rewriter for one connection. `max_list_size` bounds the memory one block may
    /// decode to; keep it above the server's own header-list limit so the server,
    /// not this rewriter, decides what is too large.
    pub fn new(max_list_size: usize) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        HeaderBlockRewriter {
            decoder,
            max_list_size,
        }
    }

    /// Decodes the complete header block `block` (HEADERS and CONTINUATION fragments
    /// joined, padding and priority removed) and appends its re-encoding to `out`.
    /// An error is an HPACK decoding error: the connection must end, since the
    /// client's table and ours can no longer agree.
    pub fn rewrite(&mut self, block: &[u8], out: &mut Vec<u8>) -> Result<Rewrite, DecoderError> {
        let mut rewrite = Rewrite::default();
        let mut list_size = 0usize;
        let max_list_size = self.max_list_size;
        // Every field is decoded even past the bound: the dynamic table must see each
        // insertion, or later blocks would decode wrong.
        self.decoder.decode_with_cb(block, |name, value| {
            if rewrite.truncated {
                return;
            }
            list_size += name.len() + value.len() + 32;
            if list_size > max_list_size {
                rewrite.truncated = true;
            }
            let value: &[u8] = if &*name == b":authority" && !is_authority(&value) {
                if rewrite.replaced_authority.is_none() {
                    let kept = value.len().min(LOGGED_AUTHORITY);
                    rewrite.replaced_authority = Some(value[..kept].to_vec());
                }
                REPLACEMENT_AUTHORITY
            } else {
                &value
            };
            encode_literal(out, &name, value);
        })?;
        Ok(rewrite)
    }
}

/// Whether hyper's h2 accepts `value` as `:authority` (it parses it exactly so).
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A literal header field without indexing (RFC 7541 §6.2.2), the name by static
/// index where it has one, strings without Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match static_name_index(name) {
        Some(index) => encode_integer(out, 0x00, 4, index),
        None => {
            out.push(0x00);
            encode_string(out, name);
        }
    }
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer (RFC 7541 §5.1) with an `prefix_bits`-bit prefix after `flags`.
fn encode_integer(out: &mut Vec<u8>, flags: u8, prefix_bits: u8, value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The first static-table index (RFC 7541 Appendix A) whose name is `name`.
fn static_name_index(name: &[u8]) -> Option<usize> {
    let index = match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"transfer-encoding" => 57,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        _ => return None,
    };
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    type List = Vec<(Vec<u8>, Vec<u8>)>;

    fn list(fields: &[(&str, &str)]) -> List {
        fields
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Decodes our output with an independent decoder (httlib-hpack); also checks
    /// that no field asks the server to index.
    fn decode_independently(block: &[u8]) -> List {
        let mut decoder = httlib_hpack::Decoder::default();
        let mut buf = block.to_vec();
        let mut fields = Vec::new();
        decoder
            .decode(&mut buf, &mut fields)
            .expect("our block decodes");
        fields
            .into_iter()
            .map(|(n, v, flags)| {
                assert_eq!(flags & httlib_hpack::Decoder::WITH_INDEXING, 0);
                (n, v)
            })
            .collect()
    }

    /// The client side: httlib-hpack's encoder, indexing and Huffman-coding as told.
    fn client_block(encoder: &mut httlib_hpack::Encoder, fields: &List, flags: u8) -> Vec<u8> {
        let mut block = Vec::new();
        for (n, v) in fields {
            encoder
                .encode((n.clone(), v.clone(), flags), &mut block)
                .unwrap();
        }
        block
    }

    const GRPC_GO_133: &[(&str, &str)] = &[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/runtime.v1.ImageService/ListImages"),
        (":authority", "/run/cri-imaged/cri-imaged.sock"),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-go/1.33.3"),
        ("te", "trailers"),
    ];

    #[test]
    fn socket_path_authority_becomes_localhost_on_every_request() {
        let mut encoder = httlib_hpack::Encoder::default();
        let mut rewriter = HeaderBlockRewriter::new(64 << 10);
        let sent = list(GRPC_GO_133);
        let mut expected = sent.clone();
        expected[3].1 = b"localhost".to_vec();
        // The first request inserts every field in the client's table, the next ones
        // refer to those entries by index: both must come out rewritten.
        for round in 0..3 {
            let block = client_block(&mut encoder, &sent, 0x4 | 0x10 | 0x3);
            let mut out = Vec::new();
            let rewrite = rewriter.rewrite(&block, &mut out).unwrap();
            assert_eq!(decode_independently(&out), expected, "round {round}");
            assert_eq!(
                rewrite.replaced_authority.as_deref(),
                Some(&b"/run/cri-imaged/cri-imaged.sock"[..])
            );
        }
    }

    #[test]
    fn authorities_hyper_rejects_are_replaced_and_valid_ones_kept() {
        for (sent, kept) in [
            ("/tmp/x/cri.sock", false),
            ("tmp%2Fx%2Fcri.sock", false),
            ("%2Ftmp%2Fx%2Fcri.sock", false),
            ("", false),
            ("unix:///tmp/x.sock", false),
            ("localhost", true),
            ("127.0.0.1:1234", true),
            ("a b", false),
        ] {
            let mut rewriter = HeaderBlockRewriter::new(64 << 10);
            let mut encoder = httlib_hpack::Encoder::default();
            let fields = list(&[(":method", "POST"), (":authority", sent), ("x", "y")]);
            let block = client_block(&mut encoder, &fields, 0);
            let mut out = Vec::new();
            let rewrite = rewriter.rewrite(&block, &mut out).unwrap();
            let decoded = decode_independently(&out);
            let expected = if kept { sent } else { "localhost" };
            assert_eq!(decoded[1].1, expected.as_bytes(), "{sent:?}");
            assert_eq!(rewrite.replaced_authority.is_none(), kept, "{sent:?}");
        }
    }

    #[test]
    fn missing_authority_stays_missing() {
        let mut rewriter = HeaderBlockRewriter::new(64 << 10);
        let mut encoder = httlib_hpack::Encoder::default();
        let fields = list(&[(":method", "POST"), (":path", "/x"), ("custom-name", "v")]);
        let mut out = Vec::new();
        rewriter
            .rewrite(&client_block(&mut encoder, &fields, 0x4), &mut out)
            .unwrap();
        assert_eq!(decode_independently(&out), fields);
    }

    #[test]
    fn hpack_errors_are_reported() {
        let mut rewriter = HeaderBlockRewriter::new(64 << 10);
        for block in [
            &[0x80][..],             // index 0
            &[0xff, 0x80][..],       // index past both tables
            &[0x3f, 0xe2, 0x1f][..], // table size 4096 + 1 + ... above the limit
            &[0x00, 0x05, b'a'][..], // literal name longer than the block
        ] {
            let mut out = Vec::new();
            assert!(rewriter.rewrite(block, &mut out).is_err(), "{block:02x?}");
        }
    }

    #[test]
    fn decoded_size_is_bounded_but_table_stays_in_step() {
        let mut encoder = httlib_hpack::Encoder::default();
        let mut rewriter = HeaderBlockRewriter::new(1000);
        let big = "v".repeat(300);
        let fields: List = (0..10)
            .map(|i| (format!("h{i}").into_bytes(), big.clone().into_bytes()))
            .collect();
        let mut out = Vec::new();
        let rewrite = rewriter
            .rewrite(&client_block(&mut encoder, &fields, 0x4), &mut out)
            .unwrap();
        assert!(rewrite.truncated);
        let decoded = decode_independently(&out);
        assert!(decoded.len() < fields.len());
        let size: usize = decoded.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        assert!(size > 1000, "the truncated list stays over the bound");
        // The fields past the bound were still inserted in the table: a block that
        // refers to the newest entry decodes to it.
        let mut out = Vec::new();
        let last = vec![fields[9].clone()];
        rewriter
            .rewrite(&client_block(&mut encoder, &last, 0x10), &mut out)
            .unwrap();
        assert_eq!(decode_independently(&out), last);
    }

    #[test]
    fn integers_use_continuation_octets_past_the_prefix() {
        let mut out = Vec::new();
        encode_integer(&mut out, 0x00, 5, 1337);
        assert_eq!(out, [31, 154, 10], "RFC 7541 C.1.2");
        out.clear();
        encode_integer(&mut out, 0x00, 7, 127);
        assert_eq!(out, [127, 0]);
    }
}
