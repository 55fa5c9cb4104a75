//! What a containerd holds, read with `ctr` rather than through cri-imaged's own store
//! code (an independent witness): image records, content labels, committed snapshots,
//! and the chain IDs a test expects them under.

use std::collections::BTreeMap;

use super::containerd::Containerd;

/// The label containerd's CRI puts on every image record it manages.
pub const LABEL_CRI_MANAGED: &str = "io.cri-containerd.image";

/// One row of `ctr images ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub name: String,
    /// The target's media type.
    pub media_type: String,
    /// The target's digest.
    pub target: String,
    pub labels: BTreeMap<String, String>,
}

/// One row of `ctr content ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRow {
    pub digest: String,
    pub labels: BTreeMap<String, String>,
}

impl Containerd {
    /// Every image record in `k8s.io`, sorted by name.
    pub fn image_records(&self) -> Vec<ImageRow> {
        // Columns: REF TYPE DIGEST SIZE (two words: "2.6 MiB") PLATFORMS LABELS;
        // labels are `k=v` joined by ',' or `-`, never containing spaces.
        let mut rows: Vec<ImageRow> = self
            .ctr_ok(&["images", "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.len() < 4 {
                    return None;
                }
                Some(ImageRow {
                    name: words[0].to_owned(),
                    media_type: words[1].to_owned(),
                    target: words[2].to_owned(),
                    labels: parse_labels(words[words.len() - 1]),
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Every blob in the content store (`ctr content ls`).
    pub fn content(&self) -> Vec<ContentRow> {
        // Columns: DIGEST SIZE AGE (several words) LABELS (last, without spaces).
        self.ctr_ok(&["content", "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.len() < 3 || !words[0].starts_with("sha256:") {
                    return None;
                }
                Some(ContentRow {
                    digest: words[0].to_owned(),
                    labels: parse_labels(words[words.len() - 1]),
                })
            })
            .collect()
    }

    /// The labels of blob `digest`, or `None` if the content store does not have it.
    pub fn content_labels(&self, digest: &str) -> Option<BTreeMap<String, String>> {
        self.content()
            .into_iter()
            .find(|row| row.digest == digest)
            .map(|row| row.labels)
    }

    /// `(kind, parent)` of snapshot `key` in this containerd's snapshotter, or `None`
    /// if there is no such snapshot.
    pub fn snapshot(&self, key: &str) -> Option<(String, String)> {
        let out = self.ctr(&[
            "snapshots",
            "--snapshotter",
            self.snapshotter(),
            "info",
            key,
        ]);
        if !out.status.success() {
            return None;
        }
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ctr snapshots info {key}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let text = |field: &str| info[field].as_str().unwrap_or_default().to_owned();
        Some((text("Kind"), text("Parent")))
    }
}

/// `a=b,c=d` (or `-`) as a map.
fn parse_labels(field: &str) -> BTreeMap<String, String> {
    if field == "-" {
        return BTreeMap::new();
    }
    field
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The OCI chain IDs of a stack of layers: the first is its diff ID, each next one
/// `sha256(previous + " " + diff_id)`. Computed here, independently of the daemon.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match ids.last() {
            None => diff_id.clone(),
            Some(previous) => format!(
                "sha256:{}",
                hex::encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    format!("{previous} {diff_id}").as_bytes()
                ))
            ),
        };
        ids.push(next);
    }
    ids
}
