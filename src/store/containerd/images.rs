//! containerd's image service: the named records (tag, digest and ID names) that
//! make an image visible to containerd's CRI and keep its content from GC.

use super::{from_proto_labels, to_proto_labels, ContainerdStore};
use crate::oci::Descriptor;
use crate::store::{ImageRecord, StoreError};
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, ListImagesRequest,
    UpdateImageRequest,
};
use containerd_client::types;
use tonic::transport::Channel;
use tonic::Code;

/// A node may hold many images; tonic's default 4 MiB response limit is too tight
/// for a full list with labels.
const MAX_LIST_RESPONSE: usize = 64 << 20;

impl ContainerdStore {
    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone()).max_decoding_message_size(MAX_LIST_RESPONSE)
    }

    pub(super) async fn images_list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let request = self.request(ListImagesRequest::default(), None)?;
        let images = self
            .images()
            .list(request)
            .await
            .map_err(|status| self.status_error("Images.List", status, || "images".into()))?
            .into_inner()
            .images;
        // One record another tool wrote oddly (a non-sha256 target, say) must not
        // hide every other image from kubelet: skip it, loudly.
        Ok(images
            .into_iter()
            .filter_map(|image| {
                let name = image.name.clone();
                image_record(image)
                    .map_err(|e| tracing::warn!(image = %name, error = %e, "skipping an image record we cannot read"))
                    .ok()
            })
            .collect())
    }

    pub(super) async fn images_get(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let request = self.request(
            GetImageRequest {
                name: name.to_string(),
            },
            None,
        )?;
        match self.images().get(request).await {
            Ok(response) => response.into_inner().image.map(image_record).transpose(),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.status_error("Images.Get", status, || format!("image {name}"))),
        }
    }

    pub(super) async fn images_put(&self, record: ImageRecord) -> Result<(), StoreError> {
        let image = Image {
            name: record.name.clone(),
            labels: to_proto_labels(&record.labels),
            target: Some(to_proto_descriptor(&record.target)),
            ..Default::default()
        };
        let request = self.request(
            CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            },
            None,
        )?;
        let status = match self.images().create(request).await {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        if status.code() != Code::AlreadyExists {
            return Err(
                self.status_error("Images.Create", status, || format!("image {}", record.name))
            );
        }
        // As containerd's CRI does: leave the record alone when it already says this
        // (no update event), and otherwise set the target and only our labels, so
        // labels others put there (containerd 1.7's pin, say) survive a re-pull.
        if let Some(existing) = self.images_get(&record.name).await? {
            let ours_present = record
                .labels
                .iter()
                .all(|(k, v)| existing.labels.get(k) == Some(v));
            if existing.target == record.target && ours_present {
                return Ok(());
            }
        }
        let mut paths = vec!["target".to_string()];
        paths.extend(record.labels.keys().map(|k| format!("labels.{k}")));
        let request = self.request(
            UpdateImageRequest {
                image: Some(image),
                update_mask: Some(prost_types::FieldMask { paths }),
                ..Default::default()
            },
            None,
        )?;
        self.images().update(request).await.map_err(|status| {
            self.status_error("Images.Update", status, || format!("image {}", record.name))
        })?;
        Ok(())
    }

    pub(super) async fn images_delete(&self, name: &str, sync: bool) -> Result<(), StoreError> {
        let request = self.request(
            DeleteImageRequest {
                name: name.to_string(),
                sync,
                ..Default::default()
            },
            None,
        )?;
        match self.images().delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => {
                Err(self.status_error("Images.Delete", status, || format!("image {name}")))
            }
        }
    }
}

fn image_record(image: Image) -> Result<ImageRecord, StoreError> {
    let target = image.target.ok_or_else(|| StoreError::Malformed {
        what: "image record",
        detail: format!("image {} has no target", image.name),
    })?;
    Ok(ImageRecord {
        target: from_proto_descriptor(target)?,
        labels: from_proto_labels(image.labels),
        name: image.name,
    })
}

pub(super) fn to_proto_descriptor(descriptor: &Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: descriptor.media_type.clone(),
        digest: descriptor.digest.to_string(),
        // Sizes past i64::MAX do not exist; saturate rather than wrap.
        size: i64::try_from(descriptor.size).unwrap_or(i64::MAX),
        annotations: descriptor
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn from_proto_descriptor(descriptor: types::Descriptor) -> Result<Descriptor, StoreError> {
    let digest = descriptor
        .digest
        .parse()
        .map_err(|error: crate::digest::DigestError| StoreError::Malformed {
            what: "descriptor digest",
            detail: error.to_string(),
        })?;
    let size = u64::try_from(descriptor.size).map_err(|error| StoreError::Malformed {
        what: "descriptor size",
        detail: format!("{}: {error}", descriptor.size),
    })?;
    let mut out = Descriptor::new(descriptor.media_type, digest, size);
    if !descriptor.annotations.is_empty() {
        out.annotations = Some(descriptor.annotations.into_iter().collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use std::collections::BTreeMap;

    #[test]
    fn descriptor_round_trips_through_proto() {
        let mut descriptor = Descriptor::new(
            "application/vnd.oci.image.manifest.v1+json",
            Digest::of(b"manifest"),
            8,
        );
        descriptor.annotations = Some(BTreeMap::from([("a".into(), "b".into())]));
        let back = from_proto_descriptor(to_proto_descriptor(&descriptor)).unwrap();
        assert_eq!(back, descriptor);
    }

    #[test]
    fn malformed_target_digest_is_reported() {
        let image = Image {
            name: "x".into(),
            target: Some(types::Descriptor {
                digest: "sha256:nothex".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            image_record(image),
            Err(StoreError::Malformed { .. })
        ));
    }
}
