//! Results: one row per scenario, the targets, the printed table and the JSON file.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::procfs::CpuSplit;

/// One measured scenario (or one step of a scenario with several, like `scale`).
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub events_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub cpu: Option<CpuSplit>,
    /// Scenario-specific figures (JSON keys).
    pub extra: Map<String, Value>,
    /// Set when the scenario failed; the figures are then whatever it got to.
    pub error: Option<String>,
}

impl Row {
    pub fn new(scenario: &str) -> Row {
        Row {
            scenario: scenario.to_owned(),
            ..Row::default()
        }
    }

    pub fn failed(scenario: &str, error: &anyhow::Error) -> Row {
        Row {
            error: Some(format!("{error:#}")),
            ..Row::new(scenario)
        }
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.extra.insert(key.to_owned(), value.into());
    }

    fn number(&self, key: &str) -> Option<f64> {
        self.extra.get(key).and_then(Value::as_f64)
    }
}

/// A target of the issues, the ratio it is judged by, and whether a row meets it.
struct Verdict {
    target: String,
    /// The row's rate over its basis, and the basis's name.
    ratio: Option<(f64, &'static str)>,
    ok: Option<bool>,
}

/// The same-run figures targets are ratios to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baselines {
    /// `postgres-baseline`: binary COPY, raw SKIP LOCKED drain, single-row INSERT commits.
    pub copy: Option<f64>,
    pub drain: Option<f64>,
    pub commit: Option<f64>,
    /// `backlog-drain`, what a replay is compared with.
    pub backlog: Option<f64>,
    /// graphile-worker's best batched processing rate, measured in the same session.
    pub peer: Option<f64>,
    /// `scale-1`: one destination, what the 10,000-key step is compared with.
    pub one_destination: Option<f64>,
}

impl Baselines {
    pub fn of(rows: &[Row]) -> Baselines {
        let ok = |name: &str| {
            rows.iter()
                .find(|r| r.scenario == name && r.error.is_none())
        };
        let base = ok("postgres-baseline");
        let key = |k: &str| base.and_then(|r| r.number(k)).filter(|v| *v > 0.0);
        Baselines {
            copy: key("copy_events_per_sec"),
            drain: key("drain_events_per_sec"),
            commit: key("commit_events_per_sec"),
            backlog: ok("backlog-drain").map(|r| r.events_per_sec),
            peer: ok(PEER_ROW).map(|r| r.events_per_sec),
            one_destination: ok("scale-1").map(|r| r.events_per_sec),
        }
    }
}

/// The row of the graphile-worker peer.
pub const PEER_ROW: &str = "graphile-worker";

/// All of `checks` hold: `Some(false)` if one fails, `None` if one could not be judged.
fn all(checks: &[Option<bool>]) -> Option<bool> {
    if checks.contains(&Some(false)) {
        Some(false)
    } else if checks.contains(&None) {
        None
    } else {
        Some(true)
    }
}

fn verdict(row: &Row, base: &Baselines) -> Option<Verdict> {
    let eps = row.events_per_sec;
    let p99 = row.p99_ms;
    let of = |basis: Option<f64>, name: &'static str| {
        basis.filter(|b| *b > 0.0).map(|b| (eps / b, name))
    };
    let at_least = |ratio: Option<(f64, &str)>, min: f64| ratio.map(|(r, _)| r >= min);
    let rss_ok = row.peak_rss_mb.map(|m| m <= 200.0);
    let (target, ratio, ok) = match row.scenario.as_str() {
        "postgres-baseline" => ("(the limits)".to_owned(), None, None),
        "balancing" => (
            "all-on < p2c < round robin (failed, p99)".to_owned(),
            None,
            row.extra.get("ordered").and_then(Value::as_bool),
        ),
        "ingest-single" => {
            let ratio = of(base.commit, "commit");
            (
                ">= 1.5x commit, p99 <= 20 ms".to_owned(),
                ratio,
                all(&[
                    at_least(ratio, 1.5),
                    Some(p99.is_some_and(|p| p <= 20.0)),
                    Some(row.extra.get("failures").is_none()),
                ]),
            )
        }
        "ingest-batch" => {
            let ratio = of(base.copy, "copy");
            (">= 0.50 copy".to_owned(), ratio, at_least(ratio, 0.5))
        }
        "deliver-e2e" => {
            let ratio = of(base.drain, "drain");
            (
                ">= 0.35 drain, p99 <= 100 ms @2k/s".to_owned(),
                ratio,
                all(&[at_least(ratio, 0.35), Some(p99.is_some_and(|p| p <= 100.0))]),
            )
        }
        "deliver-batched" => {
            let ratio = of(base.drain, "drain");
            (">= 0.90 drain".to_owned(), ratio, at_least(ratio, 0.9))
        }
        "noisy-neighbor" => (
            "quiet p99 <= 250 ms".to_owned(),
            None,
            Some(p99.is_some_and(|p| p <= 250.0)),
        ),
        "rate-limit-accuracy" => (
            "each key within 3%".to_owned(),
            None,
            row.number("max_error_pct").map(|e| e <= 3.0),
        ),
        "backlog-drain" => {
            let ratio = of(base.drain, "drain");
            let peer = of(base.peer, "peer");
            let target = match peer {
                Some((r, _)) => format!(">= 0.75 drain, >= 1.5x peer ({r:.2}x), RSS <= 200"),
                None => ">= 0.75 drain, >= 1.5x peer (-), RSS <= 200".to_owned(),
            };
            (
                target,
                ratio,
                all(&[at_least(ratio, 0.75), at_least(peer, 1.5), rss_ok]),
            )
        }
        PEER_ROW => ("(the peer)".to_owned(), of(base.drain, "drain"), None),
        "replay" => {
            let ratio = of(base.backlog, "backlog");
            let live = row.number("live_p99_increase_pct").map(|p| p <= 25.0);
            (
                ">= 0.75 backlog, RSS <= 200, live p99 +25%".to_owned(),
                ratio,
                all(&[at_least(ratio, 0.75), rss_ok, live]),
            )
        }
        "scale-1000" => (
            "p99 <= 100 ms @2k/s".to_owned(),
            None,
            Some(p99.is_some_and(|p| p <= 100.0)),
        ),
        "scale-10000-keys" => {
            let ratio = of(base.one_destination, "scale-1");
            (">= 0.50 scale-1".to_owned(), ratio, at_least(ratio, 0.5))
        }
        "soak" => (
            "flat: rate ±10%, size +25%".to_owned(),
            None,
            row.extra.get("flat").and_then(Value::as_bool),
        ),
        name => {
            // A with/without row: the rate with a feature over the same pipeline without it.
            let min = COSTS.iter().find(|(n, _)| *n == name)?.1;
            let ratio = row
                .number("without_events_per_sec")
                .filter(|b| *b > 0.0)
                .map(|b| (eps / b, "without"));
            (format!(">= {min:.2} without"), ratio, at_least(ratio, min))
        }
    };
    Some(Verdict { target, ratio, ok })
}

/// The with/without rows and the least ratio each may have.
const COSTS: [(&str, f64); 3] = [
    ("archive-cost", 0.95),
    ("transform-cost", 0.5),
    ("trail-cost", 0.95),
];

/// The printed table: one line per row, then each row's scenario-specific figures.
pub fn table(rows: &[Row]) -> String {
    let base = Baselines::of(rows);
    let mut out = String::new();
    line(
        &mut out,
        [
            "scenario",
            "events/s",
            "p50 ms",
            "p99 ms",
            "RSS MB",
            "ratio",
            "cpu% sy/pg/ld",
            "target",
            "ok",
        ],
    );
    for row in rows {
        let verdict = verdict(row, &base);
        let ok = match (&row.error, verdict.as_ref().and_then(|v| v.ok)) {
            (Some(_), _) => "ERROR",
            (None, Some(true)) => "yes",
            (None, Some(false)) => "NO",
            (None, None) => "",
        };
        let cpu = row.cpu.map_or_else(
            || "-".to_owned(),
            |c| {
                format!(
                    "{:.0}/{:.0}/{:.0}",
                    c.switchyard,
                    c.postgres,
                    c.loader + c.sink
                )
            },
        );
        let ratio = verdict
            .as_ref()
            .and_then(|v| v.ratio)
            .map_or_else(|| "-".to_owned(), |(r, basis)| format!("{r:.2} {basis}"));
        let target = verdict.map(|v| v.target).unwrap_or_default();
        line(
            &mut out,
            [
                &row.scenario,
                &thousands(row.events_per_sec),
                &optional(row.p50_ms, 1),
                &optional(row.p99_ms, 1),
                &optional(row.peak_rss_mb, 0),
                &ratio,
                &cpu,
                &target,
                ok,
            ],
        );
    }
    out.push('\n');
    for row in rows {
        if let Some(error) = &row.error {
            let _ = writeln!(out, "{}: ERROR {error}", row.scenario);
        }
        let mut details: Vec<String> = Vec::new();
        if let Some(cost) = cpu_per_event(row) {
            details.push(format!(
                "cpu_us_per_event(switchyard/postgres/bench)={:.1}/{:.1}/{:.1}",
                cost.switchyard, cost.postgres, cost.bench
            ));
        }
        details.extend(
            row.extra
                .iter()
                .map(|(key, value)| format!("{key}={}", compact(value))),
        );
        if details.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{}: {}", row.scenario, details.join(" "));
    }
    out
}

/// One line of the table.
fn line(out: &mut String, cells: [&str; 9]) {
    let [scenario, rate, p50, p99, rss, ratio, cpu, target, ok] = cells;
    let _ = writeln!(
        out,
        "{scenario:<20} {rate:>10} {p50:>8} {p99:>8} {rss:>8} {ratio:>13} {cpu:>14}  {target:<46} {ok}"
    );
}

/// The `--json` document: `{"SCENARIO": {...}}`.
pub fn json(rows: &[Row]) -> Value {
    let base = Baselines::of(rows);
    let mut document = Map::new();
    for row in rows {
        let verdict = verdict(row, &base);
        let mut entry = Map::new();
        entry.insert("events_per_sec".into(), round(row.events_per_sec, 1));
        entry.insert(
            "p50_ms".into(),
            row.p50_ms.map_or(Value::Null, |v| round(v, 3)),
        );
        entry.insert(
            "p99_ms".into(),
            row.p99_ms.map_or(Value::Null, |v| round(v, 3)),
        );
        entry.insert(
            "peak_rss_mb".into(),
            row.peak_rss_mb.map_or(Value::Null, |v| round(v, 1)),
        );
        if let Some(cpu) = row.cpu {
            if let Some(cost) = cpu_per_event(row) {
                entry.insert(
                    "cpu_switchyard_us_per_event".into(),
                    round(cost.switchyard, 2),
                );
                entry.insert("cpu_postgres_us_per_event".into(), round(cost.postgres, 2));
                entry.insert("cpu_bench_us_per_event".into(), round(cost.bench, 2));
            }
            entry.insert("cpu_switchyard_pct".into(), round(cpu.switchyard, 1));
            entry.insert("cpu_postgres_pct".into(), round(cpu.postgres, 1));
            entry.insert("cpu_loader_pct".into(), round(cpu.loader, 1));
            entry.insert("cpu_sink_pct".into(), round(cpu.sink, 1));
            entry.insert("cpu_other_pct".into(), round(cpu.other, 1));
        }
        if let Some(verdict) = verdict {
            let (ratio, basis) = verdict
                .ratio
                .map_or((Value::Null, Value::Null), |(r, b)| (round(r, 4), json!(b)));
            entry.insert("ratio".into(), ratio);
            entry.insert("ratio_to".into(), basis);
            entry.insert("target".into(), json!(verdict.target));
            entry.insert("ok".into(), json!(verdict.ok));
        }
        if let Some(error) = &row.error {
            entry.insert("error".into(), json!(error));
        }
        for (key, value) in &row.extra {
            entry.insert(key.clone(), value.clone());
        }
        document.insert(row.scenario.clone(), Value::Object(entry));
    }
    Value::Object(document)
}

/// CPU time per event, in microseconds: unlike events/s, it hardly moves when other work on
/// the machine takes cores away.
pub struct CostPerEvent {
    pub switchyard: f64,
    pub postgres: f64,
    /// The loader and the sinks.
    pub bench: f64,
}

fn cpu_per_event(row: &Row) -> Option<CostPerEvent> {
    cost_per_event(&row.cpu?, row.events_per_sec)
}

/// CPU per event, in microseconds, of a window whose split was `cpu` while `events_per_sec`
/// went through.
pub fn cost_per_event(cpu: &CpuSplit, events_per_sec: f64) -> Option<CostPerEvent> {
    if events_per_sec <= 0.0 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let micros = |pct: f64| pct / 100.0 * cores / events_per_sec * 1e6;
    Some(CostPerEvent {
        switchyard: micros(cpu.switchyard),
        postgres: micros(cpu.postgres),
        bench: micros(cpu.loader + cpu.sink),
    })
}

/// Rounds to `digits` decimals, as a JSON number.
pub fn round(value: f64, digits: i32) -> Value {
    let scale = 10f64.powi(digits);
    json!((value * scale).round() / scale)
}

fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// 95000.4 -> "95,000".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn compact(value: &Value) -> String {
    match value {
        Value::Number(n) => n
            .as_f64()
            .filter(|v| v.fract() != 0.0 && v.abs() >= 100.0)
            .map_or_else(|| n.to_string(), |v| format!("{v:.0}")),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(95_000.4), "95,000");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    fn baseline(copy: f64, drain: f64, commit: f64) -> Row {
        let mut row = Row::new("postgres-baseline");
        row.events_per_sec = copy;
        row.set("copy_events_per_sec", copy);
        row.set("drain_events_per_sec", drain);
        row.set("commit_events_per_sec", commit);
        row
    }

    #[test]
    fn targets_are_judged_against_their_own_baseline() {
        let mut batch = Row::new("ingest-batch");
        batch.events_per_sec = 60_000.0;
        let mut single = Row::new("ingest-single");
        single.events_per_sec = 12_000.0;
        single.p99_ms = Some(9.0);
        let mut drain = Row::new("backlog-drain");
        drain.events_per_sec = 40_000.0;
        drain.peak_rss_mb = Some(30.0);
        let mut peer = Row::new(PEER_ROW);
        peer.events_per_sec = 20_000.0;
        let rows = [
            baseline(100_000.0, 50_000.0, 10_000.0),
            batch,
            single,
            drain,
            peer,
        ];
        let table = table(&rows);
        assert!(table.contains("0.60 copy"), "{table}");
        assert!(table.contains("1.20 commit"), "{table}");
        assert!(table.contains("(2.00x)"), "{table}");
        let document = json(&rows);
        assert_eq!(document["ingest-batch"]["ok"], json!(true));
        assert_eq!(document["ingest-single"]["ok"], json!(false));
        assert_eq!(document["ingest-single"]["ratio"], json!(1.2));
        assert_eq!(document["ingest-single"]["ratio_to"], json!("commit"));
        assert_eq!(document["backlog-drain"]["ok"], json!(true));
        assert_eq!(document["backlog-drain"]["ratio"], json!(0.8));
    }

    #[test]
    fn with_without_rows_are_ratios_to_their_own_run() {
        let mut row = Row::new("archive-cost");
        row.events_per_sec = 9_600.0;
        row.set("without_events_per_sec", 10_000.0);
        let document = json(&[row]);
        assert_eq!(document["archive-cost"]["ratio"], json!(0.96));
        assert_eq!(document["archive-cost"]["ok"], json!(true));
    }
}
