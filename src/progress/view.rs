//! Text for `cri-imaged pulls`: a table of the pulls in flight (with a progress bar
//! per pull when it is redrawn in a terminal), and one plain line per pull for logs.
//! Pure functions over a [`Pulls`] snapshot; the terminal handling is the caller's.

use super::{PullStatus, Pulls};

/// What is printed when nothing is being pulled.
pub const NOTHING_IN_FLIGHT: &str = "no pulls in flight";

const HEADER: [&str; 8] = [
    "IMAGE", "SOURCE", "STATE", "LAYERS", "BYTES", "RATE", "ETA", "DONE",
];

/// The table: a header and one row per pull, columns padded; with `bar` (its width
/// in cells) the last column is a progress bar and a percentage. Nothing in flight:
/// one line saying so.
pub fn table(pulls: &Pulls, bar: Option<usize>) -> Vec<String> {
    if pulls.pulls.is_empty() {
        return vec![NOTHING_IN_FLIGHT.to_string()];
    }
    let rows: Vec<[String; 8]> = pulls.pulls.iter().map(|p| cells(p, bar)).collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = HEADER.map(str::to_string);
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let padded: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            padded.join("  ").trim_end().to_string()
        })
        .collect()
}

/// One pull on one line, `key value` pairs after the image, for logs and pipes.
pub fn line(p: &PullStatus) -> String {
    let [image, source, state, layers, bytes, rate, eta, done] = cells(p, None);
    format!("{image} source {source} state {state} layers {layers} bytes {bytes} rate {rate} eta {eta} done {done}")
}

fn cells(p: &PullStatus, bar: Option<usize>) -> [String; 8] {
    let source = p
        .source
        .as_ref()
        .map_or("-".to_string(), |s| format!("{} {}", s.kind, s.registry));
    let layers = format!("{}/{}", p.layers.done, or_unknown(p.layers.total));
    let bytes_text = match p.bytes.total {
        Some(total) => format!("{}/{}", bytes(p.bytes.done), bytes(total)),
        None => format!("{}/?", bytes(p.bytes.done)),
    };
    let rate = p
        .bytes_per_second
        .map_or("-".to_string(), |r| format!("{}/s", bytes(r)));
    let eta = p.eta_seconds.map_or("-".to_string(), duration);
    let fraction = p
        .bytes
        .total
        .filter(|t| *t > 0)
        .map(|t| (p.bytes.done as f64 / t as f64).min(1.0));
    let percent = fraction.map_or("-".to_string(), |f| format!("{:.0}%", f * 100.0));
    let done = match bar {
        Some(width) => format!("{} {percent}", progress_bar(fraction.unwrap_or(0.0), width)),
        None => percent,
    };
    [
        p.image.clone(),
        source,
        p.state.to_string(),
        layers,
        bytes_text,
        rate,
        eta,
        done,
    ]
}

fn or_unknown(n: Option<u64>) -> String {
    n.map_or("?".to_string(), |n| n.to_string())
}

/// `[#####-----]`, `width` cells between the brackets.
pub fn progress_bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Decimal units, as registries and `docker pull` show sizes: `512B`, `1.5kB`, `12.3MB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// `45s`, `3m05s`, `2h07m`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
    }
}

/// `line` cut to `width` characters (a redrawn screen must not wrap).
pub fn fit(line: &str, width: usize) -> String {
    line.chars().take(width).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Bytes, Layers, PullState, SourceStatus};

    fn pull() -> PullStatus {
        PullStatus {
            id: 1,
            image: "example.com/app:1".into(),
            source: Some(SourceStatus {
                registry: "mirror.local:5000".into(),
                kind: "mirror".into(),
            }),
            state: PullState::Downloading,
            layers: Layers {
                done: 1,
                unpacked: 0,
                total: Some(3),
            },
            bytes: Bytes {
                done: 1_500_000,
                total: Some(3_000_000),
            },
            bytes_per_second: Some(250_000),
            eta_seconds: Some(6),
            started: "2026-11-30T18:00:00Z".into(),
            elapsed_seconds: 6.0,
        }
    }

    #[test]
    fn units() {
        assert_eq!(bytes(999), "999B");
        assert_eq!(bytes(1_500), "1.5kB");
        assert_eq!(bytes(12_345_678), "12.3MB");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(7_620), "2h07m");
        assert_eq!(progress_bar(0.5, 10), "[#####-----]");
        assert_eq!(progress_bar(2.0, 4), "[####]");
    }

    #[test]
    fn table_rows_line_up_under_the_header() {
        let lines = table(
            &Pulls {
                pulls: vec![pull()],
            },
            Some(10),
        );
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("IMAGE "), "{}", lines[0]);
        assert_eq!(lines[0].find("LAYERS"), lines[1].find("1/3"), "{lines:?}");
        for want in [
            "mirror mirror.local:5000",
            "downloading",
            "1.5MB/3.0MB",
            "250.0kB/s",
            "6s",
            "[#####-----] 50%",
        ] {
            assert!(lines[1].contains(want), "{want} in {}", lines[1]);
        }
    }

    #[test]
    fn nothing_in_flight_is_said() {
        assert_eq!(table(&Pulls { pulls: vec![] }, None), [NOTHING_IN_FLIGHT]);
    }

    #[test]
    fn a_queued_pull_shows_unknowns() {
        let mut p = pull();
        p.source = None;
        p.state = PullState::Queued;
        p.layers.total = None;
        p.bytes = Bytes {
            done: 0,
            total: None,
        };
        p.bytes_per_second = None;
        p.eta_seconds = None;
        assert_eq!(
            line(&p),
            "example.com/app:1 source - state queued layers 1/? bytes 0B/? rate - eta - done -"
        );
    }
}
