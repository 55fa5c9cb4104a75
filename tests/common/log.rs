//! The daemon code's log, captured in memory for tests to read.

/// Everything this test binary's daemon code logged at debug, all tests together.
/// One global subscriber, set before any test logs: a thread-local one per test
/// (`set_default`) misses events now and then when tests run in parallel (tracing
/// caches a callsite's interest across dispatchers). Tests find their own lines by
/// their unique paths and references.
pub fn captured_log() -> String {
    let buffer = log_buffer().lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&buffer).into_owned()
}

fn log_buffer() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    static BUFFER: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Captured(buffer.clone());
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_env_filter("cri_imaged=debug")
                .with_ansi(false)
                .with_writer(writer)
                .finish(),
        );
        buffer
    })
}

/// Starts capturing the daemon code's log (see [`captured_log`]) before the test's
/// first event.
pub fn capture_log() {
    log_buffer();
}

#[derive(Clone)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}
