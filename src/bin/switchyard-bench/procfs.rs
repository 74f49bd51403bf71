//! What `/proc` says about the processes under test: peak RSS, and where the CPU time went.
//!
//! CPU shares are of the whole machine (every core) over a measured window, from utime+stime
//! deltas: the Switchyard process(es), the Postgres processes serving the scenario's database
//! (its backends and autovacuum workers, plus that server's WAL writer, checkpointer and
//! background writer, which every database on it shares), the bench process itself split into loader and sink thread, and the
//! rest of the machine's busy time ("other": other processes and kernel work no process is
//! charged for). A backend that exits inside the window (a pool recycles its connections every
//! 30 minutes) still counts: the postmaster is charged its children's time once it reaps them,
//! so every exited child counts as Postgres's, whatever database it served.

use std::collections::HashMap;
use std::fs;

use serde::Serialize;

/// Peak resident set (`VmHWM`) of `pid`, in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_kb(pid, "VmHWM:").map(|kb| kb as f64 / 1024.0)
}

/// Current resident set (`VmRSS`) of `pid`, in MB.
pub fn rss_mb(pid: u32) -> Option<f64> {
    status_kb(pid, "VmRSS:").map(|kb| kb as f64 / 1024.0)
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// utime + stime of a process or thread (`/proc/.../stat`), in clock ticks.
fn cpu_ticks(stat_path: &str) -> Option<u64> {
    stat_ticks(stat_path, 11)
}

/// cutime + cstime of a process: the time of the children it has reaped, in clock ticks.
fn reaped_children_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"), 13)
}

/// The sum of two adjacent tick fields of a `stat` file, counted after the command name.
fn stat_ticks(stat_path: &str, first: usize) -> Option<u64> {
    let stat = fs::read_to_string(stat_path).ok()?;
    // Fields after the command name, which may itself hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = fields.get(first)?.parse().ok()?;
    let system: u64 = fields.get(first + 1)?.parse().ok()?;
    Some(user + system)
}

/// (busy, all) ticks of every core, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let all: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((all - idle, all))
}

/// The parent of `pid` (`/proc/PID/stat`).
pub fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Children of `postmaster` working for `database`, with their CPU ticks.
fn postgres_ticks(postmaster: u32, database: &str) -> HashMap<u32, u64> {
    let mut ticks = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return ticks;
    };
    let needle = format!(" {database} ");
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if parent(pid) != Some(postmaster) {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        let ours = cmdline.contains(&needle)
            || ["walwriter", "checkpointer", "background writer"]
                .iter()
                .any(|aux| cmdline.contains(aux));
        if ours {
            if let Some(t) = cpu_ticks(&format!("/proc/{pid}/stat")) {
                ticks.insert(pid, t);
            }
        }
    }
    ticks
}

#[derive(Debug, Clone, Default)]
struct Sample {
    machine_busy: u64,
    machine_all: u64,
    switchyard: u64,
    postgres: HashMap<u32, u64>,
    /// The postmaster's reaped children's ticks.
    postgres_exited: u64,
    bench: u64,
    sink: u64,
}

/// The processes a [`CpuMeter`] watches.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    pub switchyard: Vec<u32>,
    /// The Postgres server's main process, when it runs on this machine.
    pub postmaster: Option<u32>,
    /// The scenario's database: its backends count as Postgres's.
    pub database: String,
    pub sink_tid: Option<u32>,
}

/// Measures the CPU split over a window: [`CpuMeter::start`], then [`CpuMeter::finish`].
/// Processes must outlive the window: one that exits inside it takes its ticks along.
pub struct CpuMeter {
    watched: Watched,
    start: Sample,
}

/// Shares of the machine's CPU time (every core) over a window, in percent.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuSplit {
    pub switchyard: f64,
    pub postgres: f64,
    pub loader: f64,
    pub sink: f64,
    pub other: f64,
}

impl CpuMeter {
    pub fn start(watched: Watched) -> CpuMeter {
        let mut meter = CpuMeter {
            watched,
            start: Sample::default(),
        };
        meter.start = meter.sample();
        meter
    }

    fn sample(&self) -> Sample {
        let (machine_busy, machine_all) = machine_ticks().unwrap_or_default();
        Sample {
            machine_busy,
            machine_all,
            switchyard: self
                .watched
                .switchyard
                .iter()
                .filter_map(|pid| cpu_ticks(&format!("/proc/{pid}/stat")))
                .sum(),
            postgres: self
                .watched
                .postmaster
                .map(|pid| postgres_ticks(pid, &self.watched.database))
                .unwrap_or_default(),
            postgres_exited: self
                .watched
                .postmaster
                .and_then(reaped_children_ticks)
                .unwrap_or_default(),
            bench: cpu_ticks("/proc/self/stat").unwrap_or_default(),
            sink: self
                .watched
                .sink_tid
                .and_then(|tid| cpu_ticks(&format!("/proc/self/task/{tid}/stat")))
                .unwrap_or_default(),
        }
    }

    /// The split since [`CpuMeter::start`].
    pub fn finish(&self) -> CpuSplit {
        let end = self.sample();
        let all = end.machine_all.saturating_sub(self.start.machine_all);
        if all == 0 {
            return CpuSplit::default();
        }
        let share = |ticks: u64| ticks as f64 * 100.0 / all as f64;
        // Processes that started during the window count from zero. One that exited counts
        // its whole life through the postmaster, less what it had used before the window.
        let running: u64 = end
            .postgres
            .iter()
            .map(|(pid, t)| t.saturating_sub(*self.start.postgres.get(pid).unwrap_or(&0)))
            .sum();
        let exited_before_window: u64 = self
            .start
            .postgres
            .iter()
            .filter(|(pid, _)| !end.postgres.contains_key(pid))
            .map(|(_, t)| t)
            .sum();
        let exited = end
            .postgres_exited
            .saturating_sub(self.start.postgres_exited)
            .saturating_sub(exited_before_window);
        let postgres = running + exited;
        let switchyard = end.switchyard.saturating_sub(self.start.switchyard);
        let sink = end.sink.saturating_sub(self.start.sink);
        let bench = end.bench.saturating_sub(self.start.bench);
        let busy = end.machine_busy.saturating_sub(self.start.machine_busy);
        let other = busy.saturating_sub(switchyard + postgres + bench);
        CpuSplit {
            switchyard: share(switchyard),
            postgres: share(postgres),
            loader: share(bench.saturating_sub(sink)),
            sink: share(sink),
            other: share(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_rss() {
        assert!(cpu_ticks("/proc/self/stat").is_some());
        assert!(peak_rss_mb(std::process::id()).is_some_and(|mb| mb > 0.0));
        let (busy, all) = machine_ticks().expect("/proc/stat");
        assert!(busy <= all);
    }

    #[test]
    fn a_child_that_exits_is_charged_to_its_parent() {
        let me = std::process::id();
        let before = reaped_children_ticks(me).expect("/proc/self/stat");
        // A child that burns about a second of CPU, then exits and is reaped.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; end=$(($(date +%s) + 1)); while [ $(date +%s) -lt $end ]; do i=$((i+1)); done"])
            .status()
            .expect("sh");
        assert!(status.success());
        let after = reaped_children_ticks(me).expect("/proc/self/stat");
        assert!(after > before, "{before} -> {after}");
    }
}
