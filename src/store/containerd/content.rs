//! containerd's content service: blob info and labels, resumable ingests over the
//! lock-step `Content.Write` stream, and whole reads of small blobs.

use super::{from_proto_labels, to_proto_labels, ContainerdStore};
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::{ContentInfo, ContentWriter, Ingest, Labels, Lease, StoreError};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    AbortRequest, Info, InfoRequest, ListContentRequest, ReadContentRequest, UpdateRequest,
    WriteAction, WriteContentRequest, WriteContentResponse,
};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// How long to wait for another writer holding the same ingest ref (another pull
/// of the same blob) before giving up.
const LOCKED_REF_WAIT: Duration = Duration::from_secs(300);
const LOCKED_REF_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Small chunks from the network are coalesced up to this size before a WRITE
/// (containerd refuses messages over 16 MiB).
const WRITE_CHUNK: usize = 512 << 10;
/// WRITEs sent before waiting for the first one's answer. containerd answers each in
/// order; waiting for every answer before the next WRITE left its HTTP/2 window and
/// our socket idle half the time (measured: ~100 MB/s lock-step on a 200 MB image).
const WRITES_IN_FLIGHT: usize = 4;

impl ContainerdStore {
    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    /// Bytes and blob count of the namespace's content store (Content.List).
    pub(super) async fn content_usage(&self) -> Result<(u64, u64), StoreError> {
        let request = self.request(
            ListContentRequest {
                filters: Vec::new(),
            },
            None,
        )?;
        let list_error = |status| self.status_error("Content.List", status, || "content".into());
        let mut stream = self
            .content()
            .list(request)
            .await
            .map_err(list_error)?
            .into_inner();
        let (mut bytes, mut blobs) = (0u64, 0u64);
        while let Some(page) = stream.message().await.map_err(list_error)? {
            for info in page.info {
                bytes += u64::try_from(info.size).unwrap_or_default();
                blobs += 1;
            }
        }
        Ok((bytes, blobs))
    }

    pub(super) async fn info(&self, digest: &Digest) -> Result<Option<ContentInfo>, StoreError> {
        let request = self.request(
            InfoRequest {
                digest: digest.to_string(),
            },
            None,
        )?;
        match self.content().info(request).await {
            Ok(response) => {
                let info = response.into_inner().info.ok_or(StoreError::Malformed {
                    what: "Content.Info response",
                    detail: "no info".into(),
                })?;
                content_info(info).map(Some)
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.status_error("Content.Info", status, || digest.to_string())),
        }
    }

    pub(super) async fn set_labels(
        &self,
        digest: &Digest,
        labels: Labels,
    ) -> Result<(), StoreError> {
        if labels.is_empty() {
            return Ok(());
        }
        // Field paths `labels.<key>` make containerd set exactly these keys and keep
        // the others, so no read-modify-write race with a concurrent pull.
        let paths = labels.keys().map(|key| format!("labels.{key}")).collect();
        let request = self.request(
            UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels: to_proto_labels(&labels),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            },
            None,
        )?;
        self.content().update(request).await.map_err(|status| {
            self.status_error("Content.Update", status, || format!("blob {digest}"))
        })?;
        Ok(())
    }

    pub(super) async fn read(&self, digest: &Digest, max: u64) -> Result<Bytes, StoreError> {
        let info = self
            .info(digest)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("blob {digest}"),
            })?;
        if info.size > max {
            return Err(StoreError::TooLarge {
                digest: digest.clone(),
                size: info.size,
                max,
            });
        }
        let request = self.request(
            ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
            None,
        )?;
        let read_error =
            |status| self.status_error("Content.Read", status, || format!("blob {digest}"));
        let mut stream = self
            .content()
            .read(request)
            .await
            .map_err(read_error)?
            .into_inner();
        let mut data = BytesMut::with_capacity(info.size as usize);
        while let Some(chunk) = stream.message().await.map_err(read_error)? {
            if data.len() as u64 + chunk.data.len() as u64 > info.size {
                return Err(StoreError::Malformed {
                    what: "Content.Read stream",
                    detail: format!("more than the {} bytes Content.Info reported", info.size),
                });
            }
            data.extend_from_slice(&chunk.data);
        }
        Ok(data.freeze())
    }

    pub(super) async fn open_ingest(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Ingest, StoreError> {
        let deadline = Instant::now() + LOCKED_REF_WAIT;
        let mut backoff = Duration::from_millis(50);
        loop {
            // Held first, then looked at: content found present cannot be collected
            // before the pull's records reference it.
            self.lease_content(lease, &expected.digest).await?;
            if self.info(&expected.digest).await?.is_some() {
                return Ok(Ingest::Present);
            }
            match self.try_open_ingest(lease, reference, expected).await? {
                Opened::Ingest(ingest) => return Ok(ingest),
                Opened::Locked(status) if Instant::now() < deadline => {
                    tracing::debug!(reference, %status, "ingest ref locked by another writer; waiting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(LOCKED_REF_MAX_BACKOFF);
                }
                Opened::Locked(status) => {
                    return Err(StoreError::Grpc {
                        op: "Content.Write",
                        status,
                    })
                }
            }
        }
    }

    async fn try_open_ingest(
        &self,
        lease: &Lease,
        reference: &str,
        expected: &Descriptor,
    ) -> Result<Opened, StoreError> {
        let size = to_i64(expected.size)?;
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total: size,
            expected: expected.digest.to_string(),
            ..Default::default()
        };
        // containerd sends no response headers before it reads the first message,
        // so the STAT must already be in the request stream when the call is awaited.
        let (tx, rx) = mpsc::channel(WRITES_IN_FLIGHT);
        let requests = tokio_stream::once(stat).chain(ReceiverStream::new(rx));
        let request = self.request(requests, Some(lease))?;
        let mut client = self.content();
        let opened = async {
            let mut responses = client.write(request).await?.into_inner();
            let stat = responses.message().await?;
            Ok::<_, Status>((responses, stat))
        }
        .await;
        let (responses, stat) = match opened {
            Ok((responses, Some(stat))) => (responses, stat),
            Ok((_, None)) => {
                return Err(StoreError::Malformed {
                    what: "Content.Write stream",
                    detail: "closed before answering STAT".into(),
                })
            }
            // The blob was committed since we looked (containerd checks `expected`).
            Err(status) if status.code() == Code::AlreadyExists => {
                return Ok(Opened::Ingest(Ingest::Present))
            }
            // "ref <ns>/<n>/<ref> locked for <t> (since <time>): unavailable": another
            // stream is writing this ingest right now.
            Err(status)
                if status.code() == Code::Unavailable && status.message().contains("locked") =>
            {
                return Ok(Opened::Locked(status))
            }
            Err(status) => {
                return Err(
                    self.status_error("Content.Write", status, || format!("ingest {reference}"))
                )
            }
        };
        let mut writer = ContainerdWriter {
            store: self.clone(),
            tx,
            responses,
            reference: reference.to_string(),
            expected: expected.clone(),
            acked: from_i64(stat.offset, "Content.Write STAT offset")?,
            sent: 0,
            in_flight: VecDeque::new(),
            pending: BytesMut::new(),
            digest_so_far: stat.digest,
        };
        writer.sent = writer.acked;
        // A leftover ingest that cannot be the start of this blob (longer than it, or
        // complete with the wrong digest) is truncated; WRITE at offset 0 does that.
        let complete_but_wrong =
            writer.acked == expected.size && writer.digest_so_far != expected.digest.to_string();
        if writer.acked > expected.size || complete_but_wrong {
            tracing::info!(
                reference,
                offset = writer.acked,
                size = expected.size,
                "restarting an ingest that does not match its blob"
            );
            writer.truncate().await?;
        } else if writer.acked > 0 {
            tracing::debug!(reference, offset = writer.acked, "resuming ingest");
        }
        Ok(Opened::Ingest(Ingest::Writer(Box::new(writer))))
    }

    pub(super) async fn abort_quietly(&self, reference: &str) {
        let request = match self.request(
            AbortRequest {
                r#ref: reference.to_string(),
            },
            None,
        ) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(reference, %error, "cannot abort ingest");
                return;
            }
        };
        if let Err(status) = self.content().abort(request).await {
            if status.code() != Code::NotFound {
                tracing::warn!(reference, %status, "cannot abort ingest; a retry will resume it");
            }
        }
    }
}

enum Opened {
    Ingest(Ingest),
    Locked(Status),
}

/// One open `Content.Write` stream: holds the stream (and so containerd's lock on
/// the ref) and the lease header it was opened with. Chunks under `WRITE_CHUNK`
/// are coalesced, so a writer dropped without commit leaves only what was sent.
/// Up to `WRITES_IN_FLIGHT` WRITEs are outstanding; their answers are checked in order.
struct ContainerdWriter {
    store: ContainerdStore,
    tx: mpsc::Sender<WriteContentRequest>,
    responses: Streaming<WriteContentResponse>,
    reference: String,
    expected: Descriptor,
    /// Bytes containerd has acknowledged.
    acked: u64,
    /// Bytes sent in WRITEs, acknowledged or not.
    sent: u64,
    /// For each unanswered WRITE, the offset its answer must report.
    in_flight: VecDeque<u64>,
    /// Bytes accepted from the caller but not yet sent.
    pending: BytesMut,
    /// The digest of the acknowledged bytes, as containerd computes it.
    digest_so_far: String,
}

impl ContainerdWriter {
    async fn round_trip(
        &mut self,
        request: WriteContentRequest,
    ) -> Result<WriteContentResponse, Status> {
        if self.tx.send(request).await.is_err() {
            // The request stream is gone because containerd ended the call; its
            // status says why.
            return Err(match self.responses.message().await {
                Err(status) => status,
                Ok(_) => Status::aborted("containerd closed the write stream"),
            });
        }
        match self.responses.message().await? {
            Some(response) => Ok(response),
            None => Err(Status::aborted(
                "containerd closed the write stream without answering",
            )),
        }
    }

    fn write_error(&self, status: Status) -> StoreError {
        self.store.status_error("Content.Write", status, || {
            format!("ingest {}", self.reference)
        })
    }

    async fn truncate(&mut self) -> Result<(), StoreError> {
        self.drain().await?;
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.reference.clone(),
            offset: 0,
            ..Default::default()
        };
        let response = self
            .round_trip(request)
            .await
            .map_err(|status| self.write_error(status))?;
        self.acked = from_i64(response.offset, "Content.Write offset")?;
        self.sent = self.acked;
        self.digest_so_far = response.digest;
        Ok(())
    }

    /// Sends `data` as one WRITE after everything sent so far, without waiting for
    /// its answer unless `WRITES_IN_FLIGHT` are already outstanding.
    async fn send(&mut self, data: Bytes) -> Result<(), StoreError> {
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.reference.clone(),
            offset: to_i64(self.sent)?,
            data: data.to_vec(),
            ..Default::default()
        };
        if self.tx.send(request).await.is_err() {
            // containerd ended the call; its status (after any answers) says why.
            return Err(self.stream_ended().await);
        }
        self.sent += data.len() as u64;
        self.in_flight.push_back(self.sent);
        if self.in_flight.len() >= WRITES_IN_FLIGHT {
            self.receive_one().await?;
        }
        Ok(())
    }

    /// Reads the answer to the oldest outstanding WRITE and checks its offset.
    async fn receive_one(&mut self) -> Result<(), StoreError> {
        let Some(expected_offset) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let response = match self.responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(self.write_error(Status::aborted(
                    "containerd closed the write stream without answering",
                )))
            }
            Err(status) => return Err(self.write_error(status)),
        };
        let offset = from_i64(response.offset, "Content.Write offset")?;
        if offset != expected_offset {
            return Err(StoreError::Malformed {
                what: "Content.Write response",
                detail: format!("offset {offset} where {expected_offset} was written"),
            });
        }
        self.acked = offset;
        self.digest_so_far = response.digest;
        Ok(())
    }

    /// Waits for every outstanding WRITE's answer.
    async fn drain(&mut self) -> Result<(), StoreError> {
        while !self.in_flight.is_empty() {
            self.receive_one().await?;
        }
        Ok(())
    }

    /// The error for a request stream containerd has closed: its final status.
    async fn stream_ended(&mut self) -> StoreError {
        loop {
            match self.responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return self.write_error(Status::aborted("containerd closed the write stream"))
                }
                Err(status) => return self.write_error(status),
            }
        }
    }

    /// Sends what is pending (not waiting for answers).
    async fn flush(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() {
            let data = self.pending.split().freeze();
            self.send(data).await?;
        }
        Ok(())
    }

    /// Ends this stream (releasing containerd's lock on the ref) and throws the
    /// ingest away, so the next attempt starts clean instead of resuming bad data.
    async fn discard(self) {
        let ContainerdWriter {
            store,
            tx,
            responses,
            reference,
            ..
        } = self;
        drop(tx);
        drop(responses);
        store.abort_quietly(&reference).await;
    }

    fn mismatch(&self, actual: String) -> StoreError {
        StoreError::DigestMismatch {
            expected: self.expected.digest.clone(),
            actual,
        }
    }
}

#[async_trait]
impl ContentWriter for ContainerdWriter {
    fn offset(&self) -> u64 {
        self.sent + self.pending.len() as u64
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let after = self.offset() + chunk.len() as u64;
        if after > self.expected.size {
            return Err(self.mismatch(format!(
                "at least {after} bytes for a blob of {}",
                self.expected.size
            )));
        }
        if chunk.len() >= WRITE_CHUNK {
            self.flush().await?;
            let mut rest = chunk;
            while !rest.is_empty() {
                let piece = rest.split_to(rest.len().min(WRITE_CHUNK));
                self.send(piece).await?;
            }
            return Ok(());
        }
        self.pending.extend_from_slice(&chunk);
        if self.pending.len() >= WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), StoreError> {
        self.flush().await?;
        self.drain().await
    }

    async fn commit(mut self: Box<Self>, labels: Labels) -> Result<(), StoreError> {
        self.sync().await?;
        if self.acked < self.expected.size {
            // A short body is not bad data: keep the ingest so the next attempt resumes.
            return Err(self.mismatch(format!(
                "only {} of {} bytes",
                self.acked, self.expected.size
            )));
        }
        let expected = self.expected.digest.to_string();
        if self.digest_so_far != expected {
            let error = self.mismatch(self.digest_so_far.clone());
            (*self).discard().await;
            return Err(error);
        }
        let request = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.reference.clone(),
            // COMMIT at offset 0 would truncate the ingest first.
            offset: to_i64(self.acked)?,
            total: to_i64(self.expected.size)?,
            expected,
            labels: to_proto_labels(&labels),
            ..Default::default()
        };
        match self.round_trip(request).await {
            Ok(_) => Ok(()),
            // Someone committed the same digest first: the blob is there.
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            // containerd 1.6 says "unexpected commit digest <actual>, expected
            // <expected>: failed precondition", or for a wrong length
            // "\"<ref>\" failed size validation: <n> != <size>: failed precondition".
            Err(status)
                if status.code() == Code::FailedPrecondition
                    && (status.message().contains("unexpected commit")
                        || status.message().contains("failed size validation")) =>
            {
                let error = self.mismatch(status.message().to_string());
                (*self).discard().await;
                Err(error)
            }
            Err(status) => Err(self.write_error(status)),
        }
    }
}

fn content_info(info: Info) -> Result<ContentInfo, StoreError> {
    let digest = info
        .digest
        .parse()
        .map_err(|error: crate::digest::DigestError| StoreError::Malformed {
            what: "content digest",
            detail: error.to_string(),
        })?;
    Ok(ContentInfo {
        digest,
        size: from_i64(info.size, "content size")?,
        labels: from_proto_labels(info.labels),
    })
}

fn to_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(
        |_too_big: std::num::TryFromIntError| StoreError::InvalidArgument {
            what: "blob size",
            value: n.to_string(),
            reason: "larger than containerd's int64 sizes",
        },
    )
}

fn from_i64(n: i64, what: &'static str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|error| StoreError::Malformed {
        what,
        detail: format!("{n}: {error}"),
    })
}
