//! Pieces the benchmarks share: process RSS and CPU time from `/proc`,
//! medians over rounds, bounded latency samples with percentiles, a server
//! thread of its own, and plain-text / Markdown tables.

use std::fmt::Write as _;
use std::time::Duration;

/// Resident set size of `pid` in MiB (`VmRSS`), NaN when unknown (no pid, the
/// process gone, or a `/proc` without the field): a figure to print, never
/// something to fail the run over.
pub fn rss_mib(pid: Option<u32>) -> f64 {
    pid.and_then(|pid| status_kib(pid, "VmRSS:"))
        .map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

/// Peak resident set size of `pid` in MiB (`VmHWM`), NaN when unknown.
pub fn peak_rss_mib(pid: Option<u32>) -> f64 {
    pid.and_then(|pid| status_kib(pid, "VmHWM:"))
        .map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time `pid` has used so far (user + system, all threads), in ms.
pub fn cpu_ms(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    parse_stat_cpu_ticks(&stat).map(|ticks| ticks as f64 * 1000.0 / clock_ticks_per_sec())
}

/// `utime + stime` from the text of `/proc/<pid>/stat`. The command name
/// (field 2) is in parentheses and may itself hold spaces or ')', so fields
/// are counted from the last ')': after it come state (field 3), ...,
/// utime (field 14) and stime (field 15).
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The median (mean of the middle two for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Latency samples in µs, at most `cap` of them: past the cap, reservoir
/// sampling keeps a uniform sample of everything recorded, so a long run
/// neither grows without bound nor biases the percentiles towards its start.
#[derive(Clone, Debug)]
pub struct Latencies {
    samples: Vec<f64>,
    cap: usize,
    seen: u64,
}

impl Latencies {
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Latencies {
            samples: Vec::with_capacity(cap.min(64 * 1024)),
            cap,
            seen: 0,
        }
    }

    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_secs_f64() * 1e6);
    }

    pub fn record_us(&mut self, us: f64) {
        self.seen += 1;
        if self.samples.len() < self.cap {
            self.samples.push(us);
        } else {
            let j = rand::random_range(0..self.seen);
            if let Ok(j) = usize::try_from(j) {
                if j < self.cap {
                    self.samples[j] = us;
                }
            }
        }
    }

    /// Adds another set's samples (e.g. one per worker), within this set's cap.
    pub fn merge(&mut self, other: Latencies) {
        for us in other.samples {
            self.record_us(us);
        }
    }

    /// How many were recorded (kept or not).
    pub fn count(&self) -> u64 {
        self.seen
    }

    /// Nearest-rank percentiles (`ps` in 0–1) in µs; NaN when empty.
    pub fn percentiles<const N: usize>(&mut self, ps: [f64; N]) -> [f64; N] {
        self.samples.sort_by(|a, b| a.total_cmp(b));
        let n = self.samples.len();
        ps.map(|p| {
            if n == 0 {
                return f64::NAN;
            }
            let rank = (p * n as f64).ceil() as usize;
            self.samples[rank.clamp(1, n) - 1]
        })
    }
}

/// A current-thread Tokio runtime on a thread of its own, as a server
/// process would have: "direct" then means client thread ↔ server thread,
/// never two tasks that happen to share one.
pub fn server_runtime(name: &str) -> anyhow::Result<tokio::runtime::Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(std::future::pending::<()>());
        })?;
    Ok(rx.recv()??)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table of figures, printed with aligned columns or as Markdown (for
/// pasting into docs/performance.md).
#[derive(Clone, Debug, Default)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Table {
            columns: columns.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn cell(&self, row: usize, col: usize) -> &str {
        self.rows[row].get(col).map_or("", String::as_str)
    }

    /// Aligned plain text, a dashed line under the header.
    pub fn render(&self) -> String {
        let width = |c: usize| {
            (0..self.rows.len())
                .map(|r| self.cell(r, c).chars().count())
                .chain([self.columns[c].0.chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (c, text) in cells.enumerate() {
                let pad = widths[c].saturating_sub(text.chars().count());
                if c > 0 {
                    out.push_str("  ");
                }
                match self.columns[c].1 {
                    Align::Left => {
                        out.push_str(text);
                        out.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        out.extend(std::iter::repeat_n(' ', pad));
                        out.push_str(text);
                    }
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(&mut self.columns.iter().map(|(h, _)| h.as_str()));
        out.push('\n');
        let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for r in 0..self.rows.len() {
            out.push_str(&line(&mut (0..self.columns.len()).map(|c| self.cell(r, c))));
            out.push('\n');
        }
        out
    }

    /// A Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = String::from("|");
        for (h, _) in &self.columns {
            let _ = write!(out, " {h} |");
        }
        out.push_str("\n|");
        for (_, a) in &self.columns {
            out.push_str(if *a == Align::Right { "---:|" } else { "---|" });
        }
        out.push('\n');
        for r in 0..self.rows.len() {
            out.push('|');
            for c in 0..self.columns.len() {
                let _ = write!(out, " {} |", self.cell(r, c));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_paren() {
        // comm with a space and a ')' of its own; utime 7, stime 5.
        let stat = "42 (we ird) x) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(12));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_has_rss_and_cpu() {
        let me = Some(std::process::id());
        assert!(rss_mib(me) > 0.0);
        assert!(peak_rss_mib(me) >= rss_mib(me) * 0.5);
        assert!(cpu_ms(me).is_some());
        assert!(rss_mib(None).is_nan());
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        let mut l = Latencies::new(10_000);
        for us in 1..=1000 {
            l.record_us(us as f64);
        }
        assert_eq!(
            l.percentiles([0.5, 0.99, 0.999, 1.0]),
            [500.0, 990.0, 999.0, 1000.0]
        );
        assert!(Latencies::new(4).percentiles([0.5])[0].is_nan());
    }

    #[test]
    fn reservoir_stays_bounded_and_uniform() {
        let mut l = Latencies::new(1000);
        for us in 0..100_000 {
            l.record_us(us as f64);
        }
        assert_eq!(l.count(), 100_000);
        let [p50] = l.percentiles([0.5]);
        assert!((40_000.0..60_000.0).contains(&p50), "p50 {p50}");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&[("path", Align::Left), ("rps", Align::Right)]);
        t.row(vec!["direct".into(), "12345".into()]);
        t.row(vec!["L4".into()]);
        assert_eq!(
            t.render(),
            "path      rps\n-------------\ndirect  12345\nL4\n"
        );
        assert!(t
            .markdown()
            .starts_with("| path | rps |\n|---|---:|\n| direct | 12345 |"));
    }
}
