//! OCI / Docker image documents: media types, descriptors, manifests, indexes and
//! the parts of the image config the daemon reads.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header for manifest requests: every format we can pull.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// What a manifest-ish media type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    Index,
    Manifest,
    Schema1,
    Unknown,
}

pub fn manifest_kind(media_type: &str) -> ManifestKind {
    match media_type {
        OCI_INDEX | DOCKER_LIST => ManifestKind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Manifest,
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => ManifestKind::Schema1,
        _ => ManifestKind::Unknown,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: None,
            urls: Vec::new(),
        }
    }
}

/// An image index / Docker manifest list.
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config (`application/vnd.oci.image.config.v1+json`) we use.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ContainerConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    /// The chain IDs of the layers, bottom to top (OCI image spec: ChainID(L0) =
    /// DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))).
    pub fn chain_ids(&self) -> Vec<Digest> {
        chain_ids(&self.rootfs.diff_ids)
    }
}

pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => Digest::of(format!("{parent} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Whether a layer media type is one containerd's differ can apply.
pub fn is_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid index and manifest, the seeds the fuzzer mutates.
    const SEED_INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":7,"platform":{"os":"linux","architecture":"amd64"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":7,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
    const SEED_MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":3,"annotations":{"a":"b"}}]}"#;

    /// `seed` with random edits: bytes replaced, inserted and removed.
    fn mutated(seed: &str) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let len = seed.len();
        let seed = seed.as_bytes().to_vec();
        proptest::collection::vec((0..len, any::<u8>(), 0u8..3), 0..8).prop_map(move |edits| {
            let mut bytes = seed.clone();
            for (at, byte, op) in edits {
                let at = at.min(bytes.len().saturating_sub(1));
                match op {
                    0 if !bytes.is_empty() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            bytes
        })
    }

    proptest::proptest! {
        // Fuzzing the manifest and index parsers on the stable toolchain: a fixed
        // number of cases in CI, more by hand with PROPTEST_CASES=100000.
        #[test]
        fn mutated_indexes_parse_or_fail_and_platform_selection_holds(bytes in mutated(SEED_INDEX)) {
            if let Ok(index) = serde_json::from_slice::<Index>(&bytes) {
                let host = crate::platform::PlatformSpec::host();
                if let Some(chosen) = host.select(&index.manifests) {
                    proptest::prop_assert!(chosen.platform.as_ref().is_some_and(|p| host.matches(p)));
                }
            }
        }

        #[test]
        fn mutated_manifests_parse_or_fail(bytes in mutated(SEED_MANIFEST), media_type in "\\PC{0,60}") {
            if let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) {
                for layer in &manifest.layers {
                    let _ = is_layer(&layer.media_type);
                }
            }
            let _ = manifest_kind(&media_type);
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn classifies_manifest_media_types() {
        assert_eq!(manifest_kind(OCI_INDEX), ManifestKind::Index);
        assert_eq!(manifest_kind(DOCKER_MANIFEST), ManifestKind::Manifest);
        assert_eq!(manifest_kind(DOCKER_SCHEMA1_SIGNED), ManifestKind::Schema1);
        assert_eq!(manifest_kind("text/html"), ManifestKind::Unknown);
    }
}
