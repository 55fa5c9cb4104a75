//! `[pull] prepull`: images the node must hold before pods arrive (the sandbox
//! image above all, which containerd would otherwise pull itself, with its own
//! credentials and policy), pulled at start-up in the background. Each is retried
//! until it is in, waiting 1 s, 2 s, 4 s, … up to 5 min between attempts: a registry
//! that is down at boot, or a policy file fixed later (they are reloaded), is
//! picked up without a restart. Pulls go through the same path as kubelet's, with
//! the node's credentials.

use crate::puller::Puller;
use std::time::Duration;
use tokio::task::JoinHandle;

const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(300);

/// Starts one background task per image. The tasks end once their image is in.
pub fn spawn(puller: &Puller, images: &[String]) -> Vec<JoinHandle<()>> {
    images
        .iter()
        .map(|name| tokio::spawn(prepull(puller.clone(), name.clone())))
        .collect()
}

async fn prepull(puller: Puller, name: String) {
    let mut delay = FIRST_DELAY;
    for attempt in 1u32.. {
        match puller.pull_name(&name, None).await {
            Ok(pulled) => {
                tracing::info!(image = %name, image_id = %pulled.image_id, attempt, "pre-pulled");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    image = %name,
                    attempt,
                    error = %e,
                    retry_in_s = delay.as_secs(),
                    "pre-pull failed; will retry"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
    }
}
