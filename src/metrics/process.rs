//! The standard `process_*` series (as the Go and Python clients export them), read
//! from `/proc/self` at each scrape. A value that cannot be read is left out rather
//! than reported wrong.

use std::fmt::Write as _;

/// Linux reports CPU times in `/proc` in USER_HZ ticks, which the kernel ABI fixes at
/// 100 a second on every architecture we build for.
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct Process {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// Appends the `process_*` families to `out`.
pub fn render(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    let process = Process {
        open_fds,
        ..parse(&stat, &status, &limits, &boot)
    };
    process.render(out);
}

fn parse(stat: &str, status: &str, limits: &str, proc_stat: &str) -> Process {
    // The command name (field 2) may hold spaces and parentheses; fields after the
    // last ')' do not. Index 0 here is field 3 (state).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let cpu_seconds = field(14)
        .zip(field(15))
        .map(|(user, system)| (user + system) as f64 / TICKS_PER_SECOND);
    let boot_time = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let start_time_seconds = boot_time
        .zip(field(22))
        .map(|(boot, ticks)| boot as f64 + ticks as f64 / TICKS_PER_SECOND);
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<u64>().ok());
    Process {
        cpu_seconds,
        resident_bytes: kib("VmRSS:"),
        virtual_bytes: kib("VmSize:"),
        start_time_seconds,
        open_fds: None,
        max_fds,
    }
}

impl Process {
    fn render(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
                );
            }
        };
        let text = |v: Option<u64>| v.map(|v| v.to_string());
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.map(|v| v.to_string()),
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            text(self.resident_bytes),
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            text(self.virtual_bytes),
        );
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.map(|v| v.to_string()),
        );
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            text(self.open_fds),
        );
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            text(self.max_fds),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_files_as_the_kernel_writes_them() {
        let stat = "4242 (cri imaged) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 130 0 0 20 0 9 0 123456 2000000 3000 18446744073709551615";
        let status = "Name:\tcri-imaged\nVmSize:\t  123456 kB\nVmRSS:\t   20480 kB\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let p = parse(stat, status, limits, proc_stat);
        assert_eq!(
            p,
            Process {
                cpu_seconds: Some(3.8),
                resident_bytes: Some(20480 * 1024),
                virtual_bytes: Some(123456 * 1024),
                start_time_seconds: Some(1700000000.0 + 1234.56),
                open_fds: None,
                max_fds: Some(1024),
            }
        );
    }

    #[test]
    fn this_process_reports_every_series() {
        let mut out = String::new();
        render(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(
                out.contains(&format!("\n{name} ")),
                "{name} missing:\n{out}"
            );
        }
    }
}
