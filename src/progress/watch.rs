//! `cri-imaged pulls`: the pulls in flight read from the status socket and printed
//! once, or with `--watch` redrawn in place on a terminal (plain ANSI escapes: cursor
//! up, clear to the end of the screen; the size from `TIOCGWINSZ`), or as plain
//! lines, without escapes, when stdout is not a terminal.

use super::view::{self, NOTHING_IN_FLIGHT};
use super::Pulls;
use crate::client::{self, StatusError};
use std::io::{IsTerminal as _, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Cells between the brackets of each pull's progress bar.
const BAR_WIDTH: usize = 24;

/// Prints the table of pulls in flight once.
pub async fn once(socket: &Path) -> Result<(), StatusError> {
    let pulls = client::pulls(socket).await?;
    let mut out = std::io::stdout().lock();
    for line in view::table(&pulls, None) {
        // A closed pipe (`| head`) ends the output quietly.
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    Ok(())
}

/// Shows the pulls in flight every `interval` until interrupted (or stdout closes).
/// The daemon going away is shown and retried, not fatal.
pub async fn watch(socket: &Path, interval: Duration) {
    if std::io::stdout().is_terminal() {
        redraw(socket, interval).await
    } else {
        plain(socket, interval).await
    }
}

async fn redraw(socket: &Path, interval: Duration) {
    let mut out = std::io::stdout();
    // Hide the cursor while redrawing.
    let _ = write!(out, "\x1b[?25l");
    let mut drawn = 0;
    loop {
        let (width, height) = terminal_size();
        let mut lines = match client::pulls(socket).await {
            Ok(pulls) => view::table(&pulls, Some(BAR_WIDTH)),
            Err(e) => vec![format!("cri-imaged: {e}")],
        };
        // The frame must fit the screen, or scrolling breaks the next redraw.
        let room = height.saturating_sub(1).max(1);
        if lines.len() > room {
            let hidden = lines.len() - room + 1;
            lines.truncate(room - 1);
            lines.push(format!("… and {hidden} more"));
        }
        let mut frame = String::new();
        if drawn > 0 {
            frame.push_str(&format!("\x1b[{drawn}F"));
        }
        frame.push_str("\x1b[J");
        for line in &lines {
            frame.push_str(&view::fit(line, width));
            frame.push('\n');
        }
        if out
            .write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
        drawn = lines.len();
        if !pause(interval).await {
            break;
        }
    }
    let _ = write!(out, "\x1b[?25h");
    let _ = out.flush();
}

/// One line per pull per refresh, each starting with the time; "no pulls in
/// flight" once each time the daemon goes idle.
async fn plain(socket: &Path, interval: Duration) {
    let mut out = std::io::stdout();
    let mut idle_said = false;
    let mut last_error = String::new();
    loop {
        let now = crate::timestamp::system(SystemTime::now());
        let lines = match client::pulls(socket).await {
            Ok(Pulls { pulls }) if pulls.is_empty() => {
                let said = idle_said;
                idle_said = true;
                last_error.clear();
                if said {
                    Vec::new()
                } else {
                    vec![format!("{now} {NOTHING_IN_FLIGHT}")]
                }
            }
            Ok(Pulls { pulls }) => {
                idle_said = false;
                last_error.clear();
                pulls
                    .iter()
                    .map(|p| format!("{now} {}", view::line(p)))
                    .collect()
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    eprintln!("cri-imaged: {e}");
                    last_error = e;
                }
                Vec::new()
            }
        };
        for line in lines {
            if writeln!(out, "{line}").is_err() {
                return;
            }
        }
        if out.flush().is_err() || !pause(interval).await {
            return;
        }
    }
}

/// Waits `interval`; false on Ctrl-C.
async fn pause(interval: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(interval) => true,
        _ = tokio::signal::ctrl_c() => false,
    }
}

/// (columns, rows) of the terminal on stdout; 80×24 when it will not say.
fn terminal_size() -> (usize, usize) {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(size) if size.ws_col > 0 && size.ws_row > 0 => {
            (usize::from(size.ws_col), usize::from(size.ws_row))
        }
        _ => (80, 24),
    }
}
