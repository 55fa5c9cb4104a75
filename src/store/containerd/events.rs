//! containerd's event stream, narrowed to the image records of our namespace
//! (`/images/create`, `/images/update`, `/images/delete`), for the image index.
//!
//! containerd answers `Events.Subscribe` with no response headers until the first
//! event, so the call itself cannot tell when the subscription is in place. We
//! publish a marker event of our own (topic [`MARKER_TOPIC`], a nonce as payload)
//! until it comes back on the stream: from then on, no change can slip between the
//! subscription and a list taken after it.

use super::{unique_suffix, ContainerdStore};
use crate::store::{ImageEvent, ImageEvents, StoreError};
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::{
    ImageCreate, ImageDelete, ImageUpdate, PublishRequest, SubscribeRequest,
};
use containerd_client::types::Envelope;
use futures_util::StreamExt;
use prost::Message;
use std::time::Duration;
use tonic::Streaming;

const TOPIC_CREATE: &str = "/images/create";
const TOPIC_UPDATE: &str = "/images/update";
const TOPIC_DELETE: &str = "/images/delete";
/// Our marker's topic; only subscribers asking for it (or for everything, as
/// `ctr events` does) see it.
const MARKER_TOPIC: &str = "/cri-imaged/subscribed";
const MARKER_TYPE: &str = "cri-imaged/subscribed";
/// How often the marker is published while the subscription is not yet in place.
const MARKER_EVERY: Duration = Duration::from_millis(50);
/// Bounds the wait for the marker: containerd answers locally or not at all.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(10);

impl ContainerdStore {
    fn events(&self) -> EventsClient<tonic::transport::Channel> {
        EventsClient::new(self.channel.clone())
    }

    pub(super) async fn image_event_stream(&self) -> Result<ImageEvents, StoreError> {
        let namespace = self.namespace.to_str().unwrap_or_default().to_string();
        let filters = [TOPIC_CREATE, TOPIC_UPDATE, TOPIC_DELETE, MARKER_TOPIC]
            .iter()
            .map(|topic| format!("namespace==\"{namespace}\",topic==\"{topic}\""))
            .collect();
        let request = self.request(SubscribeRequest { filters }, None)?;
        let mut client = self.events();
        // Aborted if we give up on it (an error on the way out drops it).
        let mut subscribing =
            AbortOnDrop(tokio::spawn(async move { client.subscribe(request).await }));
        let nonce = unique_suffix();
        let started = tokio::time::Instant::now();
        // Publish until containerd answers the subscription (with some event, maybe
        // not yet ours): only then is it certainly listening.
        let stream = loop {
            self.publish_marker(&nonce).await?;
            tokio::select! {
                answered = &mut subscribing.0 => {
                    let answered = answered.map_err(|e| StoreError::Malformed {
                        what: "event subscription",
                        detail: format!("the subscribing task failed: {e}"),
                    })?;
                    break answered.map_err(|status| {
                        self.status_error("Events.Subscribe", status, || "event stream".into())
                    })?.into_inner();
                }
                _ = tokio::time::sleep(MARKER_EVERY) => {}
            }
            if started.elapsed() > SUBSCRIBE_LIMIT {
                return Err(StoreError::Unavailable {
                    address: self.address.to_string(),
                    detail: format!(
                        "Events.Subscribe sent nothing within {SUBSCRIBE_LIMIT:?}, not even our own marker event"
                    ),
                });
            }
        };
        let mut stream = stream;
        self.await_marker(&mut stream, &nonce).await?;
        let address = self.address.to_string();
        let events = stream.filter_map(move |item| {
            let address = address.clone();
            async move {
                match item {
                    Ok(envelope) => image_event(&envelope).transpose(),
                    Err(status) => Some(Err(match status.code() {
                        tonic::Code::Unavailable => StoreError::Unavailable {
                            address,
                            detail: super::unavailable_detail(&status),
                        },
                        _ => StoreError::Grpc {
                            op: "Events.Subscribe",
                            status,
                        },
                    })),
                }
            }
        });
        Ok(Box::pin(events))
    }

    async fn publish_marker(&self, nonce: &str) -> Result<(), StoreError> {
        let request = self.request(
            PublishRequest {
                topic: MARKER_TOPIC.to_string(),
                event: Some(prost_types::Any {
                    type_url: MARKER_TYPE.to_string(),
                    value: nonce.as_bytes().to_vec(),
                }),
            },
            None,
        )?;
        self.events()
            .publish(request)
            .await
            .map_err(|status| self.status_error("Events.Publish", status, || "event".into()))?;
        Ok(())
    }

    /// Reads the stream until our marker arrives. Image events before it are
    /// dropped: they happened before the list the caller takes next.
    async fn await_marker(
        &self,
        stream: &mut Streaming<Envelope>,
        nonce: &str,
    ) -> Result<(), StoreError> {
        let wait = async {
            loop {
                match stream.message().await {
                    Ok(Some(envelope)) if is_marker(&envelope, nonce) => return Ok(()),
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        return Err(StoreError::Unavailable {
                            address: self.address.to_string(),
                            detail: "the event stream ended before our marker came back".into(),
                        })
                    }
                    Err(status) => {
                        return Err(
                            self.status_error("Events.Subscribe", status, || "event stream".into())
                        )
                    }
                }
            }
        };
        // Markers published before containerd registered the subscription are lost;
        // one more makes sure a marker follows the registration.
        let republish = async {
            loop {
                tokio::time::sleep(MARKER_EVERY).await;
                self.publish_marker(nonce).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), StoreError>(())
        };
        let limited = tokio::time::timeout(SUBSCRIBE_LIMIT, async {
            tokio::select! {
                done = wait => done,
                failed = republish => failed,
            }
        });
        limited.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                address: self.address.to_string(),
                detail: format!("our marker event did not come back within {SUBSCRIBE_LIMIT:?}"),
            })
        })
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_marker(envelope: &Envelope, nonce: &str) -> bool {
    envelope.topic == MARKER_TOPIC
        && envelope
            .event
            .as_ref()
            .is_some_and(|any| any.value == nonce.as_bytes())
}

/// The image event in an envelope; `None` for anything else (our markers).
fn image_event(envelope: &Envelope) -> Result<Option<ImageEvent>, StoreError> {
    let Some(any) = envelope.event.as_ref() else {
        return Ok(None);
    };
    let malformed = |e: prost::DecodeError| StoreError::Malformed {
        what: "image event",
        detail: format!("{}: {e}", envelope.topic),
    };
    let event = match envelope.topic.as_str() {
        TOPIC_CREATE => ImageEvent::Changed {
            name: ImageCreate::decode(any.value.as_slice())
                .map_err(malformed)?
                .name,
        },
        TOPIC_UPDATE => ImageEvent::Changed {
            name: ImageUpdate::decode(any.value.as_slice())
                .map_err(malformed)?
                .name,
        },
        TOPIC_DELETE => ImageEvent::Deleted {
            name: ImageDelete::decode(any.value.as_slice())
                .map_err(malformed)?
                .name,
        },
        _ => return Ok(None),
    };
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(topic: &str, value: Vec<u8>) -> Envelope {
        Envelope {
            topic: topic.into(),
            namespace: "k8s.io".into(),
            event: Some(prost_types::Any {
                type_url: String::new(),
                value,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn image_events_decode_by_topic() {
        let create = ImageCreate {
            name: "docker.io/library/a:1".into(),
            ..Default::default()
        };
        assert_eq!(
            image_event(&envelope(TOPIC_CREATE, create.encode_to_vec())).unwrap(),
            Some(ImageEvent::Changed {
                name: "docker.io/library/a:1".into()
            })
        );
        let delete = ImageDelete { name: "b".into() };
        assert_eq!(
            image_event(&envelope(TOPIC_DELETE, delete.encode_to_vec())).unwrap(),
            Some(ImageEvent::Deleted { name: "b".into() })
        );
        assert_eq!(
            image_event(&envelope(MARKER_TOPIC, b"n".to_vec())).unwrap(),
            None
        );
        assert!(is_marker(&envelope(MARKER_TOPIC, b"n".to_vec()), "n"));
        assert!(!is_marker(&envelope(MARKER_TOPIC, b"m".to_vec()), "n"));
        assert!(matches!(
            image_event(&envelope(TOPIC_UPDATE, vec![0xff, 0xff])),
            Err(StoreError::Malformed { .. })
        ));
    }
}
