//! A value built from configuration files, built again when they change: each
//! [`Reloading::get`] stats the files (a few syscalls, nothing next to a pull) and
//! reloads only when one of them changed, appeared or went away. A version that does
//! not load is logged once and the last good value stays in force.

use crate::file_stamp::Seen;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

type Loader<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;
type Watched = Box<dyn Fn() -> Vec<PathBuf> + Send + Sync>;

pub struct Reloading<T> {
    /// What the files are, for the log (`registries.conf`, `policy.json`).
    what: &'static str,
    /// The paths that make up the value now (a directory's own stamp tells when a
    /// file is added to it or removed).
    watched: Watched,
    load: Loader<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    stamps: Vec<(PathBuf, Seen)>,
    value: Arc<T>,
}

impl<T> Reloading<T> {
    /// Loads the value once; an error here is the caller's (the daemon refuses to
    /// start on a broken file).
    pub fn new<E: std::fmt::Display>(
        what: &'static str,
        watched: impl Fn() -> Vec<PathBuf> + Send + Sync + 'static,
        load: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let stamps = stamps(&watched());
        let value = Arc::new(load()?);
        Ok(Reloading {
            what,
            watched: Box::new(watched),
            load: Box::new(move || load().map_err(|e| e.to_string())),
            state: Mutex::new(State { stamps, value }),
        })
    }

    /// The current value, reloaded first if a file changed.
    pub fn get(&self) -> Arc<T> {
        let now = stamps(&(self.watched)());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now == state.stamps {
            return state.value.clone();
        }
        match (self.load)() {
            Ok(value) => {
                tracing::info!(what = self.what, "configuration changed; reloaded");
                state.value = Arc::new(value);
            }
            Err(error) => tracing::error!(
                what = self.what,
                %error,
                "configuration changed but does not load; keeping the last good one"
            ),
        }
        state.stamps = now;
        state.value.clone()
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<(PathBuf, Seen)> {
    paths.iter().map(|p| (p.clone(), Seen::of(p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_on_change_and_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let file = path.clone();
        let watched = path.clone();
        let r = Reloading::new(
            "number",
            move || vec![watched.clone()],
            move || {
                std::fs::read_to_string(&file)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| e.to_string())
            },
        )
        .unwrap();
        assert_eq!(*r.get(), 1);
        std::fs::write(&path, "22").unwrap();
        assert_eq!(*r.get(), 22);
        std::fs::write(&path, "not a number").unwrap();
        assert_eq!(*r.get(), 22, "a broken version keeps the last good value");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(*r.get(), 22);
        std::fs::write(&path, "333").unwrap();
        assert_eq!(*r.get(), 333);
    }
}
